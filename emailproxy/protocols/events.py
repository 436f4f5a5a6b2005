"""What a protocol state machine asks its driver to do, and what the driver tells it back.

Every protocol session (IMAP, POP3, SMTP) is a pure object: the driver feeds it bytes and
completions, and it answers with a list of actions. Nothing in ``emailproxy.protocols`` does I/O.
"""

from __future__ import annotations

import enum
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

from emailproxy.secret import Secret

#: Prefix of every failure text the proxy itself puts into a protocol reply (the reference's wording).
REPLY_PREFIX = "Email OAuth 2.0 Proxy: "

#: Limits on what a client may do before login (docs/security.md, "Hostile input and limits"; the driver
#: applies the time limits). SessionOptions carries them, so tests can use smaller values.
MAX_LINE = 16 * 1024  # longest command or response line before login, in bytes
MAX_LITERAL = 64 * 1024  # largest IMAP literal accepted before login, in bytes
MAX_BUFFER = 256 * 1024  # most unprocessed bytes held for one side before login
MAX_COMMANDS = 50  # client commands on one connection before login; one more closes it
MAX_FAILED_LOGINS = 3  # failed logins on one connection; the reply to the last one is followed by a close


class Side(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


# ---------------------------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class SendToClient:
    data: bytes
    #: True when the bytes carry something that must never be logged verbatim
    sensitive: bool = False


@dataclass(frozen=True, slots=True)
class SendToServer:
    data: bytes
    #: True when the bytes carry a token or password: the driver logs them redacted
    sensitive: bool = False


@dataclass(frozen=True, slots=True)
class StartTls:
    """Upgrade the connection on ``side`` to TLS, then call ``tls_started(side)`` (or close on failure)."""

    side: Side


@dataclass(frozen=True, slots=True)
class NeedToken:
    """Get an access token for this login, then call ``token_result()`` with a TokenOk or TokenFailure."""

    username: str
    password: Secret


@dataclass(frozen=True, slots=True)
class Relay:
    """Login is done: write these leftovers, then relay raw bytes both ways without parsing."""

    to_server: bytes = b""
    to_client: bytes = b""


@dataclass(frozen=True, slots=True)
class Close:
    """Flush pending writes and close both connections."""

    reason: str


@dataclass(frozen=True, slots=True)
class Log:
    level: int
    message: str


Action = SendToClient | SendToServer | StartTls | NeedToken | Relay | Close | Log


def debug(message: str) -> Log:
    return Log(logging.DEBUG, message)


def info(message: str) -> Log:
    return Log(logging.INFO, message)


def warning(message: str) -> Log:
    return Log(logging.WARNING, message)


# ---------------------------------------------------------------------------------------------- completions


@dataclass(frozen=True, slots=True)
class TokenOk:
    """The token manager's answer to NeedToken: the SASL user name and the access token to send upstream."""

    username: str
    access_token: Secret


@dataclass(frozen=True, slots=True)
class TokenFailure:
    """Why no token could be had. ``message`` is a short, user-facing reason without REPLY_PREFIX.

    ``local`` is True when the client itself is at fault (a wrong local password, an account the
    configuration does not know, no password): such failures count towards the failed-login backoff,
    while a refusal by the identity provider or a network problem does not.
    """

    message: str
    local: bool = False


TokenResult = TokenOk | TokenFailure


# ---------------------------------------------------------------------------------------------- session


@dataclass(frozen=True, slots=True)
class SessionOptions:
    #: connect to the upstream in plaintext and upgrade with STARTTLS/STLS before anything else
    server_starttls: bool = False
    #: offer STARTTLS/STLS to the local client (the listener has a certificate)
    local_starttls: bool = False
    #: the local client connection is already encrypted (implicit TLS listener)
    client_tls: bool = False
    max_line: int = MAX_LINE
    max_literal: int = MAX_LITERAL
    max_buffer: int = MAX_BUFFER
    max_commands: int = MAX_COMMANDS
    max_failed_logins: int = MAX_FAILED_LOGINS


class ProtocolError(Exception):
    """A peer broke the protocol or a limit; the session should send ``reply`` (if any) and close."""

    def __init__(self, message: str, reply: bytes = b"") -> None:
        super().__init__(message)
        self.reply = reply


class Session(ABC):
    """One client connection's protocol state machine, from connect until the switch to raw relay.

    The driver connects to the upstream server (implicit TLS, or plaintext when
    ``options.server_starttls``), then feeds bytes in. Methods never raise for bad peer input:
    they return actions (a reply and ``Close``) instead.
    """

    protocol: str = ""

    def __init__(self, options: SessionOptions) -> None:
        self.options = options

    @abstractmethod
    def client_data(self, data: bytes) -> list[Action]:
        """Bytes arrived from the local mail client."""

    @abstractmethod
    def server_data(self, data: bytes) -> list[Action]:
        """Bytes arrived from the upstream server."""

    @abstractmethod
    def tls_started(self, side: Side) -> list[Action]:
        """The StartTls(side) asked for has completed."""

    @abstractmethod
    def token_result(self, result: TokenResult) -> list[Action]:
        """The answer to the last NeedToken."""

    @abstractmethod
    def goodbye(self) -> bytes:
        """What to send the client when the proxy shuts down before login (reference wording)."""

    @abstractmethod
    def error_reply(self, message: str) -> bytes:
        """An untagged/unsolicited error to send the client before closing (upstream down, timeout...)."""

    def limit_reply(self, message: str) -> bytes:
        """What to send the client before closing because it went over a limit (commands, failed
        logins, connections): the error reply, or the protocol's "try again later" code if it has one."""
        return self.error_reply(message)
