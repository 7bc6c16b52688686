"""The forkserver process: imports once, then forks a worker per request.

Data flow::

    client (ForkServer) ──SEQPACKET socket──> zygote ──fork──> worker
      {"fork": args, "env": …} + the worker's pipe fds (SCM_RIGHTS)
    client <──────────── {"pid": pid} | {"error": text}
    client <──────────── {"exit": pid, "code": exit code}   (SIGCHLD -> waitpid)

The zygote is every forked worker's parent, so it is the one that can read
their exit status: it reaps each on SIGCHLD and reports the code, which keeps
``WorkerDiedError`` as precise as with spawned workers (``SIGKILL(-9)``,
``SIGSEGV``, ``exit code 3``). The socket is also the zygote's lifeline: when
the client is gone it reads EOF and exits; the workers have lifelines of their
own.

The zygote runs one thread, so a fork copies no lock held by another thread.
It imports :mod:`federation._worker` and the modules named in ``preload``
before serving, so a worker starts with them already in memory.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import socket
import sys
import traceback
from typing import Any

_MAX_FDS = 256
_MAX_MESSAGE = 1 << 20


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    try:
        sock.send(json.dumps(message).encode())
    except OSError:
        pass  # the client is gone: the next read says so


def _child(sock: socket.socket, wake: tuple[int, int], request: dict[str, Any], fds: list[int]) -> None:
    """In the forked worker: become a session of its own, wire up the fds, serve. Never returns."""
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sock.close()
        for fd in wake:
            os.close(fd)
        os.setsid()
        # stdout and stderr on pipes of their own, so each reaches the client's stream of that name.
        output = fds[request["output"]]
        stdout = fds[request.get("stdout", request["output"])]
        os.dup2(stdout, 1)
        os.dup2(output, 2)
        for fd in {stdout, output}:
            os.close(fd)
        os.environ.update(request["env"])
        args = request["args"]
        args = {
            "control": fds[args["control"]],
            "events": fds[args["events"]],
            "lifeline": fds[args["lifeline"]],
            "inbox": fds[args["inbox"]],
            "siblings_out": {site: fds[i] for site, i in args["siblings_out"].items()},
        }
        sys.argv = ["-c", request["name"]]
        from federation._worker import serve_process

        serve_process(args)
    except BaseException:  # noqa: BLE001 - never return into the zygote's loop
        traceback.print_exc()
    os._exit(1)


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(sock, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def serve(sock: socket.socket, preload: list[str]) -> None:
    """Preload, report ready, then fork a worker for each request until the client is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the client's to handle
    try:
        import federation._worker  # noqa: F401 - the point: every worker starts with it

        for name in preload:
            importlib.import_module(name)
    except BaseException:  # noqa: BLE001 - reported to the client, whatever it was
        _send(sock, {"error": traceback.format_exc()})
        return
    wake = os.pipe()
    for fd in wake:
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(wake[1])
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the poll through the pipe
    _send(sock, {"ready": os.getpid()})
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    poller.register(wake[0], select.POLLIN)
    while True:
        try:
            events = poller.poll()
        except InterruptedError:
            continue
        for fd, _ in events:
            if fd == wake[0]:
                try:
                    while os.read(wake[0], 512):
                        pass
                except BlockingIOError:
                    pass
                _reap(sock)
                continue
            try:
                data, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, _MAX_FDS)
            except OSError:
                data, fds = b"", []
            if not data:
                return  # the client closed the socket, or died
            request = json.loads(data)
            try:
                pid = os.fork()
            except OSError as exc:
                _send(sock, {"error": f"fork failed: {exc}"})
                pid = -1
            if pid == 0:
                _child(sock, wake, request, fds)
            for received in fds:
                os.close(received)
            if pid > 0:
                _send(sock, {"pid": pid})
        _reap(sock)


def main() -> None:
    """Entry point: ``python -c 'from federation.backends._zygote import main; main()' FD PRELOAD``."""
    sock = socket.socket(fileno=int(sys.argv[1]))
    serve(sock, json.loads(sys.argv[2]))
    # Workers still running keep going: they end on their own lifelines.
    os._exit(0)
