"""Logs by site, job and step: structlog, stdlib logging, raw fd writes, per-site files, presets."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import wait_until

import federation as fed

T = 30
process_only = pytest.mark.parametrize("backend", ["process"])


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _chatty() -> fed.Pipeline:
    pipeline = fed.Pipeline("chatty")

    @pipeline.step(site="a")
    def talk(ctx):
        import logging
        import os

        logging.getLogger("their.library").warning("disk is %s%% full", 97)
        ctx.log.warning("structured", rows=3)
        print("printed by python", flush=True)
        os.write(1, b"written to fd 1 like a C extension\n")
        return ctx.job_id

    pipeline.output(talk)
    return pipeline


# On the thread backend a step's stdlib records are the client's own: its logging handles them.
@pytest.mark.parametrize("backend", ["process", "ray"], indirect=True)
def test_stdlib_logging_in_a_step_reaches_the_client_tagged(make_federation) -> None:
    keep = _Keep()
    logger = logging.getLogger("federation")
    logger.addHandler(keep)
    try:
        federation = make_federation(["a", "b"], echo_worker_output=False)
        job_id = federation.submit(_chatty()).result(timeout=T)
        assert wait_until(lambda: any("disk is 97% full" in r.getMessage() for r in keep.records))
    finally:
        logger.removeHandler(keep)
    record = next(r for r in keep.records if "disk is 97% full" in r.getMessage())
    message = record.getMessage()
    assert record.name == "federation.site.a" and record.levelno == logging.WARNING
    assert "origin=their.library" in message and f"job_id={job_id}" in message and "step=talk" in message


@process_only
def test_log_dir_has_one_file_per_site_with_everything(make_federation, tmp_path) -> None:
    federation = make_federation(["a", "b"], log_dir=tmp_path / "run", echo_worker_output=False)
    job_id = federation.submit(_chatty()).result(timeout=T)
    federation.close()
    text = (tmp_path / "run" / "a.log").read_text()
    assert "structured" in text and f"job_id={job_id}" in text and "rows=3" in text
    assert "disk is 97% full" in text
    assert "printed by python" in text
    assert "written to fd 1 like a C extension" in text
    assert (
        not (tmp_path / "run" / "b.log").exists()
        or "structured" not in (tmp_path / "run" / "b.log").read_text()
    )


def test_production_preset_logs_json(tmp_path) -> None:
    script = tmp_path / "client.py"
    script.write_text(
        textwrap.dedent(
            """
            import federation as fed
            pipeline = fed.Pipeline("p")
            @pipeline.step(site="a")
            def warn(ctx):
                ctx.log.warning("careful", level_of_care=2)
                return 1
            pipeline.output(warn)
            with fed.Federation(["a"], pool_size=1) as federation:
                federation.submit(pipeline).result(timeout=30)
            """
        )
    )
    env = {**os.environ, "FEDERATION_LOG_PRESET": "production", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    careful = [r for r in records if r.get("event") == "careful"]
    assert careful and careful[0]["site"] == "a" and careful[0]["level_of_care"] == 2
    assert careful[0]["level"] == "warning" and "job_id" in careful[0]


def test_site_log_files_write_json_when_asked(tmp_path, monkeypatch) -> None:
    from federation._log import SiteLogFiles

    monkeypatch.setenv("FEDERATION_LOG_FORMAT", "json")
    files = SiteLogFiles(tmp_path)
    files.record("a", "info", "hello", {"job_id": 3})
    files.output("a", "a/slot-0", "raw line")
    files.close()
    lines = [json.loads(line) for line in Path(tmp_path / "a.log").read_text().splitlines()]
    assert lines[0]["event"] == "hello" and lines[0]["job_id"] == 3
    assert lines[1] == {**lines[1], "level": "output", "worker": "a/slot-0", "line": "raw line"}


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_step_stdout_reaches_client_stdout_and_stderr_its_stderr(tmp_path: Path, start_method: str) -> None:
    """What a step prints goes to the client's stream of the same name, from Python and from fd writes."""
    script = tmp_path / "client.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, sys
            import federation as fed
            pipeline = fed.Pipeline("p")
            @pipeline.step(site="a")
            def talk():
                print("py-out")
                print("py-err", file=sys.stderr)
                os.write(1, b"fd-out\\n")
                os.write(2, b"fd-err\\n")
                return 1
            pipeline.output(talk)
            with fed.Federation(["a"], pool_size=1, start_method={start_method!r}) as federation:
                federation.submit(pipeline).result(timeout=30)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    for line in ("py-out", "fd-out"):
        assert f"[a/slot-0] {line}" in out.stdout.splitlines(), (out.stdout, out.stderr)
        assert line not in out.stderr
    for line in ("py-err", "fd-err"):
        assert f"[a/slot-0] {line}" in out.stderr.splitlines(), (out.stdout, out.stderr)
        assert line not in out.stdout
