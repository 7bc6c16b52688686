"""Streaming results from a generator step: each item flows on as its own token.

A sensor site yields readings; an analysis site scores each one as it arrives,
and the client prints scores while the job is still running.

Run it: ``python examples/streaming.py``
"""

from __future__ import annotations

import math

import federation as fed

pipeline = fed.Pipeline("sensor")


@pipeline.step(site="sensor")
def readings(count):
    """A generator: every yielded reading is sent on at once."""
    for i in range(count):
        yield {"t": i, "value": math.sin(i / 5)}


@pipeline.step(site="analysis")
def score(readings):
    """Runs once per reading."""
    return {"t": readings["t"], "alarm": readings["value"] > 0.95}


@pipeline.step(site="analysis", collect=["score"])
def summary(score):
    """Collects the whole stream of scores."""
    return sum(s["alarm"] for s in score)


pipeline.output(score)
pipeline.output(summary)


def main() -> None:
    with fed.Federation(sites=["sensor", "analysis"], pool_size=1) as federation:
        job = federation.submit(pipeline, count=60)
        for result in job:  # results arrive while the job runs
            if result.output == "score" and result.value["alarm"]:
                print(f"alarm at t={result.value['t']}")
        print(f"alarms in total: {job.result(timeout=30)['summary']}")


if __name__ == "__main__":
    main()
