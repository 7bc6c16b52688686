"""A long-lived aggregator job fed by other jobs through ``ctx.send_to_job``.

Every round job computes a local update at each site and reports it straight
to a running aggregator job's stream input; the aggregator sums them up when
the client closes its input.

Run it: ``python examples/aggregator.py``
"""

from __future__ import annotations

import federation as fed

aggregator = fed.Pipeline("aggregator")
aggregator.input("updates", stream=True)


@aggregator.step(site="hub", collect=["updates"])
def total(updates):
    """Everything the round jobs sent, once the stream is closed."""
    return {"count": len(updates), "sum": sum(u["delta"] for u in updates)}


aggregator.output(total)

round_ = fed.Pipeline("round")


@round_.step(sites=["site-a", "site-b", "site-c"])
def local_update(ctx, target, round_number):
    """Computes a local update and sends it to the aggregator job."""
    delta = (hash(ctx.site) % 7 + round_number) / 10
    ctx.send_to_job(target, "updates", {"site": ctx.site, "round": round_number, "delta": delta})
    return delta


round_.output(local_update)


def main() -> None:
    sites = ["hub", "site-a", "site-b", "site-c"]
    with fed.Federation(sites=sites, pool_size=3) as federation:
        collector = federation.submit(aggregator)
        rounds = [federation.submit(round_, target=collector.id, round_number=r) for r in range(5)]
        for job in rounds:
            job.result(timeout=30)
        collector.close("updates")
        summary = collector.result(timeout=30)
        print(f"aggregated {summary['count']} updates, sum {summary['sum']:.2f}")


if __name__ == "__main__":
    main()
