"""The integration-test world works with direct clients (no proxy): tokens from the test identity provider
log in to the private Dovecot and Postfix over every listener, bad or expired tokens do not, mail submitted
to Postfix arrives in Dovecot, and swaks and curl can talk to the world."""

from __future__ import annotations

import base64
import concurrent.futures
import imaplib
import poplib
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import certifi
import pytest
import requests

from tests.integration.conftest import World
from tests.integration.world import group_members
from tests.integration.world.dovecot import Dovecot
from tests.integration.world.idp import DEVICE_CODE_GRANT, IdentityProvider, pkce_challenge
from tests.integration.world.postfix import Postfix

SCOPE_APP = "https://outlook.office365.com/.default"
SCOPE_USER = "https://outlook.office365.com/IMAP.AccessAsUser.All offline_access"


def xoauth2(user: str, token: str) -> bytes:
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def oauthbearer(user: str, token: str) -> bytes:
    return f"n,a={user},\x01auth=Bearer {token}\x01\x01".encode()


def imap_authenticator(response: bytes) -> Callable[[bytes], bytes]:
    """imaplib callback: the SASL response first, then an empty reply to the server's error challenge."""
    sent: list[bool] = []

    def answer(_challenge: bytes) -> bytes:
        if sent:
            return b""
        sent.append(True)
        return response

    return answer


def app_token(idp: IdentityProvider, client_id: str = "app-1", secret: str = "app-secret") -> str:
    """An app-only token through the client-credentials grant over HTTPS (test CA, env ignored)."""
    idp.register_client(client_id, secret)
    with idp.session() as http:
        response = http.post(
            idp.token_url(),
            data={
                "grant_type": "client_credentials",
                "client_id": client_id,
                "client_secret": secret,
                "scope": SCOPE_APP,
            },
            timeout=10,
        )
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def imaps_login(world: World, user: str, token: str) -> imaplib.IMAP4_SSL:
    client = imaplib.IMAP4_SSL(
        world.dovecot.host, world.dovecot.ports.imaps, ssl_context=world.certs.client_context()
    )
    try:
        client.authenticate("XOAUTH2", imap_authenticator(xoauth2(user, token)))
    except BaseException:
        client.shutdown()
        raise
    return client


def wait_for_messages(dovecot: Dovecot, user: str, count: int = 1, timeout: float = 10) -> list[bytes]:
    deadline = time.monotonic() + timeout
    while True:
        messages = dovecot.messages(user)
        if len(messages) >= count or time.monotonic() > deadline:
            return messages
        time.sleep(0.02)


# -- identity provider ----------------------------------------------------------------------------------


def test_requests_env_pitfall_is_avoided_by_the_session(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REQUESTS_CA_BUNDLE overrides `Session.verify` unless `trust_env` is off, as `idp.session()` has it."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    with requests.Session() as trusting_env:
        trusting_env.verify = str(world.ca_path)
        with pytest.raises(requests.exceptions.SSLError):
            trusting_env.get(world.idp.openid_configuration_url(), timeout=10)
    with world.idp.session() as http:
        document = http.get(world.idp.openid_configuration_url(), timeout=10).json()
    assert document["token_endpoint"] == world.idp.token_url()
    assert document["issuer"].endswith("/v2.0")


def test_client_credentials_needs_the_right_secret_and_a_default_scope(idp: IdentityProvider) -> None:
    idp.register_client("app-2", "right")
    with idp.session() as http:
        wrong = http.post(
            idp.token_url(),
            data={
                "grant_type": "client_credentials",
                "client_id": "app-2",
                "client_secret": "wrong",
                "scope": SCOPE_APP,
            },
            timeout=10,
        )
        no_default = http.post(
            idp.token_url(),
            data={
                "grant_type": "client_credentials",
                "client_id": "app-2",
                "client_secret": "right",
                "scope": "x",
            },
            timeout=10,
        )
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"
    assert no_default.status_code == 400 and no_default.json()["error"] == "invalid_scope"
    assert [request.form["client_secret"] for request in idp.token_requests("client_credentials")] == [
        "wrong",
        "right",
    ]


def test_password_and_refresh_grants(idp: IdentityProvider) -> None:
    idp.register_client("public-1")
    idp.register_user("carol@example.com", "pw")
    idp.rotate_refresh_tokens = True
    with idp.session() as http:
        bad = http.post(
            idp.token_url(),
            data={
                "grant_type": "password",
                "client_id": "public-1",
                "username": "carol@example.com",
                "password": "nope",
                "scope": SCOPE_USER,
            },
            timeout=10,
        )
        first = http.post(
            idp.token_url(),
            data={
                "grant_type": "password",
                "client_id": "public-1",
                "username": "carol@example.com",
                "password": "pw",
                "scope": SCOPE_USER,
            },
            timeout=10,
        ).json()
        refreshed = http.post(
            idp.token_url(),
            data={
                "grant_type": "refresh_token",
                "client_id": "public-1",
                "refresh_token": first["refresh_token"],
                "scope": SCOPE_USER,
            },
            timeout=10,
        ).json()
        reused = http.post(
            idp.token_url(),
            data={
                "grant_type": "refresh_token",
                "client_id": "public-1",
                "refresh_token": first["refresh_token"],
            },
            timeout=10,
        )
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_grant"
    assert refreshed["access_token"] != first["access_token"]
    assert refreshed["refresh_token"] != first["refresh_token"]  # rotated
    assert reused.status_code == 400 and reused.json()["error"] == "invalid_grant"
    assert idp.is_valid("carol@example.com", refreshed["access_token"])
    assert not idp.is_valid("dave@example.com", refreshed["access_token"])


def test_authorization_code_with_pkce(idp: IdentityProvider) -> None:
    idp.register_client("web-1", "web-secret")
    verifier = "v" * 50
    redirect_uri = "http://127.0.0.1:9/redirect"
    query = {
        "client_id": "web-1",
        "response_type": "code",
        "redirect_uri": redirect_uri,
        "scope": SCOPE_USER,
        "state": "st-1",
        "code_challenge": pkce_challenge(verifier),
        "code_challenge_method": "S256",
        "login_hint": "erin@example.com",
    }
    with idp.session() as http:
        redirect = http.get(idp.authorize_url(), params=query, allow_redirects=False, timeout=10)
        assert redirect.status_code == 302
        location = urllib.parse.urlsplit(redirect.headers["Location"])
        params = dict(urllib.parse.parse_qsl(location.query))
        assert f"{location.scheme}://{location.netloc}{location.path}" == redirect_uri
        assert params["state"] == "st-1"
        form = {
            "grant_type": "authorization_code",
            "client_id": "web-1",
            "client_secret": "web-secret",
            "code": params["code"],
            "redirect_uri": redirect_uri,
        }
        wrong_verifier = http.post(idp.token_url(), data={**form, "code_verifier": "w" * 50}, timeout=10)
        good = http.post(idp.token_url(), data={**form, "code_verifier": verifier}, timeout=10)
        replay = http.post(idp.token_url(), data={**form, "code_verifier": verifier}, timeout=10)
    assert wrong_verifier.status_code == 400
    assert good.status_code == 200, good.text
    assert replay.status_code == 400
    assert idp.is_valid("erin@example.com", good.json()["access_token"])
    authorize = [request for request in idp.requests if request.endpoint == "authorize"]
    assert authorize[0].query["code_challenge"] == pkce_challenge(verifier)


def test_device_code_flow(idp: IdentityProvider) -> None:
    idp.register_client("device-1")
    with idp.session() as http:
        started = http.post(
            idp.devicecode_url(), data={"client_id": "device-1", "scope": SCOPE_USER}, timeout=10
        ).json()
        poll = {
            "grant_type": DEVICE_CODE_GRANT,
            "client_id": "device-1",
            "device_code": started["device_code"],
        }
        pending = http.post(idp.token_url(), data=poll, timeout=10)
        idp.approve_device(started["user_code"], "frank@example.com")
        done = http.post(idp.token_url(), data=poll, timeout=10)
    assert pending.status_code == 400 and pending.json()["error"] == "authorization_pending"
    assert done.status_code == 200
    assert idp.is_valid("frank@example.com", done.json()["access_token"])
    assert started["user_code"] in started["message"]


def test_failure_injection_delay_and_down(idp: IdentityProvider) -> None:
    idp.register_client("app-3", "s")
    form = {
        "grant_type": "client_credentials",
        "client_id": "app-3",
        "client_secret": "s",
        "scope": SCOPE_APP,
    }
    idp.fail_with(503, count=2)
    with idp.session() as http:
        statuses = [http.post(idp.token_url(), data=form, timeout=10).status_code for _ in range(3)]
        assert statuses == [503, 503, 200]
        idp.delay(0.3)
        started = time.monotonic()
        assert http.post(idp.token_url(), data=form, timeout=10).status_code == 200
        assert time.monotonic() - started >= 0.3
        idp.delay(0)
        for mode in ("reset", "refuse"):
            idp.set_down(True, mode=mode)
            with pytest.raises(requests.exceptions.ConnectionError):
                http.post(idp.token_url(), data=form, timeout=10)
            idp.set_down(False)
            assert http.post(idp.token_url(), data=form, timeout=10).status_code == 200


# -- IMAP --------------------------------------------------------------------------------------------------


def test_imaps_xoauth2_with_app_token_and_bad_token(world: World) -> None:
    token = app_token(world.idp)
    user = world.new_user("imaps")
    client = imaps_login(world, user, token)
    try:
        status, data = client.select("INBOX")
        assert status == "OK" and data == [b"0"]
    finally:
        client.logout()
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        imaps_login(world, user, token + "-bad")
    checks = world.idp.check_log
    assert [(check.user, check.ok, check.service) for check in checks] == [
        (user, True, "imap"),
        (user, False, "imap"),
    ]


def test_imap_without_oauth_or_without_tls_is_refused(world: World) -> None:
    user = world.new_user("plain")
    token = world.idp.issue_token(user)
    context = world.certs.client_context()
    with imaplib.IMAP4_SSL(world.dovecot.host, world.dovecot.ports.imaps, ssl_context=context) as client:
        with pytest.raises(imaplib.IMAP4.error):
            client.login(user, token)
    with imaplib.IMAP4(world.dovecot.host, world.dovecot.ports.imap) as client:
        assert "LOGINDISABLED" in client.capabilities
        with pytest.raises(imaplib.IMAP4.error):
            client.authenticate("XOAUTH2", imap_authenticator(xoauth2(user, token)))
    assert world.idp.check_log == []  # nothing reached the token check


def test_imap_starttls_oauthbearer_with_password_grant_token(world: World) -> None:
    idp = world.idp
    user = world.new_user("starttls")
    idp.register_client("public-2")
    idp.register_user(user, "secret-pw")
    with idp.session() as http:
        token = http.post(
            idp.token_url(),
            data={
                "grant_type": "password",
                "client_id": "public-2",
                "username": user,
                "password": "secret-pw",
                "scope": SCOPE_USER,
            },
            timeout=10,
        ).json()["access_token"]
    with imaplib.IMAP4(world.dovecot.host, world.dovecot.ports.imap) as client:
        assert "STARTTLS" in client.capabilities
        client.starttls(ssl_context=world.certs.client_context())
        status, _ = client.authenticate("OAUTHBEARER", imap_authenticator(oauthbearer(user, token)))
        assert status == "OK"
        assert client.select("INBOX")[0] == "OK"
    assert [check.ok for check in idp.check_log] == [True]


def test_expired_and_other_users_tokens_are_refused(world: World) -> None:
    alice, bob = world.new_user("alice"), world.new_user("bob")
    expired = world.idp.issue_token(alice, expires_in=-5)
    alices = world.idp.issue_token(alice, "at-FIXTURE-alice")
    for user, token in ((alice, expired), (bob, alices)):
        with pytest.raises(imaplib.IMAP4.error):
            imaps_login(world, user, token)
    imaps_login(world, alice, alices).logout()
    assert [(check.reason, check.ok) for check in world.idp.check_log] == [
        ("expired", False),
        ("wrong user", False),
        ("valid", True),
    ]


def test_sixty_parallel_imap_sessions(world: World) -> None:
    user = world.new_user("many")
    token = world.idp.issue_token(user)

    def login(_: int) -> imaplib.IMAP4_SSL:
        return imaps_login(world, user, token)

    with concurrent.futures.ThreadPoolExecutor(max_workers=60) as pool:
        clients = list(pool.map(login, range(60)))
    try:
        assert all(client.noop()[0] == "OK" for client in clients)  # all 60 are open at the same time
    finally:
        for client in clients:
            client.logout()
    assert len(world.idp.check_log) == 60


# -- POP3 --------------------------------------------------------------------------------------------------


def pop_line(client: poplib.POP3, line: bytes) -> bytes:
    """Send one line on a POP3 connection and return the server's reply line (poplib has no SASL API)."""
    client.sock.sendall(line + b"\r\n")
    return client.file.readline().rstrip(b"\r\n")


def pop_sasl(client: poplib.POP3, mechanism: str, response: bytes) -> bytes:
    """Two-step SASL: `AUTH MECH`, `+ ` challenge, then the base64 response; returns the last reply."""
    assert pop_line(client, f"AUTH {mechanism}".encode()).startswith(b"+")
    return pop_line(client, base64.b64encode(response))


def test_pop3s_xoauth2_and_pop3_stls(world: World) -> None:
    user = world.new_user("pop")
    world.dovecot.deliver(user, Dovecot.make_message("x@example.com", user, "pop test", "hello pop"))
    token = world.idp.issue_token(user)
    client = poplib.POP3_SSL(
        world.dovecot.host, world.dovecot.ports.pop3s, context=world.certs.client_context()
    )
    try:
        assert pop_sasl(client, "XOAUTH2", xoauth2(user, token)).startswith(b"+OK")
        count, _size = client.stat()
        assert count == 1
        assert b"hello pop" in b"\r\n".join(client.retr(1)[1])
    finally:
        client.quit()
    plain = poplib.POP3(world.dovecot.host, world.dovecot.ports.pop3)
    try:
        assert "STLS" in plain.capa()
        plain.stls(world.certs.client_context())
        assert pop_sasl(plain, "OAUTHBEARER", oauthbearer(user, token)).startswith(b"+OK")
    finally:
        plain.quit()
    bad = poplib.POP3_SSL(world.dovecot.host, world.dovecot.ports.pop3s, context=world.certs.client_context())
    try:
        assert pop_sasl(bad, "XOAUTH2", xoauth2(user, "at-wrong")).startswith(b"+ ")  # error challenge
        assert pop_line(bad, b"").startswith(b"-ERR [AUTH]")  # empty answer to it, then the failure
    finally:
        bad.close()


# -- SMTP --------------------------------------------------------------------------------------------------


def test_submission_starttls_xoauth2_delivers_to_dovecot(world: World) -> None:
    sender, recipient = world.new_user("sender"), world.new_user("rcpt")
    token = app_token(world.idp)
    body = "Hello through Postfix and LMTP.\r\nSecond line.\r\n"
    message = Dovecot.make_message(sender, recipient, "submission test", body)
    with smtplib.SMTP("127.0.0.1", world.postfix.ports.submission, timeout=20) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("starttls") and not smtp.has_extn("auth")  # AUTH only after TLS
        smtp.starttls(context=world.certs.client_context())
        smtp.ehlo()
        assert smtp.esmtp_features["auth"].split() == ["XOAUTH2", "OAUTHBEARER"]
        assert smtp.docmd("AUTH", "XOAUTH2") == (334, b"")
        code, reply = smtp.docmd(base64.b64encode(xoauth2(sender, token)).decode())
        assert code == 235, reply
        assert smtp.sendmail(sender, [recipient], message) == {}
    delivered = wait_for_messages(world.dovecot, recipient)
    assert len(delivered) == 1 and delivered[0].replace(b"\r\n", b"\n").endswith(
        message.replace(b"\r\n", b"\n")
    )
    with imaps_login(world, recipient, token) as client:
        client.select("INBOX")
        status, data = client.fetch("1", "(BODY.PEEK[TEXT])")
        assert status == "OK" and isinstance(data[0], tuple) and body.encode() in data[0][1]
    assert [check.service for check in world.idp.check_log] == ["smtp", "imap"]


def test_smtps_oauthbearer_and_refused_token(world: World) -> None:
    user = world.new_user("smtps")
    token = world.idp.issue_token(user)
    context = world.certs.client_context()
    with smtplib.SMTP_SSL("127.0.0.1", world.postfix.ports.smtps, context=context, timeout=20) as smtp:
        smtp.ehlo()
        code, _ = smtp.auth("OAUTHBEARER", lambda challenge=None: oauthbearer(user, token).decode())
        assert code == 235
    with smtplib.SMTP_SSL("127.0.0.1", world.postfix.ports.smtps, context=context, timeout=20) as smtp:
        smtp.ehlo()
        assert (
            smtp.docmd("AUTH", "XOAUTH2 " + base64.b64encode(xoauth2(user, "at-unknown")).decode())[0] == 334
        )
        assert smtp.docmd("")[0] == 535  # empty answer to the error challenge, then the failure
    assert [check.ok for check in world.idp.check_log] == [True, False]


def test_unauthenticated_submission_is_refused(world: World) -> None:
    with smtplib.SMTP("127.0.0.1", world.postfix.ports.submission, timeout=20) as smtp:
        smtp.ehlo()
        smtp.starttls(context=world.certs.client_context())
        smtp.ehlo()
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            smtp.sendmail("x@example.com", [world.new_user()], b"Subject: x\r\n\r\nx\r\n")


# -- command-line tools ------------------------------------------------------------------------------------


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, capture_output=True, text=True, timeout=30, check=False, stdin=subprocess.DEVNULL
    )


def test_curl_imaps_pop3s_and_smtp_with_bearer_tokens(world: World) -> None:
    curl = shutil.which("curl")
    assert curl is not None, "curl is not installed; run the apt-get step of .ci/run"
    user, recipient = world.new_user("curl"), world.new_user("curl-rcpt")
    token = world.idp.issue_token(user)
    ca = str(world.ca_path)
    listing = run(
        [
            curl,
            "-sS",
            "--cacert",
            ca,
            f"imaps://{world.dovecot.host}:{world.dovecot.ports.imaps}/",
            "--user",
            f"{user}:",
            "--oauth2-bearer",
            token,
        ]
    )
    assert listing.returncode == 0, listing.stderr
    assert "INBOX" in listing.stdout
    refused = run(
        [
            curl,
            "-sS",
            "--cacert",
            ca,
            f"imaps://{world.dovecot.host}:{world.dovecot.ports.imaps}/",
            "--user",
            f"{user}:",
            "--oauth2-bearer",
            "at-not-valid",
        ]
    )
    assert refused.returncode != 0
    pop = run(
        [
            curl,
            "-sS",
            "--cacert",
            ca,
            f"pop3s://{world.dovecot.host}:{world.dovecot.ports.pop3s}/",
            "--user",
            f"{user}:",
            "--oauth2-bearer",
            token,
        ]
    )
    assert pop.returncode == 0, pop.stderr
    message = world.tmp / f"{recipient}.eml"
    message.write_bytes(Dovecot.make_message(user, recipient, "curl smtp", "sent by curl"))
    sent = run(
        [
            curl,
            "-sS",
            "--cacert",
            ca,
            "--ssl-reqd",
            f"smtp://127.0.0.1:{world.postfix.ports.submission}",
            "--user",
            f"{user}:",
            "--oauth2-bearer",
            token,
            "--mail-from",
            user,
            "--mail-rcpt",
            recipient,
            "--upload-file",
            str(message),
        ]
    )
    assert sent.returncode == 0, sent.stderr
    assert b"sent by curl" in wait_for_messages(world.dovecot, recipient)[0]
    assert [check.ok for check in world.idp.check_log] == [True, False, True, True]


def test_swaks_lmtp_delivery_and_submission_policy(world: World) -> None:
    swaks = shutil.which("swaks")
    assert swaks is not None, "swaks is not installed; run the apt-get step of .ci/run"
    recipient = world.new_user("swaks")
    delivered = run(
        [
            swaks,
            "--protocol",
            "LMTP",
            "--server",
            f"{world.dovecot.host}:{world.dovecot.ports.lmtp}",
            "--from",
            "swaks@example.com",
            "--to",
            recipient,
            "--header",
            "Subject: swaks lmtp",
        ]
    )
    assert delivered.returncode == 0, delivered.stdout + delivered.stderr
    assert b"Subject: swaks lmtp" in wait_for_messages(world.dovecot, recipient)[0]
    # Without TLS Postfix offers no AUTH, and without AUTH it relays nothing.
    refused = run(
        [
            swaks,
            "--server",
            f"127.0.0.1:{world.postfix.ports.submission}",
            "--from",
            "swaks@example.com",
            "--to",
            world.new_user("nobody"),
        ]
    )
    assert refused.returncode != 0
    assert "554 5.7.1" in refused.stdout and "Access denied" in refused.stdout
    ehlo_lines = [line for line in refused.stdout.splitlines() if line.startswith("<-  250")]
    assert any("STARTTLS" in line for line in ehlo_lines)
    assert not any("AUTH" in line for line in ehlo_lines)


def test_every_listener_is_on_loopback(world: World) -> None:
    dovecot = world.dovecot.ports
    listeners = [
        (dovecot.host, port)
        for port in (dovecot.imaps, dovecot.imap, dovecot.pop3s, dovecot.pop3, dovecot.lmtp, dovecot.auth)
    ]
    listeners += [
        ("127.0.0.1", port)
        for port in (
            world.postfix.ports.submission,
            world.postfix.ports.smtps,
            world.idp.port,
            world.idp.check_port,
        )
    ]
    assert len(set(listeners)) == len(listeners)
    for host, port in listeners:
        assert host.startswith("127.")
        with socket.create_connection((host, port), timeout=2):
            pass


def test_private_instances_stop_without_leaving_processes(world: World) -> None:
    """A second Dovecot and Postfix start beside the world and leave nothing running when stopped."""
    tmp = Path(tempfile.mkdtemp(prefix="emailproxy-world-extra-"))
    tmp.chmod(0o755)
    dovecot = Dovecot(tmp / "dovecot", world.certs, world.idp.check_url)
    postfix = Postfix(tmp / "postfix", world.certs, dovecot.ports)
    try:
        dovecot.start()
        postfix.start()
        groups = [dovecot.pid, postfix.pid]
        assert all(pid is not None and pid in group_members(pid) for pid in groups)  # group leaders
        assert dovecot.ports.imaps != world.dovecot.ports.imaps
        user = world.new_user("second")
        token = world.idp.issue_token(user)
        context = world.certs.client_context()
        with imaplib.IMAP4_SSL(dovecot.host, dovecot.ports.imaps, ssl_context=context) as client:
            assert client.authenticate("XOAUTH2", imap_authenticator(xoauth2(user, token)))[0] == "OK"
    finally:
        postfix.stop()
        dovecot.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    assert not dovecot.running and not postfix.running
    assert [group_members(pid) for pid in groups if pid is not None] == [[], []]
