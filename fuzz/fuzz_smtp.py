"""Coverage-guided fuzzing of the SMTP session: fuzzer bytes become options, client and server chunks (split
where the fuzzer chooses), token results and TLS completions; see fuzz/session_driver.py for the format
and the checks. Run by hand (fuzz/README.md): `python -m fuzz.fuzz_smtp CORPUS -max_total_time=240`.
"""

from __future__ import annotations

from emailproxy.protocols.smtp import SmtpSession
from fuzz.session_driver import run_session


def test_one_input(data: bytes) -> None:
    run_session(SmtpSession, data)


if __name__ == "__main__":
    from fuzz.atheris_runner import fuzz

    fuzz(test_one_input)
