"""First use locked down: a client-credentials account whose local password is bound in advance with
`emailproxy set-password` (local_password_hash). A wrong first password is refused before the identity
provider hears anything; the right one logs in to Dovecot; a changed hash applies to a running proxy."""

from __future__ import annotations

import configparser
import imaplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import World
from tests.integration.proxy import (
    Proxy,
    allocate_ports,
    launch,
    proxy_env,
    record_command,
    render_config,
    wait_for,
)

CLIENT_ID = "first-use-client"
CLIENT_SECRET = "first-use-client-secret-value"
SCOPE = "https://outlook.office365.com/.default"
BOUND = "bound-local-password-7f3a"
OTHER = "someone-elses-guess-91c2"
READ_TIMEOUT = 20


def set_password(world: World, config: Path, account: str, password: str) -> subprocess.CompletedProcess[str]:
    """`emailproxy set-password` as an administrator runs it."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "emailproxy",
            "set-password",
            account,
            "--config-file",
            str(config),
            "--password-stdin",
        ],
        input=password + "\n",
        capture_output=True,
        text=True,
        env=proxy_env(world.ca_path),
        timeout=60,
        check=False,
    )
    record_command(done.args, done.stdout, done.stderr)  # scanned for secrets at the end of the session
    assert done.returncode == 0, done.stdout + done.stderr
    assert password not in done.stdout + done.stderr
    return done


def imap_login(port: int, user: str, password: str) -> tuple[bool, str]:
    """(logged in, the server's text) after LOGIN, then SELECT INBOX when it worked."""
    with imaplib.IMAP4("127.0.0.1", port, timeout=READ_TIMEOUT) as imap:
        try:
            imap.login(user, password)
        except imaplib.IMAP4.error as error:
            return False, str(error)
        typ, data = imap.select("INBOX")
        assert typ == "OK", data
        return True, data[0].decode() if data and data[0] else ""


def sections(world: World, port: int, account: str) -> dict[str, dict[str, str]]:
    d = world.dovecot.ports
    return {
        "emailproxy": {"allow_catch_all_accounts": "True"},
        f"IMAP-{port}": {"server_address": d.host, "server_port": str(d.imaps)},
        account: {
            "token_url": world.idp.token_url(),
            "oauth2_scope": SCOPE,
            "oauth2_flow": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
    }


def cached_keys(config: Path, section: str) -> set[str]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(config)
    if not parser.has_section(section):
        return set()
    return {key for key in ("access_token", "token_salt", "refresh_token") if parser.has_option(section, key)}


@pytest.fixture
def bound_proxy(world: World, tmp_path: Path) -> Iterator[tuple[Proxy, str]]:
    """A proxy whose [user] section holds a hash of BOUND, set before the proxy ever ran."""
    world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
    user = world.new_user("firstuse")
    ports = allocate_ports("IMAP")
    config = tmp_path / "emailproxy.config"
    config.write_text(render_config(sections(world, ports["IMAP"], user)))
    set_password(world, config, user, BOUND)
    proxy = launch(world.ca_path, tmp_path, {}, ports, config_text=config.read_text())
    yield proxy, user
    assert proxy.stop() == 0, proxy.output()


def test_wrong_first_password_is_refused_and_the_idp_sees_nothing(
    world: World, bound_proxy: tuple[Proxy, str]
) -> None:
    proxy, user = bound_proxy
    world.dovecot.deliver(user, world.dovecot.make_message("a@example.com", user, "hi", "bound body"))
    for guess in (OTHER, BOUND.upper(), BOUND + " "):
        ok, text = imap_login(proxy.ports["IMAP"], user, guess)
        assert not ok
        assert f"the password for account {user} is incorrect" in text
    assert world.idp.token_requests() == []  # no token request at all, not even a failed one
    assert cached_keys(proxy.config_path, user) == set()  # nothing was written either
    assert "does not match the account's local_password_hash" in proxy.log()
    assert not [check for check in world.idp.check_log if check.user == user]  # Dovecot saw no login

    ok, exists = imap_login(proxy.ports["IMAP"], user, BOUND)
    assert ok and exists == "1"
    assert len(world.idp.token_requests("client_credentials")) == 1
    assert [check.ok for check in world.idp.check_log if check.user == user] == [True]
    wait_for(lambda: "access_token" in cached_keys(proxy.config_path, user), "the token to be saved", proxy)

    # afterwards: the right password uses the cached token, a wrong one is still refused, nothing deleted
    assert imap_login(proxy.ports["IMAP"], user, BOUND)[0]
    assert not imap_login(proxy.ports["IMAP"], user, OTHER)[0]
    assert len(world.idp.token_requests()) == 1
    assert "access_token" in cached_keys(proxy.config_path, user)


def test_changed_hash_applies_to_the_running_proxy(world: World, bound_proxy: tuple[Proxy, str]) -> None:
    proxy, user = bound_proxy
    port = proxy.ports["IMAP"]
    assert imap_login(port, user, BOUND)[0]
    assert len(world.idp.token_requests("client_credentials")) == 1
    wait_for(lambda: "access_token" in cached_keys(proxy.config_path, user), "the token to be saved", proxy)
    reloads = proxy.log().count("Reloaded the configuration")

    done = set_password(world, proxy.config_path, user, OTHER)
    # the cached tokens were encrypted with BOUND: the command says they will be replaced
    assert "were encrypted with a different password" in done.stdout
    wait_for(lambda: proxy.log().count("Reloaded the configuration") > reloads, "the reload", proxy)

    ok, text = imap_login(port, user, BOUND)  # the old password no longer logs in
    assert not ok and "is incorrect" in text
    assert len(world.idp.token_requests()) == 1
    assert imap_login(port, user, OTHER)[0]  # the new one does: the stale tokens are replaced
    assert len(world.idp.token_requests("client_credentials")) == 2
    assert imap_login(port, user, OTHER)[0]  # and the replacement is cached under the new password
    assert len(world.idp.token_requests()) == 2

    reloads = proxy.log().count("Reloaded the configuration")
    removed = subprocess.run(
        [
            sys.executable,
            "-m",
            "emailproxy",
            "set-password",
            user,
            "--config-file",
            str(proxy.config_path),
            "--remove",
        ],
        capture_output=True,
        text=True,
        env=proxy_env(world.ca_path),
        timeout=60,
        check=False,
    )
    assert removed.returncode == 0, removed.stderr
    wait_for(lambda: proxy.log().count("Reloaded the configuration") > reloads, "the second reload", proxy)
    assert "local_password_hash" not in proxy.config_path.read_text()
    # without a hash the cached tokens decide again: their password works, others are refused
    assert imap_login(port, user, OTHER)[0]
    assert not imap_login(port, user, BOUND)[0]
    assert len(world.idp.token_requests()) == 2


def test_catch_all_hash_guards_every_new_mailbox(world: World, tmp_path: Path) -> None:
    world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
    ports = allocate_ports("IMAP")
    proxy = launch(world.ca_path, tmp_path, sections(world, ports["IMAP"], f"@{world.domain}"), ports)
    try:
        set_password(world, proxy.config_path, f"@{world.domain}", BOUND)
        wait_for(lambda: "Reloaded the configuration" in proxy.log(), "the reload", proxy)
        first, second = world.new_user("catchall"), world.new_user("catchall")
        for user in (first, second):
            assert not imap_login(ports["IMAP"], user, OTHER)[0]
        assert world.idp.token_requests() == []
        for user in (first, second):
            assert imap_login(ports["IMAP"], user, BOUND)[0]
        assert len(world.idp.token_requests("client_credentials")) == 2
    finally:
        assert proxy.stop() == 0, proxy.output()
