"""Subcommands: ``emailproxy <name> ...``. Each module here defines ``main(argv: Sequence[str]) -> int``.

Running the proxy (``emailproxy [flags]`` or ``emailproxy run [flags]``) is the default.
"""

from __future__ import annotations

#: subcommand name -> module (imported only when used, so start-up stays fast)
COMMANDS: dict[str, str] = {
    "run": "emailproxy.cli",
    "authorize": "emailproxy.commands.authorize",
    "register": "emailproxy.commands.register",
    "check": "emailproxy.commands.check",
    "accounts": "emailproxy.commands.accounts",
    "logs": "emailproxy.commands.logs",
    "test": "emailproxy.commands.test",
    "set-password": "emailproxy.commands.setpassword",
}
