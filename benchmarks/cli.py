"""``python -m benchmarks``: run the scenarios on federation and the baselines, print, save.

Order of the run: each scenario runs on federation, then on the pipe floor, the
process pool and the copy ceiling, one after the other, so they see the same
machine within seconds of each other. Ray runs last, every scenario in one Ray
session: it is started once (it takes seconds), and its daemons keep using CPU
while it is up, which must not slow the others down.

Latency and throughput, whose figures are held to ratios between engines, run
three times, the engines alternated, and each figure is the median of the
three: on a shared machine a burst of load would otherwise fall on one
engine's only run and move the ratio by a tenth or more.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from .measure import BASELINES, ENGINES, SCENARIOS, Measured, Settings, median
from .report import Report

__all__ = ["main", "parse_args", "run"]

#: The order scenarios run in: footprint before close, so Ray measures the idle
#: actors of its pool-start scenario before close kills them.
RUN_ORDER = (
    "latency",
    "throughput",
    "tokens",
    "payloads",
    "pool-start",
    "cold-start",
    "failure",
    "footprint",
    "close",
    "scaling",
    "fedavg",
)


#: Scenarios run this many times with the engines alternated (``--quick``: once); each
#: figure is the median of the runs.
ALTERNATED = {"latency": 3, "throughput": 3}


class Engine(Protocol):
    """What the runner needs of federation and of each baseline."""

    name: str
    notes: dict[str, list[str]]

    def start(self) -> None: ...

    def stop(self) -> dict[str, Measured]: ...


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark federation beside a raw Pipe floor, ProcessPoolExecutor and Ray.",
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and sizes: about a minute")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--scenario",
        action="append",
        choices=list(SCENARIOS),
        metavar="NAME",
        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--baseline",
        action="append",
        choices=list(BASELINES),
        metavar="NAME",
        help=f"run only this baseline (repeatable): {', '.join(BASELINES)}",
    )
    parser.add_argument(
        "--no-ray", action="store_true", help="skip the Ray baseline even if ray is installed"
    )
    return parser.parse_args(argv)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _meta(settings: Settings, scenarios: list[str], engines: list[str]) -> dict[str, Any]:
    import federation

    meta: dict[str, Any] = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": settings.quick,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "federation": federation.__version__,
        "scenarios": scenarios,
        "engines": engines,
    }
    if "ray" in engines:
        import ray

        meta["ray"] = ray.__version__
    return meta


def _measure_all(report: Report, engines: list[Any], scenario: str, quick: bool) -> None:
    """Run ``scenario`` on each engine in turn; alternated and repeated if it is in ALTERNATED."""
    rounds = 1 if quick else ALTERNATED.get(scenario, 1)
    runs: dict[str, list[Measured]] = {engine.name: [] for engine in engines}
    failed: set[str] = set()
    for round_ in range(rounds):
        for engine in engines:
            if engine.name in failed:
                continue
            label = f" {round_ + 1}/{rounds}" if rounds > 1 else ""
            measured = _measure_once(report, engine, scenario, label)
            if measured is None:
                failed.add(engine.name)
            else:
                runs[engine.name].append(measured)
    for engine in engines:
        done = runs[engine.name]
        if done and engine.name not in failed:
            keys = [key for key in done[0] if all(key in measured for measured in done)]
            report.add(scenario, engine.name, {key: median(m[key] for m in done) for key in keys})


def _measure_once(report: Report, engine: Any, scenario: str, round_: str) -> Measured | None:
    """One run of ``scenario`` on ``engine``; None if it has none or it failed (reported)."""
    method = getattr(engine, scenario.replace("-", "_"), None)
    if method is None:
        return None
    gc.collect()
    _say(f"  {scenario:<11} {ENGINES[engine.name]:<13} ...{round_}")
    started = time.perf_counter()
    try:
        measured: Measured = method()
    except Exception as exc:  # one engine failing must not lose the others' numbers
        report.add_error(scenario, engine.name, f"{type(exc).__name__}: {exc}")
        _say(f"  {scenario:<11} {ENGINES[engine.name]:<13} FAILED: {type(exc).__name__}: {exc}")
        return None
    _say(f"  {scenario:<11} {ENGINES[engine.name]:<13} {time.perf_counter() - started:6.1f} s{round_}")
    return measured


def run(args: argparse.Namespace) -> Report:
    """Run what ``args`` chose; the report of it."""
    from .baselines import CopyCeiling, PipeFloor, ProcessPoolBaseline, RayBaseline, ray_available
    from .scenarios import FederationEngine, FederationRayEngine

    settings = Settings.for_run(args.quick)
    scenarios = [name for name in SCENARIOS if not args.scenario or name in args.scenario]
    baselines = [name for name in BASELINES if not args.baseline or name in args.baseline]
    skipped: dict[str, str] = {}
    if "ray" in baselines:
        reason = "--no-ray was given" if args.no_ray else ray_available()
        if reason is not None:
            baselines.remove("ray")
            skipped["ray"] = reason
            _say(f"Skipping the Ray baseline: {reason}")
    engines: list[Any] = [FederationEngine(settings)]
    if "pipe" in baselines:
        engines.append(PipeFloor(settings))
    if "process-pool" in baselines:
        engines.append(ProcessPoolBaseline(settings))
    if "payloads" in scenarios:
        engines.append(CopyCeiling(settings))
    ray_engine = RayBaseline(settings) if "ray" in baselines else None
    fed_ray = FederationRayEngine(settings) if ray_engine is not None else None
    names = [engine.name for engine in engines] + (["fed-ray", "ray"] if ray_engine else [])
    report = Report(_meta(settings, scenarios, names), scenarios, names, skipped)
    started = time.perf_counter()
    order = [name for name in RUN_ORDER if name in scenarios]
    for engine in engines:
        engine.start()
    for scenario in order:
        _measure_all(report, engines, scenario, settings.quick)
    for engine in engines:
        for scenario, measured in engine.stop().items():
            report.add(scenario, engine.name, measured)
    if ray_engine is not None and fed_ray is not None:
        _run_ray(report, ray_engine, fed_ray, order, settings.quick)
    for engine in [*engines, *([ray_engine, fed_ray] if ray_engine else [])]:
        for scenario, notes in engine.notes.items():
            if scenario in scenarios:
                report.add_notes(scenario, notes)
    report.meta["seconds"] = round(time.perf_counter() - started, 1)
    return report


def _run_ray(report: Report, engine: Any, fed_ray: Any, order: list[str], quick: bool) -> None:
    # Ray's driver prints its daemons' warnings (worker deaths we cause, actor start-up
    # bursts) on stdout; send them to stderr with the progress lines, away from the table.
    with contextlib.redirect_stdout(sys.stderr):
        _run_ray_phase(report, engine, fed_ray, order, quick)


def _run_ray_phase(report: Report, engine: Any, fed_ray: Any, order: list[str], quick: bool) -> None:
    _say("  starting Ray ...")
    try:
        engine.start()
    except Exception as exc:
        for scenario in order:
            report.add_error(scenario, "ray", f"ray.init failed: {type(exc).__name__}: {exc}")
        return
    try:
        fed_ray.start()
        for scenario in order:
            # federation on Ray first: the hand-written actors' close scenario kills the
            # pool-start actors that their footprint scenario measures, in this order.
            _measure_all(report, [fed_ray, engine], scenario, quick)
    finally:
        for scenario, measured in engine.stop().items():
            if scenario in order:
                report.add(scenario, "ray", measured)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite; print the table; write JSON if asked. 1 if any measurement failed."""
    args = parse_args(argv)
    _say(f"federation benchmarks ({'quick' if args.quick else 'full'} run)")
    report = run(args)
    report.render()
    if args.json is not None:
        report.write_json(args.json)
        _say(f"JSON written to {args.json}")
    _say(f"done in {report.meta['seconds']} s")
    return 1 if report.errors else 0
