"""The worker: one site of one job execution, serving jobs from its inbox until told to stop.

Data flow inside a worker (one per site per pool slot)::

    control pipe (client) ──┐                 ┌─> the other sites' inbox pipes (tokens)
    inbox pipe (tokens from ├─> inbox deque ─> job run ─┤
      every other site)   ──┘   (pump)        └─> events pipe (results, done, failed, logs)

The worker is single-threaded; it blocks in ``poll`` on its readers, and on its
writers only when they have bytes pending. Ordering rules it relies on:

* The control pipe is FIFO, and the client writes a job's START before any
  ABORT, stream token or close for it; so a worker never sees those for a job
  it was not started for. Tokens from a sibling can overtake START (the sibling
  may start first; siblings share this worker's inbox pipe, see ``_channel``):
  they are kept until START arrives, keyed by job id.
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

import os
import pickle
import select
import sys
import threading
import time
import traceback
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

from . import _messages as m
from ._channel import ChannelClosedError, FrameReader, InboxReader, LinkOutbox, Outbox
from ._runs import JobRun
from ._serialization import (
    Payload,
    SegmentPool,
    SegmentViews,
    payload_size,
    unlink_segments,
)
from ._steps import StepContext, StepRunner

__all__ = ["StepContext", "Worker", "main"]

_HIGH_WATER = 8 << 20  # pump (wait for the reader) above this many pending bytes
_LOW_WATER = 1 << 20
_SENDS_PER_JOB = 10_000  # timeline records of frames sent, per job and site
_TRIM_AFTER = 1.0  # seconds idle after which a worker gives its spare shared memory back
_POLLIN = select.POLLIN | select.POLLHUP | select.POLLERR


class Worker(StepRunner):
    """Serves jobs for one site; the same loop runs in a process or in a thread.

    The pipes, the loop and logging are here; running the steps of a job is
    :class:`~federation._steps.StepRunner`'s.
    """

    def __init__(
        self,
        spec: m.WorkerSpec,
        control: FrameReader,
        events: Outbox,
        inbox: InboxReader,
        siblings_out: dict[str, LinkOutbox],
    ) -> None:
        self.site = spec.site
        self.name = spec.name
        self.spec = spec
        self.env = dict(spec.env)
        self.data_dir = spec.data_dir
        self.services = spec.services
        self.state: Any = None
        self.pid = os.getpid()
        self._control = control
        self._events = events
        self._readers: dict[int, FrameReader | InboxReader] = {
            reader.fileno(): reader for reader in (control, inbox)
        }
        self._siblings_out = siblings_out
        self._inbox: deque[tuple[Any, ...]] = deque()
        self._poller = select.poll()
        for reader in self._readers.values():
            self._poller.register(reader.fileno(), _POLLIN)
        self._plans: dict[bytes, m.SitePlan] = {}
        self._run: JobRun | None = None
        self._ended: set[int] = set()
        self._ended_order: deque[int] = deque()
        self._aborted: dict[int, str] = {}
        self._early: dict[int, list[tuple[Any, ...]]] = {}
        # Only sites with tokens waiting have an entry, and only outboxes that could not
        # write everything are watched: with 100 sites, looking at every peer on each
        # flush or wait cost more than the job's own work.
        self._batches: defaultdict[str, list[m.Token]] = defaultdict(list)
        self._stalled: set[Outbox | LinkOutbox] = set()
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
        if self._faults is not None and self._faults_event(message):
            return  # a fault plan holds it (a slow or cut link to the client; see _faults)
        try:
            if not self._events.send(pickle.dumps(message, protocol=5)):
                self._stalled.add(self._events)
        except ChannelClosedError:
            raise SystemExit(0) from None  # the client is gone; the lifeline will follow
        if self._events.pending_bytes > _HIGH_WATER:
            self._pump_until(lambda: self._events.pending_bytes < _LOW_WATER)

    def _flush_batch(self, site: str) -> None:
        if self._run is None:
            return
        batch = self._batches.pop(site, None)
        if not batch:
            return
        self._send_tokens(site, self._run.job_id, batch)

    def _send_tokens(self, site: str, job_id: int, batch: list[m.Token], shaped: bool = False) -> None:
        outbox = self._siblings_out[site]
        data = pickle.dumps((m.TOKENS, job_id, batch), protocol=5)
        # Every byte the frame carries: its pickle, and the buffers its tokens sent out
        # of band through shared memory (a large array is a few hundred bytes of pickle).
        size = len(data)
        for token in batch:
            payload = token[4]
            if payload is not None and type(payload) is tuple and len(payload) == 2:
                size += payload_size(payload) - len(payload[0])
        if not shaped and self._faults is not None and self._faults_batch(site, job_id, batch, size):
            return  # the fault plan sends it later (delay, bandwidth, partition) or lost it
        link = self._links.setdefault(site, [0, 0])
        link[0] += len(batch)
        link[1] += size
        if len(self._sends) < _SENDS_PER_JOB:
            self._sends.append((time.time(), site, len(batch), size))
        try:
            if not outbox.send(data):
                self._stalled.add(outbox)
        except ChannelClosedError:
            return  # that worker died; the client fails the job from its sentinel
        if outbox.pending_bytes > _HIGH_WATER:
            self._pump_until(lambda: outbox.pending_bytes < _LOW_WATER)

    def _flush_results(self) -> None:
        if self._results and self._run is not None:
            batch, self._results = self._results, []
            self._send_event((m.RESULTS, self._run.job_id, batch))

    def _flush_all(self) -> None:
        if self._fault_due:
            self._faults_flush()  # frames a fault plan held whose time has come
        for site in list(self._batches):
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
                        if not outbox.send(pickle.dumps((m.RELEASE, names), protocol=5)):
                            self._stalled.add(outbox)
                    except ChannelClosedError:
                        pass

    def _wait_for_release(self) -> None:
        self._flush_all()
        self._read_ready(5)

    def _queue_release(self, creator: str, name: str) -> None:
        # Called by finalizers, at any point: only record it; _flush_all sends it.
        self._releases.setdefault(creator, []).append(name)

    # -- receiving -------------------------------------------------------------------------

    def _read_ready(self, timeout_ms: int | None) -> None:
        """Wait up to ``timeout_ms`` for any pipe; read what arrived into the inbox."""
        with self._reading:
            self._read_ready_locked(timeout_ms)

    def _read_ready_locked(self, timeout_ms: int | None) -> None:
        if self._events.has_pending:  # also written before the worker existed (BOOTED, START_FAILED)
            self._stalled.add(self._events)
        pending = [outbox for outbox in self._stalled if outbox.has_pending]
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
                if outbox.flush():
                    self._stalled.discard(outbox)
            except ChannelClosedError:
                self._stalled.discard(outbox)

    def _pump_until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self._read_ready(1000)

    def _next_message(self) -> tuple[Any, ...]:
        idle_since = time.monotonic()
        trimmed = False
        while not self._inbox:
            self._flush_all()
            timer = self._next_timer()
            if timer is not None:
                # A tolerant gather's deadline: wake for it, however long idle.
                left_ms = int((timer - time.monotonic()) * 1000) + 1
                if left_ms <= 0:
                    return (m.TICK,)
                if trimmed or not (self._pool.has_free() or self._views.has_cached()):
                    self._read_ready(left_ms)
                    continue
            if not trimmed and (self._pool.has_free() or self._views.has_cached()):
                # Segments kept for reuse are given back once this worker has been
                # idle a while: an idle federation does not hold its largest job's memory.
                left = idle_since + _TRIM_AFTER - time.monotonic()
                if left <= 0:
                    self._pool.trim()
                    self._views.trim()
                    trimmed = True
                    continue
                self._read_ready(
                    min(int(left * 1000) + 1, left_ms) if timer is not None else int(left * 1000) + 1
                )
            else:
                # Blocks for ever, except while a job waits here: after a while the site
                # tells the client what the job waits for (see _fault_runtime.describe_waiting).
                self._read_ready(self._wait_timeout_ms())
        if self._wait_since is not None:
            self._wait_over()
        return self._inbox.popleft()

    # -- logging ---------------------------------------------------------------------------

    def _log_identity(self) -> dict[str, Any]:
        return {"site": self.site, "pid": self.pid}

    def log(self, level: str, event: str, **fields: Any) -> None:
        """Send one log record to the client, tagged with this worker."""
        fields.setdefault("site", self.site)
        fields.setdefault("pid", self.pid)
        try:
            self._send_event((m.LOG, [(level, event, fields)]))
        except SystemExit:
            pass

    # -- the loop --------------------------------------------------------------------------

    def serve(self) -> None:
        """Serve until STOP, or until the client is gone."""
        while True:
            message = self._next_message()
            tag = message[0]
            if tag == m.TOKENS:
                if self._faults is None or not self._faults_inbound(message):
                    self._on_tokens(message[1], message[2])
            elif tag == m.START:
                self._on_start(message[1], message[2], message[3], message[4])
            elif tag == m.MISSING:
                self._on_missing(message[1], message[2])
            elif tag == m.TICK:
                self._on_tick()
            elif tag == m.ABORT:
                self._on_abort(message[1], message[2])
            elif tag == m.PLAN:
                self._on_plan(message[1], message[2])
            elif tag == m.FAULTS:
                self._on_faults(message[1], message[2], message[3], message[4])
            elif tag == m.INJECT:
                self._on_inject(message[1], message[2], message[3])
            elif tag == m.STOP:
                self._flush_all()
                self._pump_until(lambda: not self._events.has_pending)
                return

    def _on_plan(self, digest: bytes, data: bytes) -> None:
        if len(self._plans) >= m.PLAN_CACHE:
            self._plans.pop(next(iter(self._plans)))
        self._plans[digest] = pickle.loads(data)

        # An abort for a job that already ended here needs no answer: DONE was sent.


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
    inbox_fd: int,
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
            InboxReader(inbox_fd),
            {site: LinkOutbox(fd, spec.index) for site, fd in siblings_out.items()},
        )
        for frame in frames[1:]:
            worker._inbox.append(pickle.loads(frame))
        if spec.data_dir:
            os.makedirs(spec.data_dir, exist_ok=True)
        events.send(pickle.dumps((m.BOOTED,), protocol=5))
        try:
            if spec.fail_start is not None:
                from ._fault_runtime import InjectedStartError

                raise InjectedStartError(spec.fail_start)
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
            worker.close_store()
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
        args["inbox"],
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
        run_worker(args["control"], args["events"], args["inbox"], args["siblings_out"], capture_logging=True)
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
