"""Fixtures shared by every test: backends, federations, and the leak check.

The autouse ``no_leaks`` fixture fails a test that leaves behind a child
process, a thread, a shared-memory segment or an open file descriptor; it waits
(with a deadline) for things that end asynchronously rather than sleeping.
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

BACKENDS = ["process", "thread"]


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
    return "resource_tracker" not in cmdline and "forkserver" not in cmdline


def _threads() -> set[str]:
    return {f"{t.name}#{t.ident}" for t in threading.enumerate() if t.is_alive()}


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
    """Fail the test if it leaves a child process, thread, shm segment or fd behind."""
    children, threads, shm = _children(), _threads(), _shm()
    fds = _fds()
    yield
    if request.node.get_closest_marker("allow_leaks"):
        return
    gc.collect()
    ok = wait_until(
        lambda: _children() <= children and _threads() <= threads and _shm() <= shm and _fds() <= fds,
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
        if _fds() > fds:
            problems.append(f"{_fds() - fds} file descriptors")
        pytest.fail("test leaked " + ", ".join(problems))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each test using it runs once per backend."""
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
