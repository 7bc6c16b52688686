"""Site services on Ray: each site's services run on one of its nodes, beside its site actors.

One service host actor per site with services, per federation (not per slot),
placed as the site's actors are (its node label or resource), with no CPU of its
own. It runs the site's services with :class:`~federation._services.FederationServices`,
the code of the local backends: ports are picked, services started, probed and
supervised on the node, and the host's process owns their lifelines, so they die
with it (and it dies with the driver: a non-detached actor)::

    client                                      the site's node
    RayServices.start ──create, start()──────>  ServiceHost ── FederationServices
                                                  └─ supervisor ── the service (its own group)
    thread federation-ray-services <──events()── what they logged and wrote (long poll)
    RayPool: the site's actors pinned to the host's node (ctx.services is local to them)
    close: slots gone ──> stop() (SIGTERM, stop_grace, SIGKILL the group) ──> last events ──> ray.kill

What services say (records, output lines) reaches the client through one long
poll per host, answered by Ray's callback into a queue; the client's
``federation-ray-services`` thread reads that queue and logs each record and
line as the local backends do (:class:`~federation._services.ServiceReport`).
It is woken by the queue, never by a timer, and never touches the router.

A site's actors run on the node of its services, so a service on ``127.0.0.1`` (the
default) is reachable from its steps and setup, as on one machine. If the host
dies (its node was lost), its services are gone: that is logged at ERROR, as a
service's death is, and the site's replacement actors are no longer pinned.
"""

from __future__ import annotations

import os
import queue
import threading
import traceback
from typing import Any

from ._config import FederationConfig, SiteConfig
from ._exceptions import SiteStartError
from ._log import SiteLogFiles
from ._ray_cluster import RESOURCE_PREFIX, Placement, died_reason, import_ray
from ._service_address import ServiceMap
from ._services import FederationServices, ServiceReport

__all__ = ["RayServices", "ServiceHost", "pin_to_node"]

_HOST_THREADS = 4  # start (long), events (the long poll), stop, signal
_OUTGOING_MAX = 100_000  # events the client has not read yet beyond which output lines are dropped
_CALL_TIMEOUT = 10.0  # seconds for a short call to a host (signal)
_STOP_MARGIN = 5.0  # seconds beyond the stop_grace of a site's services for its host to stop them
_LAST_EVENTS = 5.0  # seconds to wait, after the hosts stopped, for their last lines to arrive


class _Forwarding(ServiceReport):
    """The host's report: every record and line goes to the client, through ``events``."""

    def __init__(self, host: ServiceHost) -> None:  # no logger, no files here: the client has them
        self._host = host

    def record(self, level: str, event: str, **fields: Any) -> None:
        fields.setdefault("node", self._host.node[:12])
        self._host.emit(("record", level, event, fields))

    def output(self, site: str, name: str, line: str) -> None:
        self._host.emit(("output", site, name, line))


class ServiceHost:
    """A Ray actor: the services of one site, on one of its nodes."""

    def __init__(self, site: SiteConfig) -> None:
        ray = import_ray()
        self.site = site.name
        self.node = str(ray.get_runtime_context().get_node_id())
        self._cond = threading.Condition()
        self._outgoing: list[tuple[Any, ...]] = []
        self._dropped = 0
        self._ended = False
        self._services = FederationServices([site], _Forwarding(self))

    def emit(self, event: tuple[Any, ...]) -> None:
        """Queue ``event`` for the client's poll (never blocks: the services' output must flow)."""
        with self._cond:
            if len(self._outgoing) >= _OUTGOING_MAX and event[0] == "output":
                self._dropped += 1
                return
            self._outgoing.append(event)
            self._cond.notify_all()

    def start(self) -> tuple[Any, ...]:
        """Start the site's services: ``("ready", addresses, node id, pid)`` or ``("failed", ...)``."""
        try:
            self._services.start()
        except SiteStartError as exc:
            return ("failed", exc.args[0], exc.service, exc.last_output, exc.remote_traceback)
        except BaseException:  # noqa: BLE001 - e.g. mirakuru missing on this node: the client hears why
            message = f"the services of site {self.site!r} could not be started on node {self.node[:12]}"
            return ("failed", message, None, (), traceback.format_exc())
        return ("ready", self._services.addresses[self.site], self.node, os.getpid())

    def events(self) -> tuple[list[tuple[Any, ...]], bool]:
        """Wait for records or lines and return them, and whether they are the last (the long poll)."""
        with self._cond:
            self._cond.wait_for(lambda: bool(self._outgoing) or self._ended)
            out, self._outgoing = self._outgoing, []
            if self._dropped:
                fields = {"site": self.site, "lines": self._dropped, "node": self.node[:12]}
                out.append(
                    ("record", "warning", "services wrote faster than the client read; lines dropped", fields)
                )
                self._dropped = 0
            return out, self._ended

    def signal(self, name: str, signum: int) -> bool:
        """Send ``signum`` to the process group of service ``name``; whether it was running."""
        return self._services.signal(self.site, name, signum)

    def stop(self) -> None:
        """Stop the services (SIGTERM, their stop_grace, SIGKILL the group); then the poll ends."""
        try:
            self._services.stop()
        finally:
            with self._cond:
                self._ended = True
                self._cond.notify_all()


class _Host:
    """A service host as the client knows it."""

    def __init__(self, site: SiteConfig, actor: Any) -> None:
        self.site = site.name
        self.config = site
        self.actor = actor
        self.node: str | None = None
        self.pid: int | None = None
        self.ended = False  # its last events have been read
        self.gone = False  # its poll failed: the actor is dead


def pin_to_node(options: dict[str, Any], node: str) -> None:
    """Make actor ``options`` place the actor on ``node`` and nowhere else."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)


def _host_options(site_options: dict[str, Any]) -> dict[str, Any]:
    """The site's placement without the resources its workers ask for: a host needs no CPU."""
    options: dict[str, Any] = {"num_cpus": 0}
    if "label_selector" in site_options:
        options["label_selector"] = site_options["label_selector"]
    markers = {
        k: v for k, v in (site_options.get("resources") or {}).items() if k.startswith(RESOURCE_PREFIX)
    }
    if markers:
        options["resources"] = markers
    return options


class RayServices:
    """A federation's site services on Ray: a :class:`ServiceHost` per site that has some."""

    def __init__(self, config: FederationConfig, log_files: SiteLogFiles | None) -> None:
        self._sites = [site for site in config.sites if site.services]
        self._start_timeout = config.start_timeout
        self._report = ServiceReport(log_files)
        self._hosts: dict[str, _Host] = {}
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # a host's end or death was read
        self._stopped = False
        self._arrivals: queue.SimpleQueue[tuple[_Host, Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.addresses: dict[str, ServiceMap] = {
            site.name: ServiceMap(site.name, {}) for site in config.sites
        }

    # -- starting ----------------------------------------------------------------------------

    def start(self, placement: Placement) -> None:
        """Start every site's services on its node, sites at once; return once all are ready.

        Raises:
            SiteStartError: a service exited, was not ready in time or could not be started,
                or a host could not be made; every service started is stopped again first.
        """
        if not self._sites:
            return
        ray = import_ray()
        try:
            host_class = ray.remote(ServiceHost)
            self._thread = threading.Thread(target=self._run, name="federation-ray-services", daemon=True)
            self._thread.start()
            for site in self._sites:
                actor = host_class.options(
                    max_restarts=0,  # a service is not restarted (as on the local backends)
                    max_task_retries=0,
                    max_concurrency=_HOST_THREADS,
                    **_host_options(placement.options[site.name]),
                ).remote(SiteConfig(site.name, data_dir=site.data_dir, services=site.services))
                self._hosts[site.name] = host = _Host(site, actor)
                self._poll(host)
            self._wait_started(ray)
        except BaseException:
            self.stop()
            raise

    def _wait_started(self, ray: Any) -> None:
        calls = {host.actor.start.remote(): host for host in self._hosts.values()}
        # The host's own start (an actor, a Ray worker) within start_timeout; then each
        # service's ready_timeout, one after another.
        timeout = self._start_timeout + max(
            sum(service.ready_timeout for service in site.services) for site in self._sites
        )
        pending = list(calls)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=timeout)
            if not done:
                late = sorted(calls[ref].site for ref in pending)
                raise SiteStartError(
                    f"the services of sites {late} were not started within {timeout:g} s (start_timeout "
                    "plus their ready_timeouts): their service hosts could not be placed or started",
                    site=late[0],
                )
            host = calls[done[0]]
            try:
                answer = ray.get(done[0])
            except Exception as exc:  # noqa: BLE001 - Ray's errors are translated here
                raise SiteStartError(
                    f"the service host of site {host.site!r} died while starting its services: "
                    f"{died_reason(exc)}",
                    site=host.site,
                ) from None
            if answer[0] == "failed":
                _, message, service, last_output, tb = answer
                raise SiteStartError(
                    message,
                    site=host.site,
                    service=service,
                    last_output=tuple(last_output),
                    remote_traceback=tb,
                )
            _, addresses, host.node, host.pid = answer
            self.addresses[host.site] = addresses

    # -- what hosts say ----------------------------------------------------------------------

    def _poll(self, host: _Host) -> None:
        arrivals = self._arrivals
        try:
            future = host.actor.events.remote().future()
        except Exception as exc:  # noqa: BLE001 - Ray is shutting down
            import concurrent.futures

            future = concurrent.futures.Future()
            future.set_exception(exc)
        # Called on a Ray thread once the answer is here (or the actor is dead).
        future.add_done_callback(lambda done: arrivals.put((host, done)))

    def _run(self) -> None:
        """The thread ``federation-ray-services``: every host's records and lines, in order per host."""
        while True:
            item = self._arrivals.get()
            if item is None:
                return
            host, future = item
            try:
                events, ended = future.result(timeout=0)
            except Exception as exc:  # noqa: BLE001 - the host is dead
                with self._cond:
                    host.gone = True
                    stopping = self._stopped
                    self._cond.notify_all()
                if not stopping:
                    self._report.record(
                        "error",
                        "a service host died with its services (its node lost?); they are not restarted, "
                        "and steps that use them will fail",
                        site=host.site,
                        node=(host.node or "?")[:12],
                        reason=died_reason(exc),
                    )
                continue
            for event in events:
                try:
                    if event[0] == "record":
                        self._report.record(event[1], event[2], **event[3])
                    else:
                        self._report.output(event[1], event[2], event[3])
                except Exception:  # noqa: BLE001 - a user's logging handler must not end this thread
                    pass
            if ended:
                with self._cond:
                    host.ended = True
                    self._cond.notify_all()
            else:
                self._poll(host)

    # -- while running -------------------------------------------------------------------------

    def node_of(self, site: str) -> str | None:
        """The id of the node ``site``'s services run on; ``None`` without services (or host)."""
        host = self._hosts.get(site)
        if host is None or host.gone:
            return None
        return host.node

    def host_pid(self, site: str) -> int | None:
        """The pid of ``site``'s service host (the services' supervisors' parent)."""
        host = self._hosts.get(site)
        return None if host is None else host.pid

    def signal(self, site: str, name: str, signum: int) -> bool:
        """Send ``signum`` to the process group of ``site``'s service ``name``; whether it runs.

        Waits for the host's answer (one actor call): not for the router thread.
        """
        host = self._hosts.get(site)
        if host is None or host.gone or self._stopped:
            return False
        ray = import_ray()
        try:
            return bool(ray.get(host.actor.signal.remote(name, signum), timeout=_CALL_TIMEOUT))
        except Exception:  # noqa: BLE001 - the host is gone: so is the service
            return False

    def signal_nowait(self, site: str, name: str, signum: int) -> None:
        """Send ``signum`` to ``site``'s service ``name`` without waiting for the host (any thread)."""
        host = self._hosts.get(site)
        if host is None or host.gone or self._stopped:
            return
        try:
            host.actor.signal.remote(name, signum)
        except Exception:  # noqa: BLE001 - the host is gone (its poll says so), or Ray is going
            pass

    # -- stopping ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every site's services, wait for their last lines, end the hosts; idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        hosts = list(self._hosts.values())
        try:
            if hosts:
                self._stop_hosts(hosts)
        finally:
            for host in hosts:
                try:
                    import_ray().kill(host.actor, no_restart=True)
                except Exception:  # noqa: BLE001 - already dead, or the cluster is going
                    pass
            if self._thread is not None:
                self._arrivals.put(None)
                self._thread.join(10.0)

    def _stop_hosts(self, hosts: list[_Host]) -> None:
        ray = import_ray()
        calls = []
        for host in hosts:
            if not host.gone:
                try:
                    calls.append(host.actor.stop.remote())
                except Exception:  # noqa: BLE001 - Ray is shutting down
                    pass
        if calls:
            # Each host stops its services one after another, last declared first.
            grace = max(sum(s.stop_grace + _STOP_MARGIN for s in host.config.services) for host in hosts)
            ray.wait(calls, num_returns=len(calls), timeout=grace)
        with self._cond:
            # Their last lines go to the logs before these close.
            self._cond.wait_for(lambda: all(h.ended or h.gone for h in hosts), _LAST_EVENTS)
