"""End to end with ``token_backend = msal``: every flow goes through msal against the test identity provider
(shaped like the Microsoft identity platform: OIDC discovery, client_info, nonce in the id_token), and the
login through the proxy to Dovecot works with the token msal obtained.

How a request is known to come from msal: msal sends ``client_info=1`` in every token request and its
``x-client-sku: MSAL.Python`` header, and it fetches the authority's OpenID configuration first; the
standards-based client does none of that.
"""

from __future__ import annotations

import base64
import configparser
import datetime
import imaplib
import json
import re
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.integration.conftest import World
from tests.integration.proxy import Proxy, allocate_ports, launch, wait_for
from tests.integration.world.idp import DEVICE_CODE_GRANT, JWT_BEARER, RecordedRequest, pkce_challenge

PASSWORD = "local-password-7"
CLIENT_ID = "msal-client"
CLIENT_SECRET = "msal-client-secret-value"
APP_SCOPE = "https://outlook.office365.com/.default"
USER_SCOPE = "https://outlook.office365.com/IMAP.AccessAsUser.All offline_access"
DECORATED = {"https://outlook.office365.com/IMAP.AccessAsUser.All", "offline_access", "openid", "profile"}
URL_LINE = "Please visit the following URL to authenticate account {user}: "


# ------------------------------------------------------------------------------------------- helpers


def header(request: RecordedRequest, name: str) -> str | None:
    return next((value for key, value in request.headers.items() if key.lower() == name), None)


def assert_from_msal(request: RecordedRequest) -> None:
    assert request.form.get("client_info") == "1", request.form
    assert header(request, "x-client-sku") == "MSAL.Python"
    assert header(request, "x-app-name") == "emailproxy"


def discoveries(world: World) -> list[RecordedRequest]:
    return [r for r in world.idp.requests if r.endpoint == "openid-configuration"]


def imap_login(port: int, user: str, password: str = PASSWORD) -> str:
    """Log in and select INBOX through the proxy: "ok" or the error text."""
    try:
        with imaplib.IMAP4("127.0.0.1", port, timeout=60) as imap:
            imap.login(user, password)
            typ, _ = imap.select("INBOX")
            return "ok" if typ == "OK" else f"select: {typ}"
    except imaplib.IMAP4.error as error:
        return str(error)


def valid_checks(world: World, user: str) -> list[str]:
    """Tokens Dovecot checked with the identity provider for ``user`` and found valid."""
    return [check.token for check in world.idp.check_log if check.user == user and check.ok]


def saved(proxy: Proxy, section: str) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(proxy.config_path.read_text())
    return dict(parser[section]) if parser.has_section(section) else {}


def jwt_header(token: str) -> dict[str, Any]:
    part = token.split(".")[0]
    value: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return value


def write_certificate(directory: Path) -> tuple[bytes, Path, Path]:
    """A self-signed app certificate and its key, written to files: (certificate PEM, cert path, key path)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "emailproxy msal test app")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path, key_path = directory / "msal-app-cert.pem", directory / "msal-app-key.pem"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_pem, cert_path, key_path


Start = Callable[..., tuple[Proxy, dict[str, int]]]


@pytest.fixture
def start(world: World, tmp_path: Path) -> Iterator[Start]:
    """start(section, account_options, redirect=False) -> (proxy, ports); stopped afterwards. With
    ``redirect``, a REDIRECT port is allocated and ``{REDIRECT}`` in option values is replaced by it."""
    started: list[Proxy] = []

    def run(section: str, account: dict[str, str], redirect: bool = False) -> tuple[Proxy, dict[str, int]]:
        ports = allocate_ports("IMAP", "REDIRECT") if redirect else allocate_ports("IMAP")
        options = {
            key: value.replace("{REDIRECT}", str(ports.get("REDIRECT"))) for key, value in account.items()
        }
        d = world.dovecot.ports
        sections = {
            "emailproxy": {"allow_catch_all_accounts": "True", "authorisation_wait_seconds": "30"},
            f"IMAP-{ports['IMAP']}": {"server_address": d.host, "server_port": str(d.imaps)},
            section: {"token_url": world.idp.token_url(), **options},
        }
        directory = tmp_path / f"proxy-{len(started)}"
        directory.mkdir()
        proxy = launch(world.ca_path, directory, sections, ports)
        started.append(proxy)
        return proxy, ports

    yield run
    for proxy in started:
        assert proxy.stop() == 0, proxy.output()


def ccg_account(backend: str) -> dict[str, str]:
    return {
        "oauth2_scope": APP_SCOPE,
        "oauth2_flow": "client_credentials",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "token_backend": backend,
    }


# ------------------------------------------------------------------------------------ client credentials


def test_client_credentials_with_a_secret_go_through_msal(world: World, start: Start) -> None:
    world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
    proxy, ports = start(f"@{world.domain}", ccg_account("msal"))
    user = world.new_user("msal-ccg")
    assert imap_login(ports["IMAP"], user) == "ok"
    [request] = world.idp.token_requests()
    assert request.grant_type == "client_credentials"
    assert_from_msal(request)
    assert request.form["client_secret"] == CLIENT_SECRET and request.form["scope"] == APP_SCOPE
    [discovery] = discoveries(world)
    assert discovery.path == "/tenant-1/v2.0/.well-known/openid-configuration"
    assert discovery.time <= request.time
    issued = world.idp.issued[-1].access_token
    assert valid_checks(world, user) == [issued]  # Dovecot accepted the token msal obtained
    assert imap_login(ports["IMAP"], user) == "ok"  # from our own cache: no second request
    assert len(world.idp.token_requests()) == 1
    log = proxy.log()
    assert "msal: client credentials token request to 127.0.0.1:" in log
    assert CLIENT_SECRET not in log and issued not in log


def test_token_backend_standard_on_the_same_account_does_not_use_msal(world: World, start: Start) -> None:
    world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
    proxy, ports = start(f"@{world.domain}", ccg_account("standard"))
    user = world.new_user("std-ccg")
    assert imap_login(ports["IMAP"], user) == "ok"
    [request] = world.idp.token_requests()
    assert request.grant_type == "client_credentials" and request.form["client_secret"] == CLIENT_SECRET
    assert "client_info" not in request.form
    assert header(request, "x-client-sku") is None
    assert discoveries(world) == []
    assert "msal:" not in proxy.log()


def test_client_credentials_with_a_certificate_go_through_msal(
    world: World, start: Start, tmp_path: Path
) -> None:
    cert_pem, cert_path, key_path = write_certificate(tmp_path)
    world.idp.register_client(CLIENT_ID, certificate_pem=cert_pem)
    account = {
        "oauth2_scope": APP_SCOPE,
        "oauth2_flow": "client_credentials",
        "client_id": CLIENT_ID,
        "jwt_certificate_path": str(cert_path),
        "jwt_key_path": str(key_path),
        "token_backend": "msal",
    }
    _, ports = start(f"@{world.domain}", account)
    user = world.new_user("msal-cert")
    assert imap_login(ports["IMAP"], user) == "ok"
    [request] = world.idp.token_requests("client_credentials")
    assert_from_msal(request)
    assert "client_secret" not in request.form
    assert request.form["client_assertion_type"] == JWT_BEARER
    signed = jwt_header(request.form["client_assertion"])
    # msal signs (PS256, with the certificate in x5c); our own assertions are RS256 without x5c
    assert signed["alg"] == "PS256" and "x5t#S256" in signed and signed["x5c"]
    assert valid_checks(world, user) == [world.idp.issued[-1].access_token]


# ------------------------------------------------------------------------------------ ROPC and refresh


def ropc_account() -> dict[str, str]:
    return {
        "oauth2_scope": USER_SCOPE,
        "oauth2_flow": "password",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "token_backend": "msal",
    }


def test_ropc_goes_through_msal_with_user_realm_discovery_on_the_authority_port(
    world: World, start: Start
) -> None:
    world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
    user = world.new_user("msal-ropc")
    world.idp.register_user(user, PASSWORD)
    proxy, ports = start(user, ropc_account())
    assert imap_login(ports["IMAP"], user) == "ok"
    # msal asks for the user realm first; without the port fix it would go to port 443 and fail
    [realm] = [r for r in world.idp.requests if r.endpoint == "userrealm"]
    assert realm.path == f"/common/userrealm/{user}" and realm.query["api-version"] == "1.0"
    [request] = world.idp.token_requests()
    assert request.grant_type == "password" and realm.time <= request.time
    assert_from_msal(request)
    assert request.form["username"] == user and request.form["password"] == PASSWORD
    assert set(request.form["scope"].split()) == DECORATED  # offline_access stripped, msal adds it back
    assert valid_checks(world, user) == [world.idp.issued[-1].access_token]
    assert saved(proxy, user)["refresh_token"].startswith("gAAAAA")
    log = proxy.log()
    assert PASSWORD not in log and CLIENT_SECRET not in log


def test_expired_cached_token_is_refreshed_through_msal_and_a_rejected_refresh_token_is_dropped(
    world: World, start: Start
) -> None:
    world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
    world.idp.expires_in = 300  # under the proxy's 600 s margin: a cached token counts as expired at once
    user = world.new_user("msal-refresh")
    world.idp.register_user(user, PASSWORD)
    proxy, ports = start(user, ropc_account())
    assert imap_login(ports["IMAP"], user) == "ok"
    first = world.idp.issued[-1]
    assert imap_login(ports["IMAP"], user) == "ok"
    grants = [r.grant_type for r in world.idp.token_requests()]
    assert grants == ["password", "refresh_token"]
    refresh = world.idp.token_requests("refresh_token")[0]
    assert_from_msal(refresh)
    assert refresh.form["refresh_token"] == first.refresh_token
    assert set(refresh.form["scope"].split()) == DECORATED
    second = world.idp.issued[-1]
    assert second.grant_type == "refresh_token" and second.access_token != first.access_token
    assert valid_checks(world, user)[-1] == second.access_token
    assert first.refresh_token is not None
    world.idp.revoke(first.refresh_token)  # invalid_grant: the tokens go, and ROPC runs again
    assert imap_login(ports["IMAP"], user) == "ok"
    assert [r.grant_type for r in world.idp.token_requests()] == [
        "password",
        "refresh_token",
        "refresh_token",
        "password",
    ]
    assert "was rejected (invalid_grant); discarding cached tokens" in proxy.log()
    assert valid_checks(world, user)[-1] == world.idp.issued[-1].access_token


# ------------------------------------------------------------------------------------ interactive flows


def visit(url: str) -> requests.Response:
    with requests.Session() as http:
        http.trust_env = False
        return http.get(url, allow_redirects=False, timeout=10)


def test_auth_code_with_pkce_goes_through_msal(world: World, start: Start) -> None:
    world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
    user = world.new_user("msal-code")
    account = {
        "permission_url": world.idp.authorize_url(),
        "redirect_uri": "http://localhost:{REDIRECT}/callback",
        "redirect_listen_address": "http://127.0.0.1:{REDIRECT}",
        "oauth2_scope": USER_SCOPE,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "token_backend": "msal",
    }
    proxy, ports = start(user, account, redirect=True)
    with ThreadPoolExecutor(1) as pool:
        login = pool.submit(imap_login, ports["IMAP"], user)
        pattern = re.compile(re.escape(URL_LINE.format(user=user)) + r"(\S+)")
        url = wait_for(lambda: pattern.search(proxy.log()), "the authorisation URL").group(1)
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
        assert url.startswith(world.idp.authorize_url() + "?")
        assert query["client_info"] == "1" and query["nonce"]  # msal's additions
        assert query["code_challenge_method"] == "S256" and query["response_mode"] == "query"
        assert query["login_hint"] == user and len(query["state"]) >= 22
        assert set(query["scope"].split()) == DECORATED
        with world.idp.session() as http:
            answer = http.get(url, allow_redirects=False, timeout=10)
        assert answer.status_code == 302
        location = answer.headers["Location"]
        assert dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))["state"] == query["state"]
        assert visit(location.replace("localhost", "127.0.0.1", 1)).status_code == 200
        assert login.result(timeout=30) == "ok"
    [redeem] = world.idp.token_requests("authorization_code")
    assert_from_msal(redeem)
    assert pkce_challenge(redeem.form["code_verifier"]) == query["code_challenge"]  # and the IdP checked it
    assert redeem.form["redirect_uri"] == f"http://localhost:{ports['REDIRECT']}/callback"
    assert valid_checks(world, user) == [world.idp.issued[-1].access_token]
    assert imap_login(ports["IMAP"], user) == "ok"
    assert len(world.idp.token_requests()) == 1


def test_device_flow_goes_through_msal(world: World, start: Start) -> None:
    world.idp.register_client(CLIENT_ID)  # msal's device flow is for public clients
    world.idp.device_interval = 1
    user = world.new_user("msal-device")
    account = {
        "permission_url": world.idp.devicecode_url(),
        "oauth2_flow": "device",
        "oauth2_scope": USER_SCOPE,
        "client_id": CLIENT_ID,
        "token_backend": "msal",
    }
    proxy, ports = start(user, account)
    pattern = re.compile(
        rf"Please visit (\S+) and enter the code (\S+) to authenticate account {re.escape(user)}"
    )
    with ThreadPoolExecutor(1) as pool:
        login = pool.submit(imap_login, ports["IMAP"], user)
        match = wait_for(lambda: pattern.search(proxy.log()), "the device code in the log")
        assert match.group(1) == f"{world.idp.base_url}/devicelogin"
        wait_for(lambda: world.idp.token_requests(DEVICE_CODE_GRANT), "the first poll")
        world.idp.approve_device(match.group(2), user)
        assert login.result(timeout=30) == "ok"
    [started] = [r for r in world.idp.requests if r.endpoint == "devicecode"]
    assert header(started, "x-client-sku") == "MSAL.Python"
    assert set(started.form["scope"].split()) == DECORATED
    polls = world.idp.token_requests(DEVICE_CODE_GRANT)
    assert len(polls) >= 2  # pending, then approved
    for poll in polls:
        assert_from_msal(poll)
    assert polls[-1].time - polls[-2].time >= 1 - 0.2  # our loop keeps the interval
    assert valid_checks(world, user) == [world.idp.issued[-1].access_token]
