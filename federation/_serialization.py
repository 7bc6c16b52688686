"""The one place that pickles.

Data (inputs, tokens, results) is pickled with the standard pickler, protocol 5,
once, in the sender's thread, so an unpicklable value raises where it was made.
Only when that fails (a lambda inside a value, a class defined in ``__main__``)
do we fall back to cloudpickle. Functions and plans always go through
cloudpickle, once per plan, so steps defined in ``__main__``, lambdas and
closures work without the worker importing the user's script.

A function pickled by value keeps where it came from: its code objects travel
whole (``marshal``, as in a ``.pyc``), with their real file name and line
numbers, and with the source lines of that file, which the worker puts in its
``linecache``. So a remote traceback names the user's file, line and source
line, even where the file is not readable (another machine, a notebook cell),
and whatever cloudpickle does with code objects (3.1.3 renames every file to
``"<dynamic-code>"``).

Workers import this module at start, so cloudpickle is imported lazily: a worker
that never unpickles a function by value never pays for it.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import time
import traceback
import types
from collections.abc import Callable
from typing import Any

from ._exceptions import RemoteTraceback, ResourceExhaustedError, SerializationError, UnpicklableError

__all__ = [
    "OOB_THRESHOLD",
    "Payload",
    "SegmentPool",
    "SegmentViews",
    "dump_exception",
    "dumps",
    "dumps_function",
    "load_exception",
    "loads",
    "payload_size",
    "unlink_segment",
    "unlink_segments",
]

PROTOCOL = 5


def dumps(value: Any, *, what: str = "value", out_of_band: list[memoryview] | None = None) -> bytes:
    """Pickle a data value; raise :class:`SerializationError` naming ``what`` if it cannot be.

    With ``out_of_band``, contiguous buffers of at least :data:`OOB_THRESHOLD`
    bytes are not pickled but appended to it, for the caller to send apart.
    """
    callback = None
    if out_of_band is not None:

        def callback(buffer: pickle.PickleBuffer) -> bool:
            try:
                raw = buffer.raw()
            except BufferError:  # not contiguous: pickle it in band
                return True
            if raw.nbytes < OOB_THRESHOLD:
                return True
            out_of_band.append(raw)
            return False

    try:
        return pickle.dumps(value, protocol=PROTOCOL, buffer_callback=callback)
    except Exception as first:  # noqa: BLE001 - any pickling failure falls back to cloudpickle
        if out_of_band is not None:
            out_of_band.clear()  # what the failed attempt set apart
        try:
            # Per value, so no source lines: the file name and line numbers still travel.
            return _cloudpickle(value, sources=False, buffer_callback=callback)
        except Exception as exc:
            raise SerializationError(
                f"{what} cannot be pickled ({type(value).__name__}): {exc or first}"
            ) from exc


def loads(data: bytes | memoryview, *, what: str = "value") -> Any:
    """Unpickle what :func:`dumps` made."""
    try:
        return pickle.loads(data)
    except Exception as exc:
        raise SerializationError(f"{what} cannot be unpickled: {exc}") from exc


def dumps_function(obj: Any, *, what: str) -> bytes:
    """Pickle functions (or anything holding them) by value where needed, with cloudpickle.

    The code of every function pickled by value keeps its file name and line
    numbers, and carries its file's source lines (once per file per pickle).
    """
    try:
        return _cloudpickle(obj, sources=True)
    except Exception as exc:
        raise SerializationError(f"{what} cannot be pickled: {exc}") from exc


_pickler_class: Any = None  # made on first use: cloudpickle is imported only when needed
_SOURCE_LIMIT = 1 << 20  # characters of a file's source sent along with its functions, at most


def _cloudpickle(obj: Any, *, sources: bool, buffer_callback: Callable[..., Any] | None = None) -> bytes:
    global _pickler_class
    if _pickler_class is None:
        import cloudpickle

        class CodeKeepingPickler(cloudpickle.Pickler):  # type: ignore[misc]
            """cloudpickle, but code objects travel whole: see :func:`_reduce_code`."""

            def __init__(self, file: Any, sources: bool, **kwargs: Any) -> None:
                super().__init__(file, **kwargs)
                self.sources: dict[str, tuple[str, ...] | None] | None = {} if sources else None

            def reducer_override(self, obj: Any) -> Any:
                if type(obj) is types.CodeType:
                    return _reduce_code(obj, self.sources)
                return super().reducer_override(obj)

        _pickler_class = CodeKeepingPickler
    file = io.BytesIO()
    _pickler_class(file, sources, protocol=PROTOCOL, buffer_callback=buffer_callback).dump(obj)
    return file.getvalue()


def _reduce_code(code: types.CodeType, sources: dict[str, tuple[str, ...] | None] | None) -> Any:
    """Pickle a code object (and those nested in it) as ``marshal`` does for a ``.pyc``.

    ``marshal`` keeps every field, the file name included. Client and worker
    run the same interpreter (cloudpickle's own reducer is version-specific
    too). ``sources`` maps each file seen in this pickle to its lines: the same
    tuple for every code object of a file, so the pickle holds it once.
    """
    import marshal

    try:
        data = marshal.dumps(code)
    except ValueError:  # a constant marshal cannot write (a hand-made code object): cloudpickle's way
        return NotImplemented
    lines = None
    if sources is not None:
        filename = code.co_filename
        if filename not in sources:
            import linecache

            found = linecache.getlines(filename)
            sources[filename] = tuple(found) if 0 < sum(map(len, found)) <= _SOURCE_LIMIT else None
        lines = sources[filename]
    return (_load_code, (data, lines))


def _load_code(data: bytes, lines: tuple[str, ...] | None) -> types.CodeType:
    """Unpickle what :func:`_reduce_code` made; make its source lines the traceback's."""
    import marshal

    code: types.CodeType = marshal.loads(data)
    if lines:
        import linecache

        filename = code.co_filename
        entry = linecache.cache.get(filename)
        # A file this process read itself (a thread worker, in the client) keeps
        # its own entry; otherwise the client's lines, which no checkcache drops
        # (mtime None, as for a notebook cell).
        if entry is None or (len(entry) == 4 and entry[1] is None and entry[2] != list(lines)):
            linecache.cache[filename] = (sum(map(len, lines)), None, list(lines), filename)
    return code


def dump_exception(exc: BaseException) -> tuple[bytes, str]:
    """Pickle an exception raised in a worker, with its formatted traceback.

    The exception must survive a round trip, not just pickling: an exception
    whose ``__init__`` takes extra arguments pickles fine and then fails to
    unpickle at home. Anything that does not survive is replaced by an
    :class:`UnpicklableError` carrying its type name and message.
    """
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    cause, context = exc.__cause__, exc.__context__
    try:
        # Chained exceptions and tracebacks are not sent: the text carries them.
        exc.__cause__ = exc.__context__ = None
        data = pickle.dumps(exc, protocol=PROTOCOL)
        pickle.loads(data)
    except Exception:  # noqa: BLE001
        stand_in = UnpicklableError(f"{type(exc).__module__}.{type(exc).__qualname__}", str(exc))
        data = pickle.dumps(stand_in, protocol=PROTOCOL)
    finally:
        exc.__cause__, exc.__context__ = cause, context
    return data, tb


def load_exception(data: bytes, tb: str) -> BaseException:
    """Rebuild an exception from a worker, with its remote traceback as ``__cause__``."""
    exc: BaseException
    try:
        loaded = pickle.loads(data)
    except Exception as error:  # noqa: BLE001
        loaded = UnpicklableError("unknown", f"could not unpickle the exception: {error}")
    if isinstance(loaded, BaseException):
        exc = loaded
    else:
        exc = UnpicklableError(type(loaded).__name__, repr(loaded))
    exc.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
    return exc


# -- large buffers through shared memory -------------------------------------------------------
#
# A value holding large contiguous buffers (numpy arrays, bytes, bytearrays) is
# pickled with protocol 5, and each buffer of at least OOB_THRESHOLD bytes goes
# out of band: copied once into a shared-memory segment of the sending process's
# pool, while the pipe carries only the small pickle and the segment's name.
#
#   sender: SegmentPool.dumps ─ memcpy ─> segment (reused, pages already mapped)
#   receiver: SegmentViews.loads ─ zero-copy, read-only view over its cached mapping
#   receiver drops the value ─> finalizer queues RELEASE ─> sender reuses the segment
#
# Only the creator unlinks a segment (at exit, when its pool is over its bound,
# or after a second idle); if a worker dies, the client unlinks what that
# worker's prefix names. Received arrays are read-only views, as in Ray's
# object store: copy to modify.
#
# The rule that keeps references balanced (invariant 7), on every path:
#   a segment is stored busy with one reference per destination of its payload,
#   and each destination gives exactly one back, however the payload ends:
#   * unpickled: when the value is garbage (a finalizer), or at once if copied
#     (the client copies every result);
#   * never unpickled (its job ended, or was not the receiver's): discard();
#   * never sent (the sender's job was aborted with it still batched): the
#     sender releases it itself (Worker._end -> _release_own);
#   * the receiver died: its references die with it only when the sender dies
#     too; a slot is replaced whole, so the sender's pool goes with it.
# tests/test_failure_paths.py checks it after each crash case: once idle, a
# sender unlinks its free segments, so any segment left is one still busy.

OOB_THRESHOLD = 1 << 18
_SEGMENT_MIN = 1 << 20
_FREE_PER_SIZE = 2
_MAPPINGS = 32
_RELEASE_WAIT = 0.02  # seconds a sender waits for a segment to come back before making one

#: A pickled value: plain bytes, or the pickle and its out-of-band buffers' segments.
#: A value on its way: its pickle; its pickle and the shared-memory segments of its
#: large buffers; or (``Inline``) a small immutable value itself, pickled only with
#: the frame that carries it, since pickling it alone costs more than the value.
Payload = bytes | tuple[bytes, tuple[tuple[str, int], ...]] | tuple[Any]
_INLINE_SCALARS = frozenset({int, float, bool, complex, type(None)})
_INLINE_MAX = 256  # characters or bytes of a str or bytes sent inline


def inline(value: Any) -> tuple[Any] | None:
    """``(value,)`` when ``value`` is small and immutable enough to travel inside a frame."""
    kind = type(value)
    if kind in _INLINE_SCALARS or ((kind is str or kind is bytes) and len(value) <= _INLINE_MAX):
        return (value,)
    return None


def shared_segments(payload: Payload | None) -> tuple[tuple[str, int], ...]:
    """The shared-memory segments a payload holds (none for a pickle or an inline value)."""
    if type(payload) is tuple and len(payload) == 2:
        return payload[1]
    return ()


def payload_size(payload: Payload) -> int:
    """Bytes a payload carries, in the pipe and in shared memory."""
    if isinstance(payload, bytes):
        return len(payload)
    if len(payload) == 1:
        return 0  # counted with the frame that carries it
    return len(payload[0]) + sum(size for _, size in payload[1])


def _open_segment(name: str, size: int | None) -> tuple[Any, int]:
    import _posixshmem
    import mmap

    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if size is not None else 0)
    fd = _posixshmem.shm_open("/" + name, flags, 0o600)
    try:
        if size is not None:
            os.ftruncate(fd, size)
            try:
                # Reserve the pages now: a segment /dev/shm cannot back is an error
                # here, not a SIGBUS in whichever process first touches the page.
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.ENOMEM):
                    raise
                os.close(fd)
                fd = -1
                unlink_segment(name)
                raise ResourceExhaustedError(_shm_shortage(size)) from exc
        else:
            size = os.fstat(fd).st_size
        # MAP_POPULATE maps every page now, in one call, instead of one fault per page later.
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    finally:
        if fd >= 0:
            os.close(fd)
    return mapping, size


def _shm_shortage(size: int) -> str:
    try:
        stat = os.statvfs("/dev/shm")
        available, total = stat.f_bavail * stat.f_frsize / 2**20, stat.f_blocks * stat.f_frsize / 2**20
        free = f"{available:,.1f} MiB free of {total:,.0f} MiB"
    except OSError:  # pragma: no cover - no /dev/shm
        free = "its free space unknown"
    return (
        f"shared memory ran out: a large value needs a {size / 2**20:,.1f} MiB segment in /dev/shm, "
        f"which has {free}; send smaller values, free /dev/shm, or enlarge it (e.g. docker --shm-size)"
    )


def unlink_segment(name: str) -> None:
    """Remove a segment's name; memory is freed once the last mapping closes."""
    import _posixshmem

    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        pass


def unlink_segments(prefix: str) -> int:
    """Unlink every segment whose name starts with ``prefix`` (a dead process's leftovers)."""
    count = 0
    try:
        names = os.listdir("/dev/shm")
    except FileNotFoundError:  # pragma: no cover - no /dev/shm
        return 0
    for name in names:
        if name.startswith(prefix):
            unlink_segment(name)
            count += 1
    return count


class _LargeBytes:
    """Pickles a large ``bytes`` out of band: the pickler never offers plain bytes to a callback."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return (bytes, (pickle.PickleBuffer(self.data),))


def _has_large_bytes(value: Any, depth: int) -> bool:
    kind = type(value)
    if kind is bytes:
        return len(value) >= OOB_THRESHOLD
    if depth and (kind is tuple or kind is list):
        return any(_has_large_bytes(item, depth - 1) for item in value[:32])
    if depth and kind is dict:
        return any(_has_large_bytes(item, depth - 1) for item in list(value.values())[:32])
    return False


def _wrap_large_bytes(value: Any, depth: int) -> Any:
    """``value`` with its large bytes (at the top, or in lists, tuples and dicts) wrapped."""
    kind = type(value)
    if kind is bytes:
        return _LargeBytes(value) if len(value) >= OOB_THRESHOLD else value
    if depth and kind is tuple:
        return tuple(_wrap_large_bytes(item, depth - 1) for item in value)
    if depth and kind is list:
        return [_wrap_large_bytes(item, depth - 1) for item in value]
    if depth and kind is dict:
        return {key: _wrap_large_bytes(item, depth - 1) for key, item in value.items()}
    return value


class SegmentPool:
    """The shared-memory segments one process created to send large buffers."""

    def __init__(self, prefix: str, wait_for_release: Callable[[], None] | None = None) -> None:
        self.prefix = prefix
        self._wait_for_release = wait_for_release
        self._counter = 0
        self._free: dict[int, list[tuple[str, Any]]] = {}
        self._busy: dict[str, tuple[int, Any, int]] = {}  # name -> (refs, mapping, capacity)

    def dumps(self, value: Any, what: str, destinations: int) -> Payload:
        """Pickle ``value``; its large buffers go to segments, each to be released ``destinations`` times."""
        if destinations <= 0:  # nobody would release a segment: keep every buffer in band
            return dumps(value, what=what)
        if _has_large_bytes(value, 2):
            value = _wrap_large_bytes(value, 2)
        buffers: list[memoryview] = []
        data = dumps(value, what=what, out_of_band=buffers)
        if not buffers:
            return data
        refs = tuple((self._store(raw, destinations), raw.nbytes) for raw in buffers)
        return (data, refs)

    def _store(self, raw: memoryview, destinations: int) -> str:
        size = raw.nbytes
        capacity = max(_SEGMENT_MIN, 1 << (size - 1).bit_length())
        free = self._free.get(capacity)
        if not free and self._wait_for_release is not None and self._busy_of(capacity) >= _FREE_PER_SIZE:
            # A receiver is usually about to release one: a new segment costs a
            # page fault per page, reuse costs nothing. A receiver that keeps its
            # values (collecting a stream) never releases, so wait only briefly.
            deadline = time.monotonic() + _RELEASE_WAIT
            while not self._free.get(capacity) and time.monotonic() < deadline:
                self._wait_for_release()
            free = self._free.get(capacity)
        if free:
            name, mapping = free.pop()
        else:
            self._counter += 1
            name = f"{self.prefix}-{self._counter}"
            mapping, capacity = _open_segment(name, capacity)
        mapping[:size] = raw
        self._busy[name] = (destinations, mapping, capacity)
        return name

    def _busy_of(self, capacity: int) -> int:
        return sum(1 for _, _, cap in self._busy.values() if cap == capacity)

    def release(self, name: str) -> None:
        """A receiver is done with ``name``: reuse it once every receiver is."""
        entry = self._busy.get(name)
        if entry is None:
            return
        refs, mapping, capacity = entry
        if refs > 1:
            self._busy[name] = (refs - 1, mapping, capacity)
            return
        del self._busy[name]
        free = self._free.setdefault(capacity, [])
        if len(free) < _FREE_PER_SIZE:
            free.append((name, mapping))
        else:
            mapping.close()
            unlink_segment(name)

    def has_free(self) -> bool:
        """Whether segments wait here for reuse (memory an idle process could give back)."""
        return any(self._free.values())

    def trim(self) -> None:
        """Unlink the free segments: an idle process keeps no memory for its next large value."""
        for free in self._free.values():
            for name, mapping in free:
                _close_quietly(mapping)
                unlink_segment(name)
        self._free.clear()

    def close(self) -> None:
        """Unlink every segment this pool created."""
        for name, (_, mapping, _) in list(self._busy.items()):
            _close_quietly(mapping)
            unlink_segment(name)
        for free in self._free.values():
            for name, mapping in free:
                _close_quietly(mapping)
                unlink_segment(name)
        self._busy.clear()
        self._free.clear()


class SegmentViews:
    """A receiver's mappings of other processes' segments, and the values viewing them."""

    def __init__(self, on_release: Callable[[str, str], None]) -> None:
        self._on_release = on_release
        self._mappings: dict[str, Any] = {}

    def _mapping(self, name: str) -> Any:
        mapping = self._mappings.pop(name, None)
        if mapping is None:
            mapping, _ = _open_segment(name, None)
            while len(self._mappings) >= _MAPPINGS:
                oldest = next(iter(self._mappings))
                try:
                    self._mappings.pop(oldest).close()
                except BufferError:  # still viewed: keep it, it is closed at exit
                    break
        self._mappings[name] = mapping  # most recently used last
        return mapping

    def loads(self, payload: Payload, creator: str, *, copy: bool = False) -> Any:
        """Unpickle a payload from ``creator``.

        Zero-copy: out-of-band buffers become read-only views of the segments,
        released to the creator when the value is garbage. With ``copy=True``
        the buffers are copied and released at once.
        """
        if isinstance(payload, bytes):
            return pickle.loads(payload)
        if len(payload) == 1:
            return payload[0]
        data, refs = payload
        import ctypes
        import weakref

        views: list[Any] = []
        for name, size in refs:
            mapping = self._mapping(name)
            if copy:
                views.append(bytearray(mapping[:size]))
                self._on_release(creator, name)
                continue
            holder = (ctypes.c_char * size).from_buffer(mapping)
            weakref.finalize(holder, self._on_release, creator, name)
            views.append(memoryview(holder).cast("B").toreadonly())
        return pickle.loads(data, buffers=views)

    def discard(self, payload: Payload, creator: str) -> None:
        """Release a payload that will never be unpickled (its job ended)."""
        for name, _ in shared_segments(payload):
            self._on_release(creator, name)

    def has_cached(self) -> bool:
        """Whether mappings of other processes' segments are kept open here."""
        return bool(self._mappings)

    def trim(self) -> None:
        """Close cached mappings no value views: a segment its creator unlinked is then freed."""
        for name in list(self._mappings):
            try:
                self._mappings[name].close()
            except BufferError:  # a value still views it
                continue
            del self._mappings[name]

    def close(self) -> None:
        """Close every mapping (at exit)."""
        for mapping in self._mappings.values():
            _close_quietly(mapping)
        self._mappings.clear()


def _close_quietly(mapping: Any) -> None:
    try:
        mapping.close()
    except (BufferError, ValueError):
        pass
