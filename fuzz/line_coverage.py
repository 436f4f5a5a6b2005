"""Line coverage of the protocol code reached by a harness over corpus directories (standard library only).

    python -m fuzz.line_coverage [--missing] imap /tmp/fuzz/imap fuzz/corpus/imap

plays every file through ``fuzz.fuzz_<harness>.test_one_input`` under ``sys.settrace`` and prints, for
each module of emailproxy/protocols/ that ran, the share of its function-body lines executed (module
and class bodies run at import and are left out; a failing input is reported, not counted).
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import emailproxy.protocols

PROTOCOLS = Path(emailproxy.protocols.__file__).parent


def _functions(code: types.CodeType) -> Iterator[types.CodeType]:
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            if const.co_flags & 0x1:  # CO_OPTIMIZED: a function, not a class body
                yield const
            yield from _functions(const)


def executable_lines(path: Path) -> set[int]:
    lines: set[int] = set()
    for code in _functions(compile(path.read_text(), str(path), "exec")):
        lines |= {line for _, _, line in code.co_lines() if line is not None and line != code.co_firstlineno}
    return lines


def measure(harness: str, folders: list[Path]) -> dict[str, tuple[int, int, list[int]]]:
    test_one_input = importlib.import_module(f"fuzz.fuzz_{harness}").test_one_input
    files = {str(path): path for path in PROTOCOLS.glob("*.py")}
    hit: dict[str, set[int]] = {name: set() for name in files}

    def local(frame: types.FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            hit[frame.f_code.co_filename].add(frame.f_lineno)
        return local

    def tracer(frame: types.FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename in files else None

    inputs = [path for folder in folders for path in sorted(folder.iterdir()) if path.is_file()]
    failures = 0
    sys.settrace(tracer)
    try:
        for path in inputs:
            try:
                test_one_input(path.read_bytes())
            except Exception:  # counted and reported
                failures += 1
    finally:
        sys.settrace(None)
    print(f"{harness}: {len(inputs)} inputs, {failures} failing")
    result: dict[str, tuple[int, int, list[int]]] = {}
    for name, path in sorted(files.items()):
        if not hit[name]:
            continue
        wanted = executable_lines(path)
        result[path.name] = (len(hit[name] & wanted), len(wanted), sorted(wanted - hit[name]))
    return result


def main() -> None:
    args = sys.argv[1:]
    missing = "--missing" in args
    harness, *folders = [arg for arg in args if arg != "--missing"]
    for name, (covered, total, left) in measure(harness, [Path(folder) for folder in folders]).items():
        print(f"  {name:16} {covered:4}/{total:4} lines  {100 * covered / total:5.1f}%")
        if missing and left:
            print(f"    not run: {', '.join(map(str, left))}")


if __name__ == "__main__":
    main()
