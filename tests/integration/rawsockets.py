"""Raw sockets for integration tests that need byte-level control: client helpers (garbage, half lines,
disconnects at chosen moments, where imaplib/poplib/smtplib would not do) and `ThreadedServer`, the base of
the deliberately misbehaving upstream servers the tests put in front of the proxy."""

from __future__ import annotations

import socket
import threading

READ_TIMEOUT = 20.0  # only turns a hang into a failure, never a speed limit


def connect(port: int, host: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection((host, port), timeout=READ_TIMEOUT)
    sock.settimeout(READ_TIMEOUT)
    return sock


def read_line(sock: socket.socket) -> bytes:
    """One line (up to LF) read byte by byte, so nothing after it is consumed."""
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def read_until_closed(sock: socket.socket) -> tuple[bytes, bool]:
    """Everything the peer sends until it closes: (data, closed). closed is False on a time-out."""
    data = bytearray()
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return bytes(data), True
            data += chunk
    except ConnectionResetError:
        return bytes(data), True
    except TimeoutError:
        return bytes(data), False


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send, ignoring the peer closing meanwhile (it may stop reading as soon as it has seen enough)."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass



class ThreadedServer:
    """A TCP server on a free loopback port that serves each connection in a daemon thread of its own.

    Subclasses implement `handle(conn, number)` (in the connection's thread; it closes `conn`) and may
    override `accepted(number)`, called in the accepting thread before the handler starts, for bookkeeping
    that must be visible as soon as the connection is. With `JOIN_HANDLERS`, `close()` also waits for the
    handlers (which must then watch `self._stop`)."""

    JOIN_HANDLERS = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._handlers: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def accepted(self, number: int) -> None:
        """Connection `number` (from 1) was accepted."""

    def handle(self, conn: socket.socket, number: int) -> None:
        raise NotImplementedError

    def _accept(self) -> None:
        number = 0
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            number += 1
            self.accepted(number)
            handler = threading.Thread(target=self.handle, args=(conn, number), daemon=True)
            handler.start()
            self._handlers.append(handler)

    def close(self) -> None:
        self._stop.set()
        self._accepter.join(timeout=5)
        for handler in self._handlers if self.JOIN_HANDLERS else []:
            handler.join(timeout=5)
        self._listener.close()
