"""The authorization-code flow's pure parts: authorize URL, PKCE, state, token form, callback parsing."""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from emailproxy.config import AccountConfig
from emailproxy.oauth import authcode
from emailproxy.oauth.authcode import Callback, CallbackError, Pkce


def account(**kwargs: Any) -> AccountConfig:
    settings: dict[str, Any] = {
        "token_url": "https://login.example.com/tenant/oauth2/v2.0/token",
        "permission_url": "https://login.example.com/tenant/oauth2/v2.0/authorize",
        "oauth2_scope": "https://outlook.office365.com/IMAP.AccessAsUser.All offline_access",
        "client_id": "client-1",
        "client_secret": "secret-1",
        "redirect_uri": "http://localhost:8080/",
        "oauth2_flow": "authorization_code",
    }
    settings.update(kwargs)
    return AccountConfig(
        username="user@example.com",
        section="user@example.com",
        matched_section="user@example.com",
        **settings,
    )


# ---------------------------------------------------------------------------------------- authorize URL


def test_authorize_url_has_the_reference_order_and_encoding() -> None:
    pkce = Pkce("verifier", "challenge-value")
    url = authcode.authorize_url(account(), "user+tag@example.com", "state-1", pkce)
    assert url == (
        "https://login.example.com/tenant/oauth2/v2.0/authorize?client_id=client-1"
        "&redirect_uri=http%3A%2F%2Flocalhost%3A8080%2F"
        "&scope=https%3A%2F%2Foutlook.office365.com%2FIMAP.AccessAsUser.All%20offline_access"
        "&response_type=code&access_type=offline&login_hint=user%2Btag%40example.com&state=state-1"
        "&code_challenge=challenge-value&code_challenge_method=S256"
    )


def test_authorize_url_without_pkce_or_redirect_uri() -> None:
    url = authcode.authorize_url(account(redirect_uri=None), "u@example.com", "s")
    names = [name for name, _ in parse_qsl(urlsplit(url).query)]
    assert names == ["client_id", "scope", "response_type", "access_type", "login_hint", "state"]


def test_authorize_url_appends_to_an_existing_query() -> None:
    url = authcode.authorize_url(account(permission_url="https://idp.example/auth?tenant=x"), "u@x", "s")
    assert url.startswith("https://idp.example/auth?tenant=x&client_id=client-1&")


@given(
    scope=st.text(min_size=1, max_size=40).filter(lambda s: s.strip() == s),
    username=st.text(min_size=1, max_size=40),
    state=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=30),
)
def test_authorize_url_values_survive_decoding(scope: str, username: str, state: str) -> None:
    url = authcode.authorize_url(account(oauth2_scope=scope), username, state)
    query = urlsplit(url).query
    assert " " not in query and "+" not in query.replace("%2B", "")
    values = dict(parse_qsl(query, keep_blank_values=True))
    assert values["scope"] == scope and values["login_hint"] == username and values["state"] == state


# ---------------------------------------------------------------------------------------- PKCE and state


def test_pkce_challenge_matches_rfc7636_appendix_b() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert authcode.pkce_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_new_pkce_verifier_is_86_urlsafe_characters_and_random() -> None:
    first, second = authcode.new_pkce(), authcode.new_pkce()
    assert re.fullmatch(r"[A-Za-z0-9_-]{86}", first.verifier)
    assert first.verifier != second.verifier
    digest = hashlib.sha256(first.verifier.encode()).digest()
    assert first.challenge == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert first.method == "S256"
    assert first.verifier not in repr(first)


def test_new_state_is_urlsafe_and_unpredictable() -> None:
    states = {authcode.new_state() for _ in range(50)}
    assert len(states) == 50
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{22}", state) for state in states)


# ---------------------------------------------------------------------------------------- token request


def test_token_request_carries_code_redirect_uri_and_verifier() -> None:
    pkce = authcode.new_pkce()
    form = authcode.token_request(account(), "the-code", {"client_id": "c", "client_secret": "s"}, pkce)
    assert form == {
        "client_id": "c",
        "client_secret": "s",
        "code": "the-code",
        "redirect_uri": "http://localhost:8080/",
        "grant_type": "authorization_code",
        "code_verifier": pkce.verifier,
    }


def test_token_request_without_pkce_has_no_verifier() -> None:
    form = authcode.token_request(account(redirect_uri=None), "code", {"client_id": "c"}, None)
    assert form == {"client_id": "c", "code": "code", "grant_type": "authorization_code"}


# ---------------------------------------------------------------------------------------- callbacks


def test_parse_callback_with_code() -> None:
    callback = authcode.parse_callback("code=abc%2Fdef&state=st-1&session_state=x")
    assert callback == Callback("st-1", "abc/def", None, None)
    assert "abc" not in repr(callback)


def test_parse_callback_with_error() -> None:
    callback = authcode.parse_callback("error=access_denied&error_description=The+user+said+no&state=s")
    assert callback == Callback("s", None, "access_denied", "The user said no")


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("code=abc", "no state"),
        ("state=&code=abc", "no state"),
        ("state=s", "neither a code nor an error"),
        ("state=s&code=", "neither a code nor an error"),
        ("state=s&code=a&error=b", "both"),
        ("state=s&state=t&code=a", "more than once"),
        ("&".join(f"f{i}=1" for i in range(40)) + "&state=s&code=a", "cannot be parsed"),
    ],
)
def test_parse_callback_rejects(query: str, reason: str) -> None:
    with pytest.raises(CallbackError, match=reason):
        authcode.parse_callback(query)


@pytest.mark.parametrize(
    ("uri", "path"),
    [
        ("http://localhost:8080", "/"),
        ("http://localhost:8080/", "/"),
        ("https://vault.example.com/email-oauth2-proxy-authorize/", "/email-oauth2-proxy-authorize"),
        ("http://127.0.0.1:9/a/b", "/a/b"),
    ],
)
def test_redirect_path(uri: str, path: str) -> None:
    assert authcode.redirect_path(uri) == path


def test_split_pasted_url() -> None:
    assert authcode.split_pasted_url("  http://localhost:8080/cb?code=a&state=b \n") == (
        "/cb",
        "code=a&state=b",
    )
    assert authcode.split_pasted_url("'http://localhost:8080?code=a&state=b'") == ("/", "code=a&state=b")
    assert authcode.split_pasted_url("?code=a&state=b") == ("", "code=a&state=b")
    with pytest.raises(CallbackError, match="no query"):
        authcode.split_pasted_url("http://localhost:8080/cb")
