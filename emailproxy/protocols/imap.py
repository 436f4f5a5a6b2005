"""The IMAP session: from the server greeting until the upstream accepts the OAuth 2.0 token.

Before login the session rewrites what the server advertises (only ``AUTH=PLAIN``), intercepts the
client's ``LOGIN`` or ``AUTHENTICATE PLAIN``, asks the driver for a token, logs in upstream with XOAUTH2
(or OAUTHBEARER) and then hands over to raw relaying. It can also upgrade either side with STARTTLS.
Every other command is forwarded unchanged, one at a time. Pure: bytes in, actions out.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from emailproxy.protocols.budget import LoginBudget
from emailproxy.protocols.events import (
    REPLY_PREFIX,
    Action,
    Close,
    NeedToken,
    Relay,
    SendToClient,
    SendToServer,
    Session,
    SessionOptions,
    Side,
    StartTls,
    TokenFailure,
    TokenResult,
    debug,
    info,
    warning,
)
from emailproxy.protocols.imapsyntax import (
    Command,
    Framer,
    ImapSyntaxError,
    Line,
    Literal,
    LiteralData,
    Piece,
    Segment,
    capability_code,
    format_capabilities,
    parse_command,
    parse_login_args,
    parse_response,
    response_capabilities,
    rewrite_capabilities,
    rewrite_response,
    strip_response_code,
)
from emailproxy.protocols.lines import LineTooLong, strip_eol
from emailproxy.protocols.sasl import (
    SaslError,
    b64decode_strict,
    decode_plain,
    is_cancel,
    oauthbearer,
    xoauth2,
)
from emailproxy.secret import Secret

CRLF = b"\r\n"
NOT_OFFERED = "The server does not offer STARTTLS, so no credentials were sent (server_starttls is set)"
REFUSED = "The server refused STARTTLS, so no credentials were sent (server_starttls is set)"


class State(enum.Enum):
    GREETING = enum.auto()  # waiting for the server's greeting
    UPSTREAM_CAPABILITY = enum.auto()  # server_starttls: sent "EP0 CAPABILITY"
    UPSTREAM_STARTTLS = enum.auto()  # server_starttls: sent "EP1 STARTTLS"
    UPSTREAM_HANDSHAKE = enum.auto()  # server_starttls: asked for StartTls(SERVER)
    UPSTREAM_RECAPABILITY = enum.auto()  # server_starttls: sent "EP2 CAPABILITY" over TLS
    READY = enum.auto()  # waiting for the client's next command
    FORWARDING = enum.auto()  # a client command went upstream; waiting for its tagged reply
    LOGIN_ARGS = enum.auto()  # collecting the literals of a LOGIN command
    PLAIN_RESPONSE = enum.auto()  # sent "+ " for AUTHENTICATE PLAIN; waiting for the client's response
    CLIENT_HANDSHAKE = enum.auto()  # local STARTTLS: asked for StartTls(CLIENT)
    TOKEN = enum.auto()  # asked for NeedToken
    AUTHENTICATING = enum.auto()  # AUTHENTICATE XOAUTH2/OAUTHBEARER sent upstream
    RELAYING = enum.auto()  # done: the driver relays raw bytes
    CLOSED = enum.auto()


_FINISHED = (State.RELAYING, State.CLOSED)
_UPSTREAM_TAGS = {
    State.UPSTREAM_CAPABILITY: b"EP0",
    State.UPSTREAM_STARTTLS: b"EP1",
    State.UPSTREAM_RECAPABILITY: b"EP2",
}


def _one_line(text: str) -> str:
    """Text safe to put on one protocol or log line (no CR, LF or other control characters)."""
    return "".join(c if c.isprintable() else " " for c in text)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _describe_challenge(text: bytes) -> str:
    try:
        return _one_line(b64decode_strict(text).decode("utf-8"))
    except (SaslError, UnicodeDecodeError):
        return "(not base64)"


class ImapSession(Session):
    protocol = "IMAP"

    def __init__(self, options: SessionOptions) -> None:
        super().__init__(options)
        self._state = State.GREETING
        self._client = Framer(options.max_line)
        self._server = Framer(options.max_line)
        self._greeted = False  # the client has had a greeting
        self._client_tls_done = False  # local STARTTLS completed
        self._advertised: list[str] | None = None  # the server's capabilities, as it sent them
        self._greeting_text = b""  # server_starttls: the original greeting's text, for the client
        # the command in progress
        self._tag = b""
        self._command = ""  # LOGIN or AUTHENTICATE, for the failure reply
        self._forwarded_auth = False  # the forwarded command is an AUTHENTICATE the proxy does not handle
        self._continuation = False  # the server asked the client for a continuation line
        self._segments: list[Segment] = []  # LOGIN arguments collected so far
        self._literal = bytearray()  # the LOGIN literal being collected
        self._blob: bytes | None = None  # the SASL response still to send upstream (no SASL-IR)
        self._budget = LoginBudget(options)  # commands and failed logins allowed before login

    # ----------------------------------------------------------------------------------- driver API

    def client_data(self, data: bytes) -> list[Action]:
        if self._state in _FINISHED or self._state is State.CLIENT_HANDSHAKE:
            return []  # bytes sent before the TLS handshake are discarded (command injection defence)
        self._client.feed(data)
        return self._run()

    def server_data(self, data: bytes) -> list[Action]:
        if self._state in _FINISHED or self._state is State.UPSTREAM_HANDSHAKE:
            return []  # plaintext after the server's STARTTLS OK is discarded (response injection defence)
        self._server.feed(data)
        return self._run()

    def tls_started(self, side: Side) -> list[Action]:
        if side is Side.SERVER and self._state is State.UPSTREAM_HANDSHAKE:
            self._advertised = None  # capabilities learnt before TLS are not trusted
            self._state = State.UPSTREAM_RECAPABILITY
            return [SendToServer(b"EP2 CAPABILITY" + CRLF), *self._run()]
        if side is Side.CLIENT and self._state is State.CLIENT_HANDSHAKE:
            self._client_tls_done = True
            self._state = State.READY
            return self._run()
        return [warning(f"IMAP: ignored an unexpected TLS start on the {side.value} side")]

    def token_result(self, result: TokenResult) -> list[Action]:
        if self._state is not State.TOKEN:
            return []
        if isinstance(result, TokenFailure):
            actions = self._login_failed(result.message)
        else:
            actions = self._authenticate_upstream(result.username, result.access_token)
        return actions + self._run()

    def goodbye(self) -> bytes:
        return b"* BYE Server shutting down" + CRLF

    def error_reply(self, message: str) -> bytes:
        return f"* BYE {REPLY_PREFIX}{_one_line(message)}".encode() + CRLF

    # ------------------------------------------------------------------------------------ main loop

    def _run(self) -> list[Action]:
        """Process buffered bytes from both sides until neither can make progress."""
        actions: list[Action] = []
        try:
            # after each server line, the client's waiting lines are handled first: the result then does not
            # depend on how either side's bytes were split into chunks
            while self._state not in _FINISHED and (self._step_client(actions) or self._step_server(actions)):
                pass
        except LineTooLong:
            return actions + self._close(b"* BYE line too long" + CRLF, "line too long")
        if self._state not in _FINISHED:
            for side, framer in (("client", self._client), ("server", self._server)):
                if len(framer) > self.options.max_buffer:
                    reply = self.error_reply(f"too much data from the {side} before login")
                    return actions + self._close(reply, f"{side} buffer over the limit")
        return actions

    def _step_server(self, actions: list[Action]) -> bool:
        if self._state in (State.UPSTREAM_HANDSHAKE, State.CLIENT_HANDSHAKE):
            return False
        piece = self._server.next_piece()
        if piece is None:
            return False
        if isinstance(piece, LiteralData) or piece.continued:
            if self._greeted and piece.data:  # literal contents are never parsed
                actions.append(SendToClient(piece.data))
            return True
        actions += self._server_handler()(piece)
        return True

    def _server_handler(self) -> Callable[[Line], list[Action]]:
        if self._state is State.GREETING:
            return self._on_greeting
        if self._state in _UPSTREAM_TAGS:
            return self._on_upstream_tls_reply
        if self._state is State.FORWARDING:
            return self._on_command_reply
        if self._state is State.AUTHENTICATING:
            return self._on_auth_reply
        return self._on_unsolicited

    def _step_client(self, actions: list[Action]) -> bool:
        state = self._state
        handler: Callable[[Piece], list[Action]]
        if state is State.READY:
            handler = self._on_command
        elif state is State.LOGIN_ARGS:
            handler = self._on_login_piece
        elif state is State.FORWARDING and self._client.mid_message:
            handler = self._forward_piece
        elif state is State.FORWARDING and self._continuation:
            return self._step_client_line(actions, self._forward_continuation)
        elif state is State.PLAIN_RESPONSE:
            return self._step_client_line(actions, self._on_plain_response)
        else:
            return False  # the client's bytes wait
        piece = self._client.next_piece()
        if piece is None:
            return False
        actions += handler(piece)
        return True

    def _step_client_line(self, actions: list[Action], handler: Callable[[bytes], list[Action]]) -> bool:
        line = self._client.next_raw_line()
        if line is None:
            return False
        actions += handler(line)
        return True

    # -------------------------------------------------------------------------------------- helpers

    def _close(self, reply: bytes, reason: str) -> list[Action]:
        self._state = State.CLOSED
        return [SendToClient(reply), Close(reason)]

    def _relay(self) -> list[Action]:
        self._state = State.RELAYING
        return [Relay(to_server=self._client.take_all(), to_client=self._server.take_all())]

    def _offer_starttls(self) -> bool:
        return self.options.local_starttls and not self.options.client_tls and not self._client_tls_done

    def _has(self, capability: str) -> bool:
        return self._advertised is not None and capability in {c.upper() for c in self._advertised}

    def _tagged(self, text: str) -> list[Action]:
        return [SendToClient(self._tag + b" " + text.encode() + CRLF)]

    def _forward_response(self, line: Line, rewrite: bool) -> list[Action]:
        """Pass a server line to the client, rewriting capabilities (and learning them) before login."""
        response = parse_response(line.body)
        capabilities = response_capabilities(response) if rewrite and line.literal is None else None
        if capabilities is None:
            return [SendToClient(line.data)]
        self._advertised = capabilities
        rewritten = rewrite_response(response, self._offer_starttls())
        return [SendToClient((rewritten or line.body) + CRLF)]

    def _on_unsolicited(self, line: Line) -> list[Action]:
        return self._forward_response(line, rewrite=True)

    # ------------------------------------------------------------------------------------- greeting

    def _on_greeting(self, line: Line) -> list[Action]:
        response = parse_response(line.body)
        if response.tag != b"*" or response.word not in ("OK", "PREAUTH", "BYE"):
            return self._close(self.error_reply("unexpected greeting from the server"), "bad greeting")
        if response.word == "BYE":
            self._state = State.CLOSED
            return [SendToClient(line.data), Close("the server refused the connection")]
        if self.options.server_starttls:
            if response.word == "PREAUTH":
                return self._close(self.error_reply(NOT_OFFERED), "upstream STARTTLS not possible")
            return self._begin_upstream_starttls(response.text)
        self._greeted = True
        if response.word == "PREAUTH":  # nothing to log in to
            return [SendToClient(line.data), *self._relay()]
        self._state = State.READY
        return self._forward_response(line, rewrite=True)

    # ---------------------------------------------------------------------------- upstream STARTTLS

    def _begin_upstream_starttls(self, text: bytes) -> list[Action]:
        code = capability_code(text)
        if code is None:
            self._greeting_text = text
            self._state = State.UPSTREAM_CAPABILITY
            return [SendToServer(b"EP0 CAPABILITY" + CRLF)]
        self._advertised, self._greeting_text = code
        return self._request_upstream_starttls()

    def _request_upstream_starttls(self) -> list[Action]:
        if not self._has("STARTTLS"):
            return self._close(self.error_reply(NOT_OFFERED), "upstream STARTTLS not offered")
        self._state = State.UPSTREAM_STARTTLS
        return [SendToServer(b"EP1 STARTTLS" + CRLF)]

    def _on_upstream_tls_reply(self, line: Line) -> list[Action]:
        response = parse_response(line.body)
        capabilities = response_capabilities(response)
        if capabilities is not None:
            self._advertised = capabilities
        if response.tag == b"*" and response.word == "BYE":
            self._state = State.CLOSED
            return [SendToClient(line.data), Close("the server closed the connection")]
        if response.tag != _UPSTREAM_TAGS[self._state]:
            return []  # untagged data while the client has not been greeted yet
        ok = response.word == "OK"
        if self._state is State.UPSTREAM_CAPABILITY:
            if not ok:
                return self._close(self.error_reply(NOT_OFFERED), "upstream CAPABILITY failed")
            return self._request_upstream_starttls()
        if self._state is State.UPSTREAM_STARTTLS:
            if not ok:
                return self._close(self.error_reply(REFUSED), "upstream STARTTLS refused")
            self._server.discard()
            self._state = State.UPSTREAM_HANDSHAKE
            return [StartTls(Side.SERVER)]
        return self._greet_after_starttls()

    def _greet_after_starttls(self) -> list[Action]:
        self._greeted = True
        self._state = State.READY
        text = b" " + self._greeting_text if self._greeting_text else b""
        if self._advertised is None:
            return [SendToClient(b"* OK" + text + CRLF)]
        capabilities = format_capabilities(rewrite_capabilities(self._advertised, self._offer_starttls()))
        return [SendToClient(b"* OK [CAPABILITY " + capabilities + b"]" + text + CRLF)]

    # ------------------------------------------------------------------------------ client commands

    def _on_command(self, piece: Piece) -> list[Action]:
        if isinstance(piece, LiteralData) or piece.continued:
            return self._forward_piece(piece)  # the rest of a command the server answered early
        spent = self._budget.command()
        if spent is not None:
            return self._close(self.limit_reply(spent), "too many commands before login")
        command = parse_command(piece.body)
        if command is None:
            return self._reject_line(piece)
        if command.name == "LOGIN":
            return self._start_login(command, piece.literal)
        if piece.literal is None and command.name == "STARTTLS":
            return self._local_starttls(command)
        if piece.literal is None and command.name == "AUTHENTICATE":
            mechanism, _, initial = command.args.partition(b" ")
            if mechanism.upper() == b"PLAIN":
                return self._start_plain(command, initial.strip())
        self._tag = command.tag
        self._forwarded_auth = command.name == "AUTHENTICATE"
        self._continuation = False
        self._state = State.FORWARDING
        return [SendToServer(piece.data)]

    def _reject_line(self, line: Line) -> list[Action]:
        """A line that is not a command: answered here, as the server's reply could not be matched."""
        if line.literal is not None and not line.literal.synchronising:
            return self._close(self.error_reply("invalid command line"), "invalid client command")
        self._client.abort_literal()
        if not line.body.strip():
            return []  # blank lines are ignored
        return [SendToClient(b"* BAD Invalid command line" + CRLF)]

    def _forward_piece(self, piece: Piece) -> list[Action]:
        return [SendToServer(piece.data)] if piece.data else []

    def _forward_continuation(self, line: bytes) -> list[Action]:
        self._continuation = False
        return [SendToServer(line)]

    def _on_command_reply(self, line: Line) -> list[Action]:
        response = parse_response(line.body)
        if response.tag == b"+":
            # for a literal the client is already sending; in a SASL exchange the client answers with one
            # line. A "+" to any other command is out of turn: the client's next line stays a command (it
            # may be a pipelined LOGIN, whose password must never go upstream)
            self._continuation = self._forwarded_auth and not self._client.mid_message
            return [SendToClient(line.data)]
        if response.tag != self._tag:
            return self._forward_response(line, rewrite=not self._forwarded_auth)
        if self._forwarded_auth and response.word == "OK":
            return [SendToClient(line.data), *self._relay()]  # the client logged in by itself
        actions = self._forward_response(line, rewrite=not self._forwarded_auth)
        if self._client.awaiting_literal:
            self._client.abort_literal()  # the server refused a synchronising literal
        self._forwarded_auth = self._continuation = False
        self._state = State.READY
        return actions

    def _local_starttls(self, command: Command) -> list[Action]:
        if not self._offer_starttls():
            return [SendToClient(command.tag + b" BAD STARTTLS not available" + CRLF)]
        discarded = len(self._client)
        self._client.discard()
        self._state = State.CLIENT_HANDSHAKE
        actions: list[Action] = [
            SendToClient(command.tag + b" OK Begin TLS negotiation now" + CRLF),
            StartTls(Side.CLIENT),
        ]
        if discarded:
            actions.insert(0, warning(f"IMAP: discarded {discarded} bytes the client sent after STARTTLS"))
        return actions

    # ---------------------------------------------------------------------------------------- LOGIN

    def _start_login(self, command: Command, literal: Literal | None) -> list[Action]:
        self._tag = command.tag
        self._command = "LOGIN"
        self._segments = [Segment(command.args, literal=False)]
        return self._login_next(literal)

    def _login_next(self, literal: Literal | None) -> list[Action]:
        if literal is None:
            return self._finish_login()
        if literal.size > self.options.max_literal:
            if not literal.synchronising:
                return self._close(self.error_reply("literal too large"), "client literal too large")
            self._client.abort_literal()
            self._state = State.READY
            return self._tagged("BAD literal too large")
        self._state = State.LOGIN_ARGS
        self._literal.clear()
        return [SendToClient(b"+ Ready for literal data" + CRLF)] if literal.synchronising else []

    def _on_login_piece(self, piece: Piece) -> list[Action]:
        if isinstance(piece, LiteralData):
            self._literal += piece.data
            if piece.last:
                self._segments.append(Segment(bytes(self._literal), literal=True))
                self._literal.clear()
            return []
        self._segments.append(Segment(piece.body, literal=False))
        if sum(len(segment.data) for segment in self._segments) > self.options.max_buffer:
            return self._close(self.error_reply("LOGIN command too large"), "client LOGIN too large")
        return self._login_next(piece.literal)

    def _finish_login(self) -> list[Action]:
        segments, self._segments = self._segments, []
        try:
            username, password = parse_login_args(segments)
        except ImapSyntaxError as e:
            self._state = State.READY
            return self._tagged(f"BAD LOGIN {e}")
        user = _text(username)
        return self._need_token(user, Secret(_text(password)), f"LOGIN {user} ***")

    # --------------------------------------------------------------------------- AUTHENTICATE PLAIN

    def _start_plain(self, command: Command, initial: bytes) -> list[Action]:
        self._tag = command.tag
        self._command = "AUTHENTICATE"
        if initial:
            return self._on_plain(initial)
        self._state = State.PLAIN_RESPONSE
        return [SendToClient(b"+ " + CRLF)]

    def _on_plain_response(self, line: bytes) -> list[Action]:
        if is_cancel(line):
            self._state = State.READY
            return self._tagged("BAD AUTHENTICATE cancelled")
        return self._on_plain(strip_eol(line).strip())

    def _on_plain(self, response: bytes) -> list[Action]:
        try:
            username, password = decode_plain(b"" if response == b"=" else response)
        except SaslError as e:
            self._state = State.READY
            return self._tagged(f"BAD AUTHENTICATE invalid PLAIN response ({e})")
        return self._need_token(username, password, f"AUTHENTICATE PLAIN ({username} ***)")

    # ------------------------------------------------------------------------------- upstream login

    def _need_token(self, username: str, password: Secret, description: str) -> list[Action]:
        self._state = State.TOKEN
        tag = _one_line(self._tag.decode("latin-1"))
        return [debug(f"IMAP client: {tag} {_one_line(description)}"), NeedToken(username, password)]

    def _login_failed(self, message: str) -> list[Action]:
        self._state = State.READY
        self._blob = None
        actions = self._tagged(f"NO {self._command} {REPLY_PREFIX}{_one_line(message)}")
        spent = self._budget.login_failed()
        if spent is not None:
            actions += self._close(self.limit_reply(spent), "too many failed logins")
        return actions

    def _authenticate_upstream(self, username: str, token: Secret) -> list[Action]:
        if self._advertised is None or self._has("AUTH=XOAUTH2") or not self._has("AUTH=OAUTHBEARER"):
            mechanism, blob = "XOAUTH2", xoauth2(username, token)
        else:
            mechanism, blob = "OAUTHBEARER", oauthbearer(username, token)
        self._state = State.AUTHENTICATING
        command = self._tag + b" AUTHENTICATE " + mechanism.encode()
        log = debug(f"IMAP: authenticating {_one_line(username)} upstream with {mechanism}")
        if self._has("SASL-IR"):
            return [log, SendToServer(command + b" " + blob + CRLF, sensitive=True)]
        self._blob = blob
        return [log, SendToServer(command + CRLF)]

    def _on_auth_reply(self, line: Line) -> list[Action]:
        response = parse_response(line.body)
        if response.tag == b"+":
            if self._blob is not None:
                blob, self._blob = self._blob, None
                return [SendToServer(blob + CRLF, sensitive=True)]
            error = _describe_challenge(response.text)
            return [info(f"IMAP: the server rejected the token: {error}"), SendToServer(CRLF)]
        if response.tag != self._tag:
            return self._forward_response(line, rewrite=False)
        if response.word == "OK":
            return [SendToClient(line.data), *self._relay()]
        message = _text(strip_response_code(response.text)) or "authentication failed"
        return [info(f"IMAP: upstream login failed: {_one_line(message)}"), *self._login_failed(message)]
