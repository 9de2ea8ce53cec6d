"""Medians, ratios, the printed table, the issue's targets and the JSON record."""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.stack import TARGET_LABELS
from bench.sysbench import STORM, Sample

REFERENCE = "haproxy"  # the targets are stated relative to HAProxy with nbthread 1


@dataclass(frozen=True)
class Run:
    round: int
    workload: str
    target: str
    sample: Sample | None  # None when the run failed
    loadavg_1m: float
    error: str | None = None
    # CPU the path's proxy processes used per query (per connection for the storm), in
    # microseconds; None for the direct path. Robust to other load where QPS is not.
    cpu_us: float | None = None
    user_us: float | None = None


@dataclass(frozen=True)
class Summary:
    """One target under one workload, over all rounds."""

    workload: str
    target: str
    rate: float | None  # median QPS; for the storm, median connections/s
    p95_ms: float | None  # median of the per-round p95 latencies
    rates: tuple[float, ...]
    errors: int  # errors sysbench counted and ignored
    failed: int  # runs that did not complete (sysbench gave up)
    x_direct: float | None
    x_haproxy: float | None
    p95_x_haproxy: float | None
    cpu_us: float | None  # median proxy CPU (user + system) per query or connection
    user_us: float | None  # the user-space part of it
    cpu_x_haproxy: float | None


@dataclass(frozen=True)
class Check:
    """One target from the issue, and whether this run met it."""

    workload: str
    what: str
    value: float | None  # None when the path has no completed run
    limit: float
    passed: bool


def rate_of(workload: str, sample: Sample) -> float:
    return sample.events_per_s if workload == STORM else sample.queries_per_s


def units_of(workload: str, sample: Sample) -> int:
    return sample.events if workload == STORM else sample.queries


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def _summary(workload: str, target: str, runs: list[Run]) -> Summary:
    """Medians over the completed runs; ratios are filled in by ``summarize``."""
    samples = [r.sample for r in runs if r.sample is not None]
    rates = [rate_of(workload, sample) for sample in samples]
    return Summary(
        workload=workload,
        target=target,
        rate=_median(rates),
        p95_ms=_median([sample.p95_ms for sample in samples]),
        rates=tuple(rates),
        errors=sum(sample.errors for sample in samples),
        failed=len(runs) - len(samples),
        x_direct=None,
        x_haproxy=None,
        p95_x_haproxy=None,
        cpu_us=_median([r.cpu_us for r in runs if r.cpu_us is not None]),
        user_us=_median([r.user_us for r in runs if r.user_us is not None]),
        cpu_x_haproxy=None,
    )


def summarize(runs: list[Run], workload: str, targets: list[str]) -> list[Summary]:
    mine = [r for r in runs if r.workload == workload]
    rows = [_summary(workload, t, [r for r in mine if r.target == t]) for t in targets]
    rows = [row for row in rows if row.rates or row.failed]
    direct = next((row for row in rows if row.target == "direct"), None)
    ref = next((row for row in rows if row.target == REFERENCE), None)
    return [
        dataclasses.replace(
            row,
            x_direct=_ratio(row.rate, direct.rate if direct else None),
            x_haproxy=_ratio(row.rate, ref.rate if ref else None),
            p95_x_haproxy=_ratio(row.p95_ms, ref.p95_ms if ref else None),
            cpu_x_haproxy=_ratio(row.cpu_us, ref.cpu_us if ref else None),
        )
        for row in rows
    ]


QPS_TARGETS = {"single": 0.95, "chain": 0.6}  # minimum QPS as a multiple of HAProxy's
P95_TARGET = 1.5  # maximum p95 as a multiple of HAProxy's


def checks(summaries: list[Summary]) -> list[Check]:
    """The issue's targets: single >= 0.95x and chain >= 0.6x HAProxy QPS, p95 <= 1.5x."""
    if not any(s.target == REFERENCE and s.rates for s in summaries):
        return []
    out: list[Check] = []
    for s in summaries:
        minimum = QPS_TARGETS.get(s.target)
        if s.workload == STORM or minimum is None:
            continue
        qps, p95 = s.x_haproxy, s.p95_x_haproxy
        out.append(
            Check(s.workload, f"{s.target} QPS x HAProxy", qps, minimum, (qps or 0) >= minimum)
        )
        passed = p95 is not None and p95 <= P95_TARGET
        out.append(Check(s.workload, f"{s.target} p95 x HAProxy", p95, P95_TARGET, passed))
    return out + tls_checks(summaries)


TLS_QPS_TARGET = 0.85  # the chain with mesh TLS against the chain without, same run


def tls_checks(summaries: list[Summary]) -> list[Check]:
    """Chain QPS with mutual TLS on the mesh hop >= 0.85x the plaintext chain's."""
    by = {(s.workload, s.target): s for s in summaries}
    out = []
    for (workload, target), tls in by.items():
        plain = by.get((workload, "chain"))
        if target != "chain-tls" or workload == STORM or plain is None:
            continue
        ratio = _ratio(tls.rate, plain.rate)
        passed = ratio is not None and ratio >= TLS_QPS_TARGET
        out.append(Check(workload, "chain-tls QPS x chain", ratio, TLS_QPS_TARGET, passed))
    return out


def _fmt_ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def _fmt(value: float | None, spec: str) -> str:
    return format(value, spec) if value is not None else "-"


def table(summaries: list[Summary], heading: str, unit: str) -> str:
    head = (
        f"{'path':<22} {unit:>8} {'x direct':>8} {'x HAProxy':>9} {'p95 ms':>7} "
        f"{'p95 x HA':>8} {'CPU us':>7} {'user us':>7} {'CPU x HA':>8} {'errors':>6} "
        f"{'failed':>6}  per round"
    )
    lines = [heading, head, "-" * len(head)]
    for s in summaries:
        rounds = " ".join(f"{r:.0f}" for r in s.rates)
        lines.append(
            f"{TARGET_LABELS[s.target]:<22} {_fmt(s.rate, '.0f'):>8} {_fmt_ratio(s.x_direct):>8} "
            f"{_fmt_ratio(s.x_haproxy):>9} {_fmt(s.p95_ms, '.2f'):>7} "
            f"{_fmt_ratio(s.p95_x_haproxy):>8} {_fmt(s.cpu_us, '.1f'):>7} "
            f"{_fmt(s.user_us, '.1f'):>7} {_fmt_ratio(s.cpu_x_haproxy):>8} {s.errors:>6} "
            f"{s.failed:>6}  {rounds}"
        )
    return "\n".join(lines)


def checks_table(results: list[Check]) -> str:
    lines = ["targets (a report, not a gate)"]
    if not results:
        lines.append("  none checked: they need the haproxy path and a meshproxy path")
    for c in results:
        relation = ">=" if "QPS" in c.what else "<="
        verdict = "PASS" if c.passed else "MISS"
        target = f"(target {relation} {c.limit}x)"
        lines.append(
            f"  {verdict}  {c.workload:<18} {c.what:<20} {_fmt(c.value, '5.2f'):>5}x  {target}"
        )
    return "\n".join(lines)


def write_json(directory: Path, stamp: str, record: dict[str, Any]) -> Path:
    """Write results/<stamp>.json and refresh results/latest.json; return the former."""
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, sort_keys=False) + "\n"
    path = directory / f"{stamp}.json"
    for target in (path, directory / "latest.json"):
        tmp = target.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(target)
    return path


def as_json(runs: list[Run], summaries: list[Summary], results: list[Check]) -> dict[str, Any]:
    return {
        "runs": [asdict(r) for r in runs],
        "summary": [asdict(s) for s in summaries],
        "targets": [asdict(c) for c in results],
    }
