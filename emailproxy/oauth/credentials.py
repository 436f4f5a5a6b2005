"""How the proxy proves who it is to a token endpoint: client secrets, certificates and service accounts.

* **Client secret** (RFC 6749 section 2.3.1): ``client_id`` and ``client_secret`` in the form.
* **Certificate** (RFC 7523 section 2.2, Microsoft's "certificate credentials"): with ``jwt_certificate_path``
  and ``jwt_key_path`` set and no client secret (plain or encrypted), the form carries a short-lived JWT
  client assertion signed with the key (RS256). A configured client secret wins, with a warning, as in the
  reference. The assertion goes with every token and refresh request.
* **Google service account** (RFC 7523 section 2.1): ``oauth2_flow = service_account``; ``client_id = file``
  means ``client_secret`` is the path of the JSON key file, ``client_id = key`` means it is the JSON itself.
  The proxy signs a JWT bearer assertion that impersonates the login user name and exchanges it at the key's
  ``token_uri`` (else ``token_url``). No refresh token comes back: a new assertion is made each time.

JWTs are built here with ``cryptography`` alone (compact serialisation, base64url without padding).
Everything here blocks (file reads, RSA signing): call it from a worker thread. Error texts name the
setting and the file, never key material.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from emailproxy.config import AccountConfig

logger = logging.getLogger("emailproxy.tokens")

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: Lifetime of a certificate client assertion (the reference's value).
CLIENT_ASSERTION_LIFETIME = 300
#: Lifetime asked for in a service-account assertion (Google's maximum).
SERVICE_ACCOUNT_LIFETIME = 3600
#: ``client_id`` values of a service-account account: what ``client_secret`` holds.
KEY_FILE = "file"
KEY_TEXT = "key"


class CredentialError(Exception):
    """The account's credentials cannot be used. ``str()`` names the setting; it never holds key material."""


# ---------------------------------------------------------------------------------------------- JWT


def b64url(data: bytes) -> str:
    """base64url without padding (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json_part(value: Mapping[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode("utf-8"))


def encode_jwt(header: Mapping[str, Any], claims: Mapping[str, Any], key: rsa.RSAPrivateKey) -> str:
    """A compact JWS signed with RS256 (RSASSA-PKCS1-v1_5 with SHA-256). ``alg`` is set here."""
    signing_input = f"{_json_part({**header, 'alg': 'RS256'})}.{_json_part(claims)}"
    signature = key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


def load_rsa_key(data: bytes, what: str) -> rsa.RSAPrivateKey:
    """An unencrypted PEM RSA private key (PKCS#1 or PKCS#8). ``what`` names its origin in errors."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's answer to an encrypted key loaded without a password
        raise CredentialError(f"{what} is protected by a passphrase; use a key without one") from None
    except (ValueError, UnsupportedAlgorithm):
        raise CredentialError(f"{what} is not a PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CredentialError(f"{what} is not an RSA key (RS256 signatures need one)")
    return key


def sha256_thumbprint(certificate: x509.Certificate) -> str:
    """The ``x5t#S256`` value as the reference writes it: urlsafe base64 of the SHA-256 fingerprint,
    with ``=`` padding."""
    return base64.urlsafe_b64encode(certificate.fingerprint(hashes.SHA256())).decode("ascii")


def read_key_file(path: str, key: str) -> bytes:
    """The bytes of a key or certificate file named by the setting ``key``; CredentialError otherwise."""
    try:
        return Path(path).read_bytes()
    except IsADirectoryError:
        raise CredentialError(f"{key} '{path}' is a directory, not a file") from None
    except OSError as exc:
        raise CredentialError(f"cannot read {key} '{path}': {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------- certificate


def uses_certificate(account: AccountConfig) -> bool:
    """Both certificate settings are present (whether they are used also depends on the client secret)."""
    return bool(account.jwt_certificate_path and account.jwt_key_path)


def chosen_secret(account: AccountConfig, client_secret: str | None) -> str | None:
    """The secret a request authenticates with, or None (certificate or public client): a secret, when
    there is one, beats certificate settings (as in the reference), which is logged, since the certificate
    then goes unused."""
    if not client_secret:
        return None
    if uses_certificate(account):
        logger.warning(
            "Account %s has both a client secret and jwt_certificate_path/jwt_key_path; using the "
            "client secret (remove it to use the certificate)",
            account.username,
        )
    return client_secret


def client_assertion(account: AccountConfig, audience: str, now: float | None = None) -> str:
    """A signed client assertion for ``account``'s certificate, for the token endpoint ``audience``."""
    cert_path, key_path = account.jwt_certificate_path, account.jwt_key_path
    if not cert_path or not key_path:
        raise CredentialError("certificate credentials need both jwt_certificate_path and jwt_key_path")
    try:
        certificate = x509.load_pem_x509_certificate(read_key_file(cert_path, "jwt_certificate_path"))
    except ValueError:
        raise CredentialError(f"jwt_certificate_path '{cert_path}' is not a PEM certificate") from None
    key = load_rsa_key(read_key_file(key_path, "jwt_key_path"), f"jwt_key_path '{key_path}'")
    issued = int(time.time() if now is None else now)
    client_id = account.client_id or ""
    claims = {
        "aud": audience,
        "iss": client_id,
        "sub": client_id,
        "jti": str(uuid.uuid4()),
        "nbf": issued,
        "exp": issued + CLIENT_ASSERTION_LIFETIME,
    }
    header = {"typ": "JWT", "x5t#S256": sha256_thumbprint(certificate)}
    return encode_jwt(header, claims, key)


def client_fields(
    account: AccountConfig, client_secret: str | None, audience: str, now: float | None = None
) -> dict[str, str]:
    """The client-authentication fields of a token request to ``audience`` (the token endpoint URL).

    ``client_secret`` is the secret to send (plain, decrypted or the login password), as the caller chose
    it; when there is one it wins over certificate settings, as in the reference.
    """
    form = {"client_id": account.client_id or ""}
    if (secret := chosen_secret(account, client_secret)) is not None:
        form["client_secret"] = secret
    elif uses_certificate(account):
        form["client_assertion_type"] = CLIENT_ASSERTION_TYPE
        form["client_assertion"] = client_assertion(account, audience, now)
    return form


# ------------------------------------------------------------------------------------- service account


@dataclass(frozen=True, slots=True)
class ServiceAccountKey:
    """The parts of a Google service-account JSON key the proxy uses."""

    client_email: str
    private_key: rsa.RSAPrivateKey = field(repr=False)
    token_uri: str | None = None
    key_id: str | None = None

    @classmethod
    def from_json(cls, text: str, what: str) -> ServiceAccountKey:
        """Parse a JSON key; ``what`` names where it came from in errors."""
        try:
            data = json.loads(text, strict=False)  # strict=False: tolerate raw line breaks in pasted values
        except json.JSONDecodeError as exc:
            raise CredentialError(
                f"{what} is not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})"
            ) from None
        if not isinstance(data, dict):
            raise CredentialError(f"{what} is not a JSON object")
        kind = data.get("type", "service_account")
        if kind != "service_account":
            raise CredentialError(f"{what} is not a service account key (its type is '{kind}')")
        missing = [name for name in ("client_email", "private_key") if not isinstance(data.get(name), str)]
        if missing:
            raise CredentialError(f"{what} has no {' or '.join(missing)}")
        token_uri = data.get("token_uri")
        key_id = data.get("private_key_id")
        return cls(
            client_email=data["client_email"],
            private_key=load_rsa_key(data["private_key"].encode("utf-8"), f"the private_key in {what}"),
            token_uri=token_uri if isinstance(token_uri, str) and token_uri else None,
            key_id=key_id if isinstance(key_id, str) and key_id else None,
        )


def load_service_account_key(client_id: str | None, client_secret: str | None) -> ServiceAccountKey:
    """The key of a ``service_account`` account: ``client_id`` says whether ``client_secret`` is a path
    (``file``) or the JSON itself (``key``)."""
    mode = (client_id or "").strip().lower()
    if mode not in (KEY_FILE, KEY_TEXT):
        raise CredentialError(
            "the service_account flow needs client_id = file (client_secret is the path of the JSON key "
            "file) or client_id = key (client_secret is the JSON key itself)"
        )
    if not client_secret:
        raise CredentialError("the service_account flow needs client_secret (the JSON key or its path)")
    if mode == KEY_FILE:
        path = client_secret.strip()
        if path.startswith("{") or "\n" in path:  # never echo a pasted key as if it were a path
            raise CredentialError("client_id = file, but client_secret holds a JSON key: use client_id = key")
        what = f"the service account key file '{path}'"
        data = read_key_file(path, "the service account key file (client_secret)")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise CredentialError(f"{what} is not UTF-8 text") from None
        return ServiceAccountKey.from_json(text, what)
    return ServiceAccountKey.from_json(client_secret, "the service account key in client_secret")


def service_account_assertion(
    key: ServiceAccountKey, subject: str, scope: str, audience: str, now: float | None = None
) -> str:
    """An RFC 7523 JWT bearer assertion: ``key``'s service account acting as ``subject`` for ``scope``."""
    issued = int(time.time() if now is None else now)
    claims = {
        "iss": key.client_email,
        "sub": subject,
        "scope": " ".join(scope.split()),
        "aud": audience,
        "iat": issued,
        "exp": issued + SERVICE_ACCOUNT_LIFETIME,
    }
    header: dict[str, str] = {"typ": "JWT"}
    if key.key_id:
        header["kid"] = key.key_id
    return encode_jwt(header, claims, key.private_key)


def service_account_request(
    account: AccountConfig, username: str, client_secret: str | None, now: float | None = None
) -> tuple[str, dict[str, str]]:
    """(token endpoint URL, form) for a service-account token impersonating ``username``.

    The endpoint is the key's ``token_uri`` when it has one (as Google's own libraries do), else the
    account's ``token_url``; the assertion's audience is that same URL.
    """
    key = load_service_account_key(account.client_id, client_secret)
    url = key.token_uri or account.token_url
    if not url:
        raise CredentialError("the service_account flow needs token_url (or a token_uri in the key)")
    assertion = service_account_assertion(key, username, account.oauth2_scope or "", url, now)
    return url, {"grant_type": JWT_BEARER_GRANT, "assertion": assertion}


# ---------------------------------------------------------------------------------------------- validation


@dataclass(frozen=True, slots=True)
class SettingProblem:
    """A problem with an account's credential settings, found when the configuration is read."""

    key: str | None
    message: str
    hint: str | None = None
    #: True: logins cannot work, so start-up stops (ConfigError); False: a warning
    fatal: bool = False


def _unreadable(key: str, path: str, what: str) -> SettingProblem | None:
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except FileNotFoundError:
        return SettingProblem(key, f"{what} '{path}' not found", "give the path of an existing file", True)
    except IsADirectoryError:
        return SettingProblem(key, f"'{path}' is a directory, not a {what}", fatal=True)
    except OSError as exc:
        return SettingProblem(key, f"cannot read the {what} '{path}': {exc.strerror or exc}", fatal=True)
    return None


def setting_problems(account: AccountConfig) -> list[SettingProblem]:
    """Credential files that token requests will read must exist and be readable (contents are checked
    when they are used); settings that will be ignored are reported as warnings."""
    if account.permission_url is None and account.oauth2_flow == "service_account":
        mode = (account.client_id or "").strip().lower()
        if mode not in (KEY_FILE, KEY_TEXT):
            message = (
                "the service_account flow needs client_id = file (client_secret is the path of the JSON "
                "key file) or client_id = key (client_secret is the JSON key itself)"
            )
            return [SettingProblem("client_id", message)]
        path = (account.client_secret or "").strip()
        if mode != KEY_FILE or not path:
            return []
        if path.startswith("{") or "\n" in path:  # never echo a pasted key as if it were a path
            hint = "write client_id = key, or put the path of the key file in client_secret"
            return [SettingProblem("client_secret", "client_id = file, but it holds a JSON key", hint, True)]
        problem = _unreadable("client_secret", path, "service account key file")
        return [problem] if problem else []
    cert, key = account.jwt_certificate_path, account.jwt_key_path
    if bool(cert) != bool(key):
        message = (
            "certificate credentials need both jwt_certificate_path and jwt_key_path; only one is set, "
            "so the certificate is not used"
        )
        return [SettingProblem(None, message)]
    if not cert or not key:
        return []
    if account.client_secret or account.cached.client_secret_encrypted:
        message = "a client secret is set, so jwt_certificate_path and jwt_key_path are not used"
        return [
            SettingProblem(None, message, "remove the client secret to authenticate with the certificate")
        ]
    found = (
        _unreadable("jwt_certificate_path", cert, "certificate file"),
        _unreadable("jwt_key_path", key, "private key file"),
    )
    return [problem for problem in found if problem is not None]
