"""One chaos scenario: steady load from the app containers, faults, and what everyone saw.

    with Scenario(stack, "kill-middle", duration_s=10, artifacts=dir) as run:
        run.settle(2.0)
        run.inject("kill p3", lambda: stack.kill("p3"))
        detected = run.observer.wait_for("p1", "p3", "route", {"SHUNNED"}, timeout_s=5)
    timeline = run.timeline  # written to DIR/<topology>-<scenario>.json and .png

The load runs for a fixed ``duration_s`` (a schedule, not a synchronisation: waits on
events go through :class:`~meshproxy.chaos.observe.Observer`); the timeline's buckets and
client events come from its JSON lines, and its view changes from the observer.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from meshproxy.chaos.observe import Observer
from meshproxy.chaos.stack import Stack
from meshproxy.chaos.timeline import BUCKET_S, ClientEvent, Fault, Timeline

LOAD_MODULE = "meshproxy.chaos.load"
WORKERS_PER_APP = 1000  # worker numbers of app i start at i * this


def load_command(stack: Stack, app: str, duration_s: float, extra: Sequence[str] = ()) -> list[str]:
    """The load generator's command line in ``app``'s container, aimed at its edge
    (``extra``: more of its options, e.g. ``--mode transactions``)."""
    spec = stack.spec
    command = ["python3", "-m", LOAD_MODULE, *extra, "--host", spec.edge_address(app)]
    command += ["--port", str(spec.services[0].port), "--duration-s", str(duration_s)]
    command += ["--user", spec.monitor_user, "--password", spec.monitor_password]
    # The backends see the address the last proxy dialled from: name it.
    for middle in spec.nodes:
        for net in middle.networks:
            command += ["--middle", f"{spec.address(middle.name, net)}={middle.name}"]
    return command


class _Load:
    """The load generator running in a container; its output parsed as it arrives."""

    def __init__(
        self, stack: Stack, app: str, duration_s: float, extra: Sequence[str] = ()
    ) -> None:
        self.container = stack.container(app)
        self.command = load_command(stack, app, duration_s, extra)
        self.buckets: dict[float, tuple[int, int, int, dict[str, int]]] = {}
        self.events: list[dict[str, Any]] = []
        self.clients: list[dict[str, Any]] = []  # the transactions load's closing tallies
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        # The docker CLI rather than the SDK's exec stream, whose socket outlives the stream.
        with subprocess.Popen(
            ["docker", "exec", self.container.name, *self.command],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        ) as process:
            assert process.stdout is not None
            for line in process.stdout:
                self._parse(line)

    def _parse(self, line: bytes) -> None:
        try:
            record = json.loads(line)
        except ValueError:
            return  # a traceback or warning from the container; not a record
        if "b" in record:
            self.buckets[record["b"]] = (record["q"], record["c"], record["e"], record["m"])
        elif "ev" in record:
            self.events.append(record)
        elif "client" in record:
            self.clients.append(record)


class Scenario:
    """Context manager running one scenario; ``timeline`` is ready after the block."""

    def __init__(
        self,
        stack: Stack,
        name: str,
        duration_s: float,
        artifacts: Path,
        load_args: Sequence[str] = (),
    ) -> None:
        self.stack = stack
        self.name = name
        self.duration_s = duration_s
        self.artifacts = artifacts
        self.t0 = time.time()
        self.observer = Observer(stack.spec, self.t0, stack.admin_token)
        self.faults: list[Fault] = []
        # Every app host runs the load through its own edge; worker numbers stay distinct.
        apps = [n.name for n in stack.spec.nodes if n.role == "app"]
        self._loads = [_Load(stack, app, duration_s, load_args) for app in apps]
        self.timeline = Timeline(scenario=name, topology=stack.spec.name, t0=self.t0)

    def __enter__(self) -> Scenario:
        self.t0 = time.time()
        self.observer.t0 = self.t0
        self.observer.start()
        for load in self._loads:
            load.thread.start()
        return self

    def now(self) -> float:
        return time.time() - self.t0

    def settle(self, until_s: float) -> None:
        """Let the load run undisturbed until ``until_s`` into the scenario."""
        time.sleep(max(0.0, until_s - self.now()))

    def settle_on(self, middle: str, sessions: int, timeout_s: float) -> None:
        """Let the load run until ``sessions`` sessions have gone through ``middle`` (a
        fault on it tests nothing while no session is open there); raises TimeoutError."""
        deadline = time.monotonic() + timeout_s
        while self.sessions_through(middle) < sessions:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {sessions} sessions through {middle} in {timeout_s} s")
            time.sleep(0.05)

    def sessions_through(self, middle: str) -> int:
        """New sessions through ``middle`` so far, from the load's live output."""
        return sum(
            bucket[3].get(middle, 0)
            for load in self._loads
            for bucket in list(load.buckets.values())
        )

    def inject(self, action: str, do: Callable[[], float | None]) -> float:
        """Run one fault or repair and note it on the timeline; returns its time: when
        ``do`` was called, or the epoch time ``do`` returns (when it knows better)."""
        at = time.time()
        happened = do()
        at = (happened if happened is not None else at) - self.t0
        self.faults.append(Fault(round(at, 3), action))
        return at

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for load in self._loads:
            load.thread.join(timeout=self.duration_s + 30)
        self.observer.stop()
        self._finish()

    def _finish(self) -> None:
        timeline = self.timeline
        timeline.t0 = self.t0
        timeline.duration_s = self.duration_s
        timeline.faults = list(self.faults)
        timeline.changes = list(self.observer.changes)
        count = int(self.duration_s / BUCKET_S) + 1
        timeline.queries, timeline.connects, timeline.errors = [0] * count, [0] * count, [0] * count
        for load in self._loads:
            for start, (queries, connects, errors, middles) in load.buckets.items():
                index = round((start - self.t0) / BUCKET_S)
                if 0 <= index < count:
                    timeline.queries[index] += queries
                    timeline.connects[index] += connects
                    timeline.errors[index] += errors
                    for middle, n in middles.items():
                        timeline.middles.setdefault(middle, [0] * count)[index] += n
        timeline.client_events = sorted(
            (
                ClientEvent(
                    round(e["t"] - self.t0, 3),
                    WORKERS_PER_APP * i + e["w"],
                    e["ev"],
                    e.get("m", ""),
                    e.get("d", ""),
                    round(e["s"] - self.t0, 3) if "s" in e else None,
                    e.get("code"),
                    e.get("stmt", ""),
                    e.get("tx", ""),
                    bool(e.get("broken", False)),
                )
                for i, load in enumerate(self._loads)
                for e in load.events
            ),
            key=lambda e: e.t,
        )
        timeline.clients = [
            {**c, "t": round(c["t"] - self.t0, 3), "w": WORKERS_PER_APP * i + c["w"]}
            for i, load in enumerate(self._loads)
            for c in load.clients
        ]

    def write(self) -> tuple[Path, Path]:
        """Write the timeline's JSON and PNG into the artifacts folder."""
        from meshproxy.chaos.plot import plot  # matplotlib is slow to import; only here

        stem = self.artifacts / f"{self.stack.spec.name}-{self.name}"
        self.timeline.write(stem.with_suffix(".json"))
        plot(self.timeline, stem.with_suffix(".png"))
        return stem.with_suffix(".json"), stem.with_suffix(".png")
