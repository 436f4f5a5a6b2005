"""Client authentication: JWT client assertions (certificates) and Google service-account assertions.

Every JWT the proxy produces is verified here with the public key, independently of the code under test.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import json
import logging
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from emailproxy.config import AccountConfig, ConfigError, load_config
from emailproxy.oauth import credentials, flows
from emailproxy.oauth.credentials import (
    CLIENT_ASSERTION_TYPE,
    JWT_BEARER_GRANT,
    CredentialError,
    ServiceAccountKey,
    client_fields,
    load_service_account_key,
)
from emailproxy.oauth.crypto import ITERATIONS, derive_key, fernet_key
from emailproxy.oauth.tokens import TokenManager
from emailproxy.protocols.events import TokenFailure, TokenOk
from emailproxy.secret import Secret

NOW = 1_800_000_000
TOKEN_URL = "https://login.example.invalid/tenant/oauth2/v2.0/token"
GOOGLE_TOKEN_URI = "https://oauth2.example.invalid/token"
PASSWORD = "local-password"
SCOPE = "https://mail.google.com/"


# ---------------------------------------------------------------------------------- keys and JWT checks


@dataclass(frozen=True)
class KeyFiles:
    key: rsa.RSAPrivateKey
    certificate: x509.Certificate
    key_pem: bytes
    cert_pem: bytes
    key_path: Path
    cert_path: Path


def _rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pkcs8(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def _certificate(key: rsa.RSAPrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "emailproxy test app")])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


@pytest.fixture(scope="module")
def rsa_material() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = _rsa_key()
    return key, _certificate(key)


@pytest.fixture
def keys(rsa_material: tuple[rsa.RSAPrivateKey, x509.Certificate], tmp_path: Path) -> KeyFiles:
    key, certificate = rsa_material
    key_pem = _pkcs8(key)
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_path, cert_path = tmp_path / "app.key", tmp_path / "app.pem"
    key_path.write_bytes(key_pem)
    cert_path.write_bytes(cert_pem)
    return KeyFiles(key, certificate, key_pem, cert_pem, key_path, cert_path)


def _unb64url(text: str) -> bytes:
    assert "=" not in text, "JWT parts are base64url without padding"
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def verify_jwt(token: str, public_key: rsa.RSAPublicKey) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of an RS256 JWT, after checking its signature with ``public_key``."""
    header_b64, claims_b64, signature_b64 = token.split(".")
    public_key.verify(
        _unb64url(signature_b64), f"{header_b64}.{claims_b64}".encode(), padding.PKCS1v15(), hashes.SHA256()
    )
    return json.loads(_unb64url(header_b64)), json.loads(_unb64url(claims_b64))


def cert_account(keys: KeyFiles, **changes: Any) -> AccountConfig:
    base = AccountConfig(
        username="app@example.com",
        section="app@example.com",
        matched_section="app@example.com",
        token_url=TOKEN_URL,
        oauth2_scope="https://outlook.office365.com/.default",
        oauth2_flow="client_credentials",
        client_id="app-client-id",
        jwt_certificate_path=str(keys.cert_path),
        jwt_key_path=str(keys.key_path),
    )
    return replace(base, **changes)


def service_key_json(key_pem: bytes, **changes: Any) -> str:
    data: dict[str, Any] = {
        "type": "service_account",
        "project_id": "demo",
        "private_key_id": "kid-0123",
        "private_key": key_pem.decode(),
        "client_email": "mailer@demo.iam.gserviceaccount.com",
        "client_id": "1234567890",
        "token_uri": GOOGLE_TOKEN_URI,
    }
    data.update(changes)
    return json.dumps({k: v for k, v in data.items() if v is not None}, indent=2)


def service_account(key_json_or_path: str, mode: str = "key", **changes: Any) -> AccountConfig:
    base = AccountConfig(
        username="someone@example.com",
        section="@example.com",
        matched_section="@example.com",
        token_url="https://configured.example.invalid/token",
        oauth2_scope=SCOPE,
        oauth2_flow="service_account",
        client_id=mode,
        client_secret=key_json_or_path,
    )
    return replace(base, **changes)


# ---------------------------------------------------------------------------------- JWT encoding


def test_encode_jwt_is_rs256_without_padding(keys: KeyFiles) -> None:
    token = credentials.encode_jwt({"typ": "JWT", "alg": "none"}, {"n": "\u00e9" * 7}, keys.key)
    header, claims = verify_jwt(token, keys.key.public_key())
    assert header == {"typ": "JWT", "alg": "RS256"}  # alg cannot be overridden
    assert claims == {"n": "\u00e9" * 7}
    tampered = token.rsplit(".", 1)[0][:-2] + "xx." + token.rsplit(".", 1)[1]
    with pytest.raises((InvalidSignature, ValueError)):
        verify_jwt(tampered, keys.key.public_key())


def test_sha256_thumbprint_keeps_padding(keys: KeyFiles) -> None:
    der = keys.certificate.public_bytes(serialization.Encoding.DER)
    expected = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode()
    value = credentials.sha256_thumbprint(keys.certificate)
    assert value == expected and value.endswith("=") and len(value) == 44


# ---------------------------------------------------------------------------------- certificate credentials


def test_client_assertion_header_claims_and_signature(keys: KeyFiles) -> None:
    account = cert_account(keys)
    form = client_fields(account, None, TOKEN_URL, now=NOW)
    assert set(form) == {"client_id", "client_assertion_type", "client_assertion"}
    assert form["client_id"] == "app-client-id"
    assert form["client_assertion_type"] == CLIENT_ASSERTION_TYPE
    header, claims = verify_jwt(form["client_assertion"], keys.certificate.public_key())  # type: ignore[arg-type]
    der = keys.certificate.public_bytes(serialization.Encoding.DER)
    assert header == {
        "alg": "RS256",
        "typ": "JWT",
        "x5t#S256": base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode(),
    }
    assert claims["aud"] == TOKEN_URL
    assert claims["iss"] == claims["sub"] == "app-client-id"
    assert claims["nbf"] == NOW and claims["exp"] == NOW + 300
    assert len(claims["jti"]) == 36 and set(claims) == {"aud", "iss", "sub", "jti", "nbf", "exp"}
    again = client_fields(account, None, TOKEN_URL, now=NOW)["client_assertion"]
    assert verify_jwt(again, keys.key.public_key())[1]["jti"] != claims["jti"]


def test_client_assertion_uses_real_time_by_default(keys: KeyFiles) -> None:
    import time

    before = int(time.time())
    assertion = client_fields(cert_account(keys), None, TOKEN_URL)["client_assertion"]
    claims = verify_jwt(assertion, keys.key.public_key())[1]
    assert before <= claims["nbf"] <= int(time.time()) and claims["exp"] == claims["nbf"] + 300


def test_client_secret_wins_over_certificate_with_a_warning(
    keys: KeyFiles, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="emailproxy.tokens"):
        form = client_fields(cert_account(keys), "the-secret", TOKEN_URL, now=NOW)
    assert form == {"client_id": "app-client-id", "client_secret": "the-secret"}
    assert "using the client secret" in caplog.text and "the-secret" not in caplog.text


@pytest.mark.parametrize("missing", ["jwt_certificate_path", "jwt_key_path"])
def test_one_certificate_setting_alone_is_not_used(keys: KeyFiles, missing: str) -> None:
    form = client_fields(cert_account(keys, **{missing: None}), None, TOKEN_URL, now=NOW)
    assert form == {"client_id": "app-client-id"}
    assert client_fields(cert_account(keys, **{missing: None}), "s", TOKEN_URL) == {
        "client_id": "app-client-id",
        "client_secret": "s",
    }


def test_flows_send_the_assertion_on_token_and_refresh_requests(keys: KeyFiles) -> None:
    account = cert_account(keys)
    request = flows.fresh_token_request(account, "app@example.com", PASSWORD, None, now=NOW)
    assert request.url == TOKEN_URL
    assert request.form["grant_type"] == "client_credentials"
    assert request.form["scope"] == "https://outlook.office365.com/.default"
    assert "client_secret" not in request.form and "form" not in repr(request)
    claims = verify_jwt(request.form["client_assertion"], keys.key.public_key())[1]
    assert claims["aud"] == TOKEN_URL

    refresh = flows.refresh_request(account, None, "rt-1", now=NOW + 10)
    assert refresh["grant_type"] == "refresh_token" and refresh["refresh_token"] == "rt-1"
    assert refresh["client_assertion_type"] == CLIENT_ASSERTION_TYPE
    refresh_claims = verify_jwt(refresh["client_assertion"], keys.key.public_key())[1]
    assert refresh_claims["nbf"] == NOW + 10 and refresh_claims["aud"] == TOKEN_URL

    ropc = flows.token_request(replace(account, oauth2_flow="password"), "u@example.com", "pw", None, NOW)
    assert ropc["grant_type"] == "password" and "client_assertion" in ropc


def test_certificate_problems_are_named(keys: KeyFiles, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(CredentialError, match=r"cannot read jwt_certificate_path .*nope\.pem"):
        client_fields(cert_account(keys, jwt_certificate_path=str(missing)), None, TOKEN_URL)
    with pytest.raises(CredentialError, match=r"jwt_certificate_path .* is not a PEM certificate"):
        client_fields(cert_account(keys, jwt_certificate_path=str(keys.key_path)), None, TOKEN_URL)
    with pytest.raises(CredentialError, match=r"jwt_key_path .* is not a PEM private key"):
        client_fields(cert_account(keys, jwt_key_path=str(keys.cert_path)), None, TOKEN_URL)
    with pytest.raises(CredentialError, match="is a directory"):
        client_fields(cert_account(keys, jwt_key_path=str(tmp_path)), None, TOKEN_URL)

    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(_pkcs8(keys.key, b"passphrase"))
    with pytest.raises(CredentialError, match="passphrase"):
        client_fields(cert_account(keys, jwt_key_path=str(encrypted)), None, TOKEN_URL)
    ec_key = tmp_path / "ec.key"
    ec_key.write_bytes(_pkcs8(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(CredentialError, match="not an RSA key"):
        client_fields(cert_account(keys, jwt_key_path=str(ec_key)), None, TOKEN_URL)


def test_rsa_traditional_pem_keys_work(keys: KeyFiles, tmp_path: Path) -> None:
    traditional = tmp_path / "rsa.key"
    traditional.write_bytes(
        keys.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    assert b"BEGIN RSA PRIVATE KEY" in traditional.read_bytes()
    form = client_fields(cert_account(keys, jwt_key_path=str(traditional)), None, TOKEN_URL, now=NOW)
    verify_jwt(form["client_assertion"], keys.key.public_key())


# ---------------------------------------------------------------------------------- service accounts


def test_service_account_key_from_json_and_from_file(keys: KeyFiles, tmp_path: Path) -> None:
    text = service_key_json(keys.key_pem)
    path = tmp_path / "sa.json"
    path.write_text(text)
    for mode, value in (("key", text), ("file", str(path)), ("FILE", f" {path} ")):
        key = load_service_account_key(mode, value)
        assert key.client_email == "mailer@demo.iam.gserviceaccount.com"
        assert key.token_uri == GOOGLE_TOKEN_URI and key.key_id == "kid-0123"
        assert key.private_key.public_key().public_numbers() == keys.key.public_key().public_numbers()
        assert "PRIVATE" not in repr(key)


def test_service_account_request_impersonates_the_login_user(keys: KeyFiles) -> None:
    account = service_account(service_key_json(keys.key_pem))
    request = flows.fresh_token_request(account, "someone@example.com", PASSWORD, account.client_secret, NOW)
    assert request.url == GOOGLE_TOKEN_URI  # the key's token_uri, as Google's libraries use it
    assert set(request.form) == {"grant_type", "assertion"}
    assert request.form["grant_type"] == JWT_BEARER_GRANT == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    header, claims = verify_jwt(request.form["assertion"], keys.key.public_key())
    assert header == {"alg": "RS256", "typ": "JWT", "kid": "kid-0123"}
    assert claims == {
        "iss": "mailer@demo.iam.gserviceaccount.com",
        "sub": "someone@example.com",
        "scope": SCOPE,
        "aud": GOOGLE_TOKEN_URI,
        "iat": NOW,
        "exp": NOW + 3600,
    }


def test_service_account_without_token_uri_uses_token_url(keys: KeyFiles) -> None:
    text = service_key_json(keys.key_pem, token_uri=None, private_key_id=None)
    account = service_account(text, oauth2_scope="  https://mail.google.com/   openid ")
    request = flows.fresh_token_request(account, "x@example.com", PASSWORD, text, NOW)
    assert request.url == "https://configured.example.invalid/token"
    header, claims = verify_jwt(request.form["assertion"], keys.key.public_key())
    assert "kid" not in header
    assert claims["aud"] == request.url and claims["scope"] == "https://mail.google.com/ openid"


@pytest.mark.parametrize(
    ("mode", "value", "message"),
    [
        ("key", "{not json", r"is not valid JSON \(line 1 column 2"),
        ("key", "[1, 2]", "is not a JSON object"),
        ("key", json.dumps({"type": "authorized_user", "client_email": "a"}), "type is 'authorized_user'"),
        ("key", json.dumps({"type": "service_account", "client_email": "a@b"}), "has no private_key"),
        ("key", json.dumps({"client_email": "a@b", "private_key": "nope"}), "is not a PEM private key"),
        ("client-123", "{}", "needs client_id = file .* or client_id = key"),
        ("key", "", "needs client_secret"),
        ("file", "/nonexistent/sa.json", "cannot read the service account key file .*/nonexistent/sa.json"),
    ],
)
def test_service_account_key_problems(mode: str, value: str, message: str) -> None:
    with pytest.raises(CredentialError, match=message):
        load_service_account_key(mode, value)


def test_a_pasted_key_is_never_echoed_as_a_path(keys: KeyFiles) -> None:
    text = service_key_json(keys.key_pem)
    with pytest.raises(CredentialError) as info:
        load_service_account_key("file", text)
    assert "use client_id = key" in str(info.value)
    assert "PRIVATE" not in str(info.value) and "mailer@" not in str(info.value)


def test_multiline_key_in_the_config_file_parses(keys: KeyFiles, tmp_path: Path) -> None:
    key_json = textwrap.indent(service_key_json(keys.key_pem), "\t")
    config_path = tmp_path / "emailproxy.config"
    config_path.write_text(
        "[IMAP-1993]\nserver_address = imap.gmail.com\nserver_port = 993\n\n"
        "[emailproxy]\nallow_catch_all_accounts = True\n\n"
        f"[@example.com]\ntoken_url = https://oauth2.googleapis.com/token\noauth2_scope = {SCOPE}\n"
        f"oauth2_flow = service_account\nclient_id = key\nclient_secret =\n{key_json}\n"
    )
    account = load_config(config_path).find_account("boss@example.com")
    assert account is not None
    request = flows.fresh_token_request(account, "boss@example.com", "pw", account.client_secret, NOW)
    assert verify_jwt(request.form["assertion"], keys.key.public_key())[1]["sub"] == "boss@example.com"


def test_a_service_account_key_without_type_is_accepted(keys: KeyFiles) -> None:
    key = ServiceAccountKey.from_json(service_key_json(keys.key_pem, type=None), "test key")
    assert key.client_email.startswith("mailer@")  # a key without "type" is accepted


# ---------------------------------------------------------------------------------- token manager


class RecordingEndpoint:
    def __init__(self, *responses: dict[str, Any]) -> None:
        self.responses = list(responses)
        self.requests: list[tuple[str, dict[str, str]]] = []

    def post(self, url: str, form: Mapping[str, str]) -> dict[str, Any]:
        self.requests.append((url, dict(form)))
        if not self.responses:
            raise AssertionError("unexpected token request")
        return self.responses.pop(0)


class RecordingStore:
    def __init__(self) -> None:
        self.saves: list[tuple[str, dict[str, str | None]]] = []

    def save(self, section: str, changes: Mapping[str, str | None]) -> None:
        self.saves.append((section, dict(changes)))


class Clock:
    def __init__(self) -> None:
        self.now = float(NOW)

    def __call__(self) -> float:
        return self.now


def manager_for(tmp_path: Path, section_text: str, *responses: dict[str, Any], **options: str):
    global_options = "".join(f"{k} = {v}\n" for k, v in options.items())
    path = tmp_path / "emailproxy.config"
    path.write_text(
        "[IMAP-1993]\nserver_address = imap.example.com\nserver_port = 993\n\n"
        f"[emailproxy]\nallow_catch_all_accounts = True\n{global_options}\n{section_text}"
    )
    endpoint, store, clock = RecordingEndpoint(*responses), RecordingStore(), Clock()
    manager = TokenManager(load_config(path), store, endpoint, clock)
    return manager, endpoint, store, clock


def login(manager: TokenManager, username: str, password: str = PASSWORD) -> Any:
    return asyncio.run(manager.get_token(username, Secret(password)))


def test_service_account_logins_get_new_assertions_and_never_refresh(keys: KeyFiles, tmp_path: Path) -> None:
    key_file = tmp_path / "sa.json"
    key_file.write_text(service_key_json(keys.key_pem))
    manager, endpoint, store, clock = manager_for(
        tmp_path,
        f"[@example.com]\ntoken_url = https://oauth2.googleapis.com/token\noauth2_scope = {SCOPE}\n"
        f"oauth2_flow = service_account\nclient_id = file\nclient_secret = {key_file}\n",
        {"access_token": "at-1", "expires_in": 3599, "token_type": "Bearer"},
        {"access_token": "at-2", "expires_in": 3599, "token_type": "Bearer"},
    )
    first = login(manager, "alice@example.com")
    assert isinstance(first, TokenOk) and first.access_token.reveal() == "at-1"
    assert login(manager, "alice@example.com") == first  # cached: no second request
    assert len(endpoint.requests) == 1
    url, form = endpoint.requests[0]
    assert url == GOOGLE_TOKEN_URI and form["grant_type"] == JWT_BEARER_GRANT
    assert verify_jwt(form["assertion"], keys.key.public_key())[1]["sub"] == "alice@example.com"
    saved = store.saves[-1]
    assert saved[0] == "alice@example.com" and "refresh_token" not in saved[1]

    clock.now += 3599 - 599  # inside the expiry margin: a new assertion, not a refresh
    second = login(manager, "alice@example.com")
    assert isinstance(second, TokenOk) and second.access_token.reveal() == "at-2"
    assert [form["grant_type"] for _, form in endpoint.requests] == [JWT_BEARER_GRANT] * 2
    claims = verify_jwt(endpoint.requests[1][1]["assertion"], keys.key.public_key())[1]
    assert claims["iat"] == int(clock.now)


def test_service_account_wrong_password_is_refused_and_nothing_deleted(
    keys: KeyFiles, tmp_path: Path
) -> None:
    manager, endpoint, store, _ = manager_for(
        tmp_path,
        f"[@example.com]\ntoken_url = {GOOGLE_TOKEN_URI}\noauth2_scope = {SCOPE}\n"
        "oauth2_flow = service_account\nclient_id = key\nclient_secret =\n"
        + textwrap.indent(service_key_json(keys.key_pem), "  ")
        + "\n",
        {"access_token": "at-1", "expires_in": 3599},
    )
    assert isinstance(login(manager, "bob@example.com"), TokenOk)
    saves = len(store.saves)
    result = login(manager, "bob@example.com", "wrong-password")
    assert result == TokenFailure(
        "Login failed - the password for account bob@example.com is incorrect", local=True
    )
    assert len(endpoint.requests) == 1 and len(store.saves) == saves


def test_certificate_account_sends_assertions_on_token_and_refresh(keys: KeyFiles, tmp_path: Path) -> None:
    manager, endpoint, _, clock = manager_for(
        tmp_path,
        f"[app@example.com]\ntoken_url = {TOKEN_URL}\noauth2_scope = https://outlook.office365.com/.default\n"
        f"oauth2_flow = password\nclient_id = app-client-id\njwt_certificate_path = {keys.cert_path}\n"
        f"jwt_key_path = {keys.key_path}\n",
        {"access_token": "at-1", "refresh_token": "rt-1", "expires_in": 3600},
        {"access_token": "at-2", "expires_in": 3600},
    )
    assert isinstance(login(manager, "app@example.com"), TokenOk)
    clock.now += 3600
    result = login(manager, "app@example.com")
    assert isinstance(result, TokenOk) and result.access_token.reveal() == "at-2"
    grants = [form["grant_type"] for _, form in endpoint.requests]
    assert grants == ["password", "refresh_token"]
    for (url, form), when in zip(endpoint.requests, (NOW, NOW + 3600), strict=True):
        assert url == TOKEN_URL and "client_secret" not in form
        claims = verify_jwt(form["client_assertion"], keys.certificate.public_key())[1]  # type: ignore[arg-type]
        assert claims["aud"] == TOKEN_URL and claims["nbf"] == when


def test_certificate_beats_the_login_password_fallback(keys: KeyFiles, tmp_path: Path) -> None:
    manager, endpoint, _, _ = manager_for(
        tmp_path,
        f"[app@example.com]\ntoken_url = {TOKEN_URL}\noauth2_scope = https://outlook.office365.com/.default\n"
        f"oauth2_flow = client_credentials\nclient_id = app-client-id\n"
        f"jwt_certificate_path = {keys.cert_path}\njwt_key_path = {keys.key_path}\n",
        {"access_token": "at-1", "expires_in": 3600},
        use_login_password_as_client_credentials_secret="True",
    )
    assert isinstance(login(manager, "app@example.com"), TokenOk)
    form = endpoint.requests[0][1]
    assert "client_secret" not in form and PASSWORD not in form.values()
    verify_jwt(form["client_assertion"], keys.key.public_key())


def test_configured_secret_wins_in_the_token_manager(keys: KeyFiles, tmp_path: Path) -> None:
    manager, endpoint, _, _ = manager_for(
        tmp_path,
        f"[app@example.com]\ntoken_url = {TOKEN_URL}\noauth2_scope = https://outlook.office365.com/.default\n"
        f"oauth2_flow = client_credentials\nclient_id = app-client-id\nclient_secret = plain-secret\n"
        f"jwt_certificate_path = {keys.cert_path}\njwt_key_path = {keys.key_path}\n",
        {"access_token": "at-1", "expires_in": 3600},
    )
    assert isinstance(login(manager, "app@example.com"), TokenOk)
    form = endpoint.requests[0][1]
    assert form["client_secret"] == "plain-secret" and "client_assertion" not in form


def test_unusable_key_gives_a_named_failure_without_a_request(
    keys: KeyFiles, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manager, endpoint, _, _ = manager_for(
        tmp_path,
        f"[app@example.com]\ntoken_url = {TOKEN_URL}\noauth2_scope = https://outlook.office365.com/.default\n"
        f"oauth2_flow = client_credentials\nclient_id = app-client-id\n"
        f"jwt_certificate_path = {keys.cert_path}\njwt_key_path = {keys.key_path}\n",
    )
    keys.key_path.write_bytes(b"garbage")  # broken after start-up
    with caplog.at_level(logging.DEBUG):
        result = login(manager, "app@example.com")
    assert isinstance(result, TokenFailure)
    assert result.message == (
        f"Login failed for account app@example.com: jwt_key_path '{keys.key_path}' is not a PEM private key"
    )
    assert endpoint.requests == [] and "Traceback" not in caplog.text


def test_service_account_with_bad_client_id_fails_clearly(tmp_path: Path) -> None:
    manager, endpoint, _, _ = manager_for(
        tmp_path,
        f"[svc@example.com]\ntoken_url = {GOOGLE_TOKEN_URI}\noauth2_scope = {SCOPE}\n"
        "oauth2_flow = service_account\nclient_id = 1234.apps.googleusercontent.com\nclient_secret = x\n",
    )
    result = login(manager, "svc@example.com")
    assert isinstance(result, TokenFailure) and "client_id = file" in result.message
    assert endpoint.requests == []


def test_cached_tokens_of_a_certificate_account_are_used_without_reading_keys(
    keys: KeyFiles, tmp_path: Path
) -> None:
    manager, endpoint, _, _ = manager_for(
        tmp_path,
        f"[app@example.com]\ntoken_url = {TOKEN_URL}\noauth2_scope = https://outlook.office365.com/.default\n"
        f"oauth2_flow = client_credentials\nclient_id = app-client-id\n"
        f"jwt_certificate_path = {keys.cert_path}\njwt_key_path = {keys.key_path}\n",
        {"access_token": "at-1", "expires_in": 3600},
    )
    assert isinstance(login(manager, "app@example.com"), TokenOk)
    keys.key_path.unlink()
    assert isinstance(login(manager, "app@example.com"), TokenOk)
    assert len(endpoint.requests) == 1


# ---------------------------------------------------------------------------------- config validation


def _config(tmp_path: Path, account: str) -> Path:
    path = tmp_path / "emailproxy.config"
    path.write_text(
        "[IMAP-1993]\nserver_address = imap.example.com\nserver_port = 993\n\n"
        "[emailproxy]\nallow_catch_all_accounts = True\n\n" + account
    )
    return path


def _cert_section(cert: Path | str, key: Path | str, extra: str = "", name: str = "app@example.com") -> str:
    return (
        f"[{name}]\ntoken_url = {TOKEN_URL}\noauth2_scope = https://outlook.office365.com/.default\n"
        f"oauth2_flow = client_credentials\nclient_id = app\njwt_certificate_path = {cert}\n"
        f"jwt_key_path = {key}\n{extra}"
    )


def test_config_accepts_readable_certificate_files(keys: KeyFiles, tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, _cert_section(keys.cert_path, keys.key_path)))
    assert not [w for w in config.warnings if "jwt" in w]


@pytest.mark.parametrize("key", ["jwt_certificate_path", "jwt_key_path"])
@pytest.mark.parametrize("section", ["app@example.com", "@example.com"])
def test_config_names_a_missing_certificate_file(
    keys: KeyFiles, tmp_path: Path, key: str, section: str
) -> None:
    missing = tmp_path / "missing.pem"
    files = {"jwt_certificate_path": keys.cert_path, "jwt_key_path": keys.key_path, key: missing}
    text = _cert_section(files["jwt_certificate_path"], files["jwt_key_path"], name=section)
    with pytest.raises(ConfigError) as info:
        load_config(_config(tmp_path, text))
    assert info.value.key == key and info.value.section == section
    assert "missing.pem" in str(info.value) and "not found" in str(info.value)


def test_config_rejects_a_directory_as_key_file(keys: KeyFiles, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_config(tmp_path, _cert_section(keys.cert_path, tmp_path)))
    assert info.value.key == "jwt_key_path" and "is a directory" in str(info.value)


def test_config_with_a_secret_only_warns_about_certificate_files(tmp_path: Path) -> None:
    text = _cert_section("/nonexistent/c.pem", "/nonexistent/k.pem", "client_secret = s\n")
    config = load_config(_config(tmp_path, text))
    assert any("jwt_certificate_path and jwt_key_path are not used" in w for w in config.warnings)


def test_config_warns_when_only_one_certificate_setting_is_given(tmp_path: Path) -> None:
    text = (
        f"[app@example.com]\ntoken_url = {TOKEN_URL}\noauth2_scope = https://outlook.office365.com/.default\n"
        "oauth2_flow = client_credentials\nclient_id = app\nclient_secret = s\njwt_key_path = /nowhere.pem\n"
    )
    config = load_config(_config(tmp_path, text))
    assert any("only one is set" in w for w in config.warnings)


def test_config_names_a_missing_service_account_key_file(tmp_path: Path) -> None:
    text = (
        f"[@example.com]\ntoken_url = {GOOGLE_TOKEN_URI}\noauth2_scope = {SCOPE}\n"
        f"oauth2_flow = service_account\nclient_id = file\nclient_secret = {tmp_path / 'sa.json'}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(_config(tmp_path, text))
    assert info.value.key == "client_secret" and "sa.json" in str(info.value)
    (tmp_path / "sa.json").write_text("{}")
    load_config(_config(tmp_path, text))  # readable now: contents are checked at login


def test_config_refuses_json_given_as_a_key_file_path_without_echoing_it(tmp_path: Path) -> None:
    text = (
        f"[@example.com]\ntoken_url = {GOOGLE_TOKEN_URI}\noauth2_scope = {SCOPE}\n"
        "oauth2_flow = service_account\nclient_id = file\nclient_secret = {\n"
        '  "private_key": "SECRET-KEY-MATERIAL"\n  }\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(_config(tmp_path, text))
    assert info.value.key == "client_secret" and "SECRET-KEY-MATERIAL" not in str(info.value)


def test_config_warns_about_an_unknown_service_account_client_id(tmp_path: Path) -> None:
    text = (
        f"[svc@example.com]\ntoken_url = {GOOGLE_TOKEN_URI}\noauth2_scope = {SCOPE}\n"
        "oauth2_flow = service_account\nclient_id = 123.apps.googleusercontent.com\nclient_secret = x\n"
    )
    config = load_config(_config(tmp_path, text))
    assert any("client_id = file" in w and "'client_id'" in w for w in config.warnings)


def test_an_encrypted_client_secret_wins_over_the_certificate(keys: KeyFiles, tmp_path: Path) -> None:
    salt = bytes(range(16))
    fernet = Fernet(fernet_key(derive_key(PASSWORD, salt, ITERATIONS)))
    encrypted = fernet.encrypt(b"stored-secret").decode()
    extra = (
        f"token_salt = {base64.b64encode(salt).decode()}\ntoken_iterations = {ITERATIONS}\n"
        f"client_secret_encrypted = {encrypted}\n"
    )
    path = _config(tmp_path, _cert_section("/nonexistent/c.pem", "/nonexistent/k.pem", extra))
    endpoint = RecordingEndpoint({"access_token": "at-1", "expires_in": 3600})
    manager = TokenManager(load_config(path), RecordingStore(), endpoint, Clock())
    assert isinstance(login(manager, "app@example.com"), TokenOk)
    form = endpoint.requests[0][1]
    assert form["client_secret"] == "stored-secret" and "client_assertion" not in form
