"""deploy/systemd's unit files: systemd's own parser accepts them, and they fit the angel."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from meshproxy.config import NodeConfig

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
SERVICE = "meshproxy@.service"
SOCKET = "meshproxy@.socket"
INSTALLED = "/opt/meshproxy/bin/meshproxy"
# What systemd says, on a unit it loads anyway, about a line it did not take.
COMPLAINTS = ("Unknown", "ignoring", "Failed to parse", "Invalid", "not executable")


def _settings(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_units_verify(tmp_path: Path) -> None:
    """systemd-analyze verify loads both units and complains about no line of either."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    # verify insists that ExecStart's program exists; the unit names where a deployment
    # puts it, so the copy names this interpreter's meshproxy (or the interpreter) instead.
    program = Path(sys.executable).with_name("meshproxy")
    here = str(program if program.exists() else Path(sys.executable))
    service = (UNITS / SERVICE).read_text()
    assert INSTALLED in service
    (tmp_path / SERVICE).write_text(service.replace(INSTALLED, here))
    shutil.copy(UNITS / SOCKET, tmp_path / SOCKET)
    result = subprocess.run(
        [analyze, "verify", SERVICE, SOCKET, "meshproxy@edge.service", "meshproxy@edge.socket"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert not [line for line in output.splitlines() if any(c in line for c in COMPLAINTS)]


def test_service_fits_the_angel() -> None:
    """Notify with access for a successor angel, SIGTERM to the angel only, time to drain."""
    service = _settings(SERVICE)
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["all"]
    assert service["KillMode"] == ["mixed"]
    assert service["ExecStart"] == [f"{INSTALLED} run -c /etc/meshproxy/%i.toml"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    # The angel's stop: workers get drain_timeout_s + 5 s, then control 10 s.
    drain_s = NodeConfig.__dataclass_fields__["drain_timeout_s"].default
    assert isinstance(drain_s, float)
    (stop,) = service["TimeoutStopSec"]
    assert stop.endswith("s")
    assert float(stop[:-1]) > drain_s + 5.0 + 10.0
    (watchdog,) = service["WatchdogSec"]
    assert watchdog.endswith("s")
    assert float(watchdog[:-1]) >= 2.0  # the angel pings at half of it from a 0.1 s loop


def test_socket_feeds_the_service() -> None:
    """The socket unit passes TCP listeners to the same instance's service."""
    sockets = _settings(SOCKET)
    assert sockets["Service"] == ["meshproxy@%i.service"]
    assert sockets["ListenStream"]
    for address in sockets["ListenStream"]:
        host, _, port = address.rpartition(":")
        assert host
        assert port.isdigit()
