"""The asyncio driver, with a stub protocol session and a fake upstream on loopback (no mail servers)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from emailproxy.config import ServerConfig
from emailproxy.connection import ProxyConnection, Timeouts
from emailproxy.log import ConnectionLog
from emailproxy.protocols.events import (
    Action,
    Close,
    NeedToken,
    Relay,
    SendToClient,
    SendToServer,
    Session,
    SessionOptions,
    Side,
    TokenOk,
    TokenResult,
)
from emailproxy.secret import Secret


class StubSession(Session):
    """Forwards the greeting; ``LOGIN pw`` asks for a token; on TokenOk it relays; ``QUIT`` closes."""

    protocol = "STUB"

    def __init__(self) -> None:
        super().__init__(SessionOptions(server_starttls=True))
        self.greeted = False

    def client_data(self, data: bytes) -> list[Action]:
        if data.startswith(b"LOGIN "):
            return [NeedToken("user@example.com", Secret(data[6:].strip().decode()))]
        if data.startswith(b"QUIT"):
            return [SendToClient(b"BYE\r\n"), Close("quit")]
        return [SendToServer(data)]

    def server_data(self, data: bytes) -> list[Action]:
        return [SendToClient(data)]

    def tls_started(self, side: Side) -> list[Action]:
        return []

    def token_result(self, result: TokenResult) -> list[Action]:
        assert isinstance(result, TokenOk)
        return [SendToClient(b"OK logged in\r\n"), Relay(to_server=b"early\r\n")]

    def goodbye(self) -> bytes:
        return b"GOODBYE\r\n"

    def error_reply(self, message: str) -> bytes:
        return f"ERROR {message}\r\n".encode()


class Tokens:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def get_token(self, username: str, password: Secret) -> TokenResult:
        self.calls.append((username, password.reveal()))
        return TokenOk(username, Secret("token"))


@asynccontextmanager
async def upstream(greeting: bytes = b"HELLO\r\n") -> AsyncIterator[tuple[int, list[bytes]]]:
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        try:
            while data := await reader.read(65536):
                received.append(data)
                writer.write(data)
        except ConnectionError:
            pass
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], received
    finally:
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def proxy(upstream_port: int, timeouts: Timeouts,
                tokens: Tokens | None = None) -> AsyncIterator[tuple[int, list[ProxyConnection]]]:
    settings = ServerConfig(section="STUB-1", protocol="IMAP", local_port=0, local_address="127.0.0.1",
                            server_address="127.0.0.1", server_port=upstream_port, server_starttls=True)
    live: list[ProxyConnection] = []

    def factory() -> asyncio.Protocol:
        conn = ProxyConnection(settings, StubSession(), tokens or Tokens(),
                               upstream_tls=ssl.create_default_context(), local_tls=None,
                               timeouts=timeouts, log=ConnectionLog("STUB-1", len(live) + 1))
        live.append(conn)
        return conn.client

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], live
    finally:
        server.close()
        await server.wait_closed()
        for conn in live:
            conn.close("test over")
        await asyncio.sleep(0.05)  # let the transports finish closing before the loop ends


async def read_all(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), 5)


def run(test: Callable[[], object]) -> None:
    asyncio.run(test())  # type: ignore[arg-type]


def test_login_timeout_gives_protocol_error_and_closes() -> None:
    async def main() -> None:
        async with upstream() as (port, _), proxy(port, Timeouts(login=0.3)) as (local, _live):
            reader, writer = await asyncio.open_connection("127.0.0.1", local)
            data = await read_all(reader)  # EOF after the error
            assert data == b"HELLO\r\nERROR timed out waiting for a successful login\r\n"
            writer.close()
            await writer.wait_closed()
    run(main)


def test_upstream_connect_failure_is_reported_to_client() -> None:
    async def main() -> None:
        async with upstream() as (port, _):
            pass  # the port is closed again: nobody listens there now
        async with proxy(port, Timeouts(connect=2)) as (local, _live):
            reader, writer = await asyncio.open_connection("127.0.0.1", local)
            data = await read_all(reader)
            assert data.startswith(b"ERROR could not connect to 127.0.0.1:%d" % port)
            writer.close()
            await writer.wait_closed()
    run(main)


def test_relay_after_login_hands_over_leftovers_and_passes_raw_bytes() -> None:
    async def main() -> None:
        tokens = Tokens()
        async with upstream() as (port, received), proxy(port, Timeouts(login=0.5), tokens) as (local, live):
            reader, writer = await asyncio.open_connection("127.0.0.1", local)
            assert await reader.readexactly(7) == b"HELLO\r\n"
            writer.write(b"LOGIN secret-pw\r\n")
            assert await reader.readexactly(14) == b"OK logged in\r\n"
            # the leftover reached the server first, then raw bytes pass both ways (no parsing: "LOGIN" too)
            payload = b"LOGIN not-intercepted-after-relay\r\n" + bytes(range(256)) * 64
            writer.write(payload)
            echoed = await asyncio.wait_for(reader.readexactly(len(b"early\r\n") + len(payload)), 5)
            assert echoed == b"early\r\n" + payload
            assert tokens.calls == [("user@example.com", "secret-pw")]
            assert b"".join(received).startswith(b"early\r\n")
            # the login timer was cancelled: the relayed session outlives it
            await asyncio.sleep(0.7)
            assert live[0].relaying and not live[0].closed
            writer.close()
            await writer.wait_closed()
    run(main)


def test_goodbye_on_shutdown() -> None:
    async def main() -> None:
        async with upstream() as (port, _), proxy(port, Timeouts()) as (local, live):
            reader, writer = await asyncio.open_connection("127.0.0.1", local)
            assert await reader.readexactly(7) == b"HELLO\r\n"
            live[0].goodbye()
            assert await read_all(reader) == b"GOODBYE\r\n"
            assert live[0].closed
            writer.close()
            await writer.wait_closed()
    run(main)


def test_close_action_flushes_reply_then_closes_both_sides() -> None:
    async def main() -> None:
        async with upstream() as (port, _), proxy(port, Timeouts()) as (local, live):
            reader, writer = await asyncio.open_connection("127.0.0.1", local)
            assert await reader.readexactly(7) == b"HELLO\r\n"
            writer.write(b"QUIT\r\n")
            assert await read_all(reader) == b"BYE\r\n"
            assert live[0].closed
            writer.close()
            await writer.wait_closed()
    run(main)
