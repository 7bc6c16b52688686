"""The worker: one site of one job execution, serving jobs from its inbox until told to stop.

Data flow inside a worker (one per site per pool slot)::

    control pipe (client) ─┐                 ┌─> sibling pipes (tokens to other sites)
    sibling pipes (tokens) ├─> inbox deque ─> job run ─┤
                           ┘   (pump)        └─> events pipe (results, done, failed, logs)

The worker is single-threaded; it blocks in ``poll`` on its readers, and on its
writers only when they have bytes pending. Ordering rules it relies on:

* The control pipe is FIFO, and the client writes a job's START before any
  ABORT, stream token or close for it; so a worker never sees those for a job
  it was not started for. Tokens from a sibling can overtake START (the sibling
  may start first): they are kept until START arrives, keyed by job id.
* A site reports DONE only after every token and result it made is in its
  outboxes, ahead of DONE on the same FIFO pipes, so "done" never overtakes data
  (invariant 2). The client frees the slot once every site reported DONE.
* Anything for a job this worker has already ended is dropped and counted
  (invariant 1): late tokens of a cancelled job never reach the next. Job ids
  are not in dispatch order (threads submit concurrently; a retried job runs
  again later), so "ended" is remembered per id, for the last jobs run here,
  never inferred from the order of ids.
* While waiting for room in one pipe, the worker keeps draining all of its own
  (the pump), so two workers can never wait on each other: no deadlock.

A lifeline pipe whose write end only the client holds turns the client's death
into EOF here; a watchdog thread then kills the worker's whole process group.

This module must stay light: a spawned worker imports it before anything else,
and every import here is paid at every worker start.
"""

from __future__ import annotations

import gc
import os
import pickle
import select
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

from . import _messages as m
from ._channel import ChannelClosedError, FrameReader, Outbox
from ._exceptions import JobCancelledError, SerializationError, TokenRejectedError
from ._serialization import (
    Payload,
    SegmentPool,
    SegmentViews,
    dump_exception,
    dumps,
    payload_size,
    unlink_segments,
)

__all__ = ["StepContext", "Worker", "main"]

_BATCH = 64  # tokens per frame for a fast stream
_LINGER = 0.0002  # seconds since the last item after which an item is sent at once
_HIGH_WATER = 8 << 20  # pump (wait for the reader) above this many pending bytes
_LOW_WATER = 1 << 20
# Late tokens of a job trail it by at most a few jobs (they are ahead of its
# sibling's DONE in a FIFO pipe); remembering this many ended jobs is ample.
_ENDED_WINDOW = 1024
_SENDS_PER_JOB = 10_000  # timeline records of frames sent, per job and site
_TIMINGS_PER_STEP = 64  # timeline records kept per step and job; later calls are merged
_TRIM_AFTER = 1.0  # seconds idle after which a worker gives its spare shared memory back
_CHECK_EVERY = 0.002  # seconds between looks at the inbox while a step emits
_POLLIN = select.POLLIN | select.POLLHUP | select.POLLERR


class _Abort(BaseException):
    """Unwinds a job run when the client aborted it (not an error of the step)."""


class _StepFailure(BaseException):
    """Unwinds a job run after a step raised; the failure is already reported."""


class StepContext:
    """What a step sees of where and how it runs; bind it with a parameter named ``ctx``.

    Attributes:
        site: the site's name.
        job_id: the running job's id.
        step: the running step's name.
        state: the result of the site's ``setup`` in this worker (``None`` without one).
        data_dir: the site's data directory, or ``None``.
        env: the environment variables configured for this site.
        source_site: for a step run per stream item, the site the item came from.
    """

    __slots__ = ("_log", "_worker", "data_dir", "env", "job_id", "site", "source_site", "state", "step")

    def __init__(self, worker: Worker, job_id: int, step: str, source_site: str | None) -> None:
        self._worker = worker
        self.site = worker.site
        self.job_id = job_id
        self.step = step
        self.state = worker.state
        self.data_dir = worker.data_dir
        self.env = worker.env
        self.source_site = source_site
        self._log: Any = None

    @property
    def log(self) -> Any:
        """A structlog logger bound to job, site, step and pid; records go to the client."""
        if self._log is None:
            self._log = self._worker.structlog_logger().bind(job_id=self.job_id, step=self.step)
        return self._log

    @property
    def cancelled(self) -> bool:
        """Whether the job was cancelled (or failed elsewhere); long steps should check it."""
        return self._worker.abort_requested(self.job_id) is not None

    def check_cancelled(self) -> None:
        """Raise :class:`~federation.JobCancelledError` if the job was cancelled."""
        reason = self._worker.abort_requested(self.job_id)
        if reason is not None:
            raise JobCancelledError(
                f"job {self.job_id} was cancelled: {reason}", job_id=self.job_id, reason=reason
            )

    def send_to_job(self, job_id: int, name: str, value: Any, *, close: bool = False) -> None:
        """Feed ``value`` to stream input ``name`` of another running job.

        Blocks until the client's router accepted it. With ``close=True`` the
        stream is closed after it (pass ``value=None`` to only close it).

        Raises:
            TokenRejectedError: the job has ended, never existed, or has no such stream input.
        """
        self._worker.send_to_job(self.job_id, job_id, name, value, close)


class _Gather:
    """Collects one parameter's value: a value, ``{site: value}``, or a whole stream."""

    __slots__ = ("complete", "param", "pending", "values")

    def __init__(self, param: m.Param) -> None:
        self.param = param
        self.pending = set(param.sources)
        self.values: dict[str, Any] = {}
        self.complete = not self.pending

    def add(self, source: str, value: Any, kind: int) -> None:
        param = self.param
        if kind != m.END:
            if param.stream:
                self.values.setdefault(source, []).append(value)
            else:
                self.values[source] = value
        elif param.stream:
            self.values.setdefault(source, [])
        if kind != m.ITEM:
            self.pending.discard(source)
            self.complete = not self.pending

    def value(self) -> Any:
        param = self.param
        if param.keyed:
            return {site: self.values[site] for site in param.sources if site in self.values}
        if len(param.sources) == 1:
            return self.values.get(param.sources[0], [] if param.stream else None)
        merged: list[Any] = []  # a stream input fed from several places
        for site in param.sources:
            merged.extend(self.values.get(site, []))
        return merged


class _StepRun:
    __slots__ = (
        "calls",
        "ctx_param",
        "destinations",
        "done",
        "driver",
        "driver_pending",
        "gathers",
        "kwargs",
        "plan",
        "queue",
        "ran",
        "seq",
        "timing",
        "what",
    )

    def __init__(self, plan: m.StepPlan) -> None:
        self.plan = plan
        self.kwargs: dict[str, Any] = {}
        self.gathers: dict[str, _Gather] = {}
        self.driver: str | None = plan.driver
        self.queue: deque[tuple[str, Any]] = deque()
        self.driver_pending: set[str] = set()
        self.ran = False
        self.done = False
        self.seq = 0
        self.ctx_param: str | None = None
        self.destinations = 0  # receivers of each value: outputs and steps at other sites
        self.calls = 0
        self.timing = 0
        self.what = f"the value step {plan.name!r} produced"


class _JobRun:
    __slots__ = ("inputs", "job_id", "plan", "remaining", "started", "steps", "timings")

    def __init__(self, job_id: int, plan: m.SitePlan, inputs: dict[str, bytes]) -> None:
        self.job_id = job_id
        self.plan = plan
        self.steps: dict[str, _StepRun] = {}
        self.remaining = len(plan.steps)
        self.inputs = inputs
        self.timings: list[tuple[str, float, float, int]] = []
        self.started = time.time()


class Worker:
    """Serves jobs for one site; the same loop runs in a process or in a thread."""

    def __init__(
        self,
        spec: m.WorkerSpec,
        control: FrameReader,
        events: Outbox,
        siblings_in: dict[str, FrameReader],
        siblings_out: dict[str, Outbox],
    ) -> None:
        self.site = spec.site
        self.name = spec.name
        self.spec = spec
        self.env = dict(spec.env)
        self.data_dir = spec.data_dir
        self.state: Any = None
        self.pid = os.getpid()
        self._control = control
        self._events = events
        self._readers = {reader.fileno(): reader for reader in (control, *siblings_in.values())}
        self._siblings_out = siblings_out
        self._inbox: deque[tuple[Any, ...]] = deque()
        self._poller = select.poll()
        for reader in self._readers.values():
            self._poller.register(reader.fileno(), _POLLIN)
        self._plans: dict[bytes, m.SitePlan] = {}
        self._run: _JobRun | None = None
        self._ended: set[int] = set()
        self._ended_order: deque[int] = deque()
        self._aborted: dict[int, str] = {}
        self._early: dict[int, list[tuple[Any, ...]]] = {}
        self._batches: dict[str, list[m.Token]] = {site: [] for site in siblings_out}
        self._results: list[tuple[str, int, Payload]] = []
        self._links: dict[str, list[int]] = {}
        self.dropped = 0
        self._request = 0
        self._replies: dict[int, Any] = {}
        self._structlog: Any = None
        self._pool = SegmentPool(spec.shm_prefix, self._wait_for_release)
        self._views = SegmentViews(self._queue_release)
        self._releases: dict[str, list[str]] = {}
        self._sends: list[tuple[float, str, int, int]] = []  # (time, site, tokens, bytes) per frame
        self._next_check = 0.0
        self._current_step: str | None = None
        self._last_emit = 0.0
        # One reader of the pipes at a time: a step's threads may ask ctx.cancelled.
        self._reading = threading.Lock()

    # -- sending ---------------------------------------------------------------------------

    def _send_event(self, message: tuple[Any, ...]) -> None:
        try:
            self._events.send(pickle.dumps(message, protocol=5))
        except ChannelClosedError:
            raise SystemExit(0) from None  # the client is gone; the lifeline will follow
        if self._events.pending_bytes > _HIGH_WATER:
            self._pump_until(lambda: self._events.pending_bytes < _LOW_WATER)

    def _flush_batch(self, site: str) -> None:
        batch = self._batches[site]
        if not batch or self._run is None:
            return
        self._batches[site] = []
        outbox = self._siblings_out[site]
        data = pickle.dumps((m.TOKENS, self._run.job_id, batch), protocol=5)
        # Every byte the frame carries: its pickle, and the buffers its tokens sent out
        # of band through shared memory (a large array is a few hundred bytes of pickle).
        size = len(data)
        for token in batch:
            payload = token[4]
            if payload is not None and not isinstance(payload, bytes):
                size += payload_size(payload) - len(payload[0])
        link = self._links.setdefault(site, [0, 0])
        link[0] += len(batch)
        link[1] += size
        if len(self._sends) < _SENDS_PER_JOB:
            self._sends.append((time.time(), site, len(batch), size))
        try:
            outbox.send(data)
        except ChannelClosedError:
            return  # that worker died; the client fails the job from its sentinel
        if outbox.pending_bytes > _HIGH_WATER:
            self._pump_until(lambda: outbox.pending_bytes < _LOW_WATER)

    def _flush_results(self) -> None:
        if self._results and self._run is not None:
            batch, self._results = self._results, []
            self._send_event((m.RESULTS, self._run.job_id, batch))

    def _flush_all(self) -> None:
        for site in self._batches:
            self._flush_batch(site)
        self._flush_results()
        self._flush_releases()

    def _flush_releases(self) -> None:
        if self._releases:
            releases, self._releases = self._releases, {}
            for creator, names in releases.items():
                outbox = self._siblings_out.get(creator)
                if outbox is not None:
                    try:
                        outbox.send(pickle.dumps((m.RELEASE, names), protocol=5))
                    except ChannelClosedError:
                        pass

    def _wait_for_release(self) -> None:
        self._flush_all()
        self._read_ready(5)

    def _release_own(self, payload: Payload | None) -> None:
        """Give back this worker's segments that ``payload`` holds, which will never be sent."""
        if payload is not None and not isinstance(payload, bytes):
            for name, _ in payload[1]:
                self._pool.release(name)

    def _queue_release(self, creator: str, name: str) -> None:
        # Called by finalizers, at any point: only record it; _flush_all sends it.
        self._releases.setdefault(creator, []).append(name)

    # -- receiving -------------------------------------------------------------------------

    def _read_ready(self, timeout_ms: int | None) -> None:
        """Wait up to ``timeout_ms`` for any pipe; read what arrived into the inbox."""
        with self._reading:
            self._read_ready_locked(timeout_ms)

    def _read_ready_locked(self, timeout_ms: int | None) -> None:
        pending = [o for o in (self._events, *self._siblings_out.values()) if o.has_pending]
        for outbox in pending:
            self._poller.register(outbox.fileno(), select.POLLOUT)
        try:
            ready = self._poller.poll(timeout_ms)
        finally:
            for outbox in pending:
                try:
                    self._poller.unregister(outbox.fileno())
                except (KeyError, ValueError):
                    pass
        for fd, _mask in ready:
            reader = self._readers.get(fd)
            if reader is None:
                continue
            for frame in reader.read():
                message = pickle.loads(frame)
                if message[0] == m.ABORT:
                    if message[1] not in self._ended:
                        self._aborted[message[1]] = message[2]
                elif message[0] == m.REPLY:
                    self._replies[message[1]] = message[2]
                    continue
                elif message[0] == m.RELEASE:
                    # At once, even mid-step: a generator sending large arrays reuses
                    # its segments as soon as the receiver is done with them.
                    for name in message[1]:
                        self._pool.release(name)
                    continue
                self._inbox.append(message)
            if reader.eof:
                self._poller.unregister(fd)
                del self._readers[fd]
                if reader is self._control:
                    raise SystemExit(0)  # the client closed our control pipe: it is gone
        for outbox in pending:
            try:
                outbox.flush()
            except ChannelClosedError:
                pass

    def _pump_until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self._read_ready(1000)

    def _next_message(self) -> tuple[Any, ...]:
        idle_since = time.monotonic()
        trimmed = False
        while not self._inbox:
            self._flush_all()
            if not trimmed and (self._pool.has_free() or self._views.has_cached()):
                # Segments kept for reuse are given back once this worker has been
                # idle a while: an idle federation does not hold its largest job's memory.
                left = idle_since + _TRIM_AFTER - time.monotonic()
                if left <= 0:
                    self._pool.trim()
                    self._views.trim()
                    trimmed = True
                    continue
                self._read_ready(int(left * 1000) + 1)
            else:
                self._read_ready(None)
        return self._inbox.popleft()

    def abort_requested(self, job_id: int) -> str | None:
        """The abort reason for ``job_id`` if the client asked to abort it (reads without waiting).

        Safe from any thread of a step: only one thread reads the pipes at a time,
        and a thread that finds another reading answers from what is known.
        """
        if job_id not in self._aborted and self._reading.acquire(blocking=False):
            try:
                self._read_ready_locked(0)
            finally:
                self._reading.release()
        return self._aborted.get(job_id)

    def send_to_job(self, from_job: int, to_job: int, name: str, value: Any, close: bool) -> None:
        self._request += 1
        request = self._request
        payload = (
            self._dumps_inline(value, f"value for job {to_job}'s input {name!r}")
            if value is not None or not close
            else None
        )
        self._send_event((m.SEND_TO_JOB, request, from_job, to_job, name, payload, close))
        self._flush_all()
        self._pump_until(lambda: request in self._replies)
        error = self._replies.pop(request)
        if error is not None:
            raise TokenRejectedError(to_job, error)

    # -- logging ---------------------------------------------------------------------------

    def log(self, level: str, event: str, **fields: Any) -> None:
        """Send one log record to the client, tagged with this worker."""
        fields.setdefault("site", self.site)
        fields.setdefault("pid", self.pid)
        try:
            self._send_event((m.LOG, [(level, event, fields)]))
        except SystemExit:
            pass

    def structlog_logger(self) -> Any:
        """A structlog logger whose records travel to the client (structlog imported on first use)."""
        if self._structlog is None:
            import structlog

            worker = self

            def forward(_logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
                event = str(event_dict.pop("event", ""))
                event_dict.pop("level", None)
                fields = {
                    k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)
                    for k, v in event_dict.items()
                }
                worker.log(method, event, **fields)
                raise structlog.DropEvent

            import logging

            level = getattr(logging, self.spec.log_level.upper(), logging.INFO)
            self._structlog = structlog.wrap_logger(
                None,
                processors=[forward],
                wrapper_class=structlog.make_filtering_bound_logger(level),
                context_class=dict,
            ).bind(site=self.site, pid=self.pid)
        return self._structlog

    # -- the loop --------------------------------------------------------------------------

    def forward_stdlib_logging(self) -> None:
        """Send records of the standard ``logging`` module (user code, libraries) to the client.

        Called after READY, while the worker waits for its first job: importing
        ``logging`` is then off the pool's start-up path.
        """
        import logging

        worker = self

        class _Forward(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                try:
                    run = worker._run
                    fields: dict[str, Any] = {"origin": record.name}  # "logger" is the client logger's
                    if run is not None:
                        fields["job_id"] = run.job_id
                    if worker._current_step is not None:
                        fields["step"] = worker._current_step
                    if record.exc_info:
                        fields["exception"] = self.format(record).split("\n", 1)[-1]
                    worker.log(record.levelname.lower(), record.getMessage(), **fields)
                except Exception:  # noqa: BLE001 - logging must never break a step
                    self.handleError(record)

        level = getattr(logging, self.spec.log_level.upper(), logging.WARNING)
        root = logging.getLogger()
        root.addHandler(_Forward(level))
        if root.level > level or root.level == logging.NOTSET:
            root.setLevel(level)

    def serve(self) -> None:
        """Serve until STOP, or until the client is gone."""
        while True:
            message = self._next_message()
            tag = message[0]
            if tag == m.TOKENS:
                self._on_tokens(message[1], message[2])
            elif tag == m.START:
                self._on_start(message[1], message[2], message[3])
            elif tag == m.ABORT:
                self._on_abort(message[1], message[2])
            elif tag == m.PLAN:
                self._on_plan(message[1], message[2])
            elif tag == m.STOP:
                self._flush_all()
                self._pump_until(lambda: not self._events.has_pending)
                return

    def _on_plan(self, digest: bytes, data: bytes) -> None:
        if len(self._plans) >= m.PLAN_CACHE:
            self._plans.pop(next(iter(self._plans)))
        self._plans[digest] = pickle.loads(data)

    def _on_start(self, job_id: int, digest: bytes, inputs: dict[str, bytes]) -> None:
        plan = self._plans[digest]
        run = _JobRun(job_id, plan, inputs)
        self._run = run
        self._links = {}
        self._sends = []
        try:
            for step_plan in plan.steps:
                run.steps[step_plan.name] = self._prepare(run, step_plan)
            for early in self._early.pop(job_id, ()):
                self._deliver_remote(run, early)
            if job_id in self._aborted:
                raise _Abort
            for step_run in list(run.steps.values()):
                self._maybe_run(run, step_run)
        except _Abort:
            self._end(run, ok=False)
        except _StepFailure:
            self._end(run, ok=False)
        else:
            self._maybe_finish(run)

    def _prepare(self, run: _JobRun, plan: m.StepPlan) -> _StepRun:
        step_run = _StepRun(plan)
        step_run.destinations = len(plan.outputs) + sum(1 for r in plan.routes if r.site != self.site)
        for param in plan.params:
            if param.kind == m.P_CTX:
                step_run.ctx_param = param.name
            elif param.name == plan.driver:
                step_run.driver_pending = set(param.sources)
            elif param.kind == m.P_INPUT and not param.stream:
                payload = run.inputs.get(param.source)
                if payload is not None:
                    step_run.kwargs[param.name] = pickle.loads(payload)
            else:
                step_run.gathers[param.name] = _Gather(param)
        return step_run

    def _on_tokens(self, job_id: int, tokens: list[m.Token]) -> None:
        run = self._run
        if run is None or job_id != run.job_id:
            if job_id in self._ended:
                self.dropped += len(tokens)
                for token in tokens:
                    self._views.discard(token[4], token[2])
            else:
                # A sibling started this job before our START arrived: keep them for it.
                self._early.setdefault(job_id, []).append(tuple(tokens))
            return
        try:
            self._deliver_remote(run, tokens)
        except (_Abort, _StepFailure):
            self._end(run, ok=False)
        else:
            self._maybe_finish(run)
        self._flush_releases()

    def _deliver_remote(self, run: _JobRun, tokens: Any) -> None:
        for step, param, source, _seq, payload, kind in tokens:
            # No local name holds the value: it is released as soon as the step lets go.
            self._deliver(
                run,
                step,
                param,
                source,
                self._views.loads(payload, source) if payload is not None else None,
                kind,
            )

    def _on_abort(self, job_id: int, reason: str) -> None:
        run = self._run
        if run is not None and run.job_id == job_id:
            self._end(run, ok=False)
        # An abort for a job that already ended here needs no answer: DONE was sent.

    # -- running steps ---------------------------------------------------------------------

    def _deliver(self, run: _JobRun, step: str, param: str, source: str, value: Any, kind: int) -> None:
        step_run = run.steps.get(step)
        if step_run is None or step_run.done:
            self.dropped += 1
            return
        if param == step_run.driver:
            if kind != m.END:
                step_run.queue.append((source, value))
            if kind != m.ITEM:
                step_run.driver_pending.discard(source)
        else:
            step_run.gathers[param].add(source, value, kind)
        self._maybe_run(run, step_run)

    def _maybe_run(self, run: _JobRun, step_run: _StepRun) -> None:
        if step_run.done or not all(g.complete for g in step_run.gathers.values()):
            return
        if step_run.driver is None:
            if not step_run.ran:
                step_run.ran = True
                self._call(run, step_run, None, None)
                self._step_done(run, step_run)
            return
        while step_run.queue:
            self._call(run, step_run, *step_run.queue.popleft())
        if not step_run.driver_pending and not step_run.done:
            self._step_done(run, step_run)

    def _call(self, run: _JobRun, step_run: _StepRun, source: str | None, item: Any) -> None:
        plan = step_run.plan
        kwargs = dict(step_run.kwargs)
        for name, gather in step_run.gathers.items():
            kwargs[name] = gather.value()
        if step_run.driver is not None:
            kwargs[step_run.driver] = item
        if step_run.ctx_param is not None:
            kwargs[step_run.ctx_param] = StepContext(self, run.job_id, plan.name, source)
        if run.job_id in self._aborted:
            raise _Abort
        started = time.time()
        returned: float | None = None
        count = 0
        outer_step, self._current_step = self._current_step, plan.name
        try:
            if plan.generator:
                generator: Iterator[Any] = plan.fn(**kwargs)
                try:
                    for value in generator:
                        self._emit(run, step_run, value, m.ITEM)
                        count += 1
                finally:
                    close = getattr(generator, "close", None)
                    if close is not None:
                        close()
            else:
                value = plan.fn(**kwargs)
                count = 1
                returned = time.time()  # the step's end, before its value is sent on
                self._emit(run, step_run, value, m.ITEM if plan.stream else m.LAST)
        except (_Abort, _StepFailure):
            raise
        except JobCancelledError as exc:
            if run.job_id in self._aborted:
                raise _Abort from exc
            self._fail(run, plan.name, exc)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            self._fail(run, plan.name, exc)
        finally:
            self._current_step = outer_step  # steps run inside a step's emit (same site)
            ended = returned if returned is not None else time.time()
            if step_run.calls < _TIMINGS_PER_STEP:
                run.timings.append((plan.name, started, ended, count))
                step_run.timing = len(run.timings) - 1
            else:
                # A step run per item of a long stream: later calls widen its last record,
                # so DONE stays small (a million records would be 25 MB to pickle).
                name, first, _, items = run.timings[step_run.timing]
                run.timings[step_run.timing] = (name, first, ended, items + count)
            step_run.calls += 1

    def _fail(self, run: _JobRun, step: str, exc: BaseException) -> None:
        data, tb = dump_exception(exc)
        self._flush_all()
        self._send_event((m.FAILED, run.job_id, step, data, tb))
        raise _StepFailure

    def _dumps(self, value: Any, what: str, destinations: int) -> Payload:
        payload = self._pool.dumps(value, what, destinations)
        self._check_size(payload_size(payload), what)
        return payload

    def _dumps_inline(self, value: Any, what: str) -> bytes:
        data = dumps(value, what=what)
        self._check_size(len(data), what)
        return data

    def _check_size(self, size: int, what: str) -> None:
        if size > self.spec.max_token_bytes:
            raise SerializationError(
                f"{what} is {size:,} bytes pickled, over max_token_bytes={self.spec.max_token_bytes:,}"
            )

    def _emit(self, run: _JobRun, step_run: _StepRun, value: Any, kind: int) -> None:
        plan = step_run.plan
        seq = step_run.seq
        step_run.seq += 1
        now = time.monotonic()
        # A stream that was quiet for a while sends this item at once (latency); a
        # fast one goes in frames of up to _BATCH items (throughput). Whatever is
        # batched is sent before the worker waits, and when its step ends.
        eager = kind != m.ITEM or now - self._last_emit > _LINGER
        self._last_emit = now
        payload: Payload | None = None
        if step_run.destinations:
            try:
                payload = self._dumps(value, step_run.what, step_run.destinations)
            except SerializationError as exc:
                self._fail(run, plan.name, exc)
        if plan.outputs:
            for output in plan.outputs:
                self._results.append((output, seq, payload))  # type: ignore[arg-type]
            if eager or len(self._results) >= _BATCH:
                self._flush_results()
        for route in plan.routes:
            if route.site == self.site:
                self._deliver(run, route.step, route.param, self.site, value, kind)
            else:
                batch = self._batches[route.site]
                batch.append((route.step, route.param, self.site, seq, payload, kind))
                if eager or len(batch) >= _BATCH:
                    self._flush_batch(route.site)
        if now >= self._next_check:
            # A step that emits but never checks ctx.cancelled still stops promptly
            # when aborted: look at the inbox (without waiting) every few ms.
            self._next_check = now + _CHECK_EVERY
            self._read_ready(0)
        if run.job_id in self._aborted:
            raise _Abort

    def _step_done(self, run: _JobRun, step_run: _StepRun) -> None:
        step_run.done = True
        run.remaining -= 1
        plan = step_run.plan
        if plan.stream:
            for route in plan.routes:
                if route.site == self.site:
                    self._deliver(run, route.step, route.param, self.site, None, m.END)
                else:
                    self._batches[route.site].append(
                        (route.step, route.param, self.site, step_run.seq, None, m.END)
                    )
                    self._flush_batch(route.site)

    def _maybe_finish(self, run: _JobRun) -> None:
        if self._run is run and run.remaining == 0:
            self._end(run, ok=True)

    def _end(self, run: _JobRun, ok: bool) -> None:
        if self._run is not run:
            return
        results: list[tuple[str, int, Payload]] = []
        if ok:
            # The last results ride inside DONE: one frame and one wake-up of the router.
            results, self._results = self._results, []
            self._flush_all()
        else:
            # What this job will never send still holds its segments here: release
            # them, or they stay busy for the worker's life (invariant 7).
            for _, _, payload in self._results:
                self._release_own(payload)
            self._results.clear()
            for site, batch in self._batches.items():
                for token in batch:
                    self._release_own(token[4])
                self._batches[site] = []
            # Values the stopped steps viewed may sit in reference cycles (the
            # traceback of the abort); collect them now, so their segments go back.
            gc.collect()
        self._run = None
        job_id = run.job_id
        self._ended.add(job_id)
        self._ended_order.append(job_id)
        if len(self._ended_order) > _ENDED_WINDOW:
            self._ended.discard(self._ended_order.popleft())
        self._aborted.pop(job_id, None)
        for tokens in self._early.pop(job_id, ()):
            self.dropped += len(tokens)
            for token in tokens:
                self._views.discard(token[4], token[2])
        info = {
            "timings": run.timings,
            "links": self._links,
            "sends": self._sends,
            "dropped": self.dropped,
            "started": run.started,
            "results": results,
        }
        self._send_event((m.DONE, job_id, ok, info))


_shm_prefix: str | None = None  # set once the worker knows it; the lifeline watchdog needs it


def _watch_lifeline(fd: int) -> None:
    """Block until the client is gone (EOF on the lifeline), then kill this whole process group."""
    while True:
        try:
            if not os.read(fd, 1):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    try:
        if _shm_prefix:
            unlink_segments(_shm_prefix)  # we created them; nobody else is left to
        os.killpg(os.getpgid(0), 9)
    finally:
        os._exit(70)


def run_worker(
    control_fd: int,
    events_fd: int,
    siblings_in: dict[str, int],
    siblings_out: dict[str, int],
    capture_logging: bool = False,
) -> None:
    """Start a worker on these pipes: read INIT, run the site's setup, report READY, serve."""
    events = Outbox(events_fd)
    control = FrameReader(control_fd)
    worker: Worker | None = None
    try:
        poller = select.poll()
        poller.register(control_fd, _POLLIN)
        frames: list[Any] = []
        while not frames:
            poller.poll()
            frames = control.read()
            if control.eof and not frames:
                return
        init = pickle.loads(frames[0])
        # The client's sys.path comes first, on its own: the spec may name functions
        # by reference to modules only importable with it.
        for entry in reversed(init[1]):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        spec: m.WorkerSpec = pickle.loads(init[2])
        worker = Worker(
            spec,
            control,
            events,
            {site: FrameReader(fd) for site, fd in siblings_in.items()},
            {site: Outbox(fd) for site, fd in siblings_out.items()},
        )
        for frame in frames[1:]:
            worker._inbox.append(pickle.loads(frame))
        if spec.data_dir:
            os.makedirs(spec.data_dir, exist_ok=True)
        events.send(pickle.dumps((m.BOOTED,), protocol=5))
        try:
            if spec.setup is not None:
                worker.state = spec.setup()
        except BaseException as exc:  # noqa: BLE001 - report any setup failure, SystemExit too
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            events.send(pickle.dumps((m.START_FAILED, tb), protocol=5))
            worker._pump_until(lambda: not events.has_pending)
            return
        global _shm_prefix
        _shm_prefix = spec.shm_prefix
        worker._send_event((m.READY, os.getpid()))
        if capture_logging:  # a process of its own: its root logger is ours to add to
            worker.forward_stdlib_logging()
        try:
            worker.serve()
        finally:
            worker._pool.close()
            worker._views.close()
    except SystemExit:
        return
    except BaseException:
        tb = traceback.format_exc()
        try:
            events.send(
                pickle.dumps(
                    (
                        m.START_FAILED if worker is None else m.LOG,
                        tb if worker is None else [("critical", "worker crashed", {"traceback": tb})],
                    ),
                    protocol=5,
                )
            )
        except Exception:  # noqa: BLE001
            pass
        raise


def main() -> None:
    """Entry point of a worker process: ``python -c 'from federation._worker import main; main()' ARGS``."""
    import json

    serve_process(json.loads(sys.argv[1]))


def serve_process(args: dict[str, Any]) -> None:
    """Run this process as a worker on the pipes named in ``args``; never returns.

    Shared by spawned workers (:func:`main`) and workers forked by the forkserver.
    """
    import faulthandler
    import signal

    # A segfault prints the Python stack to stderr, which the client keeps as the
    # worker's last lines for its WorkerDiedError.
    faulthandler.enable()
    # The pipes came in through pass_fds, inheritable: a process a step starts must
    # not hold them, or the client could never see this worker's pipes close.
    for fd in (
        args["control"],
        args["events"],
        args["lifeline"],
        *args["siblings_in"].values(),
        *args["siblings_out"].values(),
    ):
        try:
            os.set_inheritable(fd, False)
        except OSError:
            pass
    # Ctrl+C is the client's to handle: it closes the federation, which stops us cleanly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(
        target=_watch_lifeline, args=(args["lifeline"],), name="federation-lifeline", daemon=True
    ).start()
    code = 0
    try:
        run_worker(
            args["control"], args["events"], args["siblings_in"], args["siblings_out"], capture_logging=True
        )
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - what an uncaught exception does to `python -c`
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # Whatever the site's steps or setup started (a server, a helper) ends with us.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.killpg(os.getpgid(0), signal.SIGTERM)
    except OSError:
        pass
    os._exit(code)
