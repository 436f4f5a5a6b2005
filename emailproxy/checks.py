"""Configuration checks: problems and risks in a loaded configuration, as :class:`Finding` objects.

Everything here is pure: it looks at a :class:`~emailproxy.config.Config` and returns findings.
``emailproxy check`` prints them and the proxy logs them at start-up; ``check --online`` adds what
:mod:`emailproxy.probes` finds on the network.

What ``load_config`` already reports (``Config.warnings``: unknown keys, malformed URLs, placeholders in
client IDs, secrets and URLs, scope typos, missing redirect_uri, ... for each account section) is turned into
findings as it is; the checks here add what it does not look at, so no problem is reported twice:
catch-all account sections, listener ports, TLS settings that do not fit well-known ports, more
placeholders, and scope names outside the Microsoft resource URLs.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from emailproxy.config import (
    AccountConfig,
    Config,
    ConfigError,
    ServerConfig,
    describe_problem,
    is_catch_all_section,
    resolve_account,
)
from emailproxy.configread import scope_problems
from emailproxy.oauth import client as token_clients
from emailproxy.oauth import flows

Level = Literal["error", "warning", "info", "ok"]
ERROR: Level = "error"
WARNING: Level = "warning"
INFO: Level = "info"
OK: Level = "ok"


@dataclass(frozen=True, slots=True)
class Finding:
    """One result: ``error`` and ``warning`` are problems; ``info`` and ``ok`` are for the reader only."""

    level: Level
    section: str | None
    key: str | None
    message: str
    hint: str | None = None
    #: the file the finding is about, when it is not the configuration file (e.g. the cache store)
    path: str | None = None

    @property
    def is_problem(self) -> bool:
        return self.level in (ERROR, WARNING)

    def describe(self, path: str) -> str:
        """One line in the format of configuration errors: ``path, section [s], key 'k': message (hint)``."""
        return describe_problem(self.path or path, self.message, self.section, self.key, self.hint)


def format_finding(finding: Finding) -> str:
    """Terminal text: ``LEVEL    [section] key: message`` and, on the next line, ``-> hint``."""
    where = f"[{finding.section}]" if finding.section is not None else "file"
    if finding.path is not None:
        where = f"{finding.path} {where}"
    if finding.key is not None:
        where += f" {finding.key}"
    text = f"{finding.level.upper():<8} {where}: {finding.message}"
    if finding.hint:
        text += f"\n{'':<8} -> {finding.hint}"
    return text


def problems(findings: Iterable[Finding]) -> list[Finding]:
    return [finding for finding in findings if finding.is_problem]


# ---------------------------------------------------------------------------------- from load_config

_WHERE_RE = re.compile(
    r"^(?:, section \[(?P<section>[^\]\n]*)\])?(?:, key '(?P<key>[^'\n]*)')?: (?P<rest>.*)$", re.DOTALL
)


def finding_from_error(error: ConfigError) -> Finding:
    return Finding(ERROR, error.section, error.key, error.message, error.hint)


def finding_from_warning(text: str, paths: Sequence[str]) -> Finding:
    """Split a ``Config.warnings`` line (``describe_problem`` format) back into its parts.

    ``Finding.describe(path)`` gives the same text again. A warning about another file (the cache store)
    keeps that file's name in the message.
    """
    for path in paths:
        if text.startswith(path):
            match = _WHERE_RE.match(text[len(path) :])
            if match is not None:
                rest = match.group("rest")
                message, hint = rest, None
                if rest.endswith(")") and " (" in rest:
                    message, _, hint = rest[:-1].rpartition(" (")
                other = path if path != paths[0] else None
                return Finding(WARNING, match.group("section"), match.group("key"), message, hint, other)
    return Finding(WARNING, None, None, text)


def load_warnings(config: Config) -> list[Finding]:
    paths = [str(config.path)]
    if config.cache_store is not None:
        paths.append(str(config.cache_store))
    return [finding_from_warning(text, paths) for text in config.warnings]


# ------------------------------------------------------------------------------------------ entry point


def check_config(config: Config) -> list[Finding]:
    """Every problem and risk found without touching the network: load warnings first, then the rest."""
    found = load_warnings(config)
    extra: list[Finding] = []
    extra += listener_findings(config.servers)
    for account in catch_all_accounts(config):
        extra += catch_all_findings(account)
    for section, options in config.account_sections.items():
        extra += placeholder_findings(section, options)
    for account in all_accounts(config):
        own_scope = config.account_sections.get(account.section, {}).get("oauth2_scope", "")
        microsoft = is_microsoft(account.oauth2_scope or "", account.token_url)
        extra += bare_scope_findings(account.section, own_scope, microsoft)
        extra += tenant_findings(account)
        extra += backend_findings(account)
        extra += first_use_findings(account)
    for server in config.servers:
        extra += placeholder_findings(server.section, {"server_address": server.server_address})
    covered = {(f.section, f.key) for f in found if "placeholder" in f.message}
    extra = [f for f in extra if not ("placeholder" in f.message and (f.section, f.key) in covered)]
    return found + extra


def catch_all_accounts(config: Config) -> list[AccountConfig]:
    """The settings of each ``[@domain]`` and ``[@]`` section in use (none when catch-all is off)."""
    if not config.options.allow_catch_all_accounts:
        return []
    found = []
    for name in config.account_sections:
        if is_catch_all_section(name):
            account = resolve_account(config.account_sections, name, True)
            if account is not None:
                found.append(account)
    return found


def all_accounts(config: Config) -> list[AccountConfig]:
    """Every account section in use, resolved (catch-all sections as themselves)."""
    found = catch_all_accounts(config)
    for name in config.account_sections:
        if not is_catch_all_section(name):
            account = config.find_account(name)
            if account is not None:
                found.append(account)
    return found


# ------------------------------------------------------------------------------------------- listeners

#: well-known ports: (protocol, port) -> True when the port uses STARTTLS, False for implicit TLS
_WELL_KNOWN = {
    ("IMAP", 143): True,
    ("IMAP", 993): False,
    ("POP", 110): True,
    ("POP", 995): False,
    ("SMTP", 25): True,
    ("SMTP", 587): True,
    ("SMTP", 465): False,
}
_WILDCARDS = ("0.0.0.0", "::", "")


def listener_findings(servers: Sequence[ServerConfig]) -> list[Finding]:
    found: list[Finding] = []
    for server in servers:
        if server.local_port < 1024:
            found.append(
                Finding(
                    WARNING,
                    server.section,
                    None,
                    f"local port {server.local_port} is privileged (below 1024): the proxy must run as root "
                    "or with CAP_NET_BIND_SERVICE to listen on it",
                    f"use a port from 1024 up, for example {server.protocol}-{server.local_port + 1000}",
                )
            )
        found += tls_port_findings(server)
    for index, server in enumerate(servers):
        for other in servers[:index]:
            if server.local_port != other.local_port or server.local_address == other.local_address:
                continue  # the same address twice is a load error already
            if server.local_address in _WILDCARDS or other.local_address in _WILDCARDS:
                found.append(
                    Finding(
                        ERROR,
                        server.section,
                        "local_address",
                        f"port {server.local_port} is also used by [{other.section}] on "
                        f"{other.local_address}; a wildcard address covers every address, so the second "
                        "listener cannot start",
                        "give each server section its own port",
                    )
                )
    return found


def tls_port_findings(server: ServerConfig) -> list[Finding]:
    """TLS settings that do not fit the upstream port's well-known use (RFC 8314, RFC 6409)."""
    starttls_port = _WELL_KNOWN.get((server.protocol, server.server_port))
    if starttls_port is None or starttls_port == server.server_starttls:
        return []
    if starttls_port:
        return [
            Finding(
                WARNING,
                server.section,
                "server_starttls",
                f"port {server.server_port} normally starts in plain text and uses STARTTLS, but "
                "server_starttls is off, so the proxy expects TLS from the first byte",
                "set server_starttls = True",
            )
        ]
    return [
        Finding(
            WARNING,
            server.section,
            "server_starttls",
            f"port {server.server_port} normally uses implicit TLS, but server_starttls = True makes the "
            "proxy wait for a plain-text greeting",
            "remove server_starttls (or set it to False)",
        )
    ]


# -------------------------------------------------------------------------------------------- accounts

_PLACEHOLDER_RE = re.compile(
    r"\*\*\*\s*your|<\s*your[^>]*>|\b(?:TENANT_ID|CLIENT_ID|CLIENT_SECRET|YOUR_[A-Z_]+)\b", re.IGNORECASE
)
_PLACEHOLDER_KEYS = (
    "server_address",
    "token_url",
    "permission_url",
    "redirect_uri",
    "oauth2_scope",
    "client_id",
    "client_secret",
)


def placeholder_findings(section: str, options: Mapping[str, str]) -> list[Finding]:
    """Values still holding a sample's or vendor guide's placeholder. The value itself is never echoed."""
    found: list[Finding] = []
    service_account_key = options.get("client_id", "").strip().lower() in ("file", "key")
    for key in _PLACEHOLDER_KEYS:
        value = options.get(key)
        if value is None or not _PLACEHOLDER_RE.search(value):
            continue
        if key == "client_secret" and service_account_key:
            continue  # a service account's key file or JSON
        found.append(
            Finding(
                WARNING, section, key, "still holds a placeholder from a sample", "fill in your own value"
            )
        )
    return found


#: scope names without a resource URL that are spelt the same everywhere
_BARE_SCOPES = ("offline_access", "openid", "profile", "email")
_MS_NAMES = (
    "IMAP.AccessAsUser.All",
    "POP.AccessAsUser.All",
    "SMTP.Send",
    "SMTP.SendAsApp",
    ".default",
)
_OUTLOOK_RE = re.compile(r"^https://outlook\.office(?:365)?\.com/", re.IGNORECASE)


def is_microsoft(scope: str, token_url: str | None) -> bool:
    return "microsoftonline" in (token_url or "").lower() or any(
        _OUTLOOK_RE.match(item) for item in scope.split()
    )


def bare_scope_findings(section: str, scope: str, microsoft: bool) -> list[Finding]:
    """Scope items without a resource URL: a misspelt ``offline_access`` and, for Microsoft, an Outlook
    permission written without its resource address (other providers' own scope names are left alone)."""
    found: list[Finding] = []
    ms = {name.casefold(): name for name in _MS_NAMES}
    for item in scope.split():
        if "/" in item or ":" in item or item in _BARE_SCOPES:
            continue
        if microsoft and item.casefold() in ms:
            name = ms[item.casefold()]
            found.append(
                Finding(
                    WARNING,
                    section,
                    "oauth2_scope",
                    f"scope '{item}' has no resource address",
                    f"write https://outlook.office365.com/{name}",
                )
            )
            continue
        candidates = ["offline_access", *(ms if microsoft else ())]
        close = difflib.get_close_matches(item.casefold(), candidates, n=1, cutoff=0.8)
        if close:
            suggestion = ms.get(close[0], close[0])
            if suggestion in _MS_NAMES:
                suggestion = "https://outlook.office365.com/" + suggestion
            found.append(
                Finding(
                    WARNING,
                    section,
                    "oauth2_scope",
                    f"scope '{item}' looks like a typo",
                    f"did you mean '{suggestion}'?",
                )
            )
    return found


def catch_all_findings(account: AccountConfig) -> list[Finding]:
    """For ``[@domain]``/``[@]`` the checks ``load_config`` runs on each account's own section."""
    name = account.section
    found: list[Finding] = []
    missing = [k for k in ("token_url", "client_id", "oauth2_scope") if not getattr(account, k)]
    if "oauth2_scope" in missing and account.oauth2_flow == "password" and account.oauth2_resource:
        missing.remove("oauth2_scope")
    if missing:
        found.append(
            Finding(
                WARNING, name, None, f"missing {', '.join(missing)}: logins through this section will fail"
            )
        )
    written = account.written_oauth2_flow
    if account.permission_url is None and account.oauth2_flow is None:
        found.append(
            Finding(
                WARNING,
                name,
                None,
                "no permission_url and no oauth2_flow: logins through this section will fail",
                "add permission_url for interactive sign-in, or set oauth2_flow (for example "
                "client_credentials)",
            )
        )
    elif account.permission_url and written not in (None, "authorization_code", "device"):
        found.append(permission_url_overrides(name, written, account.oauth2_scope))
    if account.oauth2_flow == "authorization_code" and not account.redirect_uri:
        found.append(
            Finding(
                WARNING,
                name,
                "redirect_uri",
                "the authorization code flow needs a redirect_uri",
                "add for example redirect_uri = http://localhost:8080",
            )
        )
    if account.oauth2_scope:
        for problem in scope_problems(account.oauth2_scope, account.oauth2_flow, account.token_url):
            found.append(Finding(WARNING, name, "oauth2_scope", problem))
    return found


def permission_url_overrides(section: str, written_flow: str | None, scope: str | None) -> Finding:
    """``oauth2_flow`` other than device with ``permission_url``: explain which flow really runs."""
    default_scope = any(item.endswith("/.default") for item in (scope or "").split())
    needs_scope = written_flow == "client_credentials" and not default_scope
    return Finding(
        WARNING,
        section,
        "oauth2_flow",
        f"oauth2_flow = {written_flow} is not what runs: because permission_url is set, the authorization "
        "code flow is used (as the reference does), so every new account must sign in once in a browser "
        "(the proxy logs 'Please visit the following URL to authenticate account ...')",
        f"to use {written_flow} without a browser, remove permission_url"
        + (" and set oauth2_scope = https://outlook.office365.com/.default" if needs_scope else "")
        + "; to keep the browser sign-in, remove oauth2_flow and set redirect_uri",
    )


_MS_TOKEN_RE = re.compile(r"^/(common|organizations|consumers)/", re.IGNORECASE)


def tenant_findings(account: AccountConfig) -> list[Finding]:
    """Client credentials need a tenant: Microsoft refuses /common/ and /organizations/ for app tokens."""
    if account.oauth2_flow != "client_credentials" or not account.token_url:
        return []
    parts = urlsplit(account.token_url)
    if "microsoftonline" not in parts.netloc.lower():
        return []
    match = _MS_TOKEN_RE.match(parts.path)
    if match is None:
        return []
    return [
        Finding(
            WARNING,
            account.section,
            "token_url",
            f"the client credentials flow needs your tenant in token_url, not '{match.group(1)}'",
            "use https://login.microsoftonline.com/<your tenant ID or domain>/oauth2/v2.0/token",
        )
    ]


def backend_findings(account: AccountConfig) -> list[Finding]:
    """``token_backend = msal`` on an account msal cannot serve: say why the standards-based client does."""
    msal = token_clients.MSAL
    if account.token_backend != msal or token_clients.select_backend(account) == msal:
        return []
    flow = account.oauth2_flow
    if flow not in token_clients.MSAL_FLOWS:
        reason = f"msal does not run the {flow or 'configured'} flow"
    elif token_clients.authority_for(account.token_url) is None:
        reason = "token_url is not a v2.0 endpoint (https://HOST/TENANT/oauth2/v2.0/token)"
    elif flow == "password":
        reason = "msal runs the password flow only with a client secret or certificate"
    else:
        reason = "msal runs the device flow only for public clients (no client secret or certificate)"
    return [
        Finding(
            WARNING,
            account.section,
            "token_backend",
            f"token_backend = msal is not used: {reason}; the standards-based client serves this account",
            "remove token_backend, or set token_backend = standard",
        )
    ]


def first_use_findings(account: AccountConfig) -> list[Finding]:
    """An app-only account without ``local_password_hash``: its first login chooses the local password."""
    if not flows.is_app_only(account) or account.local_password_hash:
        return []
    return [
        Finding(
            INFO,
            account.section,
            "local_password_hash",
            f"the first login for {account.section} decides its local password (no person takes part in "
            f"the {flows.effective_flow(account)} flow)",
            f"bind one in advance: emailproxy set-password {account.section}",
        )
    ]
