"""The process backend: every worker a process of its own, spawned or forked.

With ``start_method="spawn"`` (the default), workers are started with
fork+exec of ``sys.executable`` (what the ``spawn`` start method does), but
without ``multiprocessing``'s bootstrap: the child imports only
:mod:`federation._worker`, never the user's ``__main__``. A script's top level
is not re-run in every worker, the worker's start is not charged for the
user's imports, and user functions travel by value (cloudpickle) instead.

Each worker runs in its own session and process group, which:

* keeps Ctrl+C (SIGINT to the terminal's foreground group) away from workers,
  so the client shuts them down cleanly instead of each printing a traceback;
* lets one ``killpg`` reach every process a step started, with psutil walking
  the tree for any that left the group.

The sentinel is a pidfd (readable when the process exits), so the router learns
of a death the moment it happens, without polling.

With ``start_method="forkserver"``, one forkserver process per federation
imports :mod:`federation._worker` and the ``preload`` modules once, then forks
each worker (see :mod:`federation.backends._zygote`): a worker starts in a few
milliseconds, with a heavy library already imported. The forkserver, not this
process, is the workers' parent, so it reports their exit codes here.
"""

from __future__ import annotations

import abc
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from .._exceptions import SiteStartError

__all__ = ["ForkServer", "ProcessBackend", "ProcessWorker", "descendants", "kill_process_tree"]

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
# Workers import the very package files this process imported, whatever the current
# directory and PYTHONPATH hold: the directory holding them comes first on sys.path.
# ``python -c`` puts the current directory ('') first; it goes last instead, so a
# decoy ``federation/`` (or ``json.py``) there shadows nothing, while a module the
# client imported from its current directory (a notebook's, a REPL's) is still
# found when a by-reference pickle names it. The client's own sys.path is put in
# front of the rest once the worker reads its INIT (see federation._worker).
_SYS_PATH = (
    f"import sys; cwd = '' in sys.path; root = {_PACKAGE_ROOT!r}; "
    "sys.path[:] = [root, *(p for p in sys.path if p not in ('', root))] + [''] * cwd; "
    "del cwd, root; "
)
_BOOT = _SYS_PATH + "from federation._worker import main; main()"
_ZYGOTE = _SYS_PATH + "from federation.backends._zygote import main; main()"
_MAX_MESSAGE = 1 << 16
_EVERY_SITE = "*"


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
    """Every live descendant of ``pid``.

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


class ProcessWorker(abc.ABC):
    """A worker process: its pid, its pidfd sentinel and its output pipes.

    ``stdout`` is the read end of the worker's stdout, ``output`` of its stderr:
    the router echoes each to the client's own stream of the same name.

    How its exit code is learnt depends on who its parent is: see the subclasses.
    """

    def __init__(self, site: str, name: str, pid: int, output: int, stdout: int | None) -> None:
        self.site = site
        self.name = name
        self.pid: int | None = pid
        self._pid = pid
        self.output: int | None = output
        self.stdout: int | None = stdout
        self._baseline: set[tuple[int, float]] = set()
        try:
            self.sentinel = os.pidfd_open(pid)
            self._sentinel_owned = True
        except (AttributeError, OSError):  # pragma: no cover - pidfd needs Linux >= 5.3
            # Fall back to the output pipe: EOF once the process (and its children) are gone.
            self.sentinel = output
            self._sentinel_owned = False

    @abc.abstractmethod
    def exitcode(self) -> int | None:
        """The exit code once the worker is gone (negative: killed by that signal)."""

    @abc.abstractmethod
    def reap(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` for the worker to end; its exit code, or ``None``."""

    def alive(self) -> bool:
        return self.exitcode() is None

    def kill(self) -> None:
        if self.alive():
            kill_process_tree(self._pid)
        else:
            # The worker is gone, but processes it started may not be.
            try:
                os.killpg(self._pid, signal.SIGKILL)
            except OSError:
                pass

    def suspend(self, stop: bool) -> None:
        sig = signal.SIGSTOP if stop else signal.SIGCONT
        try:
            procs = [psutil.Process(self._pid), *descendants(self._pid)]
        except psutil.Error:
            return
        for proc in procs:
            try:
                proc.send_signal(sig)
            except psutil.Error:
                pass

    def memory(self) -> int | None:
        try:
            return int(psutil.Process(self._pid).memory_info().rss)
        except psutil.Error:
            return None

    def _descendants(self) -> list[psutil.Process]:
        return descendants(self._pid)

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


class SpawnedWorker(ProcessWorker):
    """A worker started with fork+exec: this process is its parent."""

    def __init__(
        self, site: str, name: str, popen: subprocess.Popen[bytes], output: int, stdout: int
    ) -> None:
        super().__init__(site, name, popen.pid, output, stdout)
        self._popen = popen

    def exitcode(self) -> int | None:
        return self._popen.poll()

    def reap(self, timeout: float) -> int | None:
        try:
            return self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


class ForkedWorker(ProcessWorker):
    """A worker forked by the forkserver, which reaps it and reports its exit code."""

    def __init__(self, site: str, name: str, pid: int, output: int, stdout: int, server: ForkServer) -> None:
        super().__init__(site, name, pid, output, stdout)
        self._server = server

    def exitcode(self) -> int | None:
        code = self._server.wait_exit(self._pid, 0.0)
        if code is None and self._sentinel_owned and _readable(self.sentinel):
            # Gone (the pidfd says so): its code is on its way from the forkserver.
            code = self._server.wait_exit(self._pid, 1.0)
        return code

    def reap(self, timeout: float) -> int | None:
        return self._server.wait_exit(self._pid, timeout)

    def alive(self) -> bool:
        if self._server.wait_exit(self._pid, 0.0) is not None:
            return False
        if self._sentinel_owned:
            # Exited, even if its code never comes (a forkserver killed from outside).
            return not _readable(self.sentinel)
        return bool(psutil.pid_exists(self._pid))


def _readable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _worker_env(env: dict[str, str]) -> dict[str, str]:
    child_env = dict(os.environ)
    child_env.update(env)
    path = child_env.get("PYTHONPATH")
    child_env["PYTHONPATH"] = _PACKAGE_ROOT + (os.pathsep + path if path else "")
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    return child_env


class ForkServer:
    """The client's end of the forkserver (see :mod:`federation.backends._zygote`).

    Thread-safe: the pool starts workers from the constructor's thread and
    replaces them from the router thread.
    """

    def __init__(self, preload: tuple[str, ...], timeout: float) -> None:
        self._lock = threading.Lock()
        self._exits: dict[int, int] = {}
        self.gone = False  # it exited (killed from outside?): a new one is needed for new workers
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._popen = subprocess.Popen(
                [sys.executable, "-c", _ZYGOTE, str(theirs.fileno()), json.dumps(list(preload))],
                pass_fds=[theirs.fileno()],
                env=_worker_env({}),
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                close_fds=True,
            )
        finally:
            theirs.close()
        reply = self._receive(timeout, "ready")
        if reply is None or "ready" not in reply:
            self.close()
            if reply is not None:  # its preload raised: the traceback says which and why
                raise SiteStartError(
                    f"the forkserver could not preload {list(preload)}; every site's workers need it",
                    site=_EVERY_SITE,
                    remote_traceback=str(reply.get("error")),
                )
            raise SiteStartError(f"the forkserver did not start within {timeout} s", site=_EVERY_SITE)

    def _receive(self, timeout: float, want: str, pid: int | None = None) -> dict[str, Any] | None:
        """Read messages until one with key ``want`` (for ``pid``, if given); keep exit codes.

        With ``timeout`` 0, reads what has arrived and returns.
        """
        if want == "exit" and pid in self._exits:
            return {"exit": pid, "code": self._exits[pid]}
        if self.gone:
            return None  # no more codes will come (and its socket may be closed)
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        while True:
            if want == "exit" and pid in self._exits:
                return {"exit": pid, "code": self._exits[pid]}
            remaining = max(0.0, deadline - time.monotonic())
            if not poller.poll(int(remaining * 1000)):
                return None
            try:
                data = self._sock.recv(_MAX_MESSAGE)
            except OSError:
                data = b""
            if not data:
                self.gone = True
                return None
            message = json.loads(data)
            if "exit" in message:
                self._exits[int(message["exit"])] = int(message["code"])
                continue
            if want in message or "error" in message:
                return dict(message)

    def fork(self, site: str, request: dict[str, Any], fds: list[int], timeout: float) -> int:
        """Ask for a worker of ``site``; its pid."""
        with self._lock:
            try:
                socket.send_fds(self._sock, [json.dumps(request).encode()], fds)
            except OSError as exc:
                self.gone = True
                raise SiteStartError(f"the forkserver is gone: {exc}", site=site) from exc
            reply = self._receive(timeout, "pid")
        if reply is None or "pid" not in reply:
            detail = reply.get("error", "") if reply else "no answer (it is gone, or hung)"
            raise SiteStartError(f"the forkserver could not start a worker: {detail}", site=site)
        return int(reply["pid"])

    def wait_exit(self, pid: int, timeout: float) -> int | None:
        """Wait up to ``timeout`` for ``pid``'s exit code (0: read only what has arrived)."""
        with self._lock:
            self._receive(timeout, "exit", pid)
            return self._exits.get(pid)

    def close(self) -> None:
        """Stop the forkserver (workers it started run on until they are stopped)."""
        with self._lock:
            self.gone = True
            self._sock.close()
        try:
            self._popen.wait(5.0)
        except subprocess.TimeoutExpired:
            self._popen.kill()
            self._popen.wait(5.0)


class ProcessBackend:
    """Starts every worker as a process of its own: spawned, or forked by a forkserver."""

    name = "process"
    client_closes_child_fds = True

    def __init__(
        self, start_method: str = "spawn", preload: tuple[str, ...] = (), timeout: float = 60.0
    ) -> None:
        self.start_method = start_method
        self._preload = preload
        self._timeout = timeout
        self._server: ForkServer | None = None
        self._server_lock = threading.Lock()

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
    ) -> ProcessWorker:
        args = {
            "control": control_fd,
            "events": events_fd,
            "lifeline": lifeline_fd,
            "inbox": inbox_fd,
            "siblings_out": siblings_out,
        }
        if self.start_method == "forkserver":
            return self._fork(site, name, env, args)
        fds = [control_fd, events_fd, lifeline_fd, inbox_fd, *siblings_out.values()]
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            popen = subprocess.Popen(
                [sys.executable, "-c", _BOOT, json.dumps(args), name],
                pass_fds=fds,
                env=_worker_env(env),
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                close_fds=True,
            )
        except BaseException:
            os.close(out_r)
            os.close(err_r)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        return SpawnedWorker(site, name, popen, err_r, out_r)

    def _fork(self, site: str, name: str, env: dict[str, str], args: dict[str, Any]) -> ProcessWorker:
        with self._server_lock:
            if self._server is not None and self._server.gone:
                # Closed at once, not with the federation: each restart would otherwise
                # keep a socket and a zombie. Its workers' exit codes can no longer come;
                # their pidfds still say when they are gone.
                self._server.close()
                self._server = None
            if self._server is None:
                self._server = ForkServer(self._preload, self._timeout)
            server = self._server
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            # The fds travel by index into the list sent with the request.
            fds = [args["control"], args["events"], args["lifeline"], err_w, out_w]
            index = {fd: i for i, fd in enumerate(fds)}
            for fd in [args["inbox"], *args["siblings_out"].values()]:
                index[fd] = len(fds)
                fds.append(fd)
            request = {
                "name": name,
                "env": {**env, "PYTHONUNBUFFERED": "1"},
                "output": index[err_w],
                "stdout": index[out_w],
                "args": {
                    "control": index[args["control"]],
                    "events": index[args["events"]],
                    "lifeline": index[args["lifeline"]],
                    "inbox": index[args["inbox"]],
                    "siblings_out": {s: index[fd] for s, fd in args["siblings_out"].items()},
                },
            }
            pid = server.fork(site, request, fds, self._timeout)
        except BaseException:
            os.close(out_r)
            os.close(err_r)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        return ForkedWorker(site, name, pid, err_r, out_r, server)

    def close(self) -> None:
        """Stop the forkserver, if one was started."""
        with self._server_lock:
            servers = [self._server] if self._server else []
            self._server = None
        for server in servers:
            server.close()
