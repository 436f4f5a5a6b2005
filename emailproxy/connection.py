"""The one asyncio driver: runs a protocol Session between a local client and the upstream server.

Before login every byte goes through the session's state machine and its actions are executed here.
After login (the ``Relay`` action) the two transports are joined directly: each chunk read on one side is
written to the other, and reading pauses while the other side's write buffer is full (flow control), so
a slow reader cannot make memory grow. The client end is an asyncio transport from the listener; the server
end is emailproxy/upstream.py's transport (OpenSSL on the socket, STARTTLS in place).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from emailproxy.config import ServerConfig
from emailproxy.limits import LoginBackoff, normalise_address
from emailproxy.log import ConnectionLog
from emailproxy.protocols.events import (
    Action,
    Close,
    Log,
    NeedToken,
    Relay,
    SendToClient,
    SendToServer,
    Session,
    Side,
    StartTls,
    TokenFailure,
    TokenOk,
    TokenResult,
)
from emailproxy.secret import Secret
from emailproxy.tls import share_read_buffer
from emailproxy.upstream import open_upstream, start_tls

REDACTED = "[[ credentials hidden ]]"
#: write buffer size at which reading from the other side pauses (per direction, after login)
RELAY_HIGH_WATER = 256 * 1024


class TokenProvider(Protocol):
    async def get_token(self, username: str, password: Secret) -> TokenResult: ...


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 30.0  # TCP connect plus TLS handshake to the upstream server
    login: float = 300.0  # from accept until the upstream accepted the token
    handshake: float = 30.0  # a STARTTLS handshake on either side


class _End(asyncio.Protocol):
    """One end of a proxied connection. It only forwards transport events to its ProxyConnection."""

    def __init__(self, conn: ProxyConnection, side: Side) -> None:
        self.conn = conn
        self.side = side
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a cast, not an isinstance check: uvloop's transports do not derive from asyncio.Transport
        self.transport = cast(asyncio.Transport, transport)
        share_read_buffer(transport)  # no 256 KiB receive buffer per TLS connection (see tls.py)
        self.conn.end_connected(self.side)

    def data_received(self, data: bytes) -> None:
        self.conn.data_received(self.side, data)

    def eof_received(self) -> bool:
        self.conn.end_closed(self.side, None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.end_closed(self.side, exc)

    def pause_writing(self) -> None:
        self.conn.other(self.side).pause_reading()

    def resume_writing(self) -> None:
        self.conn.other(self.side).resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class ProxyConnection:
    """Drives one client connection from accept to close."""

    def __init__(
        self,
        settings: ServerConfig,
        session: Session,
        tokens: TokenProvider,
        *,
        upstream_tls: ssl.SSLContext,
        local_tls: ssl.SSLContext | None,
        timeouts: Timeouts,
        log: ConnectionLog,
        on_closed: Callable[[ProxyConnection], None] = lambda _c: None,
        backoff: LoginBackoff | None = None,
        on_opened: Callable[[ProxyConnection], None] = lambda _c: None,
    ) -> None:
        self.settings = settings
        self.session = session
        self.tokens = tokens
        self.upstream_tls = upstream_tls
        self.local_tls = local_tls
        self.timeouts = timeouts
        self.log = log
        self.on_closed = on_closed
        #: called once the client is connected (on an implicit-TLS listener: after its handshake, which,
        #: when it fails, asyncio reports to nobody; so a connection counts as open only from here on)
        self.on_opened = on_opened
        self.backoff = backoff  # failed local logins per client address (None: not tracked)
        self.client_address = ""
        self.client = _End(self, Side.CLIENT)
        self.server = _End(self, Side.SERVER)
        self.relaying = False
        self.closed = False
        self._upgrading: Side | None = None
        self._deferred: deque[Callable[[], None]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._login_timer: asyncio.TimerHandle | None = None
        self.bytes_up = 0
        self.bytes_down = 0

    # ------------------------------------------------------------------------------------------ plumbing

    def end(self, side: Side) -> _End:
        return self.client if side is Side.CLIENT else self.server

    def other(self, side: Side) -> _End:
        return self.server if side is Side.CLIENT else self.client

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------------------------------ events

    def end_connected(self, side: Side) -> None:
        if side is Side.CLIENT:
            self.client_address = _peer_address(self.client.transport)
            self.on_opened(self)
            # hold the client until the upstream is there; its bytes wait in the kernel
            self.client.pause_reading()
            loop = asyncio.get_running_loop()
            self._login_timer = loop.call_later(self.timeouts.login, self._login_timed_out)
            self._spawn(self._connect_upstream())

    async def _connect_upstream(self) -> None:
        s = self.settings
        tls = None if s.server_starttls else self.upstream_tls
        try:
            await asyncio.wait_for(
                open_upstream(self.server, s.server_address, s.server_port, tls=tls,
                              server_hostname=s.server_address),
                self.timeouts.connect,
            )
        except (OSError, TimeoutError, ssl.SSLError) as e:
            reason = _describe_error(e)
            self.log.error("could not connect to %s:%d: %s", s.server_address, s.server_port, reason)
            self._fail(f"could not connect to {s.server_address}:{s.server_port} ({reason})")
            return
        if self.closed:
            self.server.close()
            return
        _ack_quickly(self.server.transport)
        self.log.debug("connected to %s:%d%s", s.server_address, s.server_port,
                       "" if tls is None else " (TLS)")
        self.client.resume_reading()

    def data_received(self, side: Side, data: bytes) -> None:
        if self.closed:
            return
        if self.relaying:
            # the hot path: no parsing, no copies beyond what the transports do
            if side is Side.CLIENT:
                self.bytes_up += len(data)
                self.server.write(data)
            else:
                self.bytes_down += len(data)
                self.client.write(data)
            return
        if side is Side.SERVER:
            _ack_quickly(self.server.transport)
        if self._upgrading is not None:
            # bytes on the side being upgraded are plaintext leftovers: dropped (injection defence)
            if side is not self._upgrading:
                self._deferred.append(lambda: self.data_received(side, data))
            return
        if side is Side.CLIENT:
            actions = self.session.client_data(data)
        else:
            actions = self.session.server_data(data)
        self._execute(actions)

    def end_closed(self, side: Side, exc: Exception | None) -> None:
        if self.closed:
            return
        if self._upgrading is side:
            return  # the old transport going away during start_tls is not a disconnect
        if not self.relaying:
            detail = f" ({_describe_error(exc)})" if exc else ""
            self.log.info("%s disconnected before login%s", side.value, detail)
            if side is Side.SERVER and self.client.transport is not None:
                self.client.write(self.session.error_reply("the server closed the connection"))
        self.close(f"{side.value} disconnected")

    # ------------------------------------------------------------------------------------------ actions

    def _execute(self, actions: Sequence[Action]) -> None:
        for index, action in enumerate(actions):
            if self.closed:
                return
            if isinstance(action, SendToServer):
                self._log_data("proxy -> server", action.data, action.sensitive)
                self.server.write(action.data)
                # after the send: sending re-arms delayed ACKs, and the server's reply may be held
                # behind an unacknowledged segment (its TLS session tickets) by Nagle's algorithm
                _ack_quickly(self.server.transport)
            elif isinstance(action, SendToClient):
                self._log_data("proxy -> client", action.data, action.sensitive)
                self.client.write(action.data)
            elif isinstance(action, Log):
                self.log.log(action.level, "%s", action.message)
            elif isinstance(action, NeedToken):
                self.log.account = action.username
                self._spawn(self._get_token(action))
            elif isinstance(action, StartTls):
                self._begin_upgrade(action.side, actions[index + 1:])
                return
            elif isinstance(action, Relay):
                self._enter_relay(action)
            elif isinstance(action, Close):
                self.log.info("closing: %s", action.reason)
                self.close(action.reason)
                return

    def _log_data(self, direction: str, data: bytes, sensitive: bool) -> None:
        if self.log.isEnabledFor(logging.DEBUG):
            self.log.debug("%s: %s", direction, REDACTED if sensitive else _printable(data))

    async def _get_token(self, request: NeedToken) -> None:
        refusal = self.backoff.refusal(self.client_address, request.username) if self.backoff else None
        if refusal is not None:
            message = refusal.message(request.username)
            self.log.info("login refused without checking the password: %s", message)
            result: TokenResult = TokenFailure(message)
        else:
            try:
                result = await self.tokens.get_token(request.username, request.password)
            except Exception:
                self.log.exception("unexpected error while getting a token")
                result = TokenFailure(
                    f"Login failed for account {request.username} - internal error (see the proxy's log)"
                )
            self._count_login(request.username, result)
        self._when_ready(lambda: self._execute(self.session.token_result(result)))

    def _count_login(self, username: str, result: TokenResult) -> None:
        """Tell the backoff about a login the local password decided (not IdP or network failures)."""
        if self.backoff is None:
            return
        if isinstance(result, TokenOk):
            self.backoff.succeeded(self.client_address, username)
        elif result.local:
            engaged = self.backoff.failed(self.client_address, username)
            if engaged is not None:
                self.log.warning(
                    "repeated failed logins from %s%s: its logins are refused for %d s",
                    self.client_address or "an unknown address",
                    "" if engaged.whole_address else f" for {username}",
                    engaged.seconds,
                )

    def _when_ready(self, event: Callable[[], None]) -> None:
        if self.closed:
            return
        if self._upgrading is not None:
            self._deferred.append(event)
        else:
            event()

    # ------------------------------------------------------------------------------------------ TLS upgrade

    def _begin_upgrade(self, side: Side, rest: Sequence[Action]) -> None:
        self._upgrading = side
        self.client.pause_reading()
        self.server.pause_reading()
        self._spawn(self._upgrade(side, list(rest)))

    async def _upgrade(self, side: Side, rest: list[Action]) -> None:
        end = self.end(side)
        ctx = self.upstream_tls if side is Side.SERVER else self.local_tls
        transport = end.transport
        if ctx is None or transport is None:
            self._fail("TLS is not configured for this listener")
            return
        try:
            new_transport = await start_tls(
                transport,
                end,
                ctx,
                server_side=side is Side.CLIENT,
                server_hostname=self.settings.server_address if side is Side.SERVER else None,
                handshake_timeout=self.timeouts.handshake,
            )
        except (OSError, TimeoutError, ssl.SSLError, ConnectionError) as e:
            reason = _describe_error(e)
            if side is Side.SERVER:
                self.log.error("TLS with %s failed: %s", self.settings.server_address, reason)
                self._upgrading = None
                self._fail(f"TLS with the server failed ({reason}); no credentials were sent")
            else:
                self.log.info("client TLS handshake failed: %s", reason)
                self._upgrading = None
                self.close("client TLS handshake failed")
            return
        if self.closed or new_transport is None:
            return
        end.transport = new_transport
        share_read_buffer(new_transport)
        self._upgrading = None
        self.log.debug("%s connection upgraded to TLS", side.value)
        self.client.resume_reading()
        self.server.resume_reading()
        self._execute(rest)
        self._execute(self.session.tls_started(side))
        while self._deferred and self._upgrading is None and not self.closed:
            self._deferred.popleft()()

    # -------------------------------------------------------------------------------------- relay and close

    def _enter_relay(self, action: Relay) -> None:
        if self._login_timer is not None:
            self._login_timer.cancel()
            self._login_timer = None
        self.relaying = True
        self.log.info("authenticated; relaying")
        for end in (self.client, self.server):
            if end.transport is not None:
                end.transport.set_write_buffer_limits(high=RELAY_HIGH_WATER)
        if action.to_client:
            self.client.write(action.to_client)
        if action.to_server:
            self.server.write(action.to_server)

    def _fail(self, message: str) -> None:
        """Tell the client what went wrong in its protocol's words, then close."""
        if self.closed:
            return
        self.client.write(self.session.error_reply(message))
        self.close(message)

    def _login_timed_out(self) -> None:
        self._login_timer = None
        if not self.relaying and not self.closed:
            self.log.info("no successful login within %d s", self.timeouts.login)
            self._fail("timed out waiting for a successful login")

    def goodbye(self) -> None:
        """The proxy is stopping: say so politely in the client's protocol, then close."""
        if self.closed:
            return
        self.client.write(self.session.goodbye())
        self.close("proxy shutting down")

    def flushing(self) -> bool:
        """True while this connection still has bytes waiting to be written."""
        return any(e.transport is not None and e.transport.get_write_buffer_size() > 0
                   for e in (self.client, self.server))

    def close(self, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        if self._login_timer is not None:
            self._login_timer.cancel()
            self._login_timer = None
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        self.client.close()
        self.server.close()
        if self.relaying:
            self.log.info("closed (%s); %d bytes up, %d bytes down", reason, self.bytes_up, self.bytes_down)
        self.on_closed(self)


def _peer_address(transport: asyncio.Transport | None) -> str:
    """The client's IP address as text (IPv4-mapped IPv6 addresses as IPv4), or "" if unknown."""
    peer = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, tuple) and peer and isinstance(peer[0], str):
        return normalise_address(peer[0])
    return ""


_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


def _ack_quickly(transport: asyncio.Transport | None) -> None:
    """Before login, acknowledge the server's segments at once. Servers that write a reply as several small
    segments (Postfix after a TLS handshake: session tickets, then its reply) wait for our ACK under Nagle's
    algorithm, and a delayed ACK would add ~40 ms to a login at random. Linux clears the flag again, so it
    is set after every read and every write before login: the session ticket itself is read inside
    asyncio's TLS layer, so only the flag set after our next write covers it."""
    if _QUICKACK is None or transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        except OSError:
            pass


def _printable(data: bytes, limit: int = 512) -> str:
    text = repr(data[:limit])[2:-1]
    return text + (f"... ({len(data)} bytes)" if len(data) > limit else "")


def _describe_error(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {e.verify_message}"
    text = str(e) or type(e).__name__
    return text
