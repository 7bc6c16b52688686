"""The services examples, run as users run them: a process each, checked by what they print.

``site_databases`` needs PostgreSQL's programs; where they are missing it says
"skipped: <why>" and so does this test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from conftest import wait_until

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(name: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _running_with(text: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if text in " ".join(proc.cmdline()) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_every_site_serves_its_own_records_over_http() -> None:
    out = _run("site_services.py")
    assert "clinic-a: 23 records above 0.9 (of 200" in out and "total: 95" in out


def test_every_clinic_counts_in_its_own_postgresql() -> None:
    out = _run("site_databases.py")
    if out.startswith("skipped:"):
        pytest.skip(out.strip())
    assert "clinic-a: 245 of 600 patients aged 65+" in out
    assert "clinic-b: 351 of 900 patients aged 65+" in out and "total: 596" in out
    base = out.splitlines()[0].removeprefix("data directories under ").strip()
    assert base.startswith("/") and wait_until(lambda: not _running_with(base), 30), _running_with(base)
