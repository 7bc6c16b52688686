"""Framed messages over OS pipes, written without ever blocking the writer.

Every pipe here has exactly one writing process and one reading process, so
frames never interleave and no cross-process lock (no semaphore) is needed.
Both ends are non-blocking:

* :class:`Outbox` writes what the pipe takes now and keeps the rest in memory.
  Its owner flushes the rest when the pipe is writable again. This is what makes
  the system deadlock-free: a process that waits for room in one pipe keeps
  reading all of its own pipes meanwhile (the worker's pump, the router's poll
  loop), so two processes can never each wait for the other to read.
* :class:`FrameReader` reads whatever has arrived and hands back the frames that
  are complete, so a reader is never stuck half-way through a slow writer's frame.

A frame is an 8-byte big-endian length followed by that many bytes. Reads are
buffered: one ``read`` syscall usually carries many small frames.

Workers import this module: it uses nothing beyond the standard library.
"""

from __future__ import annotations

import itertools
import os
import struct
import threading
from collections import deque
from collections.abc import Callable

__all__ = ["ChannelClosedError", "FrameReader", "Outbox", "make_pipe"]

_HEADER = struct.Struct("!Q")
# One read takes up to this much. It lands in a reusable buffer, one per thread
# (a reader is only ever read by one thread at a time): ``os.read`` of this size
# would allocate (mmap) and free a fresh 256 KiB object on every call, ~13 us
# against ~1 us, on every hop of every job.
_READ_SIZE = 1 << 18
_scratch = threading.local()
# Frames at least this large are read straight into their own buffer, not via the
# shared read buffer, so a 256 MiB payload is copied once, not re-concatenated.
_DIRECT = 1 << 20


class ChannelClosedError(OSError):
    """The other end of a pipe is gone."""


def make_pipe() -> tuple[int, int]:
    """A new pipe ``(read_fd, write_fd)``; both non-inheritable, the write end non-blocking."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    try:
        # A bigger pipe buffer means fewer wake-ups under load; best effort (Linux only).
        import fcntl

        fcntl.fcntl(write_fd, 1031, 1 << 20)  # F_SETPIPE_SZ
    except (ImportError, OSError):
        pass
    return read_fd, write_fd


class Outbox:
    """The writing end of a pipe: never blocks, keeps what the pipe cannot take yet.

    Thread-safe: the client writes to a worker's control pipe from the submitting
    thread, from ``job.send`` callers and from the router thread.
    """

    __slots__ = ("_fd", "_lock", "_pending", "closed", "on_pending", "pending_bytes")

    def __init__(self, fd: int, on_pending: Callable[[Outbox], None] | None = None) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._lock = threading.Lock()
        self._pending: deque[memoryview] = deque()
        self.pending_bytes = 0
        self.closed = False
        # Called (outside the lock) whenever a send leaves bytes waiting, so that
        # the owner's loop watches only the pipes that need it.
        self.on_pending = on_pending

    def fileno(self) -> int:
        """The pipe's write file descriptor."""
        return self._fd

    def send(self, data: bytes) -> bool:
        """Queue one frame; write as much as the pipe takes now. True if nothing is left pending.

        Raises:
            ChannelClosedError: the reader is gone (its process died or closed the pipe).
        """
        header = _HEADER.pack(len(data))
        with self._lock:
            if self.closed:
                raise ChannelClosedError("the pipe is closed")
            if self._pending:
                self._queue(memoryview(header))
                self._queue(memoryview(data))
            else:
                try:
                    written = os.writev(self._fd, (header, data))
                except BlockingIOError:
                    written = 0
                except (BrokenPipeError, OSError) as exc:
                    self.closed = True
                    raise ChannelClosedError(str(exc)) from exc
                if written == len(header) + len(data):
                    return True
                if written < len(header):
                    self._queue(memoryview(header)[written:])
                    self._queue(memoryview(data))
                else:
                    self._queue(memoryview(data)[written - len(header) :])
        if self.on_pending is not None:
            self.on_pending(self)
        return False

    def _queue(self, view: memoryview) -> None:
        if len(view):
            self._pending.append(view)
            self.pending_bytes += len(view)

    def flush(self) -> bool:
        """Write pending bytes while the pipe takes them. True when nothing is left pending."""
        with self._lock:
            pending = self._pending
            while pending:
                try:
                    # islice, not list(pending)[:64]: a long backlog must not be copied per write.
                    written = os.writev(self._fd, tuple(itertools.islice(pending, 64)))
                except BlockingIOError:
                    return False
                except OSError as exc:
                    self.closed = True
                    pending.clear()
                    self.pending_bytes = 0
                    raise ChannelClosedError(str(exc)) from exc
                self.pending_bytes -= written
                while written:
                    head = pending[0]
                    if written >= len(head):
                        written -= len(head)
                        pending.popleft()
                    else:
                        pending[0] = head[written:]
                        written = 0
            return True

    @property
    def has_pending(self) -> bool:
        """Whether bytes are waiting for room in the pipe."""
        return bool(self._pending)

    def close(self) -> None:
        """Close the write end; pending bytes are dropped."""
        with self._lock:
            if not self.closed:
                self.closed = True
                self._pending.clear()
                self.pending_bytes = 0
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1


class FrameReader:
    """The reading end of a pipe: returns the complete frames that have arrived."""

    __slots__ = ("_big", "_big_filled", "_buffer", "_fd", "eof")

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._buffer = bytearray()
        self._big: bytearray | None = None
        self._big_filled = 0
        self.eof = False

    def fileno(self) -> int:
        """The pipe's read file descriptor."""
        return self._fd

    def read(self) -> list[bytes | bytearray]:
        """Read what is there without blocking; the frames completed by it, in order.

        After the writer has gone and every frame was returned, sets ``eof`` and
        returns an empty list.
        """
        frames: list[bytes | bytearray] = []
        if self._big is not None and not self._fill_big(frames):
            return frames
        scratch: memoryview | None = getattr(_scratch, "view", None)
        if scratch is None:
            scratch = _scratch.view = memoryview(bytearray(_READ_SIZE))
        try:
            got = os.readv(self._fd, [scratch])
        except BlockingIOError:
            return frames
        except OSError:
            got = 0
        if not got:
            self.eof = True
            return frames
        self._buffer += scratch[:got]
        self._parse(frames)
        return frames

    def _parse(self, frames: list[bytes | bytearray]) -> None:
        buffer = self._buffer
        size = len(buffer)
        pos = 0
        while size - pos >= 8:
            (length,) = _HEADER.unpack_from(buffer, pos)
            start = pos + 8
            if size - start >= length:
                frames.append(bytes(buffer[start : start + length]))
                pos = start + length
                continue
            if length >= _DIRECT:
                big = bytearray(length)
                have = size - start
                big[:have] = buffer[start:size]
                self._big, self._big_filled = big, have
                pos = size
            break
        del buffer[:pos]

    def _fill_big(self, frames: list[bytes | bytearray]) -> bool:
        big = self._big
        assert big is not None
        view = memoryview(big)
        while self._big_filled < len(big):
            try:
                got = os.readv(self._fd, [view[self._big_filled :]])
            except BlockingIOError:
                return False
            if got == 0:
                self.eof = True
                return False
            self._big_filled += got
        frames.append(big)
        self._big = None
        self._big_filled = 0
        return True

    def close(self) -> None:
        """Close the read end."""
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1
