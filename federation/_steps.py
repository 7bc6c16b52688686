"""The step runner: how one site runs its part of a job, from START to DONE.

What a job run goes through at one site, top to bottom::

    START  ─> _on_start: prepare every step (bind value inputs, make gathers),
              _deliver tokens that arrived early, then _drive
    TOKENS ─> _on_tokens ─> _deliver (to a gather, or queued for a driver), then _drive
    ABORT  ─> _on_abort ─> _end(ok=False)

    _drive: a loop; each turn, the deepest step that can go on takes one _turn:
        a generator in progress ─> _advance: next(generator) ─> _emit one item
        gathers complete, not run ─> _call the user's function once
        a driver item queued     ─> _call once for that item
        its streams all ended    ─> _step_done: END to its consumers
      until no step can go on (then wait for tokens), every step is done
      (_end ok: DONE after all data), a step raised (_fail: FAILED, then _end)
      or the client aborted the job (seen between turns: _end, not ok)
    _emit: pickle once (large buffers to shared memory), then
        outputs    ─> results batch  ─> events pipe (to the client)
        other site ─> token batch    ─> that site's link pipe
        this site  ─> _deliver: the consumer takes its turn next (it is deeper),
                      so a long stream is consumed as it is made, never buffered

Nothing re-enters: a step's values are handed on by the loop, never by a
call inside the step's own call, and the loop is the only place a run ends
early. ``_end(ok=False)`` closes the generators still in progress and gives
back the shared memory of every value that will now never be sent
(invariant 7) before it sends DONE.

The runner moves no bytes itself: :class:`~federation._worker.Worker` supplies
the pipes (``_send_event``, ``_flush_batch``, ``_flush_results``,
``_flush_all``, ``_read_ready``), so another site runtime can reuse it.
"""

from __future__ import annotations

import gc
import pickle
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from . import _messages as m
from ._context import StepContext
from ._exceptions import JobCancelledError, QuorumError, SerializationError, TokenRejectedError
from ._fault_runtime import FaultRuntime
from ._gather import Gather
from ._runs import JobRun, StepRun
from ._serialization import (
    Payload,
    SegmentPool,
    SegmentViews,
    dump_exception,
    dumps,
    inline,
    payload_size,
    shared_segments,
)
from ._site_logging import SiteLogging
from ._store import SiteStoreOwner

__all__ = ["StepContext", "StepRunner"]

# Tokens per frame for a fast stream: 192 small tokens (~4.4 KB pickled) are about one
# atomic inbox write (PIPE_BUF); a write that wakes the reader costs ~7 us here, which at
# 64 per frame was a sixth of the sender's time per item.
_BATCH = 192
_LINGER = 0.0002  # seconds since the last item after which an item is sent at once
# Late tokens of a job trail it by at most a few jobs (they are ahead of its
# sibling's DONE in a FIFO pipe); remembering this many ended jobs is ample.
_ENDED_WINDOW = 1024
_TIMINGS_PER_STEP = 64  # timeline records kept per step and job; later calls are merged
_CHECK_EVERY = 0.002  # seconds between looks at the inbox while a step emits


class StepRunner(SiteStoreOwner, FaultRuntime, SiteLogging):
    """Runs one site's steps of the current job; a site runtime supplies the pipes."""

    # State the runtime sets up (see Worker.__init__).
    site: str
    spec: m.WorkerSpec
    state: Any
    data_dir: str | None
    env: dict[str, str]
    services: Mapping[str, Any]
    dropped: int
    _plans: dict[bytes, m.SitePlan]
    _run: JobRun | None
    _ended: set[int]
    _ended_order: deque[int]
    _aborted: dict[int, str]
    _reading: threading.Lock  # one reader of the transport at a time (a step may read, see abort_requested)
    _request: int  # the last send_to_job request's number
    _replies: dict[int, Any]  # send_to_job request -> the client's answer (None: accepted)
    _early: dict[int, list[tuple[Any, ...]]]
    _batches: defaultdict[str, list[m.Token]]  # tokens waiting per destination site
    _results: list[tuple[str, int, Payload]]
    _links: dict[str, list[int]]
    _sends: list[tuple[float, str, int, int]]
    _pool: SegmentPool
    _views: SegmentViews
    _next_check: float
    _current_step: str | None
    _last_emit: float
    # A step's last value for the client waits here until the run ends (it rides inside
    # DONE: one frame and one wake-up of the router, not two), or until user code runs
    # next or the worker waits, whichever comes first: never later than that.
    _results_held: bool = False

    # -- what the runtime provides -----------------------------------------------------------

    def _send_event(self, message: tuple[Any, ...]) -> None:
        raise NotImplementedError

    def _flush_batch(self, site: str) -> None:
        raise NotImplementedError

    def _flush_results(self) -> None:
        raise NotImplementedError

    def _flush_all(self) -> None:
        raise NotImplementedError

    def _flush_releases(self) -> None:
        raise NotImplementedError

    def _read_ready(self, timeout_ms: int | None) -> None:
        raise NotImplementedError

    def _read_ready_locked(self, timeout_ms: int | None) -> None:
        """Read what has arrived (``_reading`` held), waiting up to ``timeout_ms``."""
        raise NotImplementedError

    def _pump_until(self, condition: Callable[[], bool]) -> None:
        """Read and handle messages until ``condition()`` holds."""
        raise NotImplementedError

    # -- what a step's context asks of the runtime ---------------------------------------------

    def abort_requested(self, job_id: int) -> str | None:
        """The abort reason for ``job_id`` if the client asked to abort it (reads without waiting).

        Safe from any thread of a step: only one thread reads at a time, and a
        thread that finds another reading answers from what is known.
        """
        if job_id not in self._aborted and self._reading.acquire(blocking=False):
            try:
                self._read_ready_locked(0)
            finally:
                self._reading.release()
        return self._aborted.get(job_id)

    def send_to_job(self, from_job: int, to_job: int, name: str, value: Any, close: bool) -> None:
        """Feed another job's stream input through the client; wait for its answer.

        What the step sent before goes first, then the request.
        """
        self._request += 1
        request = self._request
        payload = (
            self._dumps_inline(value, f"value for job {to_job}'s input {name!r}")
            if value is not None or not close
            else None
        )
        self._flush_all()
        self._send_event((m.SEND_TO_JOB, request, from_job, to_job, name, payload, close))
        self._pump_until(lambda: request in self._replies)
        error = self._replies.pop(request)
        if error is not None:
            raise TokenRejectedError(to_job, error)

    # -- the job run ---------------------------------------------------------------------------

    def _on_start(
        self, job_id: int, digest: bytes, inputs: dict[str, bytes], absent: tuple[str, ...] = ()
    ) -> None:
        plan = self._plans[digest]
        run = JobRun(job_id, plan, inputs, frozenset(absent))
        self._run = run
        self._links = {}
        self._sends = []
        self._faults_start(job_id)  # a fault plan's rules for this job, if any (see _faults)
        for step_plan in plan.steps:
            run.steps[step_plan.name] = self._prepare(run, step_plan)
        run.order = list(reversed(run.steps.values()))
        for early in self._early.pop(job_id, ()):
            self._deliver_remote(run, early)
        # The inbox was just read: the first turn need not look at it again (a poll per site per job).
        self._next_check = time.monotonic() + _CHECK_EVERY
        self._drive(run)

    def _prepare(self, run: JobRun, plan: m.StepPlan) -> StepRun:
        step_run = StepRun(plan)
        step_run.destinations = len(plan.outputs) + sum(
            1 for r in plan.routes if r.site != self.site and r.site not in run.absent
        )
        step_run.local = any(route.site == self.site for route in plan.routes)
        for param in plan.params:
            if param.kind == m.P_CTX:
                step_run.ctx_param = param.name
            elif param.name == plan.driver:
                step_run.driver_pending = set(param.sources) - run.absent
            elif param.kind == m.P_INPUT and not param.stream:
                payload = run.inputs.get(param.source)
                if payload is not None:
                    step_run.kwargs[param.name] = pickle.loads(payload)
            else:
                step_run.gathers[param.name] = Gather(param, run.absent, run.t0)
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
        self._deliver_remote(run, tokens)
        self._drive(run)
        self._flush_releases()

    def _deliver_remote(self, run: JobRun, tokens: Any) -> None:
        loads = self._views.loads
        last: tuple[str, str, str] | None = None
        append: Callable[[Any], None] | None = None
        for step, param, source, _seq, payload, kind in tokens:
            # No local name holds the value: it is released as soon as the step lets go.
            if payload is None:
                value = None
            elif type(payload) is tuple and len(payload) == 1:
                value = payload[0]  # inline: unpickled with the frame
            else:
                value = loads(payload, source)
            if append is not None and kind == m.ITEM and (step, param, source) == last:
                append(value)  # a stream's next item: where the previous one went
                continue
            self._deliver(run, step, param, source, value, kind)
            last = (step, param, source)
            append = self._item_sink(run, step, param, source) if kind == m.ITEM else None

    def _item_sink(self, run: JobRun, step: str, param: str, source: str) -> Callable[[Any], None] | None:
        """Where more items from ``source`` to ``step``'s ``param`` go, while a frame is read.

        Nothing runs between two tokens of one frame, so what took the first item
        takes the next: a stream of small items skips the lookups per item.
        """
        step_run = run.steps.get(step)
        if step_run is None or step_run.done:
            return None
        if param == step_run.driver:
            queue = step_run.queue
            return lambda value: queue.append((source, value))
        gather = step_run.gathers[param]
        items = gather.values.get(source)
        if gather.param.stream and isinstance(items, list) and source in gather.pending:
            return items.append
        return None

    def _on_abort(self, job_id: int, reason: str) -> None:
        run = self._run
        if run is not None and run.job_id == job_id:
            self._end(run, ok=False)

    def _deliver(self, run: JobRun, step: str, param: str, source: str, value: Any, kind: int) -> None:
        """Hand a value to a step's input; the step runs on a later turn of :meth:`_drive`."""
        step_run = run.steps.get(step)
        if step_run is None or step_run.done:
            self.dropped += 1
            return
        if param == step_run.driver:
            if kind != m.END:
                step_run.queue.append((source, value))
            if kind != m.ITEM:
                step_run.driver_pending.discard(source)
        elif not step_run.gathers[param].add(source, value, kind):
            self.dropped += 1  # from a source a tolerant gather gave up on

    def _drive(self, run: JobRun) -> None:
        """Give turns to the steps that can go on, deepest first, until none can; then end or wait.

        Deepest first keeps memory bounded: an item a generator yields to a step
        of this site is consumed (and passed on) before the generator is asked
        for the next one, so a long stream is never buffered whole here.
        """
        while True:
            if run.job_id in self._aborted:
                self._end(run, ok=False)
                return
            now = time.monotonic()
            if now >= self._next_check:
                # A step that emits but never checks ctx.cancelled still stops promptly
                # when aborted: look at the inbox (without waiting) every few ms.
                self._next_check = now + _CHECK_EVERY
                self._read_ready(0)
                continue
            step_run = next((s for s in run.order if s.has_work()), None)
            if step_run is None:
                break
            self._turn(run, step_run)
            if run.failed:
                self._end(run, ok=False)
                return
        if run.remaining == 0:
            self._end(run, ok=True)

    def _turn(self, run: JobRun, step_run: StepRun) -> None:
        """A step's turn: its next items, a new call, or its end."""
        if step_run.active is not None:
            self._advance(run, step_run)
        elif step_run.driver is None and not step_run.ran:
            step_run.ran = True
            self._call(run, step_run, None, None)
        elif step_run.queue:
            queue = step_run.queue
            while True:
                self._call(run, step_run, *queue.popleft())
                if not queue or step_run.active is not None or self._yield_turn(run, step_run):
                    return
        else:
            self._step_done(run, step_run)

    def _yield_turn(self, run: JobRun, step_run: StepRun, now: float | None = None) -> bool:
        """Whether a step must hand the loop back after a value: a deeper step may have work,
        the run ended, or it is time to look at the inbox. Otherwise it goes on in its turn,
        which saves a pass over the steps per item of a fast stream. ``now`` (monotonic) is
        a time just read, saving a read of the clock per item."""
        return (
            step_run.local
            or run.failed
            or run.job_id in self._aborted
            or (time.monotonic() if now is None else now) >= self._next_check
        )

    def _call(self, run: JobRun, step_run: StepRun, source: str | None, item: Any) -> None:
        """Call the user's function; a generator's items come on later turns."""
        plan = step_run.plan
        kwargs = dict(step_run.kwargs)
        missing: dict[str, m.Missing] = {}
        for name, gather in step_run.gathers.items():
            if gather.tolerant:
                short = gather.shortfall()
                if short is not None:
                    self._fail(run, plan.name, self._quorum_error(run, plan.name, gather, short))
                    return
                missing.update(gather.missing)
            kwargs[name] = gather.value()
        if step_run.driver is not None:
            kwargs[step_run.driver] = item
        if step_run.ctx_param is not None:
            ctx = StepContext(self, run.job_id, plan.name, source)
            ctx.missing = missing
            kwargs[step_run.ctx_param] = ctx
        step_run.call_started = time.time()
        step_run.call_count = 0
        step_run.call_source = source
        if self._results_held:
            self._results_held = False
            self._flush_results()
        self._current_step = plan.name
        try:
            value = plan.fn(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - the step's error, reported as FAILED
            self._record_call(run, step_run, time.time(), 0)
            self._call_raised(run, step_run, exc)
            return
        finally:
            self._current_step = None
        if self._faults is not None and not plan.generator:  # a generator is slowed per item
            self._faults_slow(plan.name, step_run.call_started)
        if plan.generator:
            step_run.active = value
            return
        self._record_call(run, step_run, time.time(), 1)  # the step's end, before its value is sent on
        self._emit(run, step_run, value, m.ITEM if plan.stream else m.LAST)
        if step_run.driver is None and not run.failed:
            self._step_done(run, step_run)

    def _advance(self, run: JobRun, step_run: StepRun) -> None:
        """Take the next items from a generator step and send them on, until its turn is over."""
        generator = step_run.active
        assert generator is not None
        if self._results_held:
            self._results_held = False
            self._flush_results()
        while True:
            self._current_step = step_run.plan.name
            item_started = time.time() if self._faults is not None else 0.0
            try:
                value = next(generator)
            except StopIteration:
                step_run.active = None
                self._record_call(run, step_run, time.time(), step_run.call_count)
                if step_run.driver is None:
                    self._step_done(run, step_run)
                return
            except BaseException as exc:  # noqa: BLE001 - the step's error, reported as FAILED
                step_run.active = None
                self._record_call(run, step_run, time.time(), step_run.call_count)
                self._call_raised(run, step_run, exc)
                return
            finally:
                self._current_step = None
            if self._faults is not None:
                self._faults_slow(step_run.plan.name, item_started)
            step_run.call_count += 1
            self._emit(run, step_run, value, m.ITEM)
            if self._yield_turn(run, step_run, self._last_emit):  # the time _emit just read
                return

    def _call_raised(self, run: JobRun, step_run: StepRun, exc: BaseException) -> None:
        if isinstance(exc, KeyboardInterrupt):
            raise exc
        if isinstance(exc, JobCancelledError) and run.job_id in self._aborted:
            return  # the step saw the abort (ctx.check_cancelled): _drive ends the run
        self._fail(run, step_run.plan.name, exc)

    def _record_call(self, run: JobRun, step_run: StepRun, ended: float, count: int) -> None:
        """Keep a timeline record of one call of a step."""
        name = step_run.plan.name
        if step_run.calls < _TIMINGS_PER_STEP:
            run.timings.append((name, step_run.call_started, ended, count))
            step_run.timing = len(run.timings) - 1
        else:
            # A step run per item of a long stream: later calls widen its last record,
            # so DONE stays small (a million records would be 25 MB to pickle).
            _, first, _, items = run.timings[step_run.timing]
            run.timings[step_run.timing] = (name, first, ended, items + count)
        step_run.calls += 1

    def _fail(self, run: JobRun, step: str, exc: BaseException) -> None:
        """Report that ``step`` raised; :meth:`_drive` then ends the run."""
        data, tb = dump_exception(exc)
        self._flush_all()
        self._send_event((m.FAILED, run.job_id, step, data, tb))
        run.failed = True

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

    def _emit(self, run: JobRun, step_run: StepRun, value: Any, kind: int) -> None:
        """Send a value a step made to where it goes: the client, other sites, this site."""
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
        if step_run.destinations and not plan.outputs:
            # Only other sites receive it: a small value rides in the frame's one pickle.
            payload = inline(value)
        if step_run.destinations and payload is None:
            try:
                payload = self._dumps(value, step_run.what, step_run.destinations)
            except Exception as exc:  # noqa: BLE001 - cannot pickle it, too large, /dev/shm full
                self._fail(run, plan.name, exc)
                return
        if plan.outputs:
            for output in plan.outputs:
                self._results.append((output, seq, payload))  # type: ignore[arg-type]
            if kind == m.LAST:
                self._results_held = True  # see _results_held: DONE may carry it
            elif eager or len(self._results) >= _BATCH:
                self._flush_results()
        for route in plan.routes:
            if route.site == self.site:
                self._deliver(run, route.step, route.param, self.site, value, kind)
            elif route.site in run.absent:
                continue
            else:
                batch = self._batches[route.site]
                batch.append((route.step, route.param, self.site, seq, payload, kind))
                if eager or len(batch) >= _BATCH:
                    self._flush_batch(route.site)
        if self._faults is not None:
            self._faults_after_value(plan.name)  # a crash or pause after N values (see _faults)

    def _step_done(self, run: JobRun, step_run: StepRun) -> None:
        """A step made its last value: its streams end at their consumers."""
        step_run.done = True
        run.remaining -= 1
        plan = step_run.plan
        if plan.stream:
            for route in plan.routes:
                if route.site == self.site:
                    self._deliver(run, route.step, route.param, self.site, None, m.END)
                elif route.site not in run.absent:
                    self._batches[route.site].append(
                        (route.step, route.param, self.site, step_run.seq, None, m.END)
                    )
                    self._flush_batch(route.site)

    # -- tolerant gathers, the site store, metrics ---------------------------------------------

    def _quorum_error(self, run: JobRun, step: str, gather: Gather, short: str) -> QuorumError:
        return QuorumError(
            f"step {step!r} of job {run.job_id} at site {self.site!r}: {short}",
            job_id=run.job_id,
            site=self.site,
            step=step,
            needed=gather.need,
            missing=dict(gather.missing),
        )

    def _tolerant_gathers(self, run: JobRun) -> Iterator[Gather]:
        for step_run in run.steps.values():
            if not step_run.ran and not step_run.done:
                for gather in step_run.gathers.values():
                    if gather.tolerant and not gather.complete:
                        yield gather

    def _on_missing(self, job_id: int, sources: list[tuple[str, str, str]]) -> None:
        """The client says these sources will not deliver (their step raised, their worker died)."""
        run = self._run
        if run is None or run.job_id != job_id:
            return  # this site's run has ended: nothing waits for them any more
        for gather in list(self._tolerant_gathers(run)):
            for source, reason, detail in sources:
                gather.give_up(source, reason, detail)
        self._drive(run)
        self._flush_releases()

    def _next_timer(self) -> float | None:
        """When the nearest deadline of a tolerant gather of the running job, or a frame a
        fault plan holds, falls (monotonic)."""
        held = self._faults_timer()
        run = self._run
        if run is None:
            return held
        deadlines = [g.deadline for g in self._tolerant_gathers(run) if g.deadline is not None]
        if held is not None:
            deadlines.append(held)
        return min(deadlines) if deadlines else None

    def _on_tick(self) -> None:
        """A deadline came due: those gathers go on without the late sites, which the client cancels."""
        self._faults_flush()
        run = self._run
        if run is None:
            return
        now = time.monotonic()
        late: set[str] = set()
        for gather in list(self._tolerant_gathers(run)):
            late.update(gather.expire(now))
        if late:
            self._send_event((m.CUT, run.job_id, sorted(late)))
        self._drive(run)
        self._flush_releases()

    def record_metric(self, job_id: int, step: str, name: str, value: float) -> None:
        """Keep a metric a step recorded; it travels to the client with DONE."""
        run = self._run
        if run is not None and run.job_id == job_id:
            run.metrics.append((step, str(name), float(value), time.time()))

    def _end(self, run: JobRun, ok: bool) -> None:
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
            for batch in self._batches.values():
                for token in batch:
                    self._release_own(token[4])
            self._batches.clear()
        self._run = None
        self._close_active(run)
        # The values the run's steps still hold go now, and the releases of their segments
        # before DONE: the sites that made them read the release before the slot's next job
        # can start (it follows DONE), and reuse the segment rather than fault in fresh memory.
        run.steps.clear()
        run.order.clear()
        self._flush_releases()
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
            "metrics": run.metrics,
        }
        self._send_event((m.DONE, job_id, ok, info))
        if not ok:
            # Values the stopped steps viewed may sit in reference cycles (the abort's
            # traceback); collected now, after DONE so the slot is not held for it,
            # their segments go back with the next flush.
            gc.collect()

    def _close_active(self, run: JobRun) -> None:
        """Close the generators an ended run leaves mid-stream, deepest first (their ``finally``)."""
        for step_run in run.order:
            generator, step_run.active = step_run.active, None
            if generator is None:
                continue
            self._record_call(run, step_run, time.time(), step_run.call_count)
            close = getattr(generator, "close", None)
            if close is None:
                continue
            self._current_step = step_run.plan.name
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - the run has ended; its cleanup can only be logged
                self.log("warning", "a step raised while closing", step=step_run.plan.name, error=repr(exc))
            finally:
                self._current_step = None

    def _release_own(self, payload: Payload | None) -> None:
        """Give back this worker's segments that ``payload`` holds, which will never be sent."""
        for name, _ in shared_segments(payload):
            self._pool.release(name)
