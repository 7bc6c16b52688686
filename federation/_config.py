"""Configuration models: what a federation is made of, validated once at the API boundary.

These are pydantic models because they are built rarely and read often, and a
user deserves an error that names the field and what is allowed. Nothing here
crosses a queue: the federation turns them into plain tuples for the workers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ._exceptions import ConfigError

__all__ = ["FederationConfig", "SiteConfig", "default_pool_size", "validate_config"]

_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


def default_pool_size() -> int:
    """The pool size used when none is given: the CPUs this process may run on, at least 2."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(2, cpus)


class SiteConfig(BaseModel):
    """A named participant of a federation.

    Attributes:
        name: the site's name; letters, digits and ``_ . : -``, at most 64 characters.
        env: environment variables set only in this site's workers, before anything is imported.
        setup: called once in every worker of the site when it starts; its result is
            ``ctx.state``. A failure here is a :class:`SiteStartError`.
        data_dir: the site's data directory (created if missing); ``ctx.data_dir``.
        resources: resources a worker of this site needs, for placement on a cluster.
        egress: the sites this site may send tokens to; ``None`` means any.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True, extra="forbid")

    name: str
    env: dict[str, str] = Field(default_factory=dict)
    setup: Callable[[], Any] | None = None
    data_dir: Path | None = None
    resources: dict[str, float] = Field(default_factory=dict)
    egress: tuple[str, ...] | None = None

    def __init__(self, name: str | None = None, /, **data: Any) -> None:
        if name is not None:
            data["name"] = name
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(_describe(type(self).__name__, exc)) from exc

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _SITE_NAME.match(value):
            raise ValueError(
                f"site name {value!r} is not allowed: use 1 to 64 letters, digits or '_.:-', "
                "starting with a letter or digit"
            )
        return value

    @field_validator("setup")
    @classmethod
    def _check_setup(cls, value: Any) -> Any:
        if value is not None and not callable(value):
            raise ValueError(f"setup must be a callable taking no arguments, not {type(value).__name__}")
        return value


#: Alias users write: ``fed.Site("clinic-a", setup=load)``.
Site = SiteConfig


class FederationConfig(BaseModel):
    """Everything a :class:`~federation.Federation` is configured with.

    Attributes:
        sites: the sites; a plain string is a site with defaults.
        backend: ``"process"`` (every site a spawned worker process) or ``"thread"``
            (every site a thread in this process, to step through in a debugger).
        start_method: how the process backend starts workers: ``"spawn"`` (a fresh
            interpreter each) or ``"forkserver"`` (forked from one process that
            imported ``preload`` once: much faster starts, heavy imports shared).
            With ``"forkserver"`` a site's ``env`` is set after the interpreter
            started, so variables read at start-up (``PYTHONHASHSEED``...) need spawn.
        preload: modules the forkserver imports before forking workers.
        pool_size: how many job executions (one worker per site each) to keep ready.
        max_queued: how many jobs may wait for a free slot; ``submit`` blocks beyond it.
        start_timeout: seconds a worker may take to start and run its site's setup.
        shutdown_timeout: seconds ``close()`` waits for workers to stop before killing them.
        cancel_grace: seconds a cancelled job's steps get to stop before their slot is killed.
        max_token_bytes: the largest pickled value a token may carry.
        max_worker_memory: RSS in bytes above which a worker is killed (``None``: no limit).
        max_jobs_per_worker: recycle a slot's workers after this many jobs (``None``: never).
        max_slot_restarts: consecutive failed slot restarts before the federation gives up.
        echo_worker_output: print what workers write to stdout/stderr in this process,
            prefixed with their name.
        log_dir: write one log file per site under this directory.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True, extra="forbid")

    sites: tuple[SiteConfig, ...]
    backend: Literal["process", "thread"] = "process"
    start_method: Literal["spawn", "forkserver"] = "spawn"
    preload: tuple[str, ...] = ()
    pool_size: int = Field(default_factory=default_pool_size, ge=1, le=1024)
    max_queued: int = Field(default=100_000, ge=1)
    start_timeout: float = Field(default=60.0, gt=0)
    shutdown_timeout: float = Field(default=10.0, ge=0)
    cancel_grace: float = Field(default=2.0, ge=0)
    max_token_bytes: int = Field(default=2**31, ge=1)
    max_worker_memory: int | None = Field(default=None, ge=1)
    max_jobs_per_worker: int | None = Field(default=None, ge=1)
    max_slot_restarts: int = Field(default=5, ge=0)
    echo_worker_output: bool = True
    log_dir: Path | None = None

    @field_validator("sites", mode="before")
    @classmethod
    def _coerce_sites(cls, value: Any) -> Any:
        if isinstance(value, (str, SiteConfig)) or not isinstance(value, Sequence):
            raise ValueError("sites must be a list of site names or fed.Site(...) objects")
        return tuple(SiteConfig(name=item) if isinstance(item, str) else item for item in value)

    @model_validator(mode="after")
    def _check_start_method(self) -> FederationConfig:
        if self.start_method != "spawn" and self.backend != "process":
            raise ValueError(f"start_method={self.start_method!r} needs backend='process'")
        if self.preload and self.start_method != "forkserver":
            raise ValueError("preload needs start_method='forkserver' (spawned workers import per worker)")
        for name in self.preload:
            if not name or not all(part.isidentifier() for part in name.split(".")):
                raise ValueError(
                    f"preload: {name!r} is not a module name; give importable names such as "
                    "'numpy' or 'scipy.sparse'"
                )
        return self

    @model_validator(mode="after")
    def _check_sites(self) -> FederationConfig:
        if not self.sites:
            raise ValueError("a federation needs at least one site")
        seen: set[str] = set()
        for site in self.sites:
            if site.name in seen:
                raise ValueError(f"site {site.name!r} is listed twice; site names must be unique")
            seen.add(site.name)
        for site in self.sites:
            for target in site.egress or ():
                if target not in seen:
                    raise ValueError(
                        f"site {site.name!r} allows egress to unknown site {target!r}; "
                        f"known sites: {sorted(seen)}"
                    )
        return self

    def site(self, name: str) -> SiteConfig:
        """The config of the site called ``name``."""
        for site in self.sites:
            if site.name == name:
                return site
        raise KeyError(name)


def validate_config(model: type[BaseModel], values: Mapping[str, Any]) -> Any:
    """Build ``model`` from ``values``, turning pydantic's error into a :class:`ConfigError`."""
    try:
        return model(**values)
    except ValidationError as exc:
        raise ConfigError(_describe(model.__name__, exc)) from exc


def _describe(model_name: str, exc: ValidationError) -> str:
    problems = "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'config'}: {error['msg']}"
        for error in exc.errors()
    )
    return f"invalid {model_name}: {problems}"
