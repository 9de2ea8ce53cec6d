"""The chaos summary table: one row per timeline, PASS/FAIL, exit codes, JSON round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshproxy.chaos import report
from meshproxy.chaos.timeline import Change, Check, ClientEvent, Fault, Timeline, from_json, read


def _timeline(scenario: str, *checks: Check, topology: str = "cascade") -> Timeline:
    return Timeline(
        scenario=scenario,
        topology=topology,
        t0=1_700_000_000.25,
        duration_s=2.0,
        queries=[40] * 20,
        errors=[0] * 10 + [3, 1] + [0] * 8,
        connects=[4] + [0] * 11 + [2] + [0] * 7,
        faults=[Fault(1.0, "kill p3")],
        changes=[Change(1.3, "p2", "p3", "member", "suspect")],
        client_events=[
            ClientEvent(1.05, 0, "session_error", "p3", "lost connection"),
            ClientEvent(1.1, 1, "connect_error", ""),
            ClientEvent(1.2, 0, "reconnected", "p2"),
        ],
        checks=list(checks),
        detect_s=0.3,
        recover_s=1.25,
    )


def _rows(text: str) -> dict[str, list[str]]:
    """The plain-text table's data rows by scenario (header and rule skipped)."""
    return {line.split()[0]: line.split() for line in text.splitlines()[2:]}


def _write(directory: Path, *timelines: Timeline) -> None:
    for timeline in timelines:
        timeline.write(directory / timeline.topology / f"{timeline.scenario}.json")


def test_timeline_round_trips_through_json(tmp_path: Path) -> None:
    """to_json/from_json and write/read give back an equal timeline, derived keys included."""
    timeline = _timeline("kill-middle", Check("detect", 0.3, 3.0), Check("errors", None, 5, ""))
    data = timeline.to_json()
    assert from_json(data) == timeline
    assert (data["errors_total"], data["passed"]) == (2, False)
    assert [c["ok"] for c in data["checks"]] == [True, False]
    timeline.write(tmp_path / "deep" / "t.json")
    assert read(tmp_path / "deep" / "t.json") == timeline


def test_table_has_every_scenario_sorted_with_its_verdict(tmp_path: Path) -> None:
    """Rows are sorted by scenario and say PASS exactly when every check holds."""
    _write(
        tmp_path,
        _timeline("pause-middle", Check("detect", 4.5, 3.0)),
        _timeline("kill-middle", Check("detect", 0.3, 3.0), Check("recover", 1.25, 5.0)),
        _timeline("no-checks"),
    )
    text = report.summary(sorted(tmp_path.rglob("*.json")))
    rows = _rows(text)
    assert list(rows) == ["kill-middle", "no-checks", "pause-middle"]
    assert {name: cells[-1] for name, cells in rows.items()} == {
        "kill-middle": "PASS",
        "no-checks": "PASS",
        "pause-middle": "FAIL",
    }
    assert text.splitlines()[0].split() == list(report.HEADER)
    assert rows["kill-middle"][:7] == ["kill-middle", "cascade", "2", "0.30", "s", "1.25", "s"]


def test_bounds_show_each_check_with_what_it_measured() -> None:
    """Every check shows its measured value (or 'never') and its bound, a minimum as >=."""
    timeline = _timeline(
        "s",
        Check("detect", 0.3, 3.0),
        Check("recover", 7.1, 5.0),
        Check("converge", None, 10.0),
        Check("errors", 2, 0, "errors"),
        Check("taken", 4, 1, "", at_least=True),
    )
    assert report.row(timeline)[5] == (
        "detect 0.3s (<= 3s), recover 7.1s (<= 5s), converge never (<= 10s), "
        "errors 2 errors (<= 0 errors), taken 4 (>= 1)"
    )
    assert report.row(_timeline("s"))[5] == "-"


def test_unmeasured_times_read_n_a() -> None:
    """A detect or recover time never measured shows as n/a, not as zero."""
    timeline = _timeline("s")
    timeline.detect_s = None
    assert report.row(timeline)[3:5] == ("n/a", "1.25 s")


def test_markdown_table_has_a_header_rule_and_one_row_per_scenario() -> None:
    """The Markdown variant is a pipe table with numbers right-aligned and '|' escaped."""
    lines = report.table(
        [_timeline("b|c", Check("detect", 9.0, 3.0)), _timeline("a")], markdown=True
    ).splitlines()
    assert lines[0] == "| scenario | topology | errors | detect | recover | bounds | result |"
    assert lines[1] == "| --- | --- | ---: | ---: | ---: | --- | --- |"
    assert lines[2].startswith("| a | cascade | 2 |")
    assert lines[2].endswith("| PASS |")
    assert lines[3].startswith(r"| b\|c |")
    assert lines[3].endswith("| FAIL |")
    assert len(lines) == 4


def test_main_exits_0_when_every_scenario_passed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """All scenarios passing: the table on stdout, exit 0; other JSON files are skipped."""
    _write(tmp_path, _timeline("a", Check("detect", 1.0, 3.0)), _timeline("b", topology="chain"))
    (tmp_path / "compose-config.json").write_text('{"services": {}}')
    assert report.main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert list(_rows(out)) == ["a", "b"]
    assert "all 2 scenarios passed" in err


def test_main_exits_1_when_a_scenario_failed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One failed scenario: the whole table still prints, the failure is named, exit 1."""
    _write(tmp_path, _timeline("a"), _timeline("b", Check("recover", None, 5.0)))
    assert report.main([str(tmp_path), "--markdown"]) == 1
    out, err = capsys.readouterr()
    assert out.count("\n| ") == 3
    assert "1 of 2 scenarios FAILED: b (cascade)" in err


@pytest.mark.parametrize("make_dir", [True, False])
def test_main_exits_1_when_no_timeline_is_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make_dir: bool
) -> None:
    """An empty or missing directory is a failure with a message saying so, not an empty table."""
    directory = tmp_path / "chaos"
    if make_dir:
        directory.mkdir()
    assert report.main([str(directory)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert str(directory) in err
    assert "run the chaos suite first" in err


def test_main_exits_1_on_an_unreadable_timeline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A truncated JSON file fails the report and names the file."""
    _write(tmp_path, _timeline("a"))
    (tmp_path / "broken.json").write_text('{"scenario": "x", "t0"')
    assert report.main([str(tmp_path)]) == 1
    assert "broken.json" in capsys.readouterr().err


def test_main_reads_artifacts_chaos_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without DIR the report reads artifacts/chaos under the working directory."""
    _write(tmp_path / "artifacts" / "chaos", _timeline("kill-middle"))
    monkeypatch.chdir(tmp_path)
    assert report.main([]) == 0
    assert "kill-middle" in capsys.readouterr().out
