"""The direct links between a slot's site actors (``_ray_links``): real sockets, and on Ray.

A frame is a pickle, so a connection that does not open with the slot's secret
must be closed unread; frames that go direct and frames that go as Ray calls
(those holding object references) share one numbering, so the receiver sees
them in the order they were sent; a sibling that cannot be reached is reached
through Ray instead.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from typing import Any

import pytest

import federation as fed
from federation._ray_links import SECRET_BYTES, LinkListener, LinkSender

T = 30


class _Received:
    """What a listener delivered, and the warnings it gave."""

    def __init__(self) -> None:
        self.frames: queue.SimpleQueue[tuple[str, int, list[tuple[Any, ...]]]] = queue.SimpleQueue()
        self.warnings: list[str] = []

    def deliver(self, sender: str, seq: int, messages: list[tuple[Any, ...]]) -> None:
        self.frames.put((sender, seq, messages))

    def get(self) -> tuple[str, int, list[tuple[Any, ...]]]:
        return self.frames.get(timeout=T)


@pytest.fixture
def listener():
    received = _Received()
    secret = os.urandom(SECRET_BYTES)
    made = LinkListener("127.0.0.1", secret, received.deliver, received.warnings.append)
    yield made, secret, received
    made.close()


def test_frames_arrive_in_order_named_by_their_sender(listener) -> None:
    link, secret, received = listener
    sender = LinkSender("site-a", secret)
    sender.set_peers({"b": link.address})
    big = b"z" * (3 << 20)  # longer than one read: reassembled from many
    sent = [(7, 1, [("step", "param", "site-a", i, (i,), 1)]) for i in range(200)] + [(7, 2, big)]
    try:
        for seq, message in enumerate(sent):
            assert sender.send("b", seq, message)
        for seq, message in enumerate(sent):
            assert received.get() == ("site-a", seq, [message])
        assert received.frames.empty() and not received.warnings
    finally:
        sender.close()


def test_a_connection_without_the_secret_is_closed_unread(listener) -> None:
    link, secret, received = listener
    wrong = LinkSender("intruder", os.urandom(SECRET_BYTES))
    wrong.set_peers({"b": link.address})
    try:
        # The connection is made; its frame is never read.
        assert wrong.send("b", 0, (7, 1, "not for you"))
        raw = socket.create_connection(link.address, timeout=T)
        raw.settimeout(T)
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * 64)
        assert raw.recv(1) == b""  # closed by the listener, unanswered
        raw.close()
        # A sibling with the secret is still served.
        sibling = LinkSender("site-a", secret)
        sibling.set_peers({"b": link.address})
        assert sibling.send("b", 0, (7, 1, "for you"))
        assert received.get() == ("site-a", 0, [(7, 1, "for you")])
        assert received.frames.empty()
        sibling.close()
    finally:
        wrong.close()


def test_an_unreachable_sibling_is_left_to_ray(listener) -> None:
    link, secret, _ = listener
    with socket.socket() as probe:  # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()
    sender = LinkSender("site-a", secret)
    sender.set_peers({"b": link.address, "c": closed})
    try:
        assert not sender.send("c", 0, (7, 1, "x")), "nothing listens there: Ray must carry it"
        assert not sender.send("d", 0, (7, 1, "x")), "no address known: Ray must carry it"
        assert not sender.send("b", 0, (7, 1, lambda: None)), "pickle cannot: Ray's serializer must"
    finally:
        sender.close()


def test_a_frame_that_cannot_be_read_is_dropped_with_a_warning_and_the_link_goes_on(listener) -> None:
    link, secret, received = listener

    class OnlyHere:  # its pickle names a class the receiver resolves; this one will not unpickle
        def __reduce__(self):
            return (_refuse, ())

    sender = LinkSender("site-a", secret)
    sender.set_peers({"b": link.address})
    try:
        assert sender.send("b", 0, (7, 1, OnlyHere()))
        assert sender.send("b", 1, (7, 1, "next"))
        assert received.get() == ("site-a", 1, [(7, 1, "next")])
        assert len(received.warnings) == 1 and "site-a" in received.warnings[0]
    finally:
        sender.close()


def _refuse() -> None:
    raise RuntimeError("this value cannot be rebuilt here")


def test_a_closed_receiver_loses_the_frame_and_later_frames_go_through_ray() -> None:
    secret = os.urandom(SECRET_BYTES)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    sender = LinkSender("site-a", secret)
    sender.set_peers({"b": server.getsockname()})
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(server.accept()[0]))
    thread.start()
    try:
        assert sender.send("b", 0, (7, 1, "first"))
        thread.join(T)
        accepted[0].close()  # the receiving process is gone
        server.close()
        deadline = time.monotonic() + T
        # A send on a reset connection fails; from then on the sibling is Ray's to reach.
        while sender.send("b", 1, (7, 1, b"x" * 65536)) and time.monotonic() < deadline:
            pass
        assert not sender.send("b", 2, (7, 1, "later"))
    finally:
        sender.close()


# -- on Ray ----------------------------------------------------------------------------------------


def mixed_stream() -> fed.Pipeline:
    """a streams small items (direct links) and large ones (object-store references, Ray calls)
    to b, interleaved: b records the order they came in."""
    pipeline = fed.Pipeline("mixed-stream")

    @pipeline.step(site="a")
    def produce(n):
        for i in range(n):
            yield (i, bytes(300_000) if i % 3 == 0 else b"small")

    @pipeline.step(site="b", bind={"items": fed.collect(produce)})
    def order(items):
        return [(i, len(data)) for i, data in items]

    pipeline.output(order)
    return pipeline


@pytest.mark.parametrize("backend", ["ray"])
def test_direct_and_ray_frames_reach_a_site_in_the_order_sent(make_federation, ray_cluster) -> None:
    federation = make_federation(["a", "b"], pool_size=1)
    n = 60
    expected = [(i, 300_000 if i % 3 == 0 else 5) for i in range(n)]
    for _ in range(3):
        assert federation.submit(mixed_stream(), n=n).result(timeout=T) == expected
