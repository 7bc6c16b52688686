"""Direct links between the site actors of one slot: token frames site to site, beside Ray's calls.

::

    site A's runner ── frame ──> LinkSender ── one TCP connection per sibling, made on first use
                                              (opened with the slot's secret and A's name)
                                                      │
    site B's LinkListener thread: accepts, checks the secret, reads frames ──> B's inbox, in A's order

An actor call costs Ray about 0.35 ms of CPU at each end (a call from inside
an actor more); a frame on an open connection costs a few microseconds. A
job's tokens between two sites went through such a call each time, which made
a 2-site job on Ray twice the CPU of the same pipeline written as plain actor
calls. Control stays on Ray (each START is one call from the client, whose
answer carries the site's events), and so do values' large buffers (the object
store, node to node) and every frame that holds object references: Ray's
serializer must see those, to count the receiver as a borrower. Both kinds of
frame share the sender's numbering, so the inbox restores its order whichever
way each came.

A frame is a pickle, so a connection is read only once it has opened with the
slot's secret: every actor of a slot gets it from the client with its
constructor, through Ray, and nobody else has it. Where a sibling cannot be
reached directly (a firewall between nodes, a listener that could not open),
its frames go as Ray calls, as before.

Workers of a cluster import this module: the standard library only.
"""

from __future__ import annotations

import hmac
import pickle
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["SECRET_BYTES", "LinkListener", "LinkSender"]

SECRET_BYTES = 32
_MAGIC = b"FDL1"
_NAME = struct.Struct("!H")  # the sender's name's length, in its opening
_FRAME = struct.Struct("!Q")  # a frame's length
_OPENING = len(_MAGIC) + SECRET_BYTES + _NAME.size
_CONNECT_TIMEOUT = 2.0  # seconds: a sibling not reachable by then is reached through Ray
_READ_SIZE = 1 << 20

Deliver = Callable[[str, int, list[tuple[Any, ...]]], None]


class _Reader:
    """One incoming connection: its sender, once the opening was read, and its unread bytes."""

    __slots__ = ("buffer", "sender")

    def __init__(self) -> None:
        self.sender: str | None = None
        self.buffer = bytearray()


class LinkListener:
    """Accepts the siblings' connections and hands their frames to ``deliver`` (one thread).

    Args:
        host: the address of this node that siblings connect to.
        secret: the slot's secret; a connection that does not open with it is closed unread.
        deliver: called with ``(sender, seq, messages)`` for each frame, on this thread.
        warn: called with a line when a frame cannot be read (the frame is dropped).
    """

    def __init__(self, host: str, secret: bytes, deliver: Deliver, warn: Callable[[str], None]) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._server = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._server.bind((host, 0))
            self._server.listen(64)
            self._server.setblocking(False)
        except OSError:
            self._server.close()
            raise
        self.address: tuple[str, int] = (host, self._server.getsockname()[1])
        self._secret = secret
        self._deliver = deliver
        self._warn = warn
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._server, selectors.EVENT_READ, None)
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._selector.register(self._wake_reader, selectors.EVENT_READ, "close")
        self._thread = threading.Thread(target=self._serve, name="federation-links", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            while True:
                for key, _ in self._selector.select():
                    if key.data is None:
                        self._accept()
                    elif key.data == "close":
                        return
                    else:
                        self._read(key.fileobj, key.data)  # type: ignore[arg-type]
        finally:
            for key in list(self._selector.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]
            self._selector.close()
            self._wake_writer.close()

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving and close every connection; returns once the thread has ended."""
        try:
            self._wake_writer.send(b"x")
        except OSError:  # closed already
            return
        self._thread.join(timeout)

    def _accept(self) -> None:
        try:
            connection, _ = self._server.accept()
        except OSError:
            return
        connection.setblocking(False)
        self._selector.register(connection, selectors.EVENT_READ, _Reader())

    def _drop(self, connection: socket.socket) -> None:
        self._selector.unregister(connection)
        connection.close()

    def _read(self, connection: socket.socket, reader: _Reader) -> None:
        try:
            data = connection.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the sender closed it, or its process ended
            self._drop(connection)
            return
        buffer = reader.buffer
        buffer += data
        start = 0
        if reader.sender is None:
            if len(buffer) < _OPENING:
                return
            if buffer[: len(_MAGIC)] != _MAGIC or not hmac.compare_digest(
                bytes(buffer[len(_MAGIC) : len(_MAGIC) + SECRET_BYTES]), self._secret
            ):
                self._drop(connection)  # not a sibling of this slot: nothing of it is read
                return
            (length,) = _NAME.unpack_from(buffer, _OPENING - _NAME.size)
            if len(buffer) < _OPENING + length:
                return
            reader.sender = bytes(buffer[_OPENING : _OPENING + length]).decode()
            start = _OPENING + length
        sender = reader.sender
        end = len(buffer)
        while end - start >= _FRAME.size:
            (length,) = _FRAME.unpack_from(buffer, start)
            if end - start - _FRAME.size < length:
                break
            body = start + _FRAME.size
            try:
                seq, messages = pickle.loads(buffer[body : body + length])
            except Exception as exc:  # noqa: BLE001 - e.g. a class this node cannot import
                self._warn(f"a frame from site {sender!r} could not be read and was dropped: {exc!r}")
            else:
                self._deliver(sender, seq, messages)
            start = body + length
        if start:
            del buffer[:start]


class LinkSender:
    """This site's connections to its siblings, each made the first time a frame goes to it.

    Args:
        name: this site's name, which the receiver's inbox orders frames by.
        secret: the slot's secret, which opens each connection.
    """

    def __init__(self, name: str, secret: bytes) -> None:
        self._opening = _MAGIC + secret + _NAME.pack(len(name.encode())) + name.encode()
        self._peers: dict[str, tuple[str, int]] = {}
        self._connections: dict[str, socket.socket] = {}
        self._unreachable: set[str] = set()

    def set_peers(self, peers: dict[str, tuple[str, int]]) -> None:
        """Where each sibling listens (the client tells every actor once its slot is ready)."""
        self._peers = dict(peers)

    def send(self, site: str, seq: int, message: tuple[Any, ...]) -> bool:
        """Send frame ``seq`` to ``site``; False if it must go through Ray instead.

        A sibling that cannot be reached is reached through Ray from then on. A
        connection that breaks while sending means the sibling's process is
        gone: the frame is lost with it, and the client hears of the death.
        """
        connection = self._connections.get(site) or self._connect(site)
        if connection is None:
            return False
        try:
            data = pickle.dumps((seq, [message]), protocol=5)
        except Exception:  # noqa: BLE001 - Ray's serializer takes what pickle cannot
            return False
        try:
            if len(data) < 65536:
                connection.sendall(_FRAME.pack(len(data)) + data)
            else:  # not copied once more to join them
                connection.sendall(_FRAME.pack(len(data)))
                connection.sendall(data)
        except OSError:
            self._connections.pop(site, None)
            self._unreachable.add(site)
            connection.close()
        return True

    def _connect(self, site: str) -> socket.socket | None:
        address = self._peers.get(site)
        if address is None or site in self._unreachable:
            return None
        try:
            connection = socket.create_connection(address, timeout=_CONNECT_TIMEOUT)
            connection.settimeout(None)
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection.sendall(self._opening)
        except OSError:
            self._unreachable.add(site)
            return None
        self._connections[site] = connection
        return connection

    def close(self) -> None:
        """Close every connection (the siblings' listeners see their end)."""
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()
