"""Gathers: how a step's parameter collects its value at one site, tolerant ones included.

A gather waits for its sources (sites) to deliver. A plain gather waits for
every source the job runs; a tolerant one (``fed.quorum``) completes with the
sources that delivered once every source has delivered or is known missing,
or at its deadline, and remembers why each missing source is missing:

* ``raised`` / ``died``: the client says so (a MISSING message) when the
  site's FAILED or death reaches it;
* ``late``: the deadline passed before the site delivered; the worker tells
  the client (CUT), which cancels the site cooperatively.

Ordering: a site writes its value to this site's inbox before it reports
FAILED or DONE to the client, so its value normally arrives before the
client's MISSING about it; if a MISSING overtakes a value anyway (a large
frame still being written when the site died), the value is dropped: the site
counts as missing. Either way the gather decides once per source.

Workers import this module: standard library only.
"""

from __future__ import annotations

import math
import time
from typing import Any

from . import _messages as m

__all__ = ["Gather"]


class Gather:
    """Collects one parameter's value: a value, ``{site: value}``, or a whole stream."""

    __slots__ = ("complete", "deadline", "missing", "need", "param", "pending", "values")

    def __init__(self, param: m.Param, absent: frozenset[str] = frozenset(), started: float = 0.0) -> None:
        self.param = param
        self.pending = set(param.sources) - absent
        self.values: dict[str, Any] = {}
        self.missing: dict[str, m.Missing] = {}
        self.need = 0
        self.deadline: float | None = None
        quorum = param.quorum
        if quorum is not None:
            minimum, fraction, seconds = quorum
            expected = len(self.pending)
            self.need = min(expected, math.ceil(minimum * expected) if fraction else int(minimum))
            self.deadline = None if seconds is None else started + seconds
        self.complete = not self.pending

    @property
    def tolerant(self) -> bool:
        return self.param.quorum is not None

    def add(self, source: str, value: Any, kind: int) -> bool:
        """Take a token's value; False if it was not wanted (a source already given up on)."""
        param = self.param
        if param.quorum is not None and source not in self.pending:
            return False
        if kind != m.END:
            if param.stream:
                self.values.setdefault(source, []).append(value)
            else:
                self.values[source] = value
        elif param.stream:
            self.values.setdefault(source, [])
        if kind != m.ITEM:
            self.pending.discard(source)
            self.complete = not self.pending
        return True

    def give_up(self, source: str, reason: str, detail: str) -> None:
        """Stop waiting for ``source``: it raised, died, or is late."""
        if source in self.pending:
            self.pending.discard(source)
            self.values.pop(source, None)
            self.missing[source] = m.Missing(source, reason, detail)
            self.complete = not self.pending or self.short()

    def short(self) -> bool:
        """Whether it can no longer reach its minimum, whatever still arrives."""
        return len(self.values) + len(self.pending) < self.need

    def expire(self, now: float) -> list[str]:
        """At the deadline: give up on every source still pending; the sites given up on."""
        if self.deadline is None or now < self.deadline or self.complete:
            return []
        late = sorted(self.pending)
        seconds = self.param.quorum[2] if self.param.quorum is not None else None
        for source in late:
            self.give_up(source, m.LATE, f"had not delivered within the deadline of {seconds} s")
        self.complete = True
        return late

    def shortfall(self) -> str | None:
        """Why the gather cannot run (fewer sites than its minimum), or None."""
        if self.param.quorum is None or len(self.values) >= self.need:
            return None
        reasons = ", ".join(f"{s} ({miss.reason}: {miss.detail})" for s, miss in sorted(self.missing.items()))
        return (
            f"parameter {self.param.name!r} got {len(self.values)} of the {self.need} site(s) it needs "
            f"from step {self.param.source!r}; missing: {reasons or 'none'}"
        )

    def value(self) -> Any:
        param = self.param
        if param.keyed:
            return {site: self.values[site] for site in param.sources if site in self.values}
        if len(param.sources) == 1:
            return self.values.get(param.sources[0], [] if param.stream else None)
        merged: list[Any] = []  # a stream input fed from several places
        for site in param.sources:
            merged.extend(self.values.get(site, []))
        return merged


def now() -> float:
    """The clock gathers' deadlines are on."""
    return time.monotonic()
