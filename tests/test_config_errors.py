"""Configuration errors a newcomer meets: one line, naming the option, with a "did you mean"."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import federation as fed


def _message(call: object) -> str:
    with pytest.raises(fed.ConfigError) as info:
        call()  # type: ignore[operator]
    message = str(info.value)
    assert "\n" not in message, message
    assert "pydantic" not in message.lower() and "Value error" not in message, message
    return message


def test_a_misspelt_federation_option_suggests_the_right_one_and_lists_the_options() -> None:
    message = _message(lambda: fed.Federation(sites=["a", "b"], pool_sz=2))
    assert message.startswith("unknown option 'pool_sz' (did you mean 'pool_size'?)"), message
    for option in ("sites", "backend", "pool_size", "max_queued", "start_timeout", "wait_ready"):
        assert option in message, (option, message)
    assert "Extra inputs are not permitted" not in message


def test_a_misspelt_constructor_keyword_is_suggested_too() -> None:
    message = _message(lambda: fed.Federation(sites=["a"], wait_redy=False))
    assert "unknown option 'wait_redy' (did you mean 'wait_ready'?)" in message


def test_an_option_like_nothing_known_lists_the_options_without_a_guess() -> None:
    message = _message(lambda: fed.Federation(sites=["a"], zzz=1))
    assert "unknown option 'zzz'" in message and "did you mean" not in message
    assert "pool_size" in message


def test_a_misspelt_site_option_suggests_the_right_one() -> None:
    message = _message(lambda: fed.Site("a", setpu=print))
    assert message.startswith("unknown option 'setpu' (did you mean 'setup'?)"), message
    for option in ("name", "env", "setup", "data_dir", "resources", "egress"):
        assert option in message, (option, message)


def test_a_misspelt_option_of_a_config_object_is_suggested() -> None:
    message = _message(lambda: fed.FederationConfig(sites=["a"], max_queue=5))
    assert "unknown option 'max_queue' (did you mean 'max_queued'?)" in message


@pytest.mark.parametrize("build", [lambda: fed.Site("clinic a"), lambda: fed.Federation(["clinic a"])])
def test_a_bad_site_name_is_one_line_that_says_ascii(build: object) -> None:
    message = _message(build)
    assert message == (
        "site name 'clinic a' is not allowed: use 1 to 64 ASCII letters, digits or '_.:-', "
        "starting with a letter or digit"
    )


def test_a_site_name_with_a_trailing_newline_is_refused() -> None:
    _message(lambda: fed.Site("a\n"))


def test_every_problem_is_named_in_one_error() -> None:
    message = _message(lambda: fed.Federation(["a"], pool_size=0, max_queued="many", pool_sz=1))
    assert "pool_size" in message and "max_queued" in message and "'pool_sz'" in message


def test_a_wrong_value_names_the_option_and_what_is_allowed() -> None:
    assert _message(lambda: fed.Federation(["a"], backend="carrier-pigeon")) == (
        "backend: must be 'process', 'thread' or 'ray', not 'carrier-pigeon'"
    )
    assert "'1'" in _message(lambda: fed.Site("a", env={"OMP_NUM_THREADS": 1}))


def test_config_error_is_a_value_error() -> None:
    assert issubclass(fed.ConfigError, ValueError)
    with pytest.raises(ValueError):
        fed.Federation(["a"], pool_sz=1)


def test_configs_are_frozen_comparable_and_picklable() -> None:
    config = fed.FederationConfig(sites=["a", fed.Site("b", env={"X": "1"})], pool_size="3", log_dir="logs")
    assert config.pool_size == 3 and config.log_dir == Path("logs")
    assert [site.name for site in config.sites] == ["a", "b"] and config.site("b").env == {"X": "1"}
    assert config == fed.FederationConfig(
        sites=["a", fed.Site("b", env={"X": "1"})], pool_size=3, log_dir="logs"
    )
    assert pickle.loads(pickle.dumps(config)) == config
    with pytest.raises(AttributeError):
        config.pool_size = 4  # type: ignore[misc]


def test_building_a_federation_imports_neither_pydantic_nor_structlog() -> None:
    """Both cost a fresh client tens of ms before its first worker can start."""
    code = (
        "import sys, federation as fed; fed.FederationConfig(sites=['a']); "
        "federation = fed.Federation(['a'], pool_size=1); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'pydantic', 'structlog'})); "
        "federation.close()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("text", ["²", "+-5", "1_0", "٣", " "])
def test_an_integer_option_given_as_text_that_is_no_integer_is_a_config_error(text: str) -> None:
    """Text that str.isdigit() accepts but int() does not (or reads otherwise) is refused by name."""
    message = _message(lambda: fed.Federation(["a"], pool_size=text))
    assert "pool_size" in message and "must be an integer" in message, message


def test_an_integer_option_given_as_plain_digits_is_taken() -> None:
    assert fed.FederationConfig(sites=["a"], pool_size=" 3 ").pool_size == 3


def test_a_service_port_given_as_text_that_is_no_integer_names_what_is_allowed() -> None:
    message = _message(lambda: fed.Service("db", ["true"], port="²"))
    assert "port" in message and "integer from 0" in message, message
