"""A federated mean over three sites: two clinics compute local statistics, a hub averages them.

Run it: ``python examples/quickstart.py``
"""

from __future__ import annotations

import random
import time

import federation as fed

pipeline = fed.Pipeline("mean")


@pipeline.step(sites=["clinic-a", "clinic-b"])
def local_stats(ctx, threshold):
    """Runs at each clinic, on data that never leaves it: only counts and sums do."""
    kept = [v for v in ctx.state["values"] if v > threshold]
    ctx.log.info("local statistics", kept=len(kept))
    return {"n": len(kept), "sum": sum(kept)}


@pipeline.step(site="hub")
def mean(local_stats):
    """Runs at the hub with {site: value} from the clinics."""
    n = sum(s["n"] for s in local_stats.values())
    return sum(s["sum"] for s in local_stats.values()) / n


pipeline.output(mean)


def load_a():
    rng = random.Random(1)
    return {"values": [rng.random() for _ in range(1000)]}


def load_b():
    rng = random.Random(2)
    return {"values": [rng.random() for _ in range(1500)]}


def main() -> None:
    sites = [fed.Site("clinic-a", setup=load_a), fed.Site("clinic-b", setup=load_b), "hub"]
    started = time.perf_counter()
    with fed.Federation(sites=sites, backend="process", pool_size=4) as federation:
        print(f"federation of {len(federation.sites)} sites ready in {time.perf_counter() - started:.2f} s")
        job = federation.submit(pipeline, threshold=0.5)
        print(f"mean of values above 0.5: {job.result(timeout=30):.4f}")
        # Warm every slot once: a worker imports structlog the first time a step logs.
        for warm in [federation.submit(pipeline, threshold=0.5) for _ in range(8)]:
            warm.result(timeout=30)
        started = time.perf_counter()
        rounds = 200
        for i in range(rounds):
            federation.submit(pipeline, threshold=i / rounds).result(timeout=30)
        elapsed = time.perf_counter() - started
        print(f"{rounds} more jobs in {elapsed:.2f} s ({elapsed / rounds * 1000:.2f} ms per job)")


if __name__ == "__main__":
    main()
