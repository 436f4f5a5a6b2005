"""emailproxy.oauth.crypto against the reference's test vectors and the files the reference wrote."""

from __future__ import annotations

import base64
import configparser
import json
import threading
from pathlib import Path

import pytest
from cryptography.fernet import Fernet, InvalidToken

from emailproxy.oauth import crypto
from emailproxy.oauth.crypto import (
    ITERATIONS,
    LEGACY_ITERATIONS,
    DecryptionFailed,
    KeyCache,
    KeyNotCached,
    TokenCrypto,
    decode_salt,
    derive_key,
    fernet_key,
    new_salt,
    parse_iterations,
)

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "reference-written"
VECTORS = json.loads((FIXTURES / "vectors.json").read_text(encoding="utf-8"))["vectors"]
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text(encoding="utf-8"))


class CountingDerive:
    """A derive function for KeyCache that counts calls (and really derives, so results stay correct)."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, password: str, salt: bytes, iterations: int) -> bytes:
        with self._lock:
            self.calls.append(iterations)
        return derive_key(password, salt, iterations)


# ---------------------------------------------------------------------------------- vectors


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_key_derivation(vector):
    salt = decode_salt(vector["token_salt"])
    assert salt == bytes.fromhex(vector["salt_hex"])
    assert vector["password"].encode("utf-8") == bytes.fromhex(vector["password_utf8_hex"])
    derived = derive_key(vector["password"], salt, vector["iterations"])
    assert derived.hex() == vector["derived_key_hex"]
    assert derived[:16].hex() == vector["signing_key_hex"]
    assert derived[16:].hex() == vector["encryption_key_hex"]
    assert fernet_key(derived).decode("ascii") == vector["fernet_key"]


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_token_decrypts_and_reports_its_count(vector):
    cache = KeyCache()
    salt = decode_salt(vector["token_salt"])
    assert salt is not None
    stored = vector["iterations"] if vector["iterations"] != LEGACY_ITERATIONS else None
    result = TokenCrypto(cache, vector["password"], salt, stored).decrypt(vector["fernet_token"])
    assert result.plaintext == vector["plaintext"]
    assert result.iterations == vector["iterations"]
    fernet = cache.get(vector["password"], salt, vector["iterations"])
    assert fernet.extract_timestamp(vector["fernet_token"].encode()) == vector["fernet_time"]
    # the token carries the vector's IV right after version byte and timestamp
    raw = base64.urlsafe_b64decode(vector["fernet_token"])
    assert raw[0] == 0x80 and raw[9:25].hex() == vector["fernet_iv_hex"]


def test_vector_rejects_wrong_password():
    vector = VECTORS[0]
    salt = decode_salt(vector["token_salt"])
    assert salt is not None
    with pytest.raises(DecryptionFailed):
        TokenCrypto(KeyCache(), vector["password"] + "x", salt, vector["iterations"]).decrypt(
            vector["fernet_token"]
        )


def test_encrypt_uses_current_count_and_round_trips():
    salt = bytes(range(16))
    cache = KeyCache()
    token = TokenCrypto(cache, "pw", salt, None).encrypt("at-value")
    assert token.startswith("gAAAAA")
    assert Fernet(fernet_key(derive_key("pw", salt, ITERATIONS))).decrypt(token.encode()) == b"at-value"
    with pytest.raises(InvalidToken):
        Fernet(fernet_key(derive_key("pw", salt, LEGACY_ITERATIONS))).decrypt(token.encode())


# ---------------------------------------------------------------------------------- salts


def test_salt_helpers():
    assert decode_salt("AAECAwQFBgcICQoLDA0ODw==") == bytes(range(16))
    assert decode_salt(None) is None
    assert decode_salt("") is None
    assert decode_salt("abc") is None  # bad padding
    salts = {new_salt() for _ in range(20)}
    assert len(salts) == 20
    for salt in salts:
        assert len(base64.b64decode(salt, validate=True)) == 16
    assert parse_iterations("1200000") == 1_200_000
    assert parse_iterations(" 870000 ") == 870_000
    assert parse_iterations(None) is None
    assert parse_iterations("lots") is None
    assert parse_iterations("0") is None


# ---------------------------------------------------------------------------------- key cache


def test_key_cache_derives_once_per_parameters():
    counter = CountingDerive()
    cache = KeyCache(derive=counter)
    salt = bytes(16)
    first = cache.get("password", salt, LEGACY_ITERATIONS)
    assert cache.get("password", salt, LEGACY_ITERATIONS) is first
    assert counter.calls == [LEGACY_ITERATIONS]
    cache.get("other", salt, LEGACY_ITERATIONS)
    cache.get("password", bytes(15) + b"\x01", LEGACY_ITERATIONS)
    assert len(counter.calls) == 3
    assert cache.lookup("password", salt, LEGACY_ITERATIONS) is first
    assert cache.lookup("nobody", salt, LEGACY_ITERATIONS) is None
    assert len(counter.calls) == 3  # lookup never derives


def test_key_cache_is_bounded_lru_and_hides_passwords():
    calls: list[str] = []

    def fake_derive(password: str, salt: bytes, iterations: int) -> bytes:
        calls.append(password)
        return bytes([len(calls)]) * 32

    cache = KeyCache(max_size=2, derive=fake_derive)
    salt = bytes(16)
    cache.get("alpha-secret", salt, 1)
    cache.get("beta-secret", salt, 1)
    cache.get("alpha-secret", salt, 1)  # refreshes alpha
    cache.get("gamma-secret", salt, 1)  # evicts beta
    assert len(cache) == 2
    assert cache.lookup("beta-secret", salt, 1) is None
    assert cache.lookup("alpha-secret", salt, 1) is not None
    for key in cache._entries:
        assert b"alpha-secret" not in repr(key).encode()
    assert "secret" not in repr(cache)
    cache.discard("alpha-secret", salt, 1)
    assert cache.lookup("alpha-secret", salt, 1) is None
    cache.clear()
    assert len(cache) == 0


def test_key_cache_pepper_differs_per_instance():
    a, b = KeyCache(), KeyCache()
    assert a._key("pw", b"s", 1) != b._key("pw", b"s", 1)


def test_token_crypto_tries_current_count_before_legacy():
    vector = next(v for v in VECTORS if v["name"] == "doc-100000-legacy")
    counter = CountingDerive()
    cache = KeyCache(derive=counter)
    salt = decode_salt(vector["token_salt"])
    assert salt is not None
    tc = TokenCrypto(cache, vector["password"], salt, None)
    with pytest.raises(KeyNotCached):
        tc.decrypt(vector["fernet_token"], derive=False)
    assert counter.calls == []
    assert tc.decrypt(vector["fernet_token"]).iterations == LEGACY_ITERATIONS
    assert counter.calls == [ITERATIONS, LEGACY_ITERATIONS]
    # now both keys are cached: the fast path works without deriving
    assert tc.decrypt(vector["fernet_token"], derive=False).plaintext == vector["plaintext"]
    assert len(counter.calls) == 2


def test_token_crypto_current_token_needs_one_derivation():
    vector = next(v for v in VECTORS if v["name"] == "doc-1200000")
    counter = CountingDerive()
    salt = decode_salt(vector["token_salt"])
    assert salt is not None
    tc = TokenCrypto(KeyCache(derive=counter), vector["password"], salt, ITERATIONS)
    assert tc.decrypt(vector["fernet_token"]).plaintext == vector["plaintext"]
    assert counter.calls == [ITERATIONS]


def test_token_crypto_historic_count_is_tried():
    vector = next(v for v in VECTORS if v["name"] == "historic-870000")
    salt = decode_salt(vector["token_salt"])
    assert salt is not None
    tc = TokenCrypto(KeyCache(), vector["password"], salt, 870_000)
    assert tc.decrypt(vector["fernet_token"]).iterations == 870_000


def test_rotate_keeps_timestamp_and_moves_to_current_count():
    vector = next(v for v in VECTORS if v["name"] == "doc-100000-legacy")
    salt = decode_salt(vector["token_salt"])
    assert salt is not None
    cache = KeyCache()
    tc = TokenCrypto(cache, vector["password"], salt, None)
    rotated = tc.rotate(vector["fernet_token"])
    assert rotated != vector["fernet_token"]
    current = cache.get(vector["password"], salt, ITERATIONS)
    assert current.decrypt(rotated.encode()).decode() == vector["plaintext"]
    assert current.extract_timestamp(rotated.encode()) == vector["fernet_time"]
    with pytest.raises(InvalidToken):
        cache.get(vector["password"], salt, LEGACY_ITERATIONS).decrypt(rotated.encode())
    # a current value is left as it is
    assert tc.rotate(rotated) == rotated


def test_forget_drops_keys_of_a_wrong_password():
    cache = KeyCache()
    salt = bytes(16)
    tc = TokenCrypto(cache, "wrong", salt, LEGACY_ITERATIONS)
    token = TokenCrypto(cache, "right", salt, LEGACY_ITERATIONS).encrypt("x")
    with pytest.raises(DecryptionFailed):
        tc.decrypt(token)
    assert cache.lookup("wrong", salt, ITERATIONS) is not None
    tc.forget()
    assert cache.lookup("wrong", salt, ITERATIONS) is None
    assert cache.lookup("wrong", salt, LEGACY_ITERATIONS) is None
    assert cache.lookup("right", salt, ITERATIONS) is not None


def test_damaged_values_fail_cleanly():
    tc = TokenCrypto(KeyCache(), "pw", bytes(16), ITERATIONS)
    tc.encrypt("warm the cache")
    for junk in ("", "not a token", "gAAAAA", "ünïcode"):
        with pytest.raises(DecryptionFailed):
            tc.decrypt(junk)


def test_reprs_hold_no_secrets():
    tc = TokenCrypto(KeyCache(), "hunter2", bytes(16), None)
    assert "hunter2" not in repr(tc)
    assert "plain-value" not in repr(crypto.Decrypted("plain-value", ITERATIONS))


# ---------------------------------------------------------------------------------- fixtures


def _fixture_values() -> list[tuple[str, str, str, str, str, str, str | None]]:
    """(fixture, file, section, field, password, plaintext, stored token_iterations) for every value."""
    out = []
    for fixture, info in MANIFEST.items():
        for account, details in info["accounts"].items():
            for file_name, per_file in details["per_file"].items():
                for field in per_file["encrypted_fields"]:
                    expected = {
                        "access_token": details["access_token"],
                        "refresh_token": details["refresh_token"],
                        "client_secret_encrypted": details["client_secret"],
                    }[field]
                    out.append(
                        (
                            fixture,
                            file_name,
                            account,
                            field,
                            details["password"],
                            expected,
                            per_file["token_iterations"],
                        )
                    )
    return out


FIXTURE_VALUES = _fixture_values()
SHARED_CACHE = KeyCache()


def _read_section(fixture: str, file_name: str, section: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(FIXTURES / fixture / file_name, encoding="utf-8")
    return parser[section]


def test_fixture_values_are_all_covered():
    assert len(FIXTURE_VALUES) == 30  # MANIFEST.md: 30 encrypted values in all


@pytest.mark.parametrize(
    "fixture,file_name,section,field,password,expected,iterations",
    FIXTURE_VALUES,
    ids=[f"{v[0]}/{v[1]}/{v[2]}/{v[3]}" for v in FIXTURE_VALUES],
)
def test_fixture_values_decrypt(fixture, file_name, section, field, password, expected, iterations):
    options = _read_section(fixture, file_name, section)
    assert options.get("token_iterations") == iterations
    salt = decode_salt(options["token_salt"])
    assert salt is not None
    tc = TokenCrypto(SHARED_CACHE, password, salt, parse_iterations(options.get("token_iterations")))
    result = tc.decrypt(options[field])
    assert result.plaintext == expected
    assert result.iterations == (int(iterations) if iterations else LEGACY_ITERATIONS)


def test_fixture_values_refuse_wrong_password():
    options = _read_section("ccg_encrypted_secret", "after-login.config", "ccg@example.com")
    salt = decode_salt(options["token_salt"])
    assert salt is not None
    tc = TokenCrypto(SHARED_CACHE, "local-proxy-passwort", salt, ITERATIONS)
    for field in ("access_token", "client_secret_encrypted"):
        with pytest.raises(DecryptionFailed):
            tc.decrypt(options[field])
