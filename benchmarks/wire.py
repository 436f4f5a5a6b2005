"""Blocking raw-socket clients for the benchmarks: log in (XOAUTH2 directly, or a password through a
proxy) and move bulk data with large `recv_into` buffers, so that the client never limits a measurement."""

from __future__ import annotations

import base64
import socket
import ssl
import time
from dataclasses import dataclass, field

READ_SIZE = 4 * 1024 * 1024  # one preallocated receive buffer per bulk transfer
TIMEOUT = 120.0


class BenchError(Exception):
    """A client step failed (the server or proxy answered something unexpected, or closed)."""


@dataclass
class Target:
    """Where a client connects and how it logs in.

    `direct`: straight to Dovecot/Postfix over TLS with SASL XOAUTH2 and a token per user. Otherwise a proxy's
    plaintext loopback listeners, with the local password (the proxy obtains and caches the token).
    """

    key: str  # "direct", "ours" or "reference"
    label: str
    imap: tuple[str, int]
    pop: tuple[str, int]
    smtp: tuple[str, int]
    tls: ssl.SSLContext | None = None  # direct only
    tokens: dict[str, str] = field(default_factory=dict)  # direct only: user -> access token
    password: str = ""  # proxies only
    pid: int | None = None  # proxies (and the floor relay) only
    plain_xoauth2: bool = False  # the floor relay: XOAUTH2 with a token, over plaintext loopback

    @property
    def direct(self) -> bool:
        """The client authenticates with XOAUTH2 itself (else with the proxy's local password)."""
        return self.tls is not None or self.plain_xoauth2

    def xoauth2(self, user: str) -> str:
        blob = f"user={user}\x01auth=Bearer {self.tokens[user]}\x01\x01".encode()
        return base64.b64encode(blob).decode()


class Wire:
    """A connected client socket (plain or TLS) with a small line buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending = bytearray()

    @classmethod
    def connect(cls, address: tuple[str, int], tls: ssl.SSLContext | None, timeout: float = TIMEOUT) -> Wire:
        sock = socket.create_connection(address, timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            try:
                sock = tls.wrap_socket(sock, server_hostname=address[0])
            except BaseException:
                sock.close()
                raise
        return cls(sock)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        # ACK at once: Postfix writes its TLS session tickets and its next reply as separate small segments
        # (Nagle), so a delayed ACK here would stall a login by ~40 ms at random
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise BenchError(f"connection closed; last bytes: {bytes(self.pending[-200:])!r}")
        self.pending += chunk

    def readline(self) -> bytes:
        while True:
            end = self.pending.find(b"\n")
            if end >= 0:
                line = bytes(self.pending[: end + 1])
                del self.pending[: end + 1]
                return line
            if len(self.pending) > 1 << 20:
                raise BenchError("line too long")
            self._fill()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # ------------------------------------------------------------------------------------------ IMAP

    def imap_command(self, tag: str, command: str) -> bytes:
        """Send a command and return its tagged completion line (raises unless OK)."""
        self.send(f"{tag} {command}\r\n".encode())
        return self.imap_wait(tag)

    def imap_wait(self, tag: str) -> bytes:
        prefix = f"{tag} ".encode()
        while True:
            line = self.readline()
            if line.startswith(prefix):
                if not line[len(prefix) :].startswith(b"OK"):
                    raise BenchError(f"IMAP {tag}: {line!r}")
                return line

    # ------------------------------------------------------------------------------------------ SMTP / POP

    def smtp_reply(self, expect: str) -> bytes:
        """Read one (multi-line) SMTP reply; raise unless its code starts with `expect`."""
        while True:
            line = self.readline()
            if len(line) < 4 or line[3:4] != b"-":
                if not line.startswith(expect.encode()):
                    raise BenchError(f"SMTP: expected {expect}, got {line!r}")
                return line

    def pop_ok(self) -> bytes:
        line = self.readline()
        if not line.startswith(b"+OK"):
            raise BenchError(f"POP: {line!r}")
        return line


# ---------------------------------------------------------------------------------------------- logins


def imap_login(target: Target, user: str, timeout: float = TIMEOUT) -> Wire:
    wire = Wire.connect(target.imap, target.tls, timeout)
    try:
        greeting = wire.readline()
        if not greeting.startswith(b"* OK"):
            raise BenchError(f"IMAP greeting: {greeting!r}")
        if target.direct:
            wire.imap_command("a", f"AUTHENTICATE XOAUTH2 {target.xoauth2(user)}")
        else:
            wire.imap_command("a", f'LOGIN {user} "{target.password}"')
    except BaseException:
        wire.close()
        raise
    return wire


def pop_login(target: Target, user: str, timeout: float = TIMEOUT) -> Wire:
    wire = Wire.connect(target.pop, target.tls, timeout)
    try:
        wire.pop_ok()
        if target.direct:
            wire.send(f"AUTH XOAUTH2 {target.xoauth2(user)}\r\n".encode())
        else:
            wire.send(f"USER {user}\r\n".encode())
            wire.pop_ok()
            wire.send(f"PASS {target.password}\r\n".encode())
        wire.pop_ok()
    except BaseException:
        wire.close()
        raise
    return wire


def smtp_login(target: Target, user: str, timeout: float = TIMEOUT) -> Wire:
    """Direct: submission with STARTTLS (as Microsoft 365's port 587), then AUTH XOAUTH2."""
    wire = Wire.connect(target.smtp, None, timeout)
    try:
        wire.smtp_reply("220")
        wire.send(b"EHLO bench.example.com\r\n")
        wire.smtp_reply("250")
        if target.tls is not None:
            wire.send(b"STARTTLS\r\n")
            wire.smtp_reply("220")
            wire.sock = target.tls.wrap_socket(wire.sock, server_hostname=target.smtp[0])
            wire.send(b"EHLO bench.example.com\r\n")
            wire.smtp_reply("250")
        if target.direct:
            # no initial response: real tokens (Microsoft 365: 1-2 KB) make "AUTH XOAUTH2 <response>" longer
            # than SMTP's 512-octet command line, so a client must wait for the 334 (RFC 4954)
            wire.send(b"AUTH XOAUTH2\r\n")
            wire.smtp_reply("334")
            wire.send(f"{target.xoauth2(user)}\r\n".encode())
        else:
            plain = base64.b64encode(f"\0{user}\0{target.password}".encode()).decode()
            wire.send(f"AUTH PLAIN {plain}\r\n".encode())
        wire.smtp_reply("235")
    except BaseException:
        wire.close()
        raise
    return wire


LOGINS = {"IMAP": imap_login, "POP": pop_login, "SMTP": smtp_login}


def timed_login(target: Target, protocol: str, user: str) -> float:
    """Seconds from connect() until the login is accepted (the connection is then dropped)."""
    start = time.perf_counter()
    wire = LOGINS[protocol](target, user)
    elapsed = time.perf_counter() - start
    wire.close()
    return elapsed


# ---------------------------------------------------------------------------------------------- bulk


@dataclass(frozen=True)
class Transfer:
    nbytes: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e6


def imap_fetch(wire: Wire, marker: bytes) -> Transfer:
    """EXAMINE, then FETCH message 1, counting its literal with recv_into; it must end with `marker`."""
    wire.imap_command("s", "EXAMINE INBOX")
    start = time.perf_counter()
    wire.send(b"f FETCH 1 (BODY.PEEK[])\r\n")
    while True:
        line = wire.readline()
        if line.startswith(b"* 1 FETCH") and line.rstrip().endswith(b"}"):
            break
        if line.startswith(b"f "):
            raise BenchError(f"FETCH: {line!r}")
    size = int(line.rstrip()[line.rindex(b"{") + 1 : -1])
    received = min(len(wire.pending), size)
    tail = bytes(wire.pending[:received][-len(marker) :])
    del wire.pending[:received]
    buffer = bytearray(READ_SIZE)
    view = memoryview(buffer)
    while received < size:
        n = wire.sock.recv_into(view, min(READ_SIZE, size - received))
        if n == 0:
            raise BenchError(f"closed after {received} of {size} bytes")
        received += n
        tail = (tail + bytes(view[max(0, n - len(marker)) : n]))[-len(marker) :]
    wire.imap_wait("f")
    elapsed = time.perf_counter() - start
    if tail != marker:
        raise BenchError(f"FETCH literal ends with {tail!r}, expected {marker!r}")
    return Transfer(size, elapsed)


def smtp_send(wire: Wire, sender: str, recipient: str, message: bytes) -> Transfer:
    """MAIL/RCPT/DATA; `message` must be dot-stuffed and end with CRLF. Timed from DATA to the 250 reply."""
    wire.send(f"MAIL FROM:<{sender}>\r\n".encode())
    wire.smtp_reply("250")
    wire.send(f"RCPT TO:<{recipient}>\r\n".encode())
    wire.smtp_reply("250")
    start = time.perf_counter()
    wire.send(b"DATA\r\n")
    wire.smtp_reply("354")
    wire.sock.sendall(message)
    wire.send(b".\r\n")
    wire.smtp_reply("250")
    return Transfer(len(message), time.perf_counter() - start)


def pop_retr(wire: Wire, marker: bytes) -> Transfer:
    """RETR 1 read with recv_into until the terminating dot line; the message must end with `marker`."""
    end = b"\r\n.\r\n"
    expected = marker + b".\r\n"  # the marker's own CRLF is the first half of the terminator
    keep = len(expected)
    start = time.perf_counter()
    wire.send(b"RETR 1\r\n")
    wire.pop_ok()
    received = len(wire.pending)
    tail = bytes(wire.pending[-keep:])
    wire.pending.clear()
    buffer = bytearray(READ_SIZE)
    view = memoryview(buffer)
    while not tail.endswith(end):
        n = wire.sock.recv_into(view)
        if n == 0:
            raise BenchError(f"closed after {received} bytes")
        received += n
        tail = (tail + bytes(view[max(0, n - keep) : n]))[-keep:]
    elapsed = time.perf_counter() - start
    if tail != expected:
        raise BenchError(f"RETR ends with {tail!r}, expected {expected!r}")
    return Transfer(received, elapsed)


def make_message(recipient: str, size: int, marker: bytes) -> bytes:
    """About `size` bytes: 1000-byte lines of text (nothing to dot-stuff), then the marker line."""
    line = b"x" * 998 + b"\r\n"
    head = f"From: bench@example.com\r\nTo: {recipient}\r\nSubject: bulk {size}\r\n\r\n".encode()
    return head + line * max(1, (size - len(head)) // len(line)) + marker


def lmtp_deliver(address: tuple[str, int], recipient: str, message: bytes) -> None:
    """Deliver a big message over LMTP with one sendall (the message must need no dot-stuffing)."""
    wire = Wire.connect(address, None)
    try:
        wire.smtp_reply("220")
        wire.send(b"LHLO bench.example.com\r\n")
        wire.smtp_reply("250")
        wire.send(f"MAIL FROM:<bench@example.com>\r\nRCPT TO:<{recipient}>\r\nDATA\r\n".encode())
        wire.smtp_reply("250")
        wire.smtp_reply("250")
        wire.smtp_reply("354")
        wire.sock.sendall(message)
        wire.send(b".\r\n")
        wire.smtp_reply("250")
        wire.send(b"QUIT\r\n")
    finally:
        wire.close()
