"""The floor: the least work any single-process asyncio relay does per login, for comparison with the proxy.

    python3 -m benchmarks.floor --listen PORT --upstream HOST:PORT --cafile CA.pem

Accepts plaintext loopback connections and joins each to a new TLS connection to the upstream server, then
passes bytes both ways with flow control. No protocol logic, no tokens, no logging: the client speaks
XOAUTH2 itself (so it must already hold a token). It uses the proxy's own upstream transport
(`emailproxy.upstream`), so the difference between this relay and the proxy is what the proxy adds on top:
the protocol state machines, the token cache, the log lines. `python3 -m benchmarks.login_latency --floor`
runs it beside the proxy. Prints "ready" once it listens; stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl

from emailproxy.upstream import open_upstream


class _Side(asyncio.Protocol):
    def __init__(self, pair: _Pair) -> None:
        self.pair = pair
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self is self.pair.client:
            transport.pause_reading()  # until the upstream is there
            self.pair.task = asyncio.get_running_loop().create_task(self.pair.connect())

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.pair.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.pair.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _Pair:
    def __init__(self, upstream: tuple[str, int], context: ssl.SSLContext, live: set[_Pair]) -> None:
        self.client = _Side(self)
        self.server = _Side(self)
        self.client.peer, self.server.peer = self.server, self.client
        self.upstream = upstream
        self.context = context
        self.closed = False
        self.live = live
        self.task: asyncio.Task[None] | None = None
        live.add(self)

    async def connect(self) -> None:
        host, port = self.upstream
        try:
            await asyncio.wait_for(
                open_upstream(self.server, host, port, tls=self.context, server_hostname=host), 30
            )
        except (OSError, TimeoutError):
            self.close()
            return
        if self.closed:
            self.close()
            return
        if self.client.transport is not None:
            self.client.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        self.live.discard(self)
        for side in (self.client, self.server):
            if side.transport is not None and not side.transport.is_closing():
                side.transport.close()


async def serve(listen: int, upstream: tuple[str, int], context: ssl.SSLContext) -> None:
    loop = asyncio.get_running_loop()
    pairs: set[_Pair] = set()

    def accept() -> asyncio.Protocol:
        return _Pair(upstream, context, pairs).client  # `pairs` holds each pair (and its task) while open

    server = await loop.create_server(accept, "127.0.0.1", listen)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print("ready", flush=True)
    await stop.wait()
    server.close()
    for pair in list(pairs):
        pair.close()
    await server.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="HOST:PORT of a TLS server")
    parser.add_argument("--cafile", required=True)
    args = parser.parse_args()
    host, _, port = args.upstream.rpartition(":")
    asyncio.run(serve(args.listen, (host, int(port)), ssl.create_default_context(cafile=args.cafile)))


if __name__ == "__main__":
    main()
