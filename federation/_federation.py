"""The federation: the public face of a pool of job executions and its router."""

from __future__ import annotations

import atexit
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._callbacks import CallbackThread
from ._config import FederationConfig, SiteConfig, federation_config
from ._exceptions import ConfigError, FederationClosedError, PipelineError, SerializationError
from ._fault_plan import FaultPlan
from ._field_checks import check_count, check_seconds
from ._handle import Job
from ._log import get_logger
from ._metrics import Metrics
from ._pipeline import Compiled, Pipeline, per_site
from ._router import Router
from ._serialization import dumps

if TYPE_CHECKING:
    from ._ray_router import RayRouter
    from ._stats import FederationStats

__all__ = ["Federation"]

#: Keywords of ``Federation(...)`` that are not config fields, offered when an option is misspelt.
_OWN_KEYWORDS = ("wait_ready", "config", "faults")

_open: weakref.WeakSet[Federation] = weakref.WeakSet()
_open_lock = threading.Lock()


class Federation:
    """A running federation: its sites, a pool of ready job executions, and a router thread.

    Use it as a context manager::

        with fed.Federation(sites=["a", "b", "hub"], pool_size=4) as federation:
            job = federation.submit(pipeline, threshold=0.5)
            print(job.result(timeout=30))

    Args:
        sites: site names or :class:`~federation.Site` objects.
        backend: ``"process"`` (default), ``"thread"`` or ``"ray"`` (see ``ray_address``).
        pool_size: how many job executions to keep ready (default: from the CPU count).
        wait_ready: wait for every slot to be ready before returning (default). With
            ``False``, return once the first slot is ready; the rest start meanwhile.
        config: a whole :class:`~federation.FederationConfig` instead of keywords.
        **options: any other :class:`~federation.FederationConfig` field.

    Raises:
        ConfigError: an invalid option, naming it and what is allowed.
        SiteStartError: a worker could not start; nothing is left running.
    """

    def __init__(
        self,
        sites: Sequence[str | SiteConfig] | None = None,
        *,
        backend: str | None = None,
        pool_size: int | None = None,
        wait_ready: bool = True,
        config: FederationConfig | None = None,
        faults: FaultPlan | None = None,
        **options: Any,
    ) -> None:
        if config is None:
            values: dict[str, Any] = dict(options)
            values["sites"] = sites if sites is not None else []
            if backend is not None:
                values["backend"] = backend
            if pool_size is not None:
                values["pool_size"] = pool_size
            config = federation_config(values, also_accepted=_OWN_KEYWORDS)
        elif sites is not None or backend is not None or pool_size is not None or options:
            raise TypeError("pass either config= or sites/backend/pool_size/options, not both")
        self._config: FederationConfig = config
        self._log = get_logger("federation")
        self._egress = {site.name: site.egress for site in config.sites}
        self._site_names = tuple(site.name for site in config.sites)
        self._closed = False
        self._callbacks = CallbackThread()
        self._router: Router | RayRouter
        if config.backend == "ray":
            from ._ray_router import RayRouter

            self._router = RayRouter(config, self._callbacks)
        else:
            self._router = Router(config, self._callbacks)
        self._site_services = {
            site.name: [service.name for service in site.services] for site in config.sites
        }
        self._faults = _check_plan(faults, self._site_names, self._site_services, per_submit=False)
        self._router.fault_plan = self._faults
        self._submits = 0  # a fault plan's job numbers: the Nth submit is job N
        self._shutdown = _Shutdown(self._router, self._callbacks, config.shutdown_timeout)
        self._router.start(wait=wait_ready)
        # A federation dropped without close() is closed when collected (as
        # ProcessPoolExecutor does), and at interpreter exit at the latest. The
        # finalizer holds the router, never the federation, or it would never run.
        self._finalizer = weakref.finalize(self, self._shutdown.finalize)
        with _open_lock:
            _open.add(self)
        self._log.debug(
            "federation started",
            sites=list(self._site_names),
            pool_size=config.pool_size,
            backend=config.backend,
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Federation sites={list(self._site_names)} pool_size={self._config.pool_size} {state}>"

    @property
    def config(self) -> FederationConfig:
        """The federation's configuration."""
        return self._config

    @property
    def sites(self) -> tuple[str, ...]:
        """The names of the federation's sites."""
        return self._site_names

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has begun."""
        return self._closed

    def submit(
        self,
        pipeline: Pipeline,
        /,
        *,
        inputs: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        retries: int = 0,
        block: bool = True,
        queue_timeout: float | None = None,
        participants: Mapping[str, Sequence[str]] | None = None,
        faults: FaultPlan | None = None,
        **kwargs: Any,
    ) -> Job:
        """Submit a run of ``pipeline`` and return its :class:`~federation.Job` at once.

        Value inputs are given as keywords (or ``inputs=`` for names that clash
        with the options here). The job waits in a FIFO queue while every slot is busy.

        Args:
            timeout: cancel the job if it runs longer than this many seconds.
            retries: rerun the job on a fresh slot up to this many times when it
                failed for a reason outside the user's code (its worker died).
            block: when the queue is full, wait for room (default) or raise
                :class:`~federation.QueueFullError`.
            queue_timeout: the longest wait for room in the queue.
            participants: ``{fan-out step: [sites]}``: run these fan-out steps at
                only these of their declared sites in this job (client sampling).
                The plan is not rebuilt nor shipped again; a site left out of
                every step it runs sits the job out. Gathers of the step get
                ``{site: value}`` for the chosen sites, and a quorum's fraction
                counts the chosen sites.
            faults: a :class:`~federation.FaultPlan` for this job, instead of the
                federation's own (see "Testing a federation" in the docs).

        Raises:
            PipelineError: the pipeline does not fit this federation or these inputs.
            SerializationError: a step or an input cannot be pickled.
            FederationClosedError: the federation is closed.
        """
        if self._closed:
            raise FederationClosedError("the federation is closed and accepts no new jobs")
        if not isinstance(pipeline, Pipeline):
            raise PipelineError(f"submit() takes a fed.Pipeline, not {type(pipeline).__name__}")
        timeout = check_seconds("timeout", timeout, zero=False)
        queue_timeout = check_seconds("queue_timeout", queue_timeout)
        check_count("retries", retries)
        if not isinstance(block, bool):
            raise ConfigError(f"block must be True or False, not {block!r}")
        if inputs is not None and not isinstance(inputs, Mapping):
            raise PipelineError(
                f"inputs= must be a mapping of input name -> value, not {type(inputs).__name__}"
            )
        values = dict(inputs or {})
        overlap = set(values) & set(kwargs)
        if overlap:
            raise PipelineError(f"inputs {sorted(overlap)} are given twice (in inputs= and as keywords)")
        values.update(kwargs)
        compiled = pipeline.compile(self._site_names, self._egress)
        for name in values:
            if name in compiled.stream_inputs:
                raise PipelineError(
                    f"input {name!r} of pipeline {pipeline.name!r} is a stream; feed it with "
                    f"job.send({name!r}, value) and end it with job.close({name!r})"
                )
            if name not in compiled.value_inputs:
                raise PipelineError(
                    f"pipeline {pipeline.name!r} has no input {name!r}; its value inputs are "
                    f"{sorted(compiled.value_inputs)}"
                )
        missing = sorted(
            name for name, required in compiled.value_inputs.items() if required and name not in values
        )
        if missing:
            raise PipelineError(
                f"pipeline {pipeline.name!r} needs input(s) {missing}; pass them to submit(), "
                f"e.g. submit(pipeline, {missing[0]}=...)"
            )
        absent = _absent_sites(pipeline.name, compiled, participants)
        limit = self._config.max_token_bytes
        payloads: dict[str, Any] = {}
        for name, value in values.items():
            if isinstance(value, per_site):
                users = [
                    site
                    for site in compiled.participants
                    if site not in absent and name in compiled.site_inputs.get(site, ())
                ]
                lacking = [site for site in users if site not in value.values]
                if lacking:
                    raise PipelineError(
                        f"input {name!r} is given per site but has no value for site(s) {lacking}, "
                        f"which use it in this job"
                    )
                payloads[name] = {
                    site: _dump_input(f"input {name!r} for site {site!r}", value.values[site], limit)
                    for site in users
                }
            else:
                payloads[name] = _dump_input(f"input {name!r}", value, limit)
        job = Job(
            self._router.next_job_id(),
            compiled,
            self,
            retries=retries,
            timeout=timeout,
            callbacks=self._callbacks,
        )
        job._absent = absent
        plan = (
            _check_plan(faults, self._site_names, self._site_services, per_submit=True)
            if faults is not None
            else self._faults
        )
        with self._router.lock:
            self._submits += 1
            job._fault_number = self._submits
        job._faults = plan
        self._router.submit(job, payloads, block, queue_timeout)
        return job

    def metrics(self) -> Metrics:
        """Every metric the jobs of this federation recorded (``ctx.metric``), in arrival order."""
        with self._router.lock:
            return Metrics(self._router.metrics)

    # -- what a Job asks of its federation -------------------------------------------------

    def cancel_job(self, job: Job, reason: str) -> bool:
        return self._router.cancel_job(job, reason)

    def send_input(self, job: Job, name: str, value: Any, close: bool) -> None:
        if not isinstance(name, str):
            raise PipelineError(f"a stream input's name is a string, not {name!r}")
        payload = None
        if not close:
            payload = dumps(value, what=f"the value sent to input {name!r} of job {job.id}")
            limit = self._config.max_token_bytes
            if len(payload) > limit:
                raise SerializationError(
                    f"the value sent to input {name!r} of job {job.id} is {len(payload):,} bytes "
                    f"pickled, over max_token_bytes={limit:,}"
                )
        reason = self._router.send_input(job, name, payload, close)
        if reason is not None:
            from ._exceptions import TokenRejectedError

            if name not in job._compiled.stream_inputs:
                raise PipelineError(reason)
            raise TokenRejectedError(job.id, reason)

    def suspend_job(self, job: Job, suspend: bool) -> None:
        self._router.suspend_job(job, suspend)

    # -- closing ---------------------------------------------------------------------------

    def close(self, *, cancel_pending: bool = False, timeout: float | None = None) -> None:
        """Shut down; idempotent.

        Stops accepting jobs; lets running and queued jobs finish (up to
        ``timeout``, then cancels them), or cancels them at once with
        ``cancel_pending=True``; stops every worker, kills those that do not
        stop within ``shutdown_timeout`` (whole process trees); closes every pipe
        and joins the router and callback threads.

        Safe from any thread, a job's callback included. Every caller returns only
        once shutdown is complete; the one exception is a callback calling it while
        another thread is already closing, which returns at once (waiting there
        would wait on itself: the closer waits for the callback thread).
        """
        timeout = check_seconds("timeout", timeout)  # before anything closes: a typo loses nothing
        self._closed = True
        self._shutdown.run(cancel_pending=cancel_pending, timeout=timeout)
        self._finalizer.detach()
        with _open_lock:
            _open.discard(self)

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        # On an error (Ctrl+C included) in the with-block, do not wait for jobs.
        if isinstance(exc, KeyboardInterrupt):
            # Ctrl+C anywhere in the block, not only inside a wait on a job (the signal
            # may land between two statements): the user wants out, not a grace period.
            self._router.interrupt()
        self.close(cancel_pending=exc_type is not None)

    # -- observing and batches -------------------------------------------------------------

    def stats(self) -> FederationStats:
        """A typed snapshot of the federation: its slots, workers, queue, jobs and links.

        Slots by state; per worker its pid, memory, CPU and jobs run; the queue's depth;
        jobs by status; tokens and bytes per link (site → site); dropped messages.
        Cheap enough to call often: the router's lock is held only to copy its counters.
        """
        from ._stats import collect_stats

        return collect_stats(self._router, self._closed)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until every slot of the pool is up: after the start, or after slots were replaced.

        A slot whose worker died (a crash, a fault plan's ``Crash``, a late site
        stopped by a quorum) is replaced in the background while jobs run on the
        others. Starting workers takes CPU from the sites running beside them (on
        Ray, a new actor process per site): a round loop whose deadlines are
        tight waits for the pool to be whole before its next round. Slots busy
        with a job count as up. With ``Federation(wait_ready=False)``, this is
        the wait that was skipped.

        Args:
            timeout: seconds to wait at most; ``None`` waits until the pool is whole.

        Raises:
            TimeoutError: the pool was not whole in time; the message names the
                slots still starting, and the sites each waits for.
            FederationClosedError: the federation is closing or closed.
            FederationError: the federation gave up restarting workers.
        """
        self._router.wait_ready(check_seconds("timeout", timeout))

    def map(
        self,
        pipeline: Pipeline,
        inputs: Iterable[Mapping[str, Any]],
        /,
        *,
        ordered: bool = True,
        return_exceptions: bool = False,
        timeout: float | None = None,
        progress: bool | None = None,
        retries: int = 0,
        job_timeout: float | None = None,
    ) -> Iterator[Any]:
        """Run ``pipeline`` once per mapping of inputs; iterate over the results.

        Every job is submitted before this returns, so the whole pool works on the
        batch at once::

            for mean in federation.map(pipeline, [{"threshold": t} for t in (0.1, 0.5, 0.9)]):
                print(mean)

        Args:
            inputs: one mapping of input names to values per job.
            ordered: results in the order of ``inputs`` (default), or as jobs complete.
            return_exceptions: a failed job's error is returned in its place instead of
                raised; otherwise the first failure is raised at once and the jobs whose
                results were not returned yet are cancelled.
            timeout: seconds, from this call, for the whole batch; then :class:`TimeoutError`
                is raised and the unfinished jobs are cancelled.
            progress: show a progress bar on stderr (needs rich); ``None`` (default): only
                when stderr is an interactive terminal, never in a pipe or in CI.
            retries: as for :meth:`submit`, per job.
            job_timeout: cancel a job that runs longer than this (its error is a
                :class:`~federation.JobCancelledError`).

        Raises:
            PipelineError, SerializationError: as :meth:`submit`, for any input of the
                batch; jobs already submitted are cancelled.

        Stopping the iteration early (``break``, closing it) cancels the jobs whose
        results were not taken.
        """
        from ._batch import run_batch

        return run_batch(
            self,
            pipeline,
            inputs,
            ordered=ordered,
            return_exceptions=return_exceptions,
            timeout=timeout,
            progress=progress,
            retries=retries,
            job_timeout=job_timeout,
        )


class _Shutdown:
    """The one shutdown sequence of a federation: run once, awaited by every other caller."""

    def __init__(self, router: Router | RayRouter, callbacks: CallbackThread, timeout: float) -> None:
        self._router = router
        self._callbacks = callbacks
        self._timeout = timeout
        self._lock = threading.Lock()
        self._started = False
        self._done = threading.Event()

    def run(self, *, cancel_pending: bool, timeout: float | None) -> None:
        with self._lock:
            first, self._started = not self._started, True
        if not first:
            if not self._callbacks.in_callback_thread():
                self._done.wait()
            return
        try:
            self._router.shutdown(cancel_pending=cancel_pending, timeout=timeout)
        finally:
            try:
                # Callbacks already posted (jobs' ends among them) still run first.
                if not self._callbacks.stop(self._timeout + 5.0) and not self._callbacks.in_callback_thread():
                    get_logger("federation").warning(
                        "a job callback is still running after close(); its thread is left to end alone"
                    )
            finally:
                self._done.set()
        get_logger("federation").debug("federation closed")

    def finalize(self) -> None:
        """Close from a finalizer: never on the router or callback thread, which close waits for."""
        if threading.current_thread() is self._router.thread or self._callbacks.in_callback_thread():
            threading.Thread(
                target=self.run, kwargs={"cancel_pending": True, "timeout": None}, name="federation-closer"
            ).start()
        else:
            self.run(cancel_pending=True, timeout=None)


def _check_plan(
    plan: Any, sites: Sequence[str], services: dict[str, list[str]], *, per_submit: bool
) -> FaultPlan | None:
    if plan is None:
        return None
    if not isinstance(plan, FaultPlan):
        raise ConfigError(f"faults= takes a fed.FaultPlan, not {type(plan).__name__}")
    plan.check(sites, per_submit=per_submit, services=services)
    return plan


@atexit.register
def _close_all() -> None:
    with _open_lock:
        federations = list(_open)
    for federation in federations:
        federation.close(cancel_pending=True)


def _dump_input(what: str, value: Any, limit: int) -> bytes:
    data = dumps(value, what=what)
    if len(data) > limit:
        raise SerializationError(f"{what} is {len(data):,} bytes pickled, over max_token_bytes={limit:,}")
    return data


def _absent_sites(
    pipeline: str, compiled: Compiled, participants: Mapping[str, Sequence[str]] | None
) -> tuple[str, ...]:
    """The sites a job runs without, from ``participants={step: [sites]}``.

    Raises:
        PipelineError: a step that is not a fan-out, a site it was not declared at,
            or a site left out of one step that still runs another.
    """
    if not participants:
        return ()
    left_out: dict[str, set[str]] = {}
    for step, chosen in participants.items():
        declared = compiled.fanouts.get(step)
        if declared is None:
            raise PipelineError(
                f"participants: {step!r} is not a fan-out step of pipeline {pipeline!r}; "
                f"its fan-out steps are {sorted(compiled.fanouts)}"
            )
        if isinstance(chosen, str) or not chosen:
            raise PipelineError(f"participants[{step!r}] must be a non-empty list of sites, not {chosen!r}")
        unknown = sorted(set(chosen) - set(declared))
        if unknown:
            raise PipelineError(
                f"participants[{step!r}]: {unknown} are not among the sites it was declared at "
                f"{list(declared)}"
            )
        for site in declared:
            if site not in chosen:
                left_out.setdefault(site, set()).add(step)
    absent = []
    for site, steps in left_out.items():
        others = sorted(set(compiled.site_steps.get(site, ())) - steps)
        if others:
            raise PipelineError(
                f"participants: site {site!r} is left out of {sorted(steps)} but also runs {others}; "
                "leave it out of those too, or keep it in"
            )
        absent.append(site)
    return tuple(sorted(absent))
