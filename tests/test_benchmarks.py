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
