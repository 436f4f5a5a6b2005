"""CI smoke for the atheris harnesses in fuzz/: every seed of fuzz/corpus/<harness>/ goes through the
harness's test_one_input without atheris (which is only needed for the coverage-guided runs by hand,
fuzz/README.md), so the harnesses, their checks and the seeds cannot rot unnoticed."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from emailproxy.protocols.events import Action, Log, NeedToken, Session
from emailproxy.protocols.imap import ImapSession
from emailproxy.protocols.pop import PopSession
from emailproxy.protocols.smtp import SmtpSession
from fuzz import make_seeds, session_driver
from fuzz.line_coverage import measure

HARNESSES = ["imap", "pop", "smtp", "imapsyntax", "sasl"]
CORPUS = Path(make_seeds.__file__).parent / "corpus"
SESSIONS: dict[str, type[Session]] = {"imap": ImapSession, "pop": PopSession, "smtp": SmtpSession}


def seeds(harness: str) -> list[Path]:
    return sorted(path for path in (CORPUS / harness).iterdir() if path.is_file())


@pytest.mark.parametrize("harness", HARNESSES)
def test_every_seed_passes_its_harness(harness: str) -> None:
    module = importlib.import_module(f"fuzz.fuzz_{harness}")
    found = seeds(harness)
    assert len(found) >= 5, f"fuzz/corpus/{harness} has too few seeds"
    for path in found:
        module.test_one_input(path.read_bytes())


def test_the_harnesses_do_not_need_atheris() -> None:
    for harness in HARNESSES:
        importlib.import_module(f"fuzz.fuzz_{harness}")
    importlib.import_module("fuzz.atheris_runner")
    assert "atheris" not in sys.modules


def test_the_committed_seeds_are_what_make_seeds_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(make_seeds, "CORPUS", tmp_path)
    make_seeds.main()
    for harness in HARNESSES:
        written = {path.name: path.read_bytes() for path in (tmp_path / harness).iterdir()}
        committed = {path.name: path.read_bytes() for path in seeds(harness) if path.name.startswith("seed-")}
        assert written == committed, f"run `python -m fuzz.make_seeds` (fuzz/corpus/{harness} is stale)"


@pytest.mark.parametrize("harness", sorted(SESSIONS))
def test_the_session_seeds_reach_login_relay_and_tls(harness: str) -> None:
    """The seeds are only useful if they get the session somewhere: a token, a relay, a TLS upgrade."""
    reached: set[str] = set()
    for path in seeds(harness):
        run = session_driver.run_session(SESSIONS[harness], path.read_bytes())
        reached |= {str(milestone[0]) for milestone in run.milestones}
    assert {"token", "relay", "tls", "close"} <= reached, reached


def test_the_input_format_round_trips() -> None:
    events: list[session_driver.Event] = [
        (session_driver.SERVER, b"* OK hi\r\n"),
        (session_driver.CLIENT, b"x" * 100),
        (session_driver.COMPLETION, session_driver.TLS_CLIENT),
        (session_driver.CLIENT, b""),
    ]
    byte = session_driver.options_byte(local_starttls=True, max_line=256, max_buffer=4096, max_literal=8)
    options, decoded = session_driver.decode(session_driver.encode(byte, events))
    assert (options.local_starttls, options.max_line, options.max_buffer, options.max_literal) == (
        True,
        256,
        4096,
        8,
    )
    assert session_driver.merged(decoded) == events


def test_the_driver_notices_a_leak() -> None:
    """The harness checks can fail: a session that logs the password it was given is caught."""

    class Leaky(PopSession):
        def client_data(self, data: bytes) -> list[Action]:
            actions = super().client_data(data)
            return actions + [Log(20, a.password.reveal()) for a in actions if isinstance(a, NeedToken)]

    events: list[session_driver.Event] = [
        (session_driver.SERVER, b"+OK hi\r\n"),
        (session_driver.CLIENT, b"USER alice\r\nPASS Pw!secret#1\r\n"),
    ]
    with pytest.raises(AssertionError, match="password logged"):
        session_driver.run_session(Leaky, session_driver.encode(session_driver.options_byte(), events))


def test_line_coverage_tool_runs() -> None:
    result = measure("sasl", [CORPUS / "sasl"])
    covered, total, _ = result["sasl.py"]
    assert total > 20 and covered / total > 0.5
