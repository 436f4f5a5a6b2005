"""The configuration as frozen objects, and account lookup (reading and validation: ``configread``).

INTERFACE FILE: the dataclasses and function signatures below are the contract other modules use.

The file is read with the standard library's ``configparser`` (``interpolation=None``, strict), exactly as the
reference reads it. Sections named ``[IMAP-<port>]``, ``[POP-<port>]`` and ``[SMTP-<port>]`` are listeners,
sections whose name contains ``@`` are accounts (``[@domain]`` and ``[@]`` are catch-alls), ``[emailproxy]``
holds the global switches, and every other section is documentation and ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

Protocol = Literal["IMAP", "POP", "SMTP"]

#: Keys the proxy owns and writes back into account sections (same names as the reference).
CACHE_KEYS = (
    "client_secret_encrypted",
    "token_salt",
    "token_iterations",
    "access_token",
    "access_token_expiry",
    "refresh_token",
    "last_activity",
)

#: Cache keys read only from the account's own section (never inherited from a catch-all section).
OWN_SECTION_CACHE_KEYS = frozenset({"access_token", "access_token_expiry", "refresh_token", "last_activity"})


class ConfigError(Exception):
    """A problem that stops start-up. ``str()`` names file, section, key and what to do."""

    def __init__(
        self,
        path: str | Path,
        message: str,
        section: str | None = None,
        key: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.path = str(path)
        self.section = section
        self.key = key
        self.message = message
        self.hint = hint
        super().__init__(describe_problem(self.path, message, section, key, hint))


class ConfigNotFoundError(ConfigError):
    """The configuration file does not exist (the command line exits with status 2)."""


def describe_problem(path: str, message: str, section: str | None, key: str | None, hint: str | None) -> str:
    where = path
    if section is not None:
        where += f", section [{section}]"
    if key is not None:
        where += f", key '{key}'"
    text = f"{where}: {message}"
    if hint:
        text += f" ({hint})"
    return text


#: the default ``token_backend``: msal for Microsoft v2.0 authorities, the standards-based client elsewhere
BACKEND_AUTO = "auto"


@dataclass(frozen=True, slots=True)
class GlobalOptions:
    delete_account_token_on_password_error: bool = True
    encrypt_client_secret_on_first_use: bool = False
    use_login_password_as_client_credentials_secret: bool = False
    allow_catch_all_accounts: bool = False
    #: not in the reference: seconds a login is held while an interactive authorisation is pending
    authorisation_wait_seconds: float = 60.0
    #: not in the reference: seconds a token endpoint request may take before the login fails
    token_request_timeout: float = 30.0
    #: not in the reference: also show the authorisation page to clients on other machines
    allow_remote_authorisation_page: bool = False
    #: not in the reference: which token client accounts use by default (TOKEN_BACKENDS; see oauth.client)
    token_backend: str = BACKEND_AUTO
    #: not in the reference: open sessions (all listeners) before new connections are refused; 0: no cap
    max_connections: int = 1000
    #: not in the reference: refuse logins for a while after repeated failed local logins (emailproxy.limits)
    login_failure_backoff: bool = True
    #: failed logins for one user name from one client address before its logins are refused for a while
    login_failure_limit: int = 5
    #: different user names failing from one client address before all its logins are refused for a while
    login_failure_address_limit: int = 10


@dataclass(frozen=True, slots=True)
class ServerConfig:
    section: str  # e.g. "IMAP-1993"
    protocol: Protocol
    local_port: int
    local_address: str  # default "127.0.0.1" (we listen on loopback unless told otherwise)
    server_address: str
    server_port: int
    server_starttls: bool = False  # `server_starttls`, falling back to the legacy `starttls`
    local_starttls: bool = False
    local_certificate_path: str | None = None
    local_key_path: str | None = None

    @property
    def local_tls(self) -> bool:
        """Implicit TLS on the local listener (certificate and key set, local_starttls off)."""
        return bool(self.local_certificate_path and self.local_key_path and not self.local_starttls)


@dataclass(frozen=True, slots=True)
class CachedTokens:
    """The reference's cache keys for one account, as strings exactly as stored (None when absent)."""

    token_salt: str | None = None
    token_iterations: str | None = None
    access_token: str | None = field(default=None, repr=False)
    access_token_expiry: str | None = None
    refresh_token: str | None = field(default=None, repr=False)
    client_secret_encrypted: str | None = field(default=None, repr=False)
    last_activity: str | None = None


@dataclass(frozen=True, slots=True)
class AccountConfig:
    """Settings for one login name, resolved through account section -> [@domain] -> [@] (when allowed)."""

    username: str  # exactly as the client sent it
    section: str  # section that holds (or will hold) this account's cache keys
    matched_section: str  # the section that matched: the account's own, "@domain" or "@"
    token_url: str | None = None
    permission_url: str | None = None
    oauth2_scope: str | None = None
    oauth2_resource: str | None = None
    #: effective flow: "authorization_code" whenever permission_url is set and the flow is not "device"
    oauth2_flow: str | None = None
    redirect_uri: str | None = None
    redirect_listen_address: str | None = None
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    use_pkce: bool = False
    jwt_certificate_path: str | None = None
    jwt_key_path: str | None = None
    cached: CachedTokens = field(default_factory=CachedTokens)
    #: ``oauth2_flow`` as written in the file (before the permission_url rule), for diagnostics
    written_oauth2_flow: str | None = None
    #: not in the reference: "auto", "msal" or "standard" (the account's value, else [emailproxy]'s)
    token_backend: str = BACKEND_AUTO
    #: not in the reference: the hash a login's password must match (``emailproxy.oauth.localpassword``)
    local_password_hash: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    options: GlobalOptions
    servers: tuple[ServerConfig, ...]
    #: every section whose name contains "@", with its options (lowercased keys, [DEFAULT] applied)
    account_sections: Mapping[str, Mapping[str, str]] = field(repr=False)
    warnings: tuple[str, ...] = ()
    #: the separate token cache file (``--cache-store``) the cache keys were read from, if any
    cache_store: Path | None = None

    def find_account(self, username: str) -> AccountConfig | None:
        """Exact section, then case-insensitive, then [@domain] and [@] when catch-all is allowed."""
        return resolve_account(
            self.account_sections,
            username,
            self.options.allow_catch_all_accounts,
            default_token_backend=self.options.token_backend,
        )


# ------------------------------------------------------------------------------------------ known keys

GLOBAL_SECTION = "emailproxy"
DEFAULT_LOCAL_ADDRESS = "127.0.0.1"
SERVER_SECTION_RE = re.compile(r"^(IMAP|POP|SMTP)-(\d+)$")

GLOBAL_KEYS = frozenset(f.name for f in fields(GlobalOptions)) | {"documentation"}
SERVER_KEYS = frozenset(
    {
        "server_address",
        "server_port",
        "local_address",
        "local_certificate_path",
        "local_key_path",
        "server_starttls",
        "starttls",
        "local_starttls",
        "plugins",
        "documentation",
    }
)
ACCOUNT_SETTING_KEYS = (
    "permission_url",
    "token_url",
    "oauth2_scope",
    "oauth2_resource",
    "oauth2_flow",
    "redirect_uri",
    "redirect_listen_address",
    "client_id",
    "client_secret",
    "use_pkce",
    "jwt_certificate_path",
    "jwt_key_path",
    "local_password_hash",
    "token_backend",
)
ACCOUNT_KEYS = frozenset(ACCOUNT_SETTING_KEYS) | frozenset(CACHE_KEYS) | {"documentation"}
ALL_KEYS = GLOBAL_KEYS | SERVER_KEYS | ACCOUNT_KEYS

FLOWS = ("authorization_code", "device", "client_credentials", "password", "service_account")
#: ``token_backend`` values: msal for Microsoft v2.0 authorities (auto), msal, or the standards-based client
TOKEN_BACKENDS = ("auto", "msal", "standard")
_TRUE = frozenset({"1", "yes", "true", "on"})
_FALSE = frozenset({"0", "no", "false", "off"})


def parse_boolean(value: str) -> bool | None:
    """``configparser.getboolean`` semantics: True/False for the usual words, None for anything else."""
    folded = value.strip().lower()
    if folded in _TRUE:
        return True
    if folded in _FALSE:
        return False
    return None


def parse_use_pkce(value: str | None) -> bool:
    """``use_pkce``: booleans as written; any other non-empty value turns PKCE on (as the reference)."""
    if not value:
        return False
    parsed = parse_boolean(value)
    return True if parsed is None else parsed


def is_catch_all_section(name: str) -> bool:
    return name.startswith("@")


# ---------------------------------------------------------------------------------------------- lookup


def find_section(sections: Mapping[str, Mapping[str, str]], name: str, catch_all: bool) -> str | None:
    """Exact name first, then the first section equal when case-folded (of the same kind)."""
    if name in sections and is_catch_all_section(name) == catch_all:
        return name
    folded = name.casefold()
    for candidate in sections:
        if is_catch_all_section(candidate) == catch_all and candidate.casefold() == folded:
            return candidate
    return None


def _catch_all_chain(sections: Mapping[str, Mapping[str, str]], username: str) -> list[str]:
    chain: list[str] = []
    domain = username.rpartition("@")[2]
    if domain:
        domain_section = find_section(sections, "@" + domain, catch_all=True)
        if domain_section is not None:
            chain.append(domain_section)
    if "@" in sections:
        chain.append("@")
    return chain


def resolve_account(
    sections: Mapping[str, Mapping[str, str]],
    username: str,
    allow_catch_all: bool,
    *,
    default_token_backend: str = BACKEND_AUTO,
) -> AccountConfig | None:
    """Resolve ``username`` the way decisions.md section 2 describes; None when nothing matches.

    Keys come from the first section of the chain that has them: the account's own section (exact name, else
    case-insensitive), then, only when catch-all is allowed, ``[@domain]`` and ``[@]``. An empty value counts
    as absent (None). access_token, access_token_expiry, refresh_token and last_activity come only from the
    account's own section.
    """
    own = find_section(sections, username, catch_all=False) if username else None
    chain = [own] if own is not None else []
    if allow_catch_all:
        chain += _catch_all_chain(sections, username)
    if not chain:
        return None

    def get(key: str) -> str | None:
        for name in chain:
            if key in sections[name]:
                return sections[name][key] or None
        return None

    def get_own(key: str) -> str | None:
        return (sections[own].get(key) or None) if own is not None else None

    permission_url = get("permission_url")
    written_flow = flow = get("oauth2_flow")
    if permission_url and flow != "device":
        flow = "authorization_code"
    cached = CachedTokens(
        token_salt=get("token_salt"),
        token_iterations=get("token_iterations"),
        access_token=get_own("access_token"),
        access_token_expiry=get_own("access_token_expiry"),
        refresh_token=get_own("refresh_token"),
        client_secret_encrypted=get("client_secret_encrypted"),
        last_activity=get_own("last_activity"),
    )
    return AccountConfig(
        username=username,
        section=own if own is not None else username,
        matched_section=chain[0],
        token_url=get("token_url"),
        permission_url=permission_url,
        oauth2_scope=get("oauth2_scope"),
        oauth2_resource=get("oauth2_resource"),
        oauth2_flow=flow,
        redirect_uri=get("redirect_uri"),
        redirect_listen_address=get("redirect_listen_address"),
        client_id=get("client_id"),
        client_secret=get("client_secret"),
        use_pkce=parse_use_pkce(get("use_pkce")),
        jwt_certificate_path=get("jwt_certificate_path"),
        jwt_key_path=get("jwt_key_path"),
        cached=cached,
        written_oauth2_flow=written_flow,
        local_password_hash=get("local_password_hash"),
        token_backend=(get("token_backend") or default_token_backend).strip().lower(),
    )


# --------------------------------------------------------------------------------------------- loading


def load_config(
    path: str | Path, cache_store: str | Path | None = None, *, require_servers: bool = True
) -> Config:
    """Read and validate ``path``. With ``cache_store``, cache keys come from that file instead
    (or, for ``aws:<secret>``, from that AWS Secrets Manager secret: see ``emailproxy.cachestore``).

    Raises ConfigError for any problem that should stop start-up (ConfigNotFoundError for a missing file).
    ``require_servers=False`` accepts a file without server sections (for commands that only manage accounts).
    Problems that do not stop start-up are listed in ``Config.warnings``.
    """
    # configread builds the objects defined here, so it is imported when first needed
    from emailproxy.configread import read_config

    return read_config(Path(path), None if cache_store is None else Path(cache_store), require_servers)
