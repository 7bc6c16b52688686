"""The job handle: status, results as they stream in, and bridges to futures and asyncio.

A :class:`Job` is updated by the federation's router thread and read by any
user thread. One condition variable guards it; every wait takes a timeout.
A job ends exactly once (invariant 3): :meth:`Job._end` is a no-op after the first call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import threading
import time
from collections.abc import Callable, Generator, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from ._callbacks import CallbackThread, run_safely
from ._exceptions import JobCancelledError
from ._field_checks import check_seconds
from ._messages import Missing
from ._metrics import MetricRecord

if TYPE_CHECKING:
    from pathlib import Path

    from ._fault_plan import FaultPlan
    from ._pipeline import Compiled
    from ._timeline import PathArg, TimelineEvent

__all__ = ["Attempt", "Job", "JobStatus", "Result"]


class JobStatus(str, enum.Enum):
    """Where a job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUSPENDED = "suspended"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        """Whether the job has ended (finished, failed or cancelled)."""
        return self in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELLED)


class Result(NamedTuple):
    """One value an output produced: at which site, its position in that site's stream."""

    output: str
    site: str
    seq: int
    value: Any


class Attempt(NamedTuple):
    """One run of a job on a pool slot; a retried job has several."""

    number: int
    slot: int
    started: float
    ended: float | None
    error: str | None


class _Controller(Protocol):
    def cancel_job(self, job: Job, reason: str) -> bool: ...
    def send_input(self, job: Job, name: str, value: Any, close: bool) -> None: ...
    def suspend_job(self, job: Job, suspend: bool) -> None: ...


_NO_SITES: frozenset[str] = frozenset()  # one for every job: an empty frozenset is a new object


class _Side(Protocol):
    """What a job asks of the job side that queued it (set at submit)."""

    helps_wait: bool  # whether a thread waiting on a job waits for the workers itself (Ray)

    def why_queued(self, job: Job) -> str | None: ...
    def interrupt(self) -> None: ...
    def _help_wait(self, job: Job, timeout: float | None) -> None: ...


class Job:
    """A handle on one submitted job.

    Iterate over it to receive :class:`Result` records as they arrive; call
    :meth:`result` for the assembled value. Every blocking call takes a timeout.
    """

    def __init__(
        self,
        job_id: int,
        compiled: Compiled,
        controller: _Controller,
        *,
        retries: int,
        timeout: float | None,
        callbacks: CallbackThread | None = None,
    ) -> None:
        self.id = job_id
        self.pipeline = compiled.pipeline
        self._compiled = compiled
        self._controller = controller
        self.retries = retries
        self.timeout = timeout
        self._cond = threading.Condition()
        # Threads in results() waiting for news: a result wakes only them, never a caller
        # waiting in result() for the end (woken for nothing, it went back to sleep).
        self._iterators = 0
        self._status = JobStatus.QUEUED
        self._results: list[Result] = []
        self._error: BaseException | None = None
        # Callbacks and metrics are rare: a shared empty tuple until the first one (every
        # container a job holds on to costs each job about 1 us in the collector's full passes).
        self._callbacks: tuple[tuple[str | None, Callable[[Result], Any]], ...] = ()
        self._done_callbacks: tuple[Callable[[Job], Any], ...] = ()
        self._future: concurrent.futures.Future[Any] | None = None
        # Where user callbacks run: the federation's callback thread, never the router.
        self._runner = callbacks if callbacks is not None else CallbackThread()
        # A result of the current attempt reached the user (iterated, or passed to a
        # callback): such an attempt cannot be replaced by a retry without mixing results.
        self._observed = False
        self._attempts: list[Attempt] = []
        # Pickled value inputs, kept for retries; a per-site input is {site: bytes}.
        self._inputs: dict[str, Any] = {}
        self._absent: tuple[str, ...] = ()  # declared sites this job runs without (participants=)
        # Sites a tolerant fan-in went on without, and why; late ones need not report DONE
        # for the job to finish (they are cancelled, then their worker killed).
        self._missing: dict[str, Missing] = {}
        self._excused: frozenset[str] = _NO_SITES
        self._metrics: tuple[MetricRecord, ...] = ()
        # A fault plan for this job and its number (the federation's Nth submit); what each
        # site said it waits for, once it had waited a while (for a timeout's message).
        self._faults: FaultPlan | None = None
        self._fault_number = 0
        self._waiting: dict[str, str] = {}
        # Set by the router at submit: why the job still waits (for a timeout's message), who
        # to tell when Ctrl+C interrupts a wait on it, whether a waiting thread waits for the
        # workers' answers itself.
        self._side: _Side | None = None
        self._events: list[tuple[float, str, dict[str, Any]]] = [(time.time(), "queued", {})]
        self.submitted = time.time()
        self.started: float | None = None
        self.ended: float | None = None

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.pipeline!r} {self._status.value}>"

    # -- state -----------------------------------------------------------------------------

    @property
    def status(self) -> JobStatus:
        """The job's status now."""
        return self._status

    @property
    def missing(self) -> dict[str, Missing]:
        """Sites a tolerant fan-in (``fed.quorum``) went on without, and why (so far)."""
        return dict(self._missing)

    @property
    def metrics(self) -> list[MetricRecord]:
        """The metrics the job's steps recorded with ``ctx.metric``, as each site finished."""
        return list(self._metrics)

    @property
    def attempts(self) -> tuple[Attempt, ...]:
        """Every run of this job on a slot, in order."""
        with self._cond:
            return tuple(self._attempts)

    def done(self) -> bool:
        """Whether the job has ended."""
        return self._status.ended

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the job ends; True if it has, False if ``timeout`` ran out."""
        timeout = check_seconds("timeout", timeout)
        try:
            side = self._side
            if side is not None and side.helps_wait and timeout != 0 and not self._status.ended:
                started = time.monotonic()
                side._help_wait(self, timeout)
                if timeout is not None:
                    timeout = max(0.0, timeout - (time.monotonic() - started))
            with self._cond:
                return self._cond.wait_for(lambda: self._status.ended, timeout)
        except KeyboardInterrupt:
            self._interrupted()
            raise

    def _interrupted(self) -> None:
        # Ctrl+C while waiting on a job: the federation closing next stops its jobs at once.
        if self._side is not None:
            self._side.interrupt()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The error the job ended with, or ``None`` if it finished.

        Raises:
            TimeoutError: the job has not ended within ``timeout``.
        """
        if not self.wait(timeout):
            raise self._timeout_error(timeout, "")
        return self._error

    def result(self, timeout: float | None = None) -> Any:
        """The job's result: a single output's value, or ``{output: value}``.

        A fanned-out output gives ``{site: value}``; a stream gives a list in order.

        Raises:
            TimeoutError: the job has not ended within ``timeout`` (it keeps running).
            StepFailedError, WorkerDiedError, JobCancelledError: how the job failed.
        """
        if not self.wait(timeout):
            raise self._timeout_error(timeout, "; it keeps running")
        if self._error is not None:
            raise self._error
        return self._assemble()

    def _timeout_error(self, timeout: float | None, running: str) -> TimeoutError:
        why = (
            self._side.why_queued(self)
            if self._side is not None and self._status is JobStatus.QUEUED
            else None
        )
        if why is not None:
            return TimeoutError(f"{why} (waited {timeout} s; it keeps its place in the queue)")
        return TimeoutError(f"job {self.id} has not ended within {timeout} s{running}")

    def _assemble(self) -> Any:
        outputs = self._compiled.outputs
        if not outputs:
            return None
        shaped: dict[str, Any] = {}
        for name, spec in outputs.items():
            per_site: dict[str, list[Any]] = {site: [] for site in spec.sites}
            for record in self._results:
                if record.output == name:
                    per_site.setdefault(record.site, []).append(record.value)
            if spec.stream:
                value: Any = per_site if spec.keyed else per_site[spec.sites[0]]
            elif spec.keyed:
                value = {site: values[-1] for site, values in per_site.items() if values}
            else:
                values = per_site[spec.sites[0]]
                value = values[-1] if values else None
            shaped[name] = value
        if len(shaped) == 1:
            return next(iter(shaped.values()))
        return shaped

    def results(self, timeout: float | None = None) -> Iterator[Result]:
        """Iterate over results as they arrive, until the job ends.

        Raises the job's error after the results that arrived before it.

        Args:
            timeout: the longest wait for the next result; :class:`TimeoutError` after it.
        """
        timeout = check_seconds("timeout", timeout)
        index = 0
        while True:
            try:
                with self._cond:
                    self._iterators += 1
                    try:
                        got = self._cond.wait_for(partial(self._has_news, index), timeout)
                    finally:
                        self._iterators -= 1
                    if not got:
                        raise TimeoutError(f"no result from job {self.id} within {timeout} s")
                    batch = self._results[index:]
                    ended = self._status.ended
                    if batch:
                        self._observed = True
            except KeyboardInterrupt:
                self._interrupted()
                raise
            index += len(batch)
            yield from batch
            if ended and index >= len(self._results):
                if self._error is not None:
                    raise self._error
                return

    def _has_news(self, seen: int) -> bool:
        return len(self._results) > seen or self._status.ended

    def __iter__(self) -> Iterator[Result]:
        return self.results()

    # -- callbacks and bridges -------------------------------------------------------------

    def on_result(self, callback: Callable[[Result], Any], output: str | None = None) -> None:
        """Call ``callback(result)`` for each result (of ``output``, if given), in order.

        Callbacks run on the federation's callback thread, never on its router and
        never under a lock, one at a time: each sees each result exactly once, in
        the order results arrived, results that arrived before this call first. A
        callback may submit, cancel, send and close; one that raises is logged.
        """
        if output is not None and output not in self._compiled.outputs:
            raise ValueError(
                f"job {self.id} has no output {output!r}; outputs: {list(self._compiled.outputs)}"
            )
        with self._cond:
            self._callbacks = (*self._callbacks, (output, callback))
            earlier = [r for r in self._results if output is None or r.output == output]
            if earlier:
                self._observed = True
                # Posted under the condition: no later result can be posted ahead of these.
                self._runner.post(partial(_deliver, callback, earlier))

    def add_done_callback(self, callback: Callable[[Job], Any]) -> None:
        """Call ``callback(job)`` once the job ends (soon, if it has), on the callback thread."""
        with self._cond:
            if not self._status.ended:
                self._done_callbacks = (*self._done_callbacks, callback)
                return
            self._runner.post(partial(callback, self))

    @property
    def future(self) -> concurrent.futures.Future[Any]:
        """A :class:`concurrent.futures.Future` resolved with the job's result or error."""
        with self._cond:
            if self._future is None:
                future: concurrent.futures.Future[Any] = concurrent.futures.Future()
                future.set_running_or_notify_cancel()
                self._future = future
                if self._status.ended:
                    self._settle(future)
            return self._future

    def _settle(self, future: concurrent.futures.Future[Any]) -> None:
        if future.done():
            return
        if self._error is not None:
            future.set_exception(self._error)
        else:
            future.set_result(self._assemble())

    def __await__(self) -> Generator[Any, None, Any]:
        return asyncio.wrap_future(self.future).__await__()

    # -- control ---------------------------------------------------------------------------

    def cancel(self, reason: str = "cancelled by the user") -> bool:
        """Cancel the job: steps are asked to stop, then their slot is killed after a grace period.

        Returns False if the job had already ended.
        """
        return self._controller.cancel_job(self, reason)

    def send(self, name: str, value: Any) -> None:
        """Feed ``value`` to the job's stream input ``name``.

        Raises:
            PipelineError: no such stream input. SerializationError: ``value`` cannot be pickled.
            FederationError: the job has ended, or the input was closed.
        """
        self._controller.send_input(self, name, value, False)

    def close(self, name: str) -> None:
        """End the job's stream input ``name``: steps collecting it, or driven by it, complete."""
        self._controller.send_input(self, name, None, True)

    def suspend(self) -> None:
        """Stop the job's worker processes (SIGSTOP) until :meth:`resume`."""
        self._controller.suspend_job(self, True)

    def resume(self) -> None:
        """Continue a suspended job's workers (SIGCONT)."""
        self._controller.suspend_job(self, False)

    # -- updates from the router -----------------------------------------------------------

    def _record(self, kind: str, **fields: Any) -> None:
        self._events.append((time.time(), kind, fields))

    def _set_status(self, status: JobStatus) -> None:
        with self._cond:
            if not self._status.ended:
                self._status = status
                self._cond.notify_all()

    def _start_attempt(self, slot: int, now: float) -> None:
        with self._cond:
            if self.started is None:
                self.started = now
            self._attempts.append(Attempt(len(self._attempts) + 1, slot, now, None, None))
            if not self._status.ended:
                self._status = JobStatus.RUNNING
            self._cond.notify_all()
        self._events.append((now, "started", {"slot": slot, "attempt": len(self._attempts)}))

    def _end_attempt(self, error: str | None) -> None:
        with self._cond:
            if self._attempts and self._attempts[-1].ended is None:
                self._attempts[-1] = self._attempts[-1]._replace(ended=time.time(), error=error)

    def _add_results(self, site: str, records: list[tuple[str, int, Any]]) -> None:
        new = [Result(output, site, seq, value) for output, seq, value in records]
        with self._cond:
            if self._status.ended:
                return
            self._results.extend(new)
            for output, callback in self._callbacks:
                chosen = new if output is None else [r for r in new if r.output == output]
                if chosen:
                    self._observed = True
                    self._runner.post(partial(_deliver, callback, chosen))
            if self._iterators:
                self._cond.notify_all()
        self._record("results", site=site, count=len(new))

    def _reset_for_retry(self) -> str | None:
        """Forget the failed attempt's results before a retry; why it cannot be retried, or None."""
        with self._cond:
            if self._observed:
                return (
                    f"{len(self._results)} result(s) of attempt {len(self._attempts)} already reached "
                    "the caller (iterated or passed to a callback), and a retry would mix two attempts"
                )
            self._results.clear()
            return None

    def _end(self, status: JobStatus, error: BaseException | None) -> bool:
        with self._cond:
            if self._status.ended:
                return False
            self._error = error
            self._status = status
            self.ended = time.time()
            future = self._future
            callbacks, self._done_callbacks = self._done_callbacks, ()
            self._cond.notify_all()
            # A future's own callbacks (asyncio's bridge among them) are user code too.
            if future is not None:
                self._runner.post(partial(self._settle, future))
            for callback in callbacks:
                self._runner.post(partial(callback, self))
        self._end_attempt(None if error is None else f"{type(error).__name__}: {error}")
        self._record(status.value, error=None if error is None else repr(error))
        return True

    def _cancelled_error(self, reason: str) -> JobCancelledError:
        return JobCancelledError(
            f"job {self.id} ({self.pipeline!r}) was cancelled: {reason}", job_id=self.id, reason=reason
        )

    # -- timeline --------------------------------------------------------------------------

    def timeline(self) -> list[TimelineEvent]:
        """What every site did for this job, and when, as typed records ordered by time.

        Queued, each attempt, each site's start, each step run (start, end, items),
        the tokens each site sent (to whom, how many, how many bytes), each site's
        done, and the end. Callable while the job runs: it returns what happened so far.
        """
        # list.append in the router thread; a copy is a consistent snapshot.
        # Imported here: the timeline's records are pydantic models, and a federation
        # that never draws a timeline should not pay ~70 ms for pydantic at start.
        from ._timeline import build_timeline

        return build_timeline(self.id, list(self._events), self._error)

    def export_timeline(self, path: PathArg) -> Path:
        """Write the job's timeline to ``path``, in the format its suffix names; returns the path.

        ``.json``: Chrome trace (open in Perfetto or ``chrome://tracing``); ``.html``: a
        self-contained Gantt chart; ``.png``: a Gantt picture (needs the ``viz`` extra).

        Raises:
            ValueError: an unknown suffix. ImportError: ``.png`` without matplotlib.
        """
        events = self.timeline()
        from ._timeline import default_title, export_timeline

        return export_timeline(events, path, title=default_title(events, pipeline=self.pipeline))


def _deliver(callback: Callable[[Result], Any], records: list[Result]) -> None:
    # One failure must not cost the callback the rest of the batch: each result once.
    for record in records:
        run_safely(partial(callback, record))
