"""Which OAuth 2.0 flow an account uses, and the token-request forms of the non-interactive ones.

Flow selection follows the reference: with ``permission_url`` every ``oauth2_flow`` other than
``device`` means the authorization-code flow; without it, ``oauth2_flow`` is required, and a value
this module does not know is sent verbatim as ``grant_type``.
"""

from __future__ import annotations

import dataclasses
import enum

from emailproxy.config import AccountConfig
from emailproxy.oauth import credentials

AUTHORIZATION_CODE = "authorization_code"
DEVICE = "device"
CLIENT_CREDENTIALS = "client_credentials"
ROPC = "password"
SERVICE_ACCOUNT = "service_account"
REFRESH_GRANT = "refresh_token"

INTERACTIVE_FLOWS = frozenset({AUTHORIZATION_CODE, DEVICE})


class ConfigProblem(enum.Enum):
    #: token_url, client_id or the scope (or, for ROPC, the resource) is missing
    INCOMPLETE = "incomplete"
    #: no permission_url and no oauth2_flow
    NO_FLOW = "no_flow"


class FlowUnavailable(Exception):
    """The flow cannot run here. ``interactive`` tells whether a person would have to take part."""

    def __init__(self, flow: str, interactive: bool) -> None:
        super().__init__(flow)
        self.flow = flow
        self.interactive = interactive


def effective_flow(account: AccountConfig) -> str | None:
    """The flow that will run (the reference forces the authorization-code flow with a permission_url)."""
    flow = (account.oauth2_flow or "").strip() or None
    if account.permission_url:
        return DEVICE if flow == DEVICE else AUTHORIZATION_CODE
    return flow


def is_interactive(account: AccountConfig) -> bool:
    return effective_flow(account) in INTERACTIVE_FLOWS


def is_app_only(account: AccountConfig) -> bool:
    """Client-credentials or service-account accounts: no person, so the local password guards nothing.

    For these the reference never deletes tokens on a wrong password.
    """
    return not account.permission_url and effective_flow(account) in (CLIENT_CREDENTIALS, SERVICE_ACCOUNT)


def config_problem(account: AccountConfig) -> ConfigProblem | None:
    """What stops a token request for this account, or None when the entry is complete."""
    flow = effective_flow(account)
    has_scope = bool(account.oauth2_scope and account.oauth2_scope.strip())
    scope_ok = has_scope or (flow == ROPC and bool(account.oauth2_resource))
    if not account.token_url or not account.client_id or not scope_ok:
        return ConfigProblem.INCOMPLETE
    if flow is None:
        return ConfigProblem.NO_FLOW
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class TokenRequest:
    """Where to POST a token request, and its form (which may hold secrets: kept out of the repr)."""

    url: str
    form: dict[str, str] = dataclasses.field(repr=False)


def _client_fields(account: AccountConfig, client_secret: str | None, now: float | None) -> dict[str, str]:
    """client_id plus the secret or, with certificate settings and no secret, a JWT client assertion."""
    return credentials.client_fields(account, client_secret, account.token_url or "", now)


def fresh_token_request(
    account: AccountConfig, username: str, password: str, client_secret: str | None, now: float | None = None
) -> TokenRequest:
    """The request for a fresh token from a non-interactive flow (blocking: may read key files and sign).

    ``client_secret`` is the one to send (plaintext, decrypted, or the login password when
    ``use_login_password_as_client_credentials_secret`` applies); the caller chooses it. ``now`` dates
    JWT assertions. Raises :class:`FlowUnavailable` for flows that are not implemented here and
    :class:`~emailproxy.oauth.credentials.CredentialError` when a key or certificate cannot be used.
    """
    flow = effective_flow(account)
    if flow is None or flow in INTERACTIVE_FLOWS:
        raise FlowUnavailable(flow or AUTHORIZATION_CODE, interactive=True)
    if flow == SERVICE_ACCOUNT:
        url, form = credentials.service_account_request(account, username, client_secret, now)
        return TokenRequest(url, form)
    form = _client_fields(account, client_secret, now)
    scope = (account.oauth2_scope or "").strip()
    if flow == ROPC:
        form["username"] = username
        form["password"] = password
        if scope:
            form["scope"] = scope
        if account.oauth2_resource:
            form["resource"] = account.oauth2_resource
    elif scope:
        form["scope"] = scope
    if account.redirect_uri:
        form["redirect_uri"] = account.redirect_uri
    form["grant_type"] = flow
    return TokenRequest(account.token_url or "", form)


def token_request(
    account: AccountConfig, username: str, password: str, client_secret: str | None, now: float | None = None
) -> dict[str, str]:
    """The form of :func:`fresh_token_request` (posted to ``token_url``, except for service accounts)."""
    return fresh_token_request(account, username, password, client_secret, now).form


def refresh_request(
    account: AccountConfig, client_secret: str | None, refresh_token: str, now: float | None = None
) -> dict[str, str]:
    """The form that exchanges a refresh token (RFC 6749 section 6). No scope, as the reference.

    With certificate credentials it carries a new client assertion (blocking: reads and signs).
    """
    form = _client_fields(account, client_secret, now)
    form["refresh_token"] = refresh_token
    form["grant_type"] = REFRESH_GRANT
    return form
