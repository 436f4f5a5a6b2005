"""Reading and validating the configuration file: turns the INI text into the objects of ``config``.

``load_config`` in ``emailproxy.config`` is the entry point. The file is parsed with the standard library's
``configparser`` exactly as the reference parses it; on top of that every problem is named with the file, the
section and the key. Problems that stop start-up raise ConfigError; the others become ``Config.warnings``.
"""

from __future__ import annotations

import configparser
import difflib
import io
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast
from urllib.parse import urlsplit

from emailproxy.cachestore import AwsSecretStore, CacheStoreError, is_aws_spec
from emailproxy.config import (
    ACCOUNT_KEYS,
    ALL_KEYS,
    CACHE_KEYS,
    DEFAULT_LOCAL_ADDRESS,
    FLOWS,
    GLOBAL_KEYS,
    GLOBAL_SECTION,
    SERVER_KEYS,
    TOKEN_BACKENDS,
    AccountConfig,
    Config,
    ConfigError,
    ConfigNotFoundError,
    GlobalOptions,
    Protocol,
    ServerConfig,
    describe_problem,
    find_section,
    is_catch_all_section,
    parse_boolean,
    resolve_account,
)
from emailproxy.limits import COUNT_OPTIONS
from emailproxy.oauth.credentials import setting_problems
from emailproxy.oauth.localpassword import hash_problem

_SERVER_LIKE_RE = re.compile(r"^(IMAP|POP|SMTP)-(.*)$")
_SERVER_LOOKALIKE_RE = re.compile(r"^(imap|pop3?|smtp)[-_ ]?\d+$", re.IGNORECASE)
_URL_KEYS = ("permission_url", "token_url", "redirect_uri", "redirect_listen_address")
_PATH_KEYS = ("local_certificate_path", "local_key_path", "jwt_certificate_path", "jwt_key_path")
_MARKDOWN_LINK_RE = re.compile(r"^\[[^\]]*\]\(([^)]*)\)$")
_PLACEHOLDER_RE = re.compile(r"\*\*\*\s*[Yy]our|\b(?:TENANT_ID|CLIENT_ID|YOUR_[A-Z_]+)\b|<[Yy]our[^>]*>")
_MS_SCOPE_RE = re.compile(r"^https://outlook\.office(?:365)?\.com/(.+)$", re.IGNORECASE)
_MS_SCOPE_NAMES = (
    "IMAP.AccessAsUser.All",
    "POP.AccessAsUser.All",
    "SMTP.Send",
    "SMTP.SendAsApp",
    ".default",
    "EWS.AccessAsUser.All",
)


def scope_problems(scope: str, flow: str | None, token_url: str | None = None) -> list[str]:
    """Likely mistakes in a Microsoft scope value (typos, the client-credentials ``/.default`` rule)."""
    problems: list[str] = []
    microsoft = "microsoftonline" in (token_url or "").lower()
    for item in scope.split():
        match = _MS_SCOPE_RE.match(item)
        if match is None:
            continue
        microsoft = True
        name = match.group(1)
        known = {n.casefold(): n for n in _MS_SCOPE_NAMES}
        if name.casefold() not in known:
            close = difflib.get_close_matches(name.casefold(), list(known), n=1, cutoff=0.75)
            if close:
                problems.append(f"scope '{item}' looks like a typo: did you mean '{known[close[0]]}'?")
    if flow == "client_credentials" and microsoft and not any(s.endswith("/.default") for s in scope.split()):
        problems.append(
            "the client credentials flow needs a '/.default' scope, for example "
            "'https://outlook.office365.com/.default'"
        )
    return problems


# ---------------------------------------------------------------------------------------------- reading


def _decode(data: bytes) -> tuple[str, str | None]:
    """UTF-8 (an initial BOM is dropped); other bytes fall back to Latin-1 with a warning."""
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        problem = f"the file is not valid UTF-8 (first bad byte on line {line}); read as Latin-1"
        return data.decode("latin-1"), problem


def _read_text(path: Path, what: str) -> tuple[str | None, str | None]:
    """The file's text (None if it does not exist) and an optional decoding warning."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except IsADirectoryError:
        raise ConfigError(path, f"the {what} is a directory", hint="give the path of a file") from None
    except OSError as exc:
        raise ConfigError(path, f"cannot read the {what}: {exc.strerror or exc}") from None
    return _decode(data)


def _parse(path: Path, text: str) -> tuple[configparser.ConfigParser, configparser.ConfigParser]:
    """Parse as the reference does; also return a parser with [DEFAULT] as a plain section (own keys)."""
    parser = configparser.ConfigParser(interpolation=None)
    own = configparser.ConfigParser(interpolation=None, strict=False, default_section="\x00no default\x00")
    try:
        parser.read_file(io.StringIO(text, newline=None), source=str(path))
        own.read_file(io.StringIO(text, newline=None), source=str(path))
    except configparser.DuplicateSectionError as exc:
        raise ConfigError(
            path,
            f"section [{exc.section}] appears more than once (again on line {exc.lineno})",
            section=exc.section,
            hint="merge the sections into one or delete one",
        ) from None
    except configparser.DuplicateOptionError as exc:
        raise ConfigError(
            path,
            f"the key appears more than once in this section (again on line {exc.lineno})",
            section=exc.section,
            key=exc.option,
            hint="keep only one of the lines",
        ) from None
    except configparser.MissingSectionHeaderError as exc:
        raise ConfigError(
            path,
            f"line {exc.lineno} ({exc.line.strip()!r}) comes before any [section] header",
            hint="put settings inside a section such as [IMAP-1993] or [you@example.com]",
        ) from None
    except configparser.ParsingError as exc:
        lines = ", ".join(f"line {n} ({line.strip()!r})" for n, line in exc.errors[:5])
        raise ConfigError(
            path,
            f"cannot understand {lines}",
            hint="each line must be 'key = value', a [section] header, a full-line comment "
            "starting with # or ;, or a continuation line indented deeper than its key",
        ) from None
    except configparser.Error as exc:
        raise ConfigError(path, f"cannot parse the file: {exc}") from None
    return parser, own


class _Loader:
    """One load: collects warnings and raises ConfigError with the file name filled in."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.warnings: list[str] = []

    def error(
        self, message: str, section: str | None = None, key: str | None = None, hint: str | None = None
    ) -> ConfigError:
        return ConfigError(self.path, message, section, key, hint)

    def warn(
        self,
        message: str,
        section: str | None = None,
        key: str | None = None,
        hint: str | None = None,
        path: Path | None = None,
    ) -> None:
        self.warnings.append(describe_problem(str(path or self.path), message, section, key, hint))

    # --- values

    def boolean(self, section: str, key: str, value: str) -> bool:
        parsed = parse_boolean(value)
        if parsed is None:
            raise self.error(
                f"'{value}' is not a boolean",
                section,
                key,
                "use True or False (also accepted: yes/no, on/off, 1/0)" + _inline_hint(value),
            )
        return parsed

    def port(self, value: str, section: str, key: str | None, example: int) -> int:
        where = "the section name" if key is None else "the value"
        try:
            number = int(value.strip())
        except ValueError:
            raise self.error(
                f"'{value}' in {where} is not a port number",
                section,
                key,
                f"use a number from 1 to 65535, for example {example}" + _inline_hint(value),
            ) from None
        if not 1 <= number <= 65535:
            raise self.error(
                f"port {number} in {where} is out of range",
                section,
                key,
                f"use a number from 1 to 65535, for example {example}",
            )
        return number

    def check_keys(self, section: str, keys: Iterable[str], allowed: frozenset[str], kind: str) -> None:
        for key in keys:
            if key in allowed:
                continue
            if key in ALL_KEYS:
                self.warn(f"'{key}' does not belong in {kind}, ignored", section, key, "move it")
                continue
            close = difflib.get_close_matches(key, sorted(allowed - {"documentation"}), n=1, cutoff=0.75)
            if close:
                raise self.error(f"unknown key in {kind}", section, key, f"did you mean '{close[0]}'?")
            self.warn("unknown key, ignored", section, key)

    def check_value(self, section: str, key: str, value: str) -> None:
        """Checks for an account key wherever it is written (account, catch-all and [DEFAULT] sections)."""
        if not value:
            return
        if key in _URL_KEYS:
            self.check_url(section, key, value)
        elif key == "use_pkce" and parse_boolean(value) is None:
            self.warn(
                f"'{value}' is not a boolean; PKCE is turned on (as the reference does)",
                section,
                key,
                "write use_pkce = True or use_pkce = False",
            )
        elif key == "oauth2_flow" and value not in FLOWS:
            close = difflib.get_close_matches(value, FLOWS, n=1, cutoff=0.75)
            hint = f"did you mean '{close[0]}'?" if close else "known flows: " + ", ".join(FLOWS)
            self.warn(
                f"unknown flow '{value}' (without permission_url it is sent as the grant_type)",
                section,
                key,
                hint,
            )
        elif key == _BACKEND_KEY:
            self.token_backend(section, value)
        elif key in ("client_id", "client_secret") and _PLACEHOLDER_RE.search(value):
            self.warn("still holds the sample's placeholder", section, key, "fill in your own value")
        elif key == "local_password_hash" and (problem := hash_problem(value)) is not None:
            raise self.error(
                f"not a usable password hash: {problem}",
                section,
                key,
                "set it with `emailproxy set-password ACCOUNT`, or delete the line",
            )
        if key in _PATH_KEYS and len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            self.warn(
                "the value is wrapped in quotes, which are kept as part of the path",
                section,
                key,
                "remove the quotes",
            )

    def token_backend(self, section: str, value: str) -> str:
        """A ``token_backend`` value (any letter case), or ConfigError naming the allowed ones."""
        folded = value.strip().lower()
        if folded not in TOKEN_BACKENDS:
            raise self.error(
                f"unknown token backend '{value}'",
                section,
                _BACKEND_KEY,
                "use one of " + ", ".join(TOKEN_BACKENDS) + _inline_hint(value),
            )
        return folded

    def check_url(self, section: str, key: str, value: str) -> None:
        link = _MARKDOWN_LINK_RE.match(value)
        if link is not None:
            raise self.error(
                f"'{value}' is a markdown link, not a URL",
                section,
                key,
                f"write just the address: {key} = {_link_address(value)}",
            )
        parts = urlsplit(value)
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc or " " in value:
            if key == "redirect_uri" and parts.scheme and parts.netloc and " " not in value:
                self.warn(
                    f"'{value}' is not an http(s) address; only --external-auth can receive it", section, key
                )
                return
            raise self.error(
                f"'{value}' is not an http:// or https:// URL",
                section,
                key,
                "write the full address, for example https://login.microsoftonline.com/..."
                if key in ("permission_url", "token_url")
                else "write the full address, for example http://localhost:8080",
            )
        if _PLACEHOLDER_RE.search(value):
            self.warn(
                "the URL still holds a placeholder from the sample",
                section,
                key,
                "replace it with your own value, such as your tenant ID",
            )


def _link_address(value: str) -> str:
    """The address in a markdown link ``[text](target)``: the text when it is a URL (targets pasted from
    rendered pages often carry junk such as ``%22%5C``), else the target."""
    text, _, target = value[1:-1].partition("](")
    return text if urlsplit(text).scheme.lower() in ("http", "https") else target


def _inline_hint(value: str) -> str:
    return "; inline comments are not supported" if "#" in value or ";" in value else ""


def _is_loopback(address: str) -> bool:
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def _load_globals(
    loader: _Loader, parser: configparser.ConfigParser, own: configparser.ConfigParser
) -> GlobalOptions:
    if not parser.has_section(GLOBAL_SECTION):
        return GlobalOptions()
    section = parser[GLOBAL_SECTION]
    loader.check_keys(GLOBAL_SECTION, own[GLOBAL_SECTION], GLOBAL_KEYS, "the [emailproxy] section")
    values: dict[str, Any] = {
        f.name: loader.boolean(GLOBAL_SECTION, f.name, section[f.name])
        for f in fields(GlobalOptions)
        if f.name in section
        and f.name not in (_WAIT_KEY, _TIMEOUT_KEY, _BACKEND_KEY)
        and f.name not in COUNT_OPTIONS
    }
    wait = GlobalOptions().authorisation_wait_seconds
    if section.get(_WAIT_KEY, "").strip():
        wait = _seconds(loader, section[_WAIT_KEY])
    timeout = GlobalOptions().token_request_timeout
    if section.get(_TIMEOUT_KEY, "").strip():
        timeout = _timeout_seconds(loader, section[_TIMEOUT_KEY])
    counts: dict[str, Any] = {k: _count(loader, k, section[k]) for k in COUNT_OPTIONS if section.get(k)}
    options = GlobalOptions(**values, authorisation_wait_seconds=wait, token_request_timeout=timeout)
    if section.get(_BACKEND_KEY, "").strip():
        options = replace(options, token_backend=loader.token_backend(GLOBAL_SECTION, section[_BACKEND_KEY]))
    return replace(options, **counts)


_WAIT_KEY = "authorisation_wait_seconds"
_BACKEND_KEY = "token_backend"
_TIMEOUT_KEY = "token_request_timeout"


def _count(loader: _Loader, key: str, value: str) -> int:
    low, high, example = COUNT_OPTIONS[key]
    number = int(value) if value.strip().isdecimal() else -1
    if not low <= number <= high:
        raise loader.error(f"'{value}' is not a whole number from {low} to {high}", GLOBAL_SECTION, key,
                           f"for example {key} = {example}" + _inline_hint(value))
    return number


def _timeout_seconds(loader: _Loader, value: str) -> float:
    try:
        number = float(value.strip())
    except ValueError:
        number = 0.0
    if not 0 < number < float("inf"):  # also refuses nan
        raise loader.error(
            f"'{value}' is not a number of seconds above 0",
            GLOBAL_SECTION,
            _TIMEOUT_KEY,
            "for example token_request_timeout = 30" + _inline_hint(value),
        )
    return number


def _seconds(loader: _Loader, value: str) -> float:
    try:
        number = float(value.strip())
    except ValueError:
        number = -1.0
    if not 0 <= number <= 3600:
        raise loader.error(
            f"'{value}' is not a number of seconds from 0 to 3600",
            GLOBAL_SECTION,
            _WAIT_KEY,
            "for example authorisation_wait_seconds = 60" + _inline_hint(value),
        )
    return number


def _load_server(
    loader: _Loader,
    name: str,
    protocol: Protocol,
    port_text: str,
    section: configparser.SectionProxy,
    own_keys: Iterable[str],
) -> ServerConfig:
    example = {"IMAP": 993, "POP": 995, "SMTP": 587}[protocol]
    local_port = loader.port(port_text, name, None, {"IMAP": 1993, "POP": 1995, "SMTP": 1587}[protocol])
    loader.check_keys(name, own_keys, SERVER_KEYS, "a server section")
    server_address = section.get("server_address", "").strip()
    if not server_address:
        raise loader.error(
            "server_address is missing",
            name,
            "server_address",
            "add the upstream mail server's host name, for example outlook.office365.com",
        )
    if "server_port" not in section or not section["server_port"].strip():
        raise loader.error(
            "server_port is missing",
            name,
            "server_port",
            f"add the upstream server's port, for example server_port = {example}",
        )
    server_port = loader.port(section["server_port"], name, "server_port", example)
    local_address = section.get("local_address", "").strip() or DEFAULT_LOCAL_ADDRESS
    cert = section.get("local_certificate_path") or None
    key = section.get("local_key_path") or None
    if "server_starttls" in section:
        server_starttls = loader.boolean(name, "server_starttls", section["server_starttls"])
    elif "starttls" in section:
        server_starttls = loader.boolean(name, "starttls", section["starttls"])
    else:
        server_starttls = False
    local_starttls = loader.boolean(name, "local_starttls", section.get("local_starttls", "False"))
    if local_starttls and not (cert and key):
        missing = " and ".join(
            k for k, v in (("local_certificate_path", cert), ("local_key_path", key)) if not v
        )
        raise loader.error(
            f"local_starttls needs a certificate and key, but {missing} is not set",
            name,
            "local_starttls",
            "set local_certificate_path and local_key_path, or remove local_starttls",
        )
    if bool(cert) != bool(key):
        loader.warn(
            "local TLS needs both local_certificate_path and local_key_path; only one is set, so the "
            "listener uses plain text",
            name,
        )
    for path_key, path_value in (("local_certificate_path", cert), ("local_key_path", key)):
        if path_value:
            loader.check_value(name, path_key, path_value)
            if not Path(path_value).exists():
                loader.warn(f"file '{path_value}' not found", name, path_key)
    if section.get("plugins", "").strip():
        loader.warn("plugins are not supported; the value is ignored", name, "plugins")
    if not _is_loopback(local_address) and not (cert and key):
        loader.warn(
            f"the listener on {local_address} is reachable from other machines and has no TLS; "
            "passwords would cross the network in clear",
            name,
            "local_address",
            "use local_address = 127.0.0.1 or set local_certificate_path and local_key_path",
        )
    return ServerConfig(
        section=name,
        protocol=protocol,
        local_port=local_port,
        local_address=local_address,
        server_address=server_address,
        server_port=server_port,
        server_starttls=server_starttls,
        local_starttls=local_starttls,
        local_certificate_path=cert,
        local_key_path=key,
    )


def _load_cache_store(loader: _Loader, cache_path: Path) -> dict[str, dict[str, str]]:
    sections: Mapping[str, Mapping[str, str]]
    if is_aws_spec(cache_path):  # aws:<secret>: the store's pre-loaded mapping instead of a file
        try:
            sections = AwsSecretStore(str(cache_path)).load()
        except CacheStoreError as exc:
            raise ConfigError(cache_path, exc.message, hint=exc.hint) from None
    else:
        text, problem = _read_text(cache_path, "cache store")
        if text is None:
            return {}
        if problem:
            loader.warn(problem, path=cache_path)
        sections = _parse(cache_path, text)[0]
    result: dict[str, dict[str, str]] = {}
    for name in sections:
        if name == configparser.DEFAULTSECT:
            continue
        values = sections[name]
        result[name] = {k.lower(): v for k, v in values.items() if k.lower() in CACHE_KEYS}
        for key in values:
            if key.lower() not in CACHE_KEYS:
                loader.warn("not a token cache key, ignored", name, key, path=cache_path)
    return result


def _merge_cache(
    loader: _Loader,
    accounts: dict[str, dict[str, str]],
    cache: Mapping[str, Mapping[str, str]],
    allow_catch_all: bool,
    cache_path: Path,
) -> None:
    """Cache keys come from the cache store: drop those in account sections, then add the cache file's."""
    for name, options in accounts.items():
        if is_catch_all_section(name):
            continue  # catch-all sections may hold a pre-encrypted secret: the cache only overrides it
        stale = [k for k in CACHE_KEYS if k in options]
        for key in stale:
            del options[key]
        if stale:
            loader.warn(
                f"token cache keys ({', '.join(stale)}) are ignored because a cache store is used", name
            )
    for name, values in cache.items():
        target = name if name in accounts else find_section(accounts, name, is_catch_all_section(name))
        if target is None:
            if not allow_catch_all:
                loader.warn(
                    "the cache store holds tokens for an account with no section in the configuration "
                    "file; they are ignored",
                    name,
                    path=cache_path,
                )
                continue
            accounts[name] = target_options = {}
        else:
            target_options = accounts[target]
        target_options.update(values)


def _check_accounts(
    loader: _Loader,
    parser: configparser.ConfigParser,
    own: configparser.ConfigParser,
    accounts: Mapping[str, Mapping[str, str]],
    options: GlobalOptions,
) -> None:
    folded: dict[str, str] = {}
    for name in accounts:
        if not parser.has_section(name):
            continue  # created from the cache store
        catch_all = is_catch_all_section(name)
        loader.check_keys(name, own[name], ACCOUNT_KEYS, "an account section")
        for key in own[name]:
            loader.check_value(name, key, parser[name][key])
        earlier = folded.setdefault(name.casefold(), name)
        if earlier != name:
            loader.warn(f"differs from [{earlier}] only in letter case; logins match [{earlier}] first", name)
        if catch_all:
            if not options.allow_catch_all_accounts:
                loader.warn(
                    "catch-all section ignored because allow_catch_all_accounts is off",
                    name,
                    hint="set allow_catch_all_accounts = True in [emailproxy] to use it",
                )
            elif (resolved := resolve_account(accounts, name, True)) is not None:
                _check_credential_files(loader, resolved)
            continue
        account = resolve_account(accounts, name, options.allow_catch_all_accounts)
        if account is not None:
            _check_account(loader, account)


def _check_account(loader: _Loader, account: AccountConfig) -> None:
    name = account.section
    raw_flow = account.written_oauth2_flow
    missing = [k for k in ("token_url", "client_id") if not getattr(account, k)]
    if not account.oauth2_scope and not (account.oauth2_flow == "password" and account.oauth2_resource):
        missing.append("oauth2_scope")
    if missing:
        loader.warn(f"missing {', '.join(missing)}: logins for this account will fail", name)
    if account.permission_url is None and account.oauth2_flow is None:
        loader.warn(
            "no permission_url and no oauth2_flow: logins for this account will fail",
            name,
            hint="add permission_url for interactive sign-in, or set oauth2_flow (for example "
            "client_credentials)",
        )
    elif account.permission_url and raw_flow not in (None, "authorization_code", "device"):
        loader.warn(
            f"oauth2_flow = {raw_flow} is overridden: with permission_url set, the authorization code "
            "flow is used (as the reference does)",
            name,
            "oauth2_flow",
            hint="remove permission_url to use a non-interactive flow",
        )
    if account.oauth2_flow == "authorization_code" and not account.redirect_uri:
        loader.warn(
            "the authorization code flow needs a redirect_uri",
            name,
            "redirect_uri",
            hint="add for example redirect_uri = http://localhost:8080",
        )
    if account.oauth2_scope:
        for problem in scope_problems(account.oauth2_scope, account.oauth2_flow, account.token_url):
            loader.warn(problem, name, "oauth2_scope")
    _check_credential_files(loader, account)


def _check_credential_files(loader: _Loader, account: AccountConfig) -> None:
    """Key and certificate files that token requests will read must exist and be readable."""
    for problem in setting_problems(account):
        if problem.fatal:
            raise loader.error(problem.message, account.section, problem.key, problem.hint)
        loader.warn(problem.message, account.section, problem.key, problem.hint)


def read_config(path: Path, cache_path: Path | None, require_servers: bool) -> Config:
    """What ``config.load_config`` does (see there)."""
    loader = _Loader(path)
    text, problem = _read_text(path, "configuration file")
    if text is None:
        raise ConfigNotFoundError(
            path,
            "configuration file not found",
            hint="create it (the sample emailproxy.config shows every setting) or pass "
            "--config-file with the right path",
        )
    if problem:
        loader.warn(problem)
    parser, own = _parse(path, text)
    defaults_section = own["DEFAULT"] if own.has_section("DEFAULT") else None
    if defaults_section is not None:
        loader.check_keys("DEFAULT", defaults_section, ALL_KEYS, "the [DEFAULT] section")
        for key, value in defaults_section.items():
            if key in ACCOUNT_KEYS:
                loader.check_value("DEFAULT", key, value)
    options = _load_globals(loader, parser, own)

    servers: list[ServerConfig] = []
    accounts: dict[str, dict[str, str]] = {}
    for name in parser.sections():
        section = parser[name]
        if name == GLOBAL_SECTION:
            continue
        match = _SERVER_LIKE_RE.match(name)
        if match is not None:
            protocol = cast(Protocol, match.group(1))
            servers.append(_load_server(loader, name, protocol, match.group(2), section, own[name]))
        elif "@" in name:
            accounts[name] = dict(section.items())
        elif _SERVER_LOOKALIKE_RE.match(name) or name.casefold() == GLOBAL_SECTION:
            loader.warn(
                "section ignored: server sections are named [IMAP-<port>], [POP-<port>] or "
                "[SMTP-<port>] (upper case) and the global section [emailproxy]",
                name,
            )

    seen: dict[tuple[str, int], str] = {}
    for server in servers:
        other = seen.setdefault((server.local_address, server.local_port), server.section)
        if other != server.section:
            raise loader.error(
                f"listens on the same address and port as [{other}]",
                server.section,
                hint="give each server section its own port",
            )
    if require_servers and not servers:
        raise loader.error(
            "no server sections found",
            hint="add a [IMAP-1993] section (or [POP-1995], [SMTP-1587]) with server_address "
            "and server_port; see the sample emailproxy.config",
        )

    if cache_path is not None:
        cache = _load_cache_store(loader, cache_path)
        _merge_cache(loader, accounts, cache, options.allow_catch_all_accounts, cache_path)

    _check_accounts(loader, parser, own, accounts, options)
    frozen = MappingProxyType({n: MappingProxyType(o) for n, o in accounts.items()})
    return Config(
        path=path,
        options=options,
        servers=tuple(servers),
        account_sections=frozen,
        warnings=tuple(loader.warnings),
        cache_store=cache_path,
    )
