"""Logging set-up and the per-connection logger that names the listener, connection and account.

Destinations: stderr (always human-readable text), an optional rotating ``--log-file`` and optional syslog.
``--log-format json`` writes one JSON object per line to the log file (to stderr when there is no log file).
Connection log lines carry ``listener``, ``connection`` and ``account`` as record attributes; the text
formatter renders them as a ``[IMAP-1993 #7 user@example.com]`` prefix, the JSON formatter as fields.

Formatting is lazy: a record is only formatted by a handler that emits it, so debug lines cost nothing
while debug logging is off. Secrets never reach a record (they are redacted where the lines are made).
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import os
import sys
from collections.abc import MutableMapping, Sequence
from typing import Any, Literal

LOGGER_NAME = "emailproxy"
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
SYSLOG_FORMAT = "%(message)s"
SYSLOG_IDENT = "emailproxy: "
#: syslog sockets, in the order tried (Linux, then macOS)
SYSLOG_SOCKETS = ("/dev/log", "/var/run/syslog")
LOG_FILE_MAX_BYTES = 32 * 1024 * 1024
LOG_FILE_BACKUPS = 10

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")

#: record attributes that describe the connection a line belongs to (set by ConnectionLog)
CONTEXT_FIELDS = ("listener", "connection", "account")


class LogSetupError(Exception):
    """A logging destination cannot be used (the message says which and why)."""


def context_prefix(record: logging.LogRecord) -> str:
    """``[IMAP-1993 #7 user@example.com] `` for a connection's record, else the empty string."""
    listener = getattr(record, "listener", None)
    if listener is None:
        return ""
    text = f"[{listener}"
    connection = getattr(record, "connection", None)
    if connection is not None:
        text += f" #{connection}"
    account = getattr(record, "account", None)
    if account:
        text += f" {account}"
    return text + "] "


class TextFormatter(logging.Formatter):
    """The classic format, with the connection prefix in front of the message."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        prefix = context_prefix(record)
        if not prefix:
            return super().formatMessage(record)
        original = record.message
        record.message = prefix + original
        try:
            return super().formatMessage(record)
        finally:
            record.message = original


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, and the connection fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value not in (None, ""):
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def _formatter(log_format: LogFormat) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else TextFormatter(LOG_FORMAT)


def _syslog_handler(sockets: Sequence[str]) -> logging.Handler:
    existing = [path for path in sockets if os.path.exists(path)]
    if not existing:
        raise LogSetupError(
            f"--syslog: no syslog socket found (looked for {', '.join(sockets)}); is a syslog daemon or "
            "systemd-journald running? Use --log-file instead"
        )
    try:
        handler = logging.handlers.SysLogHandler(
            address=existing[0], facility=logging.handlers.SysLogHandler.LOG_DAEMON
        )
    except OSError as e:
        raise LogSetupError(f"--syslog: cannot connect to {existing[0]}: {e.strerror or e}") from e
    handler.ident = SYSLOG_IDENT
    handler.setFormatter(TextFormatter(SYSLOG_FORMAT))
    return handler


def setup_logging(
    debug: bool = False,
    log_file: str | None = None,
    *,
    log_format: LogFormat = "text",
    syslog: bool = False,
    syslog_sockets: Sequence[str] | None = None,
) -> None:
    """(Re)configure the ``emailproxy`` logger: one handler per destination, so no line is written twice.

    Calling it again replaces the previous handlers. With ``syslog`` and a stderr that is not a terminal
    (a service manager that also collects stderr), stderr is left out so lines do not arrive twice.
    Raises LogSetupError when the log file or the syslog socket cannot be used.
    """
    root = logging.getLogger(LOGGER_NAME)
    handlers: list[logging.Handler] = []
    try:
        if syslog:
            handlers.append(_syslog_handler(SYSLOG_SOCKETS if syslog_sockets is None else syslog_sockets))
        if log_file:
            try:
                rotating = logging.handlers.RotatingFileHandler(
                    log_file, maxBytes=LOG_FILE_MAX_BYTES, backupCount=LOG_FILE_BACKUPS, encoding="utf-8"
                )
            except OSError as e:
                raise LogSetupError(f"--log-file: cannot open {log_file}: {e.strerror or e}") from e
            rotating.setFormatter(_formatter(log_format))
            handlers.append(rotating)
        if not syslog or sys.stderr.isatty():
            stream = logging.StreamHandler(sys.stderr)
            # stderr stays human-readable unless JSON was asked for and it is the only file destination
            stream.setFormatter(_formatter(log_format if not log_file else "text"))
            handlers.append(stream)
    except BaseException:
        for handler in handlers:
            handler.close()
        raise
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)


class ConnectionLog(logging.LoggerAdapter[logging.Logger]):
    """Adds the listener, connection number and (once known) account to each record; formatting stays lazy."""

    def __init__(self, listener: str, number: int) -> None:
        super().__init__(logging.getLogger(LOGGER_NAME + ".connection"), {})
        self.listener = listener
        self.number = number
        self.account = ""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(kwargs.get("extra") or {})
        extra.update(listener=self.listener, connection=self.number)
        if self.account:
            extra["account"] = self.account
        kwargs["extra"] = extra
        return msg, kwargs
