"""Timelines: what every site of a job did, and when, as typed records and pictures.

The typed records are built only when someone asks, by
:meth:`Job.timeline() <federation.Job.timeline>` (see ``_timeline_events``), and
the exporters turn them into

* Chrome trace JSON (:func:`to_chrome_trace`, here): opens in Perfetto
  (https://ui.perfetto.dev) or ``chrome://tracing``; one row per site, a slice
  per step run, flow arrows for tokens;
* a self-contained HTML Gantt chart (:func:`to_html`, ``_timeline_html``): inline
  SVG and CSS, no scripts, no external resources, so it can be mailed or attached
  to a CI run;
* a PNG Gantt chart (:func:`to_png`, ``_timeline_png``), drawn with matplotlib
  (the ``viz`` extra);
* a plain-text summary (:func:`to_text`, here), for the CLI.

What they share (rows, spans, token arrows, colours, marks) is ``_timeline_layout``.
:func:`export_timeline` picks the format by a path's suffix. Every name the
timeline offers the rest of the package is importable from here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import _timeline_layout as layout
from ._timeline_events import JOB_ROW, TimelineEvent, TimelineKind, build_timeline, events_from_log
from ._timeline_html import to_html
from ._timeline_layout import PathArg, default_title
from ._timeline_png import to_png

__all__ = [
    "PathArg",
    "TimelineEvent",
    "TimelineKind",
    "build_timeline",
    "default_title",
    "events_from_log",
    "export_timeline",
    "to_chrome_trace",
    "to_html",
    "to_png",
    "to_text",
]


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
    origin, _ = layout.bounds(events)
    pid = events[0].job_id if events else 0
    rows = [JOB_ROW, *layout.sites_of(events)]
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
    for label, start, end in layout.job_spans(events):
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
        elif event.kind is TimelineKind.FAULT:
            trace.append(
                {
                    "ph": "i",
                    "s": "t",
                    "pid": pid,
                    "tid": tid[event.row],
                    "ts": us(event.time),
                    "name": f"fault: {event.detail.get('fault')}",
                    "cat": "fault",
                    "args": {
                        "target": event.target,
                        "step": event.step,
                        "tokens": event.count,
                        **event.detail,
                    },
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
    for flow_id, arrow in enumerate(layout.arrows(events), start=1):
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


# -- text ---------------------------------------------------------------------------------


def to_text(events: Sequence[TimelineEvent]) -> str:
    """A plain-text summary: per site, each step's time and items, and the tokens each link carried."""
    if not events:
        return "(no events)"
    origin, _ = layout.bounds(events)
    lines = [layout.default_title(events)]
    for label, start, end in layout.job_spans(events):
        lines.append(f"  {label}: {layout.format_ms(end - start)} from +{layout.format_ms(start - origin)}")
    for site in layout.sites_of(events):
        steps = [event for event in events if event.site == site and event.kind is TimelineKind.STEP]
        sends = [event for event in events if event.site == site and event.kind is TimelineKind.SEND]
        if not steps and not sends:
            continue
        lines.append(f"  {site}:")
        for event in steps:
            lines.append(
                f"    {event.step:<20} +{layout.format_ms(event.time - origin):>10}"
                f"  took {layout.format_ms(event.duration):>10}"
                f"  {event.count} item(s)" + layout.step_note(event.ok, "  ")
            )
        totals: dict[str, list[int]] = {}
        for event in sends:
            total = totals.setdefault(event.target or "?", [0, 0])
            total[0] += event.count or 0
            total[1] += event.nbytes or 0
        for target, (count, size) in totals.items():
            lines.append(f"    -> {target:<17} {count} token(s), {layout.format_bytes(size)}")
    faults = [event for event in events if event.kind is TimelineKind.FAULT]
    if faults:
        lines.append("  faults:")
        lines += [f"    +{layout.format_ms(e.time - origin):>10}  {layout.fault_label(e)}" for e in faults]
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
