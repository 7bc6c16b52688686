"""Pipelines for the fault-plan tests; registered with cloudpickle by value, like ``pipelines``."""

from __future__ import annotations

import sys
import time
from typing import Any

import cloudpickle

import federation as fed

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def stream(count: int = 10) -> fed.Pipeline:
    """``a`` yields 0..count-1 to ``b``, which returns each item (a stream of results)."""
    pipeline = fed.Pipeline("stream")

    @pipeline.step(site="a")
    def gen() -> Any:
        yield from range(count)

    @pipeline.step(site="b")
    def sink(gen: int) -> int:
        return gen

    pipeline.output(sink)
    return pipeline


def hops(nbytes: int = 0) -> fed.Pipeline:
    """a -> b -> hub, each step stamping when it ran: the time each hop took is measurable."""
    pipeline = fed.Pipeline("hops")

    @pipeline.step(site="a")
    def first() -> dict[str, Any]:
        return {"a": time.time(), "blob": b"x" * nbytes}

    @pipeline.step(site="b")
    def second(first: dict[str, Any]) -> dict[str, Any]:
        return {"a": first["a"], "b": time.time()}

    @pipeline.step(site="hub")
    def third(second: dict[str, Any]) -> dict[str, float]:
        return {**second, "hub": time.time()}

    pipeline.output(third)
    return pipeline


def pair() -> fed.Pipeline:
    """A value from ``a`` to ``b`` (``b`` returns when it got it)."""
    pipeline = fed.Pipeline("pair")

    @pipeline.step(site="a")
    def send() -> float:
        return time.time()

    @pipeline.step(site="b")
    def receive(send: float) -> tuple[float, float]:
        return send, time.time()

    pipeline.output(receive)
    return pipeline


def stateful() -> fed.Pipeline:
    """``a`` counts the jobs its worker ran in ``ctx.state`` (a restart makes it fresh)."""
    pipeline = fed.Pipeline("stateful")

    @pipeline.step(site="a")
    def count(ctx: Any) -> int:
        ctx.state["jobs"] = ctx.state.get("jobs", 0) + 1
        return int(ctx.state["jobs"])

    pipeline.output(count)
    return pipeline


def state() -> dict[str, int]:
    return {}


def stream_input() -> fed.Pipeline:
    """The client feeds ``numbers`` to ``a``, which returns each."""
    pipeline = fed.Pipeline("fed-input")
    pipeline.input("numbers", stream=True)

    @pipeline.step(site="a")
    def echo(numbers: int) -> tuple[int, float]:
        return numbers, time.time()

    pipeline.output(echo)
    return pipeline


def ticking(seconds: float) -> fed.Pipeline:
    """``a`` busy in user code for ``seconds`` (never yielding to the federation), noting the time."""
    pipeline = fed.Pipeline("ticking")

    @pipeline.step(site="a")
    def tick() -> list[float]:
        ticks = [time.time()]
        busy = 0.0
        while busy < seconds:
            started = time.perf_counter()
            while time.perf_counter() - started < 0.005:
                pass
            busy += 0.005
            ticks.append(time.time())
        return ticks

    pipeline.output(tick)
    return pipeline
