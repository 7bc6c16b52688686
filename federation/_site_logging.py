"""A site runtime's logging: structlog and the standard ``logging`` module, forwarded to the client.

Steps log through ``ctx.log`` (structlog) or any standard ``logging`` logger
(their own, a library's). In a worker process or a site actor neither has a
handler of its own: every record becomes a LOG event, tagged with the site,
its process (and node, on Ray), the job and the step, and travels to the
client, where :mod:`._log` writes it through the client's logging.

Mixed into :class:`~federation._steps.StepRunner`; the runtime provides
:meth:`SiteLogging.log` (how a record is sent) and :meth:`SiteLogging._log_identity`.
Workers import this module: structlog and ``logging`` are imported on first use,
off the pool's start-up path.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import _messages as m
    from ._runs import JobRun

__all__ = ["SiteLogging"]


class SiteLogging:
    """Log records of a site's steps and libraries, sent to the client through :meth:`log`."""

    #: Loggers whose records stay where the host keeps them (Ray's own, on a site actor).
    private_loggers: tuple[str, ...] = ()

    _structlog: Any = None

    # provided by the runtime
    spec: m.WorkerSpec
    _run: JobRun | None
    _current_step: str | None

    def log(self, level: str, event: str, **fields: Any) -> None:
        """Send one log record to the client, tagged with this site."""
        raise NotImplementedError

    def _log_identity(self) -> dict[str, Any]:
        """The fields every record of this runtime carries (site, pid; node on Ray)."""
        raise NotImplementedError

    def structlog_logger(self) -> Any:
        """A structlog logger whose records travel to the client (structlog imported on first use)."""
        if self._structlog is None:
            import logging

            import structlog

            runtime = self

            def forward(_logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
                event = str(event_dict.pop("event", ""))
                event_dict.pop("level", None)
                fields = {
                    k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)
                    for k, v in event_dict.items()
                }
                runtime.log(method, event, **fields)
                raise structlog.DropEvent

            level = getattr(logging, self.spec.log_level.upper(), logging.INFO)
            self._structlog = structlog.wrap_logger(
                None,
                processors=[forward],
                wrapper_class=structlog.make_filtering_bound_logger(level),
                context_class=dict,
            ).bind(**self._log_identity())
        return self._structlog

    def forward_stdlib_logging(self) -> None:
        """Send records of the standard ``logging`` module (user code, libraries) to the client.

        Called once the runtime is ready, while it waits for its first job:
        importing ``logging`` is then off the pool's start-up path.
        """
        import logging

        runtime = self
        private = self.private_loggers

        class _Forward(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if private and record.name.startswith(private):
                    return
                try:
                    run = runtime._run
                    fields: dict[str, Any] = {"origin": record.name}  # "logger" is the client logger's
                    if run is not None:
                        fields["job_id"] = run.job_id
                    if runtime._current_step is not None:
                        fields["step"] = runtime._current_step
                    if record.exc_info:
                        fields["exception"] = self.format(record).split("\n", 1)[-1]
                    runtime.log(record.levelname.lower(), record.getMessage(), **fields)
                except Exception:  # noqa: BLE001 - logging must never break a step
                    self.handleError(record)

        level = getattr(logging, self.spec.log_level.upper(), logging.WARNING)
        root = logging.getLogger()
        root.addHandler(_Forward(level))
        if root.level > level or root.level == logging.NOTSET:
            root.setLevel(level)
