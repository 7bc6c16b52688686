"""Faults done for real: every crash reported precisely, at once, and nothing left behind."""

from __future__ import annotations

import contextlib
import linecache
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pipelines
import psutil
import pytest
from conftest import wait_until, worker_processes
from pipelines import chain_pipeline, failing_pipeline, slow_pipeline

import federation as fed

T = 30
process_only = pytest.mark.parametrize("backend", ["process"])


def _next_job_succeeds(federation: fed.Federation) -> None:
    assert federation.submit(chain_pipeline(), x=4).result(timeout=T) == 9


# -- the crash matrix -------------------------------------------------------------------------


def test_step_raising_gives_step_failed_error_with_remote_traceback(make_federation) -> None:
    federation = make_federation(["a", "b"])
    job = federation.submit(failing_pipeline("raise"), x=7)
    with pytest.raises(fed.StepFailedError) as info:
        job.result(timeout=T)
    error = info.value
    assert (error.job_id, error.site, error.step) == (job.id, "a", "explode")
    assert isinstance(error.__cause__, ValueError) and str(error.__cause__) == "bad value 7"
    remote = error.__cause__.__cause__
    assert isinstance(remote, fed.RemoteTraceback)
    # The user's file, line and source line, whatever cloudpickle does with file names
    # (3.1.3 renames every by-value function's file to "<dynamic-code>").
    source = 'raise ValueError(f"bad value {x}")'
    path = pipelines.__file__
    with open(path, encoding="utf-8") as file:
        line = next(n for n, text in enumerate(file, 1) if text.strip() == source)
    assert f'File "{path}", line {line}, in explode\n    {source}\n' in str(remote)
    assert "<dynamic-code>" not in str(remote)
    assert job.status is fed.JobStatus.FAILED
    _next_job_succeeds(federation)


def test_remote_traceback_shows_source_the_worker_cannot_read(make_federation) -> None:
    """A step from a notebook cell (source only in the client's linecache) still shows its lines."""
    filename = "<notebook-cell-7>"
    source = "def from_cell(x):\n    total = x + 1\n    raise KeyError(f'cell {total}')\n"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    try:
        namespace: dict[str, object] = {"__name__": "notebook_cell_not_importable"}
        exec(compile(source, filename, "exec"), namespace)
        pipeline = fed.Pipeline("cell")
        pipeline.output(pipeline.step(site="a")(namespace["from_cell"]))
        federation = make_federation(["a"])
        with pytest.raises(fed.StepFailedError) as info:
            federation.submit(pipeline, x=1).result(timeout=T)
    finally:
        linecache.cache.pop(filename, None)
    remote = str(info.value.__cause__.__cause__)
    assert f"File \"{filename}\", line 3, in from_cell\n    raise KeyError(f'cell {{total}}')\n" in remote


def test_sys_exit_in_a_step_is_a_step_failure(make_federation) -> None:
    federation = make_federation(["a", "b"])
    with pytest.raises(fed.StepFailedError) as info:
        federation.submit(failing_pipeline("sys_exit"), x=1).result(timeout=T)
    assert isinstance(info.value.__cause__, SystemExit) and info.value.__cause__.code == 4
    _next_job_succeeds(federation)


def test_unpicklable_result_is_a_serialization_failure(make_federation) -> None:
    federation = make_federation(["a", "b"])
    with pytest.raises(fed.StepFailedError) as info:
        federation.submit(failing_pipeline("unpicklable_result"), x=1).result(timeout=T)
    assert isinstance(info.value.__cause__, fed.SerializationError)
    assert "step 'explode' produced" in str(info.value.__cause__)
    _next_job_succeeds(federation)


def test_unpicklable_exception_arrives_as_a_stand_in(make_federation) -> None:
    federation = make_federation(["a", "b"])
    with pytest.raises(fed.StepFailedError) as info:
        federation.submit(failing_pipeline("unpicklable_exception"), x=1).result(timeout=T)
    cause = info.value.__cause__
    assert isinstance(cause, fed.UnpicklableError)
    assert cause.type_name.endswith("UnpicklableError") and "nope" in str(cause)
    assert isinstance(cause.__cause__, fed.RemoteTraceback)
    _next_job_succeeds(federation)


@process_only
@pytest.mark.parametrize(
    ("kind", "exitcode", "signal_name"),
    [("exit", 3, None), ("kill", -9, "SIGKILL"), ("segfault", -11, "SIGSEGV")],
)
def test_worker_death_in_a_step(make_federation, kind, exitcode, signal_name) -> None:
    federation = make_federation(["a", "b"])
    job = federation.submit(failing_pipeline(kind), x=1)
    with pytest.raises(fed.WorkerDiedError) as info:
        job.result(timeout=T)
    error = info.value
    assert (error.job_id, error.site, error.exitcode, error.signal) == (job.id, "a", exitcode, signal_name)
    assert (error.pid is not None and not psutil.pid_exists(error.pid)) or _is_zombie(error.pid)
    expected = f"{signal_name}({exitcode})" if signal_name else f"exit code {exitcode}"
    assert expected in str(error)
    if kind == "segfault":
        assert any("Segmentation fault" in line for line in error.last_log), error.last_log
    _next_job_succeeds(federation)


def _is_zombie(pid: int | None) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


@process_only
def test_worker_death_reports_its_last_lines(make_federation) -> None:
    federation = make_federation(["a", "b"], echo_worker_output=False)
    pipeline = fed.Pipeline("last-words")

    @pipeline.step(site="a")
    def speak():
        print("about to go", flush=True)
        print("really going now", file=sys.stderr, flush=True)
        os._exit(9)

    pipeline.output(speak)
    with pytest.raises(fed.WorkerDiedError) as info:
        federation.submit(pipeline).result(timeout=T)
    assert info.value.last_log[-2:] == ("about to go", "really going now")
    assert "really going now" in str(info.value)


@process_only
def test_sigkill_from_outside_while_idle_waiting_for_a_stream(make_federation) -> None:
    """The error comes from the sentinel, at once, not from a timeout."""
    federation = make_federation(["a", "b", "hub"], pool_size=1)
    from pipelines import stream_input_pipeline

    job = federation.submit(stream_input_pipeline())
    job.send("values", 1)
    assert next(iter(job.results(timeout=T))).value == 2  # b is up and idle, waiting
    (victim,) = worker_processes("b/slot-0")
    victim.send_signal(signal.SIGKILL)
    with pytest.raises(fed.WorkerDiedError) as info:
        job.result(timeout=T)
    assert (info.value.site, info.value.signal, info.value.pid) == ("b", "SIGKILL", victim.pid)
    assert info.value.reason == "killed by a signal"
    assert wait_until(lambda: len(worker_processes()) == 3)  # the slot was replaced
    assert federation.submit(chain_pipeline(), x=1).result(timeout=T) == 3


@process_only
def test_sigkill_while_streaming_tokens(make_federation) -> None:
    federation = make_federation(["a", "b"], pool_size=1)
    from pipelines import stream_pipeline

    job = federation.submit(stream_pipeline(collect=False), n=10_000_000)
    next(iter(job.results(timeout=T)))
    (victim,) = worker_processes("a/slot-0")
    victim.kill()
    with pytest.raises(fed.WorkerDiedError) as info:
        job.result(timeout=T)
    assert info.value.site == "a" and info.value.signal == "SIGKILL"
    _next_job_succeeds(federation)


@process_only
def test_a_crash_leaves_other_jobs_running(make_federation) -> None:
    federation = make_federation(["a", "b"], pool_size=2)
    survivor = federation.submit(slow_pipeline(cooperative=True), seconds=1.0)
    with pytest.raises(fed.WorkerDiedError):
        federation.submit(failing_pipeline("kill"), x=1).result(timeout=T)
    assert survivor.result(timeout=T) == "finished"
    _next_job_succeeds(federation)


@process_only
def test_idle_worker_death_is_replaced_silently(make_federation) -> None:
    federation = make_federation(["a", "b"], pool_size=1)
    (victim,) = worker_processes("a/slot-0")
    victim.kill()
    assert wait_until(
        lambda: victim.pid not in {p.pid for p in worker_processes()} and len(worker_processes()) == 2
    )
    _next_job_succeeds(federation)


# -- start failures ---------------------------------------------------------------------------


def _raise_in_setup() -> None:
    raise RuntimeError("no data here")


def _import_in_setup() -> None:
    import a_module_that_does_not_exist  # noqa: F401


def _exit_in_setup() -> None:
    os._exit(5)


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        (_raise_in_setup, "RuntimeError: no data here"),
        (_import_in_setup, "No module named 'a_module_that_does_not_exist'"),
        (_exit_in_setup, "exit code 5"),
    ],
)
def test_site_start_errors(backend, setup, match) -> None:
    if backend == "thread" and setup is _exit_in_setup:
        pytest.skip("os._exit in a thread ends the whole process")
    with pytest.raises(fed.SiteStartError, match=match) as info:
        fed.Federation([fed.Site("a", setup=setup), "b"], pool_size=2, backend=backend, start_timeout=20)
    assert info.value.site == "a"


@process_only
def test_start_timeout(backend) -> None:
    def hang() -> None:
        import time

        time.sleep(60)

    with pytest.raises(fed.SiteStartError, match="not ready within start_timeout=0.5"):
        fed.Federation([fed.Site("a", setup=hang)], pool_size=1, start_timeout=0.5)


# -- cancel, timeouts and grandchildren -------------------------------------------------------


@process_only
def test_cancel_a_hung_step_kills_its_process_tree_after_the_grace(make_federation, tmp_path) -> None:
    federation = make_federation(["a", "b"], pool_size=1, cancel_grace=0.2)
    pipeline = fed.Pipeline("hung")

    @pipeline.step(site="a")
    def hang(pid_file):
        import os
        import subprocess
        import time

        child = subprocess.Popen(["sleep", "300"])
        # Not a yield: an abort arriving while a value is sent would stop the step
        # cooperatively. Past this line nothing can notice the abort: only a kill ends it.
        with open(pid_file + ".tmp", "w") as file:
            file.write(str(child.pid))
        os.replace(pid_file + ".tmp", pid_file)
        time.sleep(300)

    pipeline.output(hang)
    pid_file = tmp_path / "grandchild"
    job = federation.submit(pipeline, pid_file=str(pid_file))
    assert wait_until(pid_file.exists, timeout=T)
    grandchild = int(pid_file.read_text())
    (worker,) = worker_processes("a/slot-0")
    job.cancel()
    with pytest.raises(fed.JobCancelledError):
        job.result(timeout=T)
    assert wait_until(lambda: not psutil.pid_exists(grandchild) or _is_zombie(grandchild))
    assert wait_until(lambda: not worker.is_running() or _is_zombie(worker.pid))
    _next_job_succeeds(federation)


def test_close_kills_a_cancelled_job_s_worker_within_shutdown_timeout_not_cancel_grace(
    make_federation, backend, tmp_path
) -> None:
    """The step ignores cancellation; its job is cancelled with a long grace, then the
    federation closed: close() stops every worker within shutdown_timeout, a draining one too."""
    if backend == "thread":
        pytest.skip("a thread cannot be killed: a step that ignores cancellation outlives the test")
    federation = make_federation(["a", "b"], pool_size=1, cancel_grace=20.0, shutdown_timeout=1.0)
    pipeline = fed.Pipeline("deaf")

    @pipeline.step(site="a")
    def deaf(marker):
        import os
        import time

        with open(marker + ".tmp", "w") as file:
            file.write("running")
        os.replace(marker + ".tmp", marker)
        time.sleep(300)  # never looks at ctx.cancelled

    pipeline.output(deaf)
    marker = tmp_path / "running"
    job = federation.submit(pipeline, marker=str(marker))
    assert wait_until(marker.exists, timeout=T)
    job.cancel()
    with pytest.raises(fed.JobCancelledError):
        job.result(timeout=T)
    started = time.monotonic()
    federation.close()
    # 1 s of shutdown_timeout and the kill; cancel_grace would be 20 s.
    assert time.monotonic() - started < 8.0


@process_only
def test_a_cooperative_stop_also_ends_what_the_step_started(make_federation) -> None:
    federation = make_federation(["a", "b"], pool_size=1)
    pipeline = fed.Pipeline("spawner")

    @pipeline.step(site="a")
    def spawn(ctx):
        import subprocess
        import time

        child = subprocess.Popen(["sleep", "300"])
        yield child.pid
        while True:
            ctx.check_cancelled()
            time.sleep(0.01)

    pipeline.output(spawn)
    job = federation.submit(pipeline)
    grandchild = next(iter(job.results(timeout=T))).value
    (worker,) = worker_processes("a/slot-0")
    job.cancel()
    assert wait_until(lambda: not psutil.pid_exists(grandchild) or _is_zombie(grandchild))
    assert worker.is_running()  # the step stopped by itself: its worker was not killed
    _next_job_succeeds(federation)


def _start_helper_process() -> dict[str, int]:
    import subprocess

    return {"helper": subprocess.Popen(["sleep", "300"]).pid}


@process_only
def test_processes_a_site_setup_started_outlive_jobs_but_not_the_federation(make_federation) -> None:
    federation = make_federation([fed.Site("a", setup=_start_helper_process), "b"], pool_size=1)
    pipeline = fed.Pipeline("helper")

    @pipeline.step(site="a")
    def helper(ctx):
        import time

        yield ctx.state["helper"]
        while not ctx.cancelled:
            time.sleep(0.01)

    pipeline.output(helper)
    job = federation.submit(pipeline)
    helper_pid = next(iter(job.results(timeout=T))).value
    job.cancel()
    _next_job_succeeds(federation)
    assert psutil.pid_exists(helper_pid) and not _is_zombie(helper_pid)
    federation.close()
    assert wait_until(lambda: not psutil.pid_exists(helper_pid) or _is_zombie(helper_pid))


# -- retries ----------------------------------------------------------------------------------


def _flaky_pipeline(marker: Path) -> fed.Pipeline:
    pipeline = fed.Pipeline("flaky")

    @pipeline.step(site="a")
    def flaky(x):
        if not marker.exists():
            marker.write_text("died once")
            os._exit(1)
        return x * 10

    pipeline.output(flaky)
    return pipeline


@process_only
def test_retries_rerun_a_job_whose_worker_died(make_federation, tmp_path) -> None:
    federation = make_federation(["a", "b"], pool_size=1)
    job = federation.submit(_flaky_pipeline(tmp_path / "marker"), x=4, retries=1)
    assert job.result(timeout=T) == 40
    attempts = job.attempts
    assert len(attempts) == 2
    assert "WorkerDiedError" in (attempts[0].error or "") and attempts[1].error is None


@process_only
def test_without_retries_the_death_is_reported(make_federation, tmp_path) -> None:
    federation = make_federation(["a", "b"], pool_size=1)
    with pytest.raises(fed.WorkerDiedError):
        federation.submit(_flaky_pipeline(tmp_path / "marker"), x=4).result(timeout=T)


def test_step_failures_are_not_retried(make_federation) -> None:
    federation = make_federation(["a", "b"], pool_size=1)
    job = federation.submit(failing_pipeline("raise"), x=1, retries=3)
    with pytest.raises(fed.StepFailedError):
        job.result(timeout=T)
    assert len(job.attempts) == 1


# -- resource limits --------------------------------------------------------------------------


@process_only
def test_memory_limit_kills_the_worker(make_federation) -> None:
    federation = make_federation(["a", "b"], pool_size=1, max_worker_memory=200 * 2**20)
    pipeline = fed.Pipeline("hog")

    @pipeline.step(site="a")
    def hog():
        import time

        block = bytearray(400 * 2**20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(60)
        return len(block)

    pipeline.output(hog)
    with pytest.raises(fed.WorkerDiedError) as info:
        federation.submit(pipeline).result(timeout=T)
    assert info.value.reason == "memory limit" and "memory limit" in str(info.value)
    _next_job_succeeds(federation)


@process_only
def test_max_jobs_per_worker_recycles_workers(make_federation) -> None:
    federation = make_federation(["a", "b"], pool_size=1, max_jobs_per_worker=2)
    pipeline = fed.Pipeline("pid")
    pipeline.output(pipeline.step(site="a", name="pid")(lambda: os.getpid()))
    pids = [federation.submit(pipeline).result(timeout=T) for _ in range(5)]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]


def test_max_token_bytes(make_federation) -> None:
    federation = make_federation(["a", "b"], max_token_bytes=1000)
    with pytest.raises(
        fed.SerializationError, match=r"input 'x' is [\d,]+ bytes pickled, over max_token_bytes=1,000"
    ):
        federation.submit(chain_pipeline(), x="y" * 2000)
    pipeline = fed.Pipeline("big")
    pipeline.output(pipeline.step(site="a", name="big")(lambda: b"z" * 5000))
    with pytest.raises(fed.StepFailedError) as info:
        federation.submit(pipeline).result(timeout=T)
    assert "over max_token_bytes=1,000" in str(info.value.__cause__)
    _next_job_succeeds(federation)


# -- suspend and resume -----------------------------------------------------------------------


@process_only
def test_suspend_and_resume(make_federation) -> None:
    federation = make_federation(["a", "b"], pool_size=1)
    job = federation.submit(slow_pipeline(cooperative=True), seconds=0.5)
    assert wait_until(lambda: job.status is fed.JobStatus.RUNNING)
    job.suspend()
    assert job.status is fed.JobStatus.SUSPENDED
    workers = worker_processes()
    assert wait_until(lambda: all(p.status() == psutil.STATUS_STOPPED for p in workers))
    assert not job.wait(timeout=0.8)  # it would have finished by now if it ran
    job.resume()
    assert job.status is fed.JobStatus.RUNNING
    assert job.result(timeout=T) == "finished"


@process_only
def test_cancel_and_close_work_on_a_suspended_job(make_federation) -> None:
    federation = make_federation(["a", "b"], pool_size=2)
    first = federation.submit(slow_pipeline(cooperative=True), seconds=60)
    second = federation.submit(slow_pipeline(cooperative=True), seconds=0.2)
    assert wait_until(lambda: first.status is second.status is fed.JobStatus.RUNNING)
    first.suspend()
    second.suspend()
    first.cancel()
    with pytest.raises(fed.JobCancelledError):
        first.result(timeout=T)
    federation.close()  # resumes the suspended job, which then finishes
    assert second.result(timeout=0) == "finished"


def test_suspending_a_job_that_is_not_running_is_an_error(make_federation) -> None:
    federation = make_federation(["a", "b"])
    job = federation.submit(chain_pipeline(), x=1)
    job.result(timeout=T)
    with pytest.raises(fed.FederationError, match="not running"):
        job.suspend()


# -- the client dies --------------------------------------------------------------------------

CLIENT = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {tests!r})
    import federation as fed
    from pipelines import slow_pipeline
    federation = fed.Federation(["a", "b", "hub"], pool_size=2)
    job = federation.submit(slow_pipeline(cooperative=False), seconds=120)
    while job.status is not fed.JobStatus.RUNNING:
        time.sleep(0.01)
    mode = sys.argv[1]
    try:  # from before "ready": Ctrl+C may come the moment the test reads it
        print("ready", flush=True)
        if mode in ("exit", "atexit"):
            sys.stdin.readline()  # the test has seen the workers; now go
        if mode == "exit":
            os._exit(0)
        if mode == "atexit":
            sys.exit(0)  # no close(): interpreter exit closes the federation
        if mode == "sigint":
            job.result(timeout=60)
        time.sleep(120)
    except KeyboardInterrupt:
        if mode != "sigint":
            raise
        federation.close(cancel_pending=True)
        print("closed cleanly", flush=True)
        sys.exit(0)
    """
)


def _env() -> dict[str, str]:
    """The child client imports federation exactly as this process does."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


@contextlib.contextmanager
def _client(tmp_path: Path, mode: str) -> Iterator[tuple[subprocess.Popen[str], list[psutil.Process]]]:
    """A client process running CLIENT in ``mode``, once its job runs; its workers."""
    script = tmp_path / "client.py"
    script.write_text(CLIENT.format(tests=str(Path(__file__).parent)))
    client = subprocess.Popen(
        [sys.executable, str(script), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "ready"
        workers = psutil.Process(client.pid).children()
        assert len(workers) == 6
        assert client.stdin is not None
        client.stdin.write("go\n")  # exit modes wait for this, so the test sees workers first
        client.stdin.flush()
        yield client, workers
        _, alive = psutil.wait_procs(workers, timeout=5.0)
        assert not alive, f"orphaned workers: {alive}"
    finally:
        client.kill()
        client.communicate(timeout=T)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "exit"])
def test_workers_exit_when_the_client_dies(tmp_path, how) -> None:
    with _client(tmp_path, "exit" if how == "exit" else "wait") as (client, _):
        if how != "exit":
            client.send_signal(getattr(signal, how))
        client.wait(T)


def test_interpreter_exit_closes_an_unclosed_federation(tmp_path) -> None:
    with _client(tmp_path, "atexit") as (client, _):
        _, err = client.communicate(timeout=T)
        assert client.returncode == 0
        assert "Traceback" not in err, err


def test_ctrl_c_closes_the_federation_cleanly(tmp_path) -> None:
    with _client(tmp_path, "sigint") as (client, _):
        client.send_signal(signal.SIGINT)
        out, err = client.communicate(timeout=T)
        assert "closed cleanly" in out
        assert client.returncode == 0
        assert "Traceback" not in err, err  # no worker printed a KeyboardInterrupt


def test_many_threads_submitting_at_once(make_federation) -> None:
    federation = make_federation(["a", "b"], pool_size=2)
    results: dict[int, int] = {}
    errors: list[BaseException] = []

    def submit_many(base: int) -> None:
        try:
            jobs = [(base + i, federation.submit(chain_pipeline(), x=base + i)) for i in range(50)]
            for x, job in jobs:
                results[x] = job.result(timeout=T)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=submit_many, args=(1000 * n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(T)
    assert not errors
    assert results == {x: 2 * x + 1 for x in results} and len(results) == 200


def test_a_router_that_crashes_fails_its_jobs_and_close_still_stops_everything(make_federation) -> None:
    """A bug in the router thread must not leave callers waiting for ever: every job it
    held fails with an error saying so, new jobs are refused, and close() returns with
    every worker gone (the leak checks of this suite run after the test)."""
    federation = make_federation(["a", "b"])
    router = federation._router
    running = federation.submit(slow_pipeline(cooperative=True), seconds=30)
    queued = [federation.submit(slow_pipeline(cooperative=True), seconds=30) for _ in range(3)]

    def bug() -> None:
        raise RuntimeError("a bug in the router")

    router._on_deadlines = bug  # the next round of the router's loop crashes
    router.wake()
    for job in [running, *queued]:
        with pytest.raises(fed.FederationError, match="router crashed: RuntimeError"):
            job.result(timeout=30)
    with pytest.raises(fed.FederationClosedError):
        federation.submit(chain_pipeline(), x=1)
    federation.close(timeout=30)
    assert federation.closed


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda f, j: f.submit(chain_pipeline(), x=1, timeout=float("nan")), "timeout"),
        (lambda f, j: f.submit(chain_pipeline(), x=1, timeout=float("inf")), "timeout"),
        (lambda f, j: f.submit(chain_pipeline(), x=1, timeout="30"), "timeout"),
        (lambda f, j: f.submit(chain_pipeline(), x=1, timeout=0), "timeout"),
        (lambda f, j: f.submit(chain_pipeline(), x=1, queue_timeout=-1), "queue_timeout"),
        (lambda f, j: f.submit(chain_pipeline(), x=1, retries=True), "retries"),
        (lambda f, j: f.submit(chain_pipeline(), x=1, block="no"), "block"),
        (lambda f, j: j.result(timeout=float("nan")), "timeout"),
        (lambda f, j: j.wait(timeout="1"), "timeout"),
        (lambda f, j: next(j.results(timeout=-1)), "timeout"),
        (lambda f, j: list(f.map(chain_pipeline(), [{"x": 1}], timeout=float("nan"))), "timeout"),
        (lambda f, j: list(f.map(chain_pipeline(), [{"x": 1}], job_timeout=-2)), "job_timeout"),
        (lambda f, j: f.wait_ready(timeout=float("inf")), "timeout"),
        (lambda f, j: f.close(timeout=float("nan")), "timeout"),
    ],
)
@pytest.mark.parametrize("backend", ["process"])  # checked in the caller's thread, before any backend
def test_a_wrong_argument_is_refused_in_the_callers_thread_and_loses_nothing(
    make_federation, call: Any, argument: str
) -> None:
    """submit(timeout=nan) reached the router's clock and killed the router thread, failing
    every job of the federation; now every timeout and count of the API is checked first."""
    federation = make_federation(["a", "b"])
    running = federation.submit(slow_pipeline(cooperative=True), seconds=0.5)
    job = federation.submit(chain_pipeline(), x=1)
    with pytest.raises(fed.ConfigError, match=argument):
        call(federation, job)
    assert running.result(timeout=30) == "finished"
    assert job.result(timeout=30) == 3
    assert federation.submit(chain_pipeline(), x=2).result(timeout=30) == 5
