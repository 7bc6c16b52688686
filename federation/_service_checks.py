"""The checks of a :class:`~federation.Service`'s fields, and its placeholders.

Each check takes a value and returns it coerced, or raises ``ValueError`` with a
message that says what is allowed; ``_config`` turns those into one
:class:`~federation.ConfigError`. Kept apart from ``_config`` so that module stays
about sites and federations.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "PLACEHOLDERS",
    "command",
    "fill",
    "host",
    "placeholders",
    "port",
    "problems",
    "regex",
    "service_name",
    "url",
]

#: What ``{name}`` may stand for in a service's command, env values, cwd and url.
PLACEHOLDERS = ("port", "host", "site", "data_dir")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_NAME_RULE = "use 1 to 64 ASCII letters, digits or '_.:-', starting with a letter or digit"


def placeholders(text: str) -> set[str]:
    """The placeholders ``text`` uses.

    Raises:
        ValueError: a stray brace, or a placeholder that is not one of :data:`PLACEHOLDERS`.
    """
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}; write '{{{{' or '}}}}' for a literal brace") from None
    used = set()
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in PLACEHOLDERS or spec or conversion:
            import difflib

            close = difflib.get_close_matches(field, PLACEHOLDERS, n=1, cutoff=0.6)
            hint = f" (did you mean {{{close[0]}}}?)" if close else ""
            known = ", ".join(f"{{{name}}}" for name in PLACEHOLDERS)
            raise ValueError(
                f"{text!r} has an unknown placeholder {{{field}}}{hint}; the placeholders are {known}; "
                "write '{{' for a literal brace"
            )
        used.add(field)
    return used


def fill(text: str, values: Mapping[str, str]) -> str:
    """``text`` with its placeholders replaced by ``values`` (checked already)."""
    return text.format_map(values)


def service_name(value: Any) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"service name {value!r} is not allowed: {_NAME_RULE}")
    return value


def command(value: Any) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)):
        raise ValueError(
            f"must be a list of arguments, not a string: write shlex.split({value!r}) or ['prog', 'arg', ...]"
        )
    if not isinstance(value, Iterable):
        raise ValueError(f"must be a list of arguments such as ['redis-server'], not {type(value).__name__}")
    items = tuple(os.fspath(item) if isinstance(item, os.PathLike) else item for item in value)
    if not items:
        raise ValueError("must name a program to run; the list is empty")
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"must be a list of strings; {item!r} is a {type(item).__name__}")
        placeholders(item)
    return items


def host(value: Any) -> str:
    if not isinstance(value, str) or not value or any(char.isspace() for char in value):
        raise ValueError(f"must be a host name or address such as '127.0.0.1', not {value!r}")
    return value


def port(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():  # not "²"
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(f"must be an integer from 0 (a free port, picked for you) to 65535, not {value!r}")
    return value


def url(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("http://"):
        raise ValueError(f"must be an http:// URL such as 'http://{{host}}:{{port}}/health', not {value!r}")
    placeholders(value)
    return value


def regex(value: Any) -> str | None:
    if value is None:
        return None
    pattern = value.pattern if isinstance(value, re.Pattern) else value
    if not isinstance(pattern, str):
        raise ValueError(f"must be a regular expression (a str), not {type(value).__name__}")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
    return pattern


def problems(values: Mapping[str, Any]) -> tuple[frozenset[str], list[str]]:
    """The placeholders a service's checked fields use, and what is wrong across its fields."""
    name = values["name"]
    found: list[str] = []
    used: set[str] = set()
    texts = [("command", item) for item in values["command"]]
    texts += [("env", item) for item in values["env"].values()]
    cwd: Path | None = values["cwd"]
    texts += [("cwd", str(cwd))] if cwd is not None else []
    texts += [("url", values["url"])] if values["url"] is not None else []
    for field, text in texts:
        try:
            used |= placeholders(text)
        except ValueError as exc:
            found.append(f"{field}: {exc}")
    if "port" in used and values["port"] is None:
        found.append(
            f"service {name!r} uses {{port}} but has no port; "
            "give port=0 for a free port the federation picks, or a port number"
        )
    if values["port"] is None and values["url"] is None and values["ready_line"] is None:
        found.append(
            f"service {name!r} has no readiness check; give port= (ready when it accepts a "
            "connection), url= (when it answers 2xx) or ready_line= (when a line of its output matches)"
        )
    return frozenset(used), found
