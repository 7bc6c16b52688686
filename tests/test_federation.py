"""The behaviour suite: every capability of a local federation, on every backend."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time

import pytest
from conftest import wait_until, worker_processes
from pipelines import (
    aggregator_pipeline,
    chain_pipeline,
    held_setup,
    mean_pipeline,
    mean_sites,
    reporter_pipeline,
    slow_pipeline,
    stream_input_pipeline,
    stream_pipeline,
    ticker_pipeline,
)

import federation as fed

T = 30  # the longest any single wait in these tests may take


def test_quickstart_federated_mean(make_federation) -> None:
    """Fan-out over two sites with setup state, gathered as {site: value} at the hub."""
    federation = make_federation(mean_sites())
    job = federation.submit(mean_pipeline(), threshold=0.5)
    assert job.result(timeout=T) == pytest.approx((0.6 + 0.9 + 0.7 + 0.8 + 0.95) / 5)
    assert job.status is fed.JobStatus.FINISHED
    assert job.exception(timeout=T) is None


def test_two_site_chain_and_repeated_submits_reuse_slots(make_federation) -> None:
    """Many jobs through a pool of 2: each gets its own inputs' result."""
    federation = make_federation(["a", "b"])
    pipeline = chain_pipeline()
    jobs = [federation.submit(pipeline, x=i) for i in range(40)]
    assert [job.result(timeout=T) for job in jobs] == [2 * i + 1 for i in range(40)]
    assert len({job.id for job in jobs}) == 40


def test_jobs_one_after_another_run_on_the_slot_freed_last(make_federation) -> None:
    """The slot freed last takes the next job: its workers ran a moment ago (warm), the rest stay idle."""
    federation = make_federation(["a", "b"], pool_size=3)
    pipeline = chain_pipeline()
    jobs = []
    for i in range(12):
        job = federation.submit(pipeline, x=i)
        assert job.result(timeout=T) == 2 * i + 1
        jobs.append(job)
    slots = [job.attempts[0].slot for job in jobs]
    assert slots == [slots[0]] * len(slots), slots


def test_generator_streams_items_per_item_downstream(make_federation) -> None:
    federation = make_federation(["a", "b"])
    job = federation.submit(stream_pipeline(collect=False), n=50)
    assert job.result(timeout=T) == [i * i for i in range(50)]
    records = list(job.results(timeout=T))
    assert [r.seq for r in records] == list(range(50))
    assert {r.site for r in records} == {"b"}
    assert all(isinstance(r, fed.Result) and r.output == "square" for r in records)


def test_generator_stream_can_be_collected(make_federation) -> None:
    federation = make_federation(["a", "b"])
    assert federation.submit(stream_pipeline(collect=True), n=1000).result(timeout=T) == sum(range(1000))
    assert federation.submit(stream_pipeline(collect=True), n=0).result(timeout=T) == 0


def test_results_stream_to_the_client_while_the_job_runs(make_federation) -> None:
    """Iteration yields results before the job ends; callbacks fire per output."""
    federation = make_federation(["a", "b"])
    job = federation.submit(ticker_pipeline(), tag="t")
    seen: list[fed.Result] = []
    got_some = threading.Event()

    def on_result(result: fed.Result) -> None:
        seen.append(result)
        if len(seen) >= 3:
            got_some.set()

    job.on_result(on_result, output="tick")
    first = next(iter(job.results(timeout=T)))
    assert first.value == ("t", 0)
    assert got_some.wait(T)
    assert not job.done()
    assert job.cancel()
    assert [r.value[1] for r in seen[:3]] == [0, 1, 2]
    with pytest.raises(ValueError, match="has no output 'nope'"):
        job.on_result(print, output="nope")


def test_stream_input_fed_by_send_and_closed(make_federation) -> None:
    federation = make_federation(["a", "b", "hub"])
    job = federation.submit(stream_input_pipeline())
    for value in range(10):
        job.send("values", value)
    job.close("values")
    assert job.result(timeout=T) == {"doubled": [2 * v for v in range(10)], "total": 90}
    with pytest.raises(fed.TokenRejectedError, match="has ended"):
        job.send("values", 1)


def test_stream_input_errors_name_the_input(make_federation) -> None:
    federation = make_federation(["a", "b", "hub"])
    job = federation.submit(stream_input_pipeline())
    with pytest.raises(fed.PipelineError, match="'nope' is not an input"):
        job.send("nope", 1)
    with pytest.raises(fed.SerializationError, match="input 'values'"):
        job.send("values", threading.Lock())
    job.close("values")
    with pytest.raises(fed.TokenRejectedError, match="was closed|has ended"):
        job.send("values", 1)  # the job may have finished already: either is a refusal
    assert job.result(timeout=T) == {"doubled": [], "total": 0}
    with pytest.raises(fed.PipelineError, match="is a stream; feed it with job.send"):
        federation.submit(stream_input_pipeline(), values=[1, 2])


def test_send_to_a_queued_job_is_kept_until_it_starts(make_federation) -> None:
    federation = make_federation(["a", "b", "hub"], pool_size=1)
    blocker = federation.submit(slow_pipeline(cooperative=True), seconds=60)
    job = federation.submit(stream_input_pipeline())
    assert job.status is fed.JobStatus.QUEUED
    job.send("values", 5)
    job.close("values")
    with pytest.raises(fed.TokenRejectedError, match="stream input 'values' of job .* was closed"):
        job.send("values", 6)
    blocker.cancel()
    assert job.result(timeout=T) == {"doubled": [10], "total": 10}


def test_inter_job_tokens_feed_a_long_lived_aggregator(make_federation) -> None:
    federation = make_federation(["a", "b", "hub"], pool_size=3)
    aggregator = federation.submit(aggregator_pipeline())
    reporters = [federation.submit(reporter_pipeline(), target=aggregator.id, value=i) for i in range(3)]
    for job in reporters:
        assert job.result(timeout=T) == {"a": True, "b": True}
    aggregator.close("reports")
    assert aggregator.result(timeout=T) == sorted(f"{s}:{i}" for s in "ab" for i in range(3))


def test_inter_job_token_to_an_ended_or_unknown_job_is_rejected(make_federation) -> None:
    federation = make_federation(["a", "b", "hub"])
    ended = federation.submit(aggregator_pipeline())
    ended.close("reports")
    ended.result(timeout=T)
    for target, reason in [(ended.id, f"job {ended.id} has ended"), (10_000, "job 10000 does not exist")]:
        job = federation.submit(reporter_pipeline(), target=target, value=1)
        with pytest.raises(fed.StepFailedError) as info:
            job.result(timeout=T)
        assert isinstance(info.value.__cause__, fed.TokenRejectedError)
        assert reason in str(info.value.__cause__)


def test_job_ids_are_unique_in_the_process(make_federation) -> None:
    """Two federations in one process never share a job id; one's ids are not the other's jobs."""
    first = make_federation(["a", "b", "hub"], pool_size=1)
    second = make_federation(["a", "b", "hub"], pool_size=1)
    aggregator = first.submit(aggregator_pipeline())
    reporter = second.submit(reporter_pipeline(), target=aggregator.id, value=1)
    assert reporter.id != aggregator.id
    with pytest.raises(fed.StepFailedError) as info:
        reporter.result(timeout=T)
    assert isinstance(info.value.__cause__, fed.TokenRejectedError)
    assert f"job {aggregator.id} does not exist" in str(info.value.__cause__)
    aggregator.close("reports")
    assert aggregator.result(timeout=T) == []


def test_result_timeout_of_a_queued_job_says_why_it_waits(make_federation) -> None:
    """A job still queued when result(timeout=) runs out names the jobs holding the slots."""
    federation = make_federation(["a", "b", "hub"], pool_size=1)
    aggregator = federation.submit(aggregator_pipeline())  # holds its slot until "reports" is closed
    job = federation.submit(stream_input_pipeline())
    expected = rf"job {job.id} is still queued: all 1 slot\(s\) are busy \(job {aggregator.id}\)"
    with pytest.raises(TimeoutError, match=expected) as info:
        job.result(timeout=0.05)
    assert "fed by stream inputs holds its slot" in str(info.value)
    with pytest.raises(TimeoutError, match=expected):
        job.exception(timeout=0.05)
    # A running job that is not done says only that.
    with pytest.raises(TimeoutError, match=f"job {aggregator.id} has not ended within"):
        aggregator.result(timeout=0.05)
    aggregator.close("reports")
    job.close("values")
    assert aggregator.result(timeout=T) == []
    assert job.result(timeout=T) == {"doubled": [], "total": 0}


def test_submit_errors_are_raised_in_the_callers_thread(make_federation) -> None:
    federation = make_federation(mean_sites())
    pipeline = mean_pipeline()
    with pytest.raises(fed.PipelineError, match=r"needs input\(s\) \['threshold'\]"):
        federation.submit(pipeline)
    with pytest.raises(fed.PipelineError, match="has no input 'limit'"):
        federation.submit(pipeline, threshold=0.5, limit=3)
    with pytest.raises(fed.SerializationError, match="input 'threshold'"):
        federation.submit(pipeline, threshold=threading.Lock())
    other = fed.Pipeline("elsewhere")
    other.step(site="mars", name="land")(lambda: 1)
    with pytest.raises(fed.PipelineError, match="unknown site 'mars'"):
        federation.submit(other)
    # nothing was queued or broken by the bad submits
    assert federation.submit(pipeline, threshold=0.5).result(timeout=T) > 0


def test_lambdas_closures_and_main_style_functions_run(make_federation) -> None:
    federation = make_federation(["a", "b"])
    offset = 7
    pipeline = fed.Pipeline("closures")
    pipeline.step(site="a", name="base")(lambda x: x + offset)
    pipeline.output(pipeline.step(site="b", name="twice")(lambda base: base * 2))
    assert federation.submit(pipeline, x=1).result(timeout=T) == 16


def _thread_bound_setup() -> object:
    import sqlite3

    connection = sqlite3.connect(":memory:")  # refuses any thread but the one that made it
    connection.execute("create table seen (job integer)")
    return connection


def test_steps_run_on_the_thread_their_site_setup_ran_on(make_federation) -> None:
    """What a setup made for its thread (an sqlite connection, thread-local state) works in
    every step of every job, whichever thread or call brought the job's messages."""
    sites = [fed.Site(name, setup=_thread_bound_setup) for name in ("a", "b")]
    federation = make_federation(sites, pool_size=1)
    pipeline = fed.Pipeline("thread-bound")

    @pipeline.step(site="a")
    def record(ctx, x):
        ctx.state.execute("insert into seen values (?)", (x,))
        return x

    @pipeline.step(site="b")
    def count(ctx, record):
        ctx.state.execute("insert into seen values (?)", (record,))
        return ctx.state.execute("select count(*) from seen").fetchone()[0]

    pipeline.output(count)
    assert [federation.submit(pipeline, x=i).result(timeout=T) for i in range(20)] == list(range(1, 21))


def test_step_context_fields(make_federation, backend, tmp_path) -> None:
    sites = [
        fed.Site(
            "a", env={"FED_TEST_SITE_VAR": "alpha"}, data_dir=tmp_path / "a-data", setup=lambda: "state-a"
        ),
        "b",
    ]
    federation = make_federation(sites)
    pipeline = fed.Pipeline("ctx")

    @pipeline.step(sites=["a", "b"])
    def describe(ctx):
        return {
            "site": ctx.site,
            "job_id": ctx.job_id,
            "step": ctx.step,
            "state": ctx.state,
            "env": ctx.env.get("FED_TEST_SITE_VAR"),
            "os_env": os.environ.get("FED_TEST_SITE_VAR"),
            "data_dir": ctx.data_dir,
            "cancelled": ctx.cancelled,
        }

    pipeline.output(describe)
    job = federation.submit(pipeline)
    result = job.result(timeout=T)
    assert result["a"]["site"] == "a" and result["b"]["site"] == "b"
    assert result["a"]["job_id"] == job.id and result["a"]["step"] == "describe"
    assert result["a"]["state"] == "state-a" and result["b"]["state"] is None
    assert result["a"]["env"] == "alpha" and result["b"]["env"] is None
    assert result["a"]["data_dir"] == str(tmp_path / "a-data") and (tmp_path / "a-data").is_dir()
    assert result["a"]["cancelled"] is False
    if backend == "process":
        # env is set only in that site's workers
        assert result["a"]["os_env"] == "alpha" and result["b"]["os_env"] is None


def test_ctx_log_reaches_the_client_tagged(make_federation) -> None:
    federation = make_federation(["a", "b"])
    pipeline = fed.Pipeline("logs")

    @pipeline.step(site="a")
    def talk(ctx):
        ctx.log.warning("hello from a step", answer=42)
        return 1

    pipeline.output(talk)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.WARNING)
    logger = logging.getLogger("federation")
    logger.addHandler(handler)
    try:
        job = federation.submit(pipeline)
        job.result(timeout=T)
        assert wait_until(lambda: any("hello from a step" in r.getMessage() for r in records))
    finally:
        logger.removeHandler(handler)
    record = next(r for r in records if "hello from a step" in r.getMessage())
    assert record.name == "federation.site.a"
    message = record.getMessage()
    assert f"job_id={job.id}" in message and "step=talk" in message and "answer=42" in message
    assert "site=a" in message and "pid=" in message


def test_jobs_queue_fifo_when_the_pool_is_busy(make_federation) -> None:
    federation = make_federation(["a", "b"], pool_size=1)
    blocker = federation.submit(slow_pipeline(cooperative=True), seconds=60)
    order: list[int] = []
    jobs = [federation.submit(chain_pipeline(), x=i) for i in range(5)]
    for job in jobs:
        assert job.status is fed.JobStatus.QUEUED
        job.add_done_callback(lambda j: order.append(j.id))
    blocker.cancel()
    assert [job.result(timeout=T) for job in jobs] == [2 * i + 1 for i in range(5)]
    # Done callbacks run on the callback thread, in order, soon after each job ends.
    assert wait_until(lambda: len(order) == 5, timeout=T)
    assert order == [job.id for job in jobs]


def test_bounded_queue_raises_or_blocks(make_federation) -> None:
    federation = make_federation(["a", "b"], pool_size=1, max_queued=2)
    blocker = federation.submit(slow_pipeline(cooperative=True), seconds=60)
    queued = [federation.submit(chain_pipeline(), x=i) for i in range(2)]
    with pytest.raises(fed.QueueFullError, match="max_queued=2"):
        federation.submit(chain_pipeline(), x=9, block=False)
    with pytest.raises(fed.QueueFullError):
        federation.submit(chain_pipeline(), x=9, queue_timeout=0.05)
    blocker.cancel()
    assert [job.result(timeout=T) for job in queued] == [1, 3]


def test_cancelled_jobs_results_never_reach_the_next_job_on_the_slot(make_federation) -> None:
    """A pool of one slot: a streaming job is cancelled mid-stream; the next job sees only its own."""
    federation = make_federation(["a", "b"], pool_size=1, cancel_grace=5.0)
    for round_ in range(3):
        job = federation.submit(ticker_pipeline(), tag=f"old-{round_}")
        next(iter(job.results(timeout=T)))
        job.cancel()
        with pytest.raises(fed.JobCancelledError):
            job.result(timeout=T)
        count = len(list(job.results(timeout=T)) if False else job._results)
        follow = federation.submit(ticker_pipeline(), tag=f"new-{round_}")
        values = []
        for record in follow.results(timeout=T):
            values.append(record.value)
            if len(values) == 20:
                follow.cancel()
                break
        assert all(tag == f"new-{round_}" for tag, _ in values)
        assert [i for _, i in values] == list(range(20))
        assert len(job._results) == count  # nothing arrived for the cancelled job after it ended


def test_cooperative_cancel(make_federation) -> None:
    federation = make_federation(["a", "b"], pool_size=1)
    job = federation.submit(slow_pipeline(cooperative=True), seconds=60)
    assert wait_until(lambda: job.status is fed.JobStatus.RUNNING)
    assert job.cancel("enough")
    assert not job.cancel()
    with pytest.raises(fed.JobCancelledError) as info:
        job.result(timeout=T)
    assert info.value.reason == "enough" and info.value.job_id == job.id
    assert job.status is fed.JobStatus.CANCELLED
    assert federation.submit(chain_pipeline(), x=1).result(timeout=T) == 3


def test_a_waiter_sees_its_job_cancelled_from_another_thread_at_once(make_federation, backend) -> None:
    """The step ignores cancellation, so its site answers only once killed, after the 5 s
    grace: a waiter must see the job end when cancel() ends it, at whatever moment of its
    wait that comes (on Ray a waiter first waits for the site's answer in Ray itself)."""
    if backend == "thread":
        pytest.skip("a thread cannot be killed: a step that ignores cancellation outlives the test")
    federation = make_federation(["a", "b"], pool_size=5, cancel_grace=5.0, shutdown_timeout=1.0)
    for delay in (0.0, 0.002, 0.01, 0.03, 0.1):
        job = federation.submit(slow_pipeline(cooperative=False), seconds=60)
        waiting = threading.Event()
        outcome: list[BaseException] = []

        def wait(job=job, waiting=waiting, outcome=outcome) -> None:
            waiting.set()
            try:
                job.result(timeout=T)
            except BaseException as exc:  # the test looks at it
                outcome.append(exc)

        waiter = threading.Thread(target=wait)
        waiter.start()
        assert waiting.wait(T)
        threading.Event().wait(delay)  # not a wait for anything: when, in the wait, cancel comes
        cancelled = time.monotonic()
        assert job.cancel("enough")
        waiter.join(T)
        assert not waiter.is_alive()
        assert time.monotonic() - cancelled < 3.0, f"the waiter saw a cancel {delay} s into its wait late"
        assert len(outcome) == 1 and isinstance(outcome[0], fed.JobCancelledError), outcome


def test_cancel_a_queued_job(make_federation) -> None:
    federation = make_federation(["a", "b"], pool_size=1)
    blocker = federation.submit(slow_pipeline(cooperative=True), seconds=60)
    queued = federation.submit(chain_pipeline(), x=1)
    assert queued.cancel()
    with pytest.raises(fed.JobCancelledError):
        queued.result(timeout=T)
    blocker.cancel()
    assert federation.submit(chain_pipeline(), x=2).result(timeout=T) == 5


def test_job_timeout_cancels_it(make_federation) -> None:
    federation = make_federation(["a", "b"], pool_size=1)
    job = federation.submit(slow_pipeline(cooperative=True), seconds=60, timeout=0.3)
    with pytest.raises(fed.JobCancelledError, match="timed out after 0.3 s"):
        job.result(timeout=T)
    assert federation.submit(chain_pipeline(), x=1).result(timeout=T) == 3


def test_result_timeout_leaves_the_job_running(make_federation) -> None:
    federation = make_federation(["a", "b"], pool_size=1)
    job = federation.submit(slow_pipeline(cooperative=True), seconds=60)
    with pytest.raises(TimeoutError):
        job.result(timeout=0.05)
    assert job.wait(timeout=0.01) is False
    assert not job.done()
    job.cancel()
    assert job.wait(timeout=T)


def test_future_and_await(make_federation) -> None:
    federation = make_federation(["a", "b"])
    job = federation.submit(chain_pipeline(), x=20)
    assert job.future.result(timeout=T) == 41

    async def main() -> int:
        return await federation.submit(chain_pipeline(), x=5)

    assert asyncio.run(main()) == 11
    failing = federation.submit(slow_pipeline(cooperative=True), seconds=60)
    failing.cancel()
    with pytest.raises(fed.JobCancelledError):
        failing.future.result(timeout=T)


def test_multiple_outputs_give_a_dict(make_federation) -> None:
    federation = make_federation(["a", "b"])
    pipeline = chain_pipeline()
    pipeline.output("double")
    assert federation.submit(pipeline, x=3).result(timeout=T) == {"inc": 7, "double": 6}


def test_close_cancels_pending_jobs_and_refuses_new_ones(make_federation) -> None:
    federation = make_federation(["a", "b"], pool_size=1)
    running = federation.submit(slow_pipeline(cooperative=True), seconds=60)
    queued = federation.submit(chain_pipeline(), x=1)
    federation.close(cancel_pending=True)
    for job in (running, queued):
        with pytest.raises(fed.JobCancelledError, match="federation was closed"):
            job.result(timeout=T)
    with pytest.raises(fed.FederationClosedError):
        federation.submit(chain_pipeline(), x=1)
    federation.close()  # idempotent


def test_close_lets_queued_jobs_finish(make_federation) -> None:
    federation = make_federation(["a", "b"], pool_size=1)
    jobs = [federation.submit(chain_pipeline(), x=i) for i in range(5)]
    federation.close()
    assert [job.result(timeout=0) for job in jobs] == [1, 3, 5, 7, 9]


def test_context_manager_closes(backend) -> None:
    with fed.Federation(["a", "b"], pool_size=1, backend=backend) as federation:
        assert federation.submit(chain_pipeline(), x=2).result(timeout=T) == 5
    assert federation.closed


def test_close_stops_idle_workers_without_waiting_out_the_grace(backend) -> None:
    """Idle workers stop when asked: close() returns long before shutdown_timeout, which is only
    for workers that do not stop (they are killed after it)."""
    federation = fed.Federation(["a", "b"], pool_size=2, backend=backend, shutdown_timeout=120.0)
    try:
        assert federation.submit(chain_pipeline(), x=2).result(timeout=T) == 5
        federation.wait_ready(timeout=T)
    finally:
        started = time.monotonic()
        federation.close()
    assert time.monotonic() - started < 60.0


def _wait_and_record(job: fed.Job, index: int, seen: list[tuple[int, int]], lock: threading.Lock) -> None:
    value = job.result(timeout=T)
    with lock:
        seen.append((index, value))


def test_many_threads_waiting_on_the_same_and_other_jobs_each_see_every_result(make_federation) -> None:
    """Waiters on one job and on different jobs, at once: each job's outcome is handled once and
    every waiter sees it (on Ray a waiter may handle the answer itself, beside the reply thread)."""
    federation = make_federation(["a", "b"], pool_size=2)
    for round_ in range(10):
        jobs = [federation.submit(chain_pipeline(), x=round_ * 10 + i) for i in range(4)]
        seen: list[tuple[int, int]] = []
        lock = threading.Lock()
        threads = [
            threading.Thread(target=_wait_and_record, args=(jobs[i % 4], i % 4, seen, lock)) for i in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(T)
        assert not any(thread.is_alive() for thread in threads)
        assert sorted(seen) == sorted((i % 4, 2 * (round_ * 10 + i % 4) + 1) for i in range(8))
    assert federation.stats().jobs["finished"] == 40


def test_invalid_config_raises_config_error() -> None:
    with pytest.raises(fed.ConfigError, match="pool_size"):
        fed.Federation(["a"], pool_size=0)
    with pytest.raises(fed.ConfigError, match="listed twice"):
        fed.Federation(["a", "a"])
    with pytest.raises(fed.ConfigError, match="backend"):
        fed.Federation(["a"], backend="carrier-pigeon")
    with pytest.raises(fed.ConfigError, match="site name"):
        fed.Site("has space")
    with pytest.raises(fed.ConfigError, match="no_such_option"):
        fed.Federation(["a"], no_such_option=1)


@pytest.mark.parametrize("backend", ["process"])
def test_slots_start_in_waves_and_all_come_up(make_federation) -> None:
    # Slots beyond what the CPUs can start at once wait for the first to be ready,
    # so that a first job runs early; none of them may be forgotten.
    federation = make_federation(["a", "b", "hub"], pool_size=3, wait_ready=False)
    slots = federation.stats().slots
    assert slots.starting + slots.free + slots.busy == 3
    assert federation.submit(chain_pipeline(), x=1).result(timeout=T) == 3
    assert wait_until(lambda: federation.stats().slots.free == 3, timeout=T)
    assert len(worker_processes()) == 9


@pytest.mark.parametrize("backend", ["process"])
def test_a_slow_setup_does_not_hold_back_the_next_wave(make_federation, tmp_path) -> None:
    # Every setup waits for a flag file: the second wave of slots must start while
    # the first wave's setups are still waiting (after its interpreters are up).
    flag = tmp_path / "go"

    def wait_for_flag() -> None:
        import os
        import time

        deadline = time.monotonic() + 30
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.01)  # the workload: a setup waiting on something outside

    sites = [fed.Site(name, setup=wait_for_flag) for name in ("a", "b", "hub")]
    made: list[fed.Federation] = []
    builder = threading.Thread(target=lambda: made.append(make_federation(sites, pool_size=3)))
    builder.start()
    try:
        assert wait_until(lambda: len(worker_processes()) == 9, timeout=T)
        assert not made  # still starting: no setup has finished
    finally:
        flag.touch()
        builder.join(T)
    (federation,) = made
    assert federation.submit(chain_pipeline(), x=1).result(timeout=T) == 3


def test_wait_ready_blocks_until_a_replaced_slot_is_up(make_federation, tmp_path) -> None:
    """A slot that lost a worker is replaced while the other runs jobs; wait_ready returns
    once it is up, and on a timeout names the slot and the site it still waits for."""
    from federation import faults

    hold = tmp_path / "hold"
    sites = [fed.Site("a", setup=functools.partial(held_setup, str(hold))), "b"]
    federation = make_federation(sites, pool_size=2, start_timeout=60)
    federation.wait_ready(timeout=0)  # whole from the start
    hold.write_text("x")  # from now on, a starting worker of site a waits
    crash = fed.FaultPlan(faults=[faults.Crash("a")])
    with pytest.raises(fed.WorkerDiedError):
        federation.submit(chain_pipeline(), x=1, faults=crash).result(timeout=T)
    not_up = r"slot \d \((starting: [ab, ]*a[ab, ]*|replacement not started yet)\)"
    with pytest.raises(TimeoutError, match=not_up):
        federation.wait_ready(timeout=0.3)
    assert federation.submit(chain_pipeline(), x=2).result(timeout=T) == 5  # the other slot serves
    hold.unlink()
    federation.wait_ready(timeout=T)
    slots = federation.stats().slots
    assert (slots.starting, slots.free) == (0, 2)
    with pytest.raises(fed.ConfigError, match="timeout"):
        federation.wait_ready(timeout=-1)
    federation.close()
    with pytest.raises(fed.FederationClosedError):
        federation.wait_ready(timeout=T)
