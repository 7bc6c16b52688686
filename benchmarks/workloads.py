"""The work every engine does: step functions, Ray's site actor, and the pipe processes.

Every function here is importable (``benchmarks.workloads``), so federation's
workers, ``ProcessPoolExecutor``'s workers, Ray's actors and the spawned pipe
processes all run the very same code, and cloudpickle ships them by reference.
Only the standard library is imported at the top: each of those processes
imports this module when it starts, and numpy is imported by the steps that
need it, inside them.

The large-payload steps time the hop themselves: the producer stamps
``time.monotonic()`` just before it returns the value, and the consumer reads the
clock on entry. ``CLOCK_MONOTONIC`` is one clock for every process of a Linux
machine, so the difference is pickling, moving and unpickling the value, and
excludes making it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

__all__ = [
    "SiteActor",
    "announce",
    "block",
    "count_items",
    "double",
    "gather",
    "generate",
    "generate_list",
    "idle_until_eof",
    "increment",
    "local_value",
    "make_payload",
    "pipe_echo",
    "pipe_gather",
    "pipe_payload_sink",
    "pipe_payload_source",
    "pipe_relay",
    "pipe_stream_sink",
    "pipe_stream_source",
    "receive_payload",
    "report_pid",
    "report_pid_then_block",
    "tally",
]

#: How long a "hung" step blocks; the benchmark kills its worker long before.
HANG_SECONDS = 120.0


# -- small jobs --------------------------------------------------------------------------------


def increment(x: int) -> int:
    """Site A of the 2-site pipeline: a tiny computation on the job's input."""
    return x + 1


def double(value: int) -> int:
    """Site B of the 2-site pipeline: a tiny computation on A's output."""
    return value * 2


def local_value(x: int) -> int:
    """The fanned-out step of the 3-site pipeline (runs at sites A and B)."""
    return x + 1


def gather(values: dict[str, int]) -> int:
    """The gathering step of the 3-site pipeline (site C): sums ``{site: value}``."""
    return sum(values.values())


# -- streams -----------------------------------------------------------------------------------


def generate(n: int) -> Iterator[int]:
    """Stream ``n`` small items, one token each."""
    yield from range(n)


def count_items(items: list[int]) -> int:
    """Consume a whole collected stream; return how many items arrived."""
    return len(items)


def tally(item: int) -> None:
    """Consume one stream item (run once per item)."""


def generate_list(n: int) -> list[int]:
    """The same items as :func:`generate`, as one list (for engines without streams)."""
    return list(range(n))


# -- large payloads ----------------------------------------------------------------------------


def make_payload(kind: str, size: int) -> tuple[float, Any]:
    """A fresh ``kind`` ("numpy" or "bytes") value of ``size`` bytes, stamped as it leaves."""
    if kind == "numpy":
        import numpy as np

        value: Any = np.ones(size, dtype=np.uint8)
    elif kind == "bytes":
        value = b"\x01" * size
    else:
        raise ValueError(f"unknown payload kind {kind!r}")
    return time.monotonic(), value


def receive_payload(stamped: tuple[float, Any]) -> tuple[float, int]:
    """Seconds since the producer stamped the value, and the value's size in bytes."""
    now = time.monotonic()
    sent, value = stamped
    size = value.nbytes if hasattr(value, "nbytes") else len(value)
    return now - sent, int(size)


# -- failures ----------------------------------------------------------------------------------


def report_pid() -> int:
    """This process's pid."""
    return os.getpid()


def announce(queue: Any) -> None:
    """A pool worker's initializer: put this process's pid on ``queue`` (it is up)."""
    queue.put(os.getpid())


def block(seconds: float = HANG_SECONDS) -> None:
    """Stand for a long-running step (the benchmark kills its process meanwhile)."""
    time.sleep(seconds)


def report_pid_then_block() -> Iterator[int]:
    """Stream this worker's pid to the client, then hang until the worker is killed."""
    yield os.getpid()
    block()


# -- Ray ---------------------------------------------------------------------------------------


class SiteActor:
    """One site as a Ray actor: the same steps as the federation pipelines, as methods."""

    def ping(self) -> int:
        """Answer at once with this actor's pid (it is up)."""
        return os.getpid()

    def increment(self, x: int) -> int:
        """See :func:`increment`."""
        return increment(x)

    def double(self, value: int) -> int:
        """See :func:`double`."""
        return double(value)

    def local_value(self, x: int) -> int:
        """See :func:`local_value`."""
        return local_value(x)

    def gather(self, a: int, b: int) -> int:
        """See :func:`gather` (the two fanned-out values as arguments)."""
        return gather({"a": a, "b": b})

    def generate_list(self, n: int) -> list[int]:
        """See :func:`generate_list`."""
        return generate_list(n)

    def count_items(self, items: list[int]) -> int:
        """See :func:`count_items`."""
        return count_items(items)

    def make_payload(self, kind: str, size: int) -> tuple[float, Any]:
        """See :func:`make_payload`."""
        return make_payload(kind, size)

    def receive_payload(self, stamped: tuple[float, Any]) -> tuple[float, int]:
        """See :func:`receive_payload`."""
        return receive_payload(stamped)

    def block(self, seconds: float = HANG_SECONDS) -> None:
        """See :func:`block`."""
        block(seconds)


# -- the pipe floor: bare processes on multiprocessing.Pipe ------------------------------------


def pipe_echo(conn: Connection) -> None:
    """Send back every message received until EOF or ``None``."""
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:
            return
        if data == b"":
            return
        conn.send_bytes(data)


def pipe_relay(inbound: Connection, outbound: Connection) -> None:
    """Forward every message from ``inbound`` to ``outbound`` until EOF or an empty message."""
    while True:
        try:
            data = inbound.recv_bytes()
        except EOFError:
            return
        outbound.send_bytes(data)
        if data == b"":
            return


def pipe_gather(first: Connection, second: Connection, outbound: Connection) -> None:
    """Wait for one message from each of two relays, then send one on; stop on an empty message."""
    while True:
        try:
            data = first.recv_bytes()
            second.recv_bytes()
        except EOFError:
            return
        outbound.send_bytes(data)
        if data == b"":
            return


def pipe_stream_source(control: Connection, outbound: Connection, batch: int) -> None:
    """On each request ``n``, send ``range(n)`` in pickled lists of ``batch``, then ``None``."""
    while True:
        try:
            n = control.recv()
        except EOFError:
            return
        if n is None:
            return
        for start in range(0, n, batch):
            outbound.send(list(range(start, min(start + batch, n))))
        outbound.send(None)


def pipe_stream_sink(inbound: Connection, report: Connection) -> None:
    """Count the items of each stream until its ``None``; report the count."""
    while True:
        items = 0
        while True:
            try:
                chunk = inbound.recv()
            except EOFError:
                return
            if chunk is None:
                break
            items += len(chunk)
        report.send(items)


def pipe_payload_source(control: Connection, outbound: Connection) -> None:
    """On each request ``(kind, size)``, send a fresh payload (stamped) through the pipe."""
    import pickle

    while True:
        try:
            request = control.recv()
        except EOFError:
            return
        if request is None:
            return
        stamped = make_payload(*request)
        outbound.send_bytes(pickle.dumps(stamped, protocol=5))


def pipe_payload_sink(inbound: Connection, report: Connection) -> None:
    """Receive each payload and report ``receive_payload`` of it."""
    import pickle

    while True:
        try:
            data = inbound.recv_bytes()
        except EOFError:
            return
        report.send(receive_payload(pickle.loads(data)))


def idle_until_eof(conn: Connection) -> None:
    """Say we are up, then idle until the other end closes (a bare worker, for the floor)."""
    conn.send_bytes(b"up")
    try:
        conn.recv_bytes()
    except EOFError:
        pass
