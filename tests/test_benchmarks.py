"""The benchmark suite runs end to end and writes well-formed JSON.

Only the shape of the output is checked, never a speed: tests do not assert
wall-clock times.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LATENCY_METRICS = {
    "one_site_p50_ms",
    "two_site_p50_ms",
    "two_site_p95_ms",
    "two_site_p99_ms",
    "fan_out_p50_ms",
    "fan_out_p95_ms",
    "fan_out_p99_ms",
}


def test_quick_latency_run_prints_a_table_and_writes_json(tmp_path: Path) -> None:
    """``python -m benchmarks --quick --scenario latency --no-ray --json PATH`` exits 0 with a full report."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--scenario",
            "latency",
            "--no-ray",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2-site p50" in proc.stdout
    assert "skipped" in proc.stdout  # the Ray column is skipped, and the table says so

    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["schema"] == "federation-bench/1"
    assert data["meta"]["quick"] is True
    assert data["engines"]["federation"]["ran"] is True
    assert data["engines"]["ray"]["ran"] is False
    assert data["engines"]["ray"]["skipped"]
    assert list(data["scenarios"]) == ["latency"]

    latency = data["scenarios"]["latency"]
    assert latency["errors"] == {}
    assert set(latency["metrics"]) == LATENCY_METRICS
    for key, metric in latency["metrics"].items():
        assert metric["unit"] == "ms", key
        assert metric["better"] == "lower", key
        assert {"federation", "pipe", "process-pool"} <= set(metric["values"]), key
        for engine, value in metric["values"].items():
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, engine, value)
        for engine, ratio in metric["ratios"].items():
            assert isinstance(ratio, float) and ratio > 0, (key, engine, ratio)
    target = latency["metrics"]["two_site_p50_ms"]["target"]
    assert target["text"]
    assert target["met"] in (True, False)


def test_each_target_is_checked_on_the_engine_it_names() -> None:
    """A process-backend target is never judged on federation on Ray, nor a Ray target on the process backend.

    When federation on Ray ran, the table compares the Ray actors' column with
    it; a target written for the process backend must still compare the process
    backend with Ray, and the Ray target federation on Ray with the Ray actors.
    """
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.measure import METRICS
        from benchmarks.report import Report
    finally:
        sys.path.remove(str(ROOT))

    metric = next(m for m in METRICS if m.key == "two_site_p50_ms")

    def status(values: dict[str, float]) -> tuple[str, bool | None]:
        report = Report(meta={}, scenarios=["latency"], engines=list(values))
        for engine, value in values.items():
            report.add("latency", engine, {"two_site_p50_ms": value})
        return report.target_status(metric)

    fast = {"federation": 0.12, "pipe": 0.05, "ray": 1.2}
    assert status(fast) == ("met, federation on Ray not run", True)
    assert status({**fast, "fed-ray": 1.5}) == ("met", True)  # 1.25x the actors, and 10x Ray on process
    assert status({**fast, "fed-ray": 1.7})[1] is False  # 1.42x the actors
    assert status({**fast, "pipe": 0.03})[1] is False  # 4x the Pipe floor
    assert status({**fast, "federation": 0.3, "fed-ray": 1.5})[1] is False  # only 4x Ray
