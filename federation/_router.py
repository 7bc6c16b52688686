"""The router: the one client thread that moves a federation forward.

    user threads ── submit / send / cancel ──┐ (under the lock; never block on a pipe)
                                             v
    job queue (FIFO, bounded) ──> free slot ──> START to each participant
                                             ^
    router thread: poll() on                 │ slot freed when every site says DONE
      events pipes      (results, done, failed, send_to_job, logs)
      worker sentinels  (a worker died: fail or retry its job, replace the slot)
      worker output     (stdout/stderr lines, kept for WorkerDiedError)
      control pipes     (POLLOUT, only while bytes are pending)
      a wake-up pipe    (new work, close)
    with a timeout only for the nearest deadline (cancel grace, job timeout,
    start timeout, memory watchdog), never to notice work.

Ordering and races it relies on:

* Every state change happens under ``self.lock``; pipes are written without
  blocking (``_channel.Outbox``), so holding the lock never waits on a worker.
* START for a job is written to every participant before anything else for
  that job (stream inputs, aborts), on FIFO control pipes; a job that is still
  queued keeps its stream inputs until dispatch.
* A job ends exactly once (``Job._end``); its slot is freed only once every
  participant reported DONE (or the slot was killed), so the next job on the
  slot never shares a worker with a job still running there. Whatever arrives
  for a job that is not the slot's current one is dropped and counted.
* A dead worker's events pipe is drained before its death is reported, so the
  error carries what it logged last.
"""

from __future__ import annotations

import bisect
import errno
import itertools
import os
import pickle
import select
import signal
import threading
import time
from collections import deque
from typing import Any

from . import _messages as m
from ._callbacks import CallbackThread
from ._channel import Outbox
from ._config import FederationConfig
from ._exceptions import (
    FederationClosedError,
    FederationError,
    JobError,
    SerializationError,
    SiteStartError,
    StepFailedError,
    WorkerDiedError,
    describe_exitcode,
)
from ._execution import TRANSITIONS, JobExecution, SlotState, SlotTransitionError, fds_per_slot
from ._handle import Job, JobStatus
from ._log import SiteLogFiles, get_logger, log_worker_record, worker_log_level
from ._oom import oom_kill_count
from ._serialization import SegmentViews, load_exception, unlink_segments
from .backends import get_backend

__all__ = ["Router"]

_POLLIN = select.POLLIN | select.POLLHUP | select.POLLERR
_EVENTS, _SENTINEL, _OUTPUT, _STDOUT, _WAKE = range(5)
_MEMORY_CHECK_EVERY = 0.05  # seconds between RSS checks of busy workers (/proc reads, ~20 us each)
_TRIM_AFTER = 1.0  # seconds without jobs after which the client unmaps workers' segments
_CLOSE_NOTICE = 10.0  # seconds between warnings while close() waits for jobs

# Job ids are unique in the process, not per federation: two federations in one
# process would otherwise both log "job 1", "job 2"..., and nothing would tell
# their records apart.
_job_ids = itertools.count(1)
_job_ids_lock = threading.Lock()


class Router:
    """The pool, the job queue and the router thread of one federation."""

    def __init__(self, config: FederationConfig, callbacks: CallbackThread | None = None) -> None:
        self.config = config
        self.callbacks = callbacks if callbacks is not None else CallbackThread()
        _ensure_stdio()
        _raise_fd_limit(_fds_needed(config.pool_size, len(config.sites)))
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.backend = get_backend(config)
        self.log = get_logger("router")
        self.slots: list[JobExecution | None] = [None] * config.pool_size
        self.unstarted: list[int] = []  # slot indices waiting for the first wave to boot
        self.free: deque[JobExecution] = deque()
        self.queue: deque[Job] = deque()
        self.running: dict[int, tuple[Job, JobExecution]] = {}
        self.last_job_id = 0
        # The ids this federation issued, as runs [first, last] of consecutive ids:
        # usually one run; one per job only while another federation submits in between.
        self._issued: list[list[int]] = []
        self.closing = False
        self.stopped = False
        # Ctrl+C interrupted a wait on one of our jobs, and no job was submitted since:
        # closing now is the user's way out, so cancelled jobs get no grace.
        self.interrupted = False
        self.start_error: SiteStartError | None = None
        self.started = False
        self.dropped = 0
        self.replaced = 0
        self.restart_failures = 0  # failed starts in a row (a setup raised, a worker exited, a timeout)
        self.start_deaths = 0  # workers killed from outside while starting, in a row
        # Why the federation stopped restarting slots and failed every job; None while it serves.
        self.gave_up: str | None = None
        self._replace_at: dict[int, float] = {}  # slot index -> when to start its replacement
        self.jobs_by_status: dict[str, int] = {}
        self.links: dict[tuple[str, str], list[int]] = {}
        self._generation = 0
        self._lifeline_r, self._lifeline_w = os.pipe()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller = select.poll()
        self._fds: dict[int, tuple[int, JobExecution | None, str]] = {}
        self._register(self._wake_r, _WAKE, None, "")
        self._log_level = worker_log_level()
        self._pending_inputs: dict[int, list[tuple[str, bytes | None, bool]]] = {}
        self._input_seq: dict[tuple[int, str], int] = {}
        self._closed_inputs: dict[int, set[str]] = {}
        self._deadlines: dict[int, float] = {}
        self._next_memory_check = 0.0
        self._trim_at: float | None = None  # when an idle client closes its cached segment mappings
        # Stream-input items sent to a job, kept until it ends so that a retry gets them all.
        self._input_history: dict[int, list[tuple[str, bytes | None, bool]]] = {}
        self._history_bytes: dict[int, int] = {}
        self._unreplayable: dict[int, str] = {}
        self._retired: list[JobExecution] = []  # out of the pool, waiting for their workers to end
        self.log_files = SiteLogFiles(config.log_dir) if config.log_dir is not None else None
        self._released: list[tuple[str, str]] = []
        self._pending_out: set[Outbox] = set()  # control pipes with bytes waiting for room
        # Results are copied out of workers' segments at once, so a job handle the
        # user keeps never pins a worker's shared memory.
        self._views = SegmentViews(lambda creator, name: self._released.append((creator, name)))
        self.thread = threading.Thread(target=self._run, name="federation-router", daemon=True)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, wait: bool) -> None:
        """Start every slot and the router thread; with ``wait``, until all are ready.

        Raises:
            SiteStartError: a worker failed to start (everything started is stopped again).
        """
        try:
            with self.lock:
                first = self._first_wave()
                for index in range(self.config.pool_size):
                    if index < first:
                        self._start_slot(index)
                    else:
                        self.unstarted.append(index)
        except BaseException:
            self._abandon()
            raise
        self.thread.start()
        # Each worker has start_timeout (the router enforces it per slot); waves
        # start one after another, so the whole pool may take twice as long.
        waves = 2 if self.unstarted else 1
        deadline = time.monotonic() + waves * (self.config.start_timeout + 1.0)
        with self.lock:
            ok = self.changed.wait_for(
                lambda: (
                    self.start_error is not None
                    or (len(self.free) == len(self.slots) if wait else bool(self.free))
                ),
                max(0.0, deadline - time.monotonic()),
            )
            error = self.start_error
        if error is None and not ok:
            error = SiteStartError(
                f"the federation's workers were not ready within start_timeout={self.config.start_timeout} s",
                site="?",
            )
        if error is not None:
            self.shutdown(cancel_pending=True, timeout=0.0)
            raise error
        with self.lock:
            self.started = True

    def _first_wave(self) -> int:
        """How many slots to start at once; the rest start once the first has booted.

        Workers starting together share the CPUs: started all at once on 2 cores,
        every slot becomes ready at the same moment, late. A first wave that fits
        the CPUs boots early, so the first job can run while the rest start. The
        rest start as soon as the first wave's interpreters are up (BOOTED), not
        when its setups are done: a setup that waits on I/O holds nobody back.
        """
        if self.backend.name == "thread":
            return self.config.pool_size
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # pragma: no cover - not Linux
            cpus = os.cpu_count() or 1
        return max(1, cpus // len(self.config.sites))

    def _start_unstarted(self) -> None:
        while self.unstarted and not self.closing:
            index = self.unstarted.pop(0)
            try:
                self._start_slot(index)
            except Exception as exc:  # noqa: BLE001 - e.g. out of file descriptors
                error = SiteStartError(f"could not start slot {index}: {exc!r}", site="*")
                if not self.started:
                    self.start_error = self.start_error or error
                    self.changed.notify_all()
                    return
                self.log.error("could not start a slot", slot=index, error=repr(exc))

    def _start_slot(self, index: int) -> JobExecution:
        self._generation += 1
        slot = JobExecution(
            index,
            self._generation,
            self.config,
            self.backend,
            self._lifeline_r,
            self._log_level,
            self._on_pending,
        )
        self.slots[index] = slot
        slot.oom_kills = oom_kill_count()
        for site, reader in slot.events.items():
            self._register(reader.fileno(), _EVENTS, slot, site)
        for site, worker in slot.workers.items():
            self._register(worker.sentinel, _SENTINEL, slot, site)
            # stdout first: of two lines written in that order, poll() reports it first.
            # Never a blocking read: a process a step started may hold these pipes
            # open long after the worker died, and EOF would wait for it.
            if worker.stdout is not None:
                os.set_blocking(worker.stdout, False)
                self._register(worker.stdout, _STDOUT, slot, site)
            if worker.output is not None and worker.output != worker.sentinel:
                os.set_blocking(worker.output, False)
                self._register(worker.output, _OUTPUT, slot, site)
        self.log.debug("slot starting", slot=index, generation=slot.generation)
        return slot

    def _register(self, fd: int, kind: int, slot: JobExecution | None, site: str) -> None:
        self._fds[fd] = (kind, slot, site)
        self._poller.register(fd, _POLLIN)

    def _unregister(self, fd: int) -> None:
        if self._fds.pop(fd, None) is not None:
            try:
                self._poller.unregister(fd)
            except (KeyError, ValueError):
                pass

    def _on_pending(self, outbox: Outbox) -> None:
        # A control pipe is full (any thread): the router flushes it when it has room.
        self._pending_out.add(outbox)
        self.wake()

    def wake(self) -> None:
        """Make the router thread look at its state again."""
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # already awake, or closed

    # -- submitting ------------------------------------------------------------------------

    def next_job_id(self) -> int:
        """A new job id, unique among every federation of this process."""
        with self.lock:
            with _job_ids_lock:
                job_id = next(_job_ids)
            if self._issued and self._issued[-1][1] == job_id - 1:
                self._issued[-1][1] = job_id
            else:
                self._issued.append([job_id, job_id])
            self.last_job_id = job_id
            return job_id

    def issued(self, job_id: int) -> bool:
        """Whether this federation gave out ``job_id`` (ids of other federations are not its jobs)."""
        index = bisect.bisect_right(self._issued, [job_id, float("inf")]) - 1
        return index >= 0 and self._issued[index][0] <= job_id <= self._issued[index][1]

    def submit(self, job: Job, inputs: dict[str, bytes], block: bool, timeout: float | None) -> None:
        """Queue ``job``, or start it at once on a free slot."""
        job._inputs = inputs
        job._why_queued = self.why_queued
        job._on_interrupt = self.interrupt
        self.interrupted = False  # the user carried on after a Ctrl+C
        with self.lock:
            if len(self.queue) >= self.config.max_queued and not self.changed.wait_for(
                lambda: self.closing or len(self.queue) < self.config.max_queued,
                timeout if block else 0.0,
            ):
                from ._exceptions import QueueFullError

                raise QueueFullError(
                    f"the job queue is full (max_queued={self.config.max_queued}); "
                    "wait for jobs to finish, or submit with block=True"
                )
            if self.gave_up is not None:
                raise FederationError(f"the federation gave up and accepts no new jobs: {self.gave_up}")
            if self.closing:
                raise FederationClosedError("the federation is closed and accepts no new jobs")
            self._count(JobStatus.QUEUED)
            slot = self._take_free() if not self.queue else None
            if slot is not None:
                self._dispatch(job, slot)
            else:
                self.queue.append(job)

    def interrupt(self) -> None:
        """Ctrl+C interrupted a wait on a job (called in that thread, maybe holding no lock)."""
        self.interrupted = True

    def _cancel_grace(self) -> float:
        # After Ctrl+C the user wants out, not a cooperative stop: the closing
        # federation kills a cancelled job's slot at once, without a warning.
        return 0.0 if self.closing and self.interrupted else self.config.cancel_grace

    def why_queued(self, job: Job) -> str | None:
        """Why ``job`` still waits in the queue, in a line; None if it is not queued.

        Only for messages (a ``result(timeout=)`` that ran out): it walks the queue.
        """
        with self.lock:
            try:
                ahead = self.queue.index(job)
            except ValueError:
                return None
            reasons = []
            busy = sorted(self.running)
            starting = len(self.unstarted) + sum(
                1 for slot in self.slots if slot is not None and slot.state is SlotState.STARTING
            )
            if busy:
                shown = ", ".join(f"job {job_id}" for job_id in busy[:5]) + (", ..." if len(busy) > 5 else "")
                count = (
                    f"all {len(busy)}"
                    if len(busy) >= len(self.slots)
                    else f"{len(busy)} of {len(self.slots)}"
                )
                reasons.append(f"{count} slot(s) are busy ({shown})")
            if starting:
                reasons.append(f"{starting} slot(s) are still starting")
            if ahead:
                reasons.append(f"{ahead} job(s) are ahead of it in the queue")
            fed_by_streams = [job_id for job_id in busy if self.running[job_id][0]._compiled.stream_inputs]
            if fed_by_streams:
                reasons.append(
                    "a job fed by stream inputs holds its slot until they are closed "
                    f"(job(s) {fed_by_streams[:5]}); pool_size must exceed the number of such jobs"
                )
            detail = "; ".join(reasons) or "waiting for a free slot"
            return f"job {job.id} is still queued: {detail}"

    def _count(self, status: JobStatus, previous: JobStatus | None = None) -> None:
        if previous is not None:
            self.jobs_by_status[previous.value] -= 1
        self.jobs_by_status[status.value] = self.jobs_by_status.get(status.value, 0) + 1

    # -- the slot state machine -----------------------------------------------------------

    def _move(self, slot: JobExecution, state: SlotState) -> None:
        """The one place a slot changes state: checked against the table, free list kept equal."""
        if state is slot.state:
            return
        if state not in TRANSITIONS[slot.state]:
            raise SlotTransitionError(f"slot {slot.index}: {slot.state.value} -> {state.value} is not a move")
        if slot.state is SlotState.IDLE:
            self.free.remove(slot)
        slot.state = state
        if state is SlotState.IDLE:
            self.free.append(slot)
        slot.kill_deadline = None

    def _take_free(self) -> JobExecution | None:
        """A free slot whose workers are all alive, or None.

        A worker may have died a moment ago, before the router read its sentinel:
        a zero-timeout poll of the slot's sentinels catches that here, so the job
        goes to another slot (or waits) instead of starting on a dead worker.
        """
        while self.free:
            slot = self.free[0]
            dead = slot.dead_sites()
            if not dead:
                self._move(slot, SlotState.BUSY)
                return slot
            for site in dead:
                self._on_worker_gone(slot, site)
            if slot.state is SlotState.IDLE:  # pragma: no cover - a death always moves it out
                self._move(slot, SlotState.BROKEN)
        return None

    def _dispatch(self, job: Job, slot: JobExecution) -> None:
        """Start ``job`` on ``slot``, which ``_take_free`` has moved to BUSY."""
        compiled = job._compiled
        inputs = job._inputs
        slot.job = job
        slot.pending_sites = set(compiled.participants)
        self.running[job.id] = (job, slot)
        started = time.time()  # the attempt's start: before any site can start
        for site in compiled.participants:
            digest, plan = compiled.plans[site]
            cached = slot.plans[site]
            if digest not in cached:
                if len(cached) >= m.PLAN_CACHE:  # the worker evicts its oldest plan too
                    del cached[next(iter(cached))]
                slot.send(site, (m.PLAN, digest, plan))
                cached[digest] = None
            site_inputs = {
                name: inputs[name] for name in compiled.site_inputs.get(site, ()) if name in inputs
            }
            slot.send(site, (m.START, job.id, digest, site_inputs))
        # Bookkeeping after the sends: the workers start meanwhile. Their replies are
        # read under the lock this holds, so none can overtake it.
        if job.status is JobStatus.QUEUED:
            self._count(JobStatus.RUNNING, JobStatus.QUEUED)
        first = not job.attempts
        job._start_attempt(slot.index, started)
        if job.timeout is not None and first:
            # The timeout covers the whole job from its first start: every attempt,
            # and the waits in the queue between them.
            self._deadlines[job.id] = time.monotonic() + job.timeout
        if job.timeout is not None or self.config.max_worker_memory is not None:
            self.wake()  # the router may be waiting with no deadline at all
        for name, payload, close in self._pending_inputs.pop(job.id, ()):
            self._forward_input(job, slot, name, payload, close)

    def _dispatch_queued(self) -> None:
        while self.queue:
            if self.queue[0].done():
                self.queue.popleft()
                continue
            slot = self._take_free()
            if slot is None:
                break
            self._dispatch(self.queue.popleft(), slot)
        self.changed.notify_all()

    # -- stream inputs and inter-job tokens ------------------------------------------------

    def send_input(self, job: Job, name: str, payload: bytes | None, close: bool) -> str | None:
        """Feed (or close) stream input ``name`` of ``job``; the reason it was refused, or None."""
        compiled = job._compiled
        if name not in compiled.stream_inputs:
            streams = sorted(compiled.stream_inputs)
            kind = "a value input, given at submit" if name in compiled.value_inputs else "not an input of it"
            return f"{name!r} is {kind}; the pipeline's stream inputs are {streams}"
        with self.lock:
            if job.done():
                return f"job {job.id} has ended ({job.status.value})"
            closed = self._closed_inputs.setdefault(job.id, set())
            if name in closed:
                return f"stream input {name!r} of job {job.id} was closed"
            if close:
                closed.add(name)
            self._remember_input(job, name, payload, close)
            entry = self.running.get(job.id)
            if entry is None:
                self._pending_inputs.setdefault(job.id, []).append((name, payload, close))
            else:
                self._forward_input(job, entry[1], name, payload, close)
        return None

    def _remember_input(self, job: Job, name: str, payload: bytes | None, close: bool) -> None:
        """Keep a stream item for a retry, while the job may still be retried and under the bound."""
        if job.retries <= len(job.attempts) - 1 or job.id in self._unreplayable:
            return
        size = self._history_bytes.get(job.id, 0) + (len(payload) if payload is not None else 0)
        history = self._input_history.setdefault(job.id, [])
        if size > _REPLAY_BYTES or len(history) >= _REPLAY_ITEMS:
            self._unreplayable[job.id] = (
                f"its stream inputs carried more than a retry can replay "
                f"({_REPLAY_ITEMS:,} items or {_REPLAY_BYTES >> 20} MiB)"
            )
            self._input_history.pop(job.id, None)
            self._history_bytes.pop(job.id, None)
            return
        history.append((name, payload, close))
        self._history_bytes[job.id] = size

    def _forward_input(
        self, job: Job, slot: JobExecution, name: str, payload: bytes | None, close: bool
    ) -> None:
        key = (job.id, name)
        seq = self._input_seq.get(key, 0)
        per_site: dict[str, list[m.Token]] = {}
        for route in job._compiled.stream_inputs[name]:
            tokens = per_site.setdefault(route.site, [])
            if payload is not None:
                tokens.append((route.step, route.param, m.CLIENT, seq, payload, m.ITEM))
            if close:
                tokens.append((route.step, route.param, m.CLIENT, seq, None, m.END))
        self._input_seq[key] = seq + 1
        for site, tokens in per_site.items():
            slot.send(site, (m.TOKENS, job.id, tokens))

    def _send_to_job(self, slot: JobExecution, site: str, message: tuple[Any, ...]) -> None:
        _, request, _from_job, to_job, name, payload, close = message
        target = self._find_job(to_job)
        reason: str | None
        if target is None:
            reason = f"job {to_job} has ended" if self.issued(to_job) else f"job {to_job} does not exist"
        else:
            reason = self.send_input(target, name, payload, close)
        slot.send(site, (m.REPLY, request, reason))

    def _find_job(self, job_id: int) -> Job | None:
        entry = self.running.get(job_id)
        if entry is not None:
            return entry[0]
        for job in self.queue:
            if job.id == job_id:
                return job
        return None

    # -- cancelling, failing, ending -------------------------------------------------------

    def cancel_job(self, job: Job, reason: str) -> bool:
        with self.lock:
            if job.done():
                return False
            self._end_job(job, JobStatus.CANCELLED, job._cancelled_error(reason))
            return True

    def suspend_job(self, job: Job, suspend: bool) -> None:
        with self.lock:
            entry = self.running.get(job.id)
            if entry is None or job.done():
                raise FederationError(
                    f"job {job.id} is not running ({job.status.value}); only a running job can be suspended"
                )
            for worker in entry[1].workers.values():
                worker.suspend(suspend)
            job._set_status(JobStatus.SUSPENDED if suspend else JobStatus.RUNNING)

    def _end_job(self, job: Job, status: JobStatus, error: BaseException | None) -> None:
        """End ``job`` for its user now; abort its sites and free its slot once they stopped."""
        previous = job.status
        if not job._end(status, error):
            return
        self._count(status, JobStatus.RUNNING if previous is JobStatus.SUSPENDED else previous)
        self._deadlines.pop(job.id, None)
        self._pending_inputs.pop(job.id, None)
        self._closed_inputs.pop(job.id, None)
        self._input_history.pop(job.id, None)
        self._history_bytes.pop(job.id, None)
        self._unreplayable.pop(job.id, None)
        for key in [k for k in self._input_seq if k[0] == job.id]:
            del self._input_seq[key]
        entry = self.running.get(job.id)
        if entry is None:
            try:
                self.queue.remove(job)
            except ValueError:
                pass
            self.changed.notify_all()
            return
        slot = entry[1]
        if previous is JobStatus.SUSPENDED:
            for worker in slot.workers.values():
                worker.suspend(False)
        if slot.pending_sites and slot.state is SlotState.BUSY:
            reason = "cancelled" if status is JobStatus.CANCELLED else "failed"
            for site in slot.pending_sites:
                slot.send(site, (m.ABORT, job.id, reason))
            self._move(slot, SlotState.DRAINING)
            slot.kill_deadline = time.monotonic() + self._cancel_grace()
            self.wake()
        elif not slot.pending_sites:
            self._release(slot)
        self.changed.notify_all()

    def _release(self, slot: JobExecution) -> None:
        job = slot.job
        if job is not None:
            self.running.pop(job.id, None)
        if not self.running and self._views.has_cached():
            self._trim_at = time.monotonic() + _TRIM_AFTER
        slot.job = None
        slot.pending_sites = set()
        slot.jobs_run += 1
        if slot.state not in (SlotState.BUSY, SlotState.DRAINING):
            return
        limit = self.config.max_jobs_per_worker
        if limit is not None and slot.jobs_run >= limit:
            self.log.debug("recycling slot", slot=slot.index, jobs=slot.jobs_run)
            self._retire(slot, graceful=True)
            return
        self._move(slot, SlotState.IDLE)
        self._dispatch_queued()

    def _retire(self, slot: JobExecution, graceful: bool, delay: float = 0.0) -> None:
        """Take ``slot`` out of the pool for good; its replacement starts after ``delay`` s."""
        if graceful:
            self._move(slot, SlotState.STOPPING)
            slot.stop()
            slot.kill_deadline = time.monotonic() + self.config.shutdown_timeout
        else:
            self._move(slot, SlotState.BROKEN)
            slot.kill()
        if self.slots[slot.index] is slot:
            self.slots[slot.index] = None
            self._retired.append(slot)
            if not self.closing and self.gave_up is None:
                self.replaced += 1
                self._replace_at[slot.index] = time.monotonic() + delay
                self.wake()
        self._maybe_reap(slot)

    def _start_replacements(self) -> None:
        """Start the replacements that are due; one that cannot start is tried again later."""
        now = time.monotonic()
        for index, when in sorted(self._replace_at.items()):
            if when > now or self.closing or self.gave_up is not None:
                continue
            del self._replace_at[index]
            try:
                self._start_slot(index)
            except Exception as exc:  # noqa: BLE001 - e.g. a moment of fd pressure: it may pass
                self.start_deaths += 1
                delay = _backoff(self.start_deaths, cap=0.5)
                self.log.error(
                    "could not start a replacement slot; trying again",
                    slot=index,
                    error=repr(exc),
                    delay=delay,
                )
                self._replace_at[index] = now + delay

    def _maybe_reap(self, slot: JobExecution) -> None:
        """Close a retired slot once every one of its workers has ended."""
        if slot.state is SlotState.STOPPED or slot.alive():
            return
        for site, worker in slot.workers.items():
            self._drain_outputs(slot, site)
            self._unregister(worker.sentinel)
            for fd in (worker.output, worker.stdout):
                if fd is not None:
                    self._unregister(fd)
            worker.reap(1.0)
        for reader in slot.events.values():
            self._unregister(reader.fileno())
        for site in slot.sites:
            # A worker unlinks its own segments when it stops; these are a dead one's.
            unlink_segments(slot.shm_prefix(site))
        self._move(slot, SlotState.STOPPED)
        slot.close()
        if slot in self._retired:
            self._retired.remove(slot)
        if self.slots[slot.index] is slot:
            self.slots[slot.index] = None
        self.changed.notify_all()

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self.lock:
                    if self.stopped:
                        return
                    if self._replace_at:
                        self._start_replacements()
                    timeout = self._next_timeout()
                    pending = []
                    # A copy: other threads add to the set (under the GIL) at any time.
                    for outbox in list(self._pending_out):
                        if outbox.closed:  # its worker is gone: nothing will ever drain it
                            self._pending_out.discard(outbox)
                        else:
                            pending.append(outbox)
                for outbox in pending:
                    self._poller.register(outbox.fileno(), select.POLLOUT)
                try:
                    ready = self._poller.poll(timeout)
                except InterruptedError:
                    ready = []
                for outbox in pending:
                    fd = outbox.fileno()
                    if fd >= 0 and fd not in self._fds:
                        try:
                            self._poller.unregister(fd)
                        except (KeyError, ValueError):
                            pass
                with self.lock:
                    for fd, _mask in ready:
                        self._on_ready(fd)
                    for outbox in pending:
                        # Out of the set first: a send racing with this flush puts it back.
                        self._pending_out.discard(outbox)
                        try:
                            if not outbox.flush():
                                self._pending_out.add(outbox)
                        except OSError:
                            pass
                    self._on_deadlines()
        except BaseException as exc:  # pragma: no cover - a bug here must not hang users
            self.log.critical("router thread crashed", error=repr(exc), exc_info=True)
            with self.lock:
                self.closing = True
                for job in [*self.queue, *(entry[0] for entry in self.running.values())]:
                    self._end_job(
                        job, JobStatus.FAILED, FederationError(f"the federation's router crashed: {exc!r}")
                    )
                self.stopped = True
                self.changed.notify_all()

    def _all_slots(self) -> list[JobExecution]:
        return [slot for slot in self.slots if slot is not None] + list(self._retired)

    def _next_timeout(self) -> int | None:
        deadlines = list(self._deadlines.values())
        deadlines.extend(self._replace_at.values())
        if self._trim_at is not None:
            deadlines.append(self._trim_at)
        for slot in self._all_slots():
            if slot.kill_deadline is not None:
                deadlines.append(slot.kill_deadline)
            if slot.state is SlotState.STARTING:
                deadlines.append(slot.started_at + self.config.start_timeout)
        if self.config.max_worker_memory is not None and self.running:
            deadlines.append(self._next_memory_check)
        if not deadlines:
            return None
        return max(0, int((min(deadlines) - time.monotonic()) * 1000) + 1)

    def _on_ready(self, fd: int) -> None:
        entry = self._fds.get(fd)
        if entry is None:
            return
        kind, slot, site = entry
        if kind == _WAKE:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except (BlockingIOError, OSError):
                pass
        elif kind == _EVENTS:
            assert slot is not None
            reader = slot.events[site]
            for frame in reader.read():
                self._on_event(slot, site, pickle.loads(frame))
            if reader.eof:
                self._unregister(fd)  # the sentinel reports the death
        elif kind in (_OUTPUT, _STDOUT):
            assert slot is not None
            self._drain_output(slot, site, fd, kind == _STDOUT, final=False)
        elif kind == _SENTINEL:
            assert slot is not None
            self._on_worker_gone(slot, site)

    # -- events ----------------------------------------------------------------------------

    def _on_event(self, slot: JobExecution, site: str, message: tuple[Any, ...]) -> None:
        tag = message[0]
        if tag == m.RESULTS:
            self._on_results(slot, site, message[1], message[2])
        elif tag == m.DONE:
            self._on_done(slot, site, message[1], message[2], message[3])
        elif tag == m.FAILED:
            job = slot.job
            if job is None or job.id != message[1]:
                self.dropped += 1
                return
            _, job_id, step, data, tb = message
            cause = load_exception(data, tb)
            error = StepFailedError(
                f"step {step!r} of job {job_id} ({job.pipeline!r}) failed at site {site!r}: "
                f"{type(cause).__name__}: {cause}",
                job_id=job_id,
                site=site,
                step=step,
            )
            error.__cause__ = cause
            self._end_job(job, JobStatus.FAILED, error)
        elif tag == m.SEND_TO_JOB:
            self._send_to_job(slot, site, message)
        elif tag == m.LOG:
            for level, event, fields in message[1]:
                fields.setdefault("worker", f"{site}/slot-{slot.index}")
                if self.log_files is not None:
                    self.log_files.record(site, level, event, fields)
                slot.last_lines[site].append(
                    f"[{level}] {event} "
                    + " ".join(f"{k}={v}" for k, v in fields.items() if k not in ("site", "pid", "worker"))
                )
                log_worker_record(site, level, event, fields)
        elif tag == m.BOOTED:
            slot.booted.add(site)
            if self.unstarted and slot.booted == set(slot.sites):
                # The CPU-heavy part of this wave's start is over; its setups may be
                # slow but need not hold the next wave back.
                self._start_unstarted()
        elif tag == m.READY:
            slot.ready.add(site)
            slot.workers[site].mark_ready()
            if slot.ready == set(slot.sites) and slot.state is SlotState.STARTING:
                self._move(slot, SlotState.IDLE)
                self.restart_failures = 0
                self.start_deaths = 0
                self.log.debug(
                    "slot ready", slot=slot.index, seconds=round(time.monotonic() - slot.started_at, 3)
                )
                self._dispatch_queued()
        elif tag == m.START_FAILED:
            slot.start_failed = True
            self._on_start_failed(slot, site, f"a worker of site {site!r} failed to start", message[1])

    def _on_results(self, slot: JobExecution, site: str, job_id: int, batch: list[Any]) -> None:
        job = slot.job
        if job is None or job.id != job_id or job.done():
            self.dropped += len(batch)
            for _, _, payload in batch:
                self._views.discard(payload, site)
            self._send_releases(slot)
            return
        try:
            records = [
                (output, seq, self._views.loads(payload, site, copy=True)) for output, seq, payload in batch
            ]
        except Exception as exc:  # noqa: BLE001 - e.g. a class the client cannot import
            self._send_releases(slot)
            error = SerializationError(
                f"a result of job {job.id} from site {site!r} cannot be unpickled here: {exc}"
            )
            self._end_job(job, JobStatus.FAILED, error)
            return
        self._send_releases(slot)
        job._add_results(site, records)

    def _send_releases(self, slot: JobExecution) -> None:
        if not self._released:
            return
        by_site: dict[str, list[str]] = {}
        for creator, name in self._released:
            by_site.setdefault(creator, []).append(name)
        self._released.clear()
        for creator, names in by_site.items():
            slot.send(creator, (m.RELEASE, names))

    def _on_done(self, slot: JobExecution, site: str, job_id: int, ok: bool, info: dict[str, Any]) -> None:
        results = info.pop("results", None)
        if results:
            self._on_results(slot, site, job_id, results)
        job = slot.job
        if job is None or job.id != job_id:
            self.dropped += 1
            return
        slot.pending_sites.discard(site)
        if not ok:
            # The job was cancelled or failed here: processes its steps started
            # would outlive it (a step stopped cooperatively is not killed).
            killed = slot.workers[site].kill_strays()
            if killed:
                self.log.info(
                    "killed processes a stopped job left behind", site=site, job_id=job.id, count=killed
                )
        job._record("site_done", site=site, ok=ok, **info)
        for target, (count, size) in info.get("links", {}).items():
            totals = self.links.setdefault((site, target), [0, 0])
            totals[0] += count
            totals[1] += size
        if slot.pending_sites:
            return
        if not job.done():
            self._end_job(job, JobStatus.FINISHED, None)
        if self.running.get(job_id, (None, None))[1] is slot:
            self._release(slot)

    def _on_start_failed(self, slot: JobExecution, site: str, message: str, tb: str | None) -> None:
        """A slot could not start: its setup raised, a worker exited, or it timed out.

        Such failures in a row, beyond ``max_slot_restarts``, make the federation
        give up (they will not pass by themselves); each earlier one backs off.
        """
        if slot.state is not SlotState.STARTING:
            return
        error = SiteStartError(message, site=site, remote_traceback=tb)
        self.restart_failures += 1
        self.log.error("worker failed to start", site=site, slot=slot.index, traceback=tb)
        if not self.started:
            # The federation must not come up half-started: its constructor raises this.
            self.start_error = self.start_error or error
        elif self.restart_failures > self.config.max_slot_restarts:
            self._retire(slot, graceful=False)
            self._give_up(error, tb)
            return
        self._retire(slot, graceful=False, delay=_backoff(self.restart_failures))
        self.changed.notify_all()

    def _give_up(self, error: SiteStartError, tb: str | None) -> None:
        """Stop restarting: fail every job held, refuse new ones, say why everywhere."""
        cause = (
            f"{error} ({self.restart_failures} failed starts in a row, "
            f"max_slot_restarts={self.config.max_slot_restarts})"
        )
        self.gave_up = cause
        self._replace_at.clear()
        self.log.critical("the federation gave up restarting its workers", cause=cause)
        for job in [*self.queue, *(entry[0] for entry in self.running.values())]:
            failure = SiteStartError(
                f"job {job.id} ({job.pipeline!r}) could not run: the federation gave up: {cause}",
                site=error.site,
                remote_traceback=tb,
            )
            failure.job_id = job.id  # type: ignore[attr-defined]
            self._end_job(job, JobStatus.FAILED, failure)
        for slot in [s for s in self.slots if s is not None]:
            if slot.state in (SlotState.IDLE, SlotState.STARTING, SlotState.BUSY, SlotState.DRAINING):
                self._retire(slot, graceful=False)
        self.changed.notify_all()

    # -- deaths ----------------------------------------------------------------------------

    def _drain_outputs(self, slot: JobExecution, site: str) -> None:
        """Read what is left of a gone worker's stdout and stderr."""
        worker = slot.workers[site]
        for fd, stdout in ((worker.stdout, True), (worker.output, False)):
            if fd is not None:
                self._drain_output(slot, site, fd, stdout, final=True)

    def _drain_output(self, slot: JobExecution, site: str, fd: int, stdout: bool, final: bool) -> None:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                self._unregister(fd)
                break
            key = (site, fd)
            data = slot.partial_output.pop(key, b"") + chunk
            *lines, rest = data.split(b"\n")
            if rest:
                slot.partial_output[key] = rest
            for raw in lines:
                self._output_line(slot, site, raw, stdout)
            if not final:
                break
        if final and slot.partial_output.get((site, fd)):
            self._output_line(slot, site, slot.partial_output.pop((site, fd)), stdout)

    def _output_line(self, slot: JobExecution, site: str, raw: bytes, stdout: bool) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        slot.last_lines[site].append(line)
        if self.log_files is not None:
            self.log_files.output(site, f"{site}/slot-{slot.index}", line)
        if self.config.echo_worker_output:
            import sys

            # What a step printed goes to the client's stream of the same name.
            stream = sys.stdout if stdout else sys.stderr
            try:
                stream.write(f"[{site}/slot-{slot.index}] {line}\n")
                if stdout:
                    stream.flush()  # a pipe or file would hold it back, behind later stderr lines
            except (OSError, ValueError):
                pass

    def _on_worker_gone(self, slot: JobExecution, site: str) -> None:
        worker = slot.workers[site]
        self._unregister(worker.sentinel)
        reader = slot.events[site]
        if reader.fileno() in self._fds:
            # What the worker said before it died comes first: results, a FAILED, its
            # last logs. All of it is in the pipe already (a dead process writes no
            # more), so this reads without waiting: a process the step started may
            # hold the write end open for ever, and EOF is not worth waiting for.
            while True:
                frames = reader.read()
                for frame in frames:
                    self._on_event(slot, site, pickle.loads(frame))
                if not frames:
                    break
            self._unregister(reader.fileno())
        self._drain_outputs(slot, site)
        exitcode = worker.reap(1.0)
        if slot.state in (SlotState.STOPPING, SlotState.BROKEN, SlotState.STOPPED):
            self._maybe_reap(slot)
            return
        reason = self._death_reason(slot, site, exitcode)
        description = f"{describe_exitcode(exitcode)}" if exitcode is not None else "gone"
        last = tuple(slot.last_lines[site])
        if slot.state is SlotState.STARTING:
            if exitcode is not None and exitcode < 0 and not slot.start_failed:
                # Killed from outside while it started: a death, which may pass, not a
                # failed setup. Replace it, backing off, and never give up for it.
                self.start_deaths += 1
                self.log.warning(
                    "worker killed while starting; replacing it",
                    site=site,
                    slot=slot.index,
                    exitcode=description,
                )
                self._retire(slot, graceful=False, delay=_backoff(self.start_deaths, cap=0.5))
                return
            self._on_start_failed(
                slot,
                site,
                f"a worker of site {site!r} (pid {worker.pid}) exited during start: {description}",
                "\n".join(last) or None,
            )
            return
        job = slot.job
        if job is not None and not job.done():
            slot.job = None
            self._retry_or_fail(job, slot, self._died_error(slot, site, job, exitcode, reason, last))
        elif job is not None:
            self.running.pop(job.id, None)
        self._retire(slot, graceful=False)
        self.log.warning(
            "worker died",
            site=site,
            slot=slot.index,
            pid=worker.pid,
            exitcode=describe_exitcode(exitcode),
            reason=reason,
        )

    def _died_error(
        self,
        slot: JobExecution,
        site: str,
        job: Job,
        exitcode: int | None,
        reason: str,
        last: tuple[str, ...],
    ) -> WorkerDiedError:
        worker = slot.workers[site]
        description = describe_exitcode(exitcode) if exitcode is not None else "gone"
        detail = f" ({reason})" if reason not in ("exited", "killed by a signal") else ""
        return WorkerDiedError(
            f"the worker of site {site!r} (pid {worker.pid}) running job {job.id} ({job.pipeline!r}) "
            f"died: {description}{detail}",
            job_id=job.id,
            site=site,
            pid=worker.pid,
            exitcode=exitcode,
            reason=reason,
            last_log=last,
        )

    def _death_reason(self, slot: JobExecution, site: str, exitcode: int | None) -> str:
        if slot.memory_killed == site:
            return "memory limit"
        if exitcode == -signal.SIGKILL and slot.oom_kills is not None:
            now = oom_kill_count()
            if now is not None and now > slot.oom_kills:
                return "out of memory: the kernel's OOM killer killed it"
        if exitcode is not None and exitcode < 0:
            return "killed by a signal"
        return "exited"

    def _retry_or_fail(self, job: Job, slot: JobExecution, error: JobError) -> None:
        """Run ``job`` again as a fresh attempt if it may be retried, else fail it with ``error``."""
        self.running.pop(job.id, None)
        slot.job = None
        job._end_attempt(f"{type(error).__name__}: {error}")
        refused = None
        if len(job.attempts) <= job.retries and not self.closing and self.gave_up is None:
            refused = self._unreplayable.get(job.id) or job._reset_for_retry()
            if refused is None:
                self.log.info("retrying job on a fresh slot", job_id=job.id, attempt=len(job.attempts) + 1)
                job._record("retry", error=repr(error))
                previous = job.status
                job._set_status(JobStatus.QUEUED)
                self._count(
                    JobStatus.QUEUED, JobStatus.RUNNING if previous is JobStatus.SUSPENDED else previous
                )
                self._input_seq = {k: v for k, v in self._input_seq.items() if k[0] != job.id}
                # The new attempt gets every stream item the old one was sent, in order.
                self._pending_inputs[job.id] = list(self._input_history.get(job.id, ()))
                self.queue.appendleft(job)
                self._dispatch_queued()
                return
            if error.args and isinstance(error.args[0], str):
                error.args = (f"{error.args[0]}; not retried: {refused}", *error.args[1:])
        self._end_job(job, JobStatus.FAILED, error)

    # -- deadlines -------------------------------------------------------------------------

    def _on_deadlines(self) -> None:
        now = time.monotonic()
        if self._trim_at is not None and self._trim_at <= now:
            self._trim_at = None
            if not self.running:
                # Idle: what workers' segments this client still maps is given back too.
                self._views.trim()
        for job_id, deadline in list(self._deadlines.items()):
            if deadline <= now:
                job = self._find_job(job_id)  # running, or queued again for a retry
                self._deadlines.pop(job_id, None)
                if job is not None:
                    self._end_job(
                        job, JobStatus.CANCELLED, job._cancelled_error(f"timed out after {job.timeout} s")
                    )
        for slot in self._all_slots():
            if (
                slot.kill_deadline is not None
                and slot.kill_deadline <= now
                and slot.state is SlotState.DRAINING
            ):
                (self.log.debug if self.closing and self.interrupted else self.log.warning)(
                    "killing a slot whose job did not stop in time",
                    slot=slot.index,
                    grace=self._cancel_grace(),
                )
                if slot.job is not None:
                    self.running.pop(slot.job.id, None)
                slot.job = None
                self._retire(slot, graceful=False)
            elif slot.state is SlotState.STARTING and slot.started_at + self.config.start_timeout <= now:
                missing = sorted(set(slot.sites) - slot.ready)
                self._on_start_failed(
                    slot,
                    missing[0] if missing else "?",
                    f"workers of sites {missing} were not ready within "
                    f"start_timeout={self.config.start_timeout} s",
                    None,
                )
            elif (
                slot.state is SlotState.STOPPING
                and slot.kill_deadline is not None
                and slot.kill_deadline <= now
            ):
                self._move(slot, SlotState.BROKEN)
                slot.kill()
        if self.config.max_worker_memory is not None and self.running and now >= self._next_memory_check:
            # The watchdog runs only while jobs run: an idle federation uses no CPU.
            self._next_memory_check = now + _MEMORY_CHECK_EVERY
            self._check_memory()

    def _check_memory(self) -> None:
        limit = self.config.max_worker_memory
        assert limit is not None
        for _, slot in list(self.running.values()):
            for site, worker in slot.workers.items():
                rss = worker.memory()
                if rss is not None and rss > limit:
                    self.log.warning(
                        "worker over its memory limit", site=site, slot=slot.index, rss=rss, limit=limit
                    )
                    slot.memory_killed = site
                    worker.kill()
                    break

    # -- shutting down ---------------------------------------------------------------------

    def shutdown(self, cancel_pending: bool, timeout: float | None) -> None:
        """Stop accepting jobs; finish or cancel the rest; stop, then kill, every worker."""
        with self.lock:
            self.closing = True
            self.changed.notify_all()
            if cancel_pending:
                for job in [*self.queue, *(entry[0] for entry in self.running.values())]:
                    self._end_job(job, JobStatus.CANCELLED, job._cancelled_error("the federation was closed"))
            for job, slot in list(self.running.values()):
                if job.status is JobStatus.SUSPENDED:  # a suspended job could never finish
                    for worker in slot.workers.values():
                        worker.suspend(False)
                    job._set_status(JobStatus.RUNNING)
            started = self.thread.is_alive()
        if started:
            with self.lock:
                self._wait_for_jobs(timeout)
                for job in [*self.queue, *(entry[0] for entry in self.running.values())]:
                    self._end_job(
                        job,
                        JobStatus.CANCELLED,
                        job._cancelled_error("the federation was closed before it finished"),
                    )
                self._replace_at.clear()
                for slot in self._all_slots():
                    if slot.state in (SlotState.STARTING, SlotState.IDLE, SlotState.BUSY, SlotState.DRAINING):
                        self._retire(slot, graceful=True)
                    else:
                        self._maybe_reap(slot)
                self.wake()
                self.changed.wait_for(
                    lambda: not self._all_slots() or self.stopped, self.config.shutdown_timeout + 2.0
                )
                for slot in self._all_slots():
                    slot.kill()  # did not stop within shutdown_timeout: whole process trees
                self.wake()
                self.changed.wait_for(lambda: not self._all_slots() or self.stopped, 5.0)
                self.stopped = True
                self.wake()
            self.thread.join(10.0)
        self._abandon()

    def _wait_for_jobs(self, timeout: float | None) -> None:
        """Wait for queued and running jobs to end, saying every so often which ones are left.

        A job waiting on a stream input nobody closes would otherwise make
        ``close()`` hang without a word.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.changed.wait_for(
            lambda: (not self.queue and not self.running) or self.stopped,
            _CLOSE_NOTICE if deadline is None else max(0.0, min(_CLOSE_NOTICE, deadline - time.monotonic())),
        ):
            if deadline is not None and time.monotonic() >= deadline:
                return
            left = sorted([job.id for job in self.queue] + list(self.running))
            self.log.warning(
                "close() is waiting for jobs to finish; cancel them, or close(cancel_pending=True)",
                jobs=left[:20],
                count=len(left),
            )

    def _abandon(self) -> None:
        """Kill and close whatever is left; close the router's own pipes. Idempotent."""
        with self.lock:
            self.stopped = True
            for slot in self._all_slots():
                slot.kill()
                for worker in slot.workers.values():
                    worker.reap(1.0)
                for site in slot.sites:
                    unlink_segments(slot.shm_prefix(site))
                slot.close()
            self._views.close()
            self.backend.close()
            if self.log_files is not None:
                self.log_files.close()
            self.slots = [None] * len(self.slots)
            self.unstarted.clear()
            self._retired.clear()
            self._replace_at.clear()
            self.free.clear()
            for fd in (self._lifeline_w, self._lifeline_r, self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError as exc:
                    if exc.errno != errno.EBADF:
                        raise
            self._lifeline_w = self._lifeline_r = self._wake_r = self._wake_w = -1
            self.changed.notify_all()


# -- helpers ---------------------------------------------------------------------------------

_REPLAY_ITEMS = 100_000  # stream-input items kept per job for a retry
_REPLAY_BYTES = 64 << 20  # and their bytes; beyond either, the job is not retried (and says so)


def _backoff(failures: int, cap: float = 2.0) -> float:
    """Seconds to wait before the next start after ``failures`` failed starts in a row."""
    if failures <= 0:
        return 0.0
    return float(min(0.05 * 2 ** (failures - 1), cap))


def _ensure_stdio() -> None:
    """Open /dev/null on any of fds 0-2 that is closed (a daemon, ``cmd <&- >&-``).

    Otherwise the first pipes made here would get those numbers, and a worker
    started with them as its stdin or stdout would lose its control pipe.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)
            if opened != fd:  # pragma: no cover - a lower fd was free after all
                os.dup2(opened, fd)
                os.close(opened)


def _fds_needed(pool_size: int, sites: int) -> int:
    """Open files the client needs for its pool: one slot starting while the others run."""
    # A running slot keeps control and events pipes and each worker's output pipes and
    # pidfd (5 per site); a starting one briefly holds both ends of every link too.
    return fds_per_slot(sites) + (pool_size - 1) * 5 * sites


def _raise_fd_limit(needed: int) -> None:
    """Raise the soft limit on open files towards the hard one when the pool needs more.

    Raises:
        ConfigError: even the hard limit is too low for this pool.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and needed + 64 > hard:
        from ._exceptions import ConfigError

        raise ConfigError(
            f"this pool needs about {needed:,} open files while a slot starts, over the hard limit "
            f"of {hard:,} (RLIMIT_NOFILE): each slot links every pair of sites; use fewer sites per "
            f"federation or a smaller pool_size, or raise the hard limit (ulimit -Hn)"
        )
    want = needed + 256  # the client's own files beside the pool's pipes
    if soft == resource.RLIM_INFINITY or want <= soft:
        return
    target = want if hard == resource.RLIM_INFINITY else min(hard, max(want, soft))
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):  # pragma: no cover - not allowed here
        return
    get_logger("router").info("raised the open-file limit for the pool", soft=soft, now=target, needed=want)
