"""Token saves under faults, in process: the disk refusing a write, and the process killed during saves.

The OS-level versions (a read-only directory, a full file system) run against the real proxy in
tests/integration/test_save_faults.py; here the fault is injected at the lowest seam of the writer
(``tempfile.mkstemp`` for a read-only file system, ``os.fsync`` for a full disk), so these tests run anywhere.
The SIGKILL test really kills a writer process, 100 times, at random moments.
"""

from __future__ import annotations

import asyncio
import configparser
import errno
import functools
import logging
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from emailproxy import configwrite
from emailproxy.config import load_config
from emailproxy.configwrite import ConfigFileStore
from emailproxy.oauth.crypto import KeyCache, derive_key
from emailproxy.oauth.tokens import TokenManager
from emailproxy.protocols.events import TokenOk
from emailproxy.secret import Secret

PASSWORD = "local-password-s4ve"
USER_TEXT = textwrap.dedent(
    """\
    # My mail proxy. Comments, order and spacing are mine; the proxy adds only its token keys.
    [emailproxy]
    allow_catch_all_accounts = True

    [IMAP-11993]
    server_address = outlook.office365.com
    server_port = 993

    ; accounts of example.com
    [@example.com]
    token_url = https://idp.invalid/tenant/oauth2/v2.0/token
    oauth2_scope = https://outlook.office365.com/.default
    oauth2_flow = client_credentials
    client_id = app-1
    client_secret = app-secret
    """
)


class FakeEndpoint:
    """Hands out numbered access tokens and records each request."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []

    def post(self, url: str, form: Mapping[str, str]) -> dict[str, Any]:
        self.requests.append(dict(form))
        return {"access_token": f"at-{len(self.requests)}", "expires_in": 3600}


@functools.cache
def _derive(password: str, salt: bytes, iterations: int) -> bytes:
    return derive_key(password, salt, iterations)


def new_manager(path: Path, clock: Callable[[], float] = time.time) -> tuple[TokenManager, FakeEndpoint]:
    endpoint = FakeEndpoint()
    store = ConfigFileStore(path)
    manager = TokenManager(load_config(path), store, endpoint, clock, key_cache=KeyCache(derive=_derive))
    return manager, endpoint


async def token(manager: TokenManager, user: str) -> str:
    result = await manager.get_token(user, Secret(PASSWORD))
    assert isinstance(result, TokenOk), result
    return result.access_token.reveal()


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def read_only_fs(*_args: Any, **_kwargs: Any) -> tuple[int, str]:
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))


def disk_full(_fd: int) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


FAULTS: dict[str, tuple[str, Callable[..., Any], str]] = {
    # (what to replace, the replacement, the errno text the log must show)
    "read-only": ("mkstemp", read_only_fs, os.strerror(errno.EROFS)),
    "disk-full": ("fsync", disk_full, os.strerror(errno.ENOSPC)),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_failed_save_keeps_tokens_in_memory_and_the_next_save_writes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    path = tmp_path / "emailproxy.config"
    path.write_text(USER_TEXT)
    target, replacement, errno_text = FAULTS[fault]
    manager, endpoint = new_manager(path)

    async def scenario() -> dict[str, str]:
        tokens: dict[str, str] = {}
        with monkeypatch.context() as patch:
            if target == "mkstemp":
                patch.setattr(tempfile, "mkstemp", replacement)
            else:
                patch.setattr(os, "fsync", replacement)
            with caplog.at_level(logging.ERROR, logger="emailproxy.tokens"):
                tokens["a@example.com"] = await token(manager, "a@example.com")  # the login still works
                tokens["b@example.com"] = await token(manager, "b@example.com")
            assert path.read_text() == USER_TEXT  # nothing written, nothing damaged
            assert temp_files(tmp_path) == []
            # served from memory: no new token request while the disk still refuses
            assert await token(manager, "a@example.com") == tokens["a@example.com"]
            assert len(endpoint.requests) == 2
        # the disk works again: the next save (another account's) also writes what was kept in memory
        tokens["c@example.com"] = await token(manager, "c@example.com")
        return tokens

    tokens = asyncio.run(scenario())
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2, errors
    for user, message in zip(("a@example.com", "b@example.com"), errors, strict=True):
        assert f"Could not save the cached tokens of account {user}" in message
        assert errno_text in message and str(path) in message, message
        assert "at-" not in message  # no token in the log

    text = path.read_text()
    assert text.startswith(USER_TEXT), text  # the user's bytes are all still there, unchanged
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(text)
    for user in tokens:
        assert parser.has_option(user, "access_token") and parser.has_option(user, "token_salt"), text
    assert temp_files(tmp_path) == []

    # nothing lost: a new process (new manager, fresh load) opens every token without asking the IdP
    again, endpoint_again = new_manager(path)

    async def reopen() -> dict[str, str]:
        return {user: await token(again, user) for user in tokens}

    assert asyncio.run(reopen()) == tokens
    assert endpoint_again.requests == []


def test_a_save_that_fails_again_keeps_everything_for_the_next_try(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two failed saves of one account (a token, then a newer one) are merged: the later values win."""
    path = tmp_path / "emailproxy.config"
    path.write_text(USER_TEXT)
    now = [time.time()]
    manager, endpoint = new_manager(path, lambda: now[0])

    async def scenario() -> str:
        with monkeypatch.context() as patch:
            patch.setattr(os, "fsync", disk_full)
            await token(manager, "a@example.com")
            now[0] += 3600  # the token (kept only in memory) has expired: a new one, also unsaved
            second = await token(manager, "a@example.com")
        assert len(endpoint.requests) == 2
        await token(manager, "z@example.com")  # a working save for another account flushes a@
        return second

    second = asyncio.run(scenario())
    again, endpoint_again = new_manager(path)
    assert asyncio.run(token(again, "a@example.com")) == second == "at-2"
    assert endpoint_again.requests == []


# ------------------------------------------------------------------------------------------ SIGKILL

SECTION = "user@example.com"
KILL_CONFIG = textwrap.dedent(
    """\
    # written by the user; every byte outside the token keys must survive
    [emailproxy]
    delete_account_token_on_password_error = False

    [IMAP-11993]
    server_address = outlook.office365.com
    server_port = 993
    ; a comment between sections

    [user@example.com]
    token_url = https://idp.invalid/tenant/oauth2/v2.0/token
    oauth2_scope = https://outlook.office365.com/IMAP.AccessAsUser.All
        offline_access
    oauth2_flow = password
    client_id = app-1

    [other@example.com]
    client_id = app-2
    """
)
TOKEN_KEYS = ("token_salt", "token_iterations", "access_token", "access_token_expiry", "refresh_token")

GENERATION_SOURCE = """
def generation_values(number):
    # the token keys a writer saves as generation `number`; sizes vary so a torn write shows
    size = 500 + (number * 7919) % 20000
    return {
        "token_salt": f"salt-{number}",
        "token_iterations": str(1_000_000 + number),
        "access_token": f"gen{number}-" + "A" * size + f"-end{number}",
        "access_token_expiry": str(number),
        "refresh_token": f"gen{number}-" + "R" * (size // 2) + f"-end{number}",
    }
"""
WRITER = (
    GENERATION_SOURCE
    + """
import sys
from emailproxy.configwrite import ConfigFileStore

store = ConfigFileStore(sys.argv[1])
number = int(sys.argv[2])
print("ready", flush=True)
while True:
    number += 1
    store.save(sys.argv[3], generation_values(number))
    print(number, flush=True)
"""
)
_namespace: dict[str, Any] = {}
exec(GENERATION_SOURCE, _namespace)  # the same function the writer runs
generation_values: Callable[[int], dict[str, str]] = _namespace["generation_values"]


def user_view(parser: configparser.ConfigParser) -> dict[str, dict[str, str]]:
    return {
        name: {k: v for k, v in parser[name].items() if k not in TOKEN_KEYS} for name in parser.sections()
    }


def generation_in(text: str) -> int:
    """The single generation the file's token keys come from; fails on a torn or mixed file."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(text)
    values = {key: parser.get(SECTION, key, fallback=None) for key in TOKEN_KEYS}
    if all(value is None for value in values.values()):
        return 0
    number = int(values["access_token_expiry"] or "-1")
    assert values == generation_values(number), f"mixed or torn token keys (generation {number})"
    return number


def test_sigkill_during_saves_never_damages_the_file(tmp_path: Path) -> None:
    directory = tmp_path / "conf"
    directory.mkdir()
    path = directory / "emailproxy.config"
    path.write_text(KILL_CONFIG)
    expected = configparser.ConfigParser(interpolation=None)
    expected.read_string(KILL_CONFIG)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    rng = random.Random(5150)
    outcomes = {"old": 0, "new": 0}
    most_temps = 0
    for _ in range(100):
        start = generation_in(path.read_text())
        writer = subprocess.Popen(
            [sys.executable, "-S", str(script), str(path), str(start), SECTION],  # -S: starts faster
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            assert writer.stdout is not None
            assert writer.stdout.readline() == b"ready\n", writer.stderr.read() if writer.stderr else ""
            time.sleep(rng.uniform(0, 0.05))  # a random moment in the save loop
            writer.send_signal(signal.SIGKILL)
        finally:
            writer.kill()
            out, err = writer.communicate()
        assert writer.returncode == -signal.SIGKILL, err.decode()
        finished = [int(line) for line in out.split()] or [start]
        text = path.read_text()
        parser = configparser.ConfigParser(interpolation=None)
        parser.read_string(text)  # always parses
        assert user_view(parser) == user_view(expected)  # every section and key the user wrote
        assert text.startswith(KILL_CONFIG.split("[user@example.com]")[0])  # comments and layout kept
        number = generation_in(text)  # never torn, never mixed
        # the last save that returned, or the one after it (killed between the rename and the print)
        assert number in (finished[-1], finished[-1] + 1), (number, finished[-1])
        outcomes["new" if number == finished[-1] + 1 else "old"] += 1
        most_temps = max(most_temps, len(temp_files(directory)))
    assert generation_in(path.read_text()) > 100, "the writers hardly saved anything"
    print(f"\nSIGKILL x100: {outcomes}, temporary files left behind: {most_temps}")

    # the killed saves' temporary files do not pile up: the next save removes those old enough
    leftovers = temp_files(directory)
    fresh_name = f".{path.name}.abcd1234.tmp"
    (directory / fresh_name).write_text("a save in progress elsewhere")
    keep = [".emailproxy.config.backup.tmp", "emailproxy.config.tmp", fresh_name]
    for name in keep[:2]:
        (directory / name).write_text("not ours")
    old = time.time() - configwrite.STALE_TEMP_SECONDS - 60
    for name in [*leftovers, *keep[:2]]:
        os.utime(directory / name, (old, old))
    stale_fake = directory / f".{path.name}.zz_99xyz.tmp"
    stale_fake.write_text("left by a killed save")
    os.utime(stale_fake, (old, old))
    ConfigFileStore(path).save(SECTION, generation_values(10**6))
    assert temp_files(directory) == sorted(keep)
    assert generation_in(path.read_text()) == 10**6


def test_a_killed_save_leaves_no_trace_in_the_result_of_the_next(tmp_path: Path) -> None:
    """A temporary file a killed save left (same prefix, random part) never ends up as the config."""
    path = tmp_path / "emailproxy.config"
    path.write_text(KILL_CONFIG)
    fd, leftover = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=tmp_path)
    os.write(fd, b"[user@example.com]\naccess_token = half-writ")
    os.close(fd)
    ConfigFileStore(path).save(SECTION, generation_values(7))
    assert generation_in(path.read_text()) == 7
    assert Path(leftover).exists()  # young: it could belong to a save still running
    assert re.fullmatch(r"\.emailproxy\.config\.[a-z0-9_]{8}\.tmp", Path(leftover).name)
