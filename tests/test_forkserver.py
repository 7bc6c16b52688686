"""start_method="forkserver": workers forked from one preloaded process, as precise as spawned ones."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from conftest import wait_until
from pipelines import chain_pipeline, failing_pipeline, slow_pipeline

import federation as fed

T = 30

process_only = pytest.mark.parametrize("backend", ["process"])


def _forkserver(make_federation, sites=None, **options):
    return make_federation(sites or ["a", "b"], start_method="forkserver", **options)


def _tree() -> tuple[psutil.Process, list[psutil.Process]]:
    """The forkserver (this process's only federation child) and the workers it forked."""
    (server,) = [
        p for p in psutil.Process().children() if "federation.backends._zygote" in " ".join(p.cmdline())
    ]
    return server, server.children()


def _probe_pipeline() -> fed.Pipeline:
    pipeline = fed.Pipeline("probe")

    @pipeline.step(site="a")
    def probe(ctx):
        import os
        import sys

        return {
            "fractions": "fractions" in sys.modules,
            "var": os.environ.get("FED_TEST_VAR"),
            "site": ctx.site,
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "pgid": os.getpgid(0),
        }

    @pipeline.step(site="b")
    def other(probe):
        import os

        return os.environ.get("FED_TEST_VAR")

    pipeline.output(probe)
    pipeline.output(other)
    return pipeline


@process_only
def test_workers_are_forked_from_the_preloaded_forkserver(make_federation) -> None:
    federation = _forkserver(
        make_federation,
        [fed.Site("a", env={"FED_TEST_VAR": "only-a"}), "b"],
        preload=["fractions"],
    )
    server, workers = _tree()
    assert len(workers) == 4  # 2 slots x 2 sites
    result = federation.submit(_probe_pipeline()).result(timeout=T)
    probe = result["probe"]
    assert probe["fractions"]  # imported by the forkserver, never by the step
    assert probe["ppid"] == server.pid and probe["pid"] in {w.pid for w in workers}
    assert probe["pgid"] == probe["pid"]  # a session of its own, as when spawned
    assert probe["var"] == "only-a" and result["other"] is None  # env only at its own site
    assert federation.submit(chain_pipeline(), x=4).result(timeout=T) == 9


@process_only
def test_spawned_workers_do_not_have_the_preload(make_federation) -> None:
    federation = make_federation(["a", "b"])
    assert not federation.submit(_probe_pipeline()).result(timeout=T)["probe"]["fractions"]


@process_only
@pytest.mark.parametrize(
    ("kind", "exitcode", "signal_name"),
    [("exit", 3, None), ("kill", -9, "SIGKILL"), ("segfault", -11, "SIGSEGV")],
)
def test_a_forked_workers_death_is_reported_precisely(make_federation, kind, exitcode, signal_name) -> None:
    # The forkserver, not this process, reaps forked workers: their exit codes come from it.
    federation = _forkserver(make_federation)
    job = federation.submit(failing_pipeline(kind), x=1)
    with pytest.raises(fed.WorkerDiedError) as info:
        job.result(timeout=T)
    error = info.value
    assert (error.job_id, error.site, error.exitcode, error.signal) == (job.id, "a", exitcode, signal_name)
    assert wait_until(lambda: not psutil.pid_exists(error.pid))  # reaped by the forkserver
    if kind == "segfault":
        assert any("Segmentation fault" in line for line in error.last_log), error.last_log
    assert federation.submit(chain_pipeline(), x=4).result(timeout=T) == 9  # replaced by a new fork


@process_only
def test_a_hung_forked_step_is_killed_and_its_slot_replaced(make_federation) -> None:
    federation = _forkserver(make_federation, ["a", "b", "hub"], pool_size=1, cancel_grace=0.2)
    job = federation.submit(slow_pipeline(cooperative=False), seconds=60, timeout=0.5)
    with pytest.raises(fed.JobCancelledError):
        job.result(timeout=T)
    assert federation.submit(chain_pipeline(), x=1).result(timeout=T) == 3
    assert federation.stats().slots.replaced >= 1


@process_only
def test_a_failing_setup_raises_site_start_error(make_federation) -> None:
    def broken_setup():
        raise RuntimeError("no data at this site")

    with pytest.raises(fed.SiteStartError) as info:
        _forkserver(make_federation, [fed.Site("a", setup=broken_setup), "b"])
    assert info.value.site == "a"
    assert "no data at this site" in (info.value.remote_traceback or "")


@process_only
def test_a_preload_that_cannot_be_imported_raises_site_start_error(make_federation) -> None:
    with pytest.raises(fed.SiteStartError) as info:
        _forkserver(make_federation, preload=["no_such_module_here"])
    assert "no_such_module_here" in str(info.value)
    assert "ModuleNotFoundError" in (info.value.remote_traceback or "")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"preload": ["numpy"]}, "preload needs start_method='forkserver'"),
        ({"backend": "thread", "start_method": "forkserver"}, "needs backend='process'"),
        ({"start_method": "forkserver", "preload": ["not a module"]}, "is not a module name"),
        ({"start_method": "fork"}, "start_method"),
    ],
)
def test_bad_start_options_raise_config_error(options, message) -> None:
    with pytest.raises(fed.ConfigError, match=message):
        fed.Federation(["a"], **options)


CLIENT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import federation as fed
    from pipelines import slow_pipeline
    federation = fed.Federation(["a", "b", "hub"], pool_size=2, start_method="forkserver")
    job = federation.submit(slow_pipeline(cooperative=False), seconds=120)
    while job.status is not fed.JobStatus.RUNNING:
        time.sleep(0.01)
    print("ready", flush=True)
    time.sleep(120)
    """
)


def test_forkserver_and_workers_exit_when_the_client_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text(CLIENT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    client = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "ready"
        tree = psutil.Process(client.pid).children(recursive=True)
        assert len(tree) == 7  # the forkserver and 2 slots x 3 sites
        client.send_signal(signal.SIGKILL)
        client.wait(T)
        _, alive = psutil.wait_procs(tree, timeout=5.0)
        assert not alive, f"orphaned: {alive}"
    finally:
        client.kill()
        client.communicate(timeout=T)


@process_only
def test_a_killed_forkserver_is_started_again_for_new_workers(make_federation) -> None:
    federation = _forkserver(make_federation, pool_size=1, shutdown_timeout=30.0)
    server, _ = _tree()
    server.send_signal(signal.SIGKILL)
    server.wait(T)
    # Its workers run on; the one that dies now is replaced by a new forkserver's fork.
    with pytest.raises(fed.WorkerDiedError) as info:
        federation.submit(failing_pipeline("exit"), x=1).result(timeout=T)
    assert info.value.site == "a"
    assert federation.submit(chain_pipeline(), x=4).result(timeout=T) == 9
    new_server, workers = _tree()
    assert new_server.pid != server.pid and len(workers) == 2
    # Workers whose exit codes will never come still count as gone once their pidfd
    # says so: close() does not sit out its 30 s shutdown_timeout waiting for them.
    started = time.monotonic()
    federation.close()
    assert time.monotonic() - started < 10.0


def _socket_fds() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            continue
    return count


def _zombie_children() -> list[int]:
    return [p.pid for p in psutil.Process().children() if _status(p) == psutil.STATUS_ZOMBIE]


def _status(proc: psutil.Process) -> str:
    try:
        return str(proc.status())
    except psutil.Error:
        return "gone"


@process_only
def test_forkserver_restarts_leave_no_socket_or_zombie(make_federation) -> None:
    federation = _forkserver(make_federation, pool_size=1)
    sockets = _socket_fds()
    for _ in range(3):
        server, _ = _tree()
        pidfd = os.pidfd_open(server.pid)
        try:
            server.send_signal(signal.SIGKILL)
            import select

            assert select.select([pidfd], [], [], T)[0]  # gone, and not reaped by this test
        finally:
            os.close(pidfd)
        with pytest.raises(fed.WorkerDiedError):
            federation.submit(failing_pipeline("exit"), x=1).result(timeout=T)
        assert federation.submit(chain_pipeline(), x=4).result(timeout=T) == 9
        assert wait_until(lambda pid=server.pid: pid not in _zombie_children(), timeout=T)
    assert _socket_fds() <= sockets
