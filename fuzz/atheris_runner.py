"""Start a coverage-guided atheris run of a harness (atheris is a manual tool, not a dependency).

Only the project's own code (``emailproxy.*`` and the harnesses) is instrumented, so libFuzzer's
``cov:`` figure counts edges in the code under test. libFuzzer's flags (``-max_total_time``, ``-dict``,
corpus directories...) are passed through from the command line; see fuzz/README.md.
"""

from __future__ import annotations

import gc
import sys
import types
from collections.abc import Callable

OWN_CODE = ("emailproxy.", "fuzz.")


def fuzz(test_one_input: Callable[[bytes], None]) -> None:
    import atheris  # type: ignore[import-untyped]  # here: the harnesses must work without it

    atheris.enabled_hooks.add("RegEx")
    atheris.enabled_hooks.add("str")
    for obj in gc.get_objects():
        if isinstance(obj, types.FunctionType) and str(getattr(obj, "__module__", "")).startswith(OWN_CODE):
            atheris.instrument_func(obj)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
