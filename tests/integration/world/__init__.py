"""The integration-test world: a test CA, a fake OAuth 2.0 identity provider, and private Dovecot and Postfix.

Modules: `ca` (certificates), `idp` (IdentityProvider), `dovecot` (Dovecot), `postfix` (Postfix),
`ports` (free loopback ports), `checkpassword` (the program Dovecot runs to check tokens).
This module holds what they share: the error type and how to find the mail server programs.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

APT_PACKAGES = (
    "dovecot-imapd dovecot-pop3d dovecot-lmtpd postfix swaks curl openssl libsasl2-modules ca-certificates"
)
INSTALL_HINT = (
    "install the mail servers first, as root: run the apt-get step of .ci/run "
    f"(DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {APT_PACKAGES})"
)
_SYSTEM_DIRS = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


class WorldError(RuntimeError):
    """The test world could not be built or started."""


def find_program(name: str) -> str:
    """Absolute path of a program (also looking in sbin directories), or a WorldError naming the fix."""
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SYSTEM_DIRS))
    if found is None:
        raise WorldError(f"{name!r} was not found; {INSTALL_HINT}")
    return found


def require_root(what: str) -> None:
    """The private mail servers need root (Postfix's master and Dovecot's privilege separation)."""
    if os.geteuid() != 0:
        raise WorldError(f"{what} must be started as root (the integration tests run as root in CI)")


def require_traversable(path: Path, user: str) -> None:
    """Fail clearly when `user` cannot reach `path` (the mail servers drop root; mkdtemp makes 0700 dirs)."""
    account = pwd.getpwnam(user)
    for directory in [path, *path.parents]:
        if not directory.exists():
            continue
        info = directory.stat()
        if info.st_uid == account.pw_uid:
            allowed = bool(info.st_mode & stat.S_IXUSR)
        elif info.st_gid == account.pw_gid:
            allowed = bool(info.st_mode & stat.S_IXGRP)
        else:
            allowed = bool(info.st_mode & stat.S_IXOTH)
        if not allowed:
            raise WorldError(
                f"user {user!r} cannot traverse {directory} (mode {stat.filemode(info.st_mode)}); "
                "create the world under a directory that others may enter (e.g. chmod 0755)"
            )


def log_tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def group_members(pgid: int) -> list[int]:
    """PIDs of live processes in process group `pgid` (from /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        # after "pid (comm)": state ppid pgrp ...; zombies count as gone
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def end_process_group(
    process: subprocess.Popen[bytes],
    stop_command: list[str] | None = None,
    other_groups: tuple[int, ...] = (),
    timeout: float = 10,
) -> None:
    """Stop a daemon we started with `start_new_session=True`.

    Run its stop command (or send SIGTERM to the process), wait, then SIGKILL whatever is still in its
    process group or in `other_groups` (groups its own children created, like Postfix's master). Only those
    groups: the processes this test run started.
    """
    if process.poll() is None:
        if stop_command is None:
            process.terminate()
        else:
            subprocess.run(
                stop_command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=30,
                check=False,
            )
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    for group in (process.pid, *other_groups):
        deadline = time.monotonic() + (timeout if process.poll() is not None else 0)
        while group_members(group) and time.monotonic() < deadline:
            time.sleep(0.05)
        if group_members(group) or (group == process.pid and process.poll() is None):
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    process.wait(timeout=timeout)
