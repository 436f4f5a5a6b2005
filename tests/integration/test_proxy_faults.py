"""Fault injection with the real servers: a slow identity provider, upstream certificates that are expired or
for another name, an upstream that resets mid-session, and 1,000 clients that leave at random moments.

Faults the world cannot produce come from small servers written here: a TLS "trap" presenting a bad (but
CA-issued) certificate that records what reaches it, and a TCP forwarder in front of Dovecot that can reset
the proxy's upstream connection after a chosen number of bytes. The world's own servers are never stopped.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import imaplib
import os
import poplib
import random
import select
import smtplib
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives import serialization

from emailproxy import cli
from emailproxy.config import ConfigError, load_config
from emailproxy.configwrite import ConfigFileStore
from emailproxy.oauth.endpoint import TokenEndpoint
from emailproxy.oauth.tokens import TokenManager
from emailproxy.server import ProxyServer
from tests.integration.conftest import World
from tests.integration.proxy import (
    FAILURE_PREFIX,
    Proxy,
    allocate_ports,
    assert_no_traceback,
    launch,
    mail_sections,
    refused_login,
    render_config,
    section_lines,
    wait_for,
)
from tests.integration.rawsockets import (
    READ_TIMEOUT,
    ThreadedServer,
    connect,
    read_line,
    read_until_closed,
    send_quietly,
)
from tests.integration.world.ca import issue_server_certificate, new_authority, write_pem

CLIENT_ID = "faults-client"
CLIENT_SECRET = "faults-client-secret-P3v9"
PASSWORD = "local-password-f4ults"
PREFIX = b"Email OAuth 2.0 Proxy: "



# ------------------------------------------------------------------------------------------ helpers


def account_section(world: World, flow: str, client_id: str = CLIENT_ID) -> dict[str, str]:
    scope = "https://outlook.office365.com/" + (
        ".default" if flow == "client_credentials" else "IMAP.AccessAsUser.All offline_access"
    )
    return {
        "token_url": world.idp.token_url(),
        "oauth2_scope": scope,
        "oauth2_flow": flow,
        "client_id": client_id,
        "client_secret": CLIENT_SECRET,
    }


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = bytearray()
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def imap_session(port: int, user: str) -> None:
    with imaplib.IMAP4("127.0.0.1", port, timeout=READ_TIMEOUT) as imap:
        assert imap.login(user, PASSWORD)[0] == "OK"
        assert imap.select("INBOX")[0] == "OK"


def pop_session(port: int, user: str) -> None:
    pop = poplib.POP3("127.0.0.1", port, timeout=READ_TIMEOUT)
    try:
        pop.user(user)
        assert pop.pass_(PASSWORD).startswith(b"+OK")
        pop.stat()
    finally:
        pop.quit()


def smtp_session(port: int, user: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=READ_TIMEOUT) as smtp:
        smtp.ehlo("client.example.com")
        smtp.user, smtp.password = user, PASSWORD
        assert smtp.auth("PLAIN", smtp.auth_plain)[0] == 235
        assert smtp.noop()[0] == 250


SESSIONS: dict[str, Callable[[int, str], None]] = {
    "IMAP": imap_session,
    "POP": pop_session,
    "SMTP": smtp_session,
}


# ------------------------------------------------------------------------------------------ 1. slow IdP


def test_token_request_timeout_is_validated(tmp_path: Path) -> None:
    base = "[IMAP-11993]\nserver_address = 127.0.0.1\nserver_port = 993\n[emailproxy]\n"
    path = tmp_path / "emailproxy.config"
    path.write_text(base)
    assert load_config(path).options.token_request_timeout == 30.0
    path.write_text(base + "token_request_timeout = 2.5\n")
    assert load_config(path).options.token_request_timeout == 2.5
    for bad in ("0", "-1", "soon", "nan", "inf", "10 ; seconds"):
        path.write_text(base + f"token_request_timeout = {bad}\n")
        with pytest.raises(ConfigError) as error:
            load_config(path)
        message = str(error.value)
        assert "[emailproxy]" in message and "'token_request_timeout'" in message, message
        assert "above 0" in message and "token_request_timeout = 30" in message, message
    # the real program stops with the same explanation and exit status 2
    path.write_text(base + "token_request_timeout = 0\n")
    result = subprocess.run(
        [sys.executable, "-m", "emailproxy", "--config-file", str(path), "--no-gui"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "token_request_timeout" in result.stderr and "above 0" in result.stderr, result.stderr


def test_a_reload_applies_a_new_token_request_timeout(tmp_path: Path) -> None:
    path = tmp_path / "emailproxy.config"
    path.write_text("[IMAP-11993]\nserver_address = 127.0.0.1\nserver_port = 993\n")
    endpoint = TokenEndpoint(timeout=load_config(path).options.token_request_timeout)
    seen: list[str] = []

    class Part:  # stands in for the proxy, the token manager and the broker
        def update_config(self, config: object) -> None:
            seen.append("tokens")

        async def apply(self, config: object) -> None:
            seen.append("listeners")

        async def configure(self, config: object) -> None:
            seen.append("broker")

    part = cast(Any, Part())
    apply = cli._reload(part, part, part, endpoint)  # what the reloader calls
    path.write_text(path.read_text() + "[emailproxy]\ntoken_request_timeout = 4.5\n")
    asyncio.run(cast(Any, apply(load_config(path))))
    assert endpoint.timeout == 4.5 and seen == ["tokens", "listeners", "broker"]


def test_identity_provider_slower_than_the_timeout(
    world: World, tmp_path: Path, proxies: list[Proxy]
) -> None:
    """The IdP takes 8 s to answer; with token_request_timeout = 2 the login fails after about 2 s with
    a retryable error naming the time-out, the cached tokens stay, and once the IdP is quick again logins
    work."""
    client_id = "slow-idp-client"  # only this test's: requests still sleeping at the IdP cannot issue later
    world.idp.register_client(client_id, CLIENT_SECRET)
    world.idp.expires_in = 300  # below the proxy's 600 s margin: every later login refreshes
    ports = allocate_ports("IMAP", "POP", "SMTP")
    sections = mail_sections(world, ports)
    sections["emailproxy"] = {"allow_catch_all_accounts": "True", "token_request_timeout": "2"}
    sections[f"@{world.domain}"] = account_section(world, "password", client_id)
    proxy = launch(world.ca_path, tmp_path, sections, ports)
    proxies.append(proxy)
    users = {
        "IMAP": world.new_user("slow-cached"),
        "POP": world.new_user("slow-pop"),
        "SMTP": world.new_user("slow-smtp"),
    }
    for user in users.values():
        world.idp.register_user(user, PASSWORD)
    cached = users["IMAP"]
    imap_session(proxy.ports["IMAP"], cached)
    cached_lines = section_lines(proxy.config_path, cached)
    assert any(line.startswith("refresh_token") for line in cached_lines), proxy.config_path.read_text()
    before = len(world.idp.token_requests())

    delay = 8.0
    world.idp.delay(delay, path="/token")

    def timed_refusal(protocol: str) -> tuple[bytes, float]:
        started = time.monotonic()
        reply = refused_login(protocol, proxy.ports[protocol], users[protocol], PASSWORD, READ_TIMEOUT)
        return reply, time.monotonic() - started

    with ThreadPoolExecutor(3) as pool:  # a refresh (IMAP) and two first logins, at the same time
        results = dict(zip(users, pool.map(timed_refusal, users), strict=True))
    for protocol, (reply, elapsed) in results.items():
        assert reply.startswith(FAILURE_PREFIX[protocol]), (protocol, reply)
        assert b"did not answer within 2 s" in reply, (protocol, reply)
        assert b"retry" in reply, (protocol, reply)
        assert elapsed < delay - 1, f"{protocol}: the login waited {elapsed:.1f} s for the slow IdP"
    asked = world.idp.token_requests()[before:]
    assert sorted(r.grant_type or "" for r in asked) == ["password", "password", "refresh_token"], asked
    assert section_lines(proxy.config_path, cached) == cached_lines  # the cache is kept as it was
    assert proxy.log().count("did not answer within 2 s") >= 3

    world.idp.delay(0)
    for protocol, user in users.items():
        SESSIONS[protocol](proxy.ports[protocol], user)
    after = world.idp.token_requests()[before + 3 :]
    refreshes = [r for r in after if r.grant_type == "refresh_token"]
    assert refreshes and all(r.form.get("refresh_token") for r in refreshes)  # the kept refresh token
    checks = {user: [c.ok for c in world.idp.check_log if c.user == user] for user in users.values()}
    assert all(oks and oks[-1] for oks in checks.values()), checks  # each user's last login worked
    assert_no_traceback(proxy)


BAD_ANSWERS: dict[str, tuple[int, str | dict[str, str]]] = {
    "invalid-json": (200, '{"access_token": "abc", '),
    "non-json-400": (400, "<html><body>Bad Request</body></html>"),
    "invalid-grant": (
        400,
        {"error": "invalid_grant", "error_description": "AADSTS70008: the grant has expired"},
    ),
}


@pytest.mark.parametrize("answer", list(BAD_ANSWERS))
def test_identity_provider_bad_answer_to_a_refresh(
    world: World, tmp_path: Path, proxies: list[Proxy], answer: str
) -> None:
    """The token endpoint answers a refresh with a truncated JSON body, an HTML 400, or invalid_grant.

    The first two are not OAuth answers: the login fails with a retryable error and the cached tokens are
    kept for the next try. invalid_grant says the refresh token is dead: it is discarded and the password
    grant runs again in the same login, so the client does not even notice."""
    client_id = f"bad-answer-{answer}"
    world.idp.register_client(client_id, CLIENT_SECRET)
    previous_lifetime = world.idp.expires_in
    world.idp.expires_in = 300  # below the proxy's 600 s margin: the next login refreshes
    try:
        ports = allocate_ports("IMAP")
        sections = mail_sections(world, ports)
        user = world.new_user("bad-answer")
        world.idp.register_user(user, PASSWORD)
        sections[user] = account_section(world, "password", client_id)
        proxy = launch(world.ca_path, tmp_path, sections, ports)
        proxies.append(proxy)
        imap_session(ports["IMAP"], user)  # the password grant; tokens cached
        cached_lines = section_lines(proxy.config_path, user)
        assert any(line.startswith("refresh_token") for line in cached_lines), cached_lines
        before = len(world.idp.token_requests())

        status, body = BAD_ANSWERS[answer]
        world.idp.fail_with(status, body, count=1, path="/token")
        if answer == "invalid-grant":
            imap_session(ports["IMAP"], user)  # the dead refresh token is replaced at once
            grants = [r.grant_type for r in world.idp.token_requests()[before:]]
            assert grants == ["refresh_token", "password"], grants
            assert "invalid_grant" in proxy.log()
            wait_for(lambda: section_lines(proxy.config_path, user) != cached_lines, "the new tokens saved")
        else:
            reply = refused_login("IMAP", ports["IMAP"], user, PASSWORD, READ_TIMEOUT)
            assert reply.startswith(FAILURE_PREFIX["IMAP"]), reply
            assert f"Login failed for account {user}".encode() in reply, reply
            assert [r.grant_type for r in world.idp.token_requests()[before:]] == ["refresh_token"]
            assert section_lines(proxy.config_path, user) == cached_lines  # nothing discarded
            imap_session(ports["IMAP"], user)  # the IdP is well again: the kept refresh token works
            refresh = world.idp.token_requests()[before + 1 :]
            assert [r.grant_type for r in refresh] == ["refresh_token"], refresh
        assert_no_traceback(proxy)
    finally:
        world.idp.expires_in = previous_lifetime


# ------------------------------------------------------------------------------------------ 2. certificates


@dataclass(frozen=True)
class Leaf:
    cert_path: Path
    key_path: Path

    def context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_path, self.key_path)
        return context


@dataclass(frozen=True)
class FaultCertificates:
    bundle: Path  # the world's CA and ours: what the proxy trusts
    expired: Leaf  # for 127.0.0.1 and localhost, expired yesterday
    other_name: Leaf  # valid now, but for mail.other.example only


@pytest.fixture(scope="module")
def fault_certs(world: World, tmp_path_factory: pytest.TempPathFactory) -> FaultCertificates:
    """A second test CA, trusted by the proxy next to the world's, and two leaves with one fault each."""
    directory = tmp_path_factory.mktemp("fault-certs")
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    ca_key, ca_cert = new_authority("emailproxy fault-injection CA", now - 30 * day, now + 30 * day)

    def leaf(name: str, hosts: list[str], start: datetime.datetime, end: datetime.datetime) -> Leaf:
        key, cert = issue_server_certificate(ca_key, ca_cert, hosts, start, end)
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
        write_pem(cert, key, cert_path, key_path)
        return Leaf(cert_path, key_path)

    expired = leaf("expired", ["127.0.0.1", "localhost"], now - 10 * day, now - day)
    other = leaf("other-name", ["mail.other.example"], now - datetime.timedelta(hours=1), now + 10 * day)
    bundle = directory / "trusted.pem"
    bundle.write_bytes(world.ca_path.read_bytes() + ca_cert.public_bytes(serialization.Encoding.PEM))
    return FaultCertificates(bundle, expired, other)


@dataclass
class TrapConnection:
    handshake: str = ""  # "ok", or the server-side TLS error
    before_tls: bytearray = field(default_factory=bytearray)  # plaintext received before STARTTLS
    after_tls: bytearray = field(default_factory=bytearray)  # bytes received over TLS


class TlsTrap(ThreadedServer):
    """An upstream IMAP (implicit TLS) or SMTP (STARTTLS) server presenting ``context``'s certificate; records
    what each connection sent before and after the TLS handshake."""

    def __init__(self, context: ssl.SSLContext, starttls: bool) -> None:
        self.context = context
        self.starttls = starttls
        self.connections: list[TrapConnection] = []
        super().__init__()

    def accepted(self, number: int) -> None:
        with self._lock:
            self.connections.append(TrapConnection())

    def _smtp_plaintext(self, conn: socket.socket, record: TrapConnection) -> bool:
        """Greet, answer EHLO with STARTTLS offered; True once STARTTLS was asked for and accepted."""
        conn.sendall(b"220 trap.example ESMTP\r\n")
        pending = b""
        while True:
            chunk = conn.recv(4096)
            if not chunk:
                return False
            record.before_tls += chunk
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                verb = line.strip().split(b" ", 1)[0].upper()
                if verb in (b"EHLO", b"HELO"):
                    conn.sendall(b"250-trap.example\r\n250-STARTTLS\r\n250 AUTH PLAIN XOAUTH2\r\n")
                elif verb == b"STARTTLS":
                    conn.sendall(b"220 2.0.0 Ready to start TLS\r\n")
                    return True
                else:
                    conn.sendall(b"530 5.7.0 Must issue a STARTTLS command first\r\n")

    def handle(self, conn: socket.socket, number: int) -> None:
        with self._lock:
            record = self.connections[number - 1]
        conn.settimeout(READ_TIMEOUT)
        sock: socket.socket = conn
        try:
            if self.starttls and not self._smtp_plaintext(conn, record):
                record.handshake = "never started"  # the proxy left first (e.g. its client did)
                return
            sock = tls = self.context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            try:
                tls.do_handshake()
            except (ssl.SSLError, OSError) as error:
                record.handshake = str(error) or type(error).__name__
                return
            record.handshake = "ok"
            tls.sendall(b"220 trap.example ESMTP\r\n" if self.starttls else b"* OK trap ready\r\n")
            while chunk := tls.recv(4096):
                record.after_tls += chunk
        except (ssl.SSLError, OSError) as error:
            record.handshake = record.handshake or f"connection failed: {error}"
        finally:
            sock.close()


CERT_FAULTS = {
    # fault: (leaf attribute, server_address, what the proxy's log and the client's error must say)
    "expired": ("expired", "127.0.0.1", b"certificate has expired"),
    "other-name": ("other_name", "localhost", b"Hostname mismatch, certificate is not valid for 'localhost'"),
}


@pytest.mark.parametrize("protocol", ["IMAP", "SMTP"])
@pytest.mark.parametrize("fault", list(CERT_FAULTS))
def test_upstream_certificate_fault(
    world: World,
    tmp_path: Path,
    proxies: list[Proxy],
    fault_certs: FaultCertificates,
    fault: str,
    protocol: str,
) -> None:
    """IMAP with implicit TLS, SMTP with STARTTLS, to a server whose CA-issued certificate is expired or for
    another name: the client gets its protocol's error naming the reason, nothing reaches the server."""
    attribute, address, reason = CERT_FAULTS[fault]
    leaf: Leaf = getattr(fault_certs, attribute)
    trap = TlsTrap(leaf.context(), starttls=protocol == "SMTP")
    try:
        world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
        ports = allocate_ports(protocol)
        server = {"server_address": address, "server_port": str(trap.port)}
        if protocol == "SMTP":
            server["server_starttls"] = "True"
        sections = {
            f"{protocol}-{ports[protocol]}": server,
            "emailproxy": {"allow_catch_all_accounts": "True"},
            f"@{world.domain}": account_section(world, "client_credentials"),
        }
        proxy = launch(fault_certs.bundle, tmp_path, sections, ports)
        proxies.append(proxy)
        user = world.new_user()
        plain = base64.b64encode(b"\0" + user.encode() + b"\0" + PASSWORD.encode())
        command = (
            b"a LOGIN " + user.encode() + b" " + PASSWORD.encode() + b"\r\n"
            if protocol == "IMAP"
            else b"EHLO client\r\nAUTH PLAIN " + plain + b"\r\n"
        )
        with connect(ports[protocol]) as sock:
            send_quietly(sock, command)  # at once: the proxy must not act on it
            data, closed = read_until_closed(sock)
        deadline = time.monotonic() + 10
        while any(not c.handshake for c in trap.connections) and time.monotonic() < deadline:
            time.sleep(0.02)
        records = list(trap.connections)
    finally:
        trap.close()
    assert closed, data
    assert data.startswith(b"* BYE " + PREFIX if protocol == "IMAP" else b"421 "), data
    assert PREFIX in data and reason in data, data
    assert data.endswith(b"\r\n") and data.count(b"\r\n") == 1, data
    assert reason.decode() in proxy.log(), proxy.log()
    # the server side: every handshake failed, and nothing was received over TLS
    assert any(r.handshake not in ("", "ok", "never started") for r in records), records
    for record in records:
        assert record.handshake and record.handshake != "ok", record
        assert record.after_tls == b"", record
        if protocol == "SMTP":  # in clear only EHLO and STARTTLS, as RFC 3207 has it
            verbs = [line.split()[0].upper() for line in record.before_tls.splitlines() if line.strip()]
            assert verbs == [b"EHLO", b"STARTTLS"][: len(verbs)], record  # (less if the proxy left first)
        assert PASSWORD.encode() not in bytes(record.before_tls), record
    assert world.idp.token_requests() == []  # no token was even asked for
    assert_no_traceback(proxy)


# ------------------------------------------------------------------------------------------ 3. upstream reset


class Forwarder(ThreadedServer):
    """A TCP forwarder from 127.0.0.1 to ``target``, between the proxy and Dovecot (TLS passes through
    untouched). ``cut(after)`` lets ``after`` more bytes flow from the server to the proxy on every open
    connection, then resets the proxy's side (RST) and closes the server's."""

    JOIN_HANDLERS = True

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._budgets: dict[int, int | None] = {}  # connection number -> server bytes still allowed
        self.cuts = 0
        super().__init__()

    def accepted(self, number: int) -> None:
        with self._lock:
            self._budgets[number] = None

    def cut(self, after: int = 0) -> None:
        with self._lock:
            for number in self._budgets:
                self._budgets[number] = after

    def handle(self, near: socket.socket, number: int) -> None:
        try:
            far = socket.create_connection(self.target, timeout=READ_TIMEOUT)
        except OSError:
            near.close()
            return
        reset = False
        try:
            while not self._stop.is_set():
                with self._lock:
                    budget = self._budgets[number]
                if budget == 0:
                    reset = True
                    return
                readable, _, _ = select.select([near, far], [], [], 0.02)
                if near in readable:
                    data = near.recv(65536)
                    if not data:
                        return
                    far.sendall(data)
                if far in readable:
                    data = far.recv(min(65536, budget) if budget is not None else 65536)
                    if not data:
                        return
                    near.sendall(data)
                    if budget is not None:
                        with self._lock:
                            self._budgets[number] = budget - len(data)
        except OSError:
            return
        finally:
            if reset:
                near.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                with self._lock:
                    self.cuts += 1
            near.close()
            far.close()
            with self._lock:
                self._budgets.pop(number, None)



def tagged_command(sock: socket.socket, tag: bytes, command: bytes) -> bytes:
    """Send an IMAP command; return every line up to and including its tagged completion."""
    sock.sendall(tag + b" " + command + b"\r\n")
    reply = b""
    while True:
        line = read_line(sock)
        reply += line
        if not line or line.startswith(tag + b" "):
            return reply


@pytest.mark.parametrize("moment", ["IDLE", "FETCH"])
def test_upstream_reset_mid_session(world: World, tmp_path: Path, proxies: list[Proxy], moment: str) -> None:
    """After login, during IDLE or half-way through a 1 MB FETCH, the connection to the server is reset: the
    client's connection is closed (not left hanging) and the proxy goes on serving new sessions."""
    world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
    d = world.dovecot.ports
    forwarder = Forwarder((d.host, d.imaps))
    try:
        ports = allocate_ports("IMAP")
        sections = {
            f"IMAP-{ports['IMAP']}": {"server_address": "127.0.0.1", "server_port": str(forwarder.port)},
            "emailproxy": {"allow_catch_all_accounts": "True"},
            f"@{world.domain}": account_section(world, "client_credentials"),
        }
        proxy = launch(world.ca_path, tmp_path, sections, ports)
        proxies.append(proxy)
        user = world.new_user("reset")
        body = ("0123456789abcdef" * 4 + "\r\n") * 15_000  # about 1 MB
        world.dovecot.deliver(user, world.dovecot.make_message("a@example.com", user, "big", body))
        with connect(ports["IMAP"]) as sock:
            assert read_line(sock).startswith(b"* OK")
            assert b"a OK" in tagged_command(sock, b"a", f"LOGIN {user} {PASSWORD}".encode())
            assert b"b OK" in tagged_command(sock, b"b", b"SELECT INBOX")
            if moment == "IDLE":
                sock.sendall(b"c IDLE\r\n")
                assert read_line(sock).startswith(b"+")
                forwarder.cut(0)
            else:
                forwarder.cut(64 * 1024)  # some of the literal gets through, then the reset
                sock.sendall(b"c FETCH 1 BODY[]\r\n")
            data, closed = read_until_closed(sock)
        assert closed, f"the client was left hanging after the upstream reset ({len(data)} bytes)"
        assert forwarder.cuts >= 1
        if moment == "FETCH":
            assert data.startswith(b"* 1 FETCH (") and b"BODY[] {" in data[:100], data[:100]
            assert 0 < len(data) < len(body), len(data)  # cut off half-way
        assert b"c OK" not in data
        assert proxy.process is not None and proxy.process.poll() is None
        # the proxy goes on: a new session (through the same forwarder) works
        imap_session(ports["IMAP"], user)
        checks = [c for c in world.idp.check_log if c.user == user]
        assert len(checks) == 2 and all(c.ok for c in checks), checks
    finally:
        forwarder.close()
    assert_no_traceback(proxy)


# ------------------------------------------------------------------------------------------ 6. 1,000 clients

STORM_CONNECTIONS = 1000
STORM_CONCURRENCY = 48


def client_hello() -> bytes:
    """The first flight of a real TLS client (a ClientHello), to send only part of."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def open_fds() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/fd"))


class Client:
    """One storm client: asyncio streams, a random way of leaving (FIN or RST); ``tls`` trusts the
    world's CA, for a client that completes a local TLS handshake."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        rng: random.Random,
        tls: ssl.SSLContext | None,
    ) -> None:
        self.reader, self.writer, self.rng, self.tls = reader, writer, rng, tls

    @classmethod
    async def open(cls, port: int, rng: random.Random, tls: ssl.SSLContext | None = None) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, rng, tls)

    async def line(self) -> bytes:
        return await asyncio.wait_for(self.reader.readline(), READ_TIMEOUT)

    async def until(self, prefix: bytes) -> bytes:
        """Lines until one starts with ``prefix``; fails on EOF."""
        while True:
            line = await self.line()
            assert line, f"closed while waiting for {prefix!r}"
            if line.startswith(prefix):
                return line

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def leave(self) -> None:
        """Close with a FIN, or (half the time) abort with a RST."""
        sock = self.writer.get_extra_info("socket")
        if self.rng.random() < 0.5 and sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


def plain_b64(user: str) -> bytes:
    return base64.b64encode(b"\0" + user.encode() + b"\0" + PASSWORD.encode())


async def imap_login(client: Client, user: str) -> None:
    await client.line()
    await client.send(f"a LOGIN {user} {PASSWORD}\r\n".encode())
    assert (await client.until(b"a ")).startswith(b"a OK")


async def pop_login(client: Client, user: str) -> None:
    await client.line()
    await client.send(f"USER {user}\r\n".encode())
    await client.line()
    await client.send(f"PASS {PASSWORD}\r\n".encode())
    assert (await client.line()).startswith(b"+OK")


async def smtp_reply(client: Client) -> bytes:
    line = await client.line()
    while line[3:4] == b"-":
        line = await client.line()
    return line


async def smtp_login(client: Client, user: str) -> None:
    await smtp_reply(client)
    await client.send(b"EHLO storm.example\r\n")
    await smtp_reply(client)
    await client.send(b"AUTH PLAIN " + plain_b64(user) + b"\r\n")
    assert (await smtp_reply(client)).startswith(b"235")


Scenario = Callable[[Client, str], Awaitable[None]]


async def before_greeting(client: Client, user: str) -> None:
    pass


async def after_greeting(client: Client, user: str) -> None:
    await client.line()


async def imap_mid_line(client: Client, user: str) -> None:
    await client.line()
    await client.send(b"a LOGIN " + user.encode()[: client.rng.randrange(1, len(user))])


async def imap_mid_literal(client: Client, user: str) -> None:
    await client.line()
    await client.send(f"a LOGIN {{{len(user)}}}\r\n".encode())
    assert (await client.line()).startswith(b"+")
    await client.send(user.encode()[: client.rng.randrange(1, len(user))])


async def imap_login_sent(client: Client, user: str) -> None:
    await client.line()
    await client.send(f"a LOGIN {user} {PASSWORD}\r\n".encode())
    await asyncio.sleep(client.rng.uniform(0, 0.03))  # somewhere in the token or upstream login


async def imap_relay(client: Client, user: str) -> None:
    await imap_login(client, user)
    await client.send(b"b SELECT INBOX\r\n")
    if client.rng.random() < 0.5:
        await client.until(b"b ")


async def imap_idle(client: Client, user: str) -> None:
    await imap_login(client, user)
    await client.send(b"b SELECT INBOX\r\n")
    await client.until(b"b OK")
    await client.send(b"c IDLE\r\n")
    await client.until(b"+")


async def imap_local_starttls_handshake(client: Client, user: str) -> None:
    await client.line()
    await client.send(b"a STARTTLS\r\n")
    assert (await client.until(b"a ")).startswith(b"a OK")
    hello = client_hello()
    await client.send(hello[: client.rng.randrange(1, len(hello))])


async def imap_local_starttls_done(client: Client, user: str) -> None:
    await client.line()
    await client.send(b"a STARTTLS\r\n")
    await client.until(b"a OK")
    assert client.tls is not None
    await client.writer.start_tls(client.tls, server_hostname="127.0.0.1")
    if client.rng.random() < 0.5:
        await client.send(b"b CAPABILITY\r\n")


async def implicit_tls_handshake(client: Client, user: str) -> None:
    hello = client_hello()
    await client.send(hello[: client.rng.randrange(1, len(hello))])


async def pop_mid_line(client: Client, user: str) -> None:
    await client.line()
    await client.send(f"USER {user}\r\nPA".encode())


async def pop_pass_sent(client: Client, user: str) -> None:
    await client.line()
    await client.send(f"USER {user}\r\nPASS {PASSWORD}\r\n".encode())
    await asyncio.sleep(client.rng.uniform(0, 0.03))


async def pop_relay(client: Client, user: str) -> None:
    await pop_login(client, user)
    await client.send(b"STAT\r\n")


async def smtp_mid_line(client: Client, user: str) -> None:
    await smtp_reply(client)
    await client.send(b"EHLO sto")


async def smtp_mid_sasl(client: Client, user: str) -> None:
    await smtp_reply(client)
    await client.send(b"EHLO storm.example\r\n")
    await smtp_reply(client)
    await client.send(b"AUTH PLAIN\r\n")
    assert (await smtp_reply(client)).startswith(b"334")


async def smtp_auth_sent(client: Client, user: str) -> None:
    await smtp_reply(client)
    await client.send(b"EHLO storm.example\r\nAUTH PLAIN " + plain_b64(user) + b"\r\n")
    await asyncio.sleep(client.rng.uniform(0, 0.03))


async def smtp_relay(client: Client, user: str) -> None:
    await smtp_login(client, user)
    await client.send(b"MAIL FROM:<" + user.encode() + b">\r\n")


# (listener, scenario, weight): about a third of the connections log in upstream
STORM_SCENARIOS: list[tuple[str, Scenario, int]] = [
    ("IMAP", before_greeting, 6),
    ("IMAP", after_greeting, 4),
    ("IMAP", imap_mid_line, 6),
    ("IMAP", imap_mid_literal, 6),
    ("IMAP", imap_login_sent, 8),
    ("IMAP", imap_relay, 8),
    ("IMAP", imap_idle, 4),
    ("IMAPSTARTTLS", imap_local_starttls_handshake, 6),
    ("IMAPSTARTTLS", imap_local_starttls_done, 4),
    ("IMAPTLS", implicit_tls_handshake, 6),
    ("POP", before_greeting, 4),
    ("POP", pop_mid_line, 4),
    ("POP", pop_pass_sent, 5),
    ("POP", pop_relay, 5),
    ("SMTP", before_greeting, 4),
    ("SMTP", smtp_mid_line, 4),
    ("SMTP", smtp_mid_sasl, 4),
    ("SMTP", smtp_auth_sent, 5),
    ("SMTP", smtp_relay, 5),
]
FULL_LOGINS: dict[str, Callable[[Client, str], Awaitable[None]]] = {
    "IMAP": imap_login,
    "POP": pop_login,
    "SMTP": smtp_login,
}


def storm_config(world: World, ports: dict[str, int]) -> str:
    sections = mail_sections(world, ports)
    d = world.dovecot.ports
    tls = {"local_certificate_path": str(world.certs.cert_path), "local_key_path": str(world.certs.key_path)}
    sections[f"IMAP-{ports['IMAPSTARTTLS']}"] = {
        "server_address": d.host,
        "server_port": str(d.imaps),
        "local_starttls": "True",
        **tls,
    }
    sections[f"IMAP-{ports['IMAPTLS']}"] = {"server_address": d.host, "server_port": str(d.imaps), **tls}
    sections["emailproxy"] = {"allow_catch_all_accounts": "True"}
    sections[f"@{world.domain}"] = account_section(world, "client_credentials")
    return render_config(sections)


async def settle(
    proxy: ProxyServer, baseline: tuple[int, int, int], timeout: float = 30.0
) -> tuple[int, int, int]:
    """Poll (open fds, asyncio tasks, live proxy connections) until back at ``baseline`` or out of time."""
    deadline = time.monotonic() + timeout
    while True:
        now = (open_fds(), len(asyncio.all_tasks()), len(proxy.connections))
        if now == baseline or time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.05)


def test_a_thousand_clients_leaving_at_random_points(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1,000 connections over IMAP (plain, local STARTTLS, local TLS), POP and SMTP leave at random points;
    afterwards the proxy (run in this process) holds no more file descriptors or asyncio tasks than before,
    and serves new sessions."""
    world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
    monkeypatch.setenv("SSL_CERT_FILE", str(world.ca_path))  # the token endpoint's CA (read per request)
    client_tls = ssl.create_default_context(cafile=str(world.ca_path))
    ports = allocate_ports("IMAP", "IMAPSTARTTLS", "IMAPTLS", "POP", "SMTP")
    path = tmp_path / "emailproxy.config"
    path.write_text(storm_config(world, ports))
    config = load_config(path)
    users = [world.new_user("storm") for _ in range(3)]
    rng = random.Random(1000)
    plan = rng.choices(STORM_SCENARIOS, weights=[w for _, _, w in STORM_SCENARIOS], k=STORM_CONNECTIONS)
    errors: list[str] = []
    figures: dict[str, tuple[int, int, int]] = {}

    async def one(index: int, listener: str, scenario: Scenario, limit: asyncio.Semaphore) -> None:
        async with limit:
            client_rng = random.Random(index)
            try:
                client = await Client.open(ports[listener], client_rng, client_tls)
            except OSError as error:
                errors.append(f"{index} {listener} {scenario.__name__}: connect: {error}")
                return
            try:
                await scenario(client, users[index % len(users)])
            except (AssertionError, OSError, TimeoutError, ssl.SSLError) as error:
                errors.append(f"{index} {listener} {scenario.__name__}: {type(error).__name__} {error}")
            finally:
                await client.leave()

    async def storm() -> None:
        endpoint = TokenEndpoint(timeout=10)
        proxy = ProxyServer(config, TokenManager(config, ConfigFileStore(path), endpoint))
        proxy.upstream_tls = ssl.create_default_context(cafile=str(world.ca_path))
        await proxy.start()
        try:
            for user in users:  # warm up: keys derived, tokens cached, every code path loaded once
                for protocol, login in FULL_LOGINS.items():
                    client = await Client.open(ports[protocol], random.Random(0))
                    await login(client, user)
                    await client.leave()
            baseline = await settle(proxy, (-1, -1, 0), timeout=1.0)
            baseline = await settle(proxy, baseline, timeout=5.0)  # the same twice: stable
            figures["baseline"] = baseline
            limit = asyncio.Semaphore(STORM_CONCURRENCY)
            started = time.monotonic()
            await asyncio.gather(*(one(i, lst, sc, limit) for i, (lst, sc, _) in enumerate(plan)))
            figures["seconds"] = (int(time.monotonic() - started), 0, 0)
            figures["right after"] = (open_fds(), len(asyncio.all_tasks()), len(proxy.connections))
            figures["settled"] = await settle(proxy, baseline)
            # and the proxy still serves every protocol
            for protocol, login in FULL_LOGINS.items():
                client = await Client.open(ports[protocol], random.Random(0))
                await login(client, users[0])
                await client.leave()
            figures["after three more"] = await settle(proxy, baseline)
        finally:
            await proxy.stop()
            endpoint.close()

    asyncio.run(storm())
    print(f"\nstorm figures (open fds, asyncio tasks, proxy connections): {figures}; errors: {errors[:20]}")
    # a client step may fail when the loaded mail servers hiccup (e.g. Postfix losing its Dovecot auth
    # connection); the point here is what the proxy holds afterwards, so allow a few, never many
    assert len(errors) <= STORM_CONNECTIONS // 100, errors[:20]
    assert figures["baseline"][2] == 0 and figures["right after"][0] > 0, figures
    assert figures["settled"] == figures["baseline"], figures
    assert figures["after three more"] == figures["baseline"], figures
    checks = [c for c in world.idp.check_log if c.user in users]
    assert checks and all(c.ok for c in checks), [c for c in checks if not c.ok][:5]
