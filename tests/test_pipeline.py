"""Pipelines are validated as they are built and when compiled, with errors naming the step."""

from __future__ import annotations

import threading

import pytest

import federation as fed


def _two_step() -> fed.Pipeline:
    p = fed.Pipeline("two")

    @p.step(site="a")
    def first(x):
        return x + 1

    @p.step(site="b")
    def second(first):
        return first * 2

    p.output(second)
    return p


def test_step_needs_exactly_one_of_site_and_sites() -> None:
    p = fed.Pipeline("p")
    with pytest.raises(fed.PipelineError, match="exactly one of site="):
        p.step(site="a", sites=["b"])(lambda: 1)
    with pytest.raises(fed.PipelineError, match="exactly one of site="):
        p.step()(lambda: 1)


def test_lambda_steps_need_a_name() -> None:
    p = fed.Pipeline("p")
    with pytest.raises(fed.PipelineError, match="lambdas need one"):
        p.step(site="a")(lambda: 1)
    step = p.step(site="a", name="one")(lambda: 1)
    assert step.name == "one"
    assert step() == 1  # a step is still callable as its function


def test_var_args_are_refused_naming_the_parameter() -> None:
    p = fed.Pipeline("p")
    with pytest.raises(fed.PipelineError, match="'args'.*named parameters only"):

        @p.step(site="a")
        def bad(*args):
            return args


def test_bind_must_name_a_parameter() -> None:
    p = fed.Pipeline("p")
    with pytest.raises(fed.PipelineError, match="binds 'y', which is not one of its parameters"):

        @p.step(site="a", bind={"y": "z"})
        def f(x):
            return x


def test_duplicate_step_names_are_refused() -> None:
    p = _two_step()
    with pytest.raises(fed.PipelineError, match="already has a step named 'first'"):

        @p.step(site="a")
        def first():
            return 0


def test_cycle_is_reported_with_its_path() -> None:
    p = fed.Pipeline("loop")

    @p.step(site="a")
    def ping(pong):
        return pong

    @p.step(site="b")
    def pong(ping):
        return ping

    with pytest.raises(fed.PipelineError, match="cycle: (ping -> pong -> ping|pong -> ping -> pong)"):
        p.validate()


def test_unknown_site_is_reported_against_the_federation() -> None:
    p = _two_step()
    with pytest.raises(fed.PipelineError, match="step 'second' is pinned to unknown site 'b'"):
        p.validate(["a", "hub"])
    p.validate(["a", "b"])


def test_misspelled_site_gets_a_suggestion() -> None:
    p = fed.Pipeline("p")
    p.step(site="hbu", name="total")(lambda: 1)
    with pytest.raises(fed.PipelineError, match=r"unknown site 'hbu' \(did you mean 'hub'\?\)"):
        p.validate(["a", "b", "hub"])


def test_parameter_that_looks_like_a_step_name_gets_a_suggestion() -> None:
    p = fed.Pipeline("p")

    @p.step(site="a")
    def first():
        return 1

    @p.step(site="b")
    def second(frist):
        return frist

    with pytest.raises(fed.PipelineError, match=r"parameter 'frist' .*did you mean step 'first'\?"):
        p.validate(["a", "b"])
    # Declared, it is an input, as asked; a name that extends a step's is taken as meant.
    p.input("frist")
    p.validate(["a", "b"])
    p.step(site="b", name="third")(lambda firsts: firsts)
    p.validate(["a", "b"])


def test_pinned_site_name_that_can_never_be_valid_is_refused_at_build() -> None:
    p = fed.Pipeline("p")
    with pytest.raises(fed.PipelineError, match=r"'clinic a' can never be a site's name: .*ASCII letters"):
        p.step(site="clinic a", name="f")(lambda: 1)
    with pytest.raises(fed.PipelineError, match="'b c' can never be a site's name"):
        p.step(sites=["a", "b c"], name="g")(lambda: 1)
    assert not p.steps
    p.step(site="clinic-a.1", name="h")(lambda: 1)


def test_explicit_binding_to_unknown_name_is_an_error() -> None:
    p = fed.Pipeline("p")

    @p.step(site="a", bind={"x": "nothing"})
    def f(x):
        return x

    with pytest.raises(fed.PipelineError, match="bound to 'nothing', which is neither a step"):
        p.validate()


def test_two_streams_cannot_both_drive_a_step() -> None:
    p = fed.Pipeline("p")
    p.input("xs", stream=True)

    @p.step(site="a")
    def gen():
        yield 1

    @p.step(site="b")
    def both(gen, xs):
        return gen, xs

    with pytest.raises(fed.PipelineError, match=r"only one stream may drive a step"):
        p.validate()
    p2 = fed.Pipeline("p2")
    p2.input("xs", stream=True)
    p2.step(gen, site="a")
    p2.step(site="b", collect=["xs"], name="both")(both.fn)
    p2.validate()


def test_collecting_a_single_value_is_an_error() -> None:
    p = fed.Pipeline("p")

    @p.step(site="a")
    def one():
        return 1

    @p.step(site="b", bind={"xs": fed.collect("one")})
    def total(xs):
        return sum(xs)

    with pytest.raises(fed.PipelineError, match="collects 'one', which is a single value"):
        p.validate()


def test_unpicklable_step_is_a_serialization_error_naming_the_step() -> None:
    lock = threading.Lock()
    p = fed.Pipeline("p")

    @p.step(site="a")
    def uses_lock():
        return lock.locked()

    with pytest.raises(fed.SerializationError, match="step 'uses_lock'"):
        p.compile(["a"])


def test_egress_policy_is_enforced_at_compile() -> None:
    p = _two_step()
    with pytest.raises(fed.PipelineError, match="egress policy does not allow"):
        p.compile(["a", "b"], {"a": ("a",), "b": None})


def test_compile_is_cached_until_the_pipeline_changes() -> None:
    p = _two_step()
    first = p.compile(["a", "b"])
    assert p.compile(["a", "b"]) is first
    p.output("first")
    assert p.compile(["a", "b"]) is not first


def test_inputs_and_outputs_are_inferred() -> None:
    p = _two_step()
    compiled = p.compile(["a", "b", "c"])
    assert compiled.value_inputs == {"x": True}
    assert compiled.participants == ("a", "b")
    assert set(compiled.outputs) == {"second"}
    assert compiled.routes == (("a", "b"),)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"sites": 3}, "sites"),
        ({"sites": {"a": 1}}, "sites"),
        ({"site": "a", "name": 3}, "name"),
        ({"site": "a", "bind": 3}, "bind"),
        ({"site": "a", "bind": ["x"]}, "bind"),
        ({"site": "a", "collect": "x"}, "collect"),
        ({"site": "a", "collect": 3}, "collect"),
    ],
)
def test_a_wrong_type_for_a_step_option_is_a_pipeline_error_naming_it(options: dict, named: str) -> None:
    """Not an AttributeError or 'int object is not iterable' from inside the pipeline."""
    pipeline = fed.Pipeline("p")
    with pytest.raises(fed.PipelineError, match=named):
        pipeline.step(**options)(lambda x: x)


def test_submit_inputs_and_a_stream_inputs_name_of_the_wrong_type_are_pipeline_errors() -> None:
    pipeline = fed.Pipeline("p")
    numbers = pipeline.input("numbers", stream=True)

    @pipeline.step(site="a", bind={"n": numbers}, collect=["n"])
    def total(n):
        return sum(n)

    pipeline.output(total)
    with fed.Federation(["a"], backend="thread", pool_size=1) as federation:
        for inputs in (3, "x", ["numbers"]):
            with pytest.raises(fed.PipelineError, match="inputs= must be a mapping"):
                federation.submit(pipeline, inputs=inputs)
        job = federation.submit(pipeline)
        with pytest.raises(fed.PipelineError, match="name is a string"):
            job.send(["numbers"], 1)  # type: ignore[arg-type]
        job.send("numbers", 2)
        job.close("numbers")
        assert job.result(timeout=30) == 2
