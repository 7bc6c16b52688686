"""How a site actor moves values and output: the object store, and whole printed lines.

* :class:`RayValues` stands where a worker process has its shared-memory
  segments: a value's large buffers go to the node's object store once, their
  references travel, a reader on the same node gets a view of them.
* :func:`inline_buffers` fetches a result's buffers (locally) before it goes to
  the client, so the client never waits on a fetch.
* :class:`LineWriter` is a site actor's ``sys.stdout``/``sys.stderr``: whole
  lines go to the client, with the job and step that printed them.

Workers of a cluster import this module: the standard library, and Ray only as
a Ray worker already has it.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable
from typing import Any

from ._serialization import Payload, dumps

__all__ = [
    "CRASH",
    "EXITING",
    "LINK",
    "OUTPUT",
    "PEERS",
    "STOPPED",
    "LineWriter",
    "RayValues",
    "holds_refs",
    "inline_buffers",
    "pack",
    "ray_module",
    "unpack",
]

# Messages of the Ray transport beside those of _messages.
LINK = 100  # (LINK, {site: actor handle})                client -> actor, first of all
OUTPUT = 101  # (OUTPUT, stdout?, [line, ...], job, step)  actor -> client: what steps printed
STOPPED = 102  # (STOPPED,)                                 actor -> client: after STOP, all sent
EXITING = 103  # (EXITING, exit code)                       actor -> client: os._exit was called
CRASH = 104  # (CRASH, reason)                               actor -> client: a fault plan crashes me
PEERS = 105  # (PEERS, {site: (host, port)})               client -> actor: where siblings listen (_ray_links)


class RayValues:
    """Pickling of values on Ray: small ones inline, large buffers as object-store references.

    It stands where a worker process has its shared-memory segment pool and
    views (``StepRunner._pool`` and ``._views``): the same calls, with Ray's
    reference counting instead of explicit releases.
    """

    def dumps(self, value: Any, what: str, destinations: int) -> Payload:
        """Pickle ``value``; each buffer of at least ``OOB_THRESHOLD`` bytes goes to the object store."""
        buffers: list[memoryview] = []
        data = dumps(value, what=what, out_of_band=buffers)
        if not buffers:
            return data
        ray = ray_module()
        # A PickleBuffer is stored out of band by Ray too: one copy into the store,
        # and a reader on the same node gets a view of it.
        refs: Any = tuple((ray.put(pickle.PickleBuffer(raw)), raw.nbytes) for raw in buffers)
        return (data, refs)

    def release(self, name: Any) -> None:
        """Nothing to do: the object store frees a buffer when its last reference goes."""

    def loads(self, payload: Payload, creator: str, *, copy: bool = False) -> Any:
        """Unpickle a payload; its buffers are fetched from the object store (or carried inline)."""
        if isinstance(payload, bytes):
            return pickle.loads(payload)
        if len(payload) == 1:
            return payload[0]  # a small value, carried in the message itself
        data, refs = payload
        buffers: list[Any] = [ref for ref, _ in refs]
        if buffers and _is_ref(buffers[0]):
            buffers = ray_module().get(buffers)
        if copy:
            buffers = [bytearray(buffer) for buffer in buffers]
        return pickle.loads(data, buffers=buffers)

    def discard(self, payload: Payload, creator: str) -> None:
        """Nothing to do: dropping the references frees the buffers."""

    def has_free(self) -> bool:
        """No buffers are kept for reuse."""
        return False

    def has_cached(self) -> bool:
        """No mappings are kept."""
        return False

    def trim(self) -> None:
        """Nothing is kept to give back."""

    def close(self) -> None:
        """Nothing to close."""


def _is_ref(value: Any) -> bool:
    return type(value).__name__ == "ObjectRef"


def ray_module() -> Any:
    """Ray, typed loosely: its stubs differ between versions, and it is absent where mypy runs."""
    import importlib

    return importlib.import_module("ray")


def inline_buffers(payload: Payload) -> Payload:
    """``payload`` with its object-store buffers fetched (locally) and carried in it."""
    if isinstance(payload, bytes) or payload is None or len(payload) == 1:
        return payload
    data, refs = payload
    if not refs or not _is_ref(refs[0][0]):
        return payload
    buffers: list[Any] = ray_module().get([ref for ref, _ in refs])
    inline: Any = tuple(
        (pickle.PickleBuffer(buffer), size) for buffer, (_, size) in zip(buffers, refs, strict=True)
    )
    return (data, inline)


_PACK_MAX = 64 * 1024  # bytes: a larger message goes as it is (pickling it here would copy it once more)


def pack(value: Any) -> Any:
    """``value`` pickled to bytes when that is cheaper for Ray to send, else ``value`` itself.

    One ``bytes`` argument or return value costs Ray a fraction of a list of
    tuples (it sends bytes as they are, where it runs nested objects through
    its serializer), on both ends of every call. The caller keeps object
    references and actor handles out (the standard pickle would pin them for
    ever instead of registering the receiver as a borrower). A value pickle
    cannot handle, or a large one, goes as it is.
    """
    try:
        data = pickle.dumps(value, protocol=5)
    except Exception:  # noqa: BLE001 - e.g. a class pickle cannot find by name
        return value
    return data if len(data) <= _PACK_MAX else value


def unpack(value: Any) -> Any:
    """What :func:`pack` was given."""
    return pickle.loads(value) if type(value) is bytes else value


def holds_refs(payload: Any) -> bool:
    """Whether a payload carries object-store references (its large buffers, sent out of band)."""
    return type(payload) is tuple and len(payload) == 2 and bool(payload[1]) and _is_ref(payload[1][0][0])


class LineWriter:
    """``sys.stdout``/``sys.stderr`` of a site actor: whole lines go to the client as events,
    with the job and step that printed them."""

    def __init__(
        self, emit: Callable[[Any], None], stdout: bool, context: Callable[[], tuple[int | None, str | None]]
    ) -> None:
        self._emit = emit
        self._stdout = stdout
        self._context = context
        self._partial = ""
        self._lock = threading.Lock()
        self.encoding = "utf-8"
        self.errors = "replace"

    def write(self, text: str) -> int:
        with self._lock:
            data = self._partial + text
            *lines, self._partial = data.split("\n")
        if lines:
            self._emit((OUTPUT, self._stdout, lines, *self._context()))
        return len(text)

    def flush(self) -> None:
        with self._lock:
            rest, self._partial = self._partial, ""
        if rest:
            self._emit((OUTPUT, self._stdout, [rest], *self._context()))

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True
