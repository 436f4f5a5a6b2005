"""Many idle, authenticated IMAP sessions at once (LOGIN or AUTHENTICATE, then IDLE), opened with asyncio."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import resource
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from benchmarks.wire import Target

CLIENT_SSL_READ_BUFFER = 16 * 1024


@dataclass
class IdleResult:
    attempted: int
    succeeded: int
    seconds: float  # until every attempt had succeeded or failed
    failures: Counter[str] = field(default_factory=Counter)


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit (children inherit it), as a user would with
    `ulimit -n`. Returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


async def _read_tagged(reader: asyncio.StreamReader, tag: bytes) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line.startswith(tag + b" "):
            if not line[len(tag) + 1 :].startswith(b"OK"):
                raise PermissionError(line.decode(errors="replace").strip())
            return line


async def _open_one(target: Target, user: str) -> asyncio.StreamWriter:
    host, port = target.imap
    reader, writer = await asyncio.open_connection(
        host, port, ssl=target.tls, server_hostname=host if target.tls else None, limit=8192
    )
    try:
        greeting = await reader.readline()
        if not greeting.startswith(b"* OK"):
            raise ConnectionError(f"greeting {greeting[:60]!r}")
        if target.direct:
            writer.write(f"a AUTHENTICATE XOAUTH2 {target.xoauth2(user)}\r\n".encode())
        else:
            writer.write(f'a LOGIN {user} "{target.password}"\r\n'.encode())
        await _read_tagged(reader, b"a")
        writer.write(b"b EXAMINE INBOX\r\n")
        await _read_tagged(reader, b"b")
        writer.write(b"i IDLE\r\n")
        line = await reader.readline()
        if not line.startswith(b"+"):
            raise ConnectionError(f"IDLE answered {line[:60]!r}")
    except BaseException:
        writer.transport.abort()
        raise
    return writer


async def _hold_sessions(
    target: Target,
    user: str,
    count: int,
    concurrency: int,
    timeout: float,
    deadline: float,
    while_open: Callable[[IdleResult], None],
) -> IdleResult:
    loop = asyncio.get_running_loop()
    start = loop.time()
    gate = asyncio.Semaphore(concurrency)
    writers: list[asyncio.StreamWriter] = []
    result = IdleResult(attempted=count, succeeded=0, seconds=0.0)

    async def one() -> None:
        async with gate:
            left = start + deadline - loop.time()
            if left <= 0:
                result.failures["not attempted before the deadline"] += 1
                return
            try:
                writers.append(await asyncio.wait_for(_open_one(target, user), min(timeout, left)))
            except TimeoutError:
                result.failures["timed out"] += 1
            except Exception as error:  # counted and reported, never fatal
                result.failures[
                    type(error).__name__
                    + (f" ({error.strerror})" if isinstance(error, OSError) and error.strerror else "")
                ] += 1

    await asyncio.gather(*(one() for _ in range(count)))
    result.seconds = loop.time() - start
    result.succeeded = len(writers)
    await asyncio.sleep(1.0)  # let the proxy settle (allocations of the last sessions, its log lines)
    while_open(result)
    for writer in writers:
        writer.transport.abort()
    await asyncio.sleep(0.2)
    return result


def hold_idle_sessions(
    target: Target,
    user: str,
    count: int,
    while_open: Callable[[IdleResult], None],
    concurrency: int = 100,
    timeout: float = 20.0,
    deadline: float = 300.0,
) -> IdleResult:
    """Open `count` idle sessions (each within `timeout`, all attempts within `deadline` seconds), call
    `while_open` while they are all open, then drop them all.

    The client side uses a small SSL read buffer: it holds thousands of TLS sessions, its speed is moot.
    """
    saved = asyncio.sslproto.SSLProtocol.max_size
    asyncio.sslproto.SSLProtocol.max_size = CLIENT_SSL_READ_BUFFER
    try:
        return asyncio.run(_hold_sessions(target, user, count, concurrency, timeout, deadline, while_open))
    finally:
        asyncio.sslproto.SSLProtocol.max_size = saved
