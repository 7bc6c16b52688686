"""The callback thread: where user callbacks run, never on the router and never under a lock.

    router thread ── job ends / results arrive ──> Job ── post(task) ──> FIFO ──> callback thread
    user thread   ── on_result / add_done_callback ──────────────────────^         (user code)

One thread per federation runs every user callback (done callbacks,
``on_result``, ``concurrent.futures`` callbacks and through them the asyncio
bridge) in the order they were posted. A job posts its tasks while it holds its
own condition, so for one job the order of tasks is the order of its results
and its end, and a single consumer means a callback is never called
concurrently with itself. A callback may call back into the federation:
``submit`` (blocking included), ``cancel``, ``send`` and ``close``; the router
keeps routing meanwhile because nothing it does waits for this thread.

A callback that raises anything, ``SystemExit`` and ``KeyboardInterrupt``
included, is logged and harms nothing else.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["CallbackThread", "run_safely"]

Task = Callable[[], Any]


class CallbackThread:
    """A FIFO of user callbacks and the one thread that runs them, started on first use."""

    def __init__(self, name: str = "federation-callbacks") -> None:
        self._name = name
        self._tasks: deque[Task] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._running = False  # a task is being run now

    def post(self, task: Task) -> None:
        """Run ``task`` on the callback thread, after every task posted before it."""
        with self._cond:
            if self._stopping and self._thread is None:
                # Closed already: nothing will run it later, so run it now, in this thread.
                run_now = True
            else:
                run_now = False
                self._tasks.append(task)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                    self._thread.start()
                self._cond.notify()
        if run_now:
            run_safely(task)

    def in_callback_thread(self) -> bool:
        """Whether the calling thread is this callback thread."""
        return self._thread is not None and threading.current_thread() is self._thread

    def idle(self) -> bool:
        """Whether no callback is queued or running."""
        with self._cond:
            return not self._tasks and not self._running

    def stop(self, timeout: float | None = None) -> bool:
        """Run what is queued, then end the thread; True once it has ended.

        From the callback thread itself (a callback closing its federation) this
        cannot wait for its own end: the thread ends after the current callback.
        """
        with self._cond:
            self._stopping = True
            thread = self._thread
            self._cond.notify()
        if thread is None:
            return True
        if thread is threading.current_thread():
            return False
        thread.join(timeout)
        if thread.is_alive():
            return False
        with self._cond:
            self._thread = None
            leftover = list(self._tasks)
            self._tasks.clear()
        for task in leftover:  # posted while the thread was ending
            run_safely(task)
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._tasks and not self._stopping:
                    self._cond.wait()
                if not self._tasks:
                    return
                task = self._tasks.popleft()
                self._running = True
            try:
                run_safely(task)
            finally:
                with self._cond:
                    self._running = False


def run_safely(task: Task) -> None:
    """Run a user callback; log whatever it raises, ``BaseException`` included."""
    try:
        task()
    except BaseException:  # noqa: BLE001 - a user's callback must harm nothing else
        from ._log import get_logger

        get_logger("callbacks").exception("a callback raised", callback=repr(task))
