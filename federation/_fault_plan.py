"""A fault plan: seeded site and link faults with their triggers, printable and saveable.

A plan is data: a seed and a list of faults, each a small frozen dataclass.
It decides nothing by itself; :mod:`._faults` turns it into each job's
schedule (on the client, at dispatch) and applies it (in the workers, and in
the router for faults that need a hand from outside, such as a kill). One seed
decides every random choice, through an RNG per decision derived from the
seed and what the decision is about (job number, site, link, fault, counter),
never from the clock or the global ``random``: the same seed, pipeline and
inputs give the same schedule on any machine.

Triggers, shared by every fault (all that are given must hold):

* ``at``: seconds after the job started (its dispatch);
* ``after``: after the site's steps (or ``step``) sent N values (site faults),
  or after N tokens went over the link (link faults);
* ``job``: only the job with this number (1 for the federation's first submit);
* ``probability`` with ``per``: decided once per job, per site, or per token.

Workers import this module: standard library only.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ._exceptions import ConfigError

__all__ = [
    "ALL",
    "CLIENT",
    "KINDS",
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
    "rng_for",
]

#: The client's end of a link: ``Delay(CLIENT, "a", 0.05)`` delays stream inputs to ``a``;
#: ``Delay("a", CLIENT, 0.05)`` delays ``a``'s results. No site can take this name.
CLIENT = "(client)"
#: Every site of the job (with ``per="site"``, each decided on its own).
ALL = "*"
_PER = ("job", "site", "token")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


# Every field a fault may have: what its value must be, as a test and in words.
# One table, checked for every fault as it is made (or loaded from a saved plan),
# so a wrong value is a ConfigError naming the fault, the field and what is allowed,
# never a TypeError from deep inside the schedule.
_FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "at": (lambda v: v is None or (_is_number(v) and v >= 0), "None or seconds >= 0 after the job starts"),
    "after": (lambda v: v is None or (_is_count(v) and v >= 0), "None or a count of values >= 0"),
    "job": (lambda v: v is None or (_is_count(v) and v >= 1), "None or a job number >= 1"),
    "probability": (lambda v: _is_number(v) and 0.0 <= v <= 1.0, "a number in [0, 1]"),
    "step": (lambda v: v is None or _is_name(v), "None or a step's name"),
    "site": (_is_name, "a site's name (or faults.ALL)"),
    "source": (_is_name, "a site's name, faults.CLIENT or faults.ALL"),
    "target": (_is_name, "a site's name, faults.CLIENT or faults.ALL"),
    "until": (lambda v: v is None or (_is_number(v) and v >= 0), "None or seconds >= 0 after the job starts"),
    "seconds": (lambda v: _is_number(v) and 0 <= v < math.inf, "a finite number of seconds >= 0"),
    "jitter": (lambda v: _is_number(v) and 0 <= v < math.inf, "a finite number of seconds >= 0"),
    "delay": (lambda v: _is_number(v) and 0 <= v < math.inf, "a finite number of seconds >= 0"),
    "factor": (lambda v: _is_number(v) and 1 <= v < math.inf, "a finite number >= 1"),
    "bytes_per_second": (lambda v: _is_number(v) and v > 0, "a number of bytes per second > 0"),
    "times": (lambda v: _is_count(v) and v >= 1, "a count >= 1"),
    "skip": (lambda v: _is_count(v) and v >= 0, "a count >= 0"),
    "both_ways": (lambda v: isinstance(v, bool), "True or False"),
    "lose": (lambda v: isinstance(v, bool), "True or False"),
}


def rng_for(seed: int, *key: object) -> random.Random:
    """The RNG of one decision: a function of the seed and what is decided, nothing else."""
    digest = hashlib.sha256(repr((seed, *key)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


@dataclass(frozen=True, kw_only=True)
class Fault:
    """Triggers every fault shares; see the module docstring of :mod:`federation.faults`."""

    kind: ClassVar[str] = ""
    at: float | None = None
    after: int | None = None
    job: int | None = None
    probability: float = 1.0
    per: str = "job"
    step: str | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            rule = _FIELD_RULES.get(field.name)
            value = getattr(self, field.name)
            if rule is not None and not rule[0](value):
                raise ConfigError(f"{self.kind}: {field.name}={value!r} must be {rule[1]}")
        if not isinstance(self.per, str) or self.per not in _PER:
            raise ConfigError(
                f"{self.kind}: per={self.per!r} must be one of {list(_PER)}{_hint(str(self.per), _PER)}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The fault as plain data: its kind and the fields that differ from their defaults."""
        data: dict[str, Any] = {"kind": self.kind}
        # Positional fields (the site, the link's ends) first, as a person writes them.
        for field in sorted(dataclasses.fields(self), key=lambda f: bool(f.kw_only)):
            value = getattr(self, field.name)
            if field.default is dataclasses.MISSING or value != field.default:
                data[field.name] = list(value) if isinstance(value, tuple) else value
        return data

    def fires_for_job(self, seed: int, index: int, number: int) -> bool:
        """Whether a per-job probability and the ``job`` trigger let it act in job ``number``."""
        if self.job is not None and number != self.job:
            return False
        if self.probability < 1.0 and self.per == "job":
            return rng_for(seed, "job", index, number).random() < self.probability
        return True


@dataclass(frozen=True)
class SiteFault(Fault):
    """A fault of one site's workers (``site`` may be :data:`ALL`)."""

    site: str


@dataclass(frozen=True)
class _ServiceTarget(SiteFault):
    """A site fault that may aim at one of the site's services instead of its worker."""

    service: str | None = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.service is None:
            return
        if not self.service or not isinstance(self.service, str):
            raise ConfigError(f"{self.kind}: service={self.service!r} must name one of the site's services")
        if self.after is not None or self.step is not None:
            raise ConfigError(
                f"{self.kind} of service {self.service!r}: a service fault is timed from the job's "
                "start (at=, job=, probability=); after= and step= count a step's values, which a "
                "service does not send"
            )
        if self.site == ALL:
            raise ConfigError(f"{self.kind} of service {self.service!r}: name one site, not {ALL!r}")


@dataclass(frozen=True)
class Crash(_ServiceTarget):
    """The site's worker is killed (SIGKILL; on the thread backend its thread ends with an error).

    With ``service="db"``, the site's service ``db`` is killed instead (SIGKILL to its
    process group), ``at`` seconds after the job starts (at once if ``at`` is None).
    """

    kind: ClassVar[str] = "crash"


@dataclass(frozen=True)
class Pause(_ServiceTarget):
    """The site's worker stops for ``seconds``, then resumes (a straggler).

    With ``service="db"``, the site's service ``db`` is stopped instead (SIGSTOP to its
    process group, SIGCONT ``seconds`` later): it accepts connections but answers nothing.
    """

    kind: ClassVar[str] = "pause"
    seconds: float = 1.0


@dataclass(frozen=True)
class Slow(SiteFault):
    """Each step call (and each item a generator yields) at the site takes ``factor`` times as
    long, plus ``delay`` seconds."""

    kind: ClassVar[str] = "slow"
    factor: float = 1.0
    delay: float = 0.0


@dataclass(frozen=True)
class FailStart(SiteFault):
    """The site's setup raises on its worker starts ``skip + 1`` to ``skip + times``
    (counted per federation; the first ``pool_size`` starts are the pool's own)."""

    kind: ClassVar[str] = "fail_start"
    times: int = 1
    skip: int = 0


@dataclass(frozen=True)
class Restart(SiteFault):
    """After the job, the slot that ran it is stopped and started again: the site's setup runs
    again and ``ctx.state`` is fresh (a graceful restart; :class:`Crash` is the other kind)."""

    kind: ClassVar[str] = "restart"


@dataclass(frozen=True)
class LinkFault(Fault):
    """A fault of the link from ``source`` to ``target`` (sites, or :data:`CLIENT`), one way.

    It acts from its trigger until ``until`` seconds after the job started (for ever if None).
    """

    source: str
    target: str
    until: float | None = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source == self.target:  # each end is checked as a name by _FIELD_RULES
            raise ConfigError(f"{self.kind}: name two different ends of the link (source=..., target=...)")

    def links(self) -> list[tuple[str, str]]:
        """The directed links it acts on."""
        return [(self.source, self.target)]


@dataclass(frozen=True)
class Delay(LinkFault):
    """Every frame on the link arrives ``seconds`` later, give or take up to ``jitter`` seconds
    (never earlier than sent; frames keep their order)."""

    kind: ClassVar[str] = "delay"
    seconds: float = 0.0
    jitter: float = 0.0


@dataclass(frozen=True)
class Bandwidth(LinkFault):
    """The link carries at most ``bytes_per_second`` (out-of-band buffers count too)."""

    kind: ClassVar[str] = "bandwidth"
    bytes_per_second: float = 1e6


@dataclass(frozen=True)
class Drop(LinkFault):
    """Tokens on the link are lost (each with ``probability`` if ``per="token"``)."""

    kind: ClassVar[str] = "drop"


@dataclass(frozen=True)
class Duplicate(LinkFault):
    """Stream items on the link arrive twice (a step run per item runs twice for it).

    Only items whose value travels inside the frame: a last value or a stream's end
    is never duplicated, nor a value sent through shared memory.
    """

    kind: ClassVar[str] = "duplicate"


@dataclass(frozen=True)
class Reorder(LinkFault):
    """A frame of stream items is held back and sent after the next one; never past a stream's end."""

    kind: ClassVar[str] = "reorder"


@dataclass(frozen=True)
class Partition(LinkFault):
    """The link is cut for ``seconds`` from its trigger, then healed; ``both_ways`` cuts the
    link back too. Tokens sent meanwhile are held until it heals, or lost if ``lose``."""

    kind: ClassVar[str] = "partition"
    seconds: float = 1.0
    both_ways: bool = True
    lose: bool = False

    def links(self) -> list[tuple[str, str]]:
        """The directed links it cuts."""
        pairs = [(self.source, self.target)]
        return pairs + [(self.target, self.source)] if self.both_ways else pairs


KINDS: dict[str, type[Fault]] = {
    cls.kind: cls
    for cls in (Crash, Pause, Slow, FailStart, Restart, Delay, Bandwidth, Drop, Duplicate, Reorder, Partition)
}


@dataclass(frozen=True)
class FaultPlan:
    """A seeded list of faults for a federation (``Federation(faults=...)``) or one submit.

    ::

        plan = fed.FaultPlan(seed=7, faults=[
            fed.faults.Crash("b", after=3),                       # b dies after sending 3 values
            fed.faults.Delay("a", "hub", seconds=0.05, jitter=0.01),
            fed.faults.Partition("c", "hub", at=0.5, seconds=2.0),
        ])

    Print it (``repr`` evaluates back to it in ``federation.faults``' namespace), save it
    with :meth:`save` (``.json`` or ``.toml``) and read it with :meth:`load`.
    """

    seed: int = 0
    faults: tuple[Fault, ...] = ()

    def __init__(self, seed: int = 0, faults: Iterable[Fault] = ()) -> None:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError(f"FaultPlan: seed={seed!r} must be an integer")
        if isinstance(faults, (str, bytes, Mapping)) or not isinstance(faults, Iterable):
            raise ConfigError(
                f"FaultPlan: faults= takes a list of faults (federation.faults), not {type(faults).__name__}"
            )
        object.__setattr__(self, "seed", seed)
        object.__setattr__(self, "faults", tuple(faults))
        for fault in self.faults:
            if not isinstance(fault, Fault):
                raise ConfigError(
                    f"FaultPlan: {fault!r} is not a fault (use the classes in federation.faults)"
                )

    def __repr__(self) -> str:
        inner = ", ".join(_fault_repr(fault) for fault in self.faults)
        return f"FaultPlan(seed={self.seed!r}, faults=[{inner}])"

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain data (what :meth:`to_json` and :meth:`to_toml` write)."""
        return {"seed": self.seed, "faults": [fault.to_dict() for fault in self.faults]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaultPlan:
        """The plan ``data`` describes (as :meth:`to_dict` gives it).

        Raises:
            ConfigError: an unknown kind or field, with "did you mean".
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"a fault plan is a table of 'seed' and 'faults', not {type(data).__name__}")
        entries = data.get("faults", ())
        if not isinstance(entries, (list, tuple)):
            raise ConfigError(f"a fault plan's 'faults' is a list of tables, not {type(entries).__name__}")
        faults = []
        for entry in entries:
            if not isinstance(entry, Mapping):
                raise ConfigError(f"a fault in a plan is a table with a 'kind', not {entry!r}")
            fields = dict(entry)
            kind = fields.pop("kind", None)
            fault_class = KINDS.get(str(kind))
            if fault_class is None:
                raise ConfigError(
                    f"unknown fault kind {kind!r}{_hint(str(kind), KINDS)}; kinds: {sorted(KINDS)}"
                )
            known = {f.name for f in dataclasses.fields(fault_class)}
            for name in fields:
                if name not in known:
                    raise ConfigError(f"fault {kind!r} has no field {name!r}{_hint(name, known)}")
            faults.append(fault_class(**fields))
        return cls(seed=data.get("seed", 0), faults=faults)

    def to_json(self) -> str:
        """The plan as JSON."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> FaultPlan:
        """The plan in a JSON text."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"a fault plan's JSON does not parse: {exc}") from None
        return cls.from_dict(data)

    def to_toml(self) -> str:
        """The plan as TOML: ``seed = ...`` then a ``[[faults]]`` table per fault."""
        lines = [f"seed = {self.seed}"]
        for fault in self.faults:
            lines += ["", "[[faults]]"]
            lines += [f"{key} = {_toml_value(value)}" for key, value in fault.to_dict().items()]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_toml(cls, text: str) -> FaultPlan:
        """The plan in a TOML text."""
        import importlib

        try:
            toml = importlib.import_module("tomllib")  # Python 3.11+
        except ImportError:  # pragma: no cover - Python 3.10
            try:
                toml = importlib.import_module("tomli")
            except ImportError as exc:
                raise ConfigError("reading a TOML plan needs Python 3.11+ or `pip install tomli`") from exc
        try:
            data = toml.loads(text)
        except ValueError as exc:  # tomllib.TOMLDecodeError
            raise ConfigError(f"a fault plan's TOML does not parse: {exc}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        """Write the plan to ``path``: TOML for ``.toml``, else JSON."""
        target = Path(path)
        target.write_text(self.to_toml() if target.suffix == ".toml" else self.to_json())
        return target

    @classmethod
    def load(cls, path: str | Path) -> FaultPlan:
        """Read a plan :meth:`save` wrote.

        Raises:
            ConfigError: the file's content is not a plan, naming the file and what is wrong.
        """
        source = Path(path)
        text = source.read_text()
        try:
            return cls.from_toml(text) if source.suffix == ".toml" else cls.from_json(text)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def check(
        self,
        sites: Sequence[str],
        *,
        per_submit: bool = False,
        services: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """Refuse faults naming sites (or services) the federation lacks, or a start fault for one submit.

        Raises:
            ConfigError: naming the fault and the site or service, with "did you mean".
        """
        known = set(sites)
        for fault in self.faults:
            if isinstance(fault, _ServiceTarget) and fault.service is not None and services is not None:
                declared = list(services.get(fault.site, ()))
                if fault.service not in declared:
                    raise ConfigError(
                        f"fault {_fault_repr(fault)} names service {fault.service!r}, which site "
                        f"{fault.site!r} does not have{_hint(fault.service, declared)}; its services "
                        f"are {sorted(declared)} (fed.Site(..., services=[...]))"
                    )
            names = [fault.site] if isinstance(fault, SiteFault) else []
            if isinstance(fault, LinkFault):
                names = [fault.source, fault.target]
            for name in names:
                if name not in known and name not in (ALL, CLIENT):
                    raise ConfigError(
                        f"fault {_fault_repr(fault)} names site {name!r}, which this federation "
                        f"does not have{_hint(name, known)}; its sites are {sorted(known)}"
                    )
            if isinstance(fault, SiteFault) and fault.site == CLIENT:
                raise ConfigError(f"{_fault_repr(fault)}: the client is not a site that can fail")
            if per_submit and isinstance(fault, FailStart):
                raise ConfigError(
                    "FailStart acts when workers start, before any job: give it to Federation(faults=...)"
                )


def _fault_repr(fault: Fault) -> str:
    data = fault.to_dict()
    del data["kind"]
    args = ", ".join(f"{key}={value!r}" for key, value in data.items())
    return f"{type(fault).__name__}({args})"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return json.dumps(str(value))  # a basic TOML string is a JSON string


def _hint(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
