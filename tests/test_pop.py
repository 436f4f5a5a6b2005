"""POP3 session transcripts and properties: bytes in, actions out, no sockets."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from emailproxy.protocols import sasl
from emailproxy.protocols.events import (
    REPLY_PREFIX,
    Action,
    Close,
    Log,
    NeedToken,
    Relay,
    SendToClient,
    SendToServer,
    SessionOptions,
    Side,
    StartTls,
    TokenFailure,
    TokenOk,
)
from emailproxy.protocols.pop import PopSession
from emailproxy.secret import Secret

C = SendToClient
S = SendToServer
GREETING = b"+OK Dovecot ready.\r\n"
TOKEN = Secret("ya29.access-token")
BLOB = sasl.xoauth2("alice@example.com", TOKEN) + b"\r\n"


def plain(user: str, password: str, authzid: str = "") -> bytes:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode())


class Script:
    """Drives one PopSession; every call returns the actions without Log entries (kept in .logs)."""

    def __init__(self, greet: bool = True, **options: object) -> None:
        self.session = PopSession(SessionOptions(**options))  # type: ignore[arg-type]
        self.logs: list[Log] = []
        if greet:
            assert self.server(GREETING) == [C(GREETING)]

    def _keep(self, actions: list[Action]) -> list[Action]:
        self.logs += [a for a in actions if isinstance(a, Log)]
        return [a for a in actions if not isinstance(a, Log)]

    def client(self, data: bytes) -> list[Action]:
        return self._keep(self.session.client_data(data))

    def server(self, data: bytes) -> list[Action]:
        return self._keep(self.session.server_data(data))

    def token(self, result: TokenOk | TokenFailure) -> list[Action]:
        return self._keep(self.session.token_result(result))

    def tls(self, side: Side) -> list[Action]:
        return self._keep(self.session.tls_started(side))

    def login(self, password: str = "secret pw") -> None:
        assert self.client(b"USER alice@example.com\r\n") == [C(b"+OK\r\n")]
        assert self.client(f"PASS {password}\r\n".encode()) == [
            NeedToken("alice@example.com", Secret(password))
        ]


# ------------------------------------------------------------------ greeting, CAPA


def test_greeting_is_forwarded_and_failure_greeting_closes() -> None:
    Script()  # asserts the greeting goes to the client unchanged
    s = Script(greet=False)
    assert s.server(b"-ERR too busy\r\n") == [C(b"-ERR too busy\r\n"), Close("server greeting was not +OK")]
    assert s.client(b"CAPA\r\n") == []


def test_capa_reply_is_rewritten() -> None:
    s = Script()
    assert s.client(b"CAPA\r\n") == [S(b"CAPA\r\n")]
    reply = s.server(b"+OK\r\nTOP\r\nUIDL\r\nSASL XOAUTH2 OAUTHBEARER\r\nSTLS\r\n.\r\n")
    sent = b"".join(a.data for a in reply if isinstance(a, SendToClient))
    assert sent == b"+OK\r\nTOP\r\nUIDL\r\nSASL PLAIN\r\nUSER\r\n.\r\n"
    assert all(isinstance(a, SendToClient) for a in reply)


def test_capa_adds_sasl_and_keeps_user_and_offers_local_stls() -> None:
    s = Script(local_starttls=True)
    s.client(b"capa\r\n")
    reply = s.server(b"+OK Capability list follows\r\nUSER\r\nRESP-CODES\r\n.\r\n")
    sent = b"".join(a.data for a in reply if isinstance(a, SendToClient))
    assert sent == b"+OK Capability list follows\r\nUSER\r\nRESP-CODES\r\nSASL PLAIN\r\nSTLS\r\n.\r\n"


def test_capa_error_passes_unchanged() -> None:
    s = Script()
    s.client(b"CAPA\r\n")
    assert s.server(b"-ERR unknown command\r\n") == [C(b"-ERR unknown command\r\n")]
    assert s.client(b"NOOP\r\n") == [S(b"NOOP\r\n")]


def test_bare_auth_is_answered_locally() -> None:
    s = Script()
    assert s.client(b"AUTH\r\n") == [C(b"+OK\r\nPLAIN\r\n.\r\n")]


def test_multiline_replies_are_read_to_the_dot_and_list_with_argument_is_single_line() -> None:
    s = Script()
    assert s.client(b"LIST\r\nLIST 1\r\n") == [S(b"LIST\r\n")]
    assert s.server(b"+OK 1 messages\r\n") == [C(b"+OK 1 messages\r\n")]
    assert s.server(b"1 120\r\n.\r\n") == [C(b"1 120\r\n"), C(b".\r\n"), S(b"LIST 1\r\n")]
    assert s.server(b"+OK 1 120\r\n") == [C(b"+OK 1 120\r\n")]
    assert s.server(b"-ERR unsolicited\r\n") == [C(b"-ERR unsolicited\r\n")]


# ------------------------------------------------------------------ client login forms


def test_user_pass_asks_for_a_token_and_logs_no_password() -> None:
    s = Script()
    s.login("pass word with spaces")
    assert any("***" in log.message for log in s.logs)
    assert not any("pass word" in log.message for log in s.logs)


def test_pass_without_user_and_user_reset_by_another_command() -> None:
    s = Script()
    assert s.client(b"PASS pw\r\n") == [C(b"-ERR USER first\r\n")]
    assert s.client(b"USER bob\r\n") == [C(b"+OK\r\n")]
    assert s.client(b"NOOP\r\n") == [S(b"NOOP\r\n")]
    assert s.server(b"+OK\r\n") == [C(b"+OK\r\n")]
    assert s.client(b"PASS pw\r\n") == [C(b"-ERR USER first\r\n")]


def test_empty_password_still_asks_the_token_manager() -> None:
    s = Script()
    s.client(b"USER bob\r\n")
    assert s.client(b"PASS\r\n") == [NeedToken("bob", Secret(""))]


def test_auth_plain_with_initial_response() -> None:
    s = Script()
    line = b"AUTH PLAIN " + plain("alice@example.com", "pw", authzid="ignored") + b"\r\n"
    assert s.client(line) == [NeedToken("alice@example.com", Secret("pw"))]


def test_auth_plain_two_step() -> None:
    s = Script()
    assert s.client(b"auth plain\r\n") == [C(b"+ \r\n")]
    assert s.client(plain("carol", "pw2") + b"\r\n") == [NeedToken("carol", Secret("pw2"))]


def test_auth_plain_cancel_and_bad_base64() -> None:
    s = Script()
    assert s.client(b"AUTH PLAIN\r\n") == [C(b"+ \r\n")]
    assert s.client(b"*\r\n") == [C(b"-ERR Authentication cancelled\r\n")]
    bad = s.client(b"AUTH PLAIN not-base64!\r\n")
    assert len(bad) == 1 and isinstance(bad[0], SendToClient) and bad[0].data.startswith(b"-ERR ")
    two_fields = s.client(b"AUTH PLAIN " + base64.b64encode(b"user\0pw") + b"\r\n")
    assert len(two_fields) == 1 and isinstance(two_fields[0], SendToClient)
    assert two_fields[0].data.startswith(b"-ERR ")
    assert s.client(b"NOOP\r\n") == [S(b"NOOP\r\n")]  # still usable


def test_apop_and_other_mechanisms_are_refused_locally() -> None:
    s = Script()
    for line in (
        b"APOP alice c4c9334bac560ecc979e58001b3e22fb\r\n",
        b"AUTH LOGIN\r\n",
        b"AUTH XOAUTH2 abc\r\n",
    ):
        reply = s.client(line)
        assert len(reply) == 1 and isinstance(reply[0], SendToClient)
        assert reply[0].data.startswith(b"-ERR ")


def test_token_failure_wording() -> None:
    s = Script()
    s.login()
    message = "Login failed - the password for account alice@example.com is incorrect"
    assert s.token(TokenFailure(message)) == [
        C(f"-ERR Authentication failed. {REPLY_PREFIX}{message}\r\n".encode())
    ]
    assert s.client(b"USER alice@example.com\r\n") == [C(b"+OK\r\n")]


# ------------------------------------------------------------------ upstream login


def test_upstream_success_hands_leftovers_to_relay() -> None:
    s = Script()
    assert s.client(b"USER alice@example.com\r\nPASS pw\r\nSTAT\r\nLIS") == [
        C(b"+OK\r\n"),
        NeedToken("alice@example.com", Secret("pw")),
    ]
    assert s.client(b"T\r\n") == []  # buffered while waiting
    assert s.token(TokenOk("alice@example.com", TOKEN)) == [S(b"AUTH XOAUTH2\r\n")]
    assert s.server(b"+ \r\n") == [S(BLOB, sensitive=True)]
    assert s.server(b"+OK Logged in.\r\n+OK 2 320\r\n") == [
        C(b"+OK Logged in.\r\n"),
        Relay(to_server=b"STAT\r\nLIST\r\n", to_client=b"+OK 2 320\r\n"),
    ]
    assert s.client(b"QUIT\r\n") == []  # the session is done


def test_upstream_error_challenge_then_failure_keeps_session_usable() -> None:
    s = Script()
    s.login()
    s.token(TokenOk("alice@example.com", TOKEN))
    s.server(b"+\r\n")
    error = base64.b64encode(json.dumps({"status": "401", "schemes": "bearer"}).encode())
    assert s.server(b"+ " + error + b"\r\n") == [S(b"\r\n")]
    assert any(log.level == logging.INFO and '"status": "401"' in log.message for log in s.logs)
    assert s.server(b"-ERR [AUTH] Authentication failed.\r\n") == [
        C(f"-ERR Authentication failed. {REPLY_PREFIX}[AUTH] Authentication failed.\r\n".encode())
    ]
    s.login()


def test_server_offering_only_oauthbearer_gets_oauthbearer() -> None:
    s = Script()
    s.client(b"CAPA\r\n")
    s.server(b"+OK\r\nSASL OAUTHBEARER PLAIN\r\n.\r\n")
    s.login()
    assert s.token(TokenOk("alice@example.com", TOKEN)) == [S(b"AUTH OAUTHBEARER\r\n")]
    expected = sasl.oauthbearer("alice@example.com", TOKEN) + b"\r\n"
    assert s.server(b"+ \r\n") == [S(expected, sensitive=True)]


def test_unknown_mechanisms_fall_back_to_oauthbearer_once() -> None:
    s = Script()
    s.login()
    s.token(TokenOk("alice@example.com", TOKEN))
    assert s.server(b"-ERR Unsupported mechanism\r\n") == [S(b"AUTH OAUTHBEARER\r\n")]
    assert s.server(b"-ERR Unsupported mechanism\r\n") == [
        C(f"-ERR Authentication failed. {REPLY_PREFIX}Unsupported mechanism\r\n".encode())
    ]


def test_no_fallback_when_oauthbearer_is_known_absent() -> None:
    s = Script()
    s.client(b"CAPA\r\n")
    s.server(b"+OK\r\nSASL XOAUTH2\r\n.\r\n")
    s.login()
    s.token(TokenOk("alice@example.com", TOKEN))
    assert s.server(b"-ERR no\r\n") == [C(f"-ERR Authentication failed. {REPLY_PREFIX}no\r\n".encode())]


# ------------------------------------------------------------------ STARTTLS


def test_server_starttls_happy_path() -> None:
    s = Script(greet=False, server_starttls=True)
    assert s.client(b"CAPA\r\n") == []  # held until the upstream is encrypted
    assert s.server(GREETING) == [S(b"STLS\r\n")]
    assert s.server(b"+OK Begin TLS\r\n-ERR injected\r\n") == [StartTls(Side.SERVER)]
    assert s.tls(Side.SERVER) == [C(GREETING), S(b"CAPA\r\n")]
    assert s.server(b"+OK\r\nSTLS\r\nSASL XOAUTH2\r\n.\r\n") == [
        C(b"+OK\r\n"),
        C(b"SASL PLAIN\r\n"),
        C(b"USER\r\n.\r\n"),
    ]


def test_server_starttls_not_offered_closes_without_credentials() -> None:
    s = Script(greet=False, server_starttls=True)
    s.server(GREETING)
    actions = s.server(b"-ERR STLS not supported\r\n")
    assert len(actions) == 2 and actions[1] == Close("server refused STLS")
    assert isinstance(actions[0], SendToClient)
    assert actions[0].data.startswith(b"-ERR " + REPLY_PREFIX.encode()) and b"STLS" in actions[0].data
    failed = Script(greet=False, server_starttls=True)
    assert failed.server(b"-ERR go away\r\n") == [
        C(b"-ERR go away\r\n"),
        Close("server greeting was not +OK"),
    ]


def test_local_stls_discards_injected_bytes_and_is_offered_once() -> None:
    s = Script(local_starttls=True)
    assert s.client(b"STLS\r\nUSER evil\r\n") == [C(b"+OK Begin TLS negotiation\r\n"), StartTls(Side.CLIENT)]
    assert s.client(b"PASS evil\r\n") == []  # plaintext during the handshake is dropped
    assert s.tls(Side.CLIENT) == []
    assert s.client(b"STLS\r\n") == [C(b"-ERR STLS not available\r\n")]
    s.client(b"CAPA\r\n")
    reply = s.server(b"+OK\r\nSTLS\r\n.\r\n")
    assert b"STLS" not in b"".join(a.data for a in reply if isinstance(a, SendToClient))
    assert s.client(b"PASS x\r\n") == [C(b"-ERR USER first\r\n")]  # USER evil never happened


def test_local_stls_refused_when_not_possible() -> None:
    assert Script().client(b"STLS\r\n") == [C(b"-ERR STLS not available\r\n")]
    assert Script(local_starttls=True, client_tls=True).client(b"STLS\r\n") == [
        C(b"-ERR STLS not available\r\n")
    ]


# ------------------------------------------------------------------ limits, buffering


def test_client_line_too_long() -> None:
    s = Script(max_line=64)
    assert s.client(b"NOOP " + b"x" * 100) == [C(b"-ERR line too long\r\n"), Close("line too long")]


def test_server_line_too_long() -> None:
    s = Script(max_line=64)
    assert s.server(b"+OK " + b"x" * 80 + b"\r\n") == [C(b"-ERR line too long\r\n"), Close("line too long")]


def test_one_command_at_a_time() -> None:
    s = Script()
    assert s.client(b"CAPA\r\nNOOP\r\nUSER bob\r\n") == [S(b"CAPA\r\n")]
    assert s.server(b"+OK\r\nUSER\r\nSASL PLAIN\r\n") == [C(b"+OK\r\n"), C(b"USER\r\n"), C(b"SASL PLAIN\r\n")]
    assert s.server(b".\r\n") == [C(b".\r\n"), S(b"NOOP\r\n")]
    assert s.server(b"+OK\r\n") == [C(b"+OK\r\n"), C(b"+OK\r\n")]


def test_buffer_limit_while_waiting() -> None:
    s = Script(max_buffer=100)
    s.client(b"NOOP\r\n")
    actions = s.client(b"NOOP\r\n" * 20)
    assert actions[-1] == Close("client buffer full")
    assert actions[0] == C(f"-ERR {REPLY_PREFIX}too much data sent before login\r\n".encode())


def test_goodbye_and_error_reply() -> None:
    session = PopSession(SessionOptions())
    assert session.goodbye() == b"+OK Server signing off\r\n"
    assert session.error_reply("upstream down") == f"-ERR {REPLY_PREFIX}upstream down\r\n".encode()
    assert PopSession.protocol == "POP"


# ------------------------------------------------------------------ properties

Event = tuple[str, object]

TRANSCRIPTS: list[list[Event]] = [
    [
        ("s", GREETING),
        ("c", b"CAPA\r\nUSER alice@example.com\r\nPASS pw\r\nSTAT\r\n"),
        ("s", b"+OK\r\nTOP\r\nSASL XOAUTH2 OAUTHBEARER\r\nSTLS\r\n.\r\n"),
        ("token", TokenOk("alice@example.com", TOKEN)),
        ("s", b"+ \r\n"),
        ("s", b"+OK Logged in.\r\n+OK 1 2\r\n"),
        ("c", b"QUIT\r\n"),
    ],
    [
        ("s", GREETING),
        ("c", b"AUTH PLAIN\r\n" + plain("bob", "pw") + b"\r\nNOOP\r\n"),
        ("token", TokenOk("bob", TOKEN)),
        ("s", b"-ERR unknown mechanism\r\n+ \r\n"),
        ("s", b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n-ERR failed\r\n+OK\r\n"),
    ],
    [
        ("s", GREETING),
        ("c", b"LIST\r\nUSER x\r\nPASS y\r\n"),
        ("s", b"+OK\r\n1 20\r\n.\r\n"),
        ("token", TokenFailure("nope")),
        ("c", b"STLS\r\nAPOP a b\r\n"),
    ],
]


def feed(session: PopSession, events: Sequence[Event]) -> list[Action]:
    out: list[Action] = []
    for kind, value in events:
        if kind == "c":
            assert isinstance(value, bytes)
            out += session.client_data(value)
        elif kind == "s":
            assert isinstance(value, bytes)
            out += session.server_data(value)
        elif kind == "token":
            assert isinstance(value, TokenOk | TokenFailure)
            out += session.token_result(value)
        else:
            assert isinstance(value, Side)
            out += session.tls_started(value)
    return out


def normalise(actions: list[Action]) -> list[object]:
    """Merge adjacent sends of the same direction (chunking may split one reply into several)."""
    merged: list[object] = []
    for action in actions:
        last = merged[-1] if merged else None
        if isinstance(action, SendToClient) and isinstance(last, SendToClient):
            merged[-1] = SendToClient(last.data + action.data, last.sensitive or action.sensitive)
        elif isinstance(action, SendToServer) and isinstance(last, SendToServer):
            merged[-1] = SendToServer(last.data + action.data, last.sensitive or action.sensitive)
        else:
            merged.append(action)
    return merged


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for p in [*points, len(data)]:
        pieces.append(data[start:p])
        start = p
    return [p for p in pieces if p]


def feed_split(session: PopSession, events: Sequence[Event], cuts: list[int]) -> list[Action]:
    """Feed with every byte event cut at the given points; bytes after Relay are appended to it."""
    out: list[Action] = []
    relay: Relay | None = None
    for kind, value in events:
        pieces = split(value, cuts) if isinstance(value, bytes) else [value]
        for piece in pieces:
            if relay is not None and isinstance(piece, bytes):
                extra = (piece, b"") if kind == "c" else (b"", piece)
                relay = Relay(relay.to_server + extra[0], relay.to_client + extra[1])
                continue
            for action in feed(session, [(kind, piece)]):
                if isinstance(action, Relay):
                    relay = action
                else:
                    out.append(action)
    return out + ([relay] if relay else [])


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(range(len(TRANSCRIPTS))), st.lists(st.integers(min_value=0, max_value=400), max_size=12)
)
def test_property_split_points_do_not_matter(index: int, cuts: list[int]) -> None:
    events = TRANSCRIPTS[index]
    whole = feed_split(PopSession(SessionOptions()), events, [])
    pieces = feed_split(PopSession(SessionOptions()), events, cuts)
    assert normalise(pieces) == normalise(whole)


POP_WORDS = [b"USER a", b"PASS b", b"AUTH", b"AUTH PLAIN", b"AUTH PLAIN AGFAYg==", b"*", b"STLS", b"CAPA",
             b"+OK", b"-ERR x", b"+ ", b".", b"SASL XOAUTH2", b"LIST", b"APOP", b""]  # fmt: skip
chunks = st.one_of(
    st.binary(max_size=40),
    st.lists(st.sampled_from(POP_WORDS), max_size=5).map(lambda ws: b"".join(w + b"\r\n" for w in ws)),
)
fuzz_events = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["c", "s"]), chunks),
        st.tuples(st.just("token"), st.sampled_from([TokenOk("u", TOKEN), TokenFailure("no")])),
        st.tuples(st.just("tls"), st.sampled_from([Side.CLIENT, Side.SERVER])),
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(fuzz_events, st.booleans(), st.booleans(), st.sampled_from([16, 64, 1024]))
def test_property_random_input_never_raises(events: list[Event], stls: bool, local: bool, limit: int) -> None:
    session = PopSession(SessionOptions(server_starttls=stls, local_starttls=local, max_line=limit))
    finished = False
    for event in events:
        actions = feed(session, [event])
        if finished:
            assert actions == []  # nothing after Relay or Close
        if any(isinstance(a, Relay | Close) for a in actions):
            finished = True
            assert isinstance(actions[-1], Relay | Close)


@settings(max_examples=150, deadline=None)
@given(
    st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\r\n\0"), max_size=20),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-._", min_size=8, max_size=40),
    st.sampled_from(["user", "plain-inline", "plain-two-step"]),
    st.lists(st.integers(min_value=0, max_value=200), max_size=8),
    st.booleans(),
)
def test_property_secrets_stay_on_their_side(
    suffix: str, token_text: str, form: str, cuts: list[int], success: bool
) -> None:
    password = "Pw!" + suffix
    token = Secret("tok-" + token_text)
    if form == "user":
        login = f"USER alice\r\nPASS {password}\r\n".encode()
    elif form == "plain-inline":
        login = b"AUTH PLAIN " + plain("alice", password) + b"\r\n"
    else:
        login = b"AUTH PLAIN\r\n" + plain("alice", password) + b"\r\n"
    final = b"+OK Logged in.\r\n" if success else b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n-ERR no\r\n"
    events: list[Event] = [
        ("s", GREETING),
        ("c", b"CAPA\r\n"),
        ("s", b"+OK\r\nSASL XOAUTH2\r\n.\r\n"),
        ("c", login),
        ("token", TokenOk("alice", token)),
        ("s", b"+ \r\n" + final),
    ]
    session = PopSession(SessionOptions())
    actions = feed_split(session, events, cuts)
    to_server = [a for a in actions if isinstance(a, SendToServer)]
    to_client = b"".join(a.data for a in actions if isinstance(a, SendToClient))
    logs = " ".join(a.message for a in actions if isinstance(a, Log))
    secret_pw = password.encode()
    assert all(secret_pw not in a.data and plain("alice", password) not in a.data for a in to_server)
    assert password not in logs
    assert token.reveal() not in logs and token.reveal().encode() not in to_client
    assert sasl.xoauth2("alice", token) not in to_client
    # before the token, the only client bytes that reached the server are the forwarded CAPA
    first_auth = next(i for i, a in enumerate(to_server) if a.data == b"AUTH XOAUTH2\r\n")
    assert b"".join(a.data for a in to_server[:first_auth]) == b"CAPA\r\n"
    assert to_server[first_auth + 1] == S(sasl.xoauth2("alice", token) + b"\r\n", sensitive=True)
    assert sum(a.sensitive for a in to_server) == 1
