"""What every timeline picture shares: rows, spans, token arrows, colours, marks and formats.

The exporters (Chrome trace, HTML, PNG, text) draw the same layout, so a site's
row, a token's landing point and a mark's colour and legend text are decided
here once.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from typing import NamedTuple, Union

from ._timeline_events import JOB_ROW, TimelineEvent, TimelineKind

__all__ = [
    "ALARM",
    "ATTEMPT_FILL",
    "BUSY_FILL",
    "END_COLOURS",
    "INK",
    "MARKS",
    "PALETTE",
    "QUEUED_FILL",
    "Arrow",
    "PathArg",
    "arrows",
    "bounds",
    "default_title",
    "format_bytes",
    "format_ms",
    "job_span_mark",
    "job_spans",
    "legend_marks",
    "row_label",
    "site_spans",
    "sites_of",
    "step_colours",
    "step_note",
]

#: A file system path, as a string or a path object.
PathArg = Union[str, "os.PathLike[str]"]

# Colours per step, in order of first appearance (matplotlib's tab10, then tab20's light half).
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#ff9896",
    "#c5b0d5",
    "#c49c94",
)


# -- shared geometry ----------------------------------------------------------------------


class Arrow(NamedTuple):
    """A token transfer drawn from one row to another."""

    source: str
    target: str
    send: float
    receive: float
    tokens: int
    nbytes: int
    estimated: bool


def sites_of(events: Sequence[TimelineEvent]) -> list[str]:
    """The sites in ``events``, in the order data flows: a site before the sites it sends to.

    Sites that neither send to nor receive from each other keep their names' order,
    so the same pipeline always gets the same rows.
    """
    sites: set[str] = set()
    edges: dict[str, set[str]] = {}
    for event in events:
        if event.site is not None:
            sites.add(event.site)
        if event.target is not None:
            sites.add(event.target)
            if event.site is not None and event.site != event.target:
                edges.setdefault(event.site, set()).add(event.target)
    incoming = dict.fromkeys(sites, 0)
    for targets in edges.values():
        for target in targets:
            incoming[target] += 1
    order: list[str] = []
    ready = sorted(site for site, count in incoming.items() if count == 0)
    while ready:
        site = ready.pop(0)
        order.append(site)
        for target in sorted(edges.get(site, ())):
            incoming[target] -= 1
            if incoming[target] == 0:
                bisect.insort(ready, target)
    # Traffic both ways between sites (a cycle across jobs' steps): the rest by name.
    order += sorted(sites - set(order))
    return order


def step_colours(events: Sequence[TimelineEvent]) -> dict[str, str]:
    """A colour per step name, in order of first appearance."""
    colours: dict[str, str] = {}
    for event in events:
        if event.kind is TimelineKind.STEP and event.step is not None and event.step not in colours:
            colours[event.step] = PALETTE[len(colours) % len(PALETTE)]
    return colours


def bounds(events: Sequence[TimelineEvent]) -> tuple[float, float]:
    if not events:
        return 0.0, 1e-3
    start = min(event.time for event in events)
    end = max(event.end if event.end is not None else event.time for event in events)
    return start, max(end, start + 1e-6)


def arrows(events: Sequence[TimelineEvent]) -> list[Arrow]:
    """Where each token transfer leaves and lands.

    A token lands when the receiving site first uses it: at the start of the first
    step there that starts after the send (or at the send, inside a step already
    running), else when that site reported done.
    """
    steps: dict[tuple[int | None, str], list[TimelineEvent]] = {}
    done: dict[tuple[int | None, str], float] = {}
    for event in events:
        if event.site is None:
            continue
        if event.kind is TimelineKind.STEP:
            steps.setdefault((event.attempt, event.site), []).append(event)
        elif event.kind is TimelineKind.SITE_DONE:
            done[(event.attempt, event.site)] = event.time
    for runs in steps.values():
        runs.sort(key=lambda event: event.time)
    starts = {key: [run.time for run in runs] for key, runs in steps.items()}
    arrows: list[Arrow] = []
    for event in events:
        if event.kind is not TimelineKind.SEND or event.site is None or event.target is None:
            continue
        key = (event.attempt, event.target)
        runs = steps.get(key, [])
        after = bisect.bisect_left(starts.get(key, []), event.time)
        receive: float | None = None
        before = runs[after - 1] if after > 0 else None
        if after < len(runs):
            receive = runs[after].time
        # A worker runs one step at a time: only the last run started before the send can be running.
        elif before is not None and before.end is not None and before.end >= event.time:
            receive = event.time
        if receive is None:
            receive = max(event.time, done.get(key, event.time))
        arrows.append(
            Arrow(
                event.site,
                event.target,
                event.time,
                receive,
                event.count or 0,
                event.nbytes or 0,
                event.estimated,
            )
        )
    return arrows


def site_spans(events: Sequence[TimelineEvent]) -> list[tuple[str, float, float]]:
    """When each site worked on the job: from its start to its done, per attempt."""
    begun: dict[tuple[int | None, str], float] = {}
    spans: list[tuple[str, float, float]] = []
    for event in events:
        if event.site is None:
            continue
        if event.kind is TimelineKind.SITE_STARTED:
            begun[(event.attempt, event.site)] = event.time
        elif event.kind is TimelineKind.SITE_DONE:
            start = begun.pop((event.attempt, event.site), None)
            if start is not None:
                spans.append((event.site, start, event.time))
    return spans


def row_label(row: str) -> str:
    return "job" if row == JOB_ROW else row


def job_spans(events: Sequence[TimelineEvent]) -> list[tuple[str, float, float]]:
    """Spans of the job row: waiting in the queue, then each attempt.

    An attempt begins at its ``started`` record or at its first site's start, whichever
    is earlier: the router timestamps an attempt after it has sent START to every
    site, and a fast site may already be running by then.
    """
    spans: list[tuple[str, float, float]] = []
    _, last = bounds(events)
    begins: dict[int | None, float] = {}
    for event in events:
        if event.kind in (TimelineKind.STARTED, TimelineKind.SITE_STARTED, TimelineKind.STEP):
            begins[event.attempt] = min(begins.get(event.attempt, event.time), event.time)
    waiting: float | None = None
    current: tuple[str, float] | None = None
    for event in events:
        if event.kind in (TimelineKind.QUEUED, TimelineKind.RETRY):
            if current is not None:
                spans.append((current[0], current[1], event.time))
                current = None
            waiting = event.time
        elif event.kind is TimelineKind.STARTED:
            begin = begins.get(event.attempt, event.time)
            if waiting is not None:
                spans.append(("queued", waiting, max(waiting, begin)))
                waiting = None
            label = f"attempt {event.attempt}" + (f" (slot {event.slot})" if event.slot is not None else "")
            current = (label, begin)
        elif event.kind.ends_job:
            if current is not None:
                spans.append((current[0], current[1], event.time))
                current = None
            if waiting is not None:
                spans.append(("queued", waiting, event.time))
                waiting = None
    if current is not None:
        spans.append((current[0], current[1], last))
    if waiting is not None:
        spans.append(("queued", waiting, last))
    return spans


def step_note(ok: bool | None, separator: str) -> str:
    if ok is None:
        return f"{separator}(its site stopped early)"
    return "" if ok else f"{separator}(raised)"


def format_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def format_ms(seconds: float) -> str:
    ms = seconds * 1000.0
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 1:
        return f"{ms:.1f} ms"
    return f"{ms:.3f} ms"


def default_title(events: Sequence[TimelineEvent], *, pipeline: str | None = None) -> str:
    """A one-line title for a timeline: ``job 3 (mean): finished after 2.1 ms``."""
    if not events:
        return "empty timeline"
    job = f"job {events[0].job_id}" + (f" ({pipeline})" if pipeline else "")
    end = next((event for event in reversed(events) if event.kind.ends_job), None)
    start, _ = bounds(events)
    if end is None:
        return f"{job}: running"
    return f"{job}: {end.kind.value} after {format_ms(end.time - start)}"


# -- marks and legends ---------------------------------------------------------------------

# The pictures' colours besides the steps' own.
QUEUED_FILL = "#cccccc"
ATTEMPT_FILL = "#9aa5b1"
BUSY_FILL = "#dde3ea"
INK = "#333333"
ALARM = "#d62728"
END_COLOURS = {"finished": "#2ca02c", "retry": "#ff7f0e", "failed": ALARM, "cancelled": ALARM}

#: What each mark other than a step's bar means, in the order both legends list them.
#: A legend lists a step's colour per step, then these, for the marks its picture drew.
MARKS = {
    "queued": "job queued",
    "attempt": "job running on a slot",
    "retry": "attempt lost, job queued again",
    "finished": "job finished",
    "failed": "job failed",
    "cancelled": "job cancelled",
    "raised": "step raised",
    "site-busy": "site busy with the job",
    "site-done": "site done",
    "site-stopped": "site stopped early",
    "tokens": "tokens sent",
    "tokens-estimated": "tokens sent, time estimated",
    "fault": "fault injected (fault plan)",
}

FAULT_COLOUR = "#9467bd"


def fault_label(event: TimelineEvent) -> str:
    """A fault's one-line description, for a tooltip or a label."""
    detail = event.detail
    where = f"{event.site or 'client'}" + (f" → {event.target}" if event.target else "")
    extra = ", ".join(
        f"{key}={value}" for key, value in detail.items() if key not in ("fault", "seed", "index", "source")
    )
    return (
        f"{detail.get('fault', 'fault')} at {where} (fault {detail.get('index')}, seed {detail.get('seed')})"
        + (f": {extra}" if extra else "")
    )


def job_span_mark(label: str) -> str:
    return "queued" if label == "queued" else "attempt"


def legend_marks(drawn: set[str]) -> list[str]:
    """The marks a picture drew, in legend order."""
    return [mark for mark in MARKS if mark in drawn]
