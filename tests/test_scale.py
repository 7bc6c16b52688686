"""Many sites: a worker's inbox is shared by every other site, so fds grow linearly.

An inbox pipe has many writers; frames travel as packets of at most
``PIPE_BUF`` bytes, which the kernel never interleaves. These tests write
large and small frames from several real processes at once into one inbox and
check every frame arrives whole and in order per sender, then start a
federation of 100 sites (pool of 2) and run a fan-out over all of them.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import federation as fed
from federation._channel import InboxReader, make_pipe

T = 60
ROOT = str(Path(fed.__file__).resolve().parent.parent)

_WRITER = """
import os, select, sys
sys.path.insert(0, sys.argv[3])
from federation._channel import LinkOutbox
fd, sender = int(sys.argv[1]), int(sys.argv[2])
outbox = LinkOutbox(fd, sender)
poller = select.poll()
poller.register(fd, select.POLLOUT)
for seq in range(300):
    size = (seq * 7919) % 150_000 if seq % 3 else seq % 50  # small ones and large ones
    body = bytes([sender]) * size
    outbox.send(seq.to_bytes(4, "big") + body)
    while outbox.has_pending:
        poller.poll(1000)
        outbox.flush()
"""


def test_an_inbox_joins_whole_frames_from_many_writing_processes() -> None:
    read_fd, write_fd = make_pipe()
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(write_fd), str(sender), ROOT], pass_fds=[write_fd]
        )
        for sender in range(4)
    ]
    os.close(write_fd)
    reader = InboxReader(read_fd)
    poller = select.poll()
    poller.register(read_fd, select.POLLIN)
    seen: dict[int, list[int]] = {sender: [] for sender in range(4)}
    deadline = time.monotonic() + T
    try:
        while not reader.eof:
            assert time.monotonic() < deadline, {s: len(v) for s, v in seen.items()}
            poller.poll(1000)
            for frame in reader.read():
                seq = int.from_bytes(frame[:4], "big")
                body = bytes(frame[4:])
                sender = body[0] if body else None
                size = (seq * 7919) % 150_000 if seq % 3 else seq % 50
                assert len(body) == size
                if body:
                    assert body == bytes([body[0]]) * size  # never another writer's bytes inside
                    seen[body[0]].append(seq)
                else:
                    assert sender is None
    finally:
        for writer in writers:
            writer.wait(T)
        reader.close()
    assert all(writer.returncode == 0 for writer in writers)
    # Empty frames carry no sender mark; every other frame came, in its sender's order.
    for sequence in seen.values():
        expected = [seq for seq in range(300) if ((seq * 7919) % 150_000 if seq % 3 else seq % 50)]
        assert sequence == expected


@pytest.mark.parametrize("start_method", ["forkserver"])
def test_a_hundred_sites_start_and_run_with_fds_linear_in_the_sites(start_method: str) -> None:
    sites = [f"s{i}" for i in range(99)] + ["hub"]
    pipeline = fed.Pipeline("fan-100")

    @pipeline.step(sites=sites[:-1])
    def local(ctx):
        return int(ctx.site[1:])

    @pipeline.step(site="hub")
    def total(local):
        return sum(local.values())

    pipeline.output(total)
    before = len(os.listdir("/proc/self/fd"))
    with fed.Federation(sites, pool_size=2, start_method=start_method, shutdown_timeout=10) as federation:
        jobs = [federation.submit(pipeline) for _ in range(4)]
        assert [job.result(timeout=T) for job in jobs] == [sum(range(99))] * 4
        assert len(federation.stats().workers) == 200
        # Per running worker: its control and events pipes, stdout, stderr and pidfd.
        # A pipe per pair of sites would be 100 * 99 = 9,900 per slot.
        assert len(os.listdir("/proc/self/fd")) - before <= 5 * len(sites) * 2 + 20
        assert len(psutil.Process().children(recursive=True)) >= 200
