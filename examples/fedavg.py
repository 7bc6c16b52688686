"""Federated averaging on scikit-learn's digits: 10 sites, sampling, a quorum, a deadline, crashes.

Each round the hub broadcasts the weights of a softmax regression; a sample of
8 of the 10 sites (chosen per round, without rebuilding the pipeline) trains a
few epochs on its own shard and answers; the hub averages whatever at least
80 % of the sampled sites delivered within the deadline. One site crashes in
some rounds, chosen from a seed and injected by a fault plan (its worker is
killed; see docs/testing.md): the round goes on without it, and its slot is
repaired after the round. Each site counts its rounds in
its store (``ctx.store``, shared by the site's workers in every slot), and
per-round metrics go to ``fedavg_metrics.csv``.

The same rounds run without crashes, in process, give the reference accuracy.

Run it: ``python examples/fedavg.py`` (needs scikit-learn and numpy).
"""

from __future__ import annotations

import functools
import os
import random
import sys
import tempfile
import time
from typing import Any

import numpy as np

import federation as fed
from federation import faults

SITES = [f"site-{i}" for i in range(10)]
ROUNDS = 30
SAMPLE = 8
CRASH_RATE = 0.25  # the share of rounds in which one sampled site crashes
SEED = 7


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits, scaled; the first 1500 for training (split over the sites), the rest for testing."""
    from sklearn.datasets import load_digits  # in the client only: workers load their shard

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    return x[:1500], y[:1500], x[1500:], y[1500:]


def load_shard(path: str) -> dict[str, Any]:
    """A site's setup: its own tenth of the training data, from its data directory."""
    with np.load(path) as shard:
        return {"x": shard["x"], "y": shard["y"]}


def local_train(
    weights: np.ndarray, x: np.ndarray, y: np.ndarray, epochs: int = 5, lr: float = 0.5
) -> np.ndarray:
    """A few epochs of full-batch gradient descent of a softmax regression."""
    w = weights.copy()
    xb = np.hstack([x, np.ones((len(x), 1))])
    onehot = np.eye(10)[y]
    for _ in range(epochs):
        logits = xb @ w
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        w -= lr * xb.T @ (p - onehot) / len(x)
    return w


def accuracy(weights: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    xb = np.hstack([x, np.ones((len(x), 1))])
    return float(((xb @ weights).argmax(axis=1) == y).mean())


def plan_rounds() -> list[tuple[list[str], str | None]]:
    """Per round: the sampled sites, and the one that crashes (or None), from the seed."""
    rng = random.Random(SEED)
    rounds = []
    for _ in range(ROUNDS):
        sampled = sorted(rng.sample(SITES, SAMPLE))
        crash = rng.choice(sampled) if rng.random() < CRASH_RATE else None
        rounds.append((sampled, crash))
    return rounds


pipeline = fed.Pipeline("fedavg")


@pipeline.step(site="hub")
def broadcast(weights):
    """The hub sends the round's weights to the sampled sites."""
    return weights


@pipeline.step(sites=SITES)
def train(ctx, broadcast):
    """A site's local update."""
    rounds = ctx.store.update("rounds", lambda n: n + 1, default=0)
    w = local_train(broadcast, ctx.state["x"], ctx.state["y"])
    ctx.metric("local_accuracy", accuracy(w, ctx.state["x"], ctx.state["y"]))
    ctx.metric("rounds_here", rounds)
    return w, len(ctx.state["y"])


@pipeline.step(site="hub", bind={"updates": fed.quorum(train, min=0.8, deadline=10.0)})
def average(ctx, updates):
    """FedAvg over the sites that delivered, weighted by their sample counts."""
    total = sum(n for _, n in updates.values())
    ctx.metric("sites", len(updates))
    ctx.metric("missing", len(ctx.missing))
    return sum(w * (n / total) for w, n in updates.values())


pipeline.output(average)


def reference(rounds: list[tuple[list[str], str | None]]) -> float:
    """The same rounds in process, with no crash: the accuracy to match."""
    x, y, xt, yt = load_data()
    w = np.zeros((65, 10))
    for sampled, _ in rounds:
        updates = [
            (local_train(w, x[i::10], y[i::10]), len(y[i::10])) for i in (SITES.index(s) for s in sampled)
        ]
        total = sum(n for _, n in updates)
        w = sum(u * (n / total) for u, n in updates)
    return accuracy(w, xt, yt)


def main() -> None:
    rounds = plan_rounds()
    x, y, xt, yt = load_data()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        sites = []
        for i, name in enumerate(SITES):
            os.makedirs(os.path.join(root, name))
            shard = os.path.join(root, name, "shard.npz")
            np.savez(shard, x=x[i::10], y=y[i::10])
            sites.append(
                fed.Site(
                    name=name, data_dir=os.path.join(root, name), setup=functools.partial(load_shard, shard)
                )
            )
        with fed.Federation([*sites, "hub"], pool_size=2) as federation:
            w = np.zeros((65, 10))
            for number, (sampled, crash) in enumerate(rounds, 1):
                # The round's crash, if any, is a fault plan for this submit: the site's worker is
                # killed as its part of the job starts, and the timeline marks it.
                plan = fed.FaultPlan(seed=SEED, faults=[faults.Crash(crash)]) if crash else None
                job = federation.submit(pipeline, weights=w, participants={"train": sampled}, faults=plan)
                w = job.result(timeout=60)
                acc = accuracy(w, xt, yt)
                missing = {site: m.reason for site, m in job.missing.items()}
                print(
                    f"round {number:2d}: {len(sampled) - len(missing)}/{len(sampled)} sites, "
                    f"test accuracy {acc:.3f}" + (f", missing {missing}" if missing else "")
                )
            federation.metrics().to_csv("fedavg_metrics.csv")
            rounds_here = {site: federation.metrics().where(name="rounds_here", site=site) for site in SITES}
    elapsed = time.perf_counter() - started
    ref = reference(rounds)
    crashed = sum(1 for _, crash in rounds if crash)
    print(f"{ROUNDS} rounds, {crashed} with a crash, in {elapsed:.1f} s")
    counted = {site: int(max((r.value for r in recs), default=0)) for site, recs in rounds_here.items()}
    print(f"rounds each site counted in its store (across slots and crashes): {counted}")
    print(f"final accuracy {acc:.3f}; the same rounds without faults: {ref:.3f}")
    print("per-round metrics saved to fedavg_metrics.csv")
    if abs(acc - ref) > 0.01:
        sys.exit(f"accuracy {acc:.3f} is more than a point from the no-fault run's {ref:.3f}")


if __name__ == "__main__":
    main()
