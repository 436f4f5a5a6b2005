"""The service files under packaging/ agree with the program and keep their hardening.

Each file's command line is handed to the proxy's own argument parser (``emailproxy.cli.build_parser``), so a
renamed or removed flag breaks these tests rather than a production service. The systemd unit is also checked
by ``systemd-analyze verify`` and ``systemd-analyze security --offline=yes``, which work without a running
systemd (``.ci/run`` installs the ``systemd`` package for them). There is no Docker engine or macOS here: the
Dockerfile, compose file and plist get static checks, and the image's health-check one-liner is run for real
against a local socket.
"""

from __future__ import annotations

import argparse
import json
import os
import plistlib
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from emailproxy.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
UNIT = PACKAGING / "systemd" / "emailproxy.service"
DOCKERFILE = PACKAGING / "docker" / "Dockerfile"
DOCKERIGNORE = PACKAGING / "docker" / "Dockerfile.dockerignore"
COMPOSE = PACKAGING / "docker" / "compose.yaml"
PLIST = PACKAGING / "launchd" / "ac.emailproxy.plist"
INSTALLED_PATH = "/usr/local/bin/emailproxy"

#: settings the unit must have, with their exact values
HARDENING = {
    "Type": "simple",
    "User": "emailproxy",
    "Group": "emailproxy",
    "Restart": "on-failure",
    "UMask": "0077",
    "StateDirectory": "emailproxy",
    "ConfigurationDirectory": "emailproxy",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "CapabilityBoundingSet": "",
}


# ------------------------------------------------------------------------------------------------ helpers


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file: section -> key -> every value in order (systemd keys may repeat, which
    configparser does not allow). Comments start with # or ;, a trailing backslash continues a line."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"a setting before any section: {line!r}"
        assert "=" in line, f"not a key=value line: {line!r}"
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def proxy_args(argv: list[str]) -> argparse.Namespace:
    """The proxy's own parser; it exits (SystemExit) on a flag it does not know."""
    return build_parser().parse_args(argv)


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        line = pending + stripped
        pending = ""
        name, _, rest = line.partition(" ")
        instructions.append((name.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def unit() -> dict[str, list[str]]:
    return parse_unit(UNIT.read_text(encoding="utf-8"))["Service"]


def only(service: dict[str, list[str]], key: str) -> str:
    values = service.get(key)
    assert values is not None, f"{key}= is missing from the unit"
    assert len(values) == 1, f"{key}= is set {len(values)} times"
    return values[0]


# ------------------------------------------------------------------------------------------------ systemd


def test_unit_has_the_hardening_settings() -> None:
    service = unit()
    for key, expected in HARDENING.items():
        assert only(service, key) == expected, key
    assert set(only(service, "RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert service["SystemCallFilter"][0] == "@system-service"
    assert all(value.startswith("~") for value in service["SystemCallFilter"][1:]), "later filters only deny"
    assert "DynamicUser" not in service, "the unit uses a fixed system user (see the unit's comment)"
    assert "AmbientCapabilities" not in service or only(service, "AmbientCapabilities") == ""
    sections = parse_unit(UNIT.read_text(encoding="utf-8"))
    assert sections["Install"]["WantedBy"] == ["multi-user.target"]


def test_unit_command_lines_are_accepted_by_the_proxy() -> None:
    service = unit()
    exec_start = shlex.split(only(service, "ExecStart"))
    assert exec_start[0] == INSTALLED_PATH
    args = proxy_args(exec_start[1:])
    assert args.config_file == "/etc/emailproxy/emailproxy.config"
    assert args.cache_store == "/var/lib/emailproxy/tokens.cache"
    assert args.no_gui is True
    assert args.log_format == "text"
    assert args.log_file is None and args.syslog is False, "logs go to stderr, i.e. the journal"
    # the files live in the directories systemd creates (and, for the state, makes writable)
    assert Path(args.config_file).parent == Path("/etc") / only(service, "ConfigurationDirectory")
    assert Path(args.cache_store).parent == Path("/var/lib") / only(service, "StateDirectory")
    assert shlex.split(only(service, "ExecReload")) == ["/bin/kill", "-HUP", "$MAINPID"]


def _unit_for_this_machine(tmp_path: Path, text: str) -> Path:
    """A copy of the unit whose ExecStart names the installed program (verify checks that it exists)."""
    program = shutil.which("emailproxy")
    assert program, "the emailproxy console script is not installed (pip install -e .)"
    path = tmp_path / "emailproxy.service"
    path.write_text(text.replace(INSTALLED_PATH + " ", program + " ", 1), encoding="utf-8")
    return path


def _verify(path: Path) -> list[str]:
    """systemd-analyze verify's complaints about ``path`` (a problem with the unit can be a warning only,
    e.g. an unknown key is reported and ignored with exit status 0, so the output is what counts)."""
    analyze = shutil.which("systemd-analyze")
    assert analyze
    done = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (done.stdout + done.stderr).splitlines() if path.name in line]
    if done.returncode != 0 and not complaints:
        complaints = [f"exit status {done.returncode}: {done.stderr.strip()}"]
    return complaints


def test_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    """``systemd-analyze verify`` and ``security --offline=yes`` (no running systemd needed).

    Where the binary is missing (a machine without the systemd package, e.g. macOS) only the static checks of
    the tests above can run; they are repeated here so this test still asserts something real. ``.ci/run``
    installs ``systemd``, so CI always takes the full path."""
    if shutil.which("systemd-analyze") is None:
        test_unit_has_the_hardening_settings()
        test_unit_command_lines_are_accepted_by_the_proxy()
        return
    text = UNIT.read_text(encoding="utf-8")
    good = _unit_for_this_machine(tmp_path, text)
    assert _verify(good) == []

    # The check can fail: the same unit with a misspelt key and with a missing program is reported.
    broken = tmp_path / "broken"
    broken.mkdir()
    typo = _unit_for_this_machine(broken, text.replace("\nProtectHome=", "\nProtectHom=", 1))
    assert any("ProtectHom" in line for line in _verify(typo))
    missing = broken / "emailproxy.service"
    missing.write_text(text.replace(INSTALLED_PATH, str(tmp_path / "no-such-program"), 1), encoding="utf-8")
    assert _verify(missing)

    command = ["systemd-analyze", "security", "--offline=yes", str(good)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout + done.stderr)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= 2.0, f"exposure {match.group(1)} (it was 1.4 when the unit was written)"


# ------------------------------------------------------------------------------------------------ Docker


def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))


def instruction(instructions: list[tuple[str, str]], name: str) -> list[str]:
    return [arguments for found, arguments in instructions if found == name]


def test_dockerfile_runs_the_proxy_as_a_non_root_user() -> None:
    instructions = dockerfile()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    users = instruction(instructions, "USER")
    assert users, "no USER: the image would run as root"
    final_user = users[-1].split(":")[0]
    assert final_user not in ("root", "0")
    # nothing after the last USER switches back, and that user is created in a RUN before it
    last_user_at = max(i for i, (name, _) in enumerate(instructions) if name == "USER")
    created = " ".join(instruction(instructions[:last_user_at], "RUN"))
    assert re.search(rf"useradd\b.*\b{re.escape(final_user)}\b", created)


def test_dockerfile_entrypoint_volumes_and_ports() -> None:
    instructions = dockerfile()
    (entrypoint,) = instruction(instructions, "ENTRYPOINT")
    argv = json.loads(entrypoint)  # exec form, so signals reach the proxy itself
    assert argv[0] == "emailproxy"
    args = proxy_args(argv[1:])
    volumes: set[str] = set()
    for volume in instruction(instructions, "VOLUME"):
        volumes.update(json.loads(volume) if volume.startswith("[") else volume.split())
    assert volumes == {"/config", "/data"}
    assert Path(args.config_file).parent == Path("/config")
    assert Path(args.cache_store).parent == Path("/data")
    exposed = {
        int(port.split("/")[0]) for ports in instruction(instructions, "EXPOSE") for port in ports.split()
    }
    assert {2993, 2995, 2465} <= exposed
    assert all(port >= 1024 for port in exposed), "a non-root process cannot bind a port below 1024"
    # what is copied exists and is not excluded from the build context
    ignored = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    for copy in instruction(instructions, "COPY"):
        for source in copy.split()[:-1]:
            assert (ROOT / source).exists(), source
            assert f"!{source}" in ignored or f"!{source}/" in ignored, (
                f"the dockerignore leaves out {source}"
            )


def _healthcheck_command() -> list[str]:
    (healthcheck,) = instruction(dockerfile(), "HEALTHCHECK")
    _, _, command = healthcheck.partition("CMD ")
    argv: list[str] = json.loads(command)
    return argv


def test_dockerfile_healthcheck_detects_a_listener() -> None:
    """Runs the image's health check here: healthy with a listener on the port, unhealthy without one."""
    argv = _healthcheck_command()
    assert argv[:2] == ["python", "-c"]
    env_defaults = " ".join(instruction(dockerfile(), "ENV"))
    assert re.search(r"\bEMAILPROXY_HEALTHCHECK_PORT=\d+", env_defaults), "the port variable needs a default"
    command = [sys.executable, *argv[1:]]
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        env = {**os.environ, "EMAILPROXY_HEALTHCHECK_PORT": str(port)}
        healthy = subprocess.run(command, env=env, capture_output=True, timeout=30)
        assert healthy.returncode == 0, healthy.stderr
    unhealthy = subprocess.run(command, env=env, capture_output=True, timeout=30)
    assert unhealthy.returncode != 0


def test_compose_example_matches_the_image() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    # the same health check as the image (a copy that drifts would test something else)
    assert json.dumps(_healthcheck_command()[2]) in text
    published = re.findall(r'^\s*-\s*"?([0-9.]*:?\d+:\d+)"?\s*(?:#.*)?$', text, flags=re.MULTILINE)
    assert published, "no published ports"
    assert all(port.startswith("127.0.0.1:") for port in published), published
    assert re.search(r"^\s*-\s*\./config:/config:ro\b", text, flags=re.MULTILINE)
    assert re.search(r"^\s*-\s*\./data:/data\b", text, flags=re.MULTILINE)
    assert re.search(r"^\s*restart:\s*\S+", text, flags=re.MULTILINE)
    assert re.search(r"^\s*dockerfile:\s*packaging/docker/Dockerfile\s*$", text, flags=re.MULTILINE)


# ------------------------------------------------------------------------------------------------ launchd


def test_launchd_plist_runs_the_proxy() -> None:
    with PLIST.open("rb") as handle:
        plist = plistlib.load(handle)
    assert plist["Label"] == PLIST.stem
    argv = plist["ProgramArguments"]
    assert Path(argv[0]).name == "emailproxy"
    args = proxy_args(argv[1:])
    assert args.config_file and Path(args.config_file).is_absolute(), "launchd does not expand relative paths"
    assert args.cache_store and Path(args.cache_store).is_absolute()
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["RunAtLoad"] is True
    assert Path(plist["StandardErrorPath"]).is_absolute()
    assert plist["Umask"] == 0o077


@pytest.mark.parametrize("path", [UNIT, DOCKERFILE, COMPOSE, PLIST], ids=lambda p: p.name)
def test_documented_in_the_packaging_index(path: Path) -> None:
    index = (PACKAGING / "README.md").read_text(encoding="utf-8")
    assert path.relative_to(PACKAGING).as_posix() in index
