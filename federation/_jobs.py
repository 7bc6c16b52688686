"""The job side: what a job goes through, written once for every transport.

    submit ──> queue (FIFO, bounded) ──> _take_free() ──> _dispatch() ───────────┐
                 ^                                                               │ transport
                 └── _retry_or_fail() <── a worker died <───────────────────────┤ (pipes, Ray)
    cancel / timeout / failure ──> _end_job() ──> _stop_sites() ────────────────>┤
    send(name, item) ──> history (for a retry) ──> _forward_input() ────────────>┘

:class:`JobSide` owns the job queue, the jobs running and their attempts,
stream inputs (kept for a retry), deadlines, counting, and ending every job
exactly once. It knows nothing of pipes or processes: a transport subclasses
it and provides the hooks below (take a free slot, start a job on it, forward
an input, stop a job's sites), and calls back into it when results arrive, a
job is done, or a worker died. Everything here runs under ``self.lock``, the
one lock the transport shares, so a job's end and its slot's release are one
change.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from . import _messages as m
from ._callbacks import CallbackThread
from ._config import FederationConfig
from ._exceptions import FederationClosedError, FederationError, JobError
from ._handle import Job, JobStatus
from ._log import get_logger
from ._messages import Missing
from ._metrics import MetricRecord

__all__ = ["JobSide"]

SlotT = TypeVar("SlotT")

_CLOSE_NOTICE = 10.0  # seconds between warnings while close() waits for jobs
_REPLAY_ITEMS = 100_000  # stream-input items kept per job for a retry
_REPLAY_BYTES = 64 << 20  # and their bytes; beyond either, the job is not retried (and says so)

# Job ids are unique in the process, not per federation: two federations in one
# process would otherwise both log "job 1", "job 2"..., and nothing would tell
# their records apart.
_job_ids = itertools.count(1)
_job_ids_lock = threading.Lock()


class JobSide(Generic[SlotT]):
    """Jobs, their queue, attempts, inputs and deadlines; a transport supplies the slots."""

    #: Whether a thread waiting on a job waits for the workers' answers itself (:meth:`_help_wait`).
    helps_wait = False

    def __init__(self, config: FederationConfig, callbacks: CallbackThread | None = None) -> None:
        self.config = config
        self.callbacks = callbacks if callbacks is not None else CallbackThread()
        # One lock for the job side and the transport: state that changes together
        # (a job ending and its slot freed) changes under it, in one place.
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.log = get_logger("router")
        self.queue: deque[Job] = deque()
        self.running: dict[int, tuple[Job, SlotT]] = {}
        # The ids this federation issued, as runs [first, last] of consecutive ids:
        # usually one run; one per job only while another federation submits in between.
        self._issued: list[list[int]] = []
        self.closing = False
        self.stopped = False
        # Ctrl+C interrupted a wait on one of our jobs, and no job was submitted since:
        # closing now is the user's way out, so cancelled jobs get no grace.
        self.interrupted = False
        # Why the federation stopped restarting slots and failed every job; None while it serves.
        self.gave_up: str | None = None
        self.jobs_by_status: dict[str, int] = {}
        self._deadlines: dict[int, float] = {}
        self._inputs: dict[int, _StreamInputs] = {}  # job id -> its stream inputs, until it ends
        self.metrics: list[MetricRecord] = []  # every job's metrics, for federation.metrics()

    # -- what a transport provides ------------------------------------------------------------

    def wake(self) -> None:
        """Make the transport's thread look at its state again (any thread)."""
        raise NotImplementedError

    def _take_free(self) -> SlotT | None:
        """A free, healthy slot, now taken (busy), or None."""
        raise NotImplementedError

    def _dispatch(self, job: Job, slot: SlotT) -> None:
        """Start ``job`` on ``slot`` (taken by ``_take_free``); record it in ``running``."""
        raise NotImplementedError

    def _forward_input(
        self, job: Job, slot: SlotT, name: str, seq: int, payload: bytes | None, close: bool
    ) -> None:
        """Send item ``seq`` of stream input ``name`` (or its end) to ``job``'s sites on ``slot``."""
        raise NotImplementedError

    def _stop_sites(self, job: Job, slot: SlotT, status: JobStatus, resume: bool) -> None:
        """``job`` ended: stop its sites still running (cooperatively, then by force), free the slot."""
        raise NotImplementedError

    def _send_site(self, slot: SlotT, site: str, message: tuple[Any, ...]) -> None:
        """Send a control message to ``site``'s worker on ``slot`` (dropped if it is gone)."""
        raise NotImplementedError

    def _cancel_site(self, job: Job, slot: SlotT, site: str) -> None:
        """Stop ``site`` of ``job`` cooperatively; kill only its worker after the cancel grace."""
        raise NotImplementedError

    def _slot_counts(self) -> tuple[int, int]:
        """The pool's slots, and how many of them are starting (for messages)."""
        raise NotImplementedError

    def _help_wait(self, job: Job, timeout: float | None) -> None:
        """Let a thread waiting on ``job`` wait for the workers' answers itself (if ``helps_wait``)."""
        raise NotImplementedError

    # -- submitting --------------------------------------------------------------------------

    def next_job_id(self) -> int:
        """A new job id, unique among every federation of this process."""
        with self.lock:
            with _job_ids_lock:
                job_id = next(_job_ids)
            if self._issued and self._issued[-1][1] == job_id - 1:
                self._issued[-1][1] = job_id
            else:
                self._issued.append([job_id, job_id])
            return job_id

    def issued(self, job_id: int) -> bool:
        """Whether this federation gave out ``job_id`` (ids of other federations are not its jobs)."""
        index = bisect.bisect_right(self._issued, [job_id, float("inf")]) - 1
        return index >= 0 and self._issued[index][0] <= job_id <= self._issued[index][1]

    def submit(self, job: Job, inputs: dict[str, bytes], block: bool, timeout: float | None) -> None:
        """Queue ``job``, or start it at once on a free slot."""
        job._inputs = inputs
        job._side = self
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
            total, starting = self._slot_counts()
            if busy:
                shown = ", ".join(f"job {job_id}" for job_id in busy[:5]) + (", ..." if len(busy) > 5 else "")
                count = f"all {len(busy)}" if len(busy) >= total else f"{len(busy)} of {total}"
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

    # -- stream inputs -----------------------------------------------------------------------

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
            inputs = self._inputs.setdefault(job.id, _StreamInputs())
            if name in inputs.closed:
                return f"stream input {name!r} of job {job.id} was closed"
            if close:
                inputs.closed.add(name)
            # The attempt a failure would retry is the next one (the first, for a queued job).
            if max(len(job._attempts), 1) <= job.retries:
                inputs.remember(name, payload, close)
            entry = self.running.get(job.id)
            if entry is None:
                inputs.pending.append((name, payload, close))
            else:
                self._forward_input(job, entry[1], name, inputs.number(name), payload, close)
        return None

    def _forward_pending(self, job: Job, slot: SlotT) -> None:
        """Send what was fed to ``job`` while it waited for a slot (transports call it at dispatch)."""
        inputs = self._inputs.get(job.id)
        if inputs is not None:
            pending, inputs.pending = inputs.pending, []
            for name, payload, close in pending:
                self._forward_input(job, slot, name, inputs.number(name), payload, close)

    def _find_job(self, job_id: int) -> Job | None:
        entry = self.running.get(job_id)
        if entry is not None:
            return entry[0]
        for job in self.queue:
            if job.id == job_id:
                return job
        return None

    # -- tolerant fan-ins ----------------------------------------------------------------------

    def _site_lost(self, job: Job, slot: SlotT, site: str, reason: str, detail: str) -> bool:
        """``site`` of ``job`` raised or died: whether the job goes on without it.

        It does when every value the site sends goes to tolerant gathers
        (``fed.quorum``): those are told the site is missing, and why; the job
        goes on. Otherwise the caller fails the job as usual.
        """
        targets = job._compiled.tolerant.get(site)
        if targets is None:
            return False
        if site in job._missing:
            return True  # told already (its FAILED came before its death)
        job._missing[site] = Missing(site, reason, detail)
        job._record("site_missing", site=site, reason=reason, detail=detail)
        self.log.info("a site of a tolerant fan-out is missing", job_id=job.id, site=site, reason=reason)
        if not job.done():
            for target in targets:
                self._send_site(slot, target, (m.MISSING, job.id, [(site, reason, detail)]))
        return True

    def _on_cut(self, job: Job, slot: SlotT, sites: list[str]) -> None:
        """A tolerant gather stopped waiting for ``sites`` (late): cancel them, one worker each."""
        for site in sites:
            job._excused |= {site}
            if site not in job._missing:
                job._missing[site] = Missing(site, m.LATE, "had not delivered by the gather's deadline")
                job._record("site_missing", site=site, reason=m.LATE)
            self._cancel_site(job, slot, site)

    def _add_metrics(self, job: Job, site: str, records: list[tuple[str, str, float, float]]) -> None:
        new = [
            MetricRecord(job.id, job.pipeline, site, step, name, value, t) for step, name, value, t in records
        ]
        job._metrics += tuple(new)
        self.metrics.extend(new)

    # -- ending ------------------------------------------------------------------------------

    def cancel_job(self, job: Job, reason: str) -> bool:
        with self.lock:
            if job.done():
                return False
            self._end_job(job, JobStatus.CANCELLED, job._cancelled_error(reason))
            return True

    def _end_job(self, job: Job, status: JobStatus, error: BaseException | None) -> None:
        """End ``job`` for its user now; abort its sites and free its slot once they stopped."""
        previous = job.status
        if not job._end(status, error):
            return
        self._count(status, JobStatus.RUNNING if previous is JobStatus.SUSPENDED else previous)
        self._deadlines.pop(job.id, None)
        self._inputs.pop(job.id, None)
        entry = self.running.get(job.id)
        if entry is None:
            try:
                self.queue.remove(job)
            except ValueError:
                pass
            self.changed.notify_all()
            return
        self._stop_sites(job, entry[1], status, resume=previous is JobStatus.SUSPENDED)
        self.changed.notify_all()

    def _retry_or_fail(self, job: Job, error: JobError) -> None:
        """Run ``job`` again as a fresh attempt if it may be retried, else fail it with ``error``."""
        self.running.pop(job.id, None)
        job._end_attempt(f"{type(error).__name__}: {error}")
        refused = None
        if len(job.attempts) <= job.retries and not self.closing and self.gave_up is None:
            inputs = self._inputs.get(job.id)
            refused = (inputs.unreplayable if inputs else None) or job._reset_for_retry()
            if refused is None:
                self.log.info("retrying job on a fresh slot", job_id=job.id, attempt=len(job.attempts) + 1)
                job._record("retry", error=repr(error))
                previous = job.status
                job._set_status(JobStatus.QUEUED)
                self._count(
                    JobStatus.QUEUED, JobStatus.RUNNING if previous is JobStatus.SUSPENDED else previous
                )
                if inputs is not None:
                    # The new attempt gets every stream item the old one was sent, in order.
                    inputs.restart()
                self.queue.appendleft(job)
                self._dispatch_queued()
                return
            if error.args and isinstance(error.args[0], str):
                error.args = (f"{error.args[0]}; not retried: {refused}", *error.args[1:])
        self._end_job(job, JobStatus.FAILED, error)

    def _fail_all(self, make_error: Callable[[Job], BaseException]) -> None:
        """End every queued and running job with the error ``make_error`` gives for it."""
        for job in [*self.queue, *(entry[0] for entry in self.running.values())]:
            self._end_job(job, JobStatus.FAILED, make_error(job))

    def _on_job_deadlines(self, now: float) -> None:
        for job_id, deadline in list(self._deadlines.items()):
            if deadline <= now:
                job = self._find_job(job_id)  # running, or queued again for a retry
                self._deadlines.pop(job_id, None)
                if job is not None:
                    self._end_job(
                        job,
                        JobStatus.CANCELLED,
                        job._cancelled_error(f"timed out after {job.timeout} s{_where_stuck(job)}"),
                    )

    def _wait_for_jobs(self, timeout: float | None) -> None:
        """Wait for queued and running jobs to end, saying every so often which ones are left.

        A job waiting on a stream input nobody closes would otherwise make
        ``close()`` hang without a word.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.changed.wait_for(
            # A job ended already (cancelled, its slot draining) is not waited for: close()
            # stops its slot within shutdown_timeout, as any other, not within cancel_grace.
            lambda: (
                (not self.queue and all(entry[0].done() for entry in self.running.values())) or self.stopped
            ),
            _CLOSE_NOTICE if deadline is None else max(0.0, min(_CLOSE_NOTICE, deadline - time.monotonic())),
        ):
            if deadline is not None and time.monotonic() >= deadline:
                return
            left = sorted(
                [job.id for job in self.queue]
                + [job_id for job_id, entry in self.running.items() if not entry[0].done()]
            )
            self.log.warning(
                "close() is waiting for jobs to finish; cancel them, or close(cancel_pending=True)",
                jobs=left[:20],
                count=len(left),
            )


def _where_stuck(job: Job) -> str:
    """Where a job that timed out was stuck: what each site that had waited a while waited for."""
    if not job._waiting:
        return ""
    lines = "; ".join(f"at site {site!r}: {text}" for site, text in sorted(job._waiting.items()))
    return f"; where it stuck: {lines} (sites not named were busy in a step, or done)"


class _StreamInputs:
    """One job's stream inputs: what changes together about them, dropped when the job ends."""

    __slots__ = ("closed", "history", "history_bytes", "pending", "seq", "unreplayable")

    def __init__(self) -> None:
        self.closed: set[str] = set()
        self.pending: list[tuple[str, bytes | None, bool]] = []  # fed while no attempt runs
        self.seq: dict[str, int] = {}  # the next item number, per input, in this attempt
        self.history: list[tuple[str, bytes | None, bool]] = []  # every item, for a retry
        self.history_bytes = 0
        self.unreplayable: str | None = None  # why a retry could not replay them all

    def number(self, name: str) -> int:
        """The number of the next item of ``name`` sent to the current attempt."""
        seq = self.seq.get(name, 0)
        self.seq[name] = seq + 1
        return seq

    def remember(self, name: str, payload: bytes | None, close: bool) -> None:
        """Keep an item for a retry, up to the bound; past it, say why none can be replayed."""
        if self.unreplayable is not None:
            return
        self.history_bytes += len(payload) if payload is not None else 0
        if self.history_bytes > _REPLAY_BYTES or len(self.history) >= _REPLAY_ITEMS:
            self.unreplayable = (
                f"its stream inputs carried more than a retry can replay "
                f"({_REPLAY_ITEMS:,} items or {_REPLAY_BYTES >> 20} MiB)"
            )
            self.history = []
            return
        self.history.append((name, payload, close))

    def restart(self) -> None:
        """A new attempt: numbering starts again and every kept item is sent to it first."""
        self.seq.clear()
        self.pending = [*self.history, *self.pending]
