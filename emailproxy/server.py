"""The listeners: one asyncio server per configured [IMAP-/POP-/SMTP-port] section, all in one process."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import socket
import ssl
from typing import cast

from emailproxy.config import Config, GlobalOptions, ServerConfig
from emailproxy.connection import ProxyConnection, Timeouts, TokenProvider
from emailproxy.limits import BackoffPolicy, LoginBackoff, Throttle
from emailproxy.log import ConnectionLog
from emailproxy.protocols.events import Session, SessionOptions
from emailproxy.protocols.imap import ImapSession
from emailproxy.protocols.pop import PopSession
from emailproxy.protocols.smtp import SmtpSession
from emailproxy.reload import ListenerPlan, needs_rebind, plan_listeners
from emailproxy.tls import local_context, upstream_context

log = logging.getLogger("emailproxy.server")

SESSIONS: dict[str, type[Session]] = {"IMAP": ImapSession, "POP": PopSession, "SMTP": SmtpSession}


BACKLOG = 512
#: what a client over ``max_connections`` is told (in its protocol's words) before the connection is closed
BUSY = "Too many connections, try again later"
#: seconds between two warnings about refused connections (the ones in between are counted)
REFUSAL_REPORT_INTERVAL = 60.0


class ListenError(Exception):
    pass


def dual_stack_socket(port: int) -> socket.socket:
    """A listening socket on ``[::]:port`` that accepts IPv4 clients too (IPV6_V6ONLY off)."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def is_loopback(address: str) -> bool:
    if address in ("localhost", ""):
        return address == "localhost"
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def backoff_policy(options: GlobalOptions) -> BackoffPolicy:
    return BackoffPolicy(
        enabled=options.login_failure_backoff,
        limit=options.login_failure_limit,
        address_limit=options.login_failure_address_limit,
    )


class _Refusal(asyncio.Protocol):
    """A connection over ``max_connections``: the refusal is its greeting, then it is closed. Nothing is
    read and no upstream connection is made. (On an implicit-TLS listener asyncio completes the handshake
    before ``connection_made``, so the refusal arrives inside TLS, where the mail client can show it.)"""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)
        stream.write(self.reply)
        stream.close()


class Listener:
    """One local port: accepts clients and starts a ProxyConnection for each."""

    def __init__(self, settings: ServerConfig, proxy: ProxyServer) -> None:
        self.settings = settings
        self.proxy = proxy
        self.server: asyncio.Server | None = None
        self.local_tls: ssl.SSLContext | None = None
        if settings.local_certificate_path and settings.local_key_path:
            try:
                self.local_tls = local_context(settings.local_certificate_path, settings.local_key_path)
            except (OSError, ssl.SSLError) as e:
                raise ListenError(
                    f"[{settings.section}]: cannot load local_certificate_path/local_key_path: {e}"
                ) from e

    async def start(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        tls = self.local_tls if s.local_tls else None
        handshake = self.proxy.timeouts.handshake if s.local_tls else None
        try:
            if s.local_address == "::":
                # the reference default: one IPv6 socket that accepts IPv4 too (asyncio makes it v6-only)
                self.server = await loop.create_server(
                    self._new_connection, sock=dual_stack_socket(s.local_port), ssl=tls,
                    ssl_handshake_timeout=handshake,
                )
            else:
                self.server = await loop.create_server(
                    self._new_connection, s.local_address, s.local_port, ssl=tls, reuse_address=True,
                    backlog=BACKLOG, ssl_handshake_timeout=handshake,
                )
        except OSError as e:
            raise ListenError(
                f"[{s.section}]: cannot listen on {s.local_address}:{s.local_port}: {e.strerror or e}"
                " - is another program (or the proxy itself) already using this port?"
            ) from e
        mode = "TLS" if s.local_tls else ("STARTTLS" if s.local_starttls else "plaintext")
        upstream = "STARTTLS" if s.server_starttls else "TLS"
        log.info("Listening for %s on %s:%d (%s) -> %s:%d (%s)", s.protocol, s.local_address, s.local_port,
                 mode, s.server_address, s.server_port, upstream)
        if not is_loopback(s.local_address) and not (s.local_tls or s.local_starttls):
            log.warning("[%s] listens on the non-loopback address %s without local TLS: passwords from mail "
                        "clients cross the network in clear; set local_certificate_path and local_key_path",
                        s.section, s.local_address)

    def _new_connection(self) -> asyncio.Protocol:
        s = self.settings
        options = SessionOptions(
            server_starttls=s.server_starttls,
            local_starttls=s.local_starttls and self.local_tls is not None,
            client_tls=s.local_tls,
        )
        session = SESSIONS[s.protocol](options)
        cap = self.proxy.config.options.max_connections
        if cap and len(self.proxy.connections) >= cap:
            self.proxy.report_refusal(s.section)
            return _Refusal(session.limit_reply(BUSY))
        conn = ProxyConnection(
            s,
            session,
            self.proxy.tokens,
            upstream_tls=self.proxy.upstream_tls,
            local_tls=self.local_tls,
            timeouts=self.proxy.timeouts,
            log=ConnectionLog(s.section, next(self.proxy.numbers)),
            on_closed=self.proxy.connections.discard,
            backoff=self.proxy.backoff,
            on_opened=self.proxy.connections.add,
        )
        if not s.local_tls:
            # counted at once, so a burst of accepts cannot overshoot the cap; an implicit-TLS connection
            # counts from the end of its handshake (asyncio tells nobody when a handshake fails)
            self.proxy.connections.add(conn)
        conn.log.debug("accepted connection")
        return conn.client

    def stop_accepting(self) -> None:
        """Close the listening socket; sessions already accepted carry on until they end."""
        if self.server is not None:
            self.server.close()  # (wait_closed() would wait for those sessions on Python 3.12+)
            self.server = None

    def sessions(self) -> int:
        return sum(1 for c in self.proxy.connections if c.settings.section == self.settings.section)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None


class ProxyServer:
    """All listeners of one configuration, and every live connection."""

    def __init__(self, config: Config, tokens: TokenProvider, timeouts: Timeouts | None = None) -> None:
        self.config = config
        self.tokens = tokens
        self.timeouts = timeouts or Timeouts()
        self.upstream_tls = upstream_context()
        self.numbers = itertools.count(1)
        self.connections: set[ProxyConnection] = set()
        self.backoff = LoginBackoff(backoff_policy(config.options))
        self.refusals = Throttle(REFUSAL_REPORT_INTERVAL)
        self._refusal_report: asyncio.TimerHandle | None = None
        self.listeners = [Listener(s, self) for s in config.servers]
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        try:
            for listener in self.listeners:
                await listener.start()
        except ListenError:
            for listener in self.listeners:
                await listener.stop()
            raise

    async def apply(self, config: Config) -> ListenerPlan:
        """Reconcile the listeners with a reloaded configuration; never raises (problems are logged).

        Unchanged listeners keep running untouched. Removed ones stop accepting; their sessions continue
        until they end. A changed listener whose socket settings (address, port, local TLS) are the same
        takes the new settings in place; otherwise it is rebound. Either way its existing sessions keep
        their old settings and new connections get the new ones. A listener that cannot be (re)bound is
        reported; a failed rebind restores the old listener, and the next reload tries again.
        """
        plan = plan_listeners((listener.settings for listener in self.listeners), config.servers)
        self.config = config
        self.backoff.configure(backoff_policy(config.options))
        running = {listener.settings.section: listener for listener in self.listeners}
        for settings in plan.removed:
            listener = running.pop(settings.section)
            listener.stop_accepting()
            log.info("[%s] removed from the configuration: stopped listening on %s:%d; %d session(s) "
                     "continue until they end", settings.section, settings.local_address, settings.local_port,
                     listener.sessions())
        rebinding: list[tuple[Listener, Listener]] = []
        for old, new in plan.changed:
            listener = running[new.section]
            if not needs_rebind(old, new):
                listener.settings = new
                log.info("[%s] changed: new connections go to %s:%d (%s); %d existing session(s) unchanged",
                         new.section, new.server_address, new.server_port,
                         "STARTTLS" if new.server_starttls else "TLS", listener.sessions())
                continue
            try:
                replacement = Listener(new, self)  # loads the certificate before the old socket closes
            except ListenError as e:
                log.error("%s; [%s] keeps its previous settings", e, new.section)
                continue
            listener.stop_accepting()
            rebinding.append((listener, replacement))
        for listener, replacement in rebinding:
            try:
                await replacement.start()
                running[replacement.settings.section] = replacement
            except ListenError as e:
                log.error("%s; restoring the previous settings of [%s]", e, listener.settings.section)
                try:
                    await listener.start()
                except ListenError as again:
                    log.error("%s", again)
                    running.pop(listener.settings.section)
        for settings in plan.added:
            try:
                added = Listener(settings, self)
                await added.start()
            except ListenError as e:
                log.error("%s; the next reload will try [%s] again", e, settings.section)
                continue
            running[settings.section] = added
        order = {s.section: index for index, s in enumerate(config.servers)}
        self.listeners = sorted(running.values(), key=lambda lst: order.get(lst.settings.section, len(order)))
        return plan

    def report_refusal(self, section: str) -> None:
        """Warn that a connection was refused for ``max_connections``: at once for the first, then at most
        once per REFUSAL_REPORT_INTERVAL with the count refused meanwhile (a flood must not flood the log)."""
        count = self.refusals.event()
        if count is not None:
            self._warn_refusals(count, section)
        elif self._refusal_report is None:
            loop = asyncio.get_running_loop()
            self._refusal_report = loop.call_later(self.refusals.due_in(), self._flush_refusals)

    def _flush_refusals(self) -> None:
        self._refusal_report = None
        count = self.refusals.flush()
        if count:
            self._warn_refusals(count, None)

    def _warn_refusals(self, count: int, section: str | None) -> None:
        where = f" on [{section}]" if section else ""
        log.warning(
            "Refused %d new connection(s)%s: [emailproxy] max_connections (%d) sessions were open; the "
            "clients were told to try again later (reported at most once a minute)",
            count, where, self.config.options.max_connections,
        )

    def request_stop(self) -> None:
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def stop(self, grace: float = 2.0) -> None:
        """Close the listeners, say goodbye to every client, and wait (briefly) for the writes to drain."""
        if self._refusal_report is not None:
            self._refusal_report.cancel()
            self._flush_refusals()
        for listener in self.listeners:
            if listener.server is not None:
                listener.server.close()
        closing = list(self.connections)
        for conn in closing:
            conn.goodbye()
        if closing:
            # transports flush their last writes asynchronously; give them a moment
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace
            while loop.time() < deadline and any(c.flushing() for c in closing):
                await asyncio.sleep(0.02)
        for listener in self.listeners:
            await listener.stop()
