"""Logging set-up and the per-connection logger that names the listener, connection and account."""

from __future__ import annotations

import logging
import logging.handlers
import sys
from collections.abc import MutableMapping
from typing import Any

LOGGER_NAME = "emailproxy"
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def setup_logging(debug: bool = False, log_file: str | None = None) -> None:
    """One handler per destination, so no line is written twice."""
    root = logging.getLogger(LOGGER_NAME)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(LOG_FORMAT)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(formatter)
    root.addHandler(stream)
    if log_file:
        rotating = logging.handlers.RotatingFileHandler(
            log_file, maxBytes=32 * 1024 * 1024, backupCount=10, encoding="utf-8"
        )
        rotating.setFormatter(formatter)
        root.addHandler(rotating)


class ConnectionLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes each message with ``[IMAP-1993 #7 user@example.com]``; formatting stays lazy."""

    def __init__(self, listener: str, number: int) -> None:
        super().__init__(logging.getLogger(LOGGER_NAME + ".connection"), {})
        self.listener = listener
        self.number = number
        self.account = ""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        who = f" {self.account}" if self.account else ""
        return f"[{self.listener} #{self.number}{who}] {msg}", kwargs
