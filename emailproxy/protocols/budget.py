"""What one connection may do before it has logged in: how many commands, and how many failed logins.

Each protocol session holds a ``LoginBudget`` and asks it at two points: when a client command starts
(``command``) and when a login fails (``login_failed``). When the budget is spent the answer is the reason
to give; the session then sends ``Session.limit_reply(reason)`` and closes. The limits come from
``SessionOptions`` (``max_commands``, ``max_failed_logins``). Pure: no I/O.
"""

from __future__ import annotations

from emailproxy.protocols.events import SessionOptions


class LoginBudget:
    """Counts one connection's commands and failed logins until login."""

    __slots__ = ("_commands", "_failures", "max_commands", "max_failed_logins")

    def __init__(self, options: SessionOptions) -> None:
        self.max_commands = options.max_commands
        self.max_failed_logins = options.max_failed_logins
        self._commands = 0
        self._failures = 0

    def command(self) -> str | None:
        """Count a client command; the reason to close instead of handling it, when it is one too many."""
        self._commands += 1
        if self._commands > self.max_commands:
            return f"too many commands before login (the limit is {self.max_commands}); closing"
        return None

    def login_failed(self) -> str | None:
        """Count a failed login; the reason to close after its reply, when that was the last one allowed."""
        self._failures += 1
        if self._failures >= self.max_failed_logins:
            return f"too many failed logins on this connection ({self._failures}); closing"
        return None
