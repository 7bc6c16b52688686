"""Fixtures shared by every test: backends, federations, the Ray cluster, and the leak check.

The autouse ``no_leaks`` fixture fails a test that leaves behind a child
process, a thread, a shared-memory segment, an open file descriptor or a live
Ray actor; it waits (with a deadline) for things that end asynchronously rather
than sleeping.

Tests on the ``ray`` backend share one local Ray cluster per session (see
:mod:`ray_cluster`): a head with no CPUs and one node per test site, labelled
``federation/site=<site>``. The client process connects to it once, so every
federation on ``backend="ray"`` uses it (``ray_address=None`` takes the
program's own connection).
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable, Iterator

import psutil
import pytest

import federation as fed

BACKENDS = ["process", "thread", "ray"]


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.01) -> bool:
    """Wait for ``predicate`` to hold, up to ``timeout``; return whether it did.

    For state that only the OS can tell us about (a process gone, an fd
    closed), where there is no event to wait on.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if _counts(p)}


def _counts(proc: psutil.Process) -> bool:
    try:
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    # multiprocessing's resource tracker lives as long as this process, by design.
    # The session's Ray cluster's daemons and worker processes come and go as Ray
    # pleases; a federation's leftovers there are live actors, checked apart.
    return (
        "resource_tracker" not in cmdline
        and "forkserver" not in cmdline
        and not (_ray_active() and _is_ray_process(cmdline))
    )


def _is_ray_process(cmdline: str) -> bool:
    return cmdline.startswith("ray::") or "/ray/" in cmdline or "ray_process_reaper" in cmdline


def _ray_active() -> bool:
    import sys

    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _ray_actors() -> set[str]:
    """Live actors of the session's Ray cluster (none when it is not running)."""
    if not _ray_active():
        return set()
    import ray._private.state

    return {
        actor_id
        for actor_id, info in ray._private.state.actors().items()
        if info.get("State") not in ("DEAD",)
    }


def _threads() -> set[str]:
    # Ray's driver starts threads of its own on first use (listeners, callbacks).
    return {
        f"{t.name}#{t.ident}"
        for t in threading.enumerate()
        if t.is_alive() and not (_ray_active() and t.name.startswith(_RAY_THREADS))
    }


_RAY_THREADS = ("ray_", "Thread-", "AsyncIO Thread", "asyncio_", "grpc")


def _shm() -> set[str]:
    # Only this process's federations' segments (their names carry the client's pid): on a
    # shared machine another test run's segments come and go in the same /dev/shm.
    try:
        return {name for name in os.listdir("/dev/shm") if name.startswith((f"fed-{os.getpid()}-", "psm_"))}
    except FileNotFoundError:
        return set()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if it leaves a child process, thread, shm segment, fd or Ray actor behind."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "ray":
        # The session's cluster starts before the snapshot: it is not this test's leak.
        request.getfixturevalue("ray_cluster")
    children, threads, shm = _children(), _threads(), _shm()
    fds = _fds()
    actors = _ray_actors()
    yield
    if request.node.get_closest_marker("allow_leaks"):
        return
    gc.collect()
    ok = wait_until(
        lambda: (
            _children() <= children
            and _threads() <= threads
            and _shm() <= shm
            and _fds() <= fds + _ray_fd_slack()
            and _ray_actors() <= actors
        ),
        timeout=10.0,
    )
    if not ok:
        leaked_children = _children() - children
        for pid in leaked_children:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        problems = []
        if leaked_children:
            problems.append(f"child processes {sorted(leaked_children)}")
        if _threads() - threads:
            problems.append(f"threads {sorted(_threads() - threads)}")
        if _shm() - shm:
            problems.append(f"shared memory {sorted(_shm() - shm)}")
        if _fds() > fds + _ray_fd_slack():
            problems.append(f"{_fds() - fds} file descriptors")
        if _ray_actors() - actors:
            problems.append(f"Ray actors {sorted(_ray_actors() - actors)}")
        pytest.fail("test leaked " + ", ".join(problems))


#: Test modules whose features the Ray backend refuses (with a ConfigError), and why.
RAY_UNSUPPORTED: dict[str, str] = {}


def _ray_fd_slack() -> int:
    # Ray's driver opens connections to nodes (gRPC) as it first talks to them,
    # and keeps them: a few fds more after a test is Ray's cache, not a leak.
    return 16 if _ray_active() else 0


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[object]:
    """The session's local Ray cluster, this process connected to it (see ray_cluster.py)."""
    from ray_cluster import start_test_cluster

    cluster = start_test_cluster()
    try:
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each test using it runs once per backend."""
    if request.param == "ray":
        reason = RAY_UNSUPPORTED.get(request.node.path.name)
        if reason is not None:
            pytest.skip(reason)
        request.getfixturevalue("ray_cluster")
    return str(request.param)


@pytest.fixture
def make_federation(backend: str) -> Iterator[Callable[..., fed.Federation]]:
    """Build federations on the current backend; all are closed after the test."""
    made: list[fed.Federation] = []

    def make(sites: list[object] | None = None, **options: object) -> fed.Federation:
        options.setdefault("pool_size", 2)
        options.setdefault("shutdown_timeout", 5.0)
        federation = fed.Federation(sites or ["a", "b", "hub"], backend=backend, **options)  # type: ignore[arg-type]
        made.append(federation)
        return federation

    yield make
    for federation in made:
        federation.close(cancel_pending=True)


def worker_processes(name: str | None = None) -> list[psutil.Process]:
    """This process's worker processes, optionally only the one named like ``"a/slot-0"``."""
    found = []
    for proc in psutil.Process().children(recursive=False):
        try:
            cmdline = proc.cmdline()
        except psutil.Error:
            continue
        if any("federation._worker" in part for part in cmdline) and (name is None or cmdline[-1] == name):
            found.append(proc)
    return found
