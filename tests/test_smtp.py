"""SMTP session transcripts and properties: bytes in, actions out, no sockets."""

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
from emailproxy.protocols.smtp import SmtpSession, rewrite_ehlo
from emailproxy.secret import Secret

C = SendToClient
S = SendToServer
GREETING = b"220-mx.example.com ESMTP\r\n220 ready\r\n"
EHLO_REPLY = (
    b"250-mx.example.com Hello\r\n"
    b"250-PIPELINING\r\n"
    b"250-AUTH LOGIN PLAIN XOAUTH2\r\n"
    b"250-STARTTLS\r\n"
    b"250 8BITMIME\r\n"
)
CLIENT_EHLO_REPLY = b"250-mx.example.com Hello\r\n250-PIPELINING\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n"
TOKEN = Secret("ya29.access-token")
BLOB = sasl.xoauth2("alice@example.com", TOKEN) + b"\r\n"


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


def plain(user: str, password: str) -> bytes:
    return b64(f"\0{user}\0{password}")


def failure(message: str) -> SendToClient:
    return C(f"535 5.7.8  Authentication credentials invalid. {REPLY_PREFIX}{message}\r\n".encode())


class Script:
    """Drives one SmtpSession; every call returns the actions without Log entries (kept in .logs)."""

    def __init__(self, greet: bool = True, ehlo: bytes | None = EHLO_REPLY, **options: object) -> None:
        self.session = SmtpSession(SessionOptions(**options))  # type: ignore[arg-type]
        self.logs: list[Log] = []
        if greet:
            assert self.server(GREETING) == [C(GREETING)]
        if greet and ehlo is not None:
            assert self.client(b"EHLO client.example\r\n") == [S(b"EHLO client.example\r\n")]
            self.ehlo_reply = self.server(ehlo)

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
        line = b"AUTH PLAIN " + plain("alice@example.com", password) + b"\r\n"
        assert self.client(line) == [NeedToken("alice@example.com", Secret(password))]


# ------------------------------------------------------------------ greeting, EHLO


def test_greeting_is_forwarded_and_failure_greeting_closes() -> None:
    Script(ehlo=None)
    s = Script(greet=False)
    assert s.server(b"554-no\r\n554 go away\r\n") == [
        C(b"554-no\r\n554 go away\r\n"),
        Close("server greeting was not 220"),
    ]


def test_ehlo_reply_is_rewritten() -> None:
    s = Script()
    assert s.ehlo_reply == [C(CLIENT_EHLO_REPLY)]


def test_ehlo_without_auth_gets_auth_and_fixed_markers() -> None:
    s = Script(ehlo=b"250 mx.example.com\r\n")
    assert s.ehlo_reply == [C(b"250-mx.example.com\r\n250 AUTH PLAIN LOGIN\r\n")]


def test_ehlo_with_local_starttls_offers_it_and_old_style_auth_is_dropped() -> None:
    reply, mechanisms = rewrite_ehlo(
        [b"250-mx\r\n", b"250-AUTH=LOGIN\r\n", b"250-AUTH OAUTHBEARER\r\n", b"250 SIZE 100\r\n"],
        starttls=True,
    )
    assert reply == b"250-mx\r\n250-AUTH PLAIN LOGIN\r\n250-SIZE 100\r\n250 STARTTLS\r\n"
    assert mechanisms == frozenset({"LOGIN", "OAUTHBEARER"})
    s = Script(local_starttls=True)
    expected = b"250-mx.example.com Hello\r\n250-PIPELINING\r\n250-AUTH PLAIN LOGIN\r\n250-STARTTLS\r\n"
    assert s.ehlo_reply == [C(expected + b"250 8BITMIME\r\n")]


def test_helo_reply_and_ehlo_errors_pass_unchanged() -> None:
    s = Script(ehlo=None)
    s.client(b"EHLO x\r\n")
    assert s.server(b"502 5.5.1 no EHLO\r\n") == [C(b"502 5.5.1 no EHLO\r\n")]
    assert s.client(b"AUTH PLAIN\r\n") == [C(b"503 5.5.1 EHLO first\r\n")]
    assert s.client(b"HELO x\r\n") == [S(b"HELO x\r\n")]
    assert s.server(b"250 mx.example.com\r\n") == [C(b"250 mx.example.com\r\n")]


# ------------------------------------------------------------------ client AUTH forms


def test_auth_before_ehlo() -> None:
    s = Script(ehlo=None)
    assert s.client(b"AUTH PLAIN " + plain("a", "b") + b"\r\n") == [C(b"503 5.5.1 EHLO first\r\n")]


def test_auth_plain_inline_and_two_step() -> None:
    s = Script()
    s.login("pass word")
    assert any("***" in log.message for log in s.logs)
    assert not any("pass word" in log.message for log in s.logs)
    t = Script()
    assert t.client(b"auth plain\r\n") == [C(b"334 \r\n")]
    assert t.client(plain("bob", "pw") + b"\r\n") == [NeedToken("bob", Secret("pw"))]


def test_auth_plain_equals_is_empty_and_undecodable() -> None:
    s = Script()
    reply = s.client(b"AUTH PLAIN =\r\n")
    assert len(reply) == 1 and isinstance(reply[0], SendToClient) and reply[0].data.startswith(b"501 5.5.2 ")
    reply = s.client(b"AUTH PLAIN %%%\r\n")
    assert len(reply) == 1 and isinstance(reply[0], SendToClient) and reply[0].data.startswith(b"501 5.5.2 ")


def test_auth_plain_cancel() -> None:
    s = Script()
    s.client(b"AUTH PLAIN\r\n")
    assert s.client(b"*\r\n") == [C(b"501 5.7.0 Authentication cancelled\r\n")]
    assert s.client(b"NOOP\r\n") == [S(b"NOOP\r\n")]


def test_auth_login_two_step_and_inline_user() -> None:
    s = Script()
    assert s.client(b"AUTH LOGIN\r\n") == [C(b"334 VXNlcm5hbWU6\r\n")]
    assert s.client(b64("alice@example.com") + b"\r\n") == [C(b"334 UGFzc3dvcmQ6\r\n")]
    assert s.client(b64("pw 1") + b"\r\n") == [NeedToken("alice@example.com", Secret("pw 1"))]
    t = Script()
    assert t.client(b"AUTH LOGIN " + b64("bob") + b"\r\n") == [C(b"334 UGFzc3dvcmQ6\r\n")]
    assert t.client(b"\r\n") == [NeedToken("bob", Secret(""))]  # empty password: the manager words it


def test_auth_login_cancel_and_bad_base64() -> None:
    s = Script()
    s.client(b"AUTH LOGIN\r\n")
    s.client(b64("bob") + b"\r\n")
    assert s.client(b"*\r\n") == [C(b"501 5.7.0 Authentication cancelled\r\n")]
    s.client(b"AUTH LOGIN\r\n")
    reply = s.client(b"!!notbase64\r\n")
    assert len(reply) == 1 and isinstance(reply[0], SendToClient) and reply[0].data.startswith(b"501 5.5.2 ")


def test_other_mechanisms_and_syntax() -> None:
    s = Script()
    assert s.client(b"AUTH CRAM-MD5\r\n")[0] == C(
        b"504 5.5.4 Unrecognized authentication type; use PLAIN or LOGIN\r\n"
    )
    reply = s.client(b"AUTH\r\n")
    assert len(reply) == 1 and isinstance(reply[0], SendToClient) and reply[0].data.startswith(b"501 ")


def test_token_failure_wording() -> None:
    s = Script()
    s.login()
    message = "Login failed - the password for account alice@example.com is incorrect"
    assert s.token(TokenFailure(message)) == [failure(message)]
    assert s.client(b"AUTH LOGIN\r\n") == [C(b"334 VXNlcm5hbWU6\r\n")]


# ------------------------------------------------------------------ upstream login


def test_upstream_success_hands_leftovers_to_relay() -> None:
    s = Script()
    line = b"AUTH PLAIN " + plain("alice@example.com", "pw") + b"\r\nMAIL FROM:<a@example.com>\r\nRCPT"
    assert s.client(line) == [NeedToken("alice@example.com", Secret("pw"))]
    assert s.client(b" TO:<b@example.com>\r\n") == []
    assert s.token(TokenOk("alice@example.com", TOKEN)) == [S(b"AUTH XOAUTH2\r\n")]
    assert s.server(b"334 \r\n") == [S(BLOB, sensitive=True)]
    assert s.server(b"235 2.7.0 Accepted\r\n250 2.1.0 Ok") == [
        C(b"235 2.7.0 Accepted\r\n"),
        Relay(
            to_server=b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n", to_client=b"250 2.1.0 Ok"
        ),
    ]
    assert s.client(b"DATA\r\n") == []


def test_upstream_error_challenge_then_failure_keeps_session_usable() -> None:
    s = Script()
    s.login()
    s.token(TokenOk("alice@example.com", TOKEN))
    s.server(b"334 \r\n")
    error = base64.b64encode(json.dumps({"status": "400", "schemes": "Bearer"}).encode())
    assert s.server(b"334 " + error + b"\r\n") == [S(b"\r\n")]
    assert any(log.level == logging.INFO and '"status": "400"' in log.message for log in s.logs)
    assert s.server(b"535-5.7.8 Username and Password not accepted.\r\n535 5.7.8 Learn more\r\n") == [
        failure("Username and Password not accepted. Learn more")
    ]
    s.login()


def test_server_offering_only_oauthbearer_gets_oauthbearer() -> None:
    s = Script(ehlo=b"250-mx\r\n250 AUTH PLAIN OAUTHBEARER\r\n")
    s.login()
    assert s.token(TokenOk("alice@example.com", TOKEN)) == [S(b"AUTH OAUTHBEARER\r\n")]
    expected = sasl.oauthbearer("alice@example.com", TOKEN) + b"\r\n"
    assert s.server(b"334 \r\n") == [S(expected, sensitive=True)]
    assert s.server(b"235 ok\r\n") == [C(b"235 ok\r\n"), Relay()]


def test_unknown_mechanisms_fall_back_once_and_known_ones_do_not() -> None:
    s = Script(ehlo=b"250 mx\r\n")
    s.login()
    s.token(TokenOk("alice@example.com", TOKEN))
    assert s.server(b"504 5.5.4 Unrecognized authentication type\r\n") == [S(b"AUTH OAUTHBEARER\r\n")]
    assert s.server(b"504 5.5.4 Unrecognized authentication type\r\n") == [
        failure("Unrecognized authentication type")
    ]
    t = Script()  # XOAUTH2 advertised, OAUTHBEARER known absent
    t.login()
    t.token(TokenOk("alice@example.com", TOKEN))
    assert t.server(b"454 4.7.0 Temporary failure\r\n") == [failure("Temporary failure")]


# ------------------------------------------------------------------ STARTTLS


def test_server_starttls_happy_path() -> None:
    s = Script(greet=False, server_starttls=True)
    assert s.client(b"EHLO client\r\n") == []  # held until the upstream is encrypted
    assert s.server(GREETING) == [S(b"EHLO localhost\r\n")]
    assert s.server(b"250-mx\r\n250-STARTTLS\r\n250 SIZE 10\r\n") == [S(b"STARTTLS\r\n")]
    assert s.server(b"220 2.0.0 go ahead\r\n250 injected\r\n") == [StartTls(Side.SERVER)]
    assert s.tls(Side.SERVER) == [C(GREETING), S(b"EHLO client\r\n")]
    assert s.server(b"250-mx\r\n250 AUTH XOAUTH2\r\n") == [C(b"250-mx\r\n250 AUTH PLAIN LOGIN\r\n")]


def test_server_starttls_not_offered_or_refused_closes_without_credentials() -> None:
    for replies in (
        [b"250-mx\r\n250 AUTH PLAIN\r\n"],
        [b"250-mx\r\n250 STARTTLS\r\n", b"454 4.7.0 TLS not available\r\n"],
    ):
        s = Script(greet=False, server_starttls=True)
        s.server(GREETING)
        *first, last = replies
        for reply in first:
            s.server(reply)
        actions = s.server(last)
        assert actions[-1] == Close("server does not offer STARTTLS")
        assert isinstance(actions[0], SendToClient) and len(actions) == 2
        assert actions[0].data.startswith(b"421 4.3.0 " + REPLY_PREFIX.encode())
        assert b"STARTTLS" in actions[0].data
    t = Script(greet=False, server_starttls=True)
    assert t.server(b"421 busy\r\n") == [C(b"421 busy\r\n"), Close("server greeting was not 220")]


def test_local_starttls_discards_injection_and_needs_a_new_ehlo() -> None:
    s = Script(local_starttls=True)
    assert s.client(b"STARTTLS\r\nAUTH PLAIN " + plain("x", "y") + b"\r\n") == [
        C(b"220 2.0.0 Ready to start TLS\r\n"),
        StartTls(Side.CLIENT),
    ]
    assert s.client(b"MAIL FROM:<evil>\r\n") == []
    assert s.tls(Side.CLIENT) == []
    assert s.client(b"AUTH PLAIN\r\n") == [C(b"503 5.5.1 EHLO first\r\n")]
    assert s.client(b"EHLO again\r\n") == [S(b"EHLO again\r\n")]
    assert s.server(EHLO_REPLY) == [C(CLIENT_EHLO_REPLY)]  # no STARTTLS any more
    assert s.client(b"STARTTLS\r\n") == [C(b"454 4.7.0 STARTTLS not available\r\n")]


def test_local_starttls_refused_when_not_enabled() -> None:
    s = Script()
    assert s.client(b"STARTTLS\r\n") == [C(b"454 4.7.0 STARTTLS not available\r\n")]
    assert s.client(b"NOOP\r\n") == [S(b"NOOP\r\n")]


# ------------------------------------------------------------------ line mode before login, limits


def test_pipelined_commands_go_one_at_a_time_and_data_is_forwarded() -> None:
    s = Script()
    assert s.client(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n") == [S(b"MAIL FROM:<a@x>\r\n")]
    assert s.server(b"250 2.1.0 Ok\r\n") == [C(b"250 2.1.0 Ok\r\n"), S(b"RCPT TO:<b@x>\r\n")]
    assert s.server(b"250 2.1.5 Ok\r\n") == [C(b"250 2.1.5 Ok\r\n"), S(b"DATA\r\n")]
    assert s.client(b"Subject: hi\r\n\r\nAUTH PLAIN not-a-command\r\n") == []
    assert s.server(b"354 go ahead\r\n") == [
        C(b"354 go ahead\r\n"),
        S(b"Subject: hi\r\n"),
        S(b"\r\n"),
        S(b"AUTH PLAIN not-a-command\r\n"),
    ]
    assert s.client(b"..dot\r\n.\r\nQUIT\r\n") == [S(b"..dot\r\n"), S(b".\r\n")]
    assert s.server(b"250 2.0.0 queued\r\n") == [C(b"250 2.0.0 queued\r\n"), S(b"QUIT\r\n")]


def test_bdat_chunk_is_forwarded_raw() -> None:
    s = Script()
    assert s.client(b"BDAT 7 LAST\r\nab\r\n") == [S(b"BDAT 7 LAST\r\n"), S(b"ab\r\n")]
    assert s.client(b"c\r\nRSET\r\n") == [S(b"c\r\n")]
    assert s.server(b"250 2.0.0 ok\r\n") == [C(b"250 2.0.0 ok\r\n"), S(b"RSET\r\n")]


def test_unsolicited_reply_is_forwarded() -> None:
    s = Script()
    assert s.server(b"421 4.4.2 timeout\r\n") == [C(b"421 4.4.2 timeout\r\n")]


def test_client_and_server_lines_too_long() -> None:
    s = Script(max_line=64)
    assert s.client(b"NOOP " + b"x" * 100) == [C(b"500 5.5.6 line too long\r\n"), Close("line too long")]
    t = Script(max_line=64)
    assert t.server(b"250-" + b"x" * 70 + b"\r\n") == [
        C(b"500 5.5.6 line too long\r\n"),
        Close("line too long"),
    ]


def test_buffer_limit_while_waiting() -> None:
    s = Script(max_buffer=100)
    s.client(b"NOOP\r\n")
    actions = s.client(b"NOOP\r\n" * 20)
    assert actions == [
        C(f"421 4.3.0 {REPLY_PREFIX}too much data sent before login\r\n".encode()),
        Close("client buffer full"),
    ]


def test_goodbye_and_error_reply() -> None:
    session = SmtpSession(SessionOptions())
    assert session.goodbye() == b"221 2.0.0 Service closing transmission channel\r\n"
    assert session.error_reply("upstream down") == f"421 4.3.0 {REPLY_PREFIX}upstream down\r\n".encode()
    assert SmtpSession.protocol == "SMTP"


# ------------------------------------------------------------------ properties

Event = tuple[str, object]

TRANSCRIPTS: list[list[Event]] = [
    [
        ("s", GREETING),
        ("c", b"EHLO me\r\nAUTH LOGIN\r\n" + b64("alice") + b"\r\n" + b64("pw") + b"\r\nMAIL FROM:<a>\r\n"),
        ("s", EHLO_REPLY),
        ("token", TokenOk("alice", TOKEN)),
        ("s", b"334 \r\n"),
        ("s", b"235-2.7.0 Accepted\r\n235 really\r\n250 leftover\r\n"),
        ("c", b"RCPT TO:<b>\r\n"),
    ],
    [
        ("s", GREETING),
        ("c", b"EHLO me\r\nMAIL FROM:<a>\r\nDATA\r\nline 1\r\n.\r\nBDAT 3 LAST\r\nxyzRSET\r\n"),
        ("s", b"250-mx\r\n250 AUTH PLAIN\r\n250 ok\r\n354 go\r\n250 queued\r\n250 chunk\r\n250 reset\r\n"),
        ("c", b"AUTH PLAIN\r\n" + plain("bob", "pw") + b"\r\nNOOP\r\n"),
        ("token", TokenOk("bob", TOKEN)),
        ("s", b"504 5.5.4 no\r\n334 \r\n334 eyJzdGF0dXMiOiI0MDEifQ==\r\n535 5.7.8 bad\r\n250 noop\r\n"),
    ],
    [
        ("s", b"220 mx\r\n"),
        ("c", b"EHLO me\r\nSTARTTLS\r\nEHLO injected\r\n"),
        ("s", EHLO_REPLY),
        ("c", b"AUTH XOAUTH2 abc\r\nAUTH PLAIN =\r\nAUTH PLAIN " + plain("c", "d") + b"\r\n"),
        ("token", TokenFailure("nope")),
        ("c", b"QUIT\r\n"),
        ("s", b"221 bye\r\n"),
    ],
]


def feed(session: SmtpSession, events: Sequence[Event]) -> list[Action]:
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


def feed_split(session: SmtpSession, events: Sequence[Event], cuts: list[int]) -> list[Action]:
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
    options = SessionOptions(local_starttls=index == 2)
    whole = feed_split(SmtpSession(options), events, [])
    pieces = feed_split(SmtpSession(options), events, cuts)
    assert normalise(pieces) == normalise(whole)


SMTP_WORDS = [b"EHLO a", b"HELO a", b"AUTH PLAIN", b"AUTH LOGIN", b"AUTH PLAIN AGFAYg==", b"YQ==", b"*", b"=",
              b"STARTTLS", b"DATA", b"BDAT 3", b"BDAT x", b".", b"220 x", b"250-AUTH XOAUTH2", b"250 ok",
              b"334 ", b"354 go", b"235 ok", b"535 no", b"504 no", b""]  # fmt: skip
chunks = st.one_of(
    st.binary(max_size=40),
    st.lists(st.sampled_from(SMTP_WORDS), max_size=5).map(lambda ws: b"".join(w + b"\r\n" for w in ws)),
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
    session = SmtpSession(SessionOptions(server_starttls=stls, local_starttls=local, max_line=limit))
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
    st.sampled_from(["plain-inline", "plain-two-step", "login", "login-inline"]),
    st.lists(st.integers(min_value=0, max_value=200), max_size=8),
    st.booleans(),
)
def test_property_secrets_stay_on_their_side(
    suffix: str, token_text: str, form: str, cuts: list[int], success: bool
) -> None:
    password = "Pw!" + suffix
    token = Secret("tok-" + token_text)
    secret_forms = [password.encode(), plain("alice", password), b64(password)]
    login = {
        "plain-inline": b"AUTH PLAIN " + plain("alice", password) + b"\r\n",
        "plain-two-step": b"AUTH PLAIN\r\n" + plain("alice", password) + b"\r\n",
        "login": b"AUTH LOGIN\r\n" + b64("alice") + b"\r\n" + b64(password) + b"\r\n",
        "login-inline": b"AUTH LOGIN " + b64("alice") + b"\r\n" + b64(password) + b"\r\n",
    }[form]
    final = b"235 2.7.0 ok\r\n" if success else b"334 eyJzdGF0dXMiOiI0MDEifQ==\r\n535 5.7.8 no\r\n"
    events: list[Event] = [
        ("s", GREETING),
        ("c", b"EHLO me\r\n" + login),
        ("s", EHLO_REPLY),
        ("token", TokenOk("alice", token)),
        ("s", b"334 \r\n" + final),
    ]
    actions = feed_split(SmtpSession(SessionOptions()), events, cuts)
    to_server = [a for a in actions if isinstance(a, SendToServer)]
    to_client = b"".join(a.data for a in actions if isinstance(a, SendToClient))
    logs = " ".join(a.message for a in actions if isinstance(a, Log))
    assert all(secret not in a.data for a in to_server for secret in secret_forms)
    assert password not in logs
    assert token.reveal() not in logs and token.reveal().encode() not in to_client
    assert sasl.xoauth2("alice", token) not in to_client
    first_auth = next(i for i, a in enumerate(to_server) if a.data == b"AUTH XOAUTH2\r\n")
    assert b"".join(a.data for a in to_server[:first_auth]) == b"EHLO me\r\n"
    assert to_server[first_auth + 1] == S(sasl.xoauth2("alice", token) + b"\r\n", sensitive=True)
    assert sum(a.sensitive for a in to_server) == 1
