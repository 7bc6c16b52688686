"""Services a site depends on: ready, never ready, dying, stopped, never orphaned; on every backend.

Every service here is a real process (``tests/service_app.py``). Waits are on
events (a log record, a line of output, a process's end), each with a timeout.
"""

from __future__ import annotations

import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from conftest import wait_until, worker_processes

import federation as fed

T = 30  # the longest any single wait in these tests may take
APP = str(Path(__file__).with_name("service_app.py"))
ENV = shutil.which("env") or "/usr/bin/env"


def app(*args: str) -> list[str]:
    """service_app.py's command line, its process marked as this test process's (``TEST_OWNER``).

    Marked in the command itself: on Ray a service starts from a service host on a node,
    whose environment is not this process's.
    """
    return [ENV, f"TEST_OWNER={os.getpid()}", sys.executable, APP, *args]


def tcp_service(name: str = "echo", **options: object) -> fed.Service:
    options.setdefault("port", 0)
    return fed.Service(name, app("tcp", "{port}"), env={"SERVICE_SITE": "{site}"}, **options)


def app_processes() -> list[psutil.Process]:
    """Every process running service_app.py (not its supervisor) that this test process started."""
    found = []
    for proc in psutil.process_iter():
        try:
            if (
                proc.cmdline()[1:2] == [APP]
                and proc.status() != psutil.STATUS_ZOMBIE
                and proc.environ().get("TEST_OWNER") == str(os.getpid())
            ):
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.fixture(autouse=True)
def mark_our_services(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Services inherit this, so a test can tell its own from another run's."""
    monkeypatch.setenv("TEST_OWNER", str(os.getpid()))
    yield
    assert wait_until(lambda: not app_processes(), T), f"services left running: {app_processes()}"


class _Records(logging.Handler):
    """Keeps the federation's records; sets an event when one matches."""

    def __init__(self, match: Callable[[logging.LogRecord], bool] = lambda r: False) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.matched = threading.Event()
        self._match = match

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if self._match(record):
            self.matched.set()

    def text(self) -> str:
        return "\n".join(f"{r.name} {r.getMessage()}" for r in self.records)


@pytest.fixture
def records() -> Iterator[Callable[..., _Records]]:
    """Attach a record keeper to the ``federation`` logger at INFO; detached after the test."""
    logger = logging.getLogger("federation")
    attached: list[_Records] = []
    level = logger.level

    def attach(match: Callable[[logging.LogRecord], bool] = lambda r: False) -> _Records:
        keeper = _Records(match)
        logger.addHandler(keeper)
        logger.setLevel(logging.INFO)
        attached.append(keeper)
        return keeper

    yield attach
    for keeper in attached:
        logger.removeHandler(keeper)
    logger.setLevel(level)


def ask_echo() -> fed.Pipeline:
    """Each of a and b connects to its own echo service; the answer names the site that runs it."""
    pipeline = fed.Pipeline("ask-echo")

    @pipeline.step(sites=["a", "b"])
    def ask(ctx):
        import socket

        address = ctx.services["echo"]
        with socket.create_connection((address.host, address.port), timeout=10) as conn:
            return conn.makefile().readline().strip(), address.port

    pipeline.output(ask)
    return pipeline


# -- ready ---------------------------------------------------------------------------------------


def test_each_site_gets_its_own_service_ready_on_its_port(make_federation) -> None:
    """Per-site isolation: two sites, one declaration, two processes on two free ports."""
    echo = tcp_service()
    federation = make_federation([fed.Site("a", services=[echo]), fed.Site("b", services=[echo]), "hub"])
    result = federation.submit(ask_echo()).result(timeout=T)
    assert result["a"][0] == "a" and result["b"][0] == "b"
    assert result["a"][1] != result["b"][1]
    assert len(app_processes()) == 2


def test_a_service_ready_when_its_url_answers(make_federation) -> None:
    web = fed.Service(
        "web", app("http", "{port}"), port=0, url="http://{host}:{port}/", env={"SERVICE_SITE": "{site}"}
    )
    pipeline = fed.Pipeline("get")

    @pipeline.step(site="a")
    def get(ctx):
        import urllib.request

        with urllib.request.urlopen(ctx.services["web"].url, timeout=10) as response:
            return response.read().decode(), ctx.services["web"].url

    pipeline.output(get)
    federation = make_federation([fed.Site("a", services=[web])])
    body, url = federation.submit(pipeline).result(timeout=T)
    assert body == "site=a" and url.startswith("http://127.0.0.1:") and url.endswith("/")


def test_a_service_ready_on_a_line_of_its_output_and_setup_sees_the_addresses(make_federation) -> None:
    """ctx.services in a step; setup(services) in every worker; an unknown name says which exist."""
    service = fed.Service("queue", app("line"), ready_line=r"ready to\s+serve", port=0)

    def setup(services):
        return f"setup saw {services['queue'].host}:{services['queue'].port}"

    pipeline = fed.Pipeline("look")

    @pipeline.step(site="a")
    def look(ctx):
        try:
            ctx.services["queu"]
        except KeyError as exc:
            missing = str(exc)
        return ctx.state, str(ctx.services["queue"]), sorted(ctx.services), missing

    pipeline.output(look)
    federation = make_federation([fed.Site("a", setup=setup, services=[service]), "b"])
    state, address, names, missing = federation.submit(pipeline).result(timeout=T)
    assert state == f"setup saw {address}" and names == ["queue"]
    assert "site 'a' has no service 'queu' (did you mean 'queue'?)" in missing


def test_a_zero_argument_setup_still_works_beside_services(make_federation) -> None:
    pipeline = fed.Pipeline("state")

    @pipeline.step(site="a")
    def state(ctx):
        return ctx.state, dict(ctx.services)["echo"].site

    pipeline.output(state)
    federation = make_federation([fed.Site("a", setup=lambda: 42, services=[tcp_service()])])
    assert federation.submit(pipeline).result(timeout=T) == (42, "a")


def test_a_site_without_services_sees_none(make_federation) -> None:
    pipeline = fed.Pipeline("none")

    @pipeline.step(site="b")
    def none(ctx):
        return len(ctx.services)

    pipeline.output(none)
    federation = make_federation([fed.Site("a", services=[tcp_service()]), "b"])
    assert federation.submit(pipeline).result(timeout=T) == 0


# -- never up: SiteStartError, nothing left ------------------------------------------------------


def _start_error(backend: str, sites: list[object], **options: object) -> fed.SiteStartError:
    with pytest.raises(fed.SiteStartError) as info:
        fed.Federation(sites, backend=backend, pool_size=1, **options)  # type: ignore[arg-type]
    assert not worker_processes() and not app_processes()
    return info.value


def test_a_service_never_ready_is_a_start_error_with_its_last_output(backend) -> None:
    never = fed.Service("slow", app("never"), ready_line="ready", ready_timeout=0.5, stop_grace=5)
    error = _start_error(backend, [fed.Site("a", services=[never]), "b"])
    assert error.site == "a" and error.service == "slow"
    assert "service 'slow' of site 'a' was not ready within ready_timeout=0.5 s" in str(error)
    assert "waiting for a line matching 'ready'" in str(error)
    assert error.last_output == ("warming up",) and "warming up" in str(error)


def test_a_service_that_exits_at_start_is_a_start_error_at_once(backend) -> None:
    """Exit code 3: reported as an exit (not after the 60 s ready_timeout), with its output."""
    failing = fed.Service("db", app("exit", "3"), port=0, ready_timeout=60)
    error = _start_error(backend, [fed.Site("a", services=[failing])])
    assert "service 'db' of site 'a' exited during start: exit code 3" in str(error)
    assert error.last_output == ("boom: about to exit",)


def test_a_service_that_exits_with_code_0_at_start_is_not_taken_for_a_slow_one(backend) -> None:
    error = _start_error(backend, [fed.Site("a", services=[fed.Service("db", app("exit", "0"), port=0)])])
    assert "exited during start: exit code 0" in str(error)


def test_a_program_that_cannot_run_is_a_start_error_naming_it(backend) -> None:
    missing = fed.Service("db", ["/nonexistent/postgres", "-p", "{port}"], port=0)
    error = _start_error(backend, [fed.Site("a", services=[missing])])
    assert "exited during start: exit code 127" in str(error)
    assert "cannot run '/nonexistent/postgres'" in error.last_output[-1]


def test_a_missing_working_directory_is_a_start_error(backend, tmp_path) -> None:
    nowhere = fed.Service("db", app("line"), ready_line="ready", cwd=tmp_path / "nowhere")
    error = _start_error(backend, [fed.Site("a", services=[nowhere])])
    assert "service 'db' of site 'a' could not start: [Errno 2] No such file or directory" in str(error)


def test_a_port_already_taken_is_a_start_error_before_the_service_starts(backend) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        error = _start_error(backend, [fed.Site("a", services=[tcp_service(port=port)])])
    assert f"127.0.0.1:{port} already accepts connections before it started" in str(error)


def test_a_later_service_failing_stops_every_service_started(backend, records) -> None:
    """Site a's second service fails: a's first and b's are stopped; no worker was started."""
    keep = records()
    sites = [
        fed.Site("a", services=[tcp_service("first"), fed.Service("second", app("exit", "2"), port=0)]),
        fed.Site("b", services=[tcp_service("first")]),
    ]
    error = _start_error(backend, sites)
    assert error.site == "a" and error.service == "second"
    stopped = [r.getMessage() for r in keep.records if "service stopped" in r.getMessage()]
    assert len(stopped) == 2 and all("service=first" in message for message in stopped)


# -- running, dying, stopping -------------------------------------------------------------------


def test_a_service_that_dies_is_logged_loudly_and_jobs_fail_instead_of_hanging(
    make_federation, records
) -> None:
    died = records(lambda r: "a service died" in r.getMessage())
    federation = make_federation([fed.Site("a", services=[tcp_service()]), fed.Site("b")])
    pipeline = fed.Pipeline("ask-a")

    @pipeline.step(site="a")
    def ask(ctx):
        import socket

        address = ctx.services["echo"]
        with socket.create_connection((address.host, address.port), timeout=10) as conn:
            return conn.makefile().readline().strip()

    pipeline.output(ask)
    assert federation.submit(pipeline).result(timeout=T) == "a"
    [service] = app_processes()
    service.kill()  # the service itself, not its supervisor
    assert died.matched.wait(T)
    [record] = [r for r in died.records if "a service died" in r.getMessage()]
    assert record.levelno == logging.ERROR and "SIGKILL(-9)" in record.getMessage()
    assert "listening on" in record.getMessage()  # its last lines
    with pytest.raises(fed.StepFailedError) as info:
        federation.submit(pipeline).result(timeout=T)
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


def test_close_sends_sigterm_then_kills_the_whole_group_after_the_grace(backend, tmp_path) -> None:
    """A service that ignores SIGTERM, with a child that ignores it too: both gone after close()."""
    stubborn = fed.Service("stubborn", app("stubborn"), ready_line="ready to serve", stop_grace=0.3)
    federation = fed.Federation(
        [fed.Site("a", services=[stubborn])], backend=backend, pool_size=1, log_dir=tmp_path
    )
    try:
        [service] = app_processes()
        processes = [service, *service.children()]
        assert len(processes) == 2  # the service and its child
    finally:
        federation.close()
    assert wait_until(lambda: not any(p.is_running() and p.status() != "zombie" for p in processes), T)
    log = (tmp_path / "a.log").read_text()
    assert "a/stubborn: got SIGTERM, ignoring it" in log  # SIGTERM came first


def test_service_output_goes_to_the_site_logs_tagged(make_federation, tmp_path, records) -> None:
    keep = records()
    sites = [fed.Site(name, services=[tcp_service()]) for name in ("a", "b")]
    federation = make_federation(sites, log_dir=tmp_path)
    federation.close()
    a_log, b_log = (tmp_path / "a.log").read_text(), (tmp_path / "b.log").read_text()
    assert "[output  ] a/echo: listening on" in a_log and "b/echo" not in a_log
    assert "[output  ] b/echo: listening on" in b_log and "a/echo" not in b_log
    output = [r for r in keep.records if r.name == "federation.site.a" and "service output" in r.getMessage()]
    assert output and "service=echo" in output[0].getMessage() and "listening on" in output[0].getMessage()


def _client_env(backend: str, request: pytest.FixtureRequest) -> dict[str, str]:
    """The environment of a client run as a script: this package, and on Ray the session's cluster."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    if backend == "ray":
        # A driver of the session's cluster: its actors die with it. (A private instance
        # would be ended whole by its watchdog: see test_ray.)
        env["RAY_ADDRESS"] = request.getfixturevalue("ray_cluster").address
    return env


def service_families() -> list[psutil.Process]:
    """This test's services, each with its supervisor and whatever it started."""
    found = []
    for service in app_processes():
        found += [service.parent(), service, *service.children(recursive=True)]
    return found


def test_services_die_with_a_client_killed_with_sigkill(backend, tmp_path, request) -> None:
    """No close(), no atexit: the lifeline's owner dies and the supervisors stop the groups.

    Locally the owner is the client; on Ray the site's service host, a Ray actor that
    dies with its driver.
    """
    script = tmp_path / "client.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, sys
            import psutil
            import federation as fed

            service = fed.Service("svc", {app("stubborn")!r}, ready_line="ready to serve", stop_grace=0.5)
            federation = fed.Federation([fed.Site("a", services=[service]), "b"],
                                        backend={backend!r}, pool_size=1)
            mine = [p.pid for p in psutil.Process().children(recursive=True)]
            print(" ".join(map(str, mine)), flush=True)
            sys.stdin.read()
            """
        )
    )
    with subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=_client_env(backend, request),
    ) as client:
        assert client.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(client.stdout, selectors.EVENT_READ)
            assert selector.select(2 * T), "the client did not start its federation in time"
        pids = [int(pid) for pid in client.stdout.readline().split()]
        assert len(app_processes()) == 1  # the service
        processes = [psutil.Process(pid) for pid in pids] + service_families()
        assert len(processes) >= 3  # a supervisor, the service, its child (and local workers)
        client.kill()
        assert client.wait(T) == -signal.SIGKILL

    def gone() -> bool:
        return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes)

    assert wait_until(gone, T), [p for p in processes if p.is_running()]


def test_a_federation_left_open_at_exit_stops_its_services_gracefully(backend, tmp_path, request) -> None:
    """Interpreter exit closes it: SIGTERM first (mirakuru's own exit hook would SIGKILL)."""
    script = tmp_path / "client.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            import federation as fed

            service = fed.Service("svc", {app("stubborn")!r}, ready_line="ready to serve", stop_grace=0.2)
            federation = fed.Federation([fed.Site("a", services=[service])], pool_size=1,
                                        backend={backend!r}, log_dir={str(tmp_path / "logs")!r})
            print("leaving it open", flush=True)
            """
        )
    )
    command = [sys.executable, str(script)]
    env = _client_env(backend, request)
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=2 * T, check=False)
    assert out.returncode == 0 and "leaving it open" in out.stdout, out.stderr
    assert "a service died" not in out.stderr
    assert "a/svc: got SIGTERM, ignoring it" in (tmp_path / "logs" / "a.log").read_text()


def test_a_fault_can_signal_a_sites_service(make_federation, records) -> None:
    """The seam faults will use: a signal to one site's service, not another's."""
    died = records(lambda r: "a service died" in r.getMessage())
    echo = tcp_service()
    federation = make_federation([fed.Site("a", services=[echo]), fed.Site("b", services=[echo])])
    services = federation._router.services
    assert services.signal("a", "echo", signal.SIGKILL)
    assert died.matched.wait(T)
    assert "site=a" in died.records[-1].getMessage()
    assert not services.signal("a", "echo", signal.SIGKILL)  # gone already
    assert federation.submit(ask_echo_at("b")).result(timeout=T) == "b"


def _until_refused() -> fed.Pipeline:
    """A step at ``a`` that asks its echo service until the connection is refused (at most T s)."""
    pipeline = fed.Pipeline("until-refused")

    @pipeline.step(site="a")
    def ask(ctx):
        import socket
        import time

        address = ctx.services["echo"]
        answers = 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((address.host, address.port), timeout=10) as conn:
                    conn.makefile().readline()
                    answers += 1
            except (ConnectionRefusedError, ConnectionResetError):  # killed between two, or mid-answer
                return f"refused after {answers} answers"
            time.sleep(0.01)  # the service is polled: its death is another process's doing
        return "never refused"

    pipeline.output(ask)
    return pipeline


def test_a_fault_plan_crashes_a_sites_service_and_only_that_one(make_federation, records) -> None:
    died = records(lambda r: "a service died" in r.getMessage())
    echo = tcp_service()
    federation = make_federation([fed.Site("a", services=[echo]), fed.Site("b", services=[echo])])
    plan = fed.FaultPlan(seed=3, faults=[fed.faults.Crash("a", service="echo", at=0.2)])
    job = federation.submit(_until_refused(), faults=plan)
    assert job.result(timeout=T).startswith("refused after")
    assert died.matched.wait(T)
    message = died.records[-1].getMessage()
    assert "site=a" in message and "SIGKILL(-9)" in message
    [event] = [e for e in job.timeline() if e.kind is fed.TimelineKind.FAULT]
    assert (event.site, event.detail["fault"], event.detail["service"], event.detail["seed"]) == (
        "a",
        "crash",
        "echo",
        3,
    )
    assert federation.submit(ask_echo_at("b")).result(timeout=T) == "b"


def test_a_fault_plan_pauses_a_sites_service_then_it_answers_again(make_federation) -> None:
    federation = make_federation([fed.Site("a", services=[tcp_service()])])
    plan = fed.FaultPlan(seed=1, faults=[fed.faults.Pause("a", 0.8, service="echo", at=0.1)])
    pipeline = fed.Pipeline("slow-answer")

    @pipeline.step(site="a")
    def ask(ctx):
        import socket
        import time

        # Asks until one answer is late (the pause began), at most 30 s: connected at once
        # (the kernel's backlog), answered only once the service runs again.
        address = ctx.services["echo"]
        deadline = time.monotonic() + 30
        while True:
            started = time.monotonic()
            with socket.create_connection((address.host, address.port), timeout=10) as conn:
                answer = conn.makefile().readline().strip()
            waited = time.monotonic() - started
            if waited >= 0.3 or started > deadline:
                return answer, waited

    pipeline.output(ask)
    job = federation.submit(pipeline, faults=plan)
    answer, waited = job.result(timeout=T)
    assert answer == "a" and 0.5 <= waited < 10
    [event] = [e for e in job.timeline() if e.kind is fed.TimelineKind.FAULT]
    assert (event.detail["fault"], event.detail["service"], event.detail["seconds"]) == ("pause", "echo", 0.8)
    assert federation.submit(ask_echo_at("a")).result(timeout=T) == "a"  # running again


def test_a_service_fault_names_a_declared_service_and_is_timed() -> None:
    with pytest.raises(fed.ConfigError, match="did you mean 'echo'"):
        fed.FaultPlan(faults=[fed.faults.Crash("a", service="ecko")]).check(["a"], services={"a": ["echo"]})
    with pytest.raises(fed.ConfigError, match="timed from the job's start"):
        fed.faults.Pause("a", 1.0, service="db", after=3)
    with pytest.raises(fed.ConfigError, match="name one site"):
        fed.faults.Crash(fed.faults.ALL, service="db")
    plan = fed.FaultPlan(seed=2, faults=[fed.faults.Pause("a", 2.0, service="db", at=0.5)])
    assert fed.FaultPlan.from_toml(plan.to_toml()) == plan
    assert "service='db'" in repr(plan)


def test_a_service_fault_for_a_service_the_site_lacks_is_refused_at_submit(make_federation) -> None:
    federation = make_federation([fed.Site("a", services=[tcp_service()]), "b"])
    plan = fed.FaultPlan(faults=[fed.faults.Crash("b", service="echo")])
    with pytest.raises(fed.ConfigError, match=r"site 'b' does not have.*services are \[\]"):
        federation.submit(ask_echo_at("a"), faults=plan)
    assert federation.submit(ask_echo_at("a")).result(timeout=T) == "a"  # nothing lost


def ask_echo_at(site: str) -> fed.Pipeline:
    pipeline = fed.Pipeline(f"ask-{site}")

    @pipeline.step(site=site)
    def ask(ctx):
        import socket

        address = ctx.services["echo"]
        with socket.create_connection((address.host, address.port), timeout=10) as conn:
            return conn.makefile().readline().strip()

    pipeline.output(ask)
    return pipeline


# -- on Ray: a site's services on its node --------------------------------------------------------

ray_only = pytest.mark.parametrize("backend", ["ray"])


@ray_only
def test_on_ray_a_sites_services_run_on_its_node_beside_its_actors(make_federation, ray_cluster) -> None:
    """Each site's service host is on the site's labelled node, its actors too, its services under it."""
    echo = tcp_service()
    federation = make_federation([fed.Site("a", services=[echo]), fed.Site("b", services=[echo]), "hub"])
    pipeline = fed.Pipeline("where-echo")

    @pipeline.step(sites=["a", "b"])
    def ask(ctx):
        import socket

        import ray

        address = ctx.services["echo"]
        with socket.create_connection((address.host, address.port), timeout=10) as conn:
            return ray.get_runtime_context().get_node_id(), conn.makefile().readline().strip()

    pipeline.output(ask)
    result = federation.submit(pipeline).result(timeout=T)
    services = federation._router.services
    for site in ("a", "b"):
        node = ray_cluster.node_id(site)
        assert services.node_of(site) == node
        assert result[site] == (node, site)  # the step ran on that node and reached its own service
    assert services.node_of("hub") is None
    serving = {service.environ()["SERVICE_SITE"]: service for service in app_processes()}
    for site, service in serving.items():  # under its supervisor, under the site's service host
        assert services.host_pid(site) in [parent.pid for parent in service.parents()]
    assert sorted(serving) == ["a", "b"]


@ray_only
def test_on_ray_services_die_with_their_service_host_and_that_is_logged(make_federation, records) -> None:
    """The host's process owns the lifelines: killed (as when its node goes), its services go too."""
    import ray

    lost = records(lambda r: "a service host died" in r.getMessage())
    federation = make_federation([fed.Site("a", services=[tcp_service(stop_grace=0.5)]), "b"])
    processes = service_families()
    assert len(processes) == 2  # the supervisor and the service
    services = federation._router.services
    ray.kill(services._hosts["a"].actor, no_restart=True)
    assert lost.matched.wait(T)
    [record] = [r for r in lost.records if "a service host died" in r.getMessage()]
    assert record.levelno == logging.ERROR and "site=a" in record.getMessage()
    assert wait_until(lambda: not any(p.is_running() and p.status() != "zombie" for p in processes), T)
    assert services.node_of("a") is None  # replacements of a's actors go anywhere on its nodes
    assert not services.signal("a", "echo", signal.SIGTERM)


@ray_only
def test_on_ray_a_supervisor_killed_alone_still_takes_its_services_group_down(
    make_federation, records
) -> None:
    """A Ray worker SIGKILLs its direct children as it exits, their groups left alone.

    Here: the host is frozen (it cannot clean up, as when it is exiting) and the
    supervisor its owner started is SIGKILLed; the supervisor's watcher stops the group.
    """
    died = records(lambda r: "a service died" in r.getMessage())
    stubborn = fed.Service("stubborn", app("stubborn"), ready_line="ready to serve", stop_grace=0.3)
    federation = make_federation([fed.Site("a", services=[stubborn]), "b"])
    host = psutil.Process(federation._router.services.host_pid("a"))
    [service] = app_processes()
    family = [service, *service.children()]
    supervisor = [
        p for p in service.parents() if any(part.endswith("_supervisor.py") for part in p.cmdline())
    ]
    assert supervisor[-1].ppid() == host.pid
    host.suspend()
    try:
        supervisor[-1].kill()
        assert wait_until(lambda: not any(p.is_running() and p.status() != "zombie" for p in family), T)
    finally:
        host.resume()
    assert died.matched.wait(T)


# -- config ---------------------------------------------------------------------------------------


def _config_error(build: Callable[[], object]) -> str:
    with pytest.raises(fed.ConfigError) as info:
        build()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_service_config_errors_name_the_field_and_what_is_allowed(tmp_path) -> None:
    assert _config_error(lambda: fed.Service("db", "postgres -p 5432", port=5432)).startswith(
        "command: must be a list of arguments, not a string: write shlex.split('postgres -p 5432')"
    )
    assert "unknown option 'ready_lien' (did you mean 'ready_line'?)" in _config_error(
        lambda: fed.Service("db", ["x"], ready_lien="ready")
    )
    assert "unknown placeholder {prot} (did you mean {port}?)" in _config_error(
        lambda: fed.Service("db", ["x", "{prot}"], port=0)
    )
    assert "uses {port} but has no port; give port=0" in _config_error(
        lambda: fed.Service("db", ["x", "{port}"])
    )
    assert "has no readiness check" in _config_error(lambda: fed.Service("db", ["x"]))
    assert "port: must be an integer from 0" in _config_error(lambda: fed.Service("db", ["x"], port=70000))
    assert "url: must be an http:// URL" in _config_error(lambda: fed.Service("db", ["x"], url="ftp://h/"))
    assert "is not a regular expression" in _config_error(lambda: fed.Service("db", ["x"], ready_line="("))
    assert "service name 'my db' is not allowed" in _config_error(lambda: fed.Service("my db", ["x"], port=0))
    assert "uses {data_dir} but the site has no data_dir" in _config_error(
        lambda: fed.Site("a", services=[fed.Service("db", ["x", "{data_dir}"], port=0)])
    )
    assert "service 'db' is listed twice" in _config_error(
        lambda: fed.Site("a", services=[fed.Service("db", ["x"], port=0)] * 2)
    )
    assert "must be a list of fed.Service(...) objects" in _config_error(
        lambda: fed.Site("a", services=["postgres"])
    )
    fixed = fed.Service("db", ["x"], port=5432)
    assert "services a/db and b/db both use port 5432 on 127.0.0.1" in _config_error(
        lambda: fed.Federation([fed.Site("a", services=[fixed]), fed.Site("b", services=[fixed])])
    )
    fed.Site("a", data_dir=tmp_path, services=[fed.Service("db", ["x", "{data_dir}", "{{literal}}"], port=0)])


def test_services_are_frozen_comparable_and_picklable() -> None:
    import pickle

    service = fed.Service("db", ["x", "{port}"], port=0, env={"A": "{site}"})
    assert service == fed.Service("db", command=["x", "{port}"], port=0, env={"A": "{site}"})
    assert pickle.loads(pickle.dumps(service)) == service
    assert service.command == ("x", "{port}") and service.ready_timeout == 30.0 and service.stop_grace == 10.0
    with pytest.raises(AttributeError):
        service.port = 1  # type: ignore[misc]
    site = fed.Site("a", services=[service])
    assert site.services == (service,)


def test_a_site_without_services_starts_no_services_thread_and_imports_no_mirakuru() -> None:
    code = (
        "import sys, threading, federation as fed; "
        "federation = fed.Federation(['a'], pool_size=1); "
        "print('mirakuru' in sys.modules, sorted(t.name for t in threading.enumerate())); "
        "federation.close()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.startswith("False") and "federation-services" not in out.stdout
