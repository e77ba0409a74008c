"""`prunepath train`: the command line of prunepath.train (kept apart so the trainer stays readable)."""

from __future__ import annotations

import argparse
from pathlib import Path

from prunepath.train.config import FLAT_FIELDS, TrainConfig
from prunepath.train.trainer import STATE_FILE, TrainingDiverged, TrainingStopped, train
from prunepath.train.trainer import __doc__ as _TRAIN_DOC


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train PrunePath routers (and optionally LoRA / all weights)",
        description=_TRAIN_DOC.split("\n\n")[0],
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="start from this PrunePath checkpoint ('default' or a folder)")
    src.add_argument("--model", default=None, help="convert this base model first (default SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="folder for the checkpoint, train_state.pt and train_log.json")
    p.add_argument("--recipe", choices=["quick"], default=None,
                   help="quick: routers for a new --model in minutes on a CPU (ridge regression of the log expert "
                        "norms, softmax temperature 2, then 15 minutes of router training through the selection, "
                        "per-layer τ calibrated and saved); other training flags do not apply")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out>/train_state.pt with the same flags (--steps may grow before any decay)")
    p.add_argument("--no-adapter", dest="adapter", action="store_false",
                   help="with --checkpoint: start from its routers alone, leaving its LoRA adapter out")
    p.add_argument("--continue-adapter", action="store_true",
                   help="with --checkpoint and --trainable lora: train its LoRA adapter further (same targets; a "
                        "higher --lora-r grows it exactly) instead of refusing a second one; the teacher stays the "
                        "base model")
    d = TrainConfig().flat()
    for name, kind, help_ in (
        (
            "objective",
            str,
            "lm (paper: task loss through gates) | distill (MoEfication-style, frozen backbone)",
        ),
        ("trainable", str, "router | lora | all | linear (all but embeddings and norms)"),
        ("data", str, "calibration | wikitext2 | alpaca | alpaca-chat | chat:FILE | text:FILE | sst2 | rte | "
                      "jsonl:...; a+b mixes, a@N takes N tokens of a"),
        ("tokens", int, "training tokens"),
        ("seq_len", int, "tokens per sequence"),
        ("batch_size", int, "sequences per step"),
        ("stage1_steps", int, "lm: steps at τ=1.05 (all experts)"),
        ("steps", int, "stage-2 steps"),
        ("tau", float, "stage-2 τ"),
        ("gamma", float, "entropy weight γ"),
        ("gamma_lb", float, "load-balance weight γ_lb"),
        ("lr", float, "router learning rate"),
        ("backbone_lr", float, "LoRA / full learning rate"),
        ("decay_steps", int, "the last K steps bring every learning rate linearly down to 0 (0: constant)"),
        ("weight_decay", float, "router weight decay"),
        ("distill_loss", str, "kl | bce"),
        ("distill_power", float, "KL target q ∝ expert norm^power (<1 flattens p)"),
        ("gate", str, "set the gate kind: sigmoid | softmax | one"),
        ("teacher", str, "lm: 'dense' adds KL(dense model || sparse model) to the task loss"),
        ("kd_weight", float, "with --teacher: task = w * KL + (1 - w) * cross-entropy"),
        ("lora_r", int, "LoRA rank"),
        ("lora_targets", str, "ffn | attn | all"),
        ("adapter_dtype", str, "the saved adapter's dtype: fp32 | bf16 (half the file) | int8 (8-bit rows, a quarter; "
                               "only prunepath reads it); training stays fp32"),
        ("seed", int, "random seed"),
        ("save_every", int, "save every K steps"),
        ("keep_every", int, "also keep every K-th step's checkpoint in <out>/step-NNNNNN (0: off)"),
    ):
        p.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=kind,
            default=d[name],
            help=f"{help_} (default {d[name]})",
        )
    p.add_argument("--tau-range", type=float, nargs=2, default=None, metavar=("LO", "HI"), help="sample τ per batch")
    p.add_argument("--device", default="cpu", help="cpu | cuda (bf16 autocast on CUDA)")
    p.add_argument("--amp", action=_BoolFlag, default=None, help="bf16 autocast (--amp / --no-amp)")
    p.add_argument("--router-init", default="centroid", choices=["zero", "centroid"], help="with --model")
    p.add_argument("--expert-size", type=int, default=32, help="with --model")
    p.set_defaults(func=run)


class _BoolFlag(argparse.Action):
    def __init__(self, option_strings, dest, **kw):
        opts = option_strings + [s.replace("--", "--no-") for s in option_strings]
        super().__init__(opts, dest, nargs=0, **kw)

    def __call__(self, parser, ns, values, option_string=None):
        setattr(ns, self.dest, not option_string.startswith("--no-"))


def run(args) -> int:
    import prunepath
    from prunepath.convert import MoefyConfig
    from prunepath.routing.rules import CumulativeMass

    if args.recipe == "quick":
        from prunepath.train.quick import QuickConfig, run_quick

        if args.checkpoint or args.resume:
            raise ValueError("--recipe quick converts a base model: give --model (not --checkpoint or --resume)")
        run_quick(args.model or prunepath.DEFAULT_MODEL, args.out, QuickConfig(seed=args.seed), device=args.device)
        return 0
    cfg = TrainConfig.from_flat({k: v for k, v in vars(args).items() if k in FLAT_FIELDS})
    out = Path(args.out)
    # A resumed run starts from the same source as the interrupted one; train_state.pt restores the rest.
    if args.continue_adapter:
        if not args.checkpoint or not args.adapter or cfg.trainable != "lora":
            raise ValueError("--continue-adapter trains a checkpoint's adapter further: it needs --checkpoint and "
                             "--trainable lora, and contradicts --no-adapter")
        folder = prunepath.checkpoint.checkpoint_folder(args.checkpoint) / "adapter"
        if not folder.is_dir():
            raise ValueError(f"--continue-adapter: {folder.parent} has no adapter/ to continue; train a new one "
                             "with --trainable lora (--no-adapter not needed)")
        cfg = cfg.replace_flat(lora_init=str(folder))
    if args.checkpoint:  # a continued adapter is wrapped by the trainer, so it is not folded in here
        model, tok = prunepath.load(args.checkpoint, device=cfg.device, adapter=args.adapter and not cfg.lora.init)
    else:
        model, tok = prunepath.load_model(args.model or prunepath.DEFAULT_MODEL, device=cfg.device)
        gate = cfg.routing.gate or ("one" if cfg.objective == "distill" else "sigmoid")
        model = prunepath.moefy(
            model,
            MoefyConfig(
                expert_size=args.expert_size,
                router_init=args.router_init,
                rule=CumulativeMass(cfg.routing.tau),
                gate=gate,
                seed=cfg.seed,
            ),
        )
    if not args.resume and (out / STATE_FILE).is_file():
        raise ValueError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    try:
        _, log = train(model, tok, cfg, out, resume=args.resume)
    except TrainingDiverged as e:
        print(f"prunepath train: {e}")
        return 3
    except TrainingStopped as e:
        print(f"prunepath train: stopped by {e}")
        return 4
    print(f"trained {len(log)} steps; final loss {log[-1]['loss']:.4f}; checkpoint in {out}")
    return 0
