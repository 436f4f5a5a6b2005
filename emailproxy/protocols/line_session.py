"""What the line-based sessions (POP3 and SMTP) share.

``LineSession`` frames both directions into lines, runs the session's handlers one line at a time
(a client line only when the subclass says it is the client's turn), bounds what stays buffered,
and hands the leftovers to the relay once the upstream accepts the token. The functions at the end
choose the upstream SASL mechanism (XOAUTH2, or OAUTHBEARER when only that is offered).
"""

from __future__ import annotations

import binascii
from abc import abstractmethod
from dataclasses import dataclass

from emailproxy.protocols import sasl
from emailproxy.protocols.budget import LoginBudget
from emailproxy.protocols.events import (
    Action,
    Close,
    Relay,
    SendToClient,
    Session,
    SessionOptions,
    debug,
    info,
)
from emailproxy.protocols.lines import LineBuffer, LineTooLong
from emailproxy.secret import Secret

XOAUTH2 = "XOAUTH2"
OAUTHBEARER = "OAUTHBEARER"

#: The user is told this when ``server_starttls`` is set but the upstream cannot be upgraded.
NO_UPSTREAM_TLS = (
    "the server does not offer {command} (server_starttls is set), so the connection was closed "
    "without sending any credentials"
)


@dataclass(slots=True)
class UpstreamLogin:
    """The login being made upstream after the token manager answered."""

    username: str
    token: Secret
    mechanism: str
    fallback_tried: bool = False

    def initial_response(self) -> bytes:
        """The base64 blob for ``mechanism``, carrying the token (send it as sensitive)."""
        if self.mechanism == OAUTHBEARER:
            return sasl.oauthbearer(self.username, self.token)
        return sasl.xoauth2(self.username, self.token)


def choose_mechanism(offered: frozenset[str] | None) -> str:
    """XOAUTH2 if offered or if the server's mechanisms are unknown; else OAUTHBEARER if offered."""
    if offered is None or XOAUTH2 in offered:
        return XOAUTH2
    if OAUTHBEARER in offered:
        return OAUTHBEARER
    return XOAUTH2


def fallback_mechanism(login: UpstreamLogin, offered: frozenset[str] | None) -> str | None:
    """The mechanism to try once more when the server refused ``AUTH XOAUTH2`` itself, if any."""
    if login.fallback_tried or login.mechanism != XOAUTH2:
        return None
    if offered is not None and OAUTHBEARER not in offered:
        return None
    return OAUTHBEARER


def parse_mechanisms(words: list[bytes]) -> frozenset[str]:
    """Upper-cased mechanism names from a capability's arguments."""
    return frozenset(word.decode("ascii", "replace").upper() for word in words if word)


def describe_error_challenge(challenge: bytes) -> str:
    """The server's base64 error challenge (usually JSON) as printable text for the log."""
    try:
        decoded = binascii.a2b_base64(challenge.strip())
    except (binascii.Error, ValueError):
        return "(not base64) " + challenge.strip()[:200].decode("ascii", "replace")
    return decoded[:500].decode("utf-8", "replace")


class LineSession(Session):
    """Line framing, turn taking and relay hand-over for POP3 and SMTP sessions."""

    def __init__(self, options: SessionOptions) -> None:
        super().__init__(options)
        self._client = LineBuffer(options.max_line)
        self._server = LineBuffer(options.max_line)
        self._finished = False
        self._client_upgraded = False
        self._budget = LoginBudget(options)  # commands and failed logins allowed before login

    # ------------------------------------------------------------------ what a subclass provides

    @abstractmethod
    def _client_turn(self) -> bool:
        """May the next client line be handled now?"""

    @abstractmethod
    def _on_client_line(self, line: bytes) -> list[Action]:
        """Handle one client line (terminator included)."""

    @abstractmethod
    def _on_server_line(self, line: bytes) -> list[Action]:
        """Handle one server line (terminator included)."""

    @abstractmethod
    def _line_too_long_reply(self) -> bytes:
        """The reply sent to the client before closing when a line is over the limit."""

    def _ignoring_client(self) -> bool:
        """True while client bytes are dropped (a client TLS handshake is pending)."""
        return False

    def _ignoring_server(self) -> bool:
        """True while server bytes are dropped (a server TLS handshake is pending)."""
        return False

    def _client_raw_wanted(self) -> int:
        """How many raw (unframed) client bytes the session is waiting for; 0 means lines."""
        return 0

    def _on_client_raw(self, data: bytes) -> list[Action]:
        """Handle raw client bytes asked for by ``_client_raw_wanted``."""
        return []

    # ------------------------------------------------------------------ driver entry points

    def client_data(self, data: bytes) -> list[Action]:
        if self._finished or self._ignoring_client():
            return []
        self._client.feed(data)
        return self._pump()

    def server_data(self, data: bytes) -> list[Action]:
        if self._finished or self._ignoring_server():
            return []
        self._server.feed(data)
        return self._pump()

    # ------------------------------------------------------------------ helpers for subclasses

    @property
    def local_starttls_possible(self) -> bool:
        """Whether the client may still upgrade this connection with STARTTLS/STLS."""
        return self.options.local_starttls and not self.options.client_tls and not self._client_upgraded

    def _pump(self) -> list[Action]:
        """Handle every line that can be handled now: waiting client lines first, then server lines.

        Draining the client before each server line makes the result independent of how the bytes
        were split into chunks.
        """
        actions: list[Action] = []
        try:
            while not self._finished:
                step = self._client_step()
                if step is None:
                    line = self._server.next_line()
                    if line is None:
                        break
                    step = self._on_server_line(line)
                actions += step
        except LineTooLong:
            actions += self._close(self._line_too_long_reply(), "line too long")
        if not self._finished and len(self._client) > self.options.max_buffer:
            actions += self._close(self.error_reply("too much data sent before login"), "client buffer full")
        return actions

    def _client_step(self) -> list[Action] | None:
        """Handle one client line (or raw chunk) if it is the client's turn and one is complete."""
        wanted = self._client_raw_wanted()
        if wanted > 0:
            if not len(self._client):
                return None
            chunk = self._client.take(min(wanted, len(self._client)))
            return self._on_client_raw(chunk or b"")
        if not self._client_turn():
            return None
        line = self._client.next_line()
        return None if line is None else self._on_client_line(line)

    def _close(self, reply: bytes, reason: str) -> list[Action]:
        """Send ``reply`` (if any) to the client and close both sides."""
        self._finished = True
        actions: list[Action] = [SendToClient(reply)] if reply else []
        return [*actions, Close(reason)]

    def _count_command(self) -> list[Action]:
        """Count a client command: the actions that close the connection instead, when it is one too many."""
        spent = self._budget.command()
        return [] if spent is None else self._close(self.limit_reply(spent), "too many commands before login")

    def _refuse_login(self, reply: bytes, text: str) -> list[Action]:
        """Send a failed login's reply, and close after it when that was the last failure allowed."""
        actions: list[Action] = [info(f"login failed: {text}"), SendToClient(reply)]
        spent = self._budget.login_failed()
        if spent is not None:
            actions += self._close(self.limit_reply(spent), "too many failed logins")
        return actions

    def _relay(self, success: bytes) -> list[Action]:
        """Forward the server's success reply and switch to raw relaying with all leftovers."""
        self._finished = True
        return [
            SendToClient(success),
            debug("upstream accepted the token; relaying"),
            Relay(to_server=self._client.take_all(), to_client=self._server.take_all()),
        ]

    def _discard_client(self) -> None:
        """Drop unprocessed client bytes (sent after STARTTLS in the same plaintext chunk)."""
        self._client.take_all()

    def _discard_server(self) -> None:
        """Drop unprocessed server bytes (sent after its STARTTLS reply, before the handshake)."""
        self._server.take_all()
