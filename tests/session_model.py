"""A driver-and-client model for stateful fuzzing of the protocol sessions (see test_fuzz_stateful.py).

:class:`SessionMachine` plays the asyncio driver (it drops plaintext on a side being upgraded to TLS and
defers the other side's bytes until the handshake is done, answers NeedToken and StartTls) and a mail
client that pipelines freely but follows the protocol where it must wait: it sends a SASL continuation
only after the proxy's own prompt, and waits for the answer to STARTTLS. A :class:`Dialect` supplies the
protocol's vocabulary. Every batch of actions is checked against the session contract
(/work/briefs/protocols.md):

- no exception; after Relay or Close no further action (completions may still log);
- Relay and Close end their batch; Close follows a reply to the client; Relay follows the server's
  success line, and its leftovers are exactly the unprocessed tails of both byte streams;
- before the client is greeted only the proxy's own STARTTLS set-up goes upstream; during the upstream
  login only the proxy's AUTH commands and sensitive token blobs; otherwise every byte sent upstream is
  a contiguous run of what the client sent, in order (nothing invented, nothing reordered);
- nothing goes upstream while a token is awaited; one NeedToken at a time, carrying exactly the user
  name and password of a login the client sent;
- a password (and its base64 forms) never goes upstream nor into a Log; a token (and its SASL blobs)
  never goes to the client nor into a Log, and upstream only in a ``sensitive`` send;
- StartTls(CLIENT) only right after the proxy's "go ahead" answer to the client's STARTTLS/STLS, only
  with local_starttls on, not on an implicit-TLS listener and only once; the bytes injected after that
  STARTTLS never reach the server; StartTls(SERVER) only with server_starttls, before any client byte;
- flooding either side with more than max_buffer + max_line bytes (plus one IMAP LOGIN literal) that
  the session cannot forward leads to Close.

Logins the model cannot vouch for (sent after raw garbage, after a server line that may turn the
client's next line into a continuation, or a synchronising literal sent without waiting when it is
over max_literal) are exempt from the password-upstream check; everything else is checked always.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from hypothesis import note, target
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

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
from tests.session_dialect import PASSWORD_MARK, PASSWORD_TEXT, PREFIX, Dialect


@dataclass
class Login:
    username: str
    password: str
    #: byte strings that reveal the password: its unique prefix, and the base64 blobs that carry it
    secrets: tuple[bytes, ...]
    checked: bool
    resolved: bool = False  # a NeedToken carried it


@dataclass
class Awaiting:
    """The client waits for the proxy's prompt before sending the next step of an exchange."""

    since: int  # position in the client's view where the wait began
    prompt: re.Pattern[bytes]
    error: re.Pattern[bytes]  # an answer that makes the client give up
    steps: list[tuple[bytes, re.Pattern[bytes] | None]]  # (payload, prompt expected after it)


@dataclass
class Observed:
    forwarded: int = 0  # client bytes sent upstream
    to_client: int = 0
    closed: bool = False


def _split(data: st.DataObject, payload: bytes) -> list[bytes]:
    """``payload`` cut at up to six random points (chunks may be one byte long)."""
    if not payload:
        return [payload]
    cuts = data.draw(st.lists(st.integers(1, len(payload)), max_size=6), label="cuts")
    points = sorted({0, len(payload), *cuts})
    return [payload[a:b] for a, b in itertools.pairwise(points)]


_GARBAGE_LINE = st.binary(max_size=40).filter(
    lambda b: (
        b"\n" not in b and not re.search(rb"(?i)auth|login|user|pass|tls|data|bdat|apop|idle|pw!|\}\r?$", b)
    )
)


class SessionMachine(RuleBasedStateMachine):
    dialect: ClassVar[Dialect]
    #: the session class under test (a mutant in the self-tests)
    session_cls: ClassVar[type[Session] | None] = None

    def __init__(self) -> None:
        super().__init__()
        self.options = SessionOptions()
        self.session: Session = self.dialect.session_cls(self.options)
        self.finished = False
        self.client_stream = bytearray()  # client bytes the session was given
        self.server_stream = bytearray()
        self.view = bytearray()  # what the client was sent
        self.cursor = 0  # how far into client_stream the forwarded bytes have come
        self.greeted = False  # the client was sent something
        self.pending_token: NeedToken | None = None
        self.auth_phase = False  # a TokenOk was given and the upstream login is not over
        self.tokens: list[bytes] = []  # every token and token blob ever handed out
        self.blobs: tuple[bytes, ...] = ()  # the current token's SASL blobs
        self.tls_pending: Side | None = None
        self.client_upgraded = self.server_upgraded = False
        self.deferred: list[tuple[Side, bytes]] = []
        self.logins: list[Login] = []
        self.dirty = False  # raw garbage was sent: later logins may be framed differently
        self.tainted = False
        self.awaiting: Awaiting | None = None
        self.starttls_marker: bytes | None = None  # the injection after a STARTTLS in flight
        self.injections: dict[bytes, bool] = {}  # marker -> the STARTTLS before it was accepted
        self.forwarded_authenticate = False
        self.relayed = False
        self.tags: list[bytes] = []  # tags of forwarded IMAP commands, for the server's replies
        self.upstream: list[bytes] = []  # everything sent upstream, for the server's replies
        self.counter = 0

    # ----------------------------------------------------------------------------------------- set-up

    @initialize(data=st.data())
    def start(self, data: st.DataObject) -> None:
        limits = st.tuples(
            st.sampled_from([128, 1024]), st.sampled_from([8, 4096, 4096]), st.sampled_from([1024, 4096])
        )
        max_line, max_literal, max_buffer = data.draw(limits, label="max_line, max_literal, max_buffer")
        server_starttls, local_starttls, client_tls = data.draw(
            st.tuples(
                st.sampled_from([False, False, True]), st.booleans(), st.sampled_from([False, False, True])
            ),
            label="server_starttls, local_starttls, client_tls",
        )
        self.options = SessionOptions(
            server_starttls=server_starttls,
            local_starttls=local_starttls,
            client_tls=client_tls,
            max_line=max_line,
            max_literal=max_literal,
            max_buffer=max_buffer,
        )
        self.session = (self.session_cls or self.dialect.session_cls)(self.options)
        if data.draw(st.integers(0, 9), label="greet") > 0:
            self.server_payload(data, self.dialect.greeting(data))
            opening = self.dialect.opening
            if opening and self.greeted and not self.finished and data.draw(st.integers(0, 3), label="open"):
                self.client_payload(data, opening)
                self.server_reply(data, sensible=True)

    # ----------------------------------------------------------------------------------------- helpers

    def fresh(self) -> int:
        self.counter += 1
        return self.counter

    def new_login(self, username: str, password: str, *secrets: bytes, vouched: bool = True) -> Login:
        login = Login(
            username,
            password,
            (password[: password.index("#") + 1].encode(), *secrets),
            checked=vouched and not (self.dirty or self.tainted),
        )
        self.logins.append(login)
        return login

    def password(self, data: st.DataObject, text: st.SearchStrategy[str] = PASSWORD_TEXT) -> str:
        return f"{PASSWORD_MARK}{self.fresh()}#" + data.draw(text, label="password")

    @property
    def client_free(self) -> bool:
        """The client may send something new now."""
        return (
            not self.finished
            and self.tls_pending is None
            and self.awaiting is None
            and self.starttls_marker is None
        )

    def client_payload(self, data: st.DataObject, payload: bytes) -> Observed:
        note(f"client sends {payload!r}")
        total = Observed()
        for chunk in _split(data, payload):
            seen = self.deliver(Side.CLIENT, chunk)
            total.forwarded += seen.forwarded
            total.to_client += seen.to_client
            total.closed |= seen.closed
        return total

    def server_payload(self, data: st.DataObject, payload: bytes) -> Observed:
        note(f"server sends {payload!r}")
        total = Observed()
        for chunk in _split(data, payload):
            seen = self.deliver(Side.SERVER, chunk)
            total.forwarded += seen.forwarded
            total.to_client += seen.to_client
            total.closed |= seen.closed
        return total

    def deliver(self, side: Side, chunk: bytes) -> Observed:
        """Hand bytes to the session the way the driver does."""
        call = self.session.client_data if side is Side.CLIENT else self.session.server_data
        if self.tls_pending is side:
            assert call(chunk) == [], "plaintext on a side being upgraded must be dropped"
            return Observed()
        if self.tls_pending is not None:
            self.deferred.append((side, chunk))
            return Observed()
        stream = self.client_stream if side is Side.CLIENT else self.server_stream
        start = len(stream)
        if not self.finished:
            stream += chunk
        taint = self.dialect.taint
        if side is Side.SERVER and taint is not None:
            # A line that may turn the client's next line into something else, unless the proxy itself
            # consumes it during the upstream login; a line after another line in the same chunk may
            # come after the login ended, so it counts too.
            region = bytes(self.server_stream[max(start - 1, 0) :])  # from the byte before the chunk
            if self.auth_phase:
                end = chunk.find(b"\n")  # only lines after the chunk's first one
                region = region[len(region) - len(chunk) + end :] if 0 <= end < len(chunk) - 1 else b""
            if region and taint.search(region):
                self.taint_logins()
        return self.observe(call(chunk), "data")

    def taint_logins(self) -> None:
        self.tainted = True
        for login in self.logins:
            if not login.resolved:
                login.checked = False

    # -------------------------------------------------------------------------------------- the checks

    def observe(self, actions: list[Action], origin: str) -> Observed:
        seen = Observed()
        assert isinstance(actions, list)
        if self.finished:
            if origin == "data":
                assert actions == [], f"actions after Relay/Close: {actions}"
            else:
                assert all(isinstance(a, Log) for a in actions), f"actions after Relay/Close: {actions}"
            return seen
        for index, action in enumerate(actions):
            last = index == len(actions) - 1
            before = [a for a in actions[:index] if not isinstance(a, Log)]
            if isinstance(action, SendToClient):
                self.check_to_client(action, seen)
            elif isinstance(action, SendToServer):
                self.check_to_server(action, seen)
            elif isinstance(action, Log):
                self.check_log(action)
            elif isinstance(action, NeedToken):
                self.check_need_token(action)
            elif isinstance(action, StartTls):
                self.check_start_tls(action, before)
            elif isinstance(action, Relay):
                assert last, f"Relay is not the last action: {actions}"
                self.check_relay(action, before)
            else:
                assert isinstance(action, Close), action
                assert last, f"Close is not the last action: {actions}"
                assert before and isinstance(before[-1], SendToClient), f"Close without a reply: {actions}"
                seen.closed = True
                self.finish()
        self.settle()
        return seen

    def teardown(self) -> None:
        # steer generation towards runs that get far: logins resolved, tokens used, relays reached
        depth = sum(login.resolved for login in self.logins) + len(self.tokens) // 3 + 5 * self.relayed
        target(float(depth), label="depth")

    def finish(self) -> None:
        self.finished = True
        self.awaiting = None
        self.starttls_marker = None

    def check_to_client(self, action: SendToClient, seen: Observed) -> None:
        data = action.data
        for secret in self.tokens:
            assert secret not in data, f"token sent to the client: {data!r}"
        self.greeted = True
        self.view += data
        seen.to_client += len(data)
        if self.auth_phase and self.dialect.failure.search(data):
            self.auth_phase = False
        if self.starttls_marker is not None and self.dialect.starttls_refused.search(data):
            self.injections[self.starttls_marker] = False
            self.starttls_marker = None

    def check_to_server(self, action: SendToServer, seen: Observed) -> None:
        data = action.data
        self.upstream.append(data)
        assert self.pending_token is None, f"sent upstream while the token is awaited: {data!r}"
        for secret in self.tokens:
            assert action.sensitive or secret not in data, f"token sent without sensitive=True: {data!r}"
        if action.sensitive:
            assert self.auth_phase and any(blob in data for blob in self.blobs), f"sensitive? {data!r}"
        for login in self.logins:
            for secret in login.secrets if login.checked else ():
                assert secret not in data, f"password of {login} sent upstream: {data!r}"
        for marker, accepted in self.injections.items():
            assert not (accepted and marker in data), f"bytes injected after STARTTLS sent upstream: {data!r}"
        if not self.greeted:
            assert data in self.dialect.upstream_setup, f"upstream before the greeting: {data!r}"
        elif self.auth_phase:
            assert action.sensitive or self.dialect.auth_command.fullmatch(data), f"during login: {data!r}"
        else:
            index = self.client_stream.find(data, self.cursor)
            assert index >= 0, f"sent upstream but not (in this order) sent by the client: {data!r}"
            self.cursor = index + len(data)
            seen.forwarded += len(data)
            self.forwarded_authenticate |= b" AUTHENTICATE " in data.upper()

    def check_log(self, action: Log) -> None:
        message = action.message
        for secret in self.tokens:
            assert secret.decode() not in message, f"token logged: {message!r}"
        for login in self.logins:
            if login.checked:
                assert login.secrets[0].decode() not in message, f"password logged: {message!r}"

    def check_need_token(self, action: NeedToken) -> None:
        assert self.pending_token is None and not self.auth_phase, "a second NeedToken"
        password = action.password.reveal()
        if not self.dirty and PASSWORD_MARK in password:
            sent = [login for login in self.logins if login.password == password]
            assert sent, f"NeedToken with a password the client never sent: {password!r}"
            assert sent[0].username == action.username, (action.username, sent[0])
            sent[0].resolved = True
        self.pending_token = action

    def check_start_tls(self, action: StartTls, before: Sequence[Action]) -> None:
        options = self.options
        if action.side is Side.CLIENT:
            assert options.local_starttls and not options.client_tls and not self.client_upgraded
            assert self.starttls_marker is not None, "StartTls(CLIENT) without a STARTTLS command"
            assert before and isinstance(before[-1], SendToClient)
            assert self.dialect.starttls_ok.search(before[-1].data), before[-1]
            self.injections[self.starttls_marker] = True
            self.starttls_marker = None
        else:
            assert options.server_starttls and not self.server_upgraded and not self.greeted
        assert self.tls_pending is None
        self.tls_pending = action.side

    def check_relay(self, action: Relay, before: Sequence[Action]) -> None:
        assert self.client_stream.endswith(action.to_server), "Relay.to_server is not the client's tail"
        assert self.server_stream.endswith(action.to_client), "Relay.to_client is not the server's tail"
        for secret in self.tokens:
            assert secret not in action.to_client
        for marker, accepted in self.injections.items():
            assert not (accepted and marker in action.to_server), "injected bytes relayed upstream"
        assert before and isinstance(before[-1], SendToClient), "Relay without the success line"
        line = before[-1].data
        assert self.dialect.success.search(line), f"Relay after {line!r}"
        assert self.auth_phase or self.dialect.relay_also_ok(self, line), f"Relay without a login: {line!r}"
        self.relayed = True
        self.finish()

    def driver_turn(self, data: st.DataObject) -> None:
        """The driver often completes a pending NeedToken or StartTls right away (the rules below do it
        later, interleaved with more bytes)."""
        if self.tls_pending is not None and data.draw(st.booleans(), label="tls now"):
            self.tls_done()
        if self.pending_token is not None and self.tls_pending is None:
            answer = data.draw(st.sampled_from(["later", "ok", "ok", "failure"]), label="token now")
            if answer == "ok":
                self.token_ok(data)
            elif answer == "failure":
                self.token_failure("no token for you")

    def settle(self) -> None:
        """The client notices an answer that ends what it waits for."""
        awaiting = self.awaiting
        if awaiting is not None and awaiting.error.search(bytes(self.view[awaiting.since :])):
            self.awaiting = None

    # --------------------------------------------------------------------------------- client rules

    @precondition(lambda self: self.client_free)
    @rule(data=st.data(), kind=st.sampled_from(["command"] * 7 + ["starttls", "garbage line", "garbage"]))
    def client_command(self, data: st.DataObject, kind: str) -> None:
        """A command that is not a login; sometimes STARTTLS with a command injected after it, a garbage
        line (which cannot change how later lines are framed), or raw garbage (which can: dirty)."""
        if kind == "command":
            self.dialect.command(data, self)
        elif kind == "starttls":
            marker = b"INJ%dX" % self.fresh()
            self.starttls_marker = marker
            self.client_payload(data, self.dialect.starttls(marker, self))
            self.settle()
        elif kind == "garbage line":
            self.client_payload(data, data.draw(_GARBAGE_LINE, label="garbage line") + b"\r\n")
        else:
            self.dirty = True
            self.client_payload(data, data.draw(st.binary(min_size=1, max_size=60), label="garbage"))
        self.driver_turn(data)

    @precondition(lambda self: self.client_free)
    @rule(data=st.data())
    def client_login(self, data: st.DataObject) -> None:
        self.dialect.login(data, self)

    def begin_exchange(
        self,
        data: st.DataObject,
        first: bytes,
        prompt: re.Pattern[bytes],
        error: re.Pattern[bytes],
        steps: list[tuple[bytes, re.Pattern[bytes] | None]],
    ) -> None:
        since = len(self.view)
        self.awaiting = Awaiting(since, prompt, error, steps)
        self.client_payload(data, first)
        self.settle()
        self.driver_turn(data)

    @precondition(
        lambda self: (
            self.awaiting is not None
            and self.awaiting.prompt.search(bytes(self.view[self.awaiting.since :])) is not None
        )
    )
    @rule(data=st.data())
    def client_continues(self, data: st.DataObject) -> None:
        assert self.awaiting is not None
        payload, prompt = self.awaiting.steps.pop(0)
        since = len(self.view)
        if prompt is None:
            self.awaiting = None
        else:
            self.awaiting = Awaiting(since, prompt, self.awaiting.error, self.awaiting.steps)
        self.client_payload(data, payload)
        self.settle()
        self.driver_turn(data)

    @precondition(lambda self: self.awaiting is not None)
    @rule()
    def client_gives_up(self) -> None:
        """The client stops waiting; a late prompt could now meet other bytes, so it counts as garbage."""
        self.awaiting = None
        self.dirty = True

    @precondition(lambda self: not self.finished and self.tls_pending is Side.CLIENT)
    @rule(data=st.data(), garbage=st.binary(min_size=1, max_size=30))
    def client_during_handshake(self, data: st.DataObject, garbage: bytes) -> None:
        self.client_payload(data, garbage)

    def buffer_bound(self) -> int:
        options = self.options
        return (
            options.max_buffer + options.max_line + (options.max_literal if self.dialect.literal_slack else 0)
        )

    @precondition(lambda self: self.client_free)
    @rule(
        data=st.data(),
        kind=st.sampled_from(["client", "commands", "server", "server lines", *["none"] * 28]),
        parts=st.integers(1, 8),
    )
    def flood(self, data: st.DataObject, kind: str, parts: int) -> None:
        """More than the buffer limits allow, without a line end or as many pipelined commands; the
        session must close unless it could pass the bytes on (rare: it ends most runs)."""
        bound = self.buffer_bound()
        if kind == "client":
            unit, side, slack = b"Z", Side.CLIENT, 0
        elif kind == "commands":
            unit, side, slack = self.dialect.noop, Side.CLIENT, 2 * len(self.dialect.noop)
        elif kind == "server" and self.greeted:
            unit, side, slack = b"z", Side.SERVER, 0
        elif kind == "server lines" and self.greeted:
            unit, side, slack = self.dialect.server_flood_line, Side.SERVER, 0
        else:
            return
        per_part = (bound + slack) // (parts * len(unit)) + 1
        size = per_part * parts * len(unit)
        note(f"{side.value} floods {size} bytes of {unit!r}")
        passed = 0
        closed = False
        for _ in range(parts):
            seen = self.deliver(side, unit * per_part)
            passed += seen.forwarded if side is Side.CLIENT else seen.to_client
            closed |= seen.closed
        if side is Side.CLIENT:
            self.dirty |= kind == "client"
        assert closed or size - passed - slack <= bound, (
            f"{size} {side.value} bytes ({unit!r}...): {passed} passed on, no Close"
        )

    @precondition(lambda self: self.finished)
    @rule(data=st.data(), side=st.sampled_from([Side.CLIENT, Side.SERVER]))
    def after_the_end(self, data: st.DataObject, side: Side) -> None:
        """The driver never calls the session after Relay or Close; if it did, nothing may come back."""
        call = self.session.client_data if side is Side.CLIENT else self.session.server_data
        chunk = data.draw(st.sampled_from([b"", b"a NOOP\r\n", b"+OK\r\n", b"250 ok\r\n", b"\xff"]))
        self.observe(call(chunk), "data")

    # --------------------------------------------------------------------------------- server rules

    @precondition(lambda self: not self.finished)
    @rule(data=st.data(), sensible=st.sampled_from([True, True, True, False]))
    def server_reply(self, data: st.DataObject, sensible: bool) -> None:
        """Mostly the reply a server would give to the last command sent upstream, else any reply."""
        if not sensible:
            fragments = []
        elif not self.upstream and not self.greeted:
            fragments = self.dialect.good_greetings()
        else:
            fragments = self.dialect.sensible(self)
        if fragments:
            payload = data.draw(st.sampled_from(fragments), label="reply") + b"\r\n"
        else:
            payload = self.dialect.server_reply(data, self)
        self.server_payload(data, payload)
        self.driver_turn(data)

    @precondition(lambda self: not self.finished)
    @rule(data=st.data(), garbage=st.booleans())
    def server_odd(self, data: st.DataObject, garbage: bool) -> None:
        """A continuation request out of turn, or garbage."""
        if garbage:
            self.server_payload(data, data.draw(st.binary(min_size=1, max_size=60), label="garbage"))
        else:
            self.server_payload(data, self.dialect.server_continuation(data))
        self.driver_turn(data)

    # ----------------------------------------------------------------------------------- completions

    @precondition(lambda self: self.pending_token is not None and self.tls_pending is None)
    @rule(data=st.data())
    def token_ok(self, data: st.DataObject) -> None:
        assert self.pending_token is not None
        username = self.pending_token.username
        token = f"Tk!{self.fresh()}#" + data.draw(st.text("abcXYZ019._-", max_size=20), label="token")
        secret = Secret(token)
        self.blobs = (sasl.xoauth2(username, secret), sasl.oauthbearer(username, secret))
        self.tokens += [token.encode(), *self.blobs]
        self.pending_token = None
        self.auth_phase = True
        note(f"token ok: {token!r}")
        finished = self.finished
        actions = self.session.token_result(TokenOk(username, secret))
        self.observe(actions, "completion")
        assert finished or any(isinstance(a, SendToServer) for a in actions), (
            f"no upstream login after TokenOk: {actions}"
        )

    @precondition(lambda self: self.pending_token is not None and self.tls_pending is None)
    @rule(message=st.sampled_from(["no token for you", "Invalid password"]))
    def token_failure(self, message: str) -> None:
        self.pending_token = None
        note(f"token failure: {message!r}")
        finished = self.finished
        actions = self.session.token_result(TokenFailure(message))
        self.observe(actions, "completion")
        replies = b"".join(a.data for a in actions if isinstance(a, SendToClient))
        assert finished or PREFIX + message.encode() in replies, (
            f"the failure did not reach the client: {actions}"
        )

    @precondition(lambda self: self.tls_pending is not None and not self.finished)
    @rule()
    def tls_done(self) -> None:
        side = self.tls_pending
        assert side is not None
        self.tls_pending = None
        if side is Side.CLIENT:
            self.client_upgraded = True
        else:
            self.server_upgraded = True
        note(f"tls started on the {side.value} side")
        self.observe(self.session.tls_started(side), "completion")
        deferred, self.deferred = self.deferred, []
        for other, chunk in deferred:
            self.deliver(other, chunk)

    @precondition(lambda self: self.pending_token is None and self.tls_pending is None)
    @rule(which=st.sampled_from(["ok", "failure", "client", "server"]))
    def unexpected_completion(self, which: str) -> None:
        """Completions nobody asked for change nothing (the driver never sends them; the session must
        cope anyway)."""
        call: Callable[[], list[Action]]
        if which == "ok":
            call = lambda: self.session.token_result(TokenOk("x", Secret("Tk!0#unasked")))  # noqa: E731
        elif which == "failure":
            call = lambda: self.session.token_result(TokenFailure("unasked"))  # noqa: E731
        else:
            side = Side.CLIENT if which == "client" else Side.SERVER
            call = lambda: self.session.tls_started(side)  # noqa: E731
        actions = call()
        assert all(isinstance(a, Log) for a in actions), f"unexpected {which} completion acted: {actions}"
