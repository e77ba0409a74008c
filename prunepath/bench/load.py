"""Benchmark: how long loading the default model takes once its safetensors cache exists.

    python -m prunepath.bench.load          # or: prunepath bench load

Each run is a fresh Python process (so nothing is memoised): it times `import prunepath` and then
`prunepath.load_model()` separately. The first call builds the cache if it is missing (de-quantising
the GGUF, ~20 s) and is reported apart. Target (issue 2): a second load under 5 s on 2 cores.
Writes results/bench/load_default_cpu.json (prunepath.results) with CPU, cores, versions, date and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from datetime import datetime, timezone

from prunepath import results
from prunepath.bench.split import cpu_name

_CHILD = (
    "import json, time; t0 = time.perf_counter(); import prunepath; t1 = time.perf_counter(); "
    "prunepath.load_model(); t2 = time.perf_counter(); print(json.dumps({'import_s': t1 - t0, 'load_s': t2 - t1}))"
)


def _run_once() -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prunepath bench load", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON path (default results/bench/load_default_cpu.json)")
    args = p.parse_args(argv)
    import torch
    import transformers

    first = _run_once()  # builds the cache when it is missing; not part of the "second load" figure
    runs = [_run_once() for _ in range(args.repeats)]
    loads = sorted(r["load_s"] for r in runs)
    result = {
        "benchmark": "default model load from the safetensors cache (fresh process each run)",
        "device": f"CPU: {cpu_name()}",
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "first_run": first,
        "load_s": {"median": statistics.median(loads), "min": loads[0], "max": loads[-1], "runs": loads},
        "import_s_median": statistics.median(r["import_s"] for r in runs),
        "target_s": 5.0,
        "meets_target": statistics.median(loads) < 5.0,
    }
    out = results.write_bench(args.out or results.bench_path("load", "cpu", "default"), result)
    print(
        f"second load: median {result['load_s']['median']:.2f} s (import prunepath {result['import_s_median']:.2f} s); "
        f"target < 5 s: {'met' if result['meets_target'] else 'missed'} -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
