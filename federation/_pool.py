"""The pool: slots of workers, their state machine, their start, replacement and end.

    start ──> STARTING ──READY──> IDLE <──> BUSY ──job ended early──> DRAINING
                 │                  │         │                         │
                 └──died/failed─────┴─────────┴───died / grace over─────┴──> BROKEN ──reaped──> STOPPED
    retire (recycle, close) ──> STOPPING ──stopped──> STOPPED   (killed after shutdown_timeout)

Every move goes through :meth:`~federation._slot_policy.SlotPolicy._move`, which
checks it against ``_execution.TRANSITIONS`` and keeps the free list equal to the
IDLE slots. A slot that leaves the pool is replaced after a backoff: a worker
killed while starting may pass (backoff up to 0.5 s, never counted), while a
failed start (a setup that raised, a worker that exited, a timeout) counts; more
than ``max_slot_restarts`` in a row make the federation give up, failing every
job. Those decisions are :mod:`._slot_policy`'s, shared with the Ray transport;
this module starts slots of processes, watches their fds and reaps them.
"""

from __future__ import annotations

import os
import select
import sys
import time

from . import _messages as m
from ._callbacks import CallbackThread
from ._channel import Outbox
from ._config import FederationConfig
from ._exceptions import ConfigError, FederationError, SiteStartError
from ._execution import JobExecution, SlotState, fds_per_slot
from ._handle import Job, JobStatus
from ._log import get_logger, worker_log_level
from ._oom import oom_kill_count
from ._serialization import SegmentViews, unlink_segments
from ._services import FederationServices, ServiceReport
from ._slot_policy import SlotPolicy, backoff
from .backends import get_backend

__all__ = ["EVENTS", "OUTPUT", "SENTINEL", "STDOUT", "WAKE", "SlotPool"]

POLLIN = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
EVENTS, SENTINEL, OUTPUT, STDOUT, WAKE = range(5)  # what a registered fd is
TRIM_AFTER = 1.0  # seconds without jobs after which the client unmaps workers' segments


class SlotPool(SlotPolicy[JobExecution]):
    """The slots of one federation and their workers' pipes, under the job side's lock."""

    def __init__(self, config: FederationConfig, callbacks: CallbackThread | None = None) -> None:
        _ensure_stdio()
        _raise_fd_limit(_fds_needed(config.pool_size, len(config.sites), config.backend == "thread"))
        super().__init__(config, callbacks)
        self.backend = get_backend(config)
        self._lifeline_r, self._lifeline_w = os.pipe()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # epoll, not poll: the router watches about four fds per worker of every slot, idle
        # ones too, and poll() scans them all on each wake-up (8.6 us per 256 fds here, at
        # every event of every job); epoll costs the same whatever the number of sites.
        self._poller = select.epoll()
        self._fds: dict[int, tuple[int, JobExecution | None, str]] = {}
        self._register(self._wake_r, WAKE, None, "")
        self._log_level = worker_log_level()
        self._next_memory_check = 0.0
        self.services = FederationServices(
            config.sites, ServiceReport(self.log_files)
        )  # Router.start starts it
        self._pending_out: set[Outbox] = set()  # control pipes with bytes waiting for room
        self._released: list[tuple[str, str]] = []
        # Results are copied out of workers' segments at once, so a job handle the
        # user keeps never pins a worker's shared memory.
        self._views = SegmentViews(lambda creator, name: self._released.append((creator, name)))
        self._trim_at: float | None = None  # when an idle client closes its cached segment mappings

    # -- starting ----------------------------------------------------------------------------

    def _first_wave(self) -> int:
        """How many slots to start at once; the rest start once the first has booted.

        Workers starting together share the CPUs: started all at once on 2 cores,
        every slot becomes ready at the same moment, late. A first wave that fits
        the CPUs boots early, so the first job can run while the rest start. The
        rest start as soon as the first wave's interpreters are up (BOOTED), not
        when its setups are done: a setup that waits on I/O holds nobody back.
        """
        if self.backend.name == "thread":
            return self.config.pool_size
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # pragma: no cover - not Linux
            cpus = os.cpu_count() or 1
        return max(1, cpus // len(self.config.sites))

    def _start_unstarted(self) -> None:
        while self.unstarted and not self.closing:
            index = self.unstarted.pop(0)
            try:
                self._start_slot(index)
            except Exception as exc:  # noqa: BLE001 - e.g. out of file descriptors
                error = SiteStartError(f"could not start slot {index}: {exc!r}", site="*")
                if not self.started:
                    self.start_error = self.start_error or error
                    self.changed.notify_all()
                    return
                self.log.error("could not start a slot", slot=index, error=repr(exc))

    def _start_slot(self, index: int) -> JobExecution:
        self._generation += 1
        slot = JobExecution(
            index,
            self._generation,
            self.config,
            self.backend,
            self._lifeline_r,
            self._log_level,
            self._on_pending,
            services=self.services.addresses,
            fail_start=self._faults_start_failures(self._site_names())
            if self.fault_plan is not None
            else None,
        )
        self.slots[index] = slot
        slot.oom_kills = oom_kill_count()
        for site, reader in slot.events.items():
            self._register(reader.fileno(), EVENTS, slot, site)
        for site, worker in slot.workers.items():
            self._register(worker.sentinel, SENTINEL, slot, site)
            # stdout first: of two lines written in that order, poll() reports it first.
            # Never a blocking read: a process a step started may hold these pipes
            # open long after the worker died, and EOF would wait for it.
            if worker.stdout is not None:
                os.set_blocking(worker.stdout, False)
                self._register(worker.stdout, STDOUT, slot, site)
            if worker.output is not None and worker.output != worker.sentinel:
                os.set_blocking(worker.output, False)
                self._register(worker.output, OUTPUT, slot, site)
        self.log.debug("slot starting", slot=index, generation=slot.generation)
        return slot

    def _site_names(self) -> list[str]:
        return [site.name for site in self.config.sites]

    def _register(self, fd: int, kind: int, slot: JobExecution | None, site: str) -> None:
        self._fds[fd] = (kind, slot, site)
        try:
            self._poller.register(fd, POLLIN)
        except FileExistsError:  # the number of an fd closed while registered, reused
            self._poller.modify(fd, POLLIN)

    def _rebuild_poller(self) -> None:
        """A fresh epoll watching exactly the fds in ``_fds`` (router thread, under the lock).

        epoll watches files, not fd numbers: an fd closed while registered, whose file
        lives on in a process forked from this one, would be reported for ever, and
        can no longer be removed by its number.
        """
        old, self._poller = self._poller, select.epoll()
        old.close()
        for fd in self._fds:
            try:
                self._poller.register(fd, POLLIN)
            except OSError:  # pragma: no cover - closed without being unregistered: nothing to read
                pass

    def _unregister(self, fd: int) -> None:
        if self._fds.pop(fd, None) is not None:
            try:
                self._poller.unregister(fd)
            except (OSError, ValueError):  # closed already (epoll forgot it then) or never added
                pass

    def _on_pending(self, outbox: Outbox) -> None:
        # A control pipe is full (any thread): the router flushes it when it has room.
        self._pending_out.add(outbox)
        self.wake()

    def wake(self) -> None:
        """Make the router thread look at its state again."""
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # already awake, or closed

    # -- the slot state machine -------------------------------------------------------------

    def _take_free(self) -> JobExecution | None:
        """A free slot whose workers are all alive, or None.

        A worker may have died a moment ago, before the router read its sentinel:
        a zero-timeout poll of the slot's sentinels catches that here, so the job
        goes to another slot (or waits) instead of starting on a dead worker.
        """
        while self.free:
            # The slot freed last: its workers ran a moment ago, so their pages and the
            # CPU caches are warm; a slot nobody needed stays idle.
            slot = self.free[-1]
            dead = slot.dead_sites()
            if not dead:
                self._move(slot, SlotState.BUSY)
                return slot
            for site in dead:
                self._on_worker_gone(slot, site)
            if slot.state is SlotState.IDLE:  # pragma: no cover - a death always moves it out
                self._move(slot, SlotState.BROKEN)
        return None

    def _dispatch(self, job: Job, slot: JobExecution) -> None:
        """Start ``job`` on ``slot``, which ``_take_free`` has moved to BUSY."""
        compiled = job._compiled
        inputs = job._inputs
        slot.job = job
        absent = job._absent
        participants = [site for site in compiled.participants if site not in absent]
        slot.pending_sites = set(participants)
        self.running[job.id] = (job, slot)
        started = time.time()  # the attempt's start: before any site can start
        if job._faults is not None:
            self._faults_dispatch(job, slot, participants)  # each site's rules, ahead of START
        for site in participants:
            digest, plan = compiled.plans[site]
            cached = slot.plans[site]
            if digest not in cached:
                if len(cached) >= m.PLAN_CACHE:  # the worker evicts its oldest plan too
                    del cached[next(iter(cached))]
                slot.send(site, (m.PLAN, digest, plan))
                cached[digest] = None
            site_inputs = {}
            for name in compiled.site_inputs.get(site, ()):
                value = inputs.get(name)
                if isinstance(value, dict):  # fed.per_site: this site's own value
                    value = value.get(site)
                if value is not None:
                    site_inputs[name] = value
            slot.send(site, (m.START, job.id, digest, site_inputs, absent))
        # Bookkeeping after the sends: the workers start meanwhile. Their replies are
        # read under the lock this holds, so none can overtake it.
        if job.status is JobStatus.QUEUED:
            self._count(JobStatus.RUNNING, JobStatus.QUEUED)
        first = not job.attempts
        job._start_attempt(slot.index, started)
        if job.timeout is not None and first:
            # The timeout covers the whole job from its first start: every attempt,
            # and the waits in the queue between them.
            self._deadlines[job.id] = time.monotonic() + job.timeout
        if job.timeout is not None or self.config.max_worker_memory is not None:
            self.wake()  # the router may be waiting with no deadline at all
        self._forward_pending(job, slot)

    def _kill_late_site(self, slot: JobExecution, site: str) -> None:
        """Kill one worker of a slot (a late site that did not stop); the slot is repaired later."""
        slot.repair = True
        self.log.warning("killing a late site's worker that did not stop in time", site=site, slot=slot.index)
        slot.workers[site].kill()
        slot.control[site].close()  # a thread worker sees EOF and ends when its step returns
        if slot.state is SlotState.DRAINING and slot.kill_deadline is not None:
            # The job ended; the slot waits for this death, not for the cancel grace again.
            slot.kill_deadline = max(slot.kill_deadline, time.monotonic() + self._cancel_grace())

    def _slot_counts(self) -> tuple[int, int]:
        starting = len(self.unstarted) + sum(
            1 for slot in self.slots if slot is not None and slot.state is SlotState.STARTING
        )
        return len(self.slots), starting

    def _on_worker_gone(self, slot: JobExecution, site: str) -> None:
        """A worker of ``slot`` has ended (its sentinel says so); the router handles it."""
        raise NotImplementedError

    def _on_released(self) -> None:
        if not self.running and self._views.has_cached():
            self._trim_at = time.monotonic() + TRIM_AFTER

    def _site_stopped(self, slot: JobExecution, site: str, job: Job) -> None:
        # The job was cancelled or failed here: processes its steps started
        # would outlive it (a step stopped cooperatively is not killed).
        killed = slot.workers[site].kill_strays()
        if killed:
            self.log.info(
                "killed processes a stopped job left behind", site=site, job_id=job.id, count=killed
            )

    def _start_replacements(self) -> None:
        """Start the replacements that are due; one that cannot start is tried again later."""
        now = time.monotonic()
        for index, when in sorted(self._replace_at.items()):
            if when > now or self.closing or self.gave_up is not None:
                continue
            del self._replace_at[index]
            try:
                self._start_slot(index)
            except Exception as exc:  # noqa: BLE001 - e.g. a moment of fd pressure: it may pass
                self.start_deaths += 1
                delay = backoff(self.start_deaths, cap=0.5)
                self.log.error(
                    "could not start a replacement slot; trying again",
                    slot=index,
                    error=repr(exc),
                    delay=delay,
                )
                self._replace_at[index] = now + delay

    def _maybe_reap(self, slot: JobExecution) -> None:
        """Close a retired slot once every one of its workers has ended."""
        if slot.state is SlotState.STOPPED or slot.alive():
            return
        for site, worker in slot.workers.items():
            self._drain_outputs(slot, site)
            self._unregister(worker.sentinel)
            for fd in (worker.output, worker.stdout):
                if fd is not None:
                    self._unregister(fd)
            worker.reap(1.0)
        for reader in slot.events.values():
            self._unregister(reader.fileno())
        for site in slot.sites:
            # A worker unlinks its own segments when it stops; these are a dead one's.
            unlink_segments(slot.shm_prefix(site))
        self._move(slot, SlotState.STOPPED)
        slot.close()
        if slot in self._retired:
            self._retired.remove(slot)
        if self.slots[slot.index] is slot:
            self.slots[slot.index] = None
        self.changed.notify_all()

    def suspend_job(self, job: Job, suspend: bool) -> None:
        with self.lock:
            entry = self.running.get(job.id)
            if entry is None or job.done():
                raise FederationError(
                    f"job {job.id} is not running ({job.status.value}); only a running job can be suspended"
                )
            for worker in entry[1].workers.values():
                worker.suspend(suspend)
            job._set_status(JobStatus.SUSPENDED if suspend else JobStatus.RUNNING)

    def _check_memory(self) -> None:
        limit = self.config.max_worker_memory
        assert limit is not None
        for _, slot in list(self.running.values()):
            for site, worker in slot.workers.items():
                rss = worker.memory()
                if rss is not None and rss > limit:
                    self.log.warning(
                        "worker over its memory limit", site=site, slot=slot.index, rss=rss, limit=limit
                    )
                    slot.memory_killed = site
                    worker.kill()
                    break

    # -- worker output -----------------------------------------------------------------------

    def _drain_outputs(self, slot: JobExecution, site: str) -> None:
        """Read what is left of a gone worker's stdout and stderr."""
        worker = slot.workers[site]
        for fd, stdout in ((worker.stdout, True), (worker.output, False)):
            if fd is not None:
                self._drain_output(slot, site, fd, stdout, final=True)

    def _drain_output(self, slot: JobExecution, site: str, fd: int, stdout: bool, final: bool) -> None:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                self._unregister(fd)
                break
            key = (site, fd)
            data = slot.partial_output.pop(key, b"") + chunk
            *lines, rest = data.split(b"\n")
            if rest:
                slot.partial_output[key] = rest
            for raw in lines:
                self._output_line(slot, site, raw, stdout)
            if not final:
                break
        if final and slot.partial_output.get((site, fd)):
            self._output_line(slot, site, slot.partial_output.pop((site, fd)), stdout)

    def _output_line(self, slot: JobExecution, site: str, raw: bytes, stdout: bool) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        slot.last_lines[site].append(line)
        if self.log_files is not None:
            self.log_files.output(site, f"{site}/slot-{slot.index}", line)
        if self.config.echo_worker_output:
            # What a step printed goes to the client's stream of the same name.
            stream = sys.stdout if stdout else sys.stderr
            try:
                stream.write(f"[{site}/slot-{slot.index}] {line}\n")
                if stdout:
                    stream.flush()  # a pipe or file would hold it back, behind later stderr lines
            except (OSError, ValueError):
                pass


# -- helpers ---------------------------------------------------------------------------------


def _ensure_stdio() -> None:
    """Open /dev/null on any of fds 0-2 that is closed (a daemon, ``cmd <&- >&-``).

    Otherwise the first pipes made here would get those numbers, and a worker
    started with them as its stdin or stdout would lose its control pipe.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)
            if opened != fd:  # pragma: no cover - a lower fd was free after all
                os.dup2(opened, fd)
                os.close(opened)


def _fds_needed(pool_size: int, sites: int, threads: bool = False) -> int:
    """Open files the client needs for its pool: one slot starting while the others run."""
    # A running slot keeps control and events pipes and each worker's output pipes and
    # pidfd (5 per site); a starting one briefly holds both ends of every pipe too. Thread
    # workers keep all their pipes in this process.
    running = fds_per_slot(sites, threads) if threads else 5 * sites
    return fds_per_slot(sites, threads) + (pool_size - 1) * running


def _raise_fd_limit(needed: int) -> None:
    """Raise the soft limit on open files towards the hard one when the pool needs more.

    Raises:
        ConfigError: even the hard limit is too low for this pool.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and needed + 64 > hard:
        raise ConfigError(
            f"this pool needs about {needed:,} open files while a slot starts, over the hard limit "
            f"of {hard:,} (RLIMIT_NOFILE); use fewer sites per federation or a smaller pool_size "
            f"(on the thread backend, each worker holds a pipe to every other site), "
            f"or raise the hard limit (ulimit -Hn)"
        )
    want = needed + 256  # the client's own files beside the pool's pipes
    if soft == resource.RLIM_INFINITY or want <= soft:
        return
    target = want if hard == resource.RLIM_INFINITY else min(hard, max(want, soft))
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):  # pragma: no cover - not allowed here
        return
    get_logger("router").info("raised the open-file limit for the pool", soft=soft, now=target, needed=want)
