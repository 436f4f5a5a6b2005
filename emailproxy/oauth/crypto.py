"""The reference-compatible token encryption scheme, and a cache of derived keys.

Scheme (the same as the reference program's, so either program reads the other's config file):
key = urlsafe_b64encode(PBKDF2-HMAC-SHA256(UTF-8 password, b64decode(token_salt), iterations, 32 bytes)),
then Fernet with that key. New writes use :data:`ITERATIONS`; a cache without ``token_iterations``
was written with :data:`LEGACY_ITERATIONS`.

Deriving a key costs about 0.13 s of CPU, so derived keys are kept in a bounded in-memory
:class:`KeyCache`. Its entries are looked up by salt, iteration count and an HMAC of the password
under a random per-process pepper, so no plaintext password is ever a dictionary key.
Nothing in this module logs anything: key material must never reach a log.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

#: PBKDF2 iteration count for every new write (the reference's current value).
ITERATIONS = 1_200_000
#: The count a cache was written with when it has no ``token_iterations`` key.
LEGACY_ITERATIONS = 100_000
SALT_BYTES = 16
KEY_BYTES = 32
#: Most derived keys kept in memory at once.
DEFAULT_CACHE_SIZE = 1024

#: Signature of a key-derivation function: (password, salt, iterations) -> raw 32-byte key.
DeriveFunction = Callable[[str, bytes, int], bytes]


class DecryptionFailed(Exception):
    """No candidate key decrypts the value: the password is wrong (or the value is damaged)."""


class KeyNotCached(Exception):
    """Raised by the non-deriving fast path when a key would have to be derived first."""


def derive_key(password: str, salt: bytes, iterations: int) -> bytes:
    """PBKDF2-HMAC-SHA256 of the UTF-8 password: the raw 32-byte key (blocking, CPU-heavy)."""
    kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, iterations=iterations)
    return kdf.derive(password.encode("utf-8"))


def fernet_key(derived: bytes) -> bytes:
    """The Fernet key for a raw derived key (urlsafe base64 with padding)."""
    return base64.urlsafe_b64encode(derived)


def new_salt() -> str:
    """A fresh ``token_salt`` value: 16 random bytes in standard base64."""
    return base64.b64encode(os.urandom(SALT_BYTES)).decode("ascii")


def decode_salt(token_salt: str | None) -> bytes | None:
    """The raw salt of a stored ``token_salt``, or None when it is absent or not valid base64."""
    if not token_salt:
        return None
    try:
        salt = base64.b64decode(token_salt)
    except (binascii.Error, ValueError):
        return None
    return salt or None


def parse_iterations(token_iterations: str | None) -> int | None:
    """The stored iteration count, or None when absent or unusable (then the legacy count applies)."""
    if token_iterations is None:
        return None
    try:
        value = int(token_iterations.strip())
    except ValueError:
        return None
    return value if value > 0 else None


class KeyCache:
    """A thread-safe LRU of derived Fernet objects, keyed by (salt, iterations, peppered password hash)."""

    def __init__(self, max_size: int = DEFAULT_CACHE_SIZE, derive: DeriveFunction = derive_key) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self._max_size = max_size
        self._derive = derive
        self._pepper = os.urandom(32)
        self._entries: OrderedDict[tuple[bytes, int, bytes], Fernet] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"KeyCache(size={len(self)}, max_size={self._max_size})"

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _key(self, password: str, salt: bytes, iterations: int) -> tuple[bytes, int, bytes]:
        digest = hmac.new(self._pepper, password.encode("utf-8"), hashlib.sha256).digest()
        return (salt, iterations, digest)

    def lookup(self, password: str, salt: bytes, iterations: int) -> Fernet | None:
        """The cached Fernet, or None. Never derives, so it is safe on the event loop."""
        key = self._key(password, salt, iterations)
        with self._lock:
            fernet = self._entries.get(key)
            if fernet is not None:
                self._entries.move_to_end(key)
            return fernet

    def get(self, password: str, salt: bytes, iterations: int) -> Fernet:
        """The Fernet for these parameters, deriving (blocking) and caching it on a miss."""
        fernet = self.lookup(password, salt, iterations)
        if fernet is not None:
            return fernet
        fernet = Fernet(fernet_key(self._derive(password, salt, iterations)))
        key = self._key(password, salt, iterations)
        with self._lock:
            self._entries[key] = fernet
            self._entries.move_to_end(key)
            while len(self._entries) > self._max_size:
                self._entries.popitem(last=False)
        return fernet

    def discard(self, password: str, salt: bytes, iterations: int) -> None:
        with self._lock:
            self._entries.pop(self._key(password, salt, iterations), None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


@dataclass(frozen=True, slots=True)
class Decrypted:
    plaintext: str
    #: the iteration count of the key that worked (not ITERATIONS means the value should be rotated)
    iterations: int

    def __repr__(self) -> str:
        return f"Decrypted(plaintext='***', iterations={self.iterations})"


class TokenCrypto:
    """Encrypts and decrypts one account's cached values for one login password.

    Decryption tries the current count first, then the stored count, then the legacy count; a key is
    derived only when the previous one failed. Encryption always uses the current count. Every method
    takes ``derive``: with ``derive=False`` it raises :class:`KeyNotCached` instead of running PBKDF2,
    so a caller can try the microsecond path on the event loop and fall back to a worker thread.
    """

    __slots__ = ("_cache", "_candidates", "_password", "salt")

    def __init__(self, cache: KeyCache, password: str, salt: bytes, stored_iterations: int | None) -> None:
        self._cache = cache
        self._password = password
        self.salt = salt
        candidates = [ITERATIONS]
        for count in (stored_iterations, LEGACY_ITERATIONS):
            if count is not None and count not in candidates:
                candidates.append(count)
        self._candidates = tuple(candidates)

    def __repr__(self) -> str:
        return f"TokenCrypto(candidates={self._candidates})"

    def _fernet(self, iterations: int, derive: bool) -> Fernet:
        if derive:
            return self._cache.get(self._password, self.salt, iterations)
        fernet = self._cache.lookup(self._password, self.salt, iterations)
        if fernet is None:
            raise KeyNotCached(iterations)
        return fernet

    def _open(self, token: str, derive: bool) -> tuple[bytes, int, Fernet]:
        data = token.encode("ascii", errors="replace")
        for iterations in self._candidates:
            fernet = self._fernet(iterations, derive)
            try:
                return fernet.decrypt(data), iterations, fernet
            except InvalidToken:
                continue
        raise DecryptionFailed("no key decrypts the stored value")

    def forget(self) -> None:
        """Drop this password's keys from the cache (call it when the password turned out to be wrong)."""
        for iterations in self._candidates:
            self._cache.discard(self._password, self.salt, iterations)

    def decrypt(self, token: str, *, derive: bool = True) -> Decrypted:
        plaintext, iterations, _ = self._open(token, derive)
        return Decrypted(plaintext.decode("utf-8", errors="replace"), iterations)

    def encrypt(self, plaintext: str, *, derive: bool = True) -> str:
        return self._fernet(ITERATIONS, derive).encrypt(plaintext.encode("utf-8")).decode("ascii")

    def rotate(self, token: str, *, derive: bool = True) -> str:
        """Re-encrypt with the current count, keeping the Fernet timestamp (as MultiFernet.rotate does)."""
        plaintext, iterations, fernet = self._open(token, derive)
        current = self._fernet(ITERATIONS, derive)
        if iterations == ITERATIONS:
            return token
        timestamp = fernet.extract_timestamp(token.encode("ascii"))
        return current.encrypt_at_time(plaintext, timestamp).decode("ascii")
