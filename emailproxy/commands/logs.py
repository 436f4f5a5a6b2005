"""``emailproxy logs``: the last lines of the proxy's log file, optionally followed as it grows.

The proxy writes a log file only when it runs with ``--log-file PATH`` (otherwise it logs to standard error,
which a service manager keeps: ``journalctl -u emailproxy``). Give the same path here, or set
``EMAILPROXY_LOG_FILE``. ``--auth`` keeps only the lines about pending authorisations: the
"Please visit the following URL to authenticate account ..." line and device-flow codes.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import BinaryIO, TextIO

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
ENV_VARIABLE = "EMAILPROXY_LOG_FILE"
DEFAULT_LINES = 20
POLL_INTERVAL = 0.5

#: lines that ask a person to do something so an account can sign in
AUTH_RE = re.compile(
    r"Please visit the following URL to authenticate account"
    r"|\buse (?:the )?code\b|\benter the code\b|\buser[ _]code\b|\bdevice code\b|devicelogin"
    r"|authori[sz]ation request received",
    re.IGNORECASE,
)


def is_auth_line(line: str) -> bool:
    return AUTH_RE.search(line) is not None


def _complete_lines(path: Path) -> tuple[list[str], int]:
    """The file's complete lines (a last line still being written is left out) and the offset after them."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return [], 0
    end = data.rfind(b"\n") + 1
    text = data[:end].decode("utf-8", "replace")
    return [line.rstrip("\r") for line in text.split("\n")[:-1]], end


def recent_lines(path: Path, count: int, keep: Callable[[str], bool] | None = None) -> tuple[list[str], int]:
    """The last ``count`` lines (that ``keep`` accepts) of the log and, before it, of its first rotated
    file; and the offset in ``path`` up to which lines were read (where ``follow`` goes on)."""
    rotated = path.with_name(path.name + ".1")
    selected: deque[str] = deque(maxlen=max(count, 0))
    offset = 0
    for source in (rotated, path):
        lines, offset = _complete_lines(source)
        selected.extend(line for line in lines if keep is None or keep(line))
    return list(selected), offset


def follow(
    path: Path,
    emit: Callable[[str], None],
    keep: Callable[[str], bool] | None = None,
    stop: Callable[[], bool] = lambda: False,
    position: int = 0,
    interval: float = POLL_INTERVAL,
) -> None:
    """Emit each line appended to ``path`` after ``position`` until ``stop()`` is true. A rotated or
    truncated file is reopened and read from its start."""
    handle: BinaryIO | None = None
    identity: tuple[int, int] | None = None
    partial = b""
    try:
        while not stop():
            if handle is None:
                try:
                    handle = open(path, "rb")  # kept open across iterations; closed below
                except FileNotFoundError:
                    time.sleep(interval)
                    continue
                info = os.fstat(handle.fileno())
                if info.st_size >= position:
                    handle.seek(position)
                position = 0  # a reopened (rotated) file is read from its start
                identity = (info.st_dev, info.st_ino)
            chunk = handle.read()
            if chunk:
                partial += chunk
                *complete, partial = partial.split(b"\n")
                for raw in complete:
                    line = raw.decode("utf-8", "replace").rstrip("\r")
                    if keep is None or keep(line):
                        emit(line)
                continue
            if _replaced(path, identity, handle.tell()):
                handle.close()
                handle, partial = None, b""
                continue
            time.sleep(interval)
    finally:
        if handle is not None:
            handle.close()


def _replaced(path: Path, identity: tuple[int, int] | None, position: int) -> bool:
    """True when the file was rotated (another file now has the name) or truncated."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return False  # between the rename and the new file: keep reading the old one for now
    return (info.st_dev, info.st_ino) != identity or info.st_size < position


def resolve_log_file(given: str | None) -> Path | None:
    value = given or os.environ.get(ENV_VARIABLE, "").strip()
    return Path(value) if value else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emailproxy logs",
        description="Show the last lines of the proxy's log file (the one it was started with --log-file).",
    )
    parser.add_argument(
        "--log-file", default=None, help=f"the proxy's --log-file (default: the {ENV_VARIABLE} variable)"
    )
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing new lines (Ctrl-C stops)")
    parser.add_argument(
        "--auth",
        action="store_true",
        help="only lines about pending authorisations (sign-in URLs and device codes)",
    )
    parser.add_argument(
        "-n", "--lines", type=int, default=DEFAULT_LINES, help=f"how many lines (default {DEFAULT_LINES})"
    )
    return parser


def _print(lines: Iterable[str], out: TextIO) -> None:
    for line in lines:
        print(line, file=out, flush=True)


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    path = resolve_log_file(args.log_file)
    if path is None:
        print(
            "emailproxy logs: no log file given. The proxy writes a log file only when it is started with "
            "--log-file PATH (otherwise it logs to standard error; under systemd: journalctl -u emailproxy). "
            f"Pass the same path here with --log-file PATH, or set {ENV_VARIABLE}=PATH.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.lines < 0:
        print("emailproxy logs: -n must be 0 or more", file=sys.stderr)
        return EXIT_USAGE
    keep = is_auth_line if args.auth else None
    if not path.exists() and not args.follow:
        print(
            f"emailproxy logs: {path} does not exist (yet): is the proxy running with --log-file {path}?",
            file=sys.stderr,
        )
        return EXIT_PROBLEMS
    lines, offset = recent_lines(path, args.lines, keep)
    _print(lines, sys.stdout)
    if args.follow:
        try:
            follow(path, lambda line: _print([line], sys.stdout), keep, position=offset)
        except KeyboardInterrupt:
            pass
    return EXIT_OK
