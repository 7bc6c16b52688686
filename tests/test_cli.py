"""The ``federation`` command, driven in a subprocess: its output and its exit codes.

Exit codes: 0 ok, 1 job failed, 2 usage error, 3 federation error, 4 timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def run_cli(
    *args: str, cwd: Path | None = None, pythonpath: list[Path] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m federation ARGS`` with the checkout and this directory importable."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("FEDERATION_")}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (pythonpath or [ROOT, TESTS]))
    env.pop("PYTHONSTARTUP", None)
    return subprocess.run(
        [sys.executable, "-m", "federation", *args],
        cwd=cwd or TESTS,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("federation"), lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


# -- help and usage -----------------------------------------------------------------------


def test_help_lists_every_command_and_the_exit_codes() -> None:
    """'federation --help' names each command and the exit codes scripts can rely on."""
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for word in ("demo", "run", "bench", "doctor", "exit codes", "1 job failed", "2 usage error"):
        assert word in result.stdout


@pytest.mark.parametrize("command", ["demo", "run", "bench", "doctor"])
def test_every_command_has_help(command: str) -> None:
    """Each command explains itself with --help and exits 0."""
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: federation {command}")


def test_version() -> None:
    """--version prints the distribution's name and version."""
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("federation-executor ")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "required"),
        (["run", "cli_pipelines:mean", "--pool-size", "many"], "--pool-size: expected a whole number"),
        (["run", "cli_pipelines:mean", "--timeout", "-1"], "--timeout: expected a positive number"),
        (["demo", "--backend", "carrier-pigeon"], "invalid choice: 'carrier-pigeon'"),
    ],
)
def test_a_bad_argument_is_one_line_and_exit_code_2(args: list[str], needle: str) -> None:
    """A malformed command line exits 2 with one line on stderr naming the problem."""
    result = run_cli(*args)
    assert result.returncode == 2
    assert needle in one_error_line(result)
    assert result.stdout == ""


# -- demo ---------------------------------------------------------------------------------


def test_demo_prints_results_and_a_timeline_summary(backend: str, tmp_path: Path) -> None:
    """The demo's federated mean equals the central one, and its timeline covers every site."""
    timeline = tmp_path / "demo.html"
    result = run_cli("demo", "--backend", backend, "--jobs", "3", "--timeline", str(timeline))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    federated = out.split("mean of the values above 0.3: ")[1].split()[0]
    central = out.split("all the data in one place: ")[1].split()[0]
    assert federated == central
    assert "3 more jobs" in out
    summary = out.split("Timeline of the last job")[1]
    for needle in ("finished after", "clinic-a:", "clinic-b:", "hub:", "local_stats", "mean", "-> hub"):
        assert needle in summary
    assert timeline.is_file() and 'data-site="clinic-a"' in timeline.read_text()


def test_demo_runs_on_forked_workers() -> None:
    """--start-method forkserver gives the same federated mean as spawned workers."""
    result = run_cli("demo", "--start-method", "forkserver", "--jobs", "1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    federated = out.split("mean of the values above 0.3: ")[1].split()[0]
    assert federated == out.split("all the data in one place: ")[1].split()[0]


def test_a_start_method_the_backend_cannot_use_is_a_config_error() -> None:
    """A forkserver for thread workers is a usage error: exit 2, one line saying what is needed."""
    result = run_cli("demo", "--backend", "thread", "--start-method", "forkserver")
    assert result.returncode == 2
    assert "needs backend='process'" in one_error_line(result)


# -- run ----------------------------------------------------------------------------------


def test_run_prints_the_result(backend: str, tmp_path: Path) -> None:
    """'run module:pipeline' runs it on the named sites with literal inputs, and writes its timeline."""
    trace = tmp_path / "trace.json"
    result = run_cli(
        "run",
        "cli_pipelines:mean",
        "--sites",
        "a,b,hub",
        "--input",
        "threshold=0.5",
        "--backend",
        backend,
        "--json",
        "--timeline",
        str(trace),
    )
    assert result.returncode == 0, result.stderr
    value = json.loads(result.stdout)
    assert value["n"] == 5 and value["mean"] == pytest.approx((0.6 + 0.9 + 0.7 + 0.8 + 0.95) / 5)
    assert "traceEvents" in json.loads(trace.read_text())


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("value=0.5", "float", 0.5),
        ("value=[1, 2]", "list", [1, 2]),
        ("value='quoted'", "str", "quoted"),
        ("value=plain words", "str", "plain words"),
        ("value={'k': None}", "dict", {"k": None}),
    ],
)
def test_run_parses_inputs_as_literals_or_strings(text: str, kind: str, value: object) -> None:
    """--input values are Python literals when they parse as one, strings otherwise."""
    result = run_cli("run", "cli_pipelines:echo", "--input", text, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"type": kind, "value": value}


def test_run_defaults_to_the_pipelines_sites() -> None:
    """Without --sites, the federation has the sites the pipeline names."""
    result = run_cli("run", "cli_pipelines:mean", "-i", "threshold=0.85")
    assert result.returncode == 0, result.stderr
    assert "'n': 2" in result.stdout


def test_a_failed_job_exits_1_with_one_line(backend: str) -> None:
    """A step that raises: exit code 1 and one line naming the step, the site and the error."""
    result = run_cli("run", "cli_pipelines:fails", "--input", "reason=the data is bad", "--backend", backend)
    assert result.returncode == 1
    line = one_error_line(result)
    assert "StepFailedError" in line and "'explode'" in line and "the data is bad" in line
    assert "--debug" in line


def test_debug_shows_the_traceback() -> None:
    """With --debug the traceback is printed before the error line."""
    result = run_cli("--debug", "run", "cli_pipelines:fails", "--input", "reason=bad")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ValueError: bad" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("federation: error: StepFailedError")


def test_run_timeout_exits_4() -> None:
    """A job still running at --timeout is cancelled, and the exit code is 4."""
    result = run_cli("run", "cli_pipelines:slow", "--input", "seconds=60", "--timeout", "0.5")
    assert result.returncode == 4
    assert "did not end within 0.5 s" in one_error_line(result)


@pytest.mark.parametrize(
    ("target", "inputs", "needle"),
    [
        ("no_such_module:mean", [], "cannot import module 'no_such_module'"),
        ("cli_pipelines:nothing", [], "has no attribute 'nothing'"),
        ("cli_pipelines:not_a_pipeline", [], "is a int, not a federation Pipeline"),
        ("cli_pipelines", [], "expected MODULE:PIPELINE"),
        ("cli_pipelines:mean", [], "needs input(s) ['threshold']"),
        ("cli_pipelines:mean", ["--input", "threshold"], "--input takes NAME=VALUE"),
        ("cli_pipelines:mean", ["--input", "nope=1", "--input", "threshold=1"], "has no input 'nope'"),
        ("cli_pipelines:mean", ["--sites", "a,hub", "-i", "threshold=1"], "'b'"),
    ],
)
def test_run_usage_errors_exit_2(target: str, inputs: list[str], needle: str) -> None:
    """Bad modules, pipelines, inputs and sites exit 2 with one line."""
    result = run_cli("run", target, *inputs)
    assert result.returncode == 2, result.stderr
    assert needle in one_error_line(result)


def test_an_invalid_site_name_is_a_usage_error() -> None:
    """A site name the configuration refuses exits 2, naming the site."""
    result = run_cli("run", "cli_pipelines:echo", "--sites", "a,bad/name", "-i", "value=1")
    assert result.returncode == 2
    line = one_error_line(result)
    assert "ConfigError" in line and "bad/name" in line


def test_a_federation_that_cannot_start_exits_3(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Workers that cannot start are a federation error: exit code 3, one line (in-process: main())."""
    import federation as fed
    import federation._federation
    from federation._cli import EXIT_FEDERATION_ERROR, main

    class Unstartable:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise fed.SiteStartError(
                "a worker of site 'a' failed to start",
                site="a",
                remote_traceback="Traceback ...\nImportError: x",
            )

    monkeypatch.setattr(federation._federation, "Federation", Unstartable)
    assert main(["run", "cli_pipelines:echo", "-i", "value=1"]) == EXIT_FEDERATION_ERROR
    err = capsys.readouterr().err
    assert (
        err == "federation: error: SiteStartError: a worker of site 'a' failed to start "
        "(run with --debug for the traceback)\n"
    )


# -- bench --------------------------------------------------------------------------------


def test_bench_without_a_checkout_exits_2(tmp_path: Path) -> None:
    """Installed without its source checkout, 'bench' says where the suite lives and exits 2."""
    shutil.copytree(ROOT / "federation", tmp_path / "site" / "federation")
    result = run_cli("bench", cwd=tmp_path, pythonpath=[tmp_path / "site"])
    assert result.returncode == 2
    assert "no benchmark suite here" in one_error_line(result)


def test_bench_runs_the_suite_and_passes_arguments_and_exit_code(tmp_path: Path) -> None:
    """'bench' runs 'python -m benchmarks' found in the current directory; args and exit code pass through."""
    suite = tmp_path / "benchmarks"
    suite.mkdir()
    (suite / "__init__.py").write_text("")
    (suite / "__main__.py").write_text("import sys\nprint('suite got', sys.argv[1:])\nsys.exit(5)\n")
    result = run_cli("bench", "--", "--quick", "latency", cwd=tmp_path)
    assert result.returncode == 5
    assert "suite got ['--quick', 'latency']" in result.stdout


# -- doctor -------------------------------------------------------------------------------


def test_doctor_describes_the_environment() -> None:
    """'doctor' prints Python, platform, start method, CPUs, memory, limits, /dev/shm and versions."""
    result = run_cli("doctor")
    assert result.returncode == 0, result.stderr
    for key in (
        "python:",
        "platform:",
        "start method:",
        "cpus:",
        "memory:",
        "open files:",
        "/dev/shm:",
        "extras:",
        "pydantic:",
        "cloudpickle:",
        "psutil:",
        "structlog:",
        "ray:",
        "matplotlib:",
    ):
        assert key in result.stdout
    report = json.loads(run_cli("doctor", "--json").stdout)
    assert report["cpu_count"] >= 1 and report["open_files_limit"]["soft"] != 0
    assert report["packages"]["pydantic"] is not None


def test_a_reader_that_goes_away_is_not_an_error() -> None:
    """'federation doctor | head -1': no traceback, no error line, exit code 141 (SIGPIPE's)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("FEDERATION_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS)])
    process = subprocess.Popen(
        [sys.executable, "-m", "federation", "doctor"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # before the command writes a line
    err = process.stderr.read()
    assert process.wait(timeout=60) == 141
    assert err == ""
