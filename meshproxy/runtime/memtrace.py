"""Allocation tracing for soak runs, off unless the environment asks for it.

``MESHPROXY_TRACEMALLOC_DIR=DIR`` makes a node process start tracemalloc once it has warmed
up (``MESHPROXY_TRACEMALLOC_START_S``, 60 s) and, every ``MESHPROXY_TRACEMALLOC_EVERY_S``
seconds (60) after a first interval of tracing, write the allocation sites whose live
memory grew most since then to ``DIR/<node>-<role>-<pid>.txt``. Starting late keeps the
warm-up at full speed and leaves only what was allocated after it, and is still held, in
the traces: where a leak lives. ``bench.soak`` sets it and shows the file of a process
whose memory grew past its target.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

DIR_ENV = "MESHPROXY_TRACEMALLOC_DIR"
START_ENV = "MESHPROXY_TRACEMALLOC_START_S"
EVERY_ENV = "MESHPROXY_TRACEMALLOC_EVERY_S"
FRAMES = 3
TOP = 20


def start_if_asked(node: str, role: str) -> None:
    """Start the tracing thread when the environment asks for it."""
    directory = os.environ.get(DIR_ENV)
    if not directory:
        return
    path = Path(directory) / f"{node}-{role or 'single'}-{os.getpid()}.txt"
    start_s = float(os.environ.get(START_ENV, "60"))
    every_s = float(os.environ.get(EVERY_ENV, "60"))
    # A thread, not an asyncio task: it must not depend on the loop it is watching.
    threading.Thread(
        target=_trace, args=(path, start_s, every_s), name="memtrace", daemon=True
    ).start()


def _trace(path: Path, start_s: float, every_s: float) -> None:
    import tracemalloc

    time.sleep(start_s)
    tracemalloc.start(FRAMES)
    ignore = (tracemalloc.Filter(False, tracemalloc.__file__),)
    time.sleep(every_s)
    baseline = tracemalloc.take_snapshot().filter_traces(ignore)
    own_at_baseline = tracemalloc.get_tracemalloc_memory()
    began = time.monotonic()
    while True:
        time.sleep(every_s)
        snapshot = tracemalloc.take_snapshot().filter_traces(ignore)
        growth = snapshot.compare_to(baseline, "traceback")[:TOP]
        # Its own memory (traces, interned tracebacks) is in the process's RSS too: the
        # soak takes its growth since the baseline out of the growth it judges.
        own = tracemalloc.get_tracemalloc_memory()
        lines = [
            f"# tracemalloc_growth_bytes {own - own_at_baseline} (its own memory: {own})",
            f"# {time.monotonic() - began:.0f} s after the baseline; top {TOP} by growth",
        ]
        for stat in growth:
            lines.append(f"{stat.size_diff / 1024:+.1f} KiB {stat.count_diff:+d} blocks")
            # File and line only: formatting source lines would fill linecache, itself
            # a growth this report would then find.
            lines += [f"    {frame.filename}:{frame.lineno}" for frame in stat.traceback]
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text("\n".join(lines) + "\n")
            tmp.replace(path)
        except OSError:
            return  # the soak removed its folder: nobody is reading any more
