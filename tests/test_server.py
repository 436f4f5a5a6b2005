"""Listener behaviour that needs no mail server: addresses, start-up errors."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from emailproxy.cli import main
from emailproxy.config import load_config
from emailproxy.protocols.events import TokenFailure, TokenResult
from emailproxy.secret import Secret
from emailproxy.server import ProxyServer


class NoTokens:
    async def get_token(self, username: str, password: Secret) -> TokenResult:
        return TokenFailure("not used")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_double_colon_listens_on_ipv4_and_ipv6(tmp_path: Path) -> None:
    if not has_ipv6_loopback():
        pytest.fail("this test needs IPv6 on loopback (::1)")
    port, closed = free_port(), free_port()
    config_path = tmp_path / "emailproxy.config"
    config_path.write_text(f"[IMAP-{port}]\nlocal_address = ::\nserver_address = 127.0.0.1\n"
                           f"server_port = {closed}\nserver_starttls = True\n")
    config = load_config(config_path)

    async def run() -> list[bytes]:
        proxy = ProxyServer(config, NoTokens())
        await proxy.start()
        replies = []
        try:
            for host in ("127.0.0.1", "::1"):
                reader, writer = await asyncio.open_connection(host, port)
                # nobody listens upstream: the client is told so in IMAP terms
                replies.append(await asyncio.wait_for(reader.read(), 10))
                writer.close()
                await writer.wait_closed()
        finally:
            await proxy.stop()
        return replies

    replies = asyncio.run(run())
    assert len(replies) == 2
    for reply in replies:
        assert reply.startswith(b"* BYE Email OAuth 2.0 Proxy: could not connect to 127.0.0.1:")


def test_unreadable_local_certificate_is_a_clean_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = tmp_path / "emailproxy.config"
    config_path.write_text(f"[IMAP-{free_port()}]\nserver_address = 127.0.0.1\nserver_port = 993\n"
                           f"local_certificate_path = {tmp_path / 'missing.pem'}\n"
                           f"local_key_path = {tmp_path / 'missing.key'}\n")
    assert main(["--config-file", str(config_path)]) == 1
    err = capsys.readouterr().err
    assert "cannot load local_certificate_path/local_key_path" in err
    assert "Traceback" not in err


def test_signal_handlers_are_optional(tmp_path: Path) -> None:
    """Windows event loops take no signal handlers (and have no SIGHUP): the proxy must still start."""
    from emailproxy.cli import _install_signal_handlers

    class Loop:
        def add_signal_handler(self, sig: object, handler: object) -> None:
            raise NotImplementedError

    class Dummy:
        def request_stop(self) -> None: ...
        def request(self, reason: str = "") -> None: ...

    assert _install_signal_handlers(Loop(), Dummy(), Dummy()) == []  # type: ignore[arg-type]

    async def real() -> list[object]:
        loop = asyncio.get_running_loop()
        installed = _install_signal_handlers(loop, Dummy(), Dummy())  # type: ignore[arg-type]
        for sig in installed:
            loop.remove_signal_handler(sig)
        return [s.name for s in installed]

    assert asyncio.run(real()) == ["SIGINT", "SIGTERM", "SIGHUP"]
