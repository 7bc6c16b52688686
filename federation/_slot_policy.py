"""The pool's policy, written once for every transport: slots, failed starts, deadlines, what sites say.

Where this sits::

    JobSide      jobs: queue, attempts, stream inputs, job deadlines, ending      _jobs.py
      └── SlotPolicy   slots: the state table, retire and replace, give up,     this module
            │          slot deadlines, the events every transport's sites send
            ├── SlotPool ── Router                 pipes and processes         _pool.py, _router.py
            └── RayPool ── RayEvents ── RayRouter  Ray actors                  _ray_pool.py, _ray_events.py,
                                                                               _ray_router.py

A transport supplies how a slot is started (``_start_slot``), reaped once its
workers are gone (``_maybe_reap``), how one late site is killed
(``_kill_late_site``), how results are loaded (``_on_results``), and what a
stopped site leaves behind (``_site_stopped``). The decisions themselves (when
a slot is broken, replaced, given up on; what a FAILED, DONE, CUT or
``send_to_job`` does to a job) are made here, once, under the job side's lock.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from typing import Any, Protocol, TypeVar

from . import _messages as m
from ._callbacks import CallbackThread
from ._config import FederationConfig
from ._exceptions import (
    FederationClosedError,
    FederationError,
    JobError,
    QuorumError,
    SiteStartError,
    StepFailedError,
)
from ._execution import TRANSITIONS, SlotState, SlotTransitionError
from ._fault_control import FaultControl
from ._handle import Job, JobStatus
from ._jobs import JobSide
from ._log import SiteLogFiles, log_worker_record
from ._serialization import load_exception

__all__ = ["Slot", "SlotPolicy", "backoff"]


class Slot(Protocol):
    """What the policy needs of a slot: one worker per site, and what the client knows of them."""

    index: int
    state: SlotState
    job: Job | None
    ready: set[str]
    started_at: float
    kill_deadline: float | None
    site_kill: dict[str, float]
    pending_sites: set[str]
    repair: bool
    jobs_run: int
    start_failed: bool
    last_lines: dict[str, deque[str]]

    @property
    def sites(self) -> tuple[str, ...]: ...

    @property
    def workers(self) -> Mapping[str, Any]: ...

    def send(self, site: str, message: tuple[Any, ...], /) -> Any: ...

    def stop(self) -> None: ...

    def kill(self) -> None: ...


SlotT = TypeVar("SlotT", bound=Slot)


class SlotPolicy(JobSide[SlotT], FaultControl):
    """Slots and their states, retiring and replacing them, giving up, and the sites' job events."""

    #: How logs name a site's worker: "worker" (a process), "site actor" (Ray).
    worker_noun = "worker"

    def __init__(self, config: FederationConfig, callbacks: CallbackThread | None = None) -> None:
        super().__init__(config, callbacks)
        self.slots: list[SlotT | None] = [None] * config.pool_size
        self.free: deque[SlotT] = deque()  # exactly the IDLE slots (see _move)
        # Slot indices waiting for the first wave to boot (the process pool starts in waves).
        self.unstarted: list[int] = []
        self.start_error: SiteStartError | None = None
        self.started = False
        self.replaced = 0
        self.restart_failures = 0  # failed starts in a row (a setup raised, a worker exited, a timeout)
        self.start_deaths = 0  # workers killed from outside while starting, in a row
        self.dropped = 0  # messages for a job that is no longer their slot's
        self.links: dict[tuple[str, str], list[int]] = {}  # (site, target) -> [tokens, bytes]
        self._replace_at: dict[int, float] = {}  # slot index -> when to start its replacement
        self._generation = 0
        self._retired: list[SlotT] = []  # out of the pool, waiting for their workers to end
        self.log_files = SiteLogFiles(config.log_dir) if config.log_dir is not None else None

    # -- what a transport provides ------------------------------------------------------------

    def _maybe_reap(self, slot: SlotT) -> None:
        """Mark a retired slot STOPPED once every one of its workers has ended."""
        raise NotImplementedError

    def _kill_late_site(self, slot: SlotT, site: str) -> None:
        """``site`` was told to stop (a tolerant fan-in cut it) and its grace is over."""
        raise NotImplementedError

    def _on_results(self, slot: SlotT, site: str, job_id: int, batch: list[Any]) -> None:
        """A batch of ``job_id``'s results from ``site``: load them and give them to the job."""
        raise NotImplementedError

    def _site_stopped(self, slot: SlotT, site: str, job: Job) -> None:
        """``site`` ended ``job`` early (cancelled or failed): clean up what its steps left."""

    def _not_ready_detail(self) -> str:
        """Why workers may not be ready yet, for a start timeout's message ("" if nothing to add)."""
        return ""

    def _on_released(self) -> None:
        """A slot was released (the lock is held): a transport may schedule idle work."""

    def _router_crashed(self, exc: BaseException) -> None:
        """The router thread is ending on a bug: fail every job it holds rather than hang their callers."""
        self.log.critical("router thread crashed", error=repr(exc), exc_info=True)
        with self.lock:
            self.closing = True
            for job in [*self.queue, *(entry[0] for entry in self.running.values())]:
                self._end_job(
                    job, JobStatus.FAILED, FederationError(f"the federation's router crashed: {exc!r}")
                )
            self.stopped = True
            self.changed.notify_all()

    # -- the pool as a whole ----------------------------------------------------------------

    def _not_whole(self) -> list[str]:
        """Which slots are not up yet (booting, or waiting to be replaced); empty when none."""
        waiting = [f"slot {i} (replacement not started yet)" for i in sorted(self._replace_at)]
        waiting += [f"slot {i} (not started yet)" for i in self.unstarted]
        for slot in self.slots:
            if slot is not None and slot.state is SlotState.STARTING:
                booting = sorted(set(slot.sites) - slot.ready)
                waiting.append(f"slot {slot.index} (starting: {', '.join(booting)})")
        return waiting

    def wait_ready(self, timeout: float | None) -> None:
        """Block until every slot has started: none booting, none waiting to be replaced.

        Busy slots count: they are up. Raises TimeoutError naming the slots still
        starting, FederationClosedError once closing, FederationError once the
        federation gave up restarting.
        """
        with self.lock:
            whole = self.changed.wait_for(
                lambda: self.closing or self.gave_up is not None or not self._not_whole(), timeout
            )
            if self.gave_up is not None:
                raise FederationError(
                    f"the federation gave up restarting its {self.worker_noun}s: {self.gave_up}"
                )
            if self.closing:
                raise FederationClosedError("the federation is closed")
            if not whole:
                raise TimeoutError(
                    f"the pool was not whole within {timeout} s: {'; '.join(self._not_whole())}"
                    f"{self._not_ready_detail()}"
                )

    # -- the slot state machine -------------------------------------------------------------

    def _move(self, slot: SlotT, state: SlotState) -> None:
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

    def _retire(self, slot: SlotT, graceful: bool, delay: float = 0.0) -> None:
        """Take ``slot`` out of the pool for good; its replacement starts after ``delay`` s."""
        if graceful:
            self._move(slot, SlotState.STOPPING)
            slot.stop()
            slot.kill_deadline = time.monotonic() + self.config.shutdown_timeout
        else:
            self._move(slot, SlotState.BROKEN)
            slot.kill()
            if slot.job is not None:
                # A broken slot never reports DONE: its job (ended already, or about
                # to be by the caller) no longer holds it, nor close().
                self.running.pop(slot.job.id, None)
                slot.job = None
        if self.slots[slot.index] is slot:
            self.slots[slot.index] = None
            self._retired.append(slot)
            if not self.closing and self.gave_up is None:
                self.replaced += 1
                self._replace_at[slot.index] = time.monotonic() + delay
                self.wake()
        self._maybe_reap(slot)

    def _all_slots(self) -> list[SlotT]:
        return [slot for slot in self.slots if slot is not None] + list(self._retired)

    def _site_ready(self, slot: SlotT, site: str) -> None:
        """``site``'s worker on ``slot`` is ready; the slot is IDLE once all are."""
        slot.ready.add(site)
        if slot.ready == set(slot.sites) and slot.state is SlotState.STARTING:
            self._move(slot, SlotState.IDLE)
            self.restart_failures = 0
            self.start_deaths = 0
            self.log.debug(
                "slot ready", slot=slot.index, seconds=round(time.monotonic() - slot.started_at, 3)
            )
            self._dispatch_queued()

    # -- jobs on slots -----------------------------------------------------------------------

    def _forward_input(
        self, job: Job, slot: SlotT, name: str, seq: int, payload: bytes | None, close: bool
    ) -> None:
        per_site: dict[str, list[m.Token]] = {}
        for route in job._compiled.stream_inputs[name]:
            tokens = per_site.setdefault(route.site, [])
            if payload is not None:
                tokens.append((route.step, route.param, m.CLIENT, seq, payload, m.ITEM))
            if close:
                tokens.append((route.step, route.param, m.CLIENT, seq, None, m.END))
        for site, tokens in per_site.items():
            slot.send(site, (m.TOKENS, job.id, tokens))

    def _stop_sites(self, job: Job, slot: SlotT, status: JobStatus, resume: bool) -> None:
        if resume:  # a suspended job's workers must run to stop
            for worker in slot.workers.values():
                worker.suspend(False)
        if slot.pending_sites and slot.state is SlotState.BUSY:
            reason = "cancelled" if status is JobStatus.CANCELLED else "failed"
            for site in slot.pending_sites:
                slot.send(site, (m.ABORT, job.id, reason))
            self._move(slot, SlotState.DRAINING)
            # Past the grace the slot is killed whole: a step may never look at ctx.cancelled.
            slot.kill_deadline = time.monotonic() + self._cancel_grace()
            self.wake()
        elif not slot.pending_sites:
            self._release(slot)

    def _send_site(self, slot: SlotT, site: str, message: tuple[Any, ...]) -> None:
        slot.send(site, message)

    def _cancel_site(self, job: Job, slot: SlotT, site: str) -> None:
        if site in slot.pending_sites and site not in slot.site_kill:
            slot.send(site, (m.ABORT, job.id, "late: a tolerant fan-in stopped waiting for it"))
            slot.site_kill[site] = time.monotonic() + self._cancel_grace()
            self.wake()

    def _release(self, slot: SlotT) -> None:
        """Every site of ``slot``'s job is done: the slot is free again (or replaced, or recycled)."""
        job = slot.job
        if job is not None:
            self.running.pop(job.id, None)
        self._on_released()
        slot.job = None
        slot.pending_sites = set()
        slot.site_kill.clear()
        slot.jobs_run += 1
        if slot.state not in (SlotState.BUSY, SlotState.DRAINING):
            return
        if slot.repair:
            # A worker of it died inside a tolerant fan-in (or a plan restarts a site):
            # the others are idle now, so the slot is replaced whole.
            self.log.info("replacing a slot that lost a worker", slot=slot.index)
            self._retire(slot, graceful=True)
            self._dispatch_queued()
            return
        limit = self.config.max_jobs_per_worker
        if limit is not None and slot.jobs_run >= limit:
            self.log.debug("recycling slot", slot=slot.index, jobs=slot.jobs_run)
            self._retire(slot, graceful=True)
            return
        self._move(slot, SlotState.IDLE)
        self._dispatch_queued()

    # -- starts that fail --------------------------------------------------------------------

    def _on_start_failed(self, slot: SlotT, site: str, message: str, tb: str | None) -> None:
        """A slot could not start: its setup raised, a worker exited, or it timed out.

        Such failures in a row, beyond ``max_slot_restarts``, make the federation
        give up (they will not pass by themselves); each earlier one backs off.
        """
        if slot.state is not SlotState.STARTING:
            return
        error = SiteStartError(message, site=site, remote_traceback=tb)
        self.restart_failures += 1
        self.log.error(f"{self.worker_noun} failed to start", site=site, slot=slot.index, traceback=tb)
        if not self.started:
            # The federation must not come up half-started: its constructor raises this.
            self.start_error = self.start_error or error
        elif self.restart_failures > self.config.max_slot_restarts:
            self._retire(slot, graceful=False)
            self._give_up(error, tb)
            return
        self._retire(slot, graceful=False, delay=backoff(self.restart_failures))
        self.changed.notify_all()

    def _give_up(self, error: SiteStartError, tb: str | None) -> None:
        """Stop restarting: fail every job held, refuse new ones, say why everywhere."""
        cause = (
            f"{error} ({self.restart_failures} failed starts in a row, "
            f"max_slot_restarts={self.config.max_slot_restarts})"
        )
        self.gave_up = cause
        self._replace_at.clear()
        self.log.critical(f"the federation gave up restarting its {self.worker_noun}s", cause=cause)

        def failure(job: Job) -> SiteStartError:
            return SiteStartError(
                f"job {job.id} ({job.pipeline!r}) could not run: the federation gave up: {cause}",
                site=error.site,
                remote_traceback=tb,
            )

        self._fail_all(failure)
        for slot in [s for s in self.slots if s is not None]:
            if slot.state in (SlotState.IDLE, SlotState.STARTING, SlotState.BUSY, SlotState.DRAINING):
                self._retire(slot, graceful=False)
        self.changed.notify_all()

    # -- deadlines ---------------------------------------------------------------------------

    def _next_deadline(self, *extra: float | None) -> float | None:
        """The nearest deadline (monotonic) of jobs, slots, fault timers and ``extra``; None if none.

        The transport's thread waits until then at most, never to notice work.
        """
        deadlines = [when for when in extra if when is not None]
        deadlines.extend(self._deadlines.values())
        deadlines.extend(self._replace_at.values())
        for slot in self._all_slots():
            if slot.kill_deadline is not None:
                deadlines.append(slot.kill_deadline)
            deadlines.extend(slot.site_kill.values())
            if slot.state is SlotState.STARTING:
                deadlines.append(slot.started_at + self.config.start_timeout)
        if self._fault_timers:
            deadlines.append(self._fault_timers[0][0])  # a fault plan's timed crash or pause
        return min(deadlines, default=None)

    def _on_slot_deadlines(self, now: float) -> None:
        """Timed faults, jobs past their timeout, late sites, slots past their grace, start or stop time."""
        if self._fault_timers:
            self._faults_due(now)
        self._on_job_deadlines(now)
        for slot in self._all_slots():
            for site, when in list(slot.site_kill.items()):
                if when <= now and slot.state in (SlotState.BUSY, SlotState.DRAINING):
                    slot.site_kill.pop(site)
                    self._kill_late_site(slot, site)
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
                    f"{self.worker_noun}s of sites {missing} were not ready within "
                    f"start_timeout={self.config.start_timeout} s{self._not_ready_detail()}",
                    None,
                )
            elif (
                slot.state is SlotState.STOPPING
                and slot.kill_deadline is not None
                and slot.kill_deadline <= now
            ):
                self._move(slot, SlotState.BROKEN)
                slot.kill()

    # -- what sites say ----------------------------------------------------------------------

    def _on_job_event(self, slot: SlotT, site: str, message: tuple[Any, ...], worker_name: str) -> bool:
        """Handle an event every transport's sites send; False if ``message`` is not one of them."""
        tag = message[0]
        if tag == m.RESULTS:
            self._on_results(slot, site, message[1], message[2])
        elif tag == m.DONE:
            self._on_done(slot, site, message[1], message[2], message[3])
        elif tag == m.FAILED:
            self._on_failed(slot, site, message)
        elif tag in (m.FAULT, m.WAITING):
            self._on_fault_event(slot, site, message)  # faults applied; what a site waits for
        elif tag == m.CUT:
            job = slot.job
            if job is not None and job.id == message[1]:
                self._on_cut(job, slot, message[2])
        elif tag == m.SEND_TO_JOB:
            _, request, _from_job, to_job, name, payload, close = message
            target = self._find_job(to_job)
            reason: str | None
            if target is None:
                reason = f"job {to_job} has ended" if self.issued(to_job) else f"job {to_job} does not exist"
            else:
                reason = self.send_input(target, name, payload, close)
            slot.send(site, (m.REPLY, request, reason))
        elif tag == m.LOG:
            for level, event, fields in message[1]:
                fields.setdefault("worker", worker_name)
                if self.log_files is not None:
                    self.log_files.record(site, level, event, fields)
                slot.last_lines[site].append(
                    f"[{level}] {event} "
                    + " ".join(
                        f"{k}={v}" for k, v in fields.items() if k not in ("site", "pid", "worker", "node")
                    )
                )
                log_worker_record(site, level, event, fields)
        elif tag == m.START_FAILED:
            slot.start_failed = True
            self._on_start_failed(
                slot, site, f"a {self.worker_noun} of site {site!r} failed to start", message[1]
            )
        else:
            return False
        return True

    def _on_failed(self, slot: SlotT, site: str, message: tuple[Any, ...]) -> None:
        job = slot.job
        if job is None or job.id != message[1]:
            self.dropped += 1
            return
        _, job_id, step, data, tb = message
        cause = load_exception(data, tb)
        if isinstance(cause, QuorumError):
            error: JobError = QuorumError(
                str(cause),
                job_id=job_id,
                site=cause.site,
                step=cause.step,
                needed=cause.needed,
                missing=cause.missing,
            )
            self._end_job(job, JobStatus.FAILED, error)
            return
        detail = f"step {step!r} raised {type(cause).__name__}: {cause}"
        if self._site_lost(job, slot, site, m.RAISED, detail):
            return  # a tolerant fan-in goes on without it; DONE (not ok) follows
        error = StepFailedError(
            f"step {step!r} of job {job_id} ({job.pipeline!r}) failed at site {site!r}: "
            f"{type(cause).__name__}: {cause}",
            job_id=job_id,
            site=site,
            step=step,
        )
        error.__cause__ = cause
        self._end_job(job, JobStatus.FAILED, error)

    def _on_done(self, slot: SlotT, site: str, job_id: int, ok: bool, info: dict[str, Any]) -> None:
        results = info.pop("results", None)
        if results:
            self._on_results(slot, site, job_id, results)
        job = slot.job
        if job is None or job.id != job_id:
            self.dropped += 1
            return
        slot.pending_sites.discard(site)
        slot.site_kill.pop(site, None)  # it stopped: a late site's kill is off
        if not ok:
            self._site_stopped(slot, site, job)
        metrics = info.pop("metrics", None)
        if metrics:
            self._add_metrics(job, site, metrics)
        job._record("site_done", site=site, ok=ok, **info)
        for target, (count, size) in info.get("links", {}).items():
            totals = self.links.setdefault((site, target), [0, 0])
            totals[0] += count
            totals[1] += size
        self._maybe_finish(slot, job)

    def _maybe_finish(self, slot: SlotT, job: Job) -> None:
        """End ``job`` once every site that matters is done; free the slot once all are.

        Sites a tolerant fan-in gave up on (late) need not be done for the job to
        finish: they were cancelled, and only hold the slot until they stop.
        """
        pending = slot.pending_sites
        if pending and (not job._excused or pending - job._excused):  # a new set only if some are excused
            return
        if not job.done():
            self._end_job(job, JobStatus.FINISHED, None)
        if not slot.pending_sites and self.running.get(job.id, (None, None))[1] is slot:
            self._release(slot)


def backoff(failures: int, cap: float = 2.0) -> float:
    """Seconds to wait before the next start after ``failures`` failed starts in a row."""
    if failures <= 0:
        return 0.0
    return float(min(0.05 * 2 ** (failures - 1), cap))
