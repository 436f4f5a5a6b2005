"""`emailproxy accounts`, `emailproxy logs` and the offline parts of `emailproxy test`."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from emailproxy.commands import accounts, logs
from emailproxy.commands import test as test_command
from emailproxy.oauth.interactive import code_message, device_message

ACCESS = "gAAAAA-distinctive-access-token-value"
REFRESH = "gAAAAA-distinctive-refresh-token-value"
SECRET = "distinctive-client-secret"


def accounts_config(tmp_path: Path, now: float) -> Path:
    path = tmp_path / "emailproxy.config"
    path.write_text(
        f"""
[emailproxy]
allow_catch_all_accounts = True

[IMAP-1993]
server_address = imap.example.com
server_port = 993

[@]
token_url = https://login.example.com/token
oauth2_scope = https://outlook.office365.com/.default
oauth2_flow = client_credentials
client_id = app
client_secret = {SECRET}

[fresh@example.com]
token_salt = c2FsdHNhbHRzYWx0c2FsdA==
token_iterations = 1200000
access_token = {ACCESS}
access_token_expiry = {int(now + 3000)}
refresh_token = {REFRESH}
last_activity = {int(now - 120)}

[stale@example.com]
access_token = {ACCESS}
access_token_expiry = {int(now - 7200)}

[new@example.com]
permission_url = https://login.example.com/authorize
token_url = https://login.example.com/token
oauth2_scope = mail
oauth2_flow = client_credentials
redirect_uri = http://localhost:8080
client_id = app
"""
    )
    return path


def test_accounts_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    now = time.time()
    path = accounts_config(tmp_path, now)
    assert accounts.main(["--config-file", str(path)]) == 0
    out = capsys.readouterr().out
    for secret in (ACCESS, REFRESH, SECRET, "c2FsdHNhbHRzYWx0c2FsdA=="):
        assert secret not in out
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert list(rows) == ["@", "fresh@example.com", "stale@example.com", "new@example.com"]
    assert "(catch-all)" in rows["@"] and "client_credentials" in rows["@"]
    assert "access, refresh" in rows["fresh@example.com"]
    assert "in 50 min" in rows["fresh@example.com"] and "2 min ago" in rows["fresh@example.com"]
    assert "expired 2 h ago" in rows["stale@example.com"]
    assert "client_credentials" in rows["stale@example.com"]  # inherited from [@]
    assert "none" in rows["new@example.com"]
    assert "authorization_code (written: client_credentials)" in rows["new@example.com"]


def test_accounts_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    now = time.time()
    path = accounts_config(tmp_path, now)
    assert accounts.main(["--config-file", str(path), "--json"]) == 0
    out = capsys.readouterr().out
    assert ACCESS not in out and REFRESH not in out and SECRET not in out
    data = {entry["section"]: entry for entry in json.loads(out)}
    assert data["fresh@example.com"]["access_token"] is True
    assert data["fresh@example.com"]["access_token_expiry"] == int(now + 3000)
    assert data["new@example.com"]["access_token"] is False
    assert data["@"]["catch_all"] is True


def test_accounts_needs_a_loadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert accounts.main(["--config-file", str(tmp_path / "missing")]) == 1
    assert "not found" in capsys.readouterr().err
    only_accounts = tmp_path / "accounts.config"
    only_accounts.write_text("[a@example.com]\ntoken_url = https://x.example.com/t\n")
    assert accounts.main(["--config-file", str(only_accounts)]) == 0  # no server sections needed


@pytest.mark.parametrize(
    ("seconds", "text"), [(5, "5 s"), (600, "10 min"), (7200, "2 h"), (3 * 86400, "3 days"), (-90, "2 min")]
)
def test_human_durations(seconds: float, text: str) -> None:
    assert accounts.human_duration(seconds) == text


# -------------------------------------------------------------------------------------------------- logs

AUTH_LINE = (
    "2024-05-01 10:00:00,000 INFO Please visit the following URL to authenticate account a@example.com: "
    "https://login.example.com/authorize?client_id=x"
)
DEVICE_LINE = "2024-05-01 10:00:01,000 INFO Visit https://microsoft.com/devicelogin and use code ABCD-EFGH"


def write_log(path: Path, count: int, prefix: str = "line") -> None:
    with open(path, "a") as handle:
        for number in range(count):
            handle.write(f"{prefix} {number}\n")


def test_logs_recent_lines_include_the_rotated_file(tmp_path: Path) -> None:
    log = tmp_path / "proxy.log"
    write_log(tmp_path / "proxy.log.1", 5, "old")
    write_log(log, 3, "new")
    with open(log, "a") as handle:
        handle.write("a line still being writ")
    lines, offset = logs.recent_lines(log, 4)
    assert lines == ["old 4", "new 0", "new 1", "new 2"]
    assert offset == len("new 0\nnew 1\nnew 2\n")


def test_logs_auth_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the lines the proxy itself logs for a pending authorisation
    stamp = "2024-05-01 10:00:02,000 INFO "
    code_line = stamp + code_message("b@example.com", "https://idp.example/authorize?x=1")
    device_line = stamp + device_message("c@example.com", "https://idp.example/d", "XY12")
    log = tmp_path / "proxy.log"
    write_log(log, 50)
    with open(log, "a") as handle:
        for line in (AUTH_LINE, "ordinary line", DEVICE_LINE, code_line, "another line", device_line):
            handle.write(line + "\n")
    write_log(log, 10)
    assert logs.main(["--log-file", str(log), "--auth"]) == 0
    assert capsys.readouterr().out.splitlines() == [AUTH_LINE, DEVICE_LINE, code_line, device_line]
    assert logs.main(["--log-file", str(log), "-n", "2"]) == 0
    assert capsys.readouterr().out.splitlines() == ["line 8", "line 9"]


def test_logs_needs_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(logs.ENV_VARIABLE, raising=False)
    assert logs.main([]) == 2
    err = capsys.readouterr().err
    assert "--log-file" in err and logs.ENV_VARIABLE in err and "standard error" in err
    log = tmp_path / "proxy.log"
    assert logs.main(["--log-file", str(log)]) == 1
    assert "does not exist" in capsys.readouterr().err
    write_log(log, 1)
    monkeypatch.setenv(logs.ENV_VARIABLE, str(log))
    assert logs.main([]) == 0
    assert capsys.readouterr().out == "line 0\n"


def test_logs_follow_goes_on_after_rotation(tmp_path: Path) -> None:
    log = tmp_path / "proxy.log"
    write_log(log, 2, "before")
    _, offset = logs.recent_lines(log, 10)
    seen: list[str] = []
    done = threading.Event()
    follower = threading.Thread(
        target=logs.follow,
        kwargs={
            "path": log,
            "emit": seen.append,
            "keep": None,
            "stop": done.is_set,
            "position": offset,
            "interval": 0.01,
        },
    )
    follower.start()
    try:
        write_log(log, 2, "after")
        wait_until(lambda: len(seen) >= 2)
        log.rename(tmp_path / "proxy.log.1")  # what RotatingFileHandler does
        write_log(log, 1, "rotated")
        wait_until(lambda: len(seen) >= 3)
    finally:
        done.set()
        follower.join(5)
    assert seen == ["after 0", "after 1", "rotated 0"]


def wait_until(condition: object, timeout: float = 5.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# -------------------------------------------------------------------------------------------------- test


def test_test_command_reports_a_proxy_that_is_not_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = tmp_path / "emailproxy.config"
    path.write_text(f"[IMAP-{port}]\nserver_address = imap.example.com\nserver_port = 993\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("local-password\n"))
    code = test_command.main(["someone@example.com", "--config-file", str(path), "--password-stdin"])
    out = capsys.readouterr().out
    assert code == 1
    assert f"[IMAP-{port}] connect to 127.0.0.1:{port} ... FAILED: connection refused" in out
    assert "local-password" not in out


def test_test_command_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "emailproxy.config"
    path.write_text("[IMAP-1993]\nserver_address = imap.example.com\nserver_port = 993\n")
    args = ["a@example.com", "--config-file", str(path)]
    assert test_command.main([*args, "--send-to", "b@example.com"]) == 2
    assert "needs an [SMTP-port] section" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # not a terminal
    assert test_command.main(args) == 2
    assert "--password-stdin" in capsys.readouterr().err
