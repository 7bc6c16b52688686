"""The slot state machine: the table's moves are the only ones, and real scenarios reach them.

Each scenario below drives a real federation through part of a slot's life;
every move is recorded in the client (the one place slots change state is
``SlotPool._move``), and together they must cover the table.
"""

from __future__ import annotations

import os
import time
import types
from collections import deque
from pathlib import Path

import psutil
import pytest
from conftest import wait_until, worker_processes
from pipelines import chain_pipeline, failing_pipeline, slow_pipeline

import federation as fed
from federation._execution import TRANSITIONS, SlotState, SlotTransitionError
from federation._pool import SlotPool

T = 30


def test_every_move_outside_the_table_is_refused_and_the_free_list_follows_idle() -> None:
    for start in SlotState:
        for target in SlotState:
            if target is start:
                continue
            pool = types.SimpleNamespace(free=deque())
            slot = types.SimpleNamespace(state=start, kill_deadline=1.0, index=0)
            if start is SlotState.IDLE:
                pool.free.append(slot)
            if target in TRANSITIONS[start]:
                SlotPool._move(pool, slot, target)  # type: ignore[arg-type]
                assert slot.state is target and slot.kill_deadline is None
                assert (slot in pool.free) == (target is SlotState.IDLE)
            else:
                with pytest.raises(SlotTransitionError):
                    SlotPool._move(pool, slot, target)  # type: ignore[arg-type]
                assert slot.state is start


def _blocking_setup(marker: str) -> None:
    """The first worker to get here starts; the others wait while ``marker`` exists."""
    try:
        os.close(os.open(marker + ".first", os.O_CREAT | os.O_EXCL))
        return
    except FileExistsError:
        pass
    while os.path.exists(marker):
        time.sleep(0.01)


def _stubborn_pipeline(started: str) -> fed.Pipeline:
    """A step that says it started, then ignores every cancel for a minute."""
    pipeline = fed.Pipeline("stubborn")

    @pipeline.step(site="a")
    def stubborn():
        open(started, "w").close()
        time.sleep(60)

    pipeline.output(stubborn)
    return pipeline


@pytest.fixture
def moves(monkeypatch: pytest.MonkeyPatch) -> set[tuple[SlotState, SlotState]]:
    seen: set[tuple[SlotState, SlotState]] = set()
    original = SlotPool._move

    def record(self: SlotPool, slot: object, state: SlotState) -> None:
        before = slot.state  # type: ignore[attr-defined]
        original(self, slot, state)  # type: ignore[arg-type]
        if before is not state:
            seen.add((before, state))

    monkeypatch.setattr(SlotPool, "_move", record)
    return seen


def test_real_scenarios_reach_every_move_of_the_table(moves, tmp_path: Path) -> None:
    S = SlotState  # noqa: N806 - the table's states, short
    options = {"pool_size": 1, "shutdown_timeout": 2.0}
    # Start, run, cancel cooperatively, die idle, die in a step, recycle, close.
    with fed.Federation(["a", "b"], cancel_grace=5.0, max_jobs_per_worker=3, **options) as federation:
        assert federation.submit(chain_pipeline(), x=1).result(timeout=T) == 3
        job = federation.submit(slow_pipeline(cooperative=True), seconds=60)
        assert wait_until(lambda: job.status is fed.JobStatus.RUNNING, timeout=T)
        job.cancel()
        assert federation.submit(chain_pipeline(), x=2).result(timeout=T) == 5  # 3rd job: recycled
        assert wait_until(lambda: federation.stats().slots.free == 1, timeout=T)
        # A worker of the idle slot: the recycled slot's workers may still be exiting.
        psutil.Process(federation.stats().workers[0].pid).kill()
        assert wait_until(lambda: (S.IDLE, S.BROKEN) in moves, timeout=T)
        assert federation.submit(chain_pipeline(), x=3).result(timeout=T) == 7
        with pytest.raises(fed.WorkerDiedError):
            federation.submit(failing_pipeline("kill"), x=1).result(timeout=T)
        assert federation.submit(chain_pipeline(), x=4).result(timeout=T) == 9
    # A step that ignores the cancel: the grace runs out.
    started = tmp_path / "started"
    with fed.Federation(["a", "b"], cancel_grace=0.2, **options) as federation:
        job = federation.submit(_stubborn_pipeline(str(started)))
        assert wait_until(started.exists, timeout=T)
        job.cancel()
        assert federation.submit(chain_pipeline(), x=1).result(timeout=T) == 3
    # Closing while a job's sites drain, and while a slot starts.
    started.unlink()
    federation = fed.Federation(["a", "b"], cancel_grace=30.0, **options)
    job = federation.submit(_stubborn_pipeline(str(started)))
    assert wait_until(started.exists, timeout=T)
    job.cancel()
    assert wait_until(lambda: (S.BUSY, S.DRAINING) in moves, timeout=T)
    federation.close(timeout=0.0)  # no waiting out the 30 s grace: stop what is left
    # Slot 1's worker of site a waits in its setup while the marker exists.
    marker = tmp_path / "hold"
    marker.write_text("x")
    sites = [fed.Site("a", setup=lambda: _blocking_setup(str(marker))), "b"]
    waiting = {**options, "pool_size": 2, "wait_ready": False, "start_timeout": 60}
    federation = fed.Federation(sites, **waiting)
    federation.close(cancel_pending=True)
    # Killed while starting: a death, then the slot starts again.
    Path(str(marker) + ".first").unlink()
    with fed.Federation(sites, **waiting) as federation:
        assert wait_until(lambda: len(worker_processes("a/slot-1")) == 1, timeout=T)
        worker_processes("a/slot-1")[0].kill()
        assert wait_until(lambda: (S.STARTING, S.BROKEN) in moves, timeout=T)
        marker.unlink()
        assert wait_until(lambda: federation.stats().slots.free == 2, timeout=T)
    table = {(start, target) for start, targets in TRANSITIONS.items() for target in targets}
    assert moves >= table, sorted((a.value, b.value) for a, b in table - moves)
    assert all(target in TRANSITIONS[start] for start, target in moves)
