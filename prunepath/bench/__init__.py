"""Benchmark scripts: `prunepath bench NAME [ARGS...]` or `python -m prunepath.bench.NAME [ARGS...]`.

Each benchmark is a module here with `main(argv: list[str] | None) -> int` that writes its results as JSON
under results/ (device, versions, date). The CLI imports a benchmark only when it is chosen, so
`prunepath --help` never pays for Triton or a model load.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil

BENCHMARKS = {
    "split": "balanced k-means time at 1536x576 -> 48 and 14336x4096 -> 448 experts (CPU)",
    "ffn": "PrunePath FFN kernels against the dense FFN at matched active fraction (GPU)",
    "decode": "single-batch KV-cache decode tokens/s, dense vs PrunePath at several τ (GPU)",
    "explorer": "response times of the explorer app's compute layer",
    "load": "second load of the default model from its safetensors cache (CPU)",
}


def add_cli(subparsers) -> None:
    """Register `prunepath bench` with the lead's CLI."""
    lines = "\n".join(f"  {name:<9} {text}" for name, text in BENCHMARKS.items())
    p = subparsers.add_parser(
        "bench",
        help="run a benchmark (split, ffn, decode, explorer, load)",
        description=f"Run a benchmark script; results go to results/bench/<kind>_<model>_<device>.json.\n\n{lines}\n\n"
        "Arguments after NAME go to the benchmark: `prunepath bench split --help`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", choices=list(BENCHMARKS), metavar="NAME", help="which benchmark: " + ", ".join(BENCHMARKS))
    p.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="ARGS", help="passed to the benchmark's main()")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        module = importlib.import_module(f"{__name__}.{args.name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{args.name}":
            raise  # the benchmark exists but one of its own imports is missing: show that
        present = [m.name for m in pkgutil.iter_modules(__path__) if m.name in BENCHMARKS]
        raise SystemExit(f"benchmark {args.name!r} is not available: no module {err.name} in this install; "
                         f"benchmarks present: {', '.join(present) or 'none'}") from None
    return module.main(list(args.bench_args)) or 0
