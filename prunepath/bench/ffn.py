"""FFN micro-benchmark: the PrunePath decode kernels against the dense FFN (torch / cuBLAS).

Shapes: D hidden, F ffn, E = F / G experts, G = 32, N rows (batch). Random bf16 weights.

For each shape, batch and kept fraction a, one run measures, all as CUDA-graph replays (so launch
overhead is what a captured decode loop pays, for both sides):

* dense: down(silu(gate(x)) * up(x)) with torch (cuBLAS GEMV / GEMM), 3 * F * D weights read;
* ours: `expert_ffn` with a top-k router rule keeping k = a * E experts (exact fractions), plus one
  cumulative-mass run with tau tuned to about 25% (the selection costs the same O(E) pass);
* the roofline: dense bytes * union fraction / measured copy bandwidth (read + write bytes / s).

Weights are rotated over several copies so that every call streams from HBM, not from the 60 MB L2.
Correctness first: each configuration's output is compared with a float64 reference before timing.
Results: JSON with device, versions, date (and the tuning sweep) under results/bench/.

    python -m prunepath.bench.ffn                # -> results/bench/ffn_<device>.json, e.g. ffn_h200.json
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform

import torch
import torch.nn.functional as F

from prunepath import results

SHAPES = {  # name: (D, F)
    "default-576x1536": (576, 1536),
    "llama2-7b-4096x11008": (4096, 11008),
    "llama3-8b-4096x14336": (4096, 14336),
}


def environment() -> dict:
    import transformers
    import triton

    dev = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    return {
        "device": torch.cuda.get_device_name(0) if dev else platform.processor() or "cpu",
        "sm_count": dev.multi_processor_count if dev else None,
        "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
        "cuda": torch.version.cuda, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def copy_bandwidth(nbytes: int = 4 << 30) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (the memory ceiling).

    The first runs (results/bench/ffn_h200*.json) copied 2 GiB of int16 and read 2.7 TB/s, well
    under the 4.3 TB/s this workplace saw with a larger fp32 copy and under the 3.6 TB/s the dense
    cuBLAS GEMV itself reads; hence fp32 and 4 GiB here (not yet re-measured), and the reports also
    give the fraction of the dense GEMV's read rate.
    """
    a = torch.randn(nbytes // 4, device="cuda")
    b = torch.empty_like(a)
    return 2 * nbytes / time_graph(lambda: b.copy_(a), reps=20)


def time_graph(fn, reps: int = 50, inner: int = 1) -> float:
    """Median seconds per call of `fn` (which makes `inner` calls), timed as CUDA-graph replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(5):
        g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return times[len(times) // 2] / inner


class Problem:
    """`copies` random FFNs of one shape (weights rotated so calls stream from HBM) and their layouts."""

    def __init__(self, D: int, Fd: int, G: int = 32, copies: int = 1, dtype=torch.bfloat16, logit_std=1.0):
        from prunepath.kernels.layout import ExpertLayout

        self.D, self.F, self.G, self.E = D, Fd, G, Fd // G
        self.layouts = []
        for _ in range(copies):
            w_gate = torch.randn(Fd, D, device="cuda", dtype=dtype) * D**-0.5
            w_up = torch.randn(Fd, D, device="cuda", dtype=dtype) * D**-0.5
            w_down = torch.randn(D, Fd, device="cuda", dtype=dtype) * Fd**-0.5
            w_router = torch.randn(self.E, D, device="cuda", dtype=dtype) * (logit_std * D**-0.5)
            lay = ExpertLayout.from_tensors(w_gate, w_down, w_router, w_up=w_up)
            # dense side reads the original [D, F] down weight: keep a view with that layout
            self.layouts.append((lay, w_down))

    def dense(self, x):
        for lay, w_down in self.layouts:
            E, G, D = lay.w_in.shape
            h = F.silu(F.linear(x, lay.w_in.view(E * G, D))) * F.linear(x, lay.w_up.view(E * G, D))
            y = F.linear(h, w_down)
        return y

    def ours(self, x, code, param, cfg=None, stages=4):
        from prunepath.kernels.expert_ffn import expert_ffn

        for lay, _ in self.layouts:
            y = expert_ffn(x, lay, code, param, cfg=cfg, stages=stages)
        return y


def _copies(nbytes_read: float, l2: float = 60e6, limit_bytes: float = 6e9, full_bytes: float = 1.0) -> int:
    return int(max(2, min(math.ceil(4 * l2 / max(nbytes_read, 1)), limit_bytes // full_bytes)))


def check(prob: Problem, x, code, param, cfg=None) -> float:
    """Relative L2 error of the kernel output against float64 (routing from the kernel's own gates)."""
    from prunepath.kernels.expert_ffn import expert_ffn, expert_ffn_reference

    lay = prob.layouts[0][0]
    res = expert_ffn(x, lay, code, param, cfg=cfg)
    ref = expert_ffn_reference(x, lay, res.gates)
    return ((res.y.double() - ref).norm() / ref.norm()).item()


def bench_shape(name, D, Fd, batch, fractions, copy_bw, cfg=None, mass_target=0.25) -> list[dict]:
    from prunepath.kernels.route import RULE_MASS, RULE_TOPK, route_reference, select_reference
    from prunepath.routing.calibrate import bisect

    G = 32
    E = Fd // G
    dense_bytes = 3 * D * Fd * 2
    rows = []
    full = dense_bytes + E * D * 2
    n_copies = _copies(min(fractions) * dense_bytes, full_bytes=full)
    prob = Problem(D, Fd, G, copies=n_copies)
    torch.manual_seed(0)
    base = torch.randn(1, D, device="cuda", dtype=torch.bfloat16)
    # batch rows close to one another: they pick (nearly) the same experts, union ~= per-token fraction
    x = (base + 0.05 * torch.randn(batch, D, device="cuda", dtype=torch.bfloat16)).contiguous()
    t_dense = time_graph(lambda: prob.dense(x), inner=n_copies)
    runs = [("topk", f, RULE_TOPK, float(max(1, round(f * E)))) for f in fractions]
    # a cumulative-mass run with tau chosen (on these logits) to keep about `mass_target` of the experts
    lay0 = prob.layouts[0][0]
    logits = route_reference(x, lay0, RULE_TOPK, 1).logits
    tau, _ = bisect(lambda t: select_reference(logits, RULE_MASS, t).float().mean().item(), 1e-4, 1.0, mass_target,
                    tol=0.0)
    runs.append(("mass", mass_target, RULE_MASS, tau))
    for rule, f, code, p in runs:
        param = torch.tensor([p], device="cuda")
        err = check(prob, x, code, param, cfg)
        from prunepath.kernels.expert_ffn import expert_ffn

        res = expert_ffn(x, lay0, code, param, cfg=cfg)
        union = res.active.float().mean().item()
        per_token = res.mask.float().mean().item()
        t = time_graph(lambda param=param, code=code: prob.ours(x, code, param, cfg), inner=n_copies)
        read = dense_bytes * union + E * D * 2  # union experts' weights + router
        rows.append({
            "shape": name, "D": D, "F": Fd, "E": E, "G": G, "batch": batch, "rule": rule,
            "param": p, "target_fraction": f, "per_token_fraction": per_token, "union_fraction": union,
            "dense_us": t_dense * 1e6, "ours_us": t * 1e6, "speedup": t_dense / t,
            "roofline_us": dense_bytes * union / copy_bw * 1e6, "bytes_read": read,
            "achieved_GBps": read / t / 1e9, "frac_of_copy_bw": read / t / copy_bw,
            "dense_frac_of_copy_bw": dense_bytes / t_dense / copy_bw, "rel_err_vs_fp64": err,
            "copies": n_copies,
        })
        r = rows[-1]
        print(f"{name:22s} N={batch} {rule:4s} a={f:5.3f} union={union:5.3f} dense {r['dense_us']:7.1f}us "
              f"ours {r['ours_us']:7.1f}us x{r['speedup']:5.2f} roof {r['roofline_us']:7.1f}us "
              f"bw {100 * r['frac_of_copy_bw']:4.0f}% err {err:.1e}", flush=True)
    return rows


def breakdown(fractions=(0.125, 0.25, 1.0), batch=1) -> list[dict]:
    """Time of the first k launches (router, +gate/up, +down, +reduce) at the Llama-3-8B shape."""
    from prunepath.kernels.route import RULE_TOPK

    D, Fd = SHAPES["llama3-8b-4096x14336"]
    E = Fd // 32
    prob = Problem(D, Fd, copies=6)
    x = torch.randn(batch, D, device="cuda", dtype=torch.bfloat16)
    out = []
    for f in fractions:
        param = torch.tensor([float(round(f * E))], device="cuda")
        t = [time_graph(lambda k=k, p=param: prob.ours(x, RULE_TOPK, p, stages=k), inner=6) * 1e6 for k in (1, 2, 3, 4)]
        out.append({"fraction": f, "batch": batch, "router_us": t[0], "gate_up_us": t[1] - t[0],
                    "down_us": t[2] - t[1], "reduce_us": t[3] - t[2], "total_us": t[3]})
        print("breakdown", {k: round(v, 1) if isinstance(v, float) else v for k, v in out[-1].items()}, flush=True)
    return out


def sweep(copy_bw) -> list[dict]:
    """A few tile configurations at the Llama-3-8B shape, 25% kept, batch 1 and 8."""
    from prunepath.kernels.expert_ffn import FFNConfig
    from prunepath.kernels.route import RouterConfig

    r512 = RouterConfig(block_k=512)
    b8 = dict(block_g=32, block_k=128, slots=8, block_d=128, router=RouterConfig(block_e=16, block_k=256, split=2))
    variants = {
        "default": None,
        "slots8_bd128": FFNConfig(slots=8, block_d=128, router=r512),
        "slots4_bd128": FFNConfig(slots=4, block_d=128, router=r512),
        "slots2_bd256": FFNConfig(slots=2, block_d=256, router=r512),
        "warps8": FFNConfig(num_warps=8, router=r512),
        "router_be4": FFNConfig(router=RouterConfig(block_e=4, block_k=512)),
        "b8_default": None,
        "b8_slots4": FFNConfig(**{**b8, "slots": 4}),
        "b8_bd256": FFNConfig(**{**b8, "block_d": 256}),
    }
    out = []
    for batch in (1, 8):
        for vname, cfg in variants.items():
            if (batch == 1) == vname.startswith("b8_"):
                continue
            rows = bench_shape("llama3-8b-4096x14336", 4096, 14336, batch, [0.25], copy_bw, cfg=cfg)
            for r in rows:
                r["variant"] = vname
            out += rows
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="prunepath bench ffn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma list of " + ", ".join(SHAPES))
    p.add_argument("--batches", default="1,8")
    p.add_argument("--fractions", default="0.125,0.25,0.5,0.75,1.0")
    p.add_argument("--sweep", action="store_true", help="also time a few tile configurations")
    p.add_argument("--out", default=None, help="JSON path (default results/bench/ffn_DEVICE.json)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("prunepath bench ffn needs a CUDA device (the kernels' timings mean nothing in the interpreter)")
        return 2
    env = environment()
    bw = copy_bandwidth()
    print(f"{env['device']}: copy bandwidth {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    fr = [float(f) for f in args.fractions.split(",")]
    rows = []
    for name in args.shapes.split(","):
        D, Fd = SHAPES[name]
        for b in (int(v) for v in args.batches.split(",")):
            rows += bench_shape(name, D, Fd, b, fr, bw)
            torch.cuda.empty_cache()
    result = {**env, "copy_bandwidth_Bps": bw, "rows": rows}
    if args.sweep:
        result["breakdown"] = breakdown()
        result["sweep"] = sweep(bw)
    out = results.write_bench(args.out or results.bench_path("ffn", env["device"]), result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
