"""The Ray cluster a federation runs on: connecting, placing sites, and translating Ray's errors.

* :func:`connect` joins the cluster ``ray_address`` names, or starts a private
  local instance for ``None``; one connection per process (Ray's rule), shared
  by every federation in it and counted, so the last one to close disconnects
  (and, for a private instance, stops its Ray processes).
* :func:`site_placement` decides where each site's actors may run, from the
  live nodes' labels (``federation/site=<name>``) or custom resources
  (``site:<name>``), and refuses at once a site that no live node can take:
  Ray itself would keep such an actor pending for ever.
* :func:`died_reason` and :func:`translate` turn Ray's exceptions into text
  and into this package's errors: Ray's own types never reach the user.

Ray is imported only here and in the transport, and only for ``backend="ray"``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from ._config import FederationConfig, SiteConfig
from ._exceptions import ConfigError, SiteStartError
from ._log import get_logger

__all__ = [
    "LABEL",
    "Lease",
    "Placement",
    "connect",
    "died_reason",
    "import_ray",
    "live_nodes",
    "node_summary",
    "site_placement",
]

#: The node label that pins a site's actors: ``federation/site=<site name>``.
LABEL = "federation/site"
#: The custom resource that does the same on Ray versions without labels.
RESOURCE_PREFIX = "site:"
# Failure detection of a lost node: about 1.5 s instead of Ray's default 30 s.
_SYSTEM_CONFIG = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}

_lock = threading.Lock()
_users = 0  # federations holding the process's connection
_owned: str | None = None  # "private" or "joined" when a federation made the connection; None otherwise
_watchdog: _Watchdog | None = None  # ends a private instance's processes if this process dies

# Run in a process of its own: waits for EOF on the lifeline (this process gone, or
# the instance shut down), then kills the private instance's daemons and whatever
# they started (Ray's agents and workers outlive a killed driver otherwise).
_MARK = "FEDERATION_RAY_INSTANCE"  # set in the environment every process of the instance inherits
_WATCHDOG = """
import os, select, sys
import psutil
fd = int(sys.argv[1])
mark = sys.argv[2]
roots = [entry.split(":") for entry in sys.argv[3:]]
known = {}  # pid -> Process: the instance's processes seen so far
def look():
    for pid, created in roots:
        try:
            root = psutil.Process(int(pid))
            if abs(root.create_time() - float(created)) > 0.01:
                continue  # that pid is another process now
            for proc in [root, *root.children(recursive=True)]:
                known.setdefault(proc.pid, proc)
        except psutil.Error:
            continue
# The raylet's agents outlive a killed driver, and lose their parent as the raylet goes:
# they are remembered while it lives (a look every 2 s), and killed with the rest.
look()
while True:
    try:
        ready, _, _ = select.select([fd], [], [], 2.0)
        if not ready:
            look()
            continue
        if not os.read(fd, 1):
            break
    except InterruptedError:
        continue
    except OSError:
        break
def marked():
    # Read raw: a renamed process (setproctitle) has NULs where psutil's parser stops.
    needle = ("\\0FEDERATION_RAY_INSTANCE=" + mark + "\\0").encode()
    found = []
    for proc in psutil.process_iter():
        try:
            with open(f"/proc/{proc.pid}/environ", "rb") as file:
                if needle in b"\\0" + file.read() + b"\\0" and proc.pid != os.getpid():
                    found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found
look()
doomed = [proc for proc in known.values() if proc.is_running()]  # is_running checks pid reuse
# Ray's agents may have lost their parent (the raylet) already: found by the mark,
# twice: a daemon dying as the driver went may start one more on its way out.
for attempt in range(3):
    doomed.extend(marked())
    for proc in doomed:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(doomed, timeout=2)
    doomed = []
"""


class _Watchdog:
    """A process that kills a private Ray instance's processes when the lifeline closes."""

    def __init__(self, mark: str, roots: list[Any]) -> None:
        import subprocess
        import sys

        read_fd, self._write_fd = os.pipe()
        os.set_inheritable(self._write_fd, False)
        args = [f"{proc.pid}:{proc.create_time()}" for proc in roots]
        self._process = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(read_fd), mark, *args],
            pass_fds=(read_fd,),
            start_new_session=True,  # Ctrl+C in a terminal is the client's to handle
            stdin=subprocess.DEVNULL,
        )
        os.close(read_fd)

    def stop(self) -> None:
        """The instance was shut down: let the watchdog clean what is left, and wait for it."""
        try:
            os.close(self._write_fd)
        except OSError:
            pass
        try:
            self._process.wait(10.0)
        except Exception:  # noqa: BLE001 - never hang close() on it
            self._process.kill()


_closers: list[Callable[[], None]] = []  # open federations' shutdowns, for interpreter exit
_exit_hook = False


def register_closer(close: Callable[[], None]) -> None:
    """Run ``close`` at interpreter exit, before Ray's own exit handler disconnects.

    Exit handlers run last registered first: this one is registered after
    ``ray.init`` registered Ray's, so federations close while Ray still runs.
    """
    global _exit_hook
    with _lock:
        _closers.append(close)
        if not _exit_hook:
            import atexit

            atexit.register(_close_all)
            _exit_hook = True


def unregister_closer(close: Callable[[], None]) -> None:
    """``close`` ran: nothing to do at exit."""
    with _lock:
        if close in _closers:
            _closers.remove(close)


def _close_all() -> None:
    with _lock:
        closers = list(_closers)
    for close in closers:
        try:
            close()
        except Exception:  # noqa: BLE001 - exiting: close what can be closed
            pass


def import_ray() -> Any:
    """Import Ray, or raise a :class:`ConfigError` that says how to install it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(
            "backend='ray' needs Ray: pip install 'federation-executor[ray]' (or pip install 'ray>=2.9')"
        ) from exc
    return ray


class Lease:
    """A federation's share of the process's Ray connection; :meth:`release` it once."""

    def __init__(self, address: str, private: bool) -> None:
        self.address = address
        self.private = private
        self._released = False

    def release(self) -> None:
        """Give the connection back; the last federation out disconnects (and stops a private instance)."""
        global _users, _owned, _watchdog
        with _lock:
            if self._released:
                return
            self._released = True
            _users -= 1
            if _users > 0 or _owned is None:
                return
            _owned = None
            watchdog, _watchdog = _watchdog, None
        import ray

        ray.shutdown()
        if watchdog is not None:
            watchdog.stop()


def connect(address: str | None) -> Lease:
    """Connect this process to Ray as ``ray_address`` asks; see :class:`~federation.FederationConfig`.

    ``None``: the cluster ``RAY_ADDRESS`` names if it is set, else the
    connection this program already made with ``ray.init``, else a private
    local instance (never another program's cluster); ``"auto"``: the cluster
    running on this machine; anything else: the cluster at that address.

    Raises:
        ConfigError: Ray is missing, or the process is connected to another cluster.
        SiteStartError: the cluster cannot be reached or started.
    """
    global _users, _owned, _watchdog
    ray = import_ray()
    if address is None and os.environ.get("RAY_ADDRESS"):
        # Ray's own convention, and the user's explicit choice: `RAY_ADDRESS=host:port python app.py`.
        address = os.environ["RAY_ADDRESS"]
    verbose = os.environ.get("FEDERATION_RAY_VERBOSE", "") not in ("", "0")
    with _lock:
        if ray.is_initialized():
            current = _gcs_address(ray)
            if address not in (None, "auto") and not _same_address(address, current):
                raise ConfigError(
                    f"ray_address={address!r}, but this process is already connected to the Ray "
                    f"cluster at {current}; one process can use one cluster (ray.shutdown() first)"
                )
            _users += 1
            return Lease(current, private=_owned == "private")
        options: dict[str, Any] = {
            "log_to_driver": verbose,
            "logging_level": logging.INFO if verbose else logging.ERROR,
            "include_dashboard": False,
            "namespace": "federation",
        }
        try:
            import warnings

            warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\.")  # Ray's tips
            if address is None:
                import psutil

                before = {proc.pid for proc in psutil.Process().children()}
                mark = f"{os.getpid()}-{time.time_ns()}"
                os.environ[_MARK] = mark
                try:
                    ray.init(address="local", _system_config=_SYSTEM_CONFIG, **options)
                finally:
                    del os.environ[_MARK]
                started = [proc for proc in psutil.Process().children() if proc.pid not in before]
                _watchdog = _Watchdog(mark, started)
            else:
                _check_reachable(address)
                ray.init(address=address, **options)
        except ConnectionError as exc:
            raise SiteStartError(
                f"could not connect to the Ray cluster at ray_address={address!r}: {exc}", site="*"
            ) from exc
        except Exception as exc:
            where = "start a private Ray instance" if address is None else f"join ray_address={address!r}"
            raise SiteStartError(f"could not {where}: {type(exc).__name__}: {exc}", site="*") from exc
        _owned = "private" if address is None else "joined"
        _users += 1
        return Lease(_gcs_address(ray), private=address is None)


_REACH_TIMEOUT = 5.0  # seconds to open a TCP connection to a cluster's address before ray.init


def _check_reachable(address: str) -> None:
    """Fail at once, and clearly, when nothing listens at ``address`` (``host:port``).

    ray.init keeps retrying an address with no cluster behind it for minutes,
    printing its own warnings; a federation says what is wrong instead.
    """
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isascii() or not port.isdigit():
        return  # "auto" and the like: Ray's to resolve
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=_REACH_TIMEOUT).close()
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise ConnectionError(
            f"nothing answers at {host}:{port} ({reason}); is a Ray head running there "
            "(`ray start --head`), and is the port its GCS port (6379 by default)?"
        ) from None


def _gcs_address(ray: Any) -> str:
    try:
        return str(ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001
        return "?"


def _same_address(wanted: str, current: str) -> bool:
    wanted = wanted.removeprefix("ray://")
    return wanted == current or (
        wanted.split(":")[-1] == current.rsplit(":", maxsplit=1)[-1]
        and (wanted.split(":")[0] in ("127.0.0.1", "localhost") or current.startswith(wanted.split(":")[0]))
    )


def live_nodes() -> list[dict[str, Any]]:
    """The cluster's live nodes as Ray reports them (labels, resources, address)."""
    import importlib

    nodes: list[dict[str, Any]] = importlib.import_module("ray").nodes()
    return [node for node in nodes if node.get("Alive")]


def node_summary(node: Mapping[str, Any]) -> dict[str, Any]:
    """What ``federation doctor`` and errors show of a node."""
    labels = {k: v for k, v in (node.get("Labels") or {}).items() if not k.startswith("ray.io/")}
    return {
        "node_id": node.get("NodeID"),
        "address": node.get("NodeManagerAddress"),
        "labels": labels,
        "resources": {k: v for k, v in (node.get("Resources") or {}).items() if not k.startswith("node:")},
        "head": "node:__internal_head__" in (node.get("Resources") or {}),
    }


class Placement:
    """Where each site's actors go: Ray actor options per site, and which nodes may take them."""

    def __init__(self, mode: str, options: dict[str, dict[str, Any]], nodes: dict[str, list[str]]) -> None:
        self.mode = mode  # "label", "resource" or "anywhere"
        self.options = options
        self.nodes = nodes  # site -> ids of the live nodes that may take its actors


def _has_label_selector() -> bool:
    """Whether this Ray can pin actors by node label (``label_selector``, Ray 2.49 and later)."""
    import importlib

    version = str(getattr(importlib.import_module("ray"), "__version__", "0"))
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return True  # a development build: assume the newest
    return (major, minor) >= (2, 49)


def _site_labels(nodes: list[dict[str, Any]]) -> list[str]:
    found = set()
    for node in nodes:
        value = (node.get("Labels") or {}).get(LABEL)
        if value is not None:
            found.add(f"{LABEL}={value}")
        for key in node.get("Resources") or {}:
            if key.startswith(RESOURCE_PREFIX):
                found.add(f"resource {key}")
    return sorted(found)


def _actor_resources(site: SiteConfig) -> dict[str, Any]:
    resources = dict(site.resources)
    options: dict[str, Any] = {"num_cpus": resources.pop("CPU", 0.0)}
    if "GPU" in resources:
        options["num_gpus"] = resources.pop("GPU")
    if "memory" in resources:
        options["memory"] = resources.pop("memory")
    if resources:
        options["resources"] = resources
    return options


def site_placement(config: FederationConfig, nodes: list[dict[str, Any]] | None = None) -> Placement:
    """Ray options per site from the live nodes, or a :class:`SiteStartError` for a site no node takes.

    Labels ``federation/site=<name>`` are used when any live node has such a
    label; else custom resources ``site:<name>`` when any node has one; else
    sites run anywhere (a laptop).
    """
    if nodes is None:
        nodes = live_nodes()
    labelled = _has_label_selector() and any(LABEL in (node.get("Labels") or {}) for node in nodes)
    by_resource = not labelled and any(
        key.startswith(RESOURCE_PREFIX) for node in nodes for key in node.get("Resources") or {}
    )
    mode = "label" if labelled else "resource" if by_resource else "anywhere"
    options: dict[str, dict[str, Any]] = {}
    placed: dict[str, list[str]] = {}
    for site in config.sites:
        site_options = _actor_resources(site)
        if mode == "label":
            site_options["label_selector"] = {LABEL: site.name}
            candidates = [n for n in nodes if (n.get("Labels") or {}).get(LABEL) == site.name]
        elif mode == "resource":
            key = RESOURCE_PREFIX + site.name
            # A tiny share of the marker resource: a node of the site holds any pool.
            site_options.setdefault("resources", {})[key] = 0.001
            candidates = [n for n in nodes if key in (n.get("Resources") or {})]
        else:
            candidates = list(nodes)
        if not candidates:
            labels = _site_labels(nodes)
            how = (
                f"the label {LABEL}={site.name}"
                if mode == "label"
                else f"the resource {RESOURCE_PREFIX}{site.name}"
            )
            raise SiteStartError(
                f"site {site.name!r} has no live node in the Ray cluster: no node carries {how} "
                f"(the cluster's nodes have: {', '.join(labels) or 'no site labels'}); start one with "
                f"`ray start --address=... --labels={LABEL}={site.name}`",
                site=site.name,
            )
        _check_resources(site, config.pool_size, candidates)
        options[site.name] = site_options
        placed[site.name] = [str(n.get("NodeID")) for n in candidates]
    return Placement(mode, options, placed)


def _check_resources(site: SiteConfig, pool_size: int, candidates: list[dict[str, Any]]) -> None:
    """A site whose actors can never fit on its nodes is an error now, not a pending actor."""
    for name, amount in site.resources.items():
        if amount <= 0:
            continue
        have = [float((n.get("Resources") or {}).get(name, 0.0)) for n in candidates]
        if max(have, default=0.0) < amount or sum(have) < amount * pool_size:
            raise SiteStartError(
                f"site {site.name!r} needs {name}={amount:g} per worker ({amount * pool_size:g} for "
                f"pool_size={pool_size}), but its nodes have {name}={sum(have):g} in all "
                f"({', '.join(f'{h:g}' for h in have)} per node)",
                site=site.name,
            )


def died_reason(exc: BaseException) -> str:
    """Ray's reason an actor died, in a line (what follows the exception's header and fields)."""
    text = str(exc)
    lines = [line.strip() for line in text.splitlines()]
    reason = [
        line
        for line in lines[1:]
        if line and not line.startswith(("class_name:", "actor_id:", "pid:", "namespace:", "ip:", "name:"))
    ]
    if reason:
        return " ".join(reason)
    return lines[0] if lines else type(exc).__name__


def is_dead(exc: BaseException) -> bool:
    """Whether ``exc`` from an actor call means the actor is gone (not a passing hiccup)."""
    import ray.exceptions as rex

    unavailable = getattr(rex, "ActorUnavailableError", None)
    return not (unavailable is not None and isinstance(exc, unavailable))


def get_logger_for_ray() -> Any:
    """The transport's logger."""
    return get_logger("ray")
