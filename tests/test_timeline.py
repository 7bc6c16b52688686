"""The job timeline: typed records consistent with what the job did, and its three exporters.

Exporters are checked by the structure of what they write (Chrome trace JSON,
self-contained HTML) and the PNG by rendering it and looking at the pixels.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, ClassVar

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


def test_png_without_matplotlib_names_an_install_command_that_works(
    finished_job: fed.Job, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without matplotlib, asking for a PNG says what to install, with commands that work.

    The distribution is not on PyPI, so the hint names matplotlib itself and the
    extra from a checkout, never ``federation-executor`` from PyPI.
    """
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError) as caught:
        finished_job.export_timeline(tmp_path / "timeline.png")
    message = str(caught.value)
    assert "federation-executor" not in message
    assert "pip install matplotlib" in message
    assert "pip install '.[viz]'" in message


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


# -- legends: every kind of mark a picture draws is explained ----------------------------------


def _failed_log() -> list[tuple[float, str, dict[str, Any]]]:
    """A job whose hub step raised: site a's traffic is estimated from totals, the hub stopped early."""
    return [
        (T0, "queued", {}),
        (T0 + 0.001, "started", {"slot": 0, "attempt": 1}),
        (
            T0 + 0.008,
            "site_done",
            {
                "site": "a",
                "ok": True,
                "started": T0 + 0.002,
                "timings": [("prepare", T0 + 0.003, T0 + 0.004, 1)],
                "links": {"hub": [1, 80]},
            },
        ),
        (T0 + 0.010, "failed", {"error": "StepFailedError('bad value 3')"}),
        (
            T0 + 0.011,
            "site_done",
            {
                "site": "hub",
                "ok": False,
                "started": T0 + 0.002,
                "timings": [("explode", T0 + 0.005, T0 + 0.009, 0)],
                "links": {},
            },
        ),
    ]


@pytest.fixture(params=["a-finished-job", "retried", "failed"])
def legend_events(request: pytest.FixtureRequest) -> list[fed.TimelineEvent]:
    """A real job's timeline, and two made-up ones that hold every other kind of mark."""
    if request.param == "retried":
        return events_from_log(5, _retried_log())
    if request.param == "failed":
        return events_from_log(5, _failed_log(), failed_at=("hub", "explode"))
    with fed.Federation(_sites(), backend="thread", pool_size=1) as federation:
        job = federation.submit(mean_pipeline(), threshold=0.5)
        job.result(timeout=30)
    return job.timeline()


def _expected_labels(events: Sequence[fed.TimelineEvent]) -> set[str]:
    """Words a legend must hold for these events, whatever it draws them with."""
    labels = {"site busy", "tokens"}
    kinds = {event.kind for event in events}
    labels |= {f"job {kind.value}" for kind in kinds if kind.ends_job}
    if any(event.kind is K.SITE_DONE and event.ok for event in events):
        labels.add("site done")
    if any(event.kind is K.SITE_DONE and not event.ok for event in events):
        labels.add("stopped early")
    if any(event.kind is K.STEP and event.ok is False for event in events):
        labels.add("raised")
    if K.RETRY in kinds:
        labels.add("queued again")
    if any(event.kind is K.SEND and event.estimated for event in events):
        labels.add("estimated")
    return labels


class _Marks(HTMLParser):
    """The painted elements of the chart, and those of the legend's keys, with their key's text."""

    BACKGROUND: ClassVar[set[str]] = {"band", "label", "axis", "tick", "ticklabel", "axistitle"}

    def __init__(self) -> None:
        super().__init__()
        self.chart: list[tuple[str, dict[str, str | None]]] = []
        self.keys: list[tuple[list[tuple[str, dict[str, str | None]]], str]] = []
        self.svg: list[str] = []
        self.in_legend = False
        self.in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "svg":
            self.svg.append(attributes.get("class") or "")
        elif tag == "div" and attributes.get("class") == "legend":
            self.in_legend = True
        elif tag == "span" and attributes.get("class") == "key" and self.in_legend:
            self.keys.append(([], ""))
        elif tag == "title":
            self.in_title = True
        elif self.svg and self.svg[-1] == "timeline":
            if attributes.get("class") not in (None, *self.BACKGROUND, "row"):
                self.chart.append((tag, attributes))
        elif self.svg and self.svg[-1] == "icon" and self.keys:
            self.keys[-1][0].append((tag, attributes))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag == "svg":
            self.svg.pop()

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self.svg.pop()
        elif tag == "div":
            self.in_legend = False
        elif tag == "title":
            self.in_title = False

    def handle_data(self, data: str) -> None:
        if self.in_legend and self.keys and not self.svg:
            icons, text = self.keys[-1]
            self.keys[-1] = (icons, text + data)


def _paints(tag: str, attrs: dict[str, str | None]) -> set[tuple[str | None, ...]]:
    """What an element is drawn with: its fill, and its stroke (colour, width, dashes, head)."""
    paints: set[tuple[str | None, ...]] = set()
    if attrs.get("fill") not in (None, "none"):
        paints.add((tag, "fill", attrs["fill"]))
    if attrs.get("stroke") not in (None, "none"):
        stroke = ("stroke-width", "stroke-dasharray", "marker-end")
        paints.add((tag, "stroke", attrs["stroke"], *(attrs.get(name) for name in stroke)))
    return paints


def test_html_legend_explains_every_mark_drawn(legend_events: list[fed.TimelineEvent]) -> None:
    """Every colour, line and dot the HTML chart draws has a key in its legend, drawn the same way."""
    events = legend_events
    parser = _Marks()
    parser.feed(to_html(events))
    parser.close()
    assert parser.chart and parser.keys
    explained = set().union(*(_paints(tag, attrs) for icons, _ in parser.keys for tag, attrs in icons))
    drawn = set().union(*(_paints(tag, attrs) for tag, attrs in parser.chart))
    assert drawn - explained == set(), "marks drawn without a key in the legend"
    # A key for something not drawn would be noise.
    assert explained - drawn - {("rect", "fill", "#ffffff")} == set()
    texts = " | ".join(text for _, text in parser.keys)
    for label in _expected_labels(events):
        assert label in texts
    steps = {event.step for event in events if event.kind is K.STEP}
    assert steps <= {text.strip() for _, text in parser.keys}


def test_png_legend_explains_every_mark_drawn(
    legend_events: list[fed.TimelineEvent], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every colour, line and dot the PNG draws has a key in its legend, drawn the same way."""
    pytest.importorskip("matplotlib")
    from matplotlib.collections import LineCollection, PolyCollection
    from matplotlib.colors import to_hex
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.text import Annotation

    events = legend_events
    figures: list[Any] = []
    save = Figure.savefig

    def savefig(self: Any, *args: Any, **kwargs: Any) -> Any:
        figures.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    to_png(events, tmp_path / "timeline.png")
    axes = figures[0].axes[0]
    legend = axes.get_legend()
    handles = getattr(legend, "legend_handles", None) or legend.legendHandles

    def visible(colour: Any) -> bool:
        return colour is not None and len(colour) == 4 and colour[3] > 0

    fills = {to_hex(h.get_facecolor()) for h in handles if isinstance(h, Patch)}
    edges = {
        to_hex(h.get_edgecolor())
        for h in handles
        if isinstance(h, Patch) and h.get_linewidth() > 0 and visible(h.get_edgecolor())
    }
    lines = {
        (h.get_marker(), to_hex(h.get_color()), h.get_linestyle()) for h in handles if isinstance(h, Line2D)
    }
    missing: list[str] = []
    for collection in axes.collections:
        if isinstance(collection, LineCollection):  # a site's done tick
            for colour in collection.get_colors():
                if not any(m == "|" and c == to_hex(colour) for m, c, _ in lines):
                    missing.append(f"tick {to_hex(colour)}")
        elif isinstance(collection, PolyCollection):  # bars: a step, a site busy, the job's spans
            for colour in collection.get_facecolors():
                if to_hex(colour) not in fills:
                    missing.append(f"bar {to_hex(colour)}")
            widths = collection.get_linewidths()
            for colour in collection.get_edgecolors():
                if visible(colour) and max(widths, default=0) > 0 and to_hex(colour) not in edges:
                    missing.append(f"bar outline {to_hex(colour)}")
    for line in axes.lines:  # a dot on the job row
        if not any(m == line.get_marker() and c == to_hex(line.get_color()) for m, c, _ in lines):
            missing.append(f"dot {to_hex(line.get_color())}")
    for text in axes.texts:  # token arrows
        if isinstance(text, Annotation) and text.arrow_patch is not None:
            arrow = text.arrow_patch
            key = (">", to_hex(arrow.get_edgecolor()), arrow.get_linestyle())
            if key not in lines:
                missing.append(f"arrow {key}")
    assert missing == [], "marks drawn without a key in the legend"
    texts = " | ".join(text.get_text() for text in legend.get_texts())
    for label in _expected_labels(events):
        assert label in texts
