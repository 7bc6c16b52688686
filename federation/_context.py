"""What a step sees of where and how it runs: :class:`StepContext`, bound as ``ctx``.

A context talks to its site's runtime only through :class:`SiteRuntime`, the
part of :class:`~federation._steps.StepRunner` a step may reach (the abort
flag, logging, the site store, metrics, other jobs' inputs), so a step's view
is the same on every backend.

Workers import this module: standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from . import _messages as m
from ._exceptions import JobCancelledError
from ._store import SiteStore

__all__ = ["SiteRuntime", "StepContext"]


class SiteRuntime(Protocol):
    """What a :class:`StepContext` asks of the site runtime that made it."""

    site: str
    state: Any
    data_dir: str | None
    env: dict[str, str]
    services: Mapping[str, Any]

    def site_store(self) -> SiteStore:
        """This worker's handle on the site's store."""
        ...

    def record_metric(self, job_id: int, step: str, name: str, value: float) -> None:
        """Keep a metric a step recorded."""
        ...

    def structlog_logger(self) -> Any:
        """A structlog logger whose records travel to the client."""
        ...

    def abort_requested(self, job_id: int) -> str | None:
        """The abort reason for ``job_id`` if the client asked to abort it."""
        ...

    def send_to_job(self, from_job: int, to_job: int, name: str, value: Any, close: bool) -> None:
        """Feed another job's stream input through the client."""
        ...


class StepContext:
    """What a step sees of where and how it runs; bind it with a parameter named ``ctx``.

    Attributes:
        site: the site's name.
        job_id: the running job's id.
        step: the running step's name.
        state: the result of the site's ``setup`` in *this worker* (``None`` without one): a
            cache of what setup made. Each slot of the pool has its own worker per site, so
            with ``pool_size=N`` a site's jobs are spread over N workers and state written
            here is seen by about 1/N of them; keep state that must follow the site in
            :attr:`store`.
        data_dir: the site's data directory, or ``None``.
        env: the environment variables configured for this site.
        source_site: for a step run per stream item, the site the item came from.
        missing: for a step with a tolerant fan-in (``fed.quorum``), ``{site: Missing}``:
            the sites whose value it did not get, and why (raised, died, late).
    """

    __slots__ = (
        "_log",
        "_worker",
        "data_dir",
        "env",
        "job_id",
        "missing",
        "site",
        "source_site",
        "state",
        "step",
    )

    def __init__(self, worker: SiteRuntime, job_id: int, step: str, source_site: str | None) -> None:
        self._worker = worker
        self.site = worker.site
        self.job_id = job_id
        self.step = step
        self.state = worker.state
        self.data_dir = worker.data_dir
        self.env = worker.env
        self.source_site = source_site
        self.missing: dict[str, m.Missing] = {}
        self._log: Any = None

    @property
    def services(self) -> Mapping[str, Any]:
        """The site's services by name (:class:`~federation.ServiceAddress`): ``ctx.services["db"].port``."""
        return self._worker.services

    @property
    def store(self) -> SiteStore:
        """The site's store: shared by every worker of the site, kept in its data directory.

        Unlike :attr:`state` (this worker's own), it survives jobs, slots and worker
        deaths; see :class:`~federation.SiteStore`.
        """
        return self._worker.site_store()

    def metric(self, name: str, value: float) -> None:
        """Record a named metric of this step at this site (kept on the job and the federation)."""
        self._worker.record_metric(self.job_id, self.step, name, value)

    @property
    def log(self) -> Any:
        """A structlog logger bound to job, site, step and pid; records go to the client."""
        if self._log is None:
            self._log = self._worker.structlog_logger().bind(job_id=self.job_id, step=self.step)
        return self._log

    @property
    def cancelled(self) -> bool:
        """Whether the job was cancelled (or failed elsewhere); long steps should check it."""
        return self._worker.abort_requested(self.job_id) is not None

    def check_cancelled(self) -> None:
        """Raise :class:`~federation.JobCancelledError` if the job was cancelled."""
        reason = self._worker.abort_requested(self.job_id)
        if reason is not None:
            raise JobCancelledError(
                f"job {self.job_id} was cancelled: {reason}", job_id=self.job_id, reason=reason
            )

    def send_to_job(self, job_id: int, name: str, value: Any, *, close: bool = False) -> None:
        """Feed ``value`` to stream input ``name`` of another running job.

        Blocks until the client's router accepted it. With ``close=True`` the
        stream is closed after it (pass ``value=None`` to only close it).

        Raises:
            TokenRejectedError: the job has ended, never existed, or has no such stream input.
        """
        self._worker.send_to_job(self.job_id, job_id, name, value, close)
