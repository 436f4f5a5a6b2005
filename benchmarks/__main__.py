"""Benchmarks: a direct XOAUTH2 client, this project's proxy and the reference proxy, side by side.

    python3 -m benchmarks            # the full suite (about 10-15 minutes on 2 cores)
    python3 -m benchmarks --smoke    # tiny sizes, for CI: checks that every measurement works

Starts the integration-test world (test CA, identity provider, private Dovecot and Postfix; needs root and the
Debian packages of .ci/run plus dovecot-auth-lua), installs the reference proxy from PyPI into a throwaway
virtual environment, runs both proxies on the same configuration, prints a table and writes it to
benchmarks/RESULTS.md (the full suite) or to --output. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import ssl
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks import measure, report
from benchmarks.idle import raise_fd_limit
from benchmarks.proxies import (
    ProxyProcess,
    Reference,
    install_reference,
    installed_version,
    our_command,
    reference_command,
)
from benchmarks.wire import Target, lmtp_deliver, make_message
from tests.integration.conftest import World, start_world
from tests.integration.proxy import allocate_ports
from tests.integration.world.dovecot import DovecotTuning
from tests.integration.world.token_table import lua_available, write_table

CLIENT_ID, CLIENT_SECRET = "bench-client", "bench-secret"
PASSWORD = "bench-local-password"  # noqa: S105 - the local password of the benchmark accounts
TOKEN_LIFETIME = 6 * 3600
RESULTS = Path(__file__).with_name("RESULTS.md")
PHASES = ("bulk", "latency", "storm", "idle", "slow_reader")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python3 -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one run: correctness only")
    parser.add_argument("--runs", type=int, help="repetitions of each timed figure (default 5; smoke 1)")
    parser.add_argument("--only", nargs="+", choices=PHASES, help="run only these phases")
    parser.add_argument("--idle", type=int, nargs="+", help="idle session counts (default 1000 5000 10000)")
    parser.add_argument(
        "--no-reference", action="store_true", help="do not install or run the reference proxy"
    )
    parser.add_argument(
        "--reference-venv",
        type=Path,
        help="reuse this virtual environment for the reference "
        "(created and installed there if missing) instead of a throwaway one",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="write the Markdown results here (default: "
        "benchmarks/RESULTS.md for a full run, nothing for --smoke)",
    )
    parser.add_argument("--json", type=Path, help="also write the raw results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configs)")
    return parser.parse_args(argv)


def proxy_sections(world: World, ports: dict[str, int]) -> dict[str, dict[str, str]]:
    d, p = world.dovecot.ports, world.postfix.ports
    local = {"local_address": "127.0.0.1"}
    return {
        f"IMAP-{ports['IMAP']}": {**local, "server_address": d.host, "server_port": str(d.imaps)},
        f"POP-{ports['POP']}": {**local, "server_address": d.host, "server_port": str(d.pop3s)},
        f"SMTP-{ports['SMTP']}": {
            **local,
            "server_address": "127.0.0.1",
            "server_port": str(p.submission),
            "server_starttls": "True",
        },
        # the idle phase holds up to 10,000 sessions: above the default max_connections (1000)
        "emailproxy": {"allow_catch_all_accounts": "True", "max_connections": "100000"},
        f"@{world.domain}": {
            "token_url": world.idp.token_url(),
            "oauth2_scope": "https://outlook.office365.com/.default",
            "oauth2_flow": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
    }


def direct_target(world: World, label: str, tokens: dict[str, str]) -> Target:
    """A client that talks XOAUTH2 to Dovecot and Postfix itself, over TLS, with these users' tokens."""
    d = world.dovecot.ports
    return Target(
        "direct",
        label,
        (d.host, d.imaps),
        (d.host, d.pop3s),
        ("127.0.0.1", world.postfix.ports.submission),
        tls=ssl.create_default_context(cafile=str(world.ca_path)),
        tokens=tokens,
    )


def proxy_target(key: str, label: str, proxy: ProxyProcess) -> Target:
    p = proxy.ports
    return Target(
        key,
        label,
        ("127.0.0.1", p["IMAP"]),
        ("127.0.0.1", p["POP"]),
        ("127.0.0.1", p["SMTP"]),
        password=PASSWORD,
        pid=proxy.pid,
    )


def run(args: argparse.Namespace, tmp: Path, notes: list[str]) -> dict[str, Any]:
    sizes = measure.SMOKE if args.smoke else measure.FULL
    overrides: dict[str, Any] = {}
    if args.runs:
        overrides["runs"] = args.runs
    if args.idle:
        overrides["idle"] = tuple(args.idle)
    if overrides:
        sizes = measure.Sizes(**{**asdict(sizes), **overrides})
    soft, hard = raise_fd_limit()
    notes.append(
        f"File descriptor limit raised to {soft} (hard limit {hard}); a proxy needs two descriptors "
        "per session, so one proxy process can hold at most about (hard limit - 20) / 2 sessions."
    )
    log = print

    # reference install first: it is the part most likely to fail (network), and the slowest to set up
    reference: Reference | str = "not requested (--no-reference)"
    if not args.no_reference:
        log("installing the reference proxy from PyPI ...")
        venv_dir = args.reference_venv or tmp / "reference-venv"
        python = venv_dir / "bin" / "python"
        version = installed_version(python) if args.reference_venv and python.exists() else ""
        reference = Reference(python, version) if version else install_reference(venv_dir)
    if isinstance(reference, str):
        notes.append(f"Reference proxy unavailable: {reference}.")
        log(f"reference unavailable: {reference}")

    table_path = tmp / "tokens.tsv"
    write_table(table_path, [])
    cheap = lua_available()
    tuning = DovecotTuning(
        token_table=table_path if cheap else None, imap_client_limit=1000, max_userip_connections=100_000
    )
    if cheap:
        notes.append(
            "Dovecot checks known tokens in-process (Lua passdb over a token table); unknown tokens fall "
            "back to the test identity provider's checkpassword program."
        )
    else:
        notes.append(
            "dovecot-auth-lua is not installed: every login runs the checkpassword program (a "
            "process per login), which caps logins per second for every target."
        )
    log("starting the test world (identity provider, Dovecot, Postfix) ...")
    (tmp / "world").mkdir()
    world = start_world(tmp / "world", tuning)
    proxies: dict[str, ProxyProcess] = {}
    try:
        world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
        users = {name: world.new_user(f"bench-{name}") for name in ("imap", "pop", "login", "idle", "slow")}
        direct_tokens = {
            user: world.idp.issue_token(user, expires_in=TOKEN_LIFETIME) for user in users.values()
        }

        def sync_tokens() -> None:
            entries: list[tuple[str, str | None, float]] = [
                (token, user, time.time() + TOKEN_LIFETIME - 60) for user, token in direct_tokens.items()
            ]
            entries += [(t.access_token, t.user, t.expires_at) for t in world.idp.issued]
            write_table(table_path, entries)

        sync_tokens()
        markers = {"imap": measure.new_marker(), "pop": measure.new_marker(), "slow": measure.new_marker()}
        log("delivering the big messages ...")
        lmtp = (world.dovecot.host, world.dovecot.ports.lmtp)
        mib = measure.MIB
        lmtp_deliver(lmtp, users["imap"], make_message(users["imap"], sizes.fetch_mib * mib, markers["imap"]))
        lmtp_deliver(lmtp, users["pop"], make_message(users["pop"], sizes.pop_mib * mib, markers["pop"]))
        if not args.only or "slow_reader" in args.only:
            lmtp_deliver(
                lmtp, users["slow"], make_message(users["slow"], sizes.slow_mib * mib, markers["slow"])
            )
        smtp_message = make_message(measure.SINK, sizes.smtp_mib * mib, measure.new_marker())

        targets = [direct_target(world, "direct XOAUTH2", direct_tokens)]
        commands = {"ours": our_command()}
        if isinstance(reference, Reference):
            commands["reference"] = reference_command(reference)
        for key, command in commands.items():
            ports = allocate_ports("IMAP", "POP", "SMTP")
            proxy = ProxyProcess(key, command, tmp / key, world.ca_path, proxy_sections(world, ports), ports)
            proxies[key] = proxy
            proxy.start()
            targets.append(proxy_target(key, key, proxy))
        bench = measure.Bench(
            sizes, targets, proxies, users, {**markers, "smtp_message": smtp_message}, sync_tokens, log
        )
        for target in targets:
            bench.warm_up(target)
        checks_before = len(world.idp.check_log)
        for phase in PHASES:
            if args.only and phase not in args.only:
                continue
            log(f"{phase} ...")
            phase_start = time.monotonic()
            getattr(bench, phase)()
            log(f"  ({time.monotonic() - phase_start:.0f} s)")
            for target in targets:  # a phase may restart a proxy
                if target.key in proxies:
                    target.pid = proxies[target.key].pid
        slow_checks = len(world.idp.check_log) - checks_before
        results = bench.results
        results["server_token_checks_by_program"] = slow_checks
        if cheap:
            notes.append(
                f"Logins that fell back to the checkpassword program during the measurements: {slow_checks}."
            )
        results["sizes"] = asdict(sizes)
        results["fd_limit"] = hard
        results["reference"] = (
            {"available": True, "version": reference.version}
            if isinstance(reference, Reference)
            else {"available": False, "reason": reference}
        )
        for key, proxy in proxies.items():
            code = proxy.stop()
            results.setdefault("exit_codes", {})[key] = code
        return results
    finally:
        for proxy in proxies.values():
            proxy.stop()
        world.stop()


def _load() -> str:
    """The 1-minute load average (other work on the machine distorts absolute figures)."""
    return Path("/proc/loadavg").read_text().split()[0]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    tmp = Path(tempfile.mkdtemp(prefix="emailproxy-bench-"))
    tmp.chmod(0o755)
    notes: list[str] = []
    started = time.monotonic()
    load_before = _load()
    command = "python3 -m benchmarks" + (
        " " + " ".join(sys.argv[1:]) if argv is None and sys.argv[1:] else ""
    )
    try:
        results = run(args, tmp, notes)
    except Exception:
        traceback.print_exc()
        print(f"benchmark failed; files kept in {tmp}", file=sys.stderr)
        return 1
    results["meta"] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "elapsed": time.monotonic() - started,
        "machine": report.machine(),
        "versions": {**report.versions(), "reference": results["reference"].get("version", "unavailable")},
        "notes": notes,
        "load": load_before + " before, " + _load() + " after",
    }
    print()
    print(report.table(results))
    print()
    for note in notes:
        print(f"- {note}")
    output = args.output or (None if args.smoke or args.only else RESULTS)
    if output is not None:
        output.write_text(report.markdown(results))
        print(f"\nwritten to {output}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    if args.keep:
        print(f"files kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
