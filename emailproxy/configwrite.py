"""In-place, comment-preserving, atomic write-back of the keys the proxy owns (tokens and their companions).

The reference rewrites the whole file with ``ConfigParser.write()``, which drops comments and any edit the
user made while it ran. Here a save re-reads the file from disk, changes only the lines of the keys it is
given (a key line plus its indented continuation lines), and leaves every other byte alone: comments, blank
lines, key order, indentation, the case of other keys and the line-ending style. The new text is written to a
temporary file in the same directory, flushed and fsynced, given the original file's permissions and renamed
over it.

Lines are classified exactly as ``configparser`` reads them (full-line ``#``/``;`` comments, continuation
lines indented deeper than their key, blank lines inside values), so an edit lands where the parser sees it.
The same class writes the separate ``--cache-store`` file, which may not exist yet.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import re
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

_SECTION_RE = configparser.ConfigParser.SECTCRE
_OPTION_RE = configparser.ConfigParser.OPTCRE
_LINE_RE = re.compile(r"([^\r\n]*)(\r\n|\r|\n|$)")
_COMMENT_PREFIXES = ("#", ";")
_NEW_FILE_MODE = 0o600

_locks_guard = threading.Lock()
_locks: dict[str, threading.Lock] = {}


def _lock_for(path: str) -> threading.Lock:
    """One lock per real path, shared by every store object in the process."""
    with _locks_guard:
        return _locks.setdefault(path, threading.Lock())


@dataclass(slots=True)
class _Line:
    text: str  # without the line ending
    eol: str  # "\n", "\r\n", "\r" or "" (last line without one)
    kind: str = "other"  # blank, comment, section, option, continuation, other
    section: str | None = None  # section the line belongs to (header name for a header)
    key: str | None = None  # lowercased key, for option lines
    owner: int | None = None  # index of the option line a continuation line belongs to


def _split_lines(text: str) -> list[_Line]:
    lines = [_Line(m.group(1), m.group(2)) for m in _LINE_RE.finditer(text)]
    if lines and lines[-1].text == "" and lines[-1].eol == "":
        lines.pop()  # the empty match after the final line ending
    return lines


def _classify(lines: list[_Line]) -> None:
    """Mark each line the way ``configparser.RawConfigParser._read`` understands it."""
    section: str | None = None
    option: int | None = None
    indent_level = 0
    for index, line in enumerate(lines):
        stripped = line.text.strip()
        line.section = section
        if stripped.startswith(_COMMENT_PREFIXES):
            line.kind = "comment"
            continue
        if not stripped:
            line.kind = "blank"
            continue
        indent = len(line.text) - len(line.text.lstrip())
        if section is not None and option is not None and indent > indent_level:
            line.kind, line.owner = "continuation", option
            continue
        indent_level = indent
        header = _SECTION_RE.match(stripped)
        if header is not None:
            section = line.section = header.group("header")
            line.kind, option = "section", None
        elif section is not None:
            match = _OPTION_RE.match(stripped)
            if match is not None and match.group("option"):
                line.kind, line.key, option = "option", match.group("option").rstrip().lower(), index
            elif match is not None:
                option = None


def _option_end(lines: list[_Line], start: int) -> int:
    """Index of the last line of the option that starts at ``start`` (its last continuation line)."""
    end = start
    for index in range(start + 1, len(lines)):
        kind = lines[index].kind
        if kind == "continuation" and lines[index].owner == start:
            end = index
        elif kind not in ("blank", "comment"):
            break
    return end


def _replace_value(line: str, value: str) -> str:
    """``line`` with its value replaced; indentation, key spelling and delimiter spacing kept."""
    indent = line[: len(line) - len(line.lstrip())]
    match = _OPTION_RE.match(line.strip())
    if match is None:  # not reachable for lines classified as options
        raise ValueError(line)
    prefix = indent + line.strip()[: match.start("value")]
    if not match.group("value") and prefix[:-1].endswith((" ", "\t")):
        prefix += " "  # "key =" (empty value) becomes "key = value"
    return prefix + value


def _check_change(key: str, value: str | None) -> None:
    if (
        not key
        or key != key.strip()
        or any(c in key for c in "=:[]\r\n")
        or key.startswith(_COMMENT_PREFIXES)
    ):
        raise ValueError(f"cannot write a key named {key!r}")
    if value is None:
        return
    if "\n" in value or "\r" in value:
        raise ValueError(f"the value of {key!r} contains a line break; values are written on one line")
    if value != value.strip():
        raise ValueError(f"the value of {key!r} has leading or trailing white space, which would be lost")


def apply_changes(text: str, section: str, changes: Mapping[str, str | None]) -> str:
    """``text`` with the keys of ``section`` changed (None deletes); every other byte is kept."""
    if not section or "\n" in section or "\r" in section:
        raise ValueError(f"cannot write a section named {section!r}")
    for key, value in changes.items():
        _check_change(key, value)
    lines = _split_lines(text)
    _classify(lines)
    newline = next((line.eol for line in lines if line.eol), "\n")
    headers = [i for i, line in enumerate(lines) if line.kind == "section" and line.section == section]
    options = [i for i, line in enumerate(lines) if line.kind == "option" and line.section == section]

    replaced: dict[int, str] = {}
    dropped: set[int] = set()
    appended: list[str] = []
    for key, value in changes.items():
        spans = [(i, _option_end(lines, i)) for i in options if lines[i].key == key.lower()]
        for start, end in spans:
            for index in range(start + 1, end + 1):
                if lines[index].kind != "comment":  # a comment in the middle of a value stays
                    dropped.add(index)
            if value is None:
                dropped.add(start)
            else:
                replaced[start] = _replace_value(lines[start].text, value)
        if not spans and value is not None:
            appended.append(f"{key} = {value}")

    inserts: dict[int, list[str]] = {}
    tail: list[str] = []
    if appended and headers:
        first = headers[0]
        following = next((i for i in range(first + 1, len(lines)) if lines[i].kind == "section"), len(lines))
        own = [i for i in options if first < i < following]
        if own:  # after the section's last option (and its continuation lines), with the same indentation
            anchor, text = _option_end(lines, own[-1]), lines[own[-1]].text
            indent = text[: len(text) - len(text.lstrip())]
        else:  # right after the header
            anchor, indent = first, ""
        inserts[anchor] = [indent + entry for entry in appended]
    elif appended:
        if lines and lines[-1].kind != "blank":
            tail.append("")
        tail += [f"[{section}]", *appended]

    out: list[str] = []
    for index, line in enumerate(lines):
        added = inserts.get(index, [])
        if index not in dropped:
            needs_eol = bool(added) or (bool(tail) and index == len(lines) - 1)
            out.append(replaced.get(index, line.text) + (line.eol or (newline if needs_eol else "")))
        out.extend(entry + newline for entry in added)
    out.extend(entry + newline for entry in tail)
    return "".join(out)


class ConfigFileStore:
    """Writes owned keys back into a configuration (or ``--cache-store``) file, in place and atomically."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def save(self, section: str, changes: Mapping[str, str | None]) -> None:
        """Set (or, for None, delete) ``changes`` in ``section``, creating the section or file if needed.

        The file is re-read first, so edits made by the user since it was loaded are kept. Raises ValueError
        for a value containing a line break, and OSError when the file cannot be read or written.
        """
        target = os.path.realpath(self.path)
        with _lock_for(target):
            try:
                _merge_and_write(target, section, changes)
            except OSError as exc:
                if exc.strerror and target not in str(exc):  # ENOSPC and the like name no file
                    exc.strerror += f" (while saving {target})"
                raise
            _remove_stale_temp_files(target)


def _merge_and_write(target: str, section: str, changes: Mapping[str, str | None]) -> None:
    for _attempt in range(_MERGE_ATTEMPTS):
        try:
            with open(target, "rb") as handle:
                original: bytes | None = handle.read()
                seen: _Signature | None = _signature(os.fstat(handle.fileno()))
        except FileNotFoundError:
            original, seen = None, None
        raw = original or b""
        bom = raw.startswith(b"\xef\xbb\xbf")
        text = raw[3 if bom else 0 :].decode("utf-8", "surrogateescape")
        updated = apply_changes(text, section, changes)
        if original is not None and updated == text:
            return
        data = (b"\xef\xbb\xbf" if bom else b"") + updated.encode("utf-8", "surrogateescape")
        if _atomic_write(target, data, seen):
            return
        # the file changed while we merged (a user's save): merge again on top of their version
    raise OSError(f"{target} kept changing while saving tokens; tried {_MERGE_ATTEMPTS} times")


_MERGE_ATTEMPTS = 5
_Signature = tuple[int, int, int, int]


def _signature(stat: os.stat_result) -> _Signature:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _current_signature(target: str) -> _Signature | None:
    try:
        return _signature(os.stat(target))
    except FileNotFoundError:
        return None


def _atomic_write(target: str, data: bytes, seen: _Signature | None) -> bool:
    """Write ``data`` to a temporary file and rename it over ``target``, unless ``target`` no longer is the
    file that was read (``seen``; None: it did not exist): then nothing is replaced and False is returned."""
    directory = os.path.dirname(target) or "."
    stat = os.stat(target) if seen is not None else None
    fd, temp = tempfile.mkstemp(prefix="." + os.path.basename(target) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, (stat.st_mode & 0o7777) if stat is not None else _NEW_FILE_MODE)
        if stat is not None and hasattr(os, "chown"):
            with contextlib.suppress(OSError):  # keep the owner when we may (running as root)
                os.chown(temp, stat.st_uid, stat.st_gid)
        if _current_signature(target) != seen:  # narrows the window for a concurrent save to the rename
            os.unlink(temp)
            return False
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    fsync_directory(directory)
    return True


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make the rename durable (not possible on every platform, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


#: a temporary file left by a save that was killed half-way is removed once it is this old (seconds)
STALE_TEMP_SECONDS = 600.0
_TEMP_NAME_RE = re.compile(r"[a-z0-9_]{8}")  # the random part tempfile.mkstemp puts in its names


def _remove_stale_temp_files(target: str) -> None:
    """Delete the temporary files of interrupted saves (SIGKILL, power loss) next to ``target``, so they
    cannot pile up. Only names this module makes, and only old ones: a running save is never touched."""
    directory = os.path.dirname(target) or "."
    prefix, suffix = "." + os.path.basename(target) + ".", ".tmp"
    cutoff = time.time() - STALE_TEMP_SECONDS
    try:
        with os.scandir(directory) as entries:
            stale = [
                entry.path
                for entry in entries
                if entry.name.startswith(prefix)
                and entry.name.endswith(suffix)
                and _TEMP_NAME_RE.fullmatch(entry.name[len(prefix) : -len(suffix)])
                and entry.is_file(follow_symlinks=False)
                and entry.stat(follow_symlinks=False).st_mtime < cutoff
            ]
    except OSError:
        return
    for path in stale:
        with contextlib.suppress(OSError):
            os.unlink(path)
