"""Login latency, direct vs through our proxy, with a histogram and the proxy's CPU per login.

    python3 -m benchmarks.login_latency [--logins 200] [--runs 3] [--protocols SMTP IMAP] [--phases]
                                        [--baseline DIR] [--debug] [--profile FILE]
                                        [--floor] [--storm CLIENTS [--seconds 2]]

Starts the integration-test world and our proxy as `python3 -m benchmarks` does (the latency part only, no
reference). The targets are interleaved within each run, so drift in the machine's load hits them alike.
`--baseline DIR` also runs the proxy of another copy of the repository (target "base"), for before/after
comparisons in the same world and the same load. `--phases` times each step of every SMTP login (client
side). `--info FILE` writes ports, CA, user and token for other tools; `--hold-until FILE` keeps the world
running after the measurements until FILE exists. Each block prints its wall-clock window (for packet
captures).

`--floor` adds target "floor" (IMAP only): `benchmarks/floor.py`, a bare asyncio relay with the proxy's own
upstream transport and nothing else, to which the client speaks XOAUTH2 itself. `--storm CLIENTS` measures
logins per second with that many concurrent clients instead of sequential latency, with the relay's CPU per
login and how busy the whole machine was: together they show what any single-process relay costs here.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.__main__ import (
    CLIENT_ID,
    CLIENT_SECRET,
    TOKEN_LIFETIME,
    direct_target,
    proxy_sections,
    proxy_target,
)
from benchmarks.idle import raise_fd_limit
from benchmarks.measure import percentile, storm
from benchmarks.proxies import REPO, ProxyProcess, cpu_seconds, our_command
from benchmarks.wire import LOGINS, Target, Wire
from tests.integration.conftest import start_world
from tests.integration.proxy import allocate_ports
from tests.integration.world.dovecot import DovecotTuning
from tests.integration.world.token_table import lua_available, write_table


def phased_smtp_login(target: Target, user: str) -> list[tuple[str, float]]:
    """Like wire.smtp_login, returning (step, seconds since the start) after each step."""
    marks: list[tuple[str, float]] = []
    start = time.perf_counter()

    def mark(name: str) -> None:
        marks.append((name, time.perf_counter() - start))

    wire = Wire.connect(target.smtp, None)
    mark("connect")
    try:
        wire.smtp_reply("220")
        mark("greeting")
        wire.send(b"EHLO bench.example.com\r\n")
        wire.smtp_reply("250")
        mark("ehlo")
        if target.tls is not None:
            wire.send(b"STARTTLS\r\n")
            wire.smtp_reply("220")
            mark("starttls")
            wire.sock = target.tls.wrap_socket(wire.sock, server_hostname=target.smtp[0])
            mark("handshake")
            wire.send(b"EHLO bench.example.com\r\n")
            wire.smtp_reply("250")
            mark("ehlo2")
        if target.direct:
            wire.send(b"AUTH XOAUTH2\r\n")
            wire.smtp_reply("334")
            mark("auth334")
            wire.send(f"{target.xoauth2(user)}\r\n".encode())
        else:
            plain = base64.b64encode(f"\0{user}\0{target.password}".encode()).decode()
            wire.send(f"AUTH PLAIN {plain}\r\n".encode())
        wire.smtp_reply("235")
        mark("235")
    finally:
        wire.close()
    return marks


def histogram(samples: list[float]) -> str:
    edges = [5, 10, 15, 20, 30, 40, 50, 60, 80, 1e9]
    counts = [0] * len(edges)
    for s in samples:
        ms = s * 1e3
        counts[next(i for i, e in enumerate(edges) if ms < e)] += 1
    labels = [f"<{e:g}" if e < 1e9 else ">=80" for e in edges]
    return " ".join(f"{label}:{c}" for label, c in zip(labels, counts, strict=True) if c)


def describe_phases(phases: list[list[tuple[str, float]]]) -> None:
    names = [n for n, _ in phases[0]]
    steps = [[m[i][1] - (m[i - 1][1] if i else 0.0) for m in phases] for i in range(len(names))]
    print(
        "      median step ms: "
        + " ".join(f"{n}={statistics.median(s) * 1e3:.2f}" for n, s in zip(names, steps, strict=True))
    )
    for m in sorted(phases, key=lambda m: m[-1][1])[-3:]:
        print(
            "      slow login steps ms: "
            + " ".join(f"{n}={(v - (m[i - 1][1] if i else 0.0)) * 1e3:.1f}" for i, (n, v) in enumerate(m))
        )


TICKS = os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    """(all, idle) CPU ticks of the whole machine so far."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields), fields[3] + fields[4]  # idle + iowait


def start_floor(world_imaps: tuple[str, int], ca: Path) -> tuple[subprocess.Popen[str], int]:
    port = allocate_ports("IMAP")["IMAP"]
    command = [sys.executable, "-m", "benchmarks.floor", "--listen", str(port),
               "--upstream", f"{world_imaps[0]}:{world_imaps[1]}", "--cafile", str(ca)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        process.kill()
        raise RuntimeError("the floor relay did not start")
    return process, port


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--logins", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--protocols", nargs="+", default=["SMTP", "IMAP"])
    parser.add_argument("--baseline", type=Path, help="also run the proxy of this repository copy ('base')")
    parser.add_argument("--targets", nargs="+", help="only these targets (direct, ours, base)")
    parser.add_argument("--debug", action="store_true", help="run the proxies with --debug")
    parser.add_argument("--phases", action="store_true")
    parser.add_argument("--profile", type=Path, help="run our proxy under cProfile, writing stats here")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds to wait before measuring")
    parser.add_argument("--info", type=Path, help="write ports, CA, user and token here as JSON")
    parser.add_argument("--hold-until", type=Path, help="after measuring, wait until this file exists")
    parser.add_argument("--floor", action="store_true", help="also run the bare relay of benchmarks/floor.py")
    parser.add_argument("--storm", type=int, metavar="CLIENTS", help="logins/s with this many clients")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each --storm run")
    args = parser.parse_args()
    raise_fd_limit()
    tmp = Path(tempfile.mkdtemp(prefix="emailproxy-lat-"))
    tmp.chmod(0o755)
    table_path = tmp / "tokens.tsv"
    write_table(table_path, [])
    tuning = DovecotTuning(
        token_table=table_path if lua_available() else None,
        imap_client_limit=1000,
        max_userip_connections=100_000,
    )
    (tmp / "world").mkdir()
    world = start_world(tmp / "world", tuning)
    proxies: dict[str, ProxyProcess] = {}
    floor: subprocess.Popen[str] | None = None
    try:
        world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
        user = world.new_user("bench-login")
        direct_token = world.idp.issue_token(user, expires_in=TOKEN_LIFETIME)
        d = world.dovecot.ports
        targets = [direct_target(world, "direct", {user: direct_token})]
        extra = ["--debug"] if args.debug else []
        commands = {"ours": our_command() + extra}
        if args.profile:
            commands["ours"] = [sys.executable, "-m", "cProfile", "-o", str(args.profile), "-m", "emailproxy"]
        if args.baseline:
            run_base = (
                f"import sys, runpy; sys.path.insert(0, {str(args.baseline)!r}); "
                "runpy.run_module('emailproxy', run_name='__main__', alter_sys=True)"
            )
            commands["base"] = [sys.executable, "-c", run_base, *extra]
        for key, command in commands.items():
            ports = allocate_ports("IMAP", "POP", "SMTP")
            proxy = ProxyProcess(key, command, tmp / key, world.ca_path, proxy_sections(world, ports), ports)
            proxies[key] = proxy
            proxy.start()
            targets.append(proxy_target(key, key, proxy))
        if args.floor:
            floor, floor_port = start_floor((d.host, d.imaps), world.ca_path)
            nowhere = ("127.0.0.1", 0)
            targets.append(
                Target("floor", "floor relay", ("127.0.0.1", floor_port), nowhere, nowhere,
                       tokens={user: direct_token}, pid=floor.pid, plain_xoauth2=True)
            )
        if args.targets:
            targets = [t for t in targets if t.key in args.targets]
        for t in targets:
            for protocol in args.protocols:
                if t.key != "floor" or protocol == "IMAP":
                    LOGINS[protocol](t, user).close()
        entries: list[tuple[str, str | None, float]] = [(direct_token, user, time.time() + TOKEN_LIFETIME)]
        entries += [(t.access_token, t.user, t.expires_at) for t in world.idp.issued]
        write_table(table_path, entries)
        for key, proxy in proxies.items():
            print(f"{key} proxy pid {proxy.pid}; smtp {proxy.ports['SMTP']}; imap {proxy.ports['IMAP']}")
        print(f"postfix {world.postfix.ports.submission}; imaps {d.imaps}; {tmp}", flush=True)
        if args.info:
            info = {
                "postfix": world.postfix.ports.submission,
                "imaps": d.imaps,
                "ca": str(world.ca_path),
                "user": user,
                "token": direct_token,
                "proxies": {k: {"pid": p.pid, **p.ports} for k, p in proxies.items()},
            }
            args.info.write_text(json.dumps(info))
        time.sleep(args.pause)
        if args.storm:
            storms(args, targets, user)
            targets = []  # nothing more to measure
        summary: dict[tuple[str, str], dict[str, list[float]]] = {}
        for run in range(args.runs if targets else 0):
            for protocol in args.protocols:
                for t in targets:
                    if t.key == "floor" and protocol != "IMAP":
                        continue
                    pid = t.pid
                    cpu0 = cpu_seconds(pid) if pid else 0.0
                    samples = []
                    phases: list[list[tuple[str, float]]] = []
                    window = time.time()
                    for _ in range(args.logins):
                        if args.phases and protocol == "SMTP":
                            marks = phased_smtp_login(t, user)
                            phases.append(marks)
                            samples.append(marks[-1][1])
                        else:
                            start = time.perf_counter()
                            LOGINS[protocol](t, user).close()
                            samples.append(time.perf_counter() - start)
                    cpu = (cpu_seconds(pid) - cpu0) / args.logins * 1e3 if pid else 0.0
                    p50, p99 = percentile(samples, 0.5) * 1e3, percentile(samples, 0.99) * 1e3
                    slow = sum(1 for s in samples if s > 0.030)
                    entry = summary.setdefault(
                        (protocol, t.key), {"p50": [], "p99": [], "cpu": [], "slow": []}
                    )
                    entry["p50"].append(p50)
                    entry["p99"].append(p99)
                    entry["cpu"].append(cpu)
                    entry["slow"].append(slow)
                    print(
                        f"run {run} {protocol} {t.key:6}: p50 {p50:5.1f} p99 {p99:5.1f} ms, "
                        f">30 ms: {slow:3d}, proxy cpu/login {cpu:.2f} ms | {histogram(samples)} "
                        f"| window {window:.3f}-{time.time():.3f}",
                        flush=True,
                    )
                    if phases:
                        describe_phases(phases)
        if targets:
            print("\nsummary (median over runs, [min-max]):")
        for protocol in args.protocols:
            direct = summary.get((protocol, "direct"))
            for t in targets:
                if (protocol, t.key) not in summary:
                    continue
                s = summary[(protocol, t.key)]
                line = f"  {protocol} {t.key:6}: p50 {spread(s['p50'])}, p99 {spread(s['p99'])}"
                if direct is not None and t.key != "direct":
                    for key in ("p50", "p99"):
                        added = [o - dd for o, dd in zip(s[key], direct[key], strict=True)]
                        line += f", added {key} {spread(added)}"
                if t.pid:
                    line += f", cpu/login ms {spread(s['cpu'])}"
                line += f", >30 ms per run {[int(x) for x in s['slow']]}"
                print(line)
        print(f"load {Path('/proc/loadavg').read_text().split()[0]}")
        while args.hold_until and not args.hold_until.exists():
            time.sleep(0.5)
    finally:
        if floor is not None:
            floor.terminate()
            floor.wait(10)
        for proxy in proxies.values():
            proxy.stop()
        world.stop()


def storms(args: argparse.Namespace, targets: list[Target], user: str) -> None:
    """`--storm`: logins/s per target and protocol, with the relay's CPU per login and the machine's load."""
    rates: dict[tuple[str, str], list[float]] = {}
    cpus: dict[tuple[str, str], list[float]] = {}
    machines: dict[tuple[str, str], list[float]] = {}
    for run in range(args.runs):
        for protocol in args.protocols:
            for t in targets:
                if t.key == "floor" and protocol != "IMAP":
                    continue
                cpu0 = cpu_seconds(t.pid) if t.pid else 0.0
                all0, idle0 = machine_ticks()
                start = time.perf_counter()
                rate, failed = storm(t, protocol, user, args.storm, args.seconds)
                logins = rate * (time.perf_counter() - start)
                all1, idle1 = machine_ticks()
                busy = 100 * (1 - (idle1 - idle0) / max(all1 - all0, 1))
                # all CPU time spent on the machine (clients, servers, relay) per login
                machine = ((all1 - all0) - (idle1 - idle0)) / TICKS / max(logins, 1) * 1e3
                cpu = (cpu_seconds(t.pid) - cpu0) / max(logins, 1) * 1e3 if t.pid else 0.0
                rates.setdefault((protocol, t.key), []).append(rate)
                cpus.setdefault((protocol, t.key), []).append(cpu)
                machines.setdefault((protocol, t.key), []).append(machine)
                print(
                    f"run {run} {protocol} {t.key:6}: {rate:6.1f} logins/s ({failed} failed), "
                    f"relay cpu/login {cpu:.2f} ms, machine cpu/login {machine:.2f} ms, "
                    f"machine busy {busy:.0f}%",
                    flush=True,
                )
    print(f"\nsummary, {args.storm} clients (median over runs, [min-max]):")
    for protocol in args.protocols:
        direct = rates.get((protocol, "direct"))
        for t in targets:
            if (protocol, t.key) not in rates:
                continue
            r = rates[(protocol, t.key)]
            line = f"  {protocol} {t.key:6}: {spread(r)} logins/s"
            if direct and t.key != "direct":
                ratios = [a / b for a, b in zip(r, direct, strict=True)]
                line += f", vs direct {statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]x"
            if t.pid:
                line += f", relay cpu/login ms {spread(cpus[(protocol, t.key)])}"
            line += f", machine cpu/login ms {spread(machines[(protocol, t.key)])}"
            print(line)


if __name__ == "__main__":
    main()
