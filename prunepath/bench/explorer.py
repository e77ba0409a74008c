"""Explorer response time: what one τ-slider move costs in the compute layer.

    python -m prunepath.bench.explorer [--checkpoint default] [--n 20] [--tokens 64]
    prunepath bench explorer

A slider move = route the prompt at the new τ (one forward of the transformer body with routing
recorded) + build the heatmap figure and the per-token counts. Measured uncached (the route cache is
cleared before every move, as for a τ never seen) and cached (dragging back to a τ already seen).
Median and p20/p80 of N moves after warm-up. Target: < 300 ms uncached for a 64-token prompt on the
2-core CPU. The machine's load average is recorded beside the figures: on a shared machine other
processes compete for the same two cores.

Writes results/bench/explorer_default_cpu.json (prunepath.results) with CPU model, thread count, versions, date.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from prunepath import results
from prunepath.bench.split import cpu_name

TEXT = ("The explorer routes this prompt through every layer of the model and counts, for each token, how "
        "many experts the cumulative-mass rule keeps. A benchmark needs a prompt long enough to reach "
        "sixty-four tokens, so this one goes on for a while about nothing in particular, like a lecture "
        "that has run out of slides but not out of time.")




def _quantiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=5) if len(xs) > 1 else [xs[0]] * 4
    return {"p20_ms": q[0] * 1e3, "p50_ms": statistics.median(xs) * 1e3, "p80_ms": q[3] * 1e3,
            "min_ms": xs[0] * 1e3, "n": len(xs)}


def slider_move(ex, prompt: str, tau: float, rule: str = "mass") -> tuple[float, float]:
    """(wall seconds, CPU seconds of this thread) for one slider move: route + heatmap figure + counts.

    With one torch thread the whole move runs on the calling thread, so its CPU time is what the move
    would take on an idle core; the wall time includes waiting for cores other processes hold.
    """
    t0, c0 = time.perf_counter(), time.thread_time()
    r = ex.route(prompt, rule, tau)
    fig = r.heatmap_figure()
    per_token = r.per_token
    assert fig["data"][0]["z"] and per_token  # keep the work observable
    return time.perf_counter() - t0, time.thread_time() - c0


def run(checkpoint: str = "default", n: int = 20, warmup: int = 3, tokens: int = 64,
        threads: int | None = None) -> dict:
    from prunepath.explore.explorer import ExploreConfig, Explorer, configure_threads

    configure_threads(threads)  # as the app does

    t0 = time.perf_counter()
    base = Explorer.open(checkpoint)
    load_s = time.perf_counter() - t0
    ex = Explorer(base.model, base.tokenizer, base.source, base.note, ExploreConfig(max_tokens=tokens))
    prompt = TEXT
    while ex.tokenizer(prompt, return_tensors="pt").input_ids.shape[1] < tokens:
        prompt += " " + TEXT
    taus = [round(0.05 + 0.05 * i, 2) for i in range(20)]  # the slider's positions
    for i in range(warmup):
        slider_move(ex, prompt, taus[i % len(taus)])
    uncached, cpu, cached, fractions = [], [], [], []
    for i in range(n):
        tau = taus[(i * 7) % len(taus)]  # jump around the slider, as a drag does
        ex._routed.clear()  # a τ never seen: the real forward
        wall, used = slider_move(ex, prompt, tau)
        uncached.append(wall)
        cpu.append(used)
        fractions.append(ex.route(prompt, "mass", tau).active_fraction)
        cached.append(slider_move(ex, prompt, tau)[0])
    r = ex.route(prompt, "mass", 0.7)
    return {
        "benchmark": "explorer slider move (route + heatmap data)",
        "checkpoint": ex.source,
        "prompt_tokens": int(r.counts.shape[1]),
        "layers": ex.n_layers, "experts": ex.n_experts,
        "uncached": _quantiles(uncached),
        "uncached_cpu_time": _quantiles(cpu),
        "cached": _quantiles(cached),
        "target_ms": 300, "meets_target": statistics.median(uncached) * 1e3 < 300,
        "note": ("uncached = a τ never routed for this prompt; cached = a τ already routed. After each move the "
                 "app routes τ ± 0.05 and ± 0.10 in the background, so single slider steps cost the cached figure "
                 "once that has run."),
        "active_fraction_range": [min(fractions), max(fractions)],
        "checkpoint_load_s": load_s,
        "device": f"CPU: {cpu_name()}",
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "versions": _versions(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _versions() -> dict:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import panel

        out["panel"] = panel.__version__
    except ImportError:
        pass
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prunepath bench explorer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="default", help="'default', 'tiny' or a checkpoint folder")
    p.add_argument("--n", type=int, default=20, help="timed slider moves (default 20)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64, help="prompt length in tokens (default 64)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: as the app, cores // 2)")
    p.add_argument("--out", default=None, help="JSON path (default results/bench/explorer_<checkpoint>_cpu.json)")
    args = p.parse_args(argv)
    res = run(args.checkpoint, args.n, args.warmup, args.tokens, args.threads)
    out = results.write_bench(args.out or results.bench_path("explorer", "cpu", Path(args.checkpoint).name), res)
    u, c = res["uncached"], res["cached"]
    print(f"{res['device']}, {res['torch_threads']} threads, load average {res['load_average']}")
    print(f"slider move, {res['prompt_tokens']} tokens, {res['layers']} layers: uncached median {u['p50_ms']:.0f} ms "
          f"(p20 {u['p20_ms']:.0f}, p80 {u['p80_ms']:.0f}; CPU time {res['uncached_cpu_time']['p50_ms']:.0f} ms); "
          f"cached {c['p50_ms']:.1f} ms; target < 300 ms: {'met' if res['meets_target'] else 'missed'}")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
