"""A small service for the services tests: ``python service_app.py MODE [ARG]``.

Modes:
    tcp PORT      accept connections on PORT; answer each with "$SERVICE_SITE\\n", close
    http PORT     answer GET / with "site=$SERVICE_SITE"
    line          print a few lines, then "ready to serve", then wait
    exit CODE     print "boom: about to exit", exit with CODE at once
    never         print "warming up" and wait, never ready
    stubborn      print "ready to serve" and the pid of a child it starts (same group);
                  on SIGTERM print "got SIGTERM, ignoring it" and go on

Every mode that waits, waits for a signal: none polls.
"""

from __future__ import annotations

import http.server
import os
import signal
import socketserver
import subprocess
import sys
import threading

SITE = os.environ.get("SERVICE_SITE", "?")


class _Answer(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(f"{SITE}\n".encode())


class _Http(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"site={SITE}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        print(f"request {self.path}", flush=True)


def _wait_forever() -> None:
    threading.Event().wait()


def main() -> None:
    mode = sys.argv[1]
    if mode == "tcp":
        socketserver.TCPServer.allow_reuse_address = True
        with socketserver.TCPServer(("127.0.0.1", int(sys.argv[2])), _Answer) as server:
            print(f"listening on {sys.argv[2]}", flush=True)
            server.serve_forever()
    elif mode == "http":
        with http.server.HTTPServer(("127.0.0.1", int(sys.argv[2])), _Http) as server:
            print(f"http on {sys.argv[2]}", flush=True)
            server.serve_forever()
    elif mode == "line":
        print("starting up", flush=True)
        print("still starting", flush=True)
        print("ready to serve", flush=True)
        _wait_forever()
    elif mode == "exit":
        print("boom: about to exit", flush=True)
        sys.exit(int(sys.argv[2]))
    elif mode == "never":
        print("warming up", flush=True)
        _wait_forever()
    elif mode == "stubborn":

        def ignore(signum: int, frame: object) -> None:
            print("got SIGTERM, ignoring it", flush=True)

        signal.signal(signal.SIGTERM, ignore)
        child = subprocess.Popen(  # ignores SIGTERM too: only the SIGKILL to the group ends it
            [
                sys.executable,
                "-c",
                "import signal, threading; signal.signal(15, signal.SIG_IGN); threading.Event().wait()",
            ]
        )
        print(f"child {child.pid}", flush=True)
        print("ready to serve", flush=True)
        _wait_forever()
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
