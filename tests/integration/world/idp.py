"""A test OAuth 2.0 identity provider shaped like the Microsoft identity platform (v2.0 endpoints).

HTTPS (test CA) on 127.0.0.1, served by daemon threads of the test process:

- `GET  /{tenant}/v2.0/.well-known/openid-configuration` (also `/{tenant}/.well-known/...` for OIDC)
- `GET  /{tenant}/oauth2/v2.0/authorize`: "signs in" `authorize_user` (else the `login_hint`) and redirects
  (302) to `redirect_uri` with `code` and `state`; the PKCE challenge and the nonce stay with the code.
- `POST /{tenant}/oauth2/v2.0/devicecode`: starts a device flow (see `approve_device`, `device_auto_approve`).
- `GET  /common/userrealm/{user}`: user realm discovery (msal's step before ROPC): always a managed account.
- `POST /{tenant}/oauth2/v2.0/token`: client_credentials, password, refresh_token, authorization_code and
  device_code grants, with Microsoft-shaped JSON errors (`error`, `error_description` "AADSTS...");
  client assertions are checked (signature, iss/sub, aud = this URL, x5t#S256). Also the RFC 7523 JWT bearer
  grant of Google service accounts (see `register_service_account`).

A second, plain-HTTP loopback server answers `POST /_check` (form or JSON: user, token, service) for the
mail servers' checkpassword program: 200 when the token is valid now for that user (app-only tokens are
valid for every user), else 403. Every check is kept in `check_log`. All test controls are thread-safe.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import secrets
import socket
import ssl
import struct
import threading
import time
import urllib.parse
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests

from tests.integration.world.ca import CertificateFiles
from tests.integration.world.ports import LOOPBACK

DEFAULT_TENANT = "tenant-1"
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"  # RFC 7523 2.1 (Google service accounts)
_ID_TOKEN_KEY = b"emailproxy-test-world-id-token-key"
_ENDPOINTS = {
    "oauth2/v2.0/token": "token",
    "oauth2/v2.0/authorize": "authorize",
    "oauth2/v2.0/devicecode": "devicecode",
    "v2.0/.well-known/openid-configuration": "openid-configuration",
    ".well-known/openid-configuration": "openid-configuration",
}
# kind: (HTTP status, OAuth error, AADSTS code, description template)
_ERRORS: dict[str, tuple[int, str, int, str]] = {
    "unknown_client": (
        400,
        "unauthorized_client",
        700016,
        "Application with identifier '{client}' was not found.",
    ),
    "no_credential": (
        401,
        "invalid_client",
        7000218,
        "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
    ),
    "bad_secret": (401, "invalid_client", 7000215, "Invalid client secret provided for app '{client}'."),
    "bad_assertion": (401, "invalid_client", 700027, "Client assertion failed: {why}."),
    "scope_not_default": (
        400,
        "invalid_scope",
        1002012,
        "The provided value for scope {scope} is not valid. Client credential flows must have a scope value "
        "with /.default suffixed to the resource identifier (application ID URI).",
    ),
    "bad_password": (
        400,
        "invalid_grant",
        50126,
        "Error validating credentials due to invalid username or password.",
    ),
    "bad_refresh": (400, "invalid_grant", 700082, "The refresh token has expired or is invalid."),
    "bad_code": (400, "invalid_grant", 70000, "The provided authorization code is invalid."),
    "bad_redirect": (
        400,
        "invalid_grant",
        50011,
        "The redirect URI does not match the authorization request.",
    ),
    "bad_verifier": (400, "invalid_grant", 501481, "The code_verifier does not match the code_challenge."),
    "bad_device_code": (400, "invalid_grant", 70000, "The device code is invalid."),
    "device_expired": (400, "expired_token", 70020, "The device code has expired."),
    "device_declined": (400, "authorization_declined", 70021, "The user declined the sign-in."),
    "device_pending": (400, "authorization_pending", 70016, "The user has not yet completed the sign-in."),
    "device_slow_down": (400, "slow_down", 70016, "Polling too often; slow down."),
    "bad_grant_type": (400, "unsupported_grant_type", 70003, "The grant_type '{grant}' is not supported."),
    "bad_jwt_grant": (400, "invalid_grant", 700027, "Invalid JWT bearer assertion: {why}."),
    "injected": (500, "temporarily_unavailable", 90000, "Injected failure (HTTP {http_status})."),
}


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTPS request the identity provider received (secrets included: this is test code)."""

    method: str
    path: str  # without the query string
    tenant: str | None
    endpoint: str  # "token", "authorize", "devicecode", "openid-configuration" or "unknown"
    grant_type: str | None
    form: dict[str, str]  # POST form fields (last value wins)
    query: dict[str, str]  # query-string fields
    headers: dict[str, str]
    time: float


@dataclass(frozen=True)
class TokenCheck:
    """One token check asked for by a mail server."""

    user: str
    token: str
    ok: bool
    service: str  # "imap", "pop3" or "smtp" as Dovecot names it
    reason: str  # "valid", "unknown token", "expired", "revoked" or "wrong user"


@dataclass
class IssuedToken:
    """An access token the provider knows. `user` None means an app-only (client credentials) token."""

    access_token: str
    user: str | None
    expires_at: float
    client_id: str | None = None
    refresh_token: str | None = None
    scope: str = ""
    grant_type: str = "issued"  # the grant that produced it; "issued" for `issue_token`
    revoked: bool = False


@dataclass
class _Client:
    secret: str | None
    certificate_pem: bytes | None


@dataclass
class _Refresh:
    user: str
    client_id: str | None  # None: any client may use it
    revoked: bool = False


@dataclass
class _AuthCode:
    user: str
    client_id: str
    redirect_uri: str
    scope: str
    challenge: str | None
    challenge_method: str
    nonce: str | None
    used: bool = False


@dataclass
class _Device:
    device_code: str
    user_code: str
    client_id: str
    scope: str
    expires_at: float
    user: str | None = None
    declined: bool = False


@dataclass
class _Failure:
    status: int
    body: bytes
    remaining: int
    path: str


@dataclass
class _Answer:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


class OAuthError(Exception):
    """Raised inside the endpoints; becomes a Microsoft-shaped JSON error response."""

    def __init__(self, kind: str, status: int | None = None, **details: object) -> None:
        default_status, self.error, self.code, template = _ERRORS[kind]
        self.status = default_status if status is None else status
        self.description = template.format(**details)
        super().__init__(self.description)

    def answer(self) -> _Answer:
        body = {
            "error": self.error,
            "error_description": f"AADSTS{self.code}: {self.description}",
            "error_codes": [self.code],
            "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
            "trace_id": str(uuid.uuid4()),
            "correlation_id": str(uuid.uuid4()),
        }
        return _Answer(self.status, json.dumps(body).encode())


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _json(payload: Mapping[str, Any], status: int = 200) -> _Answer:
    return _Answer(status, json.dumps(payload).encode())


def pkce_challenge(verifier: str) -> str:
    """The S256 PKCE challenge for a verifier (RFC 7636)."""
    return _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def _thumbprint_problem(header: Mapping[str, Any], certificate_pem: bytes) -> str | None:
    """The x5t#S256 (or legacy x5t) header must name the registered certificate (padding optional)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    certificate = x509.load_pem_x509_certificate(certificate_pem)
    for name, algorithm in (("x5t#S256", hashes.SHA256()), ("x5t", hashes.SHA1())):
        if name in header:
            expected = _b64url(certificate.fingerprint(algorithm))
            if str(header[name]).rstrip("=") != expected:
                return f"the {name} header does not match the registered certificate"
            return None
    return "no x5t#S256 or x5t header"


def jwt_bearer_problem(
    assertion: str, public_pem: bytes, issuer: str, audience: str
) -> tuple[str | None, dict[str, Any]]:
    """Check an RFC 7523 JWT bearer grant assertion (RS256, as Google service accounts sign them):
    (why it is not acceptable or None, its claims). `public_pem` is a certificate or a public key."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    try:
        header_b64, payload_b64, signature_b64 = assertion.split(".")
        header = json.loads(_b64url_decode(header_b64))
        claims = json.loads(_b64url_decode(payload_b64))
        signature = _b64url_decode(signature_b64)
    except ValueError:
        return "malformed JWT", {}
    if not isinstance(claims, dict) or not isinstance(header, dict):
        return "malformed JWT", {}
    key: Any = (
        x509.load_pem_x509_certificate(public_pem).public_key()
        if b"CERTIFICATE" in public_pem
        else serialization.load_pem_public_key(public_pem)
    )
    if header.get("alg") != "RS256" or not isinstance(key, rsa.RSAPublicKey):
        return f"unsupported algorithm {header.get('alg')}", claims
    try:
        key.verify(signature, f"{header_b64}.{payload_b64}".encode(), padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return "bad signature", claims
    now = time.time()
    if claims.get("iss") != issuer:
        return "wrong issuer", claims
    if claims.get("aud") != audience:
        return f"wrong audience {claims.get('aud')!r}", claims
    if not claims.get("scope"):
        return "no scope", claims
    if not claims.get("sub"):
        return "no sub (the mailbox to act as)", claims
    issued, expires = float(claims.get("iat", 0)), float(claims.get("exp", 0))
    if expires < now or issued > now + 60 or expires - issued > 3600:
        return "iat/exp out of range (at most one hour, valid now)", claims
    return None, claims


def assertion_problem(
    assertion: str, client_id: str, certificate_pem: bytes, audience: str | None = None
) -> str | None:
    """Why a private_key_jwt client assertion (RS256/PS256) is not acceptable, or None when it is.
    With `audience`, `aud` must be it; the certificate must be named by `x5t#S256` (or `x5t`)."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    try:
        header_b64, payload_b64, signature_b64 = assertion.split(".")
        header = json.loads(_b64url_decode(header_b64))
        claims = json.loads(_b64url_decode(payload_b64))
        signature = _b64url_decode(signature_b64)
    except ValueError:
        return "malformed JWT"
    key = x509.load_pem_x509_certificate(certificate_pem).public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        return "the registered certificate has no RSA key"
    schemes: dict[str, padding.AsymmetricPadding] = {
        "RS256": padding.PKCS1v15(),
        "PS256": padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH),
    }
    scheme = schemes.get(str(header.get("alg")))
    if scheme is None:
        return f"unsupported algorithm {header.get('alg')}"
    try:
        key.verify(signature, f"{header_b64}.{payload_b64}".encode(), scheme, hashes.SHA256())
    except InvalidSignature:
        return "bad signature"
    if claims.get("iss") != client_id or claims.get("sub") != client_id:
        return "iss and sub must be the client id"
    if float(claims.get("exp", 0)) < time.time():
        return "expired"
    if float(claims.get("nbf", 0)) > time.time() + 60:
        return "not valid yet"
    if audience is not None and claims.get("aud") != audience:
        return f"wrong audience {claims.get('aud')!r}"
    return _thumbprint_problem(header, certificate_pem)


class _HttpsServer(ThreadingHTTPServer):
    """Does the TLS handshake in the request thread, and can play dead (connection reset)."""

    daemon_threads = True
    owner: IdentityProvider

    def __init__(self, address: tuple[str, int], tls: ssl.SSLContext) -> None:
        self.tls = tls
        super().__init__(address, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.owner.is_down:
            # Wait for the client's first TLS bytes (so it is past connect()), then close with SO_LINGER 0:
            # the client sees a connection reset during the handshake.
            request.settimeout(2)
            try:
                request.recv(1)
            except OSError:
                pass
            request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            request.close()
            return
        connection = self.tls.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        try:
            _Handler(connection, client_address, self)
        finally:
            connection.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that drop the connection or fail TLS are expected in tests: stay quiet."""


class _CheckServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: IdentityProvider

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet."""


class _Handler(BaseHTTPRequestHandler):
    server: _HttpsServer | _CheckServer
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        """No stderr noise."""

    def _send(self, answer: _Answer) -> None:
        self.send_response(answer.status)
        headers = {"Content-Type": answer.content_type, "Content-Length": str(len(answer.body))}
        for name, value in {**headers, "Cache-Control": "no-store", **answer.headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(answer.body)

    def do_GET(self) -> None:
        if isinstance(self.server, _CheckServer):
            self._send(_Answer(404, b"not found", "text/plain"))
        else:
            self._send(self.server.owner._handle("GET", self.path, b"", dict(self.headers.items())))

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        if isinstance(self.server, _CheckServer):
            content_type = self.headers.get("Content-Type", "")
            self._send(self.server.owner._handle_check(self.path, body, content_type))
        else:
            self._send(self.server.owner._handle("POST", self.path, body, dict(self.headers.items())))


class IdentityProvider:
    """The test identity provider. `start()`/`stop()` (or `with`); see the module docstring."""

    def __init__(self, certs: CertificateFiles, tenant: str = DEFAULT_TENANT) -> None:
        self.certs = certs
        self.default_tenant = tenant
        self.port = 0  # HTTPS port (stays the same across set_down(mode="refuse"))
        self.check_port = 0  # plain-HTTP port of /_check
        self._lock = threading.RLock()
        self._https: _HttpsServer | None = None
        self._check: _CheckServer | None = None
        self._threads: list[threading.Thread] = []
        self._down_mode: str | None = None
        self._session_secrets: dict[tuple[str, str], str | None] = {}  # survives reset(): see session_secrets
        self._reset_state()

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._check = _CheckServer((LOOPBACK, 0), _Handler)
        self._check.owner = self
        self.check_port = self._check.server_address[1]
        self._serve(self._check)
        self._start_https(0)

    def _start_https(self, port: int) -> None:
        server = _HttpsServer((LOOPBACK, port), self.certs.server_context())
        server.owner = self
        self._https = server
        self.port = server.server_address[1]
        self._serve(server)

    def _serve(self, server: ThreadingHTTPServer) -> None:
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="test-idp", daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        for server in (self._https, self._check):
            if server is not None:
                server.shutdown()
                server.server_close()
        self._https = self._check = None
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()

    def __enter__(self) -> IdentityProvider:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses -----------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"https://{LOOPBACK}:{self.port}"

    def authority(self, tenant: str | None = None) -> str:
        """`https://127.0.0.1:PORT/{tenant}`: an msal authority (use `instance_discovery=False`)."""
        return f"{self.base_url}/{tenant or self.default_tenant}"

    def token_url(self, tenant: str | None = None) -> str:
        return f"{self.authority(tenant)}/oauth2/v2.0/token"

    def authorize_url(self, tenant: str | None = None) -> str:
        """The `permission_url` of a Microsoft-style account."""
        return f"{self.authority(tenant)}/oauth2/v2.0/authorize"

    def devicecode_url(self, tenant: str | None = None) -> str:
        return f"{self.authority(tenant)}/oauth2/v2.0/devicecode"

    def openid_configuration_url(self, tenant: str | None = None) -> str:
        return f"{self.authority(tenant)}/v2.0/.well-known/openid-configuration"

    @property
    def check_url(self) -> str:
        """Plain-HTTP loopback endpoint the mail servers' checkpassword program posts to."""
        return f"http://{LOOPBACK}:{self.check_port}/_check"

    def session(self) -> requests.Session:
        """A requests session that trusts the test CA, ignoring REQUESTS_CA_BUNDLE and proxy variables."""
        http = requests.Session()
        http.trust_env = False
        http.verify = str(self.certs.ca_path)
        return http

    # -- test controls -------------------------------------------------------------------------------------

    def _reset_state(self) -> None:
        with self._lock:
            self._clients: dict[str, _Client] = {}
            self._service_accounts: dict[str, bytes] = {}  # client_email -> certificate or public key PEM
            self._users: dict[str, str] = {}
            self._tokens: dict[str, IssuedToken] = {}
            self._refresh: dict[str, _Refresh] = {}
            self._codes: dict[str, _AuthCode] = {}
            self._devices: dict[str, _Device] = {}
            self._failures: list[_Failure] = []
            self._delays: list[tuple[float, str | None]] = []
            self._requests: list[RecordedRequest] = []
            self._checks: list[TokenCheck] = []
            self._issued: list[IssuedToken] = []
            self.expires_in: int = 3600  # lifetime of tokens the token endpoint issues
            self.rotate_refresh_tokens = False  # True: each refresh returns a new refresh token, old one dies
            self.authorize_user: str | None = None  # who "signs in" at /authorize (default: login_hint)
            self.authorize_error: str | None = None  # e.g. "access_denied": /authorize redirects with it
            self.device_auto_approve: str | None = None  # user who approves every device code at first poll
            self.device_interval = 1  # polling interval the devicecode endpoint announces
            self.device_slow_down = 0  # answer this many of the next device-code polls with slow_down

    def reset(self) -> None:
        """Forget everything (clients, users, tokens, logs, failures, delays) and come back up."""
        self.set_down(False)
        self._harvest_secrets()
        self._reset_state()

    def register_client(
        self, client_id: str, secret: str | None = None, certificate_pem: bytes | None = None
    ) -> None:
        """Register an application. Without secret or certificate it is a public client (no client
        credentials grant); with `certificate_pem`, private_key_jwt assertions (RS256/PS256) are accepted."""
        with self._lock:
            self._clients[client_id] = _Client(secret, certificate_pem)

    def register_service_account(self, client_email: str, public_pem: bytes) -> None:
        """Register a service account (its certificate or public key PEM) for the RFC 7523 JWT bearer grant
        (`urn:ietf:params:oauth:grant-type:jwt-bearer`, as Google's token endpoint takes it): a valid
        assertion gets a token for the user in its `sub` claim, and no refresh token."""
        with self._lock:
            self._service_accounts[client_email] = public_pem

    def register_user(self, user: str, password: str) -> None:
        """Register a user for the password (ROPC) grant."""
        with self._lock:
            self._users[user.casefold()] = password

    def issue_token(
        self,
        user: str | None,
        token: str | None = None,
        expires_in: float = 3600,
        refresh_token: str | None = None,
        client_id: str | None = None,
    ) -> str:
        """Make `token` (or a new random one) valid for `user` (None: app-only) for `expires_in` seconds
        (negative: already expired) and return it. `refresh_token`, if given, is registered for `user` (for
        any client unless `client_id`)."""
        access = token or f"at-{secrets.token_urlsafe(24)}"
        if refresh_token is not None and user is None:
            raise ValueError("a refresh token needs a user")
        with self._lock:
            self._tokens[access] = IssuedToken(
                access, user, time.time() + expires_in, client_id, refresh_token
            )
            if refresh_token is not None and user is not None:
                self._refresh[refresh_token] = _Refresh(user, client_id)
        return access

    def revoke(self, token: str) -> None:
        """Invalidate an access or refresh token."""
        with self._lock:
            if token in self._tokens:
                self._tokens[token].revoked = True
            if token in self._refresh:
                self._refresh[token].revoked = True

    def revoke_user(self, user: str) -> None:
        """Invalidate every access and refresh token of `user`."""
        with self._lock:
            for issued in self._tokens.values():
                if issued.user is not None and issued.user.casefold() == user.casefold():
                    issued.revoked = True
            for refresh in self._refresh.values():
                if refresh.user.casefold() == user.casefold():
                    refresh.revoked = True

    def expire(self, token: str) -> None:
        """Make an access token expired now."""
        with self._lock:
            self._tokens[token].expires_at = time.time() - 1

    def approve_device(self, user_code: str, user: str) -> None:
        """Complete a pending device flow as `user`."""
        with self._lock:
            self._device(user_code).user = user

    def decline_device(self, user_code: str) -> None:
        with self._lock:
            self._device(user_code).declined = True

    def _device(self, user_code: str) -> _Device:
        for device in self._devices.values():
            if device.user_code == user_code:
                return device
        raise KeyError(user_code)

    def fail_with(
        self,
        status: int,
        body: str | bytes | Mapping[str, Any] | None = None,
        count: int = 1,
        path: str = "/oauth2/v2.0/token",
    ) -> None:
        """Answer the next `count` requests whose path contains `path` with `status` and `body` (a dict is
        sent as JSON; None gives a Microsoft-shaped `temporarily_unavailable` error)."""
        if body is None:
            data = OAuthError("injected", status, http_status=status).answer().body
        elif isinstance(body, Mapping):
            data = json.dumps(body).encode()
        else:
            data = body.encode() if isinstance(body, str) else body
        with self._lock:
            self._failures.append(_Failure(status, data, count, path))

    def set_down(self, down: bool = True, mode: str = "reset") -> None:
        """Play dead over HTTPS: "reset" accepts and resets every connection, "refuse" closes the port.
        The mail servers' check endpoint stays up. `set_down(False)` comes back on the same port."""
        if mode not in ("reset", "refuse"):
            raise ValueError(mode)
        with self._lock:
            previous, self._down_mode = self._down_mode, (mode if down else None)
            if previous == "refuse" and not down:
                self._start_https(self.port)
            elif down and mode == "refuse" and previous != "refuse" and self._https is not None:
                server, self._https = self._https, None
                server.shutdown()
                server.server_close()

    @property
    def is_down(self) -> bool:
        return self._down_mode is not None

    def delay(self, seconds: float, path: str | None = None) -> None:
        """Wait `seconds` before answering each HTTPS request (whose path contains `path`, if given).
        Delays add up; `delay(0)` removes them all."""
        with self._lock:
            if seconds <= 0:
                self._delays.clear()
            else:
                self._delays.append((seconds, path))

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of every HTTPS request received since the last reset, oldest first."""
        with self._lock:
            return list(self._requests)

    def token_requests(self, grant_type: str | None = None) -> list[RecordedRequest]:
        """Requests to the token endpoint, optionally only those of one grant type."""
        return [
            request
            for request in self.requests
            if request.endpoint == "token" and grant_type in (None, request.grant_type)
        ]

    @property
    def check_log(self) -> list[TokenCheck]:
        """A copy of every token check made by the mail servers since the last reset, oldest first."""
        with self._lock:
            return list(self._checks)

    @property
    def issued(self) -> list[IssuedToken]:
        """Tokens handed out by the token endpoint (not those made with `issue_token`), oldest first."""
        with self._lock:
            return list(self._issued)

    def is_valid(self, user: str, token: str) -> bool:
        return self._validate(user, token) == "valid"

    # -- every secret of the session (for the whole-suite secret scan) ---------------------------------------

    #: form fields of token requests that carry a secret, and what to call them
    SECRET_FORM_FIELDS = {
        "client_secret": "client secret",
        "password": "user password",
        "refresh_token": "refresh token",
        "code": "authorization code",
        "code_verifier": "PKCE verifier",
        "client_assertion": "client assertion",
        "assertion": "service-account assertion",
        "device_code": "device code",
    }

    def _harvest_secrets(self) -> None:
        """Copy every secret of the current state into the session list (reset() clears the state)."""
        with self._lock:
            found: list[tuple[str, str, str | None]] = []
            found += [("client secret", c.secret, None) for c in self._clients.values() if c.secret]
            found += [("user password", password, user) for user, password in self._users.items()]
            for issued in [*self._tokens.values(), *self._issued]:
                found.append(("access token", issued.access_token, issued.user))
                if issued.refresh_token:
                    found.append(("refresh token", issued.refresh_token, issued.user))
            found += [("refresh token", value, refresh.user) for value, refresh in self._refresh.items()]
            found += [("authorization code", code, entry.user) for code, entry in self._codes.items()]
            found += [("device code", code, None) for code in self._devices]
            for request in self._requests:
                for name, kind in self.SECRET_FORM_FIELDS.items():
                    if request.form.get(name):
                        found.append((kind, request.form[name], request.form.get("username")))
            for kind, value, user in found:
                self._session_secrets.setdefault((kind, value), user)

    def session_secrets(self) -> list[tuple[str, str, str | None]]:
        """(kind, value, user or None) of every secret this provider registered, issued or received since it
        was created, across reset(): client secrets, user passwords (also wrong ones sent to the token
        endpoint), access and refresh tokens, authorization and device codes, PKCE verifiers, assertions."""
        self._harvest_secrets()
        with self._lock:
            return [(kind, value, user) for (kind, value), user in self._session_secrets.items()]

    # -- token check for the mail servers ------------------------------------------------------------------

    def _validate(self, user: str, token: str) -> str:
        with self._lock:
            issued = self._tokens.get(token)
            if issued is None:
                return "unknown token"
            if issued.revoked:
                return "revoked"
            if issued.expires_at <= time.time():
                return "expired"
            if issued.user is not None and issued.user.casefold() != user.casefold():
                return "wrong user"
            return "valid"

    def _handle_check(self, path: str, body: bytes, content_type: str) -> _Answer:
        if urllib.parse.urlsplit(path).path != "/_check":
            return _Answer(404, b"not found", "text/plain")
        if content_type.startswith("application/json"):
            fields = {str(key): str(value) for key, value in json.loads(body or b"{}").items()}
        else:
            fields = dict(urllib.parse.parse_qsl(body.decode(), keep_blank_values=True))
        user, token = fields.get("user", ""), fields.get("token", "")
        reason = self._validate(user, token)
        with self._lock:
            self._checks.append(TokenCheck(user, token, reason == "valid", fields.get("service", ""), reason))
        return _Answer(200 if reason == "valid" else 403, reason.encode(), "text/plain")

    # -- HTTPS endpoints -----------------------------------------------------------------------------------

    def _handle(self, method: str, raw_path: str, body: bytes, headers: dict[str, str]) -> _Answer:
        split = urllib.parse.urlsplit(raw_path)
        query = dict(urllib.parse.parse_qsl(split.query, keep_blank_values=True))
        form = dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        tenant, _, rest = split.path.strip("/").partition("/")
        endpoint = _ENDPOINTS.get(rest, "userrealm" if rest.startswith("userrealm/") else "unknown")
        record = RecordedRequest(
            method,
            split.path,
            tenant or None,
            endpoint,
            form.get("grant_type"),
            form,
            query,
            headers,
            time.time(),
        )
        with self._lock:
            self._requests.append(record)
            pause = sum(seconds for seconds, part in self._delays if part is None or part in split.path)
            failure = next((item for item in self._failures if item.path in split.path), None)
            if failure is not None:
                failure.remaining -= 1
                if failure.remaining <= 0:
                    self._failures.remove(failure)
        time.sleep(pause)
        if failure is not None:
            return _Answer(failure.status, failure.body)
        try:
            if endpoint == "openid-configuration" and method == "GET":
                return self._openid_configuration(tenant, v2=rest.startswith("v2.0"))
            if endpoint == "authorize" and method == "GET":
                return self._authorize(query)
            if endpoint == "devicecode" and method == "POST":
                return self._devicecode(form)
            if endpoint == "token" and method == "POST":
                return self._token(tenant, form, headers)
            if endpoint == "userrealm" and method == "GET":
                return self._userrealm(urllib.parse.unquote(rest.partition("/")[2]))
        except OAuthError as error:
            return error.answer()
        return _json({"error": "not_found"}, 404)

    def _issuer(self, tenant: str) -> str:
        return f"{self.base_url}/{self._tenant_id(tenant)}/v2.0"

    @staticmethod
    def _tenant_id(tenant: str) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"tenant:{tenant}"))

    def _openid_configuration(self, tenant: str, v2: bool) -> _Answer:
        base = self.authority(tenant)
        grants = ["authorization_code", "client_credentials", "refresh_token", "password", DEVICE_CODE_GRANT]
        return _json(
            {
                "issuer": self._issuer(tenant) if v2 else base,
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "jwks_uri": f"{base}/discovery/v2.0/keys",
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "response_modes_supported": ["query", "fragment", "form_post"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "grant_types_supported": grants,
                "code_challenge_methods_supported": ["plain", "S256"],
            }
        )

    def _authorize(self, query: dict[str, str]) -> _Answer:
        client_id, redirect_uri = query.get("client_id", ""), query.get("redirect_uri", "")
        with self._lock:
            known = client_id in self._clients
            user = self.authorize_user or query.get("login_hint")
            error = self.authorize_error
        if not known or not redirect_uri:
            page = f"<h1>AADSTS700016: unknown application {html.escape(client_id)} or no redirect_uri</h1>"
            return _Answer(400, page.encode(), "text/html")
        if error is not None:
            params = {"error": error, "error_description": f"The user or server refused ({error})."}
        elif not user:
            return _Answer(400, b"<h1>No user: set authorize_user or send login_hint</h1>", "text/html")
        else:
            code = f"code-{secrets.token_urlsafe(24)}"
            challenge_method = query.get("code_challenge_method", "plain")
            with self._lock:
                self._codes[code] = _AuthCode(
                    user=user,
                    client_id=client_id,
                    redirect_uri=redirect_uri,
                    scope=query.get("scope", ""),
                    challenge=query.get("code_challenge"),
                    challenge_method=challenge_method,
                    nonce=query.get("nonce"),
                )
            params = {"code": code}
        if "state" in query:
            params["state"] = query["state"]
        if query.get("response_mode") == "form_post":
            inputs = "".join(
                f'<input type="hidden" name="{html.escape(key)}" value="{html.escape(value)}">'
                for key, value in params.items()
            )
            page = (
                f'<html><body onload="document.forms[0].submit()"><form method="post" '
                f'action="{html.escape(redirect_uri)}">{inputs}</form></body></html>'
            )
            return _Answer(200, page.encode(), "text/html")
        location = redirect_uri + ("&" if "?" in redirect_uri else "?") + urllib.parse.urlencode(params)
        return _Answer(302, b"", "text/html", {"Location": location})

    @staticmethod
    def _userrealm(user: str) -> _Answer:
        """`GET /common/userrealm/{user}` (msal asks before ROPC): every user is a managed (cloud) account."""
        domain = user.rpartition("@")[2]
        return _json({"ver": "1.0", "account_type": "Managed", "domain_name": domain, "login": user})

    def _devicecode(self, form: dict[str, str]) -> _Answer:
        client_id = form.get("client_id", "")
        alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
        with self._lock:
            if client_id not in self._clients:
                raise OAuthError("unknown_client", client=client_id)
            device = _Device(
                device_code=f"dc-{secrets.token_urlsafe(24)}",
                user_code="".join(secrets.choice(alphabet) for _ in range(9)),
                client_id=client_id,
                scope=form.get("scope", ""),
                expires_at=time.time() + 900,
            )
            self._devices[device.device_code] = device
            interval = self.device_interval
        uri = f"{self.base_url}/devicelogin"
        return _json(
            {
                "device_code": device.device_code,
                "user_code": device.user_code,
                "verification_uri": uri,
                "expires_in": 900,
                "interval": interval,
                "message": f"To sign in, use a web browser to open the page {uri} and enter the code "
                f"{device.user_code} to authenticate.",
            }
        )

    # -- token endpoint ------------------------------------------------------------------------------------

    def _token(self, tenant: str, form: dict[str, str], headers: dict[str, str]) -> _Answer:
        grant = form.get("grant_type", "")
        if grant == JWT_BEARER_GRANT:
            return self._service_account_token(tenant, form)
        client_id, confidential = self._authenticate_client(form, headers, self.token_url(tenant))
        scope = form.get("scope", "")
        if grant == "client_credentials":
            if not confidential:
                raise OAuthError("no_credential")
            if not scope.endswith("/.default") or " " in scope.strip():
                raise OAuthError("scope_not_default", scope=scope)
            return self._grant(tenant, None, client_id, scope, grant, form)
        if grant == "password":
            user = form.get("username", "")
            with self._lock:
                known = self._users.get(user.casefold())
            if known is None or not hmac.compare_digest(known, form.get("password", "")):
                raise OAuthError("bad_password")
            return self._grant(tenant, user, client_id, scope, grant, form)
        if grant == "refresh_token":
            with self._lock:
                value = form.get("refresh_token", "")
                refresh = self._refresh.get(value)
                if refresh is None or refresh.revoked or refresh.client_id not in (None, client_id):
                    raise OAuthError("bad_refresh")
                refresh.revoked = self.rotate_refresh_tokens
            keep = None if refresh.revoked else value
            return self._grant(tenant, refresh.user, client_id, scope, grant, form, keep_refresh=keep)
        if grant == "authorization_code":
            code = self._redeem_code(client_id, form)
            return self._grant(tenant, code.user, client_id, code.scope or scope, grant, form, code.nonce)
        if grant == DEVICE_CODE_GRANT:
            device = self._redeem_device_code(client_id, form)
            return self._grant(tenant, device.user, client_id, device.scope, grant, form)
        raise OAuthError("bad_grant_type", grant=grant)

    def _service_account_token(self, tenant: str, form: dict[str, str]) -> _Answer:
        """The JWT bearer grant: verify the assertion against the registered service account."""
        assertion = form.get("assertion", "")
        try:
            issuer = str(json.loads(_b64url_decode(assertion.split(".")[1])).get("iss"))
        except (ValueError, IndexError, AttributeError):
            raise OAuthError("bad_jwt_grant", why="malformed JWT") from None
        with self._lock:
            public_pem = self._service_accounts.get(issuer)
        if public_pem is None:
            raise OAuthError("bad_jwt_grant", why=f"unknown service account {issuer}")
        problem, claims = jwt_bearer_problem(assertion, public_pem, issuer, self.token_url(tenant))
        if problem is not None:
            raise OAuthError("bad_jwt_grant", why=problem)
        with self._lock:
            lifetime = self.expires_in
            access = f"at-{secrets.token_urlsafe(24)}"
            user, scope = str(claims["sub"]), str(claims["scope"])
            issued = IssuedToken(access, user, time.time() + lifetime, issuer, None, scope, JWT_BEARER_GRANT)
            self._tokens[access] = issued
            self._issued.append(issued)
        return _json({"access_token": access, "expires_in": lifetime, "token_type": "Bearer"})

    def _authenticate_client(
        self, form: dict[str, str], headers: dict[str, str], audience: str | None = None
    ) -> tuple[str, bool]:
        """Return (client_id, confidential) or raise. A secret may come in the form or as HTTP Basic."""
        client_id, secret = form.get("client_id", ""), form.get("client_secret")
        authorization = next((value for key, value in headers.items() if key.lower() == "authorization"), "")
        if authorization.lower().startswith("basic "):
            basic_id, _, basic_secret = base64.b64decode(authorization[6:]).decode().partition(":")
            client_id, secret = urllib.parse.unquote_plus(basic_id), urllib.parse.unquote_plus(basic_secret)
        with self._lock:
            client = self._clients.get(client_id)
        if client is None:
            raise OAuthError("unknown_client", client=client_id)
        assertion = form.get("client_assertion")
        if assertion is not None:
            if form.get("client_assertion_type") != JWT_BEARER or client.certificate_pem is None:
                raise OAuthError("bad_assertion", why="not accepted for this client")
            problem = assertion_problem(assertion, client_id, client.certificate_pem, audience)
            if problem is not None:
                raise OAuthError("bad_assertion", why=problem)
            return client_id, True
        if client.secret is None:
            return client_id, False
        if secret is None:
            raise OAuthError("no_credential")
        if not hmac.compare_digest(secret, client.secret):
            raise OAuthError("bad_secret", client=client_id)
        return client_id, True

    def _redeem_code(self, client_id: str, form: dict[str, str]) -> _AuthCode:
        with self._lock:
            code = self._codes.get(form.get("code", ""))
            if code is None or code.used or code.client_id != client_id:
                raise OAuthError("bad_code")
            if form.get("redirect_uri", "") != code.redirect_uri:
                raise OAuthError("bad_redirect")
            if code.challenge is not None:
                verifier = form.get("code_verifier", "")
                expected = pkce_challenge(verifier) if code.challenge_method.upper() == "S256" else verifier
                if not verifier or not hmac.compare_digest(expected, code.challenge):
                    raise OAuthError("bad_verifier")
            code.used = True
            return code

    def _redeem_device_code(self, client_id: str, form: dict[str, str]) -> _Device:
        with self._lock:
            device = self._devices.get(form.get("device_code", ""))
            if device is None or device.client_id != client_id:
                raise OAuthError("bad_device_code")
            if device.expires_at < time.time():
                raise OAuthError("device_expired")
            if device.declined:
                raise OAuthError("device_declined")
            if self.device_slow_down > 0:
                self.device_slow_down -= 1
                raise OAuthError("device_slow_down")
            device.user = device.user or self.device_auto_approve
            if device.user is None:
                raise OAuthError("device_pending")
            del self._devices[device.device_code]
            return device

    def _grant(
        self,
        tenant: str,
        user: str | None,
        client_id: str,
        scope: str,
        grant: str,
        form: dict[str, str],
        nonce: str | None = None,
        keep_refresh: str | None = None,
    ) -> _Answer:
        """Issue an access token (and for users a refresh token) and build the token response."""
        with self._lock:
            lifetime = self.expires_in
            access = f"at-{secrets.token_urlsafe(24)}"
            refresh: str | None = None
            if user is not None:
                refresh = keep_refresh or f"rt-{secrets.token_urlsafe(24)}"
                self._refresh.setdefault(refresh, _Refresh(user, client_id))
            issued = IssuedToken(access, user, time.time() + lifetime, client_id, refresh, scope, grant)
            self._tokens[access] = issued
            self._issued.append(issued)
        answer: dict[str, Any] = {
            "token_type": "Bearer",
            "scope": scope,
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": access,
        }
        if user is not None:
            answer["refresh_token"] = refresh
            oid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"user:{user.casefold()}"))
            tid = self._tenant_id(tenant)
            if "openid" in scope.split() or nonce is not None:
                answer["id_token"] = self._id_token(tenant, user, client_id, oid, nonce)
            if form.get("client_info") == "1":
                answer["client_info"] = _b64url(json.dumps({"uid": oid, "utid": tid}).encode())
        return _json(answer)

    def _id_token(self, tenant: str, user: str, client_id: str, oid: str, nonce: str | None) -> str:
        """An HS256 id_token (msal decodes but does not verify it) echoing the authorize request's nonce."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "aud": client_id,
            "iss": self._issuer(tenant),
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "name": user.partition("@")[0],
            "oid": oid,
            "preferred_username": user,
            "sub": oid,
            "tid": self._tenant_id(tenant),
            "ver": "2.0",
            **({"nonce": nonce} if nonce is not None else {}),
        }
        header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = _b64url(json.dumps(claims).encode())
        signature = hmac.new(_ID_TOKEN_KEY, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        return f"{header}.{payload}.{_b64url(signature)}"
