"""The Ray backend beyond the behaviour suite: placement, faults, and deploying with ``ray start``.

Most tests use the session's cluster (``ray_cluster`` fixture: a head with no
CPUs and nodes labelled ``federation/site=a``, ``b`` and ``hub``). Two run
clients in subprocesses, since a process can be connected to one cluster only:
one joins a cluster started with ``ray start`` (as users deploy), one checks
that a private instance leaves no Ray process behind when its client is killed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from conftest import wait_until
from pipelines import chain_pipeline, slow_pipeline

import federation as fed

pytest.importorskip("ray")

T = 30
ray_only = pytest.mark.parametrize("backend", ["ray"])


def where_pipeline() -> fed.Pipeline:
    """Each site reports the Ray node its step ran on."""
    pipeline = fed.Pipeline("where")

    @pipeline.step(sites=["a", "b", "hub"])
    def node(ctx):
        import ray

        return ray.get_runtime_context().get_node_id()

    pipeline.output(node)
    return pipeline


def blocked_at_b() -> fed.Pipeline:
    """a hands a value to b, whose step runs until the job ends."""
    pipeline = fed.Pipeline("blocked-at-b")

    @pipeline.step(site="a")
    def start(x):
        return x

    @pipeline.step(site="b")
    def wait(ctx, start, seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not ctx.cancelled:
            time.sleep(0.01)
        return start

    pipeline.output(wait)
    return pipeline


@ray_only
def test_each_site_runs_on_its_own_labelled_node(make_federation, ray_cluster) -> None:
    federation = make_federation(["a", "b", "hub"])
    nodes = federation.submit(where_pipeline()).result(timeout=T)
    assert nodes == {site: ray_cluster.node_id(site) for site in ("a", "b", "hub")}
    workers = federation.stats().workers
    assert {w.site for w in workers} == {"a", "b", "hub"} and all(w.alive for w in workers)


@ray_only
def test_a_site_without_a_node_fails_at_once_naming_it_and_the_labels(make_federation) -> None:
    started = time.monotonic()
    with pytest.raises(fed.SiteStartError) as info:
        make_federation(["a", "mars"])
    assert time.monotonic() - started < T
    message = str(info.value)
    assert info.value.site == "mars"
    assert "site 'mars' has no live node" in message
    assert "federation/site=a" in message and "federation/site=hub" in message


@ray_only
def test_a_killed_site_actor_is_a_worker_died_error_naming_its_node(make_federation, ray_cluster) -> None:
    import ray

    federation = make_federation(["a", "b"], pool_size=1)
    job = federation.submit(blocked_at_b(), x=1, seconds=60)
    assert wait_until(lambda: job.status is fed.JobStatus.RUNNING)
    time.sleep(0.3)  # b's step is running
    (worker,) = [w for w in federation.stats().workers if w.site == "b"]
    os.kill(worker.pid, signal.SIGKILL)
    with pytest.raises(fed.WorkerDiedError) as info:
        job.result(timeout=T)
    error = info.value
    assert error.site == "b" and error.node == ray_cluster.node_id("b")
    assert error.node[:12] in str(error) and "site 'b'" in str(error)
    assert not isinstance(error, ray.exceptions.RayError) and not isinstance(error.__cause__, Exception)
    # The slot is replaced and serves the next job; a retried job survives the same death.
    assert federation.submit(chain_pipeline(), x=1).result(timeout=T) == 3
    job = federation.submit(blocked_at_b(), x=2, seconds=1.0, retries=1)
    assert wait_until(lambda: job.status is fed.JobStatus.RUNNING)
    time.sleep(0.3)
    (worker,) = [w for w in federation.stats().workers if w.site == "b"]
    os.kill(worker.pid, signal.SIGKILL)
    assert job.result(timeout=T) == 2
    assert len(job.attempts) == 2 and "WorkerDiedError" in (job.attempts[0].error or "")
    assert federation.stats().slots.replaced >= 2


@ray_only
def test_a_lost_node_fails_the_job_and_its_slot_comes_back_with_a_new_node(
    make_federation, ray_cluster
) -> None:
    federation = make_federation(["a", "b"], pool_size=1)
    job = federation.submit(blocked_at_b(), x=1, seconds=60)
    assert wait_until(lambda: job.status is fed.JobStatus.RUNNING)
    time.sleep(0.3)
    lost = ray_cluster.node_id("b")
    ray_cluster.remove_site_node("b")
    try:
        with pytest.raises(fed.WorkerDiedError) as info:
            job.result(timeout=T)
        assert info.value.site == "b" and info.value.node == lost
        assert "node" in info.value.reason.lower()
        # No node for b: the slot waits (jobs queue) instead of failing starts in a loop.
        queued = federation.submit(chain_pipeline(), x=5)
        time.sleep(1.0)
        assert not queued.done() and federation.stats().gave_up is None
    finally:
        ray_cluster.add_site_node("b")
    assert queued.result(timeout=T) == 11
    nodes = {w.site for w in federation.stats().workers}
    assert nodes == {"a", "b"}


@ray_only
def test_uncooperative_cancel_kills_and_replaces_the_slot(make_federation) -> None:
    federation = make_federation(["a", "b"], pool_size=1, cancel_grace=0.2)
    job = federation.submit(slow_pipeline(cooperative=False), seconds=60)
    assert wait_until(lambda: job.status is fed.JobStatus.RUNNING)
    time.sleep(0.5)  # the step runs (an abort that arrives with START stops it before it starts)
    job.cancel()
    with pytest.raises(fed.JobCancelledError):
        job.result(timeout=T)
    assert federation.submit(chain_pipeline(), x=3).result(timeout=T) == 7
    assert federation.stats().slots.replaced == 1


@ray_only
def test_suspend_is_a_config_error_on_ray(make_federation) -> None:
    federation = make_federation(["a", "b"], pool_size=1)
    job = federation.submit(slow_pipeline(cooperative=True), seconds=60)
    assert wait_until(lambda: job.status is fed.JobStatus.RUNNING)
    with pytest.raises(fed.ConfigError, match="not available on the Ray backend"):
        job.suspend()
    job.cancel()


@ray_only
def test_prints_and_logs_reach_the_client_tagged_with_the_node(make_federation, ray_cluster, capsys) -> None:
    import logging

    federation = make_federation(["a", "b"], pool_size=1)
    pipeline = fed.Pipeline("talk")

    @pipeline.step(site="a")
    def talk(ctx):
        print("printed at a")
        ctx.log.warning("logged at a")
        return 1

    pipeline.output(talk)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("federation").addHandler(handler)
    out: list[str] = []

    def printed() -> bool:
        out.append(capsys.readouterr().out)
        return f"step=talk node={ray_cluster.node_id('a')[:12]}] printed at a" in "".join(out)

    try:
        federation.submit(pipeline).result(timeout=T)
        assert wait_until(lambda: any("logged at a" in r.getMessage() for r in records))
        assert wait_until(printed)
    finally:
        logging.getLogger("federation").removeHandler(handler)
    message = next(r for r in records if "logged at a" in r.getMessage()).getMessage()
    assert f"node={ray_cluster.node_id('a')}" in message and "step=talk" in message and "site=a" in message


def test_ray_address_needs_the_ray_backend() -> None:
    with pytest.raises(fed.ConfigError, match="ray_address='auto' needs backend='ray'"):
        fed.Federation(["a"], ray_address="auto")
    with pytest.raises(fed.ConfigError, match="max_worker_memory is not available on the Ray backend"):
        fed.Federation(["a"], backend="ray", max_worker_memory=1 << 30)


# -- subprocess clients --------------------------------------------------------------------

JOIN = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import federation as fed
    pipeline = fed.Pipeline("where")

    @pipeline.step(site="clinic-a")
    def node(ctx, x):
        import ray
        return ray.get_runtime_context().get_node_id(), x + 1

    pipeline.output(node)
    with fed.Federation(["clinic-a"], backend="ray", pool_size=1, ray_address=sys.argv[1]) as federation:
        print(repr(federation.submit(pipeline, x=41).result(timeout=60)), flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ray_cli() -> str:
    found = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    return found


def _processes_mentioning(text: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(text in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_an_address_where_no_cluster_answers_fails_at_once_saying_so() -> None:
    """ray.init retried such an address for minutes, printing its own warnings; a
    federation names the address and what to check within a second or so."""
    port = _free_port()  # closed again: nothing listens there
    code = (
        "import federation as fed\n"
        "try:\n"
        f"    fed.Federation(['a'], backend='ray', ray_address='127.0.0.1:{port}')\n"
        "except fed.SiteStartError as exc:\n"
        "    print('refused:', exc)\n"
    )
    started = time.monotonic()
    command = [sys.executable, "-c", code]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert f"refused: could not connect to the Ray cluster at ray_address='127.0.0.1:{port}'" in out.stdout, (
        out.stdout + out.stderr
    )
    assert "nothing answers" in out.stdout and "ray start --head" in out.stdout
    assert time.monotonic() - started < 30  # a fresh interpreter importing Ray, no retries


def test_a_federation_joins_a_cluster_started_with_ray_start(tmp_path) -> None:
    """As users deploy: `ray start --head`, then a node labelled for the site, then ray_address=."""
    temp = Path("/tmp") / f"fedray-{os.getpid()}"  # Ray's socket paths must stay short
    port = _free_port()
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray's token auth needs the same token on every node and client (see the docs'
        # "Scale out with Ray"); this test's cluster lives on loopback for a few seconds.
        "RAY_AUTH_MODE": "disabled",
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
    }
    common = ["--disable-usage-stats", f"--temp-dir={temp}", "--object-store-memory=80000000"]
    try:
        subprocess.run(
            [
                _ray_cli(),
                "start",
                "--head",
                f"--port={port}",
                "--num-cpus=0",
                "--include-dashboard=false",
                *common,
            ],
            check=True,
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        subprocess.run(
            [
                _ray_cli(),
                "start",
                f"--address=127.0.0.1:{port}",
                "--num-cpus=1",
                "--labels=federation/site=clinic-a",
                *common,
            ],
            check=True,
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        script = tmp_path / "join.py"
        script.write_text(JOIN.format(tests=str(Path(__file__).parent)))
        out = subprocess.run(
            [sys.executable, str(script), f"127.0.0.1:{port}"],
            check=False,
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        node, value = eval(out.stdout.strip().splitlines()[-1])
        assert value == 42
        doctor = subprocess.run(
            [sys.executable, "-m", "federation", "doctor", "--ray-address", f"127.0.0.1:{port}"],
            check=False,
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert doctor.returncode == 0, doctor.stderr
        assert node[:12] in doctor.stdout and "federation/site=clinic-a" in doctor.stdout
    finally:
        # Only this test's Ray processes: `ray stop` would stop every cluster on the machine.
        procs = _processes_mentioning(str(temp))
        for proc in list(procs):
            try:
                procs.extend(proc.children(recursive=True))  # agents and workers: renamed ray::...
            except psutil.Error:
                pass
        for proc in procs:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=10)
        shutil.rmtree(temp, ignore_errors=True)


PRIVATE = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import federation as fed
    from pipelines import slow_pipeline
    federation = fed.Federation(["a", "b"], backend="ray", pool_size=1)
    import ray
    print(ray.get_runtime_context().gcs_address, flush=True)
    job = federation.submit(slow_pipeline(cooperative=False), seconds=120)
    while job.status is not fed.JobStatus.RUNNING:
        time.sleep(0.01)
    print("ready", flush=True)
    time.sleep(120)
    """
)


@pytest.mark.parametrize("backend", ["ray"])
def test_a_private_instance_goes_with_its_killed_client(tmp_path, ray_cluster, backend) -> None:
    """ray_address=None in a fresh client: its own Ray, not the cluster running here, gone with it."""
    script = tmp_path / "private.py"
    script.write_text(PRIVATE.format(tests=str(Path(__file__).parent)))
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
    }
    client = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert client.stdout is not None
        address = client.stdout.readline().strip()
        assert address and address != ray_cluster.address  # never the cluster already running here
        assert client.stdout.readline().strip() == "ready"
        ray_procs = [p for p in psutil.Process(client.pid).children(recursive=True)]
        assert ray_procs
        client.send_signal(signal.SIGKILL)
        client.wait(T)
        _, alive = psutil.wait_procs(ray_procs, timeout=20)
        assert not alive, f"Ray processes left by the killed client: {[_describe(p) for p in alive]}"
    finally:
        client.kill()
        client.communicate(timeout=T)


def _describe(proc: psutil.Process) -> str:
    try:
        with open(f"/proc/{proc.pid}/environ", "rb") as file:
            marked = b"FEDERATION_RAY_INSTANCE=" in file.read()
        return f"{proc.pid} {proc.name()} parent {proc.ppid()} marked {marked}"
    except (OSError, psutil.Error) as exc:
        return f"{proc.pid}: {exc!r}"


def large_and_small() -> fed.Pipeline:
    """a hands b a large buffer (out of band: an object-store reference) and a small value."""
    pipeline = fed.Pipeline("large-and-small")

    @pipeline.step(site="a")
    def make(size):
        return bytearray(b"x" * size), size

    @pipeline.step(site="b")
    def check(make):
        data, size = make
        return len(data) == size and data[:1] == b"x" and data[-1:] == b"x", size

    pipeline.output(check)
    return pipeline


@ray_only
def test_frames_are_pickled_once_except_those_carrying_object_references(
    make_federation, ray_cluster
) -> None:
    """One pickled frame per call; a reference must go through Ray's serializer (the standard
    pickle would pin its object for ever), so a frame holding one is sent as it is."""
    import pickle

    import ray

    from federation._ray_values import holds_refs, pack, unpack

    ref = ray.put(b"buffer")
    assert holds_refs((b"pickle", ((ref, 6),)))
    assert not holds_refs((b"pickle", ((pickle.PickleBuffer(b"inline"), 6),)))  # fetched for the client
    assert not holds_refs((7,)) and not holds_refs(b"pickle") and not holds_refs(None)
    frame = ("a", 3, [(3, 1, [("step", "param", "a", 0, (7,), 1)])])
    assert type(pack(frame)) is bytes and unpack(pack(frame)) == frame
    unpicklable = ("a", 3, [(3, 1, lambda: None)])
    assert pack(unpicklable) is unpicklable  # goes as it is, through Ray's serializer
    big = ("", 0, [(2, 1, b"d" * 65, {"x": b"i" * 100_000}, frozenset())])
    assert pack(big) is big  # pickling it here would only copy it once more

    federation = make_federation(["a", "b"], pool_size=1)
    for size in (10, 4 << 20, 10, 4 << 20):
        assert federation.submit(large_and_small(), size=size).result(timeout=T) == (True, size)
