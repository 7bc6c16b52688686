"""Cold start as a user sees it: a fresh ``python script.py``, from process start.

Every other scenario runs in the benchmark's own, warm process: federation is
already imported, and the interpreter's caches are hot. A user's script pays for
all of it: the interpreter's start, ``import federation``, building the
``Federation``, the workers' boot, then the first job. This scenario runs a
small script (:data:`SCRIPT`) in a fresh interpreter, several times, and reports
medians of:

* process start -> the first job's result, with default settings
  (``Federation(sites=["a", "b", "hub"], pool_size=4)``, one 3-site job);
* process start -> the first job's result with ``wait_ready=False`` (the
  constructor returns once the first slot is ready; the rest start meanwhile);
* process start -> all 12 workers ready (``wait_ready=True``, a run of its own);
* the client's own CPU time for ``import federation`` and building the
  ``Federation`` until it starts its first worker process (the forkserver, with
  ``start_method="forkserver"``): the work that delays every worker's boot;
* the client's CPU time until the first result, and the interpreter's own start
  (process start -> the script's first line), for context.

"Process start" is the benchmark's ``time.monotonic()`` just before it starts
the child; the child reports ``time.monotonic()`` at each mark (one clock for
the whole machine on Linux).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .measure import Measured, median

__all__ = ["MODES", "SCRIPT", "cold_start", "run_script"]

MODES = ("first", "eager", "ready")

#: The user's script: argv is ``MODE START_METHOD``; MODE is ``first`` (defaults, one
#: job), ``eager`` (``wait_ready=False``, one job) or ``ready`` (``wait_ready=True``,
#: no job). Prints one JSON line of marks.
SCRIPT = """\
import time

STARTED = time.monotonic()
CPU_STARTED = time.process_time()

import subprocess
import sys

_spawned = []
_popen_init = subprocess.Popen.__init__


def _mark_first_process(self, *args, **kwargs):
    # The first process the federation starts (a worker, or the forkserver).
    if not _spawned:
        _spawned.append((time.monotonic(), time.process_time()))
    _popen_init(self, *args, **kwargs)


subprocess.Popen.__init__ = _mark_first_process

mode, start_method = sys.argv[1], sys.argv[2]
options = {} if start_method == "spawn" else {"start_method": start_method}
if mode == "eager":
    options["wait_ready"] = False

import federation as fed

IMPORTED = time.monotonic()

pipeline = fed.Pipeline("cold-start")


@pipeline.step(sites=["a", "b"])
def local(x):
    return x + 1


@pipeline.step(site="hub")
def total(local):
    return sum(local.values())


pipeline.output(total)

marks = {}
if mode == "ready":
    with fed.Federation(sites=["a", "b", "hub"], pool_size=4, wait_ready=True, **options) as federation:
        marks["ready"] = time.monotonic()
else:
    with fed.Federation(sites=["a", "b", "hub"], pool_size=4, **options) as federation:
        marks["built"] = time.monotonic()
        result = federation.submit(pipeline, x=1).result(timeout=60)
        marks["first"] = time.monotonic()
        marks["cpu_first"] = time.process_time()
        assert result == 4, result
marks.update(
    started=STARTED,
    cpu_started=CPU_STARTED,
    imported=IMPORTED,
    spawned=_spawned[0][0],
    cpu_spawned=_spawned[0][1],
)
import json

print(json.dumps(marks), flush=True)
"""


def run_script(path: Path, mode: str, start_method: str, timeout: float) -> dict[str, float]:
    """Run the script once in a fresh interpreter; its marks, relative to process start."""
    env = dict(os.environ)
    env.pop("PYTHONSTARTUP", None)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(path), mode, start_method],
        cwd=path.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the cold-start script failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    marks = json.loads(proc.stdout.strip().splitlines()[-1])
    relative = {key: value - started for key, value in marks.items() if not key.startswith("cpu")}
    relative.update({key: value for key, value in marks.items() if key.startswith("cpu")})
    return relative


def cold_start(repeats: int, timeout: float) -> Measured:
    """Medians over ``repeats`` fresh scripts per start method and mode (runs alternate)."""
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="federation-cold-") as folder:
        path = Path(folder) / "script.py"
        path.write_text(SCRIPT, encoding="utf-8")
        run_script(path, "first", "spawn", timeout)  # page cache, .pyc files: not what is measured
        for _ in range(repeats):
            for start_method in ("spawn", "forkserver"):
                for mode in MODES:
                    runs.setdefault((start_method, mode), []).append(
                        run_script(path, mode, start_method, timeout)
                    )
    measured: Measured = {}
    for start_method in ("spawn", "forkserver"):
        prefix = "" if start_method == "spawn" else "forkserver_"
        first = runs[(start_method, "first")]
        ready = runs[(start_method, "ready")]
        measured[f"{prefix}first_job_s"] = median(r["first"] for r in first)
        measured[f"{prefix}first_job_eager_s"] = median(r["first"] for r in runs[(start_method, "eager")])
        measured[f"{prefix}all_ready_s"] = median(r["ready"] for r in ready)
        measured[f"{prefix}client_cpu_s"] = median(r["cpu_spawned"] - r["cpu_started"] for r in first)
        if start_method == "spawn":
            measured["interpreter_s"] = median(r["started"] for r in first)
            measured["imported_s"] = median(r["imported"] for r in first)
            measured["first_process_s"] = median(r["spawned"] for r in first)
            measured["built_s"] = median(r["built"] for r in first)
            measured["client_cpu_first_job_s"] = median(r["cpu_first"] - r["cpu_started"] for r in first)
    return measured
