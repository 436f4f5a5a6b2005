"""local_password_hash: the hash format, verification and its cache, the configuration reader, and the
TokenManager's first step (a wrong password is refused before anything is decrypted, deleted or requested)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography.fernet import Fernet

from emailproxy.config import AccountConfig, CachedTokens, Config, ConfigError, GlobalOptions, load_config
from emailproxy.oauth import localpassword
from emailproxy.oauth.crypto import ITERATIONS, KeyCache, derive_key, fernet_key
from emailproxy.oauth.localpassword import (
    HashFormatError,
    PasswordHash,
    VerificationCache,
    hash_password,
    hash_problem,
    verify,
)
from emailproxy.oauth.tokens import TokenManager, wrong_password_message
from emailproxy.protocols.events import TokenFailure, TokenOk, TokenResult
from emailproxy.secret import Secret

PASSWORD = "the-bound-local-password"
OLD_PASSWORD = "the-password-of-the-first-login"
SALT = base64.b64encode(bytes(range(16))).decode()
NOW = 1_800_000_000.0


@functools.cache
def bound_hash(password: str = PASSWORD) -> str:
    return hash_password(password)


def _key(password: str) -> bytes:
    return _derive(password, base64.b64decode(SALT), ITERATIONS)


def enc(plaintext: str, password: str = PASSWORD) -> str:
    return Fernet(fernet_key(_key(password))).encrypt(plaintext.encode()).decode()


def dec(token: str | None, password: str, salt: str) -> str:
    assert token is not None
    key = _derive(password, base64.b64decode(salt), ITERATIONS)
    return Fernet(fernet_key(key)).decrypt(token.encode()).decode()


# ---------------------------------------------------------------------------------------------- format


def test_hash_format_and_independent_recomputation() -> None:
    value = bound_hash()
    scheme, params, salt_text, digest_text = value.split("$")
    assert (scheme, params) == ("scrypt", "ln=14,r=8,p=1")
    assert "=" not in salt_text + digest_text  # base64 without padding
    salt = base64.b64decode(salt_text + "==")
    digest = base64.b64decode(digest_text + "=")
    assert len(salt) == 16 and len(digest) == 32
    expected = hashlib.scrypt(PASSWORD.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)
    assert digest == expected
    assert PASSWORD not in value
    assert PasswordHash.parse(value).format() == value


def test_same_password_gets_a_new_salt_each_time() -> None:
    first, second = hash_password(PASSWORD), bound_hash()
    assert first != second
    assert verify(first, PASSWORD, VerificationCache()) and verify(second, PASSWORD, VerificationCache())


def test_verify_accepts_only_the_password() -> None:
    value = bound_hash()
    cache = VerificationCache()
    assert verify(value, PASSWORD, cache)
    for other in ("", PASSWORD.upper(), PASSWORD + " ", PASSWORD[:-1], "the-bound-local-passwore"):
        assert not verify(value, other, cache)
    assert not verify("scrypt$nonsense", PASSWORD, cache)


def test_non_ascii_password_and_padded_base64() -> None:
    password = "pässwörd-€-ключ"
    value = hash_password(password)
    assert verify(value, password, VerificationCache())
    assert not verify(value, "passwörd-€-ключ", VerificationCache())
    scheme, params, salt_text, digest_text = value.split("$")
    padded = "$".join([scheme, params, salt_text + "==", digest_text + "="])
    assert hash_problem(padded) is None and verify(padded, password, VerificationCache())


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "expected 4 fields"),
        ("scrypt$ln=14,r=8,p=1$c2FsdHNhbHRzYWx0c2FsdA", "expected 4 fields"),
        ("bcrypt$ln=14,r=8,p=1$c2FsdHNhbHRzYWx0c2FsdA$" + "A" * 43, "unknown scheme 'bcrypt'"),
        ("scrypt$n=16384,r=8,p=1$c2FsdHNhbHRzYWx0c2FsdA$" + "A" * 43, "ln=<number>,r=<number>,p=<number>"),
        ("scrypt$ln=10,r=8,p=1$c2FsdHNhbHRzYWx0c2FsdA$" + "A" * 43, "ln=10 is outside 14..20"),
        ("scrypt$ln=14,r=0,p=1$c2FsdHNhbHRzYWx0c2FsdA$" + "A" * 43, "r=0 is outside 1..32"),
        ("scrypt$ln=18,r=8,p=1$c2FsdHNhbHRzYWx0c2FsdA$" + "A" * 43, "more than 256 MiB"),
        ("scrypt$ln=14,r=8,p=1$not*base64$" + "A" * 43, "the salt is not base64"),
        ("scrypt$ln=14,r=8,p=1$c2FsdA$" + "A" * 43, "the salt has 4 bytes"),
        ("scrypt$ln=14,r=8,p=1$c2FsdHNhbHRzYWx0c2FsdA$AAAA", "the hash has 3 bytes"),
    ],
)
def test_malformed_values_are_named(value: str, problem: str) -> None:
    found = hash_problem(value)
    assert found is not None and problem in found
    with pytest.raises(HashFormatError):
        PasswordHash.parse(value)


def test_parsed_hash_repr_hides_salt_and_digest() -> None:
    parsed = PasswordHash.parse(bound_hash())
    text = repr(parsed)
    assert (
        "log_n=14" in text
        and bound_hash().split("$")[2] not in text
        and bound_hash().split("$")[3] not in text
    )


# ---------------------------------------------------------------------------------------------- cache


def test_successful_checks_are_cached_under_a_peppered_key(monkeypatch: pytest.MonkeyPatch) -> None:
    value = bound_hash()
    calls: list[str] = []
    original = PasswordHash.compute

    def counting(self: PasswordHash, password: str, length: int | None = None) -> bytes:
        calls.append("compute")
        return original(self, password, length)

    monkeypatch.setattr(PasswordHash, "compute", counting)
    cache = VerificationCache()
    assert verify(value, PASSWORD, cache) and verify(value, PASSWORD, cache)
    assert len(calls) == 1  # the second check came from the cache
    assert not verify(value, "wrong", cache) and not verify(value, "wrong", cache)
    assert len(calls) == 3  # failures are never cached
    assert len(cache) == 1
    key = next(iter(cache._entries))
    assert PASSWORD.encode() not in key and len(key) == 32
    other = VerificationCache()  # another pepper: another key for the same pair
    other.add(value, PASSWORD)
    assert next(iter(other._entries)) != key
    # the entry is bound to the hash: a different hash of the same password is checked again
    assert verify(hash_password(PASSWORD), PASSWORD, cache)
    assert len(calls) == 5  # hash_password computes once, the check once more


def test_cache_is_bounded() -> None:
    cache = VerificationCache(max_size=2)
    for index in range(5):
        cache.add("h", f"password-{index}")
    assert len(cache) == 2
    assert cache.known("h", "password-4") and not cache.known("h", "password-0")


def test_uncached_check_runs_in_a_worker_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    threaded: list[object] = []
    real = asyncio.to_thread

    async def recording(func: Any, /, *args: Any) -> Any:
        threaded.append(func)
        return await real(func, *args)

    monkeypatch.setattr(localpassword.asyncio, "to_thread", recording)
    cache = VerificationCache()
    account = ccg_account(local_password_hash=bound_hash())
    assert asyncio.run(localpassword.accepts(account, PASSWORD, cache))
    assert threaded == [verify]
    assert asyncio.run(localpassword.accepts(account, PASSWORD, cache))  # cached: on the event loop
    assert threaded == [verify]
    assert not asyncio.run(localpassword.accepts(account, "wrong", cache))
    assert threaded == [verify, verify]


# ---------------------------------------------------------------------------------------------- config


def write_config(tmp_path: Path, accounts: str) -> Path:
    path = tmp_path / "emailproxy.config"
    path.write_text(
        "[emailproxy]\nallow_catch_all_accounts = True\n\n[IMAP-1993]\nserver_address = imap.example.com\n"
        "server_port = 993\n\n" + accounts
    )
    return path


APP = (
    "token_url = https://login.example.com/token\noauth2_scope = https://outlook.office365.com/.default\n"
    "oauth2_flow = client_credentials\nclient_id = app\nclient_secret = s3cret-value\n"
)


def test_config_reads_inherits_and_cancels_the_hash(tmp_path: Path) -> None:
    value = bound_hash()
    path = write_config(
        tmp_path,
        f"[@example.com]\n{APP}local_password_hash = {value}\n\n[own@example.com]\n\n"
        "[open@example.com]\nlocal_password_hash =\n",
    )
    config = load_config(path)
    assert not config.warnings
    first = config.find_account("someone@example.com")
    assert first is not None and first.local_password_hash == value
    own = config.find_account("own@example.com")
    assert own is not None and own.local_password_hash == value  # inherited from [@example.com]
    opened = config.find_account("open@example.com")
    assert opened is not None and opened.local_password_hash is None  # an empty value cancels it
    assert value not in repr(first)


@pytest.mark.parametrize("section", ["[user@example.com]", "[@example.com]", "[DEFAULT]"])
def test_malformed_hash_stops_start_up_naming_file_section_and_key(tmp_path: Path, section: str) -> None:
    path = write_config(tmp_path, f"{section}\n{APP}local_password_hash = scrypt$ln=14$abc\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    error = caught.value
    assert error.key == "local_password_hash" and error.section == section.strip("[]")
    text = str(error)
    assert str(path) in text and "expected 4 fields" in text and "emailproxy set-password" in text


def test_misspelt_key_gets_a_did_you_mean(tmp_path: Path) -> None:
    path = write_config(tmp_path, f"[user@example.com]\n{APP}local_password_hsh = {bound_hash()}\n")
    with pytest.raises(ConfigError, match="did you mean 'local_password_hash'"):
        load_config(path)


# ---------------------------------------------------------------------------------------------- logins


class FakeEndpoint:
    def __init__(self, *responses: dict[str, Any]) -> None:
        self.responses = list(responses)
        self.requests: list[dict[str, str]] = []

    def post(self, url: str, form: Mapping[str, str]) -> dict[str, Any]:
        self.requests.append(dict(form))
        if not self.responses:
            raise AssertionError("unexpected token request")
        return self.responses.pop(0)


class FakeStore:
    def __init__(self) -> None:
        self.saves: list[tuple[str, dict[str, str | None]]] = []

    def save(self, section: str, changes: Mapping[str, str | None]) -> None:
        self.saves.append((section, dict(changes)))


@dataclasses.dataclass
class FakeConfig:
    options: GlobalOptions
    accounts: dict[str, AccountConfig]

    def find_account(self, username: str) -> AccountConfig | None:
        return self.accounts.get(username)


def account(username: str = "user@example.com", **kwargs: Any) -> AccountConfig:
    cached = CachedTokens(**{k: kwargs.pop(k) for k in list(kwargs) if k in CachedTokens.__slots__})
    settings: dict[str, Any] = {
        "token_url": "https://idp.invalid/token",
        "permission_url": "https://idp.invalid/authorize",
        "oauth2_scope": "IMAP.AccessAsUser.All offline_access",
        "oauth2_flow": "authorization_code",
        "redirect_uri": "http://localhost:8080/",
        "client_id": "client-1",
        "client_secret": "secret-1",
    }
    settings.update(kwargs)
    return AccountConfig(
        username=username, section=username, matched_section=username, cached=cached, **settings
    )


def ccg_account(username: str = "app@example.com", **kwargs: Any) -> AccountConfig:
    settings: dict[str, Any] = {
        "permission_url": None,
        "redirect_uri": None,
        "oauth2_flow": "client_credentials",
        "oauth2_scope": "https://outlook.office365.com/.default",
    }
    settings.update(kwargs)
    return account(username, **settings)


def cached(password: str = PASSWORD, refresh: bool = True) -> dict[str, str]:
    values = {
        "token_salt": SALT,
        "token_iterations": str(ITERATIONS),
        "access_token": enc("at-cached", password),
        "access_token_expiry": str(int(NOW + 3600)),
    }
    if refresh:
        values["refresh_token"] = enc("rt-cached", password)
    return values


class Counting:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, password: str, salt: bytes, iterations: int) -> bytes:
        self.calls += 1
        return _derive(password, salt, iterations)  # memoised: PBKDF2 is slow and the tests repeat it


@functools.cache
def _derive(password: str, salt: bytes, iterations: int) -> bytes:
    return derive_key(password, salt, iterations)


@dataclasses.dataclass
class Setup:
    manager: TokenManager
    config: FakeConfig
    endpoint: FakeEndpoint
    store: FakeStore
    derive: Counting

    def login(self, username: str, password: str) -> TokenResult:
        return asyncio.run(self.manager.get_token(username, Secret(password)))


def setup(*accounts: AccountConfig, responses: tuple[dict[str, Any], ...] = (), **options: bool) -> Setup:
    config = FakeConfig(GlobalOptions(**options), {a.username: a for a in accounts})
    endpoint, store, derive = FakeEndpoint(*responses), FakeStore(), Counting()
    manager = TokenManager(
        cast(Config, config), store, endpoint, lambda: NOW, key_cache=KeyCache(derive=derive)
    )
    return Setup(manager, config, endpoint, store, derive)


def token(result: TokenResult) -> str:
    assert isinstance(result, TokenOk), result
    return result.access_token.reveal()


CCG_RESPONSE = {"access_token": "at-fresh", "expires_in": 3600}


@pytest.mark.parametrize("delete", [True, False])
@pytest.mark.parametrize("kind", ["interactive", "ropc", "client_credentials"])
def test_wrong_password_with_a_hash_changes_nothing(kind: str, delete: bool, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG, logger="emailproxy")
    settings: dict[str, Any] = {"local_password_hash": bound_hash(), **cached()}
    if kind == "interactive":
        acct = account(**settings)
    elif kind == "ropc":
        acct = account(permission_url=None, oauth2_flow="password", redirect_uri=None, **settings)
    else:
        acct = ccg_account("user@example.com", **settings)
    s = setup(acct, delete_account_token_on_password_error=delete)
    result = s.login("user@example.com", OLD_PASSWORD)
    assert result == TokenFailure(wrong_password_message("user@example.com"), local=True)
    assert s.store.saves == [] and s.endpoint.requests == []
    assert s.derive.calls == 0  # refused before any key was derived or any value decrypted
    assert "does not match the account's local_password_hash" in caplog.text
    assert OLD_PASSWORD not in caplog.text and PASSWORD not in caplog.text and bound_hash() not in caplog.text
    assert token(s.login("user@example.com", PASSWORD)) == "at-cached"  # the tokens are all still there


def test_first_login_with_a_hash_and_a_wrong_password_gets_nothing() -> None:
    s = setup(ccg_account(local_password_hash=bound_hash()), responses=(CCG_RESPONSE,))
    for wrong in ("first-comer", "", PASSWORD + "x"):
        result = s.login("app@example.com", wrong)
        assert isinstance(result, TokenFailure)
    assert s.endpoint.requests == [] and s.store.saves == []
    assert token(s.login("app@example.com", PASSWORD)) == "at-fresh"
    assert [form["grant_type"] for form in s.endpoint.requests] == ["client_credentials"]
    ((section, saved),) = s.store.saves
    assert section == "app@example.com"
    assert dec(saved["access_token"], PASSWORD, cast(str, saved["token_salt"])) == "at-fresh"


def test_without_a_hash_the_first_login_decides(caplog: Any) -> None:
    """The behaviour the option fixes, for contrast: any first password gets a token."""
    s = setup(ccg_account(), responses=(CCG_RESPONSE,))
    assert token(s.login("app@example.com", "first-comer")) == "at-fresh"
    assert isinstance(s.login("app@example.com", PASSWORD), TokenFailure)


@pytest.mark.parametrize("delete", [True, False])
@pytest.mark.parametrize("flow", ["client_credentials", "service_account"])
def test_app_only_without_hash_never_loses_working_tokens(flow: str, delete: bool) -> None:
    s = setup(ccg_account(oauth2_flow=flow, **cached()), delete_account_token_on_password_error=delete)
    for _ in range(3):
        refused = s.login("app@example.com", "wrong")
        assert refused == TokenFailure(wrong_password_message("app@example.com"), local=True)
    assert s.store.saves == [] and s.endpoint.requests == []
    assert token(s.login("app@example.com", PASSWORD)) == "at-cached"


@pytest.mark.parametrize("delete", [True, False])
def test_tokens_of_another_password_are_replaced_for_app_only_accounts(delete: bool) -> None:
    """The hash was set to a new password: the tokens (encrypted with the old one) are stale."""
    acct = ccg_account(local_password_hash=bound_hash(), **cached(OLD_PASSWORD, refresh=False))
    s = setup(acct, responses=(CCG_RESPONSE,), delete_account_token_on_password_error=delete)
    assert isinstance(s.login("app@example.com", OLD_PASSWORD), TokenFailure)  # the hash decides now
    assert s.store.saves == [] and s.endpoint.requests == []
    assert token(s.login("app@example.com", PASSWORD)) == "at-fresh"
    assert [form["grant_type"] for form in s.endpoint.requests] == ["client_credentials"]
    deleted, saved = s.store.saves
    assert deleted[1] == dict.fromkeys(
        ["token_salt", "token_iterations", "access_token", "access_token_expiry", "refresh_token"]
    )
    assert saved[1]["token_salt"] != SALT
    assert dec(saved[1]["access_token"], PASSWORD, cast(str, saved[1]["token_salt"])) == "at-fresh"
    assert token(s.login("app@example.com", PASSWORD)) == "at-fresh"  # from the new cache
    assert len(s.endpoint.requests) == 1


def test_undecryptable_encrypted_secret_with_a_hash_is_explained() -> None:
    values = {
        "token_salt": SALT,
        "token_iterations": str(ITERATIONS),
        "client_secret_encrypted": enc("s", OLD_PASSWORD),
    }
    s = setup(ccg_account(client_secret=None, local_password_hash=bound_hash(), **values))
    result = s.login("app@example.com", PASSWORD)
    assert isinstance(result, TokenFailure)
    assert "client_secret_encrypted was encrypted with a different password" in result.message
    assert s.store.saves == [] and s.endpoint.requests == []


def test_changed_hash_applies_to_the_next_login() -> None:
    """What a hot reload does: the manager gets a config whose account holds another hash."""
    acct = ccg_account(local_password_hash=bound_hash(), **cached())
    s = setup(acct)
    assert token(s.login("app@example.com", PASSWORD)) == "at-cached"
    s.manager.update_config(
        cast(
            Config,
            FakeConfig(
                s.config.options,
                {"app@example.com": dataclasses.replace(acct, local_password_hash=bound_hash(OLD_PASSWORD))},
            ),
        )
    )
    assert isinstance(s.login("app@example.com", PASSWORD), TokenFailure)  # the cached success is not reused
    assert s.store.saves == [] and s.endpoint.requests == []
    removed = dataclasses.replace(acct, local_password_hash=None)
    s.manager.update_config(cast(Config, FakeConfig(s.config.options, {"app@example.com": removed})))
    assert token(s.login("app@example.com", PASSWORD)) == "at-cached"


def test_malformed_hash_built_in_code_refuses_every_login(caplog: Any) -> None:
    s = setup(ccg_account(local_password_hash="scrypt$broken", **cached()))
    assert isinstance(s.login("app@example.com", PASSWORD), TokenFailure)
    assert "local_password_hash is unusable" in caplog.text
    assert s.store.saves == [] and s.endpoint.requests == []
