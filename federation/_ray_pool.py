"""The Ray pool: slots of site actors, their state machine, their start, replacement and end.

The job side (:mod:`._jobs`) and the slot policy (:mod:`._slot_policy`) are
shared with the local transport unchanged; this module supplies their hooks on
Ray. A slot holds one site actor
(:class:`~federation._ray_site.SiteActor`) per site, pinned to that site's
nodes, made before any job arrives; it moves through the same states as a
local slot (``_execution.TRANSITIONS``)::

    start ──> STARTING ──all READY──> IDLE <──> BUSY ──job ended early──> DRAINING
                 │                      │         │                         │
                 └──died/failed─────────┴─────────┴──died / grace over──────┴──> BROKEN ──confirmed──> STOPPED
    retire (recycle, close) ──> STOPPING ──STOPPED, killed──> STOPPED   (killed after shutdown_timeout)

Messages to an actor are Ray calls numbered per sender (the actor restores
their order): a START goes to the actor's run lane, whose answer brings what
the site said by the job's end; the rest are fire-and-forget. What an actor
says otherwise comes back through one long poll per actor
(``SiteActor.events``), which :mod:`._ray_router` keeps outstanding; its
failure is how a death is noticed: an actor killed, its process dead, or its
node lost. Tokens between a slot's actors go over direct links (:mod:`._ray_links`).
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from typing import Any

from . import _messages as m
from ._callbacks import CallbackThread
from ._config import FederationConfig
from ._exceptions import ConfigError, FederationError, SiteStartError
from ._execution import SlotState
from ._handle import Job, JobStatus
from ._log import worker_log_level
from ._ray_cluster import Lease, Placement, connect, import_ray, site_placement
from ._ray_links import SECRET_BYTES
from ._ray_services import RayServices, pin_to_node
from ._ray_site import LINK, SiteActor
from ._ray_values import PEERS, RayValues, pack
from ._serialization import dumps_function
from ._services import bind_setup
from ._slot_policy import SlotPolicy, backoff

__all__ = ["RayPool", "RaySlot", "RayWorker"]

# A site actor's Ray threads beside its run lane: the long poll, messages arriving, a fault
# plan's pause reaping its stopper.
_ACTOR_THREADS = 6
# A site actor's run lane: one thread, which runs its setup and then its steps (SiteActor.run).
_RUN_LANE_GROUP = {"run": 1}
_RUN_LANE = (m.START, m.STOP)


class RayWorker:
    """One site actor of a slot, as the pool and ``stats()`` see it."""

    output: int | None = None
    stdout: int | None = None

    def __init__(self, site: str, name: str, actor: Any) -> None:
        self.site = site
        self.name = name
        self.actor = actor
        self.pid: int | None = None
        self.node_id: str | None = None
        self.node_address: str | None = None
        self.gone = False  # its poll failed: the actor is dead
        self.crashed: str | None = None  # why a fault plan had it killed, if one did
        self.exitcode: int | None = None  # what it passed to os._exit, if it said so
        self.seq = 0  # the number of the client's next message to it
        self.poll: Any = None  # the outstanding events() call
        self.run: Any = None  # actor.run on the run lane (see SiteActor.run)
        self.link: tuple[str, int] | None = None  # where its direct link listens (_ray_links)
        # Events come numbered, by the poll or a START's answer: handled in their order.
        self.next_event = 0
        self.held: dict[int, Any] = {}

    def where(self) -> str:
        """The node it runs on, for messages: ``node 1a2b3c4d5e6f (10.0.0.5)``."""
        if self.node_id is None:
            return "a node not known yet (it had not started)"
        return f"node {self.node_id[:12]} ({self.node_address})"

    def alive(self) -> bool:
        """Whether the actor is still running, as far as the client knows."""
        return not self.gone

    def memory(self) -> int | None:
        """Not measured: the actor may run on another machine."""
        return None

    def kill(self) -> None:
        """Kill the actor (its process), without waiting; its poll then fails."""
        import ray

        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead, or the cluster is going
            pass

    def pause(self, seconds: float) -> None:
        """Stop the actor's process for ``seconds``, on its node (see ``SiteActor.pause``)."""
        if self.gone:
            return
        try:
            self.actor.pause.remote(seconds)
        except Exception:  # noqa: BLE001 - Ray is shutting down: the poll reports the end
            pass


class RaySlot:
    """One slot of the pool: an actor per site, and what the client knows of them."""

    def __init__(self, index: int, generation: int, sites: tuple[str, ...]) -> None:
        self.index = index
        self.generation = generation
        self.state = SlotState.STARTING
        self.started_at = time.monotonic()
        self.sites = sites
        self.workers: dict[str, RayWorker] = {}
        self.ready: set[str] = set()
        # Mirrors each actor's plan cache, as JobExecution.plans does (see _messages.PLAN_CACHE).
        self.plans: dict[str, dict[bytes, None]] = {site: {} for site in sites}
        self.job: Job | None = None
        self.pending_sites: set[str] = set()
        self.jobs_run = 0
        self.kill_deadline: float | None = None
        self.start_failed = False
        self.repair = False  # a site's actor died inside a tolerant fan-in: replace after the job
        self.site_kill: dict[str, float] = {}  # late sites told to stop: their deadline
        self.last_lines: dict[str, deque[str]] = {site: deque(maxlen=20) for site in sites}
        self.secret = os.urandom(SECRET_BYTES)  # opens the direct links between its actors
        self.peered: set[str] = set()  # sites told where their siblings listen (with a first START)

    def send(self, site: str, *messages: tuple[Any, ...]) -> Any:
        """Send messages to the site's actor in one call, numbered for its order; the call's ref.

        START and STOP go to the actor's run lane, whose answer carries the events
        (``SiteActor.run``); the rest are only handed over (``SiteActor.deliver``).
        """
        worker = self.workers[site]
        if worker.gone:
            return None
        seq = worker.seq
        worker.seq += 1
        try:
            frame: Any = (m.CLIENT, seq, list(messages))
            if all(message[0] != LINK for message in messages):  # actor handles: Ray tracks them
                frame = pack(frame)
            if any(message[0] in _RUN_LANE for message in messages):
                return worker.run.remote(frame)
            return worker.actor.deliver.remote(frame)
        except Exception:  # noqa: BLE001 - Ray is shutting down: the poll reports the end
            return None

    def stop(self) -> None:
        """Ask every actor to stop after what it is doing."""
        for site in self.sites:
            self.send(site, (m.STOP,))

    def kill(self) -> None:
        """Kill every actor of the slot."""
        for worker in self.workers.values():
            worker.kill()

    def alive(self) -> list[RayWorker]:
        return [worker for worker in self.workers.values() if not worker.gone]


class RayPool(SlotPolicy[RaySlot]):
    """The slots of one federation on Ray, under the job side's lock."""

    worker_noun = "site actor"
    helps_wait = True  # see RayRouter._help_wait

    def __init__(self, config: FederationConfig, callbacks: CallbackThread | None = None) -> None:
        if config.max_worker_memory is not None:
            raise ConfigError(
                "max_worker_memory is not available on the Ray backend: actors may run on other "
                "machines, out of the client's sight; give sites Ray resources instead "
                "(fed.Site(name, resources={'memory': bytes}))"
            )
        super().__init__(config, callbacks)
        self.ray = import_ray()
        self.lease: Lease | None = connect(config.ray_address)
        try:
            self.placement: Placement = site_placement(config)
        except BaseException:
            self.lease.release()
            self.lease = None
            raise
        self.actor_class = self.ray.remote(concurrency_groups=_RUN_LANE_GROUP)(SiteActor)
        self._log_level = worker_log_level()
        self._values = RayValues()
        # Started by RayRouter.start before any slot, stopped by _abandon after them.
        self.services = RayServices(config, self.log_files)
        self._no_node_warned: set[str] = set()

    # -- starting ----------------------------------------------------------------------------

    def _start_slot(self, index: int) -> RaySlot:
        self._generation += 1
        sites = tuple(site.name for site in self.config.sites)
        slot = RaySlot(index, self._generation, sites)
        self.slots[index] = slot
        sys_path = tuple(p for p in sys.path if p)
        failing = self._faults_start_failures(list(sites)) if self.fault_plan is not None else {}
        for site_config in self.config.sites:
            site = site_config.name
            name = f"{site}/slot-{index}"
            services = self.services.addresses[site]
            spec = m.WorkerSpec(
                site=site,
                name=name,
                setup=bind_setup(site_config.setup, services),
                env=dict(site_config.env),
                data_dir=str(site_config.data_dir) if site_config.data_dir else None,
                sys_path=sys_path,
                log_level=self._log_level,
                max_token_bytes=self.config.max_token_bytes,
                shm_prefix="",
                fail_start=failing.get(site),
                services=services,
            )
            options = dict(self.placement.options[site])
            node = self.services.node_of(site)
            if node is not None:  # beside its services: their address (127.0.0.1) is its own node
                pin_to_node(options, node)
            if site_config.env:
                options["runtime_env"] = {"env_vars": dict(site_config.env)}
            actor = self.actor_class.options(
                max_restarts=0,  # the federation replaces a slot; Ray must not revive one actor of it
                max_task_retries=0,
                max_concurrency=_ACTOR_THREADS,
                **options,
            ).remote(dumps_function(spec, what=f"the setup of site {site!r}"), sys_path, slot.secret)
            worker = RayWorker(site, name, actor)
            worker.run = actor.run.options(concurrency_group="run")
            slot.workers[site] = worker
        handles = {site: worker.actor for site, worker in slot.workers.items()}
        for site in sites:
            slot.send(site, (LINK, {other: h for other, h in handles.items() if other != site}))
            self._poll(slot, slot.workers[site])
            slot.workers[site].actor.boot.options(concurrency_group="run").remote()
        self.log.debug("slot starting", slot=index, generation=slot.generation)
        return slot

    def _poll(self, slot: RaySlot, worker: RayWorker) -> None:
        """Keep one events() call outstanding on ``worker``; its answer goes to the router thread."""
        raise NotImplementedError

    def _watch_reply(self, slot: RaySlot, worker: RayWorker, ref: Any) -> None:
        """Have ``ref``, a START's call, waited on: its answer is the site's events up to the job's end."""
        raise NotImplementedError

    # -- the slot state machine -------------------------------------------------------------

    def _take_free(self) -> RaySlot | None:
        """A free slot, now BUSY; a death not yet read is noticed by its failed poll."""
        while self.free:
            # The slot freed last: its actors ran a moment ago, so their threads and the
            # CPU caches are warm; a slot nobody needed stays idle.
            slot = self.free[-1]
            if len(slot.alive()) < len(slot.sites):
                self._retire(slot, graceful=False)
                continue
            self._move(slot, SlotState.BUSY)
            return slot
        return None

    def _dispatch(self, job: Job, slot: RaySlot) -> None:
        """Start ``job`` on ``slot``, which ``_take_free`` has moved to BUSY."""
        compiled = job._compiled
        inputs = job._inputs
        slot.job = job
        absent = job._absent
        participants = [site for site in compiled.participants if site not in absent]
        slot.pending_sites = set(participants)
        self.running[job.id] = (job, slot)
        started = time.time()
        if job._faults is not None:
            self._faults_dispatch(job, slot, participants)  # each site's rules, ahead of START
        for site in participants:
            digest, plan = compiled.plans[site]
            cached = slot.plans[site]
            messages: list[tuple[Any, ...]] = []
            if site not in slot.peered:  # every site is ready: where the others listen is known
                slot.peered.add(site)
                peers = {
                    other: worker.link
                    for other, worker in slot.workers.items()
                    if other != site and worker.link is not None
                }
                messages.append((PEERS, peers))
            if digest not in cached:
                if len(cached) >= m.PLAN_CACHE:  # the actor evicts its oldest plan too
                    del cached[next(iter(cached))]
                messages.append((m.PLAN, digest, plan))
                cached[digest] = None
            site_inputs = {}
            for name in compiled.site_inputs.get(site, ()):
                value = inputs.get(name)
                if isinstance(value, dict):  # fed.per_site: this site's own value
                    value = value.get(site)
                if value is not None:
                    site_inputs[name] = value
            messages.append((m.START, job.id, digest, site_inputs, absent))
            ref = slot.send(site, *messages)
            if ref is not None:
                self._watch_reply(slot, slot.workers[site], ref)
        if job.status is JobStatus.QUEUED:
            self._count(JobStatus.RUNNING, JobStatus.QUEUED)
        first = not job.attempts
        job._start_attempt(slot.index, started)
        if job.timeout is not None and first:
            self._deadlines[job.id] = time.monotonic() + job.timeout
            self.wake()  # the router may be waiting with no deadline at all
        self._forward_pending(job, slot)

    def _slot_counts(self) -> tuple[int, int]:
        starting = sum(1 for slot in self.slots if slot is not None and slot.state is SlotState.STARTING)
        return len(self.slots), starting + len(self._replace_at)

    def suspend_job(self, job: Job, suspend: bool) -> None:
        """Suspend/resume is not available on Ray: the error says so."""
        with self.lock:
            if job.id not in self.running or job.done():
                raise FederationError(
                    f"job {job.id} is not running ({job.status.value}); only a running job can be suspended"
                )
        raise ConfigError(
            "suspend() and resume() are not available on the Ray backend: Ray cannot pause an actor's "
            "process; cancel the job (job.cancel()) or use backend='process'"
        )

    # -- a fault plan's timed crash and pause -------------------------------------------------

    def _can_stop_workers(self) -> bool:
        return True

    def _crash_worker(self, worker: RayWorker, reason: str) -> None:
        worker.crashed = reason
        worker.kill()

    def _signal_service(self, site: str, name: str, signum: int) -> None:
        # The service runs on the site's node, under its host actor: a call that is not waited on.
        self.services.signal_nowait(site, name, signum)

    def _pause_worker(self, worker: RayWorker, seconds: float) -> None:
        # Stopped and resumed on its own node: the client may be on another machine.
        worker.pause(seconds)

    def _kill_late_site(self, slot: RaySlot, site: str) -> None:
        # Ray cannot stop one method: the late site's actor goes, the slot is repaired after the job.
        slot.repair = True
        self.log.warning("killing a late site's actor that did not stop in time", site=site, slot=slot.index)
        slot.workers[site].kill()

    # -- ending ------------------------------------------------------------------------------

    def _maybe_reap(self, slot: RaySlot) -> None:
        """A retired slot is STOPPED once every actor of it is confirmed dead."""
        if slot.state is SlotState.STOPPED or slot.alive():
            return
        if slot.state not in (SlotState.BROKEN, SlotState.STOPPING):
            return
        self._move(slot, SlotState.STOPPED)
        if slot in self._retired:
            self._retired.remove(slot)
        if self.slots[slot.index] is slot:
            self.slots[slot.index] = None
        self.changed.notify_all()

    def _start_replacements(self) -> None:
        """Start the replacements that are due, once every site has a live node again."""
        now = time.monotonic()
        due = [i for i, when in sorted(self._replace_at.items()) if when <= now]
        if not due or self.closing or self.gave_up is not None:
            return
        try:
            self.placement = site_placement(self.config)
        except SiteStartError as exc:
            # A lost node: wait for one to come back, without counting it as a failed start.
            if exc.site not in self._no_node_warned:
                self._no_node_warned.add(exc.site)
                self.log.warning("a slot waits for a node of its site to replace it", error=str(exc))
            for index in due:
                self._replace_at[index] = now + 1.0
            return
        except Exception as exc:  # noqa: BLE001 - the cluster may be briefly unreachable
            self.log.warning("could not read the Ray cluster's nodes", error=repr(exc))
            for index in due:
                self._replace_at[index] = now + 1.0
            return
        self._no_node_warned.clear()
        for index in due:
            del self._replace_at[index]
            try:
                self._start_slot(index)
            except Exception as exc:  # noqa: BLE001 - e.g. the cluster is shutting down
                self.start_deaths += 1
                delay = backoff(self.start_deaths, cap=1.0)
                self.log.error(
                    "could not start a replacement slot; trying again", slot=index, error=repr(exc)
                )
                self._replace_at[index] = now + delay
