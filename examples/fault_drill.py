"""A fault drill: federated averaging on scikit-learn's digits under a seeded fault plan.

Six sites train a softmax regression on their own shard; each round the hub
broadcasts the weights and averages what at least 60 % of the sites delivered
within the deadline (``fed.quorum``, as in ``fedavg.py``). The fault plan, a
seed and three lines, is the federation's:

* ``site-1`` crashes in round 4 (its worker is killed mid-round);
* ``site-2``'s link to the hub is slow: 150 ms, give or take 50 ms, every round;
* ``site-3`` is cut off from the hub, both ways, for 3 s from the start of round 4.

Each round prints what it saw (who delivered, who was missing and why, the
faults injected); round 4's timeline is saved as a picture with the faults
marked (``fault_drill_round4.png`` with matplotlib, and ``.html`` always), and
the plan as ``fault_drill_plan.toml``: ``fed.FaultPlan.load`` replays it.

Run it: ``python examples/fault_drill.py`` (needs scikit-learn and numpy).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import tempfile
from typing import Any

import numpy as np

import federation as fed
from federation import faults

SITES = [f"site-{i}" for i in range(6)]
ROUNDS = 6
PLAN = fed.FaultPlan(
    seed=2024,
    faults=[
        faults.Crash("site-1", job=4),
        faults.Delay("site-2", "hub", 0.15, jitter=0.05),
        faults.Partition("site-3", "hub", job=4, seconds=3.0),
    ],
)


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits, scaled; the first 1500 for training (split over the sites), the rest for testing."""
    from sklearn.datasets import load_digits  # in the client only: workers load their shard

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    return x[:1500], y[:1500], x[1500:], y[1500:]


def load_shard(path: str) -> dict[str, Any]:
    """A site's setup: its own shard of the training data, from its data directory."""
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


pipeline = fed.Pipeline("fault-drill")


@pipeline.step(site="hub")
def broadcast(weights):
    """The hub sends the round's weights to every site."""
    return weights


@pipeline.step(sites=SITES)
def train(ctx, broadcast):
    """A site's local update on its own shard."""
    return local_train(broadcast, ctx.state["x"], ctx.state["y"]), len(ctx.state["y"])


@pipeline.step(site="hub", bind={"updates": fed.quorum(train, min=0.6, deadline=1.5)})
def average(updates):
    """FedAvg over the sites that delivered, weighted by their sample counts."""
    total = sum(n for _, n in updates.values())
    return sum(w * (n / total) for w, n in updates.values())


pipeline.output(average)


def describe_faults(job: fed.Job) -> str:
    seen: dict[str, int] = {}
    for event in job.timeline():
        if event.kind is fed.TimelineKind.FAULT:
            where = f"{event.site}->{event.target}" if event.target else str(event.site)
            key = f"{event.detail['fault']} {where}"
            seen[key] = seen.get(key, 0) + 1
    return ", ".join(f"{key}" + (f" x{n}" if n > 1 else "") for key, n in seen.items()) or "none"


def main() -> None:
    print(f"fault plan: {PLAN!r}")
    PLAN.save("fault_drill_plan.toml")
    x, y, xt, yt = load_data()
    with tempfile.TemporaryDirectory() as root:
        sites = []
        for i, name in enumerate(SITES):
            os.makedirs(os.path.join(root, name))
            shard = os.path.join(root, name, "shard.npz")
            np.savez(shard, x=x[i :: len(SITES)], y=y[i :: len(SITES)])
            sites.append(
                fed.Site(
                    name=name, data_dir=os.path.join(root, name), setup=functools.partial(load_shard, shard)
                )
            )
        with fed.Federation([*sites, "hub"], pool_size=2, faults=PLAN) as federation:
            w = np.zeros((65, 10))
            for number in range(1, ROUNDS + 1):
                job = federation.submit(pipeline, weights=w, timeout=60)
                w = job.result(timeout=90)
                missing = {site: f"{m.reason}" for site, m in sorted(job.missing.items())}
                print(
                    f"round {number}: {len(SITES) - len(missing)}/{len(SITES)} sites delivered, "
                    f"test accuracy {accuracy(w, xt, yt):.3f}, "
                    f"{(job.ended or 0) - (job.started or 0):.2f} s; "
                    f"missing: {missing or 'none'}; faults: {describe_faults(job)}"
                )
                if number == 4:
                    pictures = [job.export_timeline("fault_drill_round4.html")]
                    if importlib.util.find_spec("matplotlib") is not None:
                        pictures.append(job.export_timeline("fault_drill_round4.png"))
    print(f"round 4's timeline, faults marked: {', '.join(str(p) for p in pictures)}")
    print("replay this drill: fed.Federation(..., faults=fed.FaultPlan.load('fault_drill_plan.toml'))")
    if accuracy(w, xt, yt) < 0.8:
        sys.exit(f"the model did not learn through the faults: accuracy {accuracy(w, xt, yt):.3f}")


if __name__ == "__main__":
    main()
