"""A service's supervisor: runs the service, and takes it down when the client dies.

Run as a script, never imported::

    python -I -S _supervisor.py GRACE LABEL -- PROGRAM ARGS...

It needs nothing but the standard library (it starts in about 15 ms) and is one
small process per service. Why a process of its own: the service must die with the
client even when the client is killed with SIGKILL, and

* PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, not the
  process (a federation built in a short-lived thread would lose its database), and
  reaches only the direct child, never what it started;
* a service's own process group outlives its leader, so a signal to the leader
  alone is not enough either.

The client starts this in a new session (its pid is the process group's id), with
its stdin the read end of a *lifeline* pipe whose write end only the client holds.
The service runs under it, in the same group. Then:

* the client dies, by any means: the kernel closes the lifeline, stdin reads EOF,
  and the supervisor sends SIGTERM to the whole group, waits GRACE seconds for the
  service, and sends SIGKILL to the whole group, itself included;
* the client stops the service: it signals the group; the supervisor ignores
  SIGTERM/SIGINT/SIGHUP itself and waits for the service, to report how it ended;
* the service ends: the supervisor exits with the service's status (killed by a
  signal: by the same signal), so the client sees the service's own exit code.

The supervisor is two processes: the group's leader, the client's child, which
only waits for the other and exits as it did; and the watcher, its child, which
does all of the above. An owner may kill its children alone, without their
groups: a Ray worker SIGKILLs its direct children as it exits, before its
lifelines close. That kills only the leader; the watcher is told by the kernel
(PR_SET_PDEATHSIG) and stops the group as if the client were gone.

A program that cannot be started is reported on stderr (the service's output) with
exit code 127, as a shell does.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_LEADER_GONE = signal.SIGUSR1  # the watcher's signal that the leader died
_PR_SET_PDEATHSIG = 1
# Python ignores SIGPIPE and SIGXFSZ at start-up; an ignored signal stays ignored
# across exec, which would change how the service behaves. subprocess resets
# them the same way (restore_signals=True).
_RESTORE = (*_STOP_SIGNALS, signal.SIGPIPE, signal.SIGXFSZ)


def _ignore(signum: int, frame: object) -> None:
    """The supervisor's own answer to a stop signal: none (the service got it too)."""


def _start(argv: list[str]) -> int:
    pid = os.fork()
    if pid:
        return pid
    try:
        for signum in _RESTORE:
            signal.signal(signum, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)  # the lifeline is the supervisor's alone
        os.close(null)
        os.execvp(argv[0], argv)
    except BaseException as exc:  # noqa: BLE001 - reported as its output, exit 127
        try:
            os.write(2, f"federation: cannot run {argv[0]!r}: {exc}\n".encode("utf-8", "replace"))
        finally:
            os._exit(127)
    raise AssertionError("unreachable")  # pragma: no cover


def _exit_sentinel(pid: int) -> int:
    """A file descriptor readable once ``pid`` has exited (not reaped)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # pragma: no cover - Linux < 5.3
        read_fd, write_fd = os.pipe()

        def wait() -> None:
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            os.close(write_fd)

        threading.Thread(target=wait, daemon=True).start()
        return read_fd


def _client_gone(sentinel: int, grace: float) -> None:
    """Stop the whole group as the client would have: SIGTERM, the grace period, SIGKILL."""
    try:
        os.killpg(0, signal.SIGTERM)
    except OSError:
        pass
    poller = select.poll()
    poller.register(sentinel, select.POLLIN)
    poller.poll(int(grace * 1000))
    os.killpg(0, signal.SIGKILL)  # this process too


def _mirror(status: int) -> None:
    """Exit as the service did."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            signal.signal(signum, signal.SIG_DFL)
        except (OSError, ValueError):  # SIGKILL, SIGSTOP: cannot be caught, always fatal
            pass
        try:
            os.kill(os.getpid(), signum)
        except OSError:
            pass
        os._exit(128 + signum)  # a signal that does not end a process (never from WTERMSIG)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def _tell_if_parent_dies(signum: int) -> bool:
    """Have the kernel send ``signum`` when the parent dies (Linux); whether it will."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)) == 0
    except (ImportError, OSError, AttributeError):  # pragma: no cover - not Linux
        return False


def _watch(grace: float, argv: list[str], leader: int) -> None:
    """The watcher: start the service, then wait for its end, the lifeline's, or the leader's."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)  # a signal (the leader's death among them) wakes the poll
    signal.signal(_LEADER_GONE, _ignore)
    _tell_if_parent_dies(_LEADER_GONE)
    pid = _start(argv)
    sentinel = _exit_sentinel(pid)
    if os.getppid() != leader:  # the leader died before the kernel was asked to tell
        _client_gone(sentinel, grace)
    poller = select.poll()
    poller.register(0, select.POLLIN)
    poller.register(sentinel, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        ready = {fd for fd, _ in poller.poll()}
        if sentinel in ready:
            break
        if wake_r in ready:
            os.read(wake_r, 4096)
            if os.getppid() != leader:
                _client_gone(sentinel, grace)
        if 0 in ready:
            try:
                data = os.read(0, 4096)
            except OSError:
                data = b""
            if not data:
                _client_gone(sentinel, grace)
    _, status = os.waitpid(pid, 0)
    _mirror(status)


def main() -> None:
    """Start the service named on the command line and watch it, the lifeline (stdin) and the leader."""
    grace = float(sys.argv[1])
    argv = sys.argv[4:]
    for signum in _STOP_SIGNALS:
        signal.signal(signum, _ignore)
    leader = os.getpid()
    watcher = os.fork()
    if watcher == 0:
        try:
            _watch(grace, argv, leader)
        finally:
            os._exit(1)  # pragma: no cover - _watch exits as the service did
    # The leader: the client's child, holding the group's id; it ends as the watcher did.
    _, status = os.waitpid(watcher, 0)
    _mirror(status)


if __name__ == "__main__":
    main()
