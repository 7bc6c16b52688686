"""The services a federation's sites depend on: up before the workers, down after them.

One :class:`FederationServices` per federation; the pool makes it::

    Router.start ──> services.start() ──> slots start (workers get the addresses)
    close()      ──> workers stopped  ──> services.stop()

Each service runs under a small supervisor (see :mod:`federation._supervisor`)::

    client ──lifeline pipe──> supervisor (leads a session and process group)
                                └── the service (same group) ── what it starts

so that it dies with the client however the client dies, and one signal to the
group reaches everything it started.

Order: a site's services start in the order declared, each once the one before it
is ready; the n-th services of all sites start together. They stop in reverse.

Threads: :meth:`~FederationServices.start` and :meth:`~FederationServices.stop` run
in the caller's thread (the constructor's, the closer's). One watcher thread,
``federation-services``, reads every service's output (each line to the site's
logs, kept for errors, matched against ``ready_line``) and waits on their pidfds;
it is woken by a pipe, never by a timer. A port or a URL cannot be waited on, so
``start`` probes them, every 10 ms rising to 200 ms, between waits on a condition
the watcher notifies (a ready line, an exit).

A service that dies while the federation runs is logged at ERROR with its last
lines and is not restarted. Jobs are not failed for it: a step that uses it gets
its client library's error (connection refused), which fails that job as any
step error does; nothing in the federation waits on a service, so nothing hangs.

mirakuru starts each process (a new session, an environment marker its children
inherit), probes it (TCP connect; HTTP GET with a per-request timeout, from 3.0.4),
checks that nothing listens on its port before it starts, and does the final kill
(SIGKILL to the group, then to every process still carrying its marker: one that
left the group). Not used, and why: its wait loop (it sleeps between checks, and
treats an exit with code 0 as "not ready yet"); ``OutputExecutor`` (it consumes
the output, which must go to the logs); ``stop()`` (it waits with the *start*
timeout, polling). Its errors never leave this module.

What services do (a record, a line of output) is told to a :class:`ServiceReport`:
the client's logs and ``log_dir`` here. On Ray each site's services run under one
of these, inside a service host actor on the site's node
(:mod:`federation._ray_services`), whose report forwards to the client instead.
:meth:`FederationServices.signal` is the seam for faults.
"""

from __future__ import annotations

import atexit
import os
import re
import select
import shlex
import signal as signals
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._exceptions import SiteStartError, describe_exitcode
from ._log import SiteLogFiles, get_logger, log_worker_record
from ._service_address import ServiceAddress, ServiceMap
from ._service_checks import fill

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ._config import Service, SiteConfig

__all__ = ["FederationServices", "ServiceReport", "bind_setup"]

_SUPERVISOR = str(Path(__file__).with_name("_supervisor.py"))
_LAST_LINES = 20
_PROBE_FIRST, _PROBE_MAX = 0.01, 0.2  # seconds between readiness probes of a port or URL
_REQUEST_TIMEOUT = 1.0  # one HTTP readiness request; the next one follows
_KILLED_WAIT = 5.0  # seconds for SIGKILLed processes to be gone


def bind_setup(setup: Any, services: ServiceMap) -> Any:
    """``setup`` with ``services=`` bound when it declares a parameter of that name."""
    if setup is None:
        return None
    import functools
    import inspect

    try:
        parameters = inspect.signature(setup).parameters
    except (TypeError, ValueError):  # a builtin without a signature: called as it is
        return setup
    parameter = parameters.get("services")
    if parameter is None or parameter.kind in (parameter.POSITIONAL_ONLY, parameter.VAR_POSITIONAL):
        return setup
    return functools.partial(setup, services=services)


class ServiceReport:
    """Where services' records and output lines go: the client's logs, and ``log_dir``'s files."""

    def __init__(self, log_files: SiteLogFiles | None) -> None:
        self._log_files = log_files
        self._log = get_logger("services")

    def record(self, level: str, event: str, **fields: Any) -> None:
        """A record of the ``federation.services`` logger (``level``: info, warning, error)."""
        getattr(self._log, level)(event, **fields)

    def output(self, site: str, name: str, line: str) -> None:
        """A line service ``name`` of ``site`` wrote: the site's log file and logger, tagged."""
        if self._log_files is not None:
            self._log_files.output(site, f"{site}/{name}", line)
        log_worker_record(site, "info", "service output", {"service": name, "line": line})


def _readiness(service: Service) -> str:
    if service.ready_line is not None:
        return "line"
    return "url" if service.url is not None else "port"


class _Running:
    """One service of one site, from its start to its end (state under the owner's lock)."""

    def __init__(self, site: SiteConfig, service: Service, port: int | None) -> None:
        self.site = site.name
        self.name = service.name
        self.label = f"{site.name}/{service.name}"
        self.service = service
        values = {
            "port": "" if port is None else str(port),
            "host": service.host,
            "site": site.name,
            "data_dir": os.path.abspath(site.data_dir) if site.data_dir is not None else "",
        }
        url = fill(service.url, values) if service.url is not None else None
        self.address = ServiceAddress(site.name, service.name, service.host, port, url)
        self.argv = [fill(arg, values) for arg in service.command]
        self.env = {"PYTHONUNBUFFERED": "1", **{k: fill(v, values) for k, v in service.env.items()}}
        cwd = service.cwd if service.cwd is not None else site.data_dir
        self.cwd = fill(str(cwd), values) if cwd is not None else None
        self.readiness = _readiness(service)
        self.pattern = re.compile(service.ready_line) if service.ready_line is not None else None
        self.executor: Any = None  # a mirakuru executor, once started
        self.pid: int | None = None  # the supervisor's: the process group's id
        self.sentinel = -1  # its pidfd
        self.output = -1  # the read end of its stdout and stderr
        self.state = "new"  # -> starting -> running -> stopping -> gone
        self.line_seen = False
        self.exitcode: int | None = None
        self.last_lines: deque[str] = deque(maxlen=_LAST_LINES)
        self.partial = b""
        self.started_at = 0.0
        self.deadline = 0.0  # to be ready by


class FederationServices:
    """Every service of some sites (a federation's, or one site's on Ray): start, output, deaths, stop."""

    def __init__(self, sites: Iterable[SiteConfig], report: ServiceReport) -> None:
        sites = list(sites)
        self._sites = [site for site in sites if site.services]
        self._report = report
        self._cond = threading.Condition()
        self._changes = 0  # bumped (under _cond) whenever a line is seen or a service ends
        self._waves: list[list[_Running]] = []  # the n-th service of every site
        self._new: list[_Running] = []  # started, not yet watched
        self._quit = False
        self._stop_lock = threading.Lock()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = self._lifeline_r = self._lifeline_w = -1
        # Held from the check of _stopped to a process's state being "starting", and by stop()
        # setting _stopped: a start racing a stop (on Ray, a stop from another call) either
        # launches a process that stop() then stops, or launches none.
        self._launching = threading.Lock()
        self.addresses: dict[str, ServiceMap] = {site.name: ServiceMap(site.name, {}) for site in sites}

    # -- starting ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start every service, wave by wave, each until it is ready.

        Raises:
            SiteStartError: a service exited, was not ready in time, or could not be
                started; every service started is stopped again first.
        """
        if not self._sites:
            return
        try:
            self._plan()
            self._lifeline_r, self._lifeline_w = os.pipe()
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_w, False)
            self._thread = threading.Thread(target=self._watch, name="federation-services", daemon=True)
            self._thread.start()
            _live.add(self)
            for site in self._sites:
                if site.data_dir is not None:  # the services' cwd and {data_dir}: made before them
                    site.data_dir.mkdir(parents=True, exist_ok=True)
            for wave in self._waves:
                for running in wave:
                    self._launch(running)
                self._wait_ready(wave)
        except BaseException:
            self.stop()
            raise

    def _plan(self) -> None:
        """Pick the free ports, fill in the placeholders, fix the addresses."""
        wanted = [(site, service) for site in self._sites for service in site.services if service.port == 0]
        # By site and name: one Service object may be declared by several sites, a port each.
        keys = [(site.name, service.name) for site, service in wanted]
        ports = dict(zip(keys, _free_ports(wanted), strict=True))
        by_site: dict[str, list[_Running]] = {}
        for site in self._sites:
            for service in site.services:
                port = ports.get((site.name, service.name), service.port)
                by_site.setdefault(site.name, []).append(_Running(site, service, port))
        depth = max(len(services) for services in by_site.values())
        self._waves = [[s[index] for s in by_site.values() if index < len(s)] for index in range(depth)]
        for site_name, services in by_site.items():
            self.addresses[site_name] = ServiceMap(site_name, {r.name: r.address for r in services})

    def _launch(self, running: _Running) -> None:
        with self._launching:
            if self._stopped:
                raise self._error(running, "was not started: the services are being stopped")
            self._launch_process(running)

    def _launch_process(self, running: _Running) -> None:
        mirakuru = _mirakuru()
        service = running.service
        argv = [sys.executable, "-I", "-S", _SUPERVISOR, str(service.stop_grace), running.label, "--"]
        argv += running.argv
        out_r, out_w = os.pipe()
        options: dict[str, Any] = {
            "cwd": running.cwd,
            "envvars": running.env,
            "stdin": self._lifeline_r,  # see _supervisor: EOF there means the client is gone
            "stdout": out_w,
            "stderr": subprocess.STDOUT,
            "timeout": service.ready_timeout,
        }
        try:
            if running.readiness == "url":
                executor: Any = mirakuru.HTTPExecutor(
                    argv, str(running.address.url), method="GET", request_timeout=_REQUEST_TIMEOUT, **options
                )
            elif running.readiness == "port":
                executor = mirakuru.TCPExecutor(argv, service.host, int(running.address.port or 0), **options)
            else:
                executor = mirakuru.SimpleExecutor(argv, **options)
            if running.readiness != "line" and executor.pre_start_check():
                raise self._error(
                    running,
                    f"could not start: {executor.host}:{executor.port} already accepts connections before "
                    "it started (another process listens there: one left from an earlier run?)",
                )
            self._report.record(
                "info", "starting a service", site=running.site, service=running.name, command=running.argv
            )
            # The process only: waiting until it is ready is ours (see the module's docstring).
            mirakuru.SimpleExecutor.start(executor)
        except SiteStartError:
            os.close(out_r)
            raise
        except (OSError, ValueError) as exc:  # no such cwd, a URL mirakuru refuses, ...
            os.close(out_r)
            raise self._error(running, f"could not start: {exc}") from None
        finally:
            os.close(out_w)
        running.executor = executor
        running.pid = executor.process.pid
        running.output = out_r
        os.set_blocking(out_r, False)
        running.started_at = time.monotonic()
        running.deadline = running.started_at + service.ready_timeout
        with self._cond:
            running.state = "starting"  # from here on, stop() stops it
        running.sentinel = os.pidfd_open(running.pid)  # Linux >= 5.3, as the process backend
        with self._cond:
            self._new.append(running)
        self._wake()

    def _wait_ready(self, wave: list[_Running]) -> None:
        pending = list(wave)
        interval = _PROBE_FIRST
        while pending:
            with self._cond:
                seen = self._changes
            for running in self._started():
                if running.exitcode is not None:
                    raise self._error(running, f"exited during start: {describe_exitcode(running.exitcode)}")
            for running in list(pending):
                if self._is_ready(running):
                    pending.remove(running)
                    with self._cond:
                        running.state = "running"
                    self._report.record(
                        "info",
                        "service ready",
                        site=running.site,
                        service=running.name,
                        address=str(running.address),
                        seconds=round(time.monotonic() - running.started_at, 3),
                    )
                elif time.monotonic() >= running.deadline:
                    raise self._error(
                        running,
                        f"was not ready within ready_timeout={running.service.ready_timeout:g} s "
                        f"(waiting for {_waiting_for(running)})",
                    )
            if not pending:
                return
            timeout = min(r.deadline for r in pending) - time.monotonic()
            if any(r.readiness != "line" for r in pending):
                timeout = min(timeout, interval)
                interval = min(interval * 2, _PROBE_MAX)
            with self._cond:
                self._cond.wait_for(lambda: self._changes != seen, max(0.0, timeout))  # noqa: B023

    def _is_ready(self, running: _Running) -> bool:
        if running.readiness == "line":
            return running.line_seen
        return bool(running.executor.after_start_check())

    def _started(self) -> list[_Running]:
        return [running for wave in self._waves for running in wave if running.state != "new"]

    def _error(self, running: _Running, what: str) -> SiteStartError:
        with self._cond:
            lines = tuple(running.last_lines)
        return SiteStartError(
            f"service {running.name!r} of site {running.site!r} {what}; its command: "
            f"{shlex.join(running.argv)}",
            site=running.site,
            service=running.name,
            last_output=lines,
        )

    # -- watching --------------------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _watch(self) -> None:
        """The watcher thread: every service's output and end, until :meth:`stop` is done."""
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        fds: dict[int, tuple[bool, _Running]] = {}  # fd -> (is its output, service)
        while True:
            with self._cond:
                new, self._new = self._new, []
                if self._quit:
                    break
            for running in new:
                fds[running.output] = (True, running)
                fds[running.sentinel] = (False, running)
                poller.register(running.output, select.POLLIN)
                poller.register(running.sentinel, select.POLLIN)
            for fd, _ in poller.poll():
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except OSError:
                        pass
                    continue
                entry = fds.get(fd)
                if entry is None:
                    continue
                is_output, running = entry
                if is_output:
                    if not self._read(running, final=False):
                        poller.unregister(fd)
                        del fds[fd]
                else:
                    for gone in (running.output, running.sentinel):
                        if gone in fds:
                            poller.unregister(gone)
                            del fds[gone]
                    self._on_exit(running)

    def _read(self, running: _Running, final: bool) -> bool:
        """Read ``running``'s output (all there is, if ``final``); False at its end."""
        while True:
            try:
                chunk = os.read(running.output, 65536)
            except BlockingIOError:
                chunk = None
            except OSError:
                chunk = b""
            if chunk:
                *lines, running.partial = (running.partial + chunk).split(b"\n")
                for raw in lines:
                    self._line(running, raw)
                if final:
                    continue
                return True
            if running.partial and (final or chunk == b""):
                self._line(running, running.partial)
                running.partial = b""
            return chunk is None

    def _line(self, running: _Running, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        with self._cond:
            running.last_lines.append(line)
            if running.pattern is not None and not running.line_seen and running.pattern.search(line):
                running.line_seen = True
                self._changes += 1
                self._cond.notify_all()
        self._report.output(running.site, running.name, line)

    def _on_exit(self, running: _Running) -> None:
        """``running``'s supervisor has exited: its last output, what is left of its group, its code."""
        self._read(running, final=True)
        with self._cond:
            # The supervisor is not reaped yet, so its pid still names only this group.
            try:
                os.killpg(running.pid or 0, signals.SIGKILL)  # what the service left behind
            except OSError:
                pass
            code = running.executor.process.poll()
            if code is None:  # pragma: no cover - the pidfd said it exited
                code = running.executor.process.wait(_KILLED_WAIT)
            os.close(running.output)
            os.close(running.sentinel)
            running.output = running.sentinel = -1
            was, running.state, running.exitcode = running.state, "gone", code
            self._changes += 1
            self._cond.notify_all()
            lines = list(running.last_lines)
        if was == "running":
            self._report.record(
                "error",
                "a service died; it is not restarted, and steps that use it will fail",
                site=running.site,
                service=running.name,
                pid=running.pid,
                exitcode=describe_exitcode(code),
                last_output=lines,
            )
        elif was == "stopping":
            self._report.record(
                "info",
                "service stopped",
                site=running.site,
                service=running.name,
                exitcode=describe_exitcode(code),
            )

    # -- faults and stopping -----------------------------------------------------------------------

    def signal(self, site: str, name: str, signum: int) -> bool:
        """Send ``signum`` to the process group of ``site``'s service ``name``; whether it runs."""
        for running in self._started():
            if (running.site, running.name) == (site, name):
                with self._cond:  # not reaped meanwhile: see _on_exit
                    if running.exitcode is None and running.pid is not None:
                        os.killpg(running.pid, signum)
                        return True
        return False

    def stop(self) -> None:
        """Stop every service, last wave first: SIGTERM, ``stop_grace``, then SIGKILL; idempotent."""
        with self._stop_lock:
            if self._stopped:
                return
            with self._launching:
                self._stopped = True
            try:
                for wave in reversed(self._waves):
                    self._stop_wave(wave)
            finally:
                self._close()

    def _stop_wave(self, wave: list[_Running]) -> None:
        with self._cond:
            live = [r for r in wave if r.state in ("starting", "running")]
            for running in live:
                running.state = "stopping"
                self._send(running, signals.SIGTERM)
            deadlines = {r.label: time.monotonic() + r.service.stop_grace for r in live}
            killed: set[str] = set()
            while live:
                now = time.monotonic()
                for running in [r for r in live if deadlines[r.label] <= now]:
                    if running.label in killed:
                        self._report.record(
                            "error",
                            "a service survived SIGKILL (stuck in the kernel?)",
                            service=running.label,
                        )
                        live.remove(running)
                        continue
                    self._report.record(
                        "warning",
                        "a service did not stop within its stop_grace; killing it",
                        site=running.site,
                        service=running.name,
                        stop_grace=running.service.stop_grace,
                    )
                    self._send(running, signals.SIGKILL)
                    killed.add(running.label)
                    deadlines[running.label] = now + _KILLED_WAIT
                live = [r for r in live if r.exitcode is None]
                if live:
                    self._cond.wait(max(0.0, min(deadlines[r.label] for r in live) - time.monotonic()))
        for running in wave:
            if running.executor is not None and running.exitcode is not None:
                try:
                    # Now that its group is gone: whatever carries its environment marker
                    # but left the group (a daemon); then mirakuru lets go of the process.
                    running.executor.kill()
                except Exception as exc:  # noqa: BLE001 - mirakuru's errors stay here
                    self._report.record(
                        "warning",
                        "could not kill what a service left",
                        service=running.label,
                        error=repr(exc),
                    )

    def _send(self, running: _Running, signum: int) -> None:
        """Signal ``running``'s group; call with ``_cond`` held (not reaped meanwhile)."""
        if running.exitcode is None and running.pid is not None:
            try:
                os.killpg(running.pid, signum)
            except OSError:
                pass

    def _close(self) -> None:
        with self._cond:
            self._quit = True
        self._wake()
        if self._thread is not None:
            self._thread.join(10.0)
        for running in self._started():
            for fd in (running.output, running.sentinel):
                if fd >= 0:
                    os.close(fd)
            running.output = running.sentinel = -1
        for fd in (self._wake_r, self._wake_w, self._lifeline_r, self._lifeline_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = self._lifeline_r = self._lifeline_w = -1


_live: weakref.WeakSet[FederationServices] = weakref.WeakSet()
_hooked = False


def _mirakuru() -> Any:
    """mirakuru, imported on the first service (a federation without services never pays for it)."""
    global _hooked
    import mirakuru

    if not _hooked:
        _hooked = True
        # mirakuru's own atexit hook SIGKILLs whatever it started from this process.
        # Hooks run last-registered-first, so this one, registered after mirakuru's,
        # runs before it: a federation left open at exit stops its services gracefully
        # (SIGTERM, stop_grace) instead, and their ends are not reported as deaths.
        atexit.register(_stop_all_at_exit)
    return mirakuru


def _stop_all_at_exit() -> None:
    for services in list(_live):
        services.stop()


def _waiting_for(running: _Running) -> str:
    if running.readiness == "line":
        return f"a line matching {running.service.ready_line!r}"
    if running.readiness == "url":
        return f"{running.address.url} to answer 2xx"
    return f"{running.address.host}:{running.address.port} to accept a connection"


def _free_ports(wanted: list[tuple[SiteConfig, Service]]) -> list[int]:
    """A free TCP port on each service's host, all different: bound together, then let go."""
    sockets: list[socket.socket] = []
    try:
        for site, service in wanted:
            try:
                family, kind, proto, _, address = socket.getaddrinfo(
                    service.host, 0, type=socket.SOCK_STREAM
                )[0]
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.bind(address)
            except OSError as exc:
                raise SiteStartError(
                    f"service {service.name!r} of site {site.name!r}: "
                    f"no free port on {service.host!r}: {exc}",
                    site=site.name,
                    service=service.name,
                ) from None
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
