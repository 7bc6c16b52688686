"""Every site runs its own HTTP service; steps ask their own site's, never another's.

Each clinic keeps its records in its data directory and serves them with a
plain ``python -m http.server``, started by the federation before the clinic's
workers, on a free port, and stopped after them. A step reaches its site's
service through ``ctx.services["records"]``; only counts travel to the hub.

Run it: ``python examples/site_services.py``
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path

import federation as fed

CLINICS = ["clinic-a", "clinic-b", "clinic-c"]

#: One declaration for every clinic: the placeholders make each site's its own.
records = fed.Service(
    "records",
    [sys.executable, "-m", "http.server", "{port}", "--bind", "{host}", "--directory", "{data_dir}"],
    port=0,  # a free port, picked by the federation for each site
    url="http://{host}:{port}/",  # ready once it answers; steps get it filled in
    stop_grace=2,
)

pipeline = fed.Pipeline("count-over")


@pipeline.step(sites=CLINICS)
def count_over(ctx, threshold):
    """Runs at each clinic: fetch the clinic's own records from its own service."""
    import json
    import urllib.request

    with urllib.request.urlopen(ctx.services["records"].url + "records.json", timeout=10) as response:
        values = json.load(response)
    return sum(1 for value in values if value > threshold)


@pipeline.step(site="hub")
def total(count_over):
    return {"per_site": count_over, "total": sum(count_over.values())}


pipeline.output(total)


def write_records(base: Path) -> dict[str, list[float]]:
    data = {}
    for index, clinic in enumerate(CLINICS):
        rng = random.Random(index)
        data[clinic] = [round(rng.random(), 4) for _ in range(200 + 100 * index)]
        (base / clinic).mkdir(parents=True, exist_ok=True)
        (base / clinic / "records.json").write_text(json.dumps(data[clinic]))
    return data


def main() -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="site-services-") as tmp:
        base = Path(tmp)
        data = write_records(base)
        sites = [fed.Site(clinic, data_dir=base / clinic, services=[records]) for clinic in CLINICS]
        started = time.perf_counter()
        with fed.Federation([*sites, "hub"], pool_size=2) as federation:
            print(
                f"{len(CLINICS)} record services and their workers up "
                f"in {time.perf_counter() - started:.2f} s"
            )
            result = federation.submit(pipeline, threshold=0.9).result(timeout=60)
        expected = {clinic: sum(1 for v in values if v > 0.9) for clinic, values in data.items()}
        assert result["per_site"] == expected, (result, expected)
        for clinic, count in result["per_site"].items():
            print(
                f"  {clinic}: {count} records above 0.9 (of {len(data[clinic])}, served by its own service)"
            )
        print(f"total: {result['total']}")
        return result


if __name__ == "__main__":
    main()
