"""Pipelines the CLI tests run with ``federation run cli_pipelines:NAME``.

Imported by the ``federation`` command in a subprocess (and by its workers),
so it imports only ``federation`` and the standard library.
"""

from __future__ import annotations

import time
from typing import Any

import federation as fed

VALUES = {"a": [0.2, 0.6, 0.9], "b": [0.7, 0.1, 0.8, 0.95]}

mean = fed.Pipeline("cli-mean")


@mean.step(sites=["a", "b"])
def local_stats(ctx: Any, threshold: float) -> dict[str, float]:
    kept = [value for value in VALUES[ctx.site] if value > threshold]
    return {"n": len(kept), "sum": sum(kept)}


@mean.step(site="hub")
def average(local_stats: dict[str, dict[str, float]]) -> dict[str, Any]:
    n = sum(stats["n"] for stats in local_stats.values())
    return {"mean": sum(stats["sum"] for stats in local_stats.values()) / n, "n": n}


mean.output(average)


echo = fed.Pipeline("cli-echo")


@echo.step(site="a")
def show(value: Any) -> dict[str, Any]:
    return {"type": type(value).__name__, "value": value}


echo.output(show)


fails = fed.Pipeline("cli-fails")


@fails.step(site="a")
def explode(reason: str) -> None:
    raise ValueError(reason)


fails.output(explode)


slow = fed.Pipeline("cli-slow")


@slow.step(site="a")
def wait(ctx: Any, seconds: float) -> float:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not ctx.cancelled:
        time.sleep(0.005)  # the workload: busy, stopping early on cancel
    return seconds


slow.output(wait)

not_a_pipeline = 42
