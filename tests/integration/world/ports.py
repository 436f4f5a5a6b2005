"""Free loopback TCP ports for the private test servers.

Other processes on the machine use fixed ports, so every listener of the test world picks a port the kernel
reports as free right now. Ports for one server are reserved together so that they are distinct.
"""

from __future__ import annotations

import socket
import time

LOOPBACK = "127.0.0.1"
# Dovecot 2.3 treats a connection whose remote and local IPs are equal as secured, so on 127.0.0.1 it would
# accept authentication without TLS. Listening on 127.0.0.2 (clients connect from 127.0.0.1) avoids that.
DOVECOT_LOOPBACK = "127.0.0.2"


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """Return `count` distinct TCP ports on `host` that were free a moment ago."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port(host: str = LOOPBACK) -> int:
    """Return one TCP port on `host` that was free a moment ago."""
    return free_ports(1, host)[0]


def is_listening(port: int, host: str = LOOPBACK) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_listening(ports: list[int], timeout: float, host: str = LOOPBACK) -> list[int]:
    """Wait until every port accepts connections; return the ports still closed when time ran out."""
    deadline = time.monotonic() + timeout
    waiting = list(ports)
    while waiting:
        waiting = [port for port in waiting if not is_listening(port, host)]
        if not waiting or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return waiting
