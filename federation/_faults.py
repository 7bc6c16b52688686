"""Applying a fault plan: each job's schedule, and the decisions a site makes under it.

Who decides, who acts::

    client, at dispatch   schedule(plan, job number, sites) ──> per site: its rules (FAULTS, before START)
                                                           ──> timed crash/pause: the router's timers
                                                           ──> restarts: the slot is replaced after the job
    worker, while it runs  FaultRuntime hooks (_fault_runtime): a step's values counted (crash/pause
                           after N), each call slowed, each token frame shaped (delay, bandwidth, drop,
                           duplicate, reorder, partition), results to the client shaped, stream
                           inputs from the client shaped on arrival

The decisions (:class:`SiteFaults`, :class:`LinkShaper`) are plain code with no
pipes: a transport calls them at its own seams (the Ray backend: where a site
actor sends a token frame to a sibling, results to the client, and around a
step call), so a plan behaves the same everywhere. Every fault applied is
reported as a FAULT event with the plan's seed and lands in the job's timeline.

A worker imports this module (and the plan's classes) only once a job with
faults reaches it: a spawned worker without a plan never pays for them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from . import _messages as m
from ._fault_plan import (
    ALL,
    CLIENT,
    Bandwidth,
    Crash,
    Delay,
    Drop,
    Duplicate,
    FailStart,
    Fault,
    FaultPlan,
    LinkFault,
    Partition,
    Pause,
    Reorder,
    Restart,
    SiteFault,
    Slow,
    rng_for,
)

__all__ = ["JobSchedule", "LinkShaper", "SiteFaults", "schedule", "size_of"]

_REORDER_HOLD = 0.02  # seconds a reordered frame is held back (the next one overtakes it)
_RECORDS_PER_JOB = 1000  # fault events a site reports per job; later ones are only counted

Rule = tuple[int, Fault]  # (the fault's index in the plan, the fault)


# -- the client's half: each job's schedule ---------------------------------------------------


class JobSchedule:
    """What a plan does to one job: rules per site, timed actions for the router, restarts."""

    __slots__ = ("number", "restarts", "rules", "seed", "timers")

    def __init__(self, seed: int, number: int) -> None:
        self.seed = seed
        self.number = number
        self.rules: dict[str, list[Rule]] = {}
        self.timers: list[tuple[float, str, int, SiteFault]] = []  # (seconds after start, site, index, fault)
        self.restarts: list[tuple[str, int, Restart]] = []


def schedule(plan: FaultPlan, number: int, attempt: int, sites: Sequence[str]) -> JobSchedule:
    """The faults of job ``number`` (attempt ``attempt``) on ``sites``: a function of the plan only.

    Faults act on a job's first attempt: a retry runs clean, so a plan that
    crashes a site shows whether ``retries`` recover.
    """
    result = JobSchedule(plan.seed, number)
    if attempt > 1:
        return result
    for index, fault in enumerate(plan.faults):
        if isinstance(fault, FailStart) or not fault.fires_for_job(plan.seed, index, number):
            continue
        if isinstance(fault, SiteFault):
            for site in sites if fault.site == ALL else [fault.site]:
                if site not in sites or not _per_site(plan.seed, index, number, fault, site):
                    continue
                if isinstance(fault, Restart):
                    result.restarts.append((site, index, fault))
                elif isinstance(fault, (Crash, Pause)) and fault.service is not None:
                    # A service is no step: its fault is timed from the job's start, by the client.
                    result.timers.append((fault.at or 0.0, site, index, fault))
                elif isinstance(fault, (Crash, Pause)) and fault.at is not None and fault.after is None:
                    result.timers.append((fault.at, site, index, fault))
                else:
                    result.rules.setdefault(site, []).append((index, fault))
        elif isinstance(fault, LinkFault):
            for source, target in fault.links():
                for src in sites if source == ALL else [source]:
                    for dst in sites if target == ALL else [target]:
                        if (
                            src == dst
                            or (src not in sites and src != CLIENT)
                            or (dst not in sites and dst != CLIENT)
                        ):
                            continue
                        if not _per_site(plan.seed, index, number, fault, f"{src}>{dst}"):
                            continue
                        # The sender shapes what it sends; stream inputs are shaped where they arrive.
                        owner = dst if src == CLIENT else src
                        result.rules.setdefault(owner, []).append((index, _directed(fault, src, dst)))
    return result


def _per_site(seed: int, index: int, number: int, fault: Fault, key: str) -> bool:
    if fault.per != "site" or fault.probability >= 1.0:
        return True
    return rng_for(seed, "site", index, number, key).random() < fault.probability


def _directed(fault: LinkFault, source: str, target: str) -> LinkFault:
    if (fault.source, fault.target) == (source, target):
        return fault
    import dataclasses

    return dataclasses.replace(fault, source=source, target=target)


# -- the worker's half: decisions ------------------------------------------------------------


class SiteFaults:
    """One site's faults in one job run: counts values, decides, records what it applied."""

    def __init__(self, seed: int, number: int, job_id: int, site: str, rules: list[Rule]) -> None:
        self.seed = seed
        self.number = number
        self.job_id = job_id
        self.site = site
        self.t0 = time.monotonic()
        self.site_rules = [(i, f) for i, f in rules if isinstance(f, SiteFault)]
        self.slow = [(i, f) for i, f in self.site_rules if isinstance(f, Slow)]
        self.actions: list[Rule] = [(i, f) for i, f in self.site_rules if isinstance(f, (Crash, Pause))]
        self.links: dict[tuple[str, str], LinkShaper] = {}  # (source, target) -> its shaper
        for index, fault in rules:
            if isinstance(fault, LinkFault):
                key = (fault.source, fault.target)
                shaper = self.links.get(key)
                if shaper is None:
                    shaper = self.links[key] = LinkShaper(self, fault.source, fault.target)
                shaper.rules.append((index, fault))  # a LinkFault (checked above)
        self.sent: dict[str | None, int] = {}  # values each step sent (None: all steps)
        self.fired: set[int] = set()
        self.records: list[dict[str, Any]] = []
        self.recorded = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def record(self, index: int, fault: Fault, **fields: Any) -> None:
        """Keep one applied fault for the timeline (the runtime sends it to the client)."""
        self.recorded += 1
        if self.recorded > _RECORDS_PER_JOB:
            return
        base = {"fault": fault.kind, "index": index, "seed": self.seed, "job_number": self.number}
        base.update({k: v for k, v in fields.items() if v is not None})
        base.setdefault("site", self.site)
        base["time"] = time.time()
        self.records.append(base)

    def at_start(self) -> list[Rule]:
        """Crashes and pauses with no time or count trigger: they act as the job starts here."""
        due: list[Rule] = [
            (i, f) for i, f in self.actions if f.at is None and f.after is None and f.per != "token"
        ]
        self.fired.update(i for i, _ in due)
        return due

    def after_value(self, step: str) -> list[tuple[int, Fault, int]]:
        """A step sent a value: the crashes and pauses it sets off, with the count that did."""
        total = self.sent[None] = self.sent.get(None, 0) + 1
        own = self.sent[step] = self.sent.get(step, 0) + 1
        due: list[tuple[int, Fault, int]] = []
        for index, fault in self.actions:
            if index in self.fired or (fault.step is not None and fault.step != step):
                continue
            count = own if fault.step is not None else total
            if fault.at is not None and self.elapsed() < fault.at:
                continue
            if fault.per == "token" and fault.probability < 1.0:
                draw = rng_for(self.seed, "token", index, self.number, self.site, count).random()
                if draw >= fault.probability or count <= (fault.after or 0):
                    continue
            elif fault.after is None or count < fault.after:
                continue
            self.fired.add(index)
            due.append((index, fault, count))
        return due

    def slowdown(self, step: str, seconds: float) -> float:
        """Extra seconds a call (or a generator's item) of ``step`` that took ``seconds`` is held."""
        extra = 0.0
        for index, fault in self.slow:
            assert isinstance(fault, Slow)
            if fault.step is not None and fault.step != step:
                continue
            if fault.at is not None and self.elapsed() < fault.at:
                continue
            if fault.after is not None and self.sent.get(fault.step, 0) < fault.after:
                continue
            added = seconds * (fault.factor - 1.0) + fault.delay
            extra += added
            if index not in self.fired:  # one record per fault and job: each call is slowed alike
                self.fired.add(index)
                self.record(index, fault, step=step, extra=round(added, 6))
        return extra


class LinkShaper:
    """One link's faults at the end that shapes it: when each frame goes, or that it is lost."""

    def __init__(self, owner: SiteFaults, source: str, target: str) -> None:
        self.owner = owner
        self.source = source
        self.target = target
        self.rules: list[tuple[int, LinkFault]] = []
        self.tokens = 0  # tokens over the link so far
        self.frames = 0
        self.free_at = 0.0  # when the link has sent what it was given (bandwidth)
        self.last_due = 0.0  # frames keep their order: none goes before an earlier one
        self.held_until = 0.0  # a reordered frame's time: no stream end may pass it

    def _active(self, fault: LinkFault, elapsed: float) -> bool:
        start = fault.at or 0.0
        if elapsed < start or (fault.until is not None and elapsed >= fault.until):
            return False
        if isinstance(fault, Partition) and elapsed >= start + fault.seconds:
            return False
        return fault.after is None or self.tokens >= fault.after

    def shape(self, tokens: list[Any], nbytes: int, now: float) -> list[tuple[float, list[Any]]]:
        """Deliveries of a frame of ``tokens`` (``(monotonic due time, tokens)``), or none if lost.

        A token is ``(step, param, source, seq, payload, kind)``; a results frame's
        records are treated alike with kind ITEM.
        """
        owner = self.owner
        elapsed = now - owner.t0
        self.frames += 1
        due = now
        keep = list(tokens)
        reorder = False
        for index, fault in self.rules:
            if not isinstance(fault, (Drop, Duplicate)) and not self._active(fault, elapsed):
                continue
            if isinstance(fault, Partition):
                if fault.lose:
                    owner.record(index, fault, target=self.target, source=self.source, lost=len(keep))
                    keep = []
                else:
                    heal = owner.t0 + (fault.at or 0.0) + fault.seconds
                    due = max(due, heal)
                    owner.record(
                        index, fault, target=self.target, source=self.source, held=round(heal - now, 6)
                    )
            elif isinstance(fault, Drop):
                kept = [
                    t
                    for k, t in enumerate(keep)
                    if not self._per_token(index, fault, elapsed, self.tokens + k)
                ]
                if len(kept) != len(keep):
                    owner.record(
                        index, fault, target=self.target, source=self.source, lost=len(keep) - len(kept)
                    )
                keep = kept
            elif isinstance(fault, Duplicate):
                # Each copy right behind its original: where a frame ends depends on
                # timing, so a copy at the frame's end would land at a different place
                # in the stream from run to run, and the same seed must replay the same.
                doubled: list[Any] = []
                for k, token in enumerate(keep):
                    doubled.append(token)
                    if (
                        len(token) > 5
                        and token[-1] == m.ITEM
                        and _in_frame(token[4])
                        and self._per_token(index, fault, elapsed, self.tokens + k)
                    ):
                        doubled.append(token)
                if len(doubled) > len(keep):
                    copies = len(doubled) - len(keep)
                    owner.record(index, fault, target=self.target, source=self.source, duplicated=copies)
                keep = doubled
            elif isinstance(fault, Reorder):
                if all(t[-1] == m.ITEM for t in keep) and keep and self._decide(index, fault, self.frames):
                    reorder = True
                    owner.record(index, fault, target=self.target, source=self.source, count=len(keep))
            elif isinstance(fault, Bandwidth):
                start = max(due, self.free_at)
                due = self.free_at = start + nbytes / fault.bytes_per_second
                owner.record(
                    index,
                    fault,
                    target=self.target,
                    source=self.source,
                    nbytes=nbytes,
                    seconds=round(due - now, 6),
                )
            elif isinstance(fault, Delay):
                added = fault.seconds
                if fault.jitter:
                    rng = rng_for(
                        owner.seed, "jitter", index, owner.number, self.source, self.target, self.frames
                    )
                    added = max(0.0, added + rng.uniform(-fault.jitter, fault.jitter))
                due += added
                owner.record(index, fault, target=self.target, source=self.source, seconds=round(added, 6))
        self.tokens += len(tokens)
        if not keep:
            return []
        if reorder:
            held = max(due, self.last_due) + _REORDER_HOLD
            self.held_until = max(self.held_until, held)
            return [(held, keep)]
        due = max(due, self.last_due)
        if any(t[-1] != m.ITEM for t in keep):
            due = max(due, self.held_until)
        self.last_due = due
        return [(due, keep)]

    def _per_token(self, index: int, fault: LinkFault, elapsed: float, counter: int) -> bool:
        """Whether a token-level fault acts on the link's token number ``counter`` (from 0)."""
        if fault.after is not None and counter < fault.after:
            return False
        start = fault.at or 0.0
        if elapsed < start or (fault.until is not None and elapsed >= fault.until):
            return False
        return self._decide(index, fault, counter)

    def _decide(self, index: int, fault: LinkFault, counter: int) -> bool:
        if fault.per != "token" or fault.probability >= 1.0:
            return True
        rng = rng_for(self.owner.seed, "token", index, self.owner.number, self.source, self.target, counter)
        return rng.random() < fault.probability


def _in_frame(payload: Any) -> bool:
    """Whether a value travels inside its frame (a pickle, or inline), not through shared memory."""
    return isinstance(payload, bytes) or (type(payload) is tuple and len(payload) == 1)


def size_of(tokens: list[Any]) -> int:
    """Bytes a frame of tokens (or result records) carries, shared-memory buffers included."""
    size = 0
    for token in tokens:
        payload = token[4] if len(token) > 5 else token[2]
        if isinstance(payload, bytes):
            size += len(payload)
        elif type(payload) is tuple and len(payload) == 2:
            size += len(payload[0]) + sum(n for _, n in payload[1])
        elif payload is not None:
            size += 16  # a small value inline in the frame
    return size
