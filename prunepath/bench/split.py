"""Benchmark: how long balanced k-means takes to split an FFN into experts, and how good the split is.

    python -m prunepath.bench.split            # or: prunepath bench split
    python -m prunepath.bench.split --quick    # small case only

Cases (random Gaussian keys, fixed seed, G = 32):
  1536 x 576 -> 48 experts     SmolLM2-135M's FFN (the default model)
  14336 x 4096 -> 448 experts  Llama-3-8B / Mistral-7B's FFN: the issue asks for < 60 s on 2 cores

Quality: the mean cosine of each neuron's normalised key to its expert's centre direction (k-means'
objective), for k-means and for a random split of the same keys. Random Gaussian keys have no cluster
structure, so the gap there is small by construction; where the default model is installed we also
report the same number on its real gate rows (layers 0, 15, 29), where the structure is real.

Also one co-activation split per case (METIS on synthetic activations of 2048 tokens), for its time.

Writes results/bench/split_cpu.json (prunepath.results) with the CPU model, cores, threads, versions, date and
load average (the machine may be shared: the load average says how much to trust the times).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from prunepath import results
from prunepath.ffn.split import split_neurons

CASES = [(1536, 576, 32), (14336, 4096, 32)]  # (F, D, G)
REAL_LAYERS = (0, 15, 29)
COACT_TOKENS = 2048


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def quality(split) -> float:
    """Mean cosine of members to their centre's direction = mean norm of the centroids (means of unit keys)."""
    return float(split.centroids.norm(dim=-1).mean())


def time_split(keys: torch.Tensor, g: int, method: str, repeats: int) -> tuple[list[float], object]:
    times, split = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        split = split_neurons(keys, g, method, seed=0)
        times.append(time.perf_counter() - t0)
    return times, split


def summarise(times: list[float]) -> dict:
    q = np.percentile(times, [20, 50, 80]).tolist()
    return {"median_s": statistics.median(times), "p20_s": q[0], "p80_s": q[2], "runs_s": times}


def real_keys_section() -> dict | None:
    """k-means vs random quality (and time) on the default model's gate rows, if the model is installed."""
    try:
        from prunepath.models import load_model

        model, _ = load_model()
    except Exception as err:  # the benchmark must not depend on the model being installed
        return {"skipped": f"default model not available: {err}"}
    out = {}
    for layer in REAL_LAYERS:
        w = model.model.layers[layer].mlp.gate_proj.weight.detach().float()  # [F, D]
        t0 = time.perf_counter()
        km = split_neurons(w, 32, "kmeans", seed=0)
        dt = time.perf_counter() - t0
        out[f"layer{layer}"] = {
            "shape": list(w.shape),
            "kmeans_time_s": dt,
            "kmeans_mean_cos": quality(km),
            "random_mean_cos": quality(split_neurons(w, 32, "random", seed=0)),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="prunepath bench split", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per case, median reported (default 5)")
    ap.add_argument("--quick", action="store_true", help="only the small case, 3 repeats unless given, no real model")
    ap.add_argument("--no-real", action="store_true", help="skip the default model's gate rows")
    ap.add_argument("--no-coact", action="store_true", help="skip the (single, untimed-quality) co-activation run")
    ap.add_argument("--out", default=None, help="JSON path (default results/bench/split_cpu.json)")
    args = ap.parse_args(argv)
    cases = CASES[:1] if args.quick else CASES
    repeats = args.repeats or (3 if args.quick else 5)

    result = {
        "benchmark": "split",
        "device": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_before": list(os.getloadavg()),
        "method": "balanced spherical k-means (prunepath.ffn.split.balanced_kmeans), seed 0",
        "cases": [],
    }
    # warm-up: first-call costs (allocator, thread pool) out of the timings
    split_neurons(torch.randn(256, 64), 32, "kmeans", seed=0)
    for n, d, g in cases:
        keys = torch.randn(n, d, generator=torch.Generator().manual_seed(0))  # [F, D]
        km_times, km = time_split(keys, g, "kmeans", repeats)
        rnd = split_neurons(keys, g, "random", seed=0)
        case = {
            "F": n, "D": d, "G": g, "E": n // g,
            "kmeans": summarise(km_times),
            "kmeans_mean_cos": quality(km),
            "random_mean_cos": quality(rnd),
        }
        if not args.no_coact:
            # co-activation split on synthetic activations (the time, not the quality, is the point here):
            # 2048 tokens, each switching on ~8 groups of G neurons that fire together
            gen = torch.Generator().manual_seed(1)
            truth = torch.randperm(n, generator=gen) // g
            on = torch.rand(COACT_TOKENS, n // g, generator=gen) < 8 / (n // g)  # [N, E]
            p_fire = torch.where(on[:, truth], 0.6, 0.03)  # [N, F]
            acts = (torch.rand(p_fire.shape, generator=gen) < p_fire) * torch.randn(p_fire.shape, generator=gen)
            t0 = time.perf_counter()
            split_neurons(keys, g, "coact", seed=0, activations=acts)
            case["coact_time_s"] = time.perf_counter() - t0
            case["coact_tokens"] = COACT_TOKENS
        result["cases"].append(case)
        print(f"{n:>6} x {d:<5} -> {n // g:>3} experts: k-means median {case['kmeans']['median_s']:.2f} s "
              f"(p20 {case['kmeans']['p20_s']:.2f}, p80 {case['kmeans']['p80_s']:.2f}); mean cos to centre "
              f"{case['kmeans_mean_cos']:.4f} vs random {case['random_mean_cos']:.4f}"
              + (f"; coact {case['coact_time_s']:.1f} s" if "coact_time_s" in case else ""), flush=True)
    if not (args.quick or args.no_real):
        result["real_model_gate_rows"] = real_keys_section()
        for name, r in (result["real_model_gate_rows"] or {}).items():
            if isinstance(r, dict):
                print(f"default model {name}: k-means {r['kmeans_time_s']:.2f} s, mean cos "
                      f"{r['kmeans_mean_cos']:.4f} vs random {r['random_mean_cos']:.4f}")
    result["load_average_after"] = list(os.getloadavg())

    out = results.write_bench(args.out or results.bench_path("split", "cpu"), result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
