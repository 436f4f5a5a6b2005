"""``emailproxy authorize ACCOUNT``: run an account's authorisation from a terminal, without a mail client.

For a server without a screen, over SSH: the command prints the sign-in URL (authorization-code flow)
or the verification address and code (device flow), waits for the redirect on the account's redirect
address (and, on a terminal, for the final browser address pasted in), then saves the account's tokens
in the configuration file (or ``--cache-store``), encrypted with the local password your mail client
will use. The proxy then logs the account in without asking anyone. The local password is asked for
with getpass, or read from the first line of stdin with ``--password-stdin``.

An account whose cached token still works, or can be refreshed, is left as it is.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from emailproxy.cachestore import open_token_store
from emailproxy.config import AccountConfig, Config, ConfigError, load_config
from emailproxy.log import setup_logging
from emailproxy.oauth import flows
from emailproxy.oauth.client import TokenClients
from emailproxy.oauth.endpoint import TokenEndpoint
from emailproxy.oauth.interactive import AuthorisationBroker, PendingAuthorisation
from emailproxy.oauth.redirect import RedirectListener, listen_address
from emailproxy.oauth.tokens import TokenManager
from emailproxy.protocols.events import TokenOk
from emailproxy.secret import Secret

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 130
DEFAULT_TIMEOUT = 900.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emailproxy authorize",
        description="Authorise an account from this terminal (prints the sign-in URL or device code, waits, "
        "and saves the encrypted tokens), so the proxy can log it in without anyone present.",
    )
    parser.add_argument(
        "account", help="the account to authorise: the user name your mail client logs in with"
    )
    parser.add_argument(
        "--config-file",
        default=None,
        help="the configuration file (default: emailproxy.config in the current directory)",
    )
    parser.add_argument(
        "--cache-store", default=None, help="the separate token cache file, if the proxy uses one"
    )
    parser.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the local password (the one your mail client uses) from the first line of stdin",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"give up waiting for the sign-in after this many seconds (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument("--debug", action="store_true", help="log the details")
    return parser


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"emailproxy authorize: {message}", file=sys.stderr)
    return code


def read_password(account: AccountConfig, from_stdin: bool) -> str | None:
    """The local password: stdin's first line, or asked twice (to catch typos) on a terminal."""
    if from_stdin:
        line = sys.stdin.readline()
        return line.rstrip("\r\n") or None
    if not sys.stdin.isatty():
        print(
            "emailproxy authorize: there is no terminal to ask for the password; use --password-stdin",
            file=sys.stderr,
        )
        return None
    prompt = f"Local password for {account.username} (the one your mail client will use): "
    password = getpass.getpass(prompt)
    if password and not account.cached.token_salt and getpass.getpass("Repeat it: ") != password:
        print("emailproxy authorize: the passwords do not match", file=sys.stderr)
        return None
    return password or None


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(debug=args.debug)
    if not args.debug:  # the command prints what matters; the log shows only problems
        logging.getLogger("emailproxy").setLevel(logging.WARNING)
    config_path = Path(args.config_file) if args.config_file else Path.cwd() / "emailproxy.config"
    try:
        config = load_config(config_path, cache_store=args.cache_store, require_servers=False)
    except ConfigError as exc:
        return _fail(f"configuration error: {exc}", EXIT_USAGE)
    account = config.find_account(args.account)
    if account is None:
        return _fail(
            f"no section for account {args.account} in {config_path} (add [{args.account}])", EXIT_USAGE
        )
    problem = flows.config_problem(account)
    if problem is not None:
        return _fail(
            f"the settings of account {args.account} are incomplete ({problem.value}); run `emailproxy "
            "check` for details",
            EXIT_USAGE,
        )
    password = read_password(account, args.password_stdin)
    if password is None:
        return _fail("no local password given", EXIT_USAGE)
    try:
        return asyncio.run(_authorise(config, account, password, args))
    except KeyboardInterrupt:
        print("\nCancelled; nothing was saved.", file=sys.stderr)
        return EXIT_CANCELLED


def _show(pending: PendingAuthorisation) -> None:
    """The instructions, in the wording the proxy logs (so guides that quote it apply here too)."""
    print(f"\n{pending.instructions()}\n", flush=True)
    if pending.user_code is not None:
        print("Any device with a browser will do (a phone, say). Waiting for the sign-in...", flush=True)
    else:
        print("Open it in a browser on any machine and sign in.", flush=True)


async def _authorise(config: Config, account: AccountConfig, password: str, args: argparse.Namespace) -> int:
    client = TokenClients(TokenEndpoint(timeout=config.options.token_request_timeout))
    broker = AuthorisationBroker(client, RedirectListener(), wait_seconds=None, code_lifetime=args.timeout)
    shown: list[PendingAuthorisation] = []
    broker.announcers += [shown.append, _show]
    flow = flows.effective_flow(account)
    try:
        if flow == flows.AUTHORIZATION_CODE:
            pasting = not args.password_stdin and broker.start_terminal(prompt=False)
            address = listen_address(account)
            listening = address is not None and await broker.listener.ensure(address)
            if not listening and not pasting:
                where = f"on {address[0]}:{address[1]}" if address is not None else "(no http redirect_uri)"
                return _fail(
                    f"cannot receive the sign-in redirect {where}: is the proxy running and holding that "
                    "port? Stop it, or log in with a mail client and follow the URL in the proxy's log. "
                    "There is no terminal to paste the final address into either"
                )
            tips = []
            if listening and address is not None:
                tips.append(
                    f"the browser is sent back to {account.redirect_uri}, which this command receives"
                )
            if pasting:
                tips.append(
                    "if the browser cannot reach this machine, copy the full address it ends on (an error "
                    "page is fine) and paste it here"
                )
            waiting = f"Waiting for the sign-in (at most {args.timeout:g} s; Ctrl-C to cancel)..."
            broker.announcers.append(
                lambda _: print("After signing in, " + "; ".join(tips) + ".\n" + waiting, flush=True)
            )
        store = open_token_store(args.cache_store, config.path)
        manager = TokenManager(config, store, client, interactive=broker)
        result = await manager.get_token(account.username, Secret(password))
    finally:
        await broker.stop()
        client.close()
    where = args.cache_store or str(config.path)
    if not isinstance(result, TokenOk):
        return _fail(result.message)
    if shown:
        print(
            f"Account {account.username} is authorised; its tokens are saved in {where}, encrypted with "
            "the local password."
        )
    else:
        print(f"Account {account.username} already has a working token in {where}; nothing to do.")
    return EXIT_OK
