"""The proxies under test as subprocesses: this project's, and the reference proxy installed from PyPI into a
throwaway virtual environment. Also the per-process figures the benchmarks read from /proc."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import venv
from dataclasses import dataclass
from pathlib import Path

from tests.integration.proxy import proxy_env, render_config

REPO = Path(__file__).resolve().parent.parent
REFERENCE_PACKAGE = "emailproxy"  # the reference proxy's name on PyPI
INSTALL_TIMEOUT = 240.0
_TICKS = os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (fields 14 and 15 of stat)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Reference:
    """The reference proxy, installed: its interpreter and version."""

    python: Path
    version: str


def install_reference(directory: Path, timeout: float = INSTALL_TIMEOUT) -> Reference | str:
    """Create a virtual environment in `directory` and pip-install the reference proxy from PyPI into it.

    Uses this interpreter's pip (`pip --python`, pip >= 22.3) to skip bootstrapping pip into the new
    environment, else bootstraps it. Returns the installation, or a one-line reason it is unavailable
    (no network, pip failed, ...).
    """
    python = directory / "bin" / "python"
    options = [
        "install",
        "--disable-pip-version-check",
        "--no-input",
        "-q",
        "--timeout",
        "15",
        "--retries",
        "1",
        REFERENCE_PACKAGE,
    ]
    try:
        venv.EnvBuilder(with_pip=False, clear=True).create(directory)
        done = _pip([sys.executable, "-m", "pip", "--python", str(python), *options], directory, timeout)
        if done.returncode != 0 and "no such option" in done.stderr:
            venv.EnvBuilder(with_pip=True, clear=True).create(directory)
            done = _pip([str(python), "-m", "pip", *options], directory, timeout)
    except (OSError, subprocess.CalledProcessError) as error:
        return f"could not create a virtual environment: {error}"
    except subprocess.TimeoutExpired:
        return f"pip install {REFERENCE_PACKAGE} timed out after {timeout:.0f} s"
    if done.returncode != 0:
        errors = [line for line in done.stderr.strip().splitlines() if not line.startswith("WARNING")]
        return f"pip install {REFERENCE_PACKAGE} failed: {(errors or ['(no output)'])[-1]}"
    version = installed_version(python)
    return (
        Reference(python, version) if version else f"{REFERENCE_PACKAGE} is not importable after pip install"
    )


def _isolated_env() -> dict[str, str]:
    """The environment without PYTHONPATH: this project (also named emailproxy) must stay out of sight."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}


def _pip(command: list[str], directory: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=directory,
        stdin=subprocess.DEVNULL,
        check=False,
        env=_isolated_env(),
    )


def installed_version(python: Path) -> str:
    """The reference's version in a virtual environment, or "" if it is not installed there."""
    query = "import importlib.metadata as m, emailproxy; print(m.version('emailproxy'), emailproxy.__file__)"
    done = subprocess.run(
        [str(python), "-c", query],
        capture_output=True,
        text=True,
        check=False,
        cwd=python.parent,
        env=_isolated_env(),
    )
    version, _, location = done.stdout.strip().partition(" ")
    inside = location.startswith(str(python.parent.parent))
    return version if done.returncode == 0 and inside else ""


class ProxyProcess:
    """One proxy subprocess on its own config file, started and stopped by the benchmark."""

    def __init__(
        self,
        key: str,
        command: list[str],
        directory: Path,
        ca_path: Path,
        sections: dict[str, dict[str, str]],
        ports: dict[str, int],
    ) -> None:
        self.key = key
        self.command = command
        self.directory = directory
        self.ca_path = ca_path
        self.ports = ports
        self.config_path = directory / "emailproxy.config"
        self.output_path = directory / "output.log"
        directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(render_config(sections))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def start(self, timeout: float = 30.0) -> None:
        env = proxy_env(self.ca_path)
        env.pop("PYTHONPATH", None)
        with self.output_path.open("ab") as output:
            self.process = subprocess.Popen(
                [*self.command, "--config-file", str(self.config_path), "--no-gui"],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.directory if self.key == "reference" else REPO,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        pending = set(self.ports.values())
        while pending:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.key} proxy exited with {self.process.returncode}:\n{self.output()}"
                )
            for port in list(pending):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    pending.discard(port)
                except OSError:
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.key} proxy did not listen on {sorted(pending)}:\n{self.output()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait, SIGKILL its process group if needed; returns the exit code."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        return process.returncode

    def restart(self) -> None:
        self.stop()
        self.start()

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")[-4000:] if self.output_path.exists() else ""


def our_command() -> list[str]:
    return [sys.executable, "-m", "emailproxy"]


def reference_command(reference: Reference) -> list[str]:
    return [str(reference.python), "-m", "emailproxy"]
