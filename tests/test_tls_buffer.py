"""`share_read_buffer`: stdlib asyncio TLS transports read through one buffer per thread, not 256 KiB each.

It relies on private attributes of asyncio.sslproto.SSLProtocol; the first test pins them so that a Python
upgrade that renames them fails here instead of silently bringing back the per-connection buffer.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import hashlib
import os
import ssl
from pathlib import Path

from emailproxy.tls import share_read_buffer
from tests.integration.world.ca import make_ca


def _contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    certs = make_ca(tmp_path / "ca")
    return certs.server_context(), certs.client_context()


def test_stdlib_sslprotocol_still_has_the_attributes_we_replace() -> None:
    loop = asyncio.new_event_loop()
    try:
        protocol = asyncio.sslproto.SSLProtocol(
            loop, asyncio.Protocol(), ssl.create_default_context(), None, server_hostname="localhost"
        )
        assert isinstance(asyncio.sslproto.SSLProtocol.max_size, int)
        assert isinstance(protocol._ssl_buffer, bytearray)
        assert len(protocol._ssl_buffer) == asyncio.sslproto.SSLProtocol.max_size
        assert isinstance(protocol._ssl_buffer_view, memoryview)
        assert protocol._get_app_transport()._ssl_protocol is protocol
        protocol.connection_lost(None)  # marks its transport closed (no ResourceWarning)
    finally:
        loop.close()


class _Sink(asyncio.Protocol):
    """Client side: shares the read buffer as the proxy does, hashes what it receives."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.received = 0
        self.digest = hashlib.sha256()
        self.done = asyncio.get_running_loop().create_future()
        self.shared = False
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.shared = share_read_buffer(transport)

    def data_received(self, data: bytes) -> None:
        self.digest.update(data)
        self.received += len(data)
        if self.received >= self.expected and not self.done.done():
            self.done.set_result(None)


async def _transfer(tmp_path: Path) -> None:
    server_ctx, client_ctx = _contexts(tmp_path)
    payloads = [os.urandom(3 * 1024 * 1024 + 17), os.urandom(2 * 1024 * 1024 + 5)]

    handlers: list[asyncio.Task[None]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            index = int((await reader.readexactly(1)).decode())
            writer.write(payloads[index])
            await writer.drain()
            await reader.read()  # until the client closes
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, ssl.SSLError):
                pass

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    sinks: list[_Sink] = []
    try:
        for payload in payloads:
            size = len(payload)
            _, sink = await loop.create_connection(
                lambda size=size: _Sink(size), "127.0.0.1", port, ssl=client_ctx, server_hostname="127.0.0.1"
            )
            assert sink.shared
            sinks.append(sink)
        # both connections receive at the same time, through the same buffer
        for index, sink in enumerate(sinks):
            assert sink.transport is not None
            sink.transport.write(str(index).encode())  # type: ignore[attr-defined]
        await asyncio.wait_for(asyncio.gather(*(sink.done for sink in sinks)), 30)
        for sink, payload in zip(sinks, payloads, strict=True):
            assert sink.received == len(payload)
            assert sink.digest.digest() == hashlib.sha256(payload).digest()
        buffers = {id(sink.transport._ssl_protocol._ssl_buffer) for sink in sinks}  # type: ignore[union-attr]
        assert len(buffers) == 1
    finally:
        for sink in sinks:
            if sink.transport is not None:
                sink.transport.close()
        await asyncio.wait_for(asyncio.gather(*handlers, return_exceptions=True), 10)
        server.close()
        await server.wait_closed()


def test_connections_share_one_buffer_and_data_stays_intact(tmp_path: Path) -> None:
    asyncio.run(_transfer(tmp_path))


def test_plain_transports_are_left_alone() -> None:
    class Closer(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transport.close()

    async def check() -> bool:
        server = await asyncio.get_running_loop().create_server(Closer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            transport, _ = await asyncio.get_running_loop().create_connection(
                asyncio.Protocol, "127.0.0.1", port
            )
            try:
                return share_read_buffer(transport)
            finally:
                transport.close()
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(check()) is False
