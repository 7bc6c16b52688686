"""Pipelines and helpers shared by the behaviour tests.

Registered with cloudpickle by value, so workers receive these functions
without importing this module (as they would a user's ``__main__``).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import cloudpickle

import federation as fed

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def load_a() -> dict[str, Any]:
    return {"values": [0.2, 0.6, 0.9]}


def load_b() -> dict[str, Any]:
    return {"values": [0.7, 0.1, 0.8, 0.95]}


def mean_pipeline() -> fed.Pipeline:
    """The quickstart: a federated mean over two clinics, gathered at a hub."""
    pipeline = fed.Pipeline("mean")

    @pipeline.step(sites=["a", "b"])
    def local_stats(ctx, threshold):
        kept = [v for v in ctx.state["values"] if v > threshold]
        return {"n": len(kept), "sum": sum(kept)}

    @pipeline.step(site="hub")
    def mean(local_stats):
        n = sum(s["n"] for s in local_stats.values())
        return sum(s["sum"] for s in local_stats.values()) / n

    pipeline.output(mean)
    return pipeline


def mean_sites() -> list[Any]:
    return [fed.Site("a", setup=load_a), fed.Site("b", setup=load_b), "hub"]


def chain_pipeline() -> fed.Pipeline:
    """A at site a feeds B at site b, whose output returns: the 2-site job."""
    pipeline = fed.Pipeline("chain")

    @pipeline.step(site="a")
    def double(x):
        return 2 * x

    @pipeline.step(site="b")
    def inc(double):
        return double + 1

    pipeline.output(inc)
    return pipeline


def stream_pipeline(collect: bool) -> fed.Pipeline:
    """A generator at a streams n items; b squares each (per item) or sums them (collected)."""
    pipeline = fed.Pipeline("stream")

    @pipeline.step(site="a")
    def numbers(n):
        yield from range(n)

    if collect:

        @pipeline.step(site="b", bind={"xs": fed.collect("numbers")})
        def total(xs):
            return sum(xs)

        pipeline.output(total)
    else:

        @pipeline.step(site="b")
        def square(numbers):
            return numbers * numbers

        pipeline.output(square)
    return pipeline


def stream_input_pipeline() -> fed.Pipeline:
    """A stream input fed by job.send: b echoes each item doubled, hub sums them all."""
    pipeline = fed.Pipeline("feed")
    pipeline.input("values", stream=True)

    @pipeline.step(site="b")
    def doubled(values):
        return 2 * values

    @pipeline.step(site="hub", collect=["doubled"])
    def total(doubled):
        return sum(doubled)

    pipeline.output(doubled)
    pipeline.output(total)
    return pipeline


def aggregator_pipeline() -> fed.Pipeline:
    """A long-lived job at the hub collecting what other jobs send it."""
    pipeline = fed.Pipeline("aggregator")
    pipeline.input("reports", stream=True)

    @pipeline.step(site="hub", collect=["reports"])
    def summary(reports):
        return sorted(reports)

    pipeline.output(summary)
    return pipeline


def reporter_pipeline() -> fed.Pipeline:
    """Each site reports to the aggregator job given as an input."""
    pipeline = fed.Pipeline("reporter")

    @pipeline.step(sites=["a", "b"])
    def report(ctx, target, value):
        ctx.send_to_job(target, "reports", f"{ctx.site}:{value}")
        return True

    pipeline.output(report)
    return pipeline


def failing_pipeline(kind: str) -> fed.Pipeline:
    """Site a fails the way ``kind`` says; site b waits for it."""
    pipeline = fed.Pipeline(f"fail-{kind}")

    @pipeline.step(site="a")
    def explode(x):
        if kind == "raise":
            raise ValueError(f"bad value {x}")
        if kind == "exit":
            os._exit(3)
        if kind == "sys_exit":
            raise SystemExit(4)
        if kind == "kill":
            os.kill(os.getpid(), 9)
        if kind == "segfault":
            import faulthandler

            faulthandler._sigsegv()
        if kind == "unpicklable_result":
            return lambda_holder()
        if kind == "unpicklable_exception":
            raise UnpicklableError("nope", 1)
        return x

    @pipeline.step(site="b")
    def after(explode):
        return explode

    pipeline.output(after)
    return pipeline


class UnpicklableError(Exception):
    """An exception whose __init__ signature breaks unpickling."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def lambda_holder() -> Any:
    import threading

    return threading.Lock()


def slow_pipeline(cooperative: bool) -> fed.Pipeline:
    """A step that runs until cancelled: checking ctx.cancelled, or ignoring it."""
    pipeline = fed.Pipeline("slow")

    @pipeline.step(site="a")
    def spin(ctx, seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if cooperative:
                ctx.check_cancelled()
                time.sleep(0.005)
            else:
                time.sleep(0.05)
        return "finished"

    pipeline.output(spin)
    return pipeline


def ticker_pipeline() -> fed.Pipeline:
    """A generator at a that keeps yielding (slowly) until the job is cancelled."""
    pipeline = fed.Pipeline("ticker")

    @pipeline.step(site="a")
    def tick(ctx, tag):
        i = 0
        while i < 10_000:
            yield (tag, i)
            i += 1
            time.sleep(0.002)

    pipeline.output(tick)
    return pipeline


def array_pipeline() -> fed.Pipeline:
    """Site a makes an array of n bytes (large ones go through shared memory); b returns its size."""
    pipeline = fed.Pipeline("array")

    @pipeline.step(site="a")
    def make(n):
        import numpy as np

        return np.ones(n, dtype=np.uint8)

    @pipeline.step(site="b")
    def size(make):
        return int(make.nbytes)

    pipeline.output(size)
    return pipeline


def deep_chain_pipeline(depth: int) -> fed.Pipeline:
    """A stream of 3 items through ``depth`` per-item steps, all at site a, then to b."""
    pipeline = fed.Pipeline(f"deep-{depth}")

    @pipeline.step(site="a")
    def source():
        yield from range(3)

    def inc(x):
        return x + 1

    previous: Any = source
    for i in range(depth):
        previous = pipeline.step(inc, site="a", name=f"inc{i}", bind={"x": previous})

    @pipeline.step(site="b", bind={"xs": fed.collect(previous.name)})
    def total(xs):
        return sorted(xs)

    pipeline.output(total)
    return pipeline


def lockstep_pipeline(n: int, fail_at: int | None = None, marker: str | None = None) -> fed.Pipeline:
    """A generator at a feeds a per-item step at a; both write to one log, which comes back.

    With ``fail_at``, the consumer raises on that item; the producer's ``finally``
    then writes ``marker`` (a file) with how many items it yielded.
    """
    pipeline = fed.Pipeline("lockstep")
    log: list[tuple[str, int]] = []  # one list: both steps are pickled in one site plan

    @pipeline.step(site="a")
    def produce():
        made = 0
        try:
            for i in range(n):
                log.append(("yield", i))
                made += 1
                yield i
        finally:
            if marker is not None:
                with open(marker, "w") as file:
                    file.write(str(made))

    @pipeline.step(site="a")
    def consume(produce):
        if produce == fail_at:
            raise ValueError(f"item {produce} is bad")
        log.append(("consume", produce))
        return produce

    @pipeline.step(site="a", bind={"values": fed.collect("consume")})
    def report(values):
        return list(log)

    pipeline.output(report)
    return pipeline


def read_gate(gate: str) -> str:
    """The bytes a test writes into the FIFO ``gate`` (opened without blocking), as text."""
    import select

    fd = os.open(gate, os.O_RDONLY | os.O_NONBLOCK)
    try:
        ready, _, _ = select.select([fd], [], [], 60)
        return os.read(fd, 16).decode() if ready else "no bytes within 60 s"
    finally:
        os.close(fd)


def gated_pipeline() -> fed.Pipeline:
    """``first`` at a, for the client; then ``second`` at a, which waits for a FIFO's bytes."""
    pipeline = fed.Pipeline("gated")

    @pipeline.step(site="a")
    def first(x):
        return x + 1

    @pipeline.step(site="a")
    def second(first, gate):
        return read_gate(gate)

    pipeline.output(first)
    pipeline.output(second)
    return pipeline


def gate_pipeline() -> fed.Pipeline:
    """One step at a that says nothing until a FIFO's bytes come, then returns them."""
    pipeline = fed.Pipeline("gate")

    @pipeline.step(site="a")
    def wait_for_gate(gate):
        return read_gate(gate)

    pipeline.output(wait_for_gate)
    return pipeline


def sleep_pipeline() -> fed.Pipeline:
    """One step at b that sleeps ``seconds``, then returns ``x``."""
    pipeline = fed.Pipeline("sleep")

    @pipeline.step(site="b")
    def nap(x, seconds):
        time.sleep(seconds)
        return x

    pipeline.output(nap)
    return pipeline


def held_setup(hold: str) -> None:
    """A site setup that waits while the file ``hold`` exists (a minute at most)."""
    deadline = time.monotonic() + 60
    while os.path.exists(hold) and time.monotonic() < deadline:
        time.sleep(0.01)  # the workload: a setup waiting on something outside
