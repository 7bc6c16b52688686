"""Fault kinds for a :class:`~federation.FaultPlan`: ``fed.faults.Crash``, ``fed.faults.Delay``, ...

Site faults name a site (or :data:`ALL`): :class:`Crash`, :class:`Pause`,
:class:`Slow`, :class:`FailStart`, :class:`Restart`. Link faults name the two
ends of a link, one way (a site, or :data:`CLIENT`): :class:`Delay`,
:class:`Bandwidth`, :class:`Drop`, :class:`Duplicate`, :class:`Reorder`,
:class:`Partition`.

Every fault takes the same triggers, as keywords; all that are given must hold:

* ``at``: seconds after the job started;
* ``after``: after the site's steps (or ``step``) sent N values; for a link, after
  N tokens went over it;
* ``job``: only in the job with this number (the federation's Nth submit);
* ``probability`` with ``per="job"``, ``"site"`` or ``"token"``: drawn from the plan's
  seed, once per job, per site (or link), or per token.

Link faults also take ``until``: the job time at which they stop acting.

::

    plan = fed.FaultPlan(seed=1, faults=[
        fed.faults.Crash("b", after=3),
        fed.faults.Delay("a", "hub", 0.05, jitter=0.01),
        fed.faults.Drop("c", "hub", probability=0.1, per="token"),
    ])
"""

from __future__ import annotations

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
)

__all__ = [
    "ALL",
    "CLIENT",
    "Bandwidth",
    "Crash",
    "Delay",
    "Drop",
    "Duplicate",
    "FailStart",
    "Fault",
    "FaultPlan",
    "LinkFault",
    "Partition",
    "Pause",
    "Reorder",
    "Restart",
    "SiteFault",
    "Slow",
]
