"""The protocol vocabulary the stateful session fuzzer needs (tests/session_model.py, one subclass per
protocol in tests/test_fuzz_stateful.py), and the shapes of the secrets its model client sends."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, ClassVar

from hypothesis import strategies as st

from emailproxy.protocols import sasl
from emailproxy.protocols.events import REPLY_PREFIX, Session

if TYPE_CHECKING:
    from tests.session_model import SessionMachine

PREFIX = REPLY_PREFIX.encode()
#: every password the model sends starts with this (then a per-login number and ``#``)
PASSWORD_MARK = "Pw!"
#: characters the PLAIN/LOGIN forms may put in a password (no NUL, CR or LF)
PASSWORD_TEXT = st.text(st.sampled_from(list('abcXYZ019 "\\%*(){}é')), max_size=10)
ATOM_TEXT = st.text(st.sampled_from(list("abcXYZ019._-")), max_size=10)


def plain_blob(username: str, password: str, authzid: str = "") -> bytes:
    return sasl.b64encode(f"{authzid}\0{username}\0{password}")


class Dialect:
    """The protocol vocabulary a machine needs; one subclass per protocol."""

    session_cls: ClassVar[type[Session]]
    #: what the proxy may send upstream before the client is greeted (server_starttls set-up)
    upstream_setup: ClassVar[frozenset[bytes]]
    #: the proxy's own AUTH commands during the upstream login
    auth_command: ClassVar[re.Pattern[bytes]]
    #: the proxy's failure reply that ends an upstream login
    failure: ClassVar[re.Pattern[bytes]]
    #: the server's success reply that precedes Relay (searched in it)
    success: ClassVar[re.Pattern[bytes]]
    starttls_ok: ClassVar[re.Pattern[bytes]]
    starttls_refused: ClassVar[re.Pattern[bytes]]
    #: server lines that could make the client's next line mean something else (see the module doc)
    taint: ClassVar[re.Pattern[bytes] | None] = None
    noop: ClassVar[bytes]
    #: what a client usually sends first (SMTP: EHLO), answered sensibly in most runs
    opening: ClassVar[bytes] = b""
    #: one server line used to flood the server side; literal_slack: a LOGIN literal may be held too
    server_flood_line: ClassVar[bytes]
    literal_slack: ClassVar[bool] = False

    def relay_also_ok(self, machine: SessionMachine, line: bytes) -> bool:
        """Relay without a token (IMAP PREAUTH, or an AUTHENTICATE the client ran itself)."""
        return False

    def greeting(self, data: st.DataObject) -> bytes:
        raise NotImplementedError

    def command(self, data: st.DataObject, machine: SessionMachine) -> None:
        """Send one command that is not a login (through machine.client_payload or begin_exchange)."""
        raise NotImplementedError

    def login(self, data: st.DataObject, machine: SessionMachine) -> None:
        """Send one login (registering it with machine.new_login first)."""
        raise NotImplementedError

    def starttls(self, marker: bytes, machine: SessionMachine) -> bytes:
        raise NotImplementedError

    def server_reply(self, data: st.DataObject, machine: SessionMachine) -> bytes:
        raise NotImplementedError

    def server_continuation(self, data: st.DataObject) -> bytes:
        raise NotImplementedError

    def sensible(self, machine: SessionMachine) -> list[bytes]:
        """Replies (without the final line end) a server could give to the last command sent upstream."""
        raise NotImplementedError

    def good_greetings(self) -> list[bytes]:
        raise NotImplementedError
