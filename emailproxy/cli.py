"""Command line: ``emailproxy [options]`` runs the proxy (the reference's flags are all accepted);
``emailproxy <subcommand> ...`` runs one of the commands listed in :mod:`emailproxy.commands`."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from emailproxy import APP_NAME, __version__
from emailproxy.commands import COMMANDS
from emailproxy.config import Config, ConfigError, load_config
from emailproxy.configwrite import ConfigFileStore
from emailproxy.log import setup_logging
from emailproxy.oauth.endpoint import TokenEndpoint
from emailproxy.oauth.tokens import TokenManager
from emailproxy.server import ListenError, ProxyServer

log = logging.getLogger("emailproxy")

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emailproxy",
        description=f"{APP_NAME}: lets IMAP/POP/SMTP clients that only know a password use servers that "
        "require OAuth 2.0 (Microsoft 365, Gmail, ...).",
    )
    parser.add_argument("--config-file", default=None,
                        help="the configuration file (default: emailproxy.config in the current directory)")
    parser.add_argument("--cache-store", default=None,
                        help="keep cached tokens in this file instead of the configuration file")
    parser.add_argument("--log-file", default=None, help="also log to this file (rotated at 32 MiB, 10 kept)")
    parser.add_argument("--debug", action="store_true",
                        help="log every protocol line before login (credentials are always hidden)")
    parser.add_argument("--no-gui", action="store_true",
                        help="accepted for compatibility; this proxy never shows a GUI")
    parser.add_argument("--external-auth", action="store_true",
                        help="interactive authorisation: paste the final redirect URL in the terminal")
    parser.add_argument("--local-server-auth", action="store_true",
                        help="interactive authorisation: receive the redirect on a local web server")
    parser.add_argument("--version", action="version", version=f"{APP_NAME} (emailproxy) {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0] in COMMANDS:
        name = arguments.pop(0)
        if name != "run":
            command = importlib.import_module(COMMANDS[name])
            code: int = command.main(arguments)
            return code
    return run(arguments)


def run(argv: Sequence[str]) -> int:
    """Run the proxy until SIGINT or SIGTERM."""
    args = build_parser().parse_args(argv)
    setup_logging(debug=args.debug, log_file=args.log_file)
    config_path = Path(args.config_file) if args.config_file else Path.cwd() / "emailproxy.config"
    cache_store = args.cache_store
    if cache_store and cache_store.startswith("aws:"):
        print("emailproxy: --cache-store aws:... (AWS Secrets Manager) is not supported by this version; "
              "use a file path", file=sys.stderr)
        return EXIT_CONFIG
    try:
        config = load_config(config_path, cache_store=cache_store)
    except ConfigError as e:
        print(f"emailproxy: configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    for warning in config.warnings:
        log.warning("%s", warning)
    log.info("Starting %s %s with %s", APP_NAME, __version__, config.path)
    store = ConfigFileStore(Path(cache_store) if cache_store else config.path)
    tokens = TokenManager(config, store, TokenEndpoint())
    try:
        return asyncio.run(_serve(config, tokens, config_path, cache_store))
    except KeyboardInterrupt:
        return EXIT_OK


async def _serve(config: Config, tokens: TokenManager, config_path: Path, cache_store: str | None) -> int:
    proxy = ProxyServer(config, tokens)
    try:
        await proxy.start()
    except ListenError as e:
        log.error("%s", e)
        return EXIT_RUNTIME
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, proxy.request_stop)
    loop.add_signal_handler(signal.SIGHUP, _reload, proxy, tokens, config_path, cache_store)
    await proxy.wait_stopped()
    log.info("Stopping: closing %d connection(s)", len(proxy.connections))
    await proxy.stop()
    log.info("Stopped")
    return EXIT_OK


def _reload(proxy: ProxyServer, tokens: TokenManager, config_path: Path, cache_store: str | None) -> None:
    """SIGHUP: re-read the file; account settings apply at once, listener changes need a restart."""
    try:
        config = load_config(config_path, cache_store=cache_store)
    except ConfigError as e:
        log.error("Reload failed, keeping the running configuration: %s", e)
        return
    tokens.update_config(config)
    if config.servers != proxy.config.servers:
        log.warning("Reloaded accounts; changes to server sections take effect after a restart")
    else:
        log.info("Reloaded the configuration")
    proxy.config = config
