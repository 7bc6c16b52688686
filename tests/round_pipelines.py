"""Pipelines for the tests of rounds: tolerant fan-ins, site stores, sampling, metrics.

Registered with cloudpickle by value, as ``pipelines`` is.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import cloudpickle

import federation as fed

cloudpickle.register_pickle_by_value(sys.modules[__name__])

CLIENTS = ["a", "b", "c"]


def quorum_pipeline(
    behaviour: dict[str, str], minimum: float = 1, deadline: float | None = None, clients: list[str] = CLIENTS
) -> fed.Pipeline:
    """Clients return their name; ``behaviour[site]`` makes one raise, die, stall or wait for a file."""
    pipeline = fed.Pipeline("quorum")

    @pipeline.step(sites=clients)
    def train(ctx):
        what = behaviour.get(ctx.site, "")
        if what == "raise":
            raise ValueError(f"NaN loss at {ctx.site}")
        if what == "exit":
            os._exit(3)
        if what.startswith("block:"):  # wait (ignoring cancellation) until killed from outside
            with open(what[6:] + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(what[6:] + ".tmp", what[6:])
            time.sleep(60)
        if what == "stall":  # late, but stops when cancelled
            for _ in range(3000):
                if ctx.cancelled:
                    return None
                time.sleep(0.01)
        if what == "deaf":  # late, and never looks at ctx.cancelled
            time.sleep(60)
        return ctx.site

    @pipeline.step(site="hub", bind={"updates": fed.quorum(train, min=minimum, deadline=deadline)})
    def aggregate(ctx, updates):
        return {"got": sorted(updates), "missing": {s: m.reason for s, m in ctx.missing.items()}}

    pipeline.output(aggregate)
    return pipeline


def store_pipeline() -> fed.Pipeline:
    """Each client counts its rounds in its store and in its worker's ``ctx.state``."""
    pipeline = fed.Pipeline("store")

    @pipeline.step(sites=["a", "b"])
    def count(ctx):
        rounds = ctx.store.update("rounds", lambda n: n + 1, default=0)
        ctx.state["calls"] = ctx.state.get("calls", 0) + 1
        ctx.metric("rounds", rounds)
        return {"store": rounds, "state": ctx.state["calls"], "pid": os.getpid()}

    @pipeline.step(site="hub")
    def report(count):
        return count

    pipeline.output(report)
    return pipeline


def increment_pipeline(times: int) -> fed.Pipeline:
    """Site ``a`` adds 1 to a shared counter ``times`` times, and overwrites a plain key."""
    pipeline = fed.Pipeline("increment")

    @pipeline.step(site="a")
    def bump(ctx):
        for i in range(times):
            ctx.store.update("counter", lambda n: n + 1, default=0)
            ctx.store["last"] = (os.getpid(), i)
        return ctx.store["counter"]

    pipeline.output(bump)
    return pipeline


def sampled_pipeline(clients: list[str]) -> fed.Pipeline:
    """FedAvg-shaped: the hub broadcasts, sampled clients answer with their own input."""
    pipeline = fed.Pipeline("sampled")

    @pipeline.step(site="hub")
    def broadcast(round_no):
        return round_no

    @pipeline.step(sites=clients)
    def local(ctx, broadcast, lr):
        ctx.metric("lr", lr)
        return (ctx.site, broadcast, lr)

    @pipeline.step(site="hub", bind={"updates": fed.quorum(local, min=1.0)})
    def average(updates):
        return sorted(updates.values())

    pipeline.output(average)
    return pipeline


def setup_state() -> dict[str, Any]:
    return {}
