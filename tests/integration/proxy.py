"""Runs the real proxy (``python -m emailproxy``) as a subprocess on free loopback ports, for tests."""

from __future__ import annotations

import imaplib
import os
import poplib
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest

from tests.integration.world.ports import LOOPBACK, free_ports

if TYPE_CHECKING:
    from tests.integration.conftest import World

T = TypeVar("T")


@dataclass
class Proxy:
    """One proxy process. ``ports`` maps a section name (e.g. "IMAP") to its local port."""

    config_path: Path
    log_path: Path
    ports: dict[str, int]
    env: dict[str, str]
    args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    stderr_path: Path | None = None
    #: what this proxy wrote, in the session-wide registry (see ProxyRecord)
    record: ProxyRecord | None = None

    def start(self, timeout: float = 15.0) -> None:
        self.stderr_path = self.log_path.with_suffix(".stderr")
        if self.record is None:
            self.record = ProxyRecord.register(self)
        stderr = open(self.stderr_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "emailproxy", "--config-file", str(self.config_path),
             "--log-file", str(self.log_path), "--debug", "--no-gui", *self.args],
            stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, env=self.env,
        )
        stderr.close()
        deadline = time.monotonic() + timeout
        pending = set(self.ports.values())
        while pending:
            if self.process.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.process.returncode}:\n{self.output()}")
            for port in list(pending):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    pending.discard(port)
                except OSError:
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"proxy did not listen on {sorted(pending)}:\n{self.output()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait, and return the exit code (SIGKILL if it does not exit)."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        self.process = None
        if self.record is not None:
            self.record.snapshot()
        return code

    def output(self) -> str:
        text = ""
        for path in (self.stderr_path, self.log_path):
            if path is not None and path.exists():
                text += path.read_text(errors="replace")
        return text

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def proxy_env(ca_path: Path) -> dict[str, str]:
    """The proxy trusts the test CA for mail servers and token endpoints alike (SSL_CERT_FILE)."""
    env = dict(os.environ)
    env["SSL_CERT_FILE"] = str(ca_path)
    env.pop("REQUESTS_CA_BUNDLE", None)
    env.pop("CURL_CA_BUNDLE", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def allocate_ports(*names: str) -> dict[str, int]:
    return dict(zip(names, free_ports(len(names), "127.0.0.1"), strict=True))


def render_config(sections: dict[str, dict[str, str]]) -> str:
    lines: list[str] = []
    for name, options in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {value}" for key, value in options.items())
        lines.append("")
    return "\n".join(lines)


def launch(world_ca: Path, directory: Path, sections: dict[str, dict[str, str]], ports: dict[str, int],
           args: list[str] | None = None, config_text: str | None = None) -> Proxy:
    """Write ``sections`` (or ``config_text``) to ``directory/emailproxy.config`` and start a proxy on it.

    ``ports`` names the local listener ports the caller put into the section names; start() waits for them.
    The caller must call ``stop()`` (and should assert it returns 0).
    """
    config = directory / "emailproxy.config"
    config.write_text(config_text if config_text is not None else render_config(sections))
    proxy = Proxy(config, directory / "proxy.log", ports, proxy_env(world_ca), args=list(args or []))
    proxy.start()
    return proxy


# ------------------------------------------------------------------------------------------------------------
# Session-wide registry of everything the proxies of the test session wrote, for the whole-suite secret scan
# (tests/integration/test_zz_secret_scan.py, which runs after every other integration test).


def _cache_store_arg(args: list[str]) -> Path | None:
    for index, arg in enumerate(args):
        value = None
        if arg == "--cache-store" and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith("--cache-store="):
            value = arg.partition("=")[2]
        if value is not None and not value.startswith("aws:"):
            return Path(value)
    return None


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


@dataclass
class ProxyRecord:
    """One Proxy object's artefacts: its log file(s), stdout/stderr capture, configuration file and cache
    store (with what the test had written in them before the first start), and the files that appeared in
    their directories while it ran (content and mode, taken at each stop)."""

    test: str
    log_path: Path
    stderr_path: Path
    config_path: Path
    cache_store: Path | None
    config_written: bytes
    cache_written: bytes | None
    existing: frozenset[Path]
    snapshots: dict[Path, bytes] = field(default_factory=dict)
    created: dict[Path, int] = field(default_factory=dict)

    @classmethod
    def register(cls, proxy: Proxy) -> ProxyRecord:
        cache = _cache_store_arg(proxy.args)
        record = cls(
            test=os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0],
            log_path=proxy.log_path,
            stderr_path=proxy.log_path.with_suffix(".stderr"),
            config_path=proxy.config_path,
            cache_store=cache,
            config_written=_read(proxy.config_path) or b"",
            cache_written=None if cache is None else _read(cache),
            existing=frozenset(path for directory in _directories(proxy.config_path, cache)
                               for path in _listing(directory)),
        )
        PROXY_RECORDS.append(record)
        return record

    @property
    def directories(self) -> list[Path]:
        return _directories(self.config_path, self.cache_store)

    def files(self) -> list[Path]:
        """The files this proxy wrote, as they are now: logs (with rotated ones), capture, config, cache store
        and every file that appeared in the config's (and cache store's) directory since the first start."""
        found = [self.log_path, self.stderr_path, self.config_path]
        found += sorted(self.log_path.parent.glob(self.log_path.name + ".*"))
        if self.cache_store is not None:
            found.append(self.cache_store)
        for directory in self.directories:
            found += [path for path in _listing(directory) if path not in self.existing]
        return list(dict.fromkeys(path for path in found if path.is_file()))

    def snapshot(self) -> None:
        """Keep the current content (and, for new files, the mode) of every file, as the proxy left it."""
        for path in self.files():
            data = _read(path)
            if data is not None:
                self.snapshots[path] = data
            if path not in self.existing:
                try:
                    self.created[path] = stat.S_IMODE(path.stat().st_mode)
                except OSError:
                    pass


def _directories(config: Path, cache: Path | None) -> list[Path]:
    return list(dict.fromkeys([config.parent] + ([cache.parent] if cache is not None else [])))


def _listing(directory: Path) -> list[Path]:
    try:
        return [path for path in directory.iterdir() if path.is_file()]
    except OSError:
        return []


#: every proxy started in this test session, in start order
PROXY_RECORDS: list[ProxyRecord] = []
#: (test, command, stdout and stderr) of every `emailproxy <command>` run a test recorded with record_command
COMMAND_OUTPUTS: list[tuple[str, str, str]] = []


def record_command(args: Sequence[str], stdout: str | None, stderr: str | None) -> None:
    """Keep what an `emailproxy` subcommand printed, for the whole-suite secret scan. ``args`` are the
    command's arguments (a full command line is cut after its `emailproxy`)."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
    args = list(args)
    if "emailproxy" in args:
        args = args[args.index("emailproxy") + 1 :]
    command = next((arg for arg in args if not arg.startswith("-")), "emailproxy")
    COMMAND_OUTPUTS.append((test, command, (stdout or "") + (stderr or "")))
#: (kind, value, user) of credentials the tests' mail clients sent (recorded by the secret scan's hooks)
CLIENT_SECRETS: list[tuple[str, str, str | None]] = []


# ------------------------------------------------------------------------------------------------------------
# What a mail client sees when the proxy refuses its login


#: how each protocol's refusal starts (the reference's wording)
FAILURE_PREFIX = {
    "IMAP": b"LOGIN Email OAuth 2.0 Proxy: ",
    "POP": b"-ERR Authentication failed. Email OAuth 2.0 Proxy: ",
    "SMTP": b"535 5.7.8  Authentication credentials invalid. Email OAuth 2.0 Proxy: ",
}


def refused_login(protocol: str, port: int, user: str, password: str, timeout: float = 20.0) -> bytes:
    """Log in once with imaplib, poplib or smtplib and return the proxy's refusal (it must refuse).
    SMTP: one AUTH PLAIN, no fallback to LOGIN."""
    if protocol == "IMAP":
        with imaplib.IMAP4("127.0.0.1", port, timeout=timeout) as imap:
            with pytest.raises(imaplib.IMAP4.error) as imap_error:
                imap.login(user, password)
            text = imap_error.value.args[0]
            return text if isinstance(text, bytes) else str(text).encode()
    if protocol == "POP":
        pop = poplib.POP3("127.0.0.1", port, timeout=timeout)
        try:
            pop.user(user)
            with pytest.raises(poplib.error_proto) as pop_error:
                pop.pass_(password)
        finally:
            pop.close()
        reply = pop_error.value.args[0]
        assert isinstance(reply, bytes)
        return reply
    with smtplib.SMTP("127.0.0.1", port, timeout=timeout) as smtp:
        smtp.ehlo("client.example.com")
        smtp.user, smtp.password = user, password
        with pytest.raises(smtplib.SMTPAuthenticationError) as smtp_error:
            smtp.auth("PLAIN", smtp.auth_plain)
        answer: bytes | str = smtp_error.value.smtp_error  # bytes at run time, whatever the stubs say
        return f"{smtp_error.value.smtp_code} ".encode() + (
            answer if isinstance(answer, bytes) else answer.encode()
        )


def mail_sections(world: World, ports: dict[str, int]) -> dict[str, dict[str, str]]:
    """IMAP and POP over implicit TLS to Dovecot, SMTP with STARTTLS to Postfix's submission port, for the
    protocols in `ports`."""
    d = world.dovecot.ports
    sections: dict[str, dict[str, str]] = {}
    if "IMAP" in ports:
        sections[f"IMAP-{ports['IMAP']}"] = {"server_address": d.host, "server_port": str(d.imaps)}
    if "POP" in ports:
        sections[f"POP-{ports['POP']}"] = {"server_address": d.host, "server_port": str(d.pop3s)}
    if "SMTP" in ports:
        sections[f"SMTP-{ports['SMTP']}"] = {
            "server_address": LOOPBACK,
            "server_port": str(world.postfix.ports.submission),
            "server_starttls": "True",
        }
    return sections


def section_lines(path: Path, section: str) -> list[str]:
    """The non-blank lines of one section of a config file (header excluded), as written."""
    lines: list[str] = []
    current = ""
    for line in path.read_text().splitlines():
        if line.startswith("["):
            current = line.strip()[1:-1]
        elif current == section and line.strip():
            lines.append(line)
    return lines


def assert_no_traceback(proxy: Proxy) -> None:
    assert "Traceback" not in proxy.output(), proxy.output()


def wait_for(
    condition: Callable[[], T | None], what: str, proxy: Proxy | None = None, timeout: float = 20.0
) -> T:
    """Call `condition` every 50 ms until it returns something truthy, and return that. After `timeout`
    seconds the test fails, naming `what` (with the tail of `proxy`'s log when given)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = f"; proxy log tail:\n{proxy.log()[-4000:]}" if proxy is not None else ""
            pytest.fail(f"timed out waiting for {what}{tail}")
        time.sleep(0.05)
