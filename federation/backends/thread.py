"""The thread backend: every worker a thread of the client process.

For stepping through a pipeline in a debugger: the same worker loop, the same
pipes and the same pickling as the process backend, so a pipeline behaves the
same, but a breakpoint in a step stops in this process.

What a thread cannot do: have its own environment (``ctx.env`` still gives the
site's), be killed (a step that never returns keeps its thread; the slot is
abandoned and replaced), be suspended, or report memory of its own.
"""

from __future__ import annotations

import os
import threading

from .._worker import run_worker

__all__ = ["ThreadBackend", "ThreadWorker"]


class ThreadWorker:
    """A worker thread; its sentinel is a pipe closed when the thread ends."""

    # A thread's prints go to the client's own stdout and stderr: no pipes to read.
    output: int | None = None
    stdout: int | None = None

    def __init__(self, site: str, name: str, fds: list[int], target_args: tuple[object, ...]) -> None:
        self.site = site
        self.name = name
        self.pid: int | None = os.getpid()
        self._fds = fds
        self._exitcode: int | None = None
        self.sentinel, self._sentinel_w = os.pipe()
        self._thread = threading.Thread(target=self._run, args=target_args, name=name, daemon=True)
        self._thread.start()

    def _run(self, *args: object) -> None:
        code = 0
        try:
            run_worker(*args)  # type: ignore[arg-type]
        except BaseException:  # noqa: BLE001 - the thread's end is reported through its sentinel
            code = 1
        finally:
            for fd in self._fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._exitcode = code
            os.close(self._sentinel_w)

    def exitcode(self) -> int | None:
        return None if self._thread.is_alive() else self._exitcode

    def alive(self) -> bool:
        return self._thread.is_alive()

    def kill(self) -> None:
        """A thread cannot be killed; the execution closes its pipes so it ends when it can."""

    def suspend(self, stop: bool) -> None:
        """Threads cannot be suspended; this does nothing."""

    def reap(self, timeout: float) -> int | None:
        self._thread.join(timeout)
        return self.exitcode()

    def memory(self) -> int | None:
        return None

    def mark_ready(self) -> None:
        """Nothing to remember: a thread's processes are the client's."""

    def kill_strays(self) -> int:
        """A thread's processes are the client's: nothing is killed."""
        return 0

    def close(self) -> None:
        if self.sentinel >= 0:
            os.close(self.sentinel)
            self.sentinel = -1


class ThreadBackend:
    """Starts every worker as a thread of this process."""

    name = "thread"
    client_closes_child_fds = False

    def close(self) -> None:
        """Nothing to release: every worker thread ends with its pipes."""

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
    ) -> ThreadWorker:
        fds = [control_fd, events_fd, inbox_fd, *siblings_out.values()]
        return ThreadWorker(site, name, fds, (control_fd, events_fd, inbox_fd, siblings_out))
