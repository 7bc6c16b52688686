"""The Ray router: the one client thread that moves a federation on Ray forward.

    user threads ── submit / send / cancel ──┐ (under the lock; Ray calls that never wait)
                                             v
    job queue (FIFO, bounded) ──> free slot ──> START to each participant actor
                                             ^
    router thread: waits on one queue fed by │ slot freed when every site says DONE
      each actor's long poll completing       (results, done, failed, send_to_job, logs, output)
      a poll failing                          (the actor died or its node was lost)
      wake()                                  (new work, close)
    with a timeout only for the nearest deadline (cancel grace, job timeout,
    start timeout, a replacement due, answers users' threads left behind: every
    5 ms while they wait in Ray), never to notice work.

    reply thread of slot i: ray.wait on the START calls of slot i ──> their events, under the lock
    a thread in job.result(): ray.wait on every START call nobody ──> the same, instead of the
      waits on, any slot's, for 20 ms at most                           reply threads (and for 5 ms
                                                                         after it left)

The router never calls ``ray.get`` on anything that may not be ready: a poll's
answer is taken only once Ray has called back with it (``ObjectRef.future``),
and results carry their buffers inline, so the router never waits on an actor,
a node or the network. A START's answer (a short job's whole outcome) is
waited for by its slot's reply thread instead, in ``ray.get``/``ray.wait``: Ray's future
callbacks cost about 0.1 ms more per call than a thread waiting in Ray, on the
path of every job. The reply thread handles the answer as the router would,
under the same lock. A user's thread waiting on a job waits in Ray itself for
every answer nobody waits on (:meth:`RayRouter._help_wait`), so a thread
collecting results one after another handles every job's end and starts the
next, as a hand-written Ray loop does, without a thread switch per job.
Events of one actor are numbered by it and handled in that order, whichever
thread and whichever call brought them.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from typing import Any

from . import _messages as m
from ._callbacks import CallbackThread
from ._config import FederationConfig
from ._exceptions import (
    SiteStartError,
    WorkerDiedError,
    describe_exitcode,
)
from ._execution import SlotState
from ._handle import Job, JobStatus
from ._ray_cluster import died_reason, register_closer, unregister_closer
from ._ray_events import RayEvents
from ._ray_pool import RaySlot, RayWorker
from ._ray_values import unpack
from ._slot_policy import backoff

__all__ = ["RayRouter"]

_CONFIRM_DEATHS = 10.0  # seconds close() waits for Ray to confirm every actor it killed is gone
_REPLY_TIMEOUT = 10.0  # seconds a reply thread waits in Ray before it looks whether to end
_HELP_WINDOW = 0.02  # seconds a thread waiting on a job waits in Ray for answers (see _help_wait)
_DRIVE_CHUNK = 0.005  # seconds of one such wait, after which it looks for new answers to wait on
# Seconds answers nobody waits on are kept for users' threads after the last one left Ray:
# a thread collecting results one after another is back within microseconds.
_LINGER = 0.005


class RayRouter(RayEvents):
    """The router thread of one federation on Ray: its queue, the actors' events, their deaths."""

    def __init__(self, config: FederationConfig, callbacks: CallbackThread | None = None) -> None:
        super().__init__(config, callbacks)
        # Closed before Ray's own exit handler disconnects this process (see _ray_cluster).
        register_closer(self._close_at_exit)
        # (slot, worker, a finished call's future, whether it was the long poll), or None to wake.
        self._arrivals: queue.SimpleQueue[tuple[RaySlot, RayWorker, Any, bool] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="federation-ray-router", daemon=True)
        # START calls whose answers are awaited, per slot index; each index has a reply thread.
        self._replies: list[list[_Reply]] = [[] for _ in range(config.pool_size)]
        # Users' threads on their way to wait in Ray (see _help_wait), by thread id; changed
        # without the lock (set.add and set.discard are atomic), read under it.
        self._wanted: set[int] = set()
        self._drivers = 0  # users' threads waiting in Ray for answers now (see _help_wait)
        self._drove_until = 0.0  # when the last of them left (monotonic)
        self._router_due = float("inf")  # when the router thread looks again at the latest (monotonic)
        self._reply_ready = [threading.Condition(self.lock) for _ in range(config.pool_size)]
        self._reply_threads = [
            threading.Thread(
                target=self._watch_replies, args=(i,), name=f"federation-ray-replies-{i}", daemon=True
            )
            for i in range(config.pool_size)
        ]

    def start(self, wait: bool) -> None:
        """Start every slot and the router thread; with ``wait``, until all are ready.

        Raises:
            SiteStartError: an actor failed to start (everything started is stopped again).
        """
        try:
            # Before any actor: a site's setup may connect to its services, and its actors go
            # to their node.
            self.services.start(self.placement)
            with self.lock:
                for index in range(self.config.pool_size):
                    self._start_slot(index)
        except BaseException:
            self._abandon()
            raise
        self.thread.start()
        for thread in self._reply_threads:
            thread.start()
        deadline = time.monotonic() + self.config.start_timeout + 1.0
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
                f"the federation's site actors were not ready within start_timeout="
                f"{self.config.start_timeout} s: {self._why_not_ready()}",
                site="?",
            )
        if error is not None:
            self.shutdown(cancel_pending=True, timeout=0.0)
            raise error
        with self.lock:
            self.started = True

    def wake(self) -> None:
        """Make the router thread look at its state again (any thread)."""
        self._arrivals.put(None)

    def _poll(self, slot: RaySlot, worker: RayWorker) -> None:
        arrivals = self._arrivals
        try:
            ref = worker.actor.events.remote()
            future = ref.future()
        except Exception as exc:  # noqa: BLE001 - Ray itself is gone (shut down under us)
            failed: concurrent.futures.Future[Any] = concurrent.futures.Future()
            failed.set_exception(exc)
            arrivals.put((slot, worker, failed, True))
            return
        worker.poll = ref
        # Called on a Ray thread once the answer is here (or the actor is dead).
        future.add_done_callback(lambda done: arrivals.put((slot, worker, done, True)))

    def _watch_reply(self, slot: RaySlot, worker: RayWorker, ref: Any) -> None:
        job = slot.job
        self._replies[slot.index].append(_Reply(slot, worker, ref, job.id if job is not None else -1))
        if self._drivers:
            return  # a user's thread waiting in Ray takes it at its next look
        if self._lingering():
            self._arm_hand_back()  # one is likely back for it at once
            return
        self._reply_ready[slot.index].notify()

    def _for_reply_thread(self, reply: _Reply) -> bool:
        """Whether the reply thread should wait on ``reply``: nobody does, and no user's thread
        waits in Ray, is on its way to, or left it less than ``_LINGER`` ago (it takes every
        answer nobody waits on)."""
        return reply.waiter is None and not self._kept_for_users()

    def _kept_for_users(self) -> bool:
        """Whether answers nobody waits on are left to users' threads: one waits in Ray, is on
        its way to, or left less than ``_LINGER`` ago."""
        return bool(self._drivers or self._wanted) or self._lingering()

    def _lingering(self) -> bool:
        """Whether the last user's thread that waited in Ray left less than ``_LINGER`` ago."""
        return time.monotonic() < self._drove_until + _LINGER

    def _arm_hand_back(self) -> None:
        """Make sure the router looks, within ``_LINGER`` of the linger's end, whether to hand
        answers back (waking it only if it would look later than that)."""
        due = self._drove_until + _LINGER
        if self._router_due > due + _LINGER:
            self._router_due = due  # one wake is enough: the router sets it again as it waits
            self.wake()

    def _hand_back(self) -> None:
        """Answers no user's thread waits on any more go to the reply threads (router thread)."""
        if self._kept_for_users():
            return
        for index, pending in enumerate(self._replies):
            if any(reply.waiter is None for reply in pending):
                self._reply_ready[index].notify()

    def _watch_replies(self, index: int) -> None:
        """The reply thread of slot ``index``: wait in Ray for its START calls' answers, handle them."""
        pending = self._replies[index]
        ready_to_wait = self._reply_ready[index]
        claimable = self._for_reply_thread
        ray = self.ray
        try:
            while True:
                with self.lock:
                    for reply in pending:
                        if reply.waiter is _REPLY_THREAD:  # its last wait has returned
                            reply.waiter = None
                    ready_to_wait.wait_for(lambda: self.stopped or any(claimable(reply) for reply in pending))
                    if self.stopped:
                        return
                    refs = []
                    timeout = _REPLY_TIMEOUT  # a safety net for close only
                    for reply in pending:
                        if claimable(reply):
                            reply.waiter = _REPLY_THREAD
                            refs.append(reply.ref)
                        elif reply.waiter is not None and reply.waiter is not _REPLY_THREAD:
                            # A user's thread may hand it back within its window: look again then.
                            timeout = _HELP_WINDOW
                # A START's call answers once its job is done at that site, or fails once its
                # actor is gone (killed at close).
                if len(refs) == 1:  # one call fewer into Ray: a 1-site job, the last site of one
                    done = refs[0]
                else:
                    ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
                    if not ready:
                        continue
                    done = ready[0]
                outcome = self._answer(done, timeout)
                if outcome is not None:
                    self._take_reply(index, done, outcome)
        except BaseException as exc:  # noqa: BLE001  # pragma: no cover - Ray shut down under us
            with self.lock:
                if not self.stopped:
                    self._router_crashed(exc)

    def _take_reply(self, index: int, done: Any, outcome: _Answer) -> None:
        """Handle a START's answer, once."""
        with self.lock:
            pending = self._replies[index]
            for position, reply in enumerate(pending):
                if reply.ref == done:
                    del pending[position]
                    if not self.stopped:
                        self._on_poll(reply.slot, reply.worker, outcome, False)
                    return

    def _help_wait(self, job: Job, timeout: float | None) -> None:
        """A thread waiting on ``job`` waits in Ray for answers itself, instead of the reply
        threads: every answer nobody waits on yet, of any slot, which it handles as they
        come, until its job has ended. A thread that waits on one job after another
        (``[job.result() for job in jobs]``) then handles every job's end and starts the
        next on its own, as a hand-written Ray loop does, with no thread switch per job.

        Each answer has one thread waiting on it in Ray: a second one would wake for
        nothing. (Only the waiter's own job's answer, when a reply thread took it
        before the waiter came, is waited on by both.) The waiter marks itself
        before it takes the lock, so a reply thread woken by a job's START (it
        holds the lock as soon as submit lets go of it, but cannot run before
        this thread lets go of the GIL) leaves the answer to it. While any
        user's thread waits in Ray, and for ``_LINGER`` after the last one left
        (a thread collecting results one after another is back within
        microseconds), the reply threads take nothing new; then the router
        hands what is left back to them. The router looks every ``_LINGER``
        while users' threads wait in Ray, instead of being woken each time one
        leaves. Nothing is taken before it is handled, so an interrupted waiter
        loses nothing.

        A thread in ``ray.wait`` does not see its job end by ``cancel()`` or a
        timeout, nor a START sent meanwhile by another thread, so it waits there
        ``_DRIVE_CHUNK`` at a time and ``_HELP_WINDOW`` in all (a short job's whole
        life), then waits on the job itself.
        """
        if self.lock._is_owned():  # type: ignore[attr-defined]  # waiting in Ray under the lock would stall it
            return
        window = _HELP_WINDOW if timeout is None else min(timeout, _HELP_WINDOW)
        deadline = time.monotonic() + window
        me = threading.get_ident()
        mine: list[tuple[int, _Reply]] = []
        driving = False
        self._wanted.add(me)
        try:
            while True:
                with self.lock:
                    self._wanted.discard(me)
                    for _, reply in mine:
                        if reply.waiter == me:
                            reply.waiter = None
                    mine = []
                    left = deadline - time.monotonic()
                    if job.done() or self.stopped or left <= 0 or job.id not in self.running:
                        return
                    if not driving:
                        driving = True
                        self._drivers += 1
                    watched = []
                    for index, pending in enumerate(self._replies):
                        for reply in pending:
                            if reply.waiter is None:
                                reply.waiter = me
                                mine.append((index, reply))
                            elif reply.job == job.id and reply.waiter is _REPLY_THREAD:
                                # Taken before this thread came: waited on by both, this once,
                                # so that the job's end is seen here at once.
                                watched.append((index, reply))
                    if not mine and not watched:
                        return  # every answer is another waiter's
                refs = {reply.ref: index for index, reply in (*mine, *watched)}
                chunk = min(left, _DRIVE_CHUNK)
                if len(refs) == 1:
                    done = next(iter(refs))
                else:
                    ready, _ = self.ray.wait(list(refs), num_returns=1, timeout=chunk)
                    if not ready:
                        continue
                    done = ready[0]
                outcome = self._answer(done, chunk)
                if outcome is not None:
                    self._take_reply(refs[done], done, outcome)
        finally:
            self._wanted.discard(me)
            with self.lock:
                for _, reply in mine:
                    if reply.waiter == me:  # still pending (timed out, interrupted)
                        reply.waiter = None
                if driving:
                    self._drivers -= 1
                    if not self._drivers:
                        self._drove_until = time.monotonic()
                # Also when this thread never drove: while it was on its way (in _wanted) the
                # router handed nothing back, and the reply threads took nothing.
                if not self._drivers and any(
                    reply.waiter is None for pending in self._replies for reply in pending
                ):
                    # The router hands them back after _LINGER, unless a waiter came back.
                    self._arm_hand_back()

    def _answer(self, ref: Any, timeout: float) -> _Answer | None:
        """A START call's answer, or how it failed, waited for in Ray; None if not in ``timeout``."""
        try:
            return _Answer(self.ray.get(ref, timeout=timeout), None)
        except self.ray.exceptions.GetTimeoutError:
            return None
        except Exception as exc:  # noqa: BLE001 - translated by _on_poll, never raised
            return _Answer(None, exc)

    # -- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self.lock:
                    if self.stopped:
                        return
                    if self._replace_at:
                        self._start_replacements()
                    timeout = self._next_timeout()
                    self._router_due = float("inf") if timeout is None else time.monotonic() + timeout
                try:
                    item = self._arrivals.get(timeout=timeout)
                except queue.Empty:
                    item = None
                with self.lock:
                    while True:
                        if item is not None:
                            self._on_poll(*item)
                        try:
                            item = self._arrivals.get_nowait()
                        except queue.Empty:
                            break
                    self._on_deadlines()
                    self._hand_back()
        except BaseException as exc:  # noqa: BLE001  # pragma: no cover - a bug here must not hang users
            self._router_crashed(exc)

    def _next_timeout(self) -> float | None:
        now = time.monotonic()
        hand_back = None  # when answers a user's thread may leave behind go to the reply threads
        if self._drivers:
            hand_back = now + _LINGER
        elif self._drove_until + _LINGER > now:
            hand_back = self._drove_until + _LINGER
        deadline = self._next_deadline(hand_back)
        if deadline is None:
            return None
        return max(0.0, deadline - time.monotonic()) + 0.001

    def _on_poll(self, slot: RaySlot, worker: RayWorker, future: Any, poll: bool) -> None:
        if worker.gone:
            return
        try:
            events = unpack(future.result(timeout=0))
        except Exception as exc:  # noqa: BLE001 - Ray's errors are translated here, never raised
            if poll:  # a START's call that failed: the poll fails too, and says why
                self._on_worker_gone(slot, worker, exc)
            return
        # Numbered by the actor: a START's answer and the poll may arrive in either order.
        held = worker.held
        for number, event in events:
            held[number] = event
        while worker.next_event in held and not worker.gone:
            event = held.pop(worker.next_event)
            worker.next_event += 1
            self._on_event(slot, worker, event)
        if poll and not worker.gone and self.lease is not None:
            self._poll(slot, worker)

    # -- deaths ------------------------------------------------------------------------------

    def _on_worker_gone(self, slot: RaySlot, worker: RayWorker, exc: BaseException) -> None:
        worker.gone = True
        site = worker.site
        if slot.state in (SlotState.STOPPING, SlotState.BROKEN, SlotState.STOPPED):
            self._maybe_reap(slot)
            return
        reason = died_reason(exc)
        if worker.exitcode is not None:
            reason = f"{describe_exitcode(worker.exitcode)} (os._exit)"
        if worker.crashed is not None:
            reason = f"{worker.crashed}: its actor was killed"
        last = tuple(slot.last_lines[site])
        if slot.state is SlotState.STARTING:
            if not _killed_from_outside(reason):
                # A setup that exited, a runtime_env that failed, an import the node lacks:
                # it will fail again, so it counts towards giving up.
                self._on_start_failed(
                    slot,
                    site,
                    f"the site actor of site {site!r} on {worker.where()} died during start: {reason}",
                    "\n".join(last) or None,
                )
                return
            self.start_deaths += 1
            self.log.warning(
                "site actor died while starting; replacing it", site=site, slot=slot.index, reason=reason
            )
            self._retire(slot, graceful=False, delay=backoff(self.start_deaths, cap=1.0))
            return
        job = slot.job
        if (
            job is not None
            and not job.done()
            and site in slot.pending_sites
            and self._site_lost(job, slot, site, m.DIED, f"its site actor died: {reason}")
        ):
            # A tolerant fan-in goes on without it; the slot is replaced after the job.
            slot.pending_sites.discard(site)
            slot.repair = True
            self._maybe_finish(slot, job)
            return
        if job is not None and not job.done():
            slot.job = None
            self._retry_or_fail(job, self._died_error(slot, worker, job, reason, last))
        elif job is not None:
            self.running.pop(job.id, None)
        self._retire(slot, graceful=False)
        self.log.warning(
            "site actor died",
            site=site,
            slot=slot.index,
            node=worker.node_id,
            address=worker.node_address,
            reason=reason,
        )

    def _died_error(
        self, slot: RaySlot, worker: RayWorker, job: Job, reason: str, last: tuple[str, ...]
    ) -> WorkerDiedError:
        return WorkerDiedError(
            f"the site actor of site {worker.site!r} (pid {worker.pid}) on {worker.where()} running job "
            f"{job.id} ({job.pipeline!r}) died: {reason}",
            job_id=job.id,
            site=worker.site,
            pid=worker.pid,
            exitcode=worker.exitcode,
            reason=reason,
            last_log=last,
            node=worker.node_id,
            address=worker.node_address,
        )

    # -- deadlines and shutting down ---------------------------------------------------------

    def _on_deadlines(self) -> None:
        self._on_slot_deadlines(time.monotonic())

    def _not_ready_detail(self) -> str:
        return f": {self._why_not_ready()}"

    def _why_not_ready(self) -> str:
        """A likely cause of actors not starting: the cluster's state now, in a line."""
        try:
            from ._ray_cluster import site_placement

            site_placement(self.config)
        except SiteStartError as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001
            return f"the cluster could not be read ({exc!r})"
        return (
            "every site has a live node; their resources may be taken by other actors, or a "
            "site's setup or runtime_env is slow"
        )

    def shutdown(self, cancel_pending: bool, timeout: float | None) -> None:
        """Stop accepting jobs; finish or cancel the rest; stop, then kill, every actor."""
        with self.lock:
            self.closing = True
            self.changed.notify_all()
            if cancel_pending:
                for job in [*self.queue, *(entry[0] for entry in self.running.values())]:
                    self._end_job(job, JobStatus.CANCELLED, job._cancelled_error("the federation was closed"))
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
                        # A starting actor cannot hear STOP before its setup ends: kill it.
                        self._retire(slot, graceful=slot.state is not SlotState.STARTING)
                    else:
                        self._maybe_reap(slot)
                self.wake()
                self.changed.wait_for(
                    lambda: not self._all_slots() or self.stopped, self.config.shutdown_timeout + 2.0
                )
                for slot in self._all_slots():
                    slot.kill()
                self.changed.wait_for(lambda: not self._all_slots() or self.stopped, _CONFIRM_DEATHS)
                self.stopped = True
                for ready_to_wait in self._reply_ready:
                    ready_to_wait.notify()
                self.wake()
            self.thread.join(10.0)
            for thread in self._reply_threads:
                if thread.is_alive():
                    thread.join(_REPLY_TIMEOUT + 1.0)
        self._abandon()

    def _close_at_exit(self) -> None:
        """Interpreter exit with this federation open: close it while Ray still runs."""
        if not self.stopped:
            self.shutdown(cancel_pending=True, timeout=0.0)

    def _abandon(self) -> None:
        """Kill whatever is left and give the Ray connection back. Idempotent."""
        unregister_closer(self._close_at_exit)
        with self.lock:
            self.stopped = True
            for slot in self._all_slots():
                slot.kill()
            self.slots = [None] * len(self.slots)
            self._retired.clear()
            self._replace_at.clear()
            self.free.clear()
            lease, self.lease = self.lease, None
            self.changed.notify_all()
            for ready_to_wait in self._reply_ready:
                ready_to_wait.notify()
        for thread in self._reply_threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(_REPLY_TIMEOUT + 1.0)
        # After every actor, and outside the lock: it waits up to each service's stop_grace.
        self.services.stop()
        if self.log_files is not None:
            self.log_files.close()
        if lease is not None:
            lease.release()


_REPLY_THREAD = "reply thread"  # a _Reply's waiter: a reply thread, or a user thread's id


class _Reply:
    """A START call whose answer is awaited, and which thread waits on it in Ray (if any)."""

    __slots__ = ("job", "ref", "slot", "waiter", "worker")

    def __init__(self, slot: RaySlot, worker: RayWorker, ref: Any, job: int) -> None:
        self.slot = slot
        self.worker = worker
        self.ref = ref
        self.job = job
        self.waiter: str | int | None = None


class _Answer:
    """A START call's answer or error, read by ``_on_poll`` as it reads a poll's future
    (a :class:`concurrent.futures.Future` would cost a condition and a lock per job)."""

    __slots__ = ("error", "value")

    def __init__(self, value: Any, error: BaseException | None) -> None:
        self.value = value
        self.error = error

    def result(self, timeout: float | None = None) -> Any:
        """The answer, or raise its error."""
        if self.error is not None:
            raise self.error
        return self.value


def _killed_from_outside(reason: str) -> bool:
    """Whether Ray's reason says the actor was killed or lost its node: that may pass."""
    text = reason.lower()
    return "ray.kill" in text or "node has died" in text or "node was" in text or "node died" in text
