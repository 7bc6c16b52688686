"""Random pipelines and submit arguments, valid and invalid: each gets its result or a clear
FederationError, never a hang and never a broken federation."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from typing import Any

import cloudpickle
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import federation as fed

cloudpickle.register_pickle_by_value(sys.modules[__name__])

SITES = ["a", "b", "hub"]
T = 30


def _combine(values: tuple[Any, ...], const: int) -> int:
    total = const
    for value in values:
        total += sum(value.values()) if isinstance(value, dict) else value
    return total


def _make_step(name: str, params: list[str], const: int) -> Any:
    args = ", ".join(params)
    source = f"def {name}({args}):\n    return _combine(({args}{',' if params else ''}), {const})\n"
    namespace: dict[str, Any] = {"_combine": _combine}
    exec(source, namespace)  # a function with exactly these named parameters
    return namespace[name]


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    count = draw(st.integers(1, 4))
    steps = []
    for i in range(count):
        site_pool = (
            st.sampled_from(SITES + ["mars"]) if draw(st.integers(0, 9)) == 0 else st.sampled_from(SITES)
        )
        fanout = draw(st.booleans())
        sites = sorted(draw(st.sets(site_pool, min_size=1, max_size=3))) if fanout else [draw(site_pool)]
        upstream = (
            sorted(draw(st.sets(st.sampled_from([f"s{j}" for j in range(i)]), max_size=2))) if i else []
        )
        inputs = sorted(draw(st.sets(st.sampled_from(["x", "y"]), max_size=2)))
        cyclic = i < count - 1 and draw(st.integers(0, 14)) == 0  # bind to a later step: a cycle
        steps.append(
            {
                "name": f"s{i}",
                "sites": sites,
                "fanout": fanout,
                "params": upstream + inputs,
                "cycle_to": f"s{count - 1}" if cyclic else None,
                "const": i,
            }
        )
    given_inputs = draw(st.dictionaries(st.sampled_from(["x", "y", "z"]), st.integers(-5, 5), max_size=3))
    unpicklable = draw(st.integers(0, 14)) == 0
    return {"steps": steps, "inputs": given_inputs, "unpicklable": unpicklable}


def _build(scenario: dict[str, Any]) -> fed.Pipeline:
    pipeline = fed.Pipeline("random")
    for step in scenario["steps"]:
        params = list(step["params"]) + (["loop"] if step["cycle_to"] else [])
        fn = _make_step(step["name"], params, step["const"])
        placement = {"sites": step["sites"]} if step["fanout"] else {"site": step["sites"][0]}
        bind = {"loop": step["cycle_to"]} if step["cycle_to"] else None
        pipeline.step(fn, name=step["name"], bind=bind, **placement)
    pipeline.output(scenario["steps"][-1]["name"])
    return pipeline


def _expected(scenario: dict[str, Any]) -> Any:
    """What a correct federation returns, or the error class it must raise."""
    steps = {s["name"]: s for s in scenario["steps"]}
    if any(site not in SITES for s in steps.values() for site in s["sites"]):
        return fed.PipelineError
    deps = {
        name: [p for p in s["params"] if p in steps] + ([s["cycle_to"]] if s["cycle_to"] else [])
        for name, s in steps.items()
    }
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(name: str) -> bool:
        if state.get(name) == 1:
            return False  # a cycle
        if state.get(name) == 2:
            return True
        state[name] = 1
        if not all(visit(dep) for dep in deps[name]):
            return False
        state[name] = 2
        order.append(name)
        return True

    if not all(visit(name) for name in steps):
        return fed.PipelineError
    needed = {p for s in steps.values() for p in s["params"] if p in ("x", "y")}
    if set(scenario["inputs"]) - needed or needed - set(scenario["inputs"]):
        return fed.PipelineError
    if scenario["unpicklable"] and needed:
        return fed.SerializationError
    values: dict[str, Any] = {}
    for name in order:
        step = steps[name]
        args = [scenario["inputs"][p] if p in ("x", "y") else values[p] for p in step["params"]]
        if step["cycle_to"]:
            args.append(values[step["cycle_to"]])
        value = _combine(tuple(args), step["const"])
        values[name] = {site: value for site in step["sites"]} if step["fanout"] else value
    return values[scenario["steps"][-1]["name"]]


@pytest.fixture(scope="module", params=["process", "thread"])
def shared_federation(request: pytest.FixtureRequest) -> Iterator[fed.Federation]:
    federation = fed.Federation(SITES, pool_size=2, backend=request.param)
    yield federation
    federation.close(cancel_pending=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenario=scenarios())
def test_random_pipelines_give_a_result_or_a_clear_error(shared_federation: fed.Federation, scenario) -> None:
    expected = _expected(scenario)
    inputs = dict(scenario["inputs"])
    if scenario["unpicklable"] and inputs:
        inputs[next(iter(inputs))] = threading.Lock()
    try:
        pipeline = _build(scenario)
        job = shared_federation.submit(pipeline, inputs=inputs)
        outcome: Any = job.result(timeout=T)
    except fed.FederationError as exc:
        outcome = exc
    if isinstance(expected, type):
        assert isinstance(outcome, expected), (scenario, outcome)
        assert str(outcome)  # the error says something
    else:
        assert outcome == expected, scenario
    # whatever happened, the federation still works
    probe = fed.Pipeline("probe")
    probe.output(probe.step(site="hub", name="probe")(lambda: "ok"))
    assert shared_federation.submit(probe).result(timeout=T) == "ok"


@given(
    pool_size=st.one_of(st.integers(-3, 0), st.integers(1025, 5000), st.text(max_size=3), st.none()),
    max_queued=st.one_of(st.integers(-5, 0), st.just("many")),
)
@settings(max_examples=30, deadline=None)
def test_invalid_configs_raise_config_error(pool_size, max_queued) -> None:
    options: dict[str, Any] = {"max_queued": max_queued}
    if pool_size is not None:
        options["pool_size"] = pool_size
    with pytest.raises(fed.ConfigError) as info:
        fed.Federation(["a"], **options)
    assert "max_queued" in str(info.value)
