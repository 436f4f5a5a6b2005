"""The open-file limit: every session holds two descriptors (client and server), so the proxy raises its
soft ``RLIMIT_NOFILE`` to the hard limit at start-up, as a user would with ``ulimit -n``.

Many systems start services with a soft limit of 1,024, which would stop a proxy at about 500 sessions
with ``EMFILE`` (asyncio then pauses accepting) long before ``max_connections``.
"""

from __future__ import annotations

import logging

try:
    import resource
except ImportError:  # Windows: no such limit to raise
    resource = None  # type: ignore[assignment]

log = logging.getLogger("emailproxy.server")

#: never ask for more than this, whatever the hard limit says ("unlimited" is not a usable soft limit)
CEILING = 1 << 20
#: descriptors the proxy needs besides its sessions: listeners, the log, the watcher, the redirect listener
SPARE = 64


def raise_open_file_limit(ceiling: int = CEILING) -> int | None:
    """Raise the soft limit to the hard one (at most ``ceiling``); return the soft limit now in force,
    or None where there is no such limit."""
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.debug("Could not raise the open-file limit from %d to %d: %s", soft, target, e)
            return soft
        log.debug("Raised the open-file limit from %d to %d", soft, target)
        return target
    return soft


def descriptor_shortfall(max_connections: int, soft_limit: int | None) -> str | None:
    """A warning when ``max_connections`` sessions cannot fit in the open-file limit, else None."""
    if soft_limit is None or max_connections == 0:
        return None
    needed = 2 * max_connections + SPARE
    if needed <= soft_limit:
        return None
    fits = max(0, (soft_limit - SPARE) // 2)
    return (
        f"The open-file limit ({soft_limit}) holds only about {fits} sessions, fewer than [emailproxy] "
        f"max_connections = {max_connections} (each session needs 2 descriptors): raise the hard limit "
        "(LimitNOFILE= in a systemd unit, --ulimit nofile= for Docker, ulimit -Hn) or lower max_connections"
    )
