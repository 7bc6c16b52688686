"""Stats: a typed snapshot of a running federation, for dashboards, tests and the curious.

:meth:`Federation.stats() <federation.Federation.stats>` copies the router's
counters under its lock (a few dict and list copies: the router thread waits
for microseconds at most), then measures the workers outside the lock, because
reading ``/proc`` for every worker is slow compared with routing a token.

CPU use is measured between two snapshots: a worker's CPU seconds since the
previous :meth:`~federation.Federation.stats` call, divided by the wall time
since then (since the worker started, on the first call). Memory and CPU are
reported only where the backend can tell a worker apart from the client (the
process backend); a thread worker shares the client's process.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

import psutil
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from ._ray_router import RayRouter
    from ._router import Router

__all__ = ["FederationStats", "LinkStats", "SlotStats", "WorkerStats", "collect_stats"]


class SlotStats(BaseModel):
    """How the pool's slots (job executions) are doing.

    Attributes:
        total: slots the pool keeps (``pool_size``).
        free: ready and waiting for a job.
        busy: running a job.
        starting: workers starting (at start, or replacing a slot).
        other: stopping, broken, or between a retirement and its replacement.
        replaced: slots replaced since the federation started (a worker died,
            a job was killed, or a slot was recycled).
    """

    model_config = ConfigDict(frozen=True)

    total: int
    free: int
    busy: int
    starting: int
    other: int
    replaced: int


class WorkerStats(BaseModel):
    """One worker: one site of one slot.

    Attributes:
        site: the site it serves.
        slot: the slot it belongs to.
        name: its name, ``site/slot-N`` (also its process title and thread name).
        state: its slot's state: ``starting``, ``idle``, ``busy``, ...
        pid: its process id (the client's, on the thread backend).
        alive: whether it is running.
        rss: resident memory in bytes, where the backend can measure the worker alone.
        cpu_percent: CPU use since the previous snapshot (100 = one core), likewise.
        cpu_seconds: user and system CPU time since it started, likewise.
        jobs_run: jobs its slot has run.
    """

    model_config = ConfigDict(frozen=True)

    site: str
    slot: int
    name: str
    state: str
    pid: int | None
    alive: bool
    rss: int | None = None
    cpu_percent: float | None = None
    cpu_seconds: float | None = None
    jobs_run: int


class LinkStats(BaseModel):
    """Traffic on one link between two sites, over every job that finished its sites so far.

    Attributes:
        source: the sending site.
        target: the receiving site.
        tokens: tokens sent.
        bytes: bytes sent: the pickles and the buffers that went out of band through shared memory.
    """

    model_config = ConfigDict(frozen=True)

    source: str
    target: str
    tokens: int
    bytes: int


class FederationStats(BaseModel):
    """A snapshot of a federation: its slots, workers, queue, jobs and links.

    Attributes:
        time: when it was taken, in seconds since the epoch.
        backend: the federation's backend.
        sites: the federation's sites.
        closed: whether the federation is closing or closed.
        slots: the pool's slots by state.
        workers: every worker of the pool's current slots.
        queue_depth: jobs waiting for a free slot.
        running: jobs running now (suspended ones included).
        jobs: jobs by status, since the federation started: how many are
            ``queued`` and ``running`` now, and how many ``finished``, ``failed``
            and ``cancelled``.
        submitted: jobs submitted since the federation started.
        links: traffic per link, ``source → target``.
        dropped: messages the client dropped because their job had ended
            (protocol invariant 1: counted, never silently lost).
        gave_up: why the federation stopped restarting workers and failed every
            job it held (its slots kept failing to start), or ``None`` while it serves.
    """

    model_config = ConfigDict(frozen=True)

    time: float
    backend: str
    sites: tuple[str, ...]
    closed: bool
    slots: SlotStats
    workers: tuple[WorkerStats, ...]
    queue_depth: int
    running: int
    jobs: dict[str, int] = Field(default_factory=dict)
    submitted: int
    links: tuple[LinkStats, ...]
    dropped: int
    gave_up: str | None = None

    def link(self, source: str, target: str) -> LinkStats:
        """The traffic from ``source`` to ``target`` (zero if none has been recorded)."""
        for link in self.links:
            if link.source == source and link.target == target:
                return link
        return LinkStats(source=source, target=target, tokens=0, bytes=0)

    def __str__(self) -> str:
        slots = self.slots
        jobs = ", ".join(f"{status} {count}" for status, count in self.jobs.items() if count)
        lines = [
            f"slots: {slots.total} ({slots.free} free, {slots.busy} busy, {slots.starting} starting, "
            f"{slots.replaced} replaced)",
            f"jobs: {jobs or 'none'}; queue depth {self.queue_depth}; dropped messages {self.dropped}",
        ]
        for link in self.links:
            lines.append(f"link {link.source} -> {link.target}: {link.tokens} token(s), {link.bytes} bytes")
        for worker in self.workers:
            rss = f"{worker.rss / 2**20:.1f} MiB" if worker.rss is not None else "-"
            cpu = f"{worker.cpu_percent:.0f}%" if worker.cpu_percent is not None else "-"
            lines.append(
                f"worker {worker.name}: pid {worker.pid}, {worker.state}, rss {rss}, cpu {cpu}, "
                f"{worker.jobs_run} job(s)"
            )
        return "\n".join(lines)


# -- collecting ---------------------------------------------------------------------------

_STATUSES = ("queued", "running", "suspended", "finished", "failed", "cancelled")

# CPU samples per router, per worker pid: (wall time, cpu seconds) at the previous snapshot.
_samples: weakref.WeakKeyDictionary[Router | RayRouter, dict[int, tuple[float, float]]] = (
    weakref.WeakKeyDictionary()
)
_samples_lock = threading.Lock()


def collect_stats(router: Router | RayRouter, closed: bool) -> FederationStats:
    """Take a snapshot of ``router``'s state (under its lock) and measure its workers (outside it)."""
    workers: list[tuple[Any, dict[str, Any]]] = []
    with router.lock:
        counts = {"idle": 0, "busy": 0, "starting": 0, "other": 0}
        for index, slot in enumerate(router.slots):
            if slot is None:
                waiting = index in router.unstarted or index in router._replace_at
                counts["starting" if waiting else "other"] += 1
                continue
            state = "busy" if slot.state.value == "draining" else slot.state.value
            counts[state if state in counts else "other"] += 1
            for site, handle in slot.workers.items():
                workers.append(
                    (
                        handle,
                        {
                            "site": site,
                            "slot": slot.index,
                            "name": getattr(handle, "name", f"{site}/slot-{slot.index}"),
                            "state": state,
                            "pid": handle.pid,
                            "jobs_run": slot.jobs_run,
                        },
                    )
                )
        slots = SlotStats(
            total=len(router.slots),
            free=len(router.free),
            busy=counts["busy"],
            starting=counts["starting"],
            # An idle slot is free; this only differs for a moment while a slot is handed over.
            other=counts["other"] + max(0, counts["idle"] - len(router.free)),
            replaced=router.replaced,
        )
        jobs = {status: 0 for status in _STATUSES}
        for status, count in router.jobs_by_status.items():
            jobs[status] = jobs.get(status, 0) + count
        links = tuple(
            LinkStats(source=source, target=target, tokens=totals[0], bytes=totals[1])
            for (source, target), totals in sorted(router.links.items())
        )
        queue_depth = len(router.queue)
        # An ended job may hold its slot a moment longer, while its sites stop.
        running = sum(1 for job, _slot in router.running.values() if not job.done())
        dropped = router.dropped
        gave_up = router.gave_up
        backend = router.config.backend
        sites = tuple(site.name for site in router.config.sites)
    now = time.time()
    measured = [WorkerStats(**fields, **_measure(router, handle, now)) for handle, fields in workers]
    with _samples_lock:
        samples = _samples.get(router)
        if samples is not None:
            current = {worker.pid for worker in measured}
            for pid in set(samples) - current:
                del samples[pid]
    return FederationStats(
        time=now,
        backend=backend,
        sites=sites,
        closed=closed,
        slots=slots,
        workers=tuple(measured),
        queue_depth=queue_depth,
        running=running,
        jobs=jobs,
        submitted=sum(jobs.values()),
        links=links,
        dropped=dropped,
        gave_up=gave_up,
    )


def _measure(router: Router | RayRouter, handle: Any, now: float) -> dict[str, Any]:
    """Liveness, memory and CPU of one worker; memory and CPU only if it is a process of its own."""
    alive = handle.alive()
    result: dict[str, Any] = {"alive": alive}
    if not alive:
        return result
    # The backend's own measure says whether the worker is a process of its own.
    rss = handle.memory()
    if rss is None or handle.pid is None:
        return result
    result["rss"] = int(rss)
    try:
        process = psutil.Process(handle.pid)
        with process.oneshot():
            times = process.cpu_times()
            created = process.create_time()
    except Exception:  # noqa: BLE001 - psutil errors must not leak: the worker just ended
        return result
    cpu = float(times.user + times.system)
    with _samples_lock:
        samples = _samples.setdefault(router, {})
        previous = samples.get(handle.pid)
        samples[handle.pid] = (now, cpu)
    since, cpu_before = previous if previous is not None else (created, 0.0)
    elapsed = now - since
    result["cpu_seconds"] = round(cpu, 4)
    result["cpu_percent"] = round(100.0 * max(0.0, cpu - cpu_before) / elapsed, 2) if elapsed > 0 else 0.0
    return result
