"""`prunepath sweep` and `prunepath calibrate`: the command lines of `evaluate.sweep` and `routing.calibrate`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from prunepath.evaluate import baselines
from prunepath.evaluate.sweep import SweepConfig, _load, _meta, run_sweep
from prunepath.results import sweep_path
from prunepath.routing.calibrate import calibrate_tau, check_target

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
    out = Path(args.out) if args.out else sweep_path(
        Path(args.checkpoint).name + args.tag, "-".join(args.tasks) + (f"-{args.protocol}" if len(opts) > 1 else ""),
        args.device)
    config = SweepConfig(fractions=args.fractions, taus=args.taus, methods=args.methods, tasks=args.tasks,
                         limit=args.limit, wt_tokens=args.wt_tokens, calib_tokens=args.calib_tokens, task_opts=opts,
                         tag=args.tag)
    sw = run_sweep(model, tok, out, config, meta=_meta(args, model))
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
            print(f"saved to {folder / 'prunepath.json'}: set_active_fraction(model, f) now routes by it")
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
        "checkpoint, for set_active_fraction(model) and `prunepath eval --fraction`.",
    )
    c.add_argument("--checkpoint", default="default")
    c.add_argument("--target", type=float, nargs="+", required=True, help="mean active FFN fraction(s), e.g. 0.5")
    c.add_argument("--tol", type=float, default=0.005)
    c.add_argument("--json", action="store_true")
    c.add_argument("--save", action="store_true",
                   help="record the τ values in the checkpoint (prunepath.json), for prunepath.set_active_fraction")
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
