"""`emailproxy register`: the vendors' flags give a configuration that loads; bad input is refused clearly."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from emailproxy.checks import check_config
from emailproxy.cli import main as cli_main
from emailproxy.commands import register
from emailproxy.config import load_config

# The senhasegura guide's command, flag for flag, with the stray spaces inside its quotes (the shell has
# already removed the quotes themselves).
VENDOR_FLAGS = [
    "--imap-server-address=outlook.office365.com",
    "--imap-server-port=993",
    "--smtp-server-address=smtp.office365.com",
    "--smtp-server-port=587",
    "--smtp-server-starttls",
    "--oauth2-token-url=https://login.microsoftonline.com/TENANT_ID/oauth2/v2.0/token ",
    "--oauth2-permission-url=https://login.microsoftonline.com/TENANT_ID/oauth2/v2.0/authorize ",
    "--oauth2-scope= https://outlook.office365.com/IMAP.AccessAsUser.All "
    "https://outlook.office365.com/SMTP.Send offline_access ",
    "--oauth2-flow=client_credentials",
    "--oauth2-client-id=CLIENT_ID",
    "--oauth2-client-secret=CLIENT_SECRET",
    "--force",
]

MINIMAL = [
    "--smtp-server-address=smtp.example.com",
    "--smtp-server-port=465",
    "--oauth2-token-url=https://login.example.com/token",
    "--oauth2-scope=https://outlook.office365.com/.default",
    "--oauth2-flow=client_credentials",
    "--oauth2-client-id=app",
    "--oauth2-client-secret=s3cret-value",
]


def run(tmp_path: Path, flags: list[str], name: str = "emailproxy.config") -> tuple[int, Path]:
    path = tmp_path / name
    return register.main([f"--config-file={path}", *flags]), path


def usage_error(tmp_path: Path, flags: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        run(tmp_path, flags)
    assert info.value.code == 2
    assert not (tmp_path / "emailproxy.config").exists()
    return capsys.readouterr().err


def test_vendor_flags_give_a_configuration_that_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, path = run(tmp_path, VENDOR_FLAGS)
    assert code == 0
    config = load_config(path)  # raises on any error
    assert config.options.allow_catch_all_accounts
    assert [(s.section, s.server_address, s.server_port, s.server_starttls) for s in config.servers] == [
        ("IMAP-2993", "outlook.office365.com", 993, False),
        ("SMTP-2465", "smtp.office365.com", 587, True),
    ]
    assert all(s.local_address == "127.0.0.1" for s in config.servers)
    account = config.find_account("alerts@customer.example")
    assert account is not None and account.matched_section == "@"
    assert account.token_url == "https://login.microsoftonline.com/TENANT_ID/oauth2/v2.0/token"
    assert account.permission_url == "https://login.microsoftonline.com/TENANT_ID/oauth2/v2.0/authorize"
    assert account.oauth2_scope == (
        "https://outlook.office365.com/IMAP.AccessAsUser.All https://outlook.office365.com/SMTP.Send "
        "offline_access"
    )
    assert (account.written_oauth2_flow, account.client_id, account.client_secret) == (
        "client_credentials",
        "CLIENT_ID",
        "CLIENT_SECRET",
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emailproxy.config"]  # no temporary file left
    # what the vendor's values still need is reported, not hidden (and the secret is not printed)
    out = capsys.readouterr().out
    assert "authorization code flow is used" in out and "placeholder" in out
    assert "CLIENT_SECRET" not in out
    assert {f.key for f in check_config(config) if f.is_problem} >= {"oauth2_flow", "token_url", "client_id"}


def test_vendor_flags_through_the_command_line_entry_point(tmp_path: Path) -> None:
    path = tmp_path / "emailproxy.config"
    assert cli_main(["register", f"--config-file={path}", *VENDOR_FLAGS]) == 0
    assert load_config(path).servers[1].server_starttls


def test_clean_values_give_a_configuration_without_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, path = run(tmp_path, MINIMAL)
    assert code == 0
    assert [f for f in check_config(load_config(path)) if f.is_problem] == []
    out = capsys.readouterr().out
    assert "`emailproxy check` finds no problems." in out
    assert "SMTP 127.0.0.1:2465 -> smtp.example.com:465 (TLS)" in out
    assert "s3cret-value" not in out


def test_every_protocol_and_the_local_options(tmp_path: Path) -> None:
    code, path = run(
        tmp_path,
        [
            *MINIMAL,
            "--imap-server-address= imap.example.com ",
            "--imap-server-port=143",
            "--imap-server-starttls=yes",
            "--imap-local-port=11143",
            "--pop-server-address=pop.example.com",
            "--pop-server-port= 995",
            "--smtp-local-port=10025",
            "--local-address=::1",
        ],
    )
    assert code == 0
    config = load_config(path)
    assert [(s.section, s.local_address, s.server_port, s.server_starttls) for s in config.servers] == [
        ("IMAP-11143", "::1", 143, True),
        ("POP-2995", "::1", 995, False),
        ("SMTP-10025", "::1", 465, False),
    ]


def test_an_existing_file_is_kept_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "emailproxy.config"
    path.write_text("[IMAP-1993]\nserver_address = mine\nserver_port = 993\n")
    path.chmod(0o640)
    code, _ = run(tmp_path, MINIMAL)
    assert code == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "Use --force to replace it" in err
    assert path.read_text() == "[IMAP-1993]\nserver_address = mine\nserver_port = 993\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emailproxy.config"]

    code, _ = run(tmp_path, [*MINIMAL, "--force"])
    assert code == 0
    assert "smtp.example.com" in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_file_is_written_by_rename(tmp_path: Path) -> None:
    """An editor or the running proxy holding the old file sees it unchanged: the new file is a new inode."""
    code, path = run(tmp_path, MINIMAL)
    before = os.stat(path).st_ino
    with open(path) as old:
        code, _ = run(tmp_path, [*MINIMAL, "--force", "--smtp-server-port=587", "--smtp-server-starttls"])
        assert code == 0
        assert "server_port = 465" in old.read()
    assert os.stat(path).st_ino != before
    assert "server_starttls = True" in path.read_text()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--smtp-server-port=smtp"], "'smtp' is not a port number"),
        (["--smtp-server-port=70000"], "'70000' is not a port number"),
        (["--oauth2-token-url=http://login.example.com/token"], "is not an https:// URL"),
        (["--oauth2-token-url=login.example.com/token"], "is not a URL"),
        (
            ["--oauth2-token-url=[https://login.example.com/t](https://login.example.com/t%22%5C)"],
            "markdown link; give just the address: https://login.example.com/t",
        ),
        (["--oauth2-flow=client_credential"], "unknown flow 'client_credential'"),
        (["--oauth2-client-id=  "], "the value is empty"),
        (["--imap-server-address=imap.example.com"], "--imap-server-port is required"),
        (["--pop-server-port=995"], "--pop-server-address is required"),
        (["--imap-local-port=2000"], "--imap-local-port needs --imap-server-address"),
        (["--smtp-local-port=2993", "--imap-server-address=i", "--imap-server-port=993"], "local port 2993"),
        (["--local-certificate-path=/c.pem"], "go together"),
        (["--smtp-server-starttls=perhaps"], "'perhaps' is not true or false"),
    ],
)
def test_bad_input_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: list[str], message: str
) -> None:
    assert message in usage_error(tmp_path, [*MINIMAL, *change], capsys)


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ("--oauth2-token-url", "--oauth2-token-url is required"),
        ("--oauth2-client-id", "--oauth2-client-id is required"),
        ("--oauth2-scope", "--oauth2-scope is required"),
        ("--oauth2-flow", "--oauth2-flow is required without --oauth2-permission-url"),
        ("--oauth2-client-secret", "client_credentials flow needs --oauth2-client-secret"),
        ("--smtp-server", "give at least one server"),
    ],
)
def test_missing_flags_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], missing: str, message: str
) -> None:
    flags = [flag for flag in MINIMAL if not flag.startswith(missing)]
    assert message in usage_error(tmp_path, flags, capsys)


def test_an_interactive_flow_needs_no_secret(tmp_path: Path) -> None:
    flags = [f for f in MINIMAL if not f.startswith(("--oauth2-flow", "--oauth2-client-secret"))]
    code, path = run(
        tmp_path,
        [
            *flags,
            "--oauth2-permission-url=https://login.example.com/authorize",
            "--oauth2-redirect-uri=http://localhost:8080",
        ],
    )
    assert code == 0
    account = load_config(path).find_account("someone@example.com")
    assert account is not None
    assert (account.oauth2_flow, account.redirect_uri) == ("authorization_code", "http://localhost:8080")


def test_a_directory_is_not_a_file_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert register.main([f"--config-file={tmp_path}", *MINIMAL]) == 2
    assert "is a directory" in capsys.readouterr().err
