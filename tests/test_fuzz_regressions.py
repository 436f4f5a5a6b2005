"""Regression tests for what the fuzzers found (fuzz/README.md, "Findings"), as minimal byte transcripts.

The split-point cases were real contract violations in the IMAP session (its step loop drained every
server line before the client's); they pass since the session handles waiting client lines after each
server line. The other tests pin behaviour that the fuzzers questioned but that the contract allows.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from emailproxy.protocols.events import (
    MAX_BUFFER,
    MAX_LINE,
    Action,
    Close,
    Log,
    NeedToken,
    SendToClient,
    SendToServer,
    SessionOptions,
)
from emailproxy.protocols.imap import ImapSession
from emailproxy.protocols.pop import PopSession


def feed(chunks: Sequence[tuple[str, bytes]]) -> list[Action]:
    """A fresh IMAP session fed client ("c") and server ("s") chunks; all actions, Log left out."""
    session = ImapSession(SessionOptions())
    actions: list[Action] = []
    for side, chunk in chunks:
        actions += session.client_data(chunk) if side == "c" else session.server_data(chunk)
    return [action for action in actions if not isinstance(action, Log)]


def to_client(actions: list[Action]) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, SendToClient))


def to_server(actions: list[Action]) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, SendToServer))


SCRAM = b"a AUTHENTICATE SCRAM-SHA-1 biws\r\nr1\r\nr2\r\n"
SERVER_SPLITS = {
    # The client's line waits for the greeting; the greeting and an untagged line come in one chunk or
    # two. Split: greeting, the proxy's BAD, EXISTS. One chunk: greeting, EXISTS, BAD.
    "reply order": (
        [("c", b"?\r\n"), ("s", b"* OK hi\r\n* 1 EXISTS\r\n")],
        [("c", b"?\r\n"), ("s", b"* OK hi\r\n"), ("s", b"* 1 EXISTS\r\n")],
    ),
    # A forwarded AUTHENTICATE with two continuation requests: in two chunks each lets one client line
    # through; in one chunk only one line goes upstream (both requests are handled before the client).
    "continuations": (
        [("s", b"* OK hi\r\n"), ("c", SCRAM), ("s", b"+ x\r\n+ y\r\n")],
        [("s", b"* OK hi\r\n"), ("c", SCRAM), ("s", b"+ x\r\n"), ("s", b"+ y\r\n")],
    ),
    # A pipelined LOGIN and an untagged line after the reply to the command before it: the NeedToken
    # comes before or after the forwarded EXISTS depending on the split.
    "token timing": (
        [("s", b"* OK hi\r\n"), ("c", b"a1 NOOP\r\na2 LOGIN user pw\r\n"), ("s", b"a1 OK\r\n* 3 EXISTS\r\n")],
        [("s", b"* OK hi\r\n"), ("c", b"a1 NOOP\r\na2 LOGIN user pw\r\n"), ("s", b"a1 OK\r\n"),
         ("s", b"* 3 EXISTS\r\n")],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(SERVER_SPLITS))
def test_imap_output_does_not_depend_on_how_server_bytes_are_split(case: str) -> None:
    whole, split = SERVER_SPLITS[case]
    first, second = feed(whole), feed(split)
    assert to_server(first) == to_server(second)
    assert to_client(first) == to_client(second)
    assert [type(a) for a in first] == [type(a) for a in second]


def test_a_continuation_request_out_of_turn_does_not_release_the_next_client_line() -> None:
    """Found by the stateful fuzzer: a server that answered a plain command with ``+`` used to get the
    client's next line, even a LOGIN the client pipelined (local password included). Now ``+`` releases a
    client line only in a SASL exchange the proxy forwarded; the pipelined LOGIN stays a command and is
    intercepted once the NOOP is answered."""
    actions = feed([("s", b"* OK hi\r\n"), ("c", b"a1 NOOP\r\na2 LOGIN user secret\r\n"), ("s", b"+ \r\n")])
    assert to_server(actions) == b"a1 NOOP\r\n"
    assert to_client(actions).endswith(b"+ \r\n")
    assert not any(isinstance(a, NeedToken) for a in actions)
    actions = feed([("s", b"* OK hi\r\n"), ("c", b"a1 NOOP\r\na2 LOGIN user secret\r\n"), ("s", b"+ \r\n"),
                    ("s", b"a1 OK done\r\n")])
    assert b"secret" not in to_server(actions)
    assert isinstance(actions[-1], NeedToken)


def test_a_forwarded_sasl_exchange_still_gets_its_continuation_lines() -> None:
    client = b"a1 AUTHENTICATE SCRAM-SHA-1\r\nbiws\r\n"
    actions = feed([("s", b"* OK hi\r\n"), ("c", client), ("s", b"+ \r\n")])
    assert to_server(actions) == b"a1 AUTHENTICATE SCRAM-SHA-1\r\nbiws\r\n"


def test_a_pipelined_login_is_intercepted_when_the_server_answers_in_turn() -> None:
    pipelined = b"a1 NOOP\r\na2 LOGIN user secret\r\n"
    actions = feed([("s", b"* OK hi\r\n"), ("c", pipelined), ("s", b"a1 OK\r\n")])
    assert to_server(actions) == b"a1 NOOP\r\n"
    assert [a.username for a in actions if isinstance(a, NeedToken)] == ["user"]


def test_a_long_line_closes_or_not_depending_on_the_split_when_max_buffer_is_below_max_line() -> None:
    """With max_buffer < max_line (never the case with the defaults) a partial line may be closed on as
    "too much data" although the whole line, arriving in one chunk, is a legal command. The options
    must keep max_buffer >= max_line; the fuzz harness does."""
    options = SessionOptions(max_line=16384, max_buffer=1024)
    split, whole = PopSession(options), PopSession(options)
    split.server_data(b"+OK hi\r\n")
    whole.server_data(b"+OK hi\r\n")
    line = b"N" * 2000 + b"OOP\r\n"
    assert isinstance(split.client_data(line[:2000])[-1], Close)
    assert whole.client_data(line) == [SendToServer(line)]
    assert MAX_BUFFER >= MAX_LINE
