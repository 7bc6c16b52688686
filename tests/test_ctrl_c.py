"""Ctrl+C while the client waits on a job: the client exits promptly and leaves nothing running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil

T = 30  # the longest any single wait in these tests may take

# cancel_grace is far longer than T: if Ctrl+C waited for it (the step below ignores
# cancellation), the client would outlive the test's wait. Nothing times the exit itself.
CLIENT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import federation as fed
    from pipelines import slow_pipeline
    try:
        with fed.Federation(["a", "b"], pool_size=1, cancel_grace=120.0) as federation:
            job = federation.submit(slow_pipeline(cooperative=False), seconds=120)
            while job.status is not fed.JobStatus.RUNNING:
                time.sleep(0.01)
            print("ready", flush=True)
            job.result(timeout=60)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
    """
)


def _interrupt(
    tmp_path: Path, source: str
) -> tuple[int | None, str, str, list[psutil.Process], list[psutil.Process]]:
    """Run ``source`` as a client; once it says "ready", send it SIGINT.

    Returns its exit code, stdout, stderr, the workers it had when interrupted
    and those of them still running a moment after it exited.
    """
    script = tmp_path / "client.py"
    script.write_text(source)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    client = subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "ready"
        workers = psutil.Process(client.pid).children()
        client.send_signal(signal.SIGINT)
        out, err = client.communicate(timeout=T)
        _, alive = psutil.wait_procs(workers, timeout=5.0)
        return client.returncode, out, err, workers, alive
    finally:
        client.kill()
        client.communicate(timeout=T)


def test_ctrl_c_in_result_exits_without_the_cancel_grace(tmp_path: Path) -> None:
    code, out, err, workers, alive = _interrupt(tmp_path, CLIENT.format(tests=str(Path(__file__).parent)))
    assert len(workers) == 2
    assert code == 130, err
    assert "interrupted" in out
    # No warning the user did not ask for: the slot is not "killed after the grace".
    assert "did not stop in time" not in err, err
    assert "warning" not in err.lower(), err
    assert not alive, f"workers left running: {alive}"


def test_ctrl_c_anywhere_in_the_with_block_exits_without_the_cancel_grace(tmp_path: Path) -> None:
    """The signal may land between statements, not inside a wait on a job: same prompt exit."""
    source = CLIENT.format(tests=str(Path(__file__).parent)).replace(
        "job.result(timeout=60)", "time.sleep(60)"
    )
    assert "time.sleep(60)" in source
    code, _out, err, _workers, alive = _interrupt(tmp_path, source)
    assert code == 130, err
    assert "warning" not in err.lower(), err
    assert not alive, f"workers left running: {alive}"
