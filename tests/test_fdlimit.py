"""The open-file limit is raised at start-up, and a max_connections that cannot fit is explained."""

from __future__ import annotations

import resource
import subprocess
import sys
import textwrap

from emailproxy.fdlimit import SPARE, descriptor_shortfall, raise_open_file_limit


def test_soft_limit_is_raised_to_the_hard_limit() -> None:
    # in a child process, so this test run's own limit is not changed
    script = textwrap.dedent(
        """
        import resource
        from emailproxy.fdlimit import raise_open_file_limit
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        print(raise_open_file_limit(ceiling=4096), *resource.getrlimit(resource.RLIMIT_NOFILE))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    reported, soft, hard = (int(v) for v in out.split())
    expected = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    assert soft == reported == expected
    assert soft > 256


def test_a_limit_already_high_enough_is_left_alone() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert raise_open_file_limit(ceiling=min(soft, 64)) == soft
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == soft


def test_shortfall_names_the_option_and_the_fix() -> None:
    assert descriptor_shortfall(1000, 2000 + SPARE) is None
    assert descriptor_shortfall(0, 100) is None  # no cap: nothing to compare
    assert descriptor_shortfall(1000, None) is None  # no such limit on this platform
    text = descriptor_shortfall(1000, 1024)
    assert text is not None
    assert "max_connections = 1000" in text and "about 480 sessions" in text and "LimitNOFILE=" in text
