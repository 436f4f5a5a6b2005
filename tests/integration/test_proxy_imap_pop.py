"""End-to-end IMAP and POP3 through the proxy: login syntaxes, SASL PLAIN, capabilities, IDLE, local TLS and
STARTTLS (with the command-injection defence), large messages, concurrency and wrong passwords.

One proxy serves the whole module (listeners below), with a client-credentials catch-all account for the
world's domain; every test uses fresh users, so the proxy's token cache never carries over between tests.
The identity provider is reset before every test (conftest), so the client is registered again each time.
"""

from __future__ import annotations

import base64
import imaplib
import os
import poplib
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration.conftest import World
from tests.integration.proxy import Proxy, allocate_ports, launch

CLIENT_ID = "imap-pop-ccg-client"
CLIENT_SECRET = "imap-pop-ccg-secret"
PASSWORD = "local-password"
TIMEOUT = 20.0
PREFIX = "Email OAuth 2.0 Proxy: "

# listener name -> (upstream kind, options)
IMAP = "IMAP"  # plaintext locally, implicit TLS upstream (Dovecot imaps)
IMAP_UPSTREAM_STARTTLS = "IMAPUP"  # plaintext locally, STARTTLS upstream (Dovecot imap)
IMAP_TLS = "IMAPTLS"  # implicit TLS locally
IMAP_STARTTLS = "IMAPSTARTTLS"  # local STARTTLS offered
POP = "POP"  # plaintext locally, Dovecot pop3s
POP_UPSTREAM_STLS = "POPUP"  # plaintext locally, STLS upstream (Dovecot pop3)
POP_STARTTLS = "POPSTARTTLS"  # local STLS offered


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def module_proxy(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    ports = allocate_ports(
        IMAP, IMAP_UPSTREAM_STARTTLS, IMAP_TLS, IMAP_STARTTLS, POP, POP_UPSTREAM_STLS, POP_STARTTLS
    )
    d = world.dovecot.ports
    local_tls = {
        "local_certificate_path": str(world.certs.cert_path),
        "local_key_path": str(world.certs.key_path),
    }
    sections = {
        f"IMAP-{ports[IMAP]}": {"server_address": d.host, "server_port": str(d.imaps)},
        f"IMAP-{ports[IMAP_UPSTREAM_STARTTLS]}": {
            "server_address": d.host,
            "server_port": str(d.imap),
            "server_starttls": "True",
        },
        f"IMAP-{ports[IMAP_TLS]}": {"server_address": d.host, "server_port": str(d.imaps), **local_tls},
        f"IMAP-{ports[IMAP_STARTTLS]}": {
            "server_address": d.host,
            "server_port": str(d.imaps),
            "local_starttls": "True",
            **local_tls,
        },
        f"POP-{ports[POP]}": {"server_address": d.host, "server_port": str(d.pop3s)},
        f"POP-{ports[POP_UPSTREAM_STLS]}": {
            "server_address": d.host,
            "server_port": str(d.pop3),
            "server_starttls": "True",
        },
        f"POP-{ports[POP_STARTTLS]}": {
            "server_address": d.host,
            "server_port": str(d.pop3s),
            "local_starttls": "True",
            **local_tls,
        },
        f"@{world.domain}": {
            "token_url": world.idp.token_url(),
            "oauth2_scope": "https://outlook.office365.com/.default",
            "oauth2_flow": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
        "emailproxy": {"allow_catch_all_accounts": "True"},
    }
    proxy = launch(world.ca_path, tmp_path_factory.mktemp("imap-pop-proxy"), sections, ports)
    try:
        yield proxy
    finally:
        assert proxy.stop() == 0, proxy.output()


@pytest.fixture
def proxy(world: World, module_proxy: Proxy) -> Proxy:
    """The module's proxy, with the client registered at the (freshly reset) identity provider."""
    world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
    return module_proxy


# ------------------------------------------------------------------------------------------------ helpers


class Wire:
    """A raw line-oriented client socket that can be upgraded to TLS (no buffered bytes may be lost)."""

    def __init__(self, port: int) -> None:
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.buffer = b""

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed; unread: {self.buffer!r}")
        self.buffer += chunk

    def line(self) -> bytes:
        """The next line, with its CRLF."""
        while b"\n" not in self.buffer:
            self._fill()
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def until_tagged(self, tag: bytes) -> list[bytes]:
        """IMAP: every line up to and including the one tagged ``tag`` (no literals expected)."""
        lines = [self.line()]
        while not lines[-1].startswith(tag + b" "):
            lines.append(self.line())
        return lines

    def until_dot(self) -> list[bytes]:
        """POP3: the lines of a multi-line body up to (not including) the lone dot."""
        lines: list[bytes] = []
        while (line := self.line()) != b".\r\n":
            lines.append(line)
        return lines

    def starttls(self, context: ssl.SSLContext) -> None:
        assert self.buffer == b"", f"bytes after the STARTTLS reply: {self.buffer!r}"
        self.sock = context.wrap_socket(self.sock, server_hostname="127.0.0.1")


def client_context(world: World) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(world.ca_path))


def plain(user: str, password: bytes | str) -> bytes:
    secret = password.encode() if isinstance(password, str) else password
    return base64.b64encode(b"\0" + user.encode() + b"\0" + secret)


def crlf(data: bytes) -> bytes:
    """``data`` with every line ending as CRLF: Dovecot keeps maildir files with LF line ends and serves
    them over IMAP and POP3 with CRLF, so this is the exact byte stream a client must receive."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def token_count(world: World) -> int:
    return len(world.idp.token_requests("client_credentials"))


def imap_login(port: int, user: str, password: str = PASSWORD) -> imaplib.IMAP4:
    imap = imaplib.IMAP4("127.0.0.1", port, timeout=TIMEOUT)
    imap.login(user, password)
    return imap


def imap_greeting(wire: Wire) -> bytes:
    greeting = wire.line()
    assert greeting.startswith(b"* OK"), greeting
    return greeting


def expect_tagged_ok(wire: Wire, tag: bytes) -> list[bytes]:
    lines = wire.until_tagged(tag)
    assert lines[-1].startswith(tag + b" OK"), lines
    return lines


def wrong_password_text(user: str) -> str:
    return f"{PREFIX}Login failed - the password for account {user} is incorrect"


# ------------------------------------------------------------------------------------------------ IMAP login


def test_imap_login_quoted_password_with_specials_equals_literal(world: World, proxy: Proxy) -> None:
    user = world.new_user()
    password = 'p a"s\\s w\\"d'
    with imaplib.IMAP4("127.0.0.1", proxy.ports[IMAP], timeout=TIMEOUT) as imap:
        typ, _ = imap.login(user, password)  # imaplib sends "p a\"s\\s w\\\"d" (quoted, escaped)
        assert typ == "OK"
        assert imap.select("INBOX")[0] == "OK"
    assert token_count(world) == 1
    raw = password.encode()
    with Wire(proxy.ports[IMAP]) as wire:
        imap_greeting(wire)
        # the unescaped bytes as a literal: same password, so the cached token opens without a token request
        wire.send(b"q1 LOGIN " + user.encode() + b" {%d+}\r\n" % len(raw) + raw + b"\r\n")
        expect_tagged_ok(wire, b"q1")
    assert token_count(world) == 1
    with Wire(proxy.ports[IMAP]) as wire:
        imap_greeting(wire)
        escaped = b'p a\\"s\\\\s w\\\\\\"d'  # the quoted form's inner bytes, not unescaped: another password
        wire.send(b"q2 LOGIN " + user.encode() + b" {%d+}\r\n" % len(escaped) + escaped + b"\r\n")
        reply = wire.until_tagged(b"q2")[-1]
        assert reply == f"q2 NO LOGIN {wrong_password_text(user)}\r\n".encode()
    assert token_count(world) == 1


def test_imap_login_synchronising_literals(world: World, proxy: Proxy) -> None:
    user = world.new_user().encode()
    password = b'literal pass"word\\'
    with Wire(proxy.ports[IMAP]) as wire:
        imap_greeting(wire)
        wire.send(b"L1 LOGIN {%d}\r\n" % len(user))
        assert wire.line().startswith(b"+"), "no continuation for the user name literal"
        wire.send(user + b" {%d}\r\n" % len(password))
        assert wire.line().startswith(b"+"), "no continuation for the password literal"
        wire.send(password + b"\r\n")
        lines = expect_tagged_ok(wire, b"L1")
        assert not any(line.startswith(b"+") for line in lines)
        wire.send(b"L2 SELECT INBOX\r\n")
        assert b"* 0 EXISTS\r\n" in expect_tagged_ok(wire, b"L2")
    assert token_count(world) == 1
    assert [c.user for c in world.idp.check_log if c.ok] == [user.decode()]


def test_imap_login_non_synchronising_literals(world: World, proxy: Proxy) -> None:
    user = world.new_user().encode()
    password = b"non sync {3}\r\n"
    with Wire(proxy.ports[IMAP]) as wire:
        capabilities = imap_greeting(wire)
        assert b"LITERAL+" in capabilities.upper()
        wire.send(
            b"N1 LOGIN {%d+}\r\n" % len(user) + user + b" {%d+}\r\n" % len(password) + password + b"\r\n"
        )
        lines = expect_tagged_ok(wire, b"N1")
        assert not any(line.startswith(b"+") for line in lines), "continuation sent for a non-sync literal"
        wire.send(b"N2 SELECT INBOX\r\n")
        expect_tagged_ok(wire, b"N2")
    assert token_count(world) == 1


def test_imap_login_password_literal_with_crlf_uses_cache(world: World, proxy: Proxy) -> None:
    user = world.new_user().encode()
    password = b'first line\r\nsecond "line"'
    with Wire(proxy.ports[IMAP]) as wire:
        imap_greeting(wire)
        wire.send(b"C1 LOGIN " + user + b" {%d}\r\n" % len(password))
        assert wire.line().startswith(b"+")
        wire.send(password + b"\r\n")
        expect_tagged_ok(wire, b"C1")
    assert token_count(world) == 1
    with Wire(proxy.ports[IMAP]) as wire:  # the same bytes again: the cached token decrypts
        imap_greeting(wire)
        wire.send(b"C2 LOGIN " + user + b" {%d+}\r\n" % len(password) + password + b"\r\n")
        expect_tagged_ok(wire, b"C2")
    assert token_count(world) == 1
    with Wire(proxy.ports[IMAP]) as wire:  # without the CRLF it is another password
        imap_greeting(wire)
        other = password.replace(b"\r\n", b"")
        wire.send(b"C3 LOGIN " + user + b" {%d+}\r\n" % len(other) + other + b"\r\n")
        assert (
            wire.until_tagged(b"C3")[-1] == f"C3 NO LOGIN {wrong_password_text(user.decode())}\r\n".encode()
        )
    assert token_count(world) == 1


# ------------------------------------------------------------------------------------------------ IMAP SASL


def test_imap_authenticate_plain_two_step_with_imaplib(world: World, proxy: Proxy) -> None:
    user = world.new_user()
    challenges: list[bytes] = []

    def respond(challenge: bytes) -> bytes:
        challenges.append(challenge)
        return b"\0" + user.encode() + b"\0" + PASSWORD.encode()

    with imaplib.IMAP4("127.0.0.1", proxy.ports[IMAP], timeout=TIMEOUT) as imap:
        typ, _ = imap.authenticate("PLAIN", respond)
        assert typ == "OK"
        assert challenges == [b""]  # one empty challenge ("+ "), then the response
        assert imap.select("INBOX") == ("OK", [b"0"])
    assert token_count(world) == 1
    with imap_login(proxy.ports[IMAP], user) as imap:  # LOGIN with the same password: cached token
        assert imap.state == "AUTH"
    assert token_count(world) == 1


def test_imap_authenticate_plain_initial_response(world: World, proxy: Proxy) -> None:
    user = world.new_user()
    with Wire(proxy.ports[IMAP]) as wire:
        assert b"SASL-IR" in imap_greeting(wire)
        wire.send(b"P1 AUTHENTICATE PLAIN " + plain(user, PASSWORD) + b"\r\n")
        lines = expect_tagged_ok(wire, b"P1")
        assert not any(line.startswith(b"+") for line in lines), "a continuation despite the initial response"
        wire.send(b"P2 SELECT INBOX\r\n")
        expect_tagged_ok(wire, b"P2")
    assert token_count(world) == 1
    assert [c.user for c in world.idp.check_log if c.ok] == [user]


def test_imap_authenticate_plain_raw_two_step_then_cancel_then_login(world: World, proxy: Proxy) -> None:
    user = world.new_user()
    with Wire(proxy.ports[IMAP]) as wire:
        imap_greeting(wire)
        wire.send(b"X1 AUTHENTICATE PLAIN\r\n")
        assert wire.line().startswith(b"+")
        wire.send(b"*\r\n")
        reply = wire.until_tagged(b"X1")[-1]
        assert reply.startswith(b"X1 BAD"), reply
        assert token_count(world) == 0
        wire.send(b"X2 AUTHENTICATE PLAIN\r\n")
        assert wire.line().startswith(b"+")
        wire.send(plain(user, PASSWORD) + b"\r\n")
        expect_tagged_ok(wire, b"X2")
    assert token_count(world) == 1

    other = world.new_user()
    with Wire(proxy.ports[IMAP]) as wire:  # cancel, then a LOGIN on the same connection
        imap_greeting(wire)
        wire.send(b"Y1 AUTHENTICATE PLAIN\r\n")
        assert wire.line().startswith(b"+")
        wire.send(b"*\r\n")
        assert wire.until_tagged(b"Y1")[-1].startswith(b"Y1 BAD")
        wire.send(b"Y2 LOGIN " + other.encode() + b" " + PASSWORD.encode() + b"\r\n")
        expect_tagged_ok(wire, b"Y2")
        wire.send(b"Y3 SELECT INBOX\r\n")
        expect_tagged_ok(wire, b"Y3")
    assert token_count(world) == 2
    assert [c.user for c in world.idp.check_log if c.ok] == [user, other]


@pytest.mark.parametrize("listener", [IMAP, IMAP_UPSTREAM_STARTTLS])
def test_imap_capability_before_login(world: World, proxy: Proxy, listener: str) -> None:
    with imaplib.IMAP4("127.0.0.1", proxy.ports[listener], timeout=TIMEOUT) as imap:
        typ, data = imap.capability()
        assert typ == "OK"
        capabilities = data[0].decode().upper().split()
        for advertised in (capabilities, [c.upper() for c in imap.capabilities]):
            assert "AUTH=PLAIN" in advertised
            assert "IMAP4REV1" in advertised
            for hidden in ("AUTH=XOAUTH2", "AUTH=OAUTHBEARER", "LOGINDISABLED", "STARTTLS"):
                assert hidden not in advertised, (hidden, advertised)
        imap.login(world.new_user(), PASSWORD)
    assert token_count(world) == 1


# ------------------------------------------------------------------------------------------------ IMAP mail


def test_imap_idle_sees_delivery(world: World, proxy: Proxy) -> None:
    user = world.new_user()
    with Wire(proxy.ports[IMAP]) as wire:
        imap_greeting(wire)
        wire.send(b"I1 LOGIN " + user.encode() + b" " + PASSWORD.encode() + b"\r\n")
        expect_tagged_ok(wire, b"I1")
        wire.send(b"I2 SELECT INBOX\r\n")
        assert b"* 0 EXISTS\r\n" in expect_tagged_ok(wire, b"I2")
        wire.send(b"I3 IDLE\r\n")
        assert wire.line().startswith(b"+")
        world.dovecot.deliver(user, world.dovecot.make_message("a@example.com", user, "idle", "wake up"))
        seen: list[bytes] = []
        while b"* 1 EXISTS\r\n" not in seen:  # the socket timeout bounds the wait
            seen.append(wire.line())
        wire.send(b"DONE\r\n")
        expect_tagged_ok(wire, b"I3")
        wire.send(b"I4 LOGOUT\r\n")
        expect_tagged_ok(wire, b"I4")


def test_imap_curl_lists_and_fetches(world: World, proxy: Proxy) -> None:
    user = world.new_user()
    world.dovecot.deliver(user, world.dovecot.make_message("a@example.com", user, "curl", "fetched by curl"))
    [stored] = world.dovecot.messages(user)
    base = f"imap://127.0.0.1:{proxy.ports[IMAP]}/INBOX"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}

    def curl(url: str) -> bytes:
        result = subprocess.run(
            [
                "curl",
                "-s",
                "-S",
                "--noproxy",
                "*",
                "--max-time",
                str(int(TIMEOUT)),
                url,
                "-u",
                f"{user}:{PASSWORD}",
            ],
            capture_output=True,
            env=env,
            timeout=TIMEOUT + 5,
            check=False,
        )
        assert result.returncode == 0, (result.returncode, result.stderr, proxy.log()[-3000:])
        return result.stdout

    listing = curl(base)
    assert b"INBOX" in listing and listing.startswith(b"* LIST"), listing
    assert curl(base + ";UID=1") == crlf(stored)
    assert token_count(world) == 1  # the second curl used the cached token


def test_imap_twenty_megabyte_message(world: World, proxy: Proxy) -> None:
    user = world.new_user()
    head = world.dovecot.make_message("big@example.com", user, "big", "start")
    # 20 MiB of base64 lines, with some dot-leading lines for good measure
    chunk = base64.encodebytes(os.urandom(57 * 4000)).replace(b"\n", b"\r\n")
    body = b"".join(b".dot line %d\r\n" % i + chunk for i in range(1 + 20 * 1024 * 1024 // len(chunk)))
    world.dovecot.deliver(user, head + body)
    [stored] = world.dovecot.messages(user)
    expected = crlf(stored)
    assert len(expected) > 20 * 1024 * 1024
    with imap_login(proxy.ports[IMAP], user) as imap:
        assert imap.select("INBOX", readonly=True) == ("OK", [b"1"])
        typ, data = imap.fetch("1", "(BODY.PEEK[])")
        assert typ == "OK"
        item = data[0]
        assert isinstance(item, tuple)
        assert len(item[1]) == len(expected)
        assert item[1] == expected


def test_imap_fifty_parallel_sessions(world: World, proxy: Proxy) -> None:
    users = [world.new_user() for _ in range(10)]
    for user in users:
        world.dovecot.deliver(user, world.dovecot.make_message("p@example.com", user, "parallel", user))

    def session(index: int) -> tuple[str, str, list[bytes | None], str]:
        imap = imaplib.IMAP4("127.0.0.1", proxy.ports[IMAP], timeout=TIMEOUT)
        login, _ = imap.login(users[index % len(users)], PASSWORD)
        selected, count = imap.select("INBOX", readonly=True)
        logout, _ = imap.logout()
        return login, selected, count, logout

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(session, range(50)))
    assert results == [("OK", "OK", [b"1"], "BYE")] * 50
    # single flight: concurrent first logins of one account share one token request
    assert token_count(world) == len(users)
    assert sum(1 for c in world.idp.check_log if c.ok and c.user in users) == 50


# ------------------------------------------------------------------------------------------------ IMAP TLS


def test_imap_local_implicit_tls(world: World, proxy: Proxy) -> None:
    user = world.new_user()
    world.dovecot.deliver(user, world.dovecot.make_message("a@example.com", user, "tls", "over tls"))
    context = client_context(world)
    with imaplib.IMAP4_SSL("127.0.0.1", proxy.ports[IMAP_TLS], ssl_context=context, timeout=TIMEOUT) as imap:
        assert isinstance(imap.sock, ssl.SSLSocket)
        assert "STARTTLS" not in imap.capabilities
        imap.login(user, PASSWORD)
        assert imap.select("INBOX") == ("OK", [b"1"])
        typ, data = imap.fetch("1", "(BODY.PEEK[TEXT])")
        assert typ == "OK" and isinstance(data[0], tuple) and b"over tls" in data[0][1]
    assert token_count(world) == 1


def test_imap_local_starttls(world: World, proxy: Proxy) -> None:
    user = world.new_user()
    with imaplib.IMAP4("127.0.0.1", proxy.ports[IMAP_STARTTLS], timeout=TIMEOUT) as imap:
        assert "STARTTLS" in imap.capabilities
        typ, _ = imap.starttls(client_context(world))
        assert typ == "OK"
        assert isinstance(imap.sock, ssl.SSLSocket)
        assert "STARTTLS" not in imap.capabilities  # imaplib asked again over TLS
        assert "AUTH=PLAIN" in imap.capabilities
        imap.login(user, PASSWORD)
        assert imap.select("INBOX") == ("OK", [b"0"])
    assert token_count(world) == 1


def test_imap_local_starttls_discards_pipelined_command(world: World, proxy: Proxy) -> None:
    marker = uuid.uuid4().hex[:10]
    injected_tag = f"inj{marker}".encode()
    injected_user = f"x-{marker}@{world.domain}"  # a catch-all account: it would reach the IdP if executed
    user = world.new_user()
    with Wire(proxy.ports[IMAP_STARTTLS]) as wire:
        assert b"STARTTLS" in imap_greeting(wire)
        wire.send(b"s1 STARTTLS\r\n" + injected_tag + b" LOGIN " + injected_user.encode() + b" y\r\n")
        reply = wire.line()
        assert reply.startswith(b"s1 OK"), reply
        wire.starttls(client_context(world))
        wire.send(b"s2 NOOP\r\n")
        lines = expect_tagged_ok(wire, b"s2")
        assert not any(line.startswith(injected_tag) for line in lines), lines
        assert token_count(world) == 0
        wire.send(b"s3 LOGIN " + user.encode() + b" " + PASSWORD.encode() + b"\r\n")
        lines = expect_tagged_ok(wire, b"s3")
        assert not any(line.startswith(injected_tag) for line in lines), lines
    assert token_count(world) == 1
    assert [c.user for c in world.idp.check_log] == [user]
    log = proxy.log()
    assert f"s3 LOGIN {user}" in log  # the log does record client LOGIN commands...
    assert injected_tag.decode() not in log and injected_user not in log  # ...but never saw the injected one


# ------------------------------------------------------------------------------------------------ IMAP errors


def test_imap_wrong_password_with_cached_tokens(world: World, proxy: Proxy) -> None:
    user = world.new_user()
    with imap_login(proxy.ports[IMAP], user, "the-first-password") as imap:
        assert imap.state == "AUTH"
    assert token_count(world) == 1
    with Wire(proxy.ports[IMAP]) as wire:
        imap_greeting(wire)
        wire.send(b"W1 LOGIN " + user.encode() + b" another-password\r\n")
        assert wire.until_tagged(b"W1")[-1] == f"W1 NO LOGIN {wrong_password_text(user)}\r\n".encode()
        wire.send(b"W2 LOGIN " + user.encode() + b" the-first-password\r\n")  # same session, right password
        expect_tagged_ok(wire, b"W2")
    assert token_count(world) == 1
    assert [c.user for c in world.idp.check_log] == [user, user]


# ------------------------------------------------------------------------------------------------ POP3


def pop_greeting(wire: Wire) -> None:
    greeting = wire.line()
    assert greeting.startswith(b"+OK"), greeting


def test_pop_user_pass_stat_list_retr(world: World, proxy: Proxy) -> None:
    user = world.new_user()
    body = "first line\r\n.leading dot\r\n..two dots\r\n.\r\nlast"
    world.dovecot.deliver(user, world.dovecot.make_message("a@example.com", user, "pop", body))
    [stored] = world.dovecot.messages(user)
    expected = crlf(stored)  # what RETR must carry after dot-unstuffing
    assert b"\n.leading dot" in stored and b"\n..two dots" in stored
    pop = poplib.POP3("127.0.0.1", proxy.ports[POP], timeout=TIMEOUT)
    try:
        assert pop.getwelcome().startswith(b"+OK")
        assert pop.user(user).startswith(b"+OK")
        assert pop.pass_(PASSWORD).startswith(b"+OK")
        assert pop.stat() == (1, len(expected))
        response, listing, _ = pop.list()
        assert response.startswith(b"+OK") and listing == [b"1 %d" % len(expected)]
        response, lines, octets = pop.retr(1)
        assert response.startswith(b"+OK")
        # poplib strips each line's CRLF and removes the stuffed leading dot; rebuild the byte stream
        assert b"\r\n".join(lines) + b"\r\n" == expected
        assert octets == len(expected)
    finally:
        assert pop.quit().startswith(b"+OK")
    assert token_count(world) == 1
    assert [(c.user, c.service) for c in world.idp.check_log] == [(user, "pop3")]


def test_pop_upstream_stls(world: World, proxy: Proxy) -> None:
    user = world.new_user()
    world.dovecot.deliver(user, world.dovecot.make_message("a@example.com", user, "stls", "via stls"))
    [stored] = world.dovecot.messages(user)
    pop = poplib.POP3("127.0.0.1", proxy.ports[POP_UPSTREAM_STLS], timeout=TIMEOUT)
    try:
        pop.user(user)
        assert pop.pass_(PASSWORD).startswith(b"+OK")
        assert pop.stat() == (1, len(crlf(stored)))
        _, lines, _ = pop.retr(1)
        assert b"\r\n".join(lines) + b"\r\n" == crlf(stored)
    finally:
        pop.quit()
    assert [(c.user, c.service, c.ok) for c in world.idp.check_log] == [(user, "pop3", True)]


def test_pop_auth_plain_inline_two_step_and_cancel(world: World, proxy: Proxy) -> None:
    user = world.new_user()
    world.dovecot.deliver(user, world.dovecot.make_message("a@example.com", user, "auth", "plain"))
    size = len(crlf(world.dovecot.messages(user)[0]))
    with Wire(proxy.ports[POP]) as wire:  # inline initial response
        pop_greeting(wire)
        wire.send(b"AUTH PLAIN " + plain(user, PASSWORD) + b"\r\n")
        assert wire.line().startswith(b"+OK")
        wire.send(b"STAT\r\n")
        assert wire.line() == b"+OK 1 %d\r\n" % size
        wire.send(b"QUIT\r\n")
        assert wire.line().startswith(b"+OK")
    assert token_count(world) == 1
    with Wire(proxy.ports[POP]) as wire:  # cancel, then the two-step form on the same connection
        pop_greeting(wire)
        wire.send(b"AUTH PLAIN\r\n")
        assert wire.line().startswith(b"+")
        wire.send(b"*\r\n")
        assert wire.line().startswith(b"-ERR")
        wire.send(b"AUTH PLAIN\r\n")
        assert wire.line().startswith(b"+ ")
        wire.send(plain(user, PASSWORD) + b"\r\n")
        assert wire.line().startswith(b"+OK")
        wire.send(b"STAT\r\n")
        assert wire.line() == b"+OK 1 %d\r\n" % size
    assert token_count(world) == 1  # both used the cached token
    other = world.new_user()
    with Wire(proxy.ports[POP]) as wire:  # cancel, then USER/PASS
        pop_greeting(wire)
        wire.send(b"AUTH PLAIN\r\n")
        assert wire.line().startswith(b"+")
        wire.send(b"*\r\n")
        assert wire.line().startswith(b"-ERR")
        wire.send(b"USER " + other.encode() + b"\r\n")
        assert wire.line().startswith(b"+OK")
        wire.send(b"PASS " + PASSWORD.encode() + b"\r\n")
        assert wire.line().startswith(b"+OK")
        wire.send(b"STAT\r\n")
        assert wire.line() == b"+OK 0 0\r\n"
    assert token_count(world) == 2
    assert [c.user for c in world.idp.check_log if c.ok] == [user, user, other]


@pytest.mark.parametrize("listener", [POP, POP_UPSTREAM_STLS])
def test_pop_auth_list_and_capa(world: World, proxy: Proxy, listener: str) -> None:
    with Wire(proxy.ports[listener]) as wire:
        pop_greeting(wire)
        wire.send(b"AUTH\r\n")
        assert wire.line().startswith(b"+OK")
        assert wire.until_dot() == [b"PLAIN\r\n"]
        wire.send(b"CAPA\r\n")
        assert wire.line().startswith(b"+OK")
        capabilities = [line.rstrip(b"\r\n").upper() for line in wire.until_dot()]
        assert b"SASL PLAIN" in capabilities
        assert b"USER" in capabilities
        assert not any(c.startswith(b"STLS") for c in capabilities), capabilities
        assert [c for c in capabilities if c.startswith(b"SASL")] == [b"SASL PLAIN"]
        user = world.new_user()
        wire.send(b"USER " + user.encode() + b"\r\nPASS " + PASSWORD.encode() + b"\r\n")
        assert wire.line().startswith(b"+OK")
        assert wire.line().startswith(b"+OK")
    assert token_count(world) == 1


def test_pop_local_stls(world: World, proxy: Proxy) -> None:
    user = world.new_user()
    world.dovecot.deliver(user, world.dovecot.make_message("a@example.com", user, "local stls", "hello"))
    pop = poplib.POP3("127.0.0.1", proxy.ports[POP_STARTTLS], timeout=TIMEOUT)
    try:
        capabilities = pop.capa()
        assert "STLS" in capabilities and capabilities.get("SASL") == ["PLAIN"]
        assert pop.stls(client_context(world)).startswith(b"+OK")
        assert isinstance(pop.sock, ssl.SSLSocket)
        assert "STLS" not in pop.capa()  # not offered twice
        pop.user(user)
        assert pop.pass_(PASSWORD).startswith(b"+OK")
        assert pop.stat()[0] == 1
    finally:
        pop.quit()
    assert token_count(world) == 1


def test_pop_wrong_password_with_cached_tokens(world: World, proxy: Proxy) -> None:
    user = world.new_user()
    pop = poplib.POP3("127.0.0.1", proxy.ports[POP], timeout=TIMEOUT)
    try:
        pop.user(user)
        assert pop.pass_("the-first-password").startswith(b"+OK")
    finally:
        pop.quit()
    assert token_count(world) == 1
    with Wire(proxy.ports[POP]) as wire:
        pop_greeting(wire)
        wire.send(b"USER " + user.encode() + b"\r\n")
        assert wire.line().startswith(b"+OK")
        wire.send(b"PASS another-password\r\n")
        assert wire.line() == f"-ERR Authentication failed. {wrong_password_text(user)}\r\n".encode()
        wire.send(b"USER " + user.encode() + b"\r\nPASS the-first-password\r\n")  # retry on the same session
        assert wire.line().startswith(b"+OK")
        assert wire.line().startswith(b"+OK")
        wire.send(b"STAT\r\n")
        assert wire.line() == b"+OK 0 0\r\n"
    assert token_count(world) == 1
    assert [c.user for c in world.idp.check_log] == [user, user]


def test_proxy_log_holds_no_passwords(world: World, proxy: Proxy) -> None:
    user = world.new_user()
    secret = f"secret-{uuid.uuid4().hex}"
    with imap_login(proxy.ports[IMAP], user, secret):
        pass
    pop = poplib.POP3("127.0.0.1", proxy.ports[POP], timeout=TIMEOUT)
    try:
        pop.user(user)
        pop.pass_(secret)
    finally:
        pop.quit()
    deadline = time.monotonic() + TIMEOUT
    while user not in proxy.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = proxy.log()
    assert user in log
    assert secret not in log
    assert base64.b64encode(secret.encode()).decode()[:16] not in log
    assert CLIENT_SECRET not in log
    assert all(t.access_token not in log for t in world.idp.issued)
