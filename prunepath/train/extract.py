"""A full fine-tune made small: each linear layer's weight change as a LoRA adapter, truncated by SVD.

`prunepath train --trainable all` trains every backbone weight (`linear`: those of the linear layers) and saves all
of them (`model.safetensors`, 540 MB for SmolLM2-135M, never committed). `extract_adapter` compares such a
checkpoint with its own base model (the same neuron permutations and routers) and writes, for every target linear
layer, the best rank-r approximation of ΔW = W_fine-tuned − W_base in the Frobenius norm (Eckart–Young):

    ΔW ≈ (U_r S_r^½)(S_r^½ V_rᵀ) = B A        B: [out, r], A: [r, in]

as a plain peft LoRA adapter (lora_alpha = r, so the scale is 1) in a new PrunePath checkpoint that
`prunepath.load` folds in and `prunepath train --continue-adapter` can train further. What LoRA cannot hold
(embeddings, norms, biases, linear layers outside the targets) keeps its base value; the report says how far
each had moved, and how much of each target's change the rank kept. `--trainable linear` trains only what LoRA can
carry.

Instead of one rank, a size budget (`--size-mb`) gives each layer kind (gate/up/down, q/k/v/o) its own rank: the
ranks that keep the most of Σ‖ΔW‖²_F, the total squared error of the approximation, within the budget (greedy over
the kinds' summed singular values, per byte). peft stores them as a rank pattern.

The Frobenius norm weighs every input direction alike, but a layer's inputs are far from isotropic: what matters is
the change of its outputs, ‖ΔW X‖ over real inputs X. `--whiten` runs the fine-tuned model on calibration text
(at several τ, as it was trained), collects each target layer's input second moment G = E[x xᵀ] = S Sᵀ and keeps
the best rank-r approximation of ΔW S instead (the data-whitened truncation of SVD-LLM, Wang et al. 2024):

    ΔW S ≈ U_r Σ_r V_rᵀ   →   B A = U_r Σ_r V_rᵀ S⁻¹,   the rank-r minimiser of ‖(ΔW − B A) X‖_F

with S = Q Λ^½ from G's eigendecomposition, its eigenvalues floored at `damp` × their mean (inputs the
calibration never showed keep a little weight). The report then also gives the share of the output change kept.
On the default model it kept about twice the plain truncation's share of a fine-tune's gain, in the same bytes.
`--fisher` weighs the outputs too, by the calibration loss's gradients there (g = ∂L/∂y, L the next-token
cross-entropy): with Γ = E[g gᵀ] = T Tᵀ it truncates Tᵀ ΔW S, the rank-r minimiser of tr(Rᵀ Γ R G), R = ΔW − B A,
which is the second-order loss change under the Kronecker-factored Fisher Γ ⊗ G (K-FAC; the two-sided weighting of
GFWSVD, Chekalina et al. 2025, and IO-SVD, Abbasi et al. 2026). An output direction the loss does not feel costs
nothing to drop, one it feels strongly costs more than its energy says.
`--adapter-dtype int8` stores the factors' rows in 8 bits (`prunepath.adapter.quantize_rows`): twice bf16's
rank in the same file size.

    prunepath extract-adapter --checkpoint ft/ --rank 24 --adapter-dtype bf16 --out small/
    prunepath extract-adapter --checkpoint ft/ --size-mb 16 --out small/       # ranks per layer kind
    prunepath extract-adapter --checkpoint ft/ --rank 24 --whiten --device cuda --out small/  # by output change
    prunepath extract-adapter --checkpoint ft/ --rank 48 --whiten --adapter-dtype int8 --out small/  # 8-bit rows
    prunepath extract-adapter --checkpoint ft/ --rank 48 --whiten --fisher --adapter-dtype int8 --out small/  # by loss
    prunepath calibrate --checkpoint small/ --target 0.25 0.5 0.75 --save     # the τ moved with the weights
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from prunepath.adapter import ADAPTER_DTYPES, adapter_file, linear_layer_names, save_adapter
from prunepath.checkpoint import checkpoint_folder, load, read_meta, save
from prunepath.errors import CheckpointError
from prunepath.train.lowrank import (
    WHITEN_SEQ_LEN,
    WHITEN_TAUS,
    allocate_ranks,
    fine_tuned_grams,
    low_rank,
    output_kept,
    whitened_low_rank,
    whitening,
)


def extract_adapter(
    finetuned: str | os.PathLike,
    out: str | os.PathLike,
    rank: int | None = None,
    targets: str = "all",
    adapter_dtype: str = "bf16",
    base=None,
    size_mb: float | None = None,
    whiten: int | torch.Tensor | None = None,
    taus: tuple[float, ...] = WHITEN_TAUS,
    damp: float = 0.01,
    device: str = "cpu",
    fisher: float | None = None,
) -> dict:
    """Write `finetuned`'s weight changes as a LoRA adapter in a new checkpoint `out` -> report.

    finetuned: a checkpoint saved by `prunepath train --trainable linear` or `all` (it records full weights).
    rank: the rank of every target layer; or size_mb: the adapter file's size, with one rank per layer kind
    chosen to keep the most of Σ‖ΔW‖² (`allocate_ranks`). Give exactly one.
    base: as in `prunepath.load` (a name/path, or a loaded (model, tokenizer) pair, converted in place).
    whiten: calibration tokens (a count, or ids [B, T]): keep what changes each layer's outputs most on the
    fine-tuned model's inputs there (at each global τ of `taus`, averaged; `input_grams`, `whitened_low_rank`,
    eigenvalue floor `damp`), instead of what changes its weights most. device: where that forward runs.
    fisher: with whiten, also weigh each layer's outputs by the calibration loss's gradients there (`gradient_grams`,
    `whitened_low_rank`'s out_white; the value is that side's eigenvalue floor, × the mean): keep what changes the
    loss most (the K-FAC Fisher), not what changes the outputs most.
    The report (also stored in `out`/prunepath.json under train → extract): per target kind, the relative
    change ‖ΔW‖/‖W‖ and the share of ‖ΔW‖² the rank kept; every other parameter that moved, with its
    relative change (those are left at their base values).
    """
    from peft import LoraConfig, get_peft_model

    if (rank is None) == (size_mb is None):
        raise ValueError("give either a rank (--rank) or a size budget (--size-mb), not both and not neither")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if size_mb is not None and not size_mb > 0:
        raise ValueError(f"size_mb must be > 0, got {size_mb!r}")
    if adapter_dtype not in ADAPTER_DTYPES:
        raise ValueError(f"adapter_dtype must be one of {ADAPTER_DTYPES}, got {adapter_dtype!r}")
    if whiten is not None:
        count = isinstance(whiten, int) and not isinstance(whiten, bool) and whiten >= WHITEN_SEQ_LEN
        if not count and not (isinstance(whiten, torch.Tensor) and whiten.dim() == 2 and whiten.numel() > 0):
            raise ValueError(f"whiten must be a number of calibration tokens (>= {WHITEN_SEQ_LEN}) or token ids "
                             f"[batch, tokens], got {whiten!r}")
        if not taus or not all(t > 0 for t in taus):
            raise ValueError(f"taus must be one or more values > 0 (> 1 is dense), got {taus!r}")
        if not damp > 0:
            raise ValueError(f"damp must be > 0, got {damp!r}")
    if fisher is not None:
        if whiten is None:
            raise ValueError("fisher weighs the whitened truncation by the loss's gradients: give whiten too")
        if not fisher > 0:
            raise ValueError(f"fisher (the gradient side's eigenvalue floor) must be > 0, got {fisher!r}")
    names = linear_layer_names(targets)
    out = Path(out)
    if (out / "prunepath.json").exists() or (out / "adapter").exists():
        raise FileExistsError(f"{out} already holds a checkpoint; choose another --out")
    folder = checkpoint_folder(finetuned)
    meta = read_meta(folder)
    if not meta.get("full_weights"):
        raise ValueError(
            f"{folder} is not a full fine-tune (its prunepath.json records no full weights): there is nothing to "
            "extract. Train one with `prunepath train --trainable all`; a LoRA checkpoint's adapter/ is already small"
        )
    try:
        tuned = load_file(folder / "model.safetensors")
    except FileNotFoundError:
        raise CheckpointError(f"{folder} records full weights but has no model.safetensors; re-save it") from None
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{folder / 'model.safetensors'} is corrupt or truncated ({e}); re-save it") from None

    grams = {}
    if whiten is not None:  # the fine-tuned model's inputs, first: loading `base` below converts it in place
        tuned_base = (copy.deepcopy(base[0]), base[1]) if isinstance(base, tuple) else base
        grams, grads, grams_tokens = fine_tuned_grams(folder, tuned_base, whiten, names, taus, device,
                                                      gradients=fisher is not None)
    model, _ = load(folder, base=base, full_weights=False)  # the base model under the fine-tune's routers
    modules = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in names}
    if not modules:
        raise CheckpointError(f"the model of {folder} has none of the target layers {names}")
    aliases: dict[int, list[str]] = {}  # a tied tensor (lm_head = embed_tokens) is saved under one of its names
    for pname, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(pname)
    deltas, moved = {}, {}
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if ".router." in pname:  # the fine-tune's routers are in its prunepath.safetensors, loaded above
                continue
            saved = next((n for n in aliases[id(p)] if n in tuned), None)
            if saved is None:
                raise CheckpointError(f"{folder / 'model.safetensors'} has no {pname}; re-save the fine-tune")
            new = tuned[saved]
            if new.shape != p.shape:
                raise CheckpointError(f"{folder / 'model.safetensors'}: {pname} is {tuple(new.shape)}, the base "
                                      f"model's {tuple(p.shape)}; the fine-tune was made on another model")
            delta = new.float() - p.float()
            module = pname[: -len(".weight")] if pname.endswith(".weight") else None
            if module in modules:
                deltas[module] = (delta, float(p.float().norm() ** 2))
            elif delta.any():
                moved[pname] = float(delta.norm() / p.float().norm().clamp_min(1e-12))

    missing = set(deltas) - set(grams) if grams else set()
    if missing:
        raise CheckpointError(f"the fine-tuned model of {folder} never called {sorted(missing)[:3]} on the "
                              "calibration text, so their inputs are unknown; extract without --whiten")
    white = {m: whitening(g, damp) for m, g in grams.items() if m in deltas}
    if fisher is not None and set(white) - set(grads):
        raise CheckpointError(f"no gradient reached {sorted(set(white) - set(grads))[:3]} on the calibration text, so "
                              "their outputs cannot be weighed; extract without --fisher")
    out_white = {m: whitening(grads[m], fisher) for m in white} if fisher is not None else {}

    def target_of(m):  # the matrix whose best truncation is wanted: ΔW, ΔW S when whitened, Tᵀ ΔW S with fisher
        delta = deltas[m][0]
        if not white:
            return delta
        return out_white[m][0].T @ (delta @ white[m][0]) if out_white else delta @ white[m][0]

    kind_of = {m: m.rsplit(".", 1)[-1] for m in deltas}
    if size_mb is None:
        ranks = dict.fromkeys(kind_of.values(), rank)
    else:
        # bytes: each rank costs (out + in) entries per matrix; int8 adds a float16 scale per row of A (one a
        # rank) and one per row of B (fixed, whatever the rank)
        per_entry, int8 = {"fp32": 4, "bf16": 2, "int8": 1}[adapter_dtype], adapter_dtype == "int8"
        spectra, cost, fixed = {}, {}, 0
        for m, (delta, _) in deltas.items():
            spectra.setdefault(kind_of[m], []).append(torch.linalg.svdvals(target_of(m)))
            cost[kind_of[m]] = cost.get(kind_of[m], 0) + per_entry * sum(delta.shape) + 2 * int8
            fixed += 2 * delta.shape[0] * int8
        ranks = allocate_ranks(spectra, cost, int(size_mb * 1e6) - fixed)
        if not any(ranks.values()):
            raise ValueError(f"{size_mb} MB holds not one rank of any target layer; give a larger --size-mb")
    factors, kinds = {}, {}
    for m, (delta, weight) in deltas.items():
        kind = kind_of[m]
        k = kinds.setdefault(kind, {"delta": 0.0, "weight": 0.0, "kept": 0.0, "output": 0.0, "output_kept": 0.0,
                                    "loss": 0.0, "loss_kept": 0.0})
        energy = float(delta.norm() ** 2)
        k["delta"], k["weight"] = k["delta"] + energy, k["weight"] + weight
        out_energy = float((delta @ white[m][0]).norm() ** 2) if white else 0.0
        loss_energy = float(target_of(m).norm() ** 2) if out_white else 0.0
        k["output"] += out_energy
        k["loss"] += loss_energy
        if ranks[kind]:
            if white:
                b, a, kept, target_kept = whitened_low_rank(delta, white[m], ranks[kind], out_white.get(m))
                # without fisher the truncation's own kept share is the output change kept (Eckart–Young)
                out_kept = output_kept(delta, b, a, white[m][0]) if out_white else target_kept
                k["output_kept"] += out_kept * out_energy
                k["loss_kept"] += target_kept * loss_energy
            else:
                b, a, kept = low_rank(delta, ranks[kind])
            factors[m] = (b, a)
            k["kept"] += kept * energy
    report = {
        "rank": {k: ranks[k] for k in names if k in ranks},
        "targets": [k for k in names if ranks.get(k)],
        "adapter_dtype": adapter_dtype,
        "from": str(folder),
        "change": {k: (v["delta"] / v["weight"]) ** 0.5 for k, v in kinds.items()},
        "kept": {k: v["kept"] / v["delta"] if v["delta"] > 0 else 1.0 for k, v in kinds.items()},
        "not_carried": dict(sorted(moved.items(), key=lambda kv: -kv[1])),
    }
    if white:
        report["output_kept"] = {k: v["output_kept"] / v["output"] if v["output"] > 0 else 1.0
                                 for k, v in kinds.items()}
        report["whiten"] = {"tokens": grams_tokens, "taus": [float(t) for t in taus], "damp": damp}
    if out_white:
        report["loss_kept"] = {k: v["loss_kept"] / v["loss"] if v["loss"] > 0 else 1.0 for k, v in kinds.items()}
        report["whiten"]["fisher"] = fisher

    top = max(ranks.values())
    pattern = {k: r for k, r in ranks.items() if r and r != top}  # peft matches these against each layer's name
    config = LoraConfig(r=top, lora_alpha=top, target_modules=report["targets"], lora_dropout=0.0,
                        rank_pattern=pattern, alpha_pattern=pattern)
    peft_model = get_peft_model(model, config)
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for module, (b, a) in factors.items():
            params[f"base_model.model.{module}.lora_A.default.weight"].copy_(a)
            params[f"base_model.model.{module}.lora_B.default.weight"].copy_(b)
    out.mkdir(parents=True, exist_ok=True)
    save_adapter(peft_model, out / "adapter", adapter_dtype)
    report["adapter_bytes"] = adapter_file(out / "adapter").stat().st_size
    ft = dict(meta.get("train") or {})
    info = {"objective": "extract-adapter", "trainable": "lora", "extract": report,
            "previous": ft.pop("previous", []) + ([ft] if ft else [])}
    save(peft_model.get_base_model(), out, train_info=info)  # prunepath.json last: the checkpoint is whole
    return report


def format_report(report: dict) -> str:
    out_kept, loss_kept = report.get("output_kept"), report.get("loss_kept")
    lines = [f"adapter ({report['adapter_dtype']}, {report['adapter_bytes'] / 1e6:.1f} MB) from {report['from']}",
             f"{'layer':<10} {'rank':>5} {'‖ΔW‖/‖W‖':>10} {'‖ΔW‖² kept':>11}"
             + (" output change kept" if out_kept else "") + (" loss-weighted kept" if loss_kept else "")]
    for k, r in report["rank"].items():
        line = f"{k:<10} {r:>5} {report['change'][k]:>10.4f} {report['kept'][k]:>11.1%}"
        line += f" {out_kept[k]:>18.1%}" if out_kept else ""
        lines.append(line + (f" {loss_kept[k]:>18.1%}" if loss_kept else ""))
    if out_kept:
        w = report["whiten"]
        lines.append(f"whitened by the inputs of {w['tokens']:,} calibration tokens at τ = "
                     f"{', '.join(f'{t:g}' for t in w['taus'])} (eigenvalue floor {w['damp']:g} × mean)"
                     + (f", outputs weighted by the loss's gradients (floor {w['fisher']:g} × mean)"
                        if "fisher" in w else ""))
    moved = report["not_carried"]
    if moved:
        top = ", ".join(f"{n} {c:.2e}" for n, c in list(moved.items())[:3])
        lines.append(f"not carried (left at the base value): {len(moved)} tensors moved, most: {top}")
    return "\n".join(lines)


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "extract-adapter",
        help="a full fine-tune's weight changes as a small LoRA adapter (truncated SVD)",
        description=__doc__.split("\n\n")[0].rstrip(".")
        + ". The τ calibration does not carry over: calibrate the result.",
    )
    p.add_argument(
        "--checkpoint", required=True, help="a checkpoint of `prunepath train --trainable linear` (or `all`)"
    )
    p.add_argument("--out", required=True, help="the new checkpoint's folder (routers + adapter/)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="LoRA rank r of every target layer")
    size.add_argument("--size-mb", type=float, help="the adapter's size; ranks per layer kind keep the most of ΔW")
    p.add_argument("--targets", default="all", choices=["ffn", "attn", "all"], help="layers to carry (default all)")
    p.add_argument("--adapter-dtype", default="bf16", choices=list(ADAPTER_DTYPES),
                   help="the saved adapter's dtype (int8: 8-bit rows, twice bf16's rank in the same bytes)")
    p.add_argument("--whiten", type=int, nargs="?", const=131072, default=None, metavar="TOKENS",
                   help="keep what changes the layers' outputs most on TOKENS of calibration text "
                        "(lm/wiki_demo.txt; default 131072), not what changes their weights most")
    p.add_argument("--whiten-tau", type=float, nargs="+", default=list(WHITEN_TAUS),
                   help="global τ at which the inputs are collected, averaged (default "
                        + " ".join(map(str, WHITEN_TAUS)) + ")")
    p.add_argument("--damp", type=float, default=0.01, help="floor of the inputs' eigenvalues, × their mean")
    p.add_argument("--fisher", type=float, nargs="?", const=0.01, default=None, metavar="DAMP",
                   help="with --whiten: also weigh each layer's outputs by the calibration loss's gradients (K-FAC "
                        "Fisher), keeping what changes the loss most; DAMP floors their eigenvalues (default 0.01)")
    p.add_argument("--device", default="cpu", help="where --whiten's forward passes run (cpu | cuda)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_run)


def _run(args) -> int:
    report = extract_adapter(args.checkpoint, args.out, args.rank, args.targets, args.adapter_dtype,
                             size_mb=args.size_mb, whiten=args.whiten, taus=tuple(args.whiten_tau), damp=args.damp,
                             device=args.device, fisher=args.fisher)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    print(f"saved to {args.out}; calibrate it: "
          f"prunepath calibrate --checkpoint {args.out} --target 0.25 0.5 0.75 --save")
    return 0
