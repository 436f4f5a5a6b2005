"""After login the proxy relays with flow control: a client that stops reading must not make it buffer."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from tests.integration.conftest import World
from tests.integration.proxy import allocate_ports, launch

MESSAGE_MIB = 64


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed; got {data[-200:]!r}"
        data += chunk
    return data


def test_stalled_reader_does_not_grow_proxy_memory(world: World, tmp_path: Path) -> None:
    world.idp.register_client("flow-client", "flow-secret")
    user = world.new_user("flow")
    line = b"y" * 998 + b"\r\n"
    body = line * (MESSAGE_MIB * 1024 * 1024 // len(line))
    world.dovecot.deliver(user, b"Subject: big\r\n\r\n" + body)
    ports = allocate_ports("IMAP")
    d = world.dovecot.ports
    proxy = launch(world.ca_path, tmp_path, {
        f"IMAP-{ports['IMAP']}": {"server_address": d.host, "server_port": str(d.imaps)},
        user: {"token_url": world.idp.token_url(), "oauth2_scope": "https://outlook.office365.com/.default",
               "oauth2_flow": "client_credentials", "client_id": "flow-client",
               "client_secret": "flow-secret"},
    }, ports)
    try:
        assert proxy.process is not None
        pid = proxy.process.pid
        sock = socket.create_connection(("127.0.0.1", ports["IMAP"]), timeout=30)
        # a small receive buffer, as a slow client on a slow link would have
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        read_until(sock, b"\r\n")
        sock.sendall(b"a LOGIN " + user.encode() + b" pw\r\n")
        read_until(sock, b"a OK")
        sock.sendall(b"b SELECT INBOX\r\n")
        read_until(sock, b"b OK")
        before = rss_bytes(pid)
        sock.sendall(b"c FETCH 1 BODY.PEEK[]\r\n")
        received = len(sock.recv(65536))
        # stop reading; give the proxy time to (mis)behave, sampling its memory
        peak = before
        for _ in range(30):
            time.sleep(0.1)
            peak = max(peak, rss_bytes(pid))
        growth = peak - before
        assert growth < 16 * 1024 * 1024, f"proxy RSS grew by {growth / 1e6:.1f} MB while the client stalled"
        # now read everything: the whole message arrives intact
        data = b""
        while b"\r\nc OK" not in data[-4096:]:
            chunk = sock.recv(1024 * 1024)
            assert chunk, "connection closed early"
            received += len(chunk)
            data = data[-8192:] + chunk
        assert received >= len(body)
        sock.close()
    finally:
        assert proxy.stop() == 0, proxy.output()
