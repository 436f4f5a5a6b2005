"""TokenManager, the flows' request forms and TokenEndpoint, without sockets (fake endpoint, store, clock)."""

from __future__ import annotations

import asyncio
import base64
import configparser
import dataclasses
import functools
import json
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import pytest
import requests
from cryptography.fernet import Fernet, InvalidToken
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict

from emailproxy import __version__
from emailproxy.config import AccountConfig, CachedTokens, Config, GlobalOptions
from emailproxy.oauth import flows
from emailproxy.oauth.crypto import ITERATIONS, LEGACY_ITERATIONS, KeyCache, derive_key, fernet_key
from emailproxy.oauth.endpoint import TokenEndpoint, TokenEndpointError, TokenNetworkError
from emailproxy.oauth.tokens import TOKEN_EXPIRY_MARGIN, TokenManager
from emailproxy.protocols.events import TokenFailure, TokenOk
from emailproxy.secret import Secret

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "reference-written"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text(encoding="utf-8"))

NOW = 1_800_000_000.0
PASSWORD = "local-proxy-password"
SALT = base64.b64encode(bytes(range(16))).decode()
TOKEN_URL = "https://idp.invalid/token"


# ---------------------------------------------------------------------------------- fakes


@functools.cache
def _pbkdf2(password: str, salt: bytes, iterations: int) -> bytes:
    return derive_key(password, salt, iterations)


class CountingDerive:
    """Counts KeyCache misses; the real PBKDF2 result is memoised across tests to keep the suite fast."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, password: str, salt: bytes, iterations: int) -> bytes:
        with self._lock:
            self.calls += 1
        return _pbkdf2(password, salt, iterations)


def fernet(password: str = PASSWORD, salt: str = SALT, iterations: int = ITERATIONS) -> Fernet:
    return Fernet(fernet_key(_pbkdf2(password, base64.b64decode(salt), iterations)))


def enc(plaintext: str, password: str = PASSWORD, salt: str = SALT, iterations: int = ITERATIONS) -> str:
    return fernet(password, salt, iterations).encrypt(plaintext.encode()).decode()


def dec(token: str | None, password: str = PASSWORD, salt: str = SALT, iterations: int = ITERATIONS) -> str:
    assert token is not None
    return fernet(password, salt, iterations).decrypt(token.encode()).decode()


class FakeEndpoint:
    """Records every token request; answers from a list of dicts or exceptions."""

    def __init__(self, *responses: dict[str, Any] | Exception, delay: float = 0.0) -> None:
        self.responses = list(responses)
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.delay = delay

    def post(self, url: str, form: Mapping[str, str]) -> dict[str, Any]:
        self.requests.append((url, dict(form)))
        if self.delay:
            time.sleep(self.delay)
        if not self.responses:
            raise AssertionError("unexpected token request")
        response = self.responses.pop(0)
        if isinstance(response, Exception):
            raise response
        return response


class FakeStore:
    def __init__(self, fail: bool = False) -> None:
        self.saves: list[tuple[str, dict[str, str | None]]] = []
        self.fail = fail

    def save(self, section: str, changes: Mapping[str, str | None]) -> None:
        self.saves.append((section, dict(changes)))
        if self.fail:
            raise OSError(30, "Read-only file system")


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class FakeConfig:
    options: GlobalOptions
    accounts: dict[str, AccountConfig]

    def find_account(self, username: str) -> AccountConfig | None:
        if username in self.accounts:
            return dataclasses.replace(self.accounts[username], username=username)
        for name, account in self.accounts.items():
            if name.lower() == username.lower():
                return dataclasses.replace(account, username=username)
        return None


def account(username: str = "user@example.com", **kwargs: Any) -> AccountConfig:
    cached = CachedTokens(**{k: kwargs.pop(k) for k in list(kwargs) if k in CachedTokens.__slots__})
    settings: dict[str, Any] = {
        "token_url": TOKEN_URL,
        "permission_url": "https://idp.invalid/authorize",
        "oauth2_scope": "IMAP.AccessAsUser.All offline_access",
        "client_id": "client-1",
        "client_secret": "secret-1",
        "redirect_uri": "http://localhost:8080/",
        "oauth2_flow": "authorization_code",
    }
    settings.update(kwargs)
    return AccountConfig(
        username=username, section=username, matched_section=username, cached=cached, **settings
    )


def ccg_account(username: str = "ccg@example.com", **kwargs: Any) -> AccountConfig:
    defaults: dict[str, Any] = {
        "permission_url": None,
        "oauth2_flow": "client_credentials",
        "oauth2_scope": "https://outlook.office365.com/.default",
        "redirect_uri": None,
    }
    defaults.update(kwargs)
    return account(username, **defaults)


def ropc_account(username: str = "ropc@example.com", **kwargs: Any) -> AccountConfig:
    defaults: dict[str, Any] = {"permission_url": None, "oauth2_flow": "password", "redirect_uri": None}
    defaults.update(kwargs)
    return account(username, **defaults)


def cached(
    access: str | None = "at-old", refresh: str | None = "rt-old", expiry: float = NOW + 3600
) -> dict[str, Any]:
    values: dict[str, Any] = {"token_salt": SALT, "token_iterations": str(ITERATIONS)}
    if access is not None:
        values["access_token"] = enc(access)
        values["access_token_expiry"] = str(int(expiry))
    if refresh is not None:
        values["refresh_token"] = enc(refresh)
    return values


@dataclasses.dataclass
class World:
    manager: TokenManager
    endpoint: FakeEndpoint
    store: FakeStore
    clock: FakeClock
    derive: CountingDerive
    config: FakeConfig

    def login(self, username: str, password: str = PASSWORD):
        return asyncio.run(self.manager.get_token(username, Secret(password)))


def world(
    *accounts: AccountConfig, responses: tuple[Any, ...] = (), store_fails: bool = False, **options: bool
) -> World:
    config = FakeConfig(GlobalOptions(**options), {a.username: a for a in accounts})
    endpoint = FakeEndpoint(*responses)
    store = FakeStore(fail=store_fails)
    clock = FakeClock()
    derive = CountingDerive()
    manager = TokenManager(cast(Config, config), store, endpoint, clock, key_cache=KeyCache(derive=derive))
    return World(manager, endpoint, store, clock, derive, config)


def ok_token(result: Any) -> str:
    assert isinstance(result, TokenOk), result
    return result.access_token.reveal()


# ---------------------------------------------------------------------------------- cached tokens


def test_cached_token_login_makes_no_requests():
    w = world(account(**cached()))
    result = w.login("user@example.com")
    assert ok_token(result) == "at-old"
    assert result.username == "user@example.com"
    assert w.endpoint.requests == [] and w.store.saves == []


def test_repeat_login_hits_the_key_cache():
    w = world(account(**cached()))

    async def twice() -> tuple[Any, int, Any]:
        first = await w.manager.get_token("user@example.com", Secret(PASSWORD))
        misses = w.derive.calls
        second = await w.manager.get_token("User@Example.com", Secret(PASSWORD))
        return first, misses, second

    first, misses, second = asyncio.run(twice())
    assert ok_token(first) == ok_token(second) == "at-old"
    assert misses == 1
    assert w.derive.calls == 1  # the second login derived nothing
    assert second.username == "User@Example.com"


def test_expiry_margin_boundary():
    w = world(account(**cached(expiry=NOW + TOKEN_EXPIRY_MARGIN)))
    assert ok_token(w.login("user@example.com")) == "at-old"
    assert w.endpoint.requests == []
    w = world(
        account(**cached(expiry=NOW + TOKEN_EXPIRY_MARGIN - 1)),
        responses=({"access_token": "at-new", "expires_in": 3600},),
    )
    assert ok_token(w.login("user@example.com")) == "at-new"
    assert len(w.endpoint.requests) == 1


FIXTURE_LOGINS = [
    ("auth_code", "after-exit.config", "user@example.com", None),
    ("ccg_encrypted_secret", "after-exit.config", "ccg@example.com", None),
    ("catch_all", "after-exit.config", "alice@example.com", "@example.com"),
    ("catch_all", "after-exit.config", "bob@example.com", "@example.com"),
    ("ropc", "after-exit.config", "ropc@example.com", None),
    ("cache_store", "after-exit.cache", "user@example.com", None),
    ("legacy_iterations", "after-login.config", "legacy@example.com", None),
]


def fixture_account(fixture: str, file_name: str, username: str, domain: str | None) -> AccountConfig:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(FIXTURES / fixture / file_name, encoding="utf-8")
    options: dict[str, str] = {}
    if fixture == "cache_store":  # settings from the config file, cache keys from the cache store
        config = configparser.ConfigParser(interpolation=None)
        config.read(FIXTURES / fixture / "before.config", encoding="utf-8")
        options.update(config[username])
    if domain is not None:
        options.update(parser[domain])
    options.update(parser[username])
    cache = CachedTokens(**{k: options.get(k) for k in CachedTokens.__slots__})
    permission_url = options.get("permission_url")
    flow = options.get("oauth2_flow") or ("authorization_code" if permission_url else None)
    return AccountConfig(
        username=username,
        section=username,
        matched_section=username,
        token_url=options.get("token_url"),
        permission_url=permission_url,
        oauth2_scope=options.get("oauth2_scope"),
        oauth2_flow=flow,
        redirect_uri=options.get("redirect_uri"),
        client_id=options.get("client_id"),
        client_secret=options.get("client_secret"),
        cached=cache,
    )


@pytest.mark.parametrize(
    "fixture,file_name,username,domain", FIXTURE_LOGINS, ids=[f"{f[0]}:{f[2]}" for f in FIXTURE_LOGINS]
)
def test_reference_written_files_log_in_without_requests(fixture, file_name, username, domain):
    details = MANIFEST[fixture]["accounts"][username]
    acct = fixture_account(fixture, file_name, username, domain)
    w = world(acct, allow_catch_all_accounts=domain is not None)
    assert ok_token(w.login(username, details["password"])) == details["access_token"]
    assert w.endpoint.requests == [] and w.store.saves == []
    # and a wrong password is refused without touching anything (reference default deletes for auth code)
    w2 = world(acct, delete_account_token_on_password_error=False)
    result = w2.login(username, details["password"] + "!")
    assert result == TokenFailure(
        f"Login failed - the password for account {username} is incorrect", local=True
    )
    assert w2.endpoint.requests == [] and w2.store.saves == []


def test_legacy_iterations_are_rotated():
    details = MANIFEST["legacy_iterations"]["accounts"]["legacy@example.com"]
    acct = fixture_account("legacy_iterations", "before.config", "legacy@example.com", None)
    salt = acct.cached.token_salt
    assert salt is not None and acct.cached.token_iterations is None
    w = world(acct)
    assert ok_token(w.login("legacy@example.com", PASSWORD)) == details["access_token"]
    assert w.endpoint.requests == []
    assert len(w.store.saves) == 1
    section, changes = w.store.saves[0]
    assert section == "legacy@example.com"
    assert list(changes) == ["token_iterations", "access_token", "refresh_token"]  # salt and expiry kept
    assert changes["token_iterations"] == "1200000"
    current, legacy = fernet(PASSWORD, salt, ITERATIONS), fernet(PASSWORD, salt, LEGACY_ITERATIONS)
    for name, plaintext in (
        ("access_token", details["access_token"]),
        ("refresh_token", details["refresh_token"]),
    ):
        token = changes[name]
        assert token is not None
        assert current.decrypt(token.encode()).decode() == plaintext
        assert current.extract_timestamp(token.encode()) == 1690000000  # rotation keeps the Fernet time
        with pytest.raises(InvalidToken):
            legacy.decrypt(token.encode())
    # the next login uses the rotated values and saves nothing more
    assert ok_token(w.login("legacy@example.com", PASSWORD)) == details["access_token"]
    assert len(w.store.saves) == 1


# ---------------------------------------------------------------------------------- wrong password


def test_wrong_password_kept_tokens_when_deletion_is_off():
    w = world(account(**cached()), delete_account_token_on_password_error=False)
    result = w.login("user@example.com", "nope")
    assert result == TokenFailure(
        "Login failed - the password for account user@example.com is incorrect", local=True
    )
    assert w.store.saves == [] and w.endpoint.requests == []
    assert ok_token(w.login("user@example.com")) == "at-old"  # the right password still works


def test_wrong_password_deletes_tokens_of_interactive_account():
    w = world(account(**cached()))
    result = w.login("user@example.com", "nope")
    assert isinstance(result, TokenFailure)
    assert "interactive authorisation is needed for this account" in result.message
    assert result.message.startswith("Login failed for account user@example.com: ")
    assert w.store.saves == [
        (
            "user@example.com",
            dict.fromkeys(
                ["token_salt", "token_iterations", "access_token", "access_token_expiry", "refresh_token"]
            ),
        )
    ]
    assert w.endpoint.requests == []
    # the tokens are gone in memory too: even the old password now needs an authorisation
    assert isinstance(w.login("user@example.com"), TokenFailure)


def test_wrong_password_with_ropc_deletes_and_runs_the_password_grant():
    w = world(
        ropc_account(**cached()),
        responses=({"access_token": "at-new", "refresh_token": "rt-new", "expires_in": 3600},),
    )
    assert ok_token(w.login("ropc@example.com", "new-password")) == "at-new"
    assert [form["grant_type"] for _, form in w.endpoint.requests] == ["password"]
    assert w.endpoint.requests[0][1]["password"] == "new-password"
    assert len(w.store.saves) == 2
    new = w.store.saves[1][1]
    assert new["token_salt"] not in (None, SALT)
    assert dec(new["access_token"], "new-password", new["token_salt"]) == "at-new"


@pytest.mark.parametrize("flow", ["client_credentials", "service_account"])
def test_wrong_password_never_deletes_for_app_only_accounts(flow):
    w = world(ccg_account(oauth2_flow=flow, **cached(refresh=None)))
    result = w.login("ccg@example.com", "nope")
    assert result == TokenFailure(
        "Login failed - the password for account ccg@example.com is incorrect", local=True
    )
    assert w.store.saves == [] and w.endpoint.requests == []


def test_undecryptable_client_secret_is_always_a_wrong_password():
    values = cached()
    values["client_secret_encrypted"] = enc("secret-1")
    w = world(ropc_account(client_secret=None, **values))  # deletion on, and ROPC would otherwise re-run
    result = w.login("ropc@example.com", "nope")
    assert result == TokenFailure(
        "Login failed - the password for account ropc@example.com is incorrect", local=True
    )
    assert w.store.saves == [] and w.endpoint.requests == []


# ---------------------------------------------------------------------------------- refresh


def test_ten_concurrent_logins_share_one_refresh():
    w = world(account(**cached(expiry=NOW - 10)))
    w.endpoint.responses = [{"access_token": "at-new", "expires_in": "1800"}]
    w.endpoint.delay = 0.05

    async def many() -> list[Any]:
        return await asyncio.gather(
            *(w.manager.get_token("user@example.com", Secret(PASSWORD)) for _ in range(10))
        )

    results = asyncio.run(many())
    assert [ok_token(r) for r in results] == ["at-new"] * 10
    assert len(w.endpoint.requests) == 1
    url, form = w.endpoint.requests[0]
    assert url == TOKEN_URL
    assert form == {
        "client_id": "client-1",
        "client_secret": "secret-1",
        "refresh_token": "rt-old",
        "grant_type": "refresh_token",
    }
    assert len(w.store.saves) == 1
    changes = w.store.saves[0][1]
    assert list(changes) == ["token_salt", "token_iterations", "access_token", "access_token_expiry"]
    assert changes["access_token_expiry"] == str(int(NOW) + 1800)
    assert dec(changes["access_token"]) == "at-new"
    assert w.derive.calls == 1


def test_refresh_saves_a_new_refresh_token_and_defaults_lifetime():
    w = world(
        account(**cached(expiry=NOW - 10)), responses=({"access_token": "at-new", "refresh_token": "rt-new"},)
    )
    assert ok_token(w.login("user@example.com")) == "at-new"
    changes = w.store.saves[0][1]
    assert changes["access_token_expiry"] == str(int(NOW) + 3600)
    assert dec(changes["refresh_token"]) == "rt-new"
    w.clock.now += 3600
    w.endpoint.responses = [{"access_token": "at-3", "expires_in": 3600}]
    assert ok_token(w.login("user@example.com")) == "at-3"
    assert w.endpoint.requests[-1][1]["refresh_token"] == "rt-new"


def test_refresh_without_refresh_token_reruns_the_flow():
    w = world(ccg_account(**cached(refresh=None, expiry=NOW - 10)), responses=({"access_token": "at-new"},))
    assert ok_token(w.login("ccg@example.com")) == "at-new"
    assert w.endpoint.requests[0][1]["grant_type"] == "client_credentials"
    # wrong password with an expired token is still refused before any request
    w = world(ccg_account(**cached(refresh=None, expiry=NOW - 10)))
    assert isinstance(w.login("ccg@example.com", "nope"), TokenFailure)
    assert w.endpoint.requests == []


def test_invalid_grant_drops_tokens_and_runs_the_flow():
    w = world(
        ropc_account(**cached(expiry=NOW - 10)),
        responses=(
            TokenEndpointError(400, "invalid_grant", "AADSTS70008: expired"),
            {"access_token": "at-new", "refresh_token": "rt-new", "expires_in": 3600},
        ),
    )
    assert ok_token(w.login("ropc@example.com")) == "at-new"
    assert [form["grant_type"] for _, form in w.endpoint.requests] == ["refresh_token", "password"]
    assert w.store.saves[0][1] == dict.fromkeys(["access_token", "access_token_expiry", "refresh_token"])
    assert dec(w.store.saves[1][1]["refresh_token"]) == "rt-new"


def test_invalid_grant_for_interactive_account_asks_for_authorisation():
    w = world(account(**cached(expiry=NOW - 10)), responses=(TokenEndpointError(400, "invalid_grant", None),))
    result = w.login("user@example.com")
    assert isinstance(result, TokenFailure) and "interactive authorisation" in result.message
    assert len(w.endpoint.requests) == 1
    assert w.store.saves == [
        ("user@example.com", dict.fromkeys(["access_token", "access_token_expiry", "refresh_token"]))
    ]


@pytest.mark.parametrize(
    "error",
    [
        TokenEndpointError(500, "http_500", "Internal Server Error"),
        TokenEndpointError(503, "temporarily_unavailable", "busy"),
        TokenNetworkError("could not connect to idp.invalid"),
    ],
    ids=["http-500", "oauth-503", "network"],
)
def test_server_and_network_errors_keep_the_cache(error):
    w = world(account(**cached(expiry=NOW - 10)), responses=(error,))
    result = w.login("user@example.com")
    assert isinstance(result, TokenFailure)
    if isinstance(error, TokenNetworkError) or not error.is_oauth_error:
        assert result.message.startswith(
            "Login failed for account user@example.com - please check your internet connection and retry ("
        )
    else:
        assert result.message == (
            "Login failed for account user@example.com: OAuth 2.0 authorisation error for account "
            "user@example.com: temporarily_unavailable; busy"
        )
    assert w.store.saves == []
    # the next attempt refreshes with the same refresh token
    w.endpoint.responses = [{"access_token": "at-new", "expires_in": 3600}]
    assert ok_token(w.login("user@example.com")) == "at-new"
    assert [form["refresh_token"] for _, form in w.endpoint.requests] == ["rt-old", "rt-old"]


def test_oauth_error_message_on_first_fetch():
    w = world(
        ccg_account(), responses=(TokenEndpointError(401, "invalid_client", "AADSTS7000215: bad secret"),)
    )
    assert w.login("ccg@example.com") == TokenFailure(
        "Login failed for account ccg@example.com: OAuth 2.0 authorisation error for account "
        "ccg@example.com: invalid_client; AADSTS7000215: bad secret"
    )
    assert w.store.saves == []


def test_response_without_access_token_is_a_failure():
    w = world(ccg_account(), responses=({"token_type": "Bearer"},))
    result = w.login("ccg@example.com")
    assert isinstance(result, TokenFailure) and "no access token" in result.message
    assert w.store.saves == []


# ---------------------------------------------------------------------------------- flows and saving


def test_ccg_encrypts_the_client_secret_on_first_use():
    w = world(
        ccg_account(client_secret="test-secret"),
        responses=({"access_token": "at-1", "expires_in": 3600},),
        encrypt_client_secret_on_first_use=True,
    )
    assert ok_token(w.login("ccg@example.com")) == "at-1"
    assert w.endpoint.requests[0][1] == {
        "client_id": "client-1",
        "client_secret": "test-secret",
        "scope": "https://outlook.office365.com/.default",
        "grant_type": "client_credentials",
    }
    section, changes = w.store.saves[0]
    assert section == "ccg@example.com"
    assert list(changes) == [
        "client_secret_encrypted",
        "client_secret",
        "token_salt",
        "token_iterations",
        "access_token",
        "access_token_expiry",
    ]
    assert changes["client_secret"] is None
    salt = changes["token_salt"]
    assert salt is not None and len(base64.b64decode(salt)) == 16
    assert dec(changes["client_secret_encrypted"], salt=salt) == "test-secret"
    assert dec(changes["access_token"], salt=salt) == "at-1"

    # later, the stale (frozen) config still shows the plaintext: the stored secret is used, not moved again
    w.clock.now += 7200
    w.endpoint.responses = [{"access_token": "at-2", "expires_in": 3600}]
    assert ok_token(w.login("ccg@example.com")) == "at-2"
    assert w.endpoint.requests[1][1]["client_secret"] == "test-secret"
    assert "client_secret" not in w.store.saves[1][1]

    # after a reload showing what was saved, the encrypted secret still works
    saved = {k: v for k, v in {**w.store.saves[0][1], **w.store.saves[1][1]}.items() if v is not None}
    w.manager.update_config(
        cast(
            Config,
            FakeConfig(w.config.options, {"ccg@example.com": ccg_account(client_secret=None, **saved)}),
        )
    )
    w.clock.now += 7200
    w.endpoint.responses = [{"access_token": "at-3", "expires_in": 3600}]
    assert ok_token(w.login("ccg@example.com")) == "at-3"
    assert w.endpoint.requests[2][1]["client_secret"] == "test-secret"


def test_client_secret_is_also_moved_after_a_refresh():
    w = world(
        account(**cached(expiry=NOW - 10)),
        responses=({"access_token": "at-new", "expires_in": 3600},),
        encrypt_client_secret_on_first_use=True,
    )
    assert ok_token(w.login("user@example.com")) == "at-new"
    changes = w.store.saves[0][1]
    assert list(changes)[:2] == ["client_secret_encrypted", "client_secret"]
    assert dec(changes["client_secret_encrypted"]) == "secret-1"


def test_login_password_as_client_credentials_secret():
    w = world(
        ccg_account(client_secret=None),
        responses=({"access_token": "at-1"},),
        use_login_password_as_client_credentials_secret=True,
    )
    assert ok_token(w.login("ccg@example.com", "app-secret")) == "at-1"
    assert w.endpoint.requests[0][1]["client_secret"] == "app-secret"
    # without the option no secret is sent
    w = world(ccg_account(client_secret=None), responses=({"access_token": "at-1"},))
    ok_token(w.login("ccg@example.com", "app-secret"))
    assert "client_secret" not in w.endpoint.requests[0][1]


def test_ropc_request_and_fresh_save_order():
    w = world(
        ropc_account(oauth2_resource="https://partner.outlook.cn"),
        responses=({"access_token": "at-1", "refresh_token": "rt-1", "expires_in": 600},),
    )
    assert ok_token(w.login("ropc@example.com", "ropc-pass")) == "at-1"
    assert w.endpoint.requests == [
        (
            TOKEN_URL,
            {
                "client_id": "client-1",
                "client_secret": "secret-1",
                "username": "ropc@example.com",
                "password": "ropc-pass",
                "scope": "IMAP.AccessAsUser.All offline_access",
                "resource": "https://partner.outlook.cn",
                "grant_type": "password",
            },
        )
    ]
    changes = w.store.saves[0][1]
    assert list(changes) == [
        "token_salt",
        "token_iterations",
        "access_token",
        "access_token_expiry",
        "refresh_token",
    ]
    assert changes["access_token_expiry"] == str(int(NOW) + 600)
    salt = changes["token_salt"]
    assert salt is not None
    assert dec(changes["refresh_token"], "ropc-pass", salt) == "rt-1"


def test_ropc_scope_omitted_when_empty_with_resource():
    acct = ropc_account(oauth2_scope="", oauth2_resource="https://res", client_secret=None)
    form = flows.token_request(acct, "ropc@example.com", "pw", None)
    assert form == {
        "client_id": "client-1",
        "username": "ropc@example.com",
        "password": "pw",
        "resource": "https://res",
        "grant_type": "password",
    }
    assert flows.config_problem(acct) is None
    assert flows.config_problem(ropc_account(oauth2_scope="")) is flows.ConfigProblem.INCOMPLETE


def test_unknown_flow_is_sent_verbatim_and_permission_url_forces_auth_code():
    acct = ccg_account(oauth2_flow="urn:example:custom", redirect_uri="http://localhost/")
    form = flows.token_request(acct, "u", "pw", "s")
    assert form["grant_type"] == "urn:example:custom"
    assert form["redirect_uri"] == "http://localhost/"
    # a vendor guide configures client_credentials with a permission_url: that is the auth-code flow
    vendor = ccg_account(permission_url="https://idp.invalid/authorize")
    assert flows.effective_flow(vendor) == "authorization_code"
    assert flows.effective_flow(account(oauth2_flow="device")) == "device"
    with pytest.raises(flows.FlowUnavailable) as info:
        flows.token_request(vendor, "u", "pw", "s")
    assert info.value.interactive


def test_interactive_account_without_tokens_is_refused_clearly():
    w = world(account())
    result = w.login("user@example.com")
    assert isinstance(result, TokenFailure)
    assert result.message.startswith(
        "Login failed for account user@example.com: an interactive authorisation is needed"
    )
    assert "not" in result.message and "version" in result.message
    assert w.endpoint.requests == []


def test_service_account_is_reported_unsupported():
    w = world(ccg_account(oauth2_flow="service_account"))
    result = w.login("ccg@example.com")
    assert isinstance(result, TokenFailure) and "service_account" in result.message
    assert w.endpoint.requests == []


def test_save_failure_keeps_tokens_in_memory(caplog):
    w = world(ccg_account(), responses=({"access_token": "at-1", "expires_in": 3600},), store_fails=True)
    with caplog.at_level(logging.ERROR, logger="emailproxy.tokens"):
        assert ok_token(w.login("ccg@example.com")) == "at-1"
    assert "Could not save" in caplog.text
    assert ok_token(w.login("ccg@example.com")) == "at-1"
    assert len(w.endpoint.requests) == 1


def test_config_edits_replace_the_in_memory_state():
    w = world(ccg_account(), responses=({"access_token": "at-1", "expires_in": 3600},))
    assert ok_token(w.login("ccg@example.com")) == "at-1"
    # a reload that shows our own save keeps using it
    saved = {k: v for k, v in w.store.saves[0][1].items() if v is not None}
    w.manager.update_config(
        cast(Config, FakeConfig(w.config.options, {"ccg@example.com": ccg_account(**saved)}))
    )
    assert ok_token(w.login("ccg@example.com")) == "at-1"
    # the user replaced the cached token in the file: that one is used
    w.manager.update_config(
        cast(Config, FakeConfig(w.config.options, {"ccg@example.com": ccg_account(**cached("at-edited"))}))
    )
    assert ok_token(w.login("ccg@example.com")) == "at-edited"
    assert len(w.endpoint.requests) == 1


def test_a_reload_showing_an_earlier_save_of_ours_is_not_a_user_edit():
    """Saves race with reloads: a reload may read our first save after the second one was made (seen with a
    password change: the stale tokens' deletion, then the new tokens). That is not the user's edit."""
    w = world(
        ccg_account(),
        responses=(
            {"access_token": "at-1", "expires_in": 3600},
            {"access_token": "at-2", "expires_in": 3600},
        ),
    )
    assert ok_token(w.login("ccg@example.com")) == "at-1"
    first = {k: v for k, v in w.store.saves[0][1].items() if v is not None}
    w.clock.now += 3600  # expired: the next login fetches at-2 and saves it
    assert ok_token(w.login("ccg@example.com")) == "at-2"
    assert len(w.store.saves) == 2
    w.manager.update_config(  # the reload read the file as the first save left it
        cast(Config, FakeConfig(w.config.options, {"ccg@example.com": ccg_account(**first)}))
    )
    assert ok_token(w.login("ccg@example.com")) == "at-2"
    assert len(w.endpoint.requests) == 2


def test_invalid_salt_is_replaced():
    values = cached()
    values["token_salt"] = "not base64!"
    w = world(ccg_account(**values), responses=({"access_token": "at-1"},))
    assert ok_token(w.login("ccg@example.com")) == "at-1"
    changes = w.store.saves[0][1]
    salt = changes["token_salt"]
    assert salt is not None and salt != "not base64!" and changes["refresh_token"] is None
    assert dec(changes["access_token"], salt=salt) == "at-1"


@pytest.mark.parametrize(
    "acct,password,message",
    [
        (
            None,
            PASSWORD,
            "No config file entry found for account x@example.com - please add a new section with values "
            "for permission_url, token_url, oauth2_scope, redirect_uri, client_id and client_secret",
        ),
        (
            account("x@example.com", token_url=None),
            PASSWORD,
            "Incomplete config file entry found for account x@example.com - "
            "please make sure all required fields are added (at least token_url, oauth2_scope and client_id)",
        ),
        (
            account("x@example.com", permission_url=None, oauth2_flow=None),
            PASSWORD,
            "Incomplete config file entry found for account x@example.com - please make sure an "
            "`oauth2_flow` value is specified when using a method that does not require a `permission_url`",
        ),
        (account("x@example.com"), "", "Login failed - no password provided for account x@example.com"),
    ],
    ids=["no-entry", "incomplete", "no-flow", "no-password"],
)
def test_config_and_password_messages(acct, password, message):
    w = world(*([acct] if acct else []))
    result = w.login("x@example.com", password)
    assert isinstance(result, TokenFailure) and result.message == message
    # only the client's own mistakes count towards the failed-login backoff; a config problem does not
    assert result.local == (acct is None or password == "")


def test_only_the_clients_own_mistakes_are_local_failures():
    w = world(
        ccg_account(**cached()),
        ropc_account(),
        responses=(
            TokenNetworkError("idp.invalid did not answer within 30 s"),
            TokenEndpointError(400, "invalid_grant", "AADSTS50126: bad credentials"),
        ),
        delete_account_token_on_password_error=False,
    )
    wrong = w.login("ccg@example.com", "not the password")
    assert isinstance(wrong, TokenFailure) and wrong.local
    network = w.login("ropc@example.com", "whatever")
    assert isinstance(network, TokenFailure) and not network.local
    refused = w.login("ropc@example.com", "whatever")  # the IdP refusing the password is not local
    assert isinstance(refused, TokenFailure) and not refused.local and "invalid_grant" in refused.message


def test_no_secret_reaches_the_log(caplog):
    secrets = ["client-secret-value", PASSWORD, "at-secret-value", "rt-secret-value", "rt-old", "at-old"]
    w = world(
        ropc_account(client_secret="client-secret-value", **cached(expiry=NOW - 10)),
        responses=(
            TokenEndpointError(400, "invalid_grant", "expired"),
            {"access_token": "at-secret-value", "refresh_token": "rt-secret-value"},
        ),
        encrypt_client_secret_on_first_use=True,
    )
    with caplog.at_level(logging.DEBUG):
        assert ok_token(w.login("ropc@example.com")) == "at-secret-value"
        # the secret is now stored encrypted, so a wrong password is refused without a request
        assert isinstance(w.login("ropc@example.com", "wrong-pass-value"), TokenFailure)
    assert len(w.endpoint.requests) == 2
    assert caplog.records
    for secret in [*secrets, "wrong-pass-value"]:
        assert secret not in caplog.text


# ---------------------------------------------------------------------------------- TokenEndpoint


class CannedAdapter(BaseAdapter):
    def __init__(self, status: int = 200, body: bytes = b"{}", error: Exception | None = None) -> None:
        super().__init__()
        self.status, self.body, self.error = status, body, error
        self.calls: list[tuple[requests.PreparedRequest, Any, Any]] = []

    def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):
        self.calls.append((request, timeout, verify))
        if self.error is not None:
            raise self.error
        response = requests.Response()
        response.status_code = self.status
        response._content = self.body
        response.headers = CaseInsensitiveDict({"Content-Type": "application/json"})
        response.reason = "Reason"
        response.url = request.url or ""
        response.request = request
        return response

    def close(self) -> None:
        pass


def endpoint_with(adapter: CannedAdapter) -> TokenEndpoint:
    session = requests.Session()
    session.mount("https://", adapter)
    return TokenEndpoint(timeout=7, session=session)


def test_endpoint_posts_a_form_and_parses_json(monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", "/tmp/test-ca.pem")
    adapter = CannedAdapter(body=b'{"access_token": "at", "expires_in": "3600"}')
    answer = endpoint_with(adapter).post(TOKEN_URL, {"grant_type": "client_credentials", "scope": "a b"})
    assert answer == {"access_token": "at", "expires_in": "3600"}
    request, timeout, verify = adapter.calls[0]
    assert request.method == "POST"
    assert request.body == "grant_type=client_credentials&scope=a+b"
    assert request.headers["User-Agent"] == f"emailproxy/{__version__}"
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert timeout == 7
    assert verify == "/tmp/test-ca.pem"


def test_endpoint_maps_oauth_errors():
    adapter = CannedAdapter(400, b'{"error": "invalid_grant", "error_description": "expired"}')
    with pytest.raises(TokenEndpointError) as info:
        endpoint_with(adapter).post(TOKEN_URL, {})
    assert (info.value.status, info.value.error, info.value.description) == (400, "invalid_grant", "expired")
    assert info.value.is_oauth_error and info.value.is_permanent


@pytest.mark.parametrize(
    "status,body", [(502, b"<html>Bad gateway</html>"), (400, b"oops"), (200, b"[1, 2]")]
)
def test_endpoint_non_json_answers_are_http_errors(status, body):
    with pytest.raises(TokenEndpointError) as info:
        endpoint_with(CannedAdapter(status, body)).post(TOKEN_URL, {})
    assert info.value.error == f"http_{status}"
    assert not info.value.is_permanent


def test_endpoint_errors_with_200_and_401():
    with pytest.raises(TokenEndpointError) as info:
        endpoint_with(CannedAdapter(200, b'{"error": "invalid_grant"}')).post(TOKEN_URL, {})
    assert info.value.is_permanent
    with pytest.raises(TokenEndpointError) as info:
        endpoint_with(CannedAdapter(401, b'{"error": "invalid_client"}')).post(TOKEN_URL, {})
    assert info.value.is_oauth_error and not info.value.is_permanent


@pytest.mark.parametrize(
    "error,detail",
    [
        (requests.exceptions.ConnectTimeout("slow"), "did not answer within 7 s"),
        (requests.exceptions.SSLError("bad cert"), "TLS error"),
        (requests.exceptions.ConnectionError("refused"), "could not connect to idp.invalid"),
    ],
)
def test_endpoint_network_errors(error, detail):
    with pytest.raises(TokenNetworkError) as info:
        endpoint_with(CannedAdapter(error=error)).post(TOKEN_URL, {"client_secret": "s3cret"})
    assert detail in str(info.value)
    assert "s3cret" not in str(info.value)
