"""Evaluation of any causal LM of transformers — dense, or PrunePath-converted (then every result also
says what the routers did: rule and knob, experts kept per token, active FFN fraction, FFN FLOPs).

Tasks (`evaluate_task`, `prunepath eval --task ...`):
- `wikitext2`: test perplexity with HF's strided sliding window, plus next-token accuracy (here).
- `sst2`, `rte`, `boolq`, `jsonl:PATH?text=F&label=F[&text_pair=F][&labels=W0,W1,...]`, `csv:...`:
  classification accuracy, any number of classes, under a stated protocol — calibrated k-shot label-word
  scoring, or a linear probe (see `prunepath.evaluate.nlu`). The label words are the class names: for a
  file, its label values (0, 1, 2 -> words " 0", " 1", " 2") unless `&labels=` names the classes in the
  order of their values (ints 0..C-1, else sorted); words score better than digits, e.g.
  `&labels=negative,positive`.
- `ifeval`, `alpaca`: instruction following, IFEval scored offline and ROUGE-L (see `prunepath.evaluate.ifeval`).

Every result is an `EvalResult`: metrics, n, protocol, dataset/split, settings, and `routing` — for a
PrunePath model, its routing recorded with `prunepath.record`: the rule, its knob, experts kept per token (mean
and spread), active FFN fraction and FFN FLOPs per token over the evaluated tokens (padding excluded where the
code pads).

Shapes: B batch, T tokens, V vocabulary, C classes, D hidden, N = B*T rows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from prunepath.evaluate.perplexity import perplexity
from prunepath.evaluate.result import EvalResult
from prunepath.routing.control import set_active_fraction, set_rule, set_tau

LM_TASKS = ("wikitext2",)
NLU_TASKS = ("sst2", "rte", "boolq")
GEN_TASKS = ("ifeval", "alpaca")


# ---------------------------------------------------------------------------------------------
# Routing statistics


# ---------------------------------------------------------------------------------------------
# Perplexity


# ---------------------------------------------------------------------------------------------
# One entry point for every task (the sweep calls this), and the CLI


def check_task(task: str) -> str:
    """The task's family ('lm' | 'nlu' | 'gen'), or a ValueError listing what exists."""
    if task in LM_TASKS:
        return "lm"
    if task in NLU_TASKS or task.split(":", 1)[0] in ("jsonl", "json", "csv", "tsv"):
        return "nlu"
    if task in GEN_TASKS:
        return "gen"
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(LM_TASKS + NLU_TASKS + GEN_TASKS)} "
                     "or a labelled file 'jsonl:PATH?text=FIELD&label=FIELD[&text_pair=FIELD]' (also csv:)")


def evaluate_task(model, tokenizer, task: str, limit: int | None = None, **opts) -> EvalResult:
    """Run one task. `limit`: examples (tokens, for wikitext2). Other options go to the task's function:
    perplexity (context, stride, batch_size), nlu.classify (protocol, k, calibrated, seed, pooling,
    n_train, batch_size, demo_sets), ifeval.instruction_eval (max_new_tokens, batch_size)."""
    family = check_task(task)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    needs_lm = family != "nlu" or opts.get("protocol", "prompt") == "prompt"
    if needs_lm and hasattr(model, "can_generate") and not model.can_generate():
        what = "perplexity" if family == "lm" else "generation" if family == "gen" else "label-word scoring"
        raise ValueError(
            f"{type(model).__name__} is not a causal language model (an encoder, or a model loaded without its LM "
            f"head), so {what} cannot run on it. Fix: classify with --protocol probe (the final hidden states), "
            "or evaluate a decoder model"
        )
    if family == "lm":
        from prunepath import data

        return perplexity(model, tokenizer, data.load_lm_text(task, "test"), max_tokens=limit, **opts)
    if family == "nlu":
        from prunepath.evaluate import nlu

        return nlu.classify(model, tokenizer, task, limit=limit, **opts)
    from prunepath.evaluate import ifeval

    return ifeval.instruction_eval(model, tokenizer, task, limit=limit, **opts)


def check_tau(tau: float) -> float:
    if not (math.isfinite(tau) and 0 < tau <= 2):
        hint = f" (did you mean {tau / 100:g}?)" if 2 < tau <= 100 else ""
        raise ValueError(f"τ must be in (0, 2] (τ > 1 keeps every expert), got {tau:g}. Fix: give the share of "
                         f"router probability mass to keep, e.g. --tau 0.9{hint}")
    return tau


def load_for_eval(args):
    """(model, tokenizer) from --checkpoint (PrunePath folder, 'default', 'dense') and/or --model."""
    dense = args.checkpoint == "dense" or (args.model and args.checkpoint is None)
    if dense:
        from prunepath.models import DEFAULT_MODEL, load_model

        if args.tau is not None or args.rule is not None or getattr(args, "fraction", None) is not None:
            raise ValueError("--tau/--rule/--fraction need a PrunePath checkpoint; the dense model has no routers "
                             "(give --checkpoint default or a folder)")
        return load_model(args.model or DEFAULT_MODEL)
    import prunepath

    model, tok = prunepath.load(args.checkpoint or "default", base=args.model, adapter=getattr(args, "adapter", True))
    if args.rule is not None:
        set_rule(model, args.rule)
    if args.tau is not None:
        set_tau(model, args.tau)
    if getattr(args, "fraction", None) is not None:
        set_active_fraction(model, args.fraction)
    return model, tok


def run(args) -> int:
    task_opts = {"lm": ("context", "stride", "batch_size"),
                 "nlu": ("protocol", "k", "calibrated", "seed", "pooling", "n_train", "batch_size", "demo_sets"),
                 "gen": ("max_new_tokens", "batch_size")}[check_task(args.task)]
    if args.tau is not None:
        check_tau(args.tau)
    if args.fraction is not None and (args.tau is not None or args.rule is not None):
        raise ValueError("give one of --tau, --rule or --fraction: --fraction sets a per-layer τ itself")
    if check_task(args.task) == "nlu":  # read the task (labels, fields) before the model: bad input costs nothing
        from prunepath.evaluate import nlu

        nlu.task_splits(args.task, args.seed or 0)
    model, tok = load_for_eval(args)
    opts = {k: getattr(args, k) for k in task_opts if getattr(args, k) is not None}
    res = evaluate_task(model, tok, args.task, limit=args.limit, **opts).to_dict()
    if args.fraction is not None and res.get("routing"):
        res["routing"]["calibrated_fraction"] = args.fraction  # per-layer τ stored in the checkpoint
    if args.out:
        from prunepath.results import write_json

        write_json(args.out, res, indent=2)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{res['task']} ({res['dataset']}/{res['split']}, n={res['n']}) — {res['protocol']}")
    words = (res.get("settings") or {}).get("label_words")
    if words:  # classification: say which classes were scored, so a wrong class count is never silent
        print(f"  {len(words)} classes, label words {', '.join(map(repr, words))}")
        if all(w.strip().lstrip("-").isdigit() for w in words) and "label-word" in res["protocol"]:
            print("  note: the label words are the file's label values; name the classes with "
                  "&labels=WORD,WORD,... in the task spec (words usually score better than digits)", file=sys.stderr)
    for k, v in res["metrics"].items():
        print(f"  {k:<24} {v:.4f}" if isinstance(v, float) else f"  {k:<24} {v}")
    for k in ("per_set_accuracy", "split_half_accuracy"):  # --demo-sets K: the spread between sets
        if (res.get("settings") or {}).get(k):
            print(f"  {k:<24} " + " ".join(f"{a:.4f}" for a in res["settings"][k]))
    r = res["routing"] or {}
    if r.get("rule") != "dense":
        print(f"  routing {r.get('rule')}: {r.get('mean_experts_kept', 0):.1f} experts kept per token, "
              f"active FFN fraction {r.get('active_fraction', 0):.1%}, "
              f"FFN FLOPs/token {r.get('ffn_flops_per_token', 0):.3g}")
    return 0


def add_cli(subparsers) -> None:
    text = "evaluate a dense or PrunePath model: perplexity, classification, instruction following"
    p = subparsers.add_parser("eval", help=text, description=text + ". " + (__doc__ or "").split("\n\n")[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True,
                   help="wikitext2 | sst2 | rte | boolq | ifeval | alpaca | a labelled file "
                   "jsonl:PATH?text=F&label=F[&text_pair=F][&labels=W0,W1,...] (also csv:, tsv:; any number of "
                   "classes; &labels= gives the label words of the classes in order, see above)")
    p.add_argument("--checkpoint", default=None,
                   help="PrunePath folder, 'default', or 'dense' = the base model alone, without routers "
                   "(default: 'default'; 'dense' when only --model is given)")
    p.add_argument("--model", default=None, help="dense model name/path; with --checkpoint, its base model")
    p.add_argument("--no-adapter", dest="adapter", action="store_false",
                   help="leave the checkpoint's LoRA adapter out: its routers on the untouched base model")
    p.add_argument("--tau", type=float, default=None, help="cumulative-mass budget τ (PrunePath models)")
    p.add_argument("--rule", default=None,
                   help="routing rule spec instead, e.g. topk:8, mass-incl:0.9; 'dense' keeps every expert, still "
                   "weighted by its gate (not the base model: that is --checkpoint dense)")
    p.add_argument("--fraction", type=float, default=None,
                   help="route by the checkpoint's stored per-layer τ for this active fraction "
                   "(made by `prunepath calibrate --save`)")
    p.add_argument("--limit", type=int, default=None, help="first N examples (tokens, for wikitext2)")
    p.add_argument("--context", type=int, default=None, help="perplexity window (default 1024)")
    p.add_argument("--stride", type=int, default=None, help="perplexity stride (default 512)")
    p.add_argument("--protocol", default=None, choices=["prompt", "probe"], help="classification protocol")
    p.add_argument("--k", type=int, default=None, help="demonstrations per prompt (default 4)")
    p.add_argument("--no-calibration", dest="calibrated", action="store_const", const=False, default=None,
                   help="skip contextual calibration")
    p.add_argument("--pooling", default=None, choices=["last", "mean"], help="probe features")
    p.add_argument("--n-train", type=int, default=None, help="probe training rows (default 1000)")
    p.add_argument("--seed", type=int, default=None, help="demonstrations / probe subset seed (default 0)")
    p.add_argument("--demo-sets", type=int, default=None,
                   help="prompt protocol: average K demonstration sets (seeds seed..seed+K-1; K times the forwards)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation cap (default 256)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.set_defaults(func=run)
