"""`emailproxy set-password`: writes local_password_hash in place, refuses unknown sections, removes it, and
checks the account's cached values against the new password."""

from __future__ import annotations

import base64
import io
import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from emailproxy import cli
from emailproxy.commands import setpassword
from emailproxy.config import load_config
from emailproxy.oauth.crypto import ITERATIONS, derive_key, fernet_key
from emailproxy.oauth.localpassword import VerificationCache, hash_password, verify

PASSWORD = "new-bound-password-42"
OLD = "password-of-the-first-login"
SALT = base64.b64encode(bytes(range(16))).decode()
SECRET = "plain-client-secret-value"


def enc(plaintext: str, password: str) -> str:
    key = derive_key(password, base64.b64decode(SALT), ITERATIONS)
    return Fernet(fernet_key(key)).encrypt(plaintext.encode()).decode()


def write(tmp_path: Path, accounts: str) -> Path:
    path = tmp_path / "emailproxy.config"
    path.write_text(
        "# my proxy\n[emailproxy]\nallow_catch_all_accounts = True\n\n"
        "[IMAP-1993]\nserver_address = imap.example.com\nserver_port = 993\n\n" + accounts
    )
    path.chmod(0o600)
    return path


APP = (
    "token_url = https://login.example.com/token\n"
    "oauth2_scope = https://outlook.office365.com/.default\n"
    "oauth2_flow = client_credentials\n"
    "client_id = app\n"
)
ACCOUNT = f"; the alerts mailbox\n[alerts@example.com]\n{APP}client_secret = {SECRET}\n# keep this comment\n"


def run(monkeypatch: pytest.MonkeyPatch, path: Path, *args: str, stdin: str | None = PASSWORD + "\n") -> int:
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        args = (*args, "--password-stdin")
    return setpassword.main(["--config-file", str(path), *args])


def stored_hash(path: Path, account: str) -> str | None:
    found = load_config(path).find_account(account)
    assert found is not None
    return found.local_password_hash


def test_sets_the_hash_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, ACCOUNT + "\n[other@example.com]\n" + APP)
    before = path.read_text()
    assert run(monkeypatch, path, "alerts@example.com") == 0
    value = stored_hash(path, "alerts@example.com")
    assert value is not None and value.startswith("scrypt$ln=14,r=8,p=1$")
    assert verify(value, PASSWORD, VerificationCache())
    assert not verify(value, OLD, VerificationCache())
    after = path.read_text()
    # one line added after the section's last key; every other byte kept
    assert after.replace(f"local_password_hash = {value}\n", "") == before
    assert after.index("local_password_hash") < after.index("# keep this comment")
    assert stored_hash(path, "other@example.com") is None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    out = capsys.readouterr()
    assert "Set local_password_hash for [alerts@example.com]" in out.out
    assert PASSWORD not in out.out + out.err and value not in out.out + out.err

    # setting it again replaces the line (a new salt), still one line
    assert run(monkeypatch, path, "alerts@example.com") == 0
    again = stored_hash(path, "alerts@example.com")
    assert again is not None and again != value and path.read_text().count("local_password_hash") == 1


def test_dispatched_from_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, ACCOUNT)
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    code = cli.main(["set-password", "alerts@example.com", "--config-file", str(path), "--password-stdin"])
    assert code == 0
    value = stored_hash(path, "alerts@example.com")
    assert value is not None and verify(value, PASSWORD, VerificationCache())


def test_case_insensitive_section_and_catch_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, ACCOUNT + f"\n[@example.com]\n{APP}client_secret = {SECRET}\n")
    assert run(monkeypatch, path, "ALERTS@Example.com") == 0
    assert "[ALERTS@Example.com]" not in path.read_text()  # written into the existing section
    assert stored_hash(path, "alerts@example.com") is not None
    assert run(monkeypatch, path, "@example.com") == 0
    inherited = stored_hash(path, "someone@example.com")  # a login served by the catch-all
    assert inherited is not None and verify(inherited, PASSWORD, VerificationCache())


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("alerts@exmaple.com", "did you mean [alerts@example.com]?"),
        ("nobody@else.org", "account sections in the file: [alerts@example.com]"),
        ("IMAP-1993", "account sections in the file"),
    ],
)
def test_refuses_a_section_that_does_not_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str, hint: str
) -> None:
    path = write(tmp_path, ACCOUNT)
    before = path.read_bytes()
    assert run(monkeypatch, path, name) == 2
    err = capsys.readouterr().err
    assert f"has no account section [{name}]" in err and hint in err
    assert path.read_bytes() == before


def test_missing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(monkeypatch, tmp_path / "missing.config", "a@example.com") == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "missing.config").exists()


def test_prompts_twice_on_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, ACCOUNT)
    before = path.read_bytes()

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdin", Terminal(""))
    answers = iter([PASSWORD, PASSWORD + "typo"])
    prompts: list[str] = []

    def fake_getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr(setpassword.getpass, "getpass", fake_getpass)
    assert run(monkeypatch, path, "alerts@example.com", stdin=None) == 1
    assert "do not match" in capsys.readouterr().err and path.read_bytes() == before
    assert prompts == ["New local password: ", "Repeat it: "]

    answers = iter([PASSWORD, PASSWORD])
    assert run(monkeypatch, path, "alerts@example.com", stdin=None) == 0
    value = stored_hash(path, "alerts@example.com")
    assert value is not None and verify(value, PASSWORD, VerificationCache())


def test_no_terminal_and_empty_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, ACCOUNT)
    before = path.read_bytes()
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert setpassword.main(["alerts@example.com", "--config-file", str(path)]) == 1
    assert "--password-stdin" in capsys.readouterr().err
    assert run(monkeypatch, path, "alerts@example.com", stdin="\n") == 1
    assert "no password" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_remove(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, ACCOUNT)
    original = path.read_text()
    assert run(monkeypatch, path, "alerts@example.com") == 0
    assert run(monkeypatch, path, "alerts@example.com", "--remove", stdin=None) == 0
    assert path.read_text() == original
    assert "Removed local_password_hash" in capsys.readouterr().out
    assert run(monkeypatch, path, "alerts@example.com", "--remove", stdin=None) == 0
    assert "nothing to remove" in capsys.readouterr().out
    assert path.read_text() == original


def test_a_malformed_hash_can_be_replaced_or_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, ACCOUNT.replace(f"client_secret = {SECRET}\n", "local_password_hash = scrypt$x\n"))
    assert run(monkeypatch, path, "alerts@example.com") == 0
    value = stored_hash(path, "alerts@example.com")  # the file loads again
    assert value is not None and verify(value, PASSWORD, VerificationCache())
    path.write_text(path.read_text().replace(value, "scrypt$x"))
    assert run(monkeypatch, path, "alerts@example.com", "--remove", stdin=None) == 0
    assert stored_hash(path, "alerts@example.com") is None


def test_other_configuration_errors_stop_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, ACCOUNT + "token_url = not a url\n")
    before = path.read_bytes()
    assert run(monkeypatch, path, "alerts@example.com") == 2
    assert "token_url" in capsys.readouterr().err and path.read_bytes() == before


def cached_section(name: str, password: str, secret: bool = False) -> str:
    lines = [
        f"[{name}]",
        f"token_salt = {SALT}",
        f"token_iterations = {ITERATIONS}",
        f"access_token = {enc('at-1', password)}",
        "access_token_expiry = 1999999999",
    ]
    if secret:
        lines.append(f"client_secret_encrypted = {enc(SECRET, password)}")
    return "\n".join(lines) + "\n"


def test_reports_whether_the_cached_tokens_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, f"[@example.com]\n{APP}client_secret = {SECRET}\n\n")
    with path.open("a") as handle:
        handle.write(
            cached_section("same@example.com", PASSWORD) + "\n" + cached_section("old@example.com", OLD)
        )
    assert run(monkeypatch, path, "@example.com") == 0
    out = capsys.readouterr().out
    assert "Warning: the cached tokens of [old@example.com] were encrypted with a different password" in out
    assert "deletes and replaces them at the next login" in out
    assert "The cached values of [same@example.com] open with this password." in out
    assert stored_hash(path, "old@example.com") is not None


def test_refuses_to_strand_an_encrypted_client_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path, f"[alerts@example.com]\n{APP}" + cached_section("x", OLD, secret=True).split("\n", 1)[1]
    )
    before = path.read_bytes()
    assert run(monkeypatch, path, "alerts@example.com") == 1
    err = capsys.readouterr().err
    assert "client_secret_encrypted of [alerts@example.com] was encrypted with a different password" in err
    assert "Nothing was changed" in err and path.read_bytes() == before
    # the password that encrypted it is fine
    monkeypatch.setattr("sys.stdin", io.StringIO(OLD + "\n"))
    assert setpassword.main(["alerts@example.com", "--config-file", str(path), "--password-stdin"]) == 0
    assert "open with this password" in capsys.readouterr().out
    # --force writes anyway
    assert run(monkeypatch, path, "alerts@example.com", "--force") == 0
    value = stored_hash(path, "alerts@example.com")
    assert value is not None and verify(value, PASSWORD, VerificationCache())


def test_hash_written_by_the_command_matches_the_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command and hash_password produce the same format (only the salt differs)."""
    path = write(tmp_path, ACCOUNT)
    assert run(monkeypatch, path, "alerts@example.com") == 0
    value = stored_hash(path, "alerts@example.com")
    assert value is not None
    assert value.split("$")[:2] == hash_password(PASSWORD).split("$")[:2]
