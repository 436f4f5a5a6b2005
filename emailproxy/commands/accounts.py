"""``emailproxy accounts``: each account section with its flow and the state of its cached tokens.

Only the presence of the cached values and their plain-text companions (expiry, last activity) are read:
nothing is decrypted and no token, secret or password is ever printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from emailproxy.config import Config, ConfigError, is_catch_all_section, load_config, resolve_account

EXIT_OK = 0
EXIT_PROBLEMS = 1
#: the token manager renews an access token that has less than this many seconds left (tokens.py)
RENEW_MARGIN = 600


@dataclass(frozen=True, slots=True)
class AccountState:
    section: str
    catch_all: bool
    flow: str | None  # the flow that runs
    written_flow: str | None  # oauth2_flow as written, when it differs from the flow that runs
    access_token: bool
    refresh_token: bool
    client_secret_encrypted: bool
    access_token_expiry: int | None  # epoch seconds
    last_activity: int | None  # epoch seconds


def _epoch(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(float(value.strip()))
    except ValueError:
        return None


def account_states(config: Config) -> list[AccountState]:
    """One entry per account section, in file order."""
    states: list[AccountState] = []
    for name, options in config.account_sections.items():
        catch_all = is_catch_all_section(name)
        if catch_all:
            account = resolve_account(config.account_sections, name, True)
        else:
            account = config.find_account(name)
        flow = account.oauth2_flow if account is not None else None
        written = account.written_oauth2_flow if account is not None else None
        states.append(
            AccountState(
                section=name,
                catch_all=catch_all,
                flow=flow,
                written_flow=written if written != flow else None,
                access_token=bool(options.get("access_token")),
                refresh_token=bool(options.get("refresh_token")),
                client_secret_encrypted=bool(options.get("client_secret_encrypted")),
                access_token_expiry=_epoch(options.get("access_token_expiry")),
                last_activity=_epoch(options.get("last_activity")),
            )
        )
    return states


def human_duration(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds < 90:
        return f"{int(seconds)} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    if seconds < 36 * 3600:
        return f"{round(seconds / 3600)} h"
    return f"{round(seconds / 86400)} days"


def _when(epoch: int) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def describe_expiry(state: AccountState, now: float) -> str:
    if not state.access_token:
        return "-"
    if state.access_token_expiry is None:
        return "unknown"
    left = state.access_token_expiry - now
    at = _when(state.access_token_expiry)
    if left <= 0:
        renew = "; renewed at the next login" if state.refresh_token else ""
        return f"expired {human_duration(left)} ago ({at}){renew}"
    if left < RENEW_MARGIN:
        return f"in {human_duration(left)} ({at}); renewed at the next login"
    return f"in {human_duration(left)} ({at})"


def describe_tokens(state: AccountState) -> str:
    held = [
        name
        for name, present in (
            ("access", state.access_token),
            ("refresh", state.refresh_token),
            ("encrypted client secret", state.client_secret_encrypted),
        )
        if present
    ]
    return ", ".join(held) if held else "none"


def describe_activity(state: AccountState, now: float) -> str:
    if state.last_activity is None:
        return "-"
    return f"{human_duration(now - state.last_activity)} ago ({_when(state.last_activity)})"


def describe_flow(state: AccountState) -> str:
    flow = state.flow or "(none)"
    if state.written_flow:
        flow += f" (written: {state.written_flow})"
    return flow


def table(states: Sequence[AccountState], now: float) -> str:
    header = ("ACCOUNT", "FLOW", "CACHED", "ACCESS TOKEN EXPIRES", "LAST ACTIVITY")
    rows = [header]
    for state in states:
        name = state.section + ("  (catch-all)" if state.catch_all else "")
        rows.append(
            (
                name,
                describe_flow(state),
                describe_tokens(state) if not state.catch_all or state.access_token else "-",
                describe_expiry(state, now),
                describe_activity(state, now),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emailproxy accounts",
        description="List the account sections: flow, cached tokens, expiry and last activity. Nothing is "
        "decrypted and no secret is shown.",
    )
    parser.add_argument("--config-file", default=None, help="default: emailproxy.config in this directory")
    parser.add_argument("--cache-store", default=None, help="the token cache file, if the proxy uses one")
    parser.add_argument("--json", action="store_true", help="print JSON (times as epoch seconds)")
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    path = Path(args.config_file) if args.config_file else Path.cwd() / "emailproxy.config"
    try:
        config = load_config(path, cache_store=args.cache_store, require_servers=False)
    except ConfigError as error:
        print(f"emailproxy accounts: {error}", file=sys.stderr)
        return EXIT_PROBLEMS
    states = account_states(config)
    now = time.time()
    if args.json:
        print(json.dumps([asdict(state) for state in states], indent=2))
    elif not states:
        print(f"No account sections in {path}.")
    else:
        print(table(states, now))
    return EXIT_OK
