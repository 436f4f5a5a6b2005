"""``emailproxy register``: write a working configuration file from command-line flags.

It accepts the flags vendors document for ``email-oauth2-proxy register`` (decisions.md section 3), strips
the stray spaces their examples carry, validates everything before writing, and writes a file with one
listener section per server, ``[emailproxy] allow_catch_all_accounts = True`` and one ``[@]`` account
section that every login name uses. The file is written atomically with mode 0600; an existing file is
replaced only with ``--force``. Afterwards the same checks as ``emailproxy check`` run and are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import os
import re
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from emailproxy import __version__
from emailproxy.checks import check_config, format_finding, problems
from emailproxy.config import DEFAULT_LOCAL_ADDRESS, FLOWS, ConfigError, load_config, parse_boolean
from emailproxy.configwrite import fsync_directory

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
FILE_MODE = 0o600

#: protocol -> (flag prefix, default local port)
PROTOCOLS = {"IMAP": ("imap", 2993), "POP": ("pop", 2995), "SMTP": ("smtp", 2465)}
_MARKDOWN_LINK_RE = re.compile(r"^\[([^\]]*)\]\(([^)]*)\)$")


# ------------------------------------------------------------------------------------- value parsers


def _text(value: str) -> str:
    """Values are stripped: vendors' examples put spaces inside the quotes."""
    value = value.strip()
    if "\n" in value or "\r" in value:
        raise argparse.ArgumentTypeError("the value must be on one line")
    if not value:
        raise argparse.ArgumentTypeError("the value is empty")
    return value


def _port(value: str) -> int:
    text = value.strip()
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"'{text}' is not a port number (use a number from 1 to 65535)")
    return int(text)


def _boolean(value: str) -> bool:
    parsed = parse_boolean(value)
    if parsed is None:
        raise argparse.ArgumentTypeError(f"'{value.strip()}' is not true or false")
    return parsed


def _is_loopback_host(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _url(value: str, *, https: bool) -> str:
    text = _text(value)
    link = _MARKDOWN_LINK_RE.match(text)
    if link is not None:
        label, target = link.groups()
        address = label if urlsplit(label).scheme in ("http", "https") else target
        raise argparse.ArgumentTypeError(f"'{text}' is a markdown link; give just the address: {address}")
    parts = urlsplit(text)
    if not parts.netloc or " " in text or parts.scheme.lower() not in ("http", "https"):
        raise argparse.ArgumentTypeError(f"'{text}' is not a URL (expected https://host/path)")
    if https and parts.scheme.lower() != "https" and not _is_loopback_host(parts.hostname or ""):
        raise argparse.ArgumentTypeError(
            f"'{text}' is not an https:// URL; tokens and secrets must not travel in clear"
        )
    return text


def _https_url(value: str) -> str:
    return _url(value, https=True)


def _redirect_uri(value: str) -> str:
    return _url(value, https=False)


def _scope(value: str) -> str:
    return " ".join(_text(value).split())


def _flow(value: str) -> str:
    text = _text(value)
    if text not in FLOWS:
        raise argparse.ArgumentTypeError(f"unknown flow '{text}' (use one of: {', '.join(FLOWS)})")
    return text


def _address(value: str) -> str:
    text = _text(value)
    if any(c.isspace() for c in text) or "/" in text:
        raise argparse.ArgumentTypeError(f"'{text}' is not a host name or IP address")
    return text


# -------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emailproxy register",
        description="Write a configuration file: one local listener per mail server given, and one [@] "
        "account section that every login name uses.",
        allow_abbrev=False,
    )
    parser.add_argument("--config-file", default=None, help="default: emailproxy.config in this directory")
    parser.add_argument("--force", action="store_true", help="replace the file if it exists")
    for protocol, (prefix, local_port) in PROTOCOLS.items():
        group = parser.add_argument_group(f"{protocol} server")
        group.add_argument(f"--{prefix}-server-address", type=_address, metavar="HOST")
        group.add_argument(f"--{prefix}-server-port", type=_port, metavar="PORT")
        group.add_argument(
            f"--{prefix}-server-starttls",
            type=_boolean,
            nargs="?",
            const=True,
            default=False,
            metavar="BOOL",
            help="the server starts in plain text and upgrades with STARTTLS (usual on ports 587, 143, 110)",
        )
        group.add_argument(
            f"--{prefix}-local-port",
            type=_port,
            default=None,
            metavar="PORT",
            help=f"local port of the listener (default {local_port})",
        )
    local = parser.add_argument_group("local listeners")
    local.add_argument(
        "--local-address",
        type=_address,
        default=DEFAULT_LOCAL_ADDRESS,
        help="address to listen on (default 127.0.0.1: this computer only)",
    )
    local.add_argument("--local-certificate-path", type=_text, metavar="FILE", help="TLS for mail clients")
    local.add_argument("--local-key-path", type=_text, metavar="FILE", help="TLS for mail clients")
    oauth = parser.add_argument_group("OAuth 2.0 (the [@] account section)")
    oauth.add_argument("--oauth2-token-url", type=_https_url, metavar="URL")
    oauth.add_argument("--oauth2-permission-url", type=_https_url, metavar="URL")
    oauth.add_argument("--oauth2-scope", type=_scope, metavar="SCOPES")
    oauth.add_argument("--oauth2-flow", type=_flow, metavar="FLOW", help=", ".join(FLOWS))
    oauth.add_argument("--oauth2-client-id", type=_text, metavar="ID")
    oauth.add_argument("--oauth2-client-secret", type=_text, metavar="SECRET")
    oauth.add_argument("--oauth2-redirect-uri", type=_redirect_uri, metavar="URL")
    return parser


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks across flags; ``parser.error`` exits with status 2 and the usage line."""
    servers = 0
    for protocol, (prefix, _) in PROTOCOLS.items():
        address = getattr(args, f"{prefix}_server_address")
        port = getattr(args, f"{prefix}_server_port")
        if address and port is None:
            parser.error(f"--{prefix}-server-port is required with --{prefix}-server-address")
        if port is not None and not address:
            parser.error(f"--{prefix}-server-address is required with --{prefix}-server-port")
        if not address:
            extra = [
                f"--{prefix}-{name}"
                for name in ("server-starttls", "local-port")
                if getattr(args, f"{prefix}_{name.replace('-', '_')}") not in (None, False)
            ]
            if extra:
                parser.error(f"{extra[0]} needs --{prefix}-server-address (no {protocol} server was given)")
        servers += bool(address)
    if not servers:
        parser.error(
            "give at least one server: --imap-server-address, --pop-server-address or "
            "--smtp-server-address (each with its port)"
        )
    for flag in ("token_url", "client_id", "scope"):
        if getattr(args, f"oauth2_{flag}") is None:
            parser.error(f"--oauth2-{flag.replace('_', '-')} is required")
    if args.oauth2_flow is None and args.oauth2_permission_url is None:
        parser.error(
            "--oauth2-flow is required without --oauth2-permission-url (for example "
            "--oauth2-flow=client_credentials)"
        )
    effective = args.oauth2_flow
    if args.oauth2_permission_url and effective != "device":
        effective = "authorization_code"
    if effective == "client_credentials" and args.oauth2_client_secret is None:
        parser.error("the client_credentials flow needs --oauth2-client-secret")
    if bool(args.local_certificate_path) != bool(args.local_key_path):
        parser.error("--local-certificate-path and --local-key-path go together")
    ports: dict[int, str] = {}
    for protocol, port in local_ports(args).items():
        if port in ports:
            parser.error(f"the {ports[port]} and {protocol} listeners would both use local port {port}")
        ports[port] = protocol


def local_ports(args: argparse.Namespace) -> dict[str, int]:
    """Local port of each server given, by protocol."""
    ports: dict[str, int] = {}
    for protocol, (prefix, default) in PROTOCOLS.items():
        if getattr(args, f"{prefix}_server_address"):
            chosen = getattr(args, f"{prefix}_local_port")
            ports[protocol] = default if chosen is None else chosen
    return ports


# ------------------------------------------------------------------------------------------- writing


def render(args: argparse.Namespace, now: datetime.datetime | None = None) -> str:
    """The configuration text (values validated, one per line)."""
    stamp = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# Written by `emailproxy register` (emailproxy {__version__}) on {stamp}.",
        "# Check it with `emailproxy check --config-file <this file>`; every key is described in the sample",
        "# emailproxy.config and in docs/commands.md.",
        "",
        "[emailproxy]",
        "allow_catch_all_accounts = True",
        "",
    ]
    for protocol, port in local_ports(args).items():
        prefix = PROTOCOLS[protocol][0]
        lines += [
            f"[{protocol}-{port}]",
            f"server_address = {getattr(args, f'{prefix}_server_address')}",
            f"server_port = {getattr(args, f'{prefix}_server_port')}",
        ]
        if getattr(args, f"{prefix}_server_starttls"):
            lines.append("server_starttls = True")
        if args.local_address != DEFAULT_LOCAL_ADDRESS:
            lines.append(f"local_address = {args.local_address}")
        if args.local_certificate_path:
            lines += [
                f"local_certificate_path = {args.local_certificate_path}",
                f"local_key_path = {args.local_key_path}",
            ]
        lines.append("")
    lines += [
        "# Every login name uses this section; the proxy adds a section per account for its tokens.",
        "[@]",
    ]
    for key, value in (
        ("token_url", args.oauth2_token_url),
        ("permission_url", args.oauth2_permission_url),
        ("oauth2_scope", args.oauth2_scope),
        ("oauth2_flow", args.oauth2_flow),
        ("redirect_uri", args.oauth2_redirect_uri),
        ("client_id", args.oauth2_client_id),
        ("client_secret", args.oauth2_client_secret),
    ):
        if value is not None:
            lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


def write_file(path: Path, text: str, force: bool) -> None:
    """Write atomically with mode 0600. Raises FileExistsError when ``path`` exists and not ``force``."""
    directory = path.parent if str(path.parent) else Path(".")
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, FILE_MODE)
        if force:
            os.replace(temp, path)
        else:
            _place_new(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    fsync_directory(directory)


def _place_new(temp: str, path: Path) -> None:
    """Move ``temp`` to ``path`` only if ``path`` does not exist (a hard link fails atomically if it does)."""
    try:
        os.link(temp, path)
    except FileExistsError:
        raise
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        if os.path.lexists(path):  # no hard links here: check, then rename
            raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
        os.replace(temp, path)


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    validate(parser, args)
    path = Path(args.config_file) if args.config_file else Path.cwd() / "emailproxy.config"
    if path.is_dir():
        print(
            f"emailproxy register: {path} is a directory; give a file name with --config-file",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        write_file(path, render(args), args.force)
    except FileExistsError:
        print(
            f"emailproxy register: {path} already exists; nothing was written. Use --force to replace it "
            "(its cached tokens are lost), or --config-file to write another file.",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except OSError as error:
        print(f"emailproxy register: cannot write {path}: {error.strerror or error}", file=sys.stderr)
        return EXIT_FAILED
    print(f"Wrote {path} (mode 0600).")
    for protocol, port in local_ports(args).items():
        prefix = PROTOCOLS[protocol][0]
        upstream = "STARTTLS" if getattr(args, f"{prefix}_server_starttls") else "TLS"
        server = f"{getattr(args, f'{prefix}_server_address')}:{getattr(args, f'{prefix}_server_port')}"
        print(f"  {protocol:<4} {args.local_address}:{port} -> {server} ({upstream})")
    return _report_checks(path)


def _report_checks(path: Path) -> int:
    try:
        config = load_config(path)
    except ConfigError as error:  # the flags were validated, so this means a bug here
        print(f"emailproxy register: the written file does not load: {error}", file=sys.stderr)
        return EXIT_FAILED
    found = problems(check_config(config))
    if found:
        print(f"`emailproxy check` finds {len(found)} problem(s) to fix before use:")
        for finding in found:
            print(textwrap.indent(format_finding(finding), "  "))
    else:
        print("`emailproxy check` finds no problems.")
    print(f"Start the proxy with: emailproxy --config-file {path}")
    return EXIT_OK
