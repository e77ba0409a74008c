"""Save and load PrunePath checkpoints.

A checkpoint is a folder:
  prunepath.json        what was converted and how: base model reference and fingerprint, MoefyConfig,
                        each layer's routing rule and gate, training notes, and (after `prunepath calibrate
                        --save`) the global and per-layer τ that reach given active fractions
  prunepath.safetensors neuron permutations and router weights (small: ~2 MB for SmolLM2-135M)
  model.safetensors     only after full fine-tuning: the whole model's weights (never committed)
  adapter/              only after LoRA training: the peft adapter, merged into the weights on load (stored by peft
                        in fp32/bf16, or as 8-bit rows in adapter_model.int8.safetensors, which peft cannot read:
                        `adapter_tensors` and `peft_readable` give it back in float)

The base model's own weights are never copied: `load` rebuilds the model from its reference and
refuses a base whose fingerprint differs from the one the checkpoint was made on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model
from safetensors.torch import load_model as load_safetensors_model

from prunepath.adapter import _merge_adapter
from prunepath.convert import MoefyConfig, moefy
from prunepath.errors import CheckpointError
from prunepath.ffn.module import prunepath_ffns
from prunepath.models import load_model, model_fingerprint, model_reference
from prunepath.routing.control import set_gate, set_rule
from prunepath.routing.rules import parse_rule

FORMAT = "prunepath/1"
DEFAULT_CHECKPOINT = Path(__file__).parent / "checkpoints" / "default"


def save(model, directory: str | os.PathLike, train_info: dict | None = None, full_weights: bool = False) -> Path:
    """Write `model`'s PrunePath state to `directory` (created); returns the folder."""
    ffns = prunepath_ffns(model)
    if not ffns:
        raise ValueError("this model is not converted: call prunepath.moefy(model) first")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for f in ffns:
        tensors[f"layers.{f.layer_idx}.perm"] = f.perm.cpu()
        for k, v in f.router.state_dict().items():
            tensors[f"layers.{f.layer_idx}.router.{k}"] = v.detach().float().cpu().contiguous()
    meta = {
        "format": FORMAT,
        "base": model_reference(model),
        "fingerprint": getattr(model, "prunepath_base_fingerprint", None) or model_fingerprint(model),
        "moefy": model.prunepath_config.to_dict(),
        "layers": [{"rule": f.rule.spec, "gate": f.gate, "experts": f.n_experts} for f in ffns],
        "train": train_info or getattr(model, "prunepath_train_info", None) or {},
        "full_weights": bool(full_weights),
    }
    # Write to temporary names, then rename: an interrupted save never leaves a half-written checkpoint.
    save_file(tensors, out / "prunepath.safetensors.tmp")
    if full_weights:  # save_model writes a tied tensor (e.g. lm_head = embeddings) once
        save_model(model, str(out / "model.safetensors.tmp"))
        os.replace(out / "model.safetensors.tmp", out / "model.safetensors")
    (out / "prunepath.json.tmp").write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(out / "prunepath.safetensors.tmp", out / "prunepath.safetensors")
    os.replace(out / "prunepath.json.tmp", out / "prunepath.json")
    return out


def read_meta(directory: str | os.PathLike) -> dict:
    path = checkpoint_folder(directory) / "prunepath.json"
    if path.parent.is_file():
        raise CheckpointError(
            f"{path.parent} is a file; a checkpoint is a folder (with prunepath.json). Fix: pass the folder, "
            "'default', or make one with `prunepath moefy --out DIR`"
        )
    if not path.parent.exists():
        raise CheckpointError(
            f"checkpoint {path.parent} is missing: no such folder. Fix: check the path, pass 'default' for the "
            "packaged checkpoint, or make one with `prunepath moefy --out DIR` or `prunepath train`"
        )
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path.parent} is not a PrunePath checkpoint (no prunepath.json); make one with `prunepath moefy` "
            "or `prunepath train`, or pass 'default'"
        ) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is corrupt ({e}); re-save the checkpoint") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    return meta


def checkpoint_folder(directory) -> Path:
    """The folder of a checkpoint: "default" is the packaged one."""
    return DEFAULT_CHECKPOINT if str(directory) == "default" else Path(directory)


def load(
    directory: str | os.PathLike = "default",
    base=None,
    device="cpu",
    dtype=torch.float32,
    adapter: bool = True,
    full_weights: bool = True,
):
    """Rebuild a PrunePath model from a checkpoint -> (model, tokenizer).

    base: a model name/path to load instead of the recorded one, or an already loaded (model, tokenizer)
    pair (it is converted in place). Either way its fingerprint must match the checkpoint's.
    adapter: fold the checkpoint's LoRA adapter (<dir>/adapter/) into the weights; False gives the base
    model with the checkpoint's routers only (then all experts with unit gates is exactly the base model).
    full_weights: load a full fine-tune's model.safetensors; False gives the base model under its routers
    (what `prunepath extract-adapter` compares the fine-tune with).
    """
    folder = checkpoint_folder(directory)
    meta = read_meta(folder)
    try:
        tensors = load_file(folder / "prunepath.safetensors")
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has no prunepath.safetensors; the checkpoint is incomplete") from None
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{folder / 'prunepath.safetensors'} is corrupt or truncated ({e}); re-save it") from None
    if isinstance(base, tuple):
        model, tokenizer = base
    else:
        model, tokenizer = load_model(base or meta["base"], dtype=dtype, device=device)
    fp = model_fingerprint(model)
    if meta["fingerprint"] and fp != meta["fingerprint"]:
        raise CheckpointError(
            f"checkpoint {folder} was made on base model {meta['base']!r} (fingerprint {meta['fingerprint']}), "
            f"but the model given has fingerprint {fp} ({_origin(model)}): other weights. Fix: load it with its "
            f"own base model (base=None uses the recorded {meta['base']!r})"
        )
    try:
        config = MoefyConfig.from_dict(meta["moefy"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}/prunepath.json: its conversion settings are not readable ({e})") from None
    n = len(meta["layers"])
    perms = []
    for i in range(n):
        if f"layers.{i}.perm" not in tensors:
            raise CheckpointError(f"{folder}: no permutation for layer {i}; the checkpoint is incomplete")
        perms.append(tensors[f"layers.{i}.perm"])
    _check_expert_size(folder, meta, perms, tensors)
    try:
        moefy(model, config, splits=perms, progress=False)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {folder} does not fit model {_origin(model)}: {e}") from None
    for i, (f, layer) in enumerate(zip(prunepath_ffns(model), meta["layers"])):
        prefix = f"layers.{f.layer_idx}.router."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            f.router.load_state_dict(state)
        except RuntimeError as e:
            cause = " ".join(str(e).split())[:300]
            raise CheckpointError(
                f"the router of layer {f.layer_idx} in {folder} does not fit the one prunepath.json describes "
                f"(router {config.router!r}, {f.n_experts} experts of {config.expert_size}): {cause}. Fix: undo the "
                "edit to prunepath.json, or re-save the checkpoint from the model that made it"
            ) from None
        try:
            set_rule(model, parse_rule(layer["rule"]), layer=i)
            set_gate(model, layer["gate"], layer=i)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{folder}/prunepath.json: layer {i}'s routing is not readable ({e}). Fix: undo "
                                  "the edit, or re-save the checkpoint") from None
    if meta.get("full_weights") and full_weights:
        try:
            load_safetensors_model(model, str(folder / "model.safetensors"))
        except FileNotFoundError:
            raise CheckpointError(f"{folder} records full weights but has no model.safetensors; re-save it") from None
        except (SafetensorError, OSError, RuntimeError) as e:
            msg = f"{folder / 'model.safetensors'} is corrupt or does not fit ({e}); re-save it"
            raise CheckpointError(msg) from None
    merged = adapter and (folder / "adapter").is_dir()
    if merged:
        model = _merge_adapter(model, folder / "adapter")
    model.to(device=device, dtype=dtype)
    model.prunepath_base_fingerprint = fp
    model.prunepath_train_info = meta.get("train", {})
    model.prunepath_checkpoint = str(folder)
    model.prunepath_adapter = str(folder / "adapter") if merged else None  # folded into the weights above
    model.prunepath_calibration = _calibration(meta, folder, merged)
    return model.eval(), tokenizer


def _origin(model) -> str:
    """Where a model came from, for messages; a model built in memory has no reference and that is fine here."""
    ref = getattr(model.config, "prunepath_base", None) or getattr(model.config, "_name_or_path", None)
    return repr(str(ref)) if ref else f"a {type(model).__name__} of unrecorded origin"


def _check_expert_size(folder: Path, meta: dict, perms: list[torch.Tensor], tensors: dict) -> None:
    """The recorded expert size G must split each layer's d_ff into as many experts as its router scores.

    Every router weight has the expert count E as its first dimension ([E, D], [E, E], bias [E]).
    """
    g = meta["moefy"].get("expert_size")
    for i, perm in enumerate(perms):
        d_ff = perm.numel()
        counts = {t.shape[0] for k, t in tensors.items() if k.startswith(f"layers.{i}.router.") and t.dim()}
        if len(counts) != 1:
            continue  # no router tensors (or inconsistent ones): loading the router reports it
        experts = counts.pop()
        if not isinstance(g, int) or g < 1 or d_ff != g * experts:
            right = d_ff // experts if d_ff % experts == 0 else None
            raise CheckpointError(
                f"{folder / 'prunepath.json'} says expert_size {g!r}, but layer {i} has {d_ff} neurons and a router "
                f"over {experts} experts, so its expert size is {right or 'not a whole number'}: the file was edited "
                "or mixes two checkpoints. Fix: "
                + (f"set \"expert_size\": {right} in prunepath.json again, or " if right else "")
                + "convert anew with `prunepath moefy --expert-size G --out DIR` (its routers must then be trained)"
            )


def _calibration(meta: dict, folder: Path, merged: bool) -> dict | None:
    """The stored τ calibration, if it was measured on these weights (with or without the adapter)."""
    cal = meta.get("calibration")
    if not cal:
        return None
    n = len(meta["layers"])
    try:
        targets = {float(k): v for k, v in cal["targets"].items()}
        ok = all(0 < v["tau"] and len(v["per_layer_tau"]) == n for v in targets.values())
    except (KeyError, TypeError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise CheckpointError(
            f"{folder / 'prunepath.json'}: its calibration is corrupt; delete the 'calibration' entry or run "
            f"`prunepath calibrate --checkpoint {folder} --target ... --save` again"
        )
    if bool(cal.get("adapter")) != merged:  # measured on other weights: the τ would miss their targets
        return None
    return {**cal, "targets": targets}


def save_calibration(directory: str | os.PathLike, results: list[dict], info: dict) -> Path:
    """Record `sweep.calibrate_tau` results in a checkpoint's prunepath.json (merged by target).

    info: how they were measured ('adapter': whether the checkpoint's adapter was folded in, 'tokens',
    'source', 'date', ...). Results measured with the other adapter setting replace the old ones.
    """
    folder = checkpoint_folder(directory)
    meta = read_meta(folder)
    old = meta.get("calibration") or {}
    targets = dict(old.get("targets", {})) if bool(old.get("adapter")) == bool(info.get("adapter")) else {}
    for r in results:
        targets[f"{r['target']:g}"] = {
            "tau": r["tau"],
            "active_fraction": r["active_fraction"],
            "per_layer_tau": r["per_layer_tau"],
            "per_layer_active_fraction": r["per_layer_active_fraction"],
        }
    meta["calibration"] = {**info, "targets": dict(sorted(targets.items(), key=lambda kv: float(kv[0])))}
    tmp = folder / "prunepath.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, folder / "prunepath.json")
    return folder


