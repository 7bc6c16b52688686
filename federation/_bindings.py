"""What a pipeline is built from: steps, inputs, and how a parameter binds.

:class:`Step` is a function pinned to sites; :class:`Input` a named job input;
``collect``, ``quorum`` and ``per_site`` mark how a parameter or an input's
value binds. :class:`~federation._pipeline.Pipeline` puts them together,
validates the graph and compiles it.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._exceptions import PipelineError

if TYPE_CHECKING:
    from ._pipeline import Pipeline

__all__ = ["Input", "Step", "collect", "per_site", "quorum"]

F = TypeVar("F", bound=Callable[..., Any])


def _did_you_mean(name: str, choices: Iterable[str], what: str = "") -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or nothing."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {what}{close[0]!r}?)" if close else ""


def _looks_like_a_typo_of(name: str, steps: Iterable[str]) -> str | None:
    """The step ``name`` was most likely meant to be (``frist`` for ``first``), if any.

    Stricter than a "did you mean": a parameter that matches no step becomes a value
    input, so this decides whether to refuse it. A name that extends another
    (``counts`` beside a step ``count``) is taken as meant.
    """
    for candidate in difflib.get_close_matches(name, list(steps), n=3, cutoff=0.8):
        if not (candidate.startswith(name) or name.startswith(candidate)):
            return candidate
    return None


def _check_site_name(label: str, site: str) -> None:
    """Refuse, as the step is built, a site name no federation could ever have."""
    from ._field_checks import SITE_NAME as _SITE_NAME  # the one rule for site names

    if not _SITE_NAME.fullmatch(site):
        raise PipelineError(
            f"step {label!r}: {site!r} can never be a site's name: site names are 1 to 64 ASCII "
            "letters, digits or '_.:-', starting with a letter or digit"
        )


class Input:
    """A named job input.

    A value input is given at submit (``federation.submit(p, threshold=0.5)``).
    A stream input (``stream=True``) is fed while the job runs, by
    ``job.send(name, value)`` or another job's ``ctx.send_to_job``, until
    ``job.close(name)``; a step bound to it runs once per item, or receives the
    whole stream as a list when it collects it.

    Parameters that name no step and no declared input are value inputs
    implicitly; declare an input to make it a stream.
    """

    __slots__ = ("name", "stream")

    def __init__(self, name: str, *, stream: bool = False) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise PipelineError(f"input name {name!r} must be a Python identifier")
        self.name = name
        self.stream = bool(stream)

    def __repr__(self) -> str:
        return f"Input({self.name!r}, stream={self.stream})"


class collect:  # noqa: N801 - used like a function in bindings: bind={"xs": fed.collect("numbers")}
    """Bind a parameter to a whole stream, gathered into a list, instead of running per item.

    ``source`` is a step, a step's name, or an :class:`Input`. A fanned-out
    stream collects to ``{site: [items]}``.
    """

    __slots__ = ("source",)

    def __init__(self, source: str | Step[Any] | Input) -> None:
        self.source = source

    def __repr__(self) -> str:
        return f"collect({self.source!r})"


class quorum:  # noqa: N801 - used like a function in bindings, as fed.collect
    """Bind a parameter to a fan-out that may arrive incomplete: a tolerant fan-in.

    The step receives ``{site: value}`` for the sites that delivered, and runs
    once every site has delivered or is missing (its step raised, its worker
    died), or at ``deadline`` seconds after the job started at the gathering
    site, whichever comes first. ``ctx.missing`` says which sites are missing
    and why. A site that raises or dies inside such a fan-out does not fail the
    job; a late one is cancelled (and its own worker killed if it does not stop
    within ``cancel_grace``). With fewer than ``min`` sites the job fails with
    :class:`~federation.QuorumError`, listing each missing site and its reason.

    Args:
        source: the fanned-out step (or its name).
        min: the least number of sites (an int), or fraction of the sites the
            job runs the step at (a float in (0, 1]); default: 1 site.
        deadline: seconds to wait at most; ``None`` waits for every site to
            deliver or be missing.
    """

    __slots__ = ("deadline", "minimum", "source")

    def __init__(self, source: str | Step[Any], *, min: float = 1, deadline: float | None = None) -> None:
        if isinstance(min, bool) or not isinstance(min, (int, float)):
            raise PipelineError(f"quorum min= must be an int (sites) or a float fraction, not {min!r}")
        if isinstance(min, float) and not 0.0 < min <= 1.0:
            raise PipelineError(f"quorum min={min!r}: a fraction must be in (0, 1]")
        if isinstance(min, int) and min < 0:
            raise PipelineError(f"quorum min={min!r} must not be negative")
        if deadline is not None and (not isinstance(deadline, (int, float)) or deadline <= 0):
            raise PipelineError(f"quorum deadline={deadline!r} must be a positive number of seconds")
        self.source = source
        self.minimum = min
        self.deadline = None if deadline is None else float(deadline)

    def plan(self) -> tuple[float, bool, float | None]:
        return (float(self.minimum), isinstance(self.minimum, float), self.deadline)

    def __repr__(self) -> str:
        return f"quorum({self.source!r}, min={self.minimum!r}, deadline={self.deadline!r})"


class per_site:  # noqa: N801 - used like a function for an input's value
    """A value input holding one value per site: each site's step sees its own.

    ``federation.submit(p, lr=fed.per_site({"a": 0.1, "b": 0.01}))``. Every
    site of the job that uses the input needs a value.
    """

    __slots__ = ("values",)

    def __init__(self, values: Mapping[str, Any]) -> None:
        if not isinstance(values, Mapping) or not all(isinstance(k, str) for k in values):
            raise PipelineError(f"per_site() takes a mapping of site name -> value, not {values!r}")
        self.values = dict(values)

    def __repr__(self) -> str:
        return f"per_site({self.values!r})"


class Step(Generic[F]):
    """A step of a pipeline: a function pinned to one site, or fanned out over several.

    Calling a step calls its function directly, which is handy in unit tests.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        fn: F,
        *,
        name: str,
        sites: tuple[str, ...],
        fanout: bool,
        bind: dict[str, Any],
        collects: frozenset[str],
    ) -> None:
        self.pipeline = pipeline
        self.fn = fn
        self.name = name
        self.sites = sites
        self.fanout = fanout
        self.bind = bind
        self.collects = collects
        self.generator = inspect.isgeneratorfunction(fn)
        self.signature = inspect.signature(fn)
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        where = f"sites={list(self.sites)}" if self.fanout else f"site={self.sites[0]!r}"
        return f"<Step {self.name!r} {where}>"
