"""The hooks a site runtime calls for a fault plan, and what a waiting site says it waits for.

Mixed into :class:`~federation._steps.StepRunner`. Every hook is one attribute
test while the job has no faults, and this module imports nothing of the fault
plan: a spawned worker imports it at start, and :mod:`federation._faults` (with
the plan's classes, ``hashlib``, ``json``, ``random``...) only when a job with
faults reaches it. The FAULTS message that carries a job's rules unpickles
those classes anyway, so the first use finds them imported.

A site also says what it waits for once it has waited a while
(:func:`describe_waiting`), so a job stuck on a dropped token times out with
an error naming the step, the upstream site and the tokens it had.

Workers import this module: standard library only.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from . import _messages as m

if TYPE_CHECKING:
    from ._fault_plan import Fault, SiteFault
    from ._faults import Rule, SiteFaults

__all__ = ["WAIT_REPORT", "FaultRuntime", "InjectedCrash", "InjectedStartError", "describe_waiting"]

WAIT_REPORT = 0.2  # seconds a job's site waits before it tells the client what for


class InjectedStartError(RuntimeError):
    """What a site's setup raises under a :class:`~federation.faults.FailStart` fault."""


class InjectedCrash(BaseException):
    """Ends a thread worker as a crash would end a process (raised by a Crash fault)."""


# -- the worker's half: the hooks a site runtime calls ----------------------------------------


class FaultRuntime:
    """Mixed into a site runtime (:class:`~federation._steps.StepRunner`): its fault hooks.

    The runtime provides ``_send_event``, ``_send_tokens``, ``_flush_all``,
    ``_pump_until``, ``_inbox`` and ``_run``; every hook here is a no-op
    (one attribute test) while the job has no faults.
    """

    _faults: SiteFaults | None = None
    _fault_rules: dict[int, tuple[int, int, list[Rule]]] | None = None
    _fault_due: list[tuple[float, int, str, Any]] | None = None
    _fault_seq = itertools.count()
    _wait_since: float | None = None
    _wait_reported: int | None = None

    # provided by the runtime
    _run: Any
    _inbox: Any

    def _send_event(self, message: tuple[Any, ...]) -> None:
        raise NotImplementedError

    def _send_tokens(self, site: str, job_id: int, batch: list[Any], shaped: bool = False) -> None:
        raise NotImplementedError

    def _flush_all(self) -> None:
        raise NotImplementedError

    # -- the schedule arrives, a job starts -----------------------------------------------------

    def _on_faults(self, job_id: int, seed: int, number: int, rules: list[Rule]) -> None:
        """FAULTS: the rules for a job this site is about to start."""
        if self._fault_rules is None:
            self._fault_rules = {}
        self._fault_rules[job_id] = (seed, number, rules)

    def _faults_start(self, job_id: int) -> None:
        """A job starts here: its faults (if any) become the current ones; start-time ones act."""
        entry = self._fault_rules.pop(job_id, None) if self._fault_rules else None
        if entry is None:
            self._faults = None
            return
        from ._faults import SiteFaults  # imported with the rules' classes when FAULTS arrived

        faults = self._faults = SiteFaults(entry[0], entry[1], job_id, getattr(self, "site", "?"), entry[2])
        for index, fault in faults.at_start():
            self._act(index, fault, None, 0)

    def _on_inject(self, job_id: int, index: int, fault: SiteFault) -> None:
        """INJECT: the router asks this worker to crash or pause now (the thread backend)."""
        faults = self._faults
        if faults is not None and faults.job_id == job_id:
            self._act(index, fault, None, None)

    # -- a step's values and calls ------------------------------------------------------------

    def _faults_after_value(self, step: str) -> None:
        faults = self._faults
        assert faults is not None
        for index, fault, count in faults.after_value(step):
            self._act(index, fault, step, count)

    def _faults_slow(self, step: str, started: float) -> None:
        """A call of ``step`` (or a generator's item) that began at ``started`` (epoch) returned."""
        faults = self._faults
        assert faults is not None
        extra = faults.slowdown(step, time.time() - started)
        if extra > 0:
            self._send_fault_records()
            time.sleep(extra)  # the fault itself: the step is this much slower

    def _act(self, index: int, fault: Fault, step: str | None, count: int | None) -> None:
        from ._fault_plan import Crash, Pause

        faults = self._faults
        assert faults is not None
        if isinstance(fault, Crash):
            faults.record(index, fault, step=step, tokens=count)
            self._flush_all()
            self._send_fault_records()
            self._crash(f"crashed by fault {index} of the fault plan (seed {faults.seed})")
        if isinstance(fault, Pause):
            faults.record(index, fault, step=step, tokens=count, seconds=fault.seconds)
            self._flush_all()
            self._send_fault_records()
            time.sleep(fault.seconds)  # the fault itself: this worker does nothing meanwhile

    def _crash(self, reason: str) -> None:
        """End this site as a crash does, once what it said has left (never returns)."""
        pump = getattr(self, "_pump_until", None)
        events = getattr(self, "_events", None)
        if pump is not None and events is not None:
            pump(lambda: not events.has_pending)
        if threading.current_thread() is threading.main_thread():
            os.kill(os.getpid(), 9)
        raise InjectedCrash(reason)

    def _send_fault_records(self) -> None:
        faults = self._faults
        if faults is not None and faults.records:
            records, faults.records = faults.records, []
            self._send_event((m.FAULT, faults.job_id, records))

    # -- links ----------------------------------------------------------------------------------

    def _faults_batch(self, site: str, job_id: int, batch: list[Any], nbytes: int) -> bool:
        """Shape a token frame to ``site``; True if the fault plan took it (sent later, or lost)."""
        faults = self._faults
        shaper = faults.links.get((faults.site, site)) if faults is not None else None
        if shaper is None:
            return False
        now = time.monotonic()
        deliveries = shaper.shape(batch, nbytes, now)
        self._send_fault_records()
        for due, tokens in deliveries:
            if due <= now and not self._fault_due:
                self._send_tokens(site, job_id, tokens, shaped=True)
            else:
                self._defer(due, "tokens", (site, job_id, tokens))
        return True

    def _faults_event(self, message: tuple[Any, ...]) -> bool:
        """Shape an event to the client (results, done); True if it is sent later or lost."""
        from ._fault_plan import CLIENT  # the plan's name for the client; a job with faults imported it

        faults = self._faults
        shaper = faults.links.get((faults.site, CLIENT)) if faults is not None else None
        if shaper is None or message[0] in (m.FAULT, m.WAITING):
            return False
        from ._faults import size_of

        now = time.monotonic()
        deliveries: list[tuple[float, Any]]
        if message[0] == m.RESULTS:
            records = [(*record, m.ITEM) for record in message[2]]
            shaped = shaper.shape(records, size_of(records), now)
            deliveries = [(due, (m.RESULTS, message[1], [r[:-1] for r in kept])) for due, kept in shaped]
        else:  # control events are never lost; they keep their place behind delayed results
            deliveries = [(max(now, shaper.last_due), message)]
        self._send_fault_records()
        for due, event in deliveries:
            self._defer(due, "event", event)
        return True

    def _faults_inbound(self, message: tuple[Any, ...]) -> bool:
        """Shape stream inputs from the client as they arrive; True if they are handled later."""
        from ._fault_plan import CLIENT

        faults = self._faults
        shaper = faults.links.get((CLIENT, faults.site)) if faults is not None else None
        tokens = message[2]
        if (
            shaper is None
            or len(message) > 3  # shaped already: its time has come
            or not tokens
            or tokens[0][2] != m.CLIENT
            or faults.job_id != message[1]  # type: ignore[union-attr]
        ):
            return False
        from ._faults import size_of

        now = time.monotonic()
        deliveries = shaper.shape(tokens, size_of(tokens), now)
        self._send_fault_records()
        for due, kept in deliveries:
            self._defer(due, "inbound", (m.TOKENS, message[1], kept, "shaped"))
        return True

    def _defer(self, due: float, what: str, args: Any) -> None:
        if self._fault_due is None:
            self._fault_due = []
        heapq.heappush(self._fault_due, (due, next(self._fault_seq), what, args))

    def _faults_timer(self) -> float | None:
        """When the next held frame is due (monotonic), or None."""
        return self._fault_due[0][0] if self._fault_due else None

    def _faults_flush(self) -> None:
        """Send the held frames that are due."""
        due = self._fault_due
        if not due:
            return
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, _, what, args = heapq.heappop(due)
            if what == "tokens":
                site, job_id, tokens = args
                self._send_tokens(site, job_id, tokens, shaped=True)
            elif what == "event":
                faults, self._faults = self._faults, None  # not shaped twice
                try:
                    self._send_event(args)
                finally:
                    self._faults = faults
            else:  # the serve loop takes it, as if it had just arrived (nothing re-enters)
                self._inbox.append(args)

    # -- what a waiting site waits for -----------------------------------------------------------

    def _wait_timeout_ms(self) -> int | None:
        """How long the idle loop may block before this site says what its job waits for."""
        run = self._run
        if run is None or self._wait_reported == run.job_id:
            return None
        now = time.monotonic()
        if self._wait_since is None:
            self._wait_since = now
        left = self._wait_since + WAIT_REPORT - now
        if left > 0:
            return int(left * 1000) + 1
        self._wait_reported = run.job_id
        self._send_event((m.WAITING, run.job_id, describe_waiting(run, getattr(self, "site", "?"))))
        return None

    def _wait_over(self) -> None:
        """A message arrived: the site is no longer waiting (and says so if it had reported)."""
        self._wait_since = None
        reported, self._wait_reported = self._wait_reported, None
        if reported is not None:
            self._send_event((m.WAITING, reported, None))


# -- what a step waits for --------------------------------------------------------------------


def describe_waiting(run: Any, site: str) -> str:
    """What a site's run of a job waits for, in a line: each step and the tokens it had."""
    parts = []
    for step_run in run.order[::-1]:
        if step_run.done or step_run.active is not None:
            continue
        name = step_run.plan.name
        for param, gather in step_run.gathers.items():
            if gather.complete:
                continue
            pending = sorted(gather.pending)
            had = {s: (len(v) if gather.param.stream else 1) for s, v in gather.values.items()}
            parts.append(
                f"step {name!r} waits for {param!r} from {_sites(pending)} "
                f"(has {sum(had.values())} token(s): {had or 'none'})"
            )
        if step_run.driver is not None and step_run.driver_pending and not step_run.queue:
            pending = sorted(step_run.driver_pending)
            parts.append(
                f"step {name!r} waits for stream {step_run.driver!r} from {_sites(pending)} "
                f"(ran for {step_run.calls} item(s), the stream has not ended)"
            )
    return "; ".join(parts) or "nothing it knows of"


def _sites(names: list[str]) -> str:
    shown = ["the client" if name == m.CLIENT else repr(name) for name in names]
    return ("site " if len(shown) == 1 and names[0] != m.CLIENT else "") + ", ".join(shown)
