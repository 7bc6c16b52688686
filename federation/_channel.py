"""Framed messages over OS pipes, written without ever blocking the writer.

Two kinds of pipe, neither needing a cross-process lock (no semaphore):

* A **one-writer pipe** (client to worker, worker to client): :class:`Outbox`
  writes length-prefixed frames, :class:`FrameReader` reads them.
* A worker's **inbox** (every other worker of its slot to it): many writers, so
  a frame travels as packets of at most ``PIPE_BUF`` bytes, each written by one
  ``write`` call, which the kernel never interleaves with another writer's.
  A packet names its sender and says whether it ends a frame;
  :class:`InboxReader` joins each sender's packets back into frames. One inbox
  per worker keeps the fds of a slot linear in its sites, where a pipe per pair
  of sites grew with their square (100 sites: 9,900 pipes a slot).

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
import select
import struct
import threading
from collections import deque
from collections.abc import Callable

__all__ = ["ChannelClosedError", "FrameReader", "InboxReader", "LinkOutbox", "Outbox", "make_pipe"]

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
# An inbox packet: sender index, then payload length with _LAST set on a frame's last packet.
_PACKET = struct.Struct("!HH")
_ATOMIC = getattr(select, "PIPE_BUF", 4096)  # a write of at most this many bytes is never interleaved
_CHUNK = _ATOMIC - _PACKET.size
_LAST = 0x8000


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
        buffer = self._buffer
        if buffer:
            buffer += scratch[:got]
            del buffer[: self._parse(buffer, len(buffer), frames)]
        else:
            # The usual case: whole frames, parsed where they landed, not copied into the buffer first.
            pos = self._parse(scratch, got, frames)
            if pos < got:
                self._buffer = bytearray(scratch[pos:got])
        return frames

    def _parse(self, data: memoryview | bytearray, size: int, frames: list[bytes | bytearray]) -> int:
        """Append the complete frames in ``data[:size]``; how many bytes they took."""
        pos = 0
        while size - pos >= 8:
            (length,) = _HEADER.unpack_from(data, pos)
            start = pos + 8
            if size - start >= length:
                frames.append(bytes(data[start : start + length]))
                pos = start + length
                continue
            if length >= _DIRECT:
                big = bytearray(length)
                have = size - start
                big[:have] = data[start:size]
                self._big, self._big_filled = big, have
                pos = size
            break
        return pos

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


class LinkOutbox:
    """A writer of another worker's inbox, which other writers share: never blocks.

    A frame is cut into packets of at most ``PIPE_BUF`` bytes and each write
    carries whole packets only, at most ``PIPE_BUF`` bytes in all: on a pipe
    in non-blocking mode such a write goes in whole or not at all (EAGAIN),
    never interleaved with another writer's. Small frames share one write.
    """

    __slots__ = ("_fd", "_lock", "_pending", "_sender", "closed", "pending_bytes")

    def __init__(self, fd: int, sender: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._sender = sender
        self._lock = threading.Lock()
        self._pending: deque[bytes] = deque()  # whole packets, in order
        self.pending_bytes = 0
        self.closed = False

    def fileno(self) -> int:
        """The inbox's write file descriptor (this writer's copy)."""
        return self._fd

    def send(self, data: bytes) -> bool:
        """Queue one frame; write what the pipe takes now. True if nothing is left pending.

        Raises:
            ChannelClosedError: the reader is gone.
        """
        sender = self._sender
        with self._lock:
            if self.closed:
                raise ChannelClosedError("the pipe is closed")
            size = len(data)
            if size <= _CHUNK:
                packet = _PACKET.pack(sender, size | _LAST) + data
                self._pending.append(packet)
                self.pending_bytes += len(packet)
            else:
                view = memoryview(data)
                for start in range(0, size, _CHUNK):
                    chunk = view[start : start + _CHUNK]
                    flag = _LAST if start + _CHUNK >= size else 0
                    packet = _PACKET.pack(sender, len(chunk) | flag) + chunk
                    self._pending.append(packet)
                    self.pending_bytes += len(packet)
            return self._write()

    def flush(self) -> bool:
        """Write pending packets while the pipe takes them. True when nothing is left pending."""
        with self._lock:
            return self._write()

    def _write(self) -> bool:
        pending = self._pending
        while pending:
            if len(pending) == 1 or len(pending[0]) + len(pending[1]) > _ATOMIC:
                count, chunk = 1, pending[0]
            else:
                count, total = 0, 0
                for packet in pending:
                    if total + len(packet) > _ATOMIC:
                        break
                    total += len(packet)
                    count += 1
                chunk = b"".join(itertools.islice(pending, count))
            try:
                written = os.write(self._fd, chunk)
            except BlockingIOError:
                return False
            except OSError as exc:
                self.closed = True
                pending.clear()
                self.pending_bytes = 0
                raise ChannelClosedError(str(exc)) from exc
            if written != len(chunk):  # pragma: no cover - the kernel guarantees <= PIPE_BUF is whole
                self.closed = True
                raise ChannelClosedError(f"a {len(chunk)}-byte write to an inbox was cut at {written}")
            self.pending_bytes -= written
            for _ in range(count):
                pending.popleft()
        return True

    @property
    def has_pending(self) -> bool:
        """Whether packets are waiting for room in the inbox."""
        return bool(self._pending)

    def close(self) -> None:
        """Close this writer's copy of the inbox; pending packets are dropped."""
        with self._lock:
            self.closed = True
            self._pending.clear()
            self.pending_bytes = 0
            if self._fd >= 0:
                try:
                    os.close(self._fd)
                except OSError:
                    pass
                self._fd = -1


class InboxReader:
    """The reading end of a worker's inbox: joins each sender's packets into frames."""

    __slots__ = ("_buffer", "_fd", "_partial", "eof")

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._buffer = bytearray()
        self._partial: dict[int, bytearray] = {}  # sender -> the frame it is part-way through
        self.eof = False

    def fileno(self) -> int:
        """The inbox's read file descriptor."""
        return self._fd

    def read(self) -> list[bytes | bytearray]:
        """Read what is there without blocking; the frames it completed, in order.

        Sets ``eof`` once every writer has closed the inbox.
        """
        frames: list[bytes | bytearray] = []
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
        buffer = self._buffer
        if buffer:
            buffer += scratch[:got]
            data: memoryview | bytearray = buffer
            size = len(buffer)
        else:
            data, size = scratch, got
        pos = 0
        partial = self._partial
        while size - pos >= 4:
            sender, word = _PACKET.unpack_from(data, pos)
            length = word & ~_LAST
            start = pos + 4
            if size - start < length:
                break  # the rest of the packet is still in the pipe
            pos = start + length
            if word & _LAST:
                head = partial.pop(sender, None)
                if head is None:
                    frames.append(bytes(data[start:pos]))
                else:
                    head += data[start:pos]
                    frames.append(head)
            else:
                head = partial.get(sender)
                if head is None:
                    partial[sender] = bytearray(data[start:pos])
                else:
                    head += data[start:pos]
        if buffer:
            del buffer[:pos]
        elif pos < size:
            self._buffer = bytearray(data[pos:size])
        return frames

    def close(self) -> None:
        """Close the read end."""
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1
