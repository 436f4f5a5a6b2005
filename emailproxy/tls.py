"""TLS contexts: one shared client context for every upstream, one server context per local listener.

Contexts are created once and shared: each costs about 1 MiB with the system CA store loaded.
"""

from __future__ import annotations

import ssl
from functools import lru_cache


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
