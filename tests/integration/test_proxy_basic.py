"""End-to-end: real clients -> the proxy -> real Dovecot/Postfix, tokens from the test identity provider."""

from __future__ import annotations

import imaplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import World
from tests.integration.proxy import Proxy, allocate_ports, launch

CLIENT_ID = "ccg-client"
CLIENT_SECRET = "ccg-secret-value"


@pytest.fixture
def ccg_proxy(world: World, tmp_path: Path) -> Iterator[Proxy]:
    world.idp.register_client(CLIENT_ID, CLIENT_SECRET)
    ports = allocate_ports("IMAP", "IMAPSTARTTLS")
    d = world.dovecot.ports
    sections = {
        f"IMAP-{ports['IMAP']}": {"server_address": d.host, "server_port": str(d.imaps)},
        f"IMAP-{ports['IMAPSTARTTLS']}": {"server_address": d.host, "server_port": str(d.imap),
                                          "server_starttls": "True"},
        f"@{world.domain}": {
            "token_url": world.idp.token_url(), "oauth2_scope": "https://outlook.office365.com/.default",
            "oauth2_flow": "client_credentials", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
        },
        "emailproxy": {"allow_catch_all_accounts": "True"},
    }
    proxy = launch(world.ca_path, tmp_path, sections, ports)
    yield proxy
    assert proxy.stop() == 0, proxy.output()


@pytest.mark.parametrize("listener", ["IMAP", "IMAPSTARTTLS"])
def test_imap_login_select_logout(world: World, ccg_proxy: Proxy, listener: str) -> None:
    user = world.new_user()
    world.dovecot.deliver(user, world.dovecot.make_message("a@example.com", user, "hello", "first body"))
    with imaplib.IMAP4("127.0.0.1", ccg_proxy.ports[listener]) as imap:
        assert "AUTH=PLAIN" in imap.capabilities
        imap.login(user, "local-password")
        typ, data = imap.select("INBOX")
        assert typ == "OK" and data == [b"1"]
        typ, msg = imap.fetch("1", "(BODY[TEXT])")
        assert b"first body" in msg[0][1]
    assert len(world.idp.token_requests("client_credentials")) == 1
    # second login: cached token, no token request
    with imaplib.IMAP4("127.0.0.1", ccg_proxy.ports[listener]) as imap:
        imap.login(user, "local-password")
    assert len(world.idp.token_requests("client_credentials")) == 1
