"""Configuration: what a federation is made of, validated once at the API boundary.

The two classes here are plain frozen objects with hand-written checks, not
pydantic models. They used to be pydantic models; two reasons moved them off it:

* start-up: importing pydantic and building two model classes cost the client
  ~60 ms of CPU in a fresh ``python script.py``, before its first worker could
  start (half of the client's own start-up work);
* messages: a user deserves one line that names the option, says what is
  allowed and suggests the option they meant (``unknown option 'pool_sz' (did
  you mean 'pool_size'?)``), not pydantic's wording wrapped in ours.

Checks collect every problem before raising, so one :class:`ConfigError` names
all of them. Values are coerced the way a user would expect (a list of sites
becomes a tuple, ``"8"`` an int, a ``str`` path a :class:`~pathlib.Path`).
Nothing here crosses a queue: the federation turns them into plain tuples for
the workers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NoReturn

from . import _field_checks as checks
from . import _service_checks as service_checks
from ._exceptions import ConfigError

__all__ = ["FederationConfig", "Service", "SiteConfig", "default_pool_size", "federation_config"]


def default_pool_size() -> int:
    """The pool size used when none is given: the CPUs this process may run on, at least 2."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(2, cpus)


def _site_services(value: Any) -> tuple[Service, ...]:
    if isinstance(value, (str, bytes, Service)) or not isinstance(value, Iterable):
        checks.fail("must be a list of fed.Service(...) objects")
    services = tuple(value)
    names: set[str] = set()
    for item in services:
        if not isinstance(item, Service):
            checks.fail(f"must be a list of fed.Service(...) objects; {item!r} is not one")
        if item.name in names:
            checks.fail(f"service {item.name!r} is listed twice; a site's service names must be unique")
        names.add(item.name)
    return services


def _sites(value: Any) -> tuple[SiteConfig, ...]:
    if isinstance(value, (str, bytes, SiteConfig)) or not isinstance(value, Iterable):
        checks.fail("must be a list of site names or fed.Site(...) objects")
    sites: list[SiteConfig] = []
    for item in value:
        if isinstance(item, SiteConfig):
            sites.append(item)
        elif isinstance(item, str):
            sites.append(SiteConfig._checked({"name": item}))
        else:
            checks.fail(f"must be a list of site names or fed.Site(...) objects; {item!r} is neither")
    return tuple(sites)


_NO_DEFAULT: Any = object()

#: Site options: name -> (check, default or a factory of it).
_SITE_FIELDS: dict[str, tuple[Callable[[Any], Any], Any]] = {
    "name": (checks.site_name, _NO_DEFAULT),
    "env": (checks.env, dict),
    "setup": (checks.setup, None),
    "data_dir": (checks.path, None),
    "resources": (checks.resources, dict),
    "egress": (checks.optional_egress, None),
    "services": (_site_services, tuple),
}

#: Federation options, in the order of the docs.
_FEDERATION_FIELDS: dict[str, tuple[Callable[[Any], Any], Any]] = {
    "sites": (_sites, _NO_DEFAULT),
    "backend": (checks.choice("process", "thread", "ray"), "process"),
    "ray_address": (checks.optional_address, None),
    "start_method": (checks.choice("spawn", "forkserver"), "spawn"),
    "preload": (checks.preload, tuple),
    "pool_size": (checks.pool_size, default_pool_size),
    "max_queued": (checks.positive_int, 100_000),
    "start_timeout": (checks.positive_seconds, 60.0),
    "shutdown_timeout": (checks.seconds, 10.0),
    "cancel_grace": (checks.seconds, 2.0),
    "max_token_bytes": (checks.positive_int, 2**31),
    "max_worker_memory": (checks.optional_positive_int, None),
    "max_jobs_per_worker": (checks.optional_positive_int, None),
    "max_slot_restarts": (checks.non_negative_int, 5),
    "echo_worker_output": (checks.flag, True),
    "log_dir": (checks.path, None),
}


def _unknown(name: str, known: Iterable[str], what: str) -> str:
    import difflib  # only on this error path: ~10 ms of a fresh client's start otherwise

    known = list(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown option {name!r}{hint}; {what} takes: {', '.join(known)}"


_NAMED = ("site name", "service name")  # messages that say what they are about


def _check(
    fields: Mapping[str, tuple[Callable[[Any], Any], Any]],
    values: Mapping[str, Any],
    what: str,
    also_accepted: tuple[str, ...] = (),
) -> tuple[dict[str, Any], list[str]]:
    """Every field of ``values`` checked and defaulted, and the problems found."""
    problems: list[str] = []
    checked: dict[str, Any] = {}
    for name in values:
        if name not in fields:
            problems.append(_unknown(name, [*fields, *also_accepted], what))
    for name, (check, default) in fields.items():
        if name in values:
            try:
                checked[name] = check(values[name])
            except checks.InvalidError as exc:
                message = str(exc)
                # A message that already names what it is about needs no "name:" in front.
                problems.append(message if message.startswith(_NAMED) else f"{name}: {message}")
        elif default is _NO_DEFAULT:
            problems.append(f"{name} is required")
        else:
            checked[name] = default() if callable(default) else default
    return checked, problems


def _raise(problems: list[str]) -> NoReturn:
    raise ConfigError("; ".join(problems))


class _Frozen:
    """Attributes set once in ``__init__``; equality and repr by fields."""

    _FIELDS: dict[str, tuple[Callable[[Any], Any], Any]] = {}

    def _set(self, values: Mapping[str, Any]) -> None:
        for name in self._FIELDS:
            object.__setattr__(self, name, values[name])

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: build a new one instead of setting {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: {name!r} cannot be deleted")

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._FIELDS)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash((type(self), getattr(self, next(iter(self._FIELDS)))))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._FIELDS)
        return f"{type(self).__name__}({fields})"

    def __copy__(self) -> Any:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return self


class SiteConfig(_Frozen):
    """A named participant of a federation.

    Build one with ``fed.Site("clinic-a", setup=load)``; it is immutable.

    Attributes:
        name: the site's name: 1 to 64 ASCII letters, digits and ``_ . : -``,
            starting with a letter or digit.
        env: environment variables set only in this site's workers, before anything is imported.
        setup: called once in every worker of the site when it starts; its result is
            ``ctx.state``. A failure here is a :class:`SiteStartError`. A setup with a
            parameter named ``services`` is given the site's services' addresses there.
        data_dir: the site's data directory (created if missing); ``ctx.data_dir``.
        resources: Ray resources a worker of this site needs (``{"CPU": 1, "GPU": 1,
            "memory": bytes, "custom": 1}``), on top of its node's site label; ignored
            by the local backends.
        egress: the sites this site may send tokens to; ``None`` means any.
        services: processes the site depends on (:class:`Service`), started in that
            order before its workers and stopped after them.

    Raises:
        ConfigError: an unknown option or an invalid value, in one line.
    """

    _FIELDS = _SITE_FIELDS

    name: str
    env: dict[str, str]
    setup: Callable[[], Any] | None
    data_dir: Path | None
    resources: dict[str, float]
    egress: tuple[str, ...] | None
    services: tuple[Service, ...]

    def __init__(self, name: str | None = None, /, **options: Any) -> None:
        if name is not None:
            if "name" in options:
                raise ConfigError(f"Site got its name twice: {name!r} and name={options['name']!r}")
            options["name"] = name
        checked, problems = _check(_SITE_FIELDS, options, "Site")
        if not problems and checked["data_dir"] is None:
            problems = [
                f"service {service.name!r} of site {checked['name']!r} uses {{data_dir}} but the site has "
                "no data_dir; give the site one"
                for service in checked["services"]
                if "data_dir" in service._placeholders
            ]
        if problems:
            _raise(problems)
        self._set(checked)

    @classmethod
    def _checked(cls, values: Mapping[str, Any]) -> SiteConfig:
        """A site from ``values``; a problem raises :class:`checks.InvalidError` (inside another check)."""
        try:
            return cls(**values)
        except ConfigError as exc:
            raise checks.InvalidError(str(exc)) from None


#: Alias users write: ``fed.Site("clinic-a", setup=load)``.
Site = SiteConfig


# -- services: their field checks are in _service_checks ------------------------------------------


def _lifted(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A check of ``_service_checks`` (which raises ValueError) as a field check here."""

    def lifted(value: Any) -> Any:
        try:
            return check(value)
        except ValueError as exc:
            raise checks.InvalidError(str(exc)) from None

    return lifted


_SERVICE_FIELDS: dict[str, tuple[Callable[[Any], Any], Any]] = {
    "name": (_lifted(service_checks.service_name), _NO_DEFAULT),
    "command": (_lifted(service_checks.command), _NO_DEFAULT),
    "env": (checks.env, dict),
    "cwd": (checks.path, None),
    "host": (_lifted(service_checks.host), "127.0.0.1"),
    "port": (_lifted(service_checks.port), None),
    "url": (_lifted(service_checks.url), None),
    "ready_line": (_lifted(service_checks.regex), None),
    "ready_timeout": (checks.positive_seconds, 30.0),
    "stop_grace": (checks.seconds, 10.0),
}


class Service(_Frozen):
    """A process a site depends on (a database, a broker), declared with ``Site(services=[...])``.

    It is started before the site's workers and is ready when (the first that applies):
    a line of its output matches ``ready_line``; ``url`` answers a GET with a 2xx
    status; ``port`` accepts a TCP connection on ``host``. It is stopped after the
    site's workers (SIGTERM to its process group, ``stop_grace`` seconds, then SIGKILL),
    and dies with the client. Its address is ``ctx.services[name]`` in steps::

        fed.Service("web", [sys.executable, "-m", "http.server", "{port}"], port=0,
                    url="http://{host}:{port}/")

    ``command``, ``env`` values, ``cwd`` and ``url`` may hold the placeholders ``{port}``
    (the service's port), ``{host}``, ``{site}`` and ``{data_dir}`` (the site's data
    directory, absolute); write ``{{`` for a literal brace.

    Attributes:
        name: its name among the site's services (the rules of site names).
        command: the program and its arguments (a list: no shell is involved).
        env: environment variables set for it, on top of this process's environment
            (and ``PYTHONUNBUFFERED=1``, so a Python service's lines arrive as written).
        cwd: its working directory; default: the site's ``data_dir`` if it has one.
        host: the host it listens on and is probed at (default ``127.0.0.1``).
        port: its TCP port; ``0`` makes the federation pick a free one for ``{port}``.
        url: its URL, given to steps, and probed for readiness (``http://`` only).
        ready_line: a regular expression; ready once a line of its output matches it.
        ready_timeout: seconds it may take to become ready (default 30).
        stop_grace: seconds it gets to stop after SIGTERM before it is killed (default 10).

    Raises:
        ConfigError: an unknown option or an invalid value, all of them in one line.
    """

    _FIELDS = _SERVICE_FIELDS

    name: str
    command: tuple[str, ...]
    env: dict[str, str]
    cwd: Path | None
    host: str
    port: int | None
    url: str | None
    ready_line: str | None
    ready_timeout: float
    stop_grace: float
    _placeholders: frozenset[str]  # the ones it uses (not a field)

    def __init__(self, name: str | None = None, command: Any = None, /, **options: Any) -> None:
        for key, value in (("name", name), ("command", command)):
            if value is not None:
                if key in options:
                    raise ConfigError(f"Service got its {key} twice: {value!r} and {key}={options[key]!r}")
                options[key] = value
        checked, problems = _check(_SERVICE_FIELDS, options, "Service")
        if not problems:
            used, problems = service_checks.problems(checked)
            object.__setattr__(self, "_placeholders", used)
        if problems:
            _raise(problems)
        self._set(checked)


class FederationConfig(_Frozen):
    """Everything a :class:`~federation.Federation` is configured with; immutable.

    Attributes:
        sites: the sites; a plain string is a site with defaults.
        backend: ``"process"`` (every site a spawned worker process), ``"thread"``
            (every site a thread in this process, to step through in a debugger) or
            ``"ray"`` (every site a Ray actor on the nodes labelled ``federation/site=<name>``).
        ray_address: with ``backend="ray"``: ``None`` (default) joins the cluster the
            ``RAY_ADDRESS`` environment variable names, else uses the Ray connection
            this program made with ``ray.init``, else starts a private local instance
            (never another program's cluster); ``"auto"`` joins the cluster running on
            this machine; ``"host:port"`` joins the cluster there.
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

    Raises:
        ConfigError: unknown options and invalid values, all of them in one line.
    """

    _FIELDS = _FEDERATION_FIELDS

    sites: tuple[SiteConfig, ...]
    backend: str
    ray_address: str | None
    start_method: str
    preload: tuple[str, ...]
    pool_size: int
    max_queued: int
    start_timeout: float
    shutdown_timeout: float
    cancel_grace: float
    max_token_bytes: int
    max_worker_memory: int | None
    max_jobs_per_worker: int | None
    max_slot_restarts: int
    echo_worker_output: bool
    log_dir: Path | None

    def __init__(self, **options: Any) -> None:
        self._build(options, "FederationConfig", ())

    def _build(self, options: Mapping[str, Any], what: str, also_accepted: tuple[str, ...]) -> None:
        checked, problems = _check(_FEDERATION_FIELDS, options, what, also_accepted)
        if not problems:
            problems = _cross_checks(checked)
        if problems:
            _raise(problems)
        self._set(checked)

    def site(self, name: str) -> SiteConfig:
        """The config of the site called ``name``."""
        for site in self.sites:
            if site.name == name:
                return site
        raise KeyError(name)


def _cross_checks(values: Mapping[str, Any]) -> list[str]:
    problems = []
    if values["start_method"] != "spawn" and values["backend"] != "process":
        problems.append(f"start_method={values['start_method']!r} needs backend='process'")
    if values["ray_address"] is not None and values["backend"] != "ray":
        problems.append(f"ray_address={values['ray_address']!r} needs backend='ray'")
    if values["backend"] == "ray" and values["max_worker_memory"] is not None:
        problems.append(
            "max_worker_memory is not available on the Ray backend (actors may run on other machines); "
            "give sites Ray resources instead: fed.Site(name, resources={'memory': bytes})"
        )
    if values["preload"] and values["start_method"] != "forkserver":
        problems.append("preload needs start_method='forkserver' (spawned workers import per worker)")
    sites: tuple[SiteConfig, ...] = values["sites"]
    if not sites:
        problems.append("a federation needs at least one site")
    seen: set[str] = set()
    for site in sites:
        if site.name in seen:
            problems.append(f"site {site.name!r} is listed twice; site names must be unique")
        seen.add(site.name)
    ports: dict[tuple[str, int], str] = {}
    for site in sites:
        for service in site.services:
            if service.port:  # 0 is a free port each
                other = ports.setdefault((service.host, service.port), f"{site.name}/{service.name}")
                if other != f"{site.name}/{service.name}":
                    problems.append(
                        f"services {other} and {site.name}/{service.name} both use port {service.port} "
                        f"on {service.host}; give port=0 for a free port each"
                    )
    for site in sites:
        for target in site.egress or ():
            if target not in seen:
                problems.append(
                    f"site {site.name!r} allows egress to unknown site {target!r}; "
                    f"known sites: {sorted(seen)}"
                )
    return problems


def federation_config(options: Mapping[str, Any], also_accepted: tuple[str, ...] = ()) -> FederationConfig:
    """A :class:`FederationConfig` from ``Federation(...)``'s keywords.

    ``also_accepted`` are the constructor's own keywords, offered with the fields
    when an option is misspelt.
    """
    config = FederationConfig.__new__(FederationConfig)
    config._build(options, "Federation", also_accepted)
    return config
