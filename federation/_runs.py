"""The records of one job's run at one site: each step's inputs so far and call in progress.

:class:`~federation._steps.StepRunner` moves these through a run; they hold
state only, so a reader sees in one place everything a run keeps.

Workers import this module: standard library only.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from . import _messages as m
from ._gather import Gather

__all__ = ["JobRun", "StepRun"]


class StepRun:
    """One step of one job at this site: its inputs so far and the call in progress."""

    __slots__ = (
        "active",
        "call_count",
        "call_source",
        "call_started",
        "calls",
        "ctx_param",
        "destinations",
        "done",
        "driver",
        "driver_pending",
        "gathers",
        "kwargs",
        "local",
        "plan",
        "queue",
        "ran",
        "seq",
        "timing",
        "what",
    )

    def __init__(self, plan: m.StepPlan) -> None:
        self.plan = plan
        self.kwargs: dict[str, Any] = {}
        self.gathers: dict[str, Gather] = {}
        self.driver: str | None = plan.driver
        self.queue: deque[tuple[str, Any]] = deque()  # driver items not yet run
        self.driver_pending: set[str] = set()  # sites whose stream has not ended
        self.ran = False
        self.done = False
        self.seq = 0
        self.ctx_param: str | None = None
        self.destinations = 0  # receivers of each value: outputs and steps at other sites
        self.local = False  # some of its values go to steps at this site
        self.calls = 0
        self.timing = 0
        self.what = f"the value step {plan.name!r} produced"
        # A generator call in progress: advanced one item per turn of the loop.
        self.active: Iterator[Any] | None = None
        self.call_started = 0.0
        self.call_count = 0
        self.call_source: str | None = None

    def has_work(self) -> bool:
        """Whether this step can take a turn now: advance, start a call, or end."""
        if self.done:
            return False
        if self.active is not None:
            return True
        for gather in self.gathers.values():
            if not gather.complete:
                return False
        if self.driver is None:
            return not self.ran
        return bool(self.queue) or not self.driver_pending


class JobRun:
    __slots__ = (
        "absent",
        "failed",
        "inputs",
        "job_id",
        "metrics",
        "order",
        "plan",
        "remaining",
        "started",
        "steps",
        "t0",
        "timings",
    )

    def __init__(
        self, job_id: int, plan: m.SitePlan, inputs: dict[str, bytes], absent: frozenset[str]
    ) -> None:
        self.job_id = job_id
        self.plan = plan
        self.steps: dict[str, StepRun] = {}
        self.order: list[StepRun] = []  # deepest first: the order in which steps get a turn
        self.remaining = len(plan.steps)
        self.inputs = inputs
        self.timings: list[tuple[str, float, float, int]] = []
        self.started = time.time()
        self.failed = False  # a step raised; FAILED was sent
        self.absent = absent  # sites this job runs without (participants chosen at submit)
        self.t0 = time.monotonic()  # tolerant gathers' deadlines count from here
        self.metrics: list[tuple[str, str, float, float]] = []  # (step, name, value, time)
