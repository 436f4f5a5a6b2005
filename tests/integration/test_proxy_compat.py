"""Drop-in compatibility: config files and token caches written by the reference proxy work unchanged.

Every fixture in /work/shared/fixtures/reference-written/ (see its MANIFEST.md) is filled in for this test
world, the plaintext tokens it holds are registered with the identity provider, and real IMAP logins go
through the proxy to Dovecot. A file written by this proxy is then read back with the reference's scheme
(PBKDF2-HMAC-SHA256 + Fernet), using only ``cryptography``.
"""

from __future__ import annotations

import base64
import configparser
import imaplib
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from tests.integration.conftest import World
from tests.integration.proxy import Proxy, allocate_ports, launch
from tests.integration.world.ports import LOOPBACK, free_port

FIXTURES = Path("/work/shared/fixtures/reference-written")
CLIENT_ID = "test-client"
CLIENT_SECRET = "test-secret"  # the fixtures' client secret
FIXTURE_EXPIRY = 4102444800  # 2100-01-01: the fixtures' access tokens expire about then
PAST_EXPIRY = "1700000000"  # 2023-11-14: an access_token_expiry that is long gone
CURRENT_ITERATIONS = 1_200_000
LEGACY_ITERATIONS = 100_000
TOKEN_KEYS = (
    "token_salt",
    "token_iterations",
    "access_token",
    "access_token_expiry",
    "refresh_token",
    "client_secret_encrypted",
    "last_activity",
)
_TOKEN_LINE = re.compile(r"^(" + "|".join(TOKEN_KEYS) + r")\s*[=:]", re.IGNORECASE)
_SECTION_LINE = re.compile(r"^\[(?P<name>[^]]+)\]\s*$")
INCORRECT = "Email OAuth 2.0 Proxy: Login failed - the password for account {user} is incorrect"


@dataclass(frozen=True)
class Account:
    user: str
    password: str
    access_token: str
    refresh_token: str | None


@dataclass(frozen=True)
class Case:
    """One reference fixture: the config file to start from, the optional cache file, its accounts."""

    name: str
    config_file: str
    cache_file: str | None
    accounts: tuple[Account, ...]


def _account(user: str, password: str, prefix: str, refresh: bool = True) -> Account:
    return Account(
        user,
        password,
        f"at-FIXTURE-{prefix}-access",
        f"rt-FIXTURE-{prefix}-refresh" if refresh else None,
    )


CASES = {
    "auth_code": Case(
        "auth_code",
        "after-exit.config",
        None,
        (_account("user@example.com", "local-proxy-password", "auth_code"),),
    ),
    "ccg_encrypted_secret": Case(
        "ccg_encrypted_secret",
        "after-exit.config",
        None,
        (_account("ccg@example.com", "local-proxy-password", "ccg_encrypted_secret", refresh=False),),
    ),
    "catch_all": Case(
        "catch_all",
        "after-exit.config",
        None,
        (
            _account("alice@example.com", "alice-local-password", "catch_all-alice"),
            _account("bob@example.com", "bob-local-password", "catch_all-bob"),
        ),
    ),
    "ropc": Case("ropc", "after-exit.config", None, (_account("ropc@example.com", "ropc-pass", "ropc"),)),
    "legacy_iterations": Case(
        "legacy_iterations",
        "before.config",
        None,
        (_account("legacy@example.com", "local-proxy-password", "legacy_iterations"),),
    ),
    "cache_store": Case(
        "cache_store",
        "before.config",
        "after-exit.cache",
        (_account("user@example.com", "local-proxy-password", "cache_store"),),
    ),
}


# ------------------------------------------------------------------------------------------ file helpers


def fill_placeholders(text: str, world: World, ports: dict[str, int], redirect_port: int) -> str:
    """The fixture text for this world: placeholders replaced, upstream server addresses per section."""
    replacements = {
        "LOCAL_IMAP_PORT": str(ports["IMAP"]),
        "LOCAL_SMTP_PORT": str(ports["SMTP"]),
        "SERVER_PORT_IMAP": str(world.dovecot.ports.imaps),
        "SERVER_PORT_SMTP": str(world.postfix.ports.submission),
        "TOKEN_URL": world.idp.token_url(),
        "PERMISSION_URL": world.idp.authorize_url(),
        "REDIRECT_PORT": str(redirect_port),
    }
    for placeholder, value in replacements.items():
        text = text.replace(placeholder, value)
    lines = text.split("\n")
    section = ""
    for index, line in enumerate(lines):
        header = _SECTION_LINE.match(line)
        if header is not None:
            section = header.group("name")
            continue
        if line.strip().replace(" ", "") != "server_address=127.0.0.1":
            continue
        if section.startswith(("IMAP-", "POP-")):
            lines[index] = line.replace("127.0.0.1", world.dovecot.ports.host)
        elif section.startswith("SMTP-"):
            lines[index] = line.replace("127.0.0.1", LOOPBACK)  # Postfix listens on the loopback address
    return "\n".join(lines)


def set_option(text: str, section: str, key: str, value: str) -> str:
    """``text`` with the ``key = ...`` line of ``section`` given a new value (the line must exist)."""
    lines = text.split("\n")
    current = ""
    for index, line in enumerate(lines):
        header = _SECTION_LINE.match(line)
        if header is not None:
            current = header.group("name")
        elif current == section and re.match(rf"^{key}\s*[=:]", line):
            lines[index] = f"{key} = {value}"
            return "\n".join(lines)
    raise AssertionError(f"no {key} in [{section}]")


def section_lines(text: str, section: str) -> list[str]:
    """The non-blank lines of one section (header excluded), as written."""
    lines: list[str] = []
    current = ""
    for line in text.split("\n"):
        header = _SECTION_LINE.match(line)
        if header is not None:
            current = header.group("name")
        elif current == section and line.strip():
            lines.append(line)
    return lines


def non_token_lines(text: str) -> list[str]:
    """Every line that is not a token cache key line: comments, blank lines, settings, headers."""
    return [line for line in text.split("\n") if not _TOKEN_LINE.match(line)]


def parse(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(text)
    return parser


def derive_key(password: str, salt_b64: str, iterations: int) -> bytes:
    kdf = PBKDF2HMAC(
        algorithm=hashes.SHA256(), length=32, salt=base64.b64decode(salt_b64), iterations=iterations
    )
    return base64.urlsafe_b64encode(kdf.derive(password.encode("utf-8")))


def decrypt(token: str, key: bytes) -> str:
    return Fernet(key).decrypt(token.encode("ascii")).decode("utf-8")


# ------------------------------------------------------------------------------------------ proxy helpers


@dataclass
class Started:
    proxy: Proxy
    config: Path
    cache: Path | None
    port: int


def register_fixture_tokens(world: World, case: Case) -> None:
    """Make the fixture's plaintext access tokens valid upstream until about 2100."""
    lifetime = FIXTURE_EXPIRY - time.time()
    for account in case.accounts:
        world.idp.issue_token(account.user, token=account.access_token, expires_in=lifetime)


def start_fixture(
    world: World,
    tmp_path: Path,
    proxies: list[Proxy],
    case: Case,
    config_text: str | None = None,
    cache_text: str | None = None,
) -> Started:
    """Fill in the fixture's files in ``tmp_path`` and start a proxy on them."""
    ports = allocate_ports("IMAP", "SMTP")
    redirect_port = free_port()
    raw = config_text if config_text is not None else (FIXTURES / case.name / case.config_file).read_text()
    text = fill_placeholders(raw, world, ports, redirect_port)
    listening = {name: port for name, port in ports.items() if f"[{name}-{port}]" in text}
    args: list[str] = []
    cache: Path | None = None
    if case.cache_file is not None:
        cache = tmp_path / "tokens.cache"
        cached = (
            cache_text if cache_text is not None else (FIXTURES / case.name / case.cache_file).read_text()
        )
        cache.write_text(fill_placeholders(cached, world, ports, redirect_port))
        args = ["--cache-store", str(cache)]
    proxy = launch(world.ca_path, tmp_path, {}, listening, args=args, config_text=text)
    proxies.append(proxy)
    return Started(proxy, proxy.config_path, cache, ports["IMAP"])


def imap_login(port: int, user: str, password: str) -> None:
    """LOGIN through the proxy and SELECT INBOX (which only works when Dovecot accepted the token)."""
    with imaplib.IMAP4("127.0.0.1", port, timeout=30) as imap:
        assert imap.login(user, password)[0] == "OK"
        assert imap.select("INBOX")[0] == "OK"


def imap_login_refused(port: int, user: str, password: str) -> bytes:
    """LOGIN that the proxy refuses; returns the text of the tagged NO (after the tag and ``NO``)."""
    with imaplib.IMAP4("127.0.0.1", port, timeout=30) as imap:
        with pytest.raises(imaplib.IMAP4.error) as refused:
            imap.login(user, password)
        message = refused.value.args[0]
        assert isinstance(message, bytes)
        return message


def checks_for(world: World, user: str) -> list[tuple[str, bool]]:
    """(token, accepted) of every token check Dovecot made for ``user``."""
    return [
        (check.token, check.ok) for check in world.idp.check_log if check.user.casefold() == user.casefold()
    ]


def cache_text_of(started: Started) -> str:
    return (started.cache if started.cache is not None else started.config).read_text()


def wait_for(predicate_text: str, path: Path, timeout: float = 10.0) -> str:
    """Poll ``path`` until it contains ``predicate_text``; return its text."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text()
        if predicate_text in text or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def auth_code_with_comments() -> str:
    """auth_code's hand-written before.config (comments, mixed-case keys, ``:`` delimiter) with the
    reference's cached tokens from after-exit.config appended to the account section."""
    before = (FIXTURES / "auth_code" / "before.config").read_text()
    after = (FIXTURES / "auth_code" / "after-exit.config").read_text()
    tokens = [line for line in section_lines(after, "user@example.com") if _TOKEN_LINE.match(line)]
    assert len(tokens) == 6
    assert before.endswith("client_secret = test-secret\n")  # the account section is the last one
    return before + "\n".join(tokens) + "\n"


# ------------------------------------------------------------------------------------------ the tests


LOGIN_CASES = [
    pytest.param(case, account, id=f"{case.name}-{account.user.partition('@')[0]}")
    for case in CASES.values()
    for account in case.accounts
]


@pytest.mark.parametrize(("case", "account"), LOGIN_CASES)
def test_reference_cache_logs_in_without_token_requests(
    world: World, tmp_path: Path, proxies: list[Proxy], case: Case, account: Account
) -> None:
    register_fixture_tokens(world, case)
    started = start_fixture(world, tmp_path, proxies, case)

    imap_login(started.port, account.user, account.password)

    assert world.idp.token_requests() == [], "a cached, valid token must not cause any token request"
    checks = checks_for(world, account.user)
    assert checks, f"Dovecot never checked a token for {account.user}"
    assert checks == [(account.access_token, True)] * len(checks)


@pytest.mark.parametrize("name", ["auth_code", "ccg_encrypted_secret"])
def test_wrong_password_is_refused_and_tokens_stay(
    world: World, tmp_path: Path, proxies: list[Proxy], name: str
) -> None:
    """auth_code has delete_account_token_on_password_error = False; client credentials accounts are
    always treated that way. Both refuse with the reference's wording and keep the file as it was."""
    case = CASES[name]
    account = case.accounts[0]
    register_fixture_tokens(world, case)
    started = start_fixture(world, tmp_path, proxies, case)
    before = started.config.read_text()

    message = imap_login_refused(started.port, account.user, "not-the-local-password")

    assert message == b"LOGIN " + INCORRECT.format(user=account.user).encode()
    assert started.config.read_text() == before
    assert world.idp.token_requests() == []
    assert checks_for(world, account.user) == []
    # the right password still opens the untouched tokens
    imap_login(started.port, account.user, account.password)
    assert world.idp.token_requests() == []
    assert started.config.read_text() == before


REFRESH_CASES = {
    "auth_code": ("auth_code", "user@example.com"),
    "catch_all": ("catch_all", "alice@example.com"),
    "ropc": ("ropc", "ropc@example.com"),
    "cache_store": ("cache_store", "user@example.com"),
}


def expired_fixture(world: World, name: str) -> tuple[Case, Account, str | None, str | None]:
    """The case, its account and the (config, cache) texts with the access token marked expired;
    the fixture refresh token is registered with the identity provider, the old access token is not."""
    case = CASES[name]
    account = next(a for a in case.accounts if a.user == REFRESH_CASES[name][1])
    assert account.refresh_token is not None
    world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
    # the refresh token is registered together with a stand-in access token that has already expired
    world.idp.issue_token(
        account.user,
        token=f"at-expired-stand-in-{name}",
        expires_in=-1,
        refresh_token=account.refresh_token,
        client_id=CLIENT_ID,
    )
    config_text: str | None = None
    cache_text: str | None = None
    if name == "auth_code":
        config_text = set_option(auth_code_with_comments(), account.user, "access_token_expiry", PAST_EXPIRY)
    elif case.cache_file is not None:
        cache = (FIXTURES / case.name / case.cache_file).read_text()
        cache_text = set_option(cache, account.user, "access_token_expiry", PAST_EXPIRY)
    else:
        config = (FIXTURES / case.name / case.config_file).read_text()
        config_text = set_option(config, account.user, "access_token_expiry", PAST_EXPIRY)
    return case, account, config_text, cache_text


@pytest.mark.parametrize("name", list(REFRESH_CASES))
def test_expired_access_token_is_refreshed_with_the_fixture_refresh_token(
    world: World, tmp_path: Path, proxies: list[Proxy], name: str
) -> None:
    case, account, config_text, cache_text = expired_fixture(world, name)
    started = start_fixture(world, tmp_path, proxies, case, config_text, cache_text)
    config_before = started.config.read_text()
    cache_before = cache_text_of(started)
    assert f"access_token_expiry = {PAST_EXPIRY}" in cache_before

    started_at = time.time()
    imap_login(started.port, account.user, account.password)

    requests = world.idp.token_requests()
    assert [r.grant_type for r in requests] == ["refresh_token"]
    assert requests[0].form["refresh_token"] == account.refresh_token
    assert requests[0].form["client_id"] == CLIENT_ID
    issued = world.idp.issued
    assert len(issued) == 1
    assert checks_for(world, account.user) == [(issued[0].access_token, True)]

    deadline = time.monotonic() + 10
    while PAST_EXPIRY in (cache_after := cache_text_of(started)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert non_token_lines(cache_after) == non_token_lines(cache_before), "only token key lines may change"
    values = parse(cache_after)[account.user]
    expiry = int(values["access_token_expiry"])
    assert expiry != int(PAST_EXPIRY)
    assert started_at + 3000 < expiry < time.time() + 3700  # the IdP's tokens last 3600 s
    key = derive_key(account.password, values["token_salt"], int(values["token_iterations"]))
    assert decrypt(values["access_token"], key) == issued[0].access_token
    assert decrypt(values["refresh_token"], key) == account.refresh_token
    if started.cache is not None:
        assert started.config.read_text() == config_before, "with --cache-store the config is not written"
    if name == "auth_code":
        comments = [line for line in cache_after.split("\n") if line.startswith(("#", ";"))]
        assert len(comments) == 5, "the hand-written comments survive the token save"


def test_concurrent_logins_at_expiry_share_one_refresh(
    world: World, tmp_path: Path, proxies: list[Proxy]
) -> None:
    case, account, config_text, cache_text = expired_fixture(world, "auth_code")
    started = start_fixture(world, tmp_path, proxies, case, config_text, cache_text)
    clients = [imaplib.IMAP4("127.0.0.1", started.port, timeout=60) for _ in range(10)]
    barrier = threading.Barrier(len(clients))
    results: list[str] = []
    lock = threading.Lock()

    def log_in(imap: imaplib.IMAP4) -> None:
        barrier.wait(timeout=30)
        outcome: str
        try:
            outcome = imap.login(account.user, account.password)[0]
        except imaplib.IMAP4.error as error:
            outcome = f"refused: {error}"
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=log_in, args=(imap,)) for imap in clients]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        for imap in clients:
            try:
                imap.logout()
            except (OSError, imaplib.IMAP4.error):
                imap.shutdown()
    assert results == ["OK"] * 10
    requests = world.idp.token_requests()
    assert [r.grant_type for r in requests] == ["refresh_token"]
    assert requests[0].form["refresh_token"] == account.refresh_token
    issued = world.idp.issued[0].access_token
    assert checks_for(world, account.user) == [(issued, True)] * 10


def test_legacy_iterations_are_rotated_to_1200000(world: World, tmp_path: Path, proxies: list[Proxy]) -> None:
    case = CASES["legacy_iterations"]
    account = case.accounts[0]
    register_fixture_tokens(world, case)
    started = start_fixture(world, tmp_path, proxies, case)
    text_before = started.config.read_text()
    before = parse(text_before)[account.user]
    assert "token_iterations" not in before

    imap_login(started.port, account.user, account.password)

    assert world.idp.token_requests() == []
    assert checks_for(world, account.user) == [(account.access_token, True)]
    text = wait_for("token_iterations = 1200000", started.config)
    after = parse(text)[account.user]
    assert after["token_iterations"] == str(CURRENT_ITERATIONS)
    assert after["token_salt"] == before["token_salt"]
    assert after["access_token_expiry"] == before["access_token_expiry"]
    key = derive_key(account.password, after["token_salt"], CURRENT_ITERATIONS)
    assert decrypt(after["access_token"], key) == account.access_token
    assert decrypt(after["refresh_token"], key) == account.refresh_token
    legacy_key = derive_key(account.password, after["token_salt"], LEGACY_ITERATIONS)
    with pytest.raises(InvalidToken):
        decrypt(after["access_token"], legacy_key)
    assert non_token_lines(text) == non_token_lines(text_before), "only token key lines may change"


def test_cache_store_leaves_the_config_file_untouched(
    world: World, tmp_path: Path, proxies: list[Proxy]
) -> None:
    case = CASES["cache_store"]
    account = case.accounts[0]
    register_fixture_tokens(world, case)
    started = start_fixture(world, tmp_path, proxies, case)
    assert started.cache is not None
    config_before = started.config.read_bytes()

    imap_login(started.port, account.user, account.password)
    assert world.idp.token_requests() == []
    assert checks_for(world, account.user) == [(account.access_token, True)]
    assert started.proxy.stop() == 0, started.proxy.output()

    assert started.config.read_bytes() == config_before
    cache = parse(started.cache.read_text())
    assert cache.sections() == [account.user]
    values = cache[account.user]
    key = derive_key(account.password, values["token_salt"], int(values["token_iterations"]))
    assert decrypt(values["access_token"], key) == account.access_token
    assert decrypt(values["refresh_token"], key) == account.refresh_token


def test_file_written_by_the_proxy_uses_the_reference_scheme(
    world: World, tmp_path: Path, proxies: list[Proxy]
) -> None:
    user = world.new_user("compat")
    password = "local-password-for-the-reference-scheme"
    world.idp.register_client("compat-ccg", "compat-ccg-secret")
    ports = allocate_ports("IMAP")
    sections = {
        f"IMAP-{ports['IMAP']}": {
            "server_address": world.dovecot.ports.host,
            "server_port": str(world.dovecot.ports.imaps),
        },
        user: {
            "token_url": world.idp.token_url(),
            "oauth2_scope": "https://outlook.office365.com/.default",
            "oauth2_flow": "client_credentials",
            "client_id": "compat-ccg",
            "client_secret": "compat-ccg-secret",
        },
    }
    proxy = launch(world.ca_path, tmp_path, sections, ports)
    proxies.append(proxy)

    imap_login(ports["IMAP"], user, password)

    assert [r.grant_type for r in world.idp.token_requests()] == ["client_credentials"]
    issued = world.idp.issued
    assert len(issued) == 1
    text = wait_for("access_token", proxy.config_path)
    values = parse(text)[user]
    assert values["token_iterations"] == str(CURRENT_ITERATIONS)
    assert len(base64.b64decode(values["token_salt"], validate=True)) == 16
    key = derive_key(password, values["token_salt"], CURRENT_ITERATIONS)
    assert decrypt(values["access_token"], key) == issued[0].access_token
    assert abs(int(values["access_token_expiry"]) - (issued[0].expires_at)) < 60


def test_ropc_login_and_wrong_password_keep_tokens(
    world: World, tmp_path: Path, proxies: list[Proxy]
) -> None:
    user = world.new_user("ropc")
    world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
    world.idp.register_user(user, "real-pass")
    ports = allocate_ports("IMAP")
    sections = {
        "emailproxy": {"delete_account_token_on_password_error": "False"},
        f"IMAP-{ports['IMAP']}": {
            "server_address": world.dovecot.ports.host,
            "server_port": str(world.dovecot.ports.imaps),
        },
        user: {
            "token_url": world.idp.token_url(),
            "oauth2_scope": "https://outlook.office365.com/IMAP.AccessAsUser.All offline_access",
            "oauth2_flow": "password",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
    }
    proxy = launch(world.ca_path, tmp_path, sections, ports)
    proxies.append(proxy)

    imap_login(ports["IMAP"], user, "real-pass")
    requests = world.idp.token_requests()
    assert [r.grant_type for r in requests] == ["password"]
    assert requests[0].form["username"] == user
    assert requests[0].form["password"] == "real-pass"
    issued = world.idp.issued[0]
    assert checks_for(world, user) == [(issued.access_token, True)]
    text = wait_for("refresh_token", proxy.config_path)
    saved = section_lines(text, user)
    assert any(line.startswith("refresh_token") for line in saved)

    message = imap_login_refused(ports["IMAP"], user, "wrong-pass")
    assert message == b"LOGIN " + INCORRECT.format(user=user).encode()
    assert section_lines(proxy.config_path.read_text(), user) == saved
    assert len(world.idp.token_requests()) == 1, "a wrong local password must not reach the IdP"

    imap_login(ports["IMAP"], user, "real-pass")
    assert len(world.idp.token_requests()) == 1
    assert checks_for(world, user) == [(issued.access_token, True)] * 2
    values = parse(proxy.config_path.read_text())[user]
    key = derive_key("real-pass", values["token_salt"], int(values["token_iterations"]))
    assert decrypt(values["access_token"], key) == issued.access_token
    assert issued.refresh_token is not None
    assert decrypt(values["refresh_token"], key) == issued.refresh_token
