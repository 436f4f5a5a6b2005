"""Hot reload: watch the configuration file, re-read it on change or SIGHUP, and plan the listener changes.

The file's *directory* is watched (watchfiles, inotify on Linux) with a filter on the file's path, because
editors save by writing a new file and renaming it over the old one, which a watch on the file itself would
not survive. One save can produce several events, so each event re-reads the file and compares a content
hash; nothing happens when the bytes did not change. The proxy's own token write-back changes only cache
keys: such a reload just hands the new cache values to the token manager and logs at debug level. Without
watchfiles (or when it fails, e.g. no inotify on a network file system) a small asyncio task compares
``os.stat()`` results every second instead.

An invalid new file is logged and the running configuration stays. The listener reconciliation itself
(:func:`plan_listeners`) is pure: the server applies the plan.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emailproxy.config import CACHE_KEYS, Config, ConfigError, ServerConfig, load_config

log = logging.getLogger("emailproxy.reload")

#: watchfiles: wait this long after the last event before reloading, at most ``DEBOUNCE_MS`` in all
STEP_MS = 50
DEBOUNCE_MS = 500
#: the fallback poller's interval
POLL_INTERVAL = 1.0

#: ServerConfig fields that need a new listening socket when they change; other fields apply in place
BINDING_FIELDS = ("local_address", "local_port", "local_certificate_path", "local_key_path", "local_starttls")


# -------------------------------------------------------------------------------------- listener plan


@dataclass(frozen=True, slots=True)
class ListenerPlan:
    """What a reload does to the listeners (by section name, e.g. ``IMAP-1993``)."""

    unchanged: tuple[ServerConfig, ...] = ()
    removed: tuple[ServerConfig, ...] = ()
    added: tuple[ServerConfig, ...] = ()
    changed: tuple[tuple[ServerConfig, ServerConfig], ...] = ()  # (running, new)

    @property
    def empty(self) -> bool:
        return not (self.removed or self.added or self.changed)

    def describe(self) -> str:
        parts = [
            f"{label}: {', '.join(names)}"
            for label, names in (
                ("added", [s.section for s in self.added]),
                ("changed", [new.section for _old, new in self.changed]),
                ("removed", [s.section for s in self.removed]),
            )
            if names
        ]
        return "; ".join(parts) if parts else "listeners unchanged"


def plan_listeners(running: Iterable[ServerConfig], wanted: Iterable[ServerConfig]) -> ListenerPlan:
    """Compare the running listeners with the new configuration's server sections."""
    old = {s.section: s for s in running}
    new = {s.section: s for s in wanted}
    return ListenerPlan(
        unchanged=tuple(s for name, s in new.items() if old.get(name) == s),
        removed=tuple(s for name, s in old.items() if name not in new),
        added=tuple(s for name, s in new.items() if name not in old),
        changed=tuple((old[name], s) for name, s in new.items() if name in old and old[name] != s),
    )


def needs_rebind(old: ServerConfig, new: ServerConfig) -> bool:
    """True when the listening socket itself changes (address, port, local TLS); else update in place."""
    return any(getattr(old, name) != getattr(new, name) for name in BINDING_FIELDS)


# ------------------------------------------------------------------------------------- config compare


def _settings(sections: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, str]]:
    """Account sections without the keys the proxy writes itself (sections left empty are dropped)."""
    kept = {name: {k: v for k, v in keys.items() if k not in CACHE_KEYS} for name, keys in sections.items()}
    return {name: keys for name, keys in kept.items() if keys}


def same_settings(old: Config, new: Config) -> bool:
    """True when the configurations differ at most in cached tokens (such as the proxy's own write-back)."""
    return (
        old.options == new.options
        and old.servers == new.servers
        and old.cache_store == new.cache_store
        and _settings(old.account_sections) == _settings(new.account_sections)
    )


# ---------------------------------------------------------------------------------------------- watching


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


async def poll_changes(
    paths: Sequence[Path], stop: asyncio.Event, interval: float = POLL_INTERVAL
) -> AsyncIterator[None]:
    """Yield whenever ``os.stat()`` of one of ``paths`` changes (inode, size or mtime), until ``stop``."""
    last = [_stat_key(p) for p in paths]
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
            return
        now = [_stat_key(p) for p in paths]
        if now != last:
            last = now
            yield


def _watched(paths: Sequence[Path]) -> tuple[set[str], set[str]]:
    """(directories to watch, file paths to accept): each file as given and with symlinks resolved."""
    directories: set[str] = set()
    files: set[str] = set()
    for path in paths:
        for variant in (path.absolute(), path.resolve()):
            directories.add(os.path.normpath(variant.parent))
            files.add(os.path.normpath(variant))
    return directories, files


async def watchfiles_changes(paths: Sequence[Path], stop: asyncio.Event) -> AsyncIterator[None]:
    """Yield after changes to ``paths`` seen by watchfiles on their directories (ImportError without it)."""
    import watchfiles

    directories, files = _watched(paths)

    def accept(_change: Any, path: str) -> bool:
        return os.path.normpath(path) in files

    async for _changes in watchfiles.awatch(
        *sorted(directories),
        watch_filter=accept,
        step=STEP_MS,
        debounce=DEBOUNCE_MS,
        stop_event=stop,
        recursive=False,
    ):
        yield


# ---------------------------------------------------------------------------------------------- reloader


class ReloadOutcome(enum.Enum):
    UNCHANGED = "unchanged"  # same bytes as last time (not forced)
    MISSING = "missing"  # the file could not be read (e.g. in the middle of an editor's save)
    INVALID = "invalid"  # the new file has errors; the running configuration stays
    APPLIED = "applied"  # the new configuration is in use


class ConfigReloader:
    """Re-reads the configuration on change or request and hands each valid new Config to ``apply``.

    ``apply(config)`` updates the running proxy (token manager and listeners); it should not raise.
    Reloads never overlap. ``run()`` watches until ``close()``; ``request()`` suits a signal handler.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        current: Config,
        apply: Callable[[Config], Awaitable[object]],
        *,
        cache_store: str | os.PathLike[str] | None = None,
        use_watchfiles: bool = True,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        # kept as given, so reloaded Config objects compare equal to the one loaded at start-up
        self.path = Path(path)
        self.cache_store = Path(cache_store) if cache_store is not None else None
        self.current = current
        self._apply = apply
        self._use_watchfiles = use_watchfiles
        self._poll_interval = poll_interval
        self._stop = asyncio.Event()
        self._lock = asyncio.Lock()
        self._digest: bytes | None = None  # None: the first event always compares the parsed settings
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runner: asyncio.Task[None] | None = None
        self.reloads = 0  # applied reloads, for tests and diagnostics

    @property
    def files(self) -> list[Path]:
        """The files watched and hashed: the configuration and a ``--cache-store`` file (not ``aws:``)."""
        watched = [self.path.absolute()]
        if self.cache_store is not None and not str(self.cache_store).startswith("aws:"):
            watched.append(self.cache_store.absolute())
        return watched

    # ------------------------------------------------------------------------------------------ triggers

    def request(self, reason: str = "SIGHUP") -> None:
        """Schedule a forced reload (call from the event loop, e.g. as a signal handler)."""
        log.info("%s received: reloading the configuration from %s", reason, self.path)
        task = asyncio.get_running_loop().create_task(self.reload(force=True, reason=reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def start(self) -> None:
        """Start watching in a background task (stopped by ``close()``)."""
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        """Watch the files and reload on each change until ``close()``."""
        if self._use_watchfiles:
            try:
                async for _ in watchfiles_changes(self.files, self._stop):
                    await self._changed()
                return
            except ImportError:
                log.info(
                    "watchfiles is not installed; checking %s for changes every %g s",
                    self.path,
                    self._poll_interval,
                )
            except Exception as e:  # e.g. no inotify support or too many watches
                log.warning(
                    "Cannot watch %s for changes (%s: %s); checking it every %g s instead",
                    self.path.parent,
                    type(e).__name__,
                    e,
                    self._poll_interval,
                )
        async for _ in poll_changes(self.files, self._stop, self._poll_interval):
            await self._changed()

    async def _changed(self) -> None:
        try:
            await self.reload(force=False, reason="file changed")
        except Exception:  # keep watching whatever happened
            log.exception("Unexpected error while reloading the configuration")

    async def close(self) -> None:
        """Stop watching (the watcher thread notices within ``STEP_MS``) and cancel pending reloads."""
        self._stop.set()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            done, _pending = await asyncio.wait({runner}, timeout=5.0)
            if not done:
                runner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await runner
            elif not runner.cancelled() and runner.exception() is not None:
                log.error("The configuration watcher failed: %r", runner.exception())
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ------------------------------------------------------------------------------------------ reload

    def _read_all(self) -> bytes:
        digest = hashlib.sha256()
        for index, path in enumerate(self.files):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                if index == 0:
                    raise
                data = b""  # a --cache-store file that does not exist yet
            digest.update(len(data).to_bytes(8, "big") + data)
        return digest.digest()

    async def reload(self, *, force: bool = False, reason: str = "requested") -> ReloadOutcome:
        """Re-read the file; apply it when it changed (always when ``force``) and is valid."""
        async with self._lock:
            try:
                digest = await asyncio.to_thread(self._read_all)
            except OSError as e:
                level = logging.ERROR if force else logging.DEBUG  # mid-save: the next event follows
                log.log(
                    level,
                    "Reload (%s): cannot read %s (%s); keeping the running configuration",
                    reason,
                    self.path,
                    e.strerror or e,
                )
                return ReloadOutcome.MISSING
            if digest == self._digest and not force:
                return ReloadOutcome.UNCHANGED
            self._digest = digest
            try:
                config = await asyncio.to_thread(load_config, self.path, self.cache_store)
            except ConfigError as e:
                log.error(
                    "Configuration reload (%s) failed; keeping the running configuration: %s", reason, e
                )
                return ReloadOutcome.INVALID
            except Exception:
                log.exception("Configuration reload (%s) failed; keeping the running configuration", reason)
                return ReloadOutcome.INVALID
            previous, self.current = self.current, config
            quiet = same_settings(previous, config)
            if not quiet:
                log.info("Configuration changed (%s); applying it", reason)
                for warning in config.warnings:
                    if warning not in previous.warnings:
                        log.warning("%s", warning)
            try:
                await self._apply(config)
            except Exception:
                log.exception("Unexpected error while applying the reloaded configuration")
            self.reloads += 1
            if quiet:
                log.log(
                    logging.INFO if force else logging.DEBUG,
                    "Reloaded %s (%s): no setting changed",
                    self.path,
                    reason,
                )
            else:
                log.info("Reloaded the configuration from %s", self.path)
            return ReloadOutcome.APPLIED
