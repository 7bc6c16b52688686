"""The benchmark suite: federation side by side with its baselines, in one run.

Run it with ``python -m benchmarks`` (``--help`` lists the options) or
``nox -s bench``. It measures nine scenarios (job latency, job throughput,
token throughput, large payloads, pool start, failure detection, close,
footprint, and cold start in a fresh interpreter) on the process backend and
on the baselines that do the same work:

* a raw ``multiprocessing.Pipe`` between pre-spawned processes (the floor);
* ``concurrent.futures.ProcessPoolExecutor`` with chained submissions;
* Ray actors, one per site, when ``ray`` is importable.

It prints a table (rich) with every baseline as a ratio against federation and
whether each target of the performance issue is met, and writes the same
numbers as JSON with ``--json PATH``.

This package is imported by federation's workers, the pipe processes and Ray's
actors (the step functions live in :mod:`benchmarks.workloads`), so this module
imports nothing.
"""

from __future__ import annotations

__all__: list[str] = []
