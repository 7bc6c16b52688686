"""Logging in the client: structlog in front of the standard library's ``logging``.

The library never configures logging in the user's process unasked: records go
to the ``federation`` stdlib logger, so they follow the user's logging setup
(and Python's default of showing warnings and errors only). Setting
``FEDERATION_LOG_PRESET`` (``production``: warnings, JSON; ``development``:
info, console; ``debug``: debug, console), ``FEDERATION_LOG_LEVEL`` (``debug``,
``info``, ...) or ``FEDERATION_LOG_FORMAT`` (``console`` or ``json``) is asking:
then a handler is attached to the ``federation`` logger; the level and format
variables override the preset's.

With ``log_dir`` set, :class:`SiteLogFiles` also writes everything a site's
workers logged or printed to ``<log_dir>/<site>.log``.

Records from workers arrive as ``(level, event, fields)`` tuples, fields
carrying site, job, step and pid, and are logged through
``federation.site.<name>`` loggers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    import structlog

__all__ = [
    "SiteLogFiles",
    "configure_from_env",
    "get_logger",
    "log_format",
    "log_worker_record",
    "worker_log_level",
]

_configured = False
_LEVELS = {"critical", "error", "warning", "info", "debug"}
PRESETS = {
    "production": ("warning", "json"),
    "development": ("info", "console"),
    "debug": ("debug", "console"),
}


def _preset() -> tuple[str, str] | None:
    name = os.environ.get("FEDERATION_LOG_PRESET", "").lower()
    return PRESETS.get(name)


def log_format() -> str:
    """``json`` or ``console``: ``FEDERATION_LOG_FORMAT``, else the preset's, else console."""
    preset = _preset()
    fmt = os.environ.get("FEDERATION_LOG_FORMAT", preset[1] if preset else "console").lower()
    return "json" if fmt == "json" else "console"


def _renderer() -> Any:
    import structlog

    if log_format() == "json":
        return structlog.processors.JSONRenderer(sort_keys=True)
    return structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0)


def configure_from_env() -> None:
    """Attach a handler to the ``federation`` logger if the environment asks for one."""
    global _configured
    if _configured:
        return
    _configured = True
    preset = _preset()
    level = os.environ.get("FEDERATION_LOG_LEVEL") or (preset[0] if preset else None)
    fmt = os.environ.get("FEDERATION_LOG_FORMAT")
    if not level and not fmt:
        return
    root = logging.getLogger("federation")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, (level or "info").upper(), logging.INFO))
    root.propagate = False


def worker_log_level() -> str:
    """The level workers filter their own records at (they skip work for dropped records)."""
    preset = _preset()
    level = os.environ.get("FEDERATION_LOG_LEVEL", preset[0] if preset else "").lower()
    if level in _LEVELS:
        return level
    effective = logging.getLogger("federation").getEffectiveLevel()
    return logging.getLevelName(effective).lower() if effective > 0 else "warning"


def get_logger(name: str) -> Any:
    """A structlog logger writing to the ``federation.<name>`` stdlib logger.

    structlog is imported on the first record that the stdlib logger would
    keep: importing it costs a fresh client ~40 ms of CPU before its first
    worker starts, and with Python's default (warnings and up) a federation
    that runs well logs nothing.
    """
    configure_from_env()
    return _LazyLogger(logging.getLogger(f"federation.{name}"))


_METHOD_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}


def _drop(*args: Any, **kwargs: Any) -> None:
    """A record the stdlib logger would filter out anyway (structlog's ``filter_by_level``)."""


class _LazyLogger:
    """A structlog logger, built on the first record its stdlib logger is enabled for."""

    __slots__ = ("_logger", "_stdlib")

    def __init__(self, stdlib: logging.Logger) -> None:
        self._stdlib = stdlib
        self._logger: Any = None

    def __getattr__(self, name: str) -> Any:
        level = _METHOD_LEVELS.get(name)
        if level is not None and self._logger is None and not self._stdlib.isEnabledFor(level):
            return _drop
        if self._logger is None:
            self._logger = _structlog_logger(self._stdlib)
        return getattr(self._logger, name)


def _structlog_logger(stdlib: logging.Logger) -> structlog.stdlib.BoundLogger:
    import structlog

    logger: structlog.stdlib.BoundLogger = structlog.wrap_logger(
        stdlib,
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            _renderer(),
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
        context_class=dict,
        cache_logger_on_first_use=True,
    )
    return logger


_site_loggers: dict[str, Any] = {}


def log_worker_record(site: str, level: str, event: str, fields: dict[str, Any]) -> None:
    """Log a record that came from a worker of ``site`` through ``federation.site.<site>``."""
    logger = _site_loggers.get(site)
    if logger is None:
        logger = _site_loggers[site] = get_logger(f"site.{site}")
    method = getattr(logger, level if level in _LEVELS else "info")
    method(event, **fields)


class SiteLogFiles:
    """One append-only log file per site under a run directory: what its workers and
    services logged or wrote. Thread-safe: the router and the services' watcher both write."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, TextIO] = {}
        self._lock = threading.Lock()
        self._json = log_format() == "json"

    def path(self, site: str) -> Path:
        """The file of ``site``."""
        return self.directory / f"{site}.log"

    def record(self, site: str, level: str, event: str, fields: dict[str, Any]) -> None:
        """A structured record (structlog or stdlib ``logging``) from a worker of ``site``."""
        stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        if self._json:
            line = json.dumps({"timestamp": stamp, "level": level, "event": event, **fields}, default=repr)
        else:
            rest = " ".join(f"{key}={value}" for key, value in fields.items())
            line = f"{stamp} [{level:<8}] {event} {rest}".rstrip()
        self._write(site, line)

    def output(self, site: str, worker: str, line: str) -> None:
        """A line a worker of ``site`` wrote to its stdout or stderr (C extensions included)."""
        stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        if self._json:
            self._write(
                site, json.dumps({"timestamp": stamp, "level": "output", "worker": worker, "line": line})
            )
        else:
            self._write(site, f"{stamp} [output  ] {worker}: {line}")

    def _write(self, site: str, line: str) -> None:
        with self._lock:
            handle = self._files.get(site)
            if handle is None:
                handle = self._files[site] = self.path(site).open("a", encoding="utf-8", buffering=1)
            handle.write(line + "\n")

    def close(self) -> None:
        """Close every file."""
        with self._lock:
            for handle in self._files.values():
                handle.close()
            self._files.clear()
