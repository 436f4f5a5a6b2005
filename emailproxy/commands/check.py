"""``emailproxy check``: load a configuration and explain every problem and risk in it.

With ``--online`` it also connects to each upstream server exactly as configured (implicit TLS, or a
plain-text greeting then STARTTLS) and sends each token endpoint a request without credentials, and reports
what it saw. Exit status: 0 when nothing is wrong, 1 when there are problems (errors or warnings).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from emailproxy.checks import ERROR, Finding, check_config, finding_from_error, format_finding, problems
from emailproxy.config import ConfigError, load_config
from emailproxy.probes import online_findings

EXIT_OK = 0
EXIT_PROBLEMS = 1
DEFAULT_TIMEOUT = 10.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emailproxy check",
        description="Check a configuration file for problems and risks. Exit status 0: no problems; "
        "1: problems found.",
    )
    parser.add_argument("--config-file", default=None, help="default: emailproxy.config in this directory")
    parser.add_argument("--cache-store", default=None, help="the token cache file, if the proxy uses one")
    parser.add_argument(
        "--online",
        action="store_true",
        help="also connect to each mail server as configured and to each token endpoint",
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per network step (default 10)"
    )
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    path = Path(args.config_file) if args.config_file else Path.cwd() / "emailproxy.config"
    out = sys.stdout
    try:
        config = load_config(path, cache_store=args.cache_store)
    except ConfigError as error:
        report(out, str(path), [finding_from_error(error)])
        return EXIT_PROBLEMS
    findings = check_config(config)
    if args.online:
        findings += online_findings(config, args.timeout)
    report(out, str(path), findings)
    return EXIT_PROBLEMS if problems(findings) else EXIT_OK


def report(out: TextIO, path: str, findings: Sequence[Finding]) -> None:
    print(f"Checked {path}", file=out)
    for finding in findings:
        print(textwrap.indent(format_finding(finding), "  "), file=out)
    found = problems(findings)
    errors = sum(1 for f in found if f.level == ERROR)
    if not found:
        print("No problems found.", file=out)
    else:
        print(f"{len(found)} problem(s): {errors} error(s), {len(found) - errors} warning(s).", file=out)
