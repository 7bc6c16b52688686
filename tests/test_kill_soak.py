"""Kill soak and kill storm: mixed load while workers are SIGKILLed from outside.

Every job must end exactly once (a result or an error that says what happened),
the federation must never give up on deaths, and after ``close()`` nothing may
be left: no worker process, no shared-memory segment. The short versions run
with the tests; ``nox -s stress`` runs the soak for 90 s (a kill every
0.25-0.75 s) and the storm (a kill every 20-50 ms).
"""

from __future__ import annotations

import collections
import os
import random
import signal
import threading
import time
from typing import Any

import numpy as np
import psutil
import pytest
from conftest import _is_ray_process, worker_processes
from pipelines import mean_pipeline, mean_sites

import federation as fed

STRESS = os.environ.get("FEDERATION_STRESS") == "1"


def _stream_pipeline() -> fed.Pipeline:
    pipeline = fed.Pipeline("stream200")

    @pipeline.step(site="a")
    def items(n):
        yield from range(n)

    @pipeline.step(site="hub", collect=["items"])
    def total(items):
        return sum(items)

    pipeline.output(total)
    return pipeline


def _array_pipeline() -> fed.Pipeline:
    pipeline = fed.Pipeline("array")

    @pipeline.step(site="a")
    def make(n):
        return np.full(n, 1.0)

    @pipeline.step(site="hub")
    def total(make):
        return float(make.sum())

    pipeline.output(total)
    return pipeline


def _raising_pipeline() -> fed.Pipeline:
    pipeline = fed.Pipeline("raises")

    @pipeline.step(site="b")
    def boom(x):
        raise ValueError(f"planned failure {x}")

    pipeline.output(boom)
    return pipeline


# Of the jobs submitted: 74 % fan-outs, 15 % 200-item streams, 10 % 1 MiB arrays, 1 % raising.
_MIX = (("fanout", 0.74), ("stream", 0.89), ("array", 0.99), ("raise", 1.01))


def _child_pids() -> list[int]:
    """This process's children (the workers: the client starts no other child here)."""
    # The session's Ray cluster (if a ray test started it) runs daemons as our children
    # too: killing a raylet would end this very process (Ray's driver exits with it).
    return [child.pid for child in psutil.Process().children() if not _ray_daemon(child)]


def _ray_daemon(child: psutil.Process) -> bool:
    try:
        return _is_ray_process(" ".join(child.cmdline()))
    except psutil.Error:
        return False


def _shm() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("fed-")}


def _soak(duration: float, kill_every: tuple[float, float], rate: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    pipelines = {
        "fanout": mean_pipeline(),
        "stream": _stream_pipeline(),
        "array": _array_pipeline(),
        "raise": _raising_pipeline(),
    }
    expected = {"stream": sum(range(200)), "array": float(1 << 17)}
    shm_before = _shm()
    federation = fed.Federation(mean_sites(), pool_size=4, shutdown_timeout=5.0, max_queued=100_000)
    ends: collections.Counter[int] = collections.Counter()
    ends_lock = threading.Lock()
    jobs: list[tuple[str, fed.Job]] = []
    stop = threading.Event()
    kills = 0

    def ended(job: fed.Job) -> None:
        with ends_lock:
            ends[job.id] += 1

    def killer() -> None:
        nonlocal kills
        while not stop.wait(rng.uniform(*kill_every)):
            victims = _child_pids()  # the workers: the client starts no other child here
            if victims:
                try:
                    os.kill(rng.choice(victims), signal.SIGKILL)
                    kills += 1
                except ProcessLookupError:
                    pass

    thread = threading.Thread(target=killer, name="test-killer")
    thread.start()
    started = time.monotonic()
    try:
        while time.monotonic() - started < duration:
            roll = rng.random()
            kind = next(name for name, upto in _MIX if roll < upto)
            inputs = {"fanout": {"threshold": 0.5}, "stream": {"n": 200}, "array": {"n": 1 << 17}}.get(
                kind, {"x": 1}
            )
            job = federation.submit(pipelines[kind], retries=rng.choice([0, 2]), **inputs)
            job.add_done_callback(ended)
            jobs.append((kind, job))
            time.sleep(1.0 / rate)
    finally:
        stop.set()
        thread.join(30)
    outcomes: collections.Counter[str] = collections.Counter()
    wrong: list[str] = []
    for kind, job in jobs:
        if not job.wait(60):
            outcomes["lost"] += 1
            continue
        error = job.exception(0)
        if error is None:
            outcomes["ok"] += 1
            value = job.result(0)
            if kind in expected and value != expected[kind]:
                wrong.append(f"job {job.id} ({kind}) gave {value!r}")
        else:
            outcomes[type(error).__name__] += 1
            if kind != "raise" and not isinstance(error, fed.WorkerDiedError):
                wrong.append(f"job {job.id} ({kind}): {type(error).__name__}: {error}")
    gave_up = federation.stats().gave_up
    after = federation.submit(pipelines["fanout"], threshold=0.5).result(timeout=60)
    federation.close()
    deadline = time.monotonic() + 10
    while (worker_processes() or _shm() - shm_before) and time.monotonic() < deadline:
        time.sleep(0.05)
    with ends_lock:
        duplicated = sum(1 for count in ends.values() if count > 1)
        callbacks = sum(ends.values())
    return {
        "submitted": len(jobs),
        "kills": kills,
        "outcomes": dict(outcomes),
        "lost": outcomes["lost"],
        "duplicated": duplicated,
        "callbacks": callbacks,
        "wrong": wrong,
        "gave_up": gave_up,
        "after": after,
        "leftover_processes": len(worker_processes()),
        "leftover_shm": len(_shm() - shm_before),
    }


def _check(report: dict[str, Any], capsys: pytest.CaptureFixture[str], name: str) -> None:
    with capsys.disabled():
        print(
            f"\n{name}: submitted {report['submitted']}, kills {report['kills']}, "
            f"outcomes {report['outcomes']}, lost {report['lost']}, duplicated {report['duplicated']}, "
            f"leftover processes {report['leftover_processes']}, leftover /dev/shm {report['leftover_shm']}"
        )
    assert report["lost"] == 0, report
    assert report["duplicated"] == 0, report
    assert report["callbacks"] == report["submitted"] - report["lost"], report
    assert not report["wrong"], report["wrong"][:5]
    assert report["gave_up"] is None, report
    assert report["after"] == pytest.approx(0.79, abs=0.01)
    assert report["leftover_processes"] == 0 and report["leftover_shm"] == 0, report
    assert report["outcomes"].get("ok", 0) > 0 and report["kills"] > 0, report


def test_kill_soak(capsys) -> None:
    duration = 90.0 if STRESS else 4.0
    _check(_soak(duration, (0.25, 0.75) if STRESS else (0.1, 0.3), 150.0, seed=1), capsys, "kill soak")


def test_kill_storm(capsys) -> None:
    duration = 30.0 if STRESS else 3.0
    _check(_soak(duration, (0.02, 0.05), 150.0, seed=2), capsys, "kill storm")
