"""The baselines: the same scenarios on what a user could use instead.

* :class:`PipeFloor`: bare processes on ``multiprocessing.Pipe`` (pre-spawned,
  no protocol, no pool, no failure handling), and bare interpreters for the
  pool, close and footprint scenarios. Nothing built on pipes can beat it.
* :class:`ProcessPoolBaseline`: ``concurrent.futures.ProcessPoolExecutor``
  (spawn context, like federation's workers), the pipelines as chained
  submissions: A's result is submitted as B's input.
* :class:`RayBaseline`: Ray actors, one per site, the pipelines as chained
  actor calls passing object refs. Ray is started once, for all its scenarios.
* :class:`CopyCeiling`: an in-process copy of each payload, the ceiling for
  any transfer of it.

An engine answers only the scenarios it has a counterpart for; the report
leaves the other cells empty.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import psutil

from . import workloads as w
from .measure import MIB, Measured, Settings, cpu_percent, median, memory_per_process, percentile, wait_ready

__all__ = ["CopyCeiling", "PipeFloor", "ProcessPoolBaseline", "RayBaseline", "ray_available"]

_SPAWN = multiprocessing.get_context("spawn")
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
# A bare interpreter: says it is up, then idles until its stdin closes.
_BARE = "import sys; sys.stdout.buffer.write(b'u'); sys.stdout.flush(); sys.stdin.buffer.read()"


# -- helpers -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _processes(*specs: tuple[Callable[..., None], tuple[Any, ...]]) -> Iterator[list[Any]]:
    """Start spawn processes running ``target(*args)``; on exit, wait for them, then kill the rest.

    The caller ends each process first (an empty message, or closing its pipe).
    """
    procs = []
    try:
        for target, args in specs:
            proc = _SPAWN.Process(target=target, args=args, daemon=True)
            proc.start()
            procs.append(proc)
        yield procs
    finally:
        for proc in procs:
            proc.join(5.0)
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
            proc.close()


def _pipe() -> tuple[Connection, Connection]:
    """A one-way pipe: ``(reader, writer)``."""
    return _SPAWN.Pipe(duplex=False)


def _timed_rounds(
    send: Callable[[int], None], receive: Callable[[], Any], rounds: int, warmup: int
) -> list[float]:
    for i in range(warmup):
        send(i)
        receive()
    times = []
    for i in range(rounds):
        started = time.perf_counter()
        send(i)
        receive()
        times.append(time.perf_counter() - started)
    return times


def _latencies(times: list[float], key: str, tails: bool = True) -> Measured:
    measured = {f"{key}_p50_ms": percentile(times, 50) * 1e3}
    if tails:
        measured[f"{key}_p95_ms"] = percentile(times, 95) * 1e3
        measured[f"{key}_p99_ms"] = percentile(times, 99) * 1e3
    return measured


def _drain(readers: list[Connection], total: int, timeout: float, done: list[int]) -> None:
    """Receive ``total`` messages from ``readers`` in any order (a thread of its own)."""
    deadline = time.monotonic() + timeout
    count = 0
    while count < total:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        for reader in wait(readers, left):
            reader.recv_bytes()  # type: ignore[union-attr]
            count += 1
    done.append(count)


def _pipelined(writers: list[Connection], readers: list[Connection], total: int, timeout: float) -> float:
    """Send ``total`` messages round-robin while a thread receives the answers; messages/s."""
    done: list[int] = []
    receiver = threading.Thread(target=_drain, args=(readers, total, timeout, done), name="bench-drain")
    started = time.perf_counter()
    receiver.start()
    for i in range(total):
        writers[i % len(writers)].send(i)
    receiver.join(timeout)
    elapsed = time.perf_counter() - started
    if done != [total]:
        raise TimeoutError(f"not every answer arrived within {timeout} s")
    return total / elapsed


@contextlib.contextmanager
def _bare_interpreters(
    count: int, timeout: float
) -> Iterator[tuple[list[subprocess.Popen[bytes]], float, list[float]]]:
    """Start ``count`` bare interpreters; yield them, the start time and when each was up."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        started = time.perf_counter()
        for _ in range(count):
            procs.append(
                subprocess.Popen([sys.executable, "-c", _BARE], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            )
        up = wait_ready([proc.stdout for proc in procs], timeout)
        yield procs, started, up
    finally:
        for proc in procs:
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5.0)
            if proc.stdout is not None:
                proc.stdout.close()


# -- the pipe floor ----------------------------------------------------------------------------


class PipeFloor:
    """Bare pre-spawned processes on ``multiprocessing.Pipe``: the floor for every scenario."""

    name = "pipe"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.notes: dict[str, list[str]] = {
            "latency": [
                "Pipe floor: client -> echo, client -> A -> B -> client, client -> A,B -> C -> client"
            ],
            "tokens": ["Pipe floor: pickled lists of 64 items; per item: one message per item"],
            "pool-start": ["Pipe floor: 12 bare interpreters (python -c) that say they are up"],
        }

    def start(self) -> None:
        """Nothing to start."""

    def stop(self) -> dict[str, Measured]:
        """Nothing to stop."""
        return {}

    def latency(self) -> Measured:
        """Round trips: client <-> echo, client -> A -> B -> client, client -> A,B -> C -> client."""
        s = self.settings
        measured: Measured = {}
        client, echo_end = _SPAWN.Pipe()
        with _processes((w.pipe_echo, (echo_end,))):
            echo_end.close()
            times = _timed_rounds(client.send, client.recv, s.latency_jobs, s.latency_warmup)
            measured.update(_latencies(times, "one_site", tails=False))
            client.close()
        to_a_r, to_a_w = _pipe()
        a_to_b_r, a_to_b_w = _pipe()
        back_r, back_w = _pipe()
        with _processes((w.pipe_relay, (to_a_r, a_to_b_w)), (w.pipe_relay, (a_to_b_r, back_w))):
            for end in (to_a_r, a_to_b_w, a_to_b_r, back_w):
                end.close()
            times = _timed_rounds(to_a_w.send, back_r.recv, s.latency_jobs, s.latency_warmup)
            measured.update(_latencies(times, "two_site"))
            to_a_w.send_bytes(b"")
        to_a_r, to_a_w = _pipe()
        to_b_r, to_b_w = _pipe()
        a_to_c_r, a_to_c_w = _pipe()
        b_to_c_r, b_to_c_w = _pipe()
        back_r, back_w = _pipe()
        with _processes(
            (w.pipe_relay, (to_a_r, a_to_c_w)),
            (w.pipe_relay, (to_b_r, b_to_c_w)),
            (w.pipe_gather, (a_to_c_r, b_to_c_r, back_w)),
        ):
            for end in (to_a_r, a_to_c_w, to_b_r, b_to_c_w, a_to_c_r, b_to_c_r, back_w):
                end.close()

            def fan_out(i: int) -> None:
                to_a_w.send(i)
                to_b_w.send(i)

            times = _timed_rounds(fan_out, back_r.recv, s.latency_jobs, s.latency_warmup)
            measured.update(_latencies(times, "fan_out"))
            to_a_w.send_bytes(b"")
            to_b_w.send_bytes(b"")
        return measured

    def throughput(self) -> Measured:
        """Messages/s through 4 echo processes, and through 4 two-process rings, all sent at once."""
        s = self.settings
        measured: Measured = {}
        pairs = [_SPAWN.Pipe() for _ in range(s.slots)]
        with _processes(*((w.pipe_echo, (child,)) for _, child in pairs)):
            for _, child in pairs:
                child.close()
            clients = [client for client, _ in pairs]
            measured["one_site_jobs_per_s"] = _pipelined(clients, clients, s.throughput_jobs, s.timeout)
            for client in clients:
                client.close()
        rings = [(_pipe(), _pipe(), _pipe()) for _ in range(s.slots)]
        specs = []
        for to_a, a_to_b, back in rings:
            specs += [(w.pipe_relay, (to_a[0], a_to_b[1])), (w.pipe_relay, (a_to_b[0], back[1]))]
        with _processes(*specs):
            for to_a, a_to_b, back in rings:
                for end in (to_a[0], a_to_b[1], a_to_b[0], back[1]):
                    end.close()
            writers = [to_a[1] for to_a, _, _ in rings]
            readers = [back[0] for _, _, back in rings]
            measured["two_site_jobs_per_s"] = _pipelined(writers, readers, s.throughput_jobs, s.timeout)
            for writer in writers:
                writer.send_bytes(b"")
        return measured

    def tokens(self) -> Measured:
        """Items/s from a source process to a sink: batched 64 per message, and one per message."""
        s = self.settings
        measured: Measured = {}
        for key, batch, n in (
            ("collected", 64, s.stream_items),
            # Unbatched messages are ~10x slower; fewer of them give the same rate.
            ("per_item", 1, min(s.stream_items, 200_000)),
        ):
            control_r, control_w = _pipe()
            link_r, link_w = _pipe()
            report_r, report_w = _pipe()
            with _processes(
                (w.pipe_stream_source, (control_r, link_w, batch)), (w.pipe_stream_sink, (link_r, report_w))
            ):
                for end in (control_r, link_w, link_r, report_w):
                    end.close()
                control_w.send(1000)
                report_r.recv()
                rates = []
                for _ in range(s.stream_repeats):
                    started = time.perf_counter()
                    control_w.send(n)
                    if not report_r.poll(s.timeout):
                        raise TimeoutError("the pipe sink did not report")
                    count = report_r.recv()
                    rates.append(n / (time.perf_counter() - started))
                    if count != n:
                        raise AssertionError(f"{n} items sent, {count} received")
                measured[f"{key}_items_per_s"] = median(rates)
                control_w.send(None)
        return measured

    def payloads(self) -> Measured:
        """A payload pickled (protocol 5, in band) through a pipe from process A to process B."""
        s = self.settings
        measured: Measured = {}
        control_r, control_w = _pipe()
        link_r, link_w = _pipe()
        report_r, report_w = _pipe()
        with _processes(
            (w.pipe_payload_source, (control_r, link_w)), (w.pipe_payload_sink, (link_r, report_w))
        ):
            for end in (control_r, link_w, link_r, report_w):
                end.close()
            control_w.send(("numpy", 1024))
            report_r.recv()
            for kind in ("numpy", "bytes"):
                for size in s.payload_sizes:
                    rates = []
                    for _ in range(s.payload_repeats[size]):
                        control_w.send((kind, size))
                        if not report_r.poll(s.timeout):
                            raise TimeoutError("the pipe sink did not report")
                        seconds, got = report_r.recv()
                        if got != size:
                            raise AssertionError(f"sent {size} bytes, received {got}")
                        rates.append(size / seconds / 1e9)
                    measured[f"{kind}_{size // MIB}mib_gbps"] = median(rates)
            control_w.send(None)
        return measured

    def pool_start(self) -> Measured:
        """12 bare interpreters: until the first is up, until all are."""
        s = self.settings
        first: list[float] = []
        ready: list[float] = []
        for _ in range(s.start_repeats):
            with _bare_interpreters(s.sites * s.slots, s.timeout) as (_, started, up):
                first.append(min(up) - started)
                ready.append(max(up) - started)
        return {"first_job_s": median(first), "all_ready_s": median(ready)}

    def failure(self) -> Measured:
        """SIGKILL of a pre-spawned process -> its sentinel is readable."""
        s = self.settings
        times = []
        for _ in range(s.failure_repeats):
            client, child = _SPAWN.Pipe()
            with _processes((w.idle_until_eof, (child,))) as (proc,):
                child.close()
                if not client.poll(s.timeout):
                    raise TimeoutError("the process did not come up")
                client.recv_bytes()
                started = time.perf_counter()
                os.kill(proc.pid, signal.SIGKILL)
                if not wait([proc.sentinel], s.timeout):
                    raise TimeoutError("the sentinel of a killed process did not fire")
                times.append(time.perf_counter() - started)
                client.close()
        return {"sigkill_to_error_ms": median(times) * 1e3, "sigkill_to_error_max_ms": max(times) * 1e3}

    def close(self) -> Measured:
        """12 bare interpreters: close their stdin, wait until all have exited."""
        s = self.settings
        times = []
        for _ in range(s.close_repeats):
            with _bare_interpreters(s.sites * s.slots, s.timeout) as (procs, _, _):
                started = time.perf_counter()
                for proc in procs:
                    assert proc.stdin is not None
                    proc.stdin.close()
                for proc in procs:
                    proc.wait(s.timeout)
                times.append(time.perf_counter() - started)
        value = median(times)
        return {"close_idle_s": value, "runtime_stop_s": value}

    def footprint(self) -> Measured:
        """RSS/USS of a bare interpreter, and idle CPU of 12 of them with the client."""
        s = self.settings
        with _bare_interpreters(s.sites * s.slots, s.timeout) as (procs, _, _):
            pids = [proc.pid for proc in procs]
            rss, uss = memory_per_process(pids)
            cpu = cpu_percent(pids, s.idle_window)
        return {"rss_per_worker_mib": rss, "uss_per_worker_mib": uss, "idle_cpu_percent": cpu}


# -- ProcessPoolExecutor -----------------------------------------------------------------------


class ProcessPoolBaseline:
    """``concurrent.futures.ProcessPoolExecutor`` (spawn): pipelines as chained submissions."""

    name = "process-pool"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.notes: dict[str, list[str]] = {
            "latency": ["ProcessPool: 3 workers; B submitted with A's result once it is back"],
            "tokens": ["ProcessPool: A returns all items as one list, submitted to B (no streaming)"],
            "payloads": ["ProcessPool: A's result travels to the client, then to B"],
            "pool-start": ["ProcessPool: 12 spawn workers; all ready = every initializer has run"],
            "close": ["ProcessPool: shutdown(wait=True)"],
        }

    def start(self) -> None:
        """Nothing to start: each scenario makes its executor."""

    def stop(self) -> dict[str, Measured]:
        """Nothing to stop."""
        return {}

    def _executor(self, workers: int, **options: Any) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(workers, mp_context=_SPAWN, **options)

    def _warm(self, executor: ProcessPoolExecutor, workers: int) -> None:
        for future in [executor.submit(w.report_pid) for _ in range(workers * 8)]:
            future.result(self.settings.timeout)

    def _ready_pool(self, workers: int) -> tuple[ProcessPoolExecutor, list[int], float, float]:
        """A pool whose ``workers`` processes all started; its pids, first-result and all-up times."""
        s = self.settings
        queue = _SPAWN.Queue()
        try:
            started = time.perf_counter()
            executor = self._executor(workers, initializer=w.announce, initargs=(queue,))
            futures = [executor.submit(w.increment, i) for i in range(workers)]
            next(as_completed(futures, s.timeout)).result()
            first = time.perf_counter() - started
            pids = [queue.get(timeout=s.timeout) for _ in range(workers)]
            ready = time.perf_counter() - started
        finally:
            queue.close()
            queue.join_thread()
        return executor, pids, first, ready

    def latency(self) -> Measured:
        """Sequential jobs: one submission, two chained, and a fan-out of two feeding a third."""
        s = self.settings
        timeout = s.timeout
        measured: Measured = {}
        with self._executor(3) as executor:
            self._warm(executor, 3)

            def one_site(i: int) -> Any:
                return executor.submit(w.increment, i).result(timeout)

            def two_site(i: int) -> Any:
                return executor.submit(w.double, executor.submit(w.increment, i).result(timeout)).result(
                    timeout
                )

            def fan_out(i: int) -> Any:
                a = executor.submit(w.local_value, i)
                b = executor.submit(w.local_value, i)
                values = {"a": a.result(timeout), "b": b.result(timeout)}
                return executor.submit(w.gather, values).result(timeout)

            for key, job in (("one_site", one_site), ("two_site", two_site), ("fan_out", fan_out)):
                times = _timed_rounds(job, lambda: None, s.latency_jobs, s.latency_warmup)
                measured.update(_latencies(times, key, tails=key != "one_site"))
        return measured

    def throughput(self) -> Measured:
        """All jobs submitted at once to 4 workers; 2-site: B submitted as each A completes."""
        s = self.settings
        n = s.throughput_jobs
        measured: Measured = {}
        with self._executor(s.slots) as executor:
            self._warm(executor, s.slots)
            started = time.perf_counter()
            for future in [executor.submit(w.increment, i) for i in range(n)]:
                future.result(s.timeout)
            measured["one_site_jobs_per_s"] = n / (time.perf_counter() - started)
            started = time.perf_counter()
            firsts = [executor.submit(w.increment, i) for i in range(n)]
            seconds = [
                executor.submit(w.double, future.result()) for future in as_completed(firsts, s.timeout)
            ]
            for future in seconds:
                future.result(s.timeout)
            measured["two_site_jobs_per_s"] = n / (time.perf_counter() - started)
        return measured

    def tokens(self) -> Measured:
        """A returns the items as one list; the client submits it to B, which counts them."""
        s = self.settings
        n = s.stream_items
        rates = []
        with self._executor(2) as executor:
            self._warm(executor, 2)
            for _ in range(s.stream_repeats):
                started = time.perf_counter()
                items = executor.submit(w.generate_list, n).result(s.timeout)
                count = executor.submit(w.count_items, items).result(s.timeout)
                rates.append(n / (time.perf_counter() - started))
                if count != n:
                    raise AssertionError(f"{n} items sent, {count} received")
        return {"collected_items_per_s": median(rates)}

    def payloads(self) -> Measured:
        """A's stamped payload comes back to the client and is submitted to B."""
        s = self.settings
        measured: Measured = {}
        with self._executor(2) as executor:
            self._warm(executor, 2)
            for future in [executor.submit(w.make_payload, "numpy", 1024) for _ in range(4)]:
                future.result(s.timeout)  # imports numpy in both workers
            for kind in ("numpy", "bytes"):
                for size in s.payload_sizes:
                    rates = []
                    for _ in range(s.payload_repeats[size]):
                        stamped = executor.submit(w.make_payload, kind, size).result(s.timeout)
                        seconds, got = executor.submit(w.receive_payload, stamped).result(s.timeout)
                        del stamped
                        if got != size:
                            raise AssertionError(f"sent {size} bytes, received {got}")
                        rates.append(size / seconds / 1e9)
                    measured[f"{kind}_{size // MIB}mib_gbps"] = median(rates)
        return measured

    def pool_start(self) -> Measured:
        """12 spawn workers: until the first result, until every worker's initializer ran."""
        s = self.settings
        first: list[float] = []
        ready: list[float] = []
        for _ in range(s.start_repeats):
            executor, _, first_s, ready_s = self._ready_pool(s.sites * s.slots)
            executor.shutdown(wait=True)
            first.append(first_s)
            ready.append(ready_s)
        return {"first_job_s": median(first), "all_ready_s": median(ready)}

    def failure(self) -> Measured:
        """SIGKILL of the worker -> the pending future raises ``BrokenProcessPool``."""
        s = self.settings
        times = []
        for _ in range(s.failure_repeats):
            executor = self._executor(1)
            try:
                pid = executor.submit(w.report_pid).result(s.timeout)
                future = executor.submit(w.block)
                started = time.perf_counter()
                os.kill(pid, signal.SIGKILL)
                try:
                    future.result(s.timeout)
                except BrokenProcessPool:
                    times.append(time.perf_counter() - started)
                else:
                    raise AssertionError("a killed worker's future finished")
            finally:
                executor.shutdown(wait=True, cancel_futures=True)
        return {"sigkill_to_error_ms": median(times) * 1e3, "sigkill_to_error_max_ms": max(times) * 1e3}

    def close(self) -> Measured:
        """``shutdown(wait=True)`` of 12 idle, started workers."""
        s = self.settings
        times = []
        for _ in range(s.close_repeats):
            executor, _, _, _ = self._ready_pool(s.sites * s.slots)
            started = time.perf_counter()
            executor.shutdown(wait=True)
            times.append(time.perf_counter() - started)
        value = median(times)
        return {"close_idle_s": value, "runtime_stop_s": value}

    def footprint(self) -> Measured:
        """RSS/USS per idle worker and idle CPU of client + 12 workers."""
        s = self.settings
        executor, pids, _, _ = self._ready_pool(s.sites * s.slots)
        try:
            rss, uss = memory_per_process(pids)
            cpu = cpu_percent(pids, s.idle_window)
        finally:
            executor.shutdown(wait=True)
        return {"rss_per_worker_mib": rss, "uss_per_worker_mib": uss, "idle_cpu_percent": cpu}


# -- Ray ---------------------------------------------------------------------------------------


def ray_available() -> str | None:
    """``None`` if Ray can be imported, else why not."""
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        return f"ray is not installed ({exc}); install it with: pip install -e '.[bench]'"
    return None


class RayBaseline:
    """Ray actors, one per site; pipelines as actor calls chained by object refs.

    Ray is started once (``start``) and stopped once (``stop``, which also measures
    ``ray.shutdown()`` as Ray's "stop the whole runtime"). Its scenarios run after
    every other engine's, so its daemons (GCS, raylet, agents) are not running
    while the others are measured.
    """

    name = "ray"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.notes: dict[str, list[str]] = {
            "latency": ["Ray: one actor per site; B called with A's object ref"],
            "tokens": ["Ray: A returns all items as one list; B gets its ref (no streaming)"],
            "close": ["Ray: close = ray.kill of 12 idle actors until their processes exit"],
            "throughput": [
                "Ray: one job in flight per set of actors, as a pool of 4 runs them; 'all sent at once': "
                "every job sent at once, queued at the actors by Ray (a pool has no such mode)"
            ],
        }
        self._ray: Any = None
        self._actor: Any = None
        self._actors: list[Any] = []
        self._pool: list[Any] = []

    def start(self) -> None:
        """``ray.init`` on this machine, with workers that can import this package."""
        import logging

        import ray

        self._ray = ray
        path = os.pathsep.join(p for p in (_REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
        started = time.perf_counter()
        # A private instance: a plain ray.init() joins a cluster already running on this
        # machine (another program's, a test session's) and then refuses num_cpus.
        ray.init(
            address="local",
            num_cpus=os.cpu_count() or 1,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
            runtime_env={"env_vars": {"PYTHONPATH": path}},
        )
        self.notes.setdefault("pool-start", []).append(
            f"Ray: ray.init took {time.perf_counter() - started:.2f} s (not counted)"
        )
        # Actors need no CPU of their own to be placed: as many as a scenario needs.
        self._actor = ray.remote(num_cpus=0)(w.SiteActor)

    def stop(self) -> dict[str, Measured]:
        """``ray.shutdown()``, timed."""
        ray = self._ray
        if ray is None:
            return {}
        started = time.perf_counter()
        ray.shutdown()
        return {"close": {"runtime_stop_s": time.perf_counter() - started}}

    def _get(self, refs: Any) -> Any:
        return self._ray.get(refs, timeout=self.settings.timeout)

    def _new_actors(self, count: int) -> list[Any]:
        actors = [self._actor.remote() for _ in range(count)]
        self._get([actor.ping.remote() for actor in actors])
        return actors

    def _site_actors(self, count: int) -> list[Any]:
        """``count`` ready actors, reused across scenarios."""
        if len(self._actors) < count:
            self._actors += self._new_actors(count - len(self._actors))
        return self._actors[:count]

    def latency(self) -> Measured:
        """Sequential pipelines over three site actors."""
        s = self.settings
        a, b, c = self._site_actors(3)
        jobs: dict[str, Callable[[int], Any]] = {
            "one_site": lambda i: self._get(a.increment.remote(i)),
            "two_site": lambda i: self._get(b.double.remote(a.increment.remote(i))),
            "fan_out": lambda i: self._get(c.gather.remote(a.local_value.remote(i), b.local_value.remote(i))),
        }
        measured: Measured = {}
        for key, job in jobs.items():
            times = _timed_rounds(job, lambda: None, s.latency_jobs, s.latency_warmup)
            measured.update(_latencies(times, key, tails=key != "one_site"))
        return measured

    def throughput(self) -> Measured:
        """Jobs per second over 4 sets of site actors (a pool of 4), as many in flight as the pool allows.

        A federation's pool of 4 runs at most 4 jobs at once, one per slot, so the
        comparable figure keeps one job in flight per set of actors, the next sent
        when one ends. The ``*_pipelined`` figures send every job at once and let
        Ray queue them at the actors: a pool has no such mode, so no federation
        engine reports them; they show what Ray's batching of queued calls adds.
        """
        s = self.settings
        n = s.throughput_jobs
        actors = self._site_actors(2 * s.slots)
        firsts, seconds = actors[: s.slots], actors[s.slots :]
        jobs: dict[str, Callable[[int, int], Any]] = {
            "one_site": lambda slot, i: firsts[slot].increment.remote(i),
            "two_site": lambda slot, i: seconds[slot].double.remote(firsts[slot].increment.remote(i)),
        }
        measured: Measured = {}
        for key, job in jobs.items():
            self._get([job(i % s.slots, i) for i in range(s.slots * 25)])
            started = time.perf_counter()
            self._one_per_slot(job, n, s.slots)
            measured[f"{key}_jobs_per_s"] = n / (time.perf_counter() - started)
            started = time.perf_counter()
            self._get([job(i % s.slots, i) for i in range(n)])
            measured[f"{key}_jobs_per_s_pipelined"] = n / (time.perf_counter() - started)
        return measured

    def _one_per_slot(self, job: Callable[[int, int], Any], n: int, slots: int) -> None:
        """Run ``n`` jobs with one in flight per set of actors, as a pool's slots run them."""
        in_flight = {job(slot, slot): slot for slot in range(min(slots, n))}
        sent = len(in_flight)
        while in_flight:
            done, _ = self._ray.wait(list(in_flight), num_returns=1, timeout=self.settings.timeout)
            if not done:
                raise TimeoutError(f"no Ray job ended within {self.settings.timeout} s")
            for ref in done:
                slot = in_flight.pop(ref)
                self._get(ref)
                if sent < n:
                    in_flight[job(slot, sent)] = slot
                    sent += 1

    def tokens(self) -> Measured:
        """A returns the items as one list; B gets its object ref and counts them."""
        s = self.settings
        n = s.stream_items
        a, b = self._site_actors(2)
        rates = []
        for _ in range(s.stream_repeats):
            started = time.perf_counter()
            count = self._get(b.count_items.remote(a.generate_list.remote(n)))
            rates.append(n / (time.perf_counter() - started))
            if count != n:
                raise AssertionError(f"{n} items sent, {count} received")
        return {"collected_items_per_s": median(rates)}

    def payloads(self) -> Measured:
        """A's stamped payload goes to B by object ref (through Ray's object store)."""
        s = self.settings
        a, b = self._site_actors(2)
        self._get(b.receive_payload.remote(a.make_payload.remote("numpy", 1024)))
        measured: Measured = {}
        for kind in ("numpy", "bytes"):
            for size in s.payload_sizes:
                rates = []
                for _ in range(s.payload_repeats[size]):
                    seconds, got = self._get(b.receive_payload.remote(a.make_payload.remote(kind, size)))
                    if got != size:
                        raise AssertionError(f"sent {size} bytes, received {got}")
                    rates.append(size / seconds / 1e9)
                measured[f"{kind}_{size // MIB}mib_gbps"] = median(rates)
        return measured

    def pool_start(self) -> Measured:
        """12 new actors: until the first answers a call, until all have."""
        s = self.settings
        ray = self._ray
        first: list[float] = []
        ready: list[float] = []
        for _ in range(s.start_repeats):
            for actor in self._pool:
                ray.kill(actor)
            started = time.perf_counter()
            self._pool = [self._actor.remote() for _ in range(s.sites * s.slots)]
            refs = [actor.ping.remote() for actor in self._pool]
            done, _ = ray.wait(refs, num_returns=1, timeout=s.timeout)
            if not done:
                raise TimeoutError(f"no Ray actor was up within {s.timeout} s")
            first.append(time.perf_counter() - started)
            self._get(refs)
            ready.append(time.perf_counter() - started)
        return {"first_job_s": median(first), "all_ready_s": median(ready)}

    def _ready_pool(self) -> list[int]:
        """The pids of a pool of 12 idle actors (the pool-start scenario's, or new ones)."""
        if not self._pool:
            self._pool = self._new_actors(self.settings.sites * self.settings.slots)
        return list(self._get([actor.ping.remote() for actor in self._pool]))

    def failure(self) -> Measured:
        """SIGKILL of an actor's process while it runs a call -> ``ray.get`` raises."""
        s = self.settings
        ray = self._ray
        times = []
        for _ in range(s.failure_repeats):
            (actor,) = self._new_actors(1)
            pid = self._get(actor.ping.remote())
            ref = actor.block.remote()
            started = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            try:
                ray.get(ref, timeout=s.timeout)
            except ray.exceptions.GetTimeoutError:
                raise
            except ray.exceptions.RayError:
                times.append(time.perf_counter() - started)
            else:
                raise AssertionError("a killed actor's call finished")
        return {"sigkill_to_error_ms": median(times) * 1e3, "sigkill_to_error_max_ms": max(times) * 1e3}

    def close(self) -> Measured:
        """``ray.kill`` of 12 idle actors, until their processes have exited."""
        s = self.settings
        pids = self._ready_pool()
        procs = [psutil.Process(pid) for pid in pids]
        started = time.perf_counter()
        for actor in self._pool:
            self._ray.kill(actor)
        _, alive = psutil.wait_procs(procs, timeout=s.timeout)
        elapsed = time.perf_counter() - started
        self._pool = []
        if alive:
            raise TimeoutError(f"{len(alive)} killed Ray actors were still running after {s.timeout} s")
        return {"close_idle_s": elapsed}

    def footprint(self) -> Measured:
        """RSS/USS per idle actor; idle CPU of the client and every Ray process (daemons too)."""
        s = self.settings
        pids = self._ready_pool()
        rss, uss = memory_per_process(pids)
        everything = [proc.pid for proc in psutil.Process().children(recursive=True)]
        cpu = cpu_percent(everything, s.idle_window)
        return {"rss_per_worker_mib": rss, "uss_per_worker_mib": uss, "idle_cpu_percent": cpu}


# -- the copy ceiling --------------------------------------------------------------------------


class CopyCeiling:
    """One in-process copy of each payload into memory already touched: the ceiling for moving it.

    The destination is written once before it is timed: on these machines a page
    fault costs several microseconds, so a copy into fresh memory runs at a
    fraction (and a noisy one) of what the memory bus does. The note gives that
    fresh-copy rate too, for the largest size.
    """

    name = "copy"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.notes: dict[str, list[str]] = {
            "payloads": ["copy ceiling: one memcpy into a buffer written before (np.copyto / memoryview)"],
        }

    def start(self) -> None:
        """Nothing to start."""

    def stop(self) -> dict[str, Measured]:
        """Nothing to stop."""
        return {}

    def payloads(self) -> Measured:
        """GB/s of copying each payload once."""
        import numpy as np

        s = self.settings
        measured: Measured = {}
        for kind in ("numpy", "bytes"):
            for size in s.payload_sizes:
                _, value = w.make_payload(kind, size)
                target: Any = np.empty_like(value) if kind == "numpy" else memoryview(bytearray(size))
                rates = []
                for _ in range(s.payload_repeats[size] + 1):
                    started = time.perf_counter()
                    if kind == "numpy":
                        np.copyto(target, value)
                    else:
                        target[:] = value
                    rates.append(size / (time.perf_counter() - started) / 1e9)
                measured[f"{kind}_{size // MIB}mib_gbps"] = median(rates[1:])
                if size == max(s.payload_sizes):
                    started = time.perf_counter()
                    fresh = value.copy() if kind == "numpy" else bytes(memoryview(value))
                    rate = size / (time.perf_counter() - started) / 1e9
                    self.notes["payloads"].append(
                        f"copy ceiling: a {kind} copy of {size // MIB} MiB into fresh memory "
                        f"ran at {rate:.2f} GB/s"
                    )
                    del fresh
                del value, target
        return measured
