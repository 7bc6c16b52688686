"""What the suite measures: settings, the metric registry with its targets, and helpers.

Every number the suite reports is a :class:`Metric` registered here, with its
unit, which direction is better, and the target from the performance issue, if
it has one. Engines (federation and the baselines) return plain
``{metric key: value}`` dicts per scenario; the report looks the keys up here.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import psutil

__all__ = [
    "BASELINES",
    "ENGINES",
    "METRICS",
    "SCENARIOS",
    "Check",
    "Measured",
    "Metric",
    "Settings",
    "cpu_percent",
    "median",
    "memory_per_process",
    "percentile",
    "wait_ready",
]

#: ``{metric key: value}``, as an engine reports one scenario.
Measured = dict[str, float]

#: The scenarios, in the order of the issue (and of the table).
SCENARIOS: dict[str, str] = {
    "latency": "1. job latency, warm pool",
    "throughput": "2. job throughput, pool of 4",
    "tokens": "3. token throughput, site A -> B",
    "payloads": "4. large payloads, site A -> B",
    "pool-start": "5. pool start, 4 slots x 3 sites",
    "failure": "6. failure detection",
    "close": "7. close an idle pool of 12",
    "footprint": "8. footprint, idle pool of 12",
    "cold-start": "9. cold start, fresh python script.py",
    "scaling": "10. scaling with the number of sites",
    "fedavg": "11. FedAvg round, numpy weights, no compute",
}

#: Engine name -> column heading. ``federation`` is measured; the others are baselines.
ENGINES: dict[str, str] = {
    "federation": "federation",
    "pipe": "Pipe floor",
    "process-pool": "ProcessPool",
    "fed-ray": "federation on Ray",
    "ray": "Ray actors",
    "copy": "copy ceiling",
}

#: The baselines ``--baseline`` chooses from (the in-process copy ceiling always runs).
BASELINES = ("pipe", "process-pool", "ray")

MIB = 1 << 20


@dataclass(frozen=True)
class Settings:
    """How much work each scenario does; ``quick`` keeps the whole run near a minute."""

    quick: bool = False
    latency_jobs: int = 2000
    latency_warmup: int = 100
    throughput_jobs: int = 5000
    stream_items: int = 1_000_000
    stream_repeats: int = 3
    payload_sizes: tuple[int, ...] = (1 * MIB, 64 * MIB, 256 * MIB)
    payload_repeats: dict[int, int] = field(default_factory=lambda: {1 * MIB: 10, 64 * MIB: 3, 256 * MIB: 3})
    start_repeats: int = 3
    cold_repeats: int = 7
    failure_repeats: int = 10
    close_repeats: int = 3
    idle_window: float = 10.0
    scaling_jobs: int = 200
    fedavg_rounds: int = 200
    slots: int = 4
    sites: int = 3
    timeout: float = 120.0

    @classmethod
    def for_run(cls, quick: bool) -> Settings:
        """The full settings, or the ``--quick`` ones."""
        if not quick:
            return cls()
        return cls(
            quick=True,
            latency_jobs=500,
            latency_warmup=50,
            throughput_jobs=2000,
            stream_items=200_000,
            stream_repeats=1,
            payload_sizes=(1 * MIB, 64 * MIB),
            payload_repeats={1 * MIB: 5, 64 * MIB: 2},
            start_repeats=1,
            cold_repeats=3,
            failure_repeats=3,
            close_repeats=1,
            idle_window=2.0,
            scaling_jobs=50,
            fedavg_rounds=60,
        )


@dataclass(frozen=True)
class Check:
    """One condition of a target.

    Either ``limit`` (``engine``'s value is at most / at least it, by the metric's
    direction) or ``faster_than`` with ``factor`` (``engine`` is that many times
    better than that one; a factor below 1 allows that much worse, as "within
    1.3x" is ``factor=1 / 1.3``). ``engine`` is federation on the process backend
    unless a check says otherwise ("fed-ray" for the targets on Ray).
    """

    limit: float | None = None
    faster_than: str | None = None
    factor: float = 1.0
    engine: str = "federation"


@dataclass(frozen=True)
class Metric:
    """One row of the table."""

    scenario: str
    key: str
    label: str
    unit: str
    better: Literal["lower", "higher"]
    target: str | None = None
    checks: tuple[Check, ...] = ()
    digits: int = 2


def _payload_metrics() -> list[Metric]:
    metrics = []
    for kind in ("numpy", "bytes"):
        for size in (1, 64, 256):
            target = checks = None
            if kind == "numpy" and size == 256:
                target, checks = ">= 3 GB/s", (Check(limit=3.0),)
            metrics.append(
                Metric(
                    "payloads",
                    f"{kind}_{size}mib_gbps",
                    f"{kind} {size} MiB",
                    "GB/s",
                    "higher",
                    target,
                    checks or (),
                )
            )
    return metrics


#: The numbers of sites the scaling scenario measures (one of them the hub).
SCALING_SIZES = (2, 8, 32, 64, 100)


def _fedavg_metrics() -> list[Metric]:
    targets = {10: 1.0, 50: 5.0}
    metrics = []
    for n in (3, 10, 50):
        target = targets.get(n)
        metrics += [
            Metric("fedavg", f"round_ms_{n}", f"round, {n} sites", "ms", "lower", digits=3),
            Metric("fedavg", f"floor_ms_{n}", "  in-process loop (floor)", "ms", "lower", digits=3),
            Metric(
                "fedavg",
                f"overhead_ms_{n}",
                "  overhead above the floor",
                "ms",
                "lower",
                f"<= {target:g} ms" if target else None,
                (Check(limit=target),) if target else (),
                digits=3,
            ),
        ]
    return metrics


#: Issue 10's target for federation on Ray: within 1.3x of the same pipeline as hand-written Ray actors.
_WITHIN_RAY = Check(engine="fed-ray", faster_than="ray", factor=1 / 1.3)


def _scaling_metrics() -> list[Metric]:
    targets = {
        ("fan_in_p50_ms", 64): ("<= 4 ms", 4.0),
        ("ready_forkserver_s", 100): ("<= 2 s", 2.0),
        ("ready_spawn_s", 100): ("<= 5 s", 5.0),
    }
    rows = (
        ("fan_in_p50_ms", "fan-in job p50, {n} sites", "ms", 3),
        ("thread_p50_ms", "  the same, thread backend", "ms", 3),
        ("ready_forkserver_s", "  2 slots ready, forkserver", "s", 2),
        ("ready_spawn_s", "  2 slots ready, spawn", "s", 2),
        ("rss_mib", "  RSS per idle worker", "MiB", 1),
        ("uss_mib", "  USS per idle worker", "MiB", 1),
    )
    metrics = []
    for n in SCALING_SIZES:
        for key, label, unit, digits in rows:
            target = targets.get((key, n))
            metrics.append(
                Metric(
                    "scaling",
                    f"{key}_{n}",
                    label.format(n=n),
                    unit,
                    "lower",
                    target[0] if target else None,
                    (Check(limit=target[1]),) if target else (),
                    digits=digits,
                )
            )
    return metrics


METRICS: tuple[Metric, ...] = (
    Metric(
        "latency",
        "one_site_p50_ms",
        "1-site p50",
        "ms",
        "lower",
        "on Ray: <= 1.3x Ray actors",
        (_WITHIN_RAY,),
        digits=3,
    ),
    Metric(
        "latency",
        "two_site_p50_ms",
        "2-site p50",
        "ms",
        "lower",
        "<= 0.5 ms, >= 5x Ray, <= 3x Pipe floor; on Ray: <= 1.3x Ray actors",
        (
            Check(limit=0.5),
            Check(faster_than="ray", factor=5.0),
            Check(faster_than="pipe", factor=1 / 3),
            _WITHIN_RAY,
        ),
        digits=3,
    ),
    Metric("latency", "two_site_p95_ms", "2-site p95", "ms", "lower", digits=3),
    Metric("latency", "two_site_p99_ms", "2-site p99", "ms", "lower", digits=3),
    Metric("latency", "fan_out_p50_ms", "3-site fan-out p50", "ms", "lower", digits=3),
    Metric("latency", "fan_out_p95_ms", "3-site fan-out p95", "ms", "lower", digits=3),
    Metric("latency", "fan_out_p99_ms", "3-site fan-out p99", "ms", "lower", digits=3),
    Metric(
        "throughput",
        "one_site_jobs_per_s",
        "1-site jobs/s",
        "jobs/s",
        "higher",
        "on Ray: >= 1/1.3 of Ray actors",
        (_WITHIN_RAY,),
        digits=0,
    ),
    Metric(
        "throughput",
        "two_site_jobs_per_s",
        "2-site jobs/s",
        "jobs/s",
        "higher",
        ">= 3,000; on Ray: >= 1/1.3 of Ray actors",
        (Check(limit=3000.0), _WITHIN_RAY),
        digits=0,
    ),
    Metric(
        "throughput",
        "one_site_jobs_per_s_pipelined",
        "1-site, all sent at once",
        "jobs/s",
        "higher",
        digits=0,
    ),
    Metric(
        "throughput",
        "two_site_jobs_per_s_pipelined",
        "2-site, all sent at once",
        "jobs/s",
        "higher",
        digits=0,
    ),
    Metric(
        "tokens",
        "collected_items_per_s",
        "items/s, collected",
        "items/s",
        "higher",
        ">= 1,000,000",
        (Check(limit=1_000_000.0),),
        digits=0,
    ),
    Metric("tokens", "per_item_items_per_s", "items/s, per item", "items/s", "higher", digits=0),
    *_payload_metrics(),
    Metric("pool-start", "first_job_s", "first job done", "s", "lower", digits=3),
    Metric(
        "pool-start",
        "starting_at_first_job",
        "slots still starting then",
        "slots",
        "higher",
        ">= 1 (before all up)",
        (Check(limit=1.0),),
        digits=1,
    ),
    Metric(
        "pool-start",
        "all_ready_s",
        "all 12 ready",
        "s",
        "lower",
        "<= 1.0 s; on Ray: <= 1.5x Ray actors",
        (Check(limit=1.0), Check(engine="fed-ray", faster_than="ray", factor=1 / 1.5)),
        digits=3,
    ),
    Metric("pool-start", "forkserver_first_job_s", "first job done, forkserver", "s", "lower", digits=3),
    Metric("pool-start", "forkserver_all_ready_s", "all 12 ready, forkserver", "s", "lower", digits=3),
    Metric(
        "failure",
        "sigkill_to_error_ms",
        "SIGKILL -> error, median",
        "ms",
        "lower",
        "<= 5 ms",
        (Check(limit=5.0),),
    ),
    Metric("failure", "sigkill_to_error_max_ms", "SIGKILL -> error, max", "ms", "lower"),
    Metric("failure", "cancel_to_replaced_ms", "cancel hung step -> next job done", "ms", "lower"),
    Metric("failure", "cancel_replaced_minus_grace_ms", "  of which after the 0.1 s grace", "ms", "lower"),
    Metric(
        "close",
        "close_idle_s",
        "close 12 idle workers",
        "s",
        "lower",
        "<= 0.2 s",
        (Check(limit=0.2),),
        digits=3,
    ),
    Metric("close", "runtime_stop_s", "stop the whole runtime", "s", "lower", digits=3),
    Metric(
        "footprint",
        "rss_per_worker_mib",
        "RSS per idle worker",
        "MiB",
        "lower",
        "<= 25 MiB",
        (Check(limit=25.0),),
        digits=1,
    ),
    Metric("footprint", "uss_per_worker_mib", "USS per idle worker", "MiB", "lower", digits=1),
    Metric("footprint", "idle_cpu_percent", "idle CPU, client + workers", "% core", "lower", digits=2),
    Metric(
        "cold-start",
        "first_job_s",
        "process start -> first job's result",
        "s",
        "lower",
        "<= 0.6 s",
        (Check(limit=0.6),),
        digits=3,
    ),
    Metric("cold-start", "first_job_eager_s", "  the same, wait_ready=False", "s", "lower", digits=3),
    Metric("cold-start", "all_ready_s", "process start -> all 12 ready", "s", "lower", digits=3),
    Metric(
        "cold-start",
        "client_cpu_s",
        "client CPU: import + Federation() to 1st worker",
        "s",
        "lower",
        "<= 0.15 s",
        (Check(limit=0.15),),
        digits=3,
    ),
    Metric(
        "cold-start", "client_cpu_first_job_s", "client CPU until the first result", "s", "lower", digits=3
    ),
    Metric("cold-start", "interpreter_s", "  process start -> script's 1st line", "s", "lower", digits=3),
    Metric("cold-start", "imported_s", "  process start -> federation imported", "s", "lower", digits=3),
    Metric("cold-start", "first_process_s", "  process start -> 1st worker started", "s", "lower", digits=3),
    Metric("cold-start", "built_s", "  process start -> Federation() returned", "s", "lower", digits=3),
    Metric("cold-start", "forkserver_first_job_s", "forkserver: first job's result", "s", "lower", digits=3),
    Metric(
        "cold-start", "forkserver_first_job_eager_s", "  the same, wait_ready=False", "s", "lower", digits=3
    ),
    Metric("cold-start", "forkserver_all_ready_s", "forkserver: all 12 ready", "s", "lower", digits=3),
    Metric(
        "cold-start",
        "forkserver_client_cpu_s",
        "forkserver: client CPU to its start",
        "s",
        "lower",
        digits=3,
    ),
    *_scaling_metrics(),
    *_fedavg_metrics(),
)


# -- statistics --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, by linear interpolation."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Iterable[float]) -> float:
    """The median of ``values``."""
    return float(statistics.median(list(values)))


# -- processes ---------------------------------------------------------------------------------


def memory_per_process(pids: Iterable[int]) -> tuple[float, float]:
    """Median RSS and USS, in MiB, of the processes ``pids``."""
    rss: list[float] = []
    uss: list[float] = []
    for pid in pids:
        info = psutil.Process(pid).memory_full_info()
        rss.append(info.rss / MIB)
        uss.append(info.uss / MIB)
    return median(rss), median(uss)


def _cpu_seconds(procs: Iterable[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def cpu_percent(pids: Iterable[int], window: float) -> float:
    """CPU used by this process and ``pids`` over ``window`` seconds, in % of one core."""
    procs = [psutil.Process(os.getpid()), *(psutil.Process(pid) for pid in pids)]
    before = _cpu_seconds(procs)
    started = time.monotonic()
    # The window is the measurement itself: nothing is awaited, the pool stays idle.
    time.sleep(window)
    elapsed = time.monotonic() - started
    return (_cpu_seconds(procs) - before) / elapsed * 100.0


def wait_ready(readers: Sequence[object], timeout: float) -> list[float]:
    """Wait until each reader (pipe ``Connection`` or file) is readable; the ``perf_counter`` of each.

    Raises:
        TimeoutError: not all were readable within ``timeout``.
    """
    from multiprocessing.connection import wait

    deadline = time.perf_counter() + timeout
    pending = list(readers)
    times: list[float] = []
    while pending:
        left = deadline - time.perf_counter()
        if left <= 0:
            raise TimeoutError(f"{len(pending)} of {len(readers)} processes were not up within {timeout} s")
        for ready in wait(pending, left):  # type: ignore[arg-type]
            pending.remove(ready)
            times.append(time.perf_counter())
    return times
