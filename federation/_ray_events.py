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
from typing import Any

from . import _messages as m
from ._exceptions import SerializationError
from ._handle import JobStatus
from ._ray_pool import RayPool, RaySlot, RayWorker
from ._ray_values import CRASH, EXITING, OUTPUT, STOPPED

__all__ = ["RayEvents"]


class RayEvents(RayPool):
    """The events of the slots' site actors, handled under the job side's lock."""

    # -- events ------------------------------------------------------------------------------

    def _on_event(self, slot: RaySlot, worker: RayWorker, message: tuple[Any, ...]) -> None:
        site = worker.site
        if self._on_job_event(slot, site, message, worker.name):
            return
        tag = message[0]
        if tag == OUTPUT:
            _, stdout, lines, job_id, step = message
            tag_text = worker.name
            if job_id is not None:
                tag_text += f" job={job_id}" + (f" step={step}" if step else "")
            if worker.node_id is not None:
                tag_text += f" node={worker.node_id[:12]}"
            for line in lines:
                self._output_line(slot, worker, line, stdout, tag_text)
        elif tag == m.READY:
            _, worker.pid, worker.node_id, worker.node_address, worker.link = message
            self._site_ready(slot, site)
        elif tag == EXITING:
            worker.exitcode = message[1]
        elif tag == CRASH:
            self._crash_worker(worker, message[1])  # a fault plan's crash: the FAULT record came first
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
