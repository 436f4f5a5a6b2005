"""Drive a protocol session from fuzzer bytes, like the asyncio driver does, and check the contract.

Input format (so that a coverage-guided fuzzer chooses the options, the split points and the order of
client bytes, server bytes, token results and TLS completions):

- byte 0: options. bit 0 server_starttls, bit 1 local_starttls, bit 2 client_tls, bits 3-4 max_line
  (64, 256, 1024, 16384), bits 5-6 max_buffer (128, 1024, 4096, 262144; at least max_line), bit 7
  max_literal (8, 65536);
- then records, each starting with a header byte ``h``:
  - ``h >> 6 == 0``: the next ``h & 63`` bytes arrive from the client;
  - ``h >> 6 == 1``: the next ``h & 63`` bytes arrive from the server;
  - ``h >> 6 == 2``: a completion, ``h & 3``: 0 TokenOk, 1 TokenFailure, 2 TLS on the client side,
    3 TLS on the server side (given whether or not the session asked for it);
  - ``h >> 6 == 3``: a flood: ``(h & 31) * 256`` copies of the next byte from the client (bit 5 clear)
    or the server (bit 5 set).

Like the driver, bytes on a side being upgraded to TLS are dropped and the other side's bytes wait for
the handshake; a completion nobody asked for is still delivered (the session must ignore it).

Checks (any failure raises AssertionError, which the fuzzer reports as a crash): no exception; only
Log after Relay/Close; Relay and Close end their batch and Close follows a reply; Relay's leftovers are
the tails of the byte streams; one NeedToken at a time and nothing upstream while it is pending; the
token only upstream and only in a sensitive send, never to the client or into a Log; StartTls only
when the options allow it (server side before anything reached the client); the password of a
NeedToken never in a Log (when the fuzzer did not also put it somewhere that is logged legitimately);
and the same events with adjacent same-side chunks merged give the same output (split independence).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from emailproxy.protocols import sasl
from emailproxy.protocols.events import (
    Action,
    Close,
    Log,
    NeedToken,
    Relay,
    SendToClient,
    SendToServer,
    Session,
    SessionOptions,
    Side,
    StartTls,
    TokenFailure,
    TokenOk,
)
from emailproxy.secret import Secret

TOKEN = "fuzz-token-Zq7.Kw"  # noqa: S105 (a made-up token the checks look for)
MAX_LINES = (64, 256, 1024, 16384)
MAX_BUFFERS = (128, 1024, 4096, 262144)
MAX_LITERALS = (8, 65536)

CLIENT, SERVER, COMPLETION, FLOOD = range(4)
TOKEN_OK, TOKEN_FAILURE, TLS_CLIENT, TLS_SERVER = range(4)

Event = tuple[int, int | bytes]  # (CLIENT or SERVER, bytes) or (COMPLETION, which)


def options_from(byte: int) -> SessionOptions:
    max_line = MAX_LINES[(byte >> 3) & 3]
    return SessionOptions(
        server_starttls=bool(byte & 1),
        local_starttls=bool(byte & 2),
        client_tls=bool(byte & 4),
        max_line=max_line,
        # never below max_line: with max_buffer < max_line, whether a long line closes the session
        # depends on how it was split (a finding in fuzz/README.md), which would stop every run
        max_buffer=max(MAX_BUFFERS[(byte >> 5) & 3], max_line),
        max_literal=MAX_LITERALS[(byte >> 7) & 1],
    )


def options_byte(
    server_starttls: bool = False,
    local_starttls: bool = False,
    client_tls: bool = False,
    max_line: int = 1024,
    max_buffer: int = 4096,
    max_literal: int = 65536,
) -> int:
    """The inverse of :func:`options_from` (for writing seeds)."""
    return (
        server_starttls
        | local_starttls << 1
        | client_tls << 2
        | MAX_LINES.index(max_line) << 3
        | MAX_BUFFERS.index(max_buffer) << 5
        | MAX_LITERALS.index(max_literal) << 7
    )


def decode(data: bytes) -> tuple[SessionOptions, list[Event]]:
    if not data:
        return SessionOptions(), []
    events: list[Event] = []
    index = 1
    while index < len(data):
        header = data[index]
        kind, size = header >> 6, header & 63
        index += 1
        if kind in (CLIENT, SERVER):
            events.append((kind, data[index : index + size]))
            index += size
        elif kind == COMPLETION:
            events.append((COMPLETION, header & 3))
        elif index < len(data):
            side = SERVER if header & 32 else CLIENT
            events.append((side, data[index : index + 1] * ((header & 31) * 256)))
            index += 1
    return options_from(data[0]), events


def encode(options: int, events: list[Event]) -> bytes:
    """Fuzzer input for these events (byte events are cut into records of at most 63 bytes)."""
    out = bytearray([options])
    for kind, value in events:
        if kind == COMPLETION:
            assert isinstance(value, int)
            out.append(COMPLETION << 6 | value)
            continue
        assert isinstance(value, bytes)
        for start in range(0, max(len(value), 1), 63):
            chunk = value[start : start + 63]
            out += bytes([kind << 6 | len(chunk)]) + chunk
    return bytes(out)


def merged(events: list[Event], sides: tuple[int, ...] = (CLIENT, SERVER)) -> list[Event]:
    """The same events with adjacent byte events of the same side (one of ``sides``) joined into one."""
    out: list[Event] = []
    for kind, value in events:
        if out and kind in sides and out[-1][0] == kind:
            previous = out[-1][1]
            assert isinstance(previous, bytes) and isinstance(value, bytes)
            out[-1] = (kind, previous + value)
        else:
            out.append((kind, value))
    return out


@dataclass
class Run:
    """What one run produced, normalised so that split points do not matter."""

    to_client: bytearray = field(default_factory=bytearray)
    to_server: bytearray = field(default_factory=bytearray)
    #: NeedToken, StartTls, Relay and Close in order, each with the byte counts sent before it
    milestones: list[tuple[object, ...]] = field(default_factory=list)


class Driver:
    """Feeds one session like connection.py does and checks every batch of actions."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.options = session.options
        self.run = Run()
        self.finished = False
        self.relaying = False
        self.pending_token: NeedToken | None = None
        self.tls_pending: Side | None = None
        self.tls_done: set[Side] = set()
        self.deferred: list[tuple[Side, bytes]] = []
        self.client_stream = bytearray()
        self.server_stream = bytearray()
        self.token_given = False
        self.usernames: list[str] = []
        self.passwords: list[str] = []
        self.blobs: tuple[bytes, ...] = ()

    # ------------------------------------------------------------------------------------- events

    def play(self, events: list[Event]) -> Run:
        for kind, value in events:
            if kind == COMPLETION:
                assert isinstance(value, int)
                self.complete(value)
            else:
                assert isinstance(value, bytes)
                self.data(Side.CLIENT if kind == CLIENT else Side.SERVER, value)
        if self.tls_pending is not None:  # finish the handshake, so that deferred bytes are delivered
            self.complete(TLS_CLIENT if self.tls_pending is Side.CLIENT else TLS_SERVER)
        return self.run

    def data(self, side: Side, chunk: bytes) -> None:
        if self.relaying:  # raw relay: counted as if the session had passed it on
            (self.run.to_server if side is Side.CLIENT else self.run.to_client).extend(chunk)
            return
        if self.tls_pending is side:
            return  # plaintext left over on the side being upgraded: dropped
        if self.tls_pending is not None:
            self.deferred.append((side, chunk))
            return
        if not self.finished:
            (self.client_stream if side is Side.CLIENT else self.server_stream).extend(chunk)
        call = self.session.client_data if side is Side.CLIENT else self.session.server_data
        self.check(call(chunk), data=True)

    def complete(self, which: int) -> None:
        if which in (TOKEN_OK, TOKEN_FAILURE):
            if self.pending_token is not None and self.tls_pending is not None:
                return  # the driver would hold the answer until the handshake is over
            if self.pending_token is None:
                result = TokenOk("x", Secret(TOKEN)) if which == TOKEN_OK else TokenFailure("no")
                self.check_quiet(self.session.token_result(result))
                return
            username = self.pending_token.username
            self.pending_token = None
            if which == TOKEN_FAILURE:
                self.check(self.session.token_result(TokenFailure("no token for you")))
                return
            self.token_given = True
            self.blobs = (sasl.xoauth2(username, Secret(TOKEN)), sasl.oauthbearer(username, Secret(TOKEN)))
            self.check(self.session.token_result(TokenOk(username, Secret(TOKEN))))
            return
        side = Side.CLIENT if which == TLS_CLIENT else Side.SERVER
        if self.tls_pending is not side:
            self.check_quiet(self.session.tls_started(side))
            return
        self.tls_pending = None
        self.tls_done.add(side)
        self.check(self.session.tls_started(side))
        deferred, self.deferred = self.deferred, []
        for other, chunk in deferred:
            self.data(other, chunk)

    # ------------------------------------------------------------------------------------- checks

    def check_quiet(self, actions: list[Action]) -> None:
        """A completion nobody asked for may be logged, nothing else."""
        assert all(isinstance(a, Log) for a in actions), f"an unasked completion acted: {actions}"

    def check(self, actions: list[Action], data: bool = False) -> None:
        assert isinstance(actions, list)
        if self.finished:
            if data:
                assert actions == [], f"actions after Relay/Close: {actions}"
            else:
                self.check_quiet(actions)
            return
        for index, action in enumerate(actions):
            last = index == len(actions) - 1
            if isinstance(action, SendToClient):
                self.to_client(action.data)
            elif isinstance(action, SendToServer):
                self.to_server(action)
            elif isinstance(action, Log):
                self.log(action.message)
            elif isinstance(action, NeedToken):
                assert self.pending_token is None, "a second NeedToken"
                self.pending_token = action
                self.usernames.append(action.username)
                self.passwords.append(action.password.reveal())
                self.milestone("token", action.username, action.password.reveal())
            elif isinstance(action, StartTls):
                self.start_tls(action.side)
            elif isinstance(action, Relay):
                assert last, f"Relay is not last: {actions}"
                assert self.client_stream.endswith(action.to_server), (
                    "Relay.to_server is not the client's tail"
                )
                assert self.server_stream.endswith(action.to_client), (
                    "Relay.to_client is not the server's tail"
                )
                self.milestone("relay")  # before the leftovers: how much is left over depends on the split
                self.to_client(action.to_client)
                self.run.to_server += action.to_server
                self.finished = self.relaying = True
            else:
                assert isinstance(action, Close), action
                assert last, f"Close is not last: {actions}"
                others = [a for a in actions[:index] if not isinstance(a, Log)]
                assert others and isinstance(others[-1], SendToClient), f"Close without a reply: {actions}"
                self.milestone("close")
                self.finished = True

    def milestone(self, *what: object) -> None:
        self.run.milestones.append((*what, len(self.run.to_client), len(self.run.to_server)))

    def secrets_leaked_by_server(self) -> bool:
        return TOKEN.encode() in self.server_stream or any(blob in self.server_stream for blob in self.blobs)

    def to_client(self, data: bytes) -> None:
        if not self.secrets_leaked_by_server():
            assert TOKEN.encode() not in data, f"token sent to the client: {data!r}"
            assert not any(blob in data for blob in self.blobs), f"token blob sent to the client: {data!r}"
        self.run.to_client += data

    def to_server(self, action: SendToServer) -> None:
        assert self.pending_token is None, f"sent upstream while the token is awaited: {action}"
        carries_token = TOKEN.encode() in action.data or any(blob in action.data for blob in self.blobs)
        if carries_token and TOKEN.encode() not in self.client_stream:
            assert action.sensitive, f"token sent upstream without sensitive=True: {action.data!r}"
        if action.sensitive:
            assert self.token_given, "sensitive send before any token"
        self.run.to_server += action.data

    def log(self, message: str) -> None:
        if TOKEN in message:
            assert self.secrets_leaked_by_server() or TOKEN.encode() in self.client_stream, (
                f"token logged: {message!r}"
            )
        for password in self.passwords:
            raw = password.encode("utf-8", "replace")
            # only passwords that cannot be in a log line for another reason: long enough, with a
            # character the proxy's own wording never uses, not part of a user name or tag (both are
            # logged), not sent by the server (its error text is logged)
            if (
                len(password) >= 6
                and any(char in "!#$&~^|`" for char in password)
                and raw not in self.server_stream
                and self.client_stream.count(raw) <= 1
                and not any(password in username for username in self.usernames)
            ):
                assert password not in message, f"password logged: {message!r}"

    def start_tls(self, side: Side) -> None:
        options = self.options
        assert self.tls_pending is None and side not in self.tls_done, f"StartTls({side}) again"
        if side is Side.CLIENT:
            assert options.local_starttls and not options.client_tls, "StartTls(CLIENT) not allowed"
        else:
            assert options.server_starttls and not self.run.to_client, "StartTls(SERVER) not allowed"
        self.tls_pending = side
        self.milestone("tls", side.value)


def run_session(session_cls: type[Session], data: bytes, merge: tuple[int, ...] = (CLIENT, SERVER)) -> Run:
    """Play fuzzer input against a fresh session, check it, and check that the output is the same when
    adjacent chunks from one side (of ``merge``) are joined: split points must not matter.

    All harnesses merge both sides. (The IMAP harness merged client chunks only while the IMAP session
    drained server lines before client lines: finding 1 in fuzz/README.md, since fixed.)
    """
    options, events = decode(data)
    run = Driver(session_cls(options)).play(events)
    again = Driver(session_cls(options)).play(merged(events, merge))
    assert run.to_server == again.to_server, "split points changed what went upstream"
    assert run.to_client == again.to_client, "split points changed what reached the client"
    assert run.milestones == again.milestones, "split points changed what happened when"
    return run
