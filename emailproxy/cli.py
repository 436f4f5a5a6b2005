"""Command line: ``emailproxy [options]`` runs the proxy (the reference's flags are all accepted);
``emailproxy <subcommand> ...`` runs one of the commands listed in :mod:`emailproxy.commands`."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from emailproxy import APP_NAME, __version__
from emailproxy.cachestore import CacheStoreError, open_token_store
from emailproxy.checks import check_config
from emailproxy.commands import COMMANDS
from emailproxy.config import Config, ConfigError, load_config
from emailproxy.fdlimit import descriptor_shortfall, raise_open_file_limit
from emailproxy.log import LOG_FORMATS, LogSetupError, setup_logging
from emailproxy.oauth.client import TokenClients
from emailproxy.oauth.endpoint import TokenEndpoint
from emailproxy.oauth.interactive import AuthorisationBroker
from emailproxy.oauth.tokens import TokenManager
from emailproxy.reload import ConfigReloader
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
                        help="keep cached tokens in this file instead of the configuration file, or in an "
                        "AWS Secrets Manager secret: aws:<name or ARN> or aws:<profile>||<name> "
                        "(needs pip install 'emailproxy[aws]')")
    parser.add_argument("--log-file", default=None, help="also log to this file (rotated at 32 MiB, 10 kept)")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                        help="json: one JSON object per line in the --log-file (on stderr when there is no "
                        "log file); stderr otherwise stays human-readable")
    parser.add_argument("--syslog", action="store_true",
                        help="also log to the system log (/dev/log) with the ident 'emailproxy'; stderr is "
                        "then used only when it is a terminal, so a journal does not get each line twice")
    parser.add_argument("--debug", action="store_true",
                        help="log every protocol line before login (credentials are always hidden)")
    parser.add_argument("--no-gui", action="store_true",
                        help="accepted for compatibility; this proxy never shows a GUI")
    parser.add_argument("--external-auth", action="store_true",
                        help="interactive authorisation: also accept the final redirect URL pasted in the "
                        "terminal (needs a TTY)")
    parser.add_argument("--local-server-auth", action="store_true",
                        help="accepted for compatibility: the redirect listener always runs")
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
    try:
        setup_logging(
            debug=args.debug, log_file=args.log_file, log_format=args.log_format, syslog=args.syslog
        )
    except LogSetupError as e:
        print(f"emailproxy: {e}", file=sys.stderr)
        return EXIT_CONFIG
    config_path = Path(args.config_file) if args.config_file else Path.cwd() / "emailproxy.config"
    cache_store = args.cache_store
    try:
        store = open_token_store(cache_store, config_path)  # aws:<secret> or a file
    except CacheStoreError as e:
        print(f"emailproxy: --cache-store: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        config = load_config(config_path, cache_store=cache_store)
    except ConfigError as e:
        print(f"emailproxy: configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    for finding in check_config(config):  # the checks of `emailproxy check` (load warnings included)
        if finding.is_problem:
            log.warning("%s", finding.describe(str(config.path)))
    log.info("Starting %s %s with %s", APP_NAME, __version__, config.path)
    open_files = raise_open_file_limit()
    shortfall = descriptor_shortfall(config.options.max_connections, open_files)
    if shortfall:
        log.warning("%s", shortfall)
    endpoint = TokenEndpoint(timeout=config.options.token_request_timeout)
    client = TokenClients(endpoint)  # one for the broker and the manager: msal apps are built once
    broker = AuthorisationBroker.for_config(config, client)
    tokens = TokenManager(config, store, client, interactive=broker)
    try:
        return asyncio.run(
            _serve(config, tokens, config_path, cache_store, broker, args.external_auth, endpoint)
        )
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        client.close()


async def _serve(config: Config, tokens: TokenManager, config_path: Path, cache_store: str | None,
                 broker: AuthorisationBroker, external_auth: bool, endpoint: TokenEndpoint) -> int:
    try:
        proxy = ProxyServer(config, tokens)
    except ListenError as e:  # e.g. a local certificate file that cannot be read
        log.error("%s", e)
        return EXIT_RUNTIME
    await broker.configure(config)  # the redirect listener is up before the first login can need it
    if external_auth:
        broker.start_terminal()
    try:
        await proxy.start()
    except ListenError as e:
        log.error("%s", e)
        await broker.stop()
        return EXIT_RUNTIME
    loop = asyncio.get_running_loop()
    reloader = ConfigReloader(config_path, config, _reload(proxy, tokens, broker, endpoint),
                              cache_store=cache_store)
    handled = _install_signal_handlers(loop, proxy, reloader)
    reloader.start()
    try:
        await proxy.wait_stopped()
    except asyncio.CancelledError:  # Ctrl-C where the loop has no signal handlers (Windows)
        pass
    for sig in handled:
        loop.remove_signal_handler(sig)
    await reloader.close()
    log.info("Stopping: closing %d connection(s)", len(proxy.connections))
    await proxy.stop()
    await broker.stop()
    log.info("Stopped")
    return EXIT_OK


def _install_signal_handlers(
    loop: asyncio.AbstractEventLoop, proxy: ProxyServer, reloader: ConfigReloader
) -> list[signal.Signals]:
    """SIGINT/SIGTERM stop, SIGHUP reloads. Windows has no SIGHUP and its event loops take no signal
    handlers: there Ctrl-C stops the proxy and the file watcher reloads it."""
    handlers: list[tuple[signal.Signals, Callable[[], None]]] = [
        (signal.SIGINT, proxy.request_stop), (signal.SIGTERM, proxy.request_stop)
    ]
    if hasattr(signal, "SIGHUP"):
        handlers.append((signal.SIGHUP, lambda: reloader.request("SIGHUP")))
    installed = []
    for sig, handler in handlers:
        try:
            loop.add_signal_handler(sig, handler)
        except (NotImplementedError, RuntimeError):
            log.debug("signal %s cannot be handled on this platform", sig.name)
            continue
        installed.append(sig)
    return installed


def _reload(
    proxy: ProxyServer, tokens: TokenManager, broker: AuthorisationBroker, endpoint: TokenEndpoint
) -> Callable[[Config], Awaitable[None]]:
    """What a reload does with a valid new configuration: accounts at once, then the listeners."""

    async def apply(config: Config) -> None:
        endpoint.timeout = config.options.token_request_timeout
        tokens.update_config(config)
        await proxy.apply(config)
        await broker.configure(config)

    return apply
