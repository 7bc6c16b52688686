"""The router: the one client thread that moves a local federation forward.

Three layers, one lock: :mod:`._jobs` is the job side, shared by every
transport (queue, attempts, inputs, deadlines, ending exactly once);
:mod:`._pool` keeps the slots and their state machine; this module is the
local transport's thread, which reads the workers' pipes and sentinels.

    user threads ── submit / send / cancel ──┐ (under the lock; never block on a pipe)
                                             v
    job queue (FIFO, bounded) ──> free slot ──> START to each participant
                                             ^
    router thread: poll() on                 │ slot freed when every site says DONE
      events pipes      (results, done, failed, send_to_job, logs)
      worker sentinels  (a worker died: fail or retry its job, replace the slot)
      worker output     (stdout/stderr lines, kept for WorkerDiedError)
      control pipes     (EPOLLOUT, only while bytes are pending)
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

import errno
import os
import pickle
import select
import signal
import threading
import time
from typing import Any

from . import _messages as m
from ._callbacks import CallbackThread
from ._config import FederationConfig
from ._exceptions import (
    SerializationError,
    SiteStartError,
    WorkerDiedError,
    describe_exitcode,
)
from ._execution import JobExecution, SlotState
from ._handle import Job, JobStatus
from ._oom import oom_kill_count
from ._pool import EVENTS, OUTPUT, SENTINEL, STDOUT, WAKE, SlotPool
from ._serialization import unlink_segments
from ._slot_policy import backoff

__all__ = ["Router"]

_MEMORY_CHECK_EVERY = 0.05  # seconds between RSS checks of busy workers (/proc reads, ~20 us each)


class Router(SlotPool):
    """The router thread of one federation: its poll loop, the workers' events, their deaths."""

    def __init__(self, config: FederationConfig, callbacks: CallbackThread | None = None) -> None:
        super().__init__(config, callbacks)
        self.thread = threading.Thread(target=self._run, name="federation-router", daemon=True)

    def start(self, wait: bool) -> None:
        """Start every slot and the router thread; with ``wait``, until all are ready.

        Raises:
            SiteStartError: a worker failed to start (everything started is stopped again).
        """
        try:
            # Before any worker: a site's setup may connect to its services.
            self.services.start()
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

    # -- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._poller.close()  # the thread's own; _abandon closes it if the thread never ran

    def _loop(self) -> None:
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
                watched = []
                for outbox in pending:
                    try:
                        self._poller.register(outbox.fileno(), select.EPOLLOUT)
                        watched.append(outbox.fileno())
                    except (OSError, ValueError):  # closed meanwhile: the flush below says so
                        pass
                try:
                    ready = self._poller.poll(-1 if timeout is None else timeout / 1000)
                except InterruptedError:
                    ready = []
                for fd in watched:
                    try:
                        self._poller.unregister(fd)
                    except (OSError, ValueError):
                        pass
                with self.lock:
                    if any(fd not in self._fds and fd not in watched for fd, _ in ready):
                        self._rebuild_poller()  # a file closed while registered (see there)
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
        except BaseException as exc:  # noqa: BLE001  # pragma: no cover - a bug here must not hang users
            self._router_crashed(exc)

    def _next_timeout(self) -> int | None:
        watching = self.config.max_worker_memory is not None and self.running
        deadline = self._next_deadline(self._trim_at, self._next_memory_check if watching else None)
        if deadline is None:
            return None
        return max(0, int((deadline - time.monotonic()) * 1000) + 1)

    def _on_ready(self, fd: int) -> None:
        entry = self._fds.get(fd)
        if entry is None:
            return
        kind, slot, site = entry
        if kind == WAKE:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except (BlockingIOError, OSError):
                pass
        elif kind == EVENTS:
            assert slot is not None
            reader = slot.events[site]
            for frame in reader.read():
                self._on_event(slot, site, pickle.loads(frame))
            if reader.eof:
                self._unregister(fd)  # the sentinel reports the death
        elif kind in (OUTPUT, STDOUT):
            assert slot is not None
            self._drain_output(slot, site, fd, kind == STDOUT, final=False)
        elif kind == SENTINEL:
            assert slot is not None
            self._on_worker_gone(slot, site)

    # -- events ------------------------------------------------------------------------------

    def _on_event(self, slot: JobExecution, site: str, message: tuple[Any, ...]) -> None:
        if self._on_job_event(slot, site, message, f"{site}/slot-{slot.index}"):
            return
        tag = message[0]
        if tag == m.BOOTED:
            slot.booted.add(site)
            if self.unstarted and slot.booted == set(slot.sites):
                # The CPU-heavy part of this wave's start is over; its setups may be
                # slow but need not hold the next wave back.
                self._start_unstarted()
        elif tag == m.READY:
            slot.workers[site].mark_ready()
            self._site_ready(slot, site)

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

    # -- deaths ------------------------------------------------------------------------------

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
                self._retire(slot, graceful=False, delay=backoff(self.start_deaths, cap=0.5))
                return
            self._on_start_failed(
                slot,
                site,
                f"a worker of site {site!r} (pid {worker.pid}) exited during start: {description}",
                "\n".join(last) or None,
            )
            return
        job = slot.job
        if job is not None and self._death_tolerated(slot, job, site, description):
            # Inside a tolerant fan-in: the job goes on; the slot is replaced after it.
            slot.pending_sites.discard(site)
            slot.site_kill.pop(site, None)
            slot.repair = True
            self.log.warning(
                "worker died inside a tolerant fan-in", site=site, slot=slot.index, job_id=job.id
            )
            self._maybe_finish(slot, job)
            return
        if job is not None and not job.done():
            slot.job = None
            self._retry_or_fail(job, self._died_error(slot, site, job, exitcode, reason, last))
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

    def _death_tolerated(self, slot: JobExecution, job: Job, site: str, description: str) -> bool:
        """Whether ``job`` goes on after ``site``'s worker died: a site it runs without,
        one a tolerant fan-in gave up on, or one whose values only go to tolerant fan-ins."""
        if site in job._absent or site in job._excused:
            return True
        if site not in job._compiled.tolerant:
            return False
        if site not in slot.pending_sites:
            return True  # it had delivered and reported DONE: nothing of the job is lost
        return self._site_lost(job, slot, site, m.DIED, f"its worker died: {description}")

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

    # -- deadlines and shutting down ---------------------------------------------------------

    def _on_deadlines(self) -> None:
        now = time.monotonic()
        if self._trim_at is not None and self._trim_at <= now:
            self._trim_at = None
            if not self.running:
                # Idle: what workers' segments this client still maps is given back too.
                self._views.trim()
        self._on_slot_deadlines(now)
        if self.config.max_worker_memory is not None and self.running and now >= self._next_memory_check:
            # The watchdog runs only while jobs run: an idle federation uses no CPU.
            self._next_memory_check = now + _MEMORY_CHECK_EVERY
            self._check_memory()

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
            if not self.thread.is_alive():
                self._poller.close()  # else the thread closes it as it returns
            self.backend.close()
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
        # After every worker, and outside the lock: it waits up to each service's stop_grace.
        self.services.stop()
        if self.log_files is not None:
            self.log_files.close()
