"""A chaos scenario's timeline as one PNG: the load on top, every node's view of the others below.

Top panel: queries per bucket (blue area), errors per bucket (red bars, on a secondary axis
when they are under a tenth of the queries' peak), connects per bucket (thin black line).
Each fault is a dashed vertical line labelled with its action. ``detect_s`` and ``recover_s``
are taken from the first fault (from t=0 when there is none): the span from that fault to
detection is shaded, and recovery is marked with a green triangle and dotted line.

Bottom panel: one lane per ``observer -> subject`` view and kind (``member`` gossip state and
``route`` routing state are separate lanes, their states being different vocabularies),
coloured by state from each change to the next one or to the end of the plot. Before its
first change a lane's state is not known: a first change at ``t <= INITIAL_S`` is taken as
the initial view and drawn from the start of the plot; a later one leaves the lane
``unknown`` (neutral colour) until then. Views that hold one state throughout are left out,
so the lanes show what the fault changed.

The figure is built without pyplot (Agg canvas, no display, no global state), is 1200x700
px, and carries no version metadata, so the same timeline gives the same bytes.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from meshproxy.chaos.report import seconds, verdict
from meshproxy.chaos.timeline import BUCKET_S, Timeline

SIZE_PX = (1200, 700)
DPI = 100
INITIAL_S = 0.5  # a lane's first change this early is its initial view, not a change
UNKNOWN = "unknown"

# (legend label, colour, states): states are matched case-insensitively.
PALETTE = (
    ("alive / ONLINE", "#2ca02c", ("alive", "online")),
    ("suspect / SHUNNED", "#ff7f0e", ("suspect", "shunned")),
    ("dead / left / OFFLINE_HARD", "#d62728", ("dead", "left", "offline_hard")),
    ("OFFLINE_SOFT", "#7f7f7f", ("offline_soft",)),
)
NEUTRAL = "#c6dbef"  # unknown, or a state not in PALETTE
_COLOURS = {state: colour for _, colour, states in PALETTE for state in states}

Lane = tuple[str, str, str]  # (observer, subject, kind)
Segment = tuple[float, float, str]  # (start, end, state)


def colour(state: str) -> str:
    return _COLOURS.get(state.lower(), NEUTRAL)


def title(timeline: Timeline) -> str:
    return (
        f"{timeline.scenario} — errors {timeline.error_count()}, "
        f"detect {seconds(timeline.detect_s)}, recover {seconds(timeline.recover_s)}, "
        f"{verdict(timeline)}"
    )


def fault_time(timeline: Timeline) -> float:
    """What ``detect_s`` and ``recover_s`` count from: the first fault, else t=0."""
    return min((f.t for f in timeline.faults), default=0.0)


def span(timeline: Timeline) -> tuple[float, float]:
    """The plotted time range: from t=0 (or earlier data) to the last thing that happened."""
    base = fault_time(timeline)
    times = [
        timeline.duration_s,
        max(len(timeline.queries), len(timeline.errors), len(timeline.connects)) * BUCKET_S,
        *(f.t for f in timeline.faults),
        *(c.t for c in timeline.changes),
        *(base + s for s in (timeline.detect_s, timeline.recover_s) if s is not None),
    ]
    start = min([0.0, *times])
    return start, max([start + 1.0, *times])


def lanes(timeline: Timeline) -> dict[Lane, list[Segment]]:
    """Each view's state segments, lanes sorted by (observer, subject, kind); see the module."""
    start, end = span(timeline)
    changes: dict[Lane, list[tuple[float, str]]] = {}
    for c in sorted(timeline.changes, key=lambda c: c.t):
        changes.setdefault((c.observer, c.subject, c.kind), []).append((c.t, c.state))
    result = {}
    for lane in sorted(changes):
        points = changes[lane]
        if len(points) == 1 and points[0][0] <= INITIAL_S:
            continue  # one state throughout: nothing happened in this view
        first_t, first_state = points[0]
        if first_t <= INITIAL_S:
            points = [(start, first_state), *points[1:]]
        else:
            points = [(start, UNKNOWN), *points]
        ends = [t for t, _ in points[1:]] + [end]
        result[lane] = [(t, e, state) for (t, state), e in zip(points, ends, strict=True)]
    return result


def plot(timeline: Timeline, path: Path) -> None:
    """Write the timeline's PNG to ``path`` (parents created)."""
    fig = Figure(figsize=(SIZE_PX[0] / DPI, SIZE_PX[1] / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    load, views = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    fig.suptitle(title(timeline), fontweight="bold")
    load.set_xlim(*span(timeline))
    base = fault_time(timeline)
    for ax in (load, views):
        for fault in timeline.faults:
            ax.axvline(fault.t, color="k", ls="--", lw=0.8)
        if timeline.detect_s is not None:
            ax.axvspan(base, base + timeline.detect_s, color="gold", alpha=0.25, lw=0)
        if timeline.recover_s is not None:
            ax.axvline(base + timeline.recover_s, color="green", ls=":", lw=1.2)
    _load_panel(load, timeline)
    _views_panel(views, timeline)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"Software": None})


def _load_panel(ax: Axes, timeline: Timeline) -> None:
    def x(values: list[int]) -> list[float]:
        return [i * BUCKET_S for i in range(len(values))]

    def steps(values: list[int]) -> tuple[list[float], list[int]]:
        """Each bucket's value held to its end, the last bucket's included."""
        return (x([*values, 0]), [*values, values[-1]]) if values else ([], [])

    ax.fill_between(*steps(timeline.queries), step="post", alpha=0.3)
    ax.step(*steps(timeline.queries), where="post", lw=1, label="queries")
    ax.step(*steps(timeline.connects), where="post", lw=0.6, c="k", label="connects")
    ax.set_ylabel(f"per {BUCKET_S * 1000:.0f} ms")
    ax.set_ylim(bottom=0)
    peak = max(timeline.errors, default=0)
    small = 0 < peak < max(timeline.queries, default=0) / 10
    errors_ax = ax.twinx() if small else ax
    label = "errors (right axis)" if small else "errors"
    errors_ax.bar(
        x(timeline.errors), timeline.errors, BUCKET_S, align="edge", color="red", label=label
    )
    if small:
        errors_ax.set_ylabel("errors", color="red")
        errors_ax.set_ylim(0, peak * 1.5)

    top = ax.get_xaxis_transform()  # x in seconds, y in axes fraction
    for fault in timeline.faults:
        ax.text(fault.t, 0.98, fault.action, transform=top, rotation=90, va="top", ha="right")
    if timeline.recover_s is not None:
        recovered = fault_time(timeline) + timeline.recover_s
        ax.plot(
            recovered, 1.0, "v", c="green", ms=9, transform=top, clip_on=False, label="recovered"
        )
    handles = ax.get_legend_handles_labels()[0]
    if small:
        handles += errors_ax.get_legend_handles_labels()[0]
    if timeline.detect_s is not None:
        handles.append(Patch(color="gold", alpha=0.25, label="fault → detected"))
    ax.legend(handles=handles, loc="upper left", fontsize=8)


def _views_panel(ax: Axes, timeline: Timeline) -> None:
    segments = lanes(timeline)
    for y, lane in enumerate(segments.values()):
        ax.broken_barh(
            [(start, end - start) for start, end, _ in lane],
            (y - 0.4, 0.8),
            facecolors=[colour(state) for _, _, state in lane],
        )
    ax.set_yticks(range(len(segments)), [f"{o} → {s} ({k})" for o, s, k in segments], fontsize=8)
    if segments:
        ax.set_ylim(len(segments) - 0.5, -0.5)  # first lane on top
    else:
        ax.text(0.5, 0.5, "no view changes", ha="center", transform=ax.transAxes)
    ax.set_xlabel("seconds since t0")
    legend = [Patch(color=c, label=label) for label, c, _ in PALETTE]
    legend.append(Patch(color=NEUTRAL, label="unknown / other"))
    ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
