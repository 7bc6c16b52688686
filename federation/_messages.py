"""What crosses a pipe: message tags, tokens and compiled plans.

Messages are plain tuples whose first element is a tag below; they are pickled
once by the sender. Tuples pickle several times faster than models, and these
are built per token. Plans are frozen dataclasses: built once per pipeline,
pickled once (with cloudpickle, as they hold the user's functions), cached by
digest in every worker.

Every message about a job carries its job id (invariant 1): a worker drops, and
counts, whatever is for a job it is not running, so a slot can be reused the
instant its job ends.

Workers import this module: standard library only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# client -> worker (control pipe)
INIT = 0  # (INIT, sys_path, worker_spec_bytes)
PLAN = 1  # (PLAN, digest, plan_bytes)
START = 2  # (START, job_id, digest, {input: payload}, absent_sites)
TOKENS = 3  # (TOKENS, job_id, [token, ...])         also worker -> worker
ABORT = 4  # (ABORT, job_id, reason)
STOP = 5  # (STOP,)
REPLY = 6  # (REPLY, request_id, error_or_None)      answer to SEND_TO_JOB
RELEASE = 7  # (RELEASE, [segment, ...])             also worker -> worker: done with these
MISSING = 8  # (MISSING, job_id, [(site, reason, detail), ...])  sources a tolerant gather will not get
TICK = 9  # (TICK,)  never on a pipe: a worker's own timer (a quorum's deadline) came due

# worker -> client (events pipe)
READY = 10  # (READY, pid)
START_FAILED = 11  # (START_FAILED, traceback_text)
RESULTS = 12  # (RESULTS, job_id, [(output, seq, payload), ...])
DONE = 13  # (DONE, job_id, ok, info)
FAILED = 14  # (FAILED, job_id, step, exception_bytes, traceback_text)
SEND_TO_JOB = 15  # (SEND_TO_JOB, request_id, from_job, to_job, input, payload, close)
LOG = 16  # (LOG, [(level, event, fields), ...])
BOOTED = 17  # (BOOTED,)  the interpreter is up; the site's setup runs next
CUT = 18  # (CUT, job_id, [site, ...])  a tolerant gather stopped waiting for these (late) sites

# fault plans (see _faults)
FAULTS = 20  # (FAULTS, job_id, seed, job_number, [(index, fault), ...])  client -> worker, before START
INJECT = 21  # (INJECT, job_id, index, fault)  client -> worker: crash or pause now (thread backend)
FAULT = 22  # (FAULT, job_id, [record, ...])  worker -> client: faults it applied, for the timeline
WAITING = 23  # (WAITING, job_id, text or None)  worker -> client: what its job waits for (None: no more)

# Token kinds: an item; the last item from its source; the end of a stream with no item.
ITEM = 0
LAST = 1
END = 2

#: The "site" a client-fed stream input comes from.
CLIENT = ""

#: Plans a worker keeps, evicting the oldest received first. The client mirrors
#: each worker's cache (``JobExecution.plans``) with the same rule, so it sends
#: PLAN exactly when the worker lacks the plan: a digest never names an evicted plan.
PLAN_CACHE = 64

# A token: (step, param, source_site, seq, payload, kind); the job id is on its message.
Token = tuple[str, str, str, int, Any, int]

# Parameter kinds.
P_CTX = 0
P_INPUT = 1
P_UPSTREAM = 2


@dataclass(frozen=True, slots=True)
class Param:
    """How one parameter of a step gets its value at one site."""

    name: str
    kind: int
    source: str = ""  # the input or upstream step it binds to
    sources: tuple[str, ...] = ()  # the sites its tokens come from (CLIENT for inputs)
    keyed: bool = False  # give ``{site: value}`` (the source is fanned out)
    stream: bool = False  # the source is a stream
    collect: bool = False  # gather the stream into a list instead of running per item
    # A tolerant gather of a fan-out: (minimum, the minimum is a fraction, deadline in s or None).
    quorum: tuple[float, bool, float | None] | None = None


#: Why a tolerant gather lacks a site's value (see :class:`Missing`).
RAISED = "raised"
DIED = "died"
LATE = "late"


@dataclass(frozen=True, slots=True)
class Missing:
    """A site whose value a tolerant fan-in did not get, and why.

    Attributes:
        site: the site.
        reason: ``"raised"`` (its step raised), ``"died"`` (its worker died) or
            ``"late"`` (it had not delivered by the deadline).
        detail: a line saying more: the exception, the exit code, the deadline.
    """

    site: str
    reason: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Route:
    """Where a step's output goes: a parameter of a step at a site."""

    site: str
    step: str
    param: str


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One step as it runs at one site."""

    name: str
    fn: Callable[..., Any]
    generator: bool
    params: tuple[Param, ...]
    driver: str | None  # the stream parameter that runs this step once per item
    routes: tuple[Route, ...]
    outputs: tuple[str, ...]  # output names the client receives this step's values under
    stream: bool  # emits a stream (a generator, or driven per item)


@dataclass(frozen=True, slots=True)
class SitePlan:
    """A pipeline compiled for one site: its steps in dependency order."""

    pipeline: str
    site: str
    steps: tuple[StepPlan, ...]
    value_inputs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker needs to start: its site, its setup, its links to the others."""

    site: str
    name: str
    setup: Callable[[], Any] | None
    env: dict[str, str]
    data_dir: str | None
    sys_path: tuple[str, ...]
    log_level: str
    max_token_bytes: int
    shm_prefix: str  # names of the shared-memory segments this worker creates
    index: int = 0  # the site's place in its slot: its sender number in the others' inboxes
    services: Mapping[str, Any] = field(default_factory=dict)  # the site's ServiceMap: ctx.services
    fail_start: str | None = None  # a fault plan's FailStart: the setup raises with this message
