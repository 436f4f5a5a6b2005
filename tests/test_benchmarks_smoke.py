"""The benchmark suite at its smoke size: every measurement runs end to end and moves the right bytes.

Correctness only: no assertion on any speed. The reference proxy is installed from PyPI by the benchmark; when
that is impossible (no network), the suite must still measure the direct client and this project's proxy and
report the reference as unavailable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.integration.world.token_table import lua_available

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


def test_smoke_run_measures_every_figure(tmp_path: Path) -> None:
    results_path = tmp_path / "results.json"
    markdown_path = tmp_path / "RESULTS.md"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--smoke",
            "--json",
            str(results_path),
            "--output",
            str(markdown_path),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(results_path.read_text())
    reference = results["reference"]
    keys = ["direct", "ours"] + (["reference"] if reference["available"] else [])
    if not reference["available"]:
        assert reference["reason"]
        assert "unavailable" in markdown_path.read_text()
    sizes = results["sizes"]

    expected_bytes = {
        "IMAP": sizes["fetch_mib"] * MIB,
        "SMTP": sizes["smtp_mib"] * MIB,
        "POP": sizes["pop_mib"] * MIB,
    }
    assert len(results["bulk"]) == 3
    for name, entry in results["bulk"].items():
        assert entry["bytes"] >= expected_bytes[name.split()[0]] * 0.99, (name, entry["bytes"])
        for key in keys:
            assert entry[key]["median"] > 0 and entry[key]["n"] == sizes["runs"], (name, key)
    for name, entry in results["cpu_per_gib"].items():
        assert entry["ours"] >= 0, name

    for protocol in ("IMAP", "SMTP"):
        for key in keys:
            latency = results["latency"][protocol][key]
            assert 0 < latency["p50"]["median"] <= latency["p99"]["median"], (protocol, key)
            storm = results["storm"][protocol][key]
            assert storm["median"] > 0 and storm["failures"] == 0, (protocol, key, storm)

    ((count, idle),) = results["idle"].items()
    for key in keys:
        assert idle[key]["succeeded"] == idle[key]["attempted"] == int(count), (key, idle[key])
    assert idle["ours"]["rss_per_session"] > 0

    slow = results["slow_reader"]["ours"]
    assert slow["client_read"] >= MIB and slow["seconds"] == sizes["slow_seconds"]

    assert results["exit_codes"]["ours"] == 0
    if lua_available():
        # the cheap in-process token check answered every measured login
        assert results["server_token_checks_by_program"] == 0
    table = markdown_path.read_text()
    assert "| IMAP FETCH" in table and "idle IMAP sessions" in table and "slow reader" in table


def test_login_storm_with_the_floor_relay_runs() -> None:
    """`benchmarks.login_latency --floor --storm`: every target (direct, ours, the bare relay) logs in."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.login_latency",
            "--floor",
            "--storm",
            "3",
            "--seconds",
            "0.3",
            "--runs",
            "1",
            "--protocols",
            "IMAP",
            "SMTP",
        ],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = [line for line in done.stdout.splitlines() if line.startswith("run 0 ")]
    measured = {" ".join(line.split(":")[0].split()[2:4]) for line in runs}
    assert measured == {"IMAP direct", "IMAP ours", "IMAP floor", "SMTP direct", "SMTP ours"}, runs
    assert all("(0 failed)" in line for line in runs), runs
    assert "IMAP floor :" in done.stdout and "vs direct" in done.stdout
