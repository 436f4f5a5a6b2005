"""The one interface between the proxy core and whatever obtains tokens, and which backend an account uses.

:class:`TokenClient` is what the TokenManager (fresh tokens, refresh) and the AuthorisationBroker
(authorization code, device flow) call. Every operation blocks (callers use ``asyncio.to_thread``) and
returns the token response as a dict (``access_token``, ``expires_in``, ``refresh_token``, ...) or raises
:class:`~emailproxy.oauth.endpoint.TokenEndpointError`, :class:`~emailproxy.oauth.endpoint.TokenNetworkError`
or :class:`~emailproxy.oauth.credentials.CredentialError`.

Two implementations: the standards-based one (``generic.StandardClient``: RFC 6749 forms POSTed with
``requests``) and the msal one (``microsoft.MicrosoftClient``) for Microsoft identity platform v2.0
authorities. :class:`TokenClients` routes each call by account (see :func:`select_backend`); msal is
imported only when an account uses it.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Literal, Protocol, runtime_checkable
from urllib.parse import urlsplit

from emailproxy.config import AccountConfig
from emailproxy.oauth import credentials, flows
from emailproxy.oauth.authcode import Callback, CodeRequest
from emailproxy.oauth.device import DeviceAuthorization
from emailproxy.oauth.endpoint import DEFAULT_TIMEOUT, TokenEndpoint, TokenEndpointProtocol
from emailproxy.oauth.generic import StandardClient

Backend = Literal["msal", "standard"]
MSAL: Backend = "msal"
STANDARD: Backend = "standard"

#: Microsoft identity platform hosts (public and national clouds) whose v2.0 endpoints msal serves
MICROSOFT_HOSTS = frozenset(
    {
        "login.microsoftonline.com",
        "login.microsoft.com",
        "login.windows.net",
        "login.microsoftonline.us",
        "login-us.microsoftonline.com",
        "login.partner.microsoftonline.cn",
        "login.chinacloudapi.cn",
        "login.microsoftonline.de",
    }
)
#: the flows msal runs; others (service_account, custom grant types) stay on the standards-based client
MSAL_FLOWS = frozenset({flows.AUTHORIZATION_CODE, flows.DEVICE, flows.CLIENT_CREDENTIALS, flows.ROPC})
_V2_TOKEN_PATH = re.compile(r"^/([^/]+)/oauth2/v2\.0/token/?$", re.IGNORECASE)


@runtime_checkable
class TokenClient(Protocol):
    """What the core needs from a token library. ``client_secret`` is the secret the TokenManager chose
    (plain, decrypted, or the login password); None means certificate credentials (when configured) or a
    public client. ``now`` dates client assertions the client signs itself (None: the current time)."""

    def fresh(
        self,
        account: AccountConfig,
        username: str,
        password: str,
        client_secret: str | None,
        now: float | None = None,
    ) -> dict[str, Any]:
        """A token from a non-interactive flow (client credentials, ROPC, service account). Raises
        :class:`~emailproxy.oauth.flows.FlowUnavailable` for interactive or unknown flows."""
        ...

    def refresh(
        self, account: AccountConfig, client_secret: str | None, refresh_token: str, now: float | None = None
    ) -> dict[str, Any]: ...

    def begin_code(
        self, account: AccountConfig, username: str, state: str, client_secret: str | None
    ) -> CodeRequest:
        """Start an authorization-code request whose redirect carries ``state``."""
        ...

    def redeem_code(
        self,
        account: AccountConfig,
        request: CodeRequest,
        callback: Callback,
        client_secret: str | None,
        now: float | None = None,
    ) -> dict[str, Any]:
        """Exchange the code of a callback (its state already checked, no error) for tokens."""
        ...

    def start_device(self, account: AccountConfig, client_secret: str | None) -> DeviceAuthorization: ...

    def poll_device(
        self,
        account: AccountConfig,
        authorization: DeviceAuthorization,
        client_secret: str | None,
        now: float | None = None,
    ) -> dict[str, Any]:
        """Poll once: the token response, or TokenEndpointError (``authorization_pending``, ...)."""
        ...


# ------------------------------------------------------------------------------------------ selection


def authority_for(token_url: str | None) -> str | None:
    """``https://HOST[:PORT]/TENANT`` for a v2.0 token endpoint ``https://HOST/TENANT/oauth2/v2.0/token``,
    else None (msal only speaks v2.0 and needs https)."""
    if not token_url:
        return None
    try:
        parts = urlsplit(token_url.strip())
    except ValueError:
        return None
    match = _V2_TOKEN_PATH.match(parts.path)
    if parts.scheme.lower() != "https" or not parts.hostname or match is None:
        return None
    return f"https://{parts.netloc}/{match.group(1)}"


def is_microsoft_host(url: str | None) -> bool:
    try:
        host = urlsplit((url or "").strip()).hostname
    except ValueError:
        return False
    return host is not None and host.lower() in MICROSOFT_HOSTS


def has_client_credential(account: AccountConfig) -> bool:
    """The configuration gives the client a credential: a secret (plain or encrypted) or a certificate."""
    return bool(
        account.client_secret
        or account.cached.client_secret_encrypted
        or credentials.uses_certificate(account)
    )


def select_backend(account: AccountConfig, has_credential: bool | None = None) -> Backend:
    """Which client serves ``account``: msal for Microsoft v2.0 authorities (``token_backend = auto``, the
    default) or wherever ``token_backend = msal`` says so, the standards-based client otherwise.

    Flows msal does not run (service accounts, custom grant types) and token URLs that are not v2.0
    endpoints (v1 ``oauth2_resource`` accounts) always use the standards-based client, and so do two
    combinations msal's API rules out: ROPC without a client credential (msal deprecates ROPC for public
    clients) and the device flow with one (msal runs it for public clients only; the standards-based
    client sends the secret or assertion as before). ``has_credential`` defaults to what the config shows.
    """
    choice = (account.token_backend or "auto").strip().lower()
    flow = flows.effective_flow(account)
    if choice == STANDARD or flow not in MSAL_FLOWS or authority_for(account.token_url) is None:
        return STANDARD
    if choice != MSAL and not is_microsoft_host(account.token_url):
        return STANDARD
    credential = has_client_credential(account) if has_credential is None else has_credential
    if (flow == flows.ROPC and not credential) or (flow == flows.DEVICE and credential):
        return STANDARD
    return MSAL


# ------------------------------------------------------------------------------------------ routing


class TokenClients:
    """A TokenClient that routes every call to the msal or the standards-based client of the account.

    ``microsoft`` replaces the msal client (tests); by default it is created, and msal imported, on the
    first call for an account that uses it.
    """

    def __init__(
        self, endpoint: TokenEndpointProtocol | None = None, microsoft: TokenClient | None = None
    ) -> None:
        self._endpoint = endpoint if endpoint is not None else TokenEndpoint()
        self.standard: TokenClient = StandardClient(self._endpoint)
        self._microsoft = microsoft
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"TokenClients(msal={'loaded' if self._microsoft is not None else 'not loaded'})"

    @property
    def microsoft(self) -> TokenClient:
        with self._lock:
            if self._microsoft is None:
                from emailproxy.oauth.microsoft import MicrosoftClient

                # msal requests take as long as the endpoint's (token_request_timeout, also after reloads)
                self._microsoft = MicrosoftClient(
                    lambda: float(getattr(self._endpoint, "timeout", DEFAULT_TIMEOUT))
                )
            return self._microsoft

    def client_for(self, account: AccountConfig, client_secret: str | None) -> TokenClient:
        has_credential = bool(client_secret) or credentials.uses_certificate(account)
        return self.microsoft if select_backend(account, has_credential) == MSAL else self.standard

    def close(self) -> None:
        close = getattr(self._endpoint, "close", None)
        if callable(close):
            close()
        microsoft = getattr(self._microsoft, "close", None)
        if callable(microsoft):
            microsoft()

    # --- TokenClient

    def fresh(
        self,
        account: AccountConfig,
        username: str,
        password: str,
        client_secret: str | None,
        now: float | None = None,
    ) -> dict[str, Any]:
        flow = flows.effective_flow(account)
        if flow is None or flow in flows.INTERACTIVE_FLOWS:  # no I/O, and no msal import, for these
            raise flows.FlowUnavailable(flow or flows.AUTHORIZATION_CODE, interactive=True)
        return self.client_for(account, client_secret).fresh(account, username, password, client_secret, now)

    def refresh(
        self, account: AccountConfig, client_secret: str | None, refresh_token: str, now: float | None = None
    ) -> dict[str, Any]:
        return self.client_for(account, client_secret).refresh(account, client_secret, refresh_token, now)

    def begin_code(
        self, account: AccountConfig, username: str, state: str, client_secret: str | None
    ) -> CodeRequest:
        return self.client_for(account, client_secret).begin_code(account, username, state, client_secret)

    def redeem_code(
        self,
        account: AccountConfig,
        request: CodeRequest,
        callback: Callback,
        client_secret: str | None,
        now: float | None = None,
    ) -> dict[str, Any]:
        # the client that began the request redeems it (msal's flow dict, or our PKCE verifier)
        client = self.microsoft if request.flow is not None else self.standard
        return client.redeem_code(account, request, callback, client_secret, now)

    def start_device(self, account: AccountConfig, client_secret: str | None) -> DeviceAuthorization:
        return self.client_for(account, client_secret).start_device(account, client_secret)

    def poll_device(
        self,
        account: AccountConfig,
        authorization: DeviceAuthorization,
        client_secret: str | None,
        now: float | None = None,
    ) -> dict[str, Any]:
        client = self.microsoft if authorization.flow is not None else self.standard
        return client.poll_device(account, authorization, client_secret, now)


def as_client(source: TokenClient | TokenEndpointProtocol) -> TokenClient:
    """A TokenClient as given, or the routing client around a bare token endpoint (anything with ``post``)."""
    if isinstance(source, TokenClient):
        return source
    return TokenClients(source)
