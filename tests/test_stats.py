"""Federation stats: a typed snapshot of slots, workers, the queue, jobs and links."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import cloudpickle
import pytest

import federation as fed

cloudpickle.register_pickle_by_value(sys.modules[__name__])

SITES = ["a", "b", "hub"]


def relay_pipeline() -> fed.Pipeline:
    """a and b each send one value to the hub, which adds them."""
    pipeline = fed.Pipeline("relay")

    @pipeline.step(sites=["a", "b"])
    def local(x: int) -> int:
        return x

    @pipeline.step(site="hub")
    def total(local: dict[str, int]) -> int:
        return sum(local.values())

    pipeline.output(total)
    return pipeline


def failing_pipeline() -> fed.Pipeline:
    pipeline = fed.Pipeline("fails")

    @pipeline.step(site="a")
    def explode(x: int) -> int:
        raise RuntimeError(f"no {x}")

    pipeline.output(explode)
    return pipeline


def held_pipeline() -> fed.Pipeline:
    """Runs until its stream input is closed: it holds its slot as long as the test wants."""
    pipeline = fed.Pipeline("held")
    pipeline.input("items", stream=True)

    @pipeline.step(site="a", collect=["items"])
    def count(items: list[Any]) -> int:
        return len(items)

    pipeline.output(count)
    return pipeline


def test_fresh_federation_stats(make_federation: Callable[..., fed.Federation], backend: str) -> None:
    """Before any job: every slot free, a live worker per site and slot, no jobs, no traffic."""
    federation = make_federation(SITES, pool_size=2)
    stats = federation.stats()
    assert isinstance(stats, fed.FederationStats)
    assert stats.backend == backend and stats.sites == tuple(SITES) and not stats.closed
    assert stats.slots == fed.SlotStats(total=2, free=2, busy=0, starting=0, other=0, replaced=0)
    assert sorted((w.slot, w.site) for w in stats.workers) == sorted(
        (s, site) for s in (0, 1) for site in SITES
    )
    assert all(w.alive and w.jobs_run == 0 and w.state == "idle" for w in stats.workers)
    assert {w.name for w in stats.workers} == {f"{site}/slot-{s}" for s in (0, 1) for site in SITES}
    assert stats.queue_depth == 0 and stats.running == 0 and stats.submitted == 0
    assert set(stats.jobs) >= {"queued", "running", "finished", "failed", "cancelled"}
    assert not any(stats.jobs.values())
    assert stats.links == () and stats.dropped == 0
    if backend == "process":
        assert len({w.pid for w in stats.workers}) == 6
        assert all(
            (w.rss or 0) > 0 and w.cpu_percent is not None and w.cpu_percent >= 0 for w in stats.workers
        )
        assert all(w.cpu_seconds is not None for w in stats.workers)
    else:
        # Thread workers share the client's process: no memory or CPU of their own.
        assert all(w.rss is None and w.cpu_percent is None for w in stats.workers)


def test_stats_count_jobs_and_traffic_per_link(make_federation: Callable[..., fed.Federation]) -> None:
    """Finished and failed jobs are counted, each slot's jobs add up, and each link carries its tokens."""
    # One slot: each job starts only after the previous one's sites all reported, so once the
    # last result is in, every job before it has been counted against the slot.
    federation = make_federation(SITES, pool_size=1)
    with pytest.raises(fed.StepFailedError):
        federation.submit(failing_pipeline(), x=1).result(timeout=30)
    pipeline = relay_pipeline()
    jobs = [federation.submit(pipeline, x=i) for i in range(6)]
    assert [job.result(timeout=30) for job in jobs] == [2 * i for i in range(6)]
    stats = federation.stats()
    assert stats.jobs["finished"] == 6 and stats.jobs["failed"] == 1
    assert stats.jobs["queued"] == stats.jobs["running"] == stats.jobs["cancelled"] == 0
    assert stats.submitted == 7
    per_slot = {w.slot: w.jobs_run for w in stats.workers}
    assert sum(per_slot.values()) == 7
    for source in ("a", "b"):
        link = stats.link(source, "hub")
        assert link.tokens == 6 and link.bytes > 0
    assert stats.link("hub", "a").tokens == 0
    assert {(link.source, link.target) for link in stats.links} == {("a", "hub"), ("b", "hub")}
    assert stats.slots.free == 1 and stats.slots.busy == 0
    # A snapshot is plain data: it serializes, and reads as text.
    assert json.loads(stats.model_dump_json())["jobs"]["finished"] == 6
    assert "a -> hub: 6 token(s)" in str(stats)


def test_stats_show_busy_slots_and_the_queue(make_federation: Callable[..., fed.Federation]) -> None:
    """While a job holds the only slot, the next waits in the queue, and stats say so."""
    federation = make_federation(["a"], pool_size=1)
    held = federation.submit(held_pipeline())  # a free slot takes a job at submit
    waiting = federation.submit(relay_free_pipeline(), x=5)
    stats = federation.stats()
    assert stats.queue_depth == 1 and stats.running == 1
    assert stats.jobs["queued"] == 1 and stats.jobs["running"] == 1
    assert stats.slots.busy == 1 and stats.slots.free == 0
    assert [w.state for w in stats.workers] == ["busy"]
    held.send("items", "x")
    held.close("items")
    assert held.result(timeout=30) == 1
    assert waiting.result(timeout=30) == 5
    stats = federation.stats()
    assert stats.queue_depth == 0 and stats.jobs["finished"] == 2 and stats.slots.free == 1


def relay_free_pipeline() -> fed.Pipeline:
    pipeline = fed.Pipeline("echo")

    @pipeline.step(site="a")
    def echo(x: int) -> int:
        return x

    pipeline.output(echo)
    return pipeline


def test_stats_after_close(make_federation: Callable[..., fed.Federation]) -> None:
    """A closed federation still answers, with no workers left."""
    federation = make_federation(["a"], pool_size=1)
    assert federation.submit(relay_free_pipeline(), x=1).result(timeout=30) == 1
    federation.close()
    stats = federation.stats()
    assert stats.closed and stats.workers == () and stats.jobs["finished"] == 1


def test_link_bytes_count_buffers_sent_out_of_band(make_federation: Callable[..., fed.Federation]) -> None:
    """A large array goes through shared memory, not the pipe; stats and the timeline still count it."""
    pipeline = fed.Pipeline("big-array")

    @pipeline.step(site="a")
    def make(n: int) -> Any:
        import numpy as np

        return np.ones(n, dtype=np.uint8)

    @pipeline.step(site="b")
    def size(make: Any) -> int:
        return int(make.nbytes)

    pipeline.output(size)
    federation = make_federation(["a", "b"], pool_size=1)
    nbytes = 4 << 20  # well over the out-of-band threshold
    job = federation.submit(pipeline, n=nbytes)
    assert job.result(timeout=30) == nbytes
    link = federation.stats().link("a", "b")
    assert link.tokens == 1 and link.bytes >= nbytes
    sends = [e for e in job.timeline() if e.kind == "send" and e.site == "a" and e.target == "b"]
    assert sends and sum(e.nbytes or 0 for e in sends) >= nbytes
