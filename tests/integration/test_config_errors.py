"""Config errors through the real command: `meshproxy check-config` and `meshproxy run`."""

from __future__ import annotations

import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.harness import HOST

pytestmark = pytest.mark.integration

EDGE = """\
[node]
name = "p1"
role = "edge"

[[listener]]
name = "mysql"
bind = "127.0.0.1:16033"
upstream = "tier:middle"

[[tier]]
name = "middle"
members = ["127.0.0.1:17001"]
"""

MIDDLE = """\
[node]
name = "p2"
role = "middle"
mesh_bind = "127.0.0.1:17001"

[[service]]
name = "mysql"
upstream = "pool:main"

[[pool]]
name = "main"
servers = ["127.0.0.1:3306"]
"""

# name: (config text, or None for a file that does not exist; key path; reason)
CASES: dict[str, tuple[str | None, str, str]] = {
    "unknown key": (
        EDGE.replace('role = "edge"', 'role = "edge"\ncolour = "blue"'),
        "node.colour",
        "unknown key",
    ),
    "unknown nested key": (
        MIDDLE + '[pool.check]\ntype = "tcp"\nintervall_ms = 100\n',
        "pool[0].check.intervall_ms",
        "unknown key",
    ),
    "wrong type": (
        EDGE.replace('upstream = "tier:middle"', 'upstream = "tier:middle"\nbacklog = "lots"'),
        "listener[0].backlog",
        "expected an integer, got a string",
    ),
    "bad enum value": (
        EDGE.replace('role = "edge"', 'role = "sidecar"'),
        "node.role",
        "must be one of",
    ),
    "bad address": (
        EDGE.replace("127.0.0.1:16033", "127.0.0.1:99999"),
        "listener[0].bind",
        "port must be 1-65535",
    ),
    "address without port": (
        MIDDLE.replace('servers = ["127.0.0.1:3306"]', 'servers = ["db.example"]'),
        "pool[0].servers[0].address",
        "expected host:port",
    ),
    "duplicate names": (
        EDGE + '\n[[tier]]\nname = "middle"\nmembers = ["127.0.0.1:17002"]\n',
        "tier[1].name",
        "duplicate name 'middle'",
    ),
    "duplicate server": (
        MIDDLE.replace('["127.0.0.1:3306"]', '["127.0.0.1:3306", "127.0.0.1:3306"]'),
        "pool[0].servers[1]",
        "duplicate server",
    ),
    "listener to undefined pool": (
        EDGE.replace('upstream = "tier:middle"', 'upstream = "pool:main"'),
        "listener[0].upstream",
        "no pool named 'main'",
    ),
    "listener to undefined tier": (
        EDGE.replace('upstream = "tier:middle"', 'upstream = "tier:nowhere"'),
        "listener[0].upstream",
        "no tier named 'nowhere' (defined: middle)",
    ),
    "service to undefined pool": (
        MIDDLE.replace('upstream = "pool:main"', 'upstream = "pool:other"'),
        "service[0].upstream",
        "no pool named 'other'",
    ),
    "middle without mesh_bind": (
        MIDDLE.replace('mesh_bind = "127.0.0.1:17001"\n', ""),
        "node.mesh_bind",
        "a middle needs a mesh port",
    ),
    "value below minimum": (
        MIDDLE + "[timeouts]\nconnect_ms = 0\n",
        "timeouts.connect_ms",
        "must be at least 1",
    ),
    "missing required key": (
        EDGE.replace('name = "p1"\n', ""),
        "node.name",
        "required key is missing",
    ),
    "invalid TOML": (EDGE.replace('name = "p1"', 'name = "p1'), "", "invalid TOML"),
    "missing file": (None, "", "cannot read file"),
}


COMMANDS = ("check-config", "run")


def _argv(command: str, path: Path) -> list[str]:
    args = ["check-config", str(path)] if command == "check-config" else ["run", "-c", str(path)]
    return [sys.executable, "-m", "meshproxy", *args]


def _meshproxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshproxy", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        stdin=subprocess.DEVNULL,
    )


@dataclass(frozen=True)
class Outcome:
    path: Path
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Outcome]:
    """Every case through both commands, the processes run side by side to save time."""
    workdir = tmp_path_factory.mktemp("config-errors")
    running: dict[tuple[str, str], tuple[Path, subprocess.Popen[str]]] = {}
    try:
        for i, (case, (text, _, _)) in enumerate(CASES.items()):
            path = workdir / f"case{i}.toml"
            if text is not None:
                path.write_text(text)
            for command in COMMANDS:
                running[case, command] = (
                    path,
                    subprocess.Popen(
                        _argv(command, path),
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    ),
                )
        results = {}
        for key, (path, process) in running.items():
            stdout, stderr = process.communicate(timeout=60)
            results[key] = Outcome(path, process.returncode, stdout, stderr)
        return results
    finally:
        for _, process in running.values():
            if process.poll() is None:
                process.kill()
                process.communicate()


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", list(CASES))
def test_config_error_is_reported_precisely(
    outcomes: dict[tuple[str, str], Outcome], case: str, command: str
) -> None:
    """An invalid config makes the command exit with status 2 and one message naming the
    file, the key path and the reason, without a traceback."""
    _, key, reason = CASES[case]
    result = outcomes[case, command]
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    where = f"meshproxy: {result.path}: {key}: " if key else f"meshproxy: {result.path}: "
    assert message.startswith(where), message
    assert reason in message, message


@pytest.mark.parametrize("text", [EDGE, MIDDLE], ids=["edge", "middle"])
def test_valid_config_passes_check(tmp_path: Path, text: str) -> None:
    """check-config accepts the README's edge and middle shapes with status 0."""
    path = tmp_path / "node.toml"
    path.write_text(text)
    result = _meshproxy("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_port_in_use_fails_run_cleanly(tmp_path: Path) -> None:
    """`meshproxy run` on a port that is already taken logs bind_failed and exits with
    status 1, without a traceback."""
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        path = tmp_path / "node.toml"
        path.write_text(EDGE.replace("127.0.0.1:16033", f"{HOST}:{port}"))
        result = _meshproxy("run", "-c", str(path))
    assert result.returncode == 1, result.stderr
    assert "bind_failed" in result.stderr
    assert "Traceback" not in result.stderr
