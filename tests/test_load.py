"""Load: many small jobs at once, and many streaming jobs at once; nothing lost, nothing
duplicated, no deadlock. The long versions run in ``nox -s stress``."""

from __future__ import annotations

import os
import threading

import psutil
import pytest
from conftest import wait_until
from pipelines import chain_pipeline, stream_input_pipeline

STRESS = os.environ.get("FEDERATION_STRESS") == "1"
T = 600 if STRESS else 120


def _many_small_jobs(make_federation, count: int) -> None:
    federation = make_federation(["a", "b"], pool_size=4)
    pipeline = chain_pipeline()
    ends: dict[int, int] = {}
    lock = threading.Lock()

    def ended(job) -> None:
        with lock:
            ends[job.id] = ends.get(job.id, 0) + 1

    rss_before = psutil.Process().memory_info().rss
    jobs = []
    for i in range(count):
        job = federation.submit(pipeline, x=i)
        job.add_done_callback(ended)
        jobs.append(job)
    results = [job.result(timeout=T) for job in jobs]
    assert results == [2 * i + 1 for i in range(count)]
    # Done callbacks run on the callback thread, soon after each job ends.
    assert wait_until(lambda: len(ends) == count, timeout=T)
    assert len({job.id for job in jobs}) == count
    assert all(ends[job.id] == 1 for job in jobs)  # every job ended exactly once
    assert all(len(job._results) == 1 for job in jobs)  # and got exactly one result
    growth = psutil.Process().memory_info().rss - rss_before
    assert growth < 20 * 2**10 * count + 64 * 2**20, f"client grew by {growth / 2**20:.0f} MiB"


def _many_streaming_jobs(make_federation, count: int) -> None:
    federation = make_federation(["a", "b", "hub"], pool_size=4)
    pipeline = stream_input_pipeline()
    jobs = [federation.submit(pipeline) for _ in range(count)]
    errors: list[BaseException] = []

    def feed(chunk) -> None:
        try:
            for n, job in chunk:
                for value in range(n):
                    job.send("values", value)
                job.close("values")
        except BaseException as exc:
            errors.append(exc)

    work = [(i % 20, job) for i, job in enumerate(jobs)]
    threads = [threading.Thread(target=feed, args=(work[k::4],)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(T)
    assert not errors
    for n, job in work:
        assert job.result(timeout=T) == {"doubled": [2 * v for v in range(n)], "total": n * (n - 1)}


def test_many_small_jobs_at_once(make_federation) -> None:
    _many_small_jobs(make_federation, 400)


def test_many_streaming_jobs_at_once(make_federation) -> None:
    _many_streaming_jobs(make_federation, 60)


@pytest.mark.stress
@pytest.mark.parametrize("backend", ["process"])
def test_ten_thousand_small_jobs(make_federation) -> None:
    _many_small_jobs(make_federation, 10_000)


@pytest.mark.stress
@pytest.mark.parametrize("backend", ["process"])
def test_hundreds_of_streaming_jobs(make_federation) -> None:
    _many_streaming_jobs(make_federation, 400)
