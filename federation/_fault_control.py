"""The client's part of a fault plan: schedules at dispatch, timed site faults, start failures.

Mixed into every transport's pool (through :class:`~federation._slot_policy.SlotPolicy`).
At dispatch a job's schedule (``_faults.schedule``, a function of the plan
alone) sends each site its rules ahead of START; crashes and pauses timed
from the job's start are the router's timers here, because only the client
can kill or stop a process whatever it is doing. On the thread backend, where
a thread can be neither killed nor stopped, the worker is asked (INJECT) and
acts when it next reads its pipes: a step stuck in user code delays it. On
Ray the client kills a site's actor, and a pause is done on the actor's own
node (see ``RayPool._pause_worker``).

What workers report (FAULT records, WAITING lines) lands on the job: faults in
its timeline, waiting lines in the error of a job that timed out.
"""

from __future__ import annotations

import heapq
import itertools
import signal
import time
from typing import TYPE_CHECKING, Any

from . import _messages as m
from ._fault_plan import Crash, FailStart, FaultPlan, Pause, SiteFault
from ._faults import schedule

if TYPE_CHECKING:
    from ._handle import Job
    from ._slot_policy import Slot

__all__ = ["FaultControl"]


class FaultControl:
    """Timers and bookkeeping of fault plans on the client side of a transport."""

    fault_plan: FaultPlan | None = None  # the federation's own plan (Federation(faults=...))
    _fault_timers: list[tuple[float, int, str, Any]] | None = None
    _fault_seq = itertools.count()
    _fault_starts: dict[str, int] | None = None

    # provided by the pool
    backend: Any
    services: Any

    def wake(self) -> None:
        raise NotImplementedError

    def _faults_dispatch(self, job: Job, slot: Slot, participants: list[str]) -> None:
        """Send each site its rules for ``job`` (before START); arm the timers; mark restarts."""
        plan = job._faults
        assert plan is not None
        plan_schedule = schedule(plan, job._fault_number, len(job.attempts) + 1, participants)
        for site, rules in plan_schedule.rules.items():
            slot.send(site, (m.FAULTS, job.id, plan.seed, job._fault_number, rules))
        now = time.monotonic()
        for offset, site, index, fault in plan_schedule.timers:
            self._fault_timer(now + offset, "inject", (job, slot, site, index, fault))
        if plan_schedule.timers:
            # The transport's thread may be waiting with no deadline at all (a submit
            # dispatches from the user's thread): it must wait for these too.
            self.wake()
        for site, index, fault in plan_schedule.restarts:
            slot.repair = True  # replaced whole once the job ends: setup runs again everywhere
            self._fault_record(job, {"fault": fault.kind, "index": index, "site": site, "seed": plan.seed})

    def _faults_start_failures(self, sites: list[str]) -> dict[str, str]:
        """The sites whose next worker start a FailStart fault makes fail, with its message."""
        plan = self.fault_plan
        failing: dict[str, str] = {}
        if plan is None:
            return failing
        if self._fault_starts is None:
            self._fault_starts = {}
        for site in sites:
            start = self._fault_starts[site] = self._fault_starts.get(site, 0) + 1
            for index, fault in enumerate(plan.faults):
                if (
                    isinstance(fault, FailStart)
                    and fault.site in (site, "*")
                    and fault.skip < start <= fault.skip + fault.times
                ):
                    failing[site] = (
                        f"injected by fault {index} of the fault plan (seed {plan.seed}): "
                        f"FailStart of site {site!r}, start {start}"
                    )
        return failing

    def _fault_timer(self, when: float, action: str, args: Any) -> None:
        if self._fault_timers is None:
            self._fault_timers = []
        heapq.heappush(self._fault_timers, (when, next(self._fault_seq), action, args))

    def _faults_next(self) -> float | None:
        """When the next timed site fault is due (monotonic), or None."""
        return self._fault_timers[0][0] if self._fault_timers else None

    def _faults_due(self, now: float) -> None:
        """Apply the timed site faults whose time has come."""
        timers = self._fault_timers
        while timers and timers[0][0] <= now:
            _, _, action, args = heapq.heappop(timers)
            if action == "resume":
                args.suspend(False)
                continue
            if action == "resume-service":
                site, service = args
                self._signal_service(site, service, signal.SIGCONT)
                continue
            job, slot, site, index, fault = args
            if slot.job is not job or job.done():
                continue  # the job is over: nothing left to break
            if isinstance(fault, (Crash, Pause)) and fault.service is not None:
                self._service_fault(job, site, index, fault)
            elif site in slot.pending_sites:  # else this site's part is over
                self._inject(job, slot, site, index, fault)

    def _service_fault(self, job: Job, site: str, index: int, fault: Crash | Pause) -> None:
        """Kill or stop ``site``'s service the fault names: a signal to its process group."""
        plan = job._faults
        assert plan is not None and fault.service is not None
        record: dict[str, Any] = {
            "fault": fault.kind,
            "index": index,
            "site": site,
            "service": fault.service,
            "seed": plan.seed,
        }
        if isinstance(fault, Pause):
            record["seconds"] = fault.seconds
        self._fault_record(job, record)
        if isinstance(fault, Crash):
            self._signal_service(site, fault.service, signal.SIGKILL)
        else:
            self._signal_service(site, fault.service, signal.SIGSTOP)
            # Resumed whatever becomes of the job: a service outlives it.
            self._fault_timer(time.monotonic() + fault.seconds, "resume-service", (site, fault.service))

    def _inject(self, job: Job, slot: Slot, site: str, index: int, fault: SiteFault) -> None:
        plan = job._faults
        assert plan is not None
        record: dict[str, Any] = {"fault": fault.kind, "index": index, "site": site, "seed": plan.seed}
        if not self._can_stop_workers():
            # A thread can be neither killed nor stopped: the worker acts when it next reads.
            slot.send(site, (m.INJECT, job.id, index, fault))
            return
        worker = slot.workers[site]
        if isinstance(fault, Crash):
            self._fault_record(job, record)
            self._crash_worker(worker, f"crashed by fault {index} of the fault plan (seed {plan.seed})")
        elif isinstance(fault, Pause):
            record["seconds"] = fault.seconds
            self._fault_record(job, record)
            self._pause_worker(worker, fault.seconds)

    # -- how a transport crashes and pauses a worker (the local one's here) ------------------------

    def _can_stop_workers(self) -> bool:
        """Whether the client can kill or stop a worker whatever it does (not a thread)."""
        return bool(self.backend.name != "thread")

    def _crash_worker(self, worker: Any, reason: str) -> None:
        """Kill ``worker`` now: a fault plan's crash (``reason`` says which)."""
        worker.kill()

    def _signal_service(self, site: str, name: str, signum: int) -> None:
        """Send ``signum`` to ``site``'s service ``name``, without waiting (the router's thread)."""
        self.services.signal(site, name, signum)

    def _pause_worker(self, worker: Any, seconds: float) -> None:
        """Stop ``worker``'s whole process for ``seconds``: SIGSTOP now, SIGCONT from a timer."""
        worker.suspend(True)
        self._fault_timer(time.monotonic() + seconds, "resume", worker)

    def _fault_record(self, job: Job, fields: dict[str, Any]) -> None:
        fields.setdefault("job_number", job._fault_number)
        job._events.append((float(fields.pop("time", time.time())), "fault", fields))

    def _on_fault_event(self, slot: Slot, site: str, message: tuple[Any, ...]) -> None:
        """FAULT records or a WAITING line from a worker, for the job it names."""
        job = slot.job
        if job is None or job.id != message[1]:
            return
        if message[0] == m.FAULT:
            for record in message[2]:
                self._fault_record(job, dict(record))
        elif message[2] is None:
            job._waiting.pop(site, None)
        else:
            job._waiting[site] = message[2]
