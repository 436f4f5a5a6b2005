"""End-to-end abuse limits: the connection cap, the failed-login backoff per client address and the
per-connection command and failed-login caps, with real clients (imaplib, poplib, smtplib) through the
proxy to the world's Dovecot and Postfix.

Every test starts its own proxy (the backoff state lives in the proxy process) with small limits set
through the ``[emailproxy]`` options, and uses fresh mailboxes.
"""

from __future__ import annotations

import imaplib
import poplib
import re
import smtplib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from tests.integration.conftest import World
from tests.integration.proxy import Proxy, allocate_ports, launch, wait_for
from tests.integration.world.ports import LOOPBACK

CLIENT_ID = "limits-ccg-client"
CLIENT_SECRET = "limits-ccg-secret-value"
SCOPE = "https://outlook.office365.com/.default"
LOCAL = "127.0.0.1"
TIMEOUT = 30.0
PREFIX = "Email OAuth 2.0 Proxy: "
BUSY = "Too many connections, try again later"
RIGHT = "the-right-local-password"
WRONG = "not-the-local-password"
LISTENERS = ("IMAP", "IMAPS", "POP", "SMTP")

T = TypeVar("T")


def start_proxy(world: World, tmp_path: Path, options: dict[str, str]) -> Proxy:
    """IMAP (plain and implicit TLS), POP and SMTP listeners; a client-credentials catch-all account."""
    world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
    ports = allocate_ports(*LISTENERS)
    d = world.dovecot.ports
    sections = {
        f"IMAP-{ports['IMAP']}": {"server_address": d.host, "server_port": str(d.imaps)},
        f"IMAP-{ports['IMAPS']}": {
            "server_address": d.host,
            "server_port": str(d.imaps),
            "local_certificate_path": str(world.certs.cert_path),
            "local_key_path": str(world.certs.key_path),
        },
        f"POP-{ports['POP']}": {"server_address": d.host, "server_port": str(d.pop3s)},
        f"SMTP-{ports['SMTP']}": {
            "server_address": LOOPBACK,
            "server_port": str(world.postfix.ports.submission),
            "server_starttls": "True",
        },
        f"@{world.domain}": {
            "token_url": world.idp.token_url(),
            "oauth2_scope": SCOPE,
            "oauth2_flow": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
        "emailproxy": {"allow_catch_all_accounts": "True", **options},
    }
    return launch(world.ca_path, tmp_path, sections, ports)


class POP3(poplib.POP3):
    """poplib.POP3 that closes its socket when the greeting is an error (poplib leaves it open)."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        try:
            super().__init__(host, port, timeout=timeout)
        except poplib.error_proto:
            self.close()
            raise


def text(value: object) -> str:
    """An error's text, whether the library gave it as bytes or str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def imap_login(port: int, user: str, password: str) -> str:
    """Log in on a new connection: "OK", or the server's failure text."""
    with imaplib.IMAP4(LOCAL, port, timeout=TIMEOUT) as imap:
        try:
            imap.login(user, password)
        except imaplib.IMAP4.error as e:
            return text(e.args[0])
        return "OK"


def pop_login(port: int, user: str, password: str) -> str:
    pop = POP3(LOCAL, port, timeout=TIMEOUT)
    try:
        pop.user(user)
        pop.pass_(password)
        return "OK"
    except poplib.error_proto as e:
        return text(e.args[0])
    finally:
        pop.quit()


def smtp_login(port: int, user: str, password: str) -> str:
    with smtplib.SMTP(LOCAL, port, timeout=TIMEOUT) as smtp:
        smtp.ehlo()
        smtp.user, smtp.password = user, password
        try:  # one attempt: smtp.login() would try LOGIN again after a failed PLAIN
            smtp.auth("PLAIN", smtp.auth_plain)
        except smtplib.SMTPAuthenticationError as e:
            return f"{e.smtp_code} {text(e.smtp_error)}"
        return "OK"


def incorrect(user: str) -> str:
    return f"{PREFIX}Login failed - the password for account {user} is incorrect"


def refused_reports(proxy: Proxy) -> list[int]:
    return [int(n) for n in re.findall(r"Refused (\d+) new connection\(s\)", proxy.log())]


# ---------------------------------------------------------------------------------------- connection cap


def test_connection_cap_refuses_politely_and_recovers(
    world: World, tmp_path: Path, proxies: list[Proxy]
) -> None:
    proxy = start_proxy(world, tmp_path, {"max_connections": "4"})
    proxies.append(proxy)
    # the harness's start-up check connected to each listener: let the proxy see those connections close
    # (three sessions; on the implicit-TLS listener only a failed handshake, which never counts)
    wait_for(lambda: proxy.log().count("client disconnected before login") >= 3 or None, "the start-up check")
    ports = proxy.ports
    user = world.new_user()
    world.dovecot.deliver(user, world.dovecot.make_message("a@example.com", user, "kept", "still here"))
    refusals = 0

    def opened(connect: Callable[[], T]) -> Callable[[], T | None]:
        def attempt() -> T | None:
            nonlocal refusals
            try:
                return connect()
            except (imaplib.IMAP4.error, poplib.error_proto, smtplib.SMTPConnectError) as e:
                assert BUSY in str(e)  # (a session that was closed may not be gone yet)
                refusals += 1
                return None

        return attempt

    def open_imap() -> imaplib.IMAP4 | None:
        return opened(lambda: imaplib.IMAP4(LOCAL, ports["IMAP"], timeout=TIMEOUT))()

    logged_in = wait_for(open_imap, "a first IMAP session")
    logged_in.login(user, RIGHT)  # relaying sessions count, not only those before login
    waiting = wait_for(open_imap, "a second IMAP session")
    pop = wait_for(opened(lambda: POP3(LOCAL, ports["POP"], timeout=TIMEOUT)), "a POP session")
    smtp = wait_for(opened(lambda: smtplib.SMTP(LOCAL, ports["SMTP"], timeout=TIMEOUT)), "an SMTP session")
    assert smtp.ehlo()[0] == 250

    with pytest.raises(imaplib.IMAP4.error, match=f"{PREFIX}{BUSY}"):
        imaplib.IMAP4(LOCAL, ports["IMAP"], timeout=TIMEOUT)
    context = world.certs.client_context()  # implicit TLS: the handshake, then the refusal inside TLS
    with pytest.raises(imaplib.IMAP4.error, match=f"{PREFIX}{BUSY}"):
        imaplib.IMAP4_SSL(LOCAL, ports["IMAPS"], ssl_context=context, timeout=TIMEOUT)
    with pytest.raises(poplib.error_proto, match=f"-ERR {PREFIX}{BUSY}"):
        POP3(LOCAL, ports["POP"], timeout=TIMEOUT)
    with pytest.raises(smtplib.SMTPConnectError) as caught:
        smtplib.SMTP(LOCAL, ports["SMTP"], timeout=TIMEOUT)
    assert caught.value.smtp_code == 421
    assert text(caught.value.smtp_error) == f"4.7.0 {PREFIX}{BUSY}"
    refusals += 4

    # the sessions already open carry on
    assert logged_in.select("INBOX") == ("OK", [b"1"])
    typ, fetched = logged_in.fetch("1", "(BODY[TEXT])")
    assert typ == "OK" and any(isinstance(item, tuple) and b"still here" in item[1] for item in fetched)
    waiting.login(user, RIGHT)
    assert waiting.noop()[0] == "OK"
    pop.user(user)
    assert pop.pass_(RIGHT).startswith(b"+OK")
    smtp.login(user, RIGHT)
    assert refused_reports(proxy) == [1], "the first refusal is reported at once, the rest held back"

    # when a session ends, its place is free again
    logged_in.logout()
    again = wait_for(open_imap, "an IMAP session after one closed")
    again.login(user, RIGHT)
    again.logout()
    waiting.logout()
    pop.quit()
    smtp.quit()

    assert proxy.stop() == 0, proxy.output()
    reports = refused_reports(proxy)
    assert sum(reports) == refusals and len(reports) == 2, proxy.log()
    assert re.search(r"WARNING.*Refused 1 new connection\(s\) on \[IMAP-\d+\]", proxy.log())


# ------------------------------------------------------------------------------------- failed-login backoff


def test_backoff_after_wrong_passwords_spares_other_users_and_resets_on_success(
    world: World, tmp_path: Path, proxies: list[Proxy]
) -> None:
    proxy = start_proxy(world, tmp_path, {"login_failure_limit": "2"})
    proxies.append(proxy)
    port = proxy.ports["IMAP"]
    user, other = world.new_user(), world.new_user()
    assert imap_login(port, user, RIGHT) == "OK"  # the account's tokens now open only with RIGHT
    assert imap_login(port, user, WRONG) == f"LOGIN {incorrect(user)}"
    assert imap_login(port, user, WRONG) == f"LOGIN {incorrect(user)}"

    requests = len(world.idp.token_requests())
    refused = imap_login(port, user, RIGHT)  # even the right password: it is not checked now
    assert refused == f"LOGIN {PREFIX}Too many failed logins for {user} from this address; try again in 1 s"
    assert imap_login(port, other, RIGHT) == "OK", "another user on the same address is not held back"
    assert len(world.idp.token_requests()) == requests + 1  # only the other user's token was fetched
    assert re.search(rf"WARNING.*repeated failed logins from 127\.0\.0\.1 for {re.escape(user)}", proxy.log())

    def logged_in() -> bool | None:
        result = imap_login(port, user, RIGHT)
        assert result in ("OK", refused), result  # waiting is all it takes; retries do not lengthen it
        return True if result == "OK" else None

    wait_for(logged_in, "the backoff to end")
    # the success reset the count: one wrong password is answered normally, and the next login works
    assert imap_login(port, user, WRONG) == f"LOGIN {incorrect(user)}"
    assert imap_login(port, user, RIGHT) == "OK"


def test_backoff_is_shared_by_all_protocols(world: World, tmp_path: Path, proxies: list[Proxy]) -> None:
    proxy = start_proxy(world, tmp_path, {"login_failure_limit": "2"})
    proxies.append(proxy)
    ports = proxy.ports
    user = world.new_user()
    assert smtp_login(ports["SMTP"], user, RIGHT) == "OK"
    assert pop_login(ports["POP"], user, WRONG) == f"-ERR Authentication failed. {incorrect(user)}"
    failure = f"535 5.7.8  Authentication credentials invalid. {incorrect(user)}"
    assert smtp_login(ports["SMTP"], user, WRONG) == failure

    text = f"{PREFIX}Too many failed logins for {user} from this address; try again in "
    assert imap_login(ports["IMAP"], user, RIGHT).startswith(f"LOGIN {text}")
    assert pop_login(ports["POP"], user, RIGHT).startswith(f"-ERR Authentication failed. {text}")
    assert smtp_login(ports["SMTP"], user, RIGHT).startswith(
        f"535 5.7.8  Authentication credentials invalid. {text}"
    )


def test_many_unknown_accounts_hold_back_the_whole_address(
    world: World, tmp_path: Path, proxies: list[Proxy]
) -> None:
    proxy = start_proxy(world, tmp_path, {"login_failure_address_limit": "3"})
    proxies.append(proxy)
    port = proxy.ports["IMAP"]
    for n in range(3):  # guessing account names: each is unknown (no section for that domain)
        stranger = f"guess{n}@unknown.invalid"
        assert f"No config file entry found for account {stranger}" in imap_login(port, stranger, WRONG)
    user = world.new_user()
    refused = imap_login(port, user, RIGHT)
    assert refused == f"LOGIN {PREFIX}Too many failed logins from this address; try again in 1 s"
    warning = r"WARNING.*repeated failed logins from 127\.0\.0\.1: its logins are refused"
    assert re.search(warning, proxy.log())
    wait_for(lambda: True if imap_login(port, user, RIGHT) == "OK" else None, "the address backoff to end")


def test_backoff_can_be_turned_off(world: World, tmp_path: Path, proxies: list[Proxy]) -> None:
    proxy = start_proxy(world, tmp_path, {"login_failure_backoff": "False", "login_failure_limit": "1"})
    proxies.append(proxy)
    port = proxy.ports["IMAP"]
    user = world.new_user()
    assert imap_login(port, user, RIGHT) == "OK"
    for _ in range(3):
        assert imap_login(port, user, WRONG) == f"LOGIN {incorrect(user)}"
    assert imap_login(port, user, RIGHT) == "OK"


# ------------------------------------------------------------------------------- per-connection caps


def test_commands_before_login_are_capped(world: World, tmp_path: Path, proxies: list[Proxy]) -> None:
    proxy = start_proxy(world, tmp_path, {})
    proxies.append(proxy)
    ports = proxy.ports
    limit = "too many commands before login (the limit is 50); closing"

    with imaplib.IMAP4(LOCAL, ports["IMAP"], timeout=TIMEOUT) as imap:
        for _ in range(49):  # imaplib already sent CAPABILITY
            assert imap.noop()[0] == "OK"
        with pytest.raises(imaplib.IMAP4.abort, match=re.escape(PREFIX + limit)):
            imap.noop()

    pop = POP3(LOCAL, ports["POP"], timeout=TIMEOUT)
    for _ in range(50):
        assert "USER" in pop.capa()
    with pytest.raises(poplib.error_proto, match=re.escape(f"-ERR {PREFIX}{limit}")):
        pop.user(world.new_user())  # (poplib's capa() hides the server's error text)
    pop.close()

    smtp = smtplib.SMTP(LOCAL, ports["SMTP"], timeout=TIMEOUT)
    for _ in range(50):
        assert smtp.noop()[0] == 250
    assert smtp.noop() == (421, f"4.7.0 {PREFIX}{limit}".encode())
    smtp.close()

    # a client that logs in after a few commands is not affected
    user = world.new_user()
    with imaplib.IMAP4(LOCAL, ports["IMAP"], timeout=TIMEOUT) as imap:
        for _ in range(10):
            imap.noop()
        imap.login(user, RIGHT)
        for _ in range(100):  # after login nothing is counted
            assert imap.noop()[0] == "OK"


def test_failed_logins_per_connection_are_capped(world: World, tmp_path: Path, proxies: list[Proxy]) -> None:
    proxy = start_proxy(world, tmp_path, {"login_failure_limit": "100"})
    proxies.append(proxy)
    user = world.new_user()
    port = proxy.ports["IMAP"]
    assert imap_login(port, user, RIGHT) == "OK"
    imap = imaplib.IMAP4(LOCAL, port, timeout=TIMEOUT)
    try:
        for _ in range(2):
            with pytest.raises(imaplib.IMAP4.error, match=re.escape(incorrect(user))):
                imap.login(user, WRONG)
        with pytest.raises(imaplib.IMAP4.error, match=re.escape(incorrect(user))):
            imap.login(user, WRONG)  # the third: answered, and then the connection is closed
        closing = f"{PREFIX}too many failed logins on this connection (3); closing"
        with pytest.raises(imaplib.IMAP4.abort, match=re.escape(closing)):
            imap.noop()
    finally:
        imap.shutdown()
    assert imap_login(port, user, RIGHT) == "OK"  # a new connection may try again
