"""IMAP syntax the proxy needs before login (RFC 9051, RFC 3501, RFC 7888), with no I/O.

- :class:`Framer` splits one direction of the stream into lines and literal bytes, counting literals
  (``{n}``, ``{n+}``) by bytes so that literal contents are never parsed as commands or responses.
- :func:`parse_command` and :func:`parse_response` split a line into tag, word and the rest.
- :func:`parse_login_args` reads the two astrings of ``LOGIN`` (atoms, quoted strings, literals).
- :func:`rewrite_capabilities` and friends rewrite what the server advertises before login.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from emailproxy.protocols.lines import LineBuffer, strip_eol


class ImapSyntaxError(ValueError):
    """A command's arguments could not be parsed."""


# ---------------------------------------------------------------------------------------------- framing


@dataclass(frozen=True, slots=True)
class Literal:
    """A literal announced at the end of a line: ``{size}`` (synchronising) or ``{size+}``."""

    size: int
    synchronising: bool


@dataclass(frozen=True, slots=True)
class Line:
    """One line as received. ``body`` has neither the line end nor the trailing literal announcement."""

    data: bytes
    body: bytes
    literal: Literal | None
    #: True when this line continues a command or response after a literal
    continued: bool


@dataclass(frozen=True, slots=True)
class LiteralData:
    """Some (or all) of a literal's bytes; ``last`` is True on the chunk that completes it."""

    data: bytes
    last: bool


Piece = Line | LiteralData

# At most 19 digits: larger numbers are not a literal (and int() of a very long digit string is refused).
_LITERAL_RE = re.compile(rb"\{(\d{1,19})(\+?)\}$")


def split_literal(text: bytes) -> tuple[bytes, Literal | None]:
    """Split a line (without its line end) into its body and the literal it announces, if any."""
    match = _LITERAL_RE.search(text)
    if match is None:
        return text, None
    literal = Literal(int(match.group(1)), synchronising=not match.group(2))
    return text[: match.start()], literal


class Framer:
    """Frames one direction of an IMAP stream into :class:`Line` and :class:`LiteralData` pieces.

    Literal bytes are handed out as soon as they arrive (never held back), so a large literal is never
    buffered here. Lines longer than ``max_line`` raise :class:`~emailproxy.protocols.lines.LineTooLong`.
    """

    __slots__ = ("_buffer", "_continued", "_literal_left", "_literal_size", "_literal_sync")

    def __init__(self, max_line: int) -> None:
        self._buffer = LineBuffer(max_line)
        self._literal_left: int | None = None
        self._literal_size = 0
        self._literal_sync = False
        self._continued = False

    def feed(self, data: bytes) -> None:
        self._buffer.feed(data)

    @property
    def mid_message(self) -> bool:
        """True while a command/response is incomplete (a literal or the line after it is still due)."""
        return self._literal_left is not None or self._continued

    @property
    def awaiting_literal(self) -> bool:
        """True when a synchronising literal was announced and none of its bytes has been taken yet."""
        left = self._literal_left
        return self._literal_sync and left is not None and left == self._literal_size

    def next_piece(self) -> Piece | None:
        """The next line or literal chunk, or None when more bytes are needed."""
        if self._literal_left is not None:
            return self._next_literal_chunk()
        line = self._buffer.next_line()
        if line is None:
            return None
        body, literal = split_literal(strip_eol(line))
        piece = Line(line, body, literal, self._continued)
        self._continued = literal is not None
        if literal is not None:
            self._literal_left = self._literal_size = literal.size
            self._literal_sync = literal.synchronising
        return piece

    def _next_literal_chunk(self) -> LiteralData | None:
        assert self._literal_left is not None
        count = min(self._literal_left, len(self._buffer))
        if count == 0 and self._literal_left > 0:
            return None
        data = self._buffer.take(count) or b""
        self._literal_left -= count
        if self._literal_left == 0:
            self._literal_left = None
            return LiteralData(data, last=True)
        return LiteralData(data, last=False)

    def next_raw_line(self) -> bytes | None:
        """The next line with no literal detection (a SASL or IDLE continuation response)."""
        return self._buffer.next_line()

    def abort_literal(self) -> None:
        """Forget an announced literal whose bytes will not come (it was refused)."""
        self._literal_left = None
        self._continued = False

    def discard(self) -> None:
        """Drop everything buffered and any framing state."""
        self._buffer.take_all()
        self.abort_literal()

    def take_all(self) -> bytes:
        """Everything not yet framed, raw (handed to the relay after login)."""
        return self._buffer.take_all()

    def __len__(self) -> int:
        return len(self._buffer)


# ---------------------------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class Command:
    tag: bytes
    #: the command name, upper-cased (``LOGIN``, ``AUTHENTICATE``...)
    name: str
    #: everything after the name and one space (without the line end or a trailing literal announcement)
    args: bytes


# tag = 1*<any ASTRING-CHAR except "+">: printable ASCII except SP ( ) { % * " \ and +
_COMMAND_RE = re.compile(rb'([^\x00-\x20\x7f-\xff(){%*"\\+]+) ([A-Za-z][A-Za-z0-9.-]*)(?: (.*))?', re.S)


def parse_command(body: bytes) -> Command | None:
    """``tag SP name [SP args]``, or None when the line is not a command."""
    match = _COMMAND_RE.fullmatch(body)
    if match is None:
        return None
    return Command(match.group(1), match.group(2).decode("ascii").upper(), match.group(3) or b"")


@dataclass(frozen=True, slots=True)
class Response:
    #: ``*`` for untagged data/status, ``+`` for a continuation request, else the command's tag
    tag: bytes
    #: the upper-cased word after the tag (OK, NO, BAD, BYE, PREAUTH, CAPABILITY, a number...); "" for ``+``
    word: str
    text: bytes


def parse_response(body: bytes) -> Response:
    if body.startswith(b"+"):
        return Response(b"+", "", body[2:] if body.startswith(b"+ ") else body[1:])
    tag, _, rest = body.partition(b" ")
    word, _, text = rest.partition(b" ")
    return Response(tag, word.decode("latin-1").upper(), text)


_CODE_RE = re.compile(rb"\[[^\]]*\] ?")


def strip_response_code(text: bytes) -> bytes:
    """The human-readable text of a status response, without a leading ``[CODE ...]``."""
    match = _CODE_RE.match(text)
    return text[match.end() :] if match else text


# ---------------------------------------------------------------------------------------------- LOGIN


@dataclass(frozen=True, slots=True)
class Segment:
    """Part of a command's arguments: text from a line, or the exact bytes of a literal."""

    data: bytes
    literal: bool


def parse_quoted(text: bytes, start: int) -> tuple[bytes, int]:
    """Unescape the quoted string starting at ``text[start] == '"'``; returns (value, index after it)."""
    value = bytearray()
    index = start + 1
    while index < len(text):
        char = text[index]
        if char == 0x5C:  # backslash: the next byte is taken literally (RFC allows only \" and \\)
            if index + 1 >= len(text):
                break
            value.append(text[index + 1])
            index += 2
        elif char == 0x22:  # closing quote
            return bytes(value), index + 1
        else:
            value.append(char)
            index += 1
    raise ImapSyntaxError("unterminated quoted string")


class _ArgReader:
    """Reads astrings from a command's segments as one logical line."""

    def __init__(self, segments: Sequence[Segment]) -> None:
        self._segments = segments
        self._index = 0
        self._pos = 0

    def _current(self) -> Segment | None:
        while self._index < len(self._segments):
            segment = self._segments[self._index]
            if segment.literal or self._pos < len(segment.data):
                return segment
            self._index += 1
            self._pos = 0
        return None

    def _advance(self) -> None:
        self._index += 1
        self._pos = 0

    def skip_spaces(self) -> None:
        segment = self._current()
        while segment is not None and not segment.literal and segment.data[self._pos : self._pos + 1] == b" ":
            self._pos += 1
            segment = self._current()

    def at_end(self) -> bool:
        self.skip_spaces()
        return self._current() is None

    def astring(self) -> tuple[bytes, bool]:
        """The next atom, quoted string or literal; returns (value, came from a literal)."""
        segment = self._current()
        if segment is None:
            return b"", False
        if segment.literal:
            self._advance()
            return segment.data, True
        text = segment.data
        if text[self._pos] == 0x22:
            value, self._pos = parse_quoted(text, self._pos)
            return value, False
        end = text.find(b" ", self._pos)
        end = len(text) if end < 0 else end
        value, self._pos = text[self._pos : end], end
        return value, False

    def rest_or_astring(self) -> bytes:
        """A quoted string or literal, else the rest of the line (so unquoted passwords may hold spaces)."""
        segment = self._current()
        if segment is None or segment.literal or segment.data[self._pos] == 0x22:
            return self.astring()[0]
        value = segment.data[self._pos :]
        self._pos = len(segment.data)
        return value


def parse_login_args(segments: Sequence[Segment]) -> tuple[bytes, bytes]:
    """``LOGIN`` arguments -> (username, password). Missing arguments are empty.

    Compatibility: an unquoted password is the rest of the line (it may contain spaces), and a single
    literal holding ``username password`` is split at its first space.
    """
    reader = _ArgReader(segments)
    reader.skip_spaces()
    username, from_literal = reader.astring()
    if reader.at_end():
        if from_literal and b" " in username:
            user, _, password = username.partition(b" ")
            return user, password
        return username, b""
    password = reader.rest_or_astring()
    if not reader.at_end():
        raise ImapSyntaxError("unexpected data after the password")
    return username, password


# ---------------------------------------------------------------------------------------------- capabilities

_IMAP_VERSION_RE = re.compile(r"IMAP4", re.I)
_CAPABILITY_CODE_RE = re.compile(rb"\[CAPABILITY(?: ([^\]]*))?\] ?", re.I)


def rewrite_capabilities(capabilities: Iterable[str], offer_starttls: bool) -> list[str]:
    """What the client is told before login: only ``AUTH=PLAIN`` (plus ``SASL-IR``), no ``LOGINDISABLED``,
    and ``STARTTLS`` only when the proxy itself can offer it. Everything else is kept, in order."""
    result: list[str] = []
    auth_index: int | None = None
    for capability in capabilities:
        upper = capability.upper()
        if upper.startswith("AUTH="):
            if auth_index is None:
                auth_index = len(result)
                result.append("AUTH=PLAIN")
        elif upper not in ("LOGINDISABLED", "STARTTLS"):
            result.append(capability)
    if auth_index is None:
        versions = [i for i, c in enumerate(result) if _IMAP_VERSION_RE.match(c)]
        result.insert(versions[-1] + 1 if versions else 0, "AUTH=PLAIN")
    if "SASL-IR" not in {c.upper() for c in result}:
        result.append("SASL-IR")
    if offer_starttls:
        result.append("STARTTLS")
    return result


def _split_capabilities(text: bytes) -> list[str]:
    return text.decode("latin-1").split()


def capability_code(text: bytes) -> tuple[list[str], bytes] | None:
    """A leading ``[CAPABILITY ...]`` response code: (capabilities, the text after it), or None."""
    match = _CAPABILITY_CODE_RE.match(text)
    if match is None:
        return None
    return _split_capabilities(match.group(1) or b""), text[match.end() :]


def response_capabilities(response: Response) -> list[str] | None:
    """The capabilities a ``* CAPABILITY`` response or an ``OK [CAPABILITY ...]`` carries, else None."""
    if response.tag == b"*" and response.word == "CAPABILITY":
        return _split_capabilities(response.text)
    if response.word == "OK":
        code = capability_code(response.text)
        return code[0] if code else None
    return None


def format_capabilities(capabilities: Iterable[str]) -> bytes:
    return " ".join(capabilities).encode("latin-1")


def rewrite_response(response: Response, offer_starttls: bool) -> bytes | None:
    """The rewritten response line (without line end) if it carries capabilities, else None."""
    if response.tag == b"*" and response.word == "CAPABILITY":
        caps = rewrite_capabilities(_split_capabilities(response.text), offer_starttls)
        return b"* CAPABILITY " + format_capabilities(caps)
    code = capability_code(response.text) if response.word == "OK" else None
    if code is None:
        return None
    caps = rewrite_capabilities(code[0], offer_starttls)
    text = b" " + code[1] if code[1] else b""
    return response.tag + b" OK [CAPABILITY " + format_capabilities(caps) + b"]" + text
