"""SMTP session: intercept the client's AUTH PLAIN/LOGIN and authenticate upstream with XOAUTH2.

RFC 5321 (replies), RFC 3207 (STARTTLS), RFC 4954 (AUTH), RFC 4616 (PLAIN), the LOGIN mechanism
draft, RFC 3030 (BDAT). Before login every client command is handled one at a time; after the
upstream ``235`` the session hands over to raw relay.
"""

from __future__ import annotations

import enum
import re

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
_ENHANCED_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}\s*")

# replies the proxy gives itself
CANCELLED = b"501 5.7.0 Authentication cancelled\r\n"
EHLO_FIRST = b"503 5.5.1 EHLO first\r\n"
AUTH_SYNTAX = b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"
UNKNOWN_MECHANISM = b"504 5.5.4 Unrecognized authentication type; use PLAIN or LOGIN\r\n"
STARTTLS_READY = b"220 2.0.0 Ready to start TLS\r\n"
STARTTLS_UNAVAILABLE = b"454 4.7.0 STARTTLS not available\r\n"
ASK_RESPONSE = b"334 \r\n"
ASK_USERNAME = b"334 VXNlcm5hbWU6\r\n"  # base64 of "Username:"
ASK_PASSWORD = b"334 UGFzc3dvcmQ6\r\n"  # base64 of "Password:"


class SmtpState(enum.Enum):
    STARTTLS_GREETING = enum.auto()  # server_starttls: waiting for the server's 220 greeting
    STARTTLS_EHLO = enum.auto()  # sent EHLO upstream, waiting for the list of extensions
    STARTTLS_REPLY = enum.auto()  # sent STARTTLS upstream, waiting for 220
    STARTTLS_HANDSHAKE = enum.auto()  # StartTls(SERVER) asked for
    GREETING = enum.auto()  # waiting for the server's greeting
    READY = enum.auto()  # waiting for a client command
    REPLY = enum.auto()  # forwarded a command, waiting for the last line of its reply
    DATA_BODY = enum.auto()  # forwarding message lines after 354, up to the lone "."
    BDAT_BODY = enum.auto()  # forwarding a BDAT chunk's raw bytes
    AUTH_PLAIN = enum.auto()  # sent "334 ", waiting for the PLAIN response
    AUTH_LOGIN_USER = enum.auto()  # sent "334 VXNlcm5hbWU6", waiting for the user name
    AUTH_LOGIN_PASS = enum.auto()  # sent "334 UGFzc3dvcmQ6", waiting for the password
    TOKEN = enum.auto()  # NeedToken asked for
    UPSTREAM_AUTH = enum.auto()  # sent AUTH <mechanism>, waiting for 334
    UPSTREAM_RESULT = enum.auto()  # sent the token, waiting for 235 or a failure
    CLIENT_HANDSHAKE = enum.auto()  # StartTls(CLIENT) asked for


_CLIENT_TURN = frozenset(
    {
        SmtpState.READY,
        SmtpState.DATA_BODY,
        SmtpState.AUTH_PLAIN,
        SmtpState.AUTH_LOGIN_USER,
        SmtpState.AUTH_LOGIN_PASS,
    }
)


# ---------------------------------------------------------------------------------------------- replies


def is_last_line(line: bytes) -> bool:
    """Whether a reply line ends its reply (``ddd text`` or ``ddd``, not ``ddd-text``)."""
    return strip_eol(line)[3:4] != b"-"


def reply_code(reply: list[bytes]) -> bytes:
    """The three-digit code of a complete reply (taken from its last line)."""
    return reply[-1][:3]


def reply_text(reply: list[bytes]) -> str:
    """The human text of a reply: every line's text, enhanced status codes removed, joined."""
    parts = (_ENHANCED_STATUS.sub("", strip_eol(line)[4:].decode("utf-8", "replace")) for line in reply)
    return " ".join(part.strip() for part in parts if part.strip())


def rewrite_ehlo(reply: list[bytes], starttls: bool) -> tuple[bytes, frozenset[str] | None]:
    """The EHLO reply the client sees, and the server's SASL mechanisms (None if it listed no AUTH).

    ``AUTH ...`` becomes ``AUTH PLAIN LOGIN`` (added if missing); ``STARTTLS`` is kept only when
    ``starttls`` (local STARTTLS is possible; then it is added if missing); the ``-``/space
    continuation markers are set again.
    """
    code = reply[0][:3]
    texts = [strip_eol(line)[4:] for line in reply]
    kept = [texts[0]]
    mechanisms: frozenset[str] | None = None
    has_starttls = False
    for text in texts[1:]:
        words = text.split()
        name = words[0].upper() if words else b""
        if name == b"AUTH" or name.startswith(b"AUTH="):
            listed = parse_mechanisms([name[5:], *words[1:]])
            if mechanisms is None:
                kept.append(b"AUTH PLAIN LOGIN")
            mechanisms = listed if mechanisms is None else mechanisms | listed
            continue
        if name == b"STARTTLS":
            if not starttls or has_starttls:
                continue
            has_starttls = True
        kept.append(text)
    if mechanisms is None:
        kept.append(b"AUTH PLAIN LOGIN")
    if starttls and not has_starttls:
        kept.append(b"STARTTLS")
    last = len(kept) - 1
    lines = [code + (b" " if i == last else b"-") + text + CRLF for i, text in enumerate(kept)]
    return b"".join(lines), mechanisms


def _split_command(line: bytes) -> tuple[bytes, bytes]:
    """(upper-cased keyword, argument text) of a client command line."""
    keyword, _, argument = strip_eol(line).partition(b" ")
    return keyword.upper(), argument.strip()


def _decode_login_field(response: bytes) -> str:
    """A LOGIN mechanism response: base64 text, where ``=`` (RFC 4954's empty response) is empty."""
    return "" if response == b"=" else sasl.decode_text(response)


def _undecodable(what: str, error: sasl.SaslError) -> list[Action]:
    """The 501 reply to a SASL response that is not valid base64 (or not a valid PLAIN message)."""
    return [
        debug(f"client: {what} *** ({error})"),
        SendToClient(f"501 5.5.2 Cannot decode {what}: {error}\r\n".encode()),
    ]


def _offers_starttls(reply: list[bytes]) -> bool:
    return any(strip_eol(line)[4:].strip().upper() == b"STARTTLS" for line in reply[1:])


class SmtpSession(LineSession):
    protocol = "SMTP"

    def __init__(self, options: SessionOptions) -> None:
        super().__init__(options)
        self._state = SmtpState.STARTTLS_GREETING if options.server_starttls else SmtpState.GREETING
        self._reply: list[bytes] = []  # lines of the server reply being collected
        self._reply_size = 0
        self._greeting = b""  # held while the upstream is upgraded
        self._pending = b""  # keyword of the forwarded command whose reply is awaited
        self._greeted = False  # a successful EHLO/HELO since connect (or since local STARTTLS)
        self._mechanisms: frozenset[str] | None = None  # from the last EHLO reply with AUTH
        self._login_user = ""  # AUTH LOGIN user name, until the password arrives
        self._bdat_remaining = 0
        self._upstream: UpstreamLogin | None = None

    # ------------------------------------------------------------------ Session interface

    def tls_started(self, side: Side) -> list[Action]:
        if side is Side.SERVER and self._state is SmtpState.STARTTLS_HANDSHAKE:
            self._state = SmtpState.READY
            return [SendToClient(self._greeting), *self._pump()]
        if side is Side.CLIENT and self._state is SmtpState.CLIENT_HANDSHAKE:
            self._client_upgraded = True
            self._greeted = False  # RFC 3207: forget what was learnt before TLS; a new EHLO is needed
            self._state = SmtpState.READY
            return self._pump()
        return []

    def token_result(self, result: TokenResult) -> list[Action]:
        if self._finished or self._state is not SmtpState.TOKEN:
            return []
        if isinstance(result, TokenFailure):
            return [*self._login_failed(result.message), *self._pump()]
        self._upstream = UpstreamLogin(
            result.username, result.access_token, choose_mechanism(self._mechanisms)
        )
        return [*self._send_auth_command(), *self._pump()]

    def goodbye(self) -> bytes:
        return b"221 2.0.0 Service closing transmission channel\r\n"

    def error_reply(self, message: str) -> bytes:
        return f"421 4.3.0 {REPLY_PREFIX}{message}\r\n".encode()

    def limit_reply(self, message: str) -> bytes:
        return f"421 4.7.0 {REPLY_PREFIX}{message}\r\n".encode()

    # ------------------------------------------------------------------ LineSession hooks

    def _client_turn(self) -> bool:
        return self._state in _CLIENT_TURN

    def _ignoring_client(self) -> bool:
        return self._state is SmtpState.CLIENT_HANDSHAKE

    def _ignoring_server(self) -> bool:
        return self._state is SmtpState.STARTTLS_HANDSHAKE

    def _line_too_long_reply(self) -> bytes:
        return b"500 5.5.6 line too long\r\n"

    def _client_raw_wanted(self) -> int:
        return self._bdat_remaining if self._state is SmtpState.BDAT_BODY else 0

    def _on_client_raw(self, data: bytes) -> list[Action]:
        self._bdat_remaining -= len(data)
        if self._bdat_remaining <= 0:
            self._state = SmtpState.REPLY
        return [SendToServer(data)]

    def _on_client_line(self, line: bytes) -> list[Action]:
        handler = {
            SmtpState.DATA_BODY: self._data_line,
            SmtpState.AUTH_PLAIN: self._plain_response,
            SmtpState.AUTH_LOGIN_USER: self._login_username,
            SmtpState.AUTH_LOGIN_PASS: self._login_password,
        }.get(self._state, self._command)
        return handler(line)

    def _on_server_line(self, line: bytes) -> list[Action]:
        """Collect a reply's lines; handle the reply when its last line arrives."""
        self._reply.append(line)
        self._reply_size += len(line)
        if not is_last_line(line):
            if self._reply_size > self.options.max_buffer:
                return self._close(self.error_reply("server reply too long"), "server reply too long")
            return []
        reply, self._reply, self._reply_size = self._reply, [], 0
        handler = {
            SmtpState.STARTTLS_GREETING: self._starttls_greeting,
            SmtpState.STARTTLS_EHLO: self._starttls_ehlo,
            SmtpState.STARTTLS_REPLY: self._starttls_reply,
            SmtpState.GREETING: self._greeting_reply,
            SmtpState.REPLY: self._command_reply,
            SmtpState.UPSTREAM_AUTH: self._upstream_auth_reply,
            SmtpState.UPSTREAM_RESULT: self._upstream_result,
        }.get(self._state, self._unsolicited)
        return handler(reply)

    # ------------------------------------------------------------------ upstream STARTTLS and greeting

    def _starttls_greeting(self, reply: list[bytes]) -> list[Action]:
        if reply_code(reply) != b"220":
            return self._close(b"".join(reply), "server greeting was not 220")
        self._greeting = b"".join(reply)
        self._state = SmtpState.STARTTLS_EHLO
        return [SendToServer(b"EHLO localhost\r\n")]

    def _starttls_ehlo(self, reply: list[bytes]) -> list[Action]:
        if reply_code(reply) != b"250" or not _offers_starttls(reply):
            return self._no_upstream_tls()
        self._state = SmtpState.STARTTLS_REPLY
        return [SendToServer(b"STARTTLS\r\n")]

    def _starttls_reply(self, reply: list[bytes]) -> list[Action]:
        if reply_code(reply) != b"220":
            return self._no_upstream_tls()
        self._discard_server()
        self._state = SmtpState.STARTTLS_HANDSHAKE
        return [StartTls(Side.SERVER)]

    def _no_upstream_tls(self) -> list[Action]:
        message = NO_UPSTREAM_TLS.format(command="STARTTLS")
        return self._close(self.error_reply(message), "server does not offer STARTTLS")

    def _greeting_reply(self, reply: list[bytes]) -> list[Action]:
        if reply_code(reply) != b"220":
            return self._close(b"".join(reply), "server greeting was not 220")
        self._state = SmtpState.READY
        return [SendToClient(b"".join(reply))]

    def _unsolicited(self, reply: list[bytes]) -> list[Action]:
        return [SendToClient(b"".join(reply))]

    # ------------------------------------------------------------------ client commands

    def _command(self, line: bytes) -> list[Action]:
        closing = self._count_command()
        if closing:
            return closing
        keyword, argument = _split_command(line)
        if keyword == b"AUTH":
            return self._cmd_auth(argument)
        if keyword == b"STARTTLS":
            return self._cmd_starttls()
        if keyword == b"BDAT":
            return self._cmd_bdat(line, argument)
        self._pending = keyword
        self._state = SmtpState.REPLY
        return [SendToServer(line)]

    def _cmd_starttls(self) -> list[Action]:
        if not self.local_starttls_possible:
            return [SendToClient(STARTTLS_UNAVAILABLE)]
        self._discard_client()
        self._state = SmtpState.CLIENT_HANDSHAKE
        return [SendToClient(STARTTLS_READY), StartTls(Side.CLIENT)]

    def _cmd_bdat(self, line: bytes, argument: bytes) -> list[Action]:
        size = argument.split()[0] if argument else b""
        self._pending = b"BDAT"
        self._state = SmtpState.REPLY
        if size.isdigit() and int(size) > 0:
            self._bdat_remaining = int(size)
            self._state = SmtpState.BDAT_BODY
        return [SendToServer(line)]

    def _data_line(self, line: bytes) -> list[Action]:
        if strip_eol(line) == b".":
            self._pending = b"."
            self._state = SmtpState.REPLY
        return [SendToServer(line)]

    def _command_reply(self, reply: list[bytes]) -> list[Action]:
        code = reply_code(reply)
        self._state = SmtpState.READY
        if self._pending in (b"EHLO", b"HELO") and code == b"250":
            self._greeted = True
        if self._pending == b"EHLO" and code == b"250":
            rewritten, self._mechanisms = rewrite_ehlo(reply, self.local_starttls_possible)
            return [SendToClient(rewritten)]
        if self._pending == b"DATA" and code == b"354":
            self._state = SmtpState.DATA_BODY
        return [SendToClient(b"".join(reply))]

    # ------------------------------------------------------------------ client AUTH

    def _cmd_auth(self, argument: bytes) -> list[Action]:
        mechanism, _, initial = argument.partition(b" ")
        mechanism, initial = mechanism.upper(), initial.strip()
        if not self._greeted:
            return [SendToClient(EHLO_FIRST)]
        if not mechanism:
            return [SendToClient(AUTH_SYNTAX)]
        if mechanism == b"PLAIN":
            if not initial:
                self._state = SmtpState.AUTH_PLAIN
                return [debug("client: AUTH PLAIN"), SendToClient(ASK_RESPONSE)]
            return self._plain_response(initial)
        if mechanism == b"LOGIN":
            if not initial:
                self._state = SmtpState.AUTH_LOGIN_USER
                return [debug("client: AUTH LOGIN"), SendToClient(ASK_USERNAME)]
            return self._login_username(initial)
        return [SendToClient(UNKNOWN_MECHANISM)]

    def _plain_response(self, line: bytes) -> list[Action]:
        self._state = SmtpState.READY
        response = strip_eol(line).strip()
        if sasl.is_cancel(response):
            return [debug("client: AUTH PLAIN cancelled"), SendToClient(CANCELLED)]
        try:
            username, password = sasl.decode_plain(b"" if response == b"=" else response)
        except sasl.SaslError as e:
            return _undecodable("AUTH PLAIN", e)
        return self._need_token(f"client: AUTH PLAIN *** (user {username})", username, password)

    def _login_username(self, line: bytes) -> list[Action]:
        response = strip_eol(line).strip()
        self._state = SmtpState.READY
        if sasl.is_cancel(response):
            return [debug("client: AUTH LOGIN cancelled"), SendToClient(CANCELLED)]
        try:
            self._login_user = _decode_login_field(response)
        except sasl.SaslError as e:
            return _undecodable("AUTH LOGIN user name", e)
        self._state = SmtpState.AUTH_LOGIN_PASS
        return [debug(f"client: AUTH LOGIN user {self._login_user}"), SendToClient(ASK_PASSWORD)]

    def _login_password(self, line: bytes) -> list[Action]:
        response = strip_eol(line).strip()
        self._state = SmtpState.READY
        if sasl.is_cancel(response):
            return [debug("client: AUTH LOGIN cancelled"), SendToClient(CANCELLED)]
        try:
            password = _decode_login_field(response)
        except sasl.SaslError as e:
            return _undecodable("AUTH LOGIN password", e)
        description = f"client: AUTH LOGIN password *** (user {self._login_user})"
        return self._need_token(description, self._login_user, Secret(password))

    def _need_token(self, description: str, username: str, password: Secret) -> list[Action]:
        self._state = SmtpState.TOKEN
        return [debug(description), NeedToken(username, password)]

    # ------------------------------------------------------------------ upstream login

    def _send_auth_command(self) -> list[Action]:
        assert self._upstream is not None
        self._state = SmtpState.UPSTREAM_AUTH
        return [SendToServer(f"AUTH {self._upstream.mechanism}\r\n".encode())]

    def _upstream_auth_reply(self, reply: list[bytes]) -> list[Action]:
        assert self._upstream is not None
        code = reply_code(reply)
        if code == b"235":
            return self._relay(b"".join(reply))
        if code == b"334":
            self._state = SmtpState.UPSTREAM_RESULT
            return [SendToServer(self._upstream.initial_response() + CRLF, sensitive=True)]
        fallback = fallback_mechanism(self._upstream, self._mechanisms)
        if fallback is None:
            return self._login_failed(reply_text(reply))
        self._upstream.mechanism = fallback
        self._upstream.fallback_tried = True
        return [debug(f"server refused AUTH XOAUTH2; trying {fallback}"), *self._send_auth_command()]

    def _upstream_result(self, reply: list[bytes]) -> list[Action]:
        assert self._upstream is not None
        code = reply_code(reply)
        if code == b"235":
            return self._relay(b"".join(reply))
        if code == b"334":
            login = self._upstream
            detail = describe_error_challenge(b"".join(strip_eol(line)[4:] for line in reply))
            log = info(f"server rejected {login.mechanism} for {login.username}: {detail}")
            return [log, SendToServer(CRLF)]
        return self._login_failed(reply_text(reply))

    def _login_failed(self, message: str) -> list[Action]:
        self._state = SmtpState.READY
        self._upstream = None
        text = message or "the server rejected the login"
        reply = f"535 5.7.8  Authentication credentials invalid. {REPLY_PREFIX}{text}\r\n".encode()
        return self._refuse_login(reply, text)
