"""Runs the real proxy (``python -m emailproxy``) as a subprocess on free loopback ports, for tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.world.ports import free_ports


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

    def start(self, timeout: float = 15.0) -> None:
        self.stderr_path = self.log_path.with_suffix(".stderr")
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
