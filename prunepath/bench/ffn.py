"""FFN micro-benchmark of record: the PrunePath decode kernels against the dense FFN on cuBLAS.

Shapes: D hidden, F ffn, E = F / G experts, G = 32, N rows (batch). Random bf16 weights.

At the Llama-3-8B FFN shape (4096 x 14336) and each kept fraction a, timed as CUDA-graph replays (the
launch overhead a captured decode loop pays, on both sides), CUDA events around each replay, median
and p20 / p80 of the runs after warm-up:

* the dense FFN, down(silu(gate(x)) * up(x)) on cuBLAS: 3 * F * D * 2 B read (the baseline row);
* ours with a top-k rule keeping k = a * E experts (exact fractions), on the path `FastPath` takes
  (the Triton kernels, or cuBLAS plus a gating kernel above the measured crossover, `all_kept.py`),
  with the other path timed too where both can run; plus one cumulative-mass row with tau set to
  keep about 25 % (the rule the method uses);
* batch 8: rows close to one another, so the union of their kept experts is near the per-row fraction.

Each row: bytes read (kept experts' weights + router), GB/s, its fraction of the measured copy
bandwidth (read + write bytes per second of a 2 GiB device copy), the byte roofline at that bandwidth,
and the speed-up against the dense cuBLAS FFN. Weights are rotated over several copies so that every
call streams from HBM, not from the 60 MB L2. Each configuration's output is first checked against a
float64 reference. `--sweep` also times tile configurations and the per-launch breakdown.

    prunepath bench ffn                # -> results/bench/ffn_<device>.json, e.g. ffn_h200.json
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F

from prunepath import results
from prunepath.bench.gpu_timing import (
    BenchInputError,
    copy_bandwidth,
    environment,
    graph_times,
    parse_fractions,
    require_triton_gpu,
    stats,
)

SHAPES = {  # name: (D, F)
    "llama3-8b": (4096, 14336),
    "default": (576, 1536),
}
G = 32


class Problem:
    """`copies` random FFNs of one shape (rotated so calls stream from HBM) and their kernel layouts."""

    def __init__(self, D: int, Fd: int, copies: int, dtype=torch.bfloat16, logit_std=1.0):
        from prunepath.kernels.layout import ExpertLayout

        self.D, self.F, self.E = D, Fd, Fd // G
        self.layouts = []
        for _ in range(copies):
            w_gate = torch.randn(Fd, D, device="cuda", dtype=dtype) * D**-0.5
            w_up = torch.randn(Fd, D, device="cuda", dtype=dtype) * D**-0.5
            w_down = torch.randn(D, Fd, device="cuda", dtype=dtype) * Fd**-0.5
            w_router = torch.randn(self.E, D, device="cuda", dtype=dtype) * (logit_std * D**-0.5)
            # the router's rows after the gate rows in one slab, as use_fast_paths(model, share_down=True) stores
            # them: the batch masked path's one GEMM gives the gate pre-activations and the logits
            lay = ExpertLayout.from_tensors(w_gate, w_down, w_router, w_up=w_up, router_after_gate=True)
            self.layouts.append((lay, w_down))  # the dense side reads the original [D, F] down weight

    @property
    def copies(self) -> int:
        return len(self.layouts)

    def dense(self, x):
        for lay, w_down in self.layouts:
            E, G_, D = lay.w_in.shape
            y = F.linear(F.silu(F.linear(x, lay.w_in.view(E * G_, D))) * F.linear(x, lay.w_up.view(E * G_, D)),
                         w_down)
        return y

    def ours(self, x, code, param, cfg=None, stages=3):
        """The sparse kernels as `FastPath` calls them."""
        from prunepath.kernels.expert_ffn import expert_ffn

        for lay, _ in self.layouts:
            y = expert_ffn(x, lay, code, param, cfg=cfg, stages=stages)
        return y

    def cublas(self, x, code, value, layouts=None, param=None):
        from prunepath.kernels.all_kept import all_kept_ffn

        for lay in layouts or [lay for lay, _ in self.layouts]:
            y = all_kept_ffn(x, lay, code, value, param=param)
        return y


def n_copies(read_bytes: float, full_bytes: float, l2: float = 60e6, budget: float = 8e9) -> int:
    """Enough weight copies that one replay streams > 4 x L2, within a memory budget."""
    return int(max(2, min(math.ceil(4 * l2 / max(read_bytes, 1)), budget // full_bytes)))


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def mass_tau(logits: torch.Tensor, target: float) -> float:
    """tau whose cumulative-mass rule keeps about `target` of the experts on these logits."""
    from prunepath.kernels.route import RULE_MASS, select_reference
    from prunepath.routing.calibrate import bisect

    tau, _ = bisect(lambda t: select_reference(logits, RULE_MASS, t).float().mean().item(), 1e-4, 1.0, target,
                    tol=0.0)
    return tau


def _row(variant, path, batch, t_stats, copies, read, bw, dense_us, **extra):
    us = t_stats["median"] / copies * 1e6
    return {"variant": variant, "path": path, "batch": batch, "us": us,
            "us_p20": t_stats["p20"] / copies * 1e6, "us_p80": t_stats["p80"] / copies * 1e6,
            "bytes": read, "gb_per_s": read / us / 1e3, "bandwidth_fraction": read / us / 1e3 / (bw / 1e9),
            "roofline_us": read / bw * 1e6, "speedup_vs_dense": dense_us / us if dense_us else 1.0,
            "runs": t_stats["runs"], **extra}


def bench_batch(shape: str, batch: int, fractions, bw: float, runs: int, cfg=None, mass_target=0.25,
                both_paths_from: float = 0.75) -> list[dict]:
    """Rows for one shape and batch: dense cuBLAS, then each fraction on the path FastPath takes."""
    from prunepath.kernels.all_kept import all_kept_path, choose_path, masked_router
    from prunepath.kernels.expert_ffn import expert_ffn, expert_ffn_reference
    from prunepath.kernels.route import RULE_MASS, RULE_TOPK, route_reference

    D, Fd = SHAPES[shape]
    E = Fd // G
    dense_bytes = 3 * D * Fd * 2
    router_bytes = E * D * 2
    copies = n_copies(min(fractions) * dense_bytes, dense_bytes + router_bytes)
    prob = Problem(D, Fd, copies)
    torch.manual_seed(0)
    base = torch.randn(1, D, device="cuda", dtype=torch.bfloat16)
    # rows close to one another: they keep (nearly) the same experts, the union near the per-row fraction
    x = (base + 0.05 * torch.randn(batch, D, device="cuda", dtype=torch.bfloat16)).contiguous()
    lay0 = prob.layouts[0][0]
    t = stats(graph_times(lambda: prob.dense(x), runs=runs))
    dense_us = t["median"] / copies * 1e6
    rows = [_row("dense", "cublas", batch, t, copies, dense_bytes, bw, None, kept_fraction=1.0,
                 union_fraction=1.0, shape=shape)]
    print(f"{shape} N={batch} dense cuBLAS {dense_us:7.1f} us ({dense_bytes / dense_us / 1e3:.0f} GB/s)", flush=True)
    runs_spec = [(f"kept={f:g}", RULE_TOPK, float(max(1, round(f * E)))) for f in fractions]
    tau = mass_tau(route_reference(x, lay0, RULE_TOPK, 1).logits, mass_target)
    runs_spec.append((f"tau={tau:.3f} (mass, ~{mass_target:g} kept)", RULE_MASS, tau))
    for variant, code, value in runs_spec:
        param = torch.tensor([value], device="cuda")
        res = expert_ffn(x, lay0, code, param, cfg=cfg)
        err = rel_error(res.y, expert_ffn_reference(x, lay0, res.gates))
        union = res.active.float().mean().item()
        per_row = res.mask.float().mean().item()
        sparse_read = dense_bytes * union + router_bytes
        taken = choose_path(lay0, code, value, batch)
        paths = {taken}
        if code == RULE_TOPK and value / E >= both_paths_from:
            paths = {all_kept_path(lay0, code, value), "triton-fused"}
        for path in sorted(paths, key=lambda p: p != taken):
            if path == "triton-fused":
                t = stats(graph_times(lambda p=param, c=code: prob.ours(x, c, p, cfg), runs=runs))
                read = sparse_read
            else:
                t = stats(graph_times(lambda c=code, v=value, p=param: prob.cublas(x, c, v, param=p), runs=runs))
                read = dense_bytes + router_bytes  # cuBLAS streams every expert
            r = _row(variant, path, batch, t, copies, read, bw, dense_us, kept_fraction=per_row,
                     union_fraction=union, taken=path == taken, rule="topk" if code == RULE_TOPK else "mass",
                     param=value, rel_err_vs_fp64=err, shape=shape)
            if path == "cublas-masked":
                r["router"] = masked_router(lay0)  # "slab": gate + router rows in one GEMM
            rows.append(r)
            print(f"{shape} N={batch} {variant:28s} {path:12s}{'*' if path == taken else ' '} kept {per_row:5.3f} "
                  f"union {union:5.3f}: {r['us']:7.1f} us [{r['us_p20']:.1f}, {r['us_p80']:.1f}] "
                  f"x{r['speedup_vs_dense']:5.2f}  roofline {r['roofline_us']:6.1f} us  "
                  f"{r['gb_per_s']:5.0f} GB/s ({100 * r['bandwidth_fraction']:3.0f}%)  err {err:.1e}", flush=True)
    if 1.0 in fractions:  # unit gates (the exactness anchor): every expert kept is the dense FFN, no router runs
        ones = [replace(lay, gate="one") for lay, _ in prob.layouts]
        code, value = RULE_TOPK, float(E)
        y = prob.cublas(x, code, value, ones[:1])
        err = rel_error(y, expert_ffn_reference(x, ones[0], torch.ones(batch, E, device=x.device)))
        t = stats(graph_times(lambda: prob.cublas(x, code, value, ones), runs=runs))
        r = _row("kept=1, gate=one", all_kept_path(ones[0], code, value), batch, t, copies, dense_bytes, bw, dense_us,
                 kept_fraction=1.0, union_fraction=1.0, taken=True, rule="topk", param=value, gate="one",
                 rel_err_vs_fp64=err, shape=shape)
        rows.append(r)
        print(f"{shape} N={batch} kept=1, gate=one {r['path']}: {r['us']:7.1f} us x{r['speedup_vs_dense']:5.2f} "
              f"err {err:.1e}", flush=True)
    return rows


def breakdown(bw: float, runs: int, fractions=(0.125, 0.25, 0.5, 1.0), batch: int = 1) -> list[dict]:
    """Time of the first k launches of the two-launch form (route+select, +gate/up, +down) at the
    Llama-3-8B shape, batch 1."""
    from prunepath.kernels.expert_ffn import FFNConfig
    from prunepath.kernels.route import RULE_TOPK

    cfg = FFNConfig.for_batch(batch)
    D, Fd = SHAPES["llama3-8b"]
    E = Fd // G
    prob = Problem(D, Fd, copies=6)
    x = (torch.randn(1, D, device="cuda", dtype=torch.bfloat16)
         + 0.05 * torch.randn(batch, D, device="cuda", dtype=torch.bfloat16)).contiguous()
    out = []
    for f in fractions:
        k_f = round(f * E)
        param = torch.tensor([float(k_f)], device="cuda")
        t = [stats(graph_times(lambda k=k, p=param: prob.ours(x, RULE_TOPK, p, cfg, stages=k),
                               runs=runs))["median"]
             * 1e6 / prob.copies for k in (1, 2, 3)]
        prob.ours(x, RULE_TOPK, param, cfg)  # a full call: leaves the down pass's state clean
        out.append({"batch": batch, "kept_fraction": f, "route_select_us": t[0], "gate_up_us": t[1] - t[0],
                    "down_us": t[2] - t[1],
                    "total_us": t[2], "gate_up_roofline_us": 2 * f * D * Fd * 2 / bw * 1e6,
                    "down_roofline_us": f * D * Fd * 2 / bw * 1e6})
        print("breakdown", {k: round(v, 1) for k, v in out[-1].items()}, flush=True)
    return out


SWEEP = {  # name: (batch, FFNConfig overrides of that batch's defaults)
    "default": (1, {}),
    "no_pdl": (1, dict(pdl=False)),
    "s4_d512": (1, dict(slots=4, block_d=512)),
    "s4_d128": (1, dict(slots=4, block_d=128)),
    "s2_d512": (1, dict(slots=2, block_d=512)),
    "s8_d128": (1, dict(slots=8, block_d=128)),
    "g8_k512": (1, dict(block_g=8, block_k=512)),
    "r_e4_s2": (1, dict(router_block_e=4, router_split=2, router_block_k=2048)),
    "b8_default": (8, {}),
    "b8_no_pdl": (8, dict(pdl=False)),
    "b8_one_select_program": (8, dict(parallel_select=False)),
    "b8_g16_k256": (8, dict(block_g=16, block_k=256)),
    "b8_s4_d256": (8, dict(slots=4, block_d=256)),
}


def sweep(bw: float, runs: int) -> list[dict]:
    from prunepath.kernels.expert_ffn import FFNConfig

    out = []
    for name, (batch, over) in SWEEP.items():
        cfg = replace(FFNConfig.for_batch(batch), **over)
        fractions = [0.125, 0.25, 0.5] if batch == 1 else [0.25]
        try:
            rows = bench_batch("llama3-8b", batch, fractions, bw, runs, cfg=cfg, both_paths_from=2.0)
        except Exception as err:  # a tile the compiler rejects: note it, keep sweeping
            print(f"sweep {name}: {type(err).__name__}: {err}", flush=True)
            out.append({"config": name, "error": f"{type(err).__name__}: {err}"})
            continue
        for r in rows:
            if r["path"] == "triton-fused":
                out.append({"config": name, "batch": batch, **asdict(cfg),
                            **{k: r[k] for k in ("variant", "us", "speedup_vs_dense", "bandwidth_fraction",
                                                 "rel_err_vs_fp64")}})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="prunepath bench ffn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b", choices=list(SHAPES))
    p.add_argument("--batches", default="1,8")
    p.add_argument("--fractions", default="0.125,0.25,0.5,0.75,0.875,0.95,1.0", help="kept fractions, each in (0, 1]")
    p.add_argument("--runs", type=int, default=30, help="timed graph replays per row (>= 5)")
    p.add_argument("--sweep", action="store_true", help="also time tile configurations and the launch breakdown")
    p.add_argument("--breakdown", action="store_true", help="also time the launches one by one (batch 1 and 8)")
    p.add_argument("--out", default=None, help="JSON path (default results/bench/ffn_DEVICE.json)")
    args = p.parse_args(argv)
    try:
        fractions = parse_fractions(args.fractions)
        if args.runs < 5:
            raise BenchInputError(f"--runs {args.runs}: at least 5 runs are needed for a median with p20 / p80")
        require_triton_gpu()
    except BenchInputError as err:
        print(f"prunepath bench ffn: {err}")
        return 2
    env = environment()
    bw = copy_bandwidth()
    print(f"{env['device']}: copy bandwidth {bw / 1e12:.2f} TB/s (read + write, 2 GiB)", flush=True)
    D, Fd = SHAPES[args.shape]
    result = {"kind": "ffn", "model": f"{args.shape} FFN", "shape": {"D": D, "F": Fd, "G": G, "E": Fd // G,
              "dtype": "bfloat16"}, **env, "bandwidth_gbs": bw / 1e9, "rows": []}
    out = args.out or results.bench_path("ffn", env["device"])
    from prunepath.kernels.expert_ffn import FFNConfig

    for b in (int(v) for v in args.batches.split(",")):
        result.setdefault("configs", {})[f"batch {b}"] = asdict(FFNConfig.for_batch(b))
        result["rows"] += bench_batch(args.shape, b, fractions, bw, args.runs)
        torch.cuda.empty_cache()  # the weight copies of this batch are gone with bench_batch's frame
        results.write_bench(out, result)  # what is measured is kept, whatever comes next
    if args.sweep or args.breakdown:
        result["breakdown"] = breakdown(bw, args.runs) + breakdown(bw, args.runs, fractions=(0.25,), batch=8)
        results.write_bench(out, result)
    if args.sweep:
        result["sweep"] = sweep(bw, args.runs)
        results.write_bench(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
