"""The `prunepath` command line.

    prunepath moefy  --out ckpt/            convert a model (default: SmolLM2-135M-Instruct) and save it
    prunepath info   --checkpoint default   experts, parameters and FFN FLOPs per layer
    prunepath route  "Some prompt" --tau 0.5 0.9   experts kept per token, as a table
    prunepath train | eval | sweep | calibrate | generate | bench | selfdata | extract-adapter   (see each --help)

Also `python -m prunepath ...`. A model is an alias (smollm2-135m-instruct), a local .gguf file, a
save_pretrained directory or a hub id. "dense" names the base model alone, without routers
(`eval --checkpoint dense`); the routing rule `--rule dense` instead keeps every expert of a PrunePath model,
each still weighted by its router's gate (the base model exactly only with `--gate one`).
Exit status: 0 done, 2 a usage or input error (the message names the cause and the fix), 1 a failure
inside PrunePath (a bug: please report it with PRUNEPATH_DEBUG=1 to show the traceback).

Subcommands from other modules register themselves through their `add_cli(subparsers)`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

# Subcommands other modules contribute through their add_cli(): imported only when chosen, so
# `prunepath --help` and the core commands do not pay for training, evaluation or Triton imports.
_PLUGINS = {
    "train": ("prunepath.train.cli", "train routers (end-to-end objective or distillation)"),
    "eval": ("prunepath.evaluate.tasks", "evaluate a model or checkpoint on a task"),
    "sweep": ("prunepath.evaluate.sweep_cli", "sweep τ and the baselines at matched active fraction"),
    "calibrate": ("prunepath.evaluate.sweep_cli", "find the τ that reaches a target active fraction"),
    "generate": ("prunepath.decode.loop", "generate text with the KV-cache decode loop"),
    "bench": ("prunepath.bench", "benchmarks: split, ffn, decode, explorer"),
    "selfdata": ("prunepath.train.selfdata", "the dense model's own answers to instructions, as training data"),
    "extract-adapter": ("prunepath.train.extract", "a full fine-tune's weight changes as a small LoRA adapter (SVD)"),
    "report": ("prunepath.report", "tables and figures from the results files; the README's results table"),
}


def _load(args) -> tuple:
    """(model, tokenizer) from --checkpoint (a PrunePath folder or 'default') or --model (convert now)."""
    import prunepath

    if getattr(args, "model", None):
        model, tok = prunepath.load_model(args.model)
        return prunepath.moefy(model, _config(args)), tok
    return prunepath.load(args.checkpoint)


def _config(args):
    from prunepath.convert import MoefyConfig
    from prunepath.routing.rules import parse_rule

    return MoefyConfig(
        expert_size=args.expert_size,
        split=args.split,
        router=args.router,
        router_init=args.router_init,
        rule=parse_rule(args.rule),
        gate=args.gate,
        seed=args.seed,
    )


def _add_convert_args(p: argparse.ArgumentParser) -> None:
    from prunepath.routing.gates import GATE_KINDS

    p.add_argument("--expert-size", type=int, default=32, help="neurons per expert G (default 32)")
    p.add_argument("--split", default="kmeans", choices=["kmeans", "coact", "random"])
    p.add_argument("--router", default="linear", choices=["linear", "mlp"])
    p.add_argument(
        "--router-init",
        default="centroid",
        choices=["zero", "centroid"],
        help="zero as the paper (untrained routers then keep experts at random), or cluster centres",
    )
    p.add_argument("--rule", default="mass:0.9",
                   help="routing rule spec, e.g. mass:0.9, mass-incl:0.9, topk:8; 'dense' keeps every expert, still "
                   "weighted by its gate (for the base model without routers use --checkpoint dense in eval)")
    p.add_argument("--gate", default="sigmoid", choices=list(GATE_KINDS))
    p.add_argument("--seed", type=int, default=0)


def cmd_moefy(args) -> int:
    import prunepath
    from prunepath.data import calibration_batches

    model, tok = prunepath.load_model(args.model)
    calib = calibration_batches(tok, args.calib_tokens, 256) if args.split == "coact" else None
    prunepath.moefy(model, _config(args), calib=calib)
    out = prunepath.save(model, args.out)
    ffns = prunepath.prunepath_ffns(model)
    print(f"converted {args.model}: {len(ffns)} layers x {ffns[0].n_experts} experts x {ffns[0].expert_size} neurons")
    print(f"saved to {out}")
    return 0


def cmd_info(args) -> int:
    import prunepath

    model, _ = _load(args)
    ffns = prunepath.prunepath_ffns(model)
    n_params = sum(p.numel() for p in model.parameters())
    ffn_params = sum(p.numel() for f in ffns for n, p in f.named_parameters() if not n.startswith("router"))
    router_params = sum(p.numel() for f in ffns for p in f.router.parameters())
    info = {
        "base": getattr(model.config, "prunepath_base", None) or model.config.name_or_path,
        "layers": len(ffns),
        "experts_per_layer": ffns[0].n_experts,
        "expert_size": ffns[0].expert_size,
        "d_model": ffns[0].d_model,
        "d_ff": ffns[0].d_ff,
        "kind": ffns[0].kind,
        "rule": prunepath.rule_spec(model),
        "gate": ffns[0].gate,
        "parameters": n_params,
        "ffn_parameters": ffn_params,
        "router_parameters": router_params,
        "dense_ffn_flops_per_token": sum(f.flops_per_token(f.n_experts) - 2.0 * f.d_model * f.n_experts for f in ffns),
        "router_flops_per_token": sum(2.0 * f.d_model * f.n_experts for f in ffns),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for k, v in info.items():
            print(
                f"{k:<{width}}  {v:,}"
                if isinstance(v, (int, float)) and not isinstance(v, bool)
                else f"{k:<{width}}  {v}"
            )
    return 0


def route_table(model, tokenizer, prompt: str, taus: list[float]) -> tuple[list[str], dict[float, object]]:
    """Per-token expert counts for `prompt` at each τ -> (token labels, {τ: counts [L, T]}).

    Labels are readable in any script: byte pieces of one character are decoded together (prunepath.tokens).
    """
    import torch

    import prunepath
    from prunepath.tokens import token_texts

    if not prompt.strip():
        raise ValueError("the prompt is empty: give some text to route")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    tokens = [t.label() for t in token_texts(tokenizer, ids[0])]
    out = {}
    for tau in taus:
        prunepath.set_tau(model, tau)
        with prunepath.record(model) as rec, torch.no_grad():
            model(ids)
        out[tau] = rec.stats().counts
    return tokens, out


def cmd_route(args) -> int:
    from prunepath.tokens import display_width, pad

    for t in args.tau:  # checked before the model loads: bad input costs nothing
        if not t > 0:
            raise ValueError(f"τ must be > 0 (got {t}). Fix: give τ in (0, 1] (τ > 1 keeps every expert)")
    import prunepath

    model, tok = _load(args)
    tokens, counts = route_table(model, tok, args.prompt, args.tau)
    e = prunepath.prunepath_ffns(model)[0].n_experts
    width = max(16, *map(display_width, tokens))
    head = f"{'#':>3}  {pad('token', width)}" + "".join(f"  τ={t:<5} mean/min/max" for t in args.tau)
    print(f"experts kept per token (of {e} per layer; mean/min/max over {counts[args.tau[0]].shape[0]} layers)")
    if any(" 1/" in tk for tk in tokens):
        print("'x' k/n: the k-th of n tokens that each hold some of the bytes of the text x")
    print(head)
    for i, tk in enumerate(tokens):
        cells = "".join(
            f"  {c[:, i].float().mean():11.1f}/{int(c[:, i].min()):>2}/{int(c[:, i].max()):>2}" for c in counts.values()
        )
        print(f"{i:>3}  {pad(tk, width)}{cells}")
    for t, c in counts.items():
        print(f"τ={t}: mean experts kept {c.float().mean():.1f} of {e}, active FFN fraction {c.float().mean() / e:.1%}")
    return 0


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prunepath", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser(
        "moefy",
        help="convert a model into experts + routers and save a checkpoint",
        description="Split every FFN into experts, attach routers and save the PrunePath checkpoint.",
    )
    m.add_argument("--model", default="smollm2-135m-instruct",
                   help="alias, local .gguf file, save_pretrained directory or hub id")
    m.add_argument("--out", required=True, help="checkpoint folder to write")
    m.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens for --split coact")
    _add_convert_args(m)
    m.set_defaults(func=cmd_moefy)

    for name, fn, text in (
        ("info", cmd_info, "experts, parameter and FLOP counts"),
        ("route", cmd_route, "experts kept per token for a prompt at one or more τ"),
    ):
        q = sub.add_parser(name, help=text, description=text)
        src = q.add_mutually_exclusive_group()
        src.add_argument("--checkpoint", default="default", help="PrunePath checkpoint folder or 'default'")
        src.add_argument("--model", help="convert this model (alias, .gguf file, directory or hub id) on the fly "
                         "instead (untrained routers)")
        _add_convert_args(q)
        if name == "route":
            q.add_argument("prompt", help="text to route")
            q.add_argument("--tau", type=float, nargs="+", default=[0.5, 0.9], help="one or more τ (default 0.5 0.9)")
        else:
            q.add_argument("--json", action="store_true", help="print JSON")
        q.set_defaults(func=fn)

    chosen = next((a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("-")), None)
    if chosen in _PLUGINS:
        importlib.import_module(_PLUGINS[chosen][0]).add_cli(sub)  # registers it (and maybe its siblings)
    for name, (_, text) in _PLUGINS.items():
        if name not in sub.choices:  # listed in --help without importing the module behind it
            sub.add_parser(name, help=text, description=f"{text} (run `prunepath {name} --help`)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0 done, 2 a user's error: see the module docstring)."""
    args = build_parser(argv).parse_args(argv)  # argparse itself exits with 2 on a bad command line
    try:
        return args.func(args) or 0
    except SystemExit as e:
        if not isinstance(e.code, str):  # a command's own exit status (or argparse's)
            raise
        message = e.code.removeprefix("error: ")  # a command refusing its input in words: a user's error
    except (ValueError, OSError, RuntimeError) as e:  # OSError: a path that is missing, unreadable or unwritable
        # Bad input gets one clear line, not a traceback; PRUNEPATH_DEBUG=1 shows the traceback.
        import os

        if os.environ.get("PRUNEPATH_DEBUG"):
            raise
        message = str(e)
        if isinstance(e, OSError) and e.filename and e.strerror:  # the bare "[Errno 2] ..." names no fix
            message = f"{e.filename}: {e.strerror}. Fix: check the path, and that you may read or write there"
    print(f"prunepath {args.command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
