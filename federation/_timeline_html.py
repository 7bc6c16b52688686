"""The timeline as a self-contained HTML page: a Gantt chart in inline SVG and CSS.

No scripts, no fonts, no external resources, so the page can be mailed or attached to a CI run.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from . import _timeline_layout as layout
from ._timeline_events import JOB_ROW, TimelineEvent, TimelineKind

__all__ = ["to_html"]

_LABEL_WIDTH = 150
_CHART_WIDTH = 900
_ROW_HEIGHT = 34
_TOP = 40
_BOTTOM = 70


def _svg_paint(mark: str, colour: str | None = None) -> str:
    """The paint attributes of a mark: the chart and its legend draw each mark with the same ones."""
    if mark == "raised":
        return f'fill="{colour or "#ffffff"}" stroke="{layout.ALARM}" stroke-width="2"'
    if mark in ("site-done", "site-stopped"):
        return f'stroke="{layout.INK if mark == "site-done" else layout.ALARM}" stroke-width="2"'
    if mark in ("tokens", "tokens-estimated"):
        dash = ' stroke-dasharray="4 3"' if mark == "tokens-estimated" else ""
        return f'stroke="{layout.INK}" stroke-width="1.4"{dash} marker-end="url(#arrowhead)"'
    fill = {
        "queued": layout.QUEUED_FILL,
        "attempt": layout.ATTEMPT_FILL,
        "site-busy": layout.BUSY_FILL,
        "fault": layout.FAULT_COLOUR,
        **layout.END_COLOURS,
    }
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
    elif mark == "fault":
        shape = f'<path d="M 11 1 L 17 7 L 11 13 L 5 7 z" {paint}/>'
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
    title = title or layout.default_title(events)
    origin, last = layout.bounds(events)
    span_ms = (last - origin) * 1000.0
    rows = [JOB_ROW, *layout.sites_of(events)]
    y = {row: _TOP + index * _ROW_HEIGHT for index, row in enumerate(rows)}
    height = _TOP + len(rows) * _ROW_HEIGHT + _BOTTOM
    width = _LABEL_WIDTH + _CHART_WIDTH + 30
    colours = layout.step_colours(events)

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
        label = layout.row_label(row)
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
    for label, start, end in layout.job_spans(events):
        mark = layout.job_span_mark(label)
        drawn.add(mark)
        parts.append(
            f'<rect class="job-span" x="{x(start)}" y="{y[JOB_ROW] + 9}" '
            f'width="{max(1.0, x(end) - x(start))}" height="{_ROW_HEIGHT - 18}" {_svg_paint(mark)}>'
            f"<title>{esc(label)}: {layout.format_ms(end - start)}</title></rect>"
        )
    # When each site was busy with the job, under its steps.
    for site, start, end in layout.site_spans(events):
        drawn.add("site-busy")
        parts.append(
            f'<rect class="site-span" x="{x(start)}" y="{y[site] + 12}" '
            f'width="{max(1.0, x(end) - x(start))}" height="{_ROW_HEIGHT - 24}" {_svg_paint("site-busy")}>'
            f"<title>{esc(site)} busy with the job: {layout.format_ms(end - start)}</title></rect>"
        )
    # Steps and site events.
    for event in events:
        if event.kind is TimelineKind.STEP and event.site is not None and event.end is not None:
            colour = colours.get(event.step or "", "#888888")
            top = y[event.site] + 6
            tip = (
                f"{event.step} at {event.site}: {layout.format_ms(event.duration)}, {event.count} item(s)"
                + (f", attempt {event.attempt}" if event.attempt and event.attempt > 1 else "")
                + layout.step_note(event.ok, ", ")
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
                f"at {layout.format_ms(event.time - origin)}</title></line>"
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
    # Faults a plan injected: a diamond above the row, its description in the tooltip.
    for event in events:
        if event.kind is TimelineKind.FAULT:
            drawn.add("fault")
            cx, cy = x(event.time), y[event.row] + 7
            diamond = f"M {cx} {cy - 6} L {cx + 6} {cy} L {cx} {cy + 6} L {cx - 6} {cy} z"
            parts.append(
                f'<path class="fault" data-fault="{esc(str(event.detail.get("fault", "")))}" '
                f'd="{diamond}" {_svg_paint("fault")}>'
                f"<title>{esc(layout.fault_label(event))}</title></path>"
            )
    # Token arrows, on top.
    for arrow in layout.arrows(events):
        x1, x2 = x(arrow.send), x(arrow.receive)
        y1 = y[arrow.source] + _ROW_HEIGHT / 2
        y2 = y[arrow.target] + (4 if y[arrow.target] > y1 else _ROW_HEIGHT - 4)
        mark = "tokens-estimated" if arrow.estimated else "tokens"
        drawn.add(mark)
        tip = (
            f"{arrow.source} → {arrow.target}: {arrow.tokens} token(s), {layout.format_bytes(arrow.nbytes)}"
            + (" (time estimated from totals)" if arrow.estimated else "")
        )
        parts.append(
            f'<line class="token" data-source="{esc(arrow.source)}" data-target="{esc(arrow.target)}" '
            f'x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" {_svg_paint(mark)}><title>{esc(tip)}</title></line>'
        )
    parts.append("</svg>")
    # The legend: a key per step colour, then one per other kind of mark drawn, with its picture.
    keys = [(f"step:{step}", _svg_icon("step", colour), step) for step, colour in colours.items()]
    keys += [(mark, _svg_icon(mark), layout.MARKS[mark]) for mark in layout.legend_marks(drawn)]
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
