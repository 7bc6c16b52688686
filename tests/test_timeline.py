"""The job timeline: typed records consistent with what the job did, and its three exporters.

Exporters are checked by the structure of what they write (Chrome trace JSON,
self-contained HTML) and the PNG by rendering it and looking at the pixels.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

import federation as fed
from federation._timeline import events_from_log, to_chrome_trace, to_html, to_png, to_text

cloudpickle.register_pickle_by_value(sys.modules[__name__])

K = fed.TimelineKind


def _load_a() -> dict[str, Any]:
    return {"values": [0.2, 0.6, 0.9]}


def _load_b() -> dict[str, Any]:
    return {"values": [0.7, 0.1, 0.8, 0.95]}


def _sites() -> list[Any]:
    return [fed.Site("a", setup=_load_a), fed.Site("b", setup=_load_b), "hub"]


def mean_pipeline() -> fed.Pipeline:
    pipeline = fed.Pipeline("mean")

    @pipeline.step(sites=["a", "b"])
    def local_stats(ctx: Any, threshold: float) -> dict[str, float]:
        kept = [v for v in ctx.state["values"] if v > threshold]
        return {"n": len(kept), "sum": sum(kept)}

    @pipeline.step(site="hub")
    def mean(local_stats: dict[str, dict[str, float]]) -> float:
        return sum(s["sum"] for s in local_stats.values()) / sum(s["n"] for s in local_stats.values())

    pipeline.output(mean)
    return pipeline


def stream_pipeline() -> fed.Pipeline:
    """Site a streams n numbers to the hub, which squares each as it arrives."""
    pipeline = fed.Pipeline("squares")

    @pipeline.step(site="a")
    def numbers(n: int) -> Any:
        yield from range(n)

    @pipeline.step(site="hub")
    def square(numbers: int) -> int:
        return numbers * numbers

    pipeline.output(square)
    return pipeline


def failing_pipeline() -> fed.Pipeline:
    pipeline = fed.Pipeline("fails")

    @pipeline.step(site="a")
    def prepare(x: int) -> int:
        return x

    @pipeline.step(site="hub")
    def explode(prepare: int) -> int:
        raise ValueError(f"bad value {prepare}")

    pipeline.output(explode)
    return pipeline


@pytest.fixture(scope="module", autouse=True)
def _fonts_loaded(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Draw one picture before the leak check starts: matplotlib keeps its font files open for good."""
    if importlib.util.find_spec("matplotlib") is not None:
        to_png(events_from_log(0, _retried_log()), tmp_path_factory.mktemp("fonts") / "warm.png")


@pytest.fixture
def finished_job(make_federation: Callable[..., fed.Federation]) -> fed.Job:
    federation = make_federation(_sites())
    job = federation.submit(mean_pipeline(), threshold=0.5)
    job.result(timeout=30)
    return job


def test_timeline_is_ordered_and_consistent_with_the_result(finished_job: fed.Job) -> None:
    """Events come in time order, from queued to finished, and describe exactly the steps that ran."""
    events = finished_job.timeline()
    assert all(isinstance(event, fed.TimelineEvent) for event in events)
    assert [event.time for event in events] == sorted(event.time for event in events)
    assert events[0].kind is K.QUEUED
    assert events[-1].kind is K.FINISHED
    assert all(event.job_id == finished_job.id for event in events)
    started = [event for event in events if event.kind is K.STARTED]
    assert [event.attempt for event in started] == [1]
    assert started[0].slot == finished_job.attempts[0].slot

    steps = {(event.site, event.step): event for event in events if event.kind is K.STEP}
    assert set(steps) == {("a", "local_stats"), ("b", "local_stats"), ("hub", "mean")}
    for event in steps.values():
        assert event.end is not None and event.end >= event.time
        assert event.count == 1 and event.ok
    # The hub averages only after both clinics ran. (A step's span also covers sending its
    # result, so the hub may start before the sender's span closes: compare with the starts.)
    mean_step = steps["hub", "mean"]
    assert mean_step.time >= max(steps["a", "local_stats"].time, steps["b", "local_stats"].time)

    done = {event.site: event for event in events if event.kind is K.SITE_DONE}
    assert set(done) == {"a", "b", "hub"} and all(event.ok for event in done.values())
    site_started = {event.site: event for event in events if event.kind is K.SITE_STARTED}
    for (site, _step), event in steps.items():
        assert site_started[site].time <= event.time
        assert event.end is not None and event.end <= done[site].time

    sends = {(event.site, event.target): event for event in events if event.kind is K.SEND}
    assert set(sends) == {("a", "hub"), ("b", "hub")}
    assert all(event.count == 1 and (event.nbytes or 0) > 0 for event in sends.values())
    assert finished_job.result(timeout=0) == pytest.approx((0.6 + 0.9 + 0.7 + 0.8 + 0.95) / 5)


def test_timeline_of_a_stream_counts_every_item(make_federation: Callable[..., fed.Federation]) -> None:
    """A streamed step's items and the per-item runs downstream match the results the client got."""
    federation = make_federation(["a", "hub"])
    job = federation.submit(stream_pipeline(), n=25)
    assert job.result(timeout=30) == [i * i for i in range(25)]
    events = job.timeline()
    producer = [event for event in events if event.kind is K.STEP and event.step == "numbers"]
    consumer = [event for event in events if event.kind is K.STEP and event.step == "square"]
    assert [event.count for event in producer] == [25]
    assert len(consumer) == 25 and all(event.site == "hub" and event.count == 1 for event in consumer)
    tokens = sum(event.count or 0 for event in events if event.kind is K.SEND and event.site == "a")
    assert tokens >= 25  # every item, plus the end-of-stream marker
    assert [event.kind for event in events].count(K.FINISHED) == 1


def test_timeline_of_a_failed_job_marks_the_failing_step(
    make_federation: Callable[..., fed.Federation],
) -> None:
    """The step that raised is the one marked not ok, and the job's end says why."""
    federation = make_federation(pool_size=1)
    job = federation.submit(failing_pipeline(), x=3)
    with pytest.raises(fed.StepFailedError):
        job.result(timeout=30)
    # Sites report done after the client failed the job; the one slot takes the next job
    # only once every report arrived, so a second job's end means the first one is complete.
    federation.submit(failing_pipeline(), x=4).exception(timeout=30)
    events = job.timeline()
    failed = [event for event in events if event.kind is K.FAILED]
    assert len(failed) == 1 and "bad value 3" in (failed[0].error or "")
    explode = [event for event in events if event.kind is K.STEP and event.step == "explode"]
    prepare = [event for event in events if event.kind is K.STEP and event.step == "prepare"]
    assert [event.ok for event in explode] == [False]
    done = {event.site: event.ok for event in events if event.kind is K.SITE_DONE}
    assert done["hub"] is False
    # Site a may have been aborted before it reported done: its step ran, but whether to its
    # end the worker cannot tell, so the record says it does not know.
    assert [event.ok for event in prepare] == [True if done["a"] else None]


def test_chrome_trace_has_a_row_per_site_slices_and_token_flows(
    finished_job: fed.Job, tmp_path: Path
) -> None:
    """The exported JSON is a Chrome trace: named rows, complete slices per step, paired flow events."""
    path = finished_job.export_timeline(tmp_path / "trace.json")
    trace = json.loads(path.read_text())
    assert trace == to_chrome_trace(finished_job.timeline())
    assert trace["displayTimeUnit"] == "ms"
    events = trace["traceEvents"]
    for event in events:
        assert {"ph", "pid", "tid", "ts", "name"} <= set(event)
        assert event["pid"] == finished_job.id
        assert isinstance(event["ts"], (int, float)) and event["ts"] >= 0
    rows = {e["args"]["name"]: e["tid"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert set(rows) == {"job", "site a", "site b", "site hub"}
    assert len(set(rows.values())) == 4

    slices = [e for e in events if e["ph"] == "X" and e.get("cat") == "step"]
    assert sorted((e["tid"], e["name"]) for e in slices) == sorted(
        [(rows["site a"], "local_stats"), (rows["site b"], "local_stats"), (rows["site hub"], "mean")]
    )
    assert all(e["dur"] >= 0 for e in events if e["ph"] == "X")

    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    finishes = {e["id"]: e for e in events if e["ph"] == "f"}
    assert set(starts) == set(finishes) and len(starts) == 2
    for flow_id, start in starts.items():
        finish = finishes[flow_id]
        assert start["cat"] == finish["cat"] == "token"
        assert start["tid"] in (rows["site a"], rows["site b"]) and finish["tid"] == rows["site hub"]
        assert finish["ts"] >= start["ts"]
        assert finish.get("bp") == "e"
    ends = [e for e in events if e["ph"] == "i" and e["tid"] == rows["job"]]
    assert [e["name"] for e in ends] == ["finished"]


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.open: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in ("meta", "br", "img", "link", "input", "path", "line", "rect", "circle"):
            self.open.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("path", "line", "rect", "circle"):
            return
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]} "
        self.open.pop()


def test_html_is_self_contained_with_a_row_per_site(finished_job: fed.Job, tmp_path: Path) -> None:
    """The HTML page loads nothing, nests properly, and draws a row per site, bars and arrows."""
    path = finished_job.export_timeline(tmp_path / "timeline.html")
    page = path.read_text()
    lowered = page.lower()
    for forbidden in ("<script", "<link", "<img", "<iframe", "http://", "https://", "@import", " src="):
        assert forbidden not in lowered
    assert "url(" not in lowered.replace("url(#arrowhead)", "")
    parser = _Tags()
    parser.feed(page)
    parser.close()
    assert parser.open == []
    rows = [
        attrs.get("data-site") for tag, attrs in parser.tags if tag == "g" and attrs.get("class") == "row"
    ]
    assert sorted(site for site in rows if site) == ["a", "b", "hub"]
    steps = Counter(attrs.get("data-step") for tag, attrs in parser.tags if attrs.get("class") == "step")
    assert steps == {"local_stats": 2, "mean": 1}
    fills = {attrs.get("fill") for tag, attrs in parser.tags if attrs.get("class") == "step"}
    assert len(fills) == 2  # a colour per step
    arrows = {
        (a.get("data-source"), a.get("data-target")) for t, a in parser.tags if a.get("class") == "token"
    }
    assert arrows == {("a", "hub"), ("b", "hub")}
    assert f"job {finished_job.id} (mean)" in page


def test_png_renders_a_picture(finished_job: fed.Job, tmp_path: Path) -> None:
    """The PNG opens, has the expected size, and holds more than a blank canvas: the steps' colours."""
    image_module = pytest.importorskip("matplotlib.image")
    path = finished_job.export_timeline(tmp_path / "timeline.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image_module.imread(str(path))
    height, width = pixels.shape[:2]
    assert width == 1200  # 10 inches at 120 dpi
    assert 300 <= height <= 600  # a job row and three site rows
    rgb = (pixels[:, :, :3] * 255).round().astype(int).reshape(-1, 3)
    colours = Counter(map(tuple, rgb.tolist()))
    assert len(colours) > 50
    white = colours.get((255, 255, 255), 0)
    assert white < 0.9 * len(rgb)
    # The first step's colour fills its bars (tab10 blue), the second's too (orange).
    assert colours.get((31, 119, 180), 0) > 200
    assert colours.get((255, 127, 14), 0) > 50


def test_png_without_matplotlib_names_the_extra(
    finished_job: fed.Job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without matplotlib, asking for a PNG says which extra to install."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match=r"pip install 'federation-executor\[viz\]'"):
        finished_job.export_timeline(tmp_path / "timeline.png")


def test_export_rejects_an_unknown_suffix(finished_job: fed.Job, tmp_path: Path) -> None:
    """An unknown suffix is refused with the formats that exist."""
    with pytest.raises(ValueError, match=r"\.json, \.html, \.png"):
        finished_job.export_timeline(tmp_path / "timeline.svg")


def test_text_summary_names_every_site_and_link(finished_job: fed.Job) -> None:
    """The plain-text summary (what 'federation demo' prints) covers each site, step and link."""
    text = to_text(finished_job.timeline())
    assert text.splitlines()[0].startswith(f"job {finished_job.id}: finished after ")
    for needle in ("a:", "b:", "hub:", "local_stats", "mean", "-> hub"):
        assert needle in text


# -- the record builder, on logs the core may write ----------------------------------------

T0 = 1_000.0


def _retried_log() -> list[tuple[float, str, dict[str, Any]]]:
    """A job whose first attempt lost a worker, retried on slot 1, with per-batch send records."""
    return [
        (T0, "queued", {}),
        (T0 + 0.001, "started", {"slot": 0, "attempt": 1}),
        (T0 + 0.010, "retry", {"error": "WorkerDiedError('...')"}),
        (T0 + 0.011, "started", {"slot": 1, "attempt": 2}),
        (
            T0 + 0.020,
            "site_done",
            {
                "site": "a",
                "ok": True,
                "started": T0 + 0.012,
                "timings": [("numbers", T0 + 0.013, T0 + 0.018, 2)],
                "links": {"hub": [3, 300]},
                "sends": [
                    (T0 + 0.014, "hub", 1, 100),
                    (T0 + 0.016, "hub", 1, 100),
                    (T0 + 0.018, "hub", 1, 100),
                ],
                "dropped": 0,
            },
        ),
        (
            T0 + 0.025,
            "site_done",
            {
                "site": "hub",
                "ok": True,
                "started": T0 + 0.012,
                "timings": [("square", T0 + 0.015, T0 + 0.0155, 1), ("square", T0 + 0.017, T0 + 0.0175, 1)],
                "links": {},
                "dropped": 0,
            },
        ),
        (T0 + 0.026, "finished", {"error": None}),
    ]


def test_records_follow_attempts_and_use_per_batch_sends() -> None:
    """Events after a retry belong to the new attempt; recorded sends give one arrow per batch."""
    events = events_from_log(7, _retried_log())
    assert [event.kind for event in events if event.site is None] == [
        K.QUEUED,
        K.STARTED,
        K.RETRY,
        K.STARTED,
        K.FINISHED,
    ]
    assert {event.attempt for event in events if event.site is not None} == {2}
    sends = [event for event in events if event.kind is K.SEND]
    assert [event.time - T0 for event in sends] == pytest.approx([0.014, 0.016, 0.018])
    assert not any(event.estimated for event in sends)
    trace = to_chrome_trace(events)
    flows = [e for e in trace["traceEvents"] if e["ph"] in ("s", "f")]
    assert len(flows) == 6
    # A token lands in the first hub step that starts after it left, or in the one running then.
    finishes = sorted(e["ts"] for e in flows if e["ph"] == "f")
    # Sends at +14, +16, +18 ms; hub steps at +15 and +17 ms; the hub done at +25 ms (µs below).
    assert finishes == pytest.approx([15000, 17000, 25000], abs=1)
    job_row = [e["name"] for e in trace["traceEvents"] if e["ph"] == "X" and e["tid"] == 0]
    assert job_row == ["queued", "attempt 1 (slot 0)", "queued", "attempt 2 (slot 1)"]
    assert "retry" in to_html(events)


def test_pictures_of_a_long_stream_stay_readable(tmp_path: Path) -> None:
    """A stream of 1,000 transfers draws every run and link, and renders in one piece."""
    n = 1000
    raw: list[tuple[float, str, dict[str, Any]]] = [
        (T0, "queued", {}),
        (T0, "started", {"slot": 0, "attempt": 1}),
        (
            T0 + 1.1,
            "site_done",
            {
                "site": "a",
                "ok": True,
                "started": T0,
                "timings": [("numbers", T0, T0 + 1.0, n)],
                "links": {"hub": [n, 100 * n]},
                "sends": [(T0 + 0.001 * i, "hub", 1, 100) for i in range(n)],
            },
        ),
        (
            T0 + 1.2,
            "site_done",
            {
                "site": "hub",
                "ok": True,
                "started": T0,
                "timings": [
                    ("square", T0 + 0.001 * i + 0.0002, T0 + 0.001 * i + 0.0004, 1) for i in range(n)
                ],
                "links": {},
            },
        ),
        (T0 + 1.3, "finished", {}),
    ]
    events = events_from_log(1, raw)
    assert sum(event.kind is K.STEP for event in events) == n + 1
    page = to_html(events)
    assert page.count('class="token"') == n and page.count('class="step"') == n + 1
    if importlib.util.find_spec("matplotlib") is not None:
        path = to_png(events, tmp_path / "stream.png")
        assert path.stat().st_size > 10_000
