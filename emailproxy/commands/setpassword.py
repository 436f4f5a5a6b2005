"""``emailproxy set-password ACCOUNT``: bind a local password to an account section (``local_password_hash``).

The password is asked for twice with getpass (or read from the first line of stdin with
``--password-stdin``), hashed with scrypt (``emailproxy.oauth.localpassword``) and written into the
account section in place and atomically: comments, other keys and the file's permissions are kept. A
running proxy reloads the file when it changes, so the new hash applies to the next login. ``--remove``
deletes the hash again.

The account's cached values are encrypted with a key derived from the local password. Before writing, the
command tries the new password on them: values that do not open were encrypted with another password. With
the hash in place such tokens are treated as stale and replaced at the next login (a new client-credentials
token, or a new sign-in), so the command only warns; an encrypted client secret, however, could never be
read again, so the command refuses unless ``--force`` is given. Neither the password nor the hash is printed.
"""

from __future__ import annotations

import argparse
import configparser
import difflib
import getpass
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from emailproxy.config import (
    ConfigError,
    ConfigNotFoundError,
    find_section,
    is_catch_all_section,
    load_config,
    resolve_account,
)
from emailproxy.configwrite import ConfigFileStore
from emailproxy.oauth.crypto import DecryptionFailed, KeyCache, TokenCrypto, decode_salt, parse_iterations
from emailproxy.oauth.localpassword import KEY, hash_password

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emailproxy set-password",
        description="Bind a local password to an account section (stored as a salted scrypt hash in "
        f"{KEY}), so that only this password logs the account in; the first login no longer decides it.",
    )
    parser.add_argument(
        "account", help="the account section: a login name such as user@example.com, or @example.com or @"
    )
    parser.add_argument(
        "--config-file", default=None, help="default: emailproxy.config in the current directory"
    )
    parser.add_argument(
        "--cache-store",
        default=None,
        help="the token cache the proxy uses, if any (only read, to check the cached tokens)",
    )
    parser.add_argument(
        "--password-stdin", action="store_true", help="read the password from the first line of stdin"
    )
    parser.add_argument("--remove", action="store_true", help=f"delete the account's {KEY}")
    parser.add_argument(
        "--force",
        action="store_true",
        help="write the hash even when an encrypted client secret would become unreadable",
    )
    return parser


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"emailproxy set-password: {message}", file=sys.stderr)
    return code


def file_sections(path: Path) -> dict[str, dict[str, str]]:
    """The account sections of the file (name -> own keys), parsed as the proxy parses it."""
    parser = configparser.ConfigParser(interpolation=None, default_section="\x00no default\x00")
    parser.read_string(path.read_text(encoding="utf-8-sig", errors="replace"), source=str(path))
    return {name: dict(parser[name]) for name in parser.sections() if "@" in name}


def find_account_section(sections: Mapping[str, Mapping[str, str]], name: str) -> str | None:
    """The section named ``name``: exact, then ignoring case (as the proxy looks accounts up)."""
    if "@" not in name:
        return None
    return find_section(sections, name, catch_all=is_catch_all_section(name))


def suggestion(sections: Sequence[str], name: str) -> str:
    close = difflib.get_close_matches(name.casefold(), [s.casefold() for s in sections], n=1, cutoff=0.6)
    if close:
        original = next(s for s in sections if s.casefold() == close[0])
        return f"did you mean [{original}]?"
    if sections:
        return "account sections in the file: " + ", ".join(f"[{s}]" for s in sections[:8])
    return "the file has no account sections"


def read_password(from_stdin: bool) -> str | None:
    """The first line of stdin, or the password typed twice on a terminal. None after a problem."""
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            _fail("standard input holds no password")
            return None
        return password
    if not sys.stdin.isatty():
        _fail("there is no terminal to ask for the password; use --password-stdin")
        return None
    password = getpass.getpass("New local password: ")
    if not password:
        _fail("the password is empty")
        return None
    if getpass.getpass("Repeat it: ") != password:
        _fail("the passwords do not match; nothing was changed")
        return None
    return password


@dataclass(frozen=True, slots=True)
class CachedCheck:
    """Which sections hold cached values the new password opens, and which it does not."""

    opened: list[str]
    stale_tokens: list[str]
    stale_secrets: list[str]


def check_cached_values(
    sections: Mapping[str, Mapping[str, str]], target: str, new_hash: str, password: str, catch_all: bool
) -> CachedCheck:
    """Try ``password`` on the encrypted values of every section that will use ``new_hash``."""
    changed = {name: dict(options) for name, options in sections.items()}
    changed[target][KEY] = new_hash
    keys = KeyCache()
    result = CachedCheck([], [], [])
    for name in changed:
        own_catch_all = is_catch_all_section(name)
        if own_catch_all and name != target:
            continue
        account = resolve_account(changed, name, True if own_catch_all else catch_all)
        if account is None or account.local_password_hash != new_hash:
            continue
        cached = account.cached
        values = {
            "token": [v for v in (cached.access_token, cached.refresh_token) if v],
            "secret": [cached.client_secret_encrypted] if cached.client_secret_encrypted else [],
        }
        if not values["token"] and not values["secret"]:
            continue
        salt = decode_salt(cached.token_salt)
        count = parse_iterations(cached.token_iterations)
        crypto = TokenCrypto(keys, password, salt, count) if salt else None
        stale: set[str] = set()
        for kind, tokens in values.items():
            for token in tokens:
                try:
                    if crypto is None:
                        raise DecryptionFailed("no salt")
                    crypto.decrypt(token)
                except DecryptionFailed:
                    stale.add(kind)
        if "secret" in stale:
            result.stale_secrets.append(name)
        if "token" in stale:
            result.stale_tokens.append(name)
        if not stale:
            result.opened.append(name)
    return result


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    path = Path(args.config_file) if args.config_file else Path.cwd() / "emailproxy.config"
    config = None
    try:
        config = load_config(path, cache_store=args.cache_store, require_servers=False)
    except ConfigNotFoundError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except ConfigError as exc:
        if exc.key is None or exc.key.lower() != KEY:  # a broken hash may be replaced or removed here
            return _fail(f"configuration error: {exc}", EXIT_USAGE)
    try:
        sections = file_sections(path)
    except (OSError, configparser.Error) as exc:
        return _fail(f"cannot read {path}: {exc}", EXIT_USAGE)
    section = find_account_section(sections, args.account)
    if section is None:
        return _fail(
            f"{path} has no account section [{args.account}]; {suggestion(list(sections), args.account)}",
            EXIT_USAGE,
        )
    store = ConfigFileStore(path)

    if args.remove:
        if KEY not in sections[section]:
            print(f"[{section}] has no {KEY}; nothing to remove.")
            return EXIT_OK
        try:
            store.save(section, {KEY: None})
        except OSError as exc:
            return _fail(f"cannot write {path}: {exc}")
        print(f"Removed {KEY} from [{section}] in {path}; the first login decides the password again.")
        return EXIT_OK

    password = read_password(args.password_stdin)
    if password is None:
        return EXIT_FAILED
    new_hash = hash_password(password)
    if config is not None:
        catch_all = config.options.allow_catch_all_accounts
        merged = {name: dict(options) for name, options in config.account_sections.items()}
        checked = check_cached_values(merged, section, new_hash, password, catch_all)
        if checked.stale_secrets and not args.force:
            names = ", ".join(f"[{name}]" for name in checked.stale_secrets)
            return _fail(
                f"the client_secret_encrypted of {names} was encrypted with a different password and could "
                "never be read with this one, so logins would fail. Use the password the mail clients use "
                "now, or write the client secret back as client_secret, delete client_secret_encrypted and "
                "run again (--force writes the hash anyway). Nothing was changed"
            )
        if checked.stale_tokens:
            names = ", ".join(f"[{name}]" for name in checked.stale_tokens)
            print(
                f"Warning: the cached tokens of {names} were encrypted with a different password. The proxy "
                "deletes and replaces them at the next login with this password: client-credentials and "
                "service-account accounts get a new token at once, interactive accounts need a new sign-in."
            )
        if checked.opened:
            names = ", ".join(f"[{name}]" for name in checked.opened)
            print(f"The cached values of {names} open with this password.")
    try:
        store.save(section, {KEY: new_hash})
    except (OSError, ValueError) as exc:
        return _fail(f"cannot write {path}: {exc}")
    print(
        f"Set {KEY} for [{section}] in {path}. Only this password logs in from now on; a running proxy "
        "reloads the file and applies it to the next login."
    )
    return EXIT_OK
