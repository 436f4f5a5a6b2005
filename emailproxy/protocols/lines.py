"""Line framing with a length limit, shared by the IMAP, POP3 and SMTP state machines."""

from __future__ import annotations


class LineTooLong(Exception):
    pass


class LineBuffer:
    """Collects bytes and hands out complete lines (terminator included: CRLF, or a bare LF).

    At most ``max_line`` bytes may be pending without a line end; more raises LineTooLong.
    """

    __slots__ = ("_buf", "max_line")

    def __init__(self, max_line: int) -> None:
        self._buf = bytearray()
        self.max_line = max_line

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_line(self) -> bytes | None:
        end = self._buf.find(b"\n")
        if end < 0:
            if len(self._buf) > self.max_line:
                raise LineTooLong(f"line longer than {self.max_line} bytes")
            return None
        if end + 1 > self.max_line:
            raise LineTooLong(f"line longer than {self.max_line} bytes")
        line = bytes(self._buf[: end + 1])
        del self._buf[: end + 1]
        return line

    def take(self, n: int) -> bytes | None:
        """Take exactly ``n`` raw bytes (an IMAP literal), or None if fewer are buffered."""
        if len(self._buf) < n:
            return None
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def take_all(self) -> bytes:
        """Everything still buffered (handed over to the relay after login)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def __len__(self) -> int:
        return len(self._buf)


def strip_eol(line: bytes) -> bytes:
    """The line without its CRLF or LF."""
    if line.endswith(b"\r\n"):
        return line[:-2]
    if line.endswith(b"\n"):
        return line[:-1]
    return line
