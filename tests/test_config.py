"""Reading the configuration file: configparser semantics, sections, validation, lookup, fixtures."""

from __future__ import annotations

import base64
import configparser
import hashlib
import json
import textwrap
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from emailproxy.config import (
    AccountConfig,
    CachedTokens,
    Config,
    ConfigError,
    ConfigNotFoundError,
    GlobalOptions,
    load_config,
    parse_use_pkce,
)

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO.parent / "shared" / "fixtures" / "reference-written"
if not FIXTURES.is_dir():  # the shared folder sits beside the repository (see the common brief)
    FIXTURES = Path("/work/shared/fixtures/reference-written")

SERVER = """
[IMAP-1993]
server_address = imap.example.com
server_port = 993
"""

ACCOUNT = """
[user@example.com]
permission_url = https://login.example.com/authorize
token_url = https://login.example.com/token
oauth2_scope = mail offline_access
redirect_uri = http://localhost:8080
client_id = the-client
"""


def write(tmp_path: Path, text: str, name: str = "emailproxy.config") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def error_for(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return info.value


# ------------------------------------------------------------------------------------ parsing features


def test_continuation_lines_with_blank_lines_inside_a_value(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        SERVER
        + """
[Notes]
documentation = first line
    second line

    after an empty line
[svc@example.com]
token_url = https://oauth2.example.com/token
oauth2_flow = service_account
oauth2_scope = https://mail.google.com/
client_id = key
client_secret = {
    "type": "service_account",

    "private_key_id": "abc"
  }
""",
    )
    account = config.find_account("svc@example.com")
    assert account is not None
    assert account.client_secret == '{\n"type": "service_account",\n\n"private_key_id": "abc"\n}'
    assert "Notes" not in config.account_sections


def test_default_section_is_inherited(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
[DEFAULT]
local_address = 127.0.0.2
client_id = shared-client
"""
        + SERVER
        + """
[user@example.com]
token_url = https://login.example.com/token
oauth2_scope = mail
oauth2_flow = client_credentials
""",
    )
    assert config.servers[0].local_address == "127.0.0.2"
    account = config.find_account("user@example.com")
    assert account is not None and account.client_id == "shared-client"
    assert not [w for w in config.warnings if "client_id" in w]


def test_colon_delimiter_comments_case_insensitive_keys_and_literal_values(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
# a hash comment
; a semicolon comment
[IMAP-1993]
Server_Address: imap.example.com
    # an indented comment line is a comment too
SERVER_PORT = 993

[user@example.com]
TOKEN_URL: https://login.example.com/token?a=1#fragment
oauth2_scope = mail
oauth2_flow = password
client_id = "quoted"
client_secret = 100% %(interp)s ; not # a comment
""",
    )
    assert config.servers[0].server_address == "imap.example.com"
    assert config.servers[0].server_port == 993
    account = config.find_account("user@example.com")
    assert account is not None
    assert account.token_url == "https://login.example.com/token?a=1#fragment"
    assert account.client_id == '"quoted"'
    assert account.client_secret == "100% %(interp)s ; not # a comment"


def test_inline_comment_after_a_port_is_an_error_that_says_so(tmp_path: Path) -> None:
    error = error_for(tmp_path, "[IMAP-1993]\nserver_address = x\nserver_port = 993 ; implicit TLS\n")
    assert error.section == "IMAP-1993" and error.key == "server_port"
    assert "inline comments are not supported" in str(error)


def test_duplicate_section_is_an_error_with_its_line(tmp_path: Path) -> None:
    error = error_for(tmp_path, SERVER + ACCOUNT + "\n[user@example.com]\nclient_id = again\n")
    assert error.section == "user@example.com"
    assert "more than once" in error.message and "line 13" in error.message
    assert str(error).startswith(str(tmp_path / "emailproxy.config"))


def test_duplicate_key_is_an_error_naming_the_key(tmp_path: Path) -> None:
    error = error_for(tmp_path, "[IMAP-1993]\nserver_address = a\nServer_Address = b\nserver_port = 993\n")
    assert (error.section, error.key) == ("IMAP-1993", "server_address")
    assert "line 3" in error.message


def test_line_outside_any_section_and_unparsable_line(tmp_path: Path) -> None:
    error = error_for(tmp_path, "server_port = 1\n" + SERVER)
    assert "before any [section]" in error.message
    error = error_for(tmp_path, SERVER + "this line has no delimiter\n")
    assert "line 5" in error.message and "this line has no delimiter" in error.message


def test_server_section_names_are_case_sensitive(tmp_path: Path) -> None:
    config = load(tmp_path, SERVER + "\n[imap-2993]\nserver_address = x\nserver_port = 993\n")
    assert [s.section for s in config.servers] == ["IMAP-1993"]
    assert any("[imap-2993]" in w and "ignored" in w for w in config.warnings)


def test_documentation_keys_and_sections_are_ignored(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "[Server setup]\nanything = goes\n"
        + SERVER
        + "documentation = about this server\n"
        + ACCOUNT
        + "documentation = about this account\n",
    )
    assert config.warnings == ()
    assert len(config.servers) == 1


# ------------------------------------------------------------------------------------------ servers


def test_server_defaults_and_keys(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    key = tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    config = load(
        tmp_path,
        f"""
[IMAP-1993]
server_address = imap.example.com
server_port = 993
[POP-1995]
server_address = pop.example.com
server_port = 110
server_starttls = yes
local_certificate_path = {cert}
local_key_path = {key}
local_starttls = on
[SMTP-1587]
server_address = smtp.example.com
server_port = 587
starttls = True
local_certificate_path = {cert}
local_key_path = {key}
[SMTP-1588]
server_address = smtp.example.com
server_port = 587
starttls = True
server_starttls = False
""",
    )
    imap, pop, smtp, smtp2 = config.servers
    assert (imap.protocol, imap.local_port, imap.local_address) == ("IMAP", 1993, "127.0.0.1")
    assert not imap.server_starttls and not imap.local_tls
    assert pop.protocol == "POP" and pop.server_starttls and pop.local_starttls and not pop.local_tls
    assert smtp.server_starttls and smtp.local_tls  # legacy `starttls`
    assert not smtp2.server_starttls  # server_starttls wins over the legacy name
    assert config.warnings == ()


@pytest.mark.parametrize(
    ("section", "port_line", "expected"),
    [
        ("IMAP-LOCAL_IMAP_PORT", "server_port = 993", "is not a port number"),
        ("IMAP-0", "server_port = 993", "out of range"),
        ("SMTP-65536", "server_port = 587", "out of range"),
        ("POP-1995", "server_port = SERVER_PORT_IMAP", "is not a port number"),
        ("POP-1995", "server_port = 70000", "out of range"),
        ("POP-1995", "server_port =", "server_port is missing"),
    ],
)
def test_bad_ports_are_errors(tmp_path: Path, section: str, port_line: str, expected: str) -> None:
    error = error_for(tmp_path, f"[{section}]\nserver_address = x\n{port_line}\n")
    assert error.section == section and expected in error.message
    assert "1 to 65535" in str(error) or "missing" in expected


def test_missing_server_address(tmp_path: Path) -> None:
    error = error_for(tmp_path, "[IMAP-1993]\nserver_port = 993\n")
    assert error.key == "server_address" and "missing" in error.message


@pytest.mark.parametrize(
    "text",
    [
        "[emailproxy]\nallow_catch_all_accounts = sometimes\n" + SERVER,
        SERVER + "server_starttls = maybe\n",
        SERVER + "local_starttls = 2\n",
    ],
)
def test_bad_booleans_are_errors(tmp_path: Path, text: str) -> None:
    error = error_for(tmp_path, text)
    assert "is not a boolean" in error.message and "True or False" in str(error)


def test_local_starttls_needs_certificate_and_key(tmp_path: Path) -> None:
    error = error_for(tmp_path, SERVER + "local_starttls = True\nlocal_certificate_path = /x.pem\n")
    assert error.key == "local_starttls" and "local_key_path" in error.message


def test_no_server_sections(tmp_path: Path) -> None:
    error = error_for(tmp_path, ACCOUNT)
    assert "no server sections" in error.message and "[IMAP-1993]" in str(error)
    config = load_config(write(tmp_path, ACCOUNT), require_servers=False)
    assert config.servers == () and config.find_account("user@example.com") is not None


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigNotFoundError) as info:
        load_config(tmp_path / "nope.config")
    assert "not found" in str(info.value) and "nope.config" in str(info.value)


def test_two_sections_on_one_port(tmp_path: Path) -> None:
    error = error_for(tmp_path, SERVER + "[SMTP-1993]\nserver_address = s\nserver_port = 587\n")
    assert error.section == "SMTP-1993" and "[IMAP-1993]" in error.message


def test_plugins_non_loopback_and_one_tls_file_are_warnings(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        SERVER + "plugins = {'Echo': {}}\nlocal_address = 0.0.0.0\nlocal_certificate_path = /nope.pem\n",
    )
    text = "\n".join(config.warnings)
    assert "plugins are not supported" in text
    assert "0.0.0.0" in text and "no TLS" in text
    assert "only one is set" in text
    assert config.servers[0].local_address == "0.0.0.0"


def test_global_options(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "[emailproxy]\ndelete_account_token_on_password_error = no\nENCRYPT_CLIENT_SECRET_ON_FIRST_USE = 1\n"
        + SERVER,
    )
    assert config.options == GlobalOptions(
        delete_account_token_on_password_error=False, encrypt_client_secret_on_first_use=True
    )
    assert load(tmp_path, SERVER).options == GlobalOptions()


# ------------------------------------------------------------------------------------ key validation


@pytest.mark.parametrize(
    ("text", "section", "key", "suggestion"),
    [
        (
            SERVER + ACCOUNT + "redirect_list_address = http://127.0.0.1:8080\n",
            "user@example.com",
            "redirect_list_address",
            "redirect_listen_address",
        ),
        (
            "[IMAP-1993]\nserver_address = x\nsever_port = 993\nserver_port = 993\n",
            "IMAP-1993",
            "sever_port",
            "server_port",
        ),
        (
            "[emailproxy]\nallow_catch_all_account = True\n" + SERVER,
            "emailproxy",
            "allow_catch_all_account",
            "allow_catch_all_accounts",
        ),
    ],
)
def test_misspelt_keys_are_errors_with_did_you_mean(
    tmp_path: Path, text: str, section: str, key: str, suggestion: str
) -> None:
    error = error_for(tmp_path, text)
    assert (error.section, error.key) == (section, key)
    assert f"did you mean '{suggestion}'?" in str(error)
    assert str(error).startswith(f"{tmp_path / 'emailproxy.config'}, section [{section}], key '{key}': ")


def test_unknown_and_misplaced_keys_are_warnings(tmp_path: Path) -> None:
    config = load(tmp_path, SERVER + "colour = blue\n" + ACCOUNT + "server_port = 993\n")
    assert any("[IMAP-1993], key 'colour': unknown key, ignored" in w for w in config.warnings)
    assert any(
        "[user@example.com], key 'server_port'" in w and "does not belong" in w for w in config.warnings
    )


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("token_url = [https://login.example.com/token](https://login.example.com/token)", "markdown link"),
        ("token_url = login.example.com/token", "not an http:// or https:// URL"),
        ("permission_url = ftp://login.example.com/authorize", "not an http:// or https:// URL"),
        ("redirect_listen_address = TOKEN_URL", "not an http:// or https:// URL"),
    ],
)
def test_bad_urls_are_errors_naming_the_key(tmp_path: Path, line: str, expected: str) -> None:
    error = error_for(tmp_path, SERVER + "[user@example.com]\n" + line + "\n")
    assert error.section == "user@example.com" and error.key == line.split(" =")[0]
    assert expected in error.message
    if "markdown" in expected:
        assert "token_url = https://login.example.com/token" in str(error)


def test_placeholders_are_warnings(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        SERVER
        + """
[user@example.com]
token_url = https://login.microsoftonline.com/TENANT_ID/oauth2/v2.0/token
oauth2_scope = https://outlook.office365.com/.default
oauth2_flow = client_credentials
client_id = CLIENT_ID
client_secret = *** your client secret ***
""",
    )
    keys = sorted(w.split("key '")[1].split("'")[0] for w in config.warnings if "placeholder" in w)
    assert keys == ["client_id", "client_secret", "token_url"]
    assert not any("your client secret" in w for w in config.warnings)  # the secret is not echoed


def test_quoted_path_and_scope_typos_are_warnings(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        SERVER
        + """
[user@example.com]
token_url = https://login.microsoftonline.com/tenant/oauth2/v2.0/token
oauth2_scope = https://outlook.office365.com/SMPT.Send
oauth2_flow = client_credentials
client_id = c
jwt_key_path = "C:\\keys\\key.pem"
""",
    )
    text = "\n".join(config.warnings)
    assert "did you mean 'SMTP.Send'?" in text
    assert "'/.default' scope" in text
    assert "wrapped in quotes" in text
    account = config.find_account("user@example.com")
    assert account is not None and account.jwt_key_path == '"C:\\keys\\key.pem"'


# ---------------------------------------------------------------------------------- flows and PKCE


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, False),
        ("", False),
        ("True", True),
        ("yes", True),
        ("ON", True),
        ("1", True),
        ("False", False),
        ("no", False),
        ("off", False),
        ("0", False),
        ("S256", True),
    ],
)
def test_use_pkce_values(value: str | None, expected: bool) -> None:
    assert parse_use_pkce(value) is expected


def test_use_pkce_in_a_file_and_its_warning(tmp_path: Path) -> None:
    config = load(tmp_path, SERVER + ACCOUNT + "use_pkce = S256\n")
    account = config.find_account("user@example.com")
    assert account is not None and account.use_pkce is True
    assert any("use_pkce" in w and "not a boolean" in w for w in config.warnings)
    config = load(tmp_path, SERVER + ACCOUNT + "use_pkce = False\n")
    account = config.find_account("user@example.com")
    assert account is not None and account.use_pkce is False and config.warnings == ()


@pytest.mark.parametrize(
    ("lines", "flow", "warning"),
    [
        ("permission_url = https://p.example.com/a\n", "authorization_code", None),
        ("permission_url = https://p.example.com/a\noauth2_flow = device\n", "device", None),
        (
            "permission_url = https://p.example.com/a\noauth2_flow = client_credentials\n",
            "authorization_code",
            "is overridden",
        ),
        ("oauth2_flow = client_credentials\n", "client_credentials", None),
        ("oauth2_flow = password\n", "password", None),
        ("", None, "no permission_url and no oauth2_flow"),
    ],
)
def test_effective_flow(tmp_path: Path, lines: str, flow: str | None, warning: str | None) -> None:
    text = SERVER + "[a@example.com]\ntoken_url = https://t.example.com/t\noauth2_scope = s\nclient_id = c\n"
    text += "redirect_uri = http://localhost\n" + lines
    config = load(tmp_path, text)
    account = config.find_account("a@example.com")
    assert account is not None and account.oauth2_flow == flow
    if warning is None:
        assert config.warnings == ()
    else:
        assert any(warning in w for w in config.warnings)


def test_incomplete_account_is_a_warning_not_an_error(tmp_path: Path) -> None:
    config = load(tmp_path, SERVER + "[a@example.com]\npermission_url = https://p.example.com/a\n")
    text = "\n".join(config.warnings)
    assert "missing token_url, client_id, oauth2_scope" in text
    assert "needs a redirect_uri" in text


# ------------------------------------------------------------------------------------------ lookup

LOOKUP = (
    SERVER
    + """
[User@Example.com]
client_id = mixed-case
access_token = own-access
token_url = https://own.example.com/token

[user@example.com]
client_id = lower-case

[@example.com]
client_id = domain
token_url = https://domain.example.com/token
oauth2_scope = domain-scope
token_salt = domain-salt
token_iterations = 1200000
client_secret_encrypted = domain-encrypted
access_token = never-inherited
refresh_token = never-inherited
access_token_expiry = 1

[@]
client_id = everyone
oauth2_scope = everyone-scope
permission_url = https://everyone.example.com/authorize
"""
)


def lookup_config(tmp_path: Path, catch_all: bool) -> Config:
    return load(tmp_path, f"[emailproxy]\nallow_catch_all_accounts = {catch_all}\n" + LOOKUP)


def test_exact_match_wins_over_case_insensitive(tmp_path: Path) -> None:
    config = lookup_config(tmp_path, catch_all=False)
    for username, section in [
        ("User@Example.com", "User@Example.com"),
        ("user@example.com", "user@example.com"),
        ("USER@EXAMPLE.COM", "User@Example.com"),  # first in file order
    ]:
        account = config.find_account(username)
        assert account is not None
        assert (account.username, account.section, account.matched_section) == (username, section, section)
    assert any("only in letter case" in w for w in config.warnings)


def test_catch_all_off(tmp_path: Path) -> None:
    config = lookup_config(tmp_path, catch_all=False)
    assert config.find_account("other@example.com") is None
    assert config.find_account("@example.com") is None  # a catch-all section is not an account
    account = config.find_account("user@example.com")
    assert account is not None and account.token_url is None and account.oauth2_scope is None
    assert any("[@example.com]" in w and "allow_catch_all_accounts is off" in w for w in config.warnings)


def test_catch_all_on_resolution_order(tmp_path: Path) -> None:
    config = lookup_config(tmp_path, catch_all=True)
    account = config.find_account("other@EXAMPLE.com")
    assert account is not None
    assert (account.section, account.matched_section) == ("other@EXAMPLE.com", "@example.com")
    assert account.client_id == "domain"
    assert account.oauth2_scope == "domain-scope"
    assert account.permission_url == "https://everyone.example.com/authorize"  # from [@]
    assert account.cached == CachedTokens(
        token_salt="domain-salt", token_iterations="1200000", client_secret_encrypted="domain-encrypted"
    )

    own = config.find_account("User@Example.com")
    assert own is not None
    assert own.client_id == "mixed-case" and own.token_url == "https://own.example.com/token"
    assert own.oauth2_scope == "domain-scope"  # account -> [@domain] -> [@]
    assert own.cached.access_token == "own-access"
    assert own.cached.refresh_token is None and own.cached.access_token_expiry is None
    assert own.cached.token_salt == "domain-salt"

    elsewhere = config.find_account("someone@elsewhere.org")
    assert elsewhere is not None
    assert (elsewhere.section, elsewhere.matched_section, elsewhere.client_id) == (
        "someone@elsewhere.org",
        "@",
        "everyone",
    )
    assert elsewhere.token_url is None


def test_find_account_works_on_a_hand_built_config() -> None:
    sections = {"a@x.org": {"client_id": "c", "oauth2_flow": "device", "permission_url": "https://p/"}}
    config = Config(path=Path("f"), options=GlobalOptions(), servers=(), account_sections=sections)
    account = config.find_account("A@X.ORG")
    assert account is not None and account.section == "a@x.org" and account.oauth2_flow == "device"


def test_secrets_do_not_appear_in_reprs(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        SERVER + ACCOUNT + "client_secret = very-secret-value\naccess_token = gAAAA-secret-token\n",
    )
    account = config.find_account("user@example.com")
    assert isinstance(account, AccountConfig)
    assert account.client_secret == "very-secret-value"
    for text in (repr(account), repr(config), str(account)):
        assert "very-secret-value" not in text and "gAAAA-secret-token" not in text


# ------------------------------------------------------------------------------------------ cache store


def test_cache_store_supplies_the_cache_keys(tmp_path: Path) -> None:
    config_path = write(tmp_path, SERVER + ACCOUNT + "access_token = stale\ntoken_salt = stale\n")
    cache = write(
        tmp_path,
        "[user@example.com]\ntoken_salt = fresh-salt\naccess_token = fresh\nclient_id = not-a-cache-key\n"
        "[gone@example.com]\naccess_token = orphan\n",
        "tokens.cache",
    )
    config = load_config(config_path, cache)
    account = config.find_account("user@example.com")
    assert account is not None
    assert account.cached == CachedTokens(token_salt="fresh-salt", access_token="fresh")
    assert account.client_id == "the-client"
    assert config.cache_store == cache
    assert config.find_account("gone@example.com") is None
    text = "\n".join(config.warnings)
    assert "ignored because a cache store is used" in text
    assert "not a token cache key" in text and "no section in the configuration" in text


def test_cache_store_missing_file_and_catch_all(tmp_path: Path) -> None:
    config_path = write(
        tmp_path,
        "[emailproxy]\nallow_catch_all_accounts = True\n" + SERVER + "[@example.com]\nclient_id = c\n",
    )
    config = load_config(config_path, tmp_path / "absent.cache")
    account = config.find_account("new@example.com")
    assert account is not None and account.cached == CachedTokens()
    cache = write(tmp_path, "[new@example.com]\naccess_token = a\ntoken_salt = s\n", "tokens.cache")
    config = load_config(config_path, cache)
    account = config.find_account("new@example.com")
    assert account is not None
    assert account.section == "new@example.com" and account.client_id == "c"
    assert account.cached == CachedTokens(token_salt="s", access_token="a")


# ------------------------------------------------------------------------------------------ fixtures

PLACEHOLDERS = {
    "LOCAL_IMAP_PORT": "21993",
    "LOCAL_SMTP_PORT": "21587",
    "SERVER_PORT_IMAP": "10993",
    "SERVER_PORT_SMTP": "10587",
    "TOKEN_URL": "https://127.0.0.1:18443/tenant-1/oauth2/v2.0/token",
    "PERMISSION_URL": "https://127.0.0.1:18443/tenant-1/oauth2/v2.0/authorize",
    "REDIRECT_PORT": "18080",
}
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text(encoding="utf-8"))
FIXTURE_FILES = sorted(
    str(p.relative_to(FIXTURES)) for p in FIXTURES.glob("*/*") if p.suffix in (".config", ".cache")
)


def filled(tmp_path: Path, relative: str) -> Path:
    text = (FIXTURES / relative).read_text(encoding="utf-8")
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    target = tmp_path / relative.replace("/", "-")
    target.write_text(text, encoding="utf-8")
    return target


def load_fixture(tmp_path: Path, relative: str) -> Config:
    if relative.endswith(".cache"):
        return load_config(filled(tmp_path, "cache_store/before.config"), filled(tmp_path, relative))
    return load_config(filled(tmp_path, relative))


def test_every_fixture_file_is_covered() -> None:
    assert len(FIXTURE_FILES) == 18
    listed = {
        f for fixture in MANIFEST.values() if isinstance(fixture, dict) for f in fixture.get("files", [])
    }
    assert set(FIXTURE_FILES) <= listed


@pytest.mark.parametrize("relative", FIXTURE_FILES)
def test_reference_written_fixture_loads_with_its_cache(tmp_path: Path, relative: str) -> None:
    fixture, filename = relative.split("/")
    config = load_fixture(tmp_path, relative)
    assert config.warnings == ()
    assert {s.protocol for s in config.servers} >= {"IMAP"}
    imap = next(s for s in config.servers if s.protocol == "IMAP")
    assert (imap.local_port, imap.server_port, imap.local_address) == (21993, 10993, "127.0.0.1")

    raw = configparser.ConfigParser(interpolation=None)
    raw.read(config.cache_store or config.path, encoding="utf-8")
    for username, expected in MANIFEST[fixture]["accounts"].items():
        account = config.find_account(username)
        assert account is not None, username
        assert account.token_url == PLACEHOLDERS["TOKEN_URL"]
        assert account.client_id == "test-client"
        assert account.oauth2_flow == MANIFEST[fixture]["flow"].split(" ")[0]
        values = expected["per_file"].get(filename)
        if values is None:  # a file written before any login
            assert account.cached == CachedTokens(), username
            assert account.client_secret == expected["client_secret"]
            continue
        cached = account.cached
        assert cached.token_salt == values["token_salt"]
        assert cached.token_iterations == values["token_iterations"]
        expiry = values["access_token_expiry"]
        assert cached.access_token_expiry == (None if expiry is None else str(expiry))
        assert cached.last_activity == values["last_activity"]
        for name in ("access_token", "refresh_token", "client_secret_encrypted"):
            stored = getattr(cached, name)
            if name in values["encrypted_fields"]:
                assert stored is not None and stored.startswith("gAAAAA")
                assert stored == raw[account.section][name]
            else:
                assert stored is None


def test_fixture_tokens_decrypt_to_the_documented_plaintext(tmp_path: Path) -> None:
    config = load_fixture(tmp_path, "auth_code/after-exit.config")
    account = config.find_account("user@example.com")
    assert account is not None and account.cached.token_salt and account.cached.token_iterations
    key = hashlib.pbkdf2_hmac(
        "sha256",
        b"local-proxy-password",
        base64.b64decode(account.cached.token_salt),
        int(account.cached.token_iterations),
        32,
    )
    fernet = Fernet(base64.urlsafe_b64encode(key))
    assert account.cached.access_token is not None and account.cached.refresh_token is not None
    assert fernet.decrypt(account.cached.access_token.encode()) == b"at-FIXTURE-auth_code-access"
    assert fernet.decrypt(account.cached.refresh_token.encode()) == b"rt-FIXTURE-auth_code-refresh"


def test_fixture_with_placeholders_left_in_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(FIXTURES / "ropc" / "before.config")
    assert info.value.section == "IMAP-LOCAL_IMAP_PORT"


# ------------------------------------------------------------------------------------------ sample file


def test_sample_config_loads_with_only_placeholder_warnings() -> None:
    config = load_config(REPO / "emailproxy.config")
    assert {s.section for s in config.servers} == {
        "IMAP-1993",
        "POP-1995",
        "SMTP-1587",
        "IMAP-2993",
        "SMTP-2465",
    }
    assert all(s.local_address == "127.0.0.1" for s in config.servers)
    assert config.warnings and all("placeholder" in w for w in config.warnings)
    ccg = config.find_account("alerts@example.com")
    assert ccg is not None and ccg.oauth2_flow == "client_credentials"
    assert ccg.oauth2_scope == "https://outlook.office365.com/.default"
    delegated = config.find_account("your.name@example.com")
    assert delegated is not None and delegated.oauth2_flow == "authorization_code" and delegated.use_pkce
    assert delegated.oauth2_scope is not None and "offline_access" in delegated.oauth2_scope
    gmail = config.find_account("your.name@gmail.com")
    assert gmail is not None and gmail.oauth2_scope == "https://mail.google.com/"
