"""Hand-run measurements for the core proxy: login latency with a cached token and bulk IMAP FETCH speed,
each through the proxy and directly against Dovecot (XOAUTH2), in the same run on the same machine.

    python3 -m benchmarks.core [--logins 200] [--fetch-mib 100] [--runs 5]

It starts the integration-test world (test CA, identity provider, private Dovecot and Postfix; needs the
Debian packages from .ci/run and root) and a proxy subprocess, prints a table and exits. Numbers are for the
notes; no test asserts on them.
"""

from __future__ import annotations

import argparse
import imaplib
import shutil
import ssl
import statistics
import tempfile
import time
from pathlib import Path

from tests.integration.conftest import start_world
from tests.integration.proxy import allocate_ports, launch

CLIENT_ID, CLIENT_SECRET, PASSWORD = "bench-client", "bench-secret", "bench-local-password"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def direct_login(host: str, port: int, ctx: ssl.SSLContext, user: str, token: str) -> float:
    start = time.perf_counter()
    imap = imaplib.IMAP4_SSL(host, port, ssl_context=ctx)
    blob = f"user={user}\x01auth=Bearer {token}\x01\x01".encode()
    imap.authenticate("XOAUTH2", lambda _challenge: blob)
    elapsed = time.perf_counter() - start
    imap.logout()
    return elapsed


def proxy_login(port: int, user: str) -> float:
    start = time.perf_counter()
    imap = imaplib.IMAP4("127.0.0.1", port)
    imap.login(user, PASSWORD)
    elapsed = time.perf_counter() - start
    imap.logout()
    return elapsed


def fetch_rate(imap: imaplib.IMAP4, size: int) -> float:
    imap.select("INBOX", readonly=True)
    start = time.perf_counter()
    typ, data = imap.fetch("1", "(BODY.PEEK[])")
    elapsed = time.perf_counter() - start
    assert typ == "OK"
    body = data[0][1]
    assert isinstance(body, bytes) and len(body) >= size, len(body)
    return len(body) / elapsed / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--logins", type=int, default=200)
    parser.add_argument("--fetch-mib", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="emailproxy-bench-"))
    tmp.chmod(0o755)  # the mail servers run as other users
    (tmp / "world").mkdir()
    world = start_world(tmp / "world")
    proxy = None
    try:
        world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
        user = world.new_user("bench")
        d = world.dovecot.ports
        ports = allocate_ports("IMAP")
        (tmp / "proxy").mkdir()
        proxy = launch(world.ca_path, tmp / "proxy", {
            f"IMAP-{ports['IMAP']}": {"server_address": d.host, "server_port": str(d.imaps)},
            "emailproxy": {"allow_catch_all_accounts": "True"},
            f"@{world.domain}": {
                "token_url": world.idp.token_url(), "oauth2_scope": "https://outlook.office365.com/.default",
                "oauth2_flow": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
        }, ports)
        # the proxy's log at --debug costs time; the figures below are with --debug on (worst case)
        ctx = ssl.create_default_context(cafile=str(world.ca_path))
        proxy_login(ports["IMAP"], user)  # first login: fetches and saves the token
        token = world.idp.issue_token(user, expires_in=7200)

        direct, proxied = [], []
        for _ in range(args.logins):
            direct.append(direct_login(d.host, d.imaps, ctx, user, token))
            proxied.append(proxy_login(ports["IMAP"], user))
        p50d, p50p = statistics.median(direct), statistics.median(proxied)
        p99d, p99p = percentile(direct, 0.99), percentile(proxied, 0.99)
        print(f"login, cached token ({args.logins} each, connect+login): direct p50 {p50d*1e3:.1f} ms "
              f"p99 {p99d*1e3:.1f} ms; proxy p50 {p50p*1e3:.1f} ms p99 {p99p*1e3:.1f} ms; "
              f"added p50 {(p50p-p50d)*1e3:+.1f} ms, p99 {(p99p-p99d)*1e3:+.1f} ms")

        size = args.fetch_mib * 1024 * 1024
        line = b"x" * 998 + b"\r\n"
        body = line * (size // len(line) + 1)
        message = b"From: a@example.com\r\nTo: " + user.encode() + b"\r\nSubject: big\r\n\r\n" + body
        # empty the mailbox's INBOX by using a fresh user for the big message
        big_user = world.new_user("bigfetch")
        world.dovecot.deliver(big_user, message)
        big_token = world.idp.issue_token(big_user, expires_in=7200)
        direct_rates, proxy_rates = [], []
        for _ in range(args.runs):
            imap = imaplib.IMAP4_SSL(d.host, d.imaps, ssl_context=ctx)
            blob = f"user={big_user}\x01auth=Bearer {big_token}\x01\x01".encode()
            imap.authenticate("XOAUTH2", lambda _c, blob=blob: blob)
            direct_rates.append(fetch_rate(imap, size))
            imap.logout()
            imap = imaplib.IMAP4("127.0.0.1", ports["IMAP"])
            imap.login(big_user, PASSWORD)
            proxy_rates.append(fetch_rate(imap, size))
            imap.logout()
        md, mp = statistics.median(direct_rates), statistics.median(proxy_rates)
        print(f"FETCH {args.fetch_mib} MiB ({args.runs} runs, median [min-max]): direct {md:.0f} MB/s "
              f"[{min(direct_rates):.0f}-{max(direct_rates):.0f}]; proxy {mp:.0f} MB/s "
              f"[{min(proxy_rates):.0f}-{max(proxy_rates):.0f}]; ratio {mp/md:.2f}")
    finally:
        if proxy is not None:
            proxy.stop()
        world.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
