"""Transcript tests and properties for the IMAP session (no sockets: bytes in, actions out)."""

from __future__ import annotations

import base64
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from emailproxy.protocols.events import (
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
    TokenResult,
)
from emailproxy.protocols.imap import ImapSession
from emailproxy.protocols.imapsyntax import (
    Segment,
    parse_login_args,
    rewrite_capabilities,
)
from emailproxy.secret import Secret

PREFIX = "Email OAuth 2.0 Proxy: "
GREETING = (
    b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN AUTH=XOAUTH2 "
    b"AUTH=OAUTHBEARER LOGINDISABLED] Dovecot ready.\r\n"
)
REWRITTEN = (
    b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN] "
    b"Dovecot ready.\r\n"
)
USER = "user@example.com"
TOKEN = Secret("ya29.a0-access-token")


def xoauth2_blob(user: str = USER, token: str = TOKEN.reveal()) -> bytes:
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode())


def plain_blob(user: str, password: str, authzid: str = "") -> bytes:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode())


def make(**options: bool | int) -> ImapSession:
    return ImapSession(SessionOptions(**options))  # type: ignore[arg-type]


def greeted(greeting: bytes = GREETING, **options: bool | int) -> ImapSession:
    session = make(**options)
    (action,) = session.server_data(greeting)
    assert isinstance(action, SendToClient) and action.data.startswith(b"* OK ")
    return session


def wire(actions: Sequence[Action]) -> list[Action]:
    """The actions without Log lines."""
    return [a for a in actions if not isinstance(a, Log)]


def need_token(actions: Sequence[Action]) -> NeedToken:
    found = [a for a in actions if isinstance(a, NeedToken)]
    assert len(found) == 1, actions
    return found[0]


def login(session: ImapSession, command: bytes) -> NeedToken:
    return need_token(session.client_data(command))


# ------------------------------------------------------------------------------------- capabilities


def test_greeting_capabilities_are_rewritten() -> None:
    session = make()
    assert session.server_data(GREETING) == [SendToClient(REWRITTEN)]


def test_greeting_without_capabilities_passes_unchanged() -> None:
    session = make()
    assert session.server_data(b"* OK IMAP ready\r\n") == [SendToClient(b"* OK IMAP ready\r\n")]


def test_capability_response_is_rewritten_and_starttls_dropped() -> None:
    session = greeted()
    assert session.client_data(b"c1 CAPABILITY\r\n") == [SendToServer(b"c1 CAPABILITY\r\n")]
    reply = session.server_data(b"* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED ID\r\nc1 OK done\r\n")
    assert reply == [
        SendToClient(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN ID SASL-IR\r\n"),
        SendToClient(b"c1 OK done\r\n"),
    ]


def test_tagged_ok_capability_code_is_rewritten_before_login() -> None:
    session = greeted()
    session.client_data(b"c1 NOOP\r\n")
    reply = session.server_data(b"c1 OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] NOOP done\r\n")
    assert reply == [SendToClient(b"c1 OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] NOOP done\r\n")]


def test_local_starttls_is_advertised_when_possible() -> None:
    session = make(local_starttls=True)
    assert session.server_data(b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] hi\r\n") == [
        SendToClient(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR STARTTLS] hi\r\n")
    ]
    tls_client = make(local_starttls=True, client_tls=True)
    assert tls_client.server_data(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n") == [
        SendToClient(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] hi\r\n")
    ]


def test_rewrite_capabilities_keeps_order_and_places_auth_plain() -> None:
    assert rewrite_capabilities(["IMAP4rev1", "IMAP4rev2", "IDLE"], offer_starttls=False) == [
        "IMAP4rev1",
        "IMAP4rev2",
        "AUTH=PLAIN",
        "IDLE",
        "SASL-IR",
    ]
    assert rewrite_capabilities(["IMAP4", "auth=cram-md5", "sasl-ir", "AUTH=LOGIN"], offer_starttls=True) == [
        "IMAP4",
        "AUTH=PLAIN",
        "sasl-ir",
        "STARTTLS",
    ]


def test_bye_greeting_is_forwarded_then_closed() -> None:
    session = make()
    actions = session.server_data(b"* BYE too many connections\r\n")
    assert actions == [
        SendToClient(b"* BYE too many connections\r\n"),
        Close("the server refused the connection"),
    ]


def test_garbage_greeting_closes_with_error() -> None:
    actions = make().server_data(b"220 smtp.example.com ESMTP\r\n")
    assert isinstance(actions[0], SendToClient) and actions[0].data.startswith(b"* BYE " + PREFIX.encode())
    assert isinstance(actions[-1], Close)


def test_preauth_greeting_switches_to_relay() -> None:
    session = make()
    assert session.server_data(b"* PREAUTH welcome\r\n* 1 EXISTS\r\n") == [
        SendToClient(b"* PREAUTH welcome\r\n"),
        Relay(to_server=b"", to_client=b"* 1 EXISTS\r\n"),
    ]


# -------------------------------------------------------------------------------------- LOGIN forms


@pytest.mark.parametrize(
    ("command", "user", "password"),
    [
        (b"a1 LOGIN user@example.com secret\r\n", "user@example.com", "secret"),
        (b"a1 login user@example.com secret\n", "user@example.com", "secret"),
        (b'a1 LOGIN "user@example.com" "p\\"w\\\\d x"\r\n', "user@example.com", 'p"w\\d x'),
        (b"a1 LOGIN user pass word\r\n", "user", "pass word"),  # unquoted password: rest of the line
        (b'a1 LOGIN user "pass word"\r\n', "user", "pass word"),
        (b"a1 LOGIN user\r\n", "user", ""),
        (b"a1 LOGIN\r\n", "", ""),
        (b"a1 LOGIN user \xc3\xa9t\xc3\xa9\r\n", "user", "\u00e9t\u00e9"),
    ],
)
def test_login_forms(command: bytes, user: str, password: str) -> None:
    session = greeted()
    actions = session.client_data(command)
    assert wire(actions) == [NeedToken(user, Secret(password))]
    logs = [a for a in actions if isinstance(a, Log)]
    assert logs == [Log(logging.DEBUG, f"IMAP client: a1 LOGIN {user} ***")]


def test_login_with_synchronising_literals_counted_by_bytes() -> None:
    session = greeted()
    password = b'p\r\nw "d" {3}\r\n'
    assert session.client_data(b"a1 LOGIN {16}\r\n") == [SendToClient(b"+ Ready for literal data\r\n")]
    assert session.client_data(b"user@example.com {%d}\r\n" % len(password)) == [
        SendToClient(b"+ Ready for literal data\r\n")
    ]
    assert wire(session.client_data(password + b"\r\n")) == [NeedToken(USER, Secret(password.decode()))]


def test_login_with_non_synchronising_literals_in_one_chunk() -> None:
    session = greeted()
    actions = session.client_data(b'a1 LOGIN {4+}\r\nuser {9+}\r\n a "b"\r\nc\r\n')
    assert wire(actions) == [NeedToken("user", Secret(' a "b"\r\nc'))]


def test_login_with_empty_literal_and_quoted_user() -> None:
    session = greeted()
    assert wire(session.client_data(b'a1 LOGIN "u s" {0+}\r\n\r\n')) == [NeedToken("u s", Secret(""))]


def test_login_single_literal_holding_user_and_password_is_tolerated() -> None:
    session = greeted()
    assert wire(session.client_data(b"a1 LOGIN {13+}\r\nuser password\r\n")) == [
        NeedToken("user", Secret("password"))
    ]


def test_login_synchronising_literal_too_large_is_refused() -> None:
    session = greeted(max_literal=10)
    assert session.client_data(b"a1 LOGIN {11}\r\n") == [SendToClient(b"a1 BAD literal too large\r\n")]
    # the session stays usable: the client did not send the literal
    assert session.client_data(b"a2 NOOP\r\n") == [SendToServer(b"a2 NOOP\r\n")]


def test_login_non_synchronising_literal_too_large_closes() -> None:
    session = greeted(max_literal=10)
    actions = session.client_data(b"a1 LOGIN {11+}\r\n")
    assert actions == [
        SendToClient(f"* BYE {PREFIX}literal too large\r\n".encode()),
        Close("client literal too large"),
    ]
    assert session.client_data(b"more\r\n") == []


def test_login_unterminated_quote_is_bad() -> None:
    session = greeted()
    assert session.client_data(b'a1 LOGIN user "pass\r\n') == [
        SendToClient(b"a1 BAD LOGIN unterminated quoted string\r\n")
    ]


def test_parse_login_args_rejects_data_after_password() -> None:
    with pytest.raises(ValueError, match="after the password"):
        parse_login_args([Segment(b'user "pass" extra', literal=False)])


# ------------------------------------------------------------------------------- AUTHENTICATE PLAIN


def test_authenticate_plain_with_initial_response() -> None:
    session = greeted()
    actions = session.client_data(b"a1 AUTHENTICATE PLAIN " + plain_blob(USER, "pw d") + b"\r\n")
    assert wire(actions) == [NeedToken(USER, Secret("pw d"))]
    assert [a.message for a in actions if isinstance(a, Log)] == [
        f"IMAP client: a1 AUTHENTICATE PLAIN ({USER} ***)"
    ]


def test_authenticate_plain_two_step() -> None:
    session = greeted()
    assert session.client_data(b"a1 authenticate plain\r\n") == [SendToClient(b"+ \r\n")]
    assert wire(session.client_data(plain_blob(USER, "pw", "admin") + b"\r\n")) == [
        NeedToken(USER, Secret("pw"))
    ]


def test_authenticate_plain_cancel() -> None:
    session = greeted()
    session.client_data(b"a1 AUTHENTICATE PLAIN\r\n")
    assert session.client_data(b"*\r\n") == [SendToClient(b"a1 BAD AUTHENTICATE cancelled\r\n")]
    assert session.client_data(b"a2 NOOP\r\n") == [SendToServer(b"a2 NOOP\r\n")]


@pytest.mark.parametrize("response", [b"not base64!", b"=", base64.b64encode(b"only\0two")])
def test_authenticate_plain_undecodable_is_bad(response: bytes) -> None:
    session = greeted()
    actions = session.client_data(b"a1 AUTHENTICATE PLAIN " + response + b"\r\n")
    assert len(actions) == 1 and isinstance(actions[0], SendToClient)
    assert actions[0].data.startswith(b"a1 BAD AUTHENTICATE invalid PLAIN response")


def test_other_authenticate_mechanisms_are_forwarded_and_relayed_on_success() -> None:
    session = greeted()
    assert session.client_data(b"a1 AUTHENTICATE CRAM-MD5\r\n") == [
        SendToServer(b"a1 AUTHENTICATE CRAM-MD5\r\n")
    ]
    assert session.server_data(b"+ PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2U+\r\n") == [
        SendToClient(b"+ PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2U+\r\n")
    ]
    assert session.client_data(b"dGltIGI5MTNhNjAy\r\na2 SELECT INBOX\r\n") == [
        SendToServer(b"dGltIGI5MTNhNjAy\r\n")
    ]
    assert session.server_data(b"a1 OK [CAPABILITY IMAP4rev1 IDLE] done\r\n* 3 EXISTS\r\n") == [
        SendToClient(b"a1 OK [CAPABILITY IMAP4rev1 IDLE] done\r\n"),
        Relay(to_server=b"a2 SELECT INBOX\r\n", to_client=b"* 3 EXISTS\r\n"),
    ]


# ------------------------------------------------------------------------------------ token results


def test_token_failure_wording_for_login_and_authenticate() -> None:
    session = greeted()
    login(session, b"a1 LOGIN user@example.com wrong\r\n")
    failure = TokenFailure(f"Login failed - the password for account {USER} is incorrect")
    assert session.token_result(failure) == [
        SendToClient(
            f"a1 NO LOGIN {PREFIX}Login failed - the password for account {USER} is incorrect\r\n".encode()
        )
    ]
    login(session, b"a2 AUTHENTICATE PLAIN " + plain_blob(USER, "pw") + b"\r\n")
    assert session.token_result(TokenFailure("multi\nline")) == [
        SendToClient(f"a2 NO AUTHENTICATE {PREFIX}multi line\r\n".encode())
    ]


def test_client_bytes_wait_while_the_token_is_fetched() -> None:
    session = greeted()
    actions = session.client_data(b"a1 LOGIN user pw\r\na2 NOOP\r\n")
    assert wire(actions) == [NeedToken("user", Secret("pw"))]
    assert session.client_data(b"a3 NOOP\r\n") == []
    assert session.server_data(b"* OK still here\r\n") == [SendToClient(b"* OK still here\r\n")]
    assert session.token_result(TokenFailure("no")) == [
        SendToClient(f"a1 NO LOGIN {PREFIX}no\r\n".encode()),
        SendToServer(b"a2 NOOP\r\n"),
    ]


def test_upstream_success_with_sasl_ir_hands_leftovers_to_relay() -> None:
    session = greeted()
    login(session, b"a1 LOGIN user@example.com pw\r\na2 SELECT INBOX\r\na3 FETCH 1")
    actions = session.token_result(TokenOk(USER, TOKEN))
    assert wire(actions) == [
        SendToServer(b"a1 AUTHENTICATE XOAUTH2 " + xoauth2_blob() + b"\r\n", sensitive=True)
    ]
    assert session.server_data(b"* CAPABILITY IMAP4rev1 AUTH=XOAUTH2\r\n") == [
        SendToClient(b"* CAPABILITY IMAP4rev1 AUTH=XOAUTH2\r\n")  # not rewritten: already logging in
    ]
    assert session.server_data(b"a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n* 1 EXISTS\r\n* 0 REC") == [
        SendToClient(b"a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"),
        Relay(to_server=b"a2 SELECT INBOX\r\na3 FETCH 1", to_client=b"* 1 EXISTS\r\n* 0 REC"),
    ]
    assert session.client_data(b"x") == [] and session.server_data(b"y") == []


def test_upstream_two_step_without_sasl_ir() -> None:
    session = greeted(b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] ready\r\n")
    login(session, b"a1 LOGIN user@example.com pw\r\n")
    assert wire(session.token_result(TokenOk(USER, TOKEN))) == [SendToServer(b"a1 AUTHENTICATE XOAUTH2\r\n")]
    assert session.server_data(b"+ \r\n") == [SendToServer(xoauth2_blob() + b"\r\n", sensitive=True)]
    assert session.server_data(b"a1 OK done\r\n") == [SendToClient(b"a1 OK done\r\n"), Relay()]


def test_unknown_capabilities_use_xoauth2_two_step() -> None:
    session = greeted(b"* OK ready\r\n")
    login(session, b"a1 LOGIN user@example.com pw\r\n")
    assert wire(session.token_result(TokenOk(USER, TOKEN))) == [SendToServer(b"a1 AUTHENTICATE XOAUTH2\r\n")]


def test_server_without_xoauth2_gets_oauthbearer() -> None:
    session = greeted(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=OAUTHBEARER] ready\r\n")
    login(session, b"a1 LOGIN user@example.com pw\r\n")
    expected = base64.b64encode(f"n,a={USER},\x01auth=Bearer {TOKEN.reveal()}\x01\x01".encode())
    assert wire(session.token_result(TokenOk(USER, TOKEN))) == [
        SendToServer(b"a1 AUTHENTICATE OAUTHBEARER " + expected + b"\r\n", sensitive=True)
    ]


def test_upstream_error_challenge_then_failure_keeps_session_usable() -> None:
    session = greeted()
    login(session, b"a1 LOGIN user@example.com pw\r\n")
    session.token_result(TokenOk(USER, TOKEN))
    error = b'{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}'
    actions = session.server_data(b"+ " + base64.b64encode(error) + b"\r\n")
    assert actions == [
        Log(logging.INFO, f"IMAP: the server rejected the token: {error.decode()}"),
        SendToServer(b"\r\n"),
    ]
    reply = session.server_data(b"a1 NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)\r\n")
    assert wire(reply) == [SendToClient(f"a1 NO LOGIN {PREFIX}Invalid credentials (Failure)\r\n".encode())]
    assert session.client_data(b"a2 LOGOUT\r\n") == [SendToServer(b"a2 LOGOUT\r\n")]


# --------------------------------------------------------------------------------------- forwarding


def test_one_command_at_a_time_before_login() -> None:
    session = greeted()
    assert session.client_data(b"a1 NOOP\r\na2 ID NIL\r\na3 LOGIN u p\r\n") == [SendToServer(b"a1 NOOP\r\n")]
    assert session.server_data(b"* 0 RECENT\r\n") == [SendToClient(b"* 0 RECENT\r\n")]
    assert session.server_data(b"a1 OK NOOP done\r\n") == [
        SendToClient(b"a1 OK NOOP done\r\n"),
        SendToServer(b"a2 ID NIL\r\n"),
    ]
    assert wire(session.server_data(b"* ID NIL\r\na2 OK\r\n")) == [
        SendToClient(b"* ID NIL\r\n"),
        SendToClient(b"a2 OK\r\n"),
        NeedToken("u", Secret("p")),
    ]


def test_forwarded_command_literal_is_counted_by_bytes() -> None:
    session = greeted()
    assert session.client_data(b'a1 ID ("name" {5}\r\n') == [SendToServer(b'a1 ID ("name" {5}\r\n')]
    assert session.server_data(b"+ go ahead\r\n") == [SendToClient(b"+ go ahead\r\n")]
    assert session.client_data(b"a\r\nb ") == [SendToServer(b"a\r\nb ")]
    assert session.client_data(b")\r\na2 NOOP\r\n") == [SendToServer(b")\r\n")]
    assert session.server_data(b"a1 OK\r\n") == [SendToClient(b"a1 OK\r\n"), SendToServer(b"a2 NOOP\r\n")]


def test_refused_synchronising_literal_is_not_expected() -> None:
    session = greeted()
    session.client_data(b"a1 ID {99}\r\n")
    assert session.server_data(b"a1 BAD no literals\r\n") == [SendToClient(b"a1 BAD no literals\r\n")]
    assert session.client_data(b"a2 NOOP\r\n") == [SendToServer(b"a2 NOOP\r\n")]


def test_server_literals_are_not_parsed_as_responses() -> None:
    session = greeted()
    session.client_data(b"a1 ID NIL\r\n")
    fake = b"a1 OK\r\n* CAPABILITY AUTH=X\r\n"
    actions = session.server_data(b'* ID ("name" {%d}\r\n' % len(fake) + fake + b")\r\na1 OK ID done\r\n")
    assert actions == [
        SendToClient(b'* ID ("name" {%d}\r\n' % len(fake)),
        SendToClient(fake),
        SendToClient(b")\r\n"),
        SendToClient(b"a1 OK ID done\r\n"),
    ]


def test_invalid_command_lines_are_answered_locally() -> None:
    session = greeted()
    assert session.client_data(b"+tag NOOP\r\n\r\nnotag\r\n") == [
        SendToClient(b"* BAD Invalid command line\r\n"),
        SendToClient(b"* BAD Invalid command line\r\n"),
    ]


# -------------------------------------------------------------------------------- upstream STARTTLS


def test_server_starttls_happy_path() -> None:
    session = make(server_starttls=True)
    assert session.client_data(b"a1 CAPABILITY\r\n") == []  # waits for the greeting
    assert session.server_data(b"* OK Dovecot ready.\r\n") == [SendToServer(b"EP0 CAPABILITY\r\n")]
    caps = b"* CAPABILITY IMAP4rev1 SASL-IR STARTTLS LOGINDISABLED\r\nEP0 OK done\r\n"
    assert session.server_data(caps) == [SendToServer(b"EP1 STARTTLS\r\n")]
    assert session.server_data(b"EP1 OK Begin TLS\r\n* injected\r\n") == [StartTls(Side.SERVER)]
    assert session.server_data(b"more plaintext\r\n") == []
    assert session.tls_started(Side.SERVER) == [SendToServer(b"EP2 CAPABILITY\r\n")]
    after = b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2 AUTH=PLAIN\r\nEP2 OK done\r\n"
    assert session.server_data(after) == [
        SendToClient(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] Dovecot ready.\r\n"),
        SendToServer(b"a1 CAPABILITY\r\n"),
    ]


def test_server_starttls_with_capabilities_in_greeting() -> None:
    session = make(server_starttls=True)
    greeting = b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] [ALERT] hi\r\n"
    assert session.server_data(greeting) == [SendToServer(b"EP1 STARTTLS\r\n")]
    assert session.server_data(b"EP1 OK go\r\n") == [StartTls(Side.SERVER)]
    session.tls_started(Side.SERVER)
    assert session.server_data(b"EP2 OK [CAPABILITY IMAP4rev1 AUTH=OAUTHBEARER] done\r\n") == [
        SendToClient(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] [ALERT] hi\r\n")
    ]
    login(session, b"a LOGIN u p\r\n")
    assert wire(session.token_result(TokenOk("u", TOKEN)))[0] == SendToServer(
        b"a AUTHENTICATE OAUTHBEARER\r\n"
    )


@pytest.mark.parametrize(
    "exchange",
    [
        [b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n"],
        [b"* OK hi\r\n", b"* CAPABILITY IMAP4rev1\r\nEP0 OK\r\n"],
        [b"* OK hi\r\n", b"EP0 BAD no\r\n"],
        [b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n", b"EP1 NO not now\r\n"],
        [b"* PREAUTH hi\r\n"],
    ],
)
def test_server_starttls_not_offered_sends_nothing(exchange: list[bytes]) -> None:
    session = make(server_starttls=True)
    actions: list[Action] = []
    for data in exchange:
        actions += session.server_data(data)
    *_, reply, close = actions
    assert isinstance(reply, SendToClient) and reply.data.startswith(b"* BYE " + PREFIX.encode())
    assert b"STARTTLS" in reply.data and b"no credentials were sent" in reply.data
    assert isinstance(close, Close)
    assert session.client_data(b"a LOGIN u p\r\n") == []


def test_server_starttls_bye_is_forwarded() -> None:
    session = make(server_starttls=True)
    session.server_data(b"* OK hi\r\n")
    assert session.server_data(b"* BYE shutting down\r\n") == [
        SendToClient(b"* BYE shutting down\r\n"),
        Close("the server closed the connection"),
    ]


# ----------------------------------------------------------------------------------- local STARTTLS


def test_local_starttls_discards_injected_bytes() -> None:
    session = greeted(local_starttls=True)
    actions = session.client_data(b"a1 STARTTLS\r\na2 LOGIN injected pw\r\n")
    assert wire(actions) == [SendToClient(b"a1 OK Begin TLS negotiation now\r\n"), StartTls(Side.CLIENT)]
    assert session.server_data(b"* OK unsolicited\r\n") == []  # held until the client is on TLS
    assert session.tls_started(Side.CLIENT) == [SendToClient(b"* OK unsolicited\r\n")]
    assert session.client_data(b"a3 CAPABILITY\r\n") == [SendToServer(b"a3 CAPABILITY\r\n")]
    assert session.server_data(b"* CAPABILITY IMAP4rev1 STARTTLS\r\n") == [
        SendToClient(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR\r\n")  # no longer offered
    ]
    session.server_data(b"a3 OK\r\n")
    assert session.client_data(b"a4 STARTTLS\r\n") == [SendToClient(b"a4 BAD STARTTLS not available\r\n")]


@pytest.mark.parametrize("options", [{}, {"local_starttls": True, "client_tls": True}])
def test_local_starttls_refused_when_not_possible(options: dict[str, bool]) -> None:
    session = greeted(GREETING, **options)
    assert session.client_data(b"a1 STARTTLS\r\na2 NOOP\r\n") == [
        SendToClient(b"a1 BAD STARTTLS not available\r\n"),
        SendToServer(b"a2 NOOP\r\n"),
    ]


# ------------------------------------------------------------------------------------------- limits


def test_client_line_too_long() -> None:
    session = greeted(b"* OK hi\r\n", max_line=64)
    assert session.client_data(b"a1 NOOP " + b"x" * 100) == [
        SendToClient(b"* BYE line too long\r\n"),
        Close("line too long"),
    ]


def test_server_line_too_long() -> None:
    session = make(max_line=64)
    assert session.server_data(b"* OK " + b"x" * 100 + b"\r\n") == [
        SendToClient(b"* BYE line too long\r\n"),
        Close("line too long"),
    ]


def test_buffer_limit_while_waiting() -> None:
    session = greeted(max_buffer=100)
    session.client_data(b"a1 NOOP\r\n")
    actions = session.client_data(b"a2 NOOP\r\n" * 20)
    assert actions == [
        SendToClient(f"* BYE {PREFIX}too much data from the client before login\r\n".encode()),
        Close("client buffer over the limit"),
    ]


def test_goodbye_and_error_reply() -> None:
    session = make()
    assert session.goodbye() == b"* BYE Server shutting down\r\n"
    assert session.error_reply("upstream down\r\nx") == f"* BYE {PREFIX}upstream down  x\r\n".encode()


def test_unexpected_completions_are_ignored() -> None:
    session = greeted()
    assert session.token_result(TokenOk(USER, TOKEN)) == []
    assert wire(session.tls_started(Side.CLIENT)) == []


# --------------------------------------------------------------------------------------- properties


@dataclass(frozen=True)
class Event:
    kind: str  # "client", "server", "token", "tls"
    data: bytes = b""
    token: TokenResult | None = None
    side: Side | None = None


def c(data: bytes) -> Event:
    return Event("client", data)


def s(data: bytes) -> Event:
    return Event("server", data)


def run(session: ImapSession, events: Sequence[Event]) -> tuple[bytes, bytes, list[object]]:
    """Play events like a driver: returns (bytes to the client, bytes to the server, other actions).

    After Relay the driver relays raw bytes, so later data counts as sent to the other side.
    """
    to_client, to_server = bytearray(), bytearray()
    other: list[object] = []
    relaying = False
    for event in events:
        if relaying:
            if event.kind == "client":
                to_server += event.data
            elif event.kind == "server":
                to_client += event.data
            continue
        if event.kind == "client":
            actions = session.client_data(event.data)
        elif event.kind == "server":
            actions = session.server_data(event.data)
        elif event.kind == "token":
            assert event.token is not None
            actions = session.token_result(event.token)
        else:
            assert event.side is not None
            actions = session.tls_started(event.side)
        for action in actions:
            if isinstance(action, SendToClient):
                to_client += action.data
            elif isinstance(action, SendToServer):
                to_server += action.data
            elif isinstance(action, Relay):
                to_client += action.to_client
                to_server += action.to_server
                relaying = True
            elif not isinstance(action, Log):
                other.append(action)
    return bytes(to_client), bytes(to_server), other


OK_TOKEN = Event("token", token=TokenOk(USER, TOKEN))
TRANSCRIPTS: list[tuple[dict[str, bool], list[Event]]] = [
    (
        {},
        [
            s(GREETING),
            c(b"a1 CAPABILITY\r\na2 LOGIN {16}\r\n"),
            s(b"* CAPABILITY IMAP4rev1 AUTH=XOAUTH2\r\na1 OK done\r\n"),
            c(b'user@example.com "p\\"w"\r\na3 SELECT INBOX\r\n'),
            OK_TOKEN,
            s(b"a2 OK Logged in\r\n* 2 EXISTS\r\n"),
            c(b"a4 LOGOUT\r\n"),
        ],
    ),
    (
        {},
        [
            s(b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] hi\r\n"),
            c(b'a1 ID ("x" {6}\r\n'),
            s(b"+ ok\r\n"),
            c(b"a\r\nb c)\r\n"),
            s(b'* ID ("x" {7}\r\na1 OK\r\n)\r\na1 OK ID\r\n'),
            c(b"a2 AUTHENTICATE PLAIN\r\n"),
            c(plain_blob(USER, "pw") + b"\r\n"),
            OK_TOKEN,
            s(b"+ \r\n+ eyJzdGF0dXMiOiI0MDAifQ==\r\na2 NO [AUTHENTICATIONFAILED] nope\r\n"),
            c(b"a3 LOGIN {4+}\r\nuser {2+}\r\npw\r\n"),
            Event("token", token=TokenFailure("bad password")),
            c(b"a4 LOGOUT\r\n"),
            s(b"* BYE bye\r\na4 OK\r\n"),
        ],
    ),
    (
        {"server_starttls": True, "local_starttls": True},
        [
            s(b"* OK ready\r\n"),
            s(b"* CAPABILITY IMAP4rev1 STARTTLS\r\nEP0 OK\r\n"),
            s(b"EP1 OK go\r\n"),
            Event("tls", side=Side.SERVER),
            s(b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=OAUTHBEARER\r\nEP2 OK\r\n"),
            c(b"a1 STARTTLS\r\n"),
            Event("tls", side=Side.CLIENT),
            c(b"a2 LOGIN user pass word\r\n"),
            OK_TOKEN,
            s(b"a2 OK done\r\n"),
        ],
    ),
]


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=150, deadline=None)
@given(index=st.integers(0, len(TRANSCRIPTS) - 1), data=st.data())
def test_property_split_points_do_not_matter(index: int, data: st.DataObject) -> None:
    options, events = TRANSCRIPTS[index]
    whole = run(ImapSession(SessionOptions(**options)), events)
    pieces: list[Event] = []
    for event in events:
        if event.kind in ("client", "server"):
            cuts = data.draw(st.lists(st.integers(0, len(event.data)), max_size=8))
            pieces += [Event(event.kind, chunk) for chunk in split(event.data, cuts)]
        else:
            pieces.append(event)
    assert run(ImapSession(SessionOptions(**options)), pieces) == whole


def test_transcripts_reach_their_goal() -> None:
    """The property above is only meaningful if the transcripts really log in."""
    for options, events in TRANSCRIPTS:
        _, to_server, other = run(ImapSession(SessionOptions(**options)), events)
        assert any(isinstance(a, NeedToken) for a in other)
        assert b" AUTHENTICATE XOAUTH2" in to_server or b" AUTHENTICATE OAUTHBEARER" in to_server


@settings(max_examples=300, deadline=None)
@given(
    options=st.fixed_dictionaries(
        {
            "server_starttls": st.booleans(),
            "local_starttls": st.booleans(),
            "client_tls": st.booleans(),
            "max_line": st.sampled_from([16, 1024]),
            "max_literal": st.sampled_from([4, 1024]),
            "max_buffer": st.sampled_from([32, 4096]),
        }
    ),
    greet=st.booleans(),
    events=st.lists(
        st.one_of(
            st.tuples(st.sampled_from(["client", "server"]), st.binary(max_size=64)),
            st.tuples(
                st.sampled_from(["client", "server"]),
                st.lists(
                    st.sampled_from(
                        [
                            b"a LOGIN ",
                            b"{3}\r\n",
                            b"{2+}\r\n",
                            b'"x\\"',
                            b"\r\n",
                            b"* OK ",
                            b"a OK ",
                            b"+ ",
                            b"AUTHENTICATE PLAIN",
                            b"[CAPABILITY STARTTLS] ",
                            b"EP1 OK",
                            b"* CAPABILITY ",
                            b"b STARTTLS\r\n",
                            b"=",
                            b"*\r\n",
                            b"AGEAYg==",
                            b"a NO x",
                        ]
                    ),
                    max_size=10,
                ).map(b"".join),
            ),
            st.tuples(st.just("token"), st.booleans()),
            st.tuples(st.just("tls"), st.sampled_from([Side.CLIENT, Side.SERVER])),
        ),
        max_size=20,
    ),
)
def test_property_random_input_never_raises(
    options: dict[str, int | bool], greet: bool, events: list[tuple[str, object]]
) -> None:
    session = ImapSession(SessionOptions(**options))  # type: ignore[arg-type]
    if greet:
        session.server_data(GREETING)
    for kind, value in events:
        if kind == "client":
            assert isinstance(value, bytes)
            actions = session.client_data(value)
        elif kind == "server":
            assert isinstance(value, bytes)
            actions = session.server_data(value)
        elif kind == "token":
            actions = session.token_result(TokenOk(USER, TOKEN) if value else TokenFailure("no"))
        else:
            assert isinstance(value, Side)
            actions = session.tls_started(value)
        assert isinstance(actions, list)
    assert isinstance(session.goodbye(), bytes)


PASSWORD_CHARS = st.text(alphabet=st.sampled_from(list('ab Z9"\\{}()*%\u00e9')), min_size=0, max_size=12)


def quoted(text: str) -> bytes:
    return b'"' + text.encode().replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def literal(text: str, sync: bool) -> bytes:
    raw = text.encode()
    return b"{%d%s}\r\n" % (len(raw), b"" if sync else b"+") + raw


@settings(max_examples=200, deadline=None)
@given(
    tail=PASSWORD_CHARS,
    token_tail=st.text(alphabet="abcXYZ019._", min_size=8, max_size=40),
    form=st.sampled_from(["atom", "quoted", "literal", "literal+", "plain", "plain-ir"]),
    success=st.booleans(),
    forwarded=st.lists(st.sampled_from([b"NOOP", b"CAPABILITY", b"ID NIL"]), max_size=3),
)
def test_property_secrets_stay_where_they_belong(
    tail: str, token_tail: str, form: str, success: bool, forwarded: list[bytes]
) -> None:
    # "!" is not in base64, so the password cannot hide inside a blob by chance; an unquoted password
    # ending in "{n}" would announce a literal, as with any IMAP server
    assume(form != "atom" or not tail.endswith("}"))
    password = "Pw!" + tail
    token = "Tk!" + token_tail
    session = greeted(b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] hi\r\n")
    to_server: list[bytes] = []
    logs: list[str] = []
    to_client: list[bytes] = []

    def record(actions: list[Action]) -> list[Action]:
        for action in actions:
            if isinstance(action, SendToServer):
                to_server.append(action.data)
            elif isinstance(action, SendToClient):
                to_client.append(action.data)
            elif isinstance(action, Log):
                logs.append(action.message)
            elif isinstance(action, Relay):
                to_server.append(action.to_server)
                to_client.append(action.to_client)
        return actions

    expected_forwards = []
    for number, name in enumerate(forwarded):
        command = b"f%d %s\r\n" % (number, name)
        expected_forwards.append(command)
        record(session.client_data(command))
        record(session.server_data(b"f%d OK\r\n" % number))
    assert to_server == expected_forwards

    user = b"user@example.com"
    if form == "atom":
        command = b"a LOGIN " + user + b" " + password.encode() + b"\r\n"
    elif form == "quoted":
        command = b"a LOGIN " + user + b" " + quoted(password) + b"\r\n"
    elif form in ("literal", "literal+"):
        command = b"a LOGIN " + user + b" " + literal(password, sync=form == "literal") + b"\r\n"
    elif form == "plain-ir":
        command = b"a AUTHENTICATE PLAIN " + plain_blob(USER, password) + b"\r\n"
    else:
        command = b"a AUTHENTICATE PLAIN\r\n" + plain_blob(USER, password) + b"\r\n"
    actions = record(session.client_data(command))
    assert need_token(actions).password == Secret(password)
    assert to_server == expected_forwards  # nothing of the login went upstream

    record(session.token_result(TokenOk(USER, Secret(token))))
    record(session.server_data(b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n"))
    record(session.server_data(b"a OK done\r\n" if success else b"a NO failed\r\n"))

    for blob in to_server:
        assert password.encode() not in blob
    for message in logs:
        assert password not in message and token not in message
    for blob in to_client:
        assert token.encode() not in blob
    assert to_server[len(expected_forwards)].startswith(b"a AUTHENTICATE XOAUTH2")  # the login went upstream
