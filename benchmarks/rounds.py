"""The FedAvg-round scenario: the overhead of a federated-averaging round per number of sites.

A round broadcasts numpy weights from the hub, runs a zero-compute local step
at every client site, and averages the updates at the hub; beside it, the same
round as a sequential in-process loop (the floor). The overhead is the
difference of the medians.
"""

from __future__ import annotations

import time

import numpy as np

import federation as fed

from .measure import Measured, Settings, median

__all__ = ["FEDAVG_SIZES", "fedavg_pipeline", "fedavg_rounds"]

FEDAVG_SIZES = (3, 10, 50)


def broadcast(weights):
    return weights


def local_update(broadcast):
    return broadcast + 0.0


def average(updates):
    return sum(updates.values()) / len(updates)


def fedavg_pipeline(clients: list[str]) -> fed.Pipeline:
    """``broadcast`` at the hub, ``local_update`` at every client, ``average`` at the hub."""
    pipeline = fed.Pipeline(f"bench-fedavg-{len(clients)}")
    sent = pipeline.step(site="hub")(broadcast)
    local = pipeline.step(sites=clients)(local_update)
    pipeline.output(pipeline.step(site="hub", bind={"updates": local, "broadcast": sent})(_average_step))
    return pipeline


def _average_step(updates, broadcast):
    return average(updates)


def fedavg_rounds(s: Settings) -> Measured:
    """Median round time and its floor for each size; the overhead as their difference."""
    measured: Measured = {}
    weights = np.zeros((65, 10))
    for n in FEDAVG_SIZES:
        clients = [f"s{i}" for i in range(n)]
        rounds = s.fedavg_rounds if n < 50 else max(10, s.fedavg_rounds // 3)
        floor = []
        for _ in range(rounds):
            started = time.perf_counter()
            average({client: local_update(broadcast(weights)) for client in clients})
            floor.append(time.perf_counter() - started)
        pipeline = fedavg_pipeline(clients)
        times = []
        with fed.Federation([*clients, "hub"], pool_size=1, start_method="forkserver") as federation:
            for _ in range(max(5, rounds // 10)):
                federation.submit(pipeline, weights=weights).result(timeout=s.timeout)
            for _ in range(rounds):
                started = time.perf_counter()
                federation.submit(pipeline, weights=weights).result(timeout=s.timeout)
                times.append(time.perf_counter() - started)
        measured[f"round_ms_{n}"] = median(times) * 1e3
        measured[f"floor_ms_{n}"] = median(floor) * 1e3
        measured[f"overhead_ms_{n}"] = measured[f"round_ms_{n}"] - measured[f"floor_ms_{n}"]
    return measured
