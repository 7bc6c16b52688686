"""A job execution: one pool slot, with one worker per site and every pipe made up front.

Pipes of a slot with sites ``a``, ``b`` and ``c``::

    client --control[a]--> worker a --events[a]--> client (router)
    client --control[b]--> worker b --events[b]--> client (router)
    client --control[c]--> worker c --events[c]--> client (router)
                   worker b, worker c --inbox[a]--> worker a
                   worker a, worker c --inbox[b]--> worker b
                   worker a, worker b --inbox[c]--> worker c
                           worker a,b,c --stdout/stderr--> client (router)

Control and events pipes have one writer and one reader; an inbox has one
reader and every other worker of the slot as a writer, in packets that never
interleave (see ``_channel``), so a slot needs fds linear in its sites. All of them exist
before the first job arrives, so a job only writes START (and, the first time a
plan is seen, the plan). The slot is reused the instant all participating sites
report DONE, because every message carries its job id (invariant 1).
"""

from __future__ import annotations

import enum
import errno
import os
import pickle
import select
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from . import _messages as m
from ._channel import ChannelClosedError, FrameReader, Outbox, make_pipe
from ._exceptions import SiteStartError
from ._serialization import dumps_function
from ._service_address import ServiceMap
from ._services import bind_setup

if TYPE_CHECKING:
    from ._config import FederationConfig
    from ._handle import Job
    from .backends import Backend, WorkerHandle

__all__ = [
    "TRANSITIONS",
    "JobExecution",
    "SlotState",
    "SlotTransitionError",
    "describe_fd_need",
    "fds_per_slot",
]


class SlotState(str, enum.Enum):
    """Where a slot is in its life; see :data:`TRANSITIONS` for the moves between states."""

    STARTING = "starting"  # workers booting; deadline: start_timeout
    IDLE = "idle"  # in the free list, and only then
    BUSY = "busy"  # running a job
    DRAINING = "draining"  # its job ended early; sites were told to stop; deadline: cancel grace
    BROKEN = "broken"  # a worker died or was killed; the rest are being killed
    STOPPING = "stopping"  # told to stop after its work; deadline: shutdown_timeout, then killed
    STOPPED = "stopped"  # every worker gone, every pipe closed


_S = SlotState

#: Every move a slot may make. The router changes a slot's state only through
#: ``Router._move``, which checks this table and keeps the free list equal to
#: the set of IDLE slots, so "taken from the free list" and "a worker of it
#: died" are two moves out of IDLE under one lock: whichever comes second sees
#: the state the first one left, and a broken slot is never dispatched.
TRANSITIONS: dict[SlotState, frozenset[SlotState]] = {
    _S.STARTING: frozenset({_S.IDLE, _S.BROKEN, _S.STOPPING}),  # ready / died or failed / close
    _S.IDLE: frozenset({_S.BUSY, _S.BROKEN, _S.STOPPING}),  # dispatch / died / recycle or close
    _S.BUSY: frozenset({_S.IDLE, _S.DRAINING, _S.BROKEN, _S.STOPPING}),  # all DONE / ended early / died
    _S.DRAINING: frozenset({_S.IDLE, _S.BROKEN, _S.STOPPING}),  # all DONE / died or grace over / close
    _S.BROKEN: frozenset({_S.STOPPED}),  # every worker gone: reaped
    _S.STOPPING: frozenset({_S.BROKEN, _S.STOPPED}),  # did not stop in time: killed / reaped
    _S.STOPPED: frozenset(),
}


class SlotTransitionError(RuntimeError):
    """A move the slot table does not allow: a bug in the router, never the user's doing."""


class JobExecution:
    """One slot of the pool: a worker per site and their pipes."""

    def __init__(
        self,
        index: int,
        generation: int,
        config: FederationConfig,
        backend: Backend,
        lifeline_fd: int,
        log_level: str,
        on_pending: Callable[[Outbox], None] | None = None,
        fail_start: dict[str, str] | None = None,
        services: Mapping[str, ServiceMap] | None = None,
    ) -> None:
        self.index = index
        self.generation = generation
        self.state = SlotState.STARTING
        self.started_at = time.monotonic()
        self.sites = tuple(site.name for site in config.sites)
        self.workers: dict[str, WorkerHandle] = {}
        self.control: dict[str, Outbox] = {}
        self.events: dict[str, FrameReader] = {}
        self.ready: set[str] = set()
        self.booted: set[str] = set()
        # What each worker's plan cache holds, in the order it evicts: the client
        # sends PLAN exactly when this says the worker lacks it (see _messages.PLAN_CACHE).
        self.plans: dict[str, dict[bytes, None]] = {site: {} for site in self.sites}
        self.job: Job | None = None
        self.pending_sites: set[str] = set()
        self.jobs_run = 0
        self.kill_deadline: float | None = None  # meaning by state: see SlotState
        self.start_failed = False  # a worker reported START_FAILED (its setup raised)
        self.last_lines: dict[str, deque[str]] = {site: deque(maxlen=40) for site in self.sites}
        self.partial_output: dict[tuple[str, int], bytes] = {}  # (site, fd): a line not yet ended
        self.memory_killed: str | None = None  # the site the memory watchdog killed
        # A worker of it died or was killed inside a tolerant fan-in: the job went on,
        # and the slot is replaced once it ends (its pipes to that worker are gone).
        self.repair = False
        self.site_kill: dict[str, float] = {}  # late site -> when its own worker is killed
        self.oom_kills: int | None = None  # the cgroup's OOM-kill count when the slot started
        self._on_pending = on_pending
        self._sentinels: select.poll | None = None  # made on first use by dead_sites()
        self._sentinel_sites: dict[int, str] = {}
        self._fail_start = fail_start or {}  # a fault plan's FailStart: site -> why its setup raises
        self._services = services or {}
        self._start(config, backend, lifeline_fd, log_level)

    def _start(self, config: FederationConfig, backend: Backend, lifeline_fd: int, log_level: str) -> None:
        sites = self.sites
        child_fds: list[int] = []

        def pipe() -> tuple[int, int]:
            # Every fd is recorded the moment it exists: a start that fails part-way
            # (out of fds) closes all it made, not only the pipes completed before.
            read_fd, write_fd = make_pipe()
            child_fds.extend((read_fd, write_fd))
            return read_fd, write_fd

        # The inbox write ends are the client's to close once every worker has its copy:
        # a process got its own through pass_fds; a thread gets a dup it closes itself.
        shared_ends: list[int] = []
        try:
            control = {site: pipe() for site in sites}
            events = {site: pipe() for site in sites}
            inboxes = {site: pipe() for site in sites}
            for site in sites:
                self.control[site] = Outbox(control[site][1], self._on_pending)
                self.events[site] = FrameReader(events[site][0])
                child_fds.remove(control[site][1])
                child_fds.remove(events[site][0])
                child_fds.remove(inboxes[site][1])
                shared_ends.append(inboxes[site][1])
            for index, site_config in enumerate(config.sites):
                site = site_config.name
                name = f"{site}/slot-{self.index}"
                services = self._services.get(site) or ServiceMap(site, {})
                spec = m.WorkerSpec(
                    site=site,
                    name=name,
                    setup=bind_setup(site_config.setup, services),
                    env=dict(site_config.env),
                    data_dir=str(site_config.data_dir) if site_config.data_dir else None,
                    sys_path=tuple(p for p in __import__("sys").path if p),
                    log_level=log_level,
                    max_token_bytes=config.max_token_bytes,
                    shm_prefix=self.shm_prefix(site),
                    index=index,
                    fail_start=self._fail_start.get(site),
                    services=services,
                )
                init = (m.INIT, spec.sys_path, dumps_function(spec, what=f"the setup of site {site!r}"))
                self.control[site].send(pickle.dumps(init, protocol=5))
                peers = {other: inboxes[other][1] for other in sites if other != site}
                if not backend.client_closes_child_fds:
                    peers = {other: _dup(fd, child_fds) for other, fd in peers.items()}
                self.workers[site] = backend.start(
                    site=site,
                    name=name,
                    env=dict(site_config.env),
                    control_fd=control[site][0],
                    events_fd=events[site][1],
                    inbox_fd=inboxes[site][0],
                    siblings_out=peers,
                    lifeline_fd=lifeline_fd,
                )
        except BaseException as exc:
            self.kill()
            self.close()
            for fd in child_fds + shared_ends:
                _close(fd)
            if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
                raise SiteStartError(
                    f"out of file descriptors starting slot {self.index}: "
                    f"{describe_fd_need(len(sites), threads=not backend.client_closes_child_fds)}",
                    site="*",
                ) from exc
            raise
        for fd in shared_ends:
            _close(fd)
        if backend.client_closes_child_fds:
            for fd in child_fds:
                _close(fd)

    def shm_prefix(self, site: str) -> str:
        """The prefix of the shared-memory segments the worker of ``site`` creates."""
        return f"fed-{os.getpid()}-{self.generation}-{self.sites.index(site)}-"

    # -- talking to workers ----------------------------------------------------------------

    def send(self, site: str, message: tuple[Any, ...]) -> bool:
        """Queue a message to a worker; False if its pipe is closed (the worker is gone)."""
        return self.send_bytes(site, pickle.dumps(message, protocol=5))

    def send_bytes(self, site: str, data: bytes) -> bool:
        try:
            self.control[site].send(data)
        except ChannelClosedError:
            return False
        return True

    # -- ending ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask every worker to stop after what it is doing (the router moves the slot to STOPPING)."""
        data = pickle.dumps((m.STOP,), protocol=5)
        for site in self.sites:
            self.send_bytes(site, data)

    def kill(self) -> None:
        """Kill every worker of the slot (whole process trees), and cut its pipes."""
        for worker in self.workers.values():
            worker.kill()
        for outbox in self.control.values():
            outbox.close()  # a thread worker sees EOF and ends when it can

    def dead_sites(self) -> list[str]:
        """Sites whose worker has ended, by a zero-timeout poll of their sentinels.

        Called at every dispatch: the poll object is made once per slot, so this
        is one syscall (about 1 us) rather than a new poller each time (about 10 us).
        """
        if self._sentinels is None:
            self._sentinels = select.poll()
            self._sentinel_sites = {}
            for site, worker in self.workers.items():
                if worker.sentinel >= 0:
                    self._sentinel_sites[worker.sentinel] = site
                    self._sentinels.register(worker.sentinel, select.POLLIN | select.POLLHUP | select.POLLERR)
        return [self._sentinel_sites[fd] for fd, _ in self._sentinels.poll(0) if fd in self._sentinel_sites]

    def alive(self) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.alive()]

    def close(self) -> None:
        """Release the client's ends of every pipe and the workers' sentinels."""
        for outbox in self.control.values():
            outbox.close()
        for reader in self.events.values():
            reader.close()
        for worker in self.workers.values():
            if worker.output is not None and worker.output != worker.sentinel:
                _close(worker.output)
                worker.output = None
            if worker.stdout is not None:
                _close(worker.stdout)
                worker.stdout = None
            worker.close()


def fds_per_slot(sites: int, threads: bool = False) -> int:
    """File descriptors the client holds, at its peak, while it starts a slot of ``sites`` sites."""
    # Control, events and inbox pipes, both ends of each while the workers start, and
    # each worker's stdout, stderr and sentinel. Thread workers live in the client: each
    # holds its own copy of the other sites' inboxes, so theirs grow with the square.
    if threads:
        return 2 * 3 * sites + sites * (sites - 1) + sites
    return 2 * 3 * sites + 3 * sites


def describe_fd_need(sites: int, threads: bool = False) -> str:
    """How many fds a slot of ``sites`` sites needs beside the limit and the fds open now."""
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:  # pragma: no cover - no /proc
        open_now = -1
    return (
        f"a slot of {sites} sites needs {fds_per_slot(sites, threads):,} while it starts; "
        f"the limit is {soft:,} (RLIMIT_NOFILE, `ulimit -n`) and {open_now:,} are open"
    )


def _dup(fd: int, owned: list[int]) -> int:
    copy = os.dup(fd)
    owned.append(copy)
    return copy


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
