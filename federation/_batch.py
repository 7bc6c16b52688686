"""Batch runs: one job per input mapping, results in input order or as they complete.

Every job of a batch is submitted before the first result is returned, so the
whole pool works on the batch at once (like :meth:`concurrent.futures.Executor.map`).
Completions reach the caller's thread through a queue fed by each job's done
callback, so waiting never polls, and a progress bar advances as jobs end, not
as the caller reaches them.

A batch stops early, and cancels the jobs it has not returned, when:

* a job fails and ``return_exceptions`` is False (the failure is raised at once,
  even if earlier inputs are still running: the batch is over, there is no
  point waiting for them);
* the batch's ``timeout`` runs out (:class:`TimeoutError`);
* the caller stops iterating (the iterator is closed or garbage collected).
"""

from __future__ import annotations

import importlib.util
import os
import queue
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from ._field_checks import check_seconds

if TYPE_CHECKING:
    from ._handle import Job
    from ._pipeline import Pipeline

__all__ = ["Submitter", "run_batch", "show_progress"]

_VIZ_HINT = "pip install rich (or, in a checkout of federation, pip install '.[viz]')"


class Submitter(Protocol):
    """What a batch needs of a federation: submitting one job (a :class:`~federation.Federation` is one).

    A protocol, so that this module need not import the federation that calls it.
    """

    def submit(
        self,
        pipeline: Pipeline,
        /,
        *,
        inputs: Mapping[str, Any] | None = ...,
        timeout: float | None = ...,
        retries: int = ...,
    ) -> Job: ...


class _Bar(Protocol):
    def advance(self, failed: bool) -> None: ...
    def close(self) -> None: ...


class _NoBar:
    def advance(self, failed: bool) -> None:
        pass

    def close(self) -> None:
        pass


class _RichBar:
    """A rich progress bar on stderr: done/total, failures, elapsed and remaining time."""

    def __init__(self, total: int, description: str) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._failed = 0
        self._task = self._progress.add_task(description, total=total, failed="")
        self._progress.start()

    def advance(self, failed: bool) -> None:
        self._failed += failed
        label = f"[red]{self._failed} failed" if self._failed else ""
        self._progress.update(self._task, advance=1, failed=label)

    def close(self) -> None:
        self._progress.stop()


def show_progress(requested: bool | None) -> bool:
    """Whether to draw a progress bar: as asked, or (``None``) only on an interactive terminal.

    Never in a pipe, never in CI (``CI`` set), never on a dumb terminal.
    """
    if requested is not None:
        return requested
    try:
        interactive = sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        interactive = False
    return interactive and not os.environ.get("CI") and os.environ.get("TERM", "") != "dumb"


def _make_bar(enabled: bool, total: int, description: str) -> _Bar:
    if not enabled or total == 0:
        return _NoBar()
    try:
        return _RichBar(total, description)
    except ImportError:
        return _NoBar()  # shown by default only (an explicit request checked for rich already)


def run_batch(
    federation: Submitter,
    pipeline: Pipeline,
    inputs: Iterable[Mapping[str, Any]],
    *,
    ordered: bool,
    return_exceptions: bool,
    timeout: float | None,
    progress: bool | None,
    retries: int,
    job_timeout: float | None,
) -> Iterator[Any]:
    """Submit one job per mapping in ``inputs`` now; return an iterator over their results.

    See :meth:`Federation.map <federation.Federation.map>` for the semantics.
    """
    timeout = check_seconds("timeout", timeout, zero=False)
    check_seconds("job_timeout", job_timeout, zero=False)
    if progress is True and importlib.util.find_spec("rich") is None:
        raise ImportError(f"a progress bar needs rich, which is not installed: {_VIZ_HINT}")
    deadline = None if timeout is None else time.monotonic() + timeout
    if isinstance(inputs, (str, bytes, Mapping)) or not isinstance(inputs, Iterable):
        single = " (one job's inputs: submit() runs one job)" if isinstance(inputs, Mapping) else ""
        raise TypeError(
            "map() takes an iterable of mappings, one job's inputs each, "
            f"not a {type(inputs).__name__}{single}"
        )
    batch = []  # all checked here, not midway, on a bad item
    for index, mapping in enumerate(inputs):
        if not isinstance(mapping, Mapping):
            raise TypeError(
                f"input {index} of the batch is a {type(mapping).__name__}, "
                "not a mapping of input names to values"
            )
        batch.append(dict(mapping))
    for index, mapping in enumerate(batch):
        for name in mapping:
            if not isinstance(name, str):
                raise TypeError(f"input {index} of the batch has a non-string key {name!r}")
    jobs: list[Job] = []
    done: queue.SimpleQueue[int] = queue.SimpleQueue()
    try:
        for index, mapping in enumerate(batch):
            job = federation.submit(pipeline, inputs=mapping, retries=retries, timeout=job_timeout)
            jobs.append(job)
            job.add_done_callback(_notifier(done, index))
    except BaseException:
        for job in jobs:
            job.cancel("another job of its batch could not be submitted")
        raise
    return _results(
        jobs,
        done,
        show_progress(progress),
        pipeline.name,
        ordered=ordered,
        return_exceptions=return_exceptions,
        deadline=deadline,
        timeout=timeout,
    )


def _notifier(done: queue.SimpleQueue[int], index: int) -> Callable[[Job], None]:
    def notify(_job: Job) -> None:
        done.put(index)

    return notify


def _results(
    jobs: list[Job],
    done: queue.SimpleQueue[int],
    progress: bool,
    description: str,
    *,
    ordered: bool,
    return_exceptions: bool,
    deadline: float | None,
    timeout: float | None,
) -> Iterator[Any]:
    finished: set[int] = set()
    next_index = 0  # in order: the next input whose result is due
    returned = 0
    reason = "the batch was abandoned before this job's result was taken"
    # Made here, at the first next(): a bar must not outlive an iterator never started.
    bar = _make_bar(progress, len(jobs), description)
    try:
        while returned < len(jobs):
            if ordered and next_index in finished:
                returned += 1
                next_index += 1
                yield _outcome(jobs[next_index - 1], return_exceptions)
                continue
            remaining = None if deadline is None else deadline - time.monotonic()
            try:
                if remaining is not None and remaining <= 0:
                    raise queue.Empty
                index = done.get(timeout=remaining)
            except queue.Empty:
                reason = f"the batch did not finish within its timeout of {timeout} s"
                raise TimeoutError(
                    f"{len(jobs) - len(finished)} of {len(jobs)} jobs of the batch had not ended "
                    f"within {timeout} s; they are cancelled"
                ) from None
            finished.add(index)
            error = jobs[index].exception(timeout=0)
            bar.advance(failed=error is not None)
            if error is not None and not return_exceptions:
                reason = f"job {jobs[index].id} of the batch failed"
                raise error
            if not ordered:
                returned += 1
                yield _outcome(jobs[index], return_exceptions)
    finally:
        bar.close()
        for job in jobs:
            if not job.done():
                job.cancel(reason)


def _outcome(job: Job, return_exceptions: bool) -> Any:
    error = job.exception(timeout=0)
    if error is not None:
        if return_exceptions:
            return error
        raise error
    return job.result(timeout=0)
