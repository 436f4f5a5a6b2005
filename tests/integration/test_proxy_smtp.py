"""End-to-end SMTP: real clients (smtplib, swaks, raw sockets) -> the proxy's SMTP listeners -> the world's
Postfix (submission with STARTTLS, or SMTPS), which only relays for SASL-authenticated sessions and
delivers example.com into Dovecot over LMTP. Messages are read back through the same proxy's IMAP and POP
listeners and compared byte for byte with what was sent.

Every test uses client-credentials catch-all accounts (`[@example.com]`) and fresh mailboxes.
"""

from __future__ import annotations

import base64
import imaplib
import os
import re
import smtplib
import socket
import ssl
import struct
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from tests.integration.conftest import World
from tests.integration.proxy import Proxy, allocate_ports, launch
from tests.integration.world.ports import LOOPBACK
from tests.integration.world.postfix import MESSAGE_SIZE_LIMIT

CLIENT_ID = "smtp-ccg-client"
CLIENT_SECRET = "smtp-ccg-secret-value"
SCOPE = "https://outlook.office365.com/.default"
LOCAL = "127.0.0.1"
TIMEOUT = 60.0  # socket timeout for every client in this file
DELIVERY_TIMEOUT = 30.0  # how long Postfix + LMTP may take to put a message into the maildir
REPLY_PREFIX = "5.7.8  Authentication credentials invalid. Email OAuth 2.0 Proxy: "

# local listener name -> what it is
PLAIN_STARTTLS_UP = "SMTP"  # plain local side, upstream submission port with STARTTLS
PLAIN_TLS_UP = "SMTP_UPSTREAM_TLS"  # plain local side, upstream SMTPS (implicit TLS)
LOCAL_STARTTLS = "SMTP_LOCAL_STARTTLS"  # local STARTTLS offered, upstream submission with STARTTLS
LOCAL_TLS = "SMTP_LOCAL_TLS"  # local implicit TLS, upstream SMTPS
IMAP = "IMAP"  # plain local IMAP -> Dovecot imaps
POP = "POP"  # plain local POP -> Dovecot pop3s
LISTENERS = (PLAIN_STARTTLS_UP, PLAIN_TLS_UP, LOCAL_STARTTLS, LOCAL_TLS, IMAP, POP)

# Lines that Postfix and Dovecot put in front of a delivered message (and nothing else): Postfix's
# "Received:" and Dovecot LMTP's "Return-Path:", "Delivered-To:" and "Received:", possibly folded.
TRACE_LINE = re.compile(rb"^(?:(?:Return-Path|Delivered-To|Received):[^\r\n]*|[ \t]+[^\r\n]*)\r\n$")


@pytest.fixture
def password() -> str:
    """A fresh local password per test (so it can be searched for in the proxy's log)."""
    return f"pw-{uuid.uuid4().hex}"


@pytest.fixture
def proxy(world: World, tmp_path: Path) -> Iterator[Proxy]:
    """One proxy with every SMTP listener variant plus an IMAP and a POP listener to read mail back."""
    world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
    ports = allocate_ports(*LISTENERS)
    submission, smtps = str(world.postfix.ports.submission), str(world.postfix.ports.smtps)
    dovecot = world.dovecot.ports
    local_tls = {
        "local_certificate_path": str(world.certs.cert_path),
        "local_key_path": str(world.certs.key_path),
    }
    sections = {
        f"SMTP-{ports[PLAIN_STARTTLS_UP]}": {
            "server_address": LOOPBACK,
            "server_port": submission,
            "server_starttls": "True",
        },
        f"SMTP-{ports[PLAIN_TLS_UP]}": {
            "server_address": LOOPBACK,
            "server_port": smtps,
            "server_starttls": "False",
        },
        f"SMTP-{ports[LOCAL_STARTTLS]}": {
            "server_address": LOOPBACK,
            "server_port": submission,
            "server_starttls": "True",
            "local_starttls": "True",
            **local_tls,
        },
        f"SMTP-{ports[LOCAL_TLS]}": {"server_address": LOOPBACK, "server_port": smtps, **local_tls},
        f"IMAP-{ports[IMAP]}": {"server_address": dovecot.host, "server_port": str(dovecot.imaps)},
        f"POP-{ports[POP]}": {"server_address": dovecot.host, "server_port": str(dovecot.pop3s)},
        f"@{world.domain}": {
            "token_url": world.idp.token_url(),
            "oauth2_scope": SCOPE,
            "oauth2_flow": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
        "emailproxy": {"allow_catch_all_accounts": "True"},
    }
    started = launch(world.ca_path, tmp_path, sections, ports)
    yield started
    assert started.stop() == 0, started.output()


# ---------------------------------------------------------------------------------------------- helpers


def make_message(sender: str, recipient: str, subject: str, body_lines: list[bytes]) -> bytes:
    """An RFC 5322 message with CRLF line ends, as it travels in SMTP DATA (before dot-stuffing).

    It has From, To, Date and Message-ID so Postfix has no header to add.
    """
    headers = [
        f"From: Sender <{sender}>".encode(),
        f"To: {recipient}".encode(),
        f"Subject: {subject}".encode(),
        b"Date: Mon, 01 Jan 2024 12:00:00 +0000",
        f"Message-ID: <{uuid.uuid4().hex}@example.com>".encode(),
        b"MIME-Version: 1.0",
        b"Content-Type: text/plain; charset=us-ascii",
    ]
    return b"\r\n".join([*headers, b"", *body_lines]) + b"\r\n"


def small_body(marker: str) -> list[bytes]:
    # lines starting with "." exercise dot-stuffing on every hop (smtplib, proxy, Postfix, POP)
    return [
        f"marker {marker}".encode(),
        b"",
        b".",
        b".leading dot",
        b"..two leading dots",
        b"  indented line with trailing spaces  ",
        b"\ttab-indented",
        b"last line",
    ]


def large_body(size: int) -> list[bytes]:
    """About ``size`` bytes of 76-character lines (random base64), with some dot lines mixed in."""
    lines = base64.encodebytes(os.urandom(size * 3 // 4 - 4096)).splitlines()
    assert all(len(line) == 76 for line in lines[:-1])
    for index in range(0, len(lines), 50_000):
        lines.insert(index, b"." + lines[index][1:])
    return lines


def wait_for_messages(world: World, user: str, count: int) -> list[bytes]:
    """Poll the user's maildir until it holds ``count`` messages; return them (as Dovecot stored them)."""
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while True:
        messages = world.dovecot.messages(user)
        if len(messages) >= count:
            return messages
        if time.monotonic() > deadline:
            log = world.postfix.log_path.read_text(errors="replace")[-3000:]
            raise AssertionError(
                f"{user}: {len(messages)} of {count} messages delivered; postfix log:\n{log}"
            )
        time.sleep(0.05)


def assert_arrived_intact(fetched: bytes, sent: bytes) -> None:
    """The fetched message is exactly the sent one with trace header lines in front.

    ``sent`` is the message as handed to SMTP DATA: CRLF line ends, before dot-stuffing (the client stuffs,
    Postfix unstuffs, POP stuffs again and our reader unstuffs). Postfix adds its ``Received:`` line and
    Dovecot's LMTP adds ``Return-Path:``, ``Delivered-To:`` and ``Received:``, all at the top; both keep the
    rest as is (the maildir stores LF ends; IMAP and POP give CRLF back). So the fetched bytes must END with
    exactly the sent bytes, and what comes before must be complete trace header lines only.
    """
    assert len(fetched) > len(sent), (len(fetched), len(sent))
    if not fetched.endswith(sent):
        position = next(i for i in range(1, len(sent) + 1) if fetched[-i] != sent[-i])
        got = fetched[len(fetched) - position - 40 :][:80]
        expected = sent[max(0, len(sent) - position - 40) :][:80]
        raise AssertionError(f"message altered {position} bytes from its end: got {got!r}, sent {expected!r}")
    prefix = fetched[: -len(sent)]
    lines = prefix.splitlines(keepends=True)
    unexpected = [line for line in lines if not TRACE_LINE.match(line)]
    assert not unexpected, unexpected
    assert lines[0].startswith(b"Return-Path: "), lines[0]
    # Postfix's own Received line says the upstream session used TLS and SASL (RFC 3848 ESMTPSA)
    assert re.search(rb"by mail\.example\.com \(Postfix\) with ESMTPSA id", prefix), prefix


def imap_fetch_all(port: int, user: str, password: str) -> list[bytes]:
    """Every INBOX message through the proxy's IMAP listener, as BODY.PEEK[] literals."""
    with imaplib.IMAP4(LOCAL, port, timeout=TIMEOUT) as imap:
        imap.login(user, password)
        typ, data = imap.select("INBOX", readonly=True)
        assert typ == "OK", data
        count = int(data[0] or b"0")
        if count == 0:
            return []
        typ, items = imap.fetch(f"1:{count}", "(BODY.PEEK[])")
        assert typ == "OK", items
        return [item[1] for item in items if isinstance(item, tuple)]


def pop_retrieve_all(port: int, user: str, password: str) -> list[bytes]:
    """Every message through the proxy's POP listener, read raw: lines kept with their CRLF, unstuffed."""
    with socket.create_connection((LOCAL, port), timeout=TIMEOUT) as sock, sock.makefile("rb") as reader:

        def command(line: str) -> bytes:
            sock.sendall(line.encode() + b"\r\n")
            reply = reader.readline()
            assert reply.startswith(b"+OK"), (line.split()[0], reply)
            return reply

        greeting = reader.readline()
        assert greeting.startswith(b"+OK"), greeting
        command(f"USER {user}")
        command(f"PASS {password}")
        count = int(command("STAT").split()[1])
        messages = []
        for number in range(1, count + 1):
            command(f"RETR {number}")
            lines = []
            while (line := reader.readline()) != b".\r\n":
                assert line.endswith(b"\r\n"), f"POP data ended without the terminating dot: {line[-80:]!r}"
                lines.append(line[1:] if line.startswith(b".") else line)
            messages.append(b"".join(lines))
        command("QUIT")
    return messages


def ehlo_lines(smtp: smtplib.SMTP) -> list[str]:
    """EHLO and return the extension lines (without the greeting line); asserts the reply is 250."""
    code, reply = smtp.ehlo()
    assert code == 250, reply
    return reply.decode().split("\n")[1:]


def assert_auth_plain_login_only(extensions: list[str]) -> None:
    """The proxy advertises exactly AUTH PLAIN LOGIN, never the upstream's XOAUTH2/OAUTHBEARER."""
    auth = [line for line in extensions if line.upper().startswith("AUTH")]
    assert auth == ["AUTH PLAIN LOGIN"], extensions
    assert not [line for line in extensions if "XOAUTH2" in line.upper() or "OAUTHBEARER" in line.upper()]


def plain_blob(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def assert_no_secrets(proxy: Proxy, world: World, password: str) -> None:
    """Neither the local password nor any access token the identity provider issued is in the log."""
    log = proxy.log()
    assert password not in log
    for issued in world.idp.issued:
        assert issued.access_token not in log


def smtp_checks(world: World, user: str) -> list[bool]:
    """Results of the token checks Postfix (through Dovecot's SASL service) made for ``user``."""
    return [check.ok for check in world.idp.check_log if check.user == user and check.service == "smtp"]


def send_and_check_delivery(world: World, smtp: smtplib.SMTP, user: str, subject: str) -> bytes:
    """Send a small message to ``user`` on an authenticated connection and wait until it is stored."""
    sent = make_message(user, user, subject, small_body(subject))
    assert smtp.sendmail(user, [user], sent) == {}
    stored = wait_for_messages(world, user, 1)
    assert len(stored) == 1
    # the maildir keeps LF line ends: compare the tail in that form
    assert stored[0].endswith(sent.replace(b"\r\n", b"\n")), stored[0][-400:]
    return sent


def read_reply(reader: BinaryIO) -> tuple[int, list[bytes]]:
    """One (possibly multi-line) SMTP reply from a raw connection."""
    lines: list[bytes] = []
    while True:
        line = reader.readline()
        assert line.endswith(b"\r\n"), f"connection closed mid-reply: {lines!r} {line!r}"
        lines.append(line)
        if line[3:4] != b"-":
            return int(line[:3]), lines


def postfix_log_count(world: World, pattern: str) -> int:
    text = world.postfix.log_path.read_text(errors="replace") if world.postfix.log_path.exists() else ""
    return len(re.findall(pattern, text))


# ---------------------------------------------------------------------------------------------- tests


def test_plain_local_starttls_upstream_send_and_fetch(world: World, proxy: Proxy, password: str) -> None:
    """smtplib -> proxy (plain) -> Postfix submission (STARTTLS); read back through proxy IMAP and POP."""
    user = world.new_user()
    sent = make_message(user, user, "round trip", small_body(uuid.uuid4().hex))
    with smtplib.SMTP(LOCAL, proxy.ports[PLAIN_STARTTLS_UP], timeout=TIMEOUT) as smtp:
        extensions = ehlo_lines(smtp)
        assert_auth_plain_login_only(extensions)
        assert "STARTTLS" not in [line.upper() for line in extensions]
        # the server's other extensions come through (Postfix's post-TLS EHLO: its SIZE limit, PIPELINING)
        assert f"SIZE {MESSAGE_SIZE_LIMIT}" in extensions and "PIPELINING" in extensions, extensions
        code, _ = smtp.login(user, password)  # smtplib prefers PLAIN over LOGIN
        assert code == 235
        assert smtp.sendmail(user, [user], sent) == {}
    stored = wait_for_messages(world, user, 1)
    assert len(stored) == 1
    via_imap = imap_fetch_all(proxy.ports[IMAP], user, password)
    via_pop = pop_retrieve_all(proxy.ports[POP], user, password)
    assert len(via_imap) == 1 and len(via_pop) == 1
    assert_arrived_intact(via_imap[0], sent)
    assert_arrived_intact(via_pop[0], sent)
    assert via_imap[0] == via_pop[0]
    # one client-credentials token served SMTP, IMAP and POP; Postfix checked it for this user
    assert len(world.idp.token_requests("client_credentials")) == 1
    assert smtp_checks(world, user) == [True]
    assert_no_secrets(proxy, world, password)


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize(
    "initial_response_ok", [True, False], ids=["initial-response", "no-initial-response"]
)
def test_forced_auth_mechanism(
    world: World, proxy: Proxy, password: str, mechanism: str, initial_response_ok: bool
) -> None:
    user = world.new_user()
    with smtplib.SMTP(LOCAL, proxy.ports[PLAIN_STARTTLS_UP], timeout=TIMEOUT) as smtp:
        assert_auth_plain_login_only(ehlo_lines(smtp))
        smtp.user, smtp.password = user, password
        method = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
        code, reply = smtp.auth(mechanism, method, initial_response_ok=initial_response_ok)
        assert code == 235, reply
        send_and_check_delivery(world, smtp, user, f"auth {mechanism} {initial_response_ok}")
    assert smtp_checks(world, user) == [True]
    assert len(world.idp.token_requests("client_credentials")) == 1
    assert_no_secrets(proxy, world, password)


def test_twenty_megabyte_message(world: World, proxy: Proxy, password: str) -> None:
    user = world.new_user()
    sent = make_message(user, user, "large", large_body(20 * 1024 * 1024))
    assert 20 * 1024 * 1024 <= len(sent) < MESSAGE_SIZE_LIMIT
    with smtplib.SMTP(LOCAL, proxy.ports[PLAIN_STARTTLS_UP], timeout=TIMEOUT) as smtp:
        smtp.login(user, password)
        assert smtp.sendmail(user, [user], sent) == {}
    assert len(wait_for_messages(world, user, 1)) == 1
    via_imap = imap_fetch_all(proxy.ports[IMAP], user, password)
    assert len(via_imap) == 1
    assert_arrived_intact(via_imap[0], sent)
    via_pop = pop_retrieve_all(proxy.ports[POP], user, password)
    assert len(via_pop) == 1
    assert_arrived_intact(via_pop[0], sent)


def test_upstream_implicit_tls(world: World, proxy: Proxy, password: str) -> None:
    """server_starttls = False: the proxy talks TLS to Postfix's SMTPS port from the first byte."""
    user = world.new_user()
    sent = make_message(user, user, "smtps", small_body(uuid.uuid4().hex))
    with smtplib.SMTP(LOCAL, proxy.ports[PLAIN_TLS_UP], timeout=TIMEOUT) as smtp:
        extensions = ehlo_lines(smtp)
        assert_auth_plain_login_only(extensions)
        assert "STARTTLS" not in [line.upper() for line in extensions]
        assert smtp.login(user, password)[0] == 235
        assert smtp.sendmail(user, [user], sent) == {}
    assert len(wait_for_messages(world, user, 1)) == 1
    via_imap = imap_fetch_all(proxy.ports[IMAP], user, password)
    assert len(via_imap) == 1
    assert_arrived_intact(via_imap[0], sent)
    assert smtp_checks(world, user) == [True]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks(world: World, proxy: Proxy, password: str, mechanism: str) -> None:
    user = world.new_user()
    result = subprocess.run(
        [
            "swaks",
            "--server",
            LOCAL,
            "--port",
            str(proxy.ports[PLAIN_STARTTLS_UP]),
            "--auth",
            mechanism,
            "--auth-user",
            user,
            "--auth-password",
            password,
            "--to",
            user,
            "--from",
            user,
            "--silent",
            "2",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode(errors="replace")
    stored = wait_for_messages(world, user, 1)
    assert len(stored) == 1
    assert b"\nX-Mailer: swaks" in stored[0] and f"\nTo: {user}\n".encode() in stored[0], stored[0]
    assert smtp_checks(world, user) == [True]
    assert_no_secrets(proxy, world, password)


def test_local_starttls(world: World, proxy: Proxy, password: str) -> None:
    user = world.new_user()
    with smtplib.SMTP(LOCAL, proxy.ports[LOCAL_STARTTLS], timeout=TIMEOUT) as smtp:
        before = ehlo_lines(smtp)
        assert "STARTTLS" in [line.upper() for line in before], before
        assert_auth_plain_login_only(before)
        code, _ = smtp.starttls(context=world.certs.client_context())
        assert code == 220
        assert isinstance(smtp.sock, ssl.SSLSocket)
        certificate = smtp.sock.getpeercert()
        assert certificate is not None and certificate["subject"][-1] == (("commonName", "127.0.0.1"),)
        after = ehlo_lines(smtp)
        assert "STARTTLS" not in [line.upper() for line in after], after
        assert_auth_plain_login_only(after)
        # a second STARTTLS on the TLS connection is refused
        assert smtp.docmd("STARTTLS")[0] == 454
        assert smtp.login(user, password)[0] == 235
        send_and_check_delivery(world, smtp, user, "local starttls")
    assert smtp_checks(world, user) == [True]


def test_starttls_refused_without_local_starttls(world: World, proxy: Proxy) -> None:
    with smtplib.SMTP(LOCAL, proxy.ports[PLAIN_STARTTLS_UP], timeout=TIMEOUT) as smtp:
        ehlo_lines(smtp)
        code, reply = smtp.docmd("STARTTLS")
        assert code == 454, reply
        assert b"STARTTLS not available" in reply


def test_local_implicit_tls(world: World, proxy: Proxy, password: str) -> None:
    user = world.new_user()
    context = world.certs.client_context()
    with smtplib.SMTP_SSL(LOCAL, proxy.ports[LOCAL_TLS], timeout=TIMEOUT, context=context) as smtp:
        extensions = ehlo_lines(smtp)
        assert_auth_plain_login_only(extensions)
        assert "STARTTLS" not in [line.upper() for line in extensions]
        assert smtp.login(user, password)[0] == 235
        send_and_check_delivery(world, smtp, user, "local implicit tls")
    assert smtp_checks(world, user) == [True]


def test_wrong_password_then_correct_login_on_same_connection(
    world: World, proxy: Proxy, password: str
) -> None:
    user = world.new_user()
    port = proxy.ports[PLAIN_STARTTLS_UP]
    with smtplib.SMTP(LOCAL, port, timeout=TIMEOUT) as smtp:  # the first login stores the token
        assert smtp.login(user, password)[0] == 235
    with smtplib.SMTP(LOCAL, port, timeout=TIMEOUT) as smtp:
        ehlo_lines(smtp)
        code, reply = smtp.docmd("AUTH", "PLAIN " + plain_blob(user, "not-" + password))
        assert (code, reply.decode()) == (
            535,
            f"{REPLY_PREFIX}Login failed - the password for account {user} is incorrect",
        )
        code, reply = smtp.docmd("AUTH", "PLAIN " + plain_blob(user, password))
        assert code == 235, reply
        send_and_check_delivery(world, smtp, user, "after a wrong password")
    # the wrong password neither asked for a new token nor reached Postfix
    assert len(world.idp.token_requests("client_credentials")) == 1
    assert smtp_checks(world, user) == [True, True]


def test_auth_cancel_keeps_session(world: World, proxy: Proxy, password: str) -> None:
    user = world.new_user()
    with smtplib.SMTP(LOCAL, proxy.ports[PLAIN_STARTTLS_UP], timeout=TIMEOUT) as smtp:
        ehlo_lines(smtp)
        assert smtp.docmd("AUTH", "PLAIN")[0] == 334
        assert smtp.docmd("*")[0] == 501
        assert smtp.docmd("AUTH", "LOGIN")[0] == 334
        assert smtp.docmd("*")[0] == 501
        assert smtp.docmd("AUTH", "LOGIN " + base64.b64encode(user.encode()).decode())[0] == 334
        assert smtp.docmd("*")[0] == 501
        assert smtp.noop()[0] == 250
        assert world.idp.token_requests() == [] and smtp_checks(world, user) == []
        code, reply = smtp.docmd("AUTH", "PLAIN " + plain_blob(user, password))
        assert code == 235, reply
        send_and_check_delivery(world, smtp, user, "after cancelled auth")
    assert smtp_checks(world, user) == [True]


@pytest.mark.parametrize("how", ["close", "reset"])
def test_client_disconnects_during_data(world: World, proxy: Proxy, password: str, how: str) -> None:
    user = world.new_user()
    port = proxy.ports[PLAIN_STARTTLS_UP]
    cut_marker = f"cut-{uuid.uuid4().hex}"
    lost_before = postfix_log_count(world, r"lost connection after DATA")
    sock = socket.create_connection((LOCAL, port), timeout=TIMEOUT)
    try:
        reader = sock.makefile("rb")
        assert read_reply(reader)[0] == 220
        for command, expected in [
            ("EHLO client.example", 250),
            ("AUTH PLAIN " + plain_blob(user, password), 235),
            (f"MAIL FROM:<{user}>", 250),
            (f"RCPT TO:<{user}>", 250),
            ("DATA", 354),
        ]:
            sock.sendall(command.encode() + b"\r\n")
            code, lines = read_reply(reader)
            assert code == expected, (command.split()[0], lines)
        partial = make_message(user, user, cut_marker, large_body(256 * 1024))
        sock.sendall(partial[: len(partial) // 2])
        reader.close()
        if how == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()
    # the proxy drops the upstream connection too: Postfix sees its client go away in the middle of DATA
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while postfix_log_count(world, r"lost connection after DATA") <= lost_before:
        assert time.monotonic() < deadline, "Postfix never saw the upstream connection close"
        time.sleep(0.05)
    assert proxy.process is not None and proxy.process.poll() is None
    with smtplib.SMTP(LOCAL, port, timeout=TIMEOUT) as smtp:
        assert smtp.login(user, password)[0] == 235
        sent = send_and_check_delivery(world, smtp, user, "after the cut")
    # exactly the second message is in the mailbox, nothing of the cut one
    stored = world.dovecot.messages(user)
    assert len(stored) == 1 and cut_marker.encode() not in stored[0]
    assert stored[0].endswith(sent.replace(b"\r\n", b"\n"))


def _fail_500(world: World) -> Callable[[], None]:
    world.idp.fail_with(500)
    return lambda: None


def _fail_503_html(world: World) -> Callable[[], None]:
    world.idp.fail_with(503, "<html><body>Service Unavailable</body></html>")
    return lambda: None


def _down_reset(world: World) -> Callable[[], None]:
    world.idp.set_down(True, mode="reset")
    return lambda: world.idp.set_down(False)


def _down_refuse(world: World) -> Callable[[], None]:
    world.idp.set_down(True, mode="refuse")
    return lambda: world.idp.set_down(False)


@pytest.mark.parametrize(
    ("break_idp", "reason"),
    [
        (_fail_500, "temporarily_unavailable"),
        (_fail_503_html, "HTTP 503"),
        (_down_reset, "please check your internet connection and retry"),
        (_down_refuse, "please check your internet connection and retry"),
    ],
    ids=["http-500-oauth-error", "http-503-html", "connection-reset", "connection-refused"],
)
def test_token_endpoint_failure_then_recovery(
    world: World, proxy: Proxy, password: str, break_idp: Callable[[World], Callable[[], None]], reason: str
) -> None:
    user = world.new_user()
    recover = break_idp(world)
    with smtplib.SMTP(LOCAL, proxy.ports[PLAIN_STARTTLS_UP], timeout=TIMEOUT) as smtp:
        ehlo_lines(smtp)
        started = time.monotonic()
        code, reply = smtp.docmd("AUTH", "PLAIN " + plain_blob(user, password))
        elapsed = time.monotonic() - started
        text = reply.decode()
        assert code == 535, text
        assert text.startswith(f"{REPLY_PREFIX}Login failed for account {user}"), text
        assert reason in text, text
        # liveness, not speed: the failure is reported promptly instead of hanging the client
        assert elapsed < 10, elapsed
        assert smtp_checks(world, user) == []  # nothing reached Postfix
        recover()
        code, reply = smtp.docmd("AUTH", "PLAIN " + plain_blob(user, password))
        assert code == 235, reply
        send_and_check_delivery(world, smtp, user, "after the identity provider recovered")
    assert smtp_checks(world, user) == [True]
    assert_no_secrets(proxy, world, password)
