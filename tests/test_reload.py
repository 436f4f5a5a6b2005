"""Hot reload: listener reconciliation decisions, the reloader (change detection, invalid files, own token
writes) and ProxyServer.apply on real sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest

from emailproxy.config import Config, Protocol, ServerConfig, load_config
from emailproxy.configwrite import ConfigFileStore
from emailproxy.protocols.events import TokenFailure, TokenResult
from emailproxy.reload import (
    ConfigReloader,
    ListenerPlan,
    ReloadOutcome,
    needs_rebind,
    plan_listeners,
    poll_changes,
    same_settings,
    watchfiles_changes,
)
from emailproxy.secret import Secret
from emailproxy.server import ProxyServer


def server(section: str, **changes: Any) -> ServerConfig:
    protocol, port = section.split("-")
    base = ServerConfig(
        section=section,
        protocol=cast(Protocol, protocol),
        local_port=int(port),
        local_address="127.0.0.1",
        server_address="imap.example.com",
        server_port=993,
    )
    return dataclasses.replace(base, **changes)


# ------------------------------------------------------------------------------------------------- plan


def test_plan_sorts_listeners_into_unchanged_removed_added_changed() -> None:
    a, b, c = server("IMAP-2001"), server("IMAP-2002"), server("SMTP-2003", server_port=587)
    b_changed = server("IMAP-2002", server_address="other.example.com")
    d = server("POP-2004", server_port=995)
    plan = plan_listeners([a, b, c], [a, b_changed, d])
    assert plan.unchanged == (a,)
    assert plan.changed == ((b, b_changed),)
    assert plan.removed == (c,)
    assert plan.added == (d,)
    assert not plan.empty
    assert plan.describe() == "added: POP-2004; changed: IMAP-2002; removed: SMTP-2003"


def test_plan_for_identical_configs_is_empty() -> None:
    servers = [server("IMAP-2001"), server("POP-2002", server_port=995)]
    plan = plan_listeners(servers, list(servers))
    assert plan.empty and plan.unchanged == tuple(servers)
    assert plan.describe() == "listeners unchanged"
    assert ListenerPlan().empty


def test_a_changed_port_is_a_removal_and_an_addition() -> None:
    # the section name holds the port, so "moving" a listener removes one section and adds another
    plan = plan_listeners([server("IMAP-2001")], [server("IMAP-2005")])
    assert [s.section for s in plan.removed] == ["IMAP-2001"]
    assert [s.section for s in plan.added] == ["IMAP-2005"]
    assert plan.changed == ()


@pytest.mark.parametrize(
    ("change", "rebind"),
    [
        ({"server_address": "new.example.com"}, False),
        ({"server_port": 143, "server_starttls": True}, False),
        ({"local_address": "127.0.0.2"}, True),
        ({"local_certificate_path": "/c.pem", "local_key_path": "/k.pem"}, True),
        ({"local_starttls": True}, True),
    ],
)
def test_only_socket_settings_need_a_rebind(change: dict[str, Any], rebind: bool) -> None:
    old = server("IMAP-2001")
    assert needs_rebind(old, dataclasses.replace(old, **change)) is rebind


# ------------------------------------------------------------------------------------------- configs


def config_text(*sections: str, account: str = "client_id = abc", extra: str = "") -> str:
    text = ""
    for section in sections:
        protocol = section.split("-")[0]
        text += f"[{section}]\nserver_address = {protocol.lower()}.example.com\nserver_port = 993\n\n"
    return text + f"[user@example.com]\ntoken_url = https://idp.example.com/token\n{account}\n{extra}"


def write_atomically(path: Path, text: str) -> None:
    """Save as an editor does: write a new file next to it and rename it over the old one."""
    temp = path.with_name(path.name + ".swp")
    temp.write_text(text)
    os.replace(temp, path)


def test_same_settings_ignores_cached_tokens_only(tmp_path: Path) -> None:
    path = tmp_path / "emailproxy.config"
    path.write_text(config_text("IMAP-2001"))
    before = load_config(path)
    ConfigFileStore(path).save("user@example.com", {"access_token": "encrypted", "token_salt": "c2FsdA=="})
    ConfigFileStore(path).save("new@example.com", {"access_token": "x"})  # a section with cache keys only
    assert same_settings(before, load_config(path))
    write_atomically(path, path.read_text().replace("client_id = abc", "client_id = other"))
    assert not same_settings(before, load_config(path))
    write_atomically(path, config_text("IMAP-2002"))
    assert not same_settings(before, load_config(path))


# ------------------------------------------------------------------------------------------- reloader


class Recorder:
    def __init__(self) -> None:
        self.applied: list[Config] = []

    async def __call__(self, config: Config) -> None:
        self.applied.append(config)


def make_reloader(tmp_path: Path, text: str, **kwargs: Any) -> tuple[Path, ConfigReloader, Recorder]:
    path = tmp_path / "emailproxy.config"
    path.write_text(text)
    recorder = Recorder()
    return path, ConfigReloader(path, load_config(path), recorder, **kwargs), recorder


def test_reload_applies_a_valid_change_and_skips_identical_bytes(tmp_path: Path) -> None:
    path, reloader, recorder = make_reloader(tmp_path, config_text("IMAP-2001"))

    async def scenario() -> list[ReloadOutcome]:
        write_atomically(path, config_text("IMAP-2001", "POP-2002"))
        first = await reloader.reload()
        second = await reloader.reload()  # same bytes: nothing to do
        forced = await reloader.reload(force=True)  # SIGHUP: always re-read
        return [first, second, forced]

    assert asyncio.run(scenario()) == [ReloadOutcome.APPLIED, ReloadOutcome.UNCHANGED, ReloadOutcome.APPLIED]
    assert [s.section for s in recorder.applied[0].servers] == ["IMAP-2001", "POP-2002"]
    assert reloader.current is recorder.applied[-1]
    assert reloader.reloads == 2


def test_invalid_file_is_logged_and_the_running_config_stays(tmp_path: Path, caplog: Any) -> None:
    path, reloader, recorder = make_reloader(tmp_path, config_text("IMAP-2001"))
    running = reloader.current
    write_atomically(path, config_text("IMAP-2001", extra="client_id = duplicate\n"))
    with caplog.at_level(logging.ERROR, logger="emailproxy.reload"):
        outcome = asyncio.run(reloader.reload())
    assert outcome is ReloadOutcome.INVALID
    assert recorder.applied == [] and reloader.current is running
    assert "keeping the running configuration" in caplog.text and "client_id" in caplog.text
    # fixing the file applies it
    write_atomically(path, config_text("IMAP-2001", account="client_id = fixed"))
    assert asyncio.run(reloader.reload()) is ReloadOutcome.APPLIED
    account = recorder.applied[-1].find_account("user@example.com")
    assert account is not None and account.client_id == "fixed"


def test_missing_file_keeps_the_running_config(tmp_path: Path, caplog: Any) -> None:
    path, reloader, recorder = make_reloader(tmp_path, config_text("IMAP-2001"))
    path.unlink()
    with caplog.at_level(logging.DEBUG, logger="emailproxy.reload"):
        assert asyncio.run(reloader.reload()) is ReloadOutcome.MISSING  # e.g. between an editor's steps
        assert asyncio.run(reloader.reload(force=True)) is ReloadOutcome.MISSING
    assert recorder.applied == []
    assert [r.levelno for r in caplog.records if "cannot read" in r.message] == [logging.DEBUG, logging.ERROR]


def test_own_token_write_is_applied_quietly(tmp_path: Path, caplog: Any) -> None:
    path, reloader, recorder = make_reloader(tmp_path, config_text("IMAP-2001"))
    ConfigFileStore(path).save("user@example.com", {"access_token": "encrypted-value"})
    with caplog.at_level(logging.DEBUG, logger="emailproxy.reload"):
        assert asyncio.run(reloader.reload()) is ReloadOutcome.APPLIED
    account = recorder.applied[-1].find_account("user@example.com")
    assert account is not None and account.cached.access_token == "encrypted-value"
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]


def test_user_edit_between_token_saves_is_kept_and_reloaded(tmp_path: Path) -> None:
    path, reloader, recorder = make_reloader(tmp_path, config_text("IMAP-2001"))
    store = ConfigFileStore(path)
    store.save("user@example.com", {"access_token": "first"})
    edited = path.read_text().replace("[user@example.com]", "# the user's note\n[user@example.com]")
    write_atomically(path, edited.replace("client_id = abc", "client_id = edited"))
    store.save("user@example.com", {"access_token": "second"})
    text = path.read_text()
    assert "# the user's note" in text and "client_id = edited" in text and "access_token = second" in text
    assert asyncio.run(reloader.reload()) is ReloadOutcome.APPLIED
    account = recorder.applied[-1].find_account("user@example.com")
    assert account is not None and account.client_id == "edited" and account.cached.access_token == "second"


def test_cache_store_changes_are_reloaded(tmp_path: Path) -> None:
    cache = tmp_path / "tokens.cache"
    path = tmp_path / "emailproxy.config"
    path.write_text(config_text("IMAP-2001"))
    recorder = Recorder()
    reloader = ConfigReloader(path, load_config(path, cache), recorder, cache_store=cache)
    assert reloader.files == [path, cache]
    ConfigFileStore(cache).save("user@example.com", {"access_token": "from-another-proxy"})
    assert asyncio.run(reloader.reload()) is ReloadOutcome.APPLIED
    account = recorder.applied[-1].find_account("user@example.com")
    assert account is not None and account.cached.access_token == "from-another-proxy"


# ------------------------------------------------------------------------------------------- watchers


async def first_event(
    watcher: Callable[[asyncio.Event], Any], action: Callable[[], None], timeout: float = 5.0
) -> bool:
    """Start ``watcher(stop)``, run ``action`` once it is watching, and tell whether an event came."""
    stop = asyncio.Event()
    seen = asyncio.Event()

    async def consume() -> None:
        async for _ in watcher(stop):
            seen.set()

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.3)  # let the watcher set up its inotify watch / first stat
    action()
    try:
        await asyncio.wait_for(seen.wait(), timeout)
        return True
    except TimeoutError:
        return False
    finally:
        stop.set()
        await asyncio.wait_for(task, 5.0)


@pytest.mark.parametrize("kind", ["watchfiles", "poll"])
def test_watchers_see_an_editors_rename_save(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "emailproxy.config"
    path.write_text("one\n")

    def watcher(stop: asyncio.Event) -> Any:
        if kind == "poll":
            return poll_changes([path], stop, interval=0.05)
        return watchfiles_changes([path], stop)

    assert asyncio.run(first_event(watcher, lambda: write_atomically(path, "two\n")))


def test_watchfiles_ignores_other_files_in_the_directory(tmp_path: Path) -> None:
    path = tmp_path / "emailproxy.config"
    path.write_text("one\n")
    log_file = tmp_path / "proxy.log"

    def write_log() -> None:
        with log_file.open("a") as handle:
            handle.write("a log line\n")

    assert not asyncio.run(first_event(lambda stop: watchfiles_changes([path], stop), write_log, timeout=1.0))


def test_watching_through_a_symlink_sees_changes_to_the_target(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "emailproxy.config"
    target.write_text("one\n")
    link = tmp_path / "emailproxy.config"
    link.symlink_to(target)
    assert asyncio.run(
        first_event(lambda stop: watchfiles_changes([link], stop), lambda: write_atomically(target, "two\n"))
    )


@pytest.mark.parametrize("use_watchfiles", [True, False])
def test_reloader_run_applies_edits_until_closed(tmp_path: Path, use_watchfiles: bool) -> None:
    path, reloader, recorder = make_reloader(
        tmp_path, config_text("IMAP-2001"), use_watchfiles=use_watchfiles, poll_interval=0.05
    )

    async def scenario() -> None:
        reloader.start()
        await asyncio.sleep(0.3)
        write_atomically(path, config_text("IMAP-2001", "SMTP-2002"))
        await poll_until(lambda: bool(recorder.applied))
        await reloader.close()

    asyncio.run(scenario())
    assert [s.section for s in recorder.applied[-1].servers] == ["IMAP-2001", "SMTP-2002"]


def broken_watcher(_paths: Any, _stop: Any) -> Any:
    raise OSError(28, "inotify watch limit reached")


@pytest.mark.parametrize("failure", ["not installed", "cannot watch"])
def test_reloader_falls_back_to_polling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any, failure: str
) -> None:
    if failure == "not installed":
        monkeypatch.setitem(sys.modules, "watchfiles", None)  # import watchfiles raises ImportError
        expected = "watchfiles is not installed"
    else:
        monkeypatch.setattr("emailproxy.reload.watchfiles_changes", broken_watcher)
        expected = "Cannot watch"
    path, reloader, recorder = make_reloader(tmp_path, config_text("IMAP-2001"), poll_interval=0.05)

    async def scenario() -> None:
        reloader.start()
        await poll_until(lambda: expected in caplog.text)
        write_atomically(path, config_text("IMAP-2001", "POP-2002"))
        await poll_until(lambda: bool(recorder.applied))
        await reloader.close()

    with caplog.at_level(logging.INFO, logger="emailproxy.reload"):
        asyncio.run(scenario())
    assert [s.section for s in recorder.applied[-1].servers] == ["IMAP-2001", "POP-2002"]


async def poll_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------------------------ ProxyServer.apply


class NoTokens:
    async def get_token(self, username: str, password: Secret) -> TokenResult:
        return TokenFailure("not in this test")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def proxy_config(
    tmp_path: Path, upstream: int, sections: dict[str, str], address: str = "127.0.0.1"
) -> Config:
    """Listeners ``{section: extra lines}``, all with STARTTLS upstream to ``address``:``upstream``."""
    text = "".join(
        f"[{name}]\nserver_address = {address}\nserver_port = {upstream}\nserver_starttls = True\n{extra}\n\n"
        for name, extra in sections.items()
    )
    path = tmp_path / "emailproxy.config"
    path.write_text(text)
    return load_config(path)


async def accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        _reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    return True


async def client(proxy: ProxyServer, port: int, host: str = "127.0.0.1") -> tuple[asyncio.StreamWriter, Any]:
    """Connect a client; return it and the proxy's connection for it (the silent upstream keeps it open)."""
    before = set(proxy.connections)
    _reader, writer = await asyncio.open_connection(host, port)
    CLIENTS.append(writer)
    await poll_until(lambda: len(proxy.connections - before) == 1)
    (conn,) = proxy.connections - before
    return writer, conn


CLIENTS: list[asyncio.StreamWriter] = []


def run_with_upstream(body: Callable[[int], Awaitable[None]]) -> None:
    """Run ``body(upstream_port)`` next to a silent upstream server that holds every connection open."""

    async def main() -> None:
        held: list[asyncio.BaseTransport] = []

        class Hold(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                held.append(transport)

        loop = asyncio.get_running_loop()
        upstream = await loop.create_server(Hold, "127.0.0.1", 0)
        try:
            await body(upstream.sockets[0].getsockname()[1])
        finally:
            upstream.close()
            for writer in CLIENTS:
                writer.close()
            CLIENTS.clear()
            await asyncio.sleep(0.05)  # connections accepted at the last moment reach connection_made
            for transport in held:
                transport.close()
            await asyncio.sleep(0)

    asyncio.run(main())


def test_apply_keeps_unchanged_listeners_moves_and_adds(tmp_path: Path) -> None:
    a, b, moved, added = free_ports(4)

    async def body(upstream: int) -> None:
        proxy = ProxyServer(proxy_config(tmp_path, upstream, {f"IMAP-{a}": "", f"IMAP-{b}": ""}), NoTokens())
        await proxy.start()
        try:
            kept = proxy.listeners[0]
            (on_a, conn_a), (on_b, conn_b) = await client(proxy, a), await client(proxy, b)
            new = proxy_config(tmp_path, upstream, {f"IMAP-{a}": "", f"IMAP-{moved}": "", f"POP-{added}": ""})
            plan = await proxy.apply(new)
            assert [s.section for s in plan.unchanged] == [f"IMAP-{a}"]
            assert [s.section for s in plan.removed] == [f"IMAP-{b}"]
            assert [s.section for s in plan.added] == [f"IMAP-{moved}", f"POP-{added}"]
            assert proxy.listeners[0] is kept and proxy.config is new
            assert [lst.settings.section for lst in proxy.listeners] == [s.section for s in new.servers]
            assert await accepts(moved) and await accepts(added) and await accepts(a)
            assert not await accepts(b)
            # the sessions on the kept and on the removed listener both carry on
            assert not conn_a.closed and not conn_b.closed and {conn_a, conn_b} <= proxy.connections
            assert not on_a.is_closing() and not on_b.is_closing()
            # applying the same configuration again changes nothing
            again = await proxy.apply(new)
            assert again.empty and proxy.listeners[0] is kept
        finally:
            await proxy.stop()

    run_with_upstream(body)


def test_upstream_change_applies_in_place_to_new_connections_only(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    section = f"IMAP-{port}"

    async def body(upstream: int) -> None:
        proxy = ProxyServer(proxy_config(tmp_path, upstream, {section: ""}), NoTokens())
        await proxy.start()
        try:
            listener = proxy.listeners[0]
            _writer, old_session = await client(proxy, port)
            changed = proxy_config(tmp_path, upstream, {section: ""}, address="localhost")
            plan = await proxy.apply(changed)
            assert [new.section for _old, new in plan.changed] == [section]
            assert proxy.listeners == [listener] and listener.settings.server_address == "localhost"
            _writer, new_session = await client(proxy, port)
            assert old_session.settings.server_address == "127.0.0.1" and not old_session.closed
            assert new_session.settings.server_address == "localhost"
        finally:
            await proxy.stop()

    run_with_upstream(body)


def test_rebind_to_another_address_keeps_existing_sessions(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    section = f"IMAP-{port}"

    async def body(upstream: int) -> None:
        proxy = ProxyServer(proxy_config(tmp_path, upstream, {section: ""}), NoTokens())
        await proxy.start()
        try:
            old_client, old_session = await client(proxy, port)
            await proxy.apply(proxy_config(tmp_path, upstream, {section: "local_address = 127.0.0.3"}))
            assert proxy.listeners[0].settings.local_address == "127.0.0.3"
            assert await accepts(port, "127.0.0.3") and not await accepts(port, "127.0.0.1")
            assert not old_session.closed and not old_client.is_closing()
            # and back to the first address on the same port, while that session is still open
            await proxy.apply(proxy_config(tmp_path, upstream, {section: ""}))
            assert await accepts(port) and not await accepts(port, "127.0.0.3")
            assert not old_session.closed and not old_client.is_closing()
        finally:
            await proxy.stop()

    run_with_upstream(body)


def test_failed_rebind_restores_the_old_listener_and_is_retried(tmp_path: Path, caplog: Any) -> None:
    port, taken = free_ports(2)
    section = f"IMAP-{port}"

    async def body(upstream: int) -> None:
        proxy = ProxyServer(proxy_config(tmp_path, upstream, {section: ""}), NoTokens())
        await proxy.start()
        blocker = socket.socket()
        blocker.bind(("127.0.0.1", taken))
        blocker.listen()
        try:
            unreachable = proxy_config(
                tmp_path, upstream, {section: "local_address = 192.0.2.1", f"POP-{taken}": ""}
            )
            with caplog.at_level(logging.ERROR, logger="emailproxy.server"):
                await proxy.apply(unreachable)
            assert "restoring the previous settings" in caplog.text and f"POP-{taken}" in caplog.text
            assert [lst.settings.local_address for lst in proxy.listeners] == ["127.0.0.1"]
            assert await accepts(port)
            blocker.close()
            retried = await proxy.apply(proxy_config(tmp_path, upstream, {section: "", f"POP-{taken}": ""}))
            assert [s.section for s in retried.added] == [f"POP-{taken}"] and await accepts(taken)
        finally:
            blocker.close()
            await proxy.stop()

    run_with_upstream(body)
