"""Medians, ratios, the printed table, the issue's targets and the JSON record."""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import routing
from bench.idle import IdleMemory
from bench.serverstats import Backend
from bench.stack import LABELS, MANY_CLIENTS_POOL_MAX, POOL_MAX, REPLICATED_TARGETS
from bench.sysbench import IDLE_MEMORY, MANY_CLIENTS, STORM, Sample

REFERENCE = "haproxy"  # the targets are stated relative to HAProxy with nbthread 1
# "x direct" of a path: against MariaDB direct, or the primary for the replication set's
DIRECT_OF = dict.fromkeys(REPLICATED_TARGETS, "primary")


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
    threads: int | None = None  # sysbench's client threads
    backend: Backend | None = None  # what MariaDB saw of the run (bench/serverstats.py)
    routing: dict[str, int] | None = None  # the node's and servers' counts (bench/routing.py)
    # CPU the whole machine used per query: sysbench and MariaDB too, the same on every
    # path, and the kernel's share of moving the bytes, which no proxy process is charged
    # for (the sockmap fast path's work is there).
    host_us: float | None = None


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
    # From MariaDB: the median over rounds of the new connections the app user made (the
    # path's backend logins; health checks, as another user, left out); the most
    # connections the path's proxy processes held to the server at once (from the kernel);
    # the most the app user had open (every path's pools) and Threads_connected (checks too).
    backend_logins: float | None = None
    backend_max: int | None = None
    app_max: int | None = None
    threads_max: int | None = None
    host_us: float | None = None  # median machine CPU per query or connection


@dataclass(frozen=True)
class Check:
    """One target from the issue, and whether this run met it."""

    workload: str
    what: str
    value: float | None  # None when the path has no completed run
    limit: float
    passed: bool
    unit: str = "x"  # "x": a ratio; else the unit of an absolute figure
    relation: str = ""  # ">=" or "<="; "" for the original checks (QPS >=, p95 <=)


def rate_of(workload: str, sample: Sample) -> float:
    return sample.events_per_s if workload == STORM else sample.queries_per_s


def units_of(workload: str, sample: Sample) -> int:
    return sample.events if workload == STORM else sample.queries


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def _rate(summary: Summary | None) -> float | None:
    return summary.rate if summary is not None else None


def _max(values: list[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _summary(workload: str, target: str, runs: list[Run]) -> Summary:
    """Medians over the completed runs; ratios are filled in by ``summarize``."""
    samples = [r.sample for r in runs if r.sample is not None]
    rates = [rate_of(workload, sample) for sample in samples]
    backends = [r.backend for r in runs if r.backend is not None and r.sample is not None]
    logins = [float(b.app_logins) for b in backends if b.app_logins is not None]
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
        backend_logins=_median(logins),
        backend_max=_max([b.path_max for b in backends]),
        app_max=_max([b.app_threads_max for b in backends]),
        threads_max=_max([b.threads_max for b in backends]),
        host_us=_median([r.host_us for r in runs if r.host_us is not None]),
    )


def summarize(runs: list[Run], workload: str, targets: list[str]) -> list[Summary]:
    mine = [r for r in runs if r.workload == workload]
    rows = [_summary(workload, t, [r for r in mine if r.target == t]) for t in targets]
    rows = [row for row in rows if row.rates or row.failed]
    by = {row.target: row for row in rows}
    ref = by.get(REFERENCE)
    return [
        dataclasses.replace(
            row,
            x_direct=_ratio(row.rate, _rate(by.get(DIRECT_OF.get(row.target, "direct")))),
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
        return tls_checks(summaries) + session_checks(summaries)
    out: list[Check] = []
    for s in summaries:
        minimum = QPS_TARGETS.get(s.target)
        if s.workload in (STORM, MANY_CLIENTS) or minimum is None:
            continue
        qps, p95 = s.x_haproxy, s.p95_x_haproxy
        out.append(
            Check(s.workload, f"{s.target} QPS x HAProxy", qps, minimum, (qps or 0) >= minimum)
        )
        passed = p95 is not None and p95 <= P95_TARGET
        out.append(Check(s.workload, f"{s.target} p95 x HAProxy", p95, P95_TARGET, passed))
    return out + tls_checks(summaries) + session_checks(summaries)


TLS_QPS_TARGET = 0.85  # the chain with mesh TLS against the chain without, same run
# Each chain with mesh TLS and the same chain without. A passthrough chain's storm pays a
# handshake per client and is left out; a session-mode edge reuses its pooled hops, so
# its storm is compared too.
TLS_PAIRS = {"chain-tls": ("chain", False), "continuity-tls": ("continuity", True)}


def tls_checks(summaries: list[Summary]) -> list[Check]:
    """Chain QPS with mutual TLS on the mesh hop >= 0.85x the plaintext chain's."""
    by = {(s.workload, s.target): s for s in summaries}
    out = []
    for (workload, target), tls in by.items():
        if target not in TLS_PAIRS:
            continue
        plain_target, with_storm = TLS_PAIRS[target]
        plain = by.get((workload, plain_target))
        if plain is None or (workload == STORM and not with_storm):
            continue
        ratio = _ratio(tls.rate, plain.rate)
        passed = ratio is not None and ratio >= TLS_QPS_TARGET
        rate = "conn/s" if workload == STORM else "QPS"
        name = f"{target} {rate} x {plain_target}"
        out.append(Check(workload, name, ratio, TLS_QPS_TARGET, passed, relation=">="))
    return out


# Session mode against HAProxy nbthread 1 (rate: QPS, connections/s for the storm).
SESSION_RATE_TARGETS = {
    STORM: 1.0,
    "oltp_point_select": 0.75,
    "point_select_ps": 0.75,
    "point_select_text": 0.75,
    "oltp_read_write": 0.75,
}
SESSION_CPU_X_PROXYSQL = 2.0  # session mode's CPU per query at most 2x ProxySQL's
IDLE_KIB_TARGET = 16.0  # RSS per idle client session


def session_checks(summaries: list[Summary]) -> list[Check]:
    """Session mode's targets: rate against HAProxy, CPU per query against ProxySQL, new
    backend connections in the storm within the pool, and 1000 clients on a pool of 32."""
    by = {(s.workload, s.target): s for s in summaries}
    out = []
    for (workload, target), s in by.items():
        if target != "session":
            continue
        minimum = SESSION_RATE_TARGETS.get(workload)
        if minimum is not None and (workload, REFERENCE) in by:
            ratio = s.x_haproxy
            passed = ratio is not None and ratio >= minimum
            out.append(Check(workload, "session x HAProxy", ratio, minimum, passed, "x", ">="))
        proxysql = by.get((workload, "proxysql"))
        if proxysql is not None:
            ratio = _ratio(s.cpu_us, proxysql.cpu_us)
            passed = ratio is not None and ratio <= SESSION_CPU_X_PROXYSQL
            limit = SESSION_CPU_X_PROXYSQL
            out.append(Check(workload, "session CPU x ProxySQL", ratio, limit, passed, "x", "<="))
    for target in ("session", "chain-session"):
        storm = by.get((STORM, target))
        if storm is not None:
            logins = storm.backend_logins
            passed = logins is not None and logins <= POOL_MAX
            what = f"{target} new backend conns"
            out.append(Check(STORM, what, logins, POOL_MAX, passed, "conns", "<="))
    many = by.get((MANY_CLIENTS, "session-32"))
    if many is not None:
        # what the node's processes hold to the server: the pool, and a health check's
        # connection should a sample catch one
        top, limit = many.backend_max, MANY_CLIENTS_POOL_MAX + 1
        passed = top is not None and top <= limit
        what = "session-32 backend conns max"
        out.append(Check(MANY_CLIENTS, what, top, limit, passed, "conns", "<="))
    return out


@dataclass(frozen=True)
class Comparison:
    target: str
    baseline: str  # the same node config without what ``target`` adds
    about: str


COMPARISONS = (
    Comparison("session-split", "session-primary", "split over primary + 2 replicas"),
    Comparison("session-split-noryw", "session-split", "read_your_writes off, not gtid"),
    Comparison("session-rules50", "session", "50 query rules, none matching"),
    Comparison("session-cache", "session", "query cache rule, 60 s TTL"),
    Comparison("session-nodigest", "session", "[digests] off (session: on)"),
)
RULES_QPS_TARGET = 0.9  # QPS with 50 rules that match nothing, against none


@dataclass(frozen=True)
class RoutingRow:
    """One routing path against its baseline under one workload (medians over rounds)."""

    workload: str
    target: str
    baseline: str
    qps_x: float | None
    p95_x: float | None
    cpu_us: float | None
    baseline_cpu_us: float | None
    cpu_delta_us: float | None  # target's CPU per query less the baseline's
    hit_ratio: float | None  # query cache hits / lookups, during the measured runs
    replica_share: float | None  # of sysbench's reads, those the replicas ran
    ryw_waits_per_event: float | None  # reads that first waited on their reader
    ryw_writer_per_event: float | None  # reads sent to the writer instead
    rule_hits_per_query: float | None


def _per_run(runs: list[Run], of: Any) -> float | None:
    """The median over the completed runs of ``of(figures, sample)`` where it is known."""
    values = [
        v
        for r in runs
        if r.sample is not None
        and r.routing is not None
        and (v := of(r.routing, r.sample)) is not None
    ]
    return _median(values)


def routing_rows(summaries: list[Summary], runs: list[Run]) -> list[RoutingRow]:
    by = {(s.workload, s.target): s for s in summaries}
    out = []
    for c in COMPARISONS:
        for (workload, target), s in by.items():
            base = by.get((workload, c.baseline))
            if target != c.target or base is None:
                continue
            mine = [r for r in runs if r.workload == workload and r.target == target]
            cpu_delta = (
                s.cpu_us - base.cpu_us if s.cpu_us is not None and base.cpu_us is not None else None
            )
            out.append(
                RoutingRow(
                    workload,
                    target,
                    c.baseline,
                    _ratio(s.rate, base.rate),
                    _ratio(s.p95_ms, base.p95_ms),
                    s.cpu_us,
                    base.cpu_us,
                    cpu_delta,
                    _per_run(mine, lambda f, _: routing.hit_ratio(f)),
                    _per_run(mine, lambda f, sample: routing.replica_share(f, sample.reads)),
                    _per_run(mine, lambda f, sample: _per(f, "ryw_waited", sample.events)),
                    _per_run(mine, lambda f, sample: _per(f, "ryw_writer", sample.events)),
                    _per_run(mine, lambda f, sample: _per(f, "rule_hits", sample.queries)),
                )
            )
    return out


def _per(figures: dict[str, int], key: str, units: int) -> float | None:
    return figures[key] / units if key in figures and units else None


def _pct(value: float | None) -> str:
    return f"{100 * value:.1f}%" if value is not None else "-"


def routing_table(rows: list[RoutingRow]) -> str:
    """Each routing path beside the node config it adds one thing to, workload by workload."""
    head = (
        f"{'workload':<20} {'path':<19} {'against':<16} {'QPS x':>6} {'p95 x':>6} "
        f"{'CPU us':>7} {'base us':>7} {'+CPU us':>7}  notes"
    )
    lines = [
        "query routing: each path against the same node without what it adds (medians)",
        head,
        "-" * len(head),
    ]
    for r in rows:
        notes = []
        if r.hit_ratio is not None:
            notes.append(f"cache hits {_pct(r.hit_ratio)} of lookups")
        if r.replica_share is not None:
            notes.append(f"replicas ran {_pct(r.replica_share)} of reads")
        if r.ryw_waits_per_event or r.ryw_writer_per_event:
            notes.append(
                f"read-your-writes per event: {_fmt(r.ryw_waits_per_event, '.2f')} waits, "
                f"{_fmt(r.ryw_writer_per_event, '.2f')} to writer"
            )
        if r.target == "session-rules50" and r.rule_hits_per_query is not None:
            notes.append(f"rule hits/query {r.rule_hits_per_query:.3f}")
        if r.target == "session-nodigest" and r.cpu_delta_us is not None:
            notes.append(f"digest accounting costs {-r.cpu_delta_us:.1f} us/query")
        lines.append(
            f"{r.workload:<20} {r.target:<19} {r.baseline:<16} {_fmt_ratio(r.qps_x):>6} "
            f"{_fmt_ratio(r.p95_x):>6} {_fmt(r.cpu_us, '.1f'):>7} "
            f"{_fmt(r.baseline_cpu_us, '.1f'):>7} {_fmt(r.cpu_delta_us, '+.1f'):>7}  "
            + "; ".join(notes)
        )
    shown = {r.target for r in rows}
    lines += [f"  {c.target}: {c.about}" for c in COMPARISONS if c.target in shown]
    return "\n".join(lines)


def routing_checks(rows: list[RoutingRow]) -> list[Check]:
    """50 rules that match nothing keep >= 0.9x the QPS of none (routing issue)."""
    out = []
    for r in rows:
        if r.target == "session-rules50":
            passed = r.qps_x is not None and r.qps_x >= RULES_QPS_TARGET
            what = "session-rules50 QPS x session"
            out.append(Check(r.workload, what, r.qps_x, RULES_QPS_TARGET, passed, "x", ">="))
    return out


def memory_checks(results: list[IdleMemory]) -> list[Check]:
    out = []
    for m in results:
        if m.target == "session":
            value = m.kib_per_session
            passed = value is not None and value <= IDLE_KIB_TARGET and not m.failed
            what = "session RSS per idle session"
            out.append(Check(IDLE_MEMORY, what, value, IDLE_KIB_TARGET, passed, "KiB", "<="))
    return out


def _fmt_ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def _fmt(value: float | None, spec: str) -> str:
    return format(value, spec) if value is not None else "-"


def table(summaries: list[Summary], heading: str, unit: str, backend: bool = False) -> str:
    """One workload's rows; with ``backend``, the server's side too: new backend
    connections (app-user logins, median per run), the most the path's proxies held open
    at once, and the most Threads_connected at MariaDB (all paths' idle pools and checks)."""
    extra = f" {'new bknd':>8} {'bknd max':>8} {'thr max':>7}" if backend else ""
    head = (
        f"{'path':<26} {unit:>8} {'x direct':>8} {'x HAProxy':>9} {'p95 ms':>7} "
        f"{'p95 x HA':>8} {'CPU us':>7} {'user us':>7} {'CPU x HA':>8} {'host us':>7}{extra} "
        f"{'errors':>6} "
        f"{'failed':>6}  per round"
    )
    lines = [heading, head, "-" * len(head)]
    for s in summaries:
        rounds = " ".join(f"{r:.0f}" for r in s.rates)
        more = ""
        if backend:
            more = (
                f" {_fmt(s.backend_logins, '.0f'):>8} {_fmt(s.backend_max, 'd'):>8}"
                f" {_fmt(s.threads_max, 'd'):>7}"
            )
        lines.append(
            f"{LABELS[s.target]:<26} {_fmt(s.rate, '.0f'):>8} {_fmt_ratio(s.x_direct):>8} "
            f"{_fmt_ratio(s.x_haproxy):>9} {_fmt(s.p95_ms, '.2f'):>7} "
            f"{_fmt_ratio(s.p95_x_haproxy):>8} {_fmt(s.cpu_us, '.1f'):>7} "
            f"{_fmt(s.user_us, '.1f'):>7} {_fmt_ratio(s.cpu_x_haproxy):>8} "
            f"{_fmt(s.host_us, '.1f'):>7}{more} {s.errors:>6} "
            f"{s.failed:>6}  {rounds}"
        )
    return "\n".join(lines)


CPU_COLUMNS = (
    "single",
    "chain",
    "session",
    "chain-session",
    "proxysql",
    "session-32",
    "proxysql-32",
)


def cpu_table(summaries: list[Summary]) -> str:
    """Proxy CPU per query: session mode beside passthrough (single, chain) and ProxySQL."""
    by = {(s.workload, s.target): s for s in summaries}
    workloads = list(dict.fromkeys(s.workload for s in summaries))
    columns = [c for c in CPU_COLUMNS if any((w, c) in by for w in workloads)]
    if "session" not in columns and "session-32" not in columns:
        return ""
    names = {"chain-session": "chain-sess", "session-32": "sess-32", "proxysql-32": "psql-32"}
    head = f"{'workload':<18}" + "".join(f" {names.get(c, c):>10}" for c in columns)
    head += f" {'sess x single':>13} {'sess x PSQL':>11}"
    lines = [
        "proxy CPU per query, us (per connection for the storm): user + system of the "
        "path's proxy processes",
        head,
        "-" * len(head),
    ]
    for w in workloads:
        cpu = {c: by[(w, c)].cpu_us if (w, c) in by else None for c in columns}
        session = cpu.get("session") or cpu.get("session-32")
        psql = cpu.get("proxysql") or cpu.get("proxysql-32")
        line = f"{w:<18}" + "".join(f" {_fmt(cpu[c], '.1f'):>10}" for c in columns)
        line += f" {_fmt_ratio(_ratio(session, cpu.get('single'))):>13}"
        line += f" {_fmt_ratio(_ratio(session, psql)):>11}"
        lines.append(line)
    return "\n".join(lines)


def memory_table(results: list[IdleMemory]) -> str:
    head = (
        f"{'path':<26} {'sessions':>8} {'failed':>6} {'RSS before':>10} {'RSS idle':>9} "
        f"{'RSS after':>9} {'KiB/session':>11} {'login s':>7} {'bknd open':>9}"
    )
    lines = [
        "idle client sessions: RSS of the proxy's data-plane process, KiB "
        "(after: once the clients have gone)",
        head,
        "-" * len(head),
    ]
    for m in results:
        if m.error is not None:
            lines.append(f"{LABELS.get(m.target, m.target):<26} FAILED: {m.error[:200]}")
            continue
        lines.append(
            f"{LABELS.get(m.target, m.target):<26} {m.sessions:>8} {m.failed:>6} "
            f"{_fmt(m.rss_before_kib, 'd'):>10} {_fmt(m.rss_after_kib, 'd'):>9} "
            f"{_fmt(m.rss_closed_kib, 'd'):>9} {_fmt(m.kib_per_session, '.1f'):>11} "
            f"{m.login_s:>7.1f} {_fmt(m.backend_open, 'd'):>9}"
        )
    return "\n".join(lines)


def checks_table(results: list[Check]) -> str:
    lines = ["targets (a report, not a gate)"]
    if not results:
        lines.append("  none checked: they need the haproxy path and a meshproxy path")
    for c in results:
        relation = c.relation or (">=" if "QPS" in c.what else "<=")
        verdict = "PASS" if c.passed else "MISS"
        if c.unit == "x":
            value, target = f"{_fmt(c.value, '6.2f'):>6}x", f"(target {relation} {c.limit}x)"
        else:
            value = f"{_fmt(c.value, '6.1f'):>6} {c.unit}"
            target = f"(target {relation} {c.limit:g} {c.unit})"
        lines.append(f"  {verdict}  {c.workload:<18} {c.what:<30} {value}  {target}")
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


def as_json(
    runs: list[Run],
    summaries: list[Summary],
    results: list[Check],
    memory: list[IdleMemory] | None = None,
    routed: list[RoutingRow] | None = None,
) -> dict[str, Any]:
    return {
        "runs": [asdict(r) for r in runs],
        "summary": [asdict(s) for s in summaries],
        "routing": [asdict(r) for r in routed or []],
        "targets": [asdict(c) for c in results],
        "idle_memory": [asdict(m) for m in memory or []],
    }
