"""Timelines: what every site of a job did, and when, as typed records and pictures.

A :class:`~federation.Job` keeps a light log of plain tuples while it runs
(``(time, kind, fields)``, appended by the router thread; see ``_handle``).
Nothing here runs on the hot path: the typed records are built only when
someone asks, by :meth:`Job.timeline() <federation.Job.timeline>`, and the
exporters turn them into

* Chrome trace JSON (:func:`to_chrome_trace`): opens in Perfetto
  (https://ui.perfetto.dev) or ``chrome://tracing``; one row per site, a slice
  per step run, flow arrows for tokens;
* a self-contained HTML Gantt chart (:func:`to_html`): inline SVG and CSS, no
  scripts, no external resources, so it can be mailed or attached to a CI run;
* a PNG Gantt chart (:func:`to_png`), drawn with matplotlib (the ``viz`` extra).

What a worker reports, per site, when it is done with a job: each step run
(start, end, items produced), the tokens it sent to each other site (count and
bytes, out-of-band buffers included), and, when the worker records them, each batch of tokens with its
send time (``sends``). Without per-batch records a site's traffic to a target is
one :attr:`TimelineKind.SEND` record placed at the end of the site's last step
and marked ``estimated``: the totals are exact, the moment is not.

Times are seconds since the epoch (``time.time()``) in every record; worker and
client clocks are the same clock on one machine.
"""

from __future__ import annotations

import bisect
import enum
import html
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Union

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from ._handle import Job

__all__ = [
    "PathArg",
    "TimelineEvent",
    "TimelineKind",
    "build_timeline",
    "default_title",
    "export_timeline",
    "to_chrome_trace",
    "to_html",
    "to_png",
    "to_text",
]

#: A file system path, as a string or a path object.
PathArg = Union[str, "os.PathLike[str]"]

#: The key of the row that holds job-level events (queued, attempts, the end); drawn as "job".
#: Parentheses are not allowed in site names, so no site can take this row.
JOB_ROW = "(job)"

# The ``viz`` extra. The distribution is not on PyPI (and the unrelated PyPI project named
# ``federation`` is another package): install matplotlib itself, or the extra from a checkout.
_VIZ_HINT = "pip install matplotlib (or, in a checkout of federation, pip install '.[viz]')"

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


class TimelineKind(str, enum.Enum):
    """What a :class:`TimelineEvent` records."""

    #: The job entered the federation's queue (client side).
    QUEUED = "queued"
    #: An attempt of the job began on a pool slot (client side).
    STARTED = "started"
    #: A site received the job and began working on it (worker side).
    SITE_STARTED = "site_started"
    #: A step ran at a site, from :attr:`TimelineEvent.time` to :attr:`TimelineEvent.end`.
    STEP = "step"
    #: A site sent tokens to another site (:attr:`TimelineEvent.target`).
    SEND = "send"
    #: Results from a site arrived at the client.
    RESULT = "result"
    #: A site reported that it is done with the job (``ok`` is False if it stopped early).
    SITE_DONE = "site_done"
    #: An attempt failed for a reason outside the user's code; the job was queued again.
    RETRY = "retry"
    #: The job ended with its results.
    FINISHED = "finished"
    #: The job ended with an error.
    FAILED = "failed"
    #: The job was cancelled, or timed out.
    CANCELLED = "cancelled"

    @property
    def ends_job(self) -> bool:
        """Whether this kind of event ends the job."""
        return self in (TimelineKind.FINISHED, TimelineKind.FAILED, TimelineKind.CANCELLED)


# Among events at the same instant, the order in which they happened.
_RANK = {
    TimelineKind.QUEUED: 0,
    TimelineKind.RETRY: 1,
    TimelineKind.STARTED: 2,
    TimelineKind.SITE_STARTED: 3,
    TimelineKind.STEP: 4,
    TimelineKind.SEND: 5,
    TimelineKind.RESULT: 6,
    TimelineKind.SITE_DONE: 7,
    TimelineKind.FINISHED: 8,
    TimelineKind.FAILED: 8,
    TimelineKind.CANCELLED: 8,
}


class TimelineEvent(BaseModel):
    """One thing that happened during a job: a moment, or a span (a step run).

    Fields that do not apply to an event's kind are ``None``.

    Attributes:
        kind: what happened.
        time: when, in seconds since the epoch; the start, for a span.
        end: the end of a span (a :attr:`TimelineKind.STEP`), else ``None``.
        job_id: the job's id.
        attempt: which run of the job (1 for the first; a retried job has more);
            ``None`` for events before the first attempt.
        site: the site it happened at; ``None`` for job-level events.
        step: the step, for a step run.
        slot: the pool slot an attempt ran on.
        target: the receiving site, for a :attr:`TimelineKind.SEND`.
        count: items a step produced, tokens sent, or results received.
        nbytes: bytes sent (pickles and out-of-band buffers), for a :attr:`TimelineKind.SEND`.
        ok: for ``SITE_DONE``, whether the site finished its work (False: it stopped early,
            because a step raised or the job was aborted). For ``STEP``, True if the step ran
            to its end, False if it raised, ``None`` if unknown: the last step of a site that
            stopped early may have been cut short by the abort, or may have ended just before.
        error: the error, for ``FAILED``, ``CANCELLED`` and ``RETRY``.
        estimated: the time is an estimate: a site's token totals placed at the end of
            its last step, because the worker did not record each batch.
        detail: anything else the event carried.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: TimelineKind
    time: float
    end: float | None = None
    job_id: int
    attempt: int | None = None
    site: str | None = None
    step: str | None = None
    slot: int | None = None
    target: str | None = None
    count: int | None = None
    nbytes: int | None = None
    ok: bool | None = None
    error: str | None = None
    estimated: bool = False
    detail: dict[str, Any] = Field(default_factory=dict)

    @property
    def duration(self) -> float:
        """The span's length in seconds (0 for a moment)."""
        return 0.0 if self.end is None else max(0.0, self.end - self.time)

    @property
    def row(self) -> str:
        """The row this event is drawn on: its site, or ``"(job)"`` for job-level events."""
        return self.site if self.site is not None else JOB_ROW


# -- building ---------------------------------------------------------------------------


def build_timeline(job: Job) -> list[TimelineEvent]:
    """The typed timeline of ``job`` so far, ordered by time.

    Safe to call while the job runs: it reads a snapshot of the job's event log.
    """
    raw = list(job._events)  # list.append in the router thread; a copy is a consistent snapshot
    error = job._error
    site, step = getattr(error, "site", None), getattr(error, "step", None)
    failed_at = (site, step) if isinstance(site, str) and isinstance(step, str) else None
    return events_from_log(job.id, raw, failed_at=failed_at)


def events_from_log(
    job_id: int, raw: Iterable[tuple[float, str, dict[str, Any]]], *, failed_at: tuple[str, str] | None = None
) -> list[TimelineEvent]:
    """Turn a job's raw event log (``(time, kind, fields)`` tuples) into ordered typed records.

    ``failed_at`` is the ``(site, step)`` whose step raised, if the job failed that way.
    """
    events: list[TimelineEvent] = []
    attempt: int | None = None
    slot: int | None = None
    for when, kind, fields in raw:
        if kind == "queued":
            events.append(TimelineEvent(kind=TimelineKind.QUEUED, time=when, job_id=job_id))
        elif kind == "started":
            attempt = int(fields.get("attempt", (attempt or 0) + 1))
            slot = fields.get("slot")
            events.append(
                TimelineEvent(kind=TimelineKind.STARTED, time=when, job_id=job_id, attempt=attempt, slot=slot)
            )
        elif kind == "site_done":
            events.extend(_site_events(job_id, attempt, slot, when, fields, failed_at))
        elif kind == "results":
            events.append(
                TimelineEvent(
                    kind=TimelineKind.RESULT,
                    time=when,
                    job_id=job_id,
                    attempt=attempt,
                    site=fields.get("site"),
                    count=fields.get("count"),
                    detail=_rest(fields, "site", "count"),
                )
            )
        elif kind == "retry":
            events.append(
                TimelineEvent(
                    kind=TimelineKind.RETRY,
                    time=when,
                    job_id=job_id,
                    attempt=attempt,
                    slot=slot,
                    error=fields.get("error"),
                )
            )
        elif kind in ("finished", "failed", "cancelled"):
            events.append(
                TimelineEvent(
                    kind=TimelineKind(kind),
                    time=when,
                    job_id=job_id,
                    attempt=attempt,
                    error=fields.get("error"),
                )
            )
        # Kinds this version does not know are skipped: a newer core may record more.
    events.sort(key=lambda event: (event.time, _RANK[event.kind]))
    return events


def _rest(fields: dict[str, Any], *known: str) -> dict[str, Any]:
    """The fields not already typed, if they are plain scalars (exporters write them as JSON)."""
    plain = (bool, int, float, str, type(None))
    return {key: value for key, value in fields.items() if key not in known and isinstance(value, plain)}


def _site_events(
    job_id: int,
    attempt: int | None,
    slot: int | None,
    when: float,
    fields: dict[str, Any],
    failed_at: tuple[str, str] | None = None,
) -> list[TimelineEvent]:
    site = str(fields.get("site"))
    ok = bool(fields.get("ok", True))
    events: list[TimelineEvent] = []
    started = fields.get("started")
    if isinstance(started, (int, float)):
        events.append(
            TimelineEvent(
                kind=TimelineKind.SITE_STARTED,
                time=float(started),
                job_id=job_id,
                attempt=attempt,
                site=site,
                slot=slot,
            )
        )
    timings = list(fields.get("timings") or ())
    last_end: float | None = None
    for index, (step, start, end, count) in enumerate(timings):
        # A step that raised (or was aborted) is the last one a failed site timed.
        completed: bool | None = True
        if not ok and index == len(timings) - 1:
            completed = False if failed_at == (site, str(step)) else None
        events.append(
            TimelineEvent(
                kind=TimelineKind.STEP,
                time=float(start),
                end=float(end),
                job_id=job_id,
                attempt=attempt,
                site=site,
                step=str(step),
                slot=slot,
                count=int(count),
                ok=completed,
            )
        )
        last_end = float(end) if last_end is None else max(last_end, float(end))
    sends = fields.get("sends")
    if sends is not None:
        for sent_at, target, count, size in sends:
            events.append(
                TimelineEvent(
                    kind=TimelineKind.SEND,
                    time=float(sent_at),
                    job_id=job_id,
                    attempt=attempt,
                    site=site,
                    target=str(target),
                    count=int(count),
                    nbytes=int(size),
                )
            )
    else:
        at = last_end if last_end is not None else when
        for target, (count, size) in sorted((fields.get("links") or {}).items()):
            events.append(
                TimelineEvent(
                    kind=TimelineKind.SEND,
                    time=at,
                    job_id=job_id,
                    attempt=attempt,
                    site=site,
                    target=str(target),
                    count=int(count),
                    nbytes=int(size),
                    estimated=True,
                )
            )
    # The router timestamps DONE when it reads it; a site's own clock may be a hair later.
    done_at = max(when, last_end) if last_end is not None else when
    events.append(
        TimelineEvent(
            kind=TimelineKind.SITE_DONE,
            time=done_at,
            job_id=job_id,
            attempt=attempt,
            site=site,
            slot=slot,
            ok=ok,
            detail=_rest(fields, "site", "ok", "timings", "links", "sends", "started"),
        )
    )
    return events


# -- shared geometry ----------------------------------------------------------------------


class _Arrow(NamedTuple):
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


def _bounds(events: Sequence[TimelineEvent]) -> tuple[float, float]:
    if not events:
        return 0.0, 1e-3
    start = min(event.time for event in events)
    end = max(event.end if event.end is not None else event.time for event in events)
    return start, max(end, start + 1e-6)


def _arrows(events: Sequence[TimelineEvent]) -> list[_Arrow]:
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
    arrows: list[_Arrow] = []
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
            _Arrow(
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


def _site_spans(events: Sequence[TimelineEvent]) -> list[tuple[str, float, float]]:
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


def _label(row: str) -> str:
    return "job" if row == JOB_ROW else row


def _job_spans(events: Sequence[TimelineEvent]) -> list[tuple[str, float, float]]:
    """Spans of the job row: waiting in the queue, then each attempt.

    An attempt begins at its ``started`` record or at its first site's start, whichever
    is earlier: the router timestamps an attempt after it has sent START to every
    site, and a fast site may already be running by then.
    """
    spans: list[tuple[str, float, float]] = []
    _, last = _bounds(events)
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


def _step_note(ok: bool | None, separator: str) -> str:
    if ok is None:
        return f"{separator}(its site stopped early)"
    return "" if ok else f"{separator}(raised)"


def _format_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _format_ms(seconds: float) -> str:
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
    start, _ = _bounds(events)
    if end is None:
        return f"{job}: running"
    return f"{job}: {end.kind.value} after {_format_ms(end.time - start)}"


# -- marks and legends ---------------------------------------------------------------------

# The pictures' colours besides the steps' own.
_QUEUED_FILL = "#cccccc"
_ATTEMPT_FILL = "#9aa5b1"
_BUSY_FILL = "#dde3ea"
_INK = "#333333"
_ALARM = "#d62728"
_END_COLOURS = {"finished": "#2ca02c", "retry": "#ff7f0e", "failed": _ALARM, "cancelled": _ALARM}

#: What each mark other than a step's bar means, in the order both legends list them.
#: A legend lists a step's colour per step, then these, for the marks its picture drew.
_MARKS = {
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
}


def _job_span_mark(label: str) -> str:
    return "queued" if label == "queued" else "attempt"


def _legend_marks(drawn: set[str]) -> list[str]:
    """The marks a picture drew, in legend order."""
    return [mark for mark in _MARKS if mark in drawn]


# -- Chrome trace -------------------------------------------------------------------------


def to_chrome_trace(events: Sequence[TimelineEvent]) -> dict[str, Any]:
    """The timeline as a Chrome trace (the JSON object format), for Perfetto or ``chrome://tracing``.

    One process per job (``pid`` is the job id); thread 0 is the job row (time in
    the queue, each attempt, the end), then one thread per site. Step runs are
    complete (``"X"``) slices; a token transfer is a short ``send → target`` slice
    on the sender and a ``receive ← source`` slice on the receiver, joined by a flow
    arrow (``"s"``/``"f"`` events sharing an id). Times are microseconds since the
    first event; ``otherData.origin`` is that moment in seconds since the epoch.

    Save it with ``json.dump``; :meth:`Job.export_timeline` does that for ``.json``.
    """
    origin, _ = _bounds(events)
    pid = events[0].job_id if events else 0
    rows = [JOB_ROW, *sites_of(events)]
    tid = {row: index for index, row in enumerate(rows)}

    def us(seconds: float) -> float:
        return round((seconds - origin) * 1e6, 3)

    trace: list[dict[str, Any]] = [
        {"ph": "M", "pid": pid, "tid": 0, "ts": 0, "name": "process_name", "args": {"name": f"job {pid}"}},
    ]
    for row, index in tid.items():
        label = "job" if row == JOB_ROW else f"site {row}"
        trace.append(
            {"ph": "M", "pid": pid, "tid": index, "ts": 0, "name": "thread_name", "args": {"name": label}}
        )
        trace.append(
            {
                "ph": "M",
                "pid": pid,
                "tid": index,
                "ts": 0,
                "name": "thread_sort_index",
                "args": {"sort_index": index},
            }
        )
    for label, start, end in _job_spans(events):
        trace.append(
            {
                "ph": "X",
                "pid": pid,
                "tid": 0,
                "ts": us(start),
                "dur": us(end) - us(start),
                "name": label,
                "cat": "job",
                "args": {},
            }
        )
    for event in events:
        if event.kind is TimelineKind.STEP and event.site is not None and event.end is not None:
            trace.append(
                {
                    "ph": "X",
                    "pid": pid,
                    "tid": tid[event.site],
                    "ts": us(event.time),
                    "dur": us(event.end) - us(event.time),
                    "name": event.step,
                    "cat": "step",
                    "args": {
                        "site": event.site,
                        "items": event.count,
                        "attempt": event.attempt,
                        "ok": event.ok,
                    },
                }
            )
        elif event.kind is TimelineKind.SITE_DONE and event.site is not None:
            trace.append(
                {
                    "ph": "i",
                    "s": "t",
                    "pid": pid,
                    "tid": tid[event.site],
                    "ts": us(event.time),
                    "name": "done" if event.ok else "stopped",
                    "cat": "site",
                    "args": {"attempt": event.attempt, **event.detail},
                }
            )
        elif event.kind is TimelineKind.RESULT and event.site is not None:
            trace.append(
                {
                    "ph": "i",
                    "s": "t",
                    "pid": pid,
                    "tid": tid[event.site],
                    "ts": us(event.time),
                    "name": "results",
                    "cat": "result",
                    "args": {"count": event.count},
                }
            )
        elif event.site is None and event.kind not in (TimelineKind.QUEUED, TimelineKind.STARTED):
            args: dict[str, Any] = {"attempt": event.attempt}
            if event.error is not None:
                args["error"] = event.error
            trace.append(
                {
                    "ph": "i",
                    "s": "p",
                    "pid": pid,
                    "tid": 0,
                    "ts": us(event.time),
                    "name": event.kind.value,
                    "cat": "job",
                    "args": args,
                }
            )
    for flow_id, arrow in enumerate(_arrows(events), start=1):
        args = {
            "from": arrow.source,
            "to": arrow.target,
            "tokens": arrow.tokens,
            "bytes": arrow.nbytes,
            "estimated": arrow.estimated,
        }
        name = f"tokens {arrow.source} → {arrow.target}"
        send, receive = us(arrow.send), us(arrow.receive)
        trace += [
            {
                "ph": "X",
                "pid": pid,
                "tid": tid[arrow.source],
                "ts": send,
                "dur": 1,
                "name": f"send → {arrow.target}",
                "cat": "token",
                "args": args,
            },
            {
                "ph": "s",
                "pid": pid,
                "tid": tid[arrow.source],
                "ts": send,
                "id": flow_id,
                "name": name,
                "cat": "token",
            },
            {
                "ph": "X",
                "pid": pid,
                "tid": tid[arrow.target],
                "ts": receive,
                "dur": 1,
                "name": f"receive ← {arrow.source}",
                "cat": "token",
                "args": args,
            },
            {
                "ph": "f",
                "bp": "e",
                "pid": pid,
                "tid": tid[arrow.target],
                "ts": receive,
                "id": flow_id,
                "name": name,
                "cat": "token",
            },
        ]
    return {
        "traceEvents": trace,
        "displayTimeUnit": "ms",
        "otherData": {"job_id": pid, "origin": origin, "sites": rows[1:], "generator": "federation"},
    }


# -- HTML ---------------------------------------------------------------------------------

#: Above this many token transfers, pictures draw them as thin lines without heads.
_MAX_DRAWN_ARROWS = 300

_LABEL_WIDTH = 150
_CHART_WIDTH = 900
_ROW_HEIGHT = 34
_TOP = 40
_BOTTOM = 70


def _svg_paint(mark: str, colour: str | None = None) -> str:
    """The paint attributes of a mark: the chart and its legend draw each mark with the same ones."""
    if mark == "raised":
        return f'fill="{colour or "#ffffff"}" stroke="{_ALARM}" stroke-width="2"'
    if mark in ("site-done", "site-stopped"):
        return f'stroke="{_INK if mark == "site-done" else _ALARM}" stroke-width="2"'
    if mark in ("tokens", "tokens-estimated"):
        dash = ' stroke-dasharray="4 3"' if mark == "tokens-estimated" else ""
        return f'stroke="{_INK}" stroke-width="1.4"{dash} marker-end="url(#arrowhead)"'
    fill = {"queued": _QUEUED_FILL, "attempt": _ATTEMPT_FILL, "site-busy": _BUSY_FILL, **_END_COLOURS}
    return f'fill="{colour or fill[mark]}"'


def _svg_icon(mark: str, colour: str | None = None) -> str:
    """A legend's small picture of a mark (``mark`` "step" is a step's bar in ``colour``)."""
    paint = _svg_paint(mark, colour)
    if mark in ("step", "raised"):
        shape = f'<rect x="2" y="1" width="18" height="12" rx="2" {paint}/>'
    elif mark in ("queued", "attempt"):
        shape = f'<rect x="2" y="2.5" width="18" height="9" {paint}/>'
    elif mark == "site-busy":
        shape = f'<rect x="2" y="4" width="18" height="6" {paint}/>'
    elif mark in ("site-done", "site-stopped"):
        shape = f'<line x1="11" y1="0" x2="11" y2="14" {paint}/>'
    elif mark in ("tokens", "tokens-estimated"):
        shape = f'<line x1="1" y1="7" x2="20" y2="7" {paint}/>'
    else:  # the job's end or a retry: a dot on the job row
        shape = f'<circle cx="11" cy="7" r="5" {paint}/>'
    return f'<svg class="icon" width="22" height="14" viewBox="0 0 22 14" aria-hidden="true">{shape}</svg>'


def _nice_step(span: float, target_ticks: int = 8) -> float:
    raw = span / target_ticks
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude  # pragma: no cover


def to_html(events: Sequence[TimelineEvent], *, title: str | None = None) -> str:
    """The timeline as a self-contained HTML page: a Gantt chart in inline SVG.

    One row per site (and a job row on top), a bar per step run coloured by
    step, an arrow per token transfer (dashed when its time is estimated), a
    legend, and a tooltip on everything. No scripts, no fonts, no external
    resources: the file can be opened anywhere, offline.
    """
    title = title or default_title(events)
    origin, last = _bounds(events)
    span_ms = (last - origin) * 1000.0
    rows = [JOB_ROW, *sites_of(events)]
    y = {row: _TOP + index * _ROW_HEIGHT for index, row in enumerate(rows)}
    height = _TOP + len(rows) * _ROW_HEIGHT + _BOTTOM
    width = _LABEL_WIDTH + _CHART_WIDTH + 30
    colours = step_colours(events)

    def x(seconds: float) -> float:
        return round(_LABEL_WIDTH + (seconds - origin) * 1000.0 / span_ms * _CHART_WIDTH, 2)

    esc = html.escape
    parts: list[str] = []
    parts.append(
        f'<svg class="timeline" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{esc(title)}">'
    )
    parts.append(
        '<defs><marker id="arrowhead" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#333"/></marker></defs>'
    )
    # Rows and their labels.
    for index, row in enumerate(rows):
        top = y[row]
        shade = "#f4f4f4" if index % 2 == 0 else "#ffffff"
        label = _label(row)
        parts.append(
            f'<g class="row" data-row="{esc(row)}"'
            + ("" if row == JOB_ROW else f' data-site="{esc(row)}"')
            + ">"
        )
        parts.append(
            f'<rect class="band" x="0" y="{top}" width="{width}" height="{_ROW_HEIGHT}" fill="{shade}"/>'
        )
        parts.append(f'<text class="label" x="8" y="{top + _ROW_HEIGHT / 2 + 4}">{esc(label)}</text>')
        parts.append("</g>")
    # Time axis.
    axis_y = _TOP + len(rows) * _ROW_HEIGHT
    tick = _nice_step(span_ms)
    parts.append(
        f'<line class="axis" x1="{_LABEL_WIDTH}" y1="{axis_y}" '
        f'x2="{_LABEL_WIDTH + _CHART_WIDTH}" y2="{axis_y}"/>'
    )
    value = 0.0
    while value <= span_ms * 1.0001:
        tx = round(_LABEL_WIDTH + value / span_ms * _CHART_WIDTH, 2)
        parts.append(f'<line class="tick" x1="{tx}" y1="{_TOP}" x2="{tx}" y2="{axis_y + 4}"/>')
        parts.append(
            f'<text class="ticklabel" x="{tx}" y="{axis_y + 16}" text-anchor="middle">{value:g}</text>'
        )
        value += tick
    parts.append(
        f'<text class="axistitle" x="{_LABEL_WIDTH + _CHART_WIDTH / 2}" y="{axis_y + 34}" '
        'text-anchor="middle">'
        "milliseconds since the job was submitted</text>"
    )
    # Every kind of mark drawn, for the legend.
    drawn: set[str] = set()
    # The job row: queue wait and attempts.
    for label, start, end in _job_spans(events):
        mark = _job_span_mark(label)
        drawn.add(mark)
        parts.append(
            f'<rect class="job-span" x="{x(start)}" y="{y[JOB_ROW] + 9}" '
            f'width="{max(1.0, x(end) - x(start))}" height="{_ROW_HEIGHT - 18}" {_svg_paint(mark)}>'
            f"<title>{esc(label)}: {_format_ms(end - start)}</title></rect>"
        )
    # When each site was busy with the job, under its steps.
    for site, start, end in _site_spans(events):
        drawn.add("site-busy")
        parts.append(
            f'<rect class="site-span" x="{x(start)}" y="{y[site] + 12}" '
            f'width="{max(1.0, x(end) - x(start))}" height="{_ROW_HEIGHT - 24}" {_svg_paint("site-busy")}>'
            f"<title>{esc(site)} busy with the job: {_format_ms(end - start)}</title></rect>"
        )
    # Steps and site events.
    for event in events:
        if event.kind is TimelineKind.STEP and event.site is not None and event.end is not None:
            colour = colours.get(event.step or "", "#888888")
            top = y[event.site] + 6
            tip = (
                f"{event.step} at {event.site}: {_format_ms(event.duration)}, {event.count} item(s)"
                + (f", attempt {event.attempt}" if event.attempt and event.attempt > 1 else "")
                + _step_note(event.ok, ", ")
            )
            mark = "raised" if event.ok is False else "step"
            drawn.add(mark)
            parts.append(
                f'<rect class="step" data-step="{esc(event.step or "")}" x="{x(event.time)}" y="{top}" '
                f'width="{max(3.0, x(event.end) - x(event.time))}" height="{_ROW_HEIGHT - 12}" rx="2" '
                f"{_svg_paint(mark, colour)}><title>{esc(tip)}</title></rect>"
            )
        elif event.kind is TimelineKind.SITE_DONE and event.site is not None:
            top = y[event.site]
            mark = "site-done" if event.ok else "site-stopped"
            drawn.add(mark)
            parts.append(
                f'<line class="done" x1="{x(event.time)}" y1="{top + 3}" x2="{x(event.time)}" '
                f'y2="{top + _ROW_HEIGHT - 3}" {_svg_paint(mark)}>'
                f"<title>{esc(event.site)} done{'' if event.ok else ' (stopped early)'} "
                f"at {_format_ms(event.time - origin)}</title></line>"
            )
        elif event.site is None and (event.kind.ends_job or event.kind is TimelineKind.RETRY):
            mark = event.kind.value
            drawn.add(mark)
            cx, cy = x(event.time), y[JOB_ROW] + _ROW_HEIGHT / 2
            tip = event.kind.value + (f": {event.error}" if event.error else "")
            parts.append(
                f'<circle class="end" data-kind="{event.kind.value}" cx="{cx}" cy="{cy}" r="5" '
                f"{_svg_paint(mark)}>"
                f"<title>{esc(tip)}</title></circle>"
            )
    # Token arrows, on top.
    for arrow in _arrows(events):
        x1, x2 = x(arrow.send), x(arrow.receive)
        y1 = y[arrow.source] + _ROW_HEIGHT / 2
        y2 = y[arrow.target] + (4 if y[arrow.target] > y1 else _ROW_HEIGHT - 4)
        mark = "tokens-estimated" if arrow.estimated else "tokens"
        drawn.add(mark)
        tip = f"{arrow.source} → {arrow.target}: {arrow.tokens} token(s), {_format_bytes(arrow.nbytes)}" + (
            " (time estimated from totals)" if arrow.estimated else ""
        )
        parts.append(
            f'<line class="token" data-source="{esc(arrow.source)}" data-target="{esc(arrow.target)}" '
            f'x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" {_svg_paint(mark)}><title>{esc(tip)}</title></line>'
        )
    parts.append("</svg>")
    # The legend: a key per step colour, then one per other kind of mark drawn, with its picture.
    keys = [(f"step:{step}", _svg_icon("step", colour), step) for step, colour in colours.items()]
    keys += [(mark, _svg_icon(mark), _MARKS[mark]) for mark in _legend_marks(drawn)]
    legend = "".join(
        f'<span class="key" data-mark="{esc(mark)}">{icon}{esc(text)}</span>' for mark, icon, text in keys
    )
    body = "\n".join(parts)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{esc(title)}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #222; }}
h1 {{ font-size: 18px; font-weight: 600; margin: 0 0 12px; }}
.legend {{ margin: 8px 0 16px; font-size: 13px; }}
.key {{ display: inline-block; margin: 0 16px 4px 0; white-space: nowrap; }}
.key svg.icon {{ margin-right: 5px; vertical-align: -2px; }}
svg.timeline {{ font-size: 12px; }}
svg .label {{ font-weight: 600; fill: #333; }}
svg .axis {{ stroke: #666; }}
svg .tick {{ stroke: #ddd; }}
svg .ticklabel, svg .axistitle {{ fill: #555; }}
svg rect.step:hover, svg line.token:hover {{ opacity: 0.75; }}
</style>
</head>
<body>
<h1>{esc(title)}</h1>
{body}
<div class="legend">{legend}</div>
</body>
</html>
"""


# -- PNG ----------------------------------------------------------------------------------


def to_png(
    events: Sequence[TimelineEvent], path: PathArg, *, title: str | None = None, dpi: int = 120
) -> Path:
    """Draw the timeline as a Gantt chart and save it as a PNG at ``path``.

    One row per site (and a job row on top), a bar per step run coloured by
    step, an arrow per token transfer (dashed when its time is estimated), and
    a legend for every kind of mark drawn.

    Raises:
        ImportError: matplotlib is not installed (``pip install matplotlib``, or
            ``pip install '.[viz]'`` in a checkout of federation).
    """
    figure = _png_figure(events, title=title, dpi=dpi)
    target = Path(path)
    figure.savefig(target, format="png")
    return target


def _png_figure(events: Sequence[TimelineEvent], *, title: str | None = None, dpi: int = 120) -> Any:
    """The matplotlib figure :func:`to_png` saves."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise ImportError(f"a PNG timeline needs matplotlib, which is not installed: {_VIZ_HINT}") from exc

    title = title or default_title(events)
    origin, last = _bounds(events)
    rows = [JOB_ROW, *sites_of(events)]
    # Row 0 at the top: y grows downwards in the picture, as in the HTML chart.
    level = {row: len(rows) - 1 - index for index, row in enumerate(rows)}
    colours = step_colours(events)

    def ms(seconds: float) -> float:
        return (seconds - origin) * 1000.0

    figure = Figure(figsize=(10, 1.6 + 0.55 * len(rows)), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for index, row in enumerate(rows):
        if index % 2 == 0:
            height = level[row]
            axes.axhspan(height - 0.5, height + 0.5, color="#f4f4f4", zorder=0)
    # Every kind of mark drawn, for the legend.
    drawn: set[str] = set()
    for label, start, end in _job_spans(events):
        mark = _job_span_mark(label)
        drawn.add(mark)
        axes.broken_barh(
            [(ms(start), max(ms(end) - ms(start), 1e-6))],
            (level[JOB_ROW] - 0.25, 0.5),
            facecolors=_QUEUED_FILL if mark == "queued" else _ATTEMPT_FILL,
            zorder=2,
        )
    # A bar stays visible however short its step: at least 0.4 % of the picture's width.
    least = max(ms(last), 1e-3) * 0.004
    for site, start, end in _site_spans(events):
        drawn.add("site-busy")
        axes.broken_barh(
            [(ms(start), max(ms(end) - ms(start), least))],
            (level[site] - 0.12, 0.24),
            facecolors=_BUSY_FILL,
            zorder=2,
        )
    # One call per (site, step, failed): a streamed step may have run thousands of times.
    bars: dict[tuple[str, str, bool], list[tuple[float, float]]] = {}
    for event in events:
        if event.kind is TimelineKind.STEP and event.site is not None and event.end is not None:
            key = (event.site, event.step or "", event.ok is False)
            bars.setdefault(key, []).append((ms(event.time), max(ms(event.end) - ms(event.time), least)))
    for (site, step, failed), ranges in bars.items():
        if failed:
            drawn.add("raised")
        axes.broken_barh(
            ranges,
            (level[site] - 0.32, 0.64),
            facecolors=colours.get(step, "#888888"),
            edgecolors=_ALARM if failed else "none",
            linewidth=1.5,
            zorder=3,
        )
    for event in events:
        if event.kind is TimelineKind.SITE_DONE and event.site is not None:
            drawn.add("site-done" if event.ok else "site-stopped")
            axes.vlines(
                ms(event.time),
                level[event.site] - 0.4,
                level[event.site] + 0.4,
                colors=_INK if event.ok else _ALARM,
                linewidth=1.5,
                zorder=4,
            )
        elif event.site is None and (event.kind.ends_job or event.kind is TimelineKind.RETRY):
            drawn.add(event.kind.value)
            colour = _END_COLOURS[event.kind.value]
            axes.plot([ms(event.time)], [level[JOB_ROW]], marker="o", color=colour, markersize=6, zorder=5)
    arrows = _arrows(events)
    drawn.update("tokens-estimated" if arrow.estimated else "tokens" for arrow in arrows)
    if len(arrows) > _MAX_DRAWN_ARROWS:
        # Thousands of arrowheads would hide the bars and take seconds to draw: plain lines.
        from matplotlib.collections import LineCollection

        segments = [
            [(ms(arrow.send), level[arrow.source]), (ms(arrow.receive), level[arrow.target])]
            for arrow in arrows
        ]
        axes.add_collection(LineCollection(segments, colors=_INK, linewidths=0.5, alpha=0.4, zorder=6))
        arrows = []
    for arrow in arrows:
        axes.annotate(
            "",
            xy=(ms(arrow.receive), level[arrow.target]),
            xytext=(ms(arrow.send), level[arrow.source]),
            arrowprops={
                "arrowstyle": "-|>",
                "color": _INK,
                "linewidth": 1.1,
                "linestyle": "--" if arrow.estimated else "-",
                "shrinkA": 0,
                "shrinkB": 4,
            },
            zorder=6,
        )
    axes.set_yticks([level[row] for row in rows])
    axes.set_yticklabels([_label(row) for row in rows])
    axes.set_ylim(-0.6, len(rows) - 0.4)
    span = max(ms(last), 1e-3)
    axes.set_xlim(-0.02 * span, span * 1.02)
    axes.set_xlabel("milliseconds since the job was submitted")
    axes.set_title(title, fontsize=11)
    axes.grid(axis="x", color="#dddddd", linewidth=0.6, zorder=1)
    axes.set_axisbelow(True)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    # The legend: a key per step colour, then one per other kind of mark drawn, each drawn as in the chart.
    handles: list[Any] = [Patch(facecolor=colour, label=step) for step, colour in colours.items()]
    for mark in _legend_marks(drawn):
        label = _MARKS[mark]
        if mark in ("queued", "attempt", "site-busy"):
            fill = {"queued": _QUEUED_FILL, "attempt": _ATTEMPT_FILL, "site-busy": _BUSY_FILL}[mark]
            handles.append(Patch(facecolor=fill, label=label))
        elif mark == "raised":
            handles.append(Patch(facecolor="#ffffff", edgecolor=_ALARM, linewidth=1.5, label=label))
        elif mark in ("site-done", "site-stopped"):
            colour = _INK if mark == "site-done" else _ALARM
            handles.append(
                Line2D([], [], color=colour, linestyle="none", marker="|", markersize=11, label=label)
            )
            handles[-1].set_markeredgewidth(1.5)
        elif mark in ("tokens", "tokens-estimated"):
            handles.append(Line2D([], [], color=_INK, linewidth=1.1, marker=">", markersize=5, label=label))
            handles[-1].set_linestyle("--" if mark == "tokens-estimated" else "-")
        else:  # the job's end or a retry: a dot on the job row
            colour = _END_COLOURS[mark]
            handles.append(
                Line2D([], [], color=colour, linestyle="none", marker="o", markersize=6, label=label)
            )
    axes.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=9,
        frameon=False,
    )
    figure.tight_layout()
    return figure


# -- text ---------------------------------------------------------------------------------


def to_text(events: Sequence[TimelineEvent]) -> str:
    """A plain-text summary: per site, each step's time and items, and the tokens each link carried."""
    if not events:
        return "(no events)"
    origin, _ = _bounds(events)
    lines = [default_title(events)]
    for label, start, end in _job_spans(events):
        lines.append(f"  {label}: {_format_ms(end - start)} from +{_format_ms(start - origin)}")
    for site in sites_of(events):
        steps = [event for event in events if event.site == site and event.kind is TimelineKind.STEP]
        sends = [event for event in events if event.site == site and event.kind is TimelineKind.SEND]
        if not steps and not sends:
            continue
        lines.append(f"  {site}:")
        for event in steps:
            lines.append(
                f"    {event.step:<20} +{_format_ms(event.time - origin):>10}"
                f"  took {_format_ms(event.duration):>10}"
                f"  {event.count} item(s)" + _step_note(event.ok, "  ")
            )
        totals: dict[str, list[int]] = {}
        for event in sends:
            total = totals.setdefault(event.target or "?", [0, 0])
            total[0] += event.count or 0
            total[1] += event.nbytes or 0
        for target, (count, size) in totals.items():
            lines.append(f"    -> {target:<17} {count} token(s), {_format_bytes(size)}")
    return "\n".join(lines)


# -- files --------------------------------------------------------------------------------

_FORMATS = (".json", ".html", ".png")


def export_timeline(events: Sequence[TimelineEvent], path: PathArg, *, title: str | None = None) -> Path:
    """Write ``events`` to ``path`` in the format its suffix names: ``.json``, ``.html`` or ``.png``.

    Raises:
        ValueError: another suffix.
        ImportError: a PNG without matplotlib installed.
    """
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix == ".json":
        target.write_text(json.dumps(to_chrome_trace(events), indent=1, default=str), encoding="utf-8")
    elif suffix in (".html", ".htm"):
        target.write_text(to_html(events, title=title), encoding="utf-8")
    elif suffix == ".png":
        to_png(events, target, title=title)
    else:
        raise ValueError(
            f"cannot export a timeline to {str(target)!r}: use a path ending in "
            f"{', '.join(_FORMATS)} (Chrome trace JSON, an HTML page, a PNG picture)"
        )
    return target
