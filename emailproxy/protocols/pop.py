"""POP3 session: intercept the client's USER/PASS or AUTH PLAIN login and log in upstream with XOAUTH2.

RFC 1939 (POP3), RFC 2449 (CAPA), RFC 2595 (STLS), RFC 5034 (AUTH). Before login every client
command is handled one at a time; after the upstream ``+OK`` the session hands over to raw relay.
"""

from __future__ import annotations

import enum

from emailproxy.protocols import sasl
from emailproxy.protocols.events import (
    REPLY_PREFIX,
    Action,
    NeedToken,
    SendToClient,
    SendToServer,
    SessionOptions,
    Side,
    StartTls,
    TokenFailure,
    TokenResult,
    debug,
    info,
)
from emailproxy.protocols.line_session import (
    NO_UPSTREAM_TLS,
    LineSession,
    UpstreamLogin,
    choose_mechanism,
    describe_error_challenge,
    fallback_mechanism,
    parse_mechanisms,
)
from emailproxy.protocols.lines import strip_eol
from emailproxy.secret import Secret

CRLF = b"\r\n"

#: Commands whose +OK reply has a body ending with a lone ``.`` (LIST and UIDL only without argument).
_MULTILINE_ALWAYS = frozenset({b"CAPA", b"TOP", b"RETR"})
_MULTILINE_WITHOUT_ARGUMENT = frozenset({b"LIST", b"UIDL"})


class PopState(enum.Enum):
    STLS_GREETING = enum.auto()  # server_starttls: waiting for the server's greeting
    STLS_REPLY = enum.auto()  # sent STLS upstream, waiting for +OK
    STLS_HANDSHAKE = enum.auto()  # StartTls(SERVER) asked for
    GREETING = enum.auto()  # waiting for the server's greeting
    READY = enum.auto()  # waiting for a client command
    REPLY = enum.auto()  # forwarded a command, waiting for its status line
    BODY = enum.auto()  # forwarding a multi-line reply body up to the lone "."
    AUTH_PLAIN = enum.auto()  # sent "+ " for AUTH PLAIN, waiting for the client's response
    TOKEN = enum.auto()  # NeedToken asked for
    UPSTREAM_AUTH = enum.auto()  # sent AUTH <mechanism>, waiting for "+"
    UPSTREAM_RESULT = enum.auto()  # sent the token, waiting for +OK or -ERR
    CLIENT_HANDSHAKE = enum.auto()  # StartTls(CLIENT) asked for


def _split_command(line: bytes) -> tuple[bytes, bytes]:
    """(upper-cased keyword, argument text) of a client command line."""
    text = strip_eol(line)
    keyword, _, argument = text.partition(b" ")
    return keyword.upper(), argument


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _server_text(line: bytes) -> str:
    """The text after a ``-ERR``/``+OK`` status indicator."""
    return _decode(strip_eol(line).partition(b" ")[2]).strip()


def _is_continuation(line: bytes) -> bool:
    text = strip_eol(line)
    return text == b"+" or text.startswith(b"+ ")


class PopSession(LineSession):
    protocol = "POP"

    def __init__(self, options: SessionOptions) -> None:
        super().__init__(options)
        self._state = PopState.STLS_GREETING if options.server_starttls else PopState.GREETING
        self._greeting = b""
        self._user: str | None = None  # from USER, waiting for PASS
        self._mechanisms: frozenset[str] | None = None  # the server's SASL list, once a CAPA told us
        self._upstream: UpstreamLogin | None = None
        # the command whose reply is awaited: does its +OK have a body, and is it CAPA
        self._expect_body = False
        self._capa = False
        self._capa_sasl_sent = False
        self._capa_user_seen = False
        self._capa_stls_seen = False

    # ------------------------------------------------------------------ Session interface

    def tls_started(self, side: Side) -> list[Action]:
        if side is Side.SERVER and self._state is PopState.STLS_HANDSHAKE:
            self._state = PopState.READY
            return [SendToClient(self._greeting), *self._pump()]
        if side is Side.CLIENT and self._state is PopState.CLIENT_HANDSHAKE:
            self._client_upgraded = True
            self._state = PopState.READY
            return self._pump()
        return []

    def token_result(self, result: TokenResult) -> list[Action]:
        if self._finished or self._state is not PopState.TOKEN:
            return []
        if isinstance(result, TokenFailure):
            return [*self._login_failed(result.message), *self._pump()]
        self._upstream = UpstreamLogin(
            result.username, result.access_token, choose_mechanism(self._mechanisms)
        )
        return [*self._send_auth_command(), *self._pump()]

    def goodbye(self) -> bytes:
        return b"+OK Server signing off\r\n"

    def error_reply(self, message: str) -> bytes:
        return f"-ERR {REPLY_PREFIX}{message}\r\n".encode()

    # ------------------------------------------------------------------ LineSession hooks

    def _client_turn(self) -> bool:
        return self._state in (PopState.READY, PopState.AUTH_PLAIN)

    def _ignoring_client(self) -> bool:
        return self._state is PopState.CLIENT_HANDSHAKE

    def _ignoring_server(self) -> bool:
        return self._state is PopState.STLS_HANDSHAKE

    def _line_too_long_reply(self) -> bytes:
        return b"-ERR line too long\r\n"

    def _on_client_line(self, line: bytes) -> list[Action]:
        if self._state is PopState.AUTH_PLAIN:
            return self._plain_response(strip_eol(line))
        return self._command(line)

    def _on_server_line(self, line: bytes) -> list[Action]:
        handler = {
            PopState.STLS_GREETING: self._stls_greeting,
            PopState.STLS_REPLY: self._stls_reply,
            PopState.GREETING: self._greeting_line,
            PopState.REPLY: self._status_line,
            PopState.BODY: self._body_line,
            PopState.UPSTREAM_AUTH: self._upstream_auth_reply,
            PopState.UPSTREAM_RESULT: self._upstream_result,
        }.get(self._state, self._unsolicited)
        return handler(line)

    # ------------------------------------------------------------------ upstream STLS and greeting

    def _stls_greeting(self, line: bytes) -> list[Action]:
        if not line.startswith(b"+OK"):
            return self._close(line, "server greeting was not +OK")
        self._greeting = line
        self._state = PopState.STLS_REPLY
        return [SendToServer(b"STLS\r\n")]

    def _stls_reply(self, line: bytes) -> list[Action]:
        if not line.startswith(b"+OK"):
            message = NO_UPSTREAM_TLS.format(command="STLS")
            return self._close(self.error_reply(message), "server refused STLS")
        self._discard_server()
        self._state = PopState.STLS_HANDSHAKE
        return [StartTls(Side.SERVER)]

    def _greeting_line(self, line: bytes) -> list[Action]:
        if not line.startswith(b"+OK"):
            return self._close(line, "server greeting was not +OK")
        self._state = PopState.READY
        return [SendToClient(line)]

    def _unsolicited(self, line: bytes) -> list[Action]:
        return [SendToClient(line)]

    # ------------------------------------------------------------------ client commands

    def _command(self, line: bytes) -> list[Action]:
        closing = self._count_command()
        if closing:
            return closing
        keyword, argument = _split_command(line)
        user, self._user = self._user, None  # any command but PASS forgets a pending USER
        if keyword == b"USER":
            return self._cmd_user(argument)
        if keyword == b"PASS":
            return self._cmd_pass(user, argument)
        if keyword == b"AUTH":
            return self._cmd_auth(argument)
        if keyword == b"APOP":
            return [SendToClient(b"-ERR APOP cannot be used through this proxy; use USER/PASS\r\n")]
        if keyword == b"STLS":
            return self._cmd_stls()
        return self._forward(line, keyword, argument)

    def _cmd_user(self, argument: bytes) -> list[Action]:
        self._user = _decode(argument)
        return [debug(f"client: USER {self._user}"), SendToClient(b"+OK\r\n")]

    def _cmd_pass(self, user: str | None, argument: bytes) -> list[Action]:
        if user is None:
            return [debug("client: PASS *** without USER"), SendToClient(b"-ERR USER first\r\n")]
        return self._need_token(f"client: PASS *** (after USER {user})", user, _decode(argument))

    def _cmd_auth(self, argument: bytes) -> list[Action]:
        mechanism, _, initial = argument.strip().partition(b" ")
        mechanism = mechanism.upper()
        if not mechanism:
            return [debug("client: AUTH (listed locally)"), SendToClient(b"+OK\r\nPLAIN\r\n.\r\n")]
        if mechanism != b"PLAIN":
            return [SendToClient(b"-ERR Unsupported authentication mechanism; use AUTH PLAIN\r\n")]
        if not initial:
            self._state = PopState.AUTH_PLAIN
            return [debug("client: AUTH PLAIN"), SendToClient(b"+ \r\n")]
        return self._plain_response(initial.strip())

    def _plain_response(self, response: bytes) -> list[Action]:
        self._state = PopState.READY
        if sasl.is_cancel(response):
            return [debug("client: AUTH PLAIN cancelled"), SendToClient(b"-ERR Authentication cancelled\r\n")]
        try:
            username, password = sasl.decode_plain(b"" if response == b"=" else response)
        except sasl.SaslError as e:
            reply = f"-ERR Cannot decode AUTH PLAIN: {e}\r\n".encode()
            return [debug(f"client: AUTH PLAIN *** ({e})"), SendToClient(reply)]
        return self._need_token(f"client: AUTH PLAIN *** (user {username})", username, password.reveal())

    def _cmd_stls(self) -> list[Action]:
        if not self.local_starttls_possible:
            return [SendToClient(b"-ERR STLS not available\r\n")]
        self._discard_client()
        self._state = PopState.CLIENT_HANDSHAKE
        return [SendToClient(b"+OK Begin TLS negotiation\r\n"), StartTls(Side.CLIENT)]

    def _forward(self, line: bytes, keyword: bytes, argument: bytes) -> list[Action]:
        self._capa = keyword == b"CAPA"
        multiline = keyword in _MULTILINE_ALWAYS or (
            keyword in _MULTILINE_WITHOUT_ARGUMENT and not argument.strip()
        )
        self._expect_body = multiline
        self._state = PopState.REPLY
        return [SendToServer(line)]

    def _need_token(self, description: str, username: str, password: str) -> list[Action]:
        self._state = PopState.TOKEN
        return [debug(description), NeedToken(username, Secret(password))]

    # ------------------------------------------------------------------ replies to forwarded commands

    def _status_line(self, line: bytes) -> list[Action]:
        if line.startswith(b"+OK") and self._expect_body:
            self._state = PopState.BODY
            self._capa_sasl_sent = self._capa_user_seen = self._capa_stls_seen = False
        else:
            self._state = PopState.READY
        return [SendToClient(line)]

    def _body_line(self, line: bytes) -> list[Action]:
        if strip_eol(line) == b".":
            self._state = PopState.READY
            return [SendToClient(self._capa_additions() + line)] if self._capa else [SendToClient(line)]
        if not self._capa:
            return [SendToClient(line)]
        return self._capa_line(line)

    def _capa_line(self, line: bytes) -> list[Action]:
        """Rewrite one CAPA line: SASL becomes PLAIN, STLS only when the proxy can do it."""
        words = strip_eol(line).split()
        name = words[0].upper() if words else b""
        if name == b"SASL":
            self._mechanisms = parse_mechanisms(words[1:])
            if self._capa_sasl_sent:
                return []
            self._capa_sasl_sent = True
            return [SendToClient(b"SASL PLAIN\r\n")]
        if name == b"STLS":
            if not self.local_starttls_possible or self._capa_stls_seen:
                return []
            self._capa_stls_seen = True
        if name == b"USER":
            self._capa_user_seen = True
        return [SendToClient(line)]

    def _capa_additions(self) -> bytes:
        """The capability lines the client must see that the server's reply lacked."""
        added = b""
        if not self._capa_sasl_sent:
            added += b"SASL PLAIN\r\n"
        if not self._capa_user_seen:
            added += b"USER\r\n"
        if self.local_starttls_possible and not self._capa_stls_seen:
            added += b"STLS\r\n"
        return added

    # ------------------------------------------------------------------ upstream login

    def _send_auth_command(self) -> list[Action]:
        assert self._upstream is not None
        self._state = PopState.UPSTREAM_AUTH
        return [SendToServer(f"AUTH {self._upstream.mechanism}\r\n".encode())]

    def _upstream_auth_reply(self, line: bytes) -> list[Action]:
        assert self._upstream is not None
        if line.startswith(b"+OK"):
            return self._relay(line)
        if _is_continuation(line):
            self._state = PopState.UPSTREAM_RESULT
            return [SendToServer(self._upstream.initial_response() + CRLF, sensitive=True)]
        fallback = fallback_mechanism(self._upstream, self._mechanisms)
        if fallback is None:
            return self._login_failed(_server_text(line))
        self._upstream.mechanism = fallback
        self._upstream.fallback_tried = True
        return [debug(f"server refused AUTH XOAUTH2; trying {fallback}"), *self._send_auth_command()]

    def _upstream_result(self, line: bytes) -> list[Action]:
        assert self._upstream is not None
        if line.startswith(b"+OK"):
            return self._relay(line)
        if _is_continuation(line):
            login = self._upstream
            detail = describe_error_challenge(strip_eol(line)[1:])
            log = info(f"server rejected {login.mechanism} for {login.username}: {detail}")
            return [log, SendToServer(CRLF)]
        return self._login_failed(_server_text(line))

    def _login_failed(self, message: str) -> list[Action]:
        self._state = PopState.READY
        self._upstream = None
        text = message or "the server rejected the login"
        reply = f"-ERR Authentication failed. {REPLY_PREFIX}{text}\r\n".encode()
        return self._refuse_login(reply, text)
