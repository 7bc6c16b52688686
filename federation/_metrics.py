"""Metrics steps record (``ctx.metric(name, value)``), kept by job, site and step.

A worker keeps a job's metrics with the run and sends them with its DONE; the
client adds them to the job (``job.metrics``) and to the federation's history
(``federation.metrics()``), which exports to CSV or JSON and plots by round.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

__all__ = ["MetricRecord", "Metrics"]

_FIELDS = ("job_id", "pipeline", "site", "step", "name", "value", "time")


class MetricRecord(NamedTuple):
    """One value a step recorded."""

    job_id: int
    pipeline: str
    site: str
    step: str
    name: str
    value: float
    time: float


class Metrics:
    """A table of metric records: filter it, export it, plot it."""

    def __init__(self, records: Iterable[MetricRecord] = ()) -> None:
        self.records = list(records)

    def __iter__(self) -> Iterator[MetricRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"<Metrics {len(self.records)} records>"

    def where(
        self,
        *,
        name: str | None = None,
        site: str | None = None,
        step: str | None = None,
        job_id: int | None = None,
    ) -> Metrics:
        """The records that match every filter given."""
        return Metrics(
            r
            for r in self.records
            if (name is None or r.name == name)
            and (site is None or r.site == site)
            and (step is None or r.step == step)
            and (job_id is None or r.job_id == job_id)
        )

    def by_job(self, name: str, reduce: str = "mean") -> dict[int, float]:
        """``{job_id: value}`` of metric ``name`` over its sites: ``mean``, ``sum``, ``min``, ``max``."""
        groups: dict[int, list[float]] = {}
        for r in self.records:
            if r.name == name:
                groups.setdefault(r.job_id, []).append(r.value)
        ops: dict[str, Any] = {"mean": lambda v: sum(v) / len(v), "sum": sum, "min": min, "max": max}
        if reduce not in ops:
            raise ValueError(f"reduce must be one of {sorted(ops)}, not {reduce!r}")
        return {job: float(ops[reduce](values)) for job, values in sorted(groups.items())}

    def to_dicts(self) -> list[dict[str, Any]]:
        """The records as a list of dicts (one per record)."""
        return [r._asdict() for r in self.records]

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write the records as CSV with a header row."""
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(_FIELDS)
            writer.writerows(self.records)

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Write the records as a JSON list of objects."""
        with open(path, "w") as f:
            json.dump(self.to_dicts(), f, indent=1)

    def plot(self, path: str | os.PathLike[str], name: str, reduce: str = "mean") -> None:
        """Plot metric ``name`` per job (e.g. per round) to a PNG (needs matplotlib: the viz extra)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        values = self.by_job(name, reduce)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(range(1, len(values) + 1), list(values.values()), marker=".")
        ax.set_xlabel("job (round)")
        ax.set_ylabel(f"{name} ({reduce} over sites)")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
