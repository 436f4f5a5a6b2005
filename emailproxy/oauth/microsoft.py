"""The msal-backed token client for Microsoft identity platform (v2.0) authorities.

Imported only when an account uses it (see ``client.TokenClients``), because msal is big. Which msal call
serves which operation:

* client credentials (secret or certificate): ``acquire_token_for_client``;
* ROPC: ``acquire_token_by_username_password`` (confidential clients; msal deprecates public-client ROPC,
  so TokenClients keeps that on the standards-based client);
* refresh: ``acquire_token_by_refresh_token``;
* authorization code: ``initiate_auth_code_flow`` (msal adds PKCE S256 and a nonce, we pass our ``state``)
  and ``acquire_token_by_auth_code_flow`` (msal checks state and the id_token's nonce);
* device flow (public clients: msal has it on PublicClientApplication only): ``initiate_device_flow``,
  then one ``acquire_token_by_device_flow`` poll per call (our loop in ``device.poll`` keeps the pace,
  so the broker can cancel it).

Apps are built in the caller's worker thread (their constructor fetches the OpenID configuration) and
cached per (authority, client_id, credential fingerprint). msal's token cache keeps nothing: the tokens
live, encrypted, in the config file as before, so msal never answers from tokens we have dropped. Requests
go through :class:`MsalHttpClient` (our ``requests`` session, ``verify`` and timeout). Results and
exceptions are mapped to TokenEndpointError / TokenNetworkError / CredentialError. Nothing secret is logged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import threading
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msal  # type: ignore[import-untyped]
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from emailproxy import __version__
from emailproxy.config import AccountConfig
from emailproxy.oauth import device, flows
from emailproxy.oauth.authcode import Callback, CodeRequest
from emailproxy.oauth.client import authority_for, is_microsoft_host
from emailproxy.oauth.credentials import (
    CredentialError,
    chosen_secret,
    load_rsa_key,
    read_key_file,
    uses_certificate,
)
from emailproxy.oauth.device import DeviceAuthorization
from emailproxy.oauth.endpoint import (
    DEFAULT_TIMEOUT,
    USER_AGENT,
    TokenEndpointError,
    TokenNetworkError,
    network_error,
    oauth_error,
    request_verify,
    short_host,
)

logger = logging.getLogger("emailproxy.tokens")

#: scopes msal adds itself and refuses in a scope list
RESERVED_SCOPES = frozenset({"offline_access", "openid", "profile"})
#: tenants that cannot issue app-only tokens (msal warns about them; Microsoft refuses them)
_SHARED_TENANTS = frozenset({"common", "organizations", "consumers"})
#: built apps kept at most (one per account and credential in practice)
MAX_APPS = 64
_USERREALM_PATH = "/common/userrealm/"


def msal_scopes(scope: str | None) -> list[str]:
    """``oauth2_scope`` as msal takes it: a list without the reserved scopes (msal adds those itself)."""
    result: list[str] = []
    for item in (scope or "").split():
        if item.lower() not in RESERVED_SCOPES and item not in result:
            result.append(item)
    return result


def query_mode(auth_uri: str) -> str:
    """``auth_uri`` with ``response_mode=query``: the redirect listener takes GET requests, and a redirect
    URL pasted from the browser (``--external-auth``) carries the code only in query mode."""
    parts = urlsplit(auth_uri)
    fields = [
        (name, "query" if name == "response_mode" else value)
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urlunsplit(parts._replace(query=urlencode(fields)))


# ---------------------------------------------------------------------------------------------- HTTP


class MsalHttpClient:
    """The ``http_client`` msal calls (``post``/``get`` returning a response with ``status_code``, ``text``,
    ``headers`` and ``raise_for_status()``), over our ``requests`` session.

    Every request gets ``verify=`` (``SSL_CERT_FILE`` when set, as TokenEndpoint does, so
    ``REQUESTS_CA_BUNDLE`` cannot override it) and a timeout; connection failures become
    TokenNetworkError. The last answer of each thread is kept so msal's error results can be mapped with
    their real HTTP status. msal builds the ROPC user-realm URL from the authority's host without its port:
    the port is put back here.
    """

    def __init__(self, session: requests.Session, authority: str, timeout: Callable[[], float]) -> None:
        parts = urlsplit(authority)
        self._session = session
        self._netloc = parts.netloc
        self._hostname = parts.hostname
        self._port = parts.port
        self._timeout = timeout
        self._last = threading.local()

    def __repr__(self) -> str:
        return f"MsalHttpClient({self._netloc})"

    def post(
        self,
        url: str,
        params: Mapping[str, Any] | None = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> requests.Response:
        kwargs.setdefault("allow_redirects", False)
        return self._send("POST", url, params=params, data=data, headers=headers, **kwargs)

    def get(
        self,
        url: str,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> requests.Response:
        return self._send("GET", self.with_port(url), params=params, headers=headers, **kwargs)

    def close(self) -> None:
        """msal may call this; the session belongs to the MicrosoftClient."""

    def with_port(self, url: str) -> str:
        """The user-realm URL msal built for a non-default port, with the authority's port put back."""
        if self._port is None:
            return url
        parts = urlsplit(url)
        if parts.port is None and parts.hostname == self._hostname and parts.path.startswith(_USERREALM_PATH):
            return urlunsplit(parts._replace(netloc=self._netloc))
        return url

    def _send(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        timeout = self._timeout()
        kwargs["timeout"] = timeout
        kwargs["verify"] = request_verify()
        try:
            response = self._session.request(method, url, **kwargs)
        except requests.exceptions.RequestException as exc:
            raise network_error(exc, url, timeout) from exc
        self._last.status = response.status_code
        self._last.error = None
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = None
            error = oauth_error(response.status_code, body) if isinstance(body, dict) else None
            reason = response.reason or None
            self._last.error = error or TokenEndpointError(
                response.status_code, f"http_{response.status_code}", reason
            )
        logger.debug("msal: %s %s answered HTTP %d", method, short_host(url), response.status_code)
        return response

    def forget(self) -> None:
        self._last.status = None
        self._last.error = None

    def last_status(self) -> int | None:
        status: int | None = getattr(self._last, "status", None)
        return status

    def last_error(self) -> TokenEndpointError | None:
        """The error of this thread's last answer, when it was an HTTP error (status 400 and above)."""
        error: TokenEndpointError | None = getattr(self._last, "error", None)
        return error


# ---------------------------------------------------------------------------------------------- apps


class _NoTokenCache(msal.TokenCache):  # type: ignore[misc]
    """A token cache that keeps nothing. Our encrypted cache in the config file is the only one, so msal
    never hands out a token we have dropped (wrong password, rejected refresh) or decided to renew."""

    def add(self, event: Any, now: Any = None) -> None:
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class _Credential:
    """How the app authenticates: ``secret``, ``certificate`` (loaded when an app is built) or ``public``.
    The fingerprint (a hash of the secret, or of both files) tells apart apps with different credentials."""

    kind: str
    fingerprint: str = dataclasses.field(repr=False)
    secret: str | None = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass(frozen=True, slots=True)
class _App:
    app: Any
    http: MsalHttpClient
    authority: str
    public: bool


def certificate_credential(account: AccountConfig) -> dict[str, str]:
    """msal's ``client_credential`` for the account's certificate: the key (PKCS#8 PEM) and the certificate,
    from which msal takes the SHA-256 thumbprint (``x5t#S256``, as the reference sends) and ``x5c``."""
    cert_path, key_path = account.jwt_certificate_path or "", account.jwt_key_path or ""
    cert_pem = read_key_file(cert_path, "jwt_certificate_path")
    try:
        x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise CredentialError(f"jwt_certificate_path '{cert_path}' is not a PEM certificate") from None
    key = load_rsa_key(read_key_file(key_path, "jwt_key_path"), f"jwt_key_path '{key_path}'")
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return {"private_key": private.decode("ascii"), "public_certificate": cert_pem.decode("ascii", "replace")}


def _credential(account: AccountConfig, client_secret: str | None) -> _Credential:
    """The secret when there is one (it beats certificate settings, as in the reference), else the
    certificate, else none (a public client)."""
    if (secret := chosen_secret(account, client_secret)) is not None:
        digest = hashlib.sha256(b"secret\0" + secret.encode("utf-8")).hexdigest()
        return _Credential("secret", digest, secret)
    if uses_certificate(account):
        cert = read_key_file(account.jwt_certificate_path or "", "jwt_certificate_path")
        key = read_key_file(account.jwt_key_path or "", "jwt_key_path")
        return _Credential("certificate", hashlib.sha256(b"certificate\0" + cert + b"\0" + key).hexdigest())
    return _Credential("public", "public")


class MicrosoftClient:
    """A :class:`~emailproxy.oauth.client.TokenClient` on msal. ``timeout`` gives the seconds a request may
    take (a callable, so a reloaded ``token_request_timeout`` applies)."""

    def __init__(
        self, timeout: Callable[[], float] | float = DEFAULT_TIMEOUT, session: requests.Session | None = None
    ) -> None:
        self._timeout: Callable[[], float] = timeout if callable(timeout) else (lambda: float(timeout))
        self._session = session if session is not None else requests.Session()
        self._session.headers["User-Agent"] = USER_AGENT
        self._apps: dict[tuple[str, str, str], _App] = {}
        self._building: dict[tuple[str, str, str], threading.Lock] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MicrosoftClient(apps={len(self._apps)})"

    def close(self) -> None:
        self._session.close()

    # ------------------------------------------------------------------------------------ TokenClient

    def fresh(
        self,
        account: AccountConfig,
        username: str,
        password: str,
        client_secret: str | None,
        now: float | None = None,
    ) -> dict[str, Any]:
        flow = flows.effective_flow(account)
        scopes = msal_scopes(account.oauth2_scope)
        if flow == flows.CLIENT_CREDENTIALS:
            built = self._app(account, client_secret)
            if built.public:
                raise CredentialError(
                    "the client credentials flow needs a client secret or a certificate "
                    "(jwt_certificate_path and jwt_key_path)"
                )
            if built.authority.rsplit("/", 1)[-1].lower() in _SHARED_TENANTS:
                raise CredentialError(
                    "the client credentials flow needs your tenant ID in token_url, not /common, "
                    "/organizations or /consumers"
                )
            return self._run(built, "client credentials", built.app.acquire_token_for_client, scopes)
        if flow == flows.ROPC:
            built = self._app(account, client_secret)
            if built.public:  # msal deprecates ROPC for public clients: TokenClients sends those elsewhere
                raise CredentialError("msal runs the password flow only with a client secret or certificate")
            return self._run(
                built, "password", built.app.acquire_token_by_username_password, username, password, scopes
            )
        interactive = flow is None or flow in flows.INTERACTIVE_FLOWS
        raise flows.FlowUnavailable(flow or flows.AUTHORIZATION_CODE, interactive=interactive)

    def refresh(
        self, account: AccountConfig, client_secret: str | None, refresh_token: str, now: float | None = None
    ) -> dict[str, Any]:
        built = self._app(account, client_secret)
        scopes = msal_scopes(account.oauth2_scope)
        return self._run(built, "refresh", built.app.acquire_token_by_refresh_token, refresh_token, scopes)

    def begin_code(
        self, account: AccountConfig, username: str, state: str, client_secret: str | None
    ) -> CodeRequest:
        """msal's auth-code flow with our ``state``. It asks for ``form_post`` (msal warns about any other
        mode), and the URL is then switched to query mode, which the redirect listener and pasting need."""
        built = self._app(account, client_secret)
        flow = self._call(
            built,
            built.app.initiate_auth_code_flow,
            msal_scopes(account.oauth2_scope),
            redirect_uri=account.redirect_uri,
            state=state,
            login_hint=username or None,
            response_mode="form_post",
        )
        if not isinstance(flow, dict) or not isinstance(flow.get("auth_uri"), str):
            raise TokenEndpointError(502, "http_502", "msal could not build the sign-in URL")
        return CodeRequest(query_mode(flow["auth_uri"]), state, flow=flow)

    def redeem_code(
        self,
        account: AccountConfig,
        request: CodeRequest,
        callback: Callback,
        client_secret: str | None,
        now: float | None = None,
    ) -> dict[str, Any]:
        if request.flow is None:
            raise ValueError("this authorization-code request was not started by msal")
        built = self._app(account, client_secret)
        response = {"state": callback.state, "code": callback.code or ""}
        return self._run(
            built,
            "authorization code",
            built.app.acquire_token_by_auth_code_flow,
            dict(request.flow),
            response,
        )

    def start_device(self, account: AccountConfig, client_secret: str | None) -> DeviceAuthorization:
        built = self._app(account, client_secret)
        if not built.public:  # TokenClients sends device-flow accounts with a credential elsewhere
            raise CredentialError(
                "msal runs the device flow only for public clients (no secret or certificate)"
            )
        logger.debug("msal: device code request to %s", short_host(built.authority))
        flow = self._call(built, built.app.initiate_device_flow, msal_scopes(account.oauth2_scope))
        if not isinstance(flow, dict) or "user_code" not in flow:
            raise self._refusal(built, flow if isinstance(flow, dict) else {})
        return dataclasses.replace(device.parse_device_response(flow), flow=flow)

    def poll_device(
        self,
        account: AccountConfig,
        authorization: DeviceAuthorization,
        client_secret: str | None,
        now: float | None = None,
    ) -> dict[str, Any]:
        """One poll (``exit_condition`` stops msal's own loop at once); ``device.poll`` keeps the pace."""
        flow = authorization.flow
        if flow is None:
            raise ValueError("this device authorization was not started by msal")
        if not isinstance(flow.get("interval"), int) or flow["interval"] < 1:
            flow["interval"] = max(1, math.ceil(authorization.interval))  # msal polls again at once on 0
        built = self._app(account, client_secret)
        return self._run(
            built, "device code", built.app.acquire_token_by_device_flow, flow, exit_condition=_once
        )

    # ------------------------------------------------------------------------------------ apps

    def _app(self, account: AccountConfig, client_secret: str | None) -> _App:
        authority = authority_for(account.token_url)
        if authority is None:
            raise CredentialError(
                "msal needs a Microsoft identity platform v2.0 token_url "
                "(https://HOST/TENANT/oauth2/v2.0/token); set token_backend = standard for other endpoints"
            )
        credential = _credential(account, client_secret)
        key = (authority.casefold(), account.client_id or "", credential.fingerprint)
        with self._lock:
            built = self._apps.get(key)
            building = self._building.setdefault(key, threading.Lock())
        if built is not None:
            return built
        with building:  # one discovery per app, even when logins for it arrive together
            with self._lock:
                built = self._apps.get(key)
            if built is None:
                built = self._build(authority, account, credential)
                with self._lock:
                    while len(self._apps) >= MAX_APPS:
                        del self._apps[next(iter(self._apps))]
                    self._apps[key] = built
        with self._lock:
            self._building.pop(key, None)
        return built

    def _build(self, authority: str, account: AccountConfig, credential: _Credential) -> _App:
        client_id = account.client_id or ""
        value: str | dict[str, str] | None = credential.secret
        if credential.kind == "certificate":
            value = certificate_credential(account)
        http = MsalHttpClient(self._session, authority, self._timeout)
        options: dict[str, Any] = {
            "authority": authority,
            "http_client": http,
            "token_cache": _NoTokenCache(),
            "app_name": "emailproxy",
            "app_version": __version__,
        }
        if not is_microsoft_host(authority):
            options["instance_discovery"] = False
        kind = "public" if value is None else "confidential"
        logger.debug("msal: building a %s client application for %s", kind, short_host(authority))
        built = _App(None, http, authority, value is None)
        if value is None:
            app = self._call(built, msal.PublicClientApplication, client_id, **options)
        else:
            app = self._call(
                built,
                msal.ConfidentialClientApplication,
                client_id,
                client_credential=value,
                **options,
            )
        return dataclasses.replace(built, app=app)

    # ------------------------------------------------------------------------------------ mapping

    def _run(
        self, built: _App, what: str, acquire: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> dict[str, Any]:
        """Call an ``acquire_*`` method; its result is the token response, or an error mapped to raise."""
        logger.debug("msal: %s token request to %s", what, short_host(built.authority))
        result = self._call(built, acquire, *args, **kwargs)
        if not isinstance(result, dict):
            raise TokenEndpointError(502, "http_502", f"msal returned no {what} token response")
        if result.get("error"):
            raise self._refusal(built, result)
        return result

    def _refusal(self, built: _App, result: Mapping[str, Any]) -> TokenEndpointError:
        """msal's error result as TokenEndpointError, with the HTTP status it came with (400 when msal
        answered from its throttling cache or made the error itself)."""
        status = built.http.last_status()
        error = oauth_error(400 if status is None else status, result)
        if error is not None:
            return error
        http_error = built.http.last_error()
        if http_error is not None:
            return http_error
        return TokenEndpointError(502, "http_502", "the identity provider's answer has no token")

    def _call(self, built: _App, work: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one msal call; exceptions become TokenNetworkError / TokenEndpointError (texts name hosts and
        exception types only: msal's messages may quote the response)."""
        built.http.forget()
        try:
            return work(*args, **kwargs)
        except (TokenNetworkError, TokenEndpointError, CredentialError):
            raise
        except requests.exceptions.RequestException as exc:
            raise network_error(exc, built.authority, self._timeout()) from exc
        except msal.exceptions.MsalServiceError as exc:  # msal's raise_for_status() on a 5xx
            raise built.http.last_error() or TokenEndpointError(502, "http_502", None) from exc
        except json.JSONDecodeError as exc:
            status = built.http.last_status() or 502
            raise TokenEndpointError(status, f"http_{status}", "the response is not a JSON object") from exc
        except (ValueError, RuntimeError, KeyError) as exc:
            error = built.http.last_error()
            if error is not None:  # e.g. OpenID discovery answered 404
                raise TokenEndpointError(
                    error.status, f"http_{error.status}", f"msal cannot use {built.authority} ({error})"
                ) from exc
            raise TokenEndpointError(
                502, "http_502", f"msal refused the identity provider's answer ({type(exc).__name__})"
            ) from exc


def _once(flow: Mapping[str, Any]) -> bool:
    """msal's ``exit_condition`` for a single device-flow poll."""
    return True
