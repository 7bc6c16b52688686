"""The process backend: every worker a fresh interpreter, started like ``spawn``.

Workers are started with fork+exec of ``sys.executable`` (what the ``spawn``
start method does), but without ``multiprocessing``'s bootstrap: the child
imports only :mod:`federation._worker`, never the user's ``__main__``. A
script's top level is not re-run in every worker, the worker's start is not
charged for the user's imports, and user functions travel by value
(cloudpickle) instead.

Each worker runs in its own session and process group, which:

* keeps Ctrl+C (SIGINT to the terminal's foreground group) away from workers,
  so the client shuts them down cleanly instead of each printing a traceback;
* lets one ``killpg`` reach every process a step started, with psutil walking
  the tree for any that left the group.

The sentinel is a pidfd (readable when the process exits), so the router learns
of a death the moment it happens, without polling.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

__all__ = ["ProcessBackend", "ProcessWorker", "kill_process_tree"]

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_BOOT = "from federation._worker import main; main()"


def _child_pids(pid: int) -> list[int] | None:
    """``pid``'s children from ``/proc/PID/task/*/children``; None where the kernel has no such file."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return []  # the process is gone
    except OSError:
        return None
    children: list[int] = []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as file:
                children.extend(int(child) for child in file.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue  # that thread just ended
            return None  # no CONFIG_PROC_CHILDREN
        except OSError:
            continue
    return children


def descendants(pid: int) -> list[psutil.Process]:
    """Every live descendant of ``pid`` (children first).

    Walks ``/proc/PID/task/*/children`` where Linux has it: ~50 us for a worker,
    where psutil's ``children(recursive=True)`` reads the stat file of every
    process on the machine (1-13 ms, paid for each worker as it becomes ready).
    """
    found: list[psutil.Process] = []
    todo = [pid]
    while todo:
        children = _child_pids(todo.pop())
        if children is None:
            try:
                return list(psutil.Process(pid).children(recursive=True))
            except psutil.Error:
                return []
        for child in children:
            try:
                found.append(psutil.Process(child))
            except psutil.Error:
                continue
            todo.append(child)
    return found


def kill_process_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to ``pid``, its process group, and every descendant that can be found."""
    try:
        root: psutil.Process | None = psutil.Process(pid)
    except psutil.Error:
        root = None
    found = descendants(pid) if root is not None else []
    try:
        os.killpg(pid, sig)  # workers lead their own group: pgid == pid
    except OSError:
        pass
    for proc in [root, *found]:  # those that left the group
        if proc is None:
            continue
        try:
            proc.send_signal(sig)
        except psutil.Error:
            pass


def _created(proc: psutil.Process) -> float:
    try:
        return float(proc.create_time())
    except psutil.Error:
        return 0.0


class ProcessWorker:
    """A worker process."""

    def __init__(self, site: str, name: str, popen: subprocess.Popen[bytes], output: int) -> None:
        self.site = site
        self.name = name
        self.pid: int | None = popen.pid
        self._popen = popen
        self.output: int | None = output
        self._baseline: set[tuple[int, float]] = set()
        try:
            self.sentinel = os.pidfd_open(popen.pid)
            self._sentinel_owned = True
        except (AttributeError, OSError):  # pragma: no cover - pidfd needs Linux >= 5.3
            # Fall back to the output pipe: EOF once the process (and its children) are gone.
            self.sentinel = output
            self._sentinel_owned = False

    def exitcode(self) -> int | None:
        return self._popen.poll()

    def kill(self) -> None:
        if self._popen.poll() is None:
            kill_process_tree(self._popen.pid)
        else:
            # The worker is gone, but processes it started may not be.
            try:
                os.killpg(self._popen.pid, signal.SIGKILL)
            except OSError:
                pass

    def suspend(self, stop: bool) -> None:
        sig = signal.SIGSTOP if stop else signal.SIGCONT
        try:
            procs = [psutil.Process(self._popen.pid), *descendants(self._popen.pid)]
        except psutil.Error:
            return
        for proc in procs:
            try:
                proc.send_signal(sig)
            except psutil.Error:
                pass

    def reap(self, timeout: float) -> int | None:
        try:
            return self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def memory(self) -> int | None:
        try:
            return int(psutil.Process(self._popen.pid).memory_info().rss)
        except psutil.Error:
            return None

    def _descendants(self) -> list[psutil.Process]:
        return descendants(self._popen.pid)

    def mark_ready(self) -> None:
        # (pid, create time): a pid reused later by another process is not "ours from setup".
        self._baseline = {(p.pid, _created(p)) for p in self._descendants()}

    def kill_strays(self) -> int:
        strays = [p for p in self._descendants() if (p.pid, _created(p)) not in self._baseline]
        for proc in strays:
            try:
                proc.kill()
            except psutil.Error:
                pass
        return len(strays)

    def close(self) -> None:
        if self._sentinel_owned and self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1


class ProcessBackend:
    """Starts every worker as its own spawned process."""

    name = "process"
    client_closes_child_fds = True

    def start(
        self,
        *,
        site: str,
        name: str,
        env: dict[str, str],
        control_fd: int,
        events_fd: int,
        siblings_in: dict[str, int],
        siblings_out: dict[str, int],
        lifeline_fd: int,
    ) -> ProcessWorker:
        args = {
            "control": control_fd,
            "events": events_fd,
            "lifeline": lifeline_fd,
            "siblings_in": siblings_in,
            "siblings_out": siblings_out,
        }
        child_env = dict(os.environ)
        child_env.update(env)
        path = child_env.get("PYTHONPATH")
        child_env["PYTHONPATH"] = _PACKAGE_ROOT + (os.pathsep + path if path else "")
        child_env.setdefault("PYTHONUNBUFFERED", "1")
        fds = [control_fd, events_fd, lifeline_fd, *siblings_in.values(), *siblings_out.values()]
        out_r, out_w = os.pipe()
        try:
            popen = subprocess.Popen(
                [sys.executable, "-c", _BOOT, json.dumps(args), name],
                pass_fds=fds,
                env=child_env,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=out_w,
                close_fds=True,
            )
        except BaseException:
            os.close(out_r)
            raise
        finally:
            os.close(out_w)
        return ProcessWorker(site, name, popen, out_r)
