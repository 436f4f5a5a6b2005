"""The whole-suite `--debug` secret scan. Runs after every other integration test (pytest runs the files of a
directory in alphabetical order; `--collect-only` shows this file last in tests/integration).

Every proxy the session started (tests/integration/proxy.py registers each one: `--debug` log file and
rotated logs, stdout/stderr capture, configuration file, `--cache-store` file, and the files that appeared
beside them) is scanned for every secret the session used:

- what the identity provider registered, issued or received (`IdentityProvider.session_secrets`): client
  secrets, user passwords (and wrong ones sent to its token endpoint), access and refresh tokens,
  authorisation and device codes, PKCE verifiers, client and service-account assertions;
- the passwords the tests' mail clients sent (imaplib, poplib and smtplib are wrapped below, at collection
  time, before any test runs);
- the tests' module constants named `PASSWORD`, `..._PASSWORD`, `CLIENT_SECRET`, `..._SECRET`.

Each secret is searched in plain text, percent-encoded, in standard and URL-safe base64 with and without
padding, in the SASL PLAIN, XOAUTH2 and OAUTHBEARER forms for its user, and inside every base64 run of the
artefact once decoded (which finds XOAUTH2 strings for any user). Logs may hold none. A configuration or cache
file may hold only the secrets the test itself wrote there, on the lines it wrote: a secret in a key the proxy
owns (tokens, salt, expiry) or on any line the test did not write fails. Files the proxy created (a new cache
store, a leftover temporary file) must be mode 0600; the log file is not secret (docs/security.md).

Failures name the artefact, the test that produced it and the kind of secret, never the secret itself.
"""

from __future__ import annotations

import base64
import binascii
import imaplib
import poplib
import re
import smtplib
import sys
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from emailproxy.config import CACHE_KEYS
from tests.integration.conftest import World
from tests.integration.proxy import (
    CLIENT_SECRETS,
    COMMAND_OUTPUTS,
    PROXY_RECORDS,
    ProxyRecord,
    allocate_ports,
    launch,
)

PACKAGE = Path(__file__).resolve().parents[2] / "emailproxy"
MIN_LENGTH = 8  # shorter values would match ordinary text
GRAM = 8
_CONSTANT_RE = re.compile(r"^[A-Z0-9_]*(PASSWORD|SECRET)$")
_B64_RUN_RE = re.compile(r"[A-Za-z0-9+/_-]{12,}={0,2}")
_OPTION_RE = re.compile(r"^\s*([^=:\s][^=:]*?)\s*[=:]")
_PRIVATE_KEY_RE = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")


# ---------------------------------------------------------------------------- client hooks (collection time)


def _record(kind: str, value: Any, user: Any = None) -> None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str) and value:
        CLIENT_SECRETS.append((kind, value, user if isinstance(user, str) else None))


def _install_client_hooks() -> None:
    """Wrap the stdlib mail clients so every password a test sends through them is recorded."""
    if getattr(imaplib.IMAP4, "_secret_scan_hooked", False):
        return
    imap_login, imap_authenticate = imaplib.IMAP4.login, imaplib.IMAP4.authenticate
    pop_pass, pop_apop = poplib.POP3.pass_, poplib.POP3.apop
    smtp_auth = smtplib.SMTP.auth

    def login(self: imaplib.IMAP4, user: str, password: str) -> Any:
        _record("client password", password, user)
        return imap_login(self, user, password)

    def authenticate(self: imaplib.IMAP4, mechanism: str, authobject: Callable[[bytes], Any]) -> Any:
        def recording(challenge: bytes) -> Any:
            answer = authobject(challenge)
            raw = answer.encode() if isinstance(answer, str) else answer
            if isinstance(raw, bytes) and mechanism.upper() == "PLAIN" and raw.count(b"\0") == 2:
                _, user, password = raw.split(b"\0")
                _record("client password", password, user.decode("utf-8", "replace"))
            return answer

        return imap_authenticate(self, mechanism, recording)

    def pass_(self: poplib.POP3, pswd: str) -> Any:
        _record("client password", pswd)
        return pop_pass(self, pswd)

    def apop(self: poplib.POP3, user: str, password: str) -> Any:
        _record("client password", password, user)
        return pop_apop(self, user, password)

    def auth(self: smtplib.SMTP, mechanism: str, authobject: Any, *, initial_response_ok: bool = True) -> Any:
        _record("client password", getattr(self, "password", None), getattr(self, "user", None))
        return smtp_auth(self, mechanism, authobject, initial_response_ok=initial_response_ok)

    imaplib.IMAP4.login = login  # type: ignore[method-assign]
    imaplib.IMAP4.authenticate = authenticate  # type: ignore[method-assign]
    poplib.POP3.pass_ = pass_  # type: ignore[method-assign]
    poplib.POP3.apop = apop  # type: ignore[method-assign]
    smtplib.SMTP.auth = auth  # type: ignore[method-assign]
    imaplib.IMAP4._secret_scan_hooked = True  # type: ignore[attr-defined]


_install_client_hooks()


# ---------------------------------------------------------------------------------------------- the scanner


@dataclass(frozen=True)
class Secret:
    kind: str
    value: str
    user: str | None = None


def _b64_forms(data: bytes) -> dict[str, str]:
    standard = base64.b64encode(data).decode()
    urlsafe = base64.urlsafe_b64encode(data).decode()
    return {
        "base64": standard,
        "base64 without padding": standard.rstrip("="),
        "URL-safe base64": urlsafe,
        "URL-safe base64 without padding": urlsafe.rstrip("="),
    }


def forms(secret: Secret) -> dict[str, str]:
    """Every encoding of the secret that must not appear: name -> text."""
    data = secret.value.encode("utf-8")
    found = {"plain": secret.value}
    for name, quoted in (
        ("percent-encoded", urllib.parse.quote(secret.value, safe="")),
        ("form-encoded", urllib.parse.quote_plus(secret.value)),
    ):
        if quoted != secret.value:
            found[name] = quoted
    found.update(_b64_forms(data))
    if secret.user:
        user = secret.user.encode("utf-8")
        if "password" in secret.kind:
            found["SASL PLAIN"] = base64.b64encode(b"\0" + user + b"\0" + data).decode()
            found["SASL PLAIN with authzid"] = base64.b64encode(user + b"\0" + user + b"\0" + data).decode()
        if "access token" in secret.kind:
            xoauth2 = b"user=" + user + b"\x01auth=Bearer " + data + b"\x01\x01"
            found["XOAUTH2"] = base64.b64encode(xoauth2).decode()
            found["OAUTHBEARER"] = base64.b64encode(
                b"n,a=" + user + b",\x01auth=Bearer " + data + b"\x01\x01"
            ).decode()
    return {name: text for name, text in found.items() if len(text) >= GRAM}


@dataclass
class Scanner:
    """Finds any form of any secret in a text in one pass (an index of each form's first GRAM characters)."""

    secrets: list[Secret]
    plain_only: bool = False
    index: dict[str, list[tuple[str, Secret, str]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for secret in self.secrets:
            chosen = {"plain": secret.value} if self.plain_only else forms(secret)
            for name, text in chosen.items():
                self.index.setdefault(text[:GRAM], []).append((text, secret, name))

    @property
    def form_count(self) -> int:
        return sum(len(entries) for entries in self.index.values())

    def find(self, text: str) -> set[tuple[Secret, str]]:
        hits: set[tuple[Secret, str]] = set()
        index = self.index
        for position in range(len(text) - GRAM + 1):
            entries = index.get(text[position : position + GRAM])
            if entries:
                hits.update(
                    (secret, name) for form, secret, name in entries if text.startswith(form, position)
                )
        return hits


def decoded_runs(text: str) -> Iterable[str]:
    """Every base64 (standard or URL-safe) run of the text, decoded (as Latin-1, so bytes map 1:1)."""
    for match in _B64_RUN_RE.finditer(text):
        run = match.group(0).rstrip("=").replace("-", "+").replace("_", "/")
        run = run[: len(run) - (len(run) % 4 == 1)]
        try:
            yield base64.b64decode(run + "=" * (-len(run) % 4)).decode("latin-1")
        except (binascii.Error, ValueError):
            continue


@dataclass
class Finding:
    where: str
    test: str
    what: str

    def __str__(self) -> str:
        return f"{self.where} (from {self.test}): {self.what}"


@dataclass
class Scan:
    secrets: list[Secret]
    findings: list[Finding] = field(default_factory=list)
    artefacts: int = 0
    bytes: int = 0
    created_checked: int = 0
    #: files that appeared beside a proxy's files but are neither its artefacts nor its temporary files
    unattributed: int = 0

    def __post_init__(self) -> None:
        self.all_forms = Scanner(self.secrets)
        self.plain = Scanner(self.secrets, plain_only=True)

    def hits(self, text: str) -> set[tuple[Secret, str]]:
        found = self.all_forms.find(text)
        for decoded in decoded_runs(text):
            found |= {(secret, f"{name} inside a base64 string") for secret, name in self.plain.find(decoded)}
        return found

    def report(self, where: Path, test: str, hits: Iterable[tuple[Secret, str]], context: str = "") -> None:
        for kind, name in sorted({(secret.kind, name) for secret, name in hits}):
            self.findings.append(Finding(str(where), test, f"{kind} ({name}){context}"))

    def log(self, path: Path, test: str, text: str) -> None:
        """A log or output capture: no secret in any form, no private key."""
        self.count(text)
        self.report(path, test, self.hits(text))
        if _PRIVATE_KEY_RE.search(text):
            self.findings.append(Finding(str(path), test, "a PEM private key"))

    def settings(self, path: Path, test: str, text: str, written: str) -> None:
        """A configuration or cache file: secrets only on lines the test wrote, never in the proxy's keys."""
        self.count(text)
        written_lines = {line.strip() for line in written.splitlines()}
        for number, line in enumerate(text.splitlines(), 1):
            hits = self.hits(line)
            if not hits:
                continue
            option = _OPTION_RE.match(line)
            key = option.group(1).strip().lower() if option else None
            if key in CACHE_KEYS:
                self.report(path, test, hits, f" in the proxy's key '{key}' on line {number}")
            elif line.strip() not in written_lines:
                self.report(path, test, hits, f" on line {number}, which the test did not write")

    def created(self, path: Path, test: str, mode: int) -> None:
        self.created_checked += 1
        if mode != 0o600:
            self.findings.append(Finding(str(path), test, f"created with mode {oct(mode)}, not 0o600"))

    def count(self, text: str) -> None:
        self.artefacts += 1
        self.bytes += len(text)

    def record(self, record: ProxyRecord) -> None:
        contents = record.snapshots or {path: data for path in record.files() if (data := _read(path))}
        logs = {
            record.log_path,
            record.stderr_path,
            *record.log_path.parent.glob(record.log_path.name + ".*"),
        }
        others = {other.log_path for other in PROXY_RECORDS} | {other.stderr_path for other in PROXY_RECORDS}
        others |= {other.config_path for other in PROXY_RECORDS if other is not record}
        for path, data in contents.items():
            text = data.decode("utf-8", "replace")
            if path in logs:
                self.log(path, record.test, text)
            elif path == record.config_path:
                self.settings(path, record.test, text, record.config_written.decode("utf-8", "replace"))
            elif path == record.cache_store:
                self.settings(
                    path, record.test, text, (record.cache_written or b"").decode("utf-8", "replace")
                )
            elif _is_temp_of(path, record) and path not in others:
                self.settings(path, record.test, text, "")  # a leftover of an interrupted save
        cache_created = record.cache_store is not None and record.cache_written is None
        for path, mode in record.created.items():
            if (cache_created and path == record.cache_store) or _is_temp_of(path, record):
                self.created(path, record.test, mode)
            elif path not in logs and path not in others:
                self.unattributed += 1  # written by the test (keys, a second configuration ...)


def _is_temp_of(path: Path, record: ProxyRecord) -> bool:
    names = [record.config_path.name] + ([record.cache_store.name] if record.cache_store else [])
    return any(path.name.startswith(f".{name}.") and path.name.endswith(".tmp") for name in names)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def session_secrets(world: World) -> tuple[list[Secret], Counter[str]]:
    """Every secret to search for, and why some were left out (too short, or a word the proxy prints)."""
    raw = [Secret(kind, value, user) for kind, value, user in world.idp.session_secrets()]
    raw += [Secret(kind, value, user) for kind, value, user in CLIENT_SECRETS]
    for name, module in list(sys.modules.items()):
        if name.startswith("tests.integration.") and module is not None:
            for constant, value in vars(module).items():
                if isinstance(value, str) and _CONSTANT_RE.match(constant):
                    raw.append(Secret(f"test constant {constant}", value))
    source = "\n".join(path.read_text() for path in PACKAGE.rglob("*.py"))
    kept: dict[tuple[str, str | None], Secret] = {}
    skipped: Counter[str] = Counter()
    for secret in raw:
        if len(secret.value) < MIN_LENGTH:
            skipped["shorter than 8 characters"] += 1
        elif secret.value in source:
            skipped["appears in the proxy's own source"] += 1
        else:
            kept.setdefault((secret.value, secret.user), secret)
    return list(kept.values()), skipped


# ------------------------------------------------------------------------------------------------- tests


def test_scanner_finds_every_form(tmp_path: Path) -> None:
    """The scanner itself: each encoding of a planted secret is found, and only where it must not be."""
    token = Secret("access token", "at-planted-Zq81xYw0_token", "planted@example.org")
    password = Secret("client password", "planted-password-Kd93", "planted@example.org")
    scan = Scan([token, password])
    for name, text in {**forms(token), **forms(password)}.items():
        assert scan.hits(f"2024-01-01 DEBUG line with {text} in it"), name
    wrapped = base64.b64encode(b"prefix:" + token.value.encode() + b":suffix").decode()
    assert scan.hits(f"data {wrapped} end") == {(token, "plain inside a base64 string")}
    assert scan.hits("user planted@example.org logged in; password ***; [[ credentials hidden ]]") == set()

    written = f"[planted@example.org]\nclient_secret = {password.value}\n"
    scan.settings(tmp_path / "ok.config", "t", written + "token_salt = c2FsdA==\n", written)
    assert scan.findings == []
    scan.settings(tmp_path / "owned.config", "t", written + f"access_token = {token.value}\n", written)
    scan.settings(tmp_path / "added.config", "t", written + f"# {password.value}\n", written)
    scan.log(tmp_path / "proxy.log", "t", "-----BEGIN PRIVATE KEY-----\nMIIE\n")
    scan.created(tmp_path / "cache", "t", 0o644)
    text = "\n".join(str(finding) for finding in scan.findings)
    assert "owned.config (from t): access token (plain) in the proxy's key 'access_token'" in text
    assert "added.config (from t): client password (plain) on line 3, which the test did not write" in text
    assert "a PEM private key" in text and "not 0o600" in text
    assert token.value not in text and password.value not in text  # failures never show the secret


def _own_scenario(world: World, tmp_path: Path) -> None:
    """A small run for when this file runs alone: a refresh, a wrong password, IMAP, POP and SMTP."""
    client_id, client_secret = "scan-client", "scan-client-secret-Vb72"
    world.idp.register_client(client_id, client_secret)
    world.idp.expires_in = 300  # below the proxy's renewal margin: the second login refreshes
    user, password = world.new_user("scan"), "scan-password-Hs61"
    world.idp.register_user(user, password)
    ports = allocate_ports("IMAP", "POP", "SMTP")
    d, p = world.dovecot.ports, world.postfix.ports
    sections = {
        f"IMAP-{ports['IMAP']}": {"server_address": d.host, "server_port": str(d.imaps)},
        f"POP-{ports['POP']}": {"server_address": d.host, "server_port": str(d.pop3s)},
        f"SMTP-{ports['SMTP']}": {
            "server_address": "127.0.0.1",
            "server_port": str(p.submission),
            "server_starttls": "True",
        },
        user: {
            "token_url": world.idp.token_url(),
            "oauth2_scope": "https://outlook.office365.com/IMAP.All",
            "oauth2_flow": "password",
            "client_id": client_id,
            "client_secret": client_secret,
        },
    }
    proxy = launch(world.ca_path, tmp_path, sections, ports)
    try:
        for _ in range(2):
            with imaplib.IMAP4("127.0.0.1", ports["IMAP"], timeout=20) as imap:
                assert imap.login(user, password)[0] == "OK"
        with (
            imaplib.IMAP4("127.0.0.1", ports["IMAP"], timeout=20) as imap,
            pytest.raises(imaplib.IMAP4.error),
        ):
            imap.login(user, "scan-wrong-password-Ue40")
        pop = poplib.POP3("127.0.0.1", ports["POP"], timeout=20)
        try:
            pop.user(user)
            assert pop.pass_(password).startswith(b"+OK")
        finally:
            pop.quit()
        with smtplib.SMTP("127.0.0.1", ports["SMTP"], timeout=20) as smtp:
            smtp.ehlo("client.example.com")
            assert smtp.login(user, password)[0] == 235
    finally:
        assert proxy.stop() == 0, proxy.output()


def test_no_secret_in_anything_any_proxy_wrote(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not PROXY_RECORDS:  # alone (or first): never pass without having scanned a real run
        _own_scenario(world, tmp_path)
    assert PROXY_RECORDS, "no proxy was started"
    secrets, skipped = session_secrets(world)
    kinds = Counter("test constant" if s.kind.startswith("test") else s.kind for s in secrets)
    passwords = kinds["client password"] + kinds["user password"]
    assert kinds["access token"] > 0 and kinds["client secret"] > 0 and passwords > 0, kinds
    scan = Scan(secrets)
    for record in PROXY_RECORDS:
        scan.record(record)
    for test, command, output in COMMAND_OUTPUTS:  # what `emailproxy <command>` runs printed
        scan.log(Path(f"<output of emailproxy {command}>"), test, output)
    with capsys.disabled():
        print(
            f"\nsecret scan: {len(PROXY_RECORDS)} proxy runs and {len(COMMAND_OUTPUTS)} command outputs, "
            f"{scan.artefacts} artefacts ({scan.bytes:,} "
            f"characters), {scan.created_checked} created files checked for mode 0600 "
            f"({scan.unattributed} other new files left to their tests); {len(secrets)} "
            f"secrets "
            f"({dict(sorted(kinds.items()))}) in {scan.all_forms.form_count} forms; left out: {dict(skipped)}"
        )
    assert scan.artefacts > len(PROXY_RECORDS)  # at least a log and a config per proxy
    assert scan.findings == [], "\n".join(str(finding) for finding in scan.findings)
