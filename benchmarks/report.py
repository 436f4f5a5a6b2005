"""Turns `Bench.results` into the printed table, the targets verdicts and benchmarks/RESULTS.md."""

from __future__ import annotations

import os
import platform
import ssl
import subprocess
from dataclasses import dataclass
from typing import Any

MIB = 1024 * 1024
KIB = 1024
IDLE_BUDGET = 64 * KIB  # proxy memory per idle session (issue target)
SLOW_BUDGET = 4 * MIB  # slow reader: proxy memory growth (issue target)
PROXY_BASE_FDS = 24  # descriptors our proxy holds with no session (listeners, log, epoll, ...), measured
COLUMNS = (
    "measurement",
    "direct",
    "ours",
    "reference",
    "ours vs direct",
    "ours vs reference",
    "target",
    "met",
)


@dataclass
class Row:
    cells: tuple[str, ...]
    met: bool | None  # None: no target or not measurable


def _spread(entry: dict[str, Any] | None, digits: int = 0) -> str:
    if not entry:
        return "n/a"
    fmt = f"{{:.{digits}f}}"
    text = fmt.format(entry["median"])
    if entry.get("n", 1) > 1:
        text += f" ({fmt.format(entry['min'])}-{fmt.format(entry['max'])})"
    return text


def _median(entry: dict[str, Any] | None) -> float | None:
    return None if not entry else float(entry["median"])


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def _failed(entry: dict[str, Any] | None, text: str) -> str:
    """Logins that failed (timed out or refused) during a logins/s measurement."""
    failures = (entry or {}).get("failures", 0)
    return f"{text}; {failures} failed" if failures else text


def _verdict(*checks: bool | None) -> bool | None:
    known = [c for c in checks if c is not None]
    return None if not known else all(known)


def _met(value: bool | None) -> str:
    return {True: "yes", False: "**NO**", None: "n/a"}[value]


def rows(results: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    for name, entry in results.get("bulk", {}).items():
        d, o, r = (_median(entry.get(k)) for k in ("direct", "ours", "reference"))
        met = _verdict(
            None if o is None or d is None else o >= 0.9 * d, None if o is None or r is None else o >= 3 * r
        )
        out.append(
            Row(
                (
                    f"{name}, MB/s",
                    _spread(entry.get("direct")),
                    _spread(entry.get("ours")),
                    _spread(entry.get("reference")),
                    _ratio(o, d),
                    _ratio(o, r),
                    "≥ 0.9x direct, ≥ 3x ref",
                ),
                met,
            )
        )
    for protocol, entry in results.get("latency", {}).items():
        for p in ("p50", "p99"):
            d, o, r = (_median((entry.get(k) or {}).get(p)) for k in ("direct", "ours", "reference"))
            added = None if o is None or d is None else o - d
            vs_ref = "n/a" if o is None or r is None else f"{o - r:+.1f} ms"
            target = "added ≤ 5 ms" if p == "p50" else ""
            met = (None if added is None else added <= 5.0) if p == "p50" else None
            logins = (entry.get("ours") or {}).get("logins", 0)
            ref_logins = (entry.get("reference") or {}).get("logins", 0)
            out.append(
                Row(
                    (
                        f"{protocol} login {p}, ms (connect + login; {logins} per run"
                        + (f", reference {ref_logins} once)" if ref_logins else ")"),
                        _spread((entry.get("direct") or {}).get(p), 1),
                        _spread((entry.get("ours") or {}).get(p), 1),
                        _spread((entry.get("reference") or {}).get(p), 1),
                        "n/a" if added is None else f"{added:+.1f} ms",
                        vs_ref,
                        target,
                    ),
                    met,
                )
            )
    for protocol, entry in results.get("storm", {}).items():
        d, o, r = (_median(entry.get(k)) for k in ("direct", "ours", "reference"))
        met = _verdict(
            None if o is None or d is None else o >= 0.9 * d, None if o is None or r is None else o >= 10 * r
        )
        clients = results.get("sizes", {}).get("storm_clients", "")
        out.append(
            Row(
                (
                    f"{protocol} logins/s, {clients} concurrent clients",
                    _failed(entry.get("direct"), _spread(entry.get("direct"))),
                    _failed(entry.get("ours"), _spread(entry.get("ours"))),
                    _failed(entry.get("reference"), _spread(entry.get("reference"), 1)),
                    _ratio(o, d),
                    _ratio(o, r),
                    "≥ 0.9x direct, ≥ 10x ref",
                ),
                met,
            )
        )
    for count, entry in results.get("idle", {}).items():
        cells = []
        for key in ("direct", "ours", "reference"):
            item = entry.get(key)
            if item is None:
                cells.append("run at the smallest N" if key == "direct" else "n/a")
            elif "skipped" in item:
                cells.append("not run")
            else:
                text = f"{item['succeeded']}/{item['attempted']} ok"
                if item.get("failures"):
                    text += " (" + ", ".join(f"{n} {why}" for why, n in item["failures"].items()) + ")"
                if "rss_per_session" in item:
                    text += f", {item['rss_per_session'] / KIB:.1f} KiB each"
                cells.append(text)
        ours = entry.get("ours") or {}
        target = "all served, ≤ 64 KiB each"
        wanted = ours.get("attempted", 0)
        fd_limit = results.get("fd_limit")
        if fd_limit and 2 * wanted + PROXY_BASE_FDS > fd_limit:
            # one process cannot hold more: two descriptors per session (client and server side)
            wanted = (fd_limit - PROXY_BASE_FDS) // 2
            target = f"all that {fd_limit} fds allow (~{wanted}), ≤ 64 KiB each"
        served = ours.get("succeeded", 0) >= wanted if ours else None
        small = ours["rss_per_session"] <= IDLE_BUDGET if "rss_per_session" in ours else None
        out.append(
            Row(
                (
                    f"{count} idle IMAP sessions (IDLE): served, proxy RSS per session",
                    *cells,
                    "",
                    "",
                    target,
                ),
                _verdict(served, small),
            )
        )
    slow = results.get("slow_reader", {})
    if slow:
        s = results.get("sizes", {})

        def growth(key: str) -> str:
            item = slow.get(key)
            return (
                "n/a"
                if item is None
                else f"+{item['growth'] / MIB:.1f} MiB (peak +{item['peak_growth'] / MIB:.1f})"
            )

        ours = slow.get("ours")
        out.append(
            Row(
                (
                    f"slow reader ({s.get('slow_mib')} MiB FETCH, stalled {s.get('slow_seconds'):.0f} s): "
                    "proxy RSS growth",
                    "n/a",
                    growth("ours"),
                    growth("reference"),
                    "",
                    "",
                    "≤ 4 MiB",
                ),
                None if ours is None else ours["growth"] <= SLOW_BUDGET,
            )
        )
    for name, entry in results.get("cpu_per_gib", {}).items():
        o, r = entry.get("ours"), entry.get("reference")
        out.append(
            Row(
                (
                    f"proxy CPU s per GiB relayed, {name.split()[0]}",
                    "n/a",
                    "n/a" if o is None else f"{o:.2f}",
                    "n/a" if r is None else f"{r:.2f}",
                    "",
                    "n/a" if o is None or r is None or o == 0 else f"ref uses {r / o:.1f}x",
                    "",
                ),
                None,
            )
        )
    return out


def table(results: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows(results):
        lines.append("| " + " | ".join(row.cells) + f" | {_met(row.met)} |")
    return "\n".join(lines)


def _run(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def machine() -> dict[str, str]:
    model = "unknown"
    for line in open("/proc/cpuinfo").read().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory = next(
        (
            line.split(":")[1].strip()
            for line in open("/proc/meminfo").read().splitlines()
            if line.startswith("MemTotal")
        ),
        "unknown",
    )
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "memory": memory,
        "kernel": f"{platform.system()} {platform.release()}",
    }


def versions() -> dict[str, str]:
    from emailproxy import __version__

    return {
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "dovecot": _run(["dovecot", "--version"]),
        "postfix": _run(["postconf", "-d", "-h", "mail_version"]),
        "emailproxy (ours)": __version__,
    }


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        "# Benchmark results",
        "",
        f"Measured {meta['date']} with `{meta['command']}` ({meta['elapsed']:.0f} s in all).",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in meta["machine"].items()) + ".",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        f"Load average (1 min) on the machine: {meta['load']}.",
        "",
        "Timed figures: median of the runs, (min-max) in brackets. ours: this project's proxy; reference: "
        "the PyPI `emailproxy` package (the proxy this one replaces); direct: a client that talks XOAUTH2 "
        "to the servers itself. Clients reach the proxies over plaintext loopback; every proxy and the "
        "direct client reach Dovecot/Postfix over TLS.",
        "",
        table(results),
        "",
        "Notes:",
        "",
    ]
    lines += [f"- {note}" for note in meta.get("notes", [])]
    lines += ["", "What limits the figures that miss a target, as measured: see benchmarks/README.md."]
    return "\n".join(lines) + "\n"
