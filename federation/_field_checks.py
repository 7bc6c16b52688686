"""The checks of single option values: each takes a value, returns it coerced or raises.

The field tables of :mod:`federation._config` name these for each option;
:func:`check_seconds` and :func:`check_count` guard the timeouts and counts of
calls (``submit``, ``result``, ``close``...) in the caller's thread.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NoReturn

from ._exceptions import ConfigError

__all__ = [
    "INTEGER_TEXT",
    "SITE_NAME",
    "SITE_NAME_RULE",
    "InvalidError",
    "check_count",
    "check_seconds",
    "choice",
    "env",
    "fail",
    "flag",
    "integer",
    "name_list",
    "non_negative_int",
    "number",
    "optional_address",
    "optional_egress",
    "optional_positive_int",
    "path",
    "pool_size",
    "positive_int",
    "positive_seconds",
    "preload",
    "resources",
    "seconds",
    "setup",
    "site_name",
]

SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
SITE_NAME_RULE = "use 1 to 64 ASCII letters, digits or '_.:-', starting with a letter or digit"


class InvalidError(Exception):
    """One problem with one option (internal: collected into a ConfigError)."""


# -- field checks: each takes the value, returns it coerced or raises InvalidError ---------------------


def fail(message: str) -> NoReturn:
    raise InvalidError(message)


INTEGER_TEXT = re.compile(r"[+-]?[0-9]+")


def check_seconds(name: str, value: Any, *, zero: bool = True) -> float | None:
    """``value`` as seconds if it is None or a finite number >= 0 (> 0 without ``zero``).

    For the timeouts of calls (``submit(timeout=)``, ``result(timeout=)``...): a
    wrong one is a ConfigError in the caller's thread naming the argument, never
    a NaN or infinity that reaches the router's clock.
    """
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not zero)
    ):
        raise ConfigError(
            f"{name} must be None or a finite number of seconds {'>=' if zero else '>'} 0, not {value!r}"
        )
    return float(value)


def check_count(name: str, value: Any) -> int:
    """``value`` if it is an int >= 0 (not a bool); else a ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be an integer >= 0, not {value!r}")
    return value


def integer(value: Any, low: int | None, high: int | None = None) -> int:
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif (isinstance(value, float) and value.is_integer()) or (
        # ASCII digits only: "²" is a digit to str.isdigit() but not to int(), and "+-5" is no number.
        isinstance(value, str) and INTEGER_TEXT.fullmatch(value.strip())
    ):
        number = int(value)
    if number is None or (low is not None and number < low) or (high is not None and number > high):
        if high is not None:
            fail(f"must be an integer from {low} to {high}, not {value!r}")
        fail(f"must be an integer of at least {low}, not {value!r}")
    return number


def number(value: Any, low: float, inclusive: bool) -> float:
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or math.isnan(number) or (number < low if inclusive else number <= low):
        fail(f"must be a number of seconds {'>=' if inclusive else '>'} {low:g}, not {value!r}")
    return number


def positive_int(value: Any) -> int:
    return integer(value, 1)


def non_negative_int(value: Any) -> int:
    return integer(value, 0)


def optional_positive_int(value: Any) -> int | None:
    return None if value is None else integer(value, 1)


def positive_seconds(value: Any) -> float:
    return number(value, 0.0, inclusive=False)


def seconds(value: Any) -> float:
    return number(value, 0.0, inclusive=True)


def pool_size(value: Any) -> int:
    return integer(value, 1, 1024)


def flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    fail(f"must be True or False, not {value!r}")


def path(value: Any) -> Path | None:
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return Path(value)
    fail(f"must be a path (str or pathlib.Path), not {type(value).__name__}")


def choice(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            quoted = [repr(choice) for choice in choices]
            allowed = " or ".join(quoted) if len(quoted) <= 2 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
            fail(f"must be {allowed}, not {value!r}")
        return str(value)

    return check


def name_list(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        fail(f"must be a list of {what}, not {type(value).__name__}")
    items = tuple(value)
    for item in items:
        if not isinstance(item, str):
            fail(f"must be a list of {what}; {item!r} is a {type(item).__name__}")
    return items


def preload(value: Any) -> tuple[str, ...]:
    names = name_list(value, "module names")
    for name in names:
        if not name or not all(part.isidentifier() for part in name.split(".")):
            fail(f"{name!r} is not a module name; give importable names such as 'numpy' or 'scipy.sparse'")
    return names


def optional_address(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        fail(f"must be None (a private local Ray instance), 'auto' or an address host:port, not {value!r}")
    return value.strip()


def optional_egress(value: Any) -> tuple[str, ...] | None:
    return None if value is None else name_list(value, "site names")


def env(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        fail(f"must be a dict of variable names to strings, not {type(value).__name__}")
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            fail(f"must map names to strings; {key!r}: {item!r} is not (write {str(item)!r}?)")
    return dict(value)


def resources(value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        fail(f"must be a dict of resource names to amounts, not {type(value).__name__}")
    resources: dict[str, float] = {}
    for key, item in value.items():
        if not isinstance(key, str) or isinstance(item, bool) or not isinstance(item, (int, float)):
            fail(f"must map resource names to numbers; {key!r}: {item!r} is not")
        resources[key] = float(item)
    return resources


def setup(value: Any) -> Callable[[], Any] | None:
    if value is not None and not callable(value):
        fail(f"must be a callable taking no arguments, not {type(value).__name__}")
    return value  # type: ignore[no-any-return]


def site_name(value: Any) -> str:
    if not isinstance(value, str):
        fail(f"a site name is a string, not {type(value).__name__} {value!r}")
    if not SITE_NAME.fullmatch(value):
        fail(f"site name {value!r} is not allowed: {SITE_NAME_RULE}")
    return value
