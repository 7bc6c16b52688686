"""Failure paths under load: nothing lost, nothing hangs, user code never on the router.

Each test here reproduces a way the engine used to lose a job, hang, or run
user code on its router thread; races repeat their scenario enough times to
catch the interleaving that broke it.
"""

from __future__ import annotations

import gc
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path

import psutil
import pytest
from conftest import wait_until, worker_processes
from pipelines import array_pipeline, chain_pipeline, slow_pipeline, stream_input_pipeline

import federation as fed

T = 30
process_only = pytest.mark.parametrize("backend", ["process"])


def _pidfd_wait(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` has exited, without reaping it (it is not ours to reap)."""
    fd = os.pidfd_open(pid)
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


# -- 1. jobs lost under worker deaths ----------------------------------------------------------


@process_only
def test_a_job_dispatched_as_an_idle_worker_dies_always_ends(make_federation) -> None:
    """The lost job: dispatched on a slot whose idle worker had just died.

    The router learns of the death from the worker's pidfd; a submit in the next
    few hundred microseconds used to take the broken slot from the free list and
    the job never ended. Repeated, with the submit at different moments after
    the death, so some land before the router saw it and some after.
    """
    federation = make_federation(["a", "b"], pool_size=1)
    outcomes = {"ok": 0, "died": 0}
    for round_ in range(30):
        assert wait_until(lambda: len(worker_processes()) == 2, timeout=T)
        victim = worker_processes("a/slot-0")[0]
        victim.kill()
        assert _pidfd_wait(victim.pid, T)
        if round_ % 3:
            time.sleep(0.0003 * (round_ % 5))  # spread the submit over the router's window
        job = federation.submit(chain_pipeline(), x=round_)
        try:
            assert job.result(timeout=T) == 2 * round_ + 1
            outcomes["ok"] += 1
        except fed.WorkerDiedError as error:
            assert error.site == "a" and error.signal == "SIGKILL"
            outcomes["died"] += 1
        assert job.done()
    assert sum(outcomes.values()) == 30
    assert federation.submit(chain_pipeline(), x=1).result(timeout=T) == 3


@process_only
def test_workers_killed_while_starting_are_deaths_not_failed_setups(make_federation) -> None:
    """Killing each replacement as it starts, 8 times, must not make the federation give up."""
    federation = make_federation(["a", "b"], pool_size=1)
    seen: set[int] = set()
    for _ in range(8):
        assert wait_until(
            lambda: any(p.pid not in seen for p in worker_processes("a/slot-0")), timeout=T, interval=0.001
        )
        victim = next(p for p in worker_processes("a/slot-0") if p.pid not in seen)
        seen.add(victim.pid)
        victim.kill()
    job = federation.submit(chain_pipeline(), x=5)
    assert job.result(timeout=T) == 11
    assert federation.stats().gave_up is None


def _setup_fails_once_marked(marker: str) -> None:
    if os.path.exists(marker):
        raise RuntimeError("the site's data is gone")


@process_only
def test_a_federation_that_gives_up_says_so_everywhere(make_federation, tmp_path) -> None:
    """Setups that keep failing end restarts; every job, submit, stats and close say why."""
    marker = str(tmp_path / "broken")
    sites = [fed.Site("a", setup=lambda: _setup_fails_once_marked(marker)), "b"]
    federation = make_federation(sites, pool_size=1, max_slot_restarts=2)
    blocker = federation.submit(slow_pipeline(cooperative=True), seconds=60)
    queued = [federation.submit(chain_pipeline(), x=i) for i in range(3)]
    assert wait_until(lambda: blocker.status is fed.JobStatus.RUNNING, timeout=T)
    Path(marker).write_text("x")
    worker_processes("a/slot-0")[0].kill()
    with pytest.raises(fed.WorkerDiedError):
        blocker.result(timeout=T)
    for job in queued:
        with pytest.raises(fed.SiteStartError, match="data is gone"):
            job.result(timeout=T)
    with pytest.raises(fed.FederationError, match="gave up"):
        federation.submit(chain_pipeline(), x=1)
    assert "data is gone" in (federation.stats().gave_up or "")
    closer = threading.Thread(target=federation.close)
    closer.start()
    closer.join(T)
    assert not closer.is_alive()


# -- 2. user code never runs on the router thread ----------------------------------------------


def test_callbacks_run_off_the_router_thread_in_order_exactly_once(make_federation) -> None:
    federation = make_federation(["a", "b"])
    pipeline = fed.Pipeline("count")

    @pipeline.step(site="a")
    def numbers(n):
        yield from range(n)

    pipeline.output(numbers)
    calls: list[tuple[int, str]] = []
    active = {"now": 0, "max": 0}
    guard = threading.Lock()

    def on_result(result: fed.Result) -> None:
        with guard:
            active["now"] += 1
            active["max"] = max(active["max"], active["now"])
        calls.append((result.value, threading.current_thread().name))
        time.sleep(0.0001)  # widen any overlap between two threads calling at once
        with guard:
            active["now"] -= 1

    job = federation.submit(pipeline, n=2000)
    # Registered while results stream in: earlier ones are replayed, later ones delivered.
    assert wait_until(lambda: len(list(job._results)) > 0, timeout=T, interval=0.0005)
    job.on_result(on_result)
    done = threading.Event()
    job.add_done_callback(lambda _job: done.set())
    assert done.wait(T)
    assert wait_until(lambda: len(calls) == 2000, timeout=T)
    assert [value for value, _ in calls] == list(range(2000))
    assert active["max"] == 1
    assert {name for _, name in calls} == {"federation-callbacks"}


def test_a_done_callback_may_submit_into_a_full_queue(make_federation) -> None:
    federation = make_federation(["a", "b"], pool_size=1, max_queued=1)
    followers: list[fed.Job] = []

    def resubmit(job: fed.Job) -> None:
        if len(followers) < 3:
            followers.append(federation.submit(chain_pipeline(), x=len(followers)))

    first = federation.submit(slow_pipeline(cooperative=True), seconds=0.2)
    first.add_done_callback(resubmit)
    federation.submit(chain_pipeline(), x=100)  # fills the queue
    assert first.result(timeout=T) == "finished"
    assert wait_until(lambda: len(followers) == 1, timeout=T)
    assert followers[0].result(timeout=T) == 1
    assert federation.submit(chain_pipeline(), x=2).result(timeout=T) == 5


def test_close_from_a_done_callback_completes(backend) -> None:
    federation = fed.Federation(["a", "b"], backend=backend, pool_size=1)
    closed = threading.Event()

    def close_it(_job: fed.Job) -> None:
        federation.close()
        closed.set()

    job = federation.submit(chain_pipeline(), x=1)
    queued = federation.submit(chain_pipeline(), x=2)
    job.add_done_callback(close_it)
    assert closed.wait(T)
    assert queued.result(timeout=T) == 5  # close() lets queued jobs finish
    federation.close()  # returns: shutdown is complete
    assert worker_processes() == []


def test_a_callback_raising_base_exception_harms_nothing(make_federation, caplog) -> None:
    federation = make_federation(["a", "b"])

    def explode(_job: fed.Job) -> None:
        raise SystemExit("from a callback")

    first = federation.submit(chain_pipeline(), x=1)
    first.add_done_callback(explode)
    first.on_result(lambda _r: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert first.result(timeout=T) == 3
    jobs = [federation.submit(chain_pipeline(), x=i) for i in range(20)]
    assert [job.result(timeout=T) for job in jobs] == [2 * i + 1 for i in range(20)]


def test_a_slow_callback_stalls_no_other_job(make_federation) -> None:
    federation = make_federation(["a", "b"])
    release = threading.Event()
    slow = federation.submit(chain_pipeline(), x=1)
    slow.add_done_callback(lambda _job: release.wait(T))
    assert slow.result(timeout=T) == 3
    try:
        jobs = [federation.submit(chain_pipeline(), x=i) for i in range(10)]
        assert [job.result(timeout=T) for job in jobs] == [2 * i + 1 for i in range(10)]
    finally:
        release.set()


# -- 3. the router never blocks ---------------------------------------------------------------


@process_only
def test_a_dead_workers_surviving_helper_does_not_block_the_router(make_federation, tmp_path) -> None:
    """A step starts a helper that inherits stdout, then its worker dies: nothing waits for it."""
    federation = make_federation(["a", "b"], pool_size=2)
    pidfile = tmp_path / "helper.pid"
    pipeline = fed.Pipeline("orphan-maker")

    @pipeline.step(site="a")
    def start_and_die(path):
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        with open(path, "w") as out:
            out.write(str(helper.pid))
        os._exit(3)

    job = federation.submit(pipeline, path=str(pidfile))
    with pytest.raises(fed.WorkerDiedError):
        job.result(timeout=T)
    helper = int(pidfile.read_text())
    # The other slot keeps serving while the helper still lives.
    assert federation.submit(chain_pipeline(), x=3).result(timeout=T) == 7
    try:
        os.kill(helper, signal.SIGKILL)
    except ProcessLookupError:
        pass


@process_only
def test_worker_death_with_high_numbered_fds(make_federation, tmp_path) -> None:
    """select() fails on fds >= 1024; the router must not, with 1,100 files open.

    The dying worker leaves a helper that inherited every fd it could (close_fds=False),
    so nothing it held reads as closed at once: the router must not wait on it either way.
    """
    opened = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    pidfile = tmp_path / "helper.pid"
    try:
        federation = make_federation(["a", "b"], pool_size=1)
        pipeline = fed.Pipeline("die")

        @pipeline.step(site="a")
        def die(path):
            helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], close_fds=False)
            with open(path, "w") as out:
                out.write(str(helper.pid))
            os._exit(5)

        with pytest.raises(fed.WorkerDiedError) as info:
            federation.submit(pipeline, path=str(pidfile)).result(timeout=T)
        assert info.value.exitcode == 5
        assert federation.submit(chain_pipeline(), x=2).result(timeout=T) == 5
        federation.close()
    finally:
        for fd in opened:
            os.close(fd)
        if pidfile.exists():
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


# -- 4. retries are fresh attempts ------------------------------------------------------------


def _dies_once_pipeline(marker: str) -> fed.Pipeline:
    pipeline = fed.Pipeline("dies-once")

    @pipeline.step(site="a")
    def numbers(n):
        for i in range(n):
            yield i
            if i == 2 and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)

    pipeline.output(numbers)
    return pipeline


@process_only
def test_a_retry_never_mixes_two_attempts_results(make_federation, tmp_path) -> None:
    federation = make_federation(["a", "b"], pool_size=1)
    job = federation.submit(_dies_once_pipeline(str(tmp_path / "m")), n=5, retries=1)
    assert job.result(timeout=T) == [0, 1, 2, 3, 4]
    assert len(job.attempts) == 2
    assert [r.value for r in job.results(timeout=T)] == [0, 1, 2, 3, 4]


def _dies_on_third_item_pipeline(marker: str) -> fed.Pipeline:
    pipeline = fed.Pipeline("feed-dies")
    pipeline.input("values", stream=True)

    @pipeline.step(site="b", collect=["values"])
    def total(values):
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return sum(values)

    pipeline.output(total)
    return pipeline


@process_only
def test_a_retry_gets_every_stream_item_sent_before_it(make_federation, tmp_path) -> None:
    federation = make_federation(["a", "b"], pool_size=1)
    job = federation.submit(_dies_on_third_item_pipeline(str(tmp_path / "m")), retries=1)
    for value in range(10):
        job.send("values", value)
    job.close("values")
    assert job.result(timeout=T) == 45
    assert len(job.attempts) == 2


@process_only
def test_timeout_covers_every_attempt(make_federation, tmp_path) -> None:
    federation = make_federation(["a", "b"], pool_size=1)
    pipeline = fed.Pipeline("slow-dies")
    marker = str(tmp_path / "m")

    @pipeline.step(site="a")
    def work(x):
        time.sleep(0.6)
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        time.sleep(0.6)
        return x

    job = federation.submit(pipeline, x=1, retries=3, timeout=1.0)
    with pytest.raises(fed.JobCancelledError, match="timed out"):
        job.result(timeout=T)
    started = job.attempts[0].started
    assert job.ended is not None and job.ended - started < 1.0 + 0.6  # one timeout, not one per attempt


# -- 5. caches, slots, threads ----------------------------------------------------------------


def _adder(offset: int) -> fed.Pipeline:
    pipeline = fed.Pipeline(f"add-{offset}")

    @pipeline.step(site="a")
    def add(x):
        return x + offset

    pipeline.output(add)
    return pipeline


def test_more_distinct_pipelines_than_the_plan_cache_holds(make_federation) -> None:
    federation = make_federation(["a", "b"], pool_size=1)
    pipelines = [_adder(i) for i in range(70)]
    for i, pipeline in enumerate(pipelines):
        assert federation.submit(pipeline, x=1).result(timeout=T) == 1 + i
    # The first pipelines again: the workers evicted their plans long ago.
    for i, pipeline in enumerate(pipelines[:8]):
        assert federation.submit(pipeline, x=2).result(timeout=T) == 2 + i


def test_ctx_cancelled_from_many_threads(make_federation) -> None:
    federation = make_federation(["a", "b"], pool_size=1)
    pipeline = fed.Pipeline("threads")

    @pipeline.step(site="a")
    def fan(ctx, n):
        from concurrent.futures import ThreadPoolExecutor

        def check(_i):
            return sum(1 for _ in range(200) if not ctx.cancelled)

        with ThreadPoolExecutor(4) as pool:
            return sum(pool.map(check, range(n)))

    pipeline.output(fan)
    assert federation.submit(pipeline, n=16).result(timeout=T) == 16 * 200


# -- 6. closing -------------------------------------------------------------------------------


@process_only
def test_every_concurrent_close_returns_only_when_shutdown_is_complete(backend) -> None:
    federation = fed.Federation(["a", "b"], backend=backend, pool_size=2)
    pids = [p.pid for p in worker_processes()]
    job = federation.submit(slow_pipeline(cooperative=True), seconds=0.3)
    alive_after: list[list[int]] = []
    barrier = threading.Barrier(3)

    def close() -> None:
        barrier.wait(T)
        federation.close()
        alive_after.append([pid for pid in pids if psutil.pid_exists(pid) and _not_zombie(pid)])

    threads = [threading.Thread(target=close) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(T)
    assert len(alive_after) == 3 and alive_after == [[], [], []]
    assert job.result(timeout=T) == "finished"


def _not_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@process_only
def test_a_dropped_federation_is_closed_by_its_finalizer(backend) -> None:
    federation = fed.Federation(["a", "b"], backend=backend, pool_size=1)
    assert federation.submit(chain_pipeline(), x=1).result(timeout=T) == 3
    ref = weakref.ref(federation)
    del federation
    gc.collect()
    assert wait_until(lambda: ref() is None and worker_processes() == [], timeout=T)


def test_a_client_with_stdio_closed_starts_workers(tmp_path) -> None:
    script = tmp_path / "client.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys
            sys.path[:0] = [sys.argv[1]]
            import federation as fed
            from pipelines import chain_pipeline
            with fed.Federation(["a", "b"], pool_size=1) as federation:
                value = federation.submit(chain_pipeline(), x=4).result(timeout=30)
            with open(sys.argv[2], "w") as out:
                out.write(str(value))
            """
        )
    )
    result_path = tmp_path / "result"
    tests_dir = str(Path(__file__).parent)
    proc = subprocess.run(
        [sys.executable, str(script), tests_dir, str(result_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: [os.close(fd) for fd in (0, 1)],
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert result_path.read_text() == "9"


def test_stream_input_job_still_works(make_federation) -> None:
    """A guard for the retry bookkeeping: stream inputs on a job that never retries."""
    federation = make_federation(["a", "b", "hub"])
    job = federation.submit(stream_input_pipeline())
    for value in (1, 2, 3):
        job.send("values", value)
    job.close("values")
    assert job.result(timeout=T)["total"] == 12


# -- shared memory ----------------------------------------------------------------------------

_SMALL_SHM_CLIENT = """
import sys
sys.path[:0] = [sys.argv[1]]
import federation as fed
from pipelines import array_pipeline, chain_pipeline

pipeline = array_pipeline()
with fed.Federation(["a", "b"], pool_size=1) as federation:
    try:
        federation.submit(pipeline, n=64 << 20).result(timeout=30)
    except fed.StepFailedError as error:
        print("CAUSE", type(error.__cause__).__name__, error.__cause__)
    print("SMALL", federation.submit(pipeline, n=1 << 20).result(timeout=30))
    print("NEXT", federation.submit(chain_pipeline(), x=4).result(timeout=30))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small /dev/shm in a private mount namespace")
def test_a_full_dev_shm_is_an_error_naming_it_and_the_federation_goes_on(tmp_path) -> None:
    script = tmp_path / "client.py"
    script.write_text(_SMALL_SHM_CLIENT)
    tests_dir = str(Path(__file__).parent)
    command = f"mount -t tmpfs -o size=16m tmpfs /dev/shm && exec {sys.executable} {script} {tests_dir}"
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", command],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0 and "unshare" in proc.stderr and "Operation not permitted" in proc.stderr:
        pytest.skip("mount namespaces are not allowed here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert lines["CAUSE"].startswith("ResourceExhaustedError"), proc.stdout
    assert "/dev/shm" in lines["CAUSE"] and "64.0 MiB" in lines["CAUSE"] and "MiB free" in lines["CAUSE"]
    assert lines["SMALL"] == str(1 << 20)
    assert lines["NEXT"] == "9"


def _shm_used() -> int:
    stat = os.statvfs("/dev/shm")
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


@process_only
def test_an_idle_federation_gives_its_shared_memory_back(make_federation) -> None:
    federation = make_federation(["a", "b"], pool_size=1)
    pipeline = array_pipeline()
    before = _shm_used()
    for _ in range(3):
        assert federation.submit(pipeline, n=64 << 20).result(timeout=T) == 64 << 20
    assert wait_until(lambda: _shm_used() <= before + (8 << 20), timeout=15), (
        f"{(_shm_used() - before) >> 20} MiB of /dev/shm still held by an idle federation"
    )
    assert federation.submit(pipeline, n=64 << 20).result(timeout=T) == 64 << 20


# -- out of memory ----------------------------------------------------------------------------

_OOM_CLIENT = """
import sys
sys.path[:0] = [sys.argv[1]]
import federation as fed
from pipelines import chain_pipeline

pipeline = fed.Pipeline("hog")

@pipeline.step(site="a")
def hog(n):
    block = b"x" * n
    return len(block)

pipeline.output(hog)
with fed.Federation(["a", "b"], pool_size=1) as federation:
    try:
        federation.submit(pipeline, n=600 << 20).result(timeout=60)
        print("NO-OOM")
    except fed.WorkerDiedError as error:
        print("REASON", error.reason)
    print("NEXT", federation.submit(chain_pipeline(), x=4).result(timeout=60))
"""


def _memory_cgroup(tmp_name: str) -> tuple[Path, str] | None:
    """A child memory cgroup limited to 256 MiB: its directory and its procs file, or None."""
    v1 = Path("/sys/fs/cgroup/memory")
    try:
        if v1.is_dir():
            group = v1 / tmp_name
            group.mkdir()
            (group / "memory.limit_in_bytes").write_text(str(256 << 20))
            swap = group / "memory.memsw.limit_in_bytes"
            if swap.exists():
                swap.write_text(str(256 << 20))
            return group, str(group / "cgroup.procs")
        group = Path("/sys/fs/cgroup") / tmp_name
        group.mkdir()
        (group / "memory.max").write_text(str(256 << 20))
        (group / "memory.swap.max").write_text("0")
        return group, str(group / "cgroup.procs")
    except OSError:
        return None


@pytest.mark.skipif(os.geteuid() != 0, reason="makes a memory cgroup")
def test_an_oom_kill_is_named_as_such(tmp_path) -> None:
    made = _memory_cgroup(f"federation-test-{os.getpid()}")
    if made is None:
        pytest.skip("no writable memory cgroup here")
    group, procs = made
    script = tmp_path / "client.py"
    script.write_text(_OOM_CLIENT)
    try:
        proc = subprocess.run(
            ["sh", "-c", f"echo $$ > {procs} && exec {sys.executable} {script} {Path(__file__).parent}"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        wait_until(lambda: not Path(procs).read_text().strip(), timeout=10)
        group.rmdir()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REASON out of memory: the kernel's OOM killer" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "NEXT 9" in proc.stdout, proc.stdout


def test_a_pool_that_cannot_fit_the_fd_limit_is_a_config_error() -> None:
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > 200_000:
        pytest.skip("the hard limit on open files is too high to exceed here")
    # Thread workers live in the client, each with a pipe to every other site: the
    # square of the sites. (A process slot's fds grow linearly: see test_scale.py.)
    sites = [f"s{i}" for i in range(int(hard**0.5) + 10)]
    with pytest.raises(fed.ConfigError, match="hard limit") as info:
        fed.Federation(sites, pool_size=2, backend="thread")
    assert f"{hard:,}" in str(info.value)


def _own_segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith(f"fed-{os.getpid()}-")}


@process_only
def test_cancelling_jobs_that_stream_large_values_leaves_no_segment_busy(make_federation) -> None:
    federation = make_federation(["a", "b"], pool_size=1)
    pipeline = fed.Pipeline("big-stream")

    @pipeline.step(site="a")
    def arrays(n):
        import numpy as np

        while True:
            yield np.ones(n, dtype=np.uint8)

    @pipeline.step(site="b", collect=["arrays"])
    def keep(arrays):
        return len(arrays)

    pipeline.output(keep)
    for _ in range(20):
        job = federation.submit(pipeline, n=1 << 20)
        assert wait_until(lambda job=job: job.status is fed.JobStatus.RUNNING, timeout=T)
        time.sleep(0.01)  # let some arrays be in flight: the point is cancelling mid-stream
        job.cancel()
    assert federation.submit(chain_pipeline(), x=1).result(timeout=T) == 3
    # Busy segments are never trimmed; free ones go once the workers are idle.
    assert wait_until(lambda: not _own_segments(), timeout=15), sorted(_own_segments())


@process_only
def test_a_replacement_that_cannot_start_is_tried_again(make_federation, caplog) -> None:
    """Out of fds for a moment: the replacement fails, is retried, and the pool recovers.

    With pool_size=1 a replacement given up on would leave every later job waiting.
    """
    import resource

    federation = make_federation(["a", "b"], pool_size=1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    open_now = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 4, hard))  # too few for a slot's pipes
    try:
        victim = worker_processes("a/slot-0")[0]
        victim.kill()
        assert _pidfd_wait(victim.pid, T)
        job = federation.submit(chain_pipeline(), x=3)
        assert wait_until(
            lambda: any("could not start a replacement slot" in r.getMessage() for r in caplog.records),
            timeout=T,
        )
        assert not job.done()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert job.result(timeout=T) == 7
    assert federation.submit(chain_pipeline(), x=4).result(timeout=T) == 9


# -- invariant 7: shared-memory references balance on every path -----------------------------


def _big_stream_pipeline(fail: str, marker: str) -> fed.Pipeline:
    """a streams 1 MiB arrays to b, which collects them; ``fail`` says who breaks, and how."""
    pipeline = fed.Pipeline(f"big-stream-{fail}")

    @pipeline.step(site="a")
    def arrays(n):
        import numpy as np

        for i in range(n):
            yield np.full(1 << 20, i % 251, dtype=np.uint8)
            if i == 5 and fail == "sender raises":
                raise RuntimeError("sender broke mid-stream")
            if i == 5 and fail == "sender dies":
                os._exit(9)

    @pipeline.step(site="b")
    def keep(arrays):
        if fail == "receiver raises" and int(arrays[0]) == 3:
            raise RuntimeError("receiver broke mid-stream")
        if fail == "receiver dies" and int(arrays[0]) == 3:
            os._exit(9)
        if fail == "receiver hangs" and int(arrays[0]) == 3:
            open(marker, "w").close()
            time.sleep(60)
        return int(arrays[0])

    pipeline.output(keep)
    return pipeline


@process_only
@pytest.mark.parametrize(
    "fail", ["none", "sender raises", "sender dies", "receiver raises", "receiver dies", "receiver hangs"]
)
def test_no_segment_stays_busy_after_a_crash_case(make_federation, tmp_path, fail) -> None:
    federation = make_federation(["a", "b"], pool_size=1, cancel_grace=0.2)
    marker = tmp_path / "hanging"
    job = federation.submit(_big_stream_pipeline(fail, str(marker)), n=20)
    if fail == "receiver hangs":
        assert wait_until(marker.exists, timeout=T)
        job.cancel()
    error = job.exception(timeout=T)
    assert (error is None) == (fail == "none"), error
    assert federation.submit(chain_pipeline(), x=1).result(timeout=T) == 3
    # Once idle, senders unlink their free segments: what is left is still busy.
    assert wait_until(lambda: not _own_segments(), timeout=15), sorted(_own_segments())


@process_only
def test_giving_up_while_another_slot_runs_a_job_fails_it_and_close_returns(
    make_federation, tmp_path
) -> None:
    marker = str(tmp_path / "broken")
    sites = [fed.Site("a", setup=lambda: _setup_fails_once_marked(marker)), "b"]
    federation = make_federation(sites, pool_size=2, max_slot_restarts=1)
    running = federation.submit(slow_pipeline(cooperative=True), seconds=60)
    assert wait_until(lambda: running.status is fed.JobStatus.RUNNING, timeout=T)
    busy_slot = running.attempts[0].slot
    Path(marker).write_text("x")
    worker_processes(f"a/slot-{1 - busy_slot}")[0].kill()
    with pytest.raises(fed.SiteStartError, match="gave up"):
        running.result(timeout=T)
    closer = threading.Thread(target=federation.close)
    closer.start()
    closer.join(T)
    assert not closer.is_alive()


def test_oom_kills_are_counted_machine_wide_without_a_memory_cgroup(monkeypatch) -> None:
    from federation import _oom

    try:
        with open("/proc/vmstat") as vmstat:
            expected = next(int(line.split()[1]) for line in vmstat if line.startswith("oom_kill "))
    except (OSError, StopIteration):
        pytest.skip("this kernel does not count OOM kills in /proc/vmstat")
    monkeypatch.setattr(_oom, "_candidates", list)
    assert _oom.oom_kill_count() == expected


# -- control backlog --------------------------------------------------------------------------


def test_flushing_a_long_control_backlog_copies_none_of_it() -> None:
    """Each write takes the backlog's head only: feeding a busy worker stays linear.

    Copying the whole backlog per write made ``job.send`` cost 17, 31 and 101 us
    per item at 20k, 80k and 320k queued items. Measured here as memory, which
    does not depend on the machine's speed: one flush must not allocate in
    proportion to the backlog.
    """
    import tracemalloc

    from federation._channel import Outbox, make_pipe

    read_fd, write_fd = make_pipe()
    outbox = Outbox(write_fd)
    try:
        while outbox.send(b"x" * 1000):  # fill the pipe: from here on, sends queue
            pass
        for _ in range(200_000):
            outbox.send(b"y" * 8)
        assert outbox.pending_bytes > 200_000 * 16
        os.read(read_fd, 1 << 16)  # room for a few dozen frames
        tracemalloc.start()
        try:
            outbox.flush()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert outbox.has_pending
        assert peak < 256 << 10, f"one flush allocated {peak:,} bytes for a backlog of 400,000 views"
    finally:
        outbox.close()
        os.close(read_fd)
