"""Large buffers travel through shared memory: correct values, zero-copy views, nothing leaked."""

from __future__ import annotations

import os

import numpy as np
import pytest

import federation as fed

T = 60


def _segments() -> set[str]:
    # This process's federations only: /dev/shm is shared with any other test run on the machine.
    return {name for name in os.listdir("/dev/shm") if name.startswith(f"fed-{os.getpid()}-")}


def _pipeline() -> fed.Pipeline:
    pipeline = fed.Pipeline("arrays")

    @pipeline.step(site="a")
    def make(n, reps):
        import numpy as np

        for i in range(reps):
            yield np.full(n, i, dtype=np.int64), bytes([i % 256]) * n

    @pipeline.step(site="b")
    def check(make):
        array, blob = make
        assert not array.flags.writeable  # a zero-copy view of the sender's segment
        return int(array.sum()), len(blob), blob[:1]

    @pipeline.step(site="b", collect=["make"], name="kept")
    def kept(make):
        # Collecting keeps every value alive: the sender must not reuse their segments.
        return [int(array[0]) for array, _ in make]

    pipeline.output(check)
    pipeline.output(kept)
    return pipeline


def test_large_arrays_and_bytes_between_sites(make_federation) -> None:
    federation = make_federation(["a", "b"], pool_size=1)
    n = 1 << 19  # 4 MiB of int64, and 512 KiB of bytes: both out of band
    result = federation.submit(_pipeline(), n=n, reps=6).result(timeout=T)
    assert result["check"] == [(i * n, n, bytes([i])) for i in range(6)]
    assert result["kept"] == list(range(6))


def test_large_results_reach_the_client_as_copies(make_federation) -> None:
    federation = make_federation(["a", "b"], pool_size=1)
    pipeline = fed.Pipeline("big-result")
    pipeline.output(pipeline.step(site="a", name="arange")(lambda n: np.arange(n)))
    value = federation.submit(pipeline, n=1 << 20).result(timeout=T)
    assert value.flags.writeable and value[-1] == (1 << 20) - 1
    value[0] = 7  # the client's own copy


@pytest.mark.parametrize("backend", ["process"])
def test_a_dead_workers_segments_are_unlinked(make_federation) -> None:
    federation = make_federation(["a", "b"], pool_size=1)
    pipeline = fed.Pipeline("die-holding")

    @pipeline.step(site="a")
    def send(n):
        import numpy as np

        yield np.ones(n)

    @pipeline.step(site="b")
    def die(send):
        os._exit(1)

    pipeline.output(die)
    with pytest.raises(fed.WorkerDiedError):
        federation.submit(pipeline, n=1 << 20).result(timeout=T)
    federation.close()
    assert not _segments()


def test_inputs_larger_than_a_pipe_reach_the_worker(make_federation) -> None:
    # A 3 MiB input and 3 MiB stream values do not fit a control pipe (1 MiB): the
    # rest waits in the client and the router writes it as the worker reads.
    federation = make_federation(["a", "b"], pool_size=1)
    pipeline = fed.Pipeline("big-inputs")
    pipeline.input("chunks", stream=True)

    @pipeline.step(site="a", collect=["chunks"])
    def sizes(blob, chunks):
        return len(blob), [(len(c), c[:1]) for c in chunks]

    pipeline.output(sizes)
    size = 3 << 20
    job = federation.submit(pipeline, blob=b"x" * size)
    for i in range(4):
        job.send("chunks", bytes([i]) * size)
    job.close("chunks")
    assert job.result(timeout=T) == (size, [(size, bytes([i])) for i in range(4)])
