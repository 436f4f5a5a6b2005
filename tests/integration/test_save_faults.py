"""The real proxy saving tokens into a directory the OS refuses to write: read-only, or on a full file system.

The faults are real: as root (the integration tests always run as root) the directory is made immutable
with ``chattr +i`` (root ignores permissions; a read-only bind mount is the fallback), and "disk full" is a
tiny tmpfs mounted over the configuration directory and filled up. Without root the read-only case uses chmod.
The same faults are injected in process, at the writer's lowest seam, in tests/test_save_faults.py.
"""

from __future__ import annotations

import configparser
import errno
import imaplib
import os
import poplib
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from tests.integration.conftest import World
from tests.integration.proxy import Proxy, allocate_ports, proxy_env

CLIENT_ID = "save-faults-client"
CLIENT_SECRET = "save-faults-secret-8Jd2"
PASSWORD = "local-password-s4ve"
READ_TIMEOUT = 20.0


def user_text(world: World, ports: dict[str, int]) -> str:
    d = world.dovecot.ports
    return (
        "# The user's file: comments and layout must survive every save.\n"
        "[emailproxy]\n"
        "allow_catch_all_accounts = True\n"
        "\n"
        f"[IMAP-{ports['IMAP']}]\n"
        f"server_address = {d.host}\n"
        f"server_port = {d.imaps}\n"
        "\n"
        f"[POP-{ports['POP']}]\n"
        f"server_address = {d.host}\n"
        f"server_port = {d.pop3s}\n"
        "\n"
        "; every mailbox of the test domain\n"
        f"[@{world.domain}]\n"
        f"token_url = {world.idp.token_url()}\n"
        "oauth2_scope = https://outlook.office365.com/.default\n"
        "oauth2_flow = client_credentials\n"
        f"client_id = {CLIENT_ID}\n"
        f"client_secret = {CLIENT_SECRET}\n"
    )


def refuses_writes(directory: Path) -> bool:
    """True when creating a file with some data in ``directory`` fails (what a token save needs)."""
    probe = directory / ".write-probe"
    try:
        probe.write_bytes(b"x" * 8192)
    except OSError:
        return True
    probe.unlink()
    return False


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), capture_output=True, text=True, check=False)


@contextmanager
def read_only(directory: Path, config: Path) -> Iterator[str]:
    """Make ``directory`` refuse new files; yields the errno text a save then fails with."""
    if os.geteuid() != 0:
        directory.chmod(0o500)
        config.chmod(0o400)
        try:
            yield os.strerror(errno.EACCES)
        finally:
            config.chmod(0o600)
            directory.chmod(0o700)
        return
    tried: list[str] = []
    chattr = shutil.which("chattr")
    if chattr is not None:
        result = run(chattr, "+i", str(config), str(directory))
        if result.returncode == 0 and refuses_writes(directory):
            try:
                yield os.strerror(errno.EPERM)
            finally:
                run(chattr, "-i", str(directory), str(config))
            return
        run(chattr, "-i", str(directory), str(config))
        tried.append(f"chattr +i: {result.stderr.strip() or 'had no effect'}")
    bind = run("mount", "--bind", str(directory), str(directory))
    if bind.returncode == 0:
        remount = run("mount", "-o", "remount,ro,bind", str(directory))
        if remount.returncode == 0 and refuses_writes(directory):
            try:
                yield os.strerror(errno.EROFS)
            finally:
                run("umount", str(directory))
            return
        run("umount", str(directory))
        tried.append(f"read-only bind mount: {remount.stderr.strip() or 'had no effect'}")
    else:
        tried.append(f"bind mount: {bind.stderr.strip()}")
    pytest.fail("no way to make a directory read-only for root here: " + "; ".join(tried))


@contextmanager
def small_file_system(directory: Path) -> Iterator[None]:
    """Mount a 256 KiB tmpfs over ``directory`` (empty afterwards) for the duration."""
    mounted = run("mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(directory))
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs for the disk-full test: {mounted.stderr.strip()}")
    try:
        yield
    finally:
        if run("umount", str(directory)).returncode != 0:
            run("umount", "-l", str(directory))


@contextmanager
def full(directory: Path) -> Iterator[str]:
    """Fill the file system of ``directory``; yields the errno text a save then fails with."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as error:
        assert error.errno == errno.ENOSPC, error
    finally:
        os.close(fd)
    assert refuses_writes(directory)
    try:
        yield os.strerror(errno.ENOSPC)
    finally:
        filler.unlink()


def imap_login(port: int, user: str) -> None:
    with imaplib.IMAP4("127.0.0.1", port, timeout=READ_TIMEOUT) as imap:
        assert imap.login(user, PASSWORD)[0] == "OK"
        assert imap.select("INBOX")[0] == "OK"


def pop_login(port: int, user: str) -> None:
    pop = poplib.POP3("127.0.0.1", port, timeout=READ_TIMEOUT)
    try:
        pop.user(user)
        assert pop.pass_(PASSWORD).startswith(b"+OK")
        assert pop.stat() == (0, 0)
    finally:
        pop.quit()


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def wait_for_log(proxy: Proxy, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in proxy.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    return proxy.log()


def sections_with_tokens(config: Path) -> set[str]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(config.read_text())
    return {name for name in parser.sections() if parser.has_option(name, "access_token")}


@pytest.mark.parametrize("fault", ["read-only", "disk-full"])
def test_a_token_save_the_os_refuses(world: World, tmp_path: Path, fault: str) -> None:
    world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
    ports = allocate_ports("IMAP", "POP")
    conf = tmp_path / "conf"
    conf.mkdir(mode=0o700)
    codes: list[int] = []
    user_a, user_b = world.new_user("save-a"), world.new_user("save-b")
    with ExitStack() as stack:
        if fault == "disk-full":
            stack.enter_context(small_file_system(conf))
        config = conf / "emailproxy.config"
        text = user_text(world, ports)
        config.write_text(text)
        config.chmod(0o600)
        proxy = Proxy(config, tmp_path / "proxy.log", ports, proxy_env(world.ca_path))
        stack.callback(lambda: codes.append(proxy.stop()))
        proxy.start()

        with read_only(conf, config) if fault == "read-only" else full(conf) as errno_text:
            imap_login(proxy.ports["IMAP"], user_a)  # the login succeeds although the save fails
            log = wait_for_log(proxy, f"Could not save the cached tokens of account {user_a}")
            line = next(
                (
                    ln
                    for ln in log.splitlines()
                    if f"Could not save the cached tokens of account {user_a}" in ln
                ),
                "",
            )
            assert errno_text in line and os.path.realpath(config) in line, line or log
            assert config.read_text() == text and temp_files(conf) == []
            # the next login of the account is served from memory: no token request
            pop_login(proxy.ports["POP"], user_a)
            assert len(world.idp.token_requests()) == 1
        checks = [check for check in world.idp.check_log if check.user == user_a]
        assert len(checks) == 2 and all(check.ok for check in checks), checks

        # writable again: the next save (user_b's) writes user_a's kept tokens too
        imap_login(proxy.ports["IMAP"], user_b)
        assert sections_with_tokens(config) == {user_a, user_b}, config.read_text()
        assert config.read_text().startswith(text)
        assert temp_files(conf) == []
        codes.append(proxy.stop())

        # nothing lost: a new proxy opens both accounts' tokens from the file, without the identity provider
        again = Proxy(config, tmp_path / "proxy-again.log", ports, proxy_env(world.ca_path))
        stack.callback(lambda: codes.append(again.stop()))
        again.start()
        imap_login(again.ports["IMAP"], user_a)
        pop_login(again.ports["POP"], user_b)
        assert len(world.idp.token_requests()) == 2
    assert codes == [0] * len(codes), proxy.output() + again.output()
    assert "Traceback" not in proxy.output() + again.output()
