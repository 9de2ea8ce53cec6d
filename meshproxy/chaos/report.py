"""The chaos suite's summary table, one row per scenario, read from its timeline JSON files.

``python -m meshproxy.chaos.report [DIR] [--markdown]`` prints the table for every timeline
under DIR (default ``artifacts/chaos``, searched recursively) and exits 1 when a scenario
failed, a timeline cannot be read, or none was found; 0 otherwise. ``--markdown`` prints a
table to paste into the README. The verdict line goes to stderr, so stdout is only the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from meshproxy.chaos.timeline import Check, Timeline, from_json, read

DEFAULT_DIR = Path("artifacts/chaos")
HEADER = ("scenario", "topology", "errors", "detect", "recover", "bounds", "result")
_RIGHT = {"errors", "detect", "recover"}  # numeric columns, right-aligned
_PROG = "python -m meshproxy.chaos.report"


def number(value: float) -> str:
    """``3``, ``0.35``, ``1.2``: at most two decimals, no trailing zeros."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def seconds(value: float | None) -> str:
    """A measured time for tables and titles; ``n/a`` when it was never measured."""
    return "n/a" if value is None else f"{value:.2f} s"


def verdict(timeline: Timeline) -> str:
    return "PASS" if timeline.passed else "FAIL"


def _quantity(value: float, unit: str) -> str:
    return number(value) + (unit if unit in ("s", "ms", "%", "") else f" {unit}")


def bound(check: Check) -> str:
    """What a check measured against its bound: ``detect 0.3s (<= 3s)``, ``taken 4 (>= 1)``;
    ``never`` when the awaited thing did not happen."""
    got = "never" if check.value is None else _quantity(check.value, check.unit)
    limit = ">=" if check.at_least else "<="
    return f"{check.name} {got} ({limit} {_quantity(check.bound, check.unit)})"


def row(timeline: Timeline) -> tuple[str, ...]:
    return (
        timeline.scenario,
        timeline.topology,
        str(timeline.error_count()),
        seconds(timeline.detect_s),
        seconds(timeline.recover_s),
        ", ".join(bound(check) for check in timeline.checks) or "-",
        verdict(timeline),
    )


def table(timelines: Iterable[Timeline], *, markdown: bool = False) -> str:
    """The rows sorted by scenario (then topology), as aligned plain text or Markdown."""
    rows = [row(t) for t in sorted(timelines, key=lambda t: (t.scenario, t.topology))]
    if markdown:
        lines = [HEADER, tuple("---:" if h in _RIGHT else "---" for h in HEADER), *rows]
        return "\n".join("| " + " | ".join(c.replace("|", r"\|") for c in r) + " |" for r in lines)
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]

    def line(cells: Sequence[str]) -> str:
        padded = (
            c.rjust(w) if h in _RIGHT else c.ljust(w)
            for c, w, h in zip(cells, widths, HEADER, strict=True)
        )
        return "  ".join(padded).rstrip()

    return "\n".join([line(HEADER), line(["-" * w for w in widths]), *map(line, rows)])


def summary(paths: Iterable[Path], *, markdown: bool = False) -> str:
    """The table for these timeline JSON files (each must be a timeline)."""
    return table((read(path) for path in paths), markdown=markdown)


def _is_timeline(data: Any) -> bool:
    """Other JSON files under the directory (not timelines) are skipped."""
    return isinstance(data, dict) and {"scenario", "t0", "checks"} <= data.keys()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=_PROG, description="The chaos suite's summary table.")
    parser.add_argument("dir", nargs="?", type=Path, default=DEFAULT_DIR, metavar="DIR")
    parser.add_argument("--markdown", action="store_true", help="a Markdown table")
    args = parser.parse_args(argv)
    directory: Path = args.dir

    def fail(message: str) -> int:
        print(f"{_PROG}: {message}", file=sys.stderr)
        return 1

    if not directory.is_dir():
        return fail(f"no directory {directory}; run the chaos suite first")
    timelines = []
    for path in sorted(directory.rglob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if _is_timeline(data):
                timelines.append(from_json(data))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return fail(f"cannot read {path}: {exc!r}")
    if not timelines:
        return fail(f"no chaos timelines (*.json) under {directory}; run the chaos suite first")
    print(table(timelines, markdown=args.markdown))
    failed = [f"{t.scenario} ({t.topology})" for t in timelines if not t.passed]
    if failed:
        return fail(
            f"{len(failed)} of {len(timelines)} scenarios FAILED: {', '.join(sorted(failed))}"
        )
    print(f"{_PROG}: all {len(timelines)} scenarios passed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
