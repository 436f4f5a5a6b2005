"""The account option ``local_password_hash``: a local password bound to an account in advance.

Without it, the first login that obtains a token decides an account's local password (for client-credentials
and service-account accounts anybody who reaches the listener first). With it, every login must send the
password whose hash is stored, and the check comes before anything else: before any cached value is
decrypted, deleted or any token is requested.

Format (versioned by its first field, the scheme; PHC-like, without the leading ``$``)::

    scrypt$ln=<log2 N>,r=<block size>,p=<parallelism>$<salt>$<hash>

salt (16 random bytes) and hash (32 bytes of scrypt output over the UTF-8 password) are standard base64
without padding (padding is accepted when reading). New hashes use ln=14, r=8, p=1: about 16 MiB and
50 ms per check, roughly the cost of the token key derivation (PBKDF2, 1,200,000 iterations) for an
attacker with a GPU. Weaker or much heavier parameters are refused when the file is read.

Successful checks are remembered in memory under an HMAC of (hash, password) keyed with a random
per-process secret, so a repeated login costs microseconds and no password is kept as a lookup key.
Nothing here logs a password or a hash.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

from emailproxy.config import AccountConfig

logger = logging.getLogger("emailproxy.tokens")

KEY = "local_password_hash"
SCHEME = "scrypt"
DEFAULT_LOG_N = 14
DEFAULT_R = 8
DEFAULT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
#: accepted parameter ranges (weaker ones would make the hash cheaper to attack than the token encryption)
LOG_N_RANGE = (14, 20)
R_RANGE = (1, 32)
P_RANGE = (1, 16)
MAX_MEMORY = 256 * 1024 * 1024
#: most successful checks remembered at once
DEFAULT_CACHE_SIZE = 1024

_PARAMS_RE = re.compile(r"^ln=(\d{1,2}),r=(\d{1,2}),p=(\d{1,2})$")
_B64_RE = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")


class HashFormatError(ValueError):
    """A ``local_password_hash`` value that cannot be used; ``str()`` says what is wrong (never the value)."""


def _memory(log_n: int, r: int, p: int) -> int:
    """What OpenSSL's scrypt allocates: 128 * r * (N + 2) for V plus 128 * r * p for B."""
    return 128 * r * ((1 << log_n) + 2) + 128 * r * p


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str, what: str) -> bytes:
    if not _B64_RE.match(text):
        raise HashFormatError(f"the {what} is not base64")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise HashFormatError(f"the {what} is not base64") from None


@dataclass(frozen=True, slots=True)
class PasswordHash:
    """A parsed ``local_password_hash``."""

    log_n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    def __repr__(self) -> str:
        return f"PasswordHash(scheme={SCHEME!r}, log_n={self.log_n}, r={self.r}, p={self.p})"

    @classmethod
    def parse(cls, text: str) -> PasswordHash:
        """Parse and range-check a stored value; raises HashFormatError."""
        fields = text.strip().split("$")
        if len(fields) != 4:
            raise HashFormatError(
                f"expected 4 fields separated by '$' ({SCHEME}$ln=..,r=..,p=..$salt$hash), "
                f"found {len(fields)}"
            )
        scheme, params, salt_text, digest_text = fields
        if scheme != SCHEME:
            raise HashFormatError(f"unknown scheme '{scheme[:20]}' (this version knows '{SCHEME}')")
        match = _PARAMS_RE.match(params)
        if match is None:
            raise HashFormatError("the parameters must read ln=<number>,r=<number>,p=<number>")
        log_n, r, p = (int(group) for group in match.groups())
        for name, value, (low, high) in (("ln", log_n, LOG_N_RANGE), ("r", r, R_RANGE), ("p", p, P_RANGE)):
            if not low <= value <= high:
                raise HashFormatError(f"{name}={value} is outside {low}..{high}")
        if _memory(log_n, r, p) > MAX_MEMORY:
            raise HashFormatError(f"ln={log_n},r={r} would need more than {MAX_MEMORY >> 20} MiB per check")
        salt = _unb64(salt_text, "salt")
        digest = _unb64(digest_text, "hash")
        if not 16 <= len(salt) <= 64:
            raise HashFormatError(f"the salt has {len(salt)} bytes; 16 to 64 are accepted")
        if not 16 <= len(digest) <= 64:
            raise HashFormatError(f"the hash has {len(digest)} bytes; 16 to 64 are accepted")
        return cls(log_n, r, p, salt, digest)

    def format(self) -> str:
        return f"{SCHEME}$ln={self.log_n},r={self.r},p={self.p}${_b64(self.salt)}${_b64(self.digest)}"

    def compute(self, password: str, length: int | None = None) -> bytes:
        """scrypt of the UTF-8 password with this hash's salt and parameters (blocking, ~50 ms by default)."""
        return hashlib.scrypt(
            password.encode("utf-8", "surrogatepass"),
            salt=self.salt,
            n=1 << self.log_n,
            r=self.r,
            p=self.p,
            maxmem=_memory(self.log_n, self.r, self.p) + 1024 * 1024,
            dklen=length or len(self.digest),
        )

    def matches(self, password: str) -> bool:
        """Constant-time comparison of the password's scrypt output with the stored hash (blocking)."""
        return hmac.compare_digest(self.compute(password), self.digest)


def hash_password(
    password: str, *, log_n: int = DEFAULT_LOG_N, r: int = DEFAULT_R, p: int = DEFAULT_P
) -> str:
    """A new ``local_password_hash`` value for ``password`` with a fresh random salt (blocking)."""
    template = PasswordHash(log_n, r, p, os.urandom(SALT_BYTES), b"\0" * HASH_BYTES)
    PasswordHash.parse(template.format())  # range checks
    return PasswordHash(log_n, r, p, template.salt, template.compute(password, HASH_BYTES)).format()


def hash_problem(value: str) -> str | None:
    """Why a configured value is unusable (for the configuration reader), or None."""
    try:
        PasswordHash.parse(value)
    except HashFormatError as exc:
        return str(exc)
    return None


class VerificationCache:
    """Remembers successful checks as HMAC-SHA256(pepper, hash NUL password); bounded, thread-safe."""

    def __init__(self, max_size: int = DEFAULT_CACHE_SIZE) -> None:
        self._pepper = os.urandom(32)
        self._max_size = max_size
        self._entries: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"VerificationCache(size={len(self)})"

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _key(self, stored: str, password: str) -> bytes:
        message = (
            stored.strip().encode("ascii", "replace") + b"\0" + password.encode("utf-8", "surrogatepass")
        )
        return hmac.new(self._pepper, message, hashlib.sha256).digest()

    def known(self, stored: str, password: str) -> bool:
        key = self._key(stored, password)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return True
            return False

    def add(self, stored: str, password: str) -> None:
        key = self._key(stored, password)
        with self._lock:
            self._entries[key] = None
            self._entries.move_to_end(key)
            while len(self._entries) > self._max_size:
                self._entries.popitem(last=False)


#: the process-wide cache of successful checks (each entry is bound to one stored hash)
CACHE = VerificationCache()


def verify(stored: str, password: str, cache: VerificationCache = CACHE) -> bool:
    """Whether ``password`` matches ``stored`` (blocking). Malformed values never match."""
    if cache.known(stored, password):
        return True
    try:
        matched = PasswordHash.parse(stored).matches(password)
    except HashFormatError:
        return False
    if matched:
        cache.add(stored, password)
    return matched


async def accepts(account: AccountConfig, password: str, cache: VerificationCache = CACHE) -> bool:
    """The first step of every login: True when the account has no hash or the password matches it.

    A remembered success is answered on the event loop; a real check (~50 ms) runs in a worker thread.
    """
    stored = account.local_password_hash
    if not stored:
        return True
    if cache.known(stored, password):
        return True
    problem = hash_problem(stored)
    if problem is not None:
        logger.error("Login for account %s refused: its %s is unusable (%s)", account.username, KEY, problem)
        return False
    if await asyncio.to_thread(verify, stored, password, cache):
        return True
    logger.warning(
        "Login for account %s refused: the password does not match the account's %s (nothing was "
        "decrypted, deleted or requested)",
        account.username,
        KEY,
    )
    return False


def binds(account: AccountConfig) -> bool:
    """True when the account's password was checked against a hash (so undecryptable values are stale)."""
    return bool(account.local_password_hash)


def stale_secret_message(account: AccountConfig, username: str) -> str | None:
    """For a client_secret_encrypted that does not open with a password the hash accepted: the failure
    text (the secret was encrypted with another password and is lost), or None without a hash."""
    if not binds(account):
        return None
    logger.error(
        "The password of account %s matches its %s but does not decrypt client_secret_encrypted, which was "
        "encrypted with a different password: write the client secret as client_secret again",
        username,
        KEY,
    )
    return (
        f"Login failed for account {username}: client_secret_encrypted was encrypted with a different "
        f"password than the one {KEY} holds; see the proxy's log"
    )
