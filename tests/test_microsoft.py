"""msal for Microsoft authorities, without sockets: authority and scope mapping, backend selection, the
``token_backend`` setting, routing in TokenClients, and MicrosoftClient (real msal) against a fake identity
provider mounted into its requests session: which requests msal sends and how its results and exceptions
become TokenEndpointError / TokenNetworkError / CredentialError."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import logging
import subprocess
import sys
import textwrap
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict

from emailproxy.checks import backend_findings
from emailproxy.config import AccountConfig, CachedTokens, ConfigError, load_config
from emailproxy.oauth import authcode, flows
from emailproxy.oauth.authcode import Callback, CodeRequest
from emailproxy.oauth.client import MSAL, STANDARD, TokenClients, as_client, authority_for, select_backend
from emailproxy.oauth.credentials import CredentialError
from emailproxy.oauth.device import DeviceAuthorization
from emailproxy.oauth.endpoint import TokenEndpointError, TokenNetworkError
from emailproxy.oauth.microsoft import MicrosoftClient, MsalHttpClient, msal_scopes, query_mode

HOST = "login.microsoftonline.com"
TENANT = "contoso.onmicrosoft.com"
MS_TOKEN_URL = f"https://{HOST}/{TENANT}/oauth2/v2.0/token"
LOCAL = "idp.test:8443"
LOCAL_AUTHORITY = f"https://{LOCAL}/tenant-1"
LOCAL_TOKEN_URL = f"{LOCAL_AUTHORITY}/oauth2/v2.0/token"
SECRET = "the-client-secret-value"
PASSWORD = "the-user-password"
APP_SCOPE = "https://outlook.office365.com/.default"
USER_SCOPE = "https://outlook.office365.com/IMAP.AccessAsUser.All offline_access"


def account(**overrides: Any) -> AccountConfig:
    values: dict[str, Any] = {
        "username": "user@example.com",
        "section": "user@example.com",
        "matched_section": "user@example.com",
        "token_url": MS_TOKEN_URL,
        "oauth2_scope": APP_SCOPE,
        "oauth2_flow": "client_credentials",
        "client_id": "client-1",
    }
    values.update(overrides)
    return AccountConfig(**values)


# ---------------------------------------------------------------------------------- mapping


@pytest.mark.parametrize(
    "token_url,authority",
    [
        (MS_TOKEN_URL, f"https://{HOST}/{TENANT}"),
        (f"https://{HOST}/common/oauth2/v2.0/token/", f"https://{HOST}/common"),
        (LOCAL_TOKEN_URL, LOCAL_AUTHORITY),
        ("https://login.microsoftonline.us/t/OAuth2/V2.0/Token", "https://login.microsoftonline.us/t"),
        (f"https://{HOST}/{TENANT}/oauth2/token", None),  # v1
        (f"http://{HOST}/{TENANT}/oauth2/v2.0/token", None),  # msal needs https
        ("https://oauth2.googleapis.com/token", None),
        (f"https://{HOST}/a/b/oauth2/v2.0/token", None),
        ("not a url", None),
        (None, None),
    ],
)
def test_authority_from_token_url(token_url: str | None, authority: str | None) -> None:
    assert authority_for(token_url) == authority


def test_scopes_lose_the_reserved_ones_that_msal_adds_itself() -> None:
    assert msal_scopes(USER_SCOPE) == ["https://outlook.office365.com/IMAP.AccessAsUser.All"]
    assert msal_scopes(" a  OpenID b Profile a offline_access ") == ["a", "b"]
    assert msal_scopes(None) == [] and msal_scopes("") == []


def test_query_mode_only_changes_the_response_mode() -> None:
    url = "https://idp/authorize?client_id=c&response_mode=form_post&state=s%20t&scope=a+b"
    assert query_mode(url) == "https://idp/authorize?client_id=c&response_mode=query&state=s+t&scope=a+b"


# ---------------------------------------------------------------------------------- selection


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ({}, MSAL),  # Microsoft host, v2.0, auto
        ({"token_backend": "standard"}, STANDARD),
        ({"token_url": LOCAL_TOKEN_URL}, STANDARD),  # auto: only Microsoft's hosts
        ({"token_url": LOCAL_TOKEN_URL, "token_backend": "msal"}, MSAL),
        ({"token_url": f"https://{HOST}/{TENANT}/oauth2/token", "oauth2_resource": "r"}, STANDARD),
        ({"token_url": f"https://{HOST}/{TENANT}/oauth2/token", "token_backend": "msal"}, STANDARD),
        ({"token_url": "https://login.windows.net/t/oauth2/v2.0/token"}, MSAL),
        ({"token_url": "https://login.partner.microsoftonline.cn/t/oauth2/v2.0/token"}, MSAL),
        ({"token_url": "https://oauth2.googleapis.com/token", "token_backend": "msal"}, STANDARD),
        ({"oauth2_flow": "service_account", "token_backend": "msal"}, STANDARD),
        ({"oauth2_flow": "urn:custom:grant"}, STANDARD),
        ({"oauth2_flow": None}, STANDARD),
        ({"oauth2_flow": "password"}, STANDARD),  # public-client ROPC: msal deprecates it
        ({"oauth2_flow": "password", "client_secret": SECRET}, MSAL),
        ({"oauth2_flow": "password", "cached": CachedTokens(client_secret_encrypted="gAAAA")}, MSAL),
        ({"oauth2_flow": "password", "jwt_certificate_path": "c", "jwt_key_path": "k"}, MSAL),
        ({"oauth2_flow": "device"}, MSAL),
        ({"oauth2_flow": "device", "client_secret": SECRET}, STANDARD),  # msal: public clients only
        ({"permission_url": f"https://{HOST}/{TENANT}/oauth2/v2.0/authorize", "client_secret": SECRET}, MSAL),
    ],
)
def test_backend_selection(overrides: dict[str, Any], expected: str) -> None:
    assert select_backend(account(**overrides)) == expected


def test_the_credential_a_login_chooses_overrides_the_config_for_selection() -> None:
    ropc = account(oauth2_flow="password")
    assert select_backend(ropc, has_credential=True) == MSAL  # e.g. the login password as the secret
    assert select_backend(account(oauth2_flow="device", client_secret=SECRET), has_credential=False) == MSAL


# ---------------------------------------------------------------------------------- configuration

SERVER = "[IMAP-1993]\nserver_address = imap.example.com\nserver_port = 993\n"
MS_ACCOUNT = f"""
[user@example.com]
token_url = {MS_TOKEN_URL}
oauth2_scope = {APP_SCOPE}
oauth2_flow = client_credentials
client_id = c
client_secret = s
"""


def load(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "emailproxy.config"
    path.write_text(textwrap.dedent(text))
    return load_config(path)


def test_token_backend_defaults_to_auto_and_follows_the_global_option(tmp_path: Path) -> None:
    assert load(tmp_path, SERVER + MS_ACCOUNT).find_account("user@example.com").token_backend == "auto"
    config = load(tmp_path, SERVER + "[emailproxy]\ntoken_backend = Standard\n" + MS_ACCOUNT)
    assert config.options.token_backend == "standard"
    found = config.find_account("user@example.com")
    assert found.token_backend == "standard" and select_backend(found) == STANDARD
    own = load(
        tmp_path, SERVER + "[emailproxy]\ntoken_backend = standard\n" + MS_ACCOUNT + "token_backend = MSAL\n"
    )
    assert own.find_account("user@example.com").token_backend == "msal"


@pytest.mark.parametrize("where", ["account", "global", "default"])
def test_an_unknown_token_backend_is_a_config_error(tmp_path: Path, where: str) -> None:
    text = {
        "account": SERVER + MS_ACCOUNT + "token_backend = msa1\n",
        "global": SERVER + "[emailproxy]\ntoken_backend = msa1\n" + MS_ACCOUNT,
        "default": "[DEFAULT]\ntoken_backend = msa1\n" + SERVER + MS_ACCOUNT,
    }[where]
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert info.value.key == "token_backend"
    assert (
        info.value.section
        == {"account": "user@example.com", "global": "emailproxy", "default": "DEFAULT"}[where]
    )
    assert "'msa1'" in str(info.value) and "auto, msal, standard" in str(info.value)


def test_check_explains_a_token_backend_msal_that_cannot_apply() -> None:
    assert backend_findings(account(token_backend="msal")) == []
    assert backend_findings(account(token_backend="auto", oauth2_flow="service_account")) == []
    [v1] = backend_findings(account(token_backend="msal", token_url=f"https://{HOST}/t/oauth2/token"))
    assert v1.key == "token_backend" and "not a v2.0 endpoint" in v1.message
    [ropc] = backend_findings(account(token_backend="msal", oauth2_flow="password"))
    assert "password flow only with a client secret" in ropc.message
    [dev] = backend_findings(account(token_backend="msal", oauth2_flow="device", client_secret=SECRET))
    assert "device flow only for public clients" in dev.message


# ---------------------------------------------------------------------------------- routing


class FakeEndpoint:
    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, str]]] = []

    def post(self, url: str, form: Any) -> dict[str, Any]:
        self.posts.append((url, dict(form)))
        return {"access_token": "standard-at", "expires_in": 3600}


@dataclass
class FakeMicrosoft:
    calls: list[str] = field(default_factory=list)

    def fresh(self, *args: Any) -> dict[str, Any]:
        self.calls.append("fresh")
        return {"access_token": "msal-at"}

    def refresh(self, *args: Any) -> dict[str, Any]:
        self.calls.append("refresh")
        return {"access_token": "msal-at"}

    def begin_code(self, account: AccountConfig, username: str, state: str, secret: Any) -> CodeRequest:
        self.calls.append("begin_code")
        return CodeRequest("https://msal/authorize", state, flow={"state": state})

    def redeem_code(self, *args: Any) -> dict[str, Any]:
        self.calls.append("redeem_code")
        return {"access_token": "msal-at"}

    def start_device(self, *args: Any) -> DeviceAuthorization:
        self.calls.append("start_device")
        return DeviceAuthorization("dc", "UC", "https://msal/device", flow={"device_code": "dc"})

    def poll_device(self, *args: Any) -> dict[str, Any]:
        self.calls.append("poll_device")
        return {"access_token": "msal-at"}


def test_token_clients_route_each_account_and_keep_msal_unloaded_when_unused() -> None:
    endpoint = FakeEndpoint()
    clients = TokenClients(endpoint)
    google = account(token_url="https://oauth2.googleapis.com/token", oauth2_scope="https://mail.google.com/")
    assert clients.fresh(google, "u", "p", SECRET)["access_token"] == "standard-at"
    with pytest.raises(flows.FlowUnavailable) as info:
        clients.fresh(account(oauth2_flow="device"), "u", "p", None)
    assert info.value.interactive
    assert "not loaded" in repr(clients)  # neither call needed msal
    fake = FakeMicrosoft()
    clients = TokenClients(endpoint, microsoft=fake)
    assert clients.fresh(account(), "u", "p", SECRET)["access_token"] == "msal-at"
    assert clients.refresh(account(oauth2_flow="password"), SECRET, "rt")["access_token"] == "msal-at"
    ms_code = account(
        permission_url=f"https://{HOST}/{TENANT}/oauth2/v2.0/authorize", redirect_uri="http://l"
    )
    begun = clients.begin_code(ms_code, "u", "state-1", SECRET)
    clients.redeem_code(ms_code, begun, Callback("state-1", "code"), SECRET)
    begun_std = clients.begin_code(replace(ms_code, token_backend="standard"), "u", "state-2", SECRET)
    assert begun_std.flow is None and "state=state-2" in begun_std.url
    clients.redeem_code(
        replace(ms_code, token_backend="standard"), begun_std, Callback("state-2", "c2"), SECRET
    )
    device = clients.start_device(account(oauth2_flow="device"), None)
    clients.poll_device(account(oauth2_flow="device"), device, None)
    assert fake.calls == ["fresh", "refresh", "begin_code", "redeem_code", "start_device", "poll_device"]
    assert [form["grant_type"] for _, form in endpoint.posts] == ["client_credentials", "authorization_code"]
    assert as_client(clients) is clients and isinstance(as_client(endpoint), TokenClients)


# ---------------------------------------------------------------------------------- fake identity provider


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def id_token(nonce: str | None) -> str:
    claims = {
        "iss": "x",
        "sub": "s",
        "aud": "client-1",
        "exp": 4_000_000_000,
        "iat": 1,
        "preferred_username": "u",
    }
    if nonce is not None:
        claims["nonce"] = nonce
    return f"{_b64url(b'{}')}.{_b64url(json.dumps(claims).encode())}.sig"


Answer = tuple[int, Any]  # (status, JSON-able body or raw bytes)


class FakeIdp(BaseAdapter):
    """Answers discovery, user realm, device code and token requests; records (method, url, form, verify)."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []
        self.discovery: Answer | None = None
        self.device: Answer = (
            200,
            {"device_code": "dc-1", "user_code": "UC-1", "verification_uri": "https://d"},
        )
        self.token: list[Answer | Exception] = []
        self.make_token: Callable[[dict[str, str]], Answer] = lambda form: (
            200,
            {"access_token": f"at-{len(self.requests)}", "expires_in": 3600, "refresh_token": "rt-new"},
        )

    def send(  # type: ignore[override]
        self, request: Any, stream: Any = False, timeout: Any = None, verify: Any = True, **kw: Any
    ) -> Any:
        url = urllib.parse.urlsplit(request.url)
        body = request.body or ""
        form = dict(urllib.parse.parse_qsl(body if isinstance(body, str) else body.decode()))
        self.requests.append((request.method, request.url, form, verify))
        tenant_base = f"https://{url.netloc}/{url.path.split('/')[1]}"
        answer: Answer | Exception
        if url.path.endswith("/v2.0/.well-known/openid-configuration"):
            answer = self.discovery or (
                200,
                {
                    "issuer": tenant_base + "/v2.0",
                    "authorization_endpoint": tenant_base + "/oauth2/v2.0/authorize",
                    "token_endpoint": tenant_base + "/oauth2/v2.0/token",
                    "device_authorization_endpoint": tenant_base + "/oauth2/v2.0/devicecode",
                },
            )
        elif url.path.startswith("/common/userrealm/"):
            answer = (200, {"account_type": "Managed"})
        elif url.path.endswith("/devicecode"):
            answer = self.device
        elif url.path.endswith("/token"):
            answer = self.token.pop(0) if self.token else self.make_token(form)
        else:
            answer = (404, {"error": "not_found"})
        if isinstance(answer, Exception):
            raise answer
        status, payload = answer
        response = requests.Response()
        response.status_code = status
        response._content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        response.headers = CaseInsensitiveDict({"Content-Type": "application/json"})
        response.reason = "Reason"
        response.url = request.url
        response.request = request
        return response

    def close(self) -> None:
        pass

    def token_forms(self) -> list[dict[str, str]]:
        return [form for method, url, form, _ in self.requests if url.split("?")[0].endswith("/token")]

    def discoveries(self) -> int:
        return sum(1 for _, url, _, _ in self.requests if "openid-configuration" in url)


@pytest.fixture
def idp() -> FakeIdp:
    return FakeIdp()


@pytest.fixture
def client(idp: FakeIdp) -> MicrosoftClient:
    session = requests.Session()
    session.trust_env = False
    session.mount("https://", idp)
    return MicrosoftClient(7.0, session)


def local(**overrides: Any) -> AccountConfig:
    return account(**{"token_url": LOCAL_TOKEN_URL, "token_backend": "msal", **overrides})


# ---------------------------------------------------------------------------------- MicrosoftClient


def test_client_credentials_use_msal_and_never_its_token_cache(
    client: MicrosoftClient, idp: FakeIdp, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", "/tmp/the-test-ca.pem")
    first = client.fresh(local(), "u", "p", SECRET)
    second = client.fresh(local(), "u", "p", SECRET)
    assert first["access_token"] != second["access_token"]  # msal asked again: our cache is the only one
    assert idp.discoveries() == 1  # the app was built once
    forms = idp.token_forms()
    assert [f["grant_type"] for f in forms] == ["client_credentials"] * 2
    assert forms[0]["client_info"] == "1" and forms[0]["client_secret"] == SECRET
    assert forms[0]["scope"] == APP_SCOPE
    assert {verify for *_, verify in idp.requests} == {"/tmp/the-test-ca.pem"}
    client.fresh(local(), "u", "p", "another-secret")
    assert idp.discoveries() == 2  # a new credential is a new app


def test_ropc_and_refresh_scopes_and_user_realm(client: MicrosoftClient, idp: FakeIdp) -> None:
    ropc = local(oauth2_flow="password", oauth2_scope=USER_SCOPE)
    client.fresh(ropc, "user@example.com", PASSWORD, SECRET)
    client.refresh(ropc, SECRET, "rt-old")
    realm = [url for method, url, *_ in idp.requests if "userrealm" in url]
    assert realm == [f"https://{LOCAL}/common/userrealm/user@example.com?api-version=1.0"]  # port kept
    password, refresh = idp.token_forms()
    expected = {"https://outlook.office365.com/IMAP.AccessAsUser.All", "offline_access", "openid", "profile"}
    assert password["grant_type"] == "password" and password["password"] == PASSWORD
    assert set(password["scope"].split()) == set(refresh["scope"].split()) == expected
    assert refresh["grant_type"] == "refresh_token" and refresh["refresh_token"] == "rt-old"


def test_user_realm_url_gets_the_authority_port_back() -> None:
    http = MsalHttpClient(requests.Session(), LOCAL_AUTHORITY, lambda: 1.0)
    assert http.with_port("https://idp.test/common/userrealm/u@x?api-version=1.0") == (
        f"https://{LOCAL}/common/userrealm/u@x?api-version=1.0"
    )
    assert http.with_port("https://other.test/common/userrealm/u") == "https://other.test/common/userrealm/u"
    assert http.with_port("https://idp.test/tenant-1/x") == "https://idp.test/tenant-1/x"
    default_port = MsalHttpClient(requests.Session(), f"https://{HOST}/t", lambda: 1.0)
    assert (
        default_port.with_port(f"https://{HOST}/common/userrealm/u") == f"https://{HOST}/common/userrealm/u"
    )


@pytest.mark.parametrize(
    "answer,status,error,permanent",
    [
        (
            (400, {"error": "invalid_grant", "error_description": "AADSTS70000: gone"}),
            400,
            "invalid_grant",
            True,
        ),
        ((401, {"error": "invalid_client"}), 401, "invalid_client", False),
        ((200, {"error": "invalid_grant"}), 200, "invalid_grant", True),
        ((503, {"error": "temporarily_unavailable"}), 503, "temporarily_unavailable", False),
        ((500, b"<html>down</html>"), 500, "http_500", False),
        ((200, b"<html>a captive portal</html>"), 200, "http_200", False),
    ],
)
def test_refresh_errors_keep_their_meaning(
    client: MicrosoftClient, idp: FakeIdp, answer: Answer, status: int, error: str, permanent: bool
) -> None:
    idp.token.append(answer)
    with pytest.raises(TokenEndpointError) as info:
        client.refresh(local(oauth2_flow="password", oauth2_scope=USER_SCOPE), SECRET, "rt")
    assert (info.value.status, info.value.error, info.value.is_permanent) == (status, error, permanent)


def test_network_errors_and_discovery_failures(client: MicrosoftClient, idp: FakeIdp) -> None:
    idp.token.append(requests.exceptions.ConnectTimeout("slow"))
    with pytest.raises(TokenNetworkError) as network:
        client.fresh(local(), "u", "p", SECRET)
    assert str(network.value) == f"{LOCAL} did not answer within 7 s"
    idp.discovery = (404, {"error": "invalid_tenant"})
    with pytest.raises(TokenEndpointError) as info:
        client.fresh(local(client_id="other-client"), "u", "p", SECRET)
    assert info.value.error == "http_404" and not info.value.is_permanent
    idp.discovery = None
    client.fresh(local(client_id="other-client"), "u", "p", SECRET)  # a failed build is not cached
    assert idp.discoveries() == 3


def test_credential_problems_are_named_before_any_token_request(
    client: MicrosoftClient, idp: FakeIdp
) -> None:
    with pytest.raises(CredentialError, match="client secret or a certificate"):
        client.fresh(local(), "u", "p", None)
    with pytest.raises(CredentialError, match="tenant ID"):
        client.fresh(local(token_url=f"https://{LOCAL}/common/oauth2/v2.0/token"), "u", "p", SECRET)
    with pytest.raises(CredentialError, match="password flow only"):
        client.fresh(local(oauth2_flow="password"), "u", PASSWORD, None)
    with pytest.raises(CredentialError, match=r"v2\.0 token_url"):
        client.refresh(local(token_url="https://idp.test/oauth2/token"), SECRET, "rt")
    with pytest.raises(CredentialError, match="jwt_certificate_path"):
        client.fresh(
            local(jwt_certificate_path="/nonexistent/c.pem", jwt_key_path="/nonexistent/k"), "u", "p", None
        )
    with pytest.raises(flows.FlowUnavailable):
        client.fresh(local(oauth2_flow="device"), "u", "p", None)
    assert idp.token_forms() == []


def write_certificate(directory: Path) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "app")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_certificate_credentials_are_signed_by_msal_and_a_secret_wins(
    client: MicrosoftClient, idp: FakeIdp, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert_path, key_path = write_certificate(tmp_path)
    with_cert = local(jwt_certificate_path=str(cert_path), jwt_key_path=str(key_path))
    client.fresh(with_cert, "u", "p", None)
    form = idp.token_forms()[0]
    assert "client_secret" not in form
    head = json.loads(base64.urlsafe_b64decode(form["client_assertion"].split(".")[0] + "=="))
    thumbprint = x509.load_pem_x509_certificate(cert_path.read_bytes()).fingerprint(hashes.SHA256())
    assert head["alg"] == "PS256" and head["x5t#S256"].rstrip("=") == _b64url(thumbprint)
    client.fresh(with_cert, "u", "p", SECRET)
    assert "using the client secret (remove it to use the certificate)" in caplog.text
    assert idp.token_forms()[1]["client_secret"] == SECRET and "client_assertion" not in idp.token_forms()[1]
    key_path.write_text("not a key")
    with pytest.raises(CredentialError, match="not a PEM private key"):
        client.fresh(with_cert, "u", "p", None)


def test_auth_code_flow_pkce_state_and_nonce(client: MicrosoftClient, idp: FakeIdp) -> None:
    code_account = local(
        permission_url=f"{LOCAL_AUTHORITY}/oauth2/v2.0/authorize",
        redirect_uri="http://localhost:8080/cb",
        oauth2_scope=USER_SCOPE,
    )
    begun = client.begin_code(code_account, "user@example.com", "our-state", SECRET)
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(begun.url).query))
    assert begun.url.startswith(f"{LOCAL_AUTHORITY}/oauth2/v2.0/authorize?")
    assert query["state"] == "our-state" and query["response_mode"] == "query"
    assert query["code_challenge_method"] == "S256" and query["redirect_uri"] == "http://localhost:8080/cb"
    assert query["login_hint"] == "user@example.com" and query["client_info"] == "1"
    assert "verifier" not in repr(begun) and begun.flow is not None
    idp.make_token = lambda form: (200, {"access_token": "at-code", "id_token": id_token(query["nonce"])})
    tokens = client.redeem_code(code_account, begun, Callback("our-state", "the-code"), SECRET)
    assert tokens["access_token"] == "at-code"
    form = idp.token_forms()[0]
    assert form["code"] == "the-code" and form["redirect_uri"] == "http://localhost:8080/cb"
    assert authcode.pkce_challenge(form["code_verifier"]) == query["code_challenge"]
    # an id_token for another authorisation request (replayed code): msal's nonce check refuses it
    again = client.begin_code(code_account, "user@example.com", "state-2", SECRET)
    idp.make_token = lambda form: (200, {"access_token": "at-evil", "id_token": id_token("another-nonce")})
    with pytest.raises(TokenEndpointError) as info:
        client.redeem_code(code_account, again, Callback("state-2", "code-2"), SECRET)
    assert not info.value.is_permanent and "RuntimeError" in str(info.value)


def test_device_flow_start_and_single_polls(client: MicrosoftClient, idp: FakeIdp) -> None:
    device_account = local(oauth2_flow="device", oauth2_scope=USER_SCOPE)
    authorization = client.start_device(device_account, None)
    assert (authorization.user_code, authorization.link, authorization.interval) == ("UC-1", "https://d", 5.0)
    assert authorization.flow is not None and "dc-1" not in repr(authorization)
    idp.token.append((400, {"error": "authorization_pending"}))
    with pytest.raises(TokenEndpointError) as info:
        client.poll_device(device_account, authorization, None)
    assert info.value.error == "authorization_pending"  # device.poll keeps polling on this
    [poll] = idp.token_forms()
    assert poll["device_code"] == "dc-1" and poll["client_info"] == "1" and "client_secret" not in poll
    with pytest.raises(CredentialError, match="public clients"):
        client.start_device(device_account, SECRET)
    idp.device = (400, {"error": "unauthorized_client", "error_description": "AADSTS700016"})
    with pytest.raises(TokenEndpointError) as refused:
        client.start_device(local(oauth2_flow="device", client_id="unknown"), None)
    assert (refused.value.status, refused.value.error) == (400, "unauthorized_client")


def test_nothing_secret_is_logged(
    client: MicrosoftClient, idp: FakeIdp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ropc = local(oauth2_flow="password", oauth2_scope=USER_SCOPE)
    tokens = client.fresh(ropc, "user@example.com", PASSWORD, SECRET)
    client.refresh(ropc, SECRET, "rt-secret-value")
    idp.token.append((400, {"error": "invalid_grant"}))
    with pytest.raises(TokenEndpointError) as info:
        client.refresh(ropc, SECRET, "rt-secret-value-2")
    text = caplog.text + repr(client) + str(info.value)
    for secret in (PASSWORD, SECRET, "rt-secret-value", tokens["access_token"], "rt-new"):
        assert secret not in text
    assert "msal: password token request to idp.test:8443" in caplog.text
    assert hashlib.sha256(SECRET.encode()).hexdigest() not in text


def test_msal_is_imported_only_when_an_account_uses_it() -> None:
    code = textwrap.dedent(
        """
        import sys
        import emailproxy.cli, emailproxy.checks
        from emailproxy.config import AccountConfig
        from emailproxy.oauth.client import TokenClients

        class Endpoint:
            def post(self, url, form):
                return {"access_token": "at"}

        google = AccountConfig("u@x", "u@x", "u@x", token_url="https://oauth2.googleapis.com/token",
                               oauth2_scope="s", oauth2_flow="client_credentials", client_id="c")
        clients = TokenClients(Endpoint())
        clients.fresh(google, "u@x", "p", "s")
        assert "msal" not in sys.modules, "imported too early"
        clients.microsoft
        assert "msal" in sys.modules
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
