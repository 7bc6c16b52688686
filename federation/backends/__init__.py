"""Local backends: the only code that knows how a worker process or thread is started, watched and killed.

(The Ray backend has no pipes: its transport is ``federation._ray_pool`` and
``federation._ray_router``, its site runtime ``federation._ray_site``.)

The seam is narrow. A backend starts a worker on pipes the execution created
and hands back a :class:`WorkerHandle`: a sentinel file descriptor that becomes
readable when the worker is gone, its exit code, and ways to kill, suspend and
measure it. Everything else (protocol, routing, completion) is shared.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .._config import FederationConfig

__all__ = ["Backend", "WorkerHandle", "get_backend"]


class WorkerHandle(Protocol):
    """A started worker, as the router sees it."""

    site: str
    name: str
    pid: int | None
    sentinel: int
    output: int | None  # the worker's stderr, to read (None: it writes to the client's own)
    stdout: int | None  # the worker's stdout, to read (None: as above)

    def exitcode(self) -> int | None:
        """The exit code once the worker is gone (negative: killed by that signal)."""
        ...

    def alive(self) -> bool:
        """Whether the worker is still running."""
        ...

    def kill(self) -> None:
        """Kill the worker and every process it started, without waiting."""
        ...

    def suspend(self, stop: bool) -> None:
        """Stop (``True``) or continue (``False``) the worker's process tree."""
        ...

    def reap(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` for the worker to end; its exit code, or ``None``."""
        ...

    def memory(self) -> int | None:
        """Resident memory of the worker in bytes, if the backend can tell."""
        ...

    def mark_ready(self) -> None:
        """Remember the processes the worker has now, its site's setup included."""
        ...

    def kill_strays(self) -> int:
        """Kill the processes the worker started since :meth:`mark_ready`; how many."""
        ...

    def close(self) -> None:
        """Release the handle's own resources (the sentinel) after the worker ended."""
        ...


class Backend(Protocol):
    """Starts workers."""

    name: str
    #: Whether the client must close the worker's ends of its pipes after starting it
    #: (a process got copies); a thread worker owns and closes them itself.
    client_closes_child_fds: bool

    def start(
        self,
        *,
        site: str,
        name: str,
        env: dict[str, str],
        control_fd: int,
        events_fd: int,
        inbox_fd: int,
        siblings_out: dict[str, int],
        lifeline_fd: int,
    ) -> WorkerHandle:
        """Start one worker of ``site`` reading ``control_fd`` and writing ``events_fd``."""
        ...

    def close(self) -> None:
        """Release what the backend holds beyond its workers (a forkserver); idempotent."""
        ...


def get_backend(config: FederationConfig) -> Backend:
    """The backend ``config`` names: ``"process"`` (spawned or forked) or ``"thread"``."""
    if config.backend == "process":
        from .process import ProcessBackend

        return ProcessBackend(config.start_method, config.preload, config.start_timeout)
    if config.backend == "thread":
        from .thread import ThreadBackend

        return ThreadBackend()
    raise ValueError(
        f"backend {config.backend!r} has no local workers; choose 'process' or 'thread' "
        "(backend='ray' runs on Ray actors: see federation._ray_router)"
    )
