"""CPU decode benchmark of record: `prunepath bench decode --model default --device cpu`.

Writes results/bench/decode_default_cpu.json (the schema of results/bench: one object, one row per
variant). What runs, batch 1, fp32, greedy, the default checkpoint's chat prompt:

* "dense": the base model on our decode loop (`prunepath.decode.loop.Decoder`, whose CPU step is
  `prunepath.decode.cpu_step`: static cache, weights in the GEMV's fast layout; for one fp32 token each
  layer's attention half, the dense FFN and the LM head run numba-compiled, `prunepath.decode.cpu_layer`);
* "kept=0.25" / "kept=0.5" / "kept=0.75": the PrunePath model on the same loop with one τ per layer from
  the checkpoint's active-fraction calibration (`prunepath.set_active_fraction`, per layer); its FFNs read
  only the kept experts (`prunepath.decode.cpu_experts`: one numba-compiled call per layer, `cpu_fused`;
  the eager bags when numba is missing, which the row's path says);
* "kept=1": every expert (the dense rule) through the same path: the dense FFN, bit for bit the dense row's;
* "kept=0.25 torch-mask": the same step with the torch path of the FFN, which computes every expert and masks;
* "dense, model forward": the base model on our loop through transformers' own forward and DynamicCache
  (what the loop ran before the CPU step);
* "transformers generate": the base model's `generate` (dynamic cache, greedy, no compile), warmed up;
  its time per token is taken between consecutive steps (a logits processor stamps each step), so prefill
  is excluded as it is for our loop.

The machine's load average (1, 5, 15 minutes) is recorded at the start and the end of the timing.

Timing on a shared machine (`--clock cpu --threads 1` times this process's CPU time on one thread, which
a busy neighbour inflates less than wall time): every variant has its own decoder and KV cache; after a
warm-up they run in turn, `--chunk` tokens each, round after round, so that a change in the machine's
load hits all of them alike; each round starts one variant further on, so that no variant always
follows the same one (whose weights would be in the cache before it). Each row gives the median ms per token over
the rounds with p20/p80, and `speedup_vs_dense` as the median of the round-by-round ratios (dense chunk /
variant chunk of the same round); `speedup_of_medians` is the ratio of the medians.

Bytes per token count weights only (the KV cache is a few hundred KB here): the attention projections,
norms and LM head of every step, plus each FFN's bytes as its path reads them (kept experts × an expert's
bytes, all experts above the crossover or on the torch path, plus the router), from the experts each
token kept (recorded on a separate, untimed chunk). The same record says which FFN path ran: a kept-experts
row's path names the share of layer-steps above the thread-dependent crossover (`cpu_experts.crossover`),
which ran the masked dense FFN (`dense_ffn_share`). `bandwidth_gbs` is a measured CPU copy (read +
write) of 256 MiB with the same threads.
"""

from __future__ import annotations

import datetime
import os
import statistics
import time
from pathlib import Path

import torch

from prunepath.bench.gpu_timing import environment
from prunepath.bench.split import cpu_name

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def parse_kept(text: str, error) -> list[float]:
    """'0.25,0.5,1' -> [0.25, 0.5, 1.0]; calls error(message) for anything outside (0, 1]."""
    try:
        fractions = [float(f) for f in text.split(",") if f.strip()]
    except ValueError:
        error(f"--kept {text!r}: give kept fractions as numbers, e.g. 0.25,0.5,0.75,1")
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad or not fractions:
        error(f"--kept {text!r}: kept fractions must lie in (0, 1], e.g. 0.25,0.5,0.75,1")
    return fractions


def copy_bandwidth(nbytes: int = 256 << 20, reps: int = 7) -> float:
    """CPU copy bandwidth, bytes read + written per second (median of `reps` copies)."""
    a = torch.ones(nbytes // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


def weight_bytes(base) -> tuple[int, int]:
    """(bytes every step reads outside the FFNs, bytes of all FFN weights) of the base model."""
    ffn = sum(p.numel() * p.element_size() for layer in base.model.layers for p in layer.mlp.parameters())
    total = sum(p.numel() * p.element_size() for n, p in base.named_parameters() if "embed_tokens" not in n)
    head = base.lm_head.weight
    total += head.numel() * head.element_size() if base.config.tie_word_embeddings else 0
    return total - ffn, ffn


class _Stamps:
    """A logits processor that only notes when each generate step reaches it."""

    def __init__(self, clock):
        self.t: list[float] = []
        self.clock = clock

    def __call__(self, input_ids, scores):
        self.t.append(self.clock())
        return scores


def _hf_chunk(base, ids, n: int, clock=time.perf_counter) -> float:
    """Seconds per token of transformers generate over n steps, prefill excluded."""
    from transformers import LogitsProcessorList

    stamps = _Stamps(clock)
    base.generate(ids, max_new_tokens=n + 1, min_new_tokens=n + 1, do_sample=False, pad_token_id=0,
                  logits_processor=LogitsProcessorList([stamps]))
    return (stamps.t[-1] - stamps.t[0]) / (len(stamps.t) - 1)


def run(args) -> int:
    """Measure and write the file of record (args from prunepath.bench.decode's parser; args.fractions
    the kept fractions)."""
    import prunepath
    from prunepath import results
    from prunepath.decode.cpu_experts import FUSED_CROSSOVER, expert_weights
    from prunepath.decode.cpu_experts import crossover as eager_crossover
    from prunepath.decode.cpu_fused import fused_kernels
    from prunepath.decode.loop import DecodeConfig, Decoder, encode_prompt, load_for_decode
    from prunepath.ffn.module import prunepath_ffns
    from prunepath.routing.rules import Dense

    dtype = getattr(torch, args.dtype) if args.dtype else torch.float32
    chunk, rounds, warm = args.chunk, args.rounds, 4
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    clock = time.process_time if getattr(args, "clock", "wall") == "cpu" else time.perf_counter
    base, tok = load_for_decode(args.checkpoint, True, "cpu", dtype)
    model, _ = load_for_decode(args.checkpoint, False, "cpu", dtype)
    cal = getattr(model, "prunepath_calibration", None) or {"targets": {}}
    ids = encode_prompt(tok, PROMPT)
    max_len = ids.shape[1] + warm + (rounds + 2) * chunk + 8
    cfg = DecodeConfig(max_new_tokens=max_len)

    def routing_of(fraction):
        if fraction == 1.0:
            return lambda: prunepath.set_rule(model, Dense())
        if not any(abs(k - fraction) < 1e-9 for k in cal["targets"]):
            raise SystemExit(f"the checkpoint has no τ calibration for active fraction {fraction:g}; run "
                             f"`prunepath calibrate --checkpoint {args.checkpoint} --target {fraction:g} --save`")
        return lambda: prunepath.set_active_fraction(model, fraction, per_layer=True)

    why = fused_kernels()  # the kept experts run compiled (cpu_fused) unless numba is missing
    # one fp32 token at batch 1: each layer's attention half, the dense FFN and the LM head compiled (cpu_layer)
    step = "cpu-step eager" if why or dtype != torch.float32 else "cpu-step compiled layers (numba)"
    kept_path = f"{step}, kept experts " + (f"in eager bags ({why})" if why else "in one compiled call per layer")

    def crossover():  # the kept fraction above which the kept-experts rows ran the masked dense FFN
        return eager_crossover() if why else FUSED_CROSSOVER
    variants = {"dense": (Decoder(base, max_len=max_len, config=cfg), None, f"{step}, dense FFN")}
    for a in args.fractions:
        path = f"{step}, dense FFN (every expert)" if a == 1.0 else kept_path
        variants[f"kept={a:g}"] = (Decoder(model, max_len=max_len, config=cfg), routing_of(a), path)
    torch_model, _ = load_for_decode(args.checkpoint, False, "cpu", dtype)
    variants["kept=0.25 torch-mask"] = (
        Decoder(torch_model, max_len=max_len, config=DecodeConfig(max_new_tokens=max_len, fast_path=False)),
        lambda: prunepath.set_active_fraction(torch_model, 0.25, per_layer=True), f"{step}, torch-mask FFN")
    if not any(abs(k - 0.25) < 1e-9 for k in cal["targets"]):
        del variants["kept=0.25 torch-mask"]
    variants["dense, model forward"] = (
        Decoder(base, max_len=max_len, config=DecodeConfig(max_new_tokens=max_len, cpu_step=False)), None,
        "transformers forward + DynamicCache")

    with torch.no_grad():
        for dec, set_routing, _ in variants.values():  # prefill and warm-up (builds the expert layouts)
            if set_routing:
                set_routing()
            dec.prefill(ids, new_tokens=max_len - ids.shape[1] - 1)
            dec.decode(warm)
        if not args.no_hf:
            _hf_chunk(base, ids, 2)
        times: dict[str, list[float]] = {k: [] for k in [*variants, *([] if args.no_hf else ["hf"])]}
        load_start = os.getloadavg()
        order = [*variants, *([] if args.no_hf else ["hf"])]
        for r in range(rounds):
            for name in order[r % len(order):] + order[: r % len(order)]:  # each round starts one further on
                if name == "hf":
                    times["hf"].append(_hf_chunk(base, ids, chunk, clock))
                    continue
                dec, set_routing, _ = variants[name]
                if set_routing:
                    set_routing()
                t0 = clock()
                dec.decode(chunk)
                times[name].append((clock() - t0) / chunk)
            print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {1e3 * v[-1]:.1f}" for k, v in times.items())
                  + " ms/token", flush=True)

        load_end = os.getloadavg()
        other, ffn_total = weight_bytes(base)
        rows = []
        for name in times:
            ms = [1e3 * t for t in times[name]]
            med = statistics.median(ms)
            ratios = [d / v for d, v in zip(times["dense"], times[name])]
            row = {"variant": "transformers generate" if name == "hf" else name,
                   "path": {"hf": "transformers generate (dynamic cache, eager)"}.get(name) or variants[name][2],
                   "kept_fraction": 1.0, "batch": 1, "tokens_per_s": 1e3 / med, "ms_per_token": med,
                   "ms_p20": _quantile(ms, 0.2), "ms_p80": _quantile(ms, 0.8), "bytes_per_token": other + ffn_total,
                   "speedup_vs_dense": statistics.median(ratios),
                   "speedup_of_medians": statistics.median(1e3 * t for t in times["dense"]) / med,
                   "speedup_p20": _quantile(ratios, 0.2), "speedup_p80": _quantile(ratios, 0.8), "runs": len(ms),
                   "tokens_per_run": chunk}
            if name in variants and variants[name][1] is not None:  # a PrunePath variant: what it kept and read
                dec, set_routing, path = variants[name]
                set_routing()
                m = dec.model
                with prunepath.record(m) as rec:
                    dec.decode(chunk)
                counts = rec.stats().counts.float()  # [L, N] experts kept per token per layer
                ffns = prunepath_ffns(m)
                row["kept_fraction"] = float(rec.stats().active_fraction)
                row["rule"] = "dense" if name == "kept=1" else "per-layer τ (calibrated active fraction)"
                read, over_steps = 0.0, 0
                for f, c in zip(ffns, counts):
                    per_expert = expert_weights(f).bytes_per_expert()
                    full = f.n_experts * per_expert
                    if "torch-mask" in path:
                        read += full * c.numel()
                    else:
                        over = c > crossover() * f.n_experts  # the layer-steps that ran the masked dense FFN
                        over_steps += int(over.sum()) if name != "kept=1" else 0
                        read += float(torch.where(over, float(full), c * per_expert).sum())
                    read += f.router.weight.numel() * f.router.weight.element_size() * c.numel() * (name != "kept=1")
                row["bytes_per_token"] = other + read / counts.shape[1]
                if "kept experts" in path:  # which FFN path ran, layer-step by layer-step
                    row["dense_ffn_share"] = over_steps / counts.numel()
                    row["crossover"] = crossover()
                    row["path"] = (f"{path} (masked dense FFN in {over_steps / counts.numel():.0%} of layer-steps: "
                                   f"kept > {crossover():g} of the experts on {torch.get_num_threads()} threads)")
            row["gb_per_s"] = row["bytes_per_token"] / row["ms_per_token"] / 1e6
            rows.append(row)

    bw = copy_bandwidth()
    ffns = prunepath_ffns(model)
    for row in rows:
        row["bandwidth_fraction"] = row["gb_per_s"] * 1e9 / bw
    result = {"kind": "decode", "model": "default", "checkpoint": args.checkpoint,
              "shape": {"hidden": base.config.hidden_size, "ffn": base.config.intermediate_size,
                        "layers": base.config.num_hidden_layers, "vocab": base.config.vocab_size,
                        "experts": ffns[0].n_experts, "expert_size": ffns[0].expert_size},
              "device": f"{cpu_name()}, {torch.get_num_threads()} threads (CPU)", "dtype": str(dtype),
              "versions": environment()["versions"], "date": datetime.date.today().isoformat(),
              "bandwidth_gbs": bw / 1e9, "prompt_tokens": int(ids.shape[1]),
              "timing": f"{rounds} rounds of {chunk} tokens per variant, variants in turn within each round (each "
                        "round starting one variant further on); "
                        + ("process CPU time" if clock is time.process_time else "wall-clock time"),
              "threads": torch.get_num_threads(),
              "load_average": {"start": [round(v, 2) for v in load_start], "end": [round(v, 2) for v in load_end],
                               "cores": os.cpu_count(), "note": "1, 5 and 15 minute load averages"},
              "rows": rows}
    out = Path(args.out) if args.out else results.bench_path("decode", "cpu", "default")
    results.write_bench(out, result)
    for row in rows:
        print(f"{row['variant']:24s} kept {row['kept_fraction']:.3f}  {row['tokens_per_s']:6.2f} tok/s  "
              f"{row['ms_per_token']:6.1f} ms (p20 {row['ms_p20']:.1f}, p80 {row['ms_p80']:.1f})  "
              f"x{row['speedup_vs_dense']:.2f} (pairs p20 {row['speedup_p20']:.2f} p80 {row['speedup_p80']:.2f})  "
              f"{row['gb_per_s']:.1f} GB/s")
    print(f"wrote {out}")
    return 0
