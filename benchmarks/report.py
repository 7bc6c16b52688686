"""The report: what every engine measured, as ratios against federation, with the targets.

A ratio is always "how many times better federation is than that engine" in
the metric's own direction: ``baseline / federation`` for times and sizes,
``federation / baseline`` for rates. Above 1, federation is ahead; below 1, behind
(as it always is against the pipe floor and the copy ceiling, which do no work
beyond moving bytes).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .measure import ENGINES, METRICS, SCENARIOS, Check, Measured, Metric

__all__ = ["Report", "format_value"]

SCHEMA = "federation-bench/1"


def format_value(value: float, digits: int) -> str:
    """``value`` with ``digits`` decimals (thousands separated), or fewer decimals for big values."""
    if digits == 0 or abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        digits = min(digits, 1)
    return f"{value:,.{digits}f}"


def _format_ratio(ratio: float) -> str:
    if ratio >= 10:
        text = f"{ratio:,.0f}"
    elif ratio >= 1:
        text = f"{ratio:.1f}"
    elif ratio >= 0.1:
        text = f"{ratio:.2f}"
    else:
        text = f"{ratio:.1g}"
    return f"({text}x)"


@dataclass
class Report:
    """Measurements of one run, by scenario, metric and engine."""

    meta: dict[str, Any]
    scenarios: list[str]
    engines: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    values: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)
    errors: dict[str, dict[str, str]] = field(default_factory=dict)

    # -- collecting --------------------------------------------------------------------------

    def add(self, scenario: str, engine: str, measured: Measured) -> None:
        """Record what ``engine`` measured in ``scenario``."""
        known = {metric.key for metric in METRICS if metric.scenario == scenario}
        for key, value in measured.items():
            if key not in known:
                raise KeyError(f"{engine} reported unknown metric {key!r} for scenario {scenario!r}")
            if not math.isfinite(value):
                raise ValueError(f"{engine} reported {value!r} for {scenario}/{key}")
            self.values.setdefault((scenario, key), {})[engine] = float(value)

    def add_error(self, scenario: str, engine: str, error: str) -> None:
        """Record that ``engine`` failed in ``scenario``."""
        self.errors.setdefault(scenario, {})[engine] = error

    def add_notes(self, scenario: str, notes: Sequence[str]) -> None:
        """Add explanations shown under the table and kept in the JSON."""
        existing = self.notes.setdefault(scenario, [])
        existing.extend(note for note in notes if note not in existing)

    # -- deriving ----------------------------------------------------------------------------

    def metrics(self) -> list[Metric]:
        """The metrics of the chosen scenarios that some engine measured, in table order."""
        return [m for m in METRICS if m.scenario in self.scenarios and (m.scenario, m.key) in self.values]

    def ratio(self, metric: Metric, engine: str, base: str | None = None) -> float | None:
        """How many times better ``base`` is than ``engine`` on ``metric``; None if either is missing.

        Without ``base``, as the table shows it: the Ray actors' column is compared
        with federation on Ray (the same runtime, written by hand) when that ran,
        every other column with federation; federation on Ray itself has no ratio.
        """
        values = self.values.get((metric.scenario, metric.key), {})
        if base is None:
            if engine == "fed-ray":
                return None
            base = "fed-ray" if engine == "ray" and "fed-ray" in values else "federation"
        ours, theirs = values.get(base), values.get(engine)
        if ours is None or theirs is None or ours <= 0 or theirs <= 0:
            return None
        return theirs / ours if metric.better == "lower" else ours / theirs

    def _check(self, metric: Metric, check: Check) -> bool | None:
        value = self.values.get((metric.scenario, metric.key), {}).get(check.engine)
        if value is None:
            return None
        if check.limit is not None:
            return value <= check.limit if metric.better == "lower" else value >= check.limit
        if check.faster_than is not None:
            ratio = self.ratio(metric, check.faster_than, base=check.engine)
            return None if ratio is None else ratio >= check.factor
        return None

    def target_status(self, metric: Metric) -> tuple[str, bool | None]:
        """``("met" | "not met" | "met, Ray not run" | "n/a" | "", met)`` for ``metric``'s target."""
        if not metric.checks:
            return "", None
        results = [self._check(metric, check) for check in metric.checks]
        if any(result is False for result in results):
            return "not met", False
        if all(result is None for result in results):
            return "n/a", None
        if any(result is None for result in results):
            values = self.values.get((metric.scenario, metric.key), {})
            missing = {
                ENGINES.get(engine, engine): None
                for check, result in zip(metric.checks, results, strict=True)
                if result is None
                for engine in (check.engine, check.faster_than)
                if engine is not None and engine not in values
            }
            return "met, " + (", ".join(missing) or "a check") + " not run", True
        return "met", True

    def columns(self) -> list[str]:
        """The engines with at least one value, in column order."""
        seen = {engine for values in self.values.values() for engine in values}
        return [
            engine for engine in ENGINES if engine in seen or (engine in self.engines and engine != "copy")
        ]

    # -- output ------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The whole report as JSON-ready data."""
        scenarios: dict[str, Any] = {}
        for scenario in self.scenarios:
            metrics: dict[str, Any] = {}
            for metric in self.metrics():
                if metric.scenario != scenario:
                    continue
                values = self.values[(scenario, metric.key)]
                ratios = {engine: self.ratio(metric, engine) for engine in values if engine != "federation"}
                text, met = self.target_status(metric)
                metrics[metric.key] = {
                    "label": metric.label,
                    "unit": metric.unit,
                    "better": metric.better,
                    "values": dict(values),
                    "ratios": {engine: ratio for engine, ratio in ratios.items() if ratio is not None},
                    "target": {"text": metric.target, "status": text, "met": met} if metric.target else None,
                }
            scenarios[scenario] = {
                "title": SCENARIOS[scenario],
                "metrics": metrics,
                "notes": list(self.notes.get(scenario, [])),
                "errors": dict(self.errors.get(scenario, {})),
            }
        return {
            "schema": SCHEMA,
            "meta": self.meta,
            "engines": {
                engine: {
                    "label": ENGINES[engine],
                    "ran": engine in self.engines,
                    "skipped": self.skipped.get(engine),
                }
                for engine in ENGINES
                if engine in self.engines or engine in self.skipped
            },
            "scenarios": scenarios,
        }

    def write_json(self, path: Path) -> None:
        """Write :meth:`to_json` to ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n", encoding="utf-8")

    def rows(self) -> tuple[list[str], list[tuple[str, list[str]]]]:
        """The table as text: its header, and ``(scenario, cells)`` per row."""
        columns = self.columns()
        header = ["scenario", "metric", "unit", *(ENGINES[c] for c in columns), "target", "met"]
        rows = []
        for metric in self.metrics():
            values = self.values[(metric.scenario, metric.key)]
            cells = [SCENARIOS[metric.scenario], metric.label, metric.unit]
            for engine in columns:
                value = values.get(engine)
                if value is None:
                    error = self.errors.get(metric.scenario, {}).get(engine)
                    cells.append("error" if error else "")
                    continue
                text = format_value(value, metric.digits)
                ratio = self.ratio(metric, engine) if engine != "federation" else None
                cells.append(text if ratio is None else f"{text} {_format_ratio(ratio)}")
            status, _ = self.target_status(metric)
            cells += [metric.target or "", status]
            rows.append((metric.scenario, cells))
        return header, rows

    def legend(self) -> list[str]:
        """Lines printed under the table: how to read it, notes, skips and errors."""
        lines = [
            "(Nx) after a baseline's value: how many times better federation is than it "
            "(>1: federation ahead, <1: behind; the floor and the ceiling only move bytes).",
        ]
        for engine, reason in self.skipped.items():
            lines.append(f"{ENGINES[engine]} skipped: {reason}")
        for scenario in self.scenarios:
            for note in self.notes.get(scenario, []):
                lines.append(f"[{scenario}] {note}")
            for engine, error in self.errors.get(scenario, {}).items():
                lines.append(f"[{scenario}] {ENGINES[engine]} FAILED: {error}")
        return lines

    def render(self) -> None:
        """Print the table (with rich when it is installed) and the legend."""
        header, rows = self.rows()
        title = f"federation benchmarks ({'quick' if self.meta.get('quick') else 'full'} run)"
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            _render_plain(title, header, rows, self.legend())
            return
        console = Console(width=None if _is_terminal() else 200)
        table = Table(title=title, header_style="bold", show_lines=False)
        numeric = {ENGINES[engine] for engine in ENGINES}
        for name in header:
            table.add_column(name, justify="right" if name in numeric else "left", no_wrap=name != "target")
        last = None
        for scenario, cells in rows:
            if last is not None and scenario != last:
                table.add_section()
            status = cells[-1]
            style = "green" if status.startswith("met") else "red" if status == "not met" else ""
            shown = [
                cells[0] if scenario != last else "",
                *cells[1:-1],
                f"[{style}]{status}[/]" if style else status,
            ]
            table.add_row(*shown)
            last = scenario
        console.print(table)
        for line in self.legend():
            console.print(line, highlight=False, markup=False)


def _is_terminal() -> bool:
    import sys

    return sys.stdout.isatty()


def _render_plain(
    title: str, header: list[str], rows: list[tuple[str, list[str]]], legend: list[str]
) -> None:
    table = [header, *(cells for _, cells in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print(title)
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    for line in legend:
        print(line)
