"""Sparsity–accuracy sweeps on one checkpoint, and automatic τ calibration (PAPER.md §3, §5).

    prunepath sweep --checkpoint default --fractions 0.25 0.5 0.75 --tasks wikitext2 sst2 rte
    prunepath calibrate --checkpoint default --target 0.5

The sweep turns τ on one checkpoint (`--taus`) and, at each matched mean active FFN fraction
(`--fractions`), runs PrunePath and every baseline of baselines.py: each method's knob is calibrated on
calibration text to the target fraction, then every task is evaluated with the evaluator's functions
(`prunepath.evaluate.evaluate_task`). Rows are tidy — one number per row:

    method, knob, target_fraction, active_fraction, mean_experts, task, metric, value, n, protocol

plus the per-token expert-count quantiles. They are appended to one JSON file as they come (by default
results/sweeps/<checkpoint>_<tasks>_<device>.json, through `prunepath.results`), so an interrupted sweep
resumes where it stopped; `prunepath report` makes its table, CSV and figure. Active fraction is
measured during each evaluation (not the calibration value); for neuron pruning it is the kept-neuron fraction.

Cost. A sweep evaluates the same texts under every (method, knob), so what does not depend on the
model is done once per process: tokenised test text and prompts, task rows and demonstrations
(`nlu`), and each layer's router logits on the calibration inputs (`baselines`). On a GPU the evaluators
get large batches (`GPU_BATCHING`), and the k-shot demonstrations every prompt starts with run once per
task and method, their KV cache shared by all rows (`prunepath.scoring`); none of this changes a number
beyond float rounding.

`calibrate` finds the global τ by bisection on real forwards of calibration text (each step runs the
model with that τ, so later layers see the inputs the sparse earlier layers give them), and per-layer τ
by bisection on each layer's own captured inputs.

Shape legend: B sequences, T tokens, L layers.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from prunepath import baselines, results, routing
from prunepath.report import format_knob

METRICS = {"wikitext2": ("perplexity", "next_token_accuracy"), "ifeval": None, "alpaca": None}


# ---------------------------------------------------------------------------------------------------------
# calibration of τ


@torch.no_grad()
def measured_fraction(model, ids: torch.Tensor, batch_size: int = 4) -> float:
    """Mean active FFN fraction over layers and tokens of calibration ids [B, T] under the current rules."""
    device = next(model.parameters()).device
    model.record_stats(True)
    try:
        for s in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[s : s + batch_size].to(device), use_cache=False)
        return model.routing_stats().active_fraction
    finally:
        model.record_stats(False)


def check_target(target: float) -> float:
    """A calibration target: a mean active FFN fraction strictly between 0 and 1."""
    if not 0 < target < 1:
        raise ValueError(f"target active fraction must lie in (0, 1), got {target}; 1 is the dense model (τ > 1)")
    return target


def calibrate_tau(model, ids: torch.Tensor, target: float, tol: float = 0.005, iters: int = 12) -> dict:
    """Global τ (bisection on real forwards) and per-layer τ (on captured inputs) for `target`."""
    check_target(target)
    n_exp = model.prunepath_ffns()[0].n_experts
    if target < 1 / n_exp:
        raise ValueError(
            f"target {target} is below one expert per token (1/{n_exp} = {1 / n_exp:.3f}); "
            "the top-1 expert is always kept"
        )
    saved = [f.rule for f in model.prunepath_ffns()]
    try:

        def frac(t):
            model.set_tau(t)
            return measured_fraction(model, ids)

        # Start from the τ that reaches the target on the dense model's FFN inputs (one forward, then free);
        # sparse earlier layers shift later layers' inputs a little, so refine by bisection on real forwards
        # in a bracket around it.
        calib = baselines.capture(model, ids)
        tau0, _ = baselines.match_knob(model, calib, "prunepath", target)
        got0 = frac(tau0)
        if abs(got0 - target) <= tol:
            tau, got = tau0, got0
        else:
            lo, hi = (tau0, min(1.0, tau0 + 0.15)) if got0 < target else (max(1e-4, tau0 - 0.15), tau0)
            tau, got = baselines.bisect(frac, lo, hi, target, iters=iters, tol=tol)
            if abs(got0 - target) < abs(got - target):
                tau, got = tau0, got0
        layers = baselines.per_layer_taus(model, calib, target)
        model.set_tau([t for t, _ in layers])
        per_layer_measured = measured_fraction(model, ids)
    finally:
        for f, r in zip(model.prunepath_ffns(), saved):
            f.rule = r
    return {
        "target": target,
        "tau": tau,
        "active_fraction": got,
        "tokens": int(ids.numel()),
        "per_layer_tau": [t for t, _ in layers],
        "per_layer_fraction_captured": [v for _, v in layers],
        "per_layer_active_fraction": per_layer_measured,
    }


# ---------------------------------------------------------------------------------------------------------
# the sweep


def _rows(res: dict, method: str, knob, target, static_fraction: float | None, gate: str) -> list[dict]:
    r = res.get("routing") or {}
    q = r.get("experts_kept_p10_p50_p90") or [None] * 3
    frac = static_fraction if static_fraction is not None else r.get("active_fraction", 1.0)
    # classification: accuracy, and balanced accuracy (which shows a model that gives every row one label)
    named = [m for m in ("accuracy", "balanced_accuracy") if m in res["metrics"]]
    metrics = METRICS.get(res["task"]) or named or list(res["metrics"])
    out = []
    for m in metrics:
        out.append(
            {
                "method": method,
                "knob": knob,
                "target_fraction": target,
                "active_fraction": frac,
                "mean_experts": r.get("mean_experts_kept"),
                "task": res["task"],
                "metric": m,
                "value": res["metrics"][m],
                "n": res["n"],
                "protocol": res["protocol"],
                "experts_p10": q[0],
                "experts_p50": q[1],
                "experts_p90": q[2],
                "rule": r.get("rule", "dense") if static_fraction is None else f"{method}:{knob}",
                "dtype": res["meta"].get("dtype"),
                "device": res["meta"].get("device"),
                "date": res["meta"].get("date"),
                "gate": gate,
                "experts_std": r.get("experts_kept_std"),
                "per_layer_fraction": r.get("per_layer_fraction"),
            }
        )
    spread = {k: res.get("settings", {}).get(k) for k in ("demo_sets", "per_set_accuracy", "split_half_accuracy")}
    for row in out if spread["demo_sets"] else ():  # several demonstration sets: how far apart they land
        if row["metric"] == "accuracy":
            row.update(spread)
    return out


class Sweep:
    """Rows accumulate in <out>.json (prunepath.results writes it); finished (method, knob, task) are skipped."""

    def __init__(self, out: str | Path, meta: dict):
        self.out = Path(out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.json = self.out.with_suffix(".json")
        self.rows: list[dict] = []
        self.meta = dict(meta)
        if self.json.is_file():  # resume / extend: keep the rows, the first run's meta, and every run's meta
            old = results.load_sweep(self.json)
            self.rows = old.rows
            self.meta = old.meta or dict(meta)
        self.meta.setdefault("runs", []).append({k: v for k, v in meta.items() if k != "runs"})

    def done(self, method, target, task) -> bool:
        return any(r["method"] == method and r["target_fraction"] == target and r["task"] == task for r in self.rows)

    def add(self, rows: list[dict]) -> None:
        self.rows.extend(rows)
        results.write_sweep(self.json, self.meta, self.rows)


def run_sweep(
    model,
    tok,
    out,
    fractions=(0.25, 0.5, 0.75),
    taus=(),
    methods=baselines.METHODS,
    tasks=("wikitext2",),
    limit=None,
    wt_tokens=4096,
    calib_tokens=2048,
    task_opts=None,
    progress=True,
    meta=None,
    tag: str = "",
) -> Sweep:
    """Evaluate every (method, fraction) and every τ on every task; returns the Sweep with its rows."""
    from prunepath.data import calibration_batches
    from prunepath.evaluate import check_task, evaluate_task

    for t in tasks:
        check_task(t)
    for m in methods:
        if m not in baselines.METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(baselines.METHODS)}")
    for f in fractions:
        if not 0 < f < 1:
            raise ValueError(f"matched fractions must lie in (0, 1), got {f}")
    for t in taus:
        routing.CumulativeMass(t)  # validates τ
    task_opts = task_opts or {}
    gate = model.prunepath_ffns()[0].gate
    sw = Sweep(out, meta or {})
    ids = calibration_batches(tok, calib_tokens, 256, seed=1)  # seed 1: not the training windows (seed 0)
    calib = baselines.capture(model, ids)
    plan = [("dense", None)] if "dense" in methods else []
    plan += [(m, f) for f in fractions for m in methods if m != "dense"]
    plan += [("prunepath-tau", t) for t in taus]
    for method, target in plan:
        todo = [t for t in tasks if not sw.done(method + tag, target, t)]
        if not todo:
            continue
        if method == "prunepath-tau":
            knob, est = target, None
            m = baselines.configure(model, calib, "prunepath", knob)
        elif method == "dense":
            knob, est = None, 1.0
            m = baselines.configure(model, calib, "dense", None)
            m.set_gate("one")  # the base model exactly
        else:
            knob, est = baselines.match_knob(model, calib, method, target)
            m = baselines.configure(model, calib, method, knob)
            if method == "prunepath":  # the adaptive count is the point of the method: keep its distribution
                counts = baselines.expert_counts(model, calib, routing.CumulativeMass(knob))
                dist = baselines.count_distribution(counts, model.prunepath_ffns()[0].n_experts)
                sw.meta.setdefault("expert_counts", {})[f"{target}{tag}"] = {"tau": knob, **dist}
        static = getattr(m, "prunepath_static_fraction", None)
        for task in todo:
            t0 = time.time()
            opts = _batching(model, task, task_opts.get(task, {}))
            limit_t = wt_tokens if task == "wikitext2" else limit
            res = evaluate_task(m, tok, task, limit=limit_t, **opts).to_dict()
            rows = _rows(res, method + tag, knob, target, static, gate)
            for r in rows:
                r["calibrated_fraction"] = est
            sw.add(rows)
            if progress:
                main = rows[0]
                print(
                    f"[{time.time() - t0:6.1f}s] {method:<14} knob={format_knob(knob):<8} "
                    f"frac={main['active_fraction']:.3f} "
                    f"{task}: {main['metric']}={main['value']:.4f}",
                    flush=True,
                )
        if m is model:
            model.set_gate(gate)
        del m
    sw.add([])  # writes the meta (expert-count distributions) even when every row was already done
    return sw


# Batches on a GPU: many rows per forward (the scoring is per row, so the numbers do not change, up to
# float rounding). A CPU gains little from bigger batches and keeps the evaluators' defaults. Greedy
# generation gets 64 prompts per batch on a GPU (4 on a CPU): decoding is launch-bound, so this is ~16x
# faster, and the batch size is recorded with each row because left padding can flip a near-tied token.
GPU_BATCHING = {"lm": {"batch_size": 16}, "nlu": {"batch_size": 1024, "batch_tokens": 131072},
                "gen": {"batch_size": 64}}


def _batching(model, task: str, opts: dict) -> dict:
    """The task's options, with GPU batch sizes where the caller gave none."""
    from prunepath.evaluate import check_task

    if next(model.parameters()).device.type != "cuda":
        return dict(opts)
    return {**GPU_BATCHING[check_task(task)], **opts}


# ---------------------------------------------------------------------------------------------------------
# CLI


def _load(args):
    import prunepath

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model, tok = prunepath.load(args.checkpoint, device=args.device, adapter=args.adapter)
    return model.to(dtype), tok


def _meta(args, model) -> dict:
    import platform

    import transformers

    dev = args.device
    if dev.startswith("cuda") and torch.cuda.is_available():
        dev = torch.cuda.get_device_name()
    return {
        "checkpoint": args.checkpoint,
        "adapter": getattr(model, "prunepath_adapter", None),
        "device": dev,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commands": ["prunepath " + " ".join(sys.argv[1:])],
        "train": getattr(model, "prunepath_train_info", {}),
    }


# Measured on default v4 (26 SST-2 rows, 2026-11-29): a 2-core CPU and an H200 disagree by 2.7 points on average
# and up to 9.6 in bf16, by 0.05 on average and at most 0.46 in fp32 (the sweeps of default v4, results/HISTORY.md).
BF16_PROMPT_WARNING = (
    "prunepath sweep: the prompt protocol in bf16 ranks nothing between sparse methods. Their label-word scores lie "
    "close together and bf16 rounding flips decisions: the same SST-2 rows moved by up to 9.6 points between two "
    "devices in bf16, and by at most 0.46 in fp32. Use --dtype fp32 for classification figures you compare."
)


def run_sweep_cli(args) -> int:
    opts = {
        t: {"protocol": args.protocol, "k": args.shots, "demo_sets": args.demo_sets}
        for t in args.tasks
        if t not in ("wikitext2", "ifeval", "alpaca")
    }
    if opts and args.protocol == "prompt" and args.dtype == "bf16":
        print(BF16_PROMPT_WARNING, file=sys.stderr)
    model, tok = _load(args)
    opts["wikitext2"] = {"context": args.context, "stride": args.context}
    out = Path(args.out) if args.out else results.sweep_path(
        Path(args.checkpoint).name + args.tag, "-".join(args.tasks) + (f"-{args.protocol}" if opts else ""),
        args.device)
    sw = run_sweep(
        model,
        tok,
        out,
        args.fractions,
        args.taus,
        args.methods,
        args.tasks,
        args.limit,
        args.wt_tokens,
        args.calib_tokens,
        opts,
        meta=_meta(args, model),
        tag=args.tag,
    )
    print(f"{len(sw.rows)} rows -> {sw.json}; tables and figures: prunepath report {sw.json}")
    return 0


def run_calibrate(args) -> int:
    from prunepath.checkpoint import save_calibration
    from prunepath.data import calibration_batches

    for t in args.target:  # refuse a bad target before the model loads
        check_target(t)
    model, tok = _load(args)
    ids = calibration_batches(tok, args.calib_tokens, 256, seed=1)
    results = []
    for target in args.target:
        res = calibrate_tau(model, ids, target, tol=args.tol)
        results.append(res)
        if not args.json:
            taus = ", ".join(f"{t:.3f}" for t in res["per_layer_tau"])
            print(
                f"target {res['target']:.3f}: global τ = {res['tau']:.4f} gives active fraction "
                f"{res['active_fraction']:.4f} on {res['tokens']} calibration tokens"
            )
            print(f"per-layer τ: {taus} (active fraction with them: {res['per_layer_active_fraction']:.4f})")
    if args.save:
        info = {
            "adapter": getattr(model, "prunepath_adapter", None) is not None,
            "tokens": int(ids.numel()),
            "source": "calibration text (lm/wiki_demo.txt), 256-token windows, seed 1",
            "dtype": args.dtype,
            "tol": args.tol,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": "prunepath " + " ".join(sys.argv[1:]),
        }
        folder = save_calibration(args.checkpoint, results, info)
        if not args.json:
            print(f"saved to {folder / 'prunepath.json'}: model.set_active_fraction(f) now routes by it")
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="τ sweep and baselines at matched active fraction", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--checkpoint", default="default")
    p.add_argument("--fractions", type=float, nargs="*", default=[0.25, 0.5, 0.75], help="matched active fractions")
    p.add_argument("--taus", type=float, nargs="*", default=[], help="extra τ values for PrunePath alone")
    p.add_argument("--methods", nargs="+", default=list(baselines.METHODS), help=", ".join(baselines.METHODS))
    p.add_argument("--tasks", nargs="+", default=["wikitext2", "sst2"], help="wikitext2 sst2 rte boolq ifeval ...")
    p.add_argument("--limit", type=int, default=200, help="rows per classification / instruction task")
    p.add_argument("--wt-tokens", type=int, default=4096, help="WikiText-2 test tokens (from the start)")
    p.add_argument("--context", type=int, default=512, help="perplexity window (stride = context)")
    p.add_argument("--protocol", default="prompt", help="classification protocol (prompt | probe)")
    p.add_argument("--shots", type=int, default=4, help="demonstrations for the prompt protocol")
    p.add_argument("--demo-sets", type=int, default=1,
                   help="prompt protocol: average this many demonstration sets per row (K times the forwards); "
                        "rows then record each set's accuracy and two split-half ensembles")
    p.add_argument("--out", default=None, help="the sweep's JSON file (default: results/sweeps/"
                   "<checkpoint>_<tasks>-<protocol>_<device>.json); an existing one is resumed and extended")
    p.add_argument("--tag", default="", help="suffix for method names, to add another checkpoint's rows to --out")
    _common(p)
    p.set_defaults(func=run_sweep_cli)

    c = subparsers.add_parser(
        "calibrate",
        help="find τ (global and per layer) for a target active fraction",
        description="Bisection for the τ reaching a target mean active FFN fraction; --save stores it in the "
        "checkpoint, for model.set_active_fraction() and `prunepath eval --fraction`.",
    )
    c.add_argument("--checkpoint", default="default")
    c.add_argument("--target", type=float, nargs="+", required=True, help="mean active FFN fraction(s), e.g. 0.5")
    c.add_argument("--tol", type=float, default=0.005)
    c.add_argument("--json", action="store_true")
    c.add_argument("--save", action="store_true",
                   help="record the τ values in the checkpoint (prunepath.json): model.set_active_fraction uses them")
    _common(c)
    c.set_defaults(func=run_calibrate)


def _common(p) -> None:
    p.add_argument("--no-adapter", dest="adapter", action="store_false",
        help="leave the checkpoint's LoRA adapter out: its routers on the untouched base model")
    p.add_argument("--calib-tokens", type=int, default=2048, help="calibration tokens (lm/wiki_demo.txt)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="bf16 is ~3x faster on recent CPUs; keep fp32 for the prompt protocol, whose sparse-model "
                        "figures bf16 moves by up to 10 points between devices")
