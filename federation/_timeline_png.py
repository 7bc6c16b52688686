"""The timeline as a PNG Gantt chart, drawn with matplotlib (the ``viz`` extra).

matplotlib is imported when a picture is drawn, never at import.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import _timeline_layout as layout
from ._timeline_events import JOB_ROW, TimelineEvent, TimelineKind
from ._timeline_layout import PathArg

__all__ = ["to_png"]

# The ``viz`` extra. The distribution is not on PyPI (and the unrelated PyPI project named
# ``federation`` is another package): install matplotlib itself, or the extra from a checkout.
_VIZ_HINT = "pip install matplotlib (or, in a checkout of federation, pip install '.[viz]')"

#: Above this many token transfers, pictures draw them as thin lines without heads.
_MAX_DRAWN_ARROWS = 300


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

    title = title or layout.default_title(events)
    origin, last = layout.bounds(events)
    rows = [JOB_ROW, *layout.sites_of(events)]
    # Row 0 at the top: y grows downwards in the picture, as in the HTML chart.
    level = {row: len(rows) - 1 - index for index, row in enumerate(rows)}
    colours = layout.step_colours(events)

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
    for label, start, end in layout.job_spans(events):
        mark = layout.job_span_mark(label)
        drawn.add(mark)
        axes.broken_barh(
            [(ms(start), max(ms(end) - ms(start), 1e-6))],
            (level[JOB_ROW] - 0.25, 0.5),
            facecolors=layout.QUEUED_FILL if mark == "queued" else layout.ATTEMPT_FILL,
            zorder=2,
        )
    # A bar stays visible however short its step: at least 0.4 % of the picture's width.
    least = max(ms(last), 1e-3) * 0.004
    for site, start, end in layout.site_spans(events):
        drawn.add("site-busy")
        axes.broken_barh(
            [(ms(start), max(ms(end) - ms(start), least))],
            (level[site] - 0.12, 0.24),
            facecolors=layout.BUSY_FILL,
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
            edgecolors=layout.ALARM if failed else "none",
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
                colors=layout.INK if event.ok else layout.ALARM,
                linewidth=1.5,
                zorder=4,
            )
        elif event.site is None and (event.kind.ends_job or event.kind is TimelineKind.RETRY):
            drawn.add(event.kind.value)
            colour = layout.END_COLOURS[event.kind.value]
            axes.plot([ms(event.time)], [level[JOB_ROW]], marker="o", color=colour, markersize=6, zorder=5)
    faults = [event for event in events if event.kind is TimelineKind.FAULT]
    if faults:
        drawn.add("fault")
        axes.scatter(
            [ms(event.time) for event in faults],
            [level[event.row] + 0.3 for event in faults],
            marker="X",
            s=60,
            color=layout.FAULT_COLOUR,
            edgecolors="white",
            linewidths=0.6,
            zorder=7,
        )
    arrows = layout.arrows(events)
    drawn.update("tokens-estimated" if arrow.estimated else "tokens" for arrow in arrows)
    if len(arrows) > _MAX_DRAWN_ARROWS:
        # Thousands of arrowheads would hide the bars and take seconds to draw: plain lines.
        from matplotlib.collections import LineCollection

        segments = [
            [(ms(arrow.send), level[arrow.source]), (ms(arrow.receive), level[arrow.target])]
            for arrow in arrows
        ]
        axes.add_collection(LineCollection(segments, colors=layout.INK, linewidths=0.5, alpha=0.4, zorder=6))
        arrows = []
    for arrow in arrows:
        axes.annotate(
            "",
            xy=(ms(arrow.receive), level[arrow.target]),
            xytext=(ms(arrow.send), level[arrow.source]),
            arrowprops={
                "arrowstyle": "-|>",
                "color": layout.INK,
                "linewidth": 1.1,
                "linestyle": "--" if arrow.estimated else "-",
                "shrinkA": 0,
                "shrinkB": 4,
            },
            zorder=6,
        )
    axes.set_yticks([level[row] for row in rows])
    axes.set_yticklabels([layout.row_label(row) for row in rows])
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
    for mark in layout.legend_marks(drawn):
        label = layout.MARKS[mark]
        if mark in ("queued", "attempt", "site-busy"):
            fill = {
                "queued": layout.QUEUED_FILL,
                "attempt": layout.ATTEMPT_FILL,
                "site-busy": layout.BUSY_FILL,
            }[mark]
            handles.append(Patch(facecolor=fill, label=label))
        elif mark == "raised":
            handles.append(Patch(facecolor="#ffffff", edgecolor=layout.ALARM, linewidth=1.5, label=label))
        elif mark in ("site-done", "site-stopped"):
            colour = layout.INK if mark == "site-done" else layout.ALARM
            handles.append(
                Line2D([], [], color=colour, linestyle="none", marker="|", markersize=11, label=label)
            )
            handles[-1].set_markeredgewidth(1.5)
        elif mark == "fault":
            handles.append(
                Line2D(
                    [], [], color=layout.FAULT_COLOUR, linestyle="none", marker="X", markersize=8, label=label
                )
            )
        elif mark in ("tokens", "tokens-estimated"):
            handles.append(
                Line2D([], [], color=layout.INK, linewidth=1.1, marker=">", markersize=5, label=label)
            )
            handles[-1].set_linestyle("--" if mark == "tokens-estimated" else "-")
        else:  # the job's end or a retry: a dot on the job row
            colour = layout.END_COLOURS[mark]
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
