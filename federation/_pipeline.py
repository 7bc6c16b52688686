"""Pipelines: steps pinned to sites, bound by parameter name, validated, compiled to plans.

A :class:`Pipeline` is built with decorators and checked in two passes:

* as it is built, each step is checked on its own (a callable, exactly one of
  ``site``/``sites``, named parameters only, known ``bind`` keys);
* when it is submitted (or :meth:`Pipeline.validate` is called), the whole graph:
  every parameter bound, no cycle, at most one stream driving a step item by
  item, every site known to the federation and allowed by egress, every
  function picklable.

Compilation turns it into one :class:`~federation._messages.SitePlan` per
site, pickled once with cloudpickle and cached by digest, so a repeated submit
ships only the digest and the inputs.
"""

from __future__ import annotations

import hashlib
import inspect
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from ._bindings import (
    F,
    Input,
    Step,
    _check_site_name,
    _did_you_mean,
    _looks_like_a_typo_of,
    collect,
    per_site,
    quorum,
)
from ._exceptions import PipelineError
from ._messages import (
    CLIENT,
    P_CTX,
    P_INPUT,
    P_UPSTREAM,
    Param,
    Route,
    SitePlan,
    StepPlan,
)
from ._serialization import dumps_function

__all__ = ["Compiled", "Input", "OutputSpec", "Pipeline", "Step", "collect", "per_site", "quorum"]

_MISSING: Any = object()


@dataclass(frozen=True)
class OutputSpec:
    """How results of an output are shaped: by site (fan-out) and as a list (stream)."""

    name: str
    step: str
    sites: tuple[str, ...]
    keyed: bool
    stream: bool


@dataclass
class Compiled:
    """A pipeline compiled for one set of sites."""

    pipeline: str
    plans: dict[str, tuple[bytes, bytes]]  # site -> (digest, plan bytes)
    participants: tuple[str, ...]
    value_inputs: dict[str, bool]  # name -> required
    stream_inputs: dict[str, tuple[Route, ...]]
    outputs: dict[str, OutputSpec]
    routes: tuple[tuple[str, str], ...]  # (from site, to site) links used
    site_inputs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Sites whose every value goes only to tolerant gathers (fed.quorum) at other sites:
    # site -> the gathering sites to tell when it raised or died. Their failure ends nothing.
    tolerant: dict[str, tuple[str, ...]] = field(default_factory=dict)
    fanouts: dict[str, tuple[str, ...]] = field(default_factory=dict)  # fan-out step -> its sites
    site_steps: dict[str, tuple[str, ...]] = field(default_factory=dict)  # site -> its steps


@dataclass
class _Binding:
    kind: int
    source: str = ""
    collect: bool = False
    stream: bool = False
    has_default: bool = False
    quorum: tuple[float, bool, float | None] | None = None


class Pipeline:
    """A directed acyclic graph of steps pinned to named sites.

    Example::

        pipeline = fed.Pipeline("mean")

        @pipeline.step(sites=["clinic-a", "clinic-b"])
        def local_stats(ctx, threshold): ...

        @pipeline.step(site="hub")
        def mean(local_stats): ...          # {site: value} from the fan-out

        pipeline.output(mean)
    """

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise PipelineError("a pipeline needs a non-empty name")
        self.name = name
        self._steps: dict[str, Step[Any]] = {}
        self._inputs: dict[str, Input] = {}
        self._outputs: dict[str, str] = {}
        self._version = 0
        self._lock = threading.Lock()
        self._compiled: dict[tuple[int, tuple[str, ...]], Compiled] = {}

    def __repr__(self) -> str:
        return f"<Pipeline {self.name!r} steps={list(self._steps)} outputs={list(self._outputs)}>"

    # -- building --------------------------------------------------------------------------

    @property
    def steps(self) -> Mapping[str, Step[Any]]:
        """The steps by name, in the order they were added."""
        return dict(self._steps)

    @property
    def inputs(self) -> Mapping[str, Input]:
        """The declared inputs by name."""
        return dict(self._inputs)

    @property
    def outputs(self) -> Mapping[str, str]:
        """Output name -> step name."""
        return dict(self._outputs)

    def input(self, name: str, *, stream: bool = False) -> Input:
        """Declare a job input; ``stream=True`` makes it fed while the job runs."""
        declared = Input(name, stream=stream)
        self._add_input(declared)
        return declared

    def _add_input(self, declared: Input) -> None:
        existing = self._inputs.get(declared.name)
        if existing is not None and existing.stream != declared.stream:
            raise PipelineError(f"input {declared.name!r} is declared both as a stream and as a value")
        if declared.name in self._steps:
            raise PipelineError(f"input {declared.name!r} has the name of a step; names must differ")
        self._inputs[declared.name] = declared
        self._touch()

    @overload
    def step(
        self,
        fn: F,
        /,
        *,
        site: str | None = None,
        sites: Sequence[str] | None = None,
        name: str | None = None,
        bind: Mapping[str, str | Step[Any] | Input | collect | quorum] | None = None,
        collect: Iterable[str] = (),
    ) -> Step[F]: ...

    @overload
    def step(
        self,
        fn: None = None,
        /,
        *,
        site: str | None = None,
        sites: Sequence[str] | None = None,
        name: str | None = None,
        bind: Mapping[str, str | Step[Any] | Input | collect | quorum] | None = None,
        collect: Iterable[str] = (),
    ) -> Callable[[F], Step[F]]: ...

    def step(
        self,
        fn: F | None = None,
        /,
        *,
        site: str | None = None,
        sites: Sequence[str] | None = None,
        name: str | None = None,
        bind: Mapping[str, str | Step[Any] | Input | collect | quorum] | None = None,
        collect: Iterable[str] = (),
    ) -> Step[F] | Callable[[F], Step[F]]:
        """Add a step; use as ``@pipeline.step(site="hub")`` or ``pipeline.step(fn, site=...)``.

        Args:
            site: the one site the step runs at.
            sites: run the step once at each of these sites; consumers receive ``{site: value}``.
            name: the step's name (default: the function's name).
            bind: explicit bindings, parameter -> step, step name, input name, ``Input``
                or ``fed.collect(...)``. Unlisted parameters bind by their own name.
            collect: parameters that receive a whole stream as a list.
        """
        if name is not None and not isinstance(name, str):
            raise PipelineError(f"a step's name= must be a string, not {name!r}")
        if bind is not None and not isinstance(bind, Mapping):
            raise PipelineError(
                f"bind= must be a mapping of parameter name -> step, step name, input or "
                f"fed.collect/fed.quorum, not {type(bind).__name__}"
            )
        if isinstance(collect, (str, bytes)) or not isinstance(collect, Iterable):
            raise PipelineError(f"collect= must be a list of parameter names, not {collect!r}")
        collect_names = frozenset(collect)

        def add(function: F) -> Step[F]:
            return self._add_step(function, site, sites, name, dict(bind or {}), collect_names)

        if fn is not None:
            if site is None and sites is None:
                raise PipelineError(
                    f"step {getattr(fn, '__name__', fn)!r} needs site= or sites=; "
                    "use pipeline.step(fn, site='...')"
                )
            return add(fn)
        return add

    def _add_step(
        self,
        fn: F,
        site: str | None,
        sites: Sequence[str] | None,
        name: str | None,
        bind: dict[str, Any],
        collects: frozenset[str],
    ) -> Step[F]:
        if isinstance(fn, Step):  # reuse a step of another pipeline
            name = name or fn.name
            fn = fn.fn
        label = name or getattr(fn, "__name__", None) or repr(fn)
        if not callable(fn):
            raise PipelineError(f"step {label!r}: {fn!r} is not callable")
        if (site is None) == (sites is None):
            raise PipelineError(
                f"step {label!r}: give exactly one of site='name' (one site) "
                "or sites=[...] (fanned out over several)"
            )
        if site is not None:
            if not isinstance(site, str) or not site:
                raise PipelineError(f"step {label!r}: site must be a site name, not {site!r}")
            _check_site_name(label, site)
            pinned: tuple[str, ...] = (site,)
        else:
            if isinstance(sites, (str, bytes, Mapping)) or not isinstance(sites, Iterable) or not sites:
                raise PipelineError(
                    f"step {label!r}: sites must be a non-empty list of site names, not {sites!r}"
                )
            pinned = tuple(sites)
            if len(set(pinned)) != len(pinned) or not all(isinstance(s, str) and s for s in pinned):
                raise PipelineError(f"step {label!r}: sites must be distinct site names: {sites!r}")
            for one in pinned:
                _check_site_name(label, one)
        if not label.isidentifier():
            raise PipelineError(
                f"step name {label!r} is not a Python identifier; pass name='...' (lambdas need one)"
            )
        if label in self._steps:
            raise PipelineError(f"pipeline {self.name!r} already has a step named {label!r}")
        if label in self._inputs:
            raise PipelineError(f"step {label!r} has the name of an input; names must differ")
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError) as exc:
            raise PipelineError(f"step {label!r}: cannot read its signature: {exc}") from exc
        for param in signature.parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
                raise PipelineError(
                    f"step {label!r}: parameter {param.name!r} is {param.kind.description}; "
                    "steps take named parameters only, each bound to a step, an input or ctx"
                )
        for key in list(bind) + list(collects):
            if key not in signature.parameters:
                raise PipelineError(
                    f"step {label!r}: binds {key!r}, which is not one of its parameters "
                    f"{list(signature.parameters)}"
                )
        for key, bound in bind.items():
            target = bound.source if isinstance(bound, collect) else bound
            if isinstance(target, Step) and target.pipeline is not self:
                raise PipelineError(
                    f"step {label!r}: parameter {key!r} is bound to step {target.name!r} "
                    f"of another pipeline ({target.pipeline.name!r})"
                )
            if isinstance(target, quorum):
                target = target.source
                if isinstance(target, Step) and target.pipeline is not self:
                    raise PipelineError(
                        f"step {label!r}: parameter {key!r} is a quorum of step {target.name!r} "
                        f"of another pipeline ({target.pipeline.name!r})"
                    )
            if isinstance(target, Input):
                self._add_input(target)
            elif not isinstance(target, (str, Step)):
                raise PipelineError(
                    f"step {label!r}: parameter {key!r} is bound to {target!r}; bind to a step, "
                    "a step or input name, fed.Input(...) or fed.collect(...)"
                )
        step = Step(
            self, fn, name=label, sites=pinned, fanout=sites is not None, bind=bind, collects=collects
        )
        self._steps[label] = step
        self._touch()
        return step

    def output(self, step: Step[Any] | str, *, name: str | None = None) -> Step[Any]:
        """Stream this step's results to the client, under ``name`` (default: the step's name)."""
        target = self._resolve_step(step, "output")
        label = name or target.name
        if label in self._outputs and self._outputs[label] != target.name:
            raise PipelineError(f"pipeline {self.name!r} already has an output named {label!r}")
        self._outputs[label] = target.name
        self._touch()
        return target

    def _resolve_step(self, step: Step[Any] | str, what: str) -> Step[Any]:
        if isinstance(step, Step):
            if step.pipeline is not self:
                raise PipelineError(f"{what}: step {step.name!r} belongs to pipeline {step.pipeline.name!r}")
            return step
        if isinstance(step, str) and step in self._steps:
            return self._steps[step]
        hint = _did_you_mean(step, self._steps) if isinstance(step, str) else ""
        raise PipelineError(
            f"{what}: {step!r} is not a step of pipeline {self.name!r}{hint}; steps: {list(self._steps)}"
        )

    def _touch(self) -> None:
        with self._lock:
            self._version += 1
            self._compiled.clear()

    # -- validation ------------------------------------------------------------------------

    def _bindings(self) -> dict[str, dict[str, _Binding]]:
        bindings: dict[str, dict[str, _Binding]] = {}
        for step in self._steps.values():
            params: dict[str, _Binding] = {}
            for pname, param in step.signature.parameters.items():
                has_default = param.default is not param.empty
                want_collect = pname in step.collects
                target: Any = step.bind.get(pname, _MISSING)
                tolerant = None
                if isinstance(target, collect):
                    want_collect, target = True, target.source
                elif isinstance(target, quorum):
                    tolerant, target = target.plan(), target.source
                if target is _MISSING:
                    if pname == "ctx":
                        params[pname] = _Binding(P_CTX)
                        continue
                    target = pname
                if isinstance(target, Step):
                    target = target.name
                if isinstance(target, Input):
                    target = target.name
                if target in self._steps:
                    upstream = self._steps[target]
                    streaming = self._is_stream(upstream.name, set())
                    if tolerant is not None and (streaming or not upstream.fanout):
                        raise PipelineError(
                            f"step {step.name!r}: parameter {pname!r} is a quorum of {target!r}, which "
                            "is not a fan-out of single values; fed.quorum() binds a step with sites=[...] "
                            "that returns (not yields) a value"
                        )
                    params[pname] = _Binding(P_UPSTREAM, target, want_collect, streaming, quorum=tolerant)
                elif tolerant is not None:
                    raise PipelineError(
                        f"step {step.name!r}: parameter {pname!r} is a quorum of {target!r}, "
                        "which is not a step"
                    )
                elif target in self._inputs:
                    is_stream = self._inputs[target].stream
                    params[pname] = _Binding(P_INPUT, target, want_collect, is_stream, has_default)
                elif pname in step.bind:
                    hint = _did_you_mean(str(target), [*self._steps, *self._inputs])
                    raise PipelineError(
                        f"step {step.name!r}: parameter {pname!r} is bound to {target!r}{hint}, which is "
                        f"neither a step ({list(self._steps)}) nor a declared input ({list(self._inputs)})"
                    )
                elif not has_default and (meant := _looks_like_a_typo_of(target, self._steps)):
                    # It would become a value input that submit() then asks for: say what
                    # was most likely meant instead, and how to keep it as an input.
                    raise PipelineError(
                        f"step {step.name!r}: parameter {pname!r} names no step and no declared input "
                        f"(did you mean step {meant!r}?); if it is a value input, declare it: "
                        f"pipeline.input({pname!r})"
                    )
                else:
                    # An undeclared name is a value input given at submit.
                    params[pname] = _Binding(P_INPUT, target, want_collect, False, has_default)
            bindings[step.name] = params
        return bindings

    def _is_stream(self, name: str, seen: set[str]) -> bool:
        step = self._steps[name]
        if step.generator:
            return True
        if name in seen:
            return False  # a cycle; reported by validate()
        seen = seen | {name}
        for pname in step.signature.parameters:
            target: Any = step.bind.get(pname, pname)
            collected = pname in step.collects or isinstance(target, collect)
            if isinstance(target, (collect, quorum)):
                target = target.source
            if isinstance(target, (Step, Input)):
                target = target.name
            if collected:
                continue
            if target in self._steps and self._is_stream(target, seen):
                return True
            if target in self._inputs and self._inputs[target].stream:
                return True
        return False

    def validate(self, sites: Iterable[str] | None = None) -> None:
        """Check the whole graph, and its sites against ``sites`` when given.

        Raises:
            PipelineError: naming the step and what is allowed.
        """
        if not self._steps:
            raise PipelineError(f"pipeline {self.name!r} has no steps")
        self._check_graph(self._bindings())
        if sites is not None:
            known = list(sites)
            for step in self._steps.values():
                for site in step.sites:
                    if site not in known:
                        raise PipelineError(
                            f"step {step.name!r} is pinned to unknown site {site!r}"
                            f"{_did_you_mean(site, known)}; "
                            f"this federation's sites are {known}"
                        )

    def _check_graph(self, bindings: dict[str, dict[str, _Binding]]) -> list[str]:
        order: list[str] = []
        state: dict[str, int] = {}

        def visit(name: str, path: list[str]) -> None:
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                cycle = path[path.index(name) :] + [name]
                raise PipelineError(f"pipeline {self.name!r} has a cycle: {' -> '.join(cycle)}")
            state[name] = 1
            for binding in bindings[name].values():
                if binding.kind == P_UPSTREAM:
                    visit(binding.source, path + [name])
            state[name] = 2
            order.append(name)

        for name in self._steps:
            visit(name, [])
        for name, params in bindings.items():
            drivers = [p for p, b in params.items() if b.stream and not b.collect]
            if len(drivers) > 1:
                raise PipelineError(
                    f"step {name!r} receives streams item by item on parameters {drivers}; "
                    "only one stream may drive a step, collect the others "
                    f"(collect={drivers[1:]!r} or bind={{...: fed.collect(...)}})"
                )
            for pname, binding in params.items():
                if binding.collect and not binding.stream:
                    raise PipelineError(
                        f"step {name!r}: parameter {pname!r} collects {binding.source!r}, which is "
                        "a single value, not a stream; only generator steps, steps they drive and "
                        "stream inputs can be collected"
                    )
        for output, step in self._outputs.items():
            if step not in self._steps:  # pragma: no cover - guarded by output()
                raise PipelineError(f"output {output!r} names unknown step {step!r}")
        return order

    # -- compilation -----------------------------------------------------------------------

    def compile(
        self, sites: Sequence[str], egress: Mapping[str, tuple[str, ...] | None] | None = None
    ) -> Compiled:
        """Validate against ``sites`` and compile to one pickled plan per site (cached)."""
        key = (self._version, tuple(sites))
        with self._lock:
            cached = self._compiled.get(key)
        if cached is not None:
            return cached
        self.validate(sites)
        bindings = self._bindings()
        order = self._check_graph(bindings)
        consumers: dict[str, list[tuple[str, str]]] = {name: [] for name in self._steps}
        for name, params in bindings.items():
            for pname, binding in params.items():
                if binding.kind == P_UPSTREAM:
                    consumers[binding.source].append((name, pname))
        links: set[tuple[str, str]] = set()
        per_site: dict[str, list[StepPlan]] = {}
        site_inputs: dict[str, set[str]] = {}
        outputs_of: dict[str, list[str]] = {}
        for output, step_name in self._outputs.items():
            outputs_of.setdefault(step_name, []).append(output)
        for name in order:
            step = self._steps[name]
            fn_check = dumps_function(step.fn, what=f"step {name!r} of pipeline {self.name!r}")
            del fn_check
            params = bindings[name]
            stream_out = self._is_stream(name, set())
            driver = next((p for p, b in params.items() if b.stream and not b.collect), None)
            for site in step.sites:
                plan_params = []
                for pname, binding in params.items():
                    if binding.kind == P_CTX:
                        plan_params.append(Param(pname, P_CTX))
                    elif binding.kind == P_INPUT:
                        if not binding.stream:
                            site_inputs.setdefault(site, set()).add(binding.source)
                        plan_params.append(
                            Param(
                                pname,
                                P_INPUT,
                                binding.source,
                                (CLIENT,) if binding.stream else (),
                                stream=binding.stream,
                                collect=binding.collect,
                            )
                        )
                    else:
                        upstream = self._steps[binding.source]
                        plan_params.append(
                            Param(
                                pname,
                                P_UPSTREAM,
                                upstream.name,
                                upstream.sites,
                                keyed=upstream.fanout,
                                stream=binding.stream,
                                collect=binding.collect,
                                quorum=binding.quorum,
                            )
                        )
                routes = []
                for consumer, pname in consumers[name]:
                    for target_site in self._steps[consumer].sites:
                        routes.append(Route(target_site, consumer, pname))
                        if target_site != site:
                            links.add((site, target_site))
                per_site.setdefault(site, []).append(
                    StepPlan(
                        name=name,
                        fn=step.fn,
                        generator=step.generator,
                        params=tuple(plan_params),
                        driver=driver,
                        routes=tuple(routes),
                        outputs=tuple(outputs_of.get(name, ())),
                        stream=stream_out,
                    )
                )
        for source, target in sorted(links):
            allowed = (egress or {}).get(source)
            if allowed is not None and target not in allowed:
                raise PipelineError(
                    f"pipeline {self.name!r} sends from site {source!r} to {target!r}, which "
                    f"{source!r}'s egress policy does not allow (allowed: {list(allowed)})"
                )
        plans: dict[str, tuple[bytes, bytes]] = {}
        for site, steps in per_site.items():
            plan = SitePlan(self.name, site, tuple(steps), tuple(sorted(site_inputs.get(site, ()))))
            data = dumps_function(plan, what=f"pipeline {self.name!r} at site {site!r}")
            plans[site] = (hashlib.blake2b(data, digest_size=16).digest(), data)
        value_inputs: dict[str, bool] = {}
        stream_inputs: dict[str, list[Route]] = {}
        for name, params in bindings.items():
            for pname, binding in params.items():
                if binding.kind != P_INPUT:
                    continue
                if binding.stream:
                    for site in self._steps[name].sites:
                        stream_inputs.setdefault(binding.source, []).append(Route(site, name, pname))
                else:
                    required = not binding.has_default
                    value_inputs[binding.source] = value_inputs.get(binding.source, False) or required
        for declared in self._inputs.values():
            if declared.stream:
                stream_inputs.setdefault(declared.name, [])
        outputs = {
            output: OutputSpec(
                output,
                step_name,
                self._steps[step_name].sites,
                self._steps[step_name].fanout,
                self._is_stream(step_name, set()),
            )
            for output, step_name in self._outputs.items()
        }
        tolerant: dict[str, tuple[str, ...]] = {}
        gathering = {
            site
            for name, params in bindings.items()
            if any(b.quorum for b in params.values())
            for site in self._steps[name].sites
        }
        for site, steps in per_site.items():
            targets: set[str] = set()
            ok = site not in gathering
            for step_plan in steps:
                ok = ok and not step_plan.outputs
                for route in step_plan.routes:
                    if route.site == site:
                        continue
                    binding = bindings[route.step][route.param]
                    ok = ok and binding.quorum is not None
                    targets.add(route.site)
            if ok and targets:
                tolerant[site] = tuple(sorted(targets))
        compiled = Compiled(
            pipeline=self.name,
            plans=plans,
            participants=tuple(site for site in sites if site in per_site),
            value_inputs=value_inputs,
            stream_inputs={k: tuple(v) for k, v in stream_inputs.items()},
            outputs=outputs,
            routes=tuple(sorted(links)),
            site_inputs={site: tuple(sorted(names)) for site, names in site_inputs.items()},
            tolerant=tolerant,
            fanouts={name: step.sites for name, step in self._steps.items() if step.fanout},
            site_steps={site: tuple(plan.name for plan in steps) for site, steps in per_site.items()},
        )
        with self._lock:
            if self._version == key[0]:
                self._compiled[key] = compiled
        return compiled
