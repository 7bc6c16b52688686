"""The one place that pickles.

Data (inputs, tokens, results) is pickled with the standard pickler, protocol 5,
once, in the sender's thread, so an unpicklable value raises where it was made.
Only when that fails (a lambda inside a value, a class defined in ``__main__``)
do we fall back to cloudpickle. Functions and plans always go through
cloudpickle, once per plan, so steps defined in ``__main__``, lambdas and
closures work without the worker importing the user's script.

Workers import this module at start, so cloudpickle is imported lazily: a worker
that never unpickles a function by value never pays for it.
"""

from __future__ import annotations

import pickle
import traceback
from typing import Any

from ._exceptions import RemoteTraceback, SerializationError, UnpicklableError

__all__ = [
    "dump_exception",
    "dumps",
    "dumps_function",
    "load_exception",
    "loads",
]

PROTOCOL = 5


def dumps(value: Any, *, what: str = "value") -> bytes:
    """Pickle a data value; raise :class:`SerializationError` naming ``what`` if it cannot be."""
    try:
        return pickle.dumps(value, protocol=PROTOCOL)
    except Exception as first:  # noqa: BLE001 - any pickling failure falls back to cloudpickle
        try:
            import cloudpickle

            return cloudpickle.dumps(value, protocol=PROTOCOL)  # type: ignore[no-any-return]
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
    """Pickle functions (or anything holding them) by value where needed, with cloudpickle."""
    import cloudpickle

    try:
        return cloudpickle.dumps(obj, protocol=PROTOCOL)  # type: ignore[no-any-return]
    except Exception as exc:
        raise SerializationError(f"{what} cannot be pickled: {exc}") from exc


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
