"""The connection to the upstream server: a lean socket transport, TLS done by OpenSSL on the socket itself.

asyncio's own TLS transport runs OpenSSL over memory buffers and a state machine written in Python: every
read is a socket read into a buffer, a copy into a ``MemoryBIO``, one Python call per TLS record and a join of
the records, and every handshake and write passes through the same machinery. Measured on the relay of a
bulk download, the interpreter's share of that was the largest single cost (benchmarks/README.md).

`UpstreamTransport` instead hands the non-blocking socket to an ``ssl.SSLSocket``: OpenSSL reads the socket
and decrypts into one shared buffer, and writes encrypt straight onto the socket. It implements the part of
``asyncio.Transport`` the driver uses (writes with buffering and write-buffer limits for flow control,
pausing reads, half-closed EOF, close and abort) on the event loop's readiness callbacks, and STARTTLS
upgrades it in place.

On an event loop without readiness callbacks (the Windows proactor loop) `open_upstream` and `start_tls`
fall back to asyncio's own transports.
"""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import ipaddress
import os
import socket
import ssl
from collections.abc import Callable
from typing import Any, cast

from emailproxy.tls import thread_buffer

#: the most one read callback takes from the socket (also the size of the shared read buffer)
READ_SIZE = 256 * 1024


def _readiness_loop(loop: asyncio.AbstractEventLoop) -> bool:
    return isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop)


class UpstreamTransport(asyncio.Transport):
    """A TCP connection, plain or TLS (``ssl.SSLSocket``), driven by add_reader/add_writer."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: asyncio.Protocol
    ) -> None:
        super().__init__()
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._decrypt = _decrypter(sock)
        self._buffer = bytearray()  # bytes not yet given to the socket
        self._tls_retry: bytes | None = None  # an SSL write that must be retried with the same bytes
        self._reader = False  # registered with the loop
        self._writer = False
        self._paused = False  # pause_reading()
        self._read_wants_write = False  # OpenSSL needs to write before the next read can go on
        self._write_wants_read = False  # ... and the other way round
        self._closing = False
        self._closed = False
        self._high = 64 * 1024
        self._low = 16 * 1024
        self._protocol_paused = False
        self._extra: dict[str, Any] = {}
        self._describe()

    # --------------------------------------------------------------------------------------- set-up

    def _describe(self) -> None:
        sock = self._sock
        self._extra = {"socket": sock}
        try:
            self._extra["sockname"] = sock.getsockname()
            self._extra["peername"] = sock.getpeername()
        except OSError:
            pass

    def start(self) -> None:
        """Tell the protocol it is connected, then start reading (unless it paused reading meanwhile)."""
        self._protocol.connection_made(self)
        if not self._paused and not self.is_closing():
            self._add_reader()

    # ------------------------------------------------------------------------------------ asyncio.Transport

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        sock = self._sock
        if isinstance(sock, ssl.SSLSocket) and name in ("ssl_object", "peercert", "cipher", "compression"):
            # asked for rarely: worked out on demand (decoding the certificate costs tens of microseconds)
            if name == "ssl_object":
                return sock
            try:
                return getattr(sock, "getpeercert" if name == "peercert" else name)()
            except (AttributeError, ValueError, OSError):
                return default  # closed
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        return self._closing or self._closed

    def is_reading(self) -> bool:
        return not self._paused and not self.is_closing()

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._protocol = protocol

    def pause_reading(self) -> None:
        self._paused = True
        self._remove_reader()

    def resume_reading(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if not self.is_closing():
            self._add_reader()

    def get_write_buffer_size(self) -> int:
        return len(self._buffer) + (len(self._tls_retry) if self._tls_retry is not None else 0)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._pause_protocol_if_full()

    def can_write_eof(self) -> bool:
        return False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data or self.is_closing():
            return
        if self._buffer or self._tls_retry is not None or self._write_wants_read:
            self._buffer.extend(data)
        else:
            sent = self._send(bytes(data) if self._tls else data)
            if sent is None:
                return  # failed: the connection is being closed
            if sent < len(data):
                self._buffer.extend(memoryview(data)[sent:])
                self._add_writer()
        self._pause_protocol_if_full()

    def close(self) -> None:
        if self.is_closing():
            return
        self._closing = True
        self._remove_reader()
        if self._write_wants_read:
            self._finish(None, polite=False)  # the unsent bytes wait for a read that will not come
        elif not self.get_write_buffer_size():
            self._loop.call_soon(self._finish, None)
        # else: _write_ready finishes once the buffer is written

    def abort(self) -> None:
        self._finish(None, polite=False)

    # --------------------------------------------------------------------------------------- STARTTLS

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        """Upgrade this connection to TLS in place (the caller bounds the time)."""
        if self._tls or self.get_write_buffer_size():
            raise RuntimeError("STARTTLS on a TLS connection or with unsent bytes")
        was_paused = self._paused
        self.pause_reading()
        self._remove_writer()
        self._sock = context.wrap_socket(self._sock, server_hostname=server_hostname,
                                         do_handshake_on_connect=False)
        self._tls = True
        await _handshake(self._loop, self._sock)
        self._decrypt = _decrypter(self._sock)
        self._describe()
        if not was_paused:
            self.resume_reading()

    # --------------------------------------------------------------------------------------- reading

    def _add_reader(self) -> None:
        if not self._reader:
            self._loop.add_reader(self._fd, self._read_ready)
            self._reader = True
        if self._tls and self._sock.pending():  # type: ignore[attr-defined]
            self._loop.call_soon(self._read_ready)  # decrypted bytes wait in OpenSSL, not in the socket

    def _remove_reader(self) -> None:
        if self._reader:
            self._loop.remove_reader(self._fd)
            self._reader = False

    def _read_ready(self) -> None:
        if self._write_wants_read:
            self._write_wants_read = False
            self._write_ready()
        if self._paused or self.is_closing():
            return
        _, view = thread_buffer(READ_SIZE)
        filled = 0
        eof = False
        error: Exception | None = None
        if self._tls:
            decrypt = self._decrypt
            while filled < READ_SIZE:  # one TLS record per call
                try:
                    n = decrypt(READ_SIZE - filled, view[filled:])
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLEOFError:  # closed without close_notify: an end like any other here
                    eof = True
                    break
                except ssl.SSLWantWriteError:
                    self._read_wants_write = True
                    self._add_writer()
                    break
                except OSError as e:  # includes ssl.SSLError and ConnectionResetError
                    error = e
                    break
                if n == 0:
                    eof = True
                    break
                filled += n
        else:
            try:
                filled = self._sock.recv_into(view)  # all the socket has, up to the buffer's size
                eof = filled == 0
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                error = e
        if filled:
            self._protocol.data_received(bytes(view[:filled]))  # a copy: the buffer is shared
        if error is not None:
            self._finish(error, polite=False)
        elif eof:
            self._eof()
        elif filled == READ_SIZE and self._tls and not self._paused and not self.is_closing():
            self._loop.call_soon(self._read_ready)  # more may wait decrypted inside OpenSSL

    def _eof(self) -> None:
        self._remove_reader()
        if self.is_closing():
            return
        keep_open = self._protocol.eof_received()
        if not keep_open:
            self.close()

    # --------------------------------------------------------------------------------------- writing

    def _send(self, data: bytes | bytearray | memoryview) -> int | None:
        """Give bytes to the socket; returns how many it took, or None after a fatal error."""
        try:
            return self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except ssl.SSLWantWriteError:
            self._tls_retry = bytes(data)  # OpenSSL wants the very same bytes again
            self._add_writer()
            return len(data)
        except ssl.SSLWantReadError:
            self._tls_retry = bytes(data)
            self._write_wants_read = True
            return len(data)
        except OSError as e:
            self._finish(e, polite=False)
            return None

    def _add_writer(self) -> None:
        if not self._writer:
            self._loop.add_writer(self._fd, self._write_ready)
            self._writer = True

    def _remove_writer(self) -> None:
        if self._writer:
            self._loop.remove_writer(self._fd)
            self._writer = False

    def _write_ready(self) -> None:
        if self._closed:
            return
        if self._read_wants_write:
            self._read_wants_write = False
            if not self._paused and not self._closing:
                self._loop.call_soon(self._read_ready)
        if self._tls_retry is not None:
            retry, self._tls_retry = self._tls_retry, None
            try:
                self._sock.send(retry)
            except (ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
                self._tls_retry = retry
                return
            except ssl.SSLWantReadError:
                self._tls_retry = retry
                self._write_wants_read = True
                self._remove_writer()
                return
            except OSError as e:
                self._finish(e, polite=False)
                return
        while self._buffer:
            if self._tls:
                chunk, self._buffer = bytes(self._buffer), bytearray()
                sent = self._send(chunk)
                if sent is None or self._tls_retry is not None or self._write_wants_read:
                    if self._write_wants_read:
                        self._remove_writer()
                    return
            else:
                sent = self._send(self._buffer)
                if sent is None:
                    return
                if sent == 0:
                    return
                del self._buffer[:sent]
        self._remove_writer()
        self._resume_protocol_if_drained()
        if self._closing:
            self._finish(None)

    def _pause_protocol_if_full(self) -> None:
        if not self._protocol_paused and self.get_write_buffer_size() > self._high:
            self._protocol_paused = True
            self._protocol.pause_writing()

    def _resume_protocol_if_drained(self) -> None:
        if self._protocol_paused and self.get_write_buffer_size() <= self._low:
            self._protocol_paused = False
            self._protocol.resume_writing()

    # --------------------------------------------------------------------------------------- closing

    def _finish(self, exc: Exception | None, polite: bool = True) -> None:
        """Close the socket (sending TLS close_notify when polite) and tell the protocol, once."""
        if self._closed:
            return
        self._closed = True
        self._closing = True
        self._remove_reader()
        self._remove_writer()
        self._buffer = bytearray()
        self._tls_retry = None
        if polite and isinstance(self._sock, ssl.SSLSocket):
            try:
                self._sock.unwrap()  # sends close_notify; the peer's is not waited for
            except (OSError, ValueError):
                pass
        if polite:
            self._discard_unread()
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)


    def _discard_unread(self) -> None:
        """Read and drop what waits in the socket (late replies, TLS records after close_notify): a socket
        closed with unread bytes sends a reset, and a server may then drop the last bytes we sent it."""
        _, view = thread_buffer(READ_SIZE)
        for _ in range(16):
            try:
                if not self._sock.recv_into(view):
                    return
            except (OSError, ValueError):  # nothing more (BlockingIOError), or the connection is gone
                return


def _decrypter(sock: socket.socket) -> Callable[[int, memoryview], int]:
    """``read(size, buffer)`` for a TLS socket: the C method of the OpenSSL connection inside it when it is
    there (``SSLSocket._sslobj``, private: pinned by tests/test_upstream.py), else the public, slower
    ``SSLSocket.read``. Skipping the two Python-level wrappers per TLS record is measurable when servers
    write small records (Dovecot's POP3: about 2 KB per socket read)."""
    if not isinstance(sock, ssl.SSLSocket):
        return _not_tls
    read = getattr(getattr(sock, "_sslobj", None), "read", None)
    if callable(read):
        return cast(Callable[[int, memoryview], int], read)
    return cast(Callable[[int, memoryview], int], sock.read)


def _not_tls(size: int, buffer: memoryview) -> int:
    raise AssertionError("not a TLS connection")


# ------------------------------------------------------------------------------------------- opening


async def _wait(loop: asyncio.AbstractEventLoop, fd: int, writable: bool) -> None:
    future: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not future.done():
            future.set_result(None)

    if writable:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        await future
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def _handshake(loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket) -> None:
    while True:
        try:
            sock.do_handshake()
            return
        except ssl.SSLWantReadError:
            await _wait(loop, sock.fileno(), writable=False)
        except ssl.SSLWantWriteError:
            await _wait(loop, sock.fileno(), writable=True)


async def _connect(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket, trying each address of the host in turn."""
    addresses: list[tuple[Any, ...]]
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        literal = None
    if literal is not None:  # no resolver round trip through the executor for an address
        addresses = [(socket.AF_INET6 if literal.version == 6 else socket.AF_INET, (str(literal), port))]
    else:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        addresses = [(info[0], info[4]) for info in infos]
        if not addresses:
            raise OSError(f"getaddrinfo({host!r}) returned no addresses")
    errors: list[OSError] = []
    for family, address in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, address)
            return sock
        except OSError as e:
            sock.close()
            errors.append(OSError(e.errno, os.strerror(e.errno)) if e.errno else e)
        except BaseException:
            sock.close()
            raise
    if len(errors) == 1:
        raise errors[0]
    raise OSError("; ".join(str(e) for e in errors))


async def open_upstream(
    protocol: asyncio.Protocol,
    host: str,
    port: int,
    *,
    tls: ssl.SSLContext | None,
    server_hostname: str,
) -> asyncio.Transport:
    """Connect (and with `tls`, handshake), then call the protocol's connection_made. The caller bounds
    the time (cancelling this closes the socket)."""
    loop = asyncio.get_running_loop()
    if not _readiness_loop(loop):
        transport, _ = await loop.create_connection(
            lambda: protocol, host, port, ssl=tls, server_hostname=server_hostname if tls else None
        )
        return transport
    sock = await _connect(loop, host, port)
    try:
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=server_hostname, do_handshake_on_connect=False)
            await _handshake(loop, sock)
    except BaseException:
        sock.close()
        raise
    transport = UpstreamTransport(loop, sock, protocol)
    transport.start()
    return transport


async def start_tls(
    transport: asyncio.Transport,
    protocol: asyncio.Protocol,
    context: ssl.SSLContext,
    *,
    server_side: bool,
    server_hostname: str | None,
    handshake_timeout: float,
) -> asyncio.Transport | None:
    """Upgrade either end of a connection to TLS: ours in place, asyncio's through loop.start_tls."""
    if isinstance(transport, UpstreamTransport) and not server_side and server_hostname is not None:
        await asyncio.wait_for(transport.start_tls(context, server_hostname), handshake_timeout)
        return transport
    return await asyncio.get_running_loop().start_tls(
        transport,
        protocol,
        context,
        server_side=server_side,
        server_hostname=server_hostname,
        ssl_handshake_timeout=handshake_timeout,
    )
