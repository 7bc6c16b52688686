"""The exception hierarchy of ``federation``.

Every error the library raises on purpose derives from :class:`FederationError`,
and says whose fault it is: the caller's (bad input), the user's code (a step
raised), or the machine's (a worker died)::

    FederationError
    ├── ConfigError (ValueError)            invalid config; every problem named, in one line
    ├── PipelineError (ValueError)          unknown site, cycle, unbound input, ...
    ├── SerializationError                  a function or payload that cannot be pickled
    ├── ResourceExhaustedError              a machine resource ran out (/dev/shm): needed, free
    ├── FederationClosedError (RuntimeError)
    ├── QueueFullError                      submit(block=False) on a full job queue
    ├── SiteStartError                      a worker or service could not start; its traceback or output
    ├── TokenRejectedError                  send_to_job to a job that is not running
    └── JobError                            has .job_id
        ├── StepFailedError                 .site, .step; cause: the original exception
        ├── JobCancelledError               .reason
        ├── WorkerDiedError                 .site, .pid or .node, .exitcode, .signal, .reason, .last_log
        └── QuorumError                     a tolerant fan-in got fewer sites than it needs: .missing

``result(timeout=...)`` that runs out raises the built-in :class:`TimeoutError`;
the job keeps running.

This module is imported by workers: it must stay free of heavy imports.
"""

from __future__ import annotations

import signal

__all__ = [
    "ConfigError",
    "FederationClosedError",
    "FederationError",
    "JobCancelledError",
    "JobError",
    "PipelineError",
    "QueueFullError",
    "QuorumError",
    "RemoteTraceback",
    "SerializationError",
    "SiteStartError",
    "StepFailedError",
    "TokenRejectedError",
    "UnpicklableError",
    "WorkerDiedError",
    "describe_exitcode",
]


class FederationError(Exception):
    """Base class of every error ``federation`` raises on purpose."""


class ConfigError(FederationError, ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""


class PipelineError(FederationError, ValueError):
    """A pipeline is malformed, or does not fit the federation or inputs it is submitted with."""


class SerializationError(FederationError):
    """A function, input or value cannot be pickled (or unpickled) to cross a process boundary."""


class ResourceExhaustedError(FederationError):
    """A machine resource ran out (shared memory in /dev/shm); the message names it,
    what was needed and what was free. The federation goes on serving other jobs."""


class FederationClosedError(FederationError, RuntimeError):
    """The federation is closed, or closing, and accepts no new jobs."""


class QueueFullError(FederationError):
    """``submit(block=False)`` found the job queue at its ``max_queued`` bound."""


class SiteStartError(FederationError):
    """A worker or a service of a site could not start: a setup raised, an import failed,
    a worker exited, or a service exited or was not ready in time.

    Attributes:
        site: the site whose worker or service failed.
        remote_traceback: the traceback text from the child, when it got that far.
        service: the service that failed, or ``None`` for a worker.
        last_output: the service's last lines of output.
    """

    def __init__(
        self,
        message: str,
        *,
        site: str,
        remote_traceback: str | None = None,
        service: str | None = None,
        last_output: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.site = site
        self.remote_traceback = remote_traceback
        self.service = service
        self.last_output = last_output

    def __str__(self) -> str:
        text = super().__str__()
        if self.service is not None:
            if self.last_output:
                text += f"\nlast lines from service {self.service!r}:\n" + _indent_block(
                    "\n".join(self.last_output)
                )
            else:
                text += f"\n(service {self.service!r} wrote nothing)"
        if self.remote_traceback:
            text += "\n\n" + _indent_block(self.remote_traceback)
        return text


class TokenRejectedError(FederationError):
    """A token addressed to another job was refused, and why.

    Attributes:
        job_id: the job the token was addressed to.
        reason: why it was refused (the job ended, never existed, has no such input).
    """

    def __init__(self, job_id: int, reason: str) -> None:
        super().__init__(f"token for job {job_id} rejected: {reason}")
        self.job_id = job_id
        self.reason = reason

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.job_id, self.reason))


class JobError(FederationError):
    """A job did not finish. ``job_id`` names it."""

    def __init__(self, message: str, *, job_id: int) -> None:
        super().__init__(message)
        self.job_id = job_id


class StepFailedError(JobError):
    """A step raised. The original exception is ``__cause__``, carrying the worker's traceback.

    Attributes:
        site: the site the step ran at.
        step: the step's name.
    """

    def __init__(self, message: str, *, job_id: int, site: str, step: str) -> None:
        super().__init__(message, job_id=job_id)
        self.site = site
        self.step = step


class JobCancelledError(JobError):
    """The job was cancelled, timed out, or the federation closed under it. ``reason`` says which."""

    def __init__(self, message: str, *, job_id: int, reason: str) -> None:
        super().__init__(message, job_id=job_id)
        self.reason = reason

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_cancelled, (str(self), self.job_id, self.reason))


def _rebuild_cancelled(message: str, job_id: int, reason: str) -> JobCancelledError:
    return JobCancelledError(message, job_id=job_id, reason=reason)


class QuorumError(JobError):
    """A tolerant fan-in got fewer sites than its minimum.

    Attributes:
        site: the site of the gathering step.
        step: the gathering step.
        needed: how many sites it needed.
        missing: ``{site: Missing}``, each missing site and why (raised, died, late).
    """

    def __init__(
        self,
        message: str,
        *,
        job_id: int,
        site: str,
        step: str,
        needed: int,
        missing: dict[str, object],
    ) -> None:
        super().__init__(message, job_id=job_id)
        self.site = site
        self.step = step
        self.needed = needed
        self.missing = missing

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_quorum,
            (str(self), self.job_id, self.site, self.step, self.needed, self.missing),
        )


def _rebuild_quorum(
    message: str, job_id: int, site: str, step: str, needed: int, missing: dict[str, object]
) -> QuorumError:
    return QuorumError(message, job_id=job_id, site=site, step=step, needed=needed, missing=missing)


class WorkerDiedError(JobError):
    """A worker process died under a job (segfault, ``os._exit``, a signal, a memory limit),
    or, on Ray, a site actor died or its node was lost.

    Attributes:
        site: the site of the worker.
        pid: its process id (on its node, on Ray).
        node: on Ray, the id of the node it ran on (``None`` elsewhere).
        address: on Ray, that node's address (``None`` elsewhere).
        exitcode: its exit code; negative for a signal, as in ``multiprocessing``.
        signal: the signal's name (``"SIGKILL"``), or ``None`` if it exited.
        reason: a short cause (``"exited"``, ``"killed by signal"``, ``"memory limit"``, ...).
        last_log: the last lines that worker logged or printed.
    """

    def __init__(
        self,
        message: str,
        *,
        job_id: int,
        site: str,
        pid: int | None,
        exitcode: int | None,
        reason: str,
        last_log: tuple[str, ...] = (),
        node: str | None = None,
        address: str | None = None,
    ) -> None:
        super().__init__(message, job_id=job_id)
        self.site = site
        self.pid = pid
        self.node = node
        self.address = address
        self.exitcode = exitcode
        self.signal = _signal_name(exitcode)
        self.reason = reason
        self.last_log = last_log

    def __str__(self) -> str:
        text = super().__str__()
        if self.last_log:
            text += "\nlast lines from the worker:\n" + "\n".join("    " + line for line in self.last_log)
        return text


class RemoteTraceback(Exception):  # noqa: N818 - named like CPython's _RemoteTraceback
    """The traceback of an exception raised in a worker, attached as the ``__cause__`` of it."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class UnpicklableError(Exception):
    """Stands in for an exception a step raised that could not be pickled home.

    Attributes:
        type_name: the qualified name of the original exception type.
    """

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message} (the original exception could not be pickled)")
        self.type_name = type_name

    def __reduce__(self) -> tuple[object, ...]:
        text = str(self)
        return (_rebuild_unpicklable, (self.type_name, text))


def _rebuild_unpicklable(type_name: str, text: str) -> UnpicklableError:
    error = UnpicklableError.__new__(UnpicklableError)
    Exception.__init__(error, text)
    error.type_name = type_name
    return error


def _signal_name(exitcode: int | None) -> str | None:
    if exitcode is None or exitcode >= 0:
        return None
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


def describe_exitcode(exitcode: int | None) -> str:
    """Name an exit code the way people read them: ``SIGKILL(-9)``, ``exit code 3``."""
    if exitcode is None:
        return "still running"
    name = _signal_name(exitcode)
    if name is not None:
        return f"{name}({exitcode})"
    return f"exit code {exitcode}"


def _indent_block(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines())
