"""federation: a pooled, federated job executor.

Define multi-site pipelines in Python, submit them to a pool of ready job
executions (one worker process per site each), and get job handles that stream
results back::

    import federation as fed

    pipeline = fed.Pipeline("mean")

    @pipeline.step(sites=["clinic-a", "clinic-b"])
    def local_stats(ctx, threshold): ...

    @pipeline.step(site="hub")
    def mean(local_stats): ...

    pipeline.output(mean)

    with fed.Federation(sites=["clinic-a", "clinic-b", "hub"]) as federation:
        print(federation.submit(pipeline, threshold=0.5).result(timeout=30))

Names are imported on first use: a worker process imports this package before
its own module, and must not pay for pydantic and structlog at every start.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import faults
    from ._config import FederationConfig, Service, Site, SiteConfig
    from ._context import StepContext
    from ._exceptions import (
        ConfigError,
        FederationClosedError,
        FederationError,
        JobCancelledError,
        JobError,
        PipelineError,
        QueueFullError,
        QuorumError,
        RemoteTraceback,
        ResourceExhaustedError,
        SerializationError,
        SiteStartError,
        StepFailedError,
        TokenRejectedError,
        UnpicklableError,
        WorkerDiedError,
    )
    from ._fault_plan import FaultPlan
    from ._federation import Federation
    from ._handle import Attempt, Job, JobStatus, Result
    from ._messages import Missing
    from ._metrics import MetricRecord, Metrics
    from ._pipeline import Input, Pipeline, Step, collect, per_site, quorum
    from ._service_address import ServiceAddress
    from ._stats import FederationStats, LinkStats, SlotStats, WorkerStats
    from ._store import SiteStore
    from ._timeline import TimelineEvent, TimelineKind

__version__ = "0.1.0"

__all__ = [
    "Attempt",
    "ConfigError",
    "FaultPlan",
    "Federation",
    "FederationClosedError",
    "FederationConfig",
    "FederationError",
    "FederationStats",
    "Input",
    "Job",
    "JobCancelledError",
    "JobError",
    "JobStatus",
    "LinkStats",
    "MetricRecord",
    "Metrics",
    "Missing",
    "Pipeline",
    "PipelineError",
    "QueueFullError",
    "QuorumError",
    "RemoteTraceback",
    "ResourceExhaustedError",
    "Result",
    "SerializationError",
    "Service",
    "ServiceAddress",
    "Site",
    "SiteConfig",
    "SiteStartError",
    "SiteStore",
    "SlotStats",
    "Step",
    "StepContext",
    "StepFailedError",
    "TimelineEvent",
    "TimelineKind",
    "TokenRejectedError",
    "UnpicklableError",
    "WorkerDiedError",
    "WorkerStats",
    "__version__",
    "collect",
    "faults",
    "per_site",
    "quorum",
]

_LOCATIONS = {
    "Attempt": "_handle",
    "ConfigError": "_exceptions",
    "FaultPlan": "_fault_plan",
    "Federation": "_federation",
    "FederationClosedError": "_exceptions",
    "FederationConfig": "_config",
    "FederationError": "_exceptions",
    "FederationStats": "_stats",
    "Input": "_pipeline",
    "Job": "_handle",
    "JobCancelledError": "_exceptions",
    "JobError": "_exceptions",
    "JobStatus": "_handle",
    "LinkStats": "_stats",
    "MetricRecord": "_metrics",
    "Metrics": "_metrics",
    "Missing": "_messages",
    "Pipeline": "_pipeline",
    "PipelineError": "_exceptions",
    "QueueFullError": "_exceptions",
    "QuorumError": "_exceptions",
    "RemoteTraceback": "_exceptions",
    "ResourceExhaustedError": "_exceptions",
    "Result": "_handle",
    "SerializationError": "_exceptions",
    "Service": "_config",
    "ServiceAddress": "_service_address",
    "Site": "_config",
    "SiteConfig": "_config",
    "SiteStartError": "_exceptions",
    "SiteStore": "_store",
    "SlotStats": "_stats",
    "Step": "_pipeline",
    "StepContext": "_steps",
    "StepFailedError": "_exceptions",
    "TimelineEvent": "_timeline",
    "TimelineKind": "_timeline",
    "TokenRejectedError": "_exceptions",
    "UnpicklableError": "_exceptions",
    "WorkerDiedError": "_exceptions",
    "WorkerStats": "_stats",
    "collect": "_pipeline",
    "per_site": "_pipeline",
    "quorum": "_pipeline",
}


def __getattr__(name: str) -> Any:
    if name == "faults":  # the fault kinds' namespace: fed.faults.Crash, fed.faults.Delay, ...
        return importlib.import_module(f"{__name__}.faults")
    module = _LOCATIONS.get(name)
    if module is None:
        raise AttributeError(f"module 'federation' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
