"""A stream input fed by the client while the job runs: ``job.send`` and ``job.close``.

Run it: ``python examples/stream_input.py``
"""

from __future__ import annotations

import federation as fed

pipeline = fed.Pipeline("moderation")
pipeline.input("messages", stream=True)


@pipeline.step(site="filter")
def clean(messages):
    """Runs once per message the client sends."""
    return messages.replace("darn", "d**n")


@pipeline.step(site="archive", collect=["clean"])
def archive(ctx, clean):
    """Receives every cleaned message once the client closes the stream."""
    ctx.log.info("archiving", count=len(clean))
    return len(clean)


pipeline.output(clean)
pipeline.output(archive)


def main() -> None:
    with fed.Federation(sites=["filter", "archive"], pool_size=1) as federation:
        job = federation.submit(pipeline)
        for text in ["hello", "darn it", "all good"]:
            job.send("messages", text)
        job.close("messages")
        result = job.result(timeout=30)
        print("cleaned:", result["clean"])
        print("archived:", result["archive"])


if __name__ == "__main__":
    main()
