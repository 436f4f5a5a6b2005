"""The measurements. Each method fills one part of `Bench.results` (plain JSON-able data) and prints progress.

Timed figures are repeated `sizes.runs` times, with the targets interleaved within each run (direct, ours,
reference, direct, ...), so that drift in the machine's load hits all of them alike.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.idle import IdleResult, hold_idle_sessions
from benchmarks.proxies import ProxyProcess, cpu_seconds, rss_bytes
from benchmarks.wire import (
    LOGINS,
    BenchError,
    Target,
    Transfer,
    imap_fetch,
    imap_login,
    pop_login,
    pop_retr,
    smtp_login,
    smtp_send,
    timed_login,
)

MIB = 1024 * 1024
SINK = "sink@discard.invalid"  # Postfix accepts mail for other domains and discards it


@dataclass(frozen=True)
class Sizes:
    fetch_mib: int = 100
    smtp_mib: int = 50
    pop_mib: int = 50
    runs: int = 5
    logins: int = 200  # per run, direct and ours
    reference_logins: int = 50  # one run: each costs the reference 0.3-0.7 s of key derivation
    storm_clients: int = 50
    storm_seconds: float = 2.0
    reference_storm_runs: int = 1  # each run takes it 20-40 s (50 logins of key derivation at once)
    idle: tuple[int, ...] = (1000, 5000, 10000)
    reference_idle_deadline: float = 45.0  # the reference needs ~0.3 s of CPU per login
    idle_deadline: float = 180.0
    slow_mib: int = 300
    slow_seconds: float = 30.0


FULL = Sizes()
SMOKE = Sizes(
    fetch_mib=2,
    smtp_mib=1,
    pop_mib=1,
    runs=1,
    logins=5,
    reference_logins=2,
    storm_clients=3,
    storm_seconds=0.3,
    reference_storm_runs=1,
    idle=(8,),
    reference_idle_deadline=20.0,
    idle_deadline=30.0,
    slow_mib=8,
    slow_seconds=1.0,
)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


class Bench:
    """Targets, users and sizes of one benchmark run; `results` collects the figures."""

    def __init__(
        self,
        sizes: Sizes,
        targets: list[Target],
        proxies: dict[str, ProxyProcess],
        users: dict[str, str],
        markers: dict[str, bytes],
        sync_tokens: Callable[[], None],
        log: Callable[[str], None] = print,
    ) -> None:
        self.sizes = sizes
        self.targets = targets
        self.proxies = proxies
        self.users = users
        self.markers = markers
        self.sync_tokens = sync_tokens
        self.log = log
        self.results: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ helpers

    def _cpu(self, target: Target) -> float:
        return cpu_seconds(target.pid) if target.pid is not None else 0.0

    def warm_up(self, target: Target) -> None:
        """One login per protocol and user, so each proxy has fetched and cached every account's token."""
        u = self.users
        for login, user in (
            (imap_login, u["imap"]),
            (imap_login, u["login"]),
            (imap_login, u["idle"]),
            (imap_login, u["slow"]),
            (pop_login, u["pop"]),
            (smtp_login, u["login"]),
        ):
            login(target, user).close()
        self.sync_tokens()

    # ------------------------------------------------------------------------------------------ bulk

    def bulk(self) -> None:
        s, u, m = self.sizes, self.users, self.markers
        out: dict[str, Any] = {}
        cpu: dict[str, dict[str, float]] = {}
        message = m["smtp_message"]

        def fetch(t: Target) -> Transfer:
            wire = imap_login(t, u["imap"])
            try:
                return imap_fetch(wire, m["imap"])
            finally:
                wire.close()

        def submit(t: Target) -> Transfer:
            wire = smtp_login(t, u["login"])
            try:
                return smtp_send(wire, u["login"], SINK, message)
            finally:
                wire.close()

        def retrieve(t: Target) -> Transfer:
            wire = pop_login(t, u["pop"])
            try:
                return pop_retr(wire, m["pop"])
            finally:
                wire.close()

        for name, run in (
            (f"IMAP FETCH {s.fetch_mib} MiB", fetch),
            (f"SMTP DATA {s.smtp_mib} MiB", submit),
            (f"POP RETR {s.pop_mib} MiB", retrieve),
        ):
            rates: dict[str, list[float]] = {t.key: [] for t in self.targets}
            spent = {t.key: 0.0 for t in self.targets}
            moved = {t.key: 0 for t in self.targets}
            size = 0
            for _ in range(s.runs):
                for t in self.targets:
                    before = self._cpu(t)
                    transfer = run(t)
                    spent[t.key] += self._cpu(t) - before
                    moved[t.key] += transfer.nbytes
                    rates[t.key].append(transfer.mb_per_s)
                    size = transfer.nbytes
            out[name] = {"bytes": size, **{k: summary(v) for k, v in rates.items()}}
            cpu[name] = {k: spent[k] / (moved[k] / (1024 * MIB)) for k in spent if k != "direct"}
            self.log(f"  {name}: " + ", ".join(f"{k} {out[name][k]['median']:.0f} MB/s" for k in rates))
        self.results["bulk"] = out
        self.results["cpu_per_gib"] = cpu

    # ------------------------------------------------------------------------------------------ logins

    def latency(self) -> None:
        s, user = self.sizes, self.users["login"]
        out: dict[str, Any] = {}
        for protocol in ("IMAP", "SMTP"):
            per: dict[str, dict[str, list[float]]] = {t.key: {"p50": [], "p99": []} for t in self.targets}
            for run in range(s.runs):
                for t in self.targets:
                    if t.key == "reference":
                        if run > 0:
                            continue
                        count = s.reference_logins
                    else:
                        count = s.logins
                    samples = [timed_login(t, protocol, user) for _ in range(count)]
                    per[t.key]["p50"].append(percentile(samples, 0.5) * 1e3)
                    per[t.key]["p99"].append(percentile(samples, 0.99) * 1e3)
            out[protocol] = {
                k: {
                    "p50": summary(v["p50"]),
                    "p99": summary(v["p99"]),
                    "logins": s.reference_logins if k == "reference" else s.logins,
                }
                for k, v in per.items()
            }
            self.log(
                f"  {protocol} login p50: "
                + ", ".join(f"{k} {out[protocol][k]['p50']['median']:.1f} ms" for k in per)
            )
        self.results["latency"] = out

    def storm(self) -> None:
        s, user = self.sizes, self.users["login"]
        out: dict[str, Any] = {}
        for protocol in ("IMAP", "SMTP"):
            rates: dict[str, list[float]] = {t.key: [] for t in self.targets}
            failures = {t.key: 0 for t in self.targets}
            for run in range(s.runs):
                for t in self.targets:
                    if t.key == "reference" and run >= s.reference_storm_runs:
                        continue
                    rate, failed = self._storm_once(t, protocol, user)
                    rates[t.key].append(rate)
                    failures[t.key] += failed
            out[protocol] = {k: {**summary(v), "failures": failures[k]} for k, v in rates.items()}
            self.log(
                f"  {protocol} logins/s ({s.storm_clients} clients): "
                + ", ".join(f"{k} {out[protocol][k]['median']:.0f}" for k in rates)
            )
        self.results["storm"] = out

    def _storm_once(self, target: Target, protocol: str, user: str) -> tuple[float, int]:
        return storm(target, protocol, user, self.sizes.storm_clients, self.sizes.storm_seconds)

    # ------------------------------------------------------------------------------------------ idle

    def idle(self) -> None:
        s, user = self.sizes, self.users["idle"]
        out: dict[str, Any] = {}
        for count in s.idle:
            row: dict[str, Any] = {}
            for t in self.targets:
                if t.key == "direct" and count != min(s.idle):
                    continue  # a control, once: at larger N the proxy's sessions show what the server holds
                if t.key == "reference" and any(
                    r["reference"]["succeeded"] < r["reference"]["attempted"] for r in out.values()
                ):
                    row[t.key] = {"skipped": "it did not serve all sessions at a smaller N"}
                    continue
                row[t.key] = self._idle_once(t, user, count)
                self.log(
                    f"  {count} idle sessions, {t.key}: {row[t.key]['succeeded']} ok in "
                    f"{row[t.key]['seconds']:.1f} s"
                    + (
                        f", {row[t.key]['rss_per_session'] / 1024:.1f} KiB/session"
                        if "rss_per_session" in row[t.key]
                        else ""
                    )
                )
            out[str(count)] = row
        self.results["idle"] = out

    def _idle_once(self, target: Target, user: str, count: int) -> dict[str, Any]:
        proxy = self.proxies.get(target.key)
        before = 0
        if proxy is not None:
            proxy.restart()  # a fresh process: memory freed by earlier phases would hide growth
            target.pid = proxy.pid
            imap_login(target, user).close()  # derive the account's key and load the token once
            time.sleep(0.5)
            before = rss_bytes(proxy.pid)
        held: dict[str, int] = {}

        def measure(result: IdleResult) -> None:
            if proxy is not None:
                held["rss"] = rss_bytes(proxy.pid)

        deadline = (
            self.sizes.reference_idle_deadline if target.key == "reference" else self.sizes.idle_deadline
        )
        result = hold_idle_sessions(target, user, count, measure, deadline=deadline)
        row: dict[str, Any] = {**asdict(result), "failures": dict(result.failures)}
        if proxy is not None:
            row["rss_before"] = before
            row["rss_held"] = held["rss"]
            if result.succeeded:
                row["rss_per_session"] = (held["rss"] - before) / result.succeeded
        return row

    # ------------------------------------------------------------------------------------------ slow reader

    def slow_reader(self) -> None:
        s, user = self.sizes, self.users["slow"]
        out: dict[str, Any] = {}
        for t in self.targets:
            proxy = self.proxies.get(t.key)
            if proxy is None:
                continue
            wire = imap_login(t, user)
            try:
                wire.imap_command("s", "EXAMINE INBOX")
                time.sleep(0.5)
                before = rss_bytes(proxy.pid)
                wire.send(b"f FETCH 1 (BODY.PEEK[])\r\n")
                got = 0
                while got < MIB:
                    got += len(wire.sock.recv(65536))
                peak = before
                end = time.monotonic() + s.slow_seconds
                while time.monotonic() < end:
                    time.sleep(min(1.0, max(0.0, end - time.monotonic())))
                    peak = max(peak, rss_bytes(proxy.pid))
                after = rss_bytes(proxy.pid)
            finally:
                wire.close()
            out[t.key] = {
                "rss_before": before,
                "rss_after": after,
                "growth": after - before,
                "peak_growth": peak - before,
                "client_read": got,
                "seconds": s.slow_seconds,
            }
            self.log(
                f"  slow reader, {t.key}: RSS +{(after - before) / MIB:.1f} MiB after {s.slow_seconds:.0f} s"
            )
        self.results["slow_reader"] = out


def new_marker() -> bytes:
    return f"END-{uuid.uuid4().hex}\r\n".encode()


def storm(target: Target, protocol: str, user: str, clients: int, seconds: float) -> tuple[float, int]:
    """Logins per second with `clients` threads logging in back to back for `seconds`, and the failures
    (logins in flight at the deadline are finished and counted; the rate uses the total time)."""
    login = LOGINS[protocol]
    done = [0] * clients
    failed = [0] * clients
    start = time.perf_counter()
    deadline = start + seconds

    def worker(index: int) -> None:
        while time.perf_counter() < deadline:
            try:
                login(target, user, 60.0).close()
                done[index] += 1
            except (OSError, BenchError):
                failed[index] += 1
                time.sleep(0.05)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.perf_counter() - start), sum(failed)
