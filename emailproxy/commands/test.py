"""``emailproxy test ACCOUNT``: log in through the running proxy's local listeners and report each step.

For every ``[IMAP-port]``, ``[POP-port]`` and ``[SMTP-port]`` section of the configuration it connects to
the local listener (implicit TLS or STARTTLS when the section has local TLS), logs in as ACCOUNT with the
local password, and for IMAP selects INBOX, for POP asks for the mailbox size. With ``--send-to ADDRESS`` it
also sends a short test message through the first SMTP listener. The password is read from standard input
(``--password-stdin``) or asked for on the terminal, and never printed.
"""

from __future__ import annotations

import argparse
import email.policy
import email.utils
import getpass
import imaplib
import poplib
import smtplib
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import TextIO, TypeVar

from emailproxy.config import ConfigError, ServerConfig, load_config

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
DEFAULT_TIMEOUT = 60.0
T = TypeVar("T")
_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes ssl.SSLError and timeouts
    imaplib.IMAP4.error,
    poplib.error_proto,
    smtplib.SMTPException,
    EOFError,
)


class StepFailed(Exception):
    """A step did not succeed; ``str()`` says what came back."""


class Steps:
    """Runs and reports steps: ``[SECTION] what ... ok: detail`` or ``... FAILED: why``."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.failures = 0

    def call(self, section: str, what: str, action: Callable[[], tuple[T, str]]) -> T | None:
        """Run ``action`` (which returns a result and a detail to show); None when it failed."""
        print(f"[{section}] {what} ... ", end="", file=self.out, flush=True)
        started = time.monotonic()
        try:
            result, detail = action()
        except StepFailed as error:
            self._failed(str(error))
            return None
        except _ERRORS as error:
            self._failed(_explain(error))
            return None
        elapsed = time.monotonic() - started
        timing = f" ({elapsed:.2f} s)" if elapsed >= 0.1 else ""
        print(f"ok{timing}" + (f": {detail}" if detail else ""), file=self.out, flush=True)
        return result

    def run(self, section: str, what: str, action: Callable[[], str]) -> bool:
        return self.call(section, what, lambda: (True, action())) is not None

    def _failed(self, why: str) -> None:
        self.failures += 1
        print(f"FAILED: {why}", file=self.out, flush=True)


def _explain(error: BaseException) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused: is the proxy running with this configuration file?"
    if isinstance(error, TimeoutError):
        return (
            "timed out (an account that needs a browser sign-in waits for it: see `emailproxy logs --auth`)"
        )
    if isinstance(error, smtplib.SMTPResponseException):
        return f"{error.smtp_code} {_text(error.smtp_error)}"
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        return "; ".join(f"{rcpt}: {code} {_text(reply)}" for rcpt, (code, reply) in error.recipients.items())
    text = " ".join(_text(arg) for arg in error.args) if error.args else ""
    return text or type(error).__name__


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _local_tls() -> ssl.SSLContext:
    """For the proxy's own listener: its certificate is often self-signed, so it is not verified."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def connect_host(server: ServerConfig) -> str:
    """Where to reach a listener: wildcard addresses are reached on loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(
        server.local_address, server.local_address
    )


def _tls_note(server: ServerConfig) -> str:
    if server.local_tls:
        return " (TLS, certificate not verified)"
    if server.local_starttls:
        return " (STARTTLS, certificate not verified)"
    return ""


class Tester:
    """The steps for one account over each listener."""

    def __init__(self, account: str, password: str, timeout: float, steps: Steps) -> None:
        self.account = account
        self.password = password
        self.timeout = timeout
        self.steps = steps

    def _connect(self, server: ServerConfig, action: Callable[[str, int], tuple[T, str]]) -> T | None:
        host, port = connect_host(server), server.local_port
        what = f"connect to {host}:{port}{_tls_note(server)}"
        return self.steps.call(server.section, what, lambda: action(host, port))

    def _steps(
        self, server: ServerConfig, client: Closable, steps: Sequence[tuple[str, Callable[[], str]]]
    ) -> None:
        for what, action in steps:
            if not self.steps.run(server.section, what, action):
                _close(client)
                return

    def imap(self, server: ServerConfig) -> None:
        def connect(host: str, port: int) -> tuple[imaplib.IMAP4, str]:
            client: imaplib.IMAP4
            if server.local_tls:
                client = imaplib.IMAP4_SSL(host, port, ssl_context=_local_tls(), timeout=self.timeout)
            else:
                client = imaplib.IMAP4(host, port, timeout=self.timeout)
                if server.local_starttls:
                    client.starttls(ssl_context=_local_tls())
            return client, _text(client.welcome)

        client = self._connect(server, connect)
        if client is None:
            return

        def login() -> str:
            typ, data = client.login(self.account, self.password)
            return _text(data[0]) if data and data[0] else typ

        def select() -> str:
            typ, data = client.select("INBOX", readonly=True)
            if typ != "OK":
                raise StepFailed(_text(data[0]) if data else typ)
            return f"{_text(data[0])} message(s)"

        def logout() -> str:
            client.logout()
            return ""

        self._steps(
            server,
            client,
            [(f"log in as {self.account}", login), ("select INBOX", select), ("log out", logout)],
        )

    def pop(self, server: ServerConfig) -> None:
        def connect(host: str, port: int) -> tuple[poplib.POP3, str]:
            client: poplib.POP3
            if server.local_tls:
                client = poplib.POP3_SSL(host, port, context=_local_tls(), timeout=self.timeout)
            else:
                client = poplib.POP3(host, port, timeout=self.timeout)
                if server.local_starttls:
                    client.stls(context=_local_tls())
            return client, _text(client.getwelcome())

        client = self._connect(server, connect)
        if client is None:
            return

        def login() -> str:
            client.user(self.account)
            return _text(client.pass_(self.password))

        def stat() -> str:
            count, size = client.stat()
            return f"{count} message(s), {size} bytes"

        def quit_() -> str:
            client.quit()
            return ""

        self._steps(
            server, client, [(f"log in as {self.account}", login), ("mailbox size", stat), ("log out", quit_)]
        )

    def smtp(self, server: ServerConfig, send_to: str | None) -> None:
        def connect(host: str, port: int) -> tuple[smtplib.SMTP, str]:
            client: smtplib.SMTP
            if server.local_tls:
                client = smtplib.SMTP_SSL(context=_local_tls(), timeout=self.timeout)
            else:
                client = smtplib.SMTP(timeout=self.timeout)
            greeting_code, greeting = client.connect(host, port)
            if greeting_code != 220:
                client.close()
                raise StepFailed(f"{greeting_code} {_text(greeting)}")
            code, reply = client.ehlo()
            if code != 250:
                client.close()
                raise StepFailed(f"EHLO: {code} {_text(reply)}")
            if server.local_starttls:
                client.starttls(context=_local_tls())
                client.ehlo()
            return client, f"{greeting_code} {_text(greeting)}"

        client = self._connect(server, connect)
        if client is None:
            return

        def login() -> str:
            # AUTH PLAIN only: smtplib's login() would retry with AUTH LOGIN after a refusal
            client.user, client.password = self.account, self.password
            code, reply = client.auth("PLAIN", client.auth_plain)
            return f"{code} {_text(reply)}"

        def quit_() -> str:
            client.quit()
            return ""

        steps = [(f"log in as {self.account}", login)]
        if send_to is not None:
            recipient = send_to
            steps.append(
                (f"send a test message to {recipient}", lambda: self._send(client, recipient, server.section))
            )
        steps.append(("log out", quit_))
        self._steps(server, client, steps)

    def _send(self, client: smtplib.SMTP, recipient: str, section: str) -> str:
        message = EmailMessage(policy=email.policy.SMTP)
        message["From"] = self.account
        message["To"] = recipient
        message["Subject"] = "emailproxy test message"
        message["Date"] = email.utils.formatdate(localtime=True)
        domain = self.account.rpartition("@")[2] or "emailproxy.invalid"
        message_id = email.utils.make_msgid(domain=domain)
        message["Message-ID"] = message_id
        message.set_content(
            f"This message was sent by `emailproxy test`\nas {self.account}\n"
            f"through the proxy's [{section}] listener.\n"
        )
        code, reply = client.mail(self.account)
        if code != 250:
            raise StepFailed(f"MAIL FROM: {code} {_text(reply)}")
        code, reply = client.rcpt(recipient)
        if code not in (250, 251):
            raise StepFailed(f"RCPT TO: {code} {_text(reply)}")
        code, reply = client.data(message.as_bytes())
        if code != 250:
            raise StepFailed(f"DATA: {code} {_text(reply)}")
        return f"{code} {_text(reply)}; Message-ID {message_id}"


Closable = imaplib.IMAP4 | poplib.POP3 | smtplib.SMTP


def _close(client: Closable) -> None:
    """Drop a connection after a failed step without waiting for a polite goodbye."""
    try:
        if isinstance(client, imaplib.IMAP4):
            client.shutdown()  # (IMAP4.close() is the IMAP CLOSE command)
        else:
            client.close()
    except _ERRORS:
        pass


def read_password(from_stdin: bool, account: str) -> str | None:
    if from_stdin:
        line = sys.stdin.readline()
        return line.rstrip("\r\n")
    if sys.stdin.isatty():
        return getpass.getpass(f"Local password for {account} (the one your mail client uses): ")
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emailproxy test",
        description="Log in through the running proxy as ACCOUNT on each listener of the configuration and "
        "report each step; optionally send a test message.",
    )
    parser.add_argument("account", metavar="ACCOUNT", help="the login name, as your mail client sends it")
    parser.add_argument("--config-file", default=None, help="default: emailproxy.config in this directory")
    parser.add_argument(
        "--password-stdin", action="store_true", help="read the local password from the first line of stdin"
    )
    parser.add_argument("--send-to", metavar="ADDRESS", help="send a test message to ADDRESS via SMTP")
    parser.add_argument(
        "--protocol",
        action="append",
        choices=("IMAP", "POP", "SMTP"),
        type=str.upper,
        help="test only these listeners (repeatable; default: all)",
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per step (default 60)"
    )
    return parser


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    path = Path(args.config_file) if args.config_file else Path.cwd() / "emailproxy.config"
    try:
        config = load_config(path)
    except ConfigError as error:
        print(f"emailproxy test: {error}", file=sys.stderr)
        return EXIT_FAILED
    servers = [s for s in config.servers if not args.protocol or s.protocol in args.protocol]
    if args.send_to is not None and not any(s.protocol == "SMTP" for s in servers):
        print("emailproxy test: --send-to needs an [SMTP-port] section in the configuration", file=sys.stderr)
        return EXIT_USAGE
    if not servers:
        print("emailproxy test: no listener to test", file=sys.stderr)
        return EXIT_USAGE
    password = read_password(args.password_stdin, args.account)
    if password is None:
        print(
            "emailproxy test: give the password with --password-stdin (or run in a terminal)", file=sys.stderr
        )
        return EXIT_USAGE
    if config.find_account(args.account) is None:
        print(f"note: no account section matches {args.account}; the proxy will refuse the login")
    steps = Steps(sys.stdout)
    tester = Tester(args.account, password, args.timeout, steps)
    send_to = args.send_to
    for server in servers:
        if server.protocol == "IMAP":
            tester.imap(server)
        elif server.protocol == "POP":
            tester.pop(server)
        else:
            tester.smtp(server, send_to)
            send_to = None  # one test message, through the first SMTP listener
    if steps.failures:
        print(f"{steps.failures} step(s) failed.")
        return EXIT_FAILED
    print("All steps passed.")
    return EXIT_OK
