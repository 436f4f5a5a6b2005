"""The upstream transport (emailproxy/upstream.py) against small loopback servers, plain and TLS.

It is a transport, so these tests use real sockets; what they check is the contract the driver relies on:
bytes arrive whole and in order across TLS records and read-buffer boundaries, nothing is read while paused,
writes buffer and signal pause_writing/resume_writing, close() flushes first, EOF and errors reach the
protocol once, STARTTLS upgrades in place, and failures (refused, bad certificate, stalled handshake)
leave no socket open (ResourceWarnings are errors in this suite).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from emailproxy.upstream import READ_SIZE, UpstreamTransport, open_upstream, start_tls
from tests.integration.world.ca import CertificateFiles, make_ca

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertificateFiles:
    return make_ca(tmp_path_factory.mktemp("ca"))


class Recorder(asyncio.Protocol):
    def __init__(self, *, paused: bool = False) -> None:
        self.transport: asyncio.Transport | None = None
        self.data = bytearray()
        self.events: list[str] = []
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.start_paused = paused
        self.grew = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.start_paused:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.grew.set()

    def eof_received(self) -> bool:
        self.events.append("eof")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        self.lost.set_result(exc)

    def pause_writing(self) -> None:
        self.events.append("pause_writing")

    def resume_writing(self) -> None:
        self.events.append("resume_writing")

    async def wait_for_bytes(self, count: int, timeout: float = 10) -> None:
        async def grow() -> None:
            while len(self.data) < count:
                self.grew.clear()
                await self.grew.wait()

        await asyncio.wait_for(grow(), timeout)


@asynccontextmanager
async def serve(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=tls)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def finish(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionError, ssl.SSLError):
        pass


async def connect(protocol: asyncio.Protocol, port: int, tls: ssl.SSLContext | None) -> asyncio.Transport:
    return await open_upstream(protocol, "127.0.0.1", port, tls=tls, server_hostname="127.0.0.1")


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(main())  # type: ignore[arg-type]


def payload(size: int) -> bytes:
    return os.urandom(size)


@pytest.mark.parametrize("use_tls", [True, False], ids=["tls", "plain"])
def test_large_download_arrives_whole_then_eof_closes(certs: CertificateFiles, use_tls: bool) -> None:
    body = payload(3 * READ_SIZE + 12345)  # crosses the read buffer and many TLS records

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(body)
        await writer.drain()
        await finish(writer)

    async def main() -> None:
        async with serve(handler, certs.server_context() if use_tls else None) as port:
            proto = Recorder()
            transport = await connect(proto, port, certs.client_context() if use_tls else None)
            assert isinstance(transport, UpstreamTransport)
            assert await asyncio.wait_for(proto.lost, 10) is None
            assert bytes(proto.data) == body
            assert proto.events == ["eof", "lost"]
            assert transport.is_closing()

    run(main)


@pytest.mark.parametrize("use_tls", [True, False], ids=["tls", "plain"])
def test_paused_reading_delivers_nothing_until_resumed(certs: CertificateFiles, use_tls: bool) -> None:
    body = payload(2 * READ_SIZE)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(body)
        await writer.drain()
        await reader.read()  # until the client closes
        await finish(writer)

    async def main() -> None:
        async with serve(handler, certs.server_context() if use_tls else None) as port:
            proto = Recorder(paused=True)
            transport = await connect(proto, port, certs.client_context() if use_tls else None)
            if use_tls:
                # the fast path of emailproxy.upstream._decrypter: the C read of the SSLSocket's private
                # OpenSSL connection object (if a Python release drops `_sslobj`, the public read is used)
                tls_socket = transport.get_extra_info("ssl_object")
                assert getattr(transport._decrypt, "__self__", None) is tls_socket._sslobj  # type: ignore[attr-defined]
                assert ("IP Address", "127.0.0.1") in transport.get_extra_info("peercert")["subjectAltName"]
                assert transport.get_extra_info("cipher") is not None
            await asyncio.sleep(0.3)
            assert not proto.data and not transport.is_reading()
            transport.resume_reading()
            await proto.wait_for_bytes(READ_SIZE // 2)
            transport.pause_reading()
            seen = len(proto.data)
            await asyncio.sleep(0.2)
            assert len(proto.data) == seen  # nothing more while paused (TLS: not even decrypted leftovers)
            transport.resume_reading()
            await proto.wait_for_bytes(len(body))
            assert bytes(proto.data) == body
            transport.close()
            assert await asyncio.wait_for(proto.lost, 10) is None

    run(main)


@pytest.mark.parametrize("use_tls", [True, False], ids=["tls", "plain"])
def test_writes_buffer_signal_flow_control_and_flush_before_close(
    certs: CertificateFiles, use_tls: bool
) -> None:
    chunks = [payload(100_000) for _ in range(80)]  # 8 MB: more than the socket buffers hold
    release = asyncio.Event()
    received = hashlib.sha256()
    total = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal total
        await release.wait()  # do not read until told: the client's writes back up
        while data := await reader.read(1 << 20):
            received.update(data)
            total += len(data)
        await finish(writer)

    async def main() -> None:
        async with serve(handler, certs.server_context() if use_tls else None) as port:
            proto = Recorder()
            transport = await connect(proto, port, certs.client_context() if use_tls else None)
            transport.set_write_buffer_limits(high=256 * 1024)
            for chunk in chunks:
                transport.write(chunk)
            assert transport.get_write_buffer_size() > 256 * 1024
            assert proto.events == ["pause_writing"]
            transport.close()  # with bytes still buffered: they are written first
            assert transport.is_closing()
            transport.write(b"after close")  # ignored
            release.set()
            assert await asyncio.wait_for(proto.lost, 20) is None
            assert proto.events == ["pause_writing", "resume_writing", "lost"]
            for _ in range(100):
                if total == sum(map(len, chunks)):
                    break
                await asyncio.sleep(0.05)
            expected = hashlib.sha256(b"".join(chunks))
            assert (total, received.hexdigest()) == (sum(map(len, chunks)), expected.hexdigest())

    run(main)


def test_starttls_upgrades_in_place(certs: CertificateFiles) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK hello\r\n")
        assert await reader.readline() == b"STARTTLS\r\n"
        writer.write(b"OK go ahead\r\n")
        await writer.drain()
        await writer.start_tls(certs.server_context())
        line = await reader.readline()
        writer.write(b"secure: " + line)
        await writer.drain()
        await reader.read()
        await finish(writer)

    async def main() -> None:
        async with serve(handler) as port:
            proto = Recorder()
            transport = await connect(proto, port, None)
            assert transport.get_extra_info("ssl_object") is None
            await proto.wait_for_bytes(len(b"* OK hello\r\n"))
            transport.write(b"STARTTLS\r\n")
            await proto.wait_for_bytes(len(b"* OK hello\r\nOK go ahead\r\n"))
            upgraded = await start_tls(
                transport,
                proto,
                certs.client_context(),
                server_side=False,
                server_hostname="127.0.0.1",
                handshake_timeout=10,
            )
            assert upgraded is transport
            assert isinstance(transport.get_extra_info("ssl_object"), ssl.SSLSocket)
            transport.write(b"hi\r\n")
            await proto.wait_for_bytes(len(b"* OK hello\r\nOK go ahead\r\nsecure: hi\r\n"))
            assert bytes(proto.data).endswith(b"secure: hi\r\n")
            transport.close()
            assert await asyncio.wait_for(proto.lost, 10) is None

    run(main)


def test_untrusted_certificate_fails_the_handshake(certs: CertificateFiles, tmp_path: Path) -> None:
    other = make_ca(tmp_path / "other")

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()
        except (ConnectionError, ssl.SSLError):
            pass
        await finish(writer)

    async def main() -> None:
        async with serve(handler, certs.server_context()) as port:
            with pytest.raises(ssl.SSLCertVerificationError):
                await connect(Recorder(), port, other.client_context())

    run(main)


def test_stalled_handshake_times_out(certs: CertificateFiles) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # a plain-text server that never answers the ClientHello
        await finish(writer)

    async def main() -> None:
        async with serve(handler) as port:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(
                    connect(Recorder(), port, certs.client_context()),
                    0.3,
                )

    run(main)


def test_abandoned_handshake_lets_go_of_the_socket_at_once(certs: CertificateFiles) -> None:
    """Cancelling (the client went away, or the caller's timeout) closes the socket at once."""
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()
        except ConnectionError:
            pass
        closed.set()
        await finish(writer)

    async def main() -> None:
        async with serve(handler) as port:
            task = asyncio.create_task(connect(Recorder(), port, certs.client_context()))
            await asyncio.sleep(0.3)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(closed.wait(), 5)

    run(main)


def test_refused_connection_says_so() -> None:
    async def main() -> None:
        async with serve(lambda r, w: finish(w)) as port:
            pass  # closed again: nobody listens on the port now
        with pytest.raises(ConnectionRefusedError, match="Connection refused"):
            await connect(Recorder(), port, None)

    run(main)


def test_host_names_are_resolved_and_abort_reports_at_once() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello\r\n")
        await reader.read()
        await finish(writer)

    async def main() -> None:
        async with serve(handler) as port:
            proto = Recorder()
            transport = await open_upstream(proto, "localhost", port, tls=None, server_hostname="localhost")
            await proto.wait_for_bytes(7)
            assert transport.get_extra_info("peername")[1] == port
            transport.abort()
            assert await asyncio.wait_for(proto.lost, 5) is None
            assert proto.events == ["lost"]

    run(main)


def test_server_reset_reaches_the_protocol_as_an_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
        await reader.readline()
        writer.transport.abort()

    async def main() -> None:
        async with serve(handler) as port:
            proto = Recorder()
            transport = await connect(proto, port, None)
            transport.write(b"bye\r\n")
            exc = await asyncio.wait_for(proto.lost, 5)
            assert isinstance(exc, ConnectionResetError)

    run(main)


def test_tls_end_without_close_notify_is_an_ordinary_eof(certs: CertificateFiles) -> None:
    body = payload(100_000)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(body)
        while writer.transport.get_write_buffer_size():
            await asyncio.sleep(0.01)
        writer.transport.abort()  # TCP FIN with no TLS close_notify before it

    async def main() -> None:
        async with serve(handler, certs.server_context()) as port:
            proto = Recorder()
            await connect(proto, port, certs.client_context())
            assert await asyncio.wait_for(proto.lost, 10) is None
            assert bytes(proto.data) == body
            assert proto.events == ["eof", "lost"]

    run(main)


def test_close_reads_what_is_unread_so_the_server_gets_every_byte() -> None:
    """A socket closed with unread bytes sends a reset instead of a FIN, and the server loses whatever it had
    not read yet. Here the server greets, the client never reads the greeting (reading paused), writes 2 MB
    the server reads only later, and closes."""
    body = payload(2_000_000)
    release = asyncio.Event()
    got = bytearray()
    outcome: list[str] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK greeting the client never reads\r\n")
        await writer.drain()
        await release.wait()
        try:
            while data := await reader.read(1 << 20):
                got.extend(data)
            outcome.append("eof")
        except ConnectionResetError:
            outcome.append("reset")
        await finish(writer)

    async def main() -> None:
        async with serve(handler) as port:
            proto = Recorder(paused=True)
            transport = await connect(proto, port, None)
            await asyncio.sleep(0.1)  # the greeting has arrived, unread
            transport.write(body)
            transport.close()
            assert await asyncio.wait_for(proto.lost, 10) is None
            release.set()
            for _ in range(100):
                if outcome:
                    break
                await asyncio.sleep(0.05)
            assert outcome == ["eof"] and bytes(got) == body

    run(main)
