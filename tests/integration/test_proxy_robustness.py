"""Bad input and faults: the proxy answers in the protocol's words, keeps serving and never leaks secrets.

Clients here are raw sockets where the test needs to send what no library would (garbage, over-long
lines, half a literal), and imaplib/poplib/smtplib for normal logins. Faults come from the identity
provider's switches, from ports nobody listens on, from an untrusted certificate store and from tiny
fake servers written below.
"""

from __future__ import annotations

import base64
import imaplib
import os
import poplib
import random
import signal
import smtplib
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import World
from tests.integration.proxy import (
    FAILURE_PREFIX,
    Proxy,
    allocate_ports,
    assert_no_traceback,
    launch,
    mail_sections,
    proxy_env,
    refused_login,
    render_config,
    section_lines,
)
from tests.integration.rawsockets import (
    READ_TIMEOUT,
    ThreadedServer,
    connect,
    read_line,
    read_until_closed,
    send_quietly,
)
from tests.integration.world.ports import free_port

CLIENT_ID = "robust-client"
CLIENT_SECRET = "robust-client-secret-Qx7w2"  # a value distinctive enough to search logs for
PASSWORD = "local-password-r0bust"  # with client credentials the local password only keys the cache
PREFIX = "Email OAuth 2.0 Proxy: "
SYSTEM_CA_FILE = "/etc/ssl/certs/ca-certificates.crt"


# ------------------------------------------------------------------------------------------ helpers


def account_section(world: World, flow: str = "client_credentials") -> dict[str, str]:
    scope = (
        "https://outlook.office365.com/.default"
        if flow == "client_credentials"
        else "https://outlook.office365.com/IMAP.AccessAsUser.All offline_access"
    )
    return {
        "token_url": world.idp.token_url(),
        "oauth2_scope": scope,
        "oauth2_flow": flow,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
    }


def start_standard(
    world: World,
    tmp_path: Path,
    proxies: list[Proxy],
    flow: str = "client_credentials",
    args: list[str] | None = None,
) -> Proxy:
    """A proxy for IMAP, POP and SMTP with a catch-all account for the world's domain."""
    world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
    ports = allocate_ports("IMAP", "POP", "SMTP")
    sections = mail_sections(world, ports)
    sections["emailproxy"] = {"allow_catch_all_accounts": "True"}
    sections[f"@{world.domain}"] = account_section(world, flow)
    proxy = launch(world.ca_path, tmp_path, sections, ports, args=args)
    proxies.append(proxy)
    return proxy


def read_reply(sock: socket.socket, protocol: str) -> bytes:
    """The greeting or reply: one line for IMAP/POP, every line of a multi-line reply for SMTP."""
    line = read_line(sock)
    data = line
    while protocol == "SMTP" and len(line) > 3 and line[3:4] == b"-":
        line = read_line(sock)
        data += line
    return data


def imap_login(port: int, user: str, password: str = PASSWORD) -> None:
    with imaplib.IMAP4("127.0.0.1", port, timeout=READ_TIMEOUT) as imap:
        assert imap.login(user, password)[0] == "OK"
        assert imap.select("INBOX")[0] == "OK"


def pop_login(port: int, user: str, password: str = PASSWORD) -> None:
    pop = poplib.POP3("127.0.0.1", port, timeout=READ_TIMEOUT)
    try:
        pop.user(user)
        assert pop.pass_(password).startswith(b"+OK")
        assert pop.stat() == (0, 0)
    finally:
        pop.quit()


def smtp_login(port: int, user: str, password: str = PASSWORD, mechanism: str = "PLAIN") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=READ_TIMEOUT) as smtp:
        smtp.ehlo("client.example.com")
        smtp.user, smtp.password = user, password
        method = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
        code, _ = smtp.auth(mechanism, method)
        assert code == 235
        assert smtp.noop()[0] == 250


LOGINS: dict[str, Callable[[int, str], None]] = {
    "IMAP": lambda port, user: imap_login(port, user),
    "POP": lambda port, user: pop_login(port, user),
    "SMTP": lambda port, user: smtp_login(port, user),
}
PROTOCOLS = list(LOGINS)


def assert_logged_in_upstream(world: World, user: str) -> None:
    checks = [check for check in world.idp.check_log if check.user == user]
    assert checks and all(check.ok for check in checks), checks


# ------------------------------------------------------------------------------------------ bad input


GREETINGS = {"IMAP": b"* OK", "POP": b"+OK", "SMTP": b"220"}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_garbage_bytes_then_normal_login(
    world: World, tmp_path: Path, proxies: list[Proxy], protocol: str
) -> None:
    proxy = start_standard(world, tmp_path, proxies)
    garbage = random.Random(20240517).randbytes(4096) + b"\r\n"
    with connect(proxy.ports[protocol]) as sock:
        assert read_reply(sock, protocol).startswith(GREETINGS[protocol])
        send_quietly(sock, garbage)
        sock.settimeout(10.0)
        try:
            sock.recv(65536)  # an answer (error replies) or b"" (closed) are both fine
        except ConnectionResetError:
            pass  # closed too
        except TimeoutError:
            pytest.fail(f"{protocol}: no answer and no close within 10 s after 4 KB of garbage")

    user = world.new_user()
    LOGINS[protocol](proxy.ports[protocol], user)
    assert_logged_in_upstream(world, user)
    assert proxy.process is not None and proxy.process.poll() is None
    assert_no_traceback(proxy)


LINE_TOO_LONG = {"IMAP": b"* BYE", "POP": b"-ERR", "SMTP": b"500"}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_over_long_line_before_login(
    world: World, tmp_path: Path, proxies: list[Proxy], protocol: str
) -> None:
    proxy = start_standard(world, tmp_path, proxies)
    with connect(proxy.ports[protocol]) as sock:
        assert read_reply(sock, protocol).startswith(GREETINGS[protocol])
        send_quietly(sock, b"A" * 100 * 1024)
        data, closed = read_until_closed(sock)
    assert closed, f"the proxy kept the connection open after a 100 KB line; got {data!r}"
    assert data.startswith(LINE_TOO_LONG[protocol]), data
    assert b"too long" in data.lower(), data
    user = world.new_user()
    LOGINS[protocol](proxy.ports[protocol], user)
    assert_no_traceback(proxy)


def test_unfinished_imap_login_literal(world: World, tmp_path: Path, proxies: list[Proxy]) -> None:
    proxy = start_standard(world, tmp_path, proxies)
    with connect(proxy.ports["IMAP"]) as sock:
        assert read_reply(sock, "IMAP").startswith(b"* OK")
        sock.sendall(b"a LOGIN {100}\r\n")
        assert read_line(sock).startswith(b"+")
        sock.sendall(b"0123456789")
    # the client is gone half-way through its literal; the proxy must carry on
    user = world.new_user()
    imap_login(proxy.ports["IMAP"], user)
    assert_logged_in_upstream(world, user)
    assert world.idp.token_requests("client_credentials")
    assert_no_traceback(proxy)


# ------------------------------------------------------------------------------------------ faults


@pytest.mark.parametrize("fault", ["down", "http500"])
def test_identity_provider_failure(world: World, tmp_path: Path, proxies: list[Proxy], fault: str) -> None:
    proxy = start_standard(world, tmp_path, proxies)
    cached_user = world.new_user("cached")
    imap_login(proxy.ports["IMAP"], cached_user)
    cached_lines = section_lines(proxy.config_path, cached_user)
    assert any(line.startswith("access_token =") for line in cached_lines), proxy.config_path.read_text()
    cached_token = world.idp.issued[0].access_token
    requests_before = len(world.idp.token_requests())

    if fault == "down":
        world.idp.set_down(True)
    else:
        world.idp.fail_with(500, count=1_000_000)
    users = {protocol: world.new_user(protocol.lower()) for protocol in PROTOCOLS}
    for protocol, user in users.items():
        reply = refused_login(protocol, proxy.ports[protocol], user, PASSWORD, READ_TIMEOUT)
        assert reply.startswith(FAILURE_PREFIX[protocol]), reply
        assert f"Login failed for account {user}".encode() in reply, reply
        assert not any(check.user == user for check in world.idp.check_log)
    if fault == "http500":
        assert len(world.idp.token_requests()) > requests_before, "the failing IdP was never asked"
    # the other account's cached token is neither wiped nor needed from the IdP
    imap_login(proxy.ports["IMAP"], cached_user)
    assert section_lines(proxy.config_path, cached_user) == cached_lines

    if fault == "down":
        world.idp.set_down(False)
    else:  # a reset is the only way to clear injected failures; restore what the proxy relies on
        world.idp.reset()
        world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
        world.idp.issue_token(None, token=cached_token, expires_in=3600)
    for protocol, user in users.items():
        LOGINS[protocol](proxy.ports[protocol], user)
        assert_logged_in_upstream(world, user)
    imap_login(proxy.ports["IMAP"], cached_user)
    assert section_lines(proxy.config_path, cached_user) == cached_lines
    assert_no_traceback(proxy)


UPSTREAM_DOWN = {"IMAP": b"* BYE " + PREFIX.encode(), "POP": b"-ERR ", "SMTP": b"421 "}


def test_upstream_server_down(world: World, tmp_path: Path, proxies: list[Proxy]) -> None:
    world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
    ports = allocate_ports("IMAP", "POP", "SMTP")
    sections: dict[str, dict[str, str]] = {}
    for protocol, port in ports.items():
        dead = free_port()  # nobody listens there
        sections[f"{protocol}-{port}"] = {"server_address": "127.0.0.1", "server_port": str(dead)}
        if protocol == "SMTP":
            sections[f"{protocol}-{port}"]["server_starttls"] = "True"
    sections["emailproxy"] = {"allow_catch_all_accounts": "True"}
    sections[f"@{world.domain}"] = account_section(world)
    proxy = launch(world.ca_path, tmp_path, sections, ports)
    proxies.append(proxy)
    for protocol, port in ports.items():
        with connect(port) as sock:
            data, closed = read_until_closed(sock)
        assert closed, (protocol, data)
        assert data.startswith(UPSTREAM_DOWN[protocol]), (protocol, data)
        assert b"could not connect" in data, (protocol, data)
        assert data.endswith(b"\r\n") and data.count(b"\r\n") == 1, (protocol, data)
    assert world.idp.token_requests() == []
    assert_no_traceback(proxy)


def test_untrusted_upstream_certificate(world: World, tmp_path: Path, proxies: list[Proxy]) -> None:
    """Without the test CA the upstream certificate cannot be verified: no login, no token sent."""
    world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
    ports = allocate_ports("IMAP", "IMAPSTARTTLS", "POP", "SMTP")
    d = world.dovecot.ports
    sections = mail_sections(world, ports)
    sections[f"IMAP-{ports['IMAPSTARTTLS']}"] = {
        "server_address": d.host,
        "server_port": str(d.imap),
        "server_starttls": "True",
    }
    sections["emailproxy"] = {"allow_catch_all_accounts": "True"}
    sections[f"@{world.domain}"] = account_section(world)
    config = tmp_path / "emailproxy.config"
    config.write_text(render_config(sections))
    env = proxy_env(world.ca_path)
    env["SSL_CERT_FILE"] = SYSTEM_CA_FILE
    proxy = Proxy(config, tmp_path / "proxy.log", ports, env)
    proxies.append(proxy)
    proxy.start()

    commands = {
        "IMAP": b"a LOGIN {user} " + PASSWORD.encode() + b"\r\n",
        "IMAPSTARTTLS": b"a LOGIN {user} " + PASSWORD.encode() + b"\r\n",
        "POP": b"USER {user}\r\nPASS " + PASSWORD.encode() + b"\r\n",
        "SMTP": b"EHLO client\r\nAUTH PLAIN {plain}\r\n",
    }
    error_start = {"IMAP": b"* BYE ", "IMAPSTARTTLS": b"* BYE ", "POP": b"-ERR ", "SMTP": b"421 "}
    users = []
    for name, port in ports.items():
        user = world.new_user(name.lower())
        users.append(user)
        plain = base64.b64encode(b"\0" + user.encode() + b"\0" + PASSWORD.encode())
        command = commands[name].replace(b"{user}", user.encode()).replace(b"{plain}", plain)
        with connect(port) as sock:
            send_quietly(sock, command)  # sent at once: the proxy must not act on it
            data, closed = read_until_closed(sock)
        assert closed, (name, data)
        assert data.startswith(error_start[name]), (name, data)
        assert PREFIX.encode() in data and b"certificate" in data.lower(), (name, data)
    assert not any(check.user in users for check in world.idp.check_log)
    assert world.idp.token_requests() == []
    assert_no_traceback(proxy)


class FakeServer(ThreadedServer):
    """A plaintext TCP server on 127.0.0.1 that greets, answers each line with ``respond(line)`` and
    records every byte it receives."""

    def __init__(self, greeting: bytes, respond: Callable[[bytes], bytes]) -> None:
        self.greeting = greeting
        self.respond = respond
        self.received = bytearray()
        self.connections = 0
        super().__init__()

    def accepted(self, number: int) -> None:
        with self._lock:
            self.connections += 1

    def handle(self, conn: socket.socket, number: int) -> None:
        with conn:
            conn.settimeout(READ_TIMEOUT)
            try:
                conn.sendall(self.greeting)
                pending = b""
                while True:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    with self._lock:
                        self.received += chunk
                    pending += chunk
                    while b"\n" in pending:
                        line, pending = pending.split(b"\n", 1)
                        conn.sendall(self.respond(line.rstrip(b"\r")))
            except OSError:
                return

    def data(self) -> bytes:
        with self._lock:
            return bytes(self.received)



def fake_imap(line: bytes) -> bytes:
    tag, _, rest = line.partition(b" ")
    command = rest.split(b" ", 1)[0].upper()
    if command == b"CAPABILITY":
        return b"* CAPABILITY IMAP4rev1 AUTH=XOAUTH2\r\n" + tag + b" OK done\r\n"
    if command == b"STARTTLS":
        return tag + b" BAD STARTTLS unknown\r\n"
    return tag + b" NO fake server\r\n"


def fake_smtp(line: bytes) -> bytes:
    command = line.split(b" ", 1)[0].upper()
    if command in (b"EHLO", b"HELO"):
        return b"250-fake.example.com\r\n250-AUTH XOAUTH2 PLAIN\r\n250 8BITMIME\r\n"
    if command == b"STARTTLS":
        return b"502 5.5.1 STARTTLS unknown\r\n"
    if command == b"AUTH":
        return b"334 \r\n"
    if command == b"QUIT":
        return b"221 bye\r\n"
    return b"250 ok\r\n"


def fake_pop(line: bytes) -> bytes:
    command = line.split(b" ", 1)[0].upper()
    if command == b"CAPA":
        return b"+OK\r\nUSER\r\nSASL XOAUTH2\r\n.\r\n"
    if command == b"AUTH":
        return b"+ \r\n"
    return b"-ERR unknown command\r\n"


STARTTLS_FAKES = {
    "IMAP": (b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] fake ready\r\n", fake_imap, b"* BYE "),
    "POP": (b"+OK fake ready\r\n", fake_pop, b"-ERR "),
    "SMTP": (b"220 fake ESMTP\r\n", fake_smtp, b"421 "),
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_starttls_without_starttls_sends_nothing(
    world: World, tmp_path: Path, proxies: list[Proxy], protocol: str
) -> None:
    greeting, respond, error_start = STARTTLS_FAKES[protocol]
    fake = FakeServer(greeting, respond)
    try:
        world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
        ports = allocate_ports(protocol)
        sections = {
            f"{protocol}-{ports[protocol]}": {
                "server_address": "127.0.0.1",
                "server_port": str(fake.port),
                "server_starttls": "True",
            },
            "emailproxy": {"allow_catch_all_accounts": "True"},
            f"@{world.domain}": account_section(world),
        }
        proxy = launch(world.ca_path, tmp_path, sections, ports)
        proxies.append(proxy)
        user = world.new_user()
        plain = base64.b64encode(b"\0" + user.encode() + b"\0" + PASSWORD.encode())
        command = {
            "IMAP": b"a LOGIN " + user.encode() + b" " + PASSWORD.encode() + b"\r\n",
            "POP": b"USER " + user.encode() + b"\r\nPASS " + PASSWORD.encode() + b"\r\n",
            "SMTP": b"EHLO client\r\nAUTH PLAIN " + plain + b"\r\n",
        }[protocol]
        with connect(ports[protocol]) as sock:
            send_quietly(sock, command)
            data, closed = read_until_closed(sock)
        received = fake.data()
    finally:
        fake.close()
    assert closed, data
    assert data.startswith(error_start) and PREFIX.encode() in data, data
    assert b"STARTTLS" in data or b"STLS" in data, data
    assert fake.connections >= 1  # the harness's readiness probe makes one more
    assert b"AUTHENTICATE" not in received.upper() and b"AUTH " not in received.upper(), received
    assert PASSWORD.encode() not in received and plain not in received, received
    for issued in world.idp.issued:
        assert issued.access_token.encode() not in received
        token_b64 = base64.b64encode(f"user={user}\x01auth=Bearer {issued.access_token}\x01\x01".encode())
        assert token_b64 not in received
    assert_no_traceback(proxy)


def test_sigterm_with_open_sessions(world: World, tmp_path: Path, proxies: list[Proxy]) -> None:
    proxy = start_standard(world, tmp_path, proxies)
    user = world.new_user()
    imap = imaplib.IMAP4("127.0.0.1", proxy.ports["IMAP"], timeout=READ_TIMEOUT)
    pop = connect(proxy.ports["POP"])
    smtp = connect(proxy.ports["SMTP"])
    try:
        assert imap.login(user, PASSWORD)[0] == "OK"
        assert imap.select("INBOX")[0] == "OK"
        assert read_reply(pop, "POP").startswith(b"+OK")
        assert read_reply(smtp, "SMTP").startswith(b"220")
        assert proxy.process is not None
        proxy.process.send_signal(signal.SIGTERM)
        imap_data, imap_closed = read_until_closed(imap.sock)
        pop_data, pop_closed = read_until_closed(pop)
        smtp_data, smtp_closed = read_until_closed(smtp)
        code = proxy.process.wait(timeout=15)
    finally:
        imap.shutdown()
        pop.close()
        smtp.close()
    assert code == 0, proxy.output()
    assert imap_closed and imap_data == b"* BYE Server shutting down\r\n", imap_data
    assert pop_closed and pop_data == b"+OK Server signing off\r\n", pop_data
    assert smtp_closed and smtp_data == b"221 2.0.0 Service closing transmission channel\r\n", smtp_data
    assert_no_traceback(proxy)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_no_secret_in_debug_log_or_stderr(world: World, tmp_path: Path, proxies: list[Proxy]) -> None:
    world.idp.expires_in = 300  # below the proxy's 600 s margin: each later login refreshes
    proxy = start_standard(world, tmp_path, proxies, flow="password")
    logins = {
        name: (world.new_user(name), f"pw-{name}-{os.urandom(6).hex()}")
        for name in ("imaplogin", "imapplain", "poppass", "smtpplain", "smtplogin")
    }
    for user, password in logins.values():
        world.idp.register_user(user, password)
    ports = proxy.ports

    user, password = logins["imaplogin"]
    imap_login(ports["IMAP"], user, password)
    imap_login(ports["IMAP"], user, password)  # refresh_token grant
    user, password = logins["imapplain"]
    with imaplib.IMAP4("127.0.0.1", ports["IMAP"], timeout=READ_TIMEOUT) as imap:
        blob = b"\0" + user.encode() + b"\0" + password.encode()
        assert imap.authenticate("PLAIN", lambda _challenge: blob)[0] == "OK"
    pop_login(ports["POP"], *logins["poppass"])
    smtp_login(ports["SMTP"], *logins["smtpplain"], mechanism="PLAIN")
    smtp_login(ports["SMTP"], *logins["smtplogin"], mechanism="LOGIN")
    wrong = f"wrong-{os.urandom(6).hex()}"
    with imaplib.IMAP4("127.0.0.1", ports["IMAP"], timeout=READ_TIMEOUT) as imap:
        with pytest.raises(imaplib.IMAP4.error):
            imap.login(logins["poppass"][0], wrong)

    assert [r.grant_type for r in world.idp.token_requests()].count("refresh_token") >= 1
    for user, _ in logins.values():
        assert_logged_in_upstream(world, user)
    assert proxy.stop() == 0, proxy.output()
    assert proxy.stderr_path is not None
    outputs = {"log file": proxy.log(), "stderr": proxy.stderr_path.read_text(errors="replace")}
    assert all(user in outputs["log file"] for user, _ in logins.values()), (
        "the debug log is too quiet to test"
    )

    secrets: dict[str, str] = {
        "client secret": CLIENT_SECRET,
        "client secret b64": b64(CLIENT_SECRET.encode()),
    }
    for user, password in [*logins.values(), (logins["poppass"][0], wrong)]:
        secrets[f"password of {user}"] = password
        secrets[f"b64 password of {user}"] = b64(password.encode())
        secrets[f"PLAIN of {user}"] = b64(b"\0" + user.encode() + b"\0" + password.encode())
        secrets[f"PLAIN with authzid of {user}"] = b64(
            user.encode() + b"\0" + user.encode() + b"\0" + password.encode()
        )
    issued = world.idp.issued
    assert len(issued) >= len(logins) + 1
    for token in issued:
        secrets[f"access token {token.access_token[:6]}"] = token.access_token
        if token.refresh_token is not None:
            secrets[f"refresh token {token.refresh_token[:6]}"] = token.refresh_token
        for user, _ in logins.values():
            xoauth2 = f"user={user}\x01auth=Bearer {token.access_token}\x01\x01".encode()
            secrets[f"XOAUTH2 of {user}"] = b64(xoauth2)
    leaks = [
        f"{what} in {where}"
        for where, text in outputs.items()
        for what, value in secrets.items()
        if value in text
    ]
    assert leaks == []


def test_new_cache_store_file_is_private(world: World, tmp_path: Path, proxies: list[Proxy]) -> None:
    cache = tmp_path / "new-tokens.cache"
    proxy = start_standard(world, tmp_path, proxies, args=["--cache-store", str(cache)])
    config_before = proxy.config_path.read_bytes()
    user = world.new_user()
    imap_login(proxy.ports["IMAP"], user)
    deadline = time.monotonic() + 10
    while not cache.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cache.exists(), proxy.output()
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert f"[{user}]" in cache.read_text()
    assert proxy.config_path.read_bytes() == config_before


def test_updated_config_file_keeps_its_mode(world: World, tmp_path: Path, proxies: list[Proxy]) -> None:
    proxy = start_standard(world, tmp_path, proxies)
    proxy.config_path.chmod(0o640)
    user = world.new_user()
    imap_login(proxy.ports["IMAP"], user)
    deadline = time.monotonic() + 10
    while f"[{user}]" not in proxy.config_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"[{user}]" in proxy.config_path.read_text(), "the token was not saved into the config file"
    assert stat.S_IMODE(proxy.config_path.stat().st_mode) == 0o640
