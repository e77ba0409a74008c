"""Time a cold build of the book and record it: `python book/time_build.py` writes
results/bench/book-build_cpu.json (through prunepath.results, the one writer of results).

A cold build is `make book` after removing book/_build (every notebook executes; the default model's float
cache, built once per machine by the first load, is kept). The file records the wall-clock time, each
chapter's execution time (from book/_build/execution.json, written by book/_ext/book_setup.py), the built
book's weight and its largest page, the machine's core count and its load average when the build began
(the build shares the machine; the load says how much), beside the target: 8 minutes on 2 cores.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "book" / "_build"
TARGET_S = 8 * 60


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def main() -> int:
    shutil.rmtree(BUILD, ignore_errors=True)
    load = os.getloadavg()
    t0 = time.perf_counter()
    rc = subprocess.run(["make", "book"], cwd=ROOT).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        print(f"make book failed (exit {rc}) after {wall:.0f} s: nothing recorded", file=sys.stderr)
        return rc
    html = BUILD / "html"
    pages = [p for p in html.rglob("*.html") if not p.relative_to(html).as_posix().startswith("_")]
    execution = json.loads((BUILD / "execution.json").read_text()) if (BUILD / "execution.json").is_file() else {}
    record = {
        "kind": "book-build",
        "date": datetime.date.today().isoformat(),
        "command": "rm -rf book/_build && make book",
        "cores": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in load],
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(wall, 1),
        "target_s": TARGET_S,
        "within_target": wall <= TARGET_S,
        "chapters_s": {doc: round(v["runtime_s"], 1) for doc, v in execution.items() if v.get("runtime_s")},
        "built_mb": round(sum(f.stat().st_size for f in html.rglob("*") if f.is_file()) / 2**20, 2),
        "largest_page_mb": round(max(p.stat().st_size for p in pages) / 2**20, 3),
        "pages": len(pages),
    }
    from prunepath import results
    from prunepath.bench.gpu_timing import environment
    from prunepath.bench.split import cpu_name

    record["device"] = f"{cpu_name()} (CPU)"
    record["versions"] = {**environment()["versions"], "jupyter-book": _version("jupyter-book"),
                          "myst-nb": _version("myst-nb")}
    results.write_bench(results.bench_path("book-build", "cpu"), record)
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
