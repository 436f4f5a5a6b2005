"""Logging: text and JSON formats, connection fields, syslog, no duplicated lines, lazy formatting."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from emailproxy.log import LOGGER_NAME, ConnectionLog, LogFormat, LogSetupError, setup_logging


@pytest.fixture(autouse=True)
def _restore_logger() -> Iterator[None]:
    root = logging.getLogger(LOGGER_NAME)
    saved = (list(root.handlers), root.level, root.propagate)
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_text_format_names_listener_connection_and_account(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log_file = tmp_path / "proxy.log"
    setup_logging(log_file=str(log_file))
    conn = ConnectionLog("IMAP-1993", 7)
    conn.info("accepted %s", "x")
    conn.account = "user@example.com"
    conn.info("authenticated")
    logging.getLogger("emailproxy.tokens").info("plain line")
    written = lines(log_file)
    assert written[0].endswith(" INFO [IMAP-1993 #7] accepted x")
    assert written[1].endswith(" INFO [IMAP-1993 #7 user@example.com] authenticated")
    assert written[2].endswith(" INFO plain line")
    assert capsys.readouterr().err.splitlines() == written  # stderr: the same human-readable lines


def test_json_format_has_one_object_per_line_with_fields(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log_file = tmp_path / "proxy.log"
    setup_logging(debug=True, log_file=str(log_file), log_format="json")
    conn = ConnectionLog("SMTP-2465", 3)
    conn.account = "a@example.com"
    conn.debug('line with\nnewline and "quotes" and ünïcode')
    logging.getLogger("emailproxy.server").warning("listening on %d", 2465)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("emailproxy").exception("failed")
    written = lines(log_file)
    assert len(written) == 3
    first, second, third = (json.loads(line) for line in written)
    assert first["level"] == "DEBUG" and first["message"] == 'line with\nnewline and "quotes" and ünïcode'
    assert (first["listener"], first["connection"], first["account"]) == ("SMTP-2465", 3, "a@example.com")
    assert first["logger"] == "emailproxy.connection"
    assert first["time"].endswith("+00:00") and "T" in first["time"]
    assert second["message"] == "listening on 2465" and second["level"] == "WARNING"
    assert not {"listener", "connection", "account"} & set(second)
    assert third["level"] == "ERROR" and "ValueError: boom" in third["exception"]
    # stderr stays human-readable when the JSON goes to a file
    err = capsys.readouterr().err
    assert "WARNING listening on 2465" in err and "[SMTP-2465 #3 a@example.com]" in err
    assert not err.lstrip().startswith("{")


def test_json_goes_to_stderr_when_there_is_no_log_file(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(log_format="json")
    ConnectionLog("POP-2995", 1).info("hello")
    (line,) = capsys.readouterr().err.splitlines()
    assert json.loads(line)["listener"] == "POP-2995"


def test_repeated_setup_does_not_duplicate_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log_file = tmp_path / "proxy.log"
    formats: tuple[LogFormat, ...] = ("text", "json", "text")
    for log_format in formats:
        setup_logging(log_file=str(log_file), log_format=log_format)
    assert len(logging.getLogger(LOGGER_NAME).handlers) == 2
    logging.getLogger("emailproxy.tokens").info("once")
    assert [line for line in lines(log_file) if "once" in line] == [lines(log_file)[-1]]
    assert capsys.readouterr().err.count("once") == 1
    assert not logging.getLogger(LOGGER_NAME).propagate  # the root logger never sees our lines again


def test_debug_lines_are_not_formatted_when_debug_is_off(tmp_path: Path) -> None:
    setup_logging(log_file=str(tmp_path / "proxy.log"))
    formatted: list[str] = []

    class Expensive:
        def __str__(self) -> str:
            formatted.append("x")
            return "expensive"

    conn = ConnectionLog("IMAP-1993", 1)
    conn.debug("value %s", Expensive())
    logging.getLogger("emailproxy.tokens").debug("value %s", Expensive())
    assert formatted == []
    conn.info("value %s", Expensive())
    assert formatted  # formatted only when a handler writes the line


def test_missing_syslog_socket_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LogSetupError, match="no syslog socket found") as raised:
        setup_logging(syslog=True, syslog_sockets=[str(tmp_path / "no-such-log")])
    assert str(tmp_path / "no-such-log") in str(raised.value)


def test_unwritable_log_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LogSetupError, match="--log-file: cannot open"):
        setup_logging(log_file=str(tmp_path / "missing-directory" / "proxy.log"))


def test_syslog_lines_carry_the_ident(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    address = tmp_path / "log.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(address))
    receiver.settimeout(5)
    try:
        setup_logging(syslog=True, syslog_sockets=[str(address)])
        conn = ConnectionLog("IMAP-1993", 2)
        conn.account = "u@example.com"
        conn.warning("over quota")
        datagram = receiver.recv(4096).decode()
    finally:
        receiver.close()
    # <priority>ident message: daemon facility (3) * 8 + warning (4) = 28
    assert datagram.rstrip("\x00") == "<28>emailproxy: [IMAP-1993 #2 u@example.com] over quota"
    # stderr is not a terminal here, so with syslog on it gets nothing (no line arrives twice in a journal)
    assert capsys.readouterr().err == ""


def test_cli_reports_a_missing_syslog_socket(tmp_path: Path) -> None:
    config = tmp_path / "emailproxy.config"
    config.write_text("[IMAP-1993]\nserver_address = imap.example.com\nserver_port = 993\n")
    code = (
        "import emailproxy.log as l, emailproxy.cli as c, sys;"
        "l.SYSLOG_SOCKETS = ('/nonexistent/log',);"
        f"sys.exit(c.main(['--config-file', {str(config)!r}, '--syslog']))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "--syslog: no syslog socket found" in result.stderr and "/nonexistent/log" in result.stderr
