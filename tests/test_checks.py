"""The configuration checks behind `emailproxy check` and the start-up warnings."""

from __future__ import annotations

import socket
import textwrap
import threading
from pathlib import Path

import pytest

from emailproxy.checks import (
    ERROR,
    OK,
    WARNING,
    Finding,
    check_config,
    finding_from_error,
    format_finding,
    load_warnings,
    problems,
)
from emailproxy.commands import check as check_command
from emailproxy.config import Config, ConfigError, ServerConfig, load_config
from emailproxy.oauth.localpassword import hash_password
from emailproxy.probes import (
    ServerProbe,
    TokenProbe,
    probe_server,
    server_probe_findings,
    token_probe_findings,
)

CLEAN = """
[emailproxy]
allow_catch_all_accounts = True

[IMAP-1993]
server_address = imap.example.com
server_port = 993

[SMTP-1587]
server_address = smtp.example.com
server_port = 587
server_starttls = True

[@]
token_url = https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token
oauth2_scope = https://outlook.office365.com/.default
oauth2_flow = client_credentials
client_id = 0b5e1c9a-4d7e-4c45-9a53-1f4d7e8c2b11
client_secret = real-looking-secret
"""

# The senhasegura guide's sample, with its two fatal mistakes fixed (unknown key, markdown link) so the rest
# can be checked.
VENDOR = """
[emailproxy]
delete_account_token_on_password_error = True
encrypt_client_secret_on_first_use = False
allow_catch_all_accounts = True
[IMAP-2993]
server_address = outlook.office365.com
server_port = 993
[SMTP-2465]
server_address = smtp.office365.com
server_port = 587
starttls = True
[@]
redirect_uri = http://<Your_Vault_Address>/email-oauth2-proxy-authorize/
redirect_listen_address = http://127.0.0.1:8801/
token_url = https://login.microsoftonline.com/TENANT_ID/oauth2/v2.0/token
permission_url = https://login.microsoftonline.com/TENANT_ID/oauth2/v2.0/authorize
oauth2_scope = https://outlook.office365.com/IMAP.AccessAsUser.All
  https://outlook.office365.com/POP.AccessAsUser.All https://outlook.office365.com/SMPT.Send offline_access
client_id = CLIENT_ID
client_secret = CLIENT_SECRET
oauth2_flow = client_credentials
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "emailproxy.config"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def keyed(findings: list[Finding]) -> list[tuple[str, str | None, str | None]]:
    return [(f.level, f.section, f.key) for f in findings]


def test_clean_configuration_has_no_problems(tmp_path: Path) -> None:
    findings = check_config(load(tmp_path, CLEAN))
    assert problems(findings) == []
    assert [f.key for f in findings] == ["local_password_hash"]  # only the first-use advice


def test_vendor_sample_problems_are_all_explained(tmp_path: Path) -> None:
    findings = check_config(load(tmp_path, VENDOR))
    text = "\n".join(format_finding(f) for f in findings)
    assert all(f.level == WARNING and f.section == "@" for f in findings), text
    # permission_url wins over oauth2_flow = client_credentials, as in the reference: explained
    (override,) = [f for f in findings if f.key == "oauth2_flow"]
    assert "authorization code flow is used" in override.message
    assert "Please visit the following URL" in override.message
    assert override.hint is not None and "remove permission_url" in override.hint
    assert "/.default" in override.hint  # client credentials would also need the .default scope
    # the scope typo in the catch-all section
    assert any("SMPT.Send" in f.message and "SMTP.Send" in f.message for f in findings), text
    # placeholders, including the client secret the sample's own regex does not know
    placeholder_keys = sorted(f.key or "" for f in findings if "placeholder" in f.message)
    assert placeholder_keys == [
        "client_id",
        "client_secret",
        "permission_url",
        "redirect_uri",
        "token_url",
    ]
    assert "CLIENT_SECRET" not in text  # the secret's value is never echoed


def test_vendor_sample_as_published_stops_at_its_first_error(tmp_path: Path) -> None:
    published = VENDOR.replace("redirect_listen_address", "redirect_list_address")
    with pytest.raises(ConfigError) as info:
        load(tmp_path, published)
    finding = finding_from_error(info.value)
    assert (finding.level, finding.section, finding.key) == (ERROR, "@", "redirect_list_address")
    assert finding.hint == "did you mean 'redirect_listen_address'?"

    markdown = VENDOR.replace(
        "token_url = https://login.microsoftonline.com/TENANT_ID/oauth2/v2.0/token",
        "token_url = [https://login.microsoftonline.com/TENANT_ID/oauth2/v2.0/token]"
        "(https://login.microsoftonline.com/TENANT_ID/oauth2/v2.0/token%22%5C)",
    )
    with pytest.raises(ConfigError) as info:
        load(tmp_path, markdown)
    finding = finding_from_error(info.value)
    assert finding.key == "token_url" and "markdown link" in finding.message
    # the suggestion is the link's text, not its target with the junk a rendered page added
    assert finding.hint == (
        "write just the address: token_url = https://login.microsoftonline.com/TENANT_ID/oauth2/v2.0/token"
    )


def test_load_warnings_round_trip_to_the_same_text(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        [IMAP-1993]
        server_address = imap.example.com
        server_port = 993
        colour = blue
        local_address = 0.0.0.0
        [user@example.com]
        token_url = https://login.example.com/token
        oauth2_flow = client_credentials_typo
        oauth2_scope = mail
        client_id = c
        use_pkce = maybe
        """,
    )
    assert len(config.warnings) >= 4
    findings = load_warnings(config)
    assert [f.describe(str(config.path)) for f in findings] == list(config.warnings)
    assert ("warning", "IMAP-1993", "colour") in keyed(findings)
    assert ("warning", "user@example.com", "use_pkce") in keyed(findings)
    # each load warning appears once in the full check, not again from the extra checks
    full = check_config(config)
    assert len(full) == len({(f.section, f.key, f.message) for f in full})
    assert sum("0.0.0.0" in f.message for f in full) == 1


def test_placeholders_are_reported_once(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        [IMAP-1993]
        server_address = imap.example.com
        server_port = 993
        [user@example.com]
        token_url = https://login.microsoftonline.com/TENANT_ID/oauth2/v2.0/token
        oauth2_scope = https://outlook.office365.com/.default
        oauth2_flow = client_credentials
        client_id = CLIENT_ID
        client_secret = CLIENT_SECRET
        """,
    )
    findings = [f for f in check_config(config) if "placeholder" in f.message]
    assert sorted(f.key or "" for f in findings) == ["client_id", "client_secret", "token_url"]


def test_catch_all_sections_get_the_account_checks(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        [emailproxy]
        allow_catch_all_accounts = True
        [IMAP-1993]
        server_address = imap.example.com
        server_port = 993
        [@example.com]
        token_url = https://login.microsoftonline.com/contoso.com/oauth2/v2.0/token
        oauth2_scope = https://outlook.office365.com/IMAP.AccessAsUser.All offline_acess
        oauth2_flow = client_credentials
        client_id = abc
        client_secret = def
        [@example.org]
        permission_url = https://login.microsoftonline.com/contoso.com/oauth2/v2.0/authorize
        token_url = https://login.microsoftonline.com/contoso.com/oauth2/v2.0/token
        oauth2_scope = https://outlook.office365.com/IMAP.AccessAsUser.All
        client_id = abc
        """,
    )
    found = check_config(config)
    by_section = {(f.section, f.key, f.message.split(":")[0]) for f in found}
    messages = "\n".join(f"{f.section} {f.key} {f.message} {f.hint}" for f in found)
    assert any(s == "@example.com" and "'/.default' scope" in m for s, _, m in by_section), messages
    assert "did you mean 'offline_access'?" in messages
    assert ("@example.org", "redirect_uri") in {(f.section, f.key) for f in found}


def test_catch_all_sections_are_not_checked_when_catch_all_is_off(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        [IMAP-1993]
        server_address = imap.example.com
        server_port = 993
        [@]
        permission_url = https://login.example.com/authorize
        """,
    )
    found = check_config(config)
    assert [f.section for f in found] == ["@"]
    assert "allow_catch_all_accounts is off" in found[0].message


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        ("https://outlook.office365.com/SMTP.SendAsApp", None),
        ("https://outlook.office365.com/SMTP.Send offline_access openid", None),
        ("https://outlook.office365.com/SMPT.Send", "did you mean 'SMTP.Send'?"),
        ("https://outlook.office365.com/SMTP.Send ofline_access", "did you mean 'offline_access'?"),
        ("IMAP.AccessAsUser.All", "write https://outlook.office365.com/IMAP.AccessAsUser.All"),
        ("https://outlook.office365.com/SMTP.Send SMTP.Sned", "https://outlook.office365.com/SMTP.Send"),
    ],
)
def test_microsoft_scope_names(tmp_path: Path, scope: str, expected: str | None) -> None:
    config = load(
        tmp_path,
        f"""
        [IMAP-1993]
        server_address = outlook.office365.com
        server_port = 993
        [user@example.com]
        permission_url = https://login.microsoftonline.com/contoso.com/oauth2/v2.0/authorize
        token_url = https://login.microsoftonline.com/contoso.com/oauth2/v2.0/token
        redirect_uri = http://localhost:8080
        oauth2_scope = {scope}
        client_id = abc
        """,
    )
    found = [f"{f.message} {f.hint}" for f in check_config(config) if f.key == "oauth2_scope"]
    if expected is None:
        assert found == []
    else:
        assert len(found) == 1 and expected in found[0], found


def test_other_providers_scope_names_are_left_alone(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        [IMAP-1993]
        server_address = imap.example.com
        server_port = 993
        [user@example.com]
        permission_url = https://login.example.com/authorize
        token_url = https://login.example.com/token
        redirect_uri = http://localhost:8080
        oauth2_scope = mail email wl.imap offline_access
        client_id = abc
        """,
    )
    assert check_config(config) == []


def test_listener_ports(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        [IMAP-993]
        server_address = imap.example.com
        server_port = 993
        [POP-1995]
        server_address = pop.example.com
        server_port = 995
        local_address = 0.0.0.0
        local_certificate_path = /nonexistent/cert.pem
        local_key_path = /nonexistent/key.pem
        [SMTP-1995]
        server_address = smtp.example.com
        server_port = 587
        [SMTP-1465]
        server_address = smtp.example.com
        server_port = 465
        server_starttls = True
        """,
    )
    found = check_config(config)
    messages = "\n".join(format_finding(f) for f in found)
    assert ("warning", "IMAP-993", None) in keyed(found) and "privileged" in messages
    conflict = [f for f in found if f.level == ERROR]
    assert [(f.section, f.key) for f in conflict] == [("SMTP-1995", "local_address")], messages
    starttls = {f.section: f for f in found if f.key == "server_starttls"}
    assert sorted(starttls) == ["SMTP-1465", "SMTP-1995"]
    assert starttls["SMTP-1995"].hint == "set server_starttls = True"
    assert "implicit TLS" in starttls["SMTP-1465"].message
    # the missing certificate files come from load_config, once each
    missing = [f for f in found if "not found" in f.message]
    assert sorted(f.key or "" for f in missing) == ["local_certificate_path", "local_key_path"]


def test_client_credentials_need_a_tenant(tmp_path: Path) -> None:
    config = load(tmp_path, CLEAN.replace("contoso.onmicrosoft.com", "common"))
    (finding,) = problems(check_config(config))
    assert finding.key == "token_url" and "'common'" in finding.message


def test_cache_store_warnings_keep_their_file(tmp_path: Path) -> None:
    cache = tmp_path / "cache.ini"
    cache.write_text("[other@example.com]\naccess_token = x\ncolour = blue\n")
    config = load_config(write(tmp_path, CLEAN.replace("allow_catch_all_accounts = True", "")), cache)
    findings = load_warnings(config)
    assert [f.describe(str(config.path)) for f in findings] == list(config.warnings)
    assert any(f.path == str(cache) for f in findings)


# ------------------------------------------------------------------------------------------ online


URL = "https://idp.example.com/token"
SMTP_IMPLICIT = ServerConfig("SMTP-1465", "SMTP", 1465, "127.0.0.1", "smtp.example.com", 587)
IMAP_STARTTLS = ServerConfig("IMAP-1143", "IMAP", 1143, "127.0.0.1", "imap.example.com", 993, True)


def test_plain_greeting_on_an_implicit_tls_section_suggests_starttls() -> None:
    probe = ServerProbe("smtp.example.com", 587, False, plain_greeting="220 smtp.example.com ESMTP")
    (finding,) = server_probe_findings(SMTP_IMPLICIT, probe)
    assert finding.level == ERROR and finding.key == "server_starttls"
    assert "220 smtp.example.com ESMTP" in finding.message
    assert finding.hint is not None and finding.hint.startswith("set server_starttls = True")
    assert "465" in finding.hint


def test_silent_starttls_port_that_speaks_tls_suggests_implicit_tls() -> None:
    probe = ServerProbe("imap.example.com", 993, True, implicit_tls_works=True)
    (finding,) = server_probe_findings(IMAP_STARTTLS, probe)
    assert finding.level == ERROR and finding.hint == "set server_starttls = False (or remove it)"


@pytest.mark.parametrize(
    ("probe", "level", "words"),
    [
        (ServerProbe("h", 1, False, connect_error="Connection refused"), ERROR, "cannot connect"),
        (ServerProbe("h", 1, False, certificate_error="self-signed certificate"), ERROR, "not accepted"),
        (ServerProbe("h", 1, True, starttls_refused="not advertised"), ERROR, "does not offer STARTTLS"),
        (ServerProbe("h", 1, False, tls_error="timed out"), ERROR, "no TLS session"),
        (
            ServerProbe("h", 1, False, tls_version="TLSv1.3", greeting="220 ok", mechanisms=("PLAIN",)),
            WARNING,
            "does not offer XOAUTH2",
        ),
        (
            ServerProbe("h", 1, False, tls_version="TLSv1.3", greeting="* OK ready", mechanisms=("XOAUTH2",)),
            WARNING,
            "does not look like SMTP",
        ),
        (
            ServerProbe("h", 1, False, tls_version="TLSv1.3", greeting="220 ok", mechanisms=("XOAUTH2",)),
            OK,
            "offers XOAUTH2",
        ),
    ],
)
def test_server_probe_results(probe: ServerProbe, level: str, words: str) -> None:
    (finding,) = server_probe_findings(SMTP_IMPLICIT, probe)
    assert finding.level == level and words in finding.message


@pytest.mark.parametrize(
    ("probe", "level", "words"),
    [
        (
            TokenProbe(URL, status=401, error="invalid_client", description="AADSTS7000218: x"),
            OK,
            "reachable",
        ),
        (TokenProbe(URL, status=404, error="http_404"), WARNING, "does not look like"),
        (TokenProbe(URL, network_error="could not connect to idp"), ERROR, "cannot reach"),
        (
            TokenProbe(URL, status=400, error="invalid_request", description="AADSTS90002: T"),
            ERROR,
            "tenant",
        ),
        (
            TokenProbe(URL, status=400, error="unauthorized_client", description="AADSTS700016"),
            ERROR,
            "client_id",
        ),
    ],
)
def test_token_probe_results(probe: TokenProbe, level: str, words: str) -> None:
    (finding,) = token_probe_findings("@", probe)
    assert finding.level == level and words in finding.message


# ------------------------------------------------------------------------------------------ command


def test_check_command_exit_status_and_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, CLEAN)
    assert check_command.main(["--config-file", str(path)]) == 0
    assert "No problems found." in capsys.readouterr().out

    write(tmp_path, VENDOR)
    assert check_command.main(["--config-file", str(path)]) == 1
    out = capsys.readouterr().out
    assert "WARNING  [@] oauth2_flow:" in out and "7 problem(s): 0 error(s), 7 warning(s)." in out

    missing = tmp_path / "missing.config"
    assert check_command.main(["--config-file", str(missing)]) == 1
    assert "ERROR    file: configuration file not found" in capsys.readouterr().out


class FakeServer:
    """A loopback TCP server that sends ``greeting`` (or nothing) to every connection, then waits."""

    def __init__(self, greeting: bytes) -> None:
        self.greeting = greeting
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.05)
        self.connections: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections.append(conn)
            if self.greeting:
                conn.sendall(self.greeting)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()
        for conn in self.connections:
            conn.close()


def test_probe_sees_a_plain_greeting_where_tls_was_expected() -> None:
    server = FakeServer(b"220 fake.example ESMTP ready\r\n")
    try:
        section = ServerConfig("SMTP-1465", "SMTP", 1465, "127.0.0.1", "127.0.0.1", server.port)
        probe = probe_server(section, timeout=2.0)
    finally:
        server.close()
    assert probe.plain_greeting == "220 fake.example ESMTP ready"
    (finding,) = server_probe_findings(section, probe)
    assert finding.hint is not None and finding.hint.startswith("set server_starttls = True")


def test_probe_of_a_silent_starttls_port_times_out_clearly() -> None:
    server = FakeServer(b"")
    try:
        section = ServerConfig("IMAP-1143", "IMAP", 1143, "127.0.0.1", "127.0.0.1", server.port, True)
        probe = probe_server(section, timeout=0.3)
    finally:
        server.close()
    assert probe.tls_error == "no plain-text greeting: timed out"
    assert not probe.implicit_tls_works


def test_app_only_account_without_a_bound_password_gets_an_advisory(tmp_path: Path) -> None:
    findings = check_config(load(tmp_path, CLEAN))
    advisory = [f for f in findings if f.key == "local_password_hash"]
    assert len(advisory) == 1
    assert advisory[0].section == "@" and not advisory[0].is_problem  # advice: `check` still exits 0
    assert advisory[0].hint == "bind one in advance: emailproxy set-password @"
    assert "first login" in advisory[0].message


def test_bound_password_or_interactive_flow_needs_no_advisory(tmp_path: Path) -> None:
    bound = CLEAN + f"local_password_hash = {hash_password('a long local password')}\n"
    interactive = CLEAN.replace("oauth2_flow = client_credentials", "oauth2_flow = password")
    for text in (bound, interactive):
        assert not [f for f in check_config(load(tmp_path, text)) if f.key == "local_password_hash"]
