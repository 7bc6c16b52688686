"""Rounds that survive: tolerant fan-ins, quorums, deadlines, sampling, site stores, metrics."""

from __future__ import annotations

import csv
import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from conftest import wait_until
from round_pipelines import (
    increment_pipeline,
    quorum_pipeline,
    sampled_pipeline,
    setup_state,
    store_pipeline,
)

import federation as fed

SITES = ["a", "b", "c", "hub"]


def test_a_tolerant_fan_in_with_every_site_is_a_plain_fan_in(make_federation) -> None:
    federation = make_federation(SITES, pool_size=1)
    job = federation.submit(quorum_pipeline({}))
    assert job.result(timeout=30) == {"got": ["a", "b", "c"], "missing": {}}
    assert job.missing == {}


def test_a_site_that_raises_is_missing_not_fatal(make_federation) -> None:
    federation = make_federation(SITES, pool_size=1)
    job = federation.submit(quorum_pipeline({"b": "raise"}))
    assert job.result(timeout=30) == {"got": ["a", "c"], "missing": {"b": "raised"}}
    assert job.missing["b"].reason == "raised" and "NaN loss at b" in job.missing["b"].detail
    # The slot is reused as is: the site only raised.
    assert federation.submit(quorum_pipeline({})).result(timeout=30)["got"] == ["a", "b", "c"]


def test_below_the_minimum_the_job_fails_with_every_missing_site(make_federation) -> None:
    federation = make_federation(SITES, pool_size=1)
    job = federation.submit(quorum_pipeline({"b": "raise", "c": "raise"}, minimum=2))
    with pytest.raises(fed.QuorumError) as info:
        job.result(timeout=30)
    error = info.value
    assert isinstance(error, fed.JobError) and error.job_id == job.id
    assert error.needed == 2 and sorted(error.missing) == ["b", "c"]
    assert all(m.reason == "raised" for m in error.missing.values())
    assert "b (raised" in str(error) and "c (raised" in str(error)
    assert federation.submit(quorum_pipeline({})).result(timeout=30)["got"] == ["a", "b", "c"]


def test_a_fraction_counts_the_sites_of_the_job(make_federation) -> None:
    federation = make_federation(SITES, pool_size=1)
    # 0.6 of 3 sites is 2: one missing site is fine, two are not.
    assert federation.submit(quorum_pipeline({"a": "raise"}, minimum=0.6)).result(timeout=30)["got"] == [
        "b",
        "c",
    ]
    with pytest.raises(fed.QuorumError):
        federation.submit(quorum_pipeline({"a": "raise", "b": "raise"}, minimum=0.6)).result(timeout=30)


def test_a_straggler_past_the_deadline_is_cancelled_and_the_round_goes_on(make_federation) -> None:
    federation = make_federation(SITES, pool_size=1, cancel_grace=5.0)
    started = time.monotonic()
    job = federation.submit(quorum_pipeline({"c": "stall"}, deadline=0.5))
    assert job.result(timeout=30) == {"got": ["a", "b"], "missing": {"c": "late"}}
    assert job.missing["c"].reason == "late"
    # It stopped cooperatively: the slot is free again well within the grace.
    assert federation.submit(quorum_pipeline({})).result(timeout=30)["got"] == ["a", "b", "c"]
    assert time.monotonic() - started < 5.0


def test_a_straggler_that_ignores_cancellation_loses_only_its_own_worker(tmp_path) -> None:
    with fed.Federation(SITES, backend="process", pool_size=1, cancel_grace=1.0) as federation:
        slot = federation._router.slots[0]
        assert slot is not None
        pids = {site: worker.pid for site, worker in slot.workers.items()}
        job = federation.submit(quorum_pipeline({"c": "deaf"}, deadline=0.5))
        assert job.result(timeout=30) == {"got": ["a", "b"], "missing": {"c": "late"}}
        # The round ended while the other sites' workers lived, and c's alone is killed
        # after the grace (the slot is then replaced, as it lost a worker).
        assert all(psutil.pid_exists(pids[site]) for site in ("a", "b", "hub"))
        assert wait_until(lambda: not _alive(pids["c"]), timeout=10)
        # The slot is repaired (replaced) once the job ended, and serves the next round.
        assert federation.submit(quorum_pipeline({})).result(timeout=30)["got"] == ["a", "b", "c"]


def test_a_site_killed_mid_round_is_missing_and_the_slot_is_repaired(
    make_federation, backend, tmp_path
) -> None:
    if backend == "thread":
        pytest.skip("a thread worker has no process of its own to kill")
    flag = tmp_path / "pid"
    federation = make_federation(SITES, pool_size=1)
    job = federation.submit(quorum_pipeline({"b": f"block:{flag}"}))
    assert wait_until(flag.exists, timeout=20)
    os.kill(int(flag.read_text()), signal.SIGKILL)  # the worker process (on Ray: the site actor's)
    result = job.result(timeout=30)
    assert result == {"got": ["a", "c"], "missing": {"b": "died"}}
    assert job.missing["b"].reason == "died"
    if backend == "process":
        assert "SIGKILL" in job.missing["b"].detail
    assert federation.submit(quorum_pipeline({})).result(timeout=60)["got"] == ["a", "b", "c"]


def test_a_site_that_exits_in_its_step_is_missing(tmp_path) -> None:
    with fed.Federation(SITES, backend="process", pool_size=2) as federation:
        jobs = [federation.submit(quorum_pipeline({"a": "exit"} if i % 2 else {})) for i in range(6)]
        results = [job.result(timeout=60) for job in jobs]
        for i, result in enumerate(results):
            assert result["got"] == (["b", "c"] if i % 2 else ["a", "b", "c"])


def test_a_death_outside_a_tolerant_fan_out_still_fails_the_job(tmp_path) -> None:
    with fed.Federation(SITES, backend="process", pool_size=1) as federation:
        pipeline = fed.Pipeline("plain")

        @pipeline.step(sites=["a", "b"])
        def train(ctx):
            if ctx.site == "a":
                os._exit(3)
            return 1

        @pipeline.step(site="hub")
        def aggregate(train):
            return train

        pipeline.output(aggregate)
        with pytest.raises(fed.WorkerDiedError):
            federation.submit(pipeline).result(timeout=30)


def test_a_quorum_of_a_step_that_is_not_a_fan_out_is_refused() -> None:
    pipeline = fed.Pipeline("bad")

    @pipeline.step(site="a")
    def one():
        return 1

    @pipeline.step(site="hub", bind={"x": fed.quorum(one, min=1)})
    def two(x):
        return x

    with pytest.raises(fed.PipelineError, match="not a fan-out"):
        pipeline.compile(["a", "hub"])
    with pytest.raises(fed.PipelineError, match="fraction"):
        fed.quorum("one", min=1.5)


def test_sampling_changes_per_round_without_reshipping_the_plan(make_federation) -> None:
    clients = ["a", "b", "c"]  # sites the session's Ray cluster has nodes for
    federation = make_federation([*clients, "hub"], pool_size=1)
    pipeline = sampled_pipeline(clients)
    for round_no in range(10):
        chosen = [c for i, c in enumerate(clients) if (i + round_no) % 3]
        lrs = {c: 0.1 * (i + 1) for i, c in enumerate(clients)}
        job = federation.submit(
            pipeline, round_no=round_no, lr=fed.per_site(lrs), participants={"local": chosen}
        )
        assert job.result(timeout=30) == sorted((c, round_no, lrs[c]) for c in chosen)
        assert sorted({r.site for r in job.metrics}) == sorted(chosen)
    # Each worker's plan cache (mirrored by the client) holds the one plan: shipped once.
    slot = next(s for s in federation._router.slots if s is not None)
    assert all(len(slot.plans[site]) == 1 for site in [*clients, "hub"])


def test_participants_are_checked_at_submit(make_federation) -> None:
    federation = make_federation(["a", "b", "hub"], pool_size=1)
    pipeline = sampled_pipeline(["a", "b"])
    with pytest.raises(fed.PipelineError, match="not a fan-out"):
        federation.submit(pipeline, round_no=0, lr=0.1, participants={"average": ["hub"]})
    with pytest.raises(fed.PipelineError, match="not among"):
        federation.submit(pipeline, round_no=0, lr=0.1, participants={"local": ["s9"]})
    with pytest.raises(fed.PipelineError, match="no value for site"):
        federation.submit(pipeline, round_no=0, lr=fed.per_site({"a": 1.0}))


def test_site_state_is_kept_across_rounds_on_a_pool_of_4(make_federation, tmp_path) -> None:
    sites = [fed.Site(name=name, data_dir=str(tmp_path / name), setup=setup_state) for name in ("a", "b")] + [
        "hub"
    ]
    federation = make_federation(sites, pool_size=4)
    pipeline = store_pipeline()
    results = [federation.submit(pipeline).result(timeout=30) for _ in range(10)]
    # The store saw every round, on whichever worker it ran ...
    assert [r["a"]["store"] for r in results] == list(range(1, 11))
    assert [r["b"]["store"] for r in results] == list(range(1, 11))
    # ... while ctx.state is each worker's own.
    assert federation.metrics().by_job("rounds", "max") == {
        job_id: float(i + 1) for i, job_id in enumerate(sorted(federation.metrics().by_job("rounds")))
    }
    assert (tmp_path / "a" / ".federation" / "store.sqlite").exists()


def test_concurrent_updates_from_two_slots_of_one_site(make_federation, tmp_path) -> None:
    sites = [fed.Site(name="a", data_dir=str(tmp_path / "a")), "hub"]
    federation = make_federation(sites, pool_size=2)
    jobs = [federation.submit(increment_pipeline(200)) for _ in range(2)]
    finals = sorted(job.result(timeout=60) for job in jobs)
    # update() is an atomic read-modify-write: no increment is lost.
    assert finals[-1] == 400


def test_the_store_survives_a_worker_death(tmp_path) -> None:
    sites = [fed.Site(name="a", data_dir=str(tmp_path / "a")), "hub"]
    with fed.Federation(sites, backend="process", pool_size=1) as federation:
        assert federation.submit(increment_pipeline(3)).result(timeout=30) == 3
        pipeline = fed.Pipeline("die")

        @pipeline.step(site="a")
        def die(ctx):
            ctx.store["before"] = 1
            os._exit(1)

        with pytest.raises(fed.WorkerDiedError):
            federation.submit(pipeline).result(timeout=30)
        assert federation.submit(increment_pipeline(1)).result(timeout=30) == 4


def test_the_store_needs_a_data_dir(make_federation) -> None:
    federation = make_federation(["a", "hub"], pool_size=1)
    with pytest.raises(fed.StepFailedError, match="no data_dir"):
        federation.submit(increment_pipeline(1)).result(timeout=30)


def test_metrics_are_kept_by_job_site_and_step_and_export(make_federation, tmp_path: Path) -> None:
    sites = [fed.Site(name=name, data_dir=str(tmp_path / name), setup=setup_state) for name in ("a", "b")]
    federation = make_federation([*sites, "hub"], pool_size=1)
    jobs = [federation.submit(store_pipeline()) for _ in range(3)]
    for job in jobs:
        job.result(timeout=30)
        assert sorted((r.site, r.step, r.name) for r in job.metrics) == [
            ("a", "count", "rounds"),
            ("b", "count", "rounds"),
        ]
    metrics = federation.metrics()
    assert len(metrics) == 6 and len(metrics.where(site="a")) == 3
    metrics.to_csv(tmp_path / "m.csv")
    metrics.to_json(tmp_path / "m.json")
    with open(tmp_path / "m.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and rows[0]["name"] == "rounds"
    assert len(json.loads((tmp_path / "m.json").read_text())) == 6


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_seeded_dropouts_and_stragglers_from_a_fault_plan(make_federation, backend) -> None:
    """Rounds driven by a fault plan: each round, a may crash and b may stall, by the seed.

    What the gathering step reports missing is exactly what the plan injected,
    round by round, and the same seed injects the same faults again.
    """
    from federation import faults

    plan = fed.FaultPlan(
        seed=11,
        faults=[faults.Crash("a", probability=0.4), faults.Pause("b", 1.5, probability=0.4)],
    )

    def run_rounds() -> list[tuple[dict[str, str], set[tuple[str, str]]]]:
        federation = make_federation(SITES, pool_size=2, cancel_grace=0.5, faults=plan)
        seen = []
        for _ in range(6):
            # A crashed or late site's slot is replaced in the background; its new
            # workers (on Ray, a new actor process per site) take CPU from the round
            # beside them, which on 2 cores can make a healthy site late.
            federation.wait_ready(timeout=60)
            job = federation.submit(quorum_pipeline({}, minimum=1, deadline=0.4))
            result = job.result(timeout=30)
            injected = {
                (event.site or "", str(event.detail["fault"]))
                for event in job.timeline()
                if event.kind is fed.TimelineKind.FAULT
            }
            seen.append((result["missing"], injected))
        federation.close()
        return seen

    first = run_rounds()
    for missing, injected in first:
        expected = {}
        if ("a", "crash") in injected:
            expected["a"] = "died"
        if ("b", "pause") in injected:
            expected["b"] = "late"
        assert missing == expected, (missing, injected)
    kinds = set().union(*(injected for _, injected in first))
    assert kinds == {("a", "crash"), ("b", "pause")}, first  # this seed injects both kinds...
    assert any(not injected for _, injected in first), first  # ...and leaves some rounds clean
    assert run_rounds() == first  # the same seed: the same faults, round by round
