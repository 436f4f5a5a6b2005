"""The listeners: one asyncio server per configured [IMAP-/POP-/SMTP-port] section, all in one process."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import ssl

from emailproxy.config import Config, ServerConfig
from emailproxy.connection import ProxyConnection, Timeouts, TokenProvider
from emailproxy.log import ConnectionLog
from emailproxy.protocols.events import Session, SessionOptions
from emailproxy.protocols.imap import ImapSession
from emailproxy.protocols.pop import PopSession
from emailproxy.protocols.smtp import SmtpSession
from emailproxy.tls import local_context, upstream_context

log = logging.getLogger("emailproxy.server")

SESSIONS: dict[str, type[Session]] = {"IMAP": ImapSession, "POP": PopSession, "SMTP": SmtpSession}


class ListenError(Exception):
    pass


def is_loopback(address: str) -> bool:
    if address in ("localhost", ""):
        return address == "localhost"
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


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
        try:
            self.server = await loop.create_server(
                self._new_connection,
                s.local_address,
                s.local_port,
                ssl=self.local_tls if s.local_tls else None,
                reuse_address=True,
                backlog=512,
                ssl_handshake_timeout=self.proxy.timeouts.handshake if s.local_tls else None,
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
        conn = ProxyConnection(
            s,
            session,
            self.proxy.tokens,
            upstream_tls=self.proxy.upstream_tls,
            local_tls=self.local_tls,
            timeouts=self.proxy.timeouts,
            log=ConnectionLog(s.section, next(self.proxy.numbers)),
            on_closed=self.proxy.connections.discard,
        )
        self.proxy.connections.add(conn)
        conn.log.debug("accepted connection")
        return conn.client

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

    def request_stop(self) -> None:
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def stop(self, grace: float = 2.0) -> None:
        """Close the listeners, say goodbye to every client, and wait (briefly) for the writes to drain."""
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
