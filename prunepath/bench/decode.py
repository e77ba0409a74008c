"""End-to-end decode benchmark: tokens/s and peak memory, dense and PrunePath on the same loop.

Models (all bf16 on CUDA; fp32 on CPU, where it only checks that everything runs):

* `--model llama-1b` / `llama-8b`: Llama-3.2-1B- and Llama-3-8B-shaped models with random weights,
  built on the device. After the dense loop is timed, the model is converted in place (identity
  split: with random weights any split is as good as another) and its routers are set to random
  directions. Each target kept fraction a is run twice: top-k with k = a * E (exact), and
  cumulative mass with tau calibrated on the prompt's router inputs to keep about a (the rule the
  method uses; its realised fraction over the generated tokens is reported too).
* `--model default --checkpoint PATH --taus 0.5,0.7,0.9,dense`: a trained PrunePath checkpoint at
  several tau, its base model ("dense") on the same loop, and transformers `generate` with the
  dynamic and the static cache (no torch.compile) for reference.

Timing: `Decoder.time_decode` (CUDA events around 128 graph replays after 8 warm-up steps, median
of 3). Peak memory is `torch.cuda.max_memory_allocated` over the run (weights included).

    python -m prunepath.bench.decode --model llama-8b         # -> results/bench/decode_llama-8b_<device>.json
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from prunepath import results
from prunepath.bench.gpu_timing import environment
from prunepath.decode.loop import DecodeConfig, Decoder
from prunepath.ffn.module import prunepath_ffns
from prunepath.routing.control import set_rule
from prunepath.routing.rules import CumulativeMass
from prunepath.routing.stats import record

SHAPES = {  # Llama-3.2-1B and Llama-3-8B
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),  # CPU smoke test
}


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)


def random_llama(name: str, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0, **SHAPES[name])
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def realised_fraction(model, tokens: torch.Tensor) -> float:
    """Mean fraction of experts kept per token over `tokens` [B, T] (torch routing path)."""
    with record(model) as rec, torch.no_grad():
        model(tokens.to(next(model.parameters()).device))
    return float(rec.stats().active_fraction)


def router_inputs(model, tokens) -> list[torch.Tensor]:
    """FFN inputs [N, D] of every layer on `tokens` (hooks on the routers)."""
    caught, hooks = [], []
    for f in prunepath_ffns(model):
        hooks.append(f.router.register_forward_hook(lambda m, a, o: caught.append(a[0].reshape(-1, a[0].shape[-1]))))
    try:
        with torch.no_grad():
            model(tokens.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return caught


def calibrate_tau(model, tokens, target: float) -> float:
    """tau whose cumulative-mass rule keeps about `target` of the experts on `tokens` (bisection)."""
    from prunepath.kernels.route import RULE_MASS, select_reference
    from prunepath.routing.calibrate import bisect

    logits = [f.router(x).float() for f, x in zip(prunepath_ffns(model), router_inputs(model, tokens))]

    def frac(tau: float) -> float:
        return sum(select_reference(z, RULE_MASS, tau).float().mean().item() for z in logits) / len(logits)

    return bisect(frac, 1e-4, 1.0, target, iters=25, tol=0.0)[0]


def time_loop(dec: Decoder, ids, n: int) -> dict:
    _reset_peak(dec.device)
    r = dec.time_decode(ids, n_tokens=n)
    r.pop("runs_s", None)
    return r


def time_hf(model, ids, n: int, static: bool) -> dict:
    """transformers generate, greedy, n new tokens (prefill included), no torch.compile."""
    dev = next(model.parameters()).device
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    if static:
        kw["cache_implementation"] = "static"
    if hasattr(model.generation_config, "disable_compile"):
        model.generation_config.disable_compile = True
    ids = ids.to(dev)
    with torch.no_grad():
        model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        _reset_peak(dev)
        t0 = time.perf_counter()
        model.generate(ids, **kw)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        sec = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    return {"tokens_per_s": n / sec, "ms_per_token": 1e3 * sec / n, "peak_memory_bytes": peak,
            "includes_prefill": True}


def bench_random(args, device, dtype) -> list[dict]:
    from prunepath import MoefyConfig, moefy

    rows = []
    model = random_llama(args.model, device, dtype)
    cfgm = model.config
    ids = torch.randint(0, cfgm.vocab_size, (1, args.prompt_len))
    max_len = args.prompt_len + args.new_tokens + 16
    dcfg = DecodeConfig(max_new_tokens=args.new_tokens, cuda_graph=not args.no_graph)
    dense = time_loop(Decoder(model, max_len=max_len, config=dcfg), ids, args.new_tokens)
    rows.append({"variant": "dense", **dense})
    print(f"{args.model} dense: {dense['tokens_per_s']:.1f} tok/s", flush=True)
    L, Fd = cfgm.num_hidden_layers, cfgm.intermediate_size
    moefy(model, MoefyConfig(split="random", router_init="zero", rule=CumulativeMass(0.5)),
          splits=[torch.arange(Fd)] * L, progress=False)
    E = Fd // 32
    torch.manual_seed(1)
    for f in prunepath_ffns(model):  # random router directions, logit std ~ args.logit_std
        f.router.weight.data.normal_(0.0, args.logit_std / math.sqrt(cfgm.hidden_size))
    dec = Decoder(model, max_len=max_len, config=dcfg)
    from prunepath import routing

    runs = [("dense-rule (all experts, kernels)", routing.Dense(), 1.0)]
    for a in args.fractions:
        runs.append((f"topk {a:.0%}", routing.TopK(max(1, round(a * E))), a))
        runs.append((f"mass {a:.0%}", routing.CumulativeMass(calibrate_tau(model, ids, a)), a))
    for name, rule, a in runs:
        set_rule(model, rule)
        r = time_loop(dec, ids, args.new_tokens)
        gen = dec.out[:, : args.new_tokens].cpu()
        frac = realised_fraction(model, torch.cat([ids, gen], 1))
        rows.append({"variant": name, "rule": rule.spec, "target_fraction": a, "realised_fraction": frac,
                     "speedup_vs_dense": r["tokens_per_s"] / dense["tokens_per_s"], **r})
        print(f"{args.model} {name:34s} kept {frac:.3f}: {r['tokens_per_s']:.1f} tok/s "
              f"(x{rows[-1]['speedup_vs_dense']:.2f})", flush=True)
    return rows


def bench_default(args, device, dtype) -> list[dict]:
    """Base model first (our loop, then transformers generate), freed; then the PrunePath model across
    tau. One model on the device at a time, so each peak memory belongs to the model measured."""
    from prunepath.decode.loop import encode_prompt, load_for_decode

    rows = []
    base, tok = load_for_decode(args.checkpoint, True, str(device), dtype)
    ids = encode_prompt(tok, "Write a short story about a lighthouse keeper who finds a message in a bottle.")
    max_len = ids.shape[1] + args.new_tokens + 16
    dcfg = DecodeConfig(max_new_tokens=args.new_tokens, cuda_graph=not args.no_graph)
    dense = time_loop(Decoder(base, max_len=max_len, config=dcfg), ids, args.new_tokens)
    rows.append({"variant": "dense (our loop)", **dense})
    print(f"default dense loop: {dense['tokens_per_s']:.1f} tok/s", flush=True)
    if not args.no_hf:
        for static in (False, True):
            name = f"dense transformers generate ({'static' if static else 'dynamic'} cache)"
            rows.append({"variant": name, **time_hf(base, ids, args.new_tokens, static)})
            print(f"{name}: {rows[-1]['tokens_per_s']:.1f} tok/s", flush=True)
    del base
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model, _ = load_for_decode(args.checkpoint, False, str(device), dtype)
    dec = Decoder(model, max_len=max_len, config=dcfg)
    for t in args.taus:
        if t == "dense":
            continue
        dec.set_tau(float(t))
        r = time_loop(dec, ids, args.new_tokens)
        frac = realised_fraction(model, torch.cat([ids, dec.out[:, : args.new_tokens].cpu()], 1))
        rows.append({"variant": f"prunepath tau={t} (our loop)", "tau": float(t), "realised_fraction": frac,
                     "fast_path": bool(dec.fast_paths) and all(fp.layout is not None for fp in dec.fast_paths),
                     "speedup_vs_dense": r["tokens_per_s"] / dense["tokens_per_s"], **r})
        print(f"default tau={t}: kept {frac:.3f}, {r['tokens_per_s']:.1f} tok/s", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="prunepath bench decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-8b", choices=["default", *SHAPES, "default-shape"],
                   help="default-shape: the default base model's shape with random weights (GPU rows)")
    p.add_argument("--checkpoint", default="default", help="PrunePath checkpoint for --model default")
    p.add_argument("--taus", default="0.5,0.7,0.9,dense", help="for --model default ('dense' = base model)")
    p.add_argument("--fractions", default="0.25,0.5", help="kept fractions for the random-weight models")
    p.add_argument("--logit-std", type=float, default=1.0, help="router logit scale of the random models")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--no-graph", action="store_true")
    p.add_argument("--no-hf", action="store_true", help="skip transformers generate (default model)")
    p.add_argument("--out", default=None, help="JSON path (default results/bench/decode_MODEL_DEVICE.json)")
    p.add_argument("--kept", default="0.25,0.5,0.75,1", help="CPU, --model default: kept fractions (per-layer τ)")
    p.add_argument("--rounds", type=int, default=8, help="CPU: rounds of the variants in turn (runs per row)")
    p.add_argument("--chunk", type=int, default=8, help="CPU: tokens per variant per round")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: torch's, one per core)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="CPU: wall time, or this process's CPU time (with --threads 1: robust to a shared machine)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per row (GPU rows; >= 5)")
    p.add_argument("--no-baselines", action="store_true", help="GPU: skip the previous loop and transformers rows")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads {args.threads}: give at least 1")
    if args.device == "cpu" and args.model == "default":  # the CPU file of record: prunepath.bench.decode_cpu
        from prunepath.bench.decode_cpu import parse_kept, run

        args.fractions = parse_kept(args.kept, p.error)
        return run(args)
    args.taus = [t.strip() for t in args.taus.split(",") if t.strip()]
    from prunepath.bench.gpu_timing import BenchInputError, parse_fractions, require_triton_gpu

    try:
        args.fractions = parse_fractions(args.fractions)
        if args.device.startswith("cuda"):  # the GPU rows: compiled loop, kernels, baselines
            require_triton_gpu()
            if args.runs < 5:
                raise BenchInputError(f"--runs {args.runs}: at least 5 runs are needed for a median with p20 / p80")
            from prunepath.bench.decode_gpu import main_gpu

            return main_gpu(args)
        if args.model == "default-shape":
            raise BenchInputError("--model default-shape has GPU rows only; on a CPU use --model default")
    except BenchInputError as err:
        print(f"prunepath bench decode: {err}")
        return 2
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    rows = bench_default(args, device, dtype) if args.model == "default" else bench_random(args, device, dtype)
    result = {**environment(), "model": args.model, "dtype": str(dtype), "new_tokens": args.new_tokens,
              "prompt_len": args.prompt_len, "rows": rows}
    if args.model == "default":
        result["checkpoint"] = args.checkpoint  # which PrunePath checkpoint ("default" is whichever is packaged)
    out = results.write_bench(args.out or results.bench_path(
        "decode", result["device"] if str(args.device).startswith("cuda") else "cpu", args.model), result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
