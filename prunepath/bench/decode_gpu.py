"""GPU rows of `prunepath bench decode`: batch-1 greedy decode tokens/s, dense and PrunePath, on one loop.

Models (bf16 on CUDA):

* `llama-8b` / `llama-1b`: Llama-3-8B- / Llama-3.2-1B-shaped models with random weights (speed does not
  depend on the values). After the dense rows, the model is converted in place (identity split, random
  router directions) and run at top-k kept fractions (exact) and cumulative-mass tau calibrated on
  the prompt to keep about the same fractions (the method's rule; Gu, Fu, Yuan 2026).
* `default-shape`: the default checkpoint's base shape (SmolLM2-135M: 30 layers, 576 x 1536, 9 / 3 heads,
  49152 tokens) with random weights and random routers, run like the Llama shapes (for a GPU machine
  without the model's cached weights: speed does not depend on the weight values, the kept fractions
  are set by the rule).
* `default`: the packaged checkpoint at several tau, and its base model as the dense rows.

Rows (schema of results/bench/*.json): our loop (`prunepath.decode.compiled`: compiled non-FFN step, the
whole step one CUDA graph) dense and sparse; baselines: the previous loop (`prunepath.decode.Decoder`,
transformers layers in a CUDA graph, not compiled), transformers `generate` with the static cache
(compiled by generate itself, timed after a warm-up call that compiles) and without compilation.
Each row: median and p20 / p80 ms per token over >= 5 runs of 128 tokens (CUDA events, after
warm-up), weight bytes read per token, GB/s, its fraction of the measured copy bandwidth, and the
speed-up against our dense loop. The JSON is rewritten after every row: nothing measured is lost.
"""

from __future__ import annotations

import gc
import math
import time
from pathlib import Path

import torch

from prunepath import results
from prunepath.bench.gpu_timing import copy_bandwidth, environment, stats

_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, num_key_value_heads=8, num_attention_heads=32)
SHAPES = {  # Llama-3.2-1B, Llama-3-8B, and the default checkpoint's base (SmolLM2-135M)
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, tie_word_embeddings=True,
                     **_LLAMA3),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, tie_word_embeddings=False,
                     **_LLAMA3),
    "default-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, tie_word_embeddings=True, vocab_size=49152, rope_theta=100000.0,
                          rms_norm_eps=1e-5),
}
RESULT_NAMES = {"default-shape": "default"}  # results/bench/decode_<name>_h200.json


def random_llama(name: str, dtype=torch.bfloat16):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(max_position_embeddings=8192, **SHAPES[name])
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def weight_bytes(model, kept: float = 1.0) -> int:
    """Bytes a decode step reads: every weight once (the embedding: one row), FFNs at `kept`."""
    total = 0
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    for name, p in model.named_parameters():
        if p is emb and p is not head:
            total += p.shape[1] * p.element_size()
            continue
        n = p.numel() * p.element_size()
        if ".mlp." in name and "router" not in name:
            n *= kept
        total += n
    return int(total)


def kv_bytes(model, max_len: int) -> int:
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * hd * max_len * 2


class Writer:
    """The results object, written to disk after every row."""

    def __init__(self, path: Path, head: dict):
        self.path, self.result = path, {**head, "rows": []}

    def add(self, row: dict) -> None:
        self.result["rows"].append(row)
        results.write_bench(self.path, self.result)
        r = row
        print(f"{r['variant']:44s} {r['path']:22s} kept {r.get('kept_fraction', 1):5.3f}: "
              f"{r['tokens_per_s']:7.1f} tok/s  {r['ms_per_token']:.3f} ms [{r['ms_p20']:.3f}, {r['ms_p80']:.3f}]  "
              f"{r['gb_per_s']:6.0f} GB/s ({100 * r['bandwidth_fraction']:3.0f}%)  x{r['speedup_vs_dense']:.2f}",
              flush=True)


def row(variant: str, path: str, ms: dict, nbytes: int, bw: float, dense_ms: float | None, **extra) -> dict:
    t = ms["median"]
    return {"variant": variant, "path": path, "batch": 1, "tokens_per_s": 1e3 / t, "ms_per_token": t,
            "ms_p20": ms["p20"], "ms_p80": ms["p80"], "bytes_per_token": nbytes, "gb_per_s": nbytes / t / 1e6,
            "bandwidth_fraction": nbytes / t / 1e6 / (bw / 1e9),
            "speedup_vs_dense": (dense_ms / t) if dense_ms else 1.0, "runs": ms["runs"], **extra}


def time_ours(dec, ids, n_tokens: int, runs: int) -> dict:
    """ms per token of our loop: prefill, warm-up (capture, then n_tokens steps: the 8B-shape dense loop measured
    4.75 and 4.29 ms/token in two processes on one H200, cause not pinned down; a longer warm-up at least rules out
    clocks still rising), then `runs` timed runs of n_tokens."""
    dec.prefill(ids)
    dec.step(n_tokens)
    per = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dec.step(n_tokens)
        b.record()
        b.synchronize()
        per.append(a.elapsed_time(b) / n_tokens)
    return stats(per)


def time_old_loop(model, ids, n_tokens: int, runs: int) -> dict:
    """The previous loop: transformers layers in a CUDA graph (prunepath.decode.Decoder)."""
    from prunepath.decode.loop import DecodeConfig, Decoder

    dec = Decoder(model, max_len=ids.shape[1] + n_tokens + 16, config=DecodeConfig(max_new_tokens=n_tokens))
    per = []
    for _ in range(max(2, math.ceil(runs / 3))):  # time_decode times 3 runs after its own warm-up
        per += [s * 1e3 / n_tokens for s in dec.time_decode(ids, n_tokens=n_tokens)["runs_s"]]
    del dec
    return stats(per)


def time_generate(model, ids, n_tokens: int, runs: int, compiled: bool) -> dict:
    """transformers generate, greedy, static cache; ms per new token (prefill included), after a warm-up."""
    kw = dict(max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False, pad_token_id=0,
              cache_implementation="static")
    model.generation_config.disable_compile = not compiled
    ids = ids.cuda()
    per = []
    with torch.no_grad():
        model.generate(ids, **kw)  # warm-up: compiles when compiled
        model.generate(ids, **kw)
        for _ in range(runs):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, **kw)
            torch.cuda.synchronize()
            per.append((time.perf_counter() - t0) * 1e3 / n_tokens)
    return stats(per)


class FFNInputs:
    """Router logits of every layer over the tokens a decoder steps through (eager, no graph)."""

    def __init__(self, dec):
        self.dec, self.logits = dec, []

    def __enter__(self):
        self.saved = [(layer, layer.ffn) for layer in self.dec.layers]
        for layer, ffn in self.saved:
            def rec(x, ffn=ffn):
                self.logits.append(ffn.router(x.reshape(-1, x.shape[-1])).float())
                return ffn(x)
            layer.ffn = rec
        self.dec.use_graph_saved, self.dec.use_graph = self.dec.use_graph, False
        self.dec.graph = None  # eager steps: the recorder runs in Python
        return self

    def __exit__(self, *exc):
        for layer, ffn in self.saved:
            layer.ffn = ffn
        self.dec.use_graph = self.dec.use_graph_saved
        self.dec.graph = None


def realised_fraction(dec, seq, code: int, value: float) -> float:
    """Mean fraction of experts kept per token and layer over seq [1, T] (the kernels' selection rule)."""
    from prunepath.kernels.route import select_reference

    with FFNInputs(dec) as rec:
        dec.prefill(seq)
    return sum(select_reference(z, code, value).float().mean().item() for z in rec.logits) / len(rec.logits)


def calibrate_tau(dec, ids, target: float) -> float:
    """tau whose cumulative-mass rule keeps about `target` of the experts on the prompt's FFN inputs."""
    from prunepath.kernels.route import RULE_MASS, select_reference
    from prunepath.routing.calibrate import bisect

    with FFNInputs(dec) as rec:
        dec.prefill(ids)
    frac = lambda t: sum(select_reference(z, RULE_MASS, t).float().mean().item() for z in rec.logits) / len(rec.logits)  # noqa: E731
    return bisect(frac, 1e-4, 1.0, target, tol=0.0, iters=25)[0]


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def bench_random(args, out: Path) -> None:
    from prunepath import MoefyConfig, moefy, routing
    from prunepath.decode.compiled import CompiledDecoder
    from prunepath.ffn.module import prunepath_ffns
    from prunepath.kernels.route import RULE_MASS, RULE_TOPK
    from prunepath.routing.control import set_rule

    bw = copy_bandwidth()
    model = random_llama(args.model)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (1, args.prompt_len))
    max_len = args.prompt_len + 8 + (args.runs + 1) * args.new_tokens + 8
    shape = {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads", "vocab_size")}
    model_name = args.model + (" (SmolLM2-135M, the default base)" if args.model == "default-shape" else "")
    w = Writer(out, {"kind": "decode", "model": model_name, "shape": {**shape, "dtype": "bfloat16"},
                     **environment(), "bandwidth_gbs": bw / 1e9, "weights": "random",
                     "new_tokens_per_run": args.new_tokens, "prompt_len": args.prompt_len,
                     "kv_cache_bytes": kv_bytes(model, max_len)})
    dense_bytes = weight_bytes(model)
    print(f"{args.model}: {dense_bytes / 1e9:.2f} GB of weights per token; copy bandwidth {bw / 1e12:.2f} TB/s",
          flush=True)
    dec = CompiledDecoder(model, max_len=max_len)
    t0 = time.perf_counter()
    dense = time_ours(dec, ids, args.new_tokens, args.runs)
    w.add(row("dense", "compiled-graph", dense, dense_bytes, bw, None, kept_fraction=1.0, attention=dec.attention,
              first_call_s=time.perf_counter() - t0))
    dense_ms = dense["median"]
    del dec
    _free()
    if not args.no_baselines:
        w.add(row("dense, previous loop (transformers layers, CUDA graph)", "graph-eager-layers",
                  time_old_loop(model, ids, args.new_tokens, args.runs), dense_bytes, bw, dense_ms, kept_fraction=1.0))
        _free()
    # PrunePath: identity split (random weights: any split is as good), random router directions
    L, Fd = cfg.num_hidden_layers, cfg.intermediate_size
    moefy(model, MoefyConfig(split="random", router_init="zero", rule=routing.CumulativeMass(0.5)),
          splits=[torch.arange(Fd)] * L, progress=False)
    torch.manual_seed(1)
    for f in prunepath_ffns(model):
        f.router.weight.data.normal_(0.0, args.logit_std / math.sqrt(cfg.hidden_size))
    E = Fd // 32
    dec = CompiledDecoder(model, max_len=max_len)
    runs = [("all experts (dense rule)", routing.Dense(), None, None)]
    for a in args.fractions:
        k = max(1, round(a * E))
        runs.append((f"kept={a:g} (top-{k})", routing.TopK(k), RULE_TOPK, float(k)))
        tau = calibrate_tau(dec, ids, a)
        runs.append((f"tau={tau:.3f} (mass, ~{a:g} kept)", routing.CumulativeMass(tau), RULE_MASS, tau))
    for variant, rule, code, value in runs:
        set_rule(model, rule)
        t = time_ours(dec, ids, args.new_tokens, args.runs)
        seq = torch.cat([ids, dec.out[:, args.prompt_len: args.prompt_len + 64].cpu()], 1)
        kept = 1.0 if code is None else realised_fraction(dec, seq, code, value)
        path = "compiled-graph + " + dec.fast_paths[0].path(dec.batch)
        w.add(row(variant, path, t, weight_bytes(model, kept), bw, dense_ms, kept_fraction=kept,
                  rule=rule.spec if hasattr(rule, "spec") else str(rule)))
    del dec
    _free()
    if not args.no_baselines:  # transformers generate on the dense model: rebuild it (same seed, same weights)
        del model
        _free()
        model = random_llama(args.model)
        for compiled in (False, True):
            name = f"transformers generate, static cache{', compiled' if compiled else ''} (prefill included)"
            try:
                t = time_generate(model, ids, args.new_tokens, args.runs, compiled)
            except Exception as err:  # a baseline that fails is reported, our rows stay
                print(f"{name}: {type(err).__name__}: {err}", flush=True)
                continue
            w.add(row(name, "transformers-generate" + ("-compiled" if compiled else ""), t, dense_bytes, bw, dense_ms,
                      kept_fraction=1.0))


def bench_default(args, out: Path) -> None:
    """The packaged checkpoint: its base model on our dense loop and the baselines, then PrunePath at each tau."""
    from prunepath.decode.compiled import CompiledDecoder
    from prunepath.decode.loop import encode_prompt, load_for_decode
    from prunepath.kernels.route import RULE_MASS
    from prunepath.routing.control import set_tau

    bw = copy_bandwidth()
    base, tok = load_for_decode(args.checkpoint, True, "cuda", torch.bfloat16)
    ids = encode_prompt(tok, "Write a short story about a lighthouse keeper who finds a message in a bottle.")
    max_len = ids.shape[1] + 8 + (args.runs + 1) * args.new_tokens + 8
    cfg = base.config
    shape = {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads", "vocab_size")}
    w = Writer(out, {"kind": "decode", "model": "default", "checkpoint": args.checkpoint,
                     "shape": {**shape, "dtype": "bfloat16"}, **environment(), "bandwidth_gbs": bw / 1e9,
                     "weights": "checkpoint", "new_tokens_per_run": args.new_tokens, "prompt_len": ids.shape[1],
                     "kv_cache_bytes": kv_bytes(base, max_len)})
    dense_bytes = weight_bytes(base)
    dec = CompiledDecoder(base, max_len=max_len)
    dense = time_ours(dec, ids, args.new_tokens, args.runs)
    w.add(row("dense (base model)", "compiled-graph", dense, dense_bytes, bw, None, kept_fraction=1.0,
              attention=dec.attention))
    dense_ms = dense["median"]
    del dec
    _free()
    if not args.no_baselines:
        w.add(row("dense, previous loop (transformers layers, CUDA graph)", "graph-eager-layers",
                  time_old_loop(base, ids, args.new_tokens, args.runs), dense_bytes, bw, dense_ms, kept_fraction=1.0))
        for compiled in (False, True):
            name = f"transformers generate, static cache{', compiled' if compiled else ''} (prefill included)"
            w.add(row(name, "transformers-generate" + ("-compiled" if compiled else ""),
                      time_generate(base, ids, args.new_tokens, args.runs, compiled), dense_bytes, bw, dense_ms,
                      kept_fraction=1.0))
    del base
    _free()
    model, _ = load_for_decode(args.checkpoint, False, "cuda", torch.bfloat16)
    dec = CompiledDecoder(model, max_len=max_len)
    for t in args.taus:
        if t == "dense":
            continue
        tau = float(t)
        set_tau(model, tau)
        r = time_ours(dec, ids, args.new_tokens, args.runs)
        seq = torch.cat([ids, dec.out[:, ids.shape[1]: ids.shape[1] + 64].cpu()], 1)
        kept = realised_fraction(dec, seq, RULE_MASS, tau)
        path = "compiled-graph + " + dec.fast_paths[0].path(dec.batch)
        w.add(row(f"tau={t}", path, r, weight_bytes(model, kept), bw, dense_ms, kept_fraction=kept, tau=tau))


def main_gpu(args) -> int:
    """Entry from `prunepath bench decode` when the device is CUDA (args parsed there)."""
    from prunepath.bench.gpu_timing import BenchInputError
    from prunepath.decode.compiled import UnsupportedModelError
    from prunepath.errors import CheckpointError

    name = RESULT_NAMES.get(args.model, args.model)
    out = Path(args.out or results.bench_path("decode", torch.cuda.get_device_name(0), name))
    try:
        if args.model == "default":
            bench_default(args, out)
        elif args.model in SHAPES:
            bench_random(args, out)
        else:
            raise BenchInputError(f"--model {args.model}: the GPU rows know {', '.join(['default', *SHAPES])}")
    except (CheckpointError, UnsupportedModelError, FileNotFoundError) as err:
        print(f"prunepath bench decode: {err}\n(the GPU decode rows need a Llama-architecture PrunePath checkpoint "
              "with its expert layout, e.g. `--checkpoint default`, and its base model's weights on this machine)")
        return 2
    print(f"wrote {out}")
    return 0
