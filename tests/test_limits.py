"""Abuse limits: the failed-login backoff policy, the warning throttle, the per-connection command and
failed-login caps of the three protocol machines, the options, and the connection cap and backoff as
the server applies them (a fake IMAP upstream on loopback; no mail servers)."""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from emailproxy.config import ConfigError, load_config
from emailproxy.limits import BackoffPolicy, LoginBackoff, Throttle, normalise_address
from emailproxy.oauth.tokens import (
    wrong_password_message,
)
from emailproxy.protocols.events import (
    MAX_COMMANDS,
    MAX_FAILED_LOGINS,
    Action,
    Close,
    Log,
    NeedToken,
    SendToClient,
    SendToServer,
    Session,
    SessionOptions,
    TokenFailure,
    TokenOk,
    TokenResult,
)
from emailproxy.protocols.imap import ImapSession
from emailproxy.protocols.pop import PopSession
from emailproxy.protocols.smtp import SmtpSession
from emailproxy.secret import Secret
from emailproxy.server import ProxyServer
from tests.integration.world.ca import CertificateFiles, make_ca

PREFIX = b"Email OAuth 2.0 Proxy: "


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def backoff(clock: Clock, **policy: int | float | bool) -> LoginBackoff:
    return LoginBackoff(BackoffPolicy(**policy), clock)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- backoff policy


def test_backoff_engages_after_the_limit_and_doubles_up_to_the_cap() -> None:
    clock = Clock()
    guard = backoff(clock, limit=3, max_delay=30.0)
    for _ in range(2):
        assert guard.failed("192.0.2.7", "ann@example.com") is None
        assert guard.refusal("192.0.2.7", "ann@example.com") is None
    waits = []
    for _ in range(8):
        engaged = guard.failed("192.0.2.7", "ann@example.com")
        assert engaged is not None and not engaged.whole_address
        refusal = guard.refusal("192.0.2.7", "ann@example.com")
        assert refusal is not None
        waits.append(refusal.seconds)
        clock.advance(refusal.wait)  # the wait is over: the next attempt is checked (and fails) again
        assert guard.refusal("192.0.2.7", "ann@example.com") is None
    assert waits == [1, 2, 4, 8, 16, 30, 30, 30]


def test_refusal_message_names_the_wait_and_the_user() -> None:
    clock = Clock()
    guard = backoff(clock, limit=1)
    guard.failed("192.0.2.7", "ann@example.com")
    clock.advance(0.25)
    refusal = guard.refusal("192.0.2.7", "ann@example.com")
    assert refusal is not None and 0.7 < refusal.wait <= 0.75
    assert refusal.message("ann@example.com") == (
        "Too many failed logins for ann@example.com from this address; try again in 1 s"
    )


def test_backoff_hits_only_that_user_and_that_address() -> None:
    clock = Clock()
    guard = backoff(clock, limit=2, address_limit=10)
    for _ in range(5):
        guard.failed("127.0.0.1", "appliance@example.com")
    assert guard.refusal("127.0.0.1", "appliance@example.com") is not None
    assert guard.refusal("127.0.0.1", "APPLIANCE@example.com") is not None  # names are case-insensitive
    assert guard.refusal("127.0.0.1", "someone.else@example.com") is None
    assert guard.refusal("192.0.2.9", "appliance@example.com") is None


def test_one_user_failing_forever_never_locks_out_its_address() -> None:
    """A misconfigured client retrying one account on loopback must not lock out the host's other clients."""
    clock = Clock()
    guard = backoff(clock, limit=3, address_limit=2)
    for _ in range(500):
        guard.failed("127.0.0.1", "appliance@example.com")
        clock.advance(31)  # every wait runs out: the client retries for hours
    assert guard.refusal("127.0.0.1", "other@example.com") is None


def test_many_user_names_failing_locks_out_the_whole_address() -> None:
    clock = Clock()
    guard = backoff(clock, limit=5, address_limit=3)
    assert guard.failed("198.51.100.4", "a@example.com") is None
    assert guard.failed("198.51.100.4", "b@example.com") is None
    engaged = guard.failed("198.51.100.4", "c@example.com")
    assert engaged is not None and engaged.whole_address and engaged.seconds == 1
    refusal = guard.refusal("198.51.100.4", "never-tried@example.com")
    assert refusal is not None and refusal.whole_address
    assert refusal.message("never-tried@example.com") == (
        "Too many failed logins from this address; try again in 1 s"
    )
    assert guard.refusal("198.51.100.5", "a@example.com") is None
    clock.advance(1)
    engaged = guard.failed("198.51.100.4", "d@example.com")  # another failure: the wait doubles
    assert engaged is not None and engaged.whole_address and engaged.seconds == 2


def test_success_clears_the_user_and_its_share_of_the_address() -> None:
    clock = Clock()
    guard = backoff(clock, limit=2, address_limit=3)
    guard.failed("10.0.0.8", "a@example.com")
    guard.failed("10.0.0.8", "b@example.com")
    guard.succeeded("10.0.0.8", "a@example.com")
    assert guard.failed("10.0.0.8", "c@example.com") is None  # only b and c count for the address now
    guard.policy = BackoffPolicy(limit=2, address_limit=4)
    assert guard.failed("10.0.0.8", "a@example.com") is None  # a starts again from one failure
    engaged = guard.failed("10.0.0.8", "a@example.com")
    assert engaged is not None and not engaged.whole_address


def test_success_after_the_wait_resets_the_backoff() -> None:
    clock = Clock()
    guard = backoff(clock, limit=2)
    for _ in range(4):
        guard.failed("10.0.0.8", "a@example.com")
    refusal = guard.refusal("10.0.0.8", "a@example.com")
    assert refusal is not None and refusal.seconds == 4
    clock.advance(refusal.wait)
    guard.succeeded("10.0.0.8", "a@example.com")
    assert guard.failed("10.0.0.8", "a@example.com") is None  # one failure is not enough any more
    assert guard.refusal("10.0.0.8", "a@example.com") is None


def test_entries_are_forgotten_after_the_window() -> None:
    clock = Clock()
    guard = backoff(clock, limit=3, address_limit=3, window=300.0)
    guard.failed("10.0.0.8", "a@example.com")
    guard.failed("10.0.0.8", "a@example.com")
    guard.failed("10.0.0.8", "b@example.com")
    clock.advance(301)
    assert guard.failed("10.0.0.8", "a@example.com") is None  # the two earlier failures are gone
    assert guard.failed("10.0.0.8", "c@example.com") is None  # b no longer counts for the address
    assert guard.refusal("10.0.0.8", "d@example.com") is None
    clock.advance(301)
    guard.refusal("10.0.0.8", "a@example.com")  # looking at stale entries drops them
    assert len(guard) == 1  # c's entry stays until it is looked at
    guard.refusal("10.0.0.8", "c@example.com")
    assert len(guard) == 0


def test_memory_stays_bounded_under_many_addresses() -> None:
    clock = Clock()
    guard = backoff(clock, limit=1, max_tracked=50)
    for n in range(2000):
        guard.failed(f"10.1.{n // 256}.{n % 256}", f"user{n}@example.com")
        clock.advance(0.001)
    assert len(guard) <= 100
    # the most recent offenders are still refused; the oldest were let go first
    assert guard.refusal("10.1.7.207", "user1999@example.com") is not None
    assert guard.refusal("10.1.0.0", "user0@example.com") is None


def test_address_entries_keep_at_most_the_limit_of_names() -> None:
    clock = Clock()
    guard = backoff(clock, limit=100, address_limit=4)
    for n in range(1000):
        guard.failed("10.0.0.8", f"user{n}@example.com")
    host = guard._addresses["10.0.0.8"]
    assert len(host.names) == 4


def test_disabled_backoff_never_refuses_and_forgets() -> None:
    clock = Clock()
    guard = backoff(clock, limit=1)
    guard.failed("10.0.0.8", "a@example.com")
    assert guard.refusal("10.0.0.8", "a@example.com") is not None
    guard.configure(BackoffPolicy(enabled=False))
    assert guard.refusal("10.0.0.8", "a@example.com") is None
    assert guard.failed("10.0.0.8", "a@example.com") is None
    assert len(guard) == 0


def test_ipv4_clients_of_a_dual_stack_socket_share_the_ipv4_key() -> None:
    assert normalise_address("::ffff:127.0.0.1") == "127.0.0.1"
    assert normalise_address("::1") == "::1"
    clock = Clock()
    guard = backoff(clock, limit=1)
    guard.failed("::ffff:192.0.2.1", "a@example.com")
    assert guard.refusal("192.0.2.1", "a@example.com") is not None


def test_default_policy() -> None:
    policy = BackoffPolicy()
    assert (policy.enabled, policy.limit, policy.address_limit) == (True, 5, 10)
    assert [policy.delay(n) for n in (1, 2, 5, 6, 100)] == [1.0, 2.0, 16.0, 30.0, 30.0]


# ----------------------------------------------------------------------------------------- throttle


def test_throttle_reports_the_first_event_then_once_per_interval() -> None:
    clock = Clock()
    throttle = Throttle(60.0, clock)
    assert throttle.event() == 1
    assert [throttle.event() for _ in range(5)] == [None] * 5
    assert throttle.due_in() == 60.0
    clock.advance(60)
    assert throttle.event() == 6  # the five held back, and this one
    clock.advance(10)
    assert throttle.event() is None
    assert throttle.flush() == 1
    assert throttle.flush() == 0


# ------------------------------------------------------------------------------ protocol machines


def to_client(actions: Sequence[Action]) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, SendToClient))


def closes(actions: Sequence[Action]) -> bool:
    return bool(actions) and isinstance(actions[-1], Close)


def imap(**options: int) -> ImapSession:
    session = ImapSession(SessionOptions(**options))  # type: ignore[arg-type]
    session.server_data(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2] ready\r\n")
    return session


def pop(**options: int) -> PopSession:
    session = PopSession(SessionOptions(**options))  # type: ignore[arg-type]
    session.server_data(b"+OK ready\r\n")
    return session


def smtp(**options: int) -> SmtpSession:
    session = SmtpSession(SessionOptions(**options))  # type: ignore[arg-type]
    session.server_data(b"220 ready\r\n")
    return session


def imap_command(session: ImapSession, n: int) -> list[Action]:
    actions = session.client_data(b"n%d NOOP\r\n" % n)
    if any(isinstance(a, SendToServer) for a in actions):
        actions += session.server_data(b"n%d OK done\r\n" % n)
    return actions


def pop_command(session: PopSession, n: int) -> list[Action]:
    actions = session.client_data(b"NOOP\r\n")
    if any(isinstance(a, SendToServer) for a in actions):
        actions += session.server_data(b"+OK\r\n")
    return actions


def smtp_command(session: SmtpSession, n: int) -> list[Action]:
    actions = session.client_data(b"NOOP\r\n")
    if any(isinstance(a, SendToServer) for a in actions):
        actions += session.server_data(b"250 2.0.0 OK\r\n")
    return actions


MACHINES: dict[str, tuple[Callable[..., Session], Callable[..., list[Action]], bytes]] = {
    "IMAP": (imap, imap_command, b"* BYE " + PREFIX),
    "POP": (pop, pop_command, b"-ERR " + PREFIX),
    "SMTP": (smtp, smtp_command, b"421 4.7.0 " + PREFIX),
}


@pytest.mark.parametrize("protocol", MACHINES)
@pytest.mark.parametrize("limit", [3, MAX_COMMANDS])
def test_commands_before_login_are_capped(protocol: str, limit: int) -> None:
    make, command, refusal = MACHINES[protocol]
    session = make() if limit == MAX_COMMANDS else make(max_commands=limit)
    for n in range(limit):
        actions = command(session, n)
        assert not closes(actions) and any(isinstance(a, SendToServer) for a in actions), (n, actions)
    actions = command(session, limit)
    assert not any(isinstance(a, SendToServer) for a in actions), "the command over the limit went upstream"
    assert closes(actions)
    reply = to_client(actions)
    assert reply.startswith(refusal) and b"too many commands before login" in reply, reply
    assert session.client_data(b"n0 NOOP\r\n") == []  # nothing more is handled


def test_smtp_message_lines_are_not_commands() -> None:
    session = smtp(max_commands=5)
    steps = [
        (b"EHLO me", b"250 hi"),
        (b"MAIL FROM:<a@b>", b"250 ok"),
        (b"RCPT TO:<c@d>", b"250 ok"),
        (b"DATA", b"354 go"),
    ]
    for line, reply in steps:
        session.client_data(line + b"\r\n")
        session.server_data(reply + b"\r\n")
    forwarded = session.client_data(b"line\r\n" * 200 + b".\r\n")
    assert len([a for a in forwarded if isinstance(a, SendToServer)]) == 201
    session.server_data(b"250 queued\r\n")
    assert not closes(smtp_command(session, 5))  # the fifth command
    assert closes(smtp_command(session, 6))


def imap_login(session: ImapSession, n: int) -> list[Action]:
    actions = session.client_data(b'l%d LOGIN ann@example.com "wrong"\r\n' % n)
    assert any(isinstance(a, NeedToken) for a in actions), actions
    return session.token_result(TokenFailure(wrong_password_message("ann@example.com")))


def pop_login(session: PopSession, n: int) -> list[Action]:
    session.client_data(b"USER ann@example.com\r\n")
    actions = session.client_data(b"PASS wrong\r\n")
    assert any(isinstance(a, NeedToken) for a in actions), actions
    return session.token_result(TokenFailure(wrong_password_message("ann@example.com")))


def smtp_login(session: SmtpSession, n: int) -> list[Action]:
    if n == 0:
        session.client_data(b"EHLO me\r\n")
        session.server_data(b"250-hi\r\n250 AUTH XOAUTH2\r\n")
    blob = base64.b64encode(b"\0ann@example.com\0wrong")
    actions = session.client_data(b"AUTH PLAIN " + blob + b"\r\n")
    assert any(isinstance(a, NeedToken) for a in actions), actions
    return session.token_result(TokenFailure(wrong_password_message("ann@example.com")))


LOGINS: dict[str, tuple[Callable[..., Session], Callable[..., list[Action]], bytes, bytes]] = {
    "IMAP": (imap, imap_login, b"NO LOGIN " + PREFIX, b"* BYE " + PREFIX),
    "POP": (pop, pop_login, b"-ERR Authentication failed. " + PREFIX, b"-ERR " + PREFIX),
    "SMTP": (
        smtp,
        smtp_login,
        b"535 5.7.8  Authentication credentials invalid. " + PREFIX,
        b"421 4.7.0 " + PREFIX,
    ),
}


@pytest.mark.parametrize("protocol", LOGINS)
@pytest.mark.parametrize("limit", [2, MAX_FAILED_LOGINS])
def test_failed_logins_per_connection_are_capped(protocol: str, limit: int) -> None:
    make, login, failure, refusal = LOGINS[protocol]
    session = make() if limit == MAX_FAILED_LOGINS else make(max_failed_logins=limit)
    for n in range(limit - 1):
        actions = login(session, n)
        assert failure in to_client(actions) and not closes(actions), actions
    actions = login(session, limit - 1)
    assert closes(actions)
    failed, _, bye = to_client(actions).partition(b"\r\n")
    assert failure in failed  # the failure is answered first, then the connection is closed politely
    assert bye.startswith(refusal) and b"too many failed logins on this connection" in bye, bye


def test_an_upstream_refusal_is_a_failed_login_too() -> None:
    session = imap(max_failed_logins=1)
    session.client_data(b"a LOGIN ann@example.com pw\r\n")
    actions = session.token_result(TokenOk("ann@example.com", Secret("token")))
    assert any(isinstance(a, SendToServer) for a in actions)
    actions = session.server_data(b"a NO [AUTHENTICATIONFAILED] invalid token\r\n")
    assert closes(actions)
    assert b"a NO LOGIN " + PREFIX + b"invalid token\r\n* BYE " + PREFIX in to_client(actions)


def test_a_success_after_failures_relays() -> None:
    session = imap(max_failed_logins=2)
    assert not closes(imap_login(session, 0))
    session.client_data(b"a LOGIN ann@example.com pw\r\n")
    session.token_result(TokenOk("ann@example.com", Secret("token")))
    actions = session.server_data(b"a OK logged in\r\n")
    assert not closes(actions) and not any(isinstance(a, Log) and a.level > logging.INFO for a in actions)
    assert to_client(actions) == b"a OK logged in\r\n"


# ------------------------------------------------------------------------------------------ options


def write_config(tmp_path: Path, options: str) -> Path:
    path = tmp_path / "emailproxy.config"
    path.write_text(f"[IMAP-1993]\nserver_address = 127.0.0.1\nserver_port = 993\n[emailproxy]\n{options}\n")
    return path


def test_limit_options_have_defaults_and_are_read(tmp_path: Path) -> None:
    defaults = load_config(write_config(tmp_path, "")).options
    assert (defaults.max_connections, defaults.login_failure_backoff) == (1000, True)
    assert (defaults.login_failure_limit, defaults.login_failure_address_limit) == (5, 10)
    text = (
        "max_connections = 0\nlogin_failure_backoff = False\nlogin_failure_limit = 2\n"
        "login_failure_address_limit = 7"
    )
    options = load_config(write_config(tmp_path, text)).options
    assert (options.max_connections, options.login_failure_backoff) == (0, False)
    assert (options.login_failure_limit, options.login_failure_address_limit) == (2, 7)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("max_connections = lots", "'lots' is not a whole number from 0 to 1000000"),
        ("max_connections = -1", "'-1' is not a whole number from 0 to 1000000"),
        ("login_failure_limit = 0", "'0' is not a whole number from 1 to 100"),
        ("login_failure_address_limit = 2.5", "'2.5' is not a whole number from 1 to 100"),
        ("login_failure_backoff = maybe", "'maybe' is not a boolean"),
        ("max_conections = 10", "did you mean 'max_connections'?"),
    ],
)
def test_bad_limit_options_are_named(tmp_path: Path, line: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, line))
    assert expected in str(caught.value) and "[emailproxy]" in str(caught.value)


# ------------------------------------------------------------------------------ the server applies them


class FakeTokens:
    """Password "right" gets a token; anything else is a wrong local password."""

    def __init__(self) -> None:
        self.calls = 0

    async def get_token(self, username: str, password: Secret) -> TokenResult:
        self.calls += 1
        if password.reveal() == "right":
            return TokenOk(username, Secret("token"))
        return TokenFailure(wrong_password_message(username), local=True)


@asynccontextmanager
async def fake_imap_upstream(certificates: CertificateFiles) -> AsyncIterator[int]:
    """An implicit-TLS server: greets, and answers every tagged command (the proxy's AUTHENTICATE too) OK."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] fake ready\r\n")
        try:
            while line := await reader.readline():
                writer.write(line.split(b" ", 1)[0] + b" OK done\r\n")
        except ConnectionError:
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=certificates.server_context())
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def running_proxy(
    tmp_path: Path, options: str, tokens: FakeTokens | None = None, local_tls: bool = False
) -> AsyncIterator[tuple[int, ProxyServer]]:
    certificates = make_ca(tmp_path / "ca")
    async with fake_imap_upstream(certificates) as upstream:
        port = free_port()
        path = tmp_path / "emailproxy.config"
        tls = (
            f"local_certificate_path = {certificates.cert_path}\nlocal_key_path = {certificates.key_path}\n"
            if local_tls
            else ""
        )
        path.write_text(
            f"[IMAP-{port}]\nserver_address = 127.0.0.1\nserver_port = {upstream}\n{tls}"
            f"[emailproxy]\n{options}\n"
        )
        proxy = ProxyServer(load_config(path), tokens or FakeTokens())
        proxy.upstream_tls = certificates.client_context()
        await proxy.start()
        try:
            yield port, proxy
        finally:
            await proxy.stop(grace=0.5)


async def greeting(port: int) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return await asyncio.wait_for(reader.readline(), 5), reader, writer


async def closed(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except ConnectionError:
        pass


def test_connections_over_the_cap_are_refused_politely_and_reported_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with running_proxy(tmp_path, "max_connections = 2") as (port, proxy):
            first, second = await greeting(port), await greeting(port)
            assert first[0].startswith(b"* OK") and second[0].startswith(b"* OK")
            for _ in range(5):
                refused, reader, writer = await greeting(port)
                assert refused == b"* BYE " + PREFIX + b"Too many connections, try again later\r\n"
                assert await asyncio.wait_for(reader.read(), 5) == b""  # then closed
                await closed(writer)
            assert len(proxy.connections) == 2  # the sessions already open were not touched
            first[2].write(b"a NOOP\r\n")
            assert await asyncio.wait_for(first[1].readline(), 5) == b"a OK done\r\n"
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1 and "Refused 1 new connection(s)" in warnings[0].getMessage()
            assert "max_connections" in warnings[0].getMessage()
            await closed(first[2])
            for _ in range(100):  # the slot is free once the proxy has seen the close
                if len(proxy.connections) < 2:
                    break
                await asyncio.sleep(0.01)
            again = await greeting(port)
            assert again[0].startswith(b"* OK")
            await closed(again[2])
            await closed(second[2])
        # the refusals held back are reported when the proxy stops
        messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(messages) == 2 and "Refused 4 new connection(s)" in messages[1]

    caplog.set_level(logging.INFO, logger="emailproxy")
    asyncio.run(main())


def test_an_abandoned_tls_handshake_takes_no_place(tmp_path: Path) -> None:
    """asyncio tells no one when a client leaves an implicit-TLS listener during the handshake: such a
    connection must not be counted as a session (it would hold a place under the cap for ever)."""

    async def main() -> None:
        async with running_proxy(tmp_path, "max_connections = 1", local_tls=True) as (port, proxy):
            for _ in range(3):  # connect and leave without a handshake
                _reader, writer = await asyncio.open_connection("127.0.0.1", port)
                await closed(writer)
            context = ssl.create_default_context(cafile=str(tmp_path / "ca" / "ca.pem"))
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
            assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"* OK")
            assert len(proxy.connections) == 1
            await closed(writer)

    asyncio.run(main())


def test_no_cap_when_max_connections_is_zero(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_proxy(tmp_path, "max_connections = 0") as (port, _proxy):
            opened = [await greeting(port) for _ in range(5)]
            assert all(reply.startswith(b"* OK") for reply, _, _ in opened)
            for _, _, writer in opened:
                await closed(writer)

    asyncio.run(main())


async def login(port: int, password: str, user: str = "ann@example.com") -> bytes:
    _, reader, writer = await greeting(port)
    writer.write(f'a LOGIN {user} "{password}"\r\n'.encode())
    reply = await asyncio.wait_for(reader.readline(), 5)
    await closed(writer)
    return reply


def test_server_refuses_logins_after_failures_without_asking_for_a_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = FakeTokens()

    async def main() -> None:
        async with running_proxy(tmp_path, "login_failure_limit = 2", tokens) as (port, proxy):
            clock = proxy.backoff.clock = Clock()
            incorrect = b"a NO LOGIN " + PREFIX + b"Login failed - the password for account ann@example.com"
            assert (await login(port, "bad")).startswith(incorrect)
            assert (await login(port, "bad")).startswith(incorrect)
            assert tokens.calls == 2
            refused = await login(port, "right")
            assert refused.startswith(b"a NO LOGIN " + PREFIX + b"Too many failed logins for ann@example.com")
            assert b"try again in 1 s" in refused
            assert tokens.calls == 2  # the password was not even checked
            assert (await login(port, "right", "bob@example.com")).startswith(b"a OK")
            refusal = proxy.backoff.refusal("127.0.0.1", "ann@example.com")
            assert refusal is not None
            clock.advance(refusal.wait)
            assert (await login(port, "right")).startswith(b"a OK")  # and that resets the count
            assert (await login(port, "bad")).startswith(incorrect)
            assert proxy.backoff.refusal("127.0.0.1", "ann@example.com") is None

    caplog.set_level(logging.INFO, logger="emailproxy")
    asyncio.run(main())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("repeated failed logins from 127.0.0.1 for ann@example.com" in m for m in warnings), warnings


def test_backoff_can_be_turned_off(tmp_path: Path) -> None:
    tokens = FakeTokens()

    async def main() -> None:
        options = "login_failure_backoff = False\nlogin_failure_limit = 1"
        async with running_proxy(tmp_path, options, tokens) as (port, _proxy):
            for _ in range(3):
                assert b"is incorrect" in await login(port, "bad")
            assert (await login(port, "right")).startswith(b"a OK")
        assert tokens.calls == 4

    asyncio.run(main())
