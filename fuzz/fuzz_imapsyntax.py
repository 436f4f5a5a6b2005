"""Coverage-guided fuzzing of the IMAP syntax the proxy parses before login (protocols/imapsyntax.py).

Input: byte 0 chooses the line limit (bits 0-1: 16, 64, 1024, 16384), whether STARTTLS is offered
(bit 2) and the chunk size the stream is fed in (bits 3-7: 0 means all at once); the rest is a byte
stream framed as IMAP (lines and literals). Checks:

- framing loses and invents nothing (the pieces plus what is left are the input), does not depend on
  the chunk size (after joining literal chunks), and raises nothing but LineTooLong;
- each line's body and literal are what split_literal says; literal contents are never lines;
- parse_command, parse_response, strip_response_code, capability_code and rewrite_response never raise;
  a parsed command has a tag and an upper-case name;
- parse_login_args over the first command's arguments (literals included) returns two byte strings or
  raises ImapSyntaxError; parse_quoted inverts the escaping of a quoted string;
- rewrite_capabilities leaves one AUTH=PLAIN, SASL-IR, no LOGINDISABLED, STARTTLS only when offered,
  and is idempotent.

Run by hand (fuzz/README.md): ``python -m fuzz.fuzz_imapsyntax CORPUS -max_total_time=240``.
"""

from __future__ import annotations

from emailproxy.protocols.imapsyntax import (
    Framer,
    ImapSyntaxError,
    Line,
    LiteralData,
    Piece,
    Segment,
    capability_code,
    parse_command,
    parse_login_args,
    parse_quoted,
    parse_response,
    response_capabilities,
    rewrite_capabilities,
    rewrite_response,
    split_literal,
    strip_response_code,
)
from emailproxy.protocols.lines import LineTooLong, strip_eol

LIMITS = (16, 64, 1024, 16384)


def frame(stream: bytes, max_line: int, chunk: int) -> tuple[list[Piece], bytes, bool]:
    """Frame ``stream`` fed ``chunk`` bytes at a time: (pieces, bytes left, line too long)."""
    framer = Framer(max_line)
    pieces: list[Piece] = []
    step = chunk or max(len(stream), 1)
    try:
        for start in range(0, max(len(stream), 1), step):
            framer.feed(stream[start : start + step])
            while (piece := framer.next_piece()) is not None:
                pieces.append(piece)
                if isinstance(piece, LiteralData) and not piece.data and not piece.last:
                    raise AssertionError("an empty, unfinished literal chunk (the framer would spin)")
    except LineTooLong:
        return pieces, b"", True
    return pieces, framer.take_all(), False


def joined(pieces: list[Piece]) -> list[Piece]:
    """Adjacent literal chunks joined (their split depends on how the bytes arrived)."""
    out: list[Piece] = []
    for piece in pieces:
        last = out[-1] if out else None
        if isinstance(piece, LiteralData) and isinstance(last, LiteralData) and not last.last:
            out[-1] = LiteralData(last.data + piece.data, piece.last)
        else:
            out.append(piece)
    return out


def check_line(line: Line, offer: bool) -> None:
    assert line.data.endswith(b"\n")
    assert split_literal(strip_eol(line.data)) == (line.body, line.literal)
    command = parse_command(line.body)
    if command is not None:
        assert command.tag and command.name == command.name.upper() and command.name[:1].isalpha()
    response = parse_response(line.body)
    strip_response_code(response.text)
    capability_code(response.text)
    capabilities = response_capabilities(response)
    rewritten = rewrite_response(response, offer)
    if capabilities is not None:
        assert rewritten is not None and b"AUTH=PLAIN" in rewritten
    check_capabilities(line.body.decode("latin-1").split(), offer)


def check_capabilities(words: list[str], offer: bool) -> None:
    result = rewrite_capabilities(words, offer)
    upper = [word.upper() for word in result]
    assert [word for word in upper if word.startswith("AUTH=")] == ["AUTH=PLAIN"], result
    assert "SASL-IR" in upper and "LOGINDISABLED" not in upper, result
    assert upper.count("STARTTLS") == (1 if offer else 0), result
    assert rewrite_capabilities(result, offer) == result, "rewriting twice changed the result"


def check_login(pieces: list[Piece]) -> None:
    """Collect the first command's arguments like the session does and parse them as LOGIN's."""
    if not pieces or not isinstance(pieces[0], Line):
        return
    first = pieces[0]
    command = parse_command(first.body)
    if command is None:
        return
    segments = [Segment(command.args, literal=False)]
    literal = first.literal
    collected = bytearray()
    for piece in pieces[1:]:
        if literal is None:
            break
        if isinstance(piece, LiteralData):
            collected += piece.data
            if piece.last:
                segments.append(Segment(bytes(collected), literal=True))
                collected.clear()
            continue
        segments.append(Segment(piece.body, literal=False))
        literal = piece.literal
    try:
        username, password = parse_login_args(segments)
    except ImapSyntaxError:
        return
    assert isinstance(username, bytes) and isinstance(password, bytes)


def check_quoted(text: bytes) -> None:
    value = text[:40]
    quoted = b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    assert parse_quoted(quoted + b" rest", 0) == (value, len(quoted))
    try:
        parse_quoted(b'"' + text, 0)
    except ImapSyntaxError:
        pass


def test_one_input(data: bytes) -> None:
    if not data:
        return
    control, stream = data[0], data[1:]
    max_line, offer, chunk = LIMITS[control & 3], bool(control & 4), control >> 3
    pieces, rest, too_long = frame(stream, max_line, chunk)
    whole, whole_rest, whole_too_long = frame(stream, max_line, 0)
    assert too_long == whole_too_long, "the chunk size changed whether a line was too long"
    assert joined(pieces) == joined(whole), "the chunk size changed the framing"
    if not too_long:
        assert rest == whole_rest
        raw = b"".join(piece.data for piece in pieces)
        assert raw + rest == stream, "framing lost or invented bytes"
    for piece in pieces:
        if isinstance(piece, Line):
            check_line(piece, offer)
    check_login(pieces)
    check_quoted(stream)


if __name__ == "__main__":
    from fuzz.atheris_runner import fuzz

    fuzz(test_one_input)
