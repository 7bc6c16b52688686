"""The step runner: steps at one site hand values on through one loop, never by re-entering.

A generator's items are consumed as they are made (memory stays bounded), a
chain of steps at one site is as deep as the user likes (no recursion), and a
step that fails or is aborted mid-stream closes the generators still running.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pipelines import deep_chain_pipeline, lockstep_pipeline, ticker_pipeline

import federation as fed

T = 30


def test_a_chain_of_three_hundred_steps_at_one_site_runs(
    make_federation: Callable[..., fed.Federation],
) -> None:
    # Each step at a site used to run inside the previous one's emit: five Python
    # frames per step, so 200 chained steps hit the recursion limit.
    federation = make_federation(["a", "b"], pool_size=1)
    job = federation.submit(deep_chain_pipeline(300))
    assert job.result(timeout=T) == [300, 301, 302]


def test_a_stream_at_one_site_is_consumed_as_it_is_made(
    make_federation: Callable[..., fed.Federation],
) -> None:
    federation = make_federation(["a"], pool_size=1)
    log = federation.submit(lockstep_pipeline(200)).result(timeout=T)
    expected = [entry for i in range(200) for entry in (("yield", i), ("consume", i))]
    assert [tuple(entry) for entry in log] == expected


def test_a_consumer_that_raises_closes_the_generator_feeding_it(
    make_federation: Callable[..., fed.Federation], tmp_path: Path
) -> None:
    marker = tmp_path / "closed"
    federation = make_federation(["a"], pool_size=1)
    job = federation.submit(lockstep_pipeline(10_000, fail_at=3, marker=str(marker)))
    with pytest.raises(fed.StepFailedError) as info:
        job.result(timeout=T)
    assert info.value.step == "consume" and "item 3 is bad" in str(info.value)
    # The job fails as soon as the step raised; its site's DONE (after the producer was
    # closed) frees the one slot, so the next job's result means the close is complete.
    assert len(federation.submit(lockstep_pipeline(5)).result(timeout=T)) == 10
    # The producer was asked for nothing after the bad item, and its finally ran.
    assert marker.read_text() == "4"


def test_an_aborted_stream_stops_between_items_and_the_slot_serves_on(
    make_federation: Callable[..., fed.Federation],
) -> None:
    federation = make_federation(["a"], pool_size=1)
    job = federation.submit(ticker_pipeline(), tag="t")
    first = next(iter(job.results(timeout=T)))
    assert first.value == ("t", 0)
    assert job.cancel()
    with pytest.raises(fed.JobCancelledError):
        job.result(timeout=T)
    assert len(federation.submit(lockstep_pipeline(3)).result(timeout=T)) == 6
