"""The chaos timeline plot: a valid, deterministic 1200x700 PNG, its title and its view lanes."""

from __future__ import annotations

from pathlib import Path

import pytest
from matplotlib.image import imread

from meshproxy.chaos import plot
from meshproxy.chaos.timeline import Change, Check, ClientEvent, Fault, Timeline

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _timeline() -> Timeline:
    changes = [Change(0.1, "edge1", m, "route", "ONLINE") for m in ("p2", "p3")]
    changes += [
        Change(1.2, "p2", "p3", "member", "suspect"),
        Change(0.2, "p2", "p3", "member", "alive"),
        Change(1.9, "p2", "p3", "member", "dead"),
        Change(1.1, "edge1", "p3", "route", "SHUNNED"),
        Change(2.5, "p4", "p3", "member", "weird"),
    ]
    return Timeline(
        scenario="kill-middle",
        topology="cascade",
        t0=1_700_000_000.0,
        duration_s=4.0,
        queries=[100] * 10 + [20] * 5 + [100] * 25,
        errors=[0] * 10 + [4, 2] + [0] * 28,
        connects=[8] + [0] * 13 + [3] + [0] * 25,
        faults=[Fault(1.0, "kill p3"), Fault(3.0, "start p3")],
        changes=changes,
        client_events=[ClientEvent(1.0 + i / 10, i, "session_error", "p3") for i in range(6)],
        checks=[Check("detect", 0.9, 3.0)],
        detect_s=0.9,
        recover_s=1.5,
    )


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width = imread(path).shape[:2]
    assert (width, height) == plot.SIZE_PX


def test_plot_writes_a_deterministic_1200x700_png(tmp_path: Path) -> None:
    """plot() writes a PNG of the documented size, byte-identical for the same timeline."""
    first, second = tmp_path / "cascade" / "kill-middle.png", tmp_path / "again.png"
    plot.plot(_timeline(), first)  # its parent directory does not exist yet
    plot.plot(_timeline(), second)
    _assert_png(first)
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize("errors", [[0] * 40, [90] * 40])
def test_plot_copes_with_no_or_many_errors(tmp_path: Path, errors: list[int]) -> None:
    """Error counts of zero or as large as the queries (no secondary axis) still plot."""
    timeline = _timeline()
    timeline.errors = errors
    plot.plot(timeline, tmp_path / "p.png")
    _assert_png(tmp_path / "p.png")


def test_plot_copes_with_an_empty_timeline(tmp_path: Path) -> None:
    """A timeline with no load, faults, changes or measurements still gives a full-size PNG."""
    plot.plot(Timeline("nothing", "chain", 0.0), tmp_path / "empty.png")
    _assert_png(tmp_path / "empty.png")


def test_title_names_scenario_errors_times_and_verdict() -> None:
    """The title carries the scenario, error count, detect and recover times and PASS/FAIL."""
    timeline = _timeline()
    assert plot.title(timeline) == "kill-middle — errors 6, detect 0.90 s, recover 1.50 s, PASS"
    timeline.checks.append(Check("recover", None, 5.0))
    timeline.recover_s = None
    assert plot.title(timeline).endswith("recover n/a, FAIL")


def test_lanes_hold_each_views_state_from_change_to_change() -> None:
    """Lanes that changed run from start to end; an early first change (t <= 0.5 s) is the
    initial state, a later one follows an unknown stretch, and unchanging views are left out."""
    assert plot.lanes(_timeline()) == {
        ("edge1", "p3", "route"): [(0.0, 1.1, "ONLINE"), (1.1, 4.0, "SHUNNED")],
        ("p2", "p3", "member"): [(0.0, 1.2, "alive"), (1.2, 1.9, "suspect"), (1.9, 4.0, "dead")],
        ("p4", "p3", "member"): [(0.0, 2.5, "unknown"), (2.5, 4.0, "weird")],
    }


def test_state_colours_are_case_insensitive_with_a_neutral_fallback() -> None:
    """Gossip and routing states of the same health share a colour; unknown ones are neutral."""
    assert plot.colour("alive") == plot.colour("ONLINE") == plot.colour("online")
    assert plot.colour("suspect") == plot.colour("SHUNNED")
    assert plot.colour("dead") == plot.colour("left") == plot.colour("OFFLINE_HARD")
    assert plot.colour("OFFLINE_SOFT") not in {plot.colour("dead"), plot.NEUTRAL}
    assert plot.colour("unknown") == plot.colour("weird") == plot.NEUTRAL


def test_span_covers_the_load_faults_and_recovery() -> None:
    """The time axis starts at 0 and reaches the last bucket, fault, change or recovery."""
    timeline = _timeline()
    assert plot.span(timeline) == (0.0, 4.0)
    timeline.recover_s = 5.0  # counted from the first fault, at t=1
    assert plot.span(timeline) == (0.0, 6.0)
