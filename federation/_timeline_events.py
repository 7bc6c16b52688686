"""Timeline records: what every site of a job did, and when, as typed events.

A :class:`~federation.Job` keeps a light log of plain tuples while it runs
(``(time, kind, fields)``, appended by the router thread; see ``_handle``).
Nothing here runs on the hot path: :func:`build_timeline` turns a snapshot of
that log into :class:`TimelineEvent` records only when someone asks, and the
exporters (``_timeline`` and the modules it imports) draw them.

What a worker reports, per site, when it is done with a job: each step run
(start, end, items produced), the tokens it sent to each other site (count and
bytes, out-of-band buffers included), and, when the worker records them, each batch of tokens with its
send time (``sends``). Without per-batch records a site's traffic to a target is
one :attr:`TimelineKind.SEND` record placed at the end of the site's last step
and marked ``estimated``: the totals are exact, the moment is not.

Times are seconds since the epoch (``time.time()``) in every record; worker and
client clocks are the same clock on one machine.

This module takes plain data, never a :class:`~federation.Job`: the job handle
imports it, not the other way round.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["JOB_ROW", "TimelineEvent", "TimelineKind", "build_timeline", "events_from_log"]

#: The key of the row that holds job-level events (queued, attempts, the end); drawn as "job".
#: Parentheses are not allowed in site names, so no site can take this row.
JOB_ROW = "(job)"


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
    #: A fault plan injected a fault (``detail``: the fault's kind, its index in the plan, the
    #: seed, the job number, and what it did); at :attr:`TimelineEvent.site`, and for a link
    #: fault toward :attr:`TimelineEvent.target`.
    FAULT = "fault"

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
    TimelineKind.FAULT: 7,
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


def build_timeline(
    job_id: int, log: Iterable[tuple[float, str, dict[str, Any]]], error: BaseException | None = None
) -> list[TimelineEvent]:
    """The typed timeline of a job from its raw event log, ordered by time.

    ``log`` is the job's ``(time, kind, fields)`` tuples (a snapshot, if the job still
    runs); ``error`` the error it ended with, if any: a step's error names the step
    that raised.
    """
    site, step = getattr(error, "site", None), getattr(error, "step", None)
    failed_at = (site, step) if isinstance(site, str) and isinstance(step, str) else None
    return events_from_log(job_id, log, failed_at=failed_at)


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
        elif kind == "fault":
            source = fields.get("source")
            events.append(
                TimelineEvent(
                    kind=TimelineKind.FAULT,
                    time=when,
                    job_id=job_id,
                    attempt=attempt,
                    site=_row_site(source if source is not None else fields.get("site")),
                    step=fields.get("step"),
                    target=fields.get("target"),
                    count=fields.get("tokens"),
                    detail=_rest(fields, "site", "step", "target", "tokens"),
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


def _row_site(name: Any) -> str | None:
    """The row a fault is drawn on: its site; the job row for the client's end of a link."""
    return None if name is None or name == "(client)" else str(name)


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
