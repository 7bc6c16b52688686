"""The scaling scenario: what grows with the number of sites.

For 2, 8, 32, 64 and 100 sites (one of them the hub): a fan-out over every
other site gathered at the hub, warm, on the process backend (forkserver) and
on the thread backend; the time until a pool of 2 slots is ready, spawned and
forked; and the memory of each idle worker (RSS and USS). The figures also go
to a PNG plot, one panel per figure against the number of sites.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import federation as fed

from .measure import SCALING_SIZES as SIZES
from .measure import Measured, Settings, memory_per_process, percentile

__all__ = ["SIZES", "fan_in_pipeline", "plot_scaling", "scaling"]

PLOT = Path(os.environ.get("FEDERATION_BENCH_PLOTS", "benchmark-plots")) / "scaling.png"


def _sites(n: int) -> list[str]:
    return [f"s{i}" for i in range(n - 1)] + ["hub"]


def fan_in_pipeline(sites: list[str]) -> fed.Pipeline:
    """``local`` at every site but the hub, gathered by ``gather`` at the hub."""
    pipeline = fed.Pipeline(f"bench-fan-in-{len(sites)}")

    @pipeline.step(sites=sites[:-1])
    def local(x):
        return x

    @pipeline.step(site=sites[-1])
    def gather(local):
        return len(local)

    pipeline.output(gather)
    return pipeline


def _warm_p50(federation: fed.Federation, pipeline: fed.Pipeline, n: int, s: Settings) -> float:
    for i in range(max(5, s.scaling_jobs // 10)):
        if federation.submit(pipeline, x=i).result(timeout=s.timeout) != n - 1:
            raise AssertionError(f"{n} sites: the hub did not gather every site")
    times = []
    for i in range(s.scaling_jobs):
        started = time.perf_counter()
        federation.submit(pipeline, x=i).result(timeout=s.timeout)
        times.append(time.perf_counter() - started)
    return percentile(times, 50) * 1e3


def scaling(s: Settings) -> Measured:
    """Measure every size; write the plot; the figures keyed by what and how many sites."""
    measured: Measured = {}
    for n in SIZES:
        sites = _sites(n)
        pipeline = fan_in_pipeline(sites)
        pipeline.compile(sites)
        for method in ("forkserver", "spawn"):
            started = time.perf_counter()
            with fed.Federation(sites, pool_size=2, start_method=method, shutdown_timeout=30) as federation:
                measured[f"ready_{method}_s_{n}"] = time.perf_counter() - started
                if method == "forkserver":
                    measured[f"fan_in_p50_ms_{n}"] = _warm_p50(federation, pipeline, n, s)
                    workers = [w.pid for w in federation.stats().workers if w.pid is not None]
                    rss, uss = memory_per_process(workers)
                    measured[f"rss_mib_{n}"] = rss
                    measured[f"uss_mib_{n}"] = uss
        with fed.Federation(sites, pool_size=1, backend="thread") as federation:
            measured[f"thread_p50_ms_{n}"] = _warm_p50(federation, pipeline, n, s)
    plot_scaling(measured, PLOT)
    return measured


def plot_scaling(measured: Measured, path: Path) -> Path | None:
    """Draw each figure against the number of sites into ``path``; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = (
        ("warm fan-in job, p50 (ms)", (("fan_in_p50_ms", "forkserver"), ("thread_p50_ms", "thread"))),
        ("pool of 2 slots ready (s)", (("ready_spawn_s", "spawn"), ("ready_forkserver_s", "forkserver"))),
        ("memory per idle worker (MiB)", (("rss_mib", "RSS"), ("uss_mib", "USS"))),
    )
    figure, axes = plt.subplots(1, len(panels), figsize=(13, 3.8))
    for axis, (title, series) in zip(axes, panels, strict=True):
        for key, label in series:
            xs = [n for n in SIZES if f"{key}_{n}" in measured]
            axis.plot(xs, [measured[f"{key}_{n}"] for n in xs], marker="o", label=label)
        axis.set_title(title)
        axis.set_xlabel("sites")
        axis.set_xticks(list(SIZES), [str(n) for n in SIZES])
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
