"""End-to-end hot reload: a running proxy follows edits of its config file (editor-style rename saves) and
SIGHUP; untouched listeners keep their sessions, invalid edits are reported, and user edits survive token
write-back."""

from __future__ import annotations

import configparser
import imaplib
import os
import poplib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import World
from tests.integration.proxy import Proxy, allocate_ports, launch, render_config, wait_for
from tests.integration.world.ports import is_listening

CLIENT_ID = "reload-client"
CLIENT_SECRET = "reload-secret-value"
PASSWORD = "local-password"


def save_like_an_editor(path: Path, text: str) -> None:
    """Write a new file beside the old one and rename it over it (as vim, VS Code, nano -B ... do)."""
    temp = path.with_name(f".{path.name}.swp")
    temp.write_text(text)
    os.replace(temp, path)


def imap_section(world: World) -> dict[str, str]:
    return {"server_address": world.dovecot.ports.host, "server_port": str(world.dovecot.ports.imaps)}


def pop_section(world: World) -> dict[str, str]:
    return {"server_address": world.dovecot.ports.host, "server_port": str(world.dovecot.ports.pop3s)}


def account_sections(world: World) -> dict[str, dict[str, str]]:
    return {
        f"@{world.domain}": {
            "token_url": world.idp.token_url(),
            "oauth2_scope": "https://outlook.office365.com/.default",
            "oauth2_flow": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
        "emailproxy": {"allow_catch_all_accounts": "True"},
    }


@pytest.fixture
def two_imap(world: World, tmp_path: Path) -> Iterator[Proxy]:
    world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
    ports = allocate_ports("A", "B")
    sections = {
        f"IMAP-{ports['A']}": imap_section(world),
        f"IMAP-{ports['B']}": imap_section(world),
        **account_sections(world),
    }
    proxy = launch(world.ca_path, tmp_path, sections, ports)
    yield proxy
    assert proxy.stop() == 0, proxy.output()


def log_count(proxy: Proxy, text: str) -> int:
    return proxy.log().count(text)


def test_edit_rebinds_moved_listener_adds_pop_and_keeps_sessions(world: World, two_imap: Proxy) -> None:
    a, b = two_imap.ports["A"], two_imap.ports["B"]
    moved, pop = allocate_ports("B2", "POP").values()
    user = world.new_user()
    world.dovecot.deliver(
        user, world.dovecot.make_message("a@example.com", user, "kept", "survives a reload")
    )
    session = imaplib.IMAP4("127.0.0.1", a)
    on_b = imaplib.IMAP4("127.0.0.1", b)
    try:
        session.login(user, PASSWORD)
        assert session.select("INBOX") == ("OK", [b"1"])
        on_b.login(user, PASSWORD)

        # the user moves listener B to another port and adds a POP listener; an editor saves by renaming
        text = two_imap.config_path.read_text()
        assert f"[IMAP-{b}]" in text
        text = text.replace(f"[IMAP-{b}]", f"[IMAP-{moved}]")
        text += "\n" + render_config({f"POP-{pop}": pop_section(world)})
        save_like_an_editor(two_imap.config_path, text)

        wait_for(
            lambda: is_listening(moved) and is_listening(pop) and not is_listening(b),
            "the moved and the added listener to listen and the old port to close",
            two_imap,
        )
        assert is_listening(a)

        # the session on A was untouched: it still works
        typ, _ = session.noop()
        assert typ == "OK"
        assert session.select("INBOX") == ("OK", [b"1"])
        typ, data = session.fetch("1", "(BODY[TEXT])")
        assert typ == "OK" and b"survives a reload" in data[0][1]
        # the session on the removed port B carries on until it ends
        assert on_b.noop()[0] == "OK"
        assert on_b.select("INBOX") == ("OK", [b"1"])
    finally:
        session.logout()
        on_b.logout()

    # new logins on A, on the moved listener, and on the new POP listener
    for port in (a, moved):
        with imaplib.IMAP4("127.0.0.1", port) as imap:
            imap.login(user, PASSWORD)
            assert imap.select("INBOX") == ("OK", [b"1"])
    pop_client = poplib.POP3("127.0.0.1", pop, timeout=10)
    try:
        pop_client.user(user)
        pop_client.pass_(PASSWORD)
        assert pop_client.stat()[0] == 1
    finally:
        pop_client.quit()
    log = two_imap.log()
    assert "Reloaded the configuration" in log
    assert f"[IMAP-{b}] removed from the configuration" in log and "1 session(s) continue" in log
    assert "Traceback" not in log


def test_invalid_edit_is_reported_and_sighup_reloads(world: World, two_imap: Proxy) -> None:
    a, b = two_imap.ports["A"], two_imap.ports["B"]
    (pop,) = allocate_ports("POP").values()
    user = world.new_user()
    original = two_imap.config_path.read_text()

    # a duplicate key makes the file invalid: the error is logged and the running listeners stay
    broken = original.replace(f"[IMAP-{a}]\n", f"[IMAP-{a}]\nserver_port = 1\n", 1)
    broken += "\n" + render_config({f"POP-{pop}": pop_section(world)})
    save_like_an_editor(two_imap.config_path, broken)
    wait_for(
        lambda: log_count(two_imap, "keeping the running configuration") >= 1,
        "the invalid file to be reported",
        two_imap,
    )
    assert "server_port" in two_imap.log()
    assert not is_listening(pop) and is_listening(a) and is_listening(b)
    with imaplib.IMAP4("127.0.0.1", a) as imap:
        imap.login(user, PASSWORD)
        assert imap.select("INBOX")[0] == "OK"

    # SIGHUP re-reads even an unchanged file (the watcher would not report the same bytes twice)
    assert two_imap.process is not None
    two_imap.process.send_signal(signal.SIGHUP)
    wait_for(
        lambda: "Configuration reload (SIGHUP) failed" in two_imap.log(),
        "SIGHUP to re-read the invalid file",
        two_imap,
    )

    # the user fixes the file: the watcher applies it
    fixed = original + "\n" + render_config({f"POP-{pop}": pop_section(world)})
    save_like_an_editor(two_imap.config_path, fixed)
    wait_for(lambda: is_listening(pop), "the POP listener of the fixed file", two_imap)
    assert "Configuration changed (file changed)" in two_imap.log()
    assert is_listening(a) and is_listening(b)
    assert "Traceback" not in two_imap.log()


def test_user_edit_during_token_save_survives(world: World, two_imap: Proxy) -> None:
    a = two_imap.ports["A"]
    user = world.new_user()
    world.idp.delay(1.5, path="/token")
    result: dict[str, object] = {}

    def log_in() -> None:
        try:
            with imaplib.IMAP4("127.0.0.1", a) as imap:
                result["login"] = imap.login(user, PASSWORD)[0]
        except Exception as error:  # reported by the assertion below
            result["error"] = error

    client = threading.Thread(target=log_in)
    client.start()
    try:
        # the token request has reached the identity provider, which holds its answer for a moment:
        # the user edits the file now, before the proxy writes the new token into it
        wait_for(
            lambda: len(world.idp.token_requests("client_credentials")) == 1, "the token request", two_imap
        )
        comment = "# added by the user while a token was being fetched and saved"
        text = two_imap.config_path.read_text()
        save_like_an_editor(two_imap.config_path, text.replace("[emailproxy]", f"{comment}\n[emailproxy]"))
    finally:
        client.join(30)
    assert result == {"login": "OK"}

    saved = two_imap.config_path.read_text()
    assert comment in saved
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(saved)
    section = next(name for name in parser.sections() if name.lower() == user.lower())
    assert parser[section].get("access_token") and parser[section].get("token_salt")
    assert parser[f"@{world.domain}"]["client_id"] == CLIENT_ID

    # the proxy's own token write is reloaded quietly: no listener change, no error
    with imaplib.IMAP4("127.0.0.1", a) as imap:
        imap.login(user, PASSWORD)
    assert len(world.idp.token_requests("client_credentials")) == 1  # the saved token is used
    log = two_imap.log()
    assert "keeping the running configuration" not in log and "removed from the configuration" not in log


def test_sighup_applies_a_change_the_watcher_did_not_see(
    world: World, two_imap: Proxy, tmp_path: Path
) -> None:
    (pop,) = allocate_ports("POP").values()
    # write through a hard link in another directory: the directory watch is not told, only SIGHUP helps
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = elsewhere / "same-file.config"
    os.link(two_imap.config_path, link)
    with link.open("a") as handle:
        handle.write("\n" + render_config({f"POP-{pop}": pop_section(world)}))
    assert f"[POP-{pop}]" in two_imap.config_path.read_text()
    assert two_imap.process is not None
    two_imap.process.send_signal(signal.SIGHUP)
    wait_for(lambda: is_listening(pop), "the POP listener after SIGHUP", two_imap)
    log = two_imap.log()
    assert "SIGHUP received" in log and "Configuration changed (SIGHUP)" in log
    assert is_listening(two_imap.ports["A"]) and is_listening(two_imap.ports["B"])
