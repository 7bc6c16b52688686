"""The scenarios, measured on federation's process backend.

Every scenario starts its own federation, sized for it, and closes it before
the next, so one scenario's pool never competes with another's for the two
cores. The pipelines are the same ones the baselines run (their steps live in
:mod:`benchmarks.workloads`):

* 1-site: ``increment`` at A, returned;
* 2-site: ``increment`` at A feeds ``double`` at B, whose output returns;
* 3-site fan-out: ``local_value`` at A and B, ``gather`` at C;
* stream: generator ``generate`` at A, collected (or consumed per item) at B;
* payload: ``make_payload`` at A feeds ``receive_payload`` at B.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import psutil

import federation as fed

from . import workloads as w
from .measure import MIB, Measured, Settings, cpu_percent, median, memory_per_process, percentile

__all__ = [
    "FederationEngine",
    "FederationRayEngine",
    "fan_out_pipeline",
    "hang_pipeline",
    "one_site_pipeline",
    "payload_pipeline",
    "stream_pipeline",
    "two_site_pipeline",
]

SITES = ("a", "b", "c")


def one_site_pipeline() -> fed.Pipeline:
    """``increment`` at site A."""
    pipeline = fed.Pipeline("bench-one-site")
    pipeline.output(pipeline.step(site="a")(w.increment))
    return pipeline


def two_site_pipeline() -> fed.Pipeline:
    """``increment`` at site A feeds ``double`` at site B, whose output returns."""
    pipeline = fed.Pipeline("bench-two-site")
    first = pipeline.step(site="a")(w.increment)
    pipeline.output(pipeline.step(site="b", bind={"value": first})(w.double))
    return pipeline


def fan_out_pipeline() -> fed.Pipeline:
    """``local_value`` fanned out over sites A and B, gathered by ``gather`` at C."""
    pipeline = fed.Pipeline("bench-fan-out")
    local = pipeline.step(sites=["a", "b"])(w.local_value)
    pipeline.output(pipeline.step(site="c", bind={"values": local})(w.gather))
    return pipeline


def stream_pipeline(per_item: bool) -> fed.Pipeline:
    """A generator at A streaming ``n`` items to B: collected into one list, or one call per item."""
    pipeline = fed.Pipeline("bench-stream-per-item" if per_item else "bench-stream")
    source = pipeline.step(site="a")(w.generate)
    if per_item:
        pipeline.step(site="b", bind={"item": source})(w.tally)
    else:
        pipeline.output(pipeline.step(site="b", bind={"items": fed.collect(source)})(w.count_items))
    return pipeline


def payload_pipeline() -> fed.Pipeline:
    """``make_payload`` at A feeds ``receive_payload`` at B, which returns the hop's seconds."""
    pipeline = fed.Pipeline("bench-payload")
    made = pipeline.step(site="a")(w.make_payload)
    pipeline.output(pipeline.step(site="b", bind={"stamped": made})(w.receive_payload))
    return pipeline


def hang_pipeline() -> fed.Pipeline:
    """A step at A that streams its worker's pid to the client, then hangs."""
    pipeline = fed.Pipeline("bench-hang")
    pipeline.output(pipeline.step(site="a")(w.report_pid_then_block))
    return pipeline


def _children() -> set[int]:
    return {proc.pid for proc in psutil.Process().children()}


class FederationEngine:
    """Runs every scenario on a local federation (process backend)."""

    name = "federation"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.notes: dict[str, list[str]] = {}

    def start(self) -> None:
        """Import the client side once, so no scenario is charged for it.

        The package's bytecode is compiled first, as ``pip install`` leaves it: with
        PYTHONDONTWRITEBYTECODE set (as on some CI machines) every spawned worker
        would otherwise compile the worker's modules again, about 25 ms each.
        """
        import compileall

        compileall.compile_dir(os.path.dirname(fed.__file__), quiet=1)
        # Warnings such as "worker died" are what the failure scenario provokes; keep the table clean.
        logging.getLogger("federation").addHandler(logging.NullHandler())
        logging.getLogger("federation").propagate = False
        _ = fed.Federation, fed.FederationConfig, fed.collect

    def stop(self) -> dict[str, Measured]:
        """Nothing to stop: every scenario closed its own federation."""
        return {}

    def _federation(self, sites: int, slots: int, **options: Any) -> fed.Federation:
        return fed.Federation(sites=list(SITES[:sites]), pool_size=slots, **options)

    # -- 1. latency --------------------------------------------------------------------------

    def latency(self) -> Measured:
        """Submit -> result of sequential jobs on a warm pool (2 slots, 3 sites)."""
        s = self.settings
        measured: Measured = {}
        with self._federation(3, 2) as federation:
            for key, pipeline, expected in (
                ("one_site", one_site_pipeline(), 8),
                ("two_site", two_site_pipeline(), 16),
                ("fan_out", fan_out_pipeline(), 16),
            ):
                result = federation.submit(pipeline, x=7).result(timeout=s.timeout)
                if result != expected:
                    raise AssertionError(f"{key}: got {result!r}, expected {expected!r}")
                for i in range(s.latency_warmup):
                    federation.submit(pipeline, x=i).result(timeout=s.timeout)
                times = []
                for i in range(s.latency_jobs):
                    started = time.perf_counter()
                    federation.submit(pipeline, x=i).result(timeout=s.timeout)
                    times.append(time.perf_counter() - started)
                measured[f"{key}_p50_ms"] = percentile(times, 50) * 1e3
                if key != "one_site":
                    measured[f"{key}_p95_ms"] = percentile(times, 95) * 1e3
                    measured[f"{key}_p99_ms"] = percentile(times, 99) * 1e3
        return measured

    # -- 2. throughput -----------------------------------------------------------------------

    def throughput(self) -> Measured:
        """Small jobs per second with a pool of 4, all submitted at once."""
        s = self.settings
        measured: Measured = {}
        with self._federation(2, s.slots) as federation:
            for key, pipeline in (("one_site", one_site_pipeline()), ("two_site", two_site_pipeline())):
                warm = [federation.submit(pipeline, x=i) for i in range(s.slots * 25)]
                for job in warm:
                    job.result(timeout=s.timeout)
                started = time.perf_counter()
                jobs = [federation.submit(pipeline, x=i) for i in range(s.throughput_jobs)]
                for job in jobs:
                    job.result(timeout=s.timeout)
                measured[f"{key}_jobs_per_s"] = s.throughput_jobs / (time.perf_counter() - started)
        return measured

    # -- 3. tokens ---------------------------------------------------------------------------

    def tokens(self) -> Measured:
        """Small items streamed from a generator at A to a step at B, per second."""
        s = self.settings
        n = s.stream_items
        measured: Measured = {}
        with self._federation(2, 1) as federation:
            for key, pipeline in (
                ("collected", stream_pipeline(per_item=False)),
                ("per_item", stream_pipeline(per_item=True)),
            ):
                federation.submit(pipeline, n=1000).result(timeout=s.timeout)
                rates = []
                for _ in range(s.stream_repeats):
                    started = time.perf_counter()
                    result = federation.submit(pipeline, n=n).result(timeout=s.timeout)
                    rates.append(n / (time.perf_counter() - started))
                    if key == "collected" and result != n:
                        raise AssertionError(f"{n} items streamed, {result} collected")
                measured[f"{key}_items_per_s"] = median(rates)
        return measured

    # -- 4. payloads -------------------------------------------------------------------------

    def payloads(self) -> Measured:
        """numpy arrays and bytes from site A to site B, in GB/s (hop timed by the steps)."""
        s = self.settings
        measured: Measured = {}
        with self._federation(2, 1) as federation:
            pipeline = payload_pipeline()
            federation.submit(pipeline, kind="numpy", size=1024).result(timeout=s.timeout)  # imports numpy
            for kind in ("numpy", "bytes"):
                for size in s.payload_sizes:
                    rates = []
                    for _ in range(s.payload_repeats[size]):
                        seconds, got = federation.submit(pipeline, kind=kind, size=size).result(
                            timeout=s.timeout
                        )
                        if got != size:
                            raise AssertionError(f"sent {size} bytes, received {got}")
                        rates.append(size / seconds / 1e9)
                    measured[f"{kind}_{size // MIB}mib_gbps"] = median(rates)
        return measured

    # -- 5. pool start -----------------------------------------------------------------------

    def pool_start(self) -> Measured:
        """4 slots x 3 sites: until a 3-site job has run (wait_ready=False), until all are ready."""
        first, starting, ready = self._start_times("spawn")
        # The forkserver starts with the federation: its own start is counted.
        forked_first, _, forked_ready = self._start_times("forkserver")
        self.notes.setdefault("pool-start", []).append(
            "federation: 'slots still starting then' = slots of the wait_ready=False pool still starting "
            f"when its first job had finished (federation.stats()), of {self.settings.slots}; "
            "'forkserver' rows: start_method='forkserver' (spawn is the default)"
        )
        return {
            "first_job_s": first,
            "starting_at_first_job": starting,
            "all_ready_s": ready,
            "forkserver_first_job_s": forked_first,
            "forkserver_all_ready_s": forked_ready,
        }

    def _start_times(self, start_method: str) -> tuple[float, float, float]:
        """Medians: until the first job is done, slots still starting then, until all are ready."""
        s = self.settings
        pipeline = fan_out_pipeline()
        pipeline.compile(SITES)  # compiled once, up front: this measures the pool, not cloudpickle
        first: list[float] = []
        ready: list[float] = []
        starting: list[int] = []
        for _ in range(s.start_repeats):
            started = time.perf_counter()
            federation = self._federation(s.sites, s.slots, wait_ready=False, start_method=start_method)
            try:
                federation.submit(pipeline, x=1).result(timeout=s.timeout)
                first.append(time.perf_counter() - started)
                starting.append(federation.stats().slots.starting)
            finally:
                federation.close()
            started = time.perf_counter()
            federation = self._federation(s.sites, s.slots, wait_ready=True, start_method=start_method)
            ready.append(time.perf_counter() - started)
            federation.close()
        return median(first), median(starting), median(ready)

    # -- 9. cold start ------------------------------------------------------------------------

    def cold_start(self) -> Measured:
        """A fresh ``python script.py``: process start to the first result, to all ready (medians)."""
        from .coldstart import cold_start

        self.notes.setdefault("cold-start", []).append(
            "federation: medians of fresh interpreters running a script that imports federation, "
            "builds Federation(sites=['a', 'b', 'hub'], pool_size=4) and submits one 3-site job; "
            "from the benchmark's clock just before the process starts. Client CPU excludes the "
            "interpreter's own start."
        )
        return cold_start(self.settings.cold_repeats, self.settings.timeout)

    # -- 6. failure detection ----------------------------------------------------------------

    def failure(self) -> Measured:
        """SIGKILL of the worker running a step -> ``job.result`` raises ``WorkerDiedError``."""
        s = self.settings
        pipeline = hang_pipeline()
        times = []
        with self._federation(2, 1, echo_worker_output=False) as federation:
            for _ in range(s.failure_repeats):
                job = federation.submit(pipeline)
                pid = next(iter(job.results(timeout=s.timeout))).value
                started = time.perf_counter()
                os.kill(pid, signal.SIGKILL)
                try:
                    job.result(timeout=s.timeout)
                except fed.WorkerDiedError:
                    times.append(time.perf_counter() - started)
                else:
                    raise AssertionError("the job of a killed worker finished")
        replaced = []
        grace = 0.1
        follow_up = one_site_pipeline()
        with self._federation(1, 1, echo_worker_output=False, cancel_grace=grace) as federation:
            for _ in range(s.failure_repeats):
                job = federation.submit(pipeline)
                next(iter(job.results(timeout=s.timeout)))  # the step is running, and ignores cancel
                started = time.perf_counter()
                job.cancel()
                # A pool of one: the next job runs once the hung slot was killed and replaced.
                federation.submit(follow_up, x=1).result(timeout=s.timeout)
                replaced.append(time.perf_counter() - started)
        return {
            "sigkill_to_error_ms": median(times) * 1e3,
            "sigkill_to_error_max_ms": max(times) * 1e3,
            "cancel_to_replaced_ms": median(replaced) * 1e3,
            "cancel_replaced_minus_grace_ms": (median(replaced) - grace) * 1e3,
        }

    # -- 7. close ----------------------------------------------------------------------------

    def close(self) -> Measured:
        """``close()`` of an idle, ready pool of 4 slots x 3 sites."""
        s = self.settings
        times = []
        for _ in range(s.close_repeats):
            federation = self._federation(s.sites, s.slots)
            started = time.perf_counter()
            federation.close()
            times.append(time.perf_counter() - started)
        value = median(times)
        # The federation is the whole runtime: closing it stops everything it started.
        return {"close_idle_s": value, "runtime_stop_s": value}

    # -- 10. scaling ------------------------------------------------------------------------

    def scaling(self) -> Measured:
        """Fan-in latency, pool start and worker memory for 2 to 100 sites (and a plot)."""
        from .scaling import PLOT, scaling

        self.notes.setdefault("scaling", []).append(
            f"federation: a fan-out over every site but the hub, gathered at the hub; warm p50 with a "
            f"pool of 2 (forkserver) and of 1 (thread); plot: {PLOT}"
        )
        return scaling(self.settings)

    # -- 11. FedAvg round ---------------------------------------------------------------------

    def fedavg(self) -> Measured:
        """A federated-averaging round's time for 3, 10 and 50 sites, beside an in-process loop."""
        from .rounds import fedavg_rounds

        self.notes.setdefault("fedavg", []).append(
            "federation: broadcast 65x10 float64 weights from the hub, a zero-compute step at every "
            "client, average at the hub; pool of 1 (forkserver); floor: the same three functions "
            "called in a loop in this process"
        )
        return fedavg_rounds(self.settings)

    # -- 8. footprint ------------------------------------------------------------------------

    def footprint(self) -> Measured:
        """RSS and USS per idle worker, and idle CPU of client + workers, for 4 slots x 3 sites."""
        s = self.settings
        before = _children()
        with self._federation(s.sites, s.slots):
            workers = sorted(_children() - before)
            expected = s.sites * s.slots
            if len(workers) != expected:
                raise AssertionError(f"expected {expected} worker processes, found {len(workers)}")
            rss, uss = memory_per_process(workers)
            cpu = cpu_percent(workers, s.idle_window)
        return {"rss_per_worker_mib": rss, "uss_per_worker_mib": uss, "idle_cpu_percent": cpu}


class FederationRayEngine(FederationEngine):
    """The same scenarios on ``backend="ray"``, on the Ray the Ray baseline started.

    Run in the Ray phase, each scenario right after the hand-written actors'
    (:class:`~benchmarks.baselines.RayBaseline`), so the two see the same
    machine; the report compares this column with that one.
    """

    name = "fed-ray"
    cold_start = None  # a fresh process would start a private Ray: not the comparison asked for
    # These build their own local federations (sites by the hundred, processes): not Ray's.
    scaling = None
    fedavg = None

    def _federation(self, sites: int, slots: int, **options: Any) -> fed.Federation:
        options.pop("start_method", None)
        return fed.Federation(sites=list(SITES[:sites]), pool_size=slots, backend="ray", **options)

    def pool_start(self) -> Measured:
        """4 slots x 3 sites of site actors: until a 3-site job has run, until all are ready."""
        first, starting, ready = self._start_times("spawn")
        return {"first_job_s": first, "starting_at_first_job": starting, "all_ready_s": ready}

    def close(self) -> Measured:
        """``close()`` of an idle, ready pool of 4 slots x 3 sites: every actor confirmed dead."""
        measured = super().close()
        return {"close_idle_s": measured["close_idle_s"]}

    def footprint(self) -> Measured:
        """RSS and USS per idle site actor, and idle CPU of the client and the actors."""
        s = self.settings
        with self._federation(s.sites, s.slots) as federation:
            pids = [w.pid for w in federation.stats().workers if w.pid is not None]
            expected = s.sites * s.slots
            if len(pids) != expected:
                raise AssertionError(f"expected {expected} site actors, found {len(pids)}")
            rss, uss = memory_per_process(pids)
            cpu = cpu_percent(pids, s.idle_window)
        return {"rss_per_worker_mib": rss, "uss_per_worker_mib": uss, "idle_cpu_percent": cpu}
