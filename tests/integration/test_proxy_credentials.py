"""End to end: certificate credentials (JWT client assertions) and Google-style service accounts.

The identity provider verifies every assertion against what was registered with it (signature, iss/sub,
aud = its token URL, the certificate's x5t#S256, lifetime), and Dovecot checks each token the proxy sends with
the identity provider, so a login succeeds only when the whole chain is right.
"""

from __future__ import annotations

import base64
import configparser
import datetime
import hashlib
import imaplib
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.integration.conftest import World
from tests.integration.proxy import Proxy, allocate_ports, launch
from tests.integration.world.idp import JWT_BEARER, JWT_BEARER_GRANT

PASSWORD = "local-password"
PREFIX = "Email OAuth 2.0 Proxy: "
MS_SCOPE = "https://outlook.office365.com/.default"
GOOGLE_SCOPE = "https://mail.google.com/"


@dataclass(frozen=True)
class Identity:
    """An RSA key with a self-signed certificate, as an app registration or a service account has."""

    key_pem: bytes
    cert_pem: bytes
    thumbprint_s256: str  # urlsafe base64 of the certificate's SHA-256 fingerprint, padded


def _identity(name: str) -> Identity:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    return Identity(
        key_pem,
        cert.public_bytes(serialization.Encoding.PEM),
        base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode(),
    )


@pytest.fixture(scope="module")
def app() -> Identity:
    return _identity("emailproxy test app")


@pytest.fixture(scope="module")
def other_app() -> Identity:
    return _identity("someone else's app")


def jwt_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header, claims, _ = token.split(".")
    assert "=" not in header + claims

    def decode(part: str) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
        return value

    return decode(header), decode(claims)


def write_identity(directory: Path, identity: Identity) -> tuple[Path, Path]:
    cert_path, key_path = directory / "app-cert.pem", directory / "app-key.pem"
    cert_path.write_bytes(identity.cert_pem)
    key_path.write_bytes(identity.key_pem)
    key_path.chmod(0o600)
    return cert_path, key_path


def service_key(identity: Identity, email: str, token_uri: str | None) -> str:
    data = {
        "type": "service_account",
        "project_id": "emailproxy-tests",
        "private_key_id": "0123456789abcdef",
        "private_key": identity.key_pem.decode(),
        "client_email": email,
        "client_id": "109876543210",
        "token_uri": token_uri,
    }
    return json.dumps({k: v for k, v in data.items() if v is not None}, indent=2)


def start_proxy(world: World, tmp_path: Path, account_section: str, account: dict[str, str]) -> Proxy:
    ports = allocate_ports("IMAP")
    d = world.dovecot.ports
    sections = {
        f"IMAP-{ports['IMAP']}": {"server_address": d.host, "server_port": str(d.imaps)},
        account_section: account,
        "emailproxy": {"allow_catch_all_accounts": "True"},
    }
    return launch(world.ca_path, tmp_path, sections, ports)


def imap_login(proxy: Proxy, user: str, password: str = PASSWORD) -> bytes:
    """Log in through the proxy and read the newest message's body; returns it."""
    with imaplib.IMAP4("127.0.0.1", proxy.ports["IMAP"], timeout=20) as imap:
        imap.login(user, password)
        typ, data = imap.select("INBOX")
        assert typ == "OK"
        newest = (data[0] or b"1").decode()
        typ, message = imap.fetch(newest, "(BODY[TEXT])")
        assert typ == "OK" and isinstance(message[0], tuple)
        return message[0][1]


def imap_login_error(proxy: Proxy, user: str, password: str = PASSWORD) -> str:
    with imaplib.IMAP4("127.0.0.1", proxy.ports["IMAP"], timeout=20) as imap:
        with pytest.raises(imaplib.IMAP4.error) as info:
            imap.login(user, password)
    return str(info.value)


def deliver(world: World, user: str, body: str) -> None:
    world.dovecot.deliver(user, world.dovecot.make_message("sender@example.com", user, "hi", body))


def saved_section(proxy: Proxy, user: str) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(proxy.config_path.read_text())
    return dict(parser[user]) if parser.has_section(user) else {}


def checks_for(world: World, user: str) -> list[bool]:
    return [check.ok for check in world.idp.check_log if check.user == user]


# ---------------------------------------------------------------------------------------------- certificates


def test_client_credentials_with_a_certificate(
    world: World, tmp_path: Path, app: Identity, proxies: list[Proxy]
) -> None:
    client_id = "cert-ccg-client"
    world.idp.register_client(client_id, certificate_pem=app.cert_pem)
    cert_path, key_path = write_identity(tmp_path, app)
    account = {
        "token_url": world.idp.token_url(),
        "oauth2_scope": MS_SCOPE,
        "oauth2_flow": "client_credentials",
        "client_id": client_id,
        "jwt_certificate_path": str(cert_path),
        "jwt_key_path": str(key_path),
    }
    proxy = start_proxy(world, tmp_path, f"@{world.domain}", account)
    proxies.append(proxy)
    user = world.new_user("cert")
    deliver(world, user, "delivered to a certificate-authenticated app")

    assert b"certificate-authenticated app" in imap_login(proxy, user)

    requests = world.idp.token_requests("client_credentials")
    assert len(requests) == 1
    form = requests[0].form
    assert "client_secret" not in form and form["client_id"] == client_id
    assert form["client_assertion_type"] == JWT_BEARER
    header, claims = jwt_parts(form["client_assertion"])
    assert header["alg"] == "RS256" and header["x5t#S256"] == app.thumbprint_s256
    assert header["x5t#S256"].endswith("=")  # padded, as the reference writes it
    assert claims["aud"] == world.idp.token_url()
    assert claims["iss"] == claims["sub"] == client_id
    assert claims["exp"] - claims["nbf"] == 300
    assert checks_for(world, user) == [True]
    log = proxy.log()
    assert form["client_assertion"] not in log and "PRIVATE KEY" not in log


def test_a_certificate_the_provider_does_not_know_is_refused(
    world: World, tmp_path: Path, app: Identity, other_app: Identity, proxies: list[Proxy]
) -> None:
    client_id = "cert-mismatch-client"
    world.idp.register_client(client_id, certificate_pem=other_app.cert_pem)
    cert_path, key_path = write_identity(tmp_path, app)
    account = {
        "token_url": world.idp.token_url(),
        "oauth2_scope": MS_SCOPE,
        "oauth2_flow": "client_credentials",
        "client_id": client_id,
        "jwt_certificate_path": str(cert_path),
        "jwt_key_path": str(key_path),
    }
    proxy = start_proxy(world, tmp_path, f"@{world.domain}", account)
    proxies.append(proxy)
    user = world.new_user("certbad")

    message = imap_login_error(proxy, user)

    assert PREFIX in message and "invalid_client" in message and "Client assertion failed" in message
    assert len(world.idp.token_requests("client_credentials")) == 1
    assert checks_for(world, user) == []  # nothing reached the mail server


def test_certificate_assertion_on_password_and_refresh_requests(
    world: World, tmp_path: Path, app: Identity, proxies: list[Proxy]
) -> None:
    client_id = "cert-ropc-client"
    user = world.new_user("certropc")
    world.idp.register_client(client_id, certificate_pem=app.cert_pem)
    world.idp.register_user(user, "the-real-password")
    world.idp.expires_in = 120  # inside the proxy's 600 s margin: the next login refreshes
    cert_path, key_path = write_identity(tmp_path, app)
    account = {
        "token_url": world.idp.token_url(),
        "oauth2_scope": "https://outlook.office365.com/IMAP.AccessAsUser.All offline_access",
        "oauth2_flow": "password",
        "client_id": client_id,
        "jwt_certificate_path": str(cert_path),
        "jwt_key_path": str(key_path),
    }
    proxy = start_proxy(world, tmp_path, user, account)
    proxies.append(proxy)
    deliver(world, user, "ropc with a certificate")

    assert b"ropc with a certificate" in imap_login(proxy, user, "the-real-password")
    assert b"ropc with a certificate" in imap_login(proxy, user, "the-real-password")

    requests = world.idp.token_requests()
    assert [r.grant_type for r in requests] == ["password", "refresh_token"]
    for request in requests:
        assert request.form["client_assertion_type"] == JWT_BEARER and "client_secret" not in request.form
        assert jwt_parts(request.form["client_assertion"])[1]["aud"] == world.idp.token_url()
    first, second = (jwt_parts(r.form["client_assertion"])[1]["jti"] for r in requests)
    assert first != second  # a new assertion for each request
    assert checks_for(world, user) == [True, True]
    assert saved_section(proxy, user).get("refresh_token")


def test_a_configured_secret_wins_over_the_certificate(
    world: World, tmp_path: Path, app: Identity, proxies: list[Proxy]
) -> None:
    client_id = "cert-and-secret-client"
    world.idp.register_client(client_id, "the-secret", certificate_pem=app.cert_pem)
    cert_path, key_path = write_identity(tmp_path, app)
    account = {
        "token_url": world.idp.token_url(),
        "oauth2_scope": MS_SCOPE,
        "oauth2_flow": "client_credentials",
        "client_id": client_id,
        "client_secret": "the-secret",
        "jwt_certificate_path": str(cert_path),
        "jwt_key_path": str(key_path),
    }
    proxy = start_proxy(world, tmp_path, f"@{world.domain}", account)
    proxies.append(proxy)
    user = world.new_user("certsecret")
    deliver(world, user, "secret first")

    assert b"secret first" in imap_login(proxy, user)

    form = world.idp.token_requests("client_credentials")[0].form
    assert form["client_secret"] == "the-secret" and "client_assertion" not in form
    log = proxy.log()
    assert "using the client secret" in log and "the-secret" not in log


def test_a_missing_key_file_stops_start_up_naming_the_key(
    world: World, tmp_path: Path, app: Identity
) -> None:
    cert_path, _ = write_identity(tmp_path, app)
    account = {
        "token_url": world.idp.token_url(),
        "oauth2_scope": MS_SCOPE,
        "oauth2_flow": "client_credentials",
        "client_id": "never-used",
        "jwt_certificate_path": str(cert_path),
        "jwt_key_path": str(tmp_path / "missing-key.pem"),
    }
    with pytest.raises(RuntimeError) as info:
        start_proxy(world, tmp_path, f"@{world.domain}", account)
    text = str(info.value)
    assert "proxy exited with" in text and "proxy exited with 0" not in text
    assert "jwt_key_path" in text and "missing-key.pem" in text
    assert world.idp.token_requests() == []


# ------------------------------------------------------------------------------------------ service accounts


def test_service_account_key_file_impersonates_each_mailbox(
    world: World, tmp_path: Path, app: Identity, proxies: list[Proxy]
) -> None:
    email = "mailer@emailproxy-tests.iam.gserviceaccount.com"
    world.idp.register_service_account(email, app.cert_pem)
    key_file = tmp_path / "service-account.json"
    key_file.write_text(service_key(app, email, world.idp.token_url()))
    account = {
        "token_url": "https://unused.invalid/token",  # the key's token_uri is used, as Google's libraries do
        "oauth2_scope": GOOGLE_SCOPE,
        "oauth2_flow": "service_account",
        "client_id": "file",
        "client_secret": str(key_file),
    }
    proxy = start_proxy(world, tmp_path, f"@{world.domain}", account)
    proxies.append(proxy)
    alice, bob = world.new_user("alice"), world.new_user("bob")
    deliver(world, alice, "for alice only")
    deliver(world, bob, "for bob only")

    assert b"for alice only" in imap_login(proxy, alice)
    assert b"for bob only" in imap_login(proxy, bob)

    requests = world.idp.token_requests(JWT_BEARER_GRANT)
    assert len(requests) == 2 and len(world.idp.token_requests()) == 2
    subjects = []
    for request in requests:
        assert set(request.form) == {"grant_type", "assertion"}
        header, claims = jwt_parts(request.form["assertion"])
        assert header["alg"] == "RS256" and header["kid"] == "0123456789abcdef"
        assert claims["iss"] == email and claims["scope"] == GOOGLE_SCOPE
        assert claims["aud"] == world.idp.token_url() and claims["exp"] - claims["iat"] == 3600
        subjects.append(claims["sub"])
    assert subjects == [alice, bob]
    # tokens are bound to the impersonated user: Dovecot's checks would fail for anyone else
    assert [issued.user for issued in world.idp.issued] == [alice, bob]
    assert checks_for(world, alice) == [True] and checks_for(world, bob) == [True]
    for user in (alice, bob):
        saved = saved_section(proxy, user)
        assert saved.get("access_token") and "refresh_token" not in saved
    assert requests[0].form["assertion"] not in proxy.log()


def test_service_account_inline_key_gets_a_new_assertion_near_expiry(
    world: World, tmp_path: Path, app: Identity, proxies: list[Proxy]
) -> None:
    email = "inline@emailproxy-tests.iam.gserviceaccount.com"
    world.idp.register_service_account(email, app.cert_pem)
    world.idp.expires_in = 120  # inside the 600 s margin: every login needs a new token
    user = world.new_user("svc")
    key_text = textwrap.indent(service_key(app, email, None), "\t")  # no token_uri: token_url is used
    account = {
        "token_url": world.idp.token_url(),
        "oauth2_scope": GOOGLE_SCOPE,
        "oauth2_flow": "service_account",
        "client_id": "key",
        "client_secret": "\n" + key_text,
    }
    proxy = start_proxy(world, tmp_path, user, account)
    proxies.append(proxy)
    deliver(world, user, "inline key")

    assert b"inline key" in imap_login(proxy, user)
    assert b"inline key" in imap_login(proxy, user)

    requests = world.idp.token_requests()
    assert [r.grant_type for r in requests] == [JWT_BEARER_GRANT] * 2  # never a refresh_token grant
    assert all(jwt_parts(r.form["assertion"])[1]["sub"] == user for r in requests)
    assert checks_for(world, user) == [True, True]
    assert "refresh_token" not in saved_section(proxy, user)


def test_service_account_wrong_password_is_refused_and_keeps_tokens(
    world: World, tmp_path: Path, app: Identity, proxies: list[Proxy]
) -> None:
    email = "pw@emailproxy-tests.iam.gserviceaccount.com"
    world.idp.register_service_account(email, app.cert_pem)
    key_file = tmp_path / "service-account.json"
    key_file.write_text(service_key(app, email, world.idp.token_url()))
    user = world.new_user("svcpw")
    account = {
        "token_url": world.idp.token_url(),
        "oauth2_scope": GOOGLE_SCOPE,
        "oauth2_flow": "service_account",
        "client_id": "file",
        "client_secret": str(key_file),
    }
    proxy = start_proxy(world, tmp_path, user, account)  # delete_account_token_on_password_error: default on
    proxies.append(proxy)
    deliver(world, user, "password rules")
    assert b"password rules" in imap_login(proxy, user)
    before = saved_section(proxy, user)

    message = imap_login_error(proxy, user, "another-password")

    assert PREFIX in message and f"the password for account {user} is incorrect" in message
    assert saved_section(proxy, user) == before  # nothing deleted
    assert len(world.idp.token_requests()) == 1
    assert b"password rules" in imap_login(proxy, user)  # the right password still works, from the cache
    assert len(world.idp.token_requests()) == 1


def test_an_unregistered_service_account_is_refused(
    world: World, tmp_path: Path, app: Identity, other_app: Identity, proxies: list[Proxy]
) -> None:
    email = "forged@emailproxy-tests.iam.gserviceaccount.com"
    world.idp.register_service_account(email, other_app.cert_pem)  # the key in the file does not match
    key_file = tmp_path / "service-account.json"
    key_file.write_text(service_key(app, email, world.idp.token_url()))
    account = {
        "token_url": world.idp.token_url(),
        "oauth2_scope": GOOGLE_SCOPE,
        "oauth2_flow": "service_account",
        "client_id": "file",
        "client_secret": str(key_file),
    }
    proxy = start_proxy(world, tmp_path, f"@{world.domain}", account)
    proxies.append(proxy)
    user = world.new_user("forged")

    message = imap_login_error(proxy, user)

    assert PREFIX in message and "invalid_grant" in message and "bad signature" in message
    assert len(world.idp.token_requests(JWT_BEARER_GRANT)) == 1 and world.idp.issued == []
