"""Batch runs: ``federation.map`` in input order, as completed, with failures collected or raised."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

import federation as fed

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def scale_pipeline() -> fed.Pipeline:
    """x at site a, doubled at the hub. ``hold`` (seconds) keeps the step busy, checking for a cancel;
    ``gate`` (a FIFO path) makes it wait for one byte from the test; ``fail`` makes it raise."""
    pipeline = fed.Pipeline("scale")

    @pipeline.step(site="a")
    def load(ctx: Any, x: int, hold: float = 0.0, gate: str | None = None, fail: bool = False) -> int:
        if gate is not None:
            with open(gate, "rb") as fifo:
                fifo.read(1)
        deadline = time.monotonic() + hold
        while time.monotonic() < deadline and not ctx.cancelled:
            time.sleep(0.005)  # the workload: busy for `hold` seconds, stopping early on cancel
        if fail:
            raise ValueError(f"input {x} is bad")
        return x

    @pipeline.step(site="hub")
    def double(load: int) -> int:
        return 2 * load

    pipeline.output(double)
    return pipeline


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[tuple[str, Callable[[], None]]]:
    """A FIFO a step blocks on, and a function that lets it through (also called at teardown)."""
    path = tmp_path / "gate"
    os.mkfifo(path)
    # Opened read-write, the FIFO never blocks this side, and a reader never sees EOF early.
    fd = os.open(path, os.O_RDWR)
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            os.write(fd, b"x")

    yield str(path), release
    release()  # a thread worker cannot be killed: let it finish
    os.close(fd)


def test_map_returns_results_in_input_order(make_federation: Callable[..., fed.Federation]) -> None:
    """Results come in the order of the inputs, though earlier inputs take longer."""
    federation = make_federation(["a", "hub"], pool_size=2)
    inputs = [{"x": x, "hold": 0.1 if x < 2 else 0.0} for x in range(8)]
    results = federation.map(scale_pipeline(), inputs)
    assert list(results) == [2 * x for x in range(8)]
    assert federation.stats().jobs["finished"] == 8


def test_map_as_completed_yields_fast_jobs_first(
    make_federation: Callable[..., fed.Federation], gate: tuple[str, Callable[[], None]]
) -> None:
    """With ordered=False a job held at its gate does not delay the others' results."""
    path, release = gate
    federation = make_federation(["a", "hub"], pool_size=2)
    inputs = [{"x": 0, "gate": path}, {"x": 1}, {"x": 2}, {"x": 3}]
    results = federation.map(scale_pipeline(), inputs, ordered=False, timeout=60)
    first = [next(results) for _ in range(3)]
    assert sorted(first) == [2, 4, 6]
    release()
    assert list(results) == [0]


def test_map_collects_failures_with_return_exceptions(make_federation: Callable[..., fed.Federation]) -> None:
    """With return_exceptions=True a failed job's error takes its place and the batch goes on."""
    federation = make_federation(["a", "hub"], pool_size=2)
    inputs = [{"x": x, "fail": x % 3 == 1} for x in range(6)]
    results = list(federation.map(scale_pipeline(), inputs, return_exceptions=True))
    assert [r for i, r in enumerate(results) if i % 3 != 1] == [0, 4, 6, 10]
    errors = [results[1], results[4]]
    assert all(isinstance(error, fed.StepFailedError) for error in errors)
    assert [str(error.__cause__) for error in errors] == ["input 1 is bad", "input 4 is bad"]


def test_map_raises_the_first_failure_and_cancels_the_rest(
    make_federation: Callable[..., fed.Federation],
) -> None:
    """Without return_exceptions the first failure stops the batch; jobs not yet returned are cancelled."""
    federation = make_federation(["a", "hub"], pool_size=1, cancel_grace=0.5)
    inputs = [{"x": 0, "fail": True}] + [{"x": x, "hold": 30.0} for x in range(1, 5)]
    results = federation.map(scale_pipeline(), inputs)
    with pytest.raises(fed.StepFailedError, match="input 0 is bad"):
        next(results)
    stats = federation.stats()
    assert stats.jobs["failed"] == 1 and stats.jobs["cancelled"] == 4
    assert stats.jobs["queued"] == stats.jobs["running"] == 0


def test_map_timeout_cancels_the_batch(make_federation: Callable[..., fed.Federation]) -> None:
    """A batch that outlives its timeout raises TimeoutError and cancels what is left."""
    federation = make_federation(["a", "hub"], pool_size=1, cancel_grace=0.5)
    results = federation.map(scale_pipeline(), [{"x": 1}, {"x": 2, "hold": 30.0}, {"x": 3}], timeout=2.0)
    assert next(results) == 2
    with pytest.raises(TimeoutError, match="2 of 3 jobs"):
        next(results)
    stats = federation.stats()
    assert stats.jobs["finished"] == 1 and stats.jobs["cancelled"] == 2


def test_abandoning_the_iterator_cancels_the_rest(make_federation: Callable[..., fed.Federation]) -> None:
    """Closing the iterator early cancels the jobs whose results were not taken."""
    federation = make_federation(["a", "hub"], pool_size=1, cancel_grace=0.5)
    results = federation.map(scale_pipeline(), [{"x": 1}] + [{"x": x, "hold": 30.0} for x in range(2, 5)])
    assert next(results) == 2
    results.close()  # type: ignore[attr-defined]
    stats = federation.stats()
    assert stats.jobs["finished"] == 1 and stats.jobs["cancelled"] == 3


def test_a_bad_input_in_the_batch_submits_nothing_that_keeps_running(
    make_federation: Callable[..., fed.Federation],
) -> None:
    """An input the pipeline rejects raises at once, and jobs submitted before it are cancelled."""
    federation = make_federation(["a", "hub"], pool_size=1, cancel_grace=0.5)
    with pytest.raises(fed.PipelineError, match="no input 'y'"):
        federation.map(scale_pipeline(), [{"x": 1, "hold": 30.0}, {"y": 2}])
    stats = federation.stats()
    assert stats.jobs["cancelled"] == 1 and stats.running == 0


def test_empty_batch(make_federation: Callable[..., fed.Federation]) -> None:
    """No inputs, no jobs, no results."""
    federation = make_federation(["a", "hub"], pool_size=1)
    assert list(federation.map(scale_pipeline(), [])) == []
    assert federation.stats().submitted == 0


def test_no_progress_bar_in_a_pipe(
    make_federation: Callable[..., fed.Federation], capfd: pytest.CaptureFixture[str]
) -> None:
    """By default a batch draws nothing when stderr is not a terminal."""
    federation = make_federation(["a", "hub"], pool_size=2)
    assert list(federation.map(scale_pipeline(), [{"x": x} for x in range(3)])) == [0, 2, 4]
    assert capfd.readouterr().err == ""


def test_progress_bar_when_asked(
    make_federation: Callable[..., fed.Federation], capfd: pytest.CaptureFixture[str]
) -> None:
    """progress=True draws a bar on stderr that ends at done/total and counts failures."""
    pytest.importorskip("rich")
    federation = make_federation(["a", "hub"], pool_size=2)
    inputs = [{"x": x, "fail": x == 2} for x in range(4)]
    results = list(federation.map(scale_pipeline(), inputs, progress=True, return_exceptions=True))
    assert results[:2] == [0, 2] and isinstance(results[2], fed.StepFailedError)
    err = capfd.readouterr().err
    assert "scale" in err and "4/4" in err and "1 failed" in err
