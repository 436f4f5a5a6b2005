"""Abuse limits that span connections: backoff after failed local logins, and a throttle for warnings.

``LoginBackoff`` remembers failed local logins (wrong local password, unknown account) per client address
and refuses further logins for a while once there were too many:

* per **(address, user name)**: after ``limit`` failures the pair is refused for 1 s, then each further
  failure doubles the wait (2, 4, 8 ... s) up to ``max_delay``. Only that user name is refused, so a
  misconfigured client on a shared address (all loopback clients are 127.0.0.1) locks out only its own
  account, and never for longer than ``max_delay`` at a time;
* per **address**: when ``address_limit`` different user names have failed from one address (guessing
  user names), every login from that address is refused, with the same doubling waits.

A successful login clears its user name's failures. An entry is forgotten ``window`` seconds after its last
failure (and a user name stops counting towards its address's total then), and at most ``max_tracked``
entries are kept per table (the oldest go first), so memory stays bounded. A refused login is not a failure:
a client retrying during a wait does not lengthen it. User names are compared case-insensitively and kept
only as short digests.

``Throttle`` lets one report of a repeated event through per interval and counts the rest.

Pure: no I/O; the clock is injectable.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TypeVar

#: the first wait after the limit is reached; each further failure doubles it
BASE_DELAY = 1.0
#: the longest wait
MAX_DELAY = 30.0
#: an entry is forgotten this many seconds after its last failure
WINDOW = 300.0
#: entries kept per table (pairs, addresses); the least recently failed go first
MAX_TRACKED = 10_000

#: whole-number options of [emailproxy] for these limits: smallest, largest, example (checked by configread)
COUNT_OPTIONS = {
    "max_connections": (0, 1_000_000, 1000),
    "login_failure_limit": (1, 100, 5),
    "login_failure_address_limit": (1, 100, 10),
}

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    enabled: bool = True
    #: failed logins for one user name from one address before its logins are refused for a while
    limit: int = 5
    #: different user names failing from one address before every login from it is refused for a while
    address_limit: int = 10
    window: float = WINDOW
    base_delay: float = BASE_DELAY
    max_delay: float = MAX_DELAY
    max_tracked: int = MAX_TRACKED

    def delay(self, strikes: int) -> float:
        """The wait after the ``strikes``-th failure at or over the limit (1 -> base, 2 -> twice that ...)."""
        return min(self.base_delay * 2.0 ** min(max(strikes, 1) - 1, 32), self.max_delay)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A login refused because of earlier failures: how long to wait, and whether the whole address is out."""

    wait: float
    whole_address: bool

    @property
    def seconds(self) -> int:
        """The wait rounded up to whole seconds (at least 1), as told to the client."""
        return max(1, math.ceil(self.wait))

    def message(self, username: str) -> str:
        """The client-facing text (the protocol session adds the proxy's prefix)."""
        if self.whole_address:
            return f"Too many failed logins from this address; try again in {self.seconds} s"
        return f"Too many failed logins for {username} from this address; try again in {self.seconds} s"


@dataclass(slots=True)
class _Entry:
    last: float  # time of the last failure
    failures: int = 0  # failures counted (pairs)
    strikes: int = 0  # failures at or over the limit, which set the wait
    until: float = 0.0  # logins are refused until then
    names: dict[bytes, float] = field(default_factory=dict)  # addresses: user name digest -> last failure


def _digest(username: str) -> bytes:
    return hashlib.blake2b(username.casefold().encode("utf-8", "surrogatepass"), digest_size=16).digest()


def normalise_address(address: str) -> str:
    """An IPv4 client on a dual-stack socket arrives as ``::ffff:a.b.c.d``: key it as ``a.b.c.d``."""
    if address.lower().startswith("::ffff:") and "." in address:
        return address[7:]
    return address


class LoginBackoff:
    """Failed local logins per client address; see the module docstring for the rules."""

    def __init__(
        self, policy: BackoffPolicy | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.policy = policy or BackoffPolicy()
        self.clock = clock
        self._pairs: OrderedDict[tuple[str, bytes], _Entry] = OrderedDict()
        self._addresses: OrderedDict[str, _Entry] = OrderedDict()

    def configure(self, policy: BackoffPolicy) -> None:
        """Use new settings (a reloaded configuration); what was learnt so far is kept."""
        self.policy = policy
        if not policy.enabled:
            self._pairs.clear()
            self._addresses.clear()

    def __len__(self) -> int:
        """Entries held (pairs plus addresses)."""
        return len(self._pairs) + len(self._addresses)

    # ------------------------------------------------------------------------------------------ queries

    def refusal(self, address: str, username: str) -> Refusal | None:
        """Whether a login for ``username`` from ``address`` must be refused now, and for how long."""
        if not self.policy.enabled:
            return None
        now = self.clock()
        address = normalise_address(address)
        pair = self._live(self._pairs, (address, _digest(username)), now)
        host = self._live(self._addresses, address, now)
        pair_wait = pair.until - now if pair is not None else 0.0
        host_wait = host.until - now if host is not None else 0.0
        if max(pair_wait, host_wait) <= 0:
            return None
        return Refusal(max(pair_wait, host_wait), whole_address=host_wait >= pair_wait)

    # ------------------------------------------------------------------------------------------ events

    def failed(self, address: str, username: str) -> Refusal | None:
        """Record a failed local login. Returns the refusal now in force when this failure started or
        lengthened a wait (for the log), else None."""
        policy = self.policy
        if not policy.enabled:
            return None
        now = self.clock()
        address = normalise_address(address)
        name = _digest(username)
        result: Refusal | None = None

        pair = self._touch(self._pairs, (address, name), now)
        pair.failures += 1
        if pair.failures >= policy.limit:
            pair.strikes += 1
            pair.until = now + policy.delay(pair.strikes)
            result = Refusal(pair.until - now, whole_address=False)

        host = self._touch(self._addresses, address, now)
        horizon = now - policy.window
        for old in [n for n, when in host.names.items() if when < horizon]:
            del host.names[old]
        if len(host.names) < policy.address_limit:
            host.strikes = 0  # below the limit (again): a trip starts from the first wait
        if name in host.names or len(host.names) < policy.address_limit:
            host.names[name] = now  # (never more names than the limit are kept)
        if len(host.names) >= policy.address_limit:
            host.strikes += 1
            host.until = now + policy.delay(host.strikes)
            if result is None or host.until - now >= result.wait:
                result = Refusal(host.until - now, whole_address=True)
        return result

    def succeeded(self, address: str, username: str) -> None:
        """Record a successful login: its user name's failures from this address are forgotten."""
        address = normalise_address(address)
        name = _digest(username)
        self._pairs.pop((address, name), None)
        host = self._addresses.get(address)
        if host is not None:
            host.names.pop(name, None)

    # ------------------------------------------------------------------------------------------ storage

    def _stale(self, entry: _Entry, now: float) -> bool:
        return now >= entry.until and now - entry.last > self.policy.window

    def _live(self, table: OrderedDict[K, _Entry], key: K, now: float) -> _Entry | None:
        entry = table.get(key)
        if entry is not None and self._stale(entry, now):
            del table[key]
            return None
        return entry

    def _touch(self, table: OrderedDict[K, _Entry], key: K, now: float) -> _Entry:
        """The live entry for ``key`` (a new one if there is none), marked as the most recent."""
        entry = self._live(table, key, now)
        if entry is None:
            while table:  # entries are in order of their last failure: stale ones are at the front
                oldest = next(iter(table.values()))
                if not self._stale(oldest, now) and len(table) < self.policy.max_tracked:
                    break
                table.popitem(last=False)
            entry = table[key] = _Entry(last=now)
        else:
            entry.last = now
            table.move_to_end(key)
        return entry


class Throttle:
    """At most one report per ``interval`` seconds of an event that may come in floods.

    ``event()`` counts an event and answers how many to report now (this one and those held back since
    the last report), or None to stay quiet; ``flush()`` hands over the held-back count when no further
    event came (call it ``due_in()`` seconds later).
    """

    def __init__(self, interval: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last: float | None = None
        self.pending = 0

    def event(self) -> int | None:
        now = self._clock()
        self.pending += 1
        if self._last is not None and now - self._last < self.interval:
            return None
        self._last = now
        count, self.pending = self.pending, 0
        return count

    def due_in(self) -> float:
        """Seconds until a report may be made again."""
        if self._last is None:
            return 0.0
        return max(0.0, self._last + self.interval - self._clock())

    def flush(self) -> int:
        """The held-back count, reported now (0 if none)."""
        count, self.pending = self.pending, 0
        if count:
            self._last = self._clock()
        return count
