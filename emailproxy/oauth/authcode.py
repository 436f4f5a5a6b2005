"""The authorization-code flow's pure parts (RFC 6749 section 4.1, PKCE from RFC 7636).

Building the authorize URL exactly as the reference does (same parameters, same order, values
percent-encoded with ``quote(safe="~-._")``), generating ``state`` and the PKCE pair, the token-request
form, and turning a redirect back to us (a request to the redirect listener, or a URL pasted into a
terminal) into a :class:`Callback`. No I/O here.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import secrets
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from emailproxy.config import AccountConfig

GRANT_TYPE = "authorization_code"
#: random bytes in ``state`` (the reference uses ``token_urlsafe(16)``)
STATE_BYTES = 16
#: random bytes behind a PKCE verifier: 64 bytes give 86 characters, inside RFC 7636's 43-128
VERIFIER_BYTES = 64
PKCE_METHOD = "S256"
#: more query fields than this is not a redirect from an identity provider
MAX_CALLBACK_FIELDS = 32


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclasses.dataclass(frozen=True, slots=True)
class Pkce:
    """A PKCE verifier and its S256 challenge. The verifier stays out of reprs and logs."""

    verifier: str = dataclasses.field(repr=False)
    challenge: str
    method: str = PKCE_METHOD


def pkce_challenge(verifier: str) -> str:
    """base64url(SHA-256(verifier)) without padding (RFC 7636 section 4.2)."""
    return _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def new_pkce() -> Pkce:
    verifier = _b64url(secrets.token_bytes(VERIFIER_BYTES))
    return Pkce(verifier, pkce_challenge(verifier))


def new_state() -> str:
    return secrets.token_urlsafe(STATE_BYTES)


def _quote(value: str) -> str:
    return quote(value, safe="~-._")


def authorize_url(account: AccountConfig, username: str, state: str, pkce: Pkce | None = None) -> str:
    """``permission_url`` plus the reference's query: client_id, redirect_uri (when set), scope,
    response_type=code, access_type=offline, login_hint, state, then the PKCE challenge and method."""
    params: list[tuple[str, str]] = [("client_id", account.client_id or "")]
    if account.redirect_uri:
        params.append(("redirect_uri", account.redirect_uri))
    params += [
        ("scope", (account.oauth2_scope or "").strip()),
        ("response_type", "code"),
        ("access_type", "offline"),
        ("login_hint", username),
        ("state", state),
    ]
    if pkce is not None:
        params += [("code_challenge", pkce.challenge), ("code_challenge_method", pkce.method)]
    base = account.permission_url or ""
    separator = "&" if "?" in base else "?"
    return base + separator + "&".join(f"{name}={_quote(value)}" for name, value in params)


@dataclasses.dataclass(frozen=True, slots=True)
class CodeRequest:
    """An authorization-code request in progress (a token client's ``begin_code``): the URL to show, our
    ``state``, and what redeeming the code needs later: the PKCE pair, or msal's auth-code flow dict.
    Both stay out of the repr."""

    url: str
    state: str
    pkce: Pkce | None = dataclasses.field(default=None, repr=False)
    flow: dict[str, Any] | None = dataclasses.field(default=None, repr=False)


def token_request(
    account: AccountConfig, code: str, client_fields: Mapping[str, str], pkce: Pkce | None
) -> dict[str, str]:
    """The form that redeems ``code``: client fields, code, redirect_uri, grant_type, code_verifier."""
    form = dict(client_fields)
    form["code"] = code
    if account.redirect_uri:
        form["redirect_uri"] = account.redirect_uri
    form["grant_type"] = GRANT_TYPE
    if pkce is not None:
        form["code_verifier"] = pkce.verifier
    return form


# -------------------------------------------------------------------------------------------- callbacks


class CallbackError(ValueError):
    """A request or pasted URL that is not a usable authorisation response; ``str()`` says why."""


@dataclasses.dataclass(frozen=True, slots=True)
class Callback:
    """An authorisation response (RFC 6749 section 4.1.2): a code, or an error, for one ``state``."""

    state: str
    code: str | None = dataclasses.field(default=None, repr=False)
    error: str | None = None
    error_description: str | None = None


#: query fields that make a request an authorisation response rather than a page view or a probe
CALLBACK_FIELDS = frozenset({"state", "code", "error"})


def query_fields(query: str) -> dict[str, list[str]]:
    """Parse a query string; CallbackError when it is malformed or has too many fields."""
    try:
        return parse_qs(query, keep_blank_values=True, max_num_fields=MAX_CALLBACK_FIELDS)
    except ValueError as exc:
        raise CallbackError(f"the query string cannot be parsed ({exc})") from None


def parse_callback(query: str) -> Callback:
    """Validate the query of a redirect: one ``state``, and a ``code`` or an ``error``."""
    fields = query_fields(query)
    repeated = sorted(name for name, values in fields.items() if len(values) > 1)
    if repeated:
        raise CallbackError(f"the parameter {repeated[0]!r} appears more than once")
    value = {name: values[0] for name, values in fields.items()}
    state = value.get("state", "")
    if not state:
        raise CallbackError("it has no state parameter")
    code = value.get("code") or None
    error = value.get("error") or None
    if code is None and error is None:
        raise CallbackError("it has neither a code nor an error parameter")
    if code is not None and error is not None:
        raise CallbackError("it has both a code and an error parameter")
    return Callback(state, code, error, value.get("error_description") or None)


def normalised_path(path: str) -> str:
    """A URL path compared the reference's way: a trailing ``/`` does not matter."""
    return path.rstrip("/") or "/"


def redirect_path(redirect_uri: str) -> str:
    return normalised_path(urlsplit(redirect_uri).path)


def split_pasted_url(text: str) -> tuple[str, str]:
    """(path, query) of a URL pasted from a browser's address bar; CallbackError if it has no query."""
    text = text.strip().strip("<>\"'")
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise CallbackError(f"that is not a URL ({exc})") from None
    if not parts.scheme and not parts.netloc and (not parts.path or not parts.query) and "=" in text:
        return "", parts.query or text  # just the query string was pasted: no path to check
    if not parts.query:
        raise CallbackError("the URL has no query string (copy the full address the browser ended on)")
    return parts.path or "/", parts.query
