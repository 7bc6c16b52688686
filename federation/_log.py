"""Logging in the client: structlog in front of the standard library's ``logging``.

The library never configures logging in the user's process unasked: records go
to the ``federation`` stdlib logger, so they follow the user's logging setup
(and Python's default of showing warnings and errors only). Setting
``FEDERATION_LOG_LEVEL`` (``debug``, ``info``, ...) or ``FEDERATION_LOG_FORMAT``
(``console`` or ``json``) is asking: then a handler is attached to the
``federation`` logger with that level and format.

Records from workers arrive as ``(level, event, fields)`` tuples, fields
carrying site, job, step and pid, and are logged through
``federation.site.<name>`` loggers.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

__all__ = ["configure_from_env", "get_logger", "log_worker_record", "worker_log_level"]

_configured = False
_LEVELS = {"critical", "error", "warning", "info", "debug"}


def _renderer() -> Any:
    if os.environ.get("FEDERATION_LOG_FORMAT", "console").lower() == "json":
        return structlog.processors.JSONRenderer(sort_keys=True)
    return structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0)


def configure_from_env() -> None:
    """Attach a handler to the ``federation`` logger if the environment asks for one."""
    global _configured
    if _configured:
        return
    _configured = True
    level = os.environ.get("FEDERATION_LOG_LEVEL")
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
    level = os.environ.get("FEDERATION_LOG_LEVEL", "").lower()
    if level in _LEVELS:
        return level
    effective = logging.getLogger("federation").getEffectiveLevel()
    return logging.getLevelName(effective).lower() if effective > 0 else "warning"


def get_logger(name: str) -> Any:
    """A structlog logger writing to the ``federation.<name>`` stdlib logger."""
    configure_from_env()
    return structlog.wrap_logger(
        logging.getLogger(f"federation.{name}"),
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


_site_loggers: dict[str, Any] = {}


def log_worker_record(site: str, level: str, event: str, fields: dict[str, Any]) -> None:
    """Log a record that came from a worker of ``site`` through ``federation.site.<site>``."""
    logger = _site_loggers.get(site)
    if logger is None:
        logger = _site_loggers[site] = get_logger(f"site.{site}")
    method = getattr(logger, level if level in _LEVELS else "info")
    method(event, **fields)
