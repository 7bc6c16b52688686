"""The Ray site actor: one site of one pool slot, running its steps on its site's node.

Data flow inside a site actor (one per site per slot)::

    client ─deliver()──┐                      ┌─> direct link to a sibling (tokens)
    siblings ─link─────┼─> arrivals ─> runner ┼─> sibling.deliver()  (frames holding refs)
    siblings ─deliver()┘   (in each            └─> outgoing ──> events(), or a START's answer
                           sender's order)

The actor is threaded: its Ray methods only hand messages over and return.
``deliver`` puts a message into the arrivals, in the order its sender numbered
it (Ray does not promise order on a threaded actor: each sender numbers its
messages and a gap is held back until it is filled). Siblings' frames come
over direct links (:mod:`._ray_links`), read by the link thread into the same
arrivals, except those holding object references, which come by ``deliver``:
one numbering per sender covers both.

The runner is the actor's *run lane*: a Ray concurrency group of one thread.
``boot`` runs the site's setup there; ``run`` (a START, or STOP) serves the
job there with :class:`~federation._steps.StepRunner`, the same step logic as
a worker process, until the job is done at this site, and answers with the
events: a short job is one Ray call and no thread switch. ``events`` is a long
poll the client always keeps one of: it takes what a running job says before
its end (streamed results, logs, output lines) once it has waited ``_LINGER``,
and everything said outside a job; events are numbered in the order they were
said, so DONE never overtakes a result (invariant 2).

Values move site to site as Ray objects: a value with large buffers (a numpy
array) has each buffer put in this node's object store once and its reference
sent; the receiving site fetches it node to node (zero-copy when both sites
share a node). Results for the client carry their buffers inline, so the
client never waits on a fetch.

A fault plan acts at the same seams as in a worker process (``_faults``):
token frames to a sibling, events to the client and stream inputs are shaped
(held frames wait on the runner's timer), a crash is the client killing the
actor once it has the site's last events, and a timed pause stops the whole
actor process from a small process on its node (:meth:`SiteActor.pause`).

Workers of a cluster import this module; it imports Ray only as a Ray worker
already has it, and nothing of the client side.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

from . import _messages as m
from ._fault_runtime import InjectedStartError
from ._ray_links import LinkListener, LinkSender
from ._ray_values import (
    CRASH,
    EXITING,
    LINK,
    OUTPUT,
    PEERS,
    STOPPED,
    LineWriter,
    RayValues,
    holds_refs,
    inline_buffers,
    pack,
    ray_module,
    unpack,
)
from ._runs import JobRun
from ._serialization import Payload, payload_size
from ._steps import StepRunner

__all__ = ["EXITING", "LINK", "OUTPUT", "STOPPED", "SiteActor", "SiteRunner"]


_SENDS_PER_JOB = 10_000  # timeline records of frames sent, per job and site
_OUTGOING_HIGH = 4096  # events waiting for the client beyond which the runner waits for it
_LINGER = 0.002  # seconds the long poll leaves events to the run lane's answer
_CRASH_WAIT = 30.0  # seconds a crashing site waits for the client to kill its actor before it dies alone
_PAUSE_SLACK = 10.0  # seconds past a pause's end after which its stopper process is given up on


class _Inbox:
    """Messages from every sender, handed to the runner in each sender's order."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.ready: deque[tuple[Any, ...]] = deque()
        self._next: dict[str, int] = {}
        self._held: dict[str, dict[int, list[tuple[Any, ...]]]] = {}

    def put(self, sender: str, seq: int, messages: list[tuple[Any, ...]]) -> None:
        with self.cond:
            expected = self._next.get(sender, 0)
            if seq != expected:
                self._held.setdefault(sender, {})[seq] = messages
                return
            self.ready.extend(messages)
            expected += 1
            held = self._held.get(sender)
            while held and expected in held:
                self.ready.extend(held.pop(expected))
                expected += 1
            self._next[sender] = expected
            self.cond.notify_all()


class SiteRunner(StepRunner):
    """Runs one site's steps in a Ray actor; the actor supplies the messages."""

    private_loggers = ("ray",)  # Ray's own records stay in Ray's logs

    def __init__(
        self, spec: m.WorkerSpec, inbox: _Inbox, node: str, emit: Callable[[Any], None], links: LinkSender
    ) -> None:
        self.site = spec.site
        self.name = spec.name
        self.spec = spec
        self.env = dict(spec.env)
        self.data_dir = spec.data_dir
        self.services = spec.services
        self.state: Any = None
        self.pid = os.getpid()
        self.node = node
        self._emit_event = emit
        self._arrivals = inbox
        self._inbox: deque[tuple[Any, ...]] = deque()
        self._siblings: dict[str, Any] = {}
        self._direct = links
        self._link_seq: dict[str, int] = {}
        self._plans: dict[bytes, m.SitePlan] = {}
        self._run: JobRun | None = None
        self._ended: set[int] = set()
        self._ended_order: deque[int] = deque()
        self._aborted: dict[int, str] = {}
        self._early: dict[int, list[tuple[Any, ...]]] = {}
        self._batches: defaultdict[str, list[m.Token]] = defaultdict(list)
        self._results: list[tuple[str, int, Payload]] = []
        self._links: dict[str, list[int]] = {}
        self.dropped = 0
        self._request = 0
        self._replies: dict[int, Any] = {}
        self._structlog: Any = None
        values = RayValues()
        self._pool = values  # type: ignore[assignment]
        self._views = values  # type: ignore[assignment]
        self._sends: list[tuple[float, str, int, int]] = []
        self._next_check = 0.0
        self._current_step: str | None = None
        self._last_emit = 0.0
        self._reading = threading.Lock()  # one reader of the arrivals at a time (ctx.cancelled)
        self.stopped = False

    # -- sending ---------------------------------------------------------------------------

    def _send_event(self, message: tuple[Any, ...]) -> None:
        if self._faults is not None and self._faults_event(message):
            return  # a fault plan holds it (a slow or cut link to the client; see _faults)
        if message[0] == m.RESULTS:
            message = (m.RESULTS, message[1], [(o, s, inline_buffers(p)) for o, s, p in message[2]])
        elif message[0] == m.DONE and message[3].get("results"):
            info = dict(message[3])
            info["results"] = [(o, s, inline_buffers(p)) for o, s, p in info["results"]]
            message = (m.DONE, message[1], message[2], info)
        self._emit_event(message)

    def _flush_batch(self, site: str) -> None:
        if self._run is None:
            return
        batch = self._batches.pop(site, None)
        if batch:
            self._send_tokens(site, self._run.job_id, batch)

    def _send_tokens(self, site: str, job_id: int, batch: list[m.Token], shaped: bool = False) -> None:
        size = 0
        for token in batch:
            payload = token[4]
            if payload is None:
                continue
            if type(payload) is tuple and len(payload) == 1:
                # A small value carried inline: its pickle, as a pipe frame would count it.
                size += len(pickle.dumps(payload[0], protocol=5))
            else:
                size += payload_size(payload)
        if not shaped and self._faults is not None and self._faults_batch(site, job_id, batch, size):
            return  # the fault plan sends it later or lost it
        link = self._links.setdefault(site, [0, 0])
        link[0] += len(batch)
        link[1] += size
        if len(self._sends) < _SENDS_PER_JOB:
            self._sends.append((time.time(), site, len(batch), size))
        self._send_to_site(site, (m.TOKENS, job_id, batch))

    def _send_to_site(self, site: str, message: tuple[Any, ...]) -> None:
        sibling = self._siblings.get(site)
        if sibling is None:
            return
        seq = self._link_seq.get(site, 0)
        self._link_seq[site] = seq + 1
        frame: Any = (self.site, seq, [message])
        if not (message[0] == m.TOKENS and any(holds_refs(token[4]) for token in message[2])):
            # References go through Ray's serializer, which tracks them; the rest goes direct.
            if self._direct.send(site, seq, message):
                return
            frame = pack(frame)
        # Fire and forget: a sibling that died is the client's to notice (its poll fails).
        sibling.deliver.remote(frame)

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

    def _flush_releases(self) -> None:
        """Nothing to release: Ray counts references."""

    def _crash(self, reason: str) -> None:
        """A fault plan crashes this site: the client kills the actor, as it kills one for a
        timed crash, once it has what this site said before (the events are in order). The
        runner does nothing meanwhile: nothing this site would do after the crash leaves it."""
        self._emit_event((CRASH, reason))
        threading.Event().wait(_CRASH_WAIT)
        os.kill(os.getpid(), signal.SIGKILL)  # the client is gone: die alone

    # -- receiving -------------------------------------------------------------------------

    def _read_ready(self, timeout_ms: int | None) -> None:
        with self._reading:
            self._read_ready_locked(timeout_ms)

    def _read_ready_locked(self, timeout_ms: int | None) -> None:
        arrivals = self._arrivals
        with arrivals.cond:
            if not arrivals.ready and timeout_ms != 0:
                arrivals.cond.wait(None if timeout_ms is None else timeout_ms / 1000)
            ready = list(arrivals.ready)
            arrivals.ready.clear()
        for message in ready:
            tag = message[0]
            if tag == m.ABORT:
                if message[1] not in self._ended:
                    self._aborted[message[1]] = message[2]
            elif tag == m.REPLY:
                self._replies[message[1]] = message[2]
                continue
            elif tag == LINK:
                self._siblings = dict(message[1])
                continue
            elif tag == PEERS:
                self._direct.set_peers(message[1])
                continue
            self._inbox.append(message)

    def _pump_until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self._read_ready(1000)

    # -- logging ---------------------------------------------------------------------------

    def _log_identity(self) -> dict[str, Any]:
        return {"site": self.site, "pid": self.pid, "node": self.node}

    def log(self, level: str, event: str, **fields: Any) -> None:
        """Send one log record to the client, tagged with this site, its pid and node."""
        fields.setdefault("site", self.site)
        fields.setdefault("pid", self.pid)
        fields.setdefault("node", self.node)
        self._send_event((m.LOG, [(level, event, fields)]))

    # -- the loop --------------------------------------------------------------------------

    def serve_ready(self) -> bool:
        """Handle every message that has arrived, then return; False once STOP was handled."""
        while True:
            if not self._inbox:
                self._read_ready(0)
                if not self._inbox:
                    self._flush_all()
                    return True
            message = self._inbox.popleft()
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
                if len(self._plans) >= m.PLAN_CACHE:
                    self._plans.pop(next(iter(self._plans)))
                self._plans[message[1]] = pickle.loads(message[2])
            elif tag == m.FAULTS:
                self._on_faults(message[1], message[2], message[3], message[4])
            elif tag == m.INJECT:
                self._on_inject(message[1], message[2], message[3])
            elif tag == m.STOP:
                self._flush_all()
                self._direct.close()
                self.close_store()
                return False


class SiteActor:
    """The Ray actor of one site of one slot (made a Ray actor class by the client).

    Args:
        spec_bytes: the pickled :class:`~federation._messages.WorkerSpec` (cloudpickle: it
            holds the site's setup function).
        sys_path: the client's ``sys.path``, put in front here where its entries exist.
        secret: the slot's secret, which opens the direct links between its actors
            (:mod:`._ray_links`).
    """

    def __init__(self, spec_bytes: bytes, sys_path: tuple[str, ...], secret: bytes) -> None:
        lock = threading.RLock()
        self._cond = threading.Condition(lock)  # back-pressure: the run lane waits for the poll
        # The long poll waits apart, on the same lock: an event the run lane will
        # answer with need not wake it (a thread switch per job, on every site).
        self._poll_cond = threading.Condition(lock)
        self._outgoing: list[tuple[int, Any]] = []  # (event number, event), in order
        self._emitted = 0
        self._oldest = 0.0  # when the oldest event waiting was emitted
        self._handed = False  # the events waiting have lingered: the poll takes them
        self._waiting: dict[int, bool] = {}  # job id -> its DONE was emitted, for run()'s answer
        self._inbox = _Inbox()
        self._runner: SiteRunner | None = None
        self._spec_bytes = spec_bytes
        self._sys_path = sys_path
        self._secret = secret
        try:
            self._node = str(ray_module().get_runtime_context().get_node_id())
        except Exception:  # noqa: BLE001 - outside a Ray worker (unit use)
            self._node = "?"
        self._address = "127.0.0.1"
        try:
            self._address = str(ray_module().util.get_node_ip_address())
        except Exception:  # noqa: BLE001
            pass
        self._listener: LinkListener | None = None
        try:
            self._listener = LinkListener(self._address, secret, self._inbox.put, self._warn)
        except OSError as exc:  # siblings reach this site through Ray calls instead
            self._warn(f"no direct link could listen on {self._address}: {exc!r}")
        self._thread: threading.Thread | None = None  # the run lane's thread, once booted
        self._stopped = False

    # -- Ray methods ----------------------------------------------------------------------

    def deliver(self, frame: Any) -> Any:
        """Messages from the client (``sender`` "") or a sibling site, call ``seq`` of its sender.

        ``frame`` is ``(sender, seq, messages)``, pickled by :func:`._ray_values.pack`
        unless it holds object references or actor handles. It only hands the
        messages over: the run lane handles them (:meth:`run`).
        """
        sender, seq, messages = unpack(frame)
        self._inbox.put(sender, seq, messages)
        return None

    def boot(self) -> None:
        """Start the site on the run lane (a concurrency group of one thread): its setup runs
        on the thread its steps will run on, so what it made (a database connection,
        thread-local state) is used where it was made. What it says goes by :meth:`events`."""
        self._thread = threading.current_thread()
        self._runner = self._boot()

    def run(self, frame: Any) -> Any:
        """Messages from the client that start a job here, or stop the site (on the run lane).

        Handles them, and every message that arrives meanwhile, until this site
        is done with the job (or has stopped), then answers with the events not
        yet taken, numbered as :meth:`events` numbers them: a short job costs
        one Ray call and no thread switch here, as a hand-written actor call does.
        """
        sender, seq, messages = unpack(frame)
        job = None
        for message in messages:
            if message[0] == m.START:
                job = message[1]
        if job is not None:
            with self._cond:
                self._waiting[job] = False
        self._inbox.put(sender, seq, messages)
        runner = self._runner
        if runner is not None and not self._stopped:
            self._drive(runner, job)
        if job is None:
            return None  # STOP: nobody waits on this answer; STOPPED goes by the poll
        with self._cond:
            self._waiting.pop(job, None)  # gone already if os._exit cleared them
            out, self._outgoing = self._outgoing, []
            self._handed = False
            self._cond.notify_all()  # back-pressure: the steps may go on
        return pack(out) if out else out

    def _drive(self, runner: SiteRunner, job: int | None) -> None:
        """Serve messages until ``job`` is done here, no deadline is pending and nothing is left
        to handle (or STOP was handled)."""
        while True:
            try:
                if not runner.serve_ready():
                    self._stop()
                    return
                with self._cond:
                    done = job is None or self._waiting.get(job, True)
                if done and not runner._inbox and runner._next_timer() is None:
                    return
                self._wait_for_work(runner)
            except BaseException:  # noqa: BLE001 - the client must hear of it, not wait for ever
                runner.log("critical", "site actor crashed", traceback=traceback.format_exc())

    def _stop(self) -> None:
        self._stopped = True
        sys.stdout.flush()
        sys.stderr.flush()
        self._emit((STOPPED,))

    def events(self) -> Any:
        """Wait for events and return every one so far, numbered (the client's long poll).

        While a job's :meth:`run` will answer with its events, this leaves them
        to it unless they have waited ``_LINGER``: a streaming result is late by
        that at most, and a short job, whose first event is its DONE, does not
        wake this thread at all.
        """
        with self._poll_cond:
            while True:
                if self._outgoing:
                    if self._handed or not self._waiting:
                        break
                    left = self._oldest + _LINGER - time.monotonic()
                    if left <= 0:
                        self._handed = True
                        break
                    self._poll_cond.wait(left)
                else:
                    self._poll_cond.wait()
            out, self._outgoing = self._outgoing, []
            self._handed = False
            self._cond.notify_all()  # back-pressure: the steps may go on
        return pack(out)

    def pause(self, seconds: float) -> None:
        """Stop this actor's whole process for ``seconds``: a fault plan's timed Pause.

        A process cannot resume itself, and the client may be on another
        machine: a small process on this node sends SIGSTOP, sleeps and sends
        SIGCONT, so a step busy in user code stops too, as a worker process does
        under the local transport's SIGSTOP. This Ray thread reaps it (it is
        stopped with the rest meanwhile).
        """
        import subprocess

        stopper = subprocess.Popen(
            ["/bin/sh", "-c", 'kill -STOP "$1"; sleep "$2"; kill -CONT "$1"', "federation-pause"]
            + [str(os.getpid()), f"{max(0.0, seconds):.6f}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            stopper.wait(seconds + _PAUSE_SLACK)
        except subprocess.TimeoutExpired:  # running again, so it sent SIGCONT or never stopped us
            stopper.kill()
            stopper.wait()

    def where(self) -> tuple[str, int]:
        """This actor's node id and pid."""
        return self._node, os.getpid()

    # -- the runner thread ----------------------------------------------------------------

    def _emit(self, event: Any) -> None:
        with self._cond:
            if not self._outgoing:
                self._oldest = time.monotonic()
            self._outgoing.append((self._emitted, event))
            self._emitted += 1
            if event[0] == m.DONE and event[1] in self._waiting:
                self._waiting[event[1]] = True  # the run lane answers with it now
            elif len(self._outgoing) == 1 or not self._waiting or self._handed:
                self._poll_cond.notify()  # the poll takes it, or times how long it lingers
            if len(self._outgoing) > _OUTGOING_HIGH and threading.current_thread() is self._thread:
                # A client that reads slower than steps produce holds the steps back
                # (as a full pipe does), instead of this actor's memory growing.
                self._cond.wait_for(lambda: len(self._outgoing) <= _OUTGOING_HIGH, 60.0)

    def _report_exits(self) -> None:
        """Make ``os._exit`` in a step or setup tell the client its exit code before the process ends.

        Ray reports only that the worker process died; a process worker's
        client reads the exit code, and users of both deserve the same error.
        """
        real_exit = os._exit
        actor = self

        def exit_reporting(code: int) -> Any:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
                actor._emit((EXITING, code))
                with actor._cond:
                    actor._waiting.clear()  # the poll takes it now
                    actor._handed = True
                    actor._poll_cond.notify()
                    actor._cond.wait_for(lambda: not actor._outgoing, 1.0)
                time.sleep(0.2)  # the poll's answer leaves the process after events() returned
            finally:
                real_exit(code)

        setattr(os, "_exit", exit_reporting)  # noqa: B010 - mypy: os._exit is typed NoReturn

    def _warn(self, text: str) -> None:
        # Straight to the events (any thread may warn: the link thread does), not through the
        # runner, whose sending is the run lane's alone.
        self._emit((m.LOG, [("warning", text, {"pid": os.getpid(), "node": self._node})]))

    def _boot(self) -> SiteRunner | None:
        """The site's start: its spec, its output and its setup; the runner, or None if it failed."""
        for entry in reversed(self._sys_path):
            if entry not in sys.path and os.path.isdir(entry):
                sys.path.insert(0, entry)
        try:
            spec: m.WorkerSpec = pickle.loads(self._spec_bytes)
        except BaseException:  # noqa: BLE001 - e.g. a setup function this node cannot import
            self._emit((m.START_FAILED, traceback.format_exc()))
            return None
        runner = SiteRunner(spec, self._inbox, self._node, self._emit, LinkSender(spec.site, self._secret))
        self._report_exits()

        # What steps print goes to the client, as a worker process's pipes do.
        def context() -> tuple[int | None, str | None]:
            run = runner._run
            return (run.job_id if run is not None else None), runner._current_step

        setattr(sys, "stdout", LineWriter(self._emit, True, context))  # noqa: B010
        setattr(sys, "stderr", LineWriter(self._emit, False, context))  # noqa: B010
        try:
            if spec.data_dir:
                os.makedirs(spec.data_dir, exist_ok=True)
            self._emit((m.BOOTED,))
            if spec.fail_start is not None:
                raise InjectedStartError(spec.fail_start)  # a fault plan's FailStart
            if spec.setup is not None:
                runner.state = spec.setup()
        except BaseException as exc:  # noqa: BLE001 - report any setup failure, SystemExit too
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            self._emit((m.START_FAILED, tb))
            return None
        link = self._listener.address if self._listener is not None else None
        self._emit((m.READY, os.getpid(), self._node, self._address, link))
        runner.forward_stdlib_logging()
        return runner

    @staticmethod
    def _wait_for_work(runner: SiteRunner) -> None:
        """Wait for a message, or for a deadline (a tolerant gather's, a frame a fault plan
        holds: then a TICK is the work). A job that waits here a while says what for."""
        if runner._inbox:
            return
        timer = runner._next_timer()
        if timer is None:
            runner._read_ready(runner._wait_timeout_ms())
        else:
            left = timer - time.monotonic()
            if left > 0:
                runner._read_ready(int(left * 1000) + 1)
            if not runner._inbox and time.monotonic() >= timer:
                runner._inbox.append((m.TICK,))
        if runner._inbox and runner._wait_since is not None:
            runner._wait_over()
