"""What site actors say, handled on the client: results, done, failures, logs, output.

:class:`RayEvents` turns the events a site actor sends (the long poll's answer,
or a START's) into the job side's moves, as the local router does for its
pipes' frames: results to the job handle, DONE to the slot (freed once every
site is done), a step's failure to the job's end (or to a tolerant fan-in going
on without the site), ``send_to_job`` to the other job, logs and printed lines
to the client's logging and streams, tagged with site, job, step and node.
:mod:`._ray_router` calls :meth:`RayEvents._on_event` in order, per actor.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from . import _messages as m
from ._exceptions import JobError, QuorumError, SerializationError, StepFailedError
from ._execution import SlotState
from ._handle import Job, JobStatus
from ._log import log_worker_record
from ._ray_pool import RayPool, RaySlot, RayWorker
from ._ray_values import EXITING, OUTPUT, STOPPED
from ._serialization import load_exception

__all__ = ["RayEvents"]


class RayEvents(RayPool):
    """The events of the slots' site actors, handled under the job side's lock."""

    # -- events ------------------------------------------------------------------------------

    def _on_event(self, slot: RaySlot, worker: RayWorker, message: tuple[Any, ...]) -> None:
        tag = message[0]
        site = worker.site
        if tag == m.RESULTS:
            self._on_results(slot, site, message[1], message[2])
        elif tag == m.DONE:
            self._on_done(slot, site, message[1], message[2], message[3])
        elif tag == m.FAILED:
            job = slot.job
            if job is None or job.id != message[1]:
                self.dropped += 1
                return
            _, job_id, step, data, tb = message
            cause = load_exception(data, tb)
            if isinstance(cause, QuorumError):
                quorum: JobError = QuorumError(
                    str(cause),
                    job_id=job_id,
                    site=cause.site,
                    step=cause.step,
                    needed=cause.needed,
                    missing=cause.missing,
                )
                self._end_job(job, JobStatus.FAILED, quorum)
                return
            detail = f"step {step!r} raised {type(cause).__name__}: {cause}"
            if self._site_lost(job, slot, site, m.RAISED, detail):
                return  # a tolerant fan-in goes on without it; DONE (not ok) follows
            error = StepFailedError(
                f"step {step!r} of job {job_id} ({job.pipeline!r}) failed at site {site!r}: "
                f"{type(cause).__name__}: {cause}",
                job_id=job_id,
                site=site,
                step=step,
            )
            error.__cause__ = cause
            self._end_job(job, JobStatus.FAILED, error)
        elif tag in (m.FAULT, m.WAITING):
            job = slot.job
            if tag == m.WAITING and job is not None and job.id == message[1]:
                if message[2] is None:
                    job._waiting.pop(site, None)
                else:
                    job._waiting[site] = message[2]  # named in the error if the job times out
        elif tag == m.CUT:
            job = slot.job
            if job is not None and job.id == message[1]:
                self._on_cut(job, slot, message[2])
        elif tag == m.SEND_TO_JOB:
            _, request, _from_job, to_job, name, payload, close = message
            target = self._find_job(to_job)
            reason: str | None
            if target is None:
                reason = f"job {to_job} has ended" if self.issued(to_job) else f"job {to_job} does not exist"
            else:
                reason = self.send_input(target, name, payload, close)
            slot.send(site, (m.REPLY, request, reason))
        elif tag == m.LOG:
            for level, event, fields in message[1]:
                fields.setdefault("worker", worker.name)
                if self.log_files is not None:
                    self.log_files.record(site, level, event, fields)
                slot.last_lines[site].append(
                    f"[{level}] {event} "
                    + " ".join(
                        f"{k}={v}" for k, v in fields.items() if k not in ("site", "pid", "worker", "node")
                    )
                )
                log_worker_record(site, level, event, fields)
        elif tag == OUTPUT:
            _, stdout, lines, job_id, step = message
            tag_text = worker.name
            if job_id is not None:
                tag_text += f" job={job_id}" + (f" step={step}" if step else "")
            if worker.node_id is not None:
                tag_text += f" node={worker.node_id[:12]}"
            for line in lines:
                self._output_line(slot, worker, line, stdout, tag_text)
        elif tag == m.READY:
            _, worker.pid, worker.node_id, worker.node_address = message
            slot.ready.add(site)
            if slot.ready == set(slot.sites) and slot.state is SlotState.STARTING:
                self._move(slot, SlotState.IDLE)
                self.restart_failures = 0
                self.start_deaths = 0
                self.log.debug(
                    "slot ready", slot=slot.index, seconds=round(time.monotonic() - slot.started_at, 3)
                )
                self._dispatch_queued()
        elif tag == m.START_FAILED:
            slot.start_failed = True
            self._on_start_failed(slot, site, f"a site actor of site {site!r} failed to start", message[1])
        elif tag == EXITING:
            worker.exitcode = message[1]
        elif tag == STOPPED:
            worker.kill()  # its runner has ended: all it said has arrived; the poll confirms the death

    def _output_line(self, slot: RaySlot, worker: RayWorker, line: str, stdout: bool, where: str) -> None:
        slot.last_lines[worker.site].append(line)
        if self.log_files is not None:
            self.log_files.output(worker.site, where, line)
        if self.config.echo_worker_output:
            # Tagged as a process worker's lines are, plus the job, step and node.
            stream = sys.stdout if stdout else sys.stderr
            try:
                stream.write(f"[{where}] {line}\n")
                if stdout:
                    stream.flush()
            except (OSError, ValueError):
                pass

    def _on_results(self, slot: RaySlot, site: str, job_id: int, batch: list[Any]) -> None:
        job = slot.job
        if job is None or job.id != job_id or job.done():
            self.dropped += len(batch)
            return
        try:
            records = [
                (output, seq, self._values.loads(payload, site, copy=True)) for output, seq, payload in batch
            ]
        except Exception as exc:  # noqa: BLE001 - e.g. a class the client cannot import
            error = SerializationError(
                f"a result of job {job.id} from site {site!r} cannot be unpickled here: {exc}"
            )
            self._end_job(job, JobStatus.FAILED, error)
            return
        job._add_results(site, records)

    def _on_done(self, slot: RaySlot, site: str, job_id: int, ok: bool, info: dict[str, Any]) -> None:
        results = info.pop("results", None)
        if results:
            self._on_results(slot, site, job_id, results)
        job = slot.job
        if job is None or job.id != job_id:
            self.dropped += 1
            return
        slot.pending_sites.discard(site)
        slot.site_kill.pop(site, None)
        metrics = info.pop("metrics", None)
        if metrics:
            self._add_metrics(job, site, metrics)
        job._record("site_done", site=site, ok=ok, **info)
        for target, (count, size) in info.get("links", {}).items():
            totals = self.links.setdefault((site, target), [0, 0])
            totals[0] += count
            totals[1] += size
        self._maybe_finish(slot, job)

    def _maybe_finish(self, slot: RaySlot, job: Job) -> None:
        """End ``job`` once every site that matters is done; free the slot once all are.

        Sites a tolerant fan-in gave up on (late) need not be done for the job to finish.
        """
        if slot.pending_sites - job._excused:
            return
        if not job.done():
            self._end_job(job, JobStatus.FINISHED, None)
        if not slot.pending_sites and self.running.get(job.id, (None, None))[1] is slot:
            self._release(slot)
