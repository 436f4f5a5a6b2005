"""TLS contexts: one shared client context for every upstream, one server context per local listener.

Contexts are created once and shared: each costs about 1 MiB with the system CA store loaded.

Also `share_read_buffer`, for the local listeners' TLS (upstream connections use emailproxy/upstream.py,
where OpenSSL reads the socket itself): stdlib asyncio gives every TLS connection its own 256 KiB receive
buffer (``asyncio.sslproto.SSLProtocol._ssl_buffer``, zero-filled, so resident), which made an idle session
cost about 290 KiB. The buffer only lives between the socket read and the copy into the connection's
``ssl.MemoryBIO`` (both in the same callback), so on a selector event loop one buffer per thread can serve
every connection, at full read size.
"""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import asyncio.sslproto
import ssl
import threading
from functools import lru_cache

_scratch = threading.local()


@lru_cache(maxsize=1)
def upstream_context() -> ssl.SSLContext:
    """Verifies the server's certificate and host name against the system CAs.

    OpenSSL honours ``SSL_CERT_FILE``/``SSL_CERT_DIR``, so a private CA can be given that way.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def local_context(certificate_path: str, key_path: str) -> ssl.SSLContext:
    """The server-side context for a local listener (implicit TLS or STARTTLS)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certificate_path, key_path)
    return ctx


def thread_buffer(size: int) -> tuple[bytearray, memoryview]:
    """This thread's scratch buffer (at least `size` bytes) for reads copied out within one callback."""
    pair: tuple[bytearray, memoryview] | None = getattr(_scratch, "pair", None)
    if pair is None or len(pair[0]) < size:
        buffer = bytearray(size)
        pair = (buffer, memoryview(buffer))
        _scratch.pair = pair
    return pair


def share_read_buffer(transport: asyncio.BaseTransport) -> bool:
    """Make a stdlib asyncio TLS transport read through this thread's shared buffer instead of its own.

    Returns False (and changes nothing) when the transport is not a stdlib TLS transport on a selector
    loop (uvloop, the Windows proactor loop, plain TCP) or when asyncio's internals are not as expected.
    """
    protocol = getattr(transport, "_ssl_protocol", None)
    if not isinstance(protocol, asyncio.sslproto.SSLProtocol):
        return False
    loop = getattr(protocol, "_loop", None)
    if not isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
        return False  # the proactor loop fills the buffer asynchronously: it cannot be shared
    own = getattr(protocol, "_ssl_buffer", None)
    own_view = getattr(protocol, "_ssl_buffer_view", None)
    if not isinstance(own, bytearray) or not isinstance(own_view, memoryview):
        return False
    buffer, view = thread_buffer(max(len(own), protocol.max_size))
    protocol._ssl_buffer = buffer  # type: ignore[attr-defined]  # private, pinned by tests/test_tls_buffer.py
    protocol._ssl_buffer_view = view  # type: ignore[attr-defined]
    return True
