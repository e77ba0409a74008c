"""A LoRA adapter on disk: peft's files, optionally stored as 8-bit rows, and folding it into the weights."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from prunepath.errors import CheckpointError

ADAPTER_FILE = "adapter_model.safetensors"  # peft's


INT8_ADAPTER_FILE = "adapter_model.int8.safetensors"  # ours: a name peft does not read, so it cannot misread it


_INT8 = "int8-rowwise"


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit quantisation per row: t [rows, cols] ≈ q · scale[:, None] -> (q int8, scale float16).

    Each row's largest magnitude maps to ±127, so the error of an entry is at most half a step, 1/254 of its
    row's largest magnitude. A zero row gets scale 0.
    """
    t = t.detach().float()
    amax = t.abs().amax(dim=1)
    scale = (amax / 127).to(torch.float16).float()  # rounded first, so that q is computed with the stored scale
    q = torch.where(scale[:, None] > 0, t / scale.clamp_min(1e-30)[:, None], torch.zeros_like(t))
    return q.round().clamp(-127, 127).to(torch.int8), scale.to(torch.float16)


def write_int8_adapter(folder: str | os.PathLike) -> Path:
    """Re-store the peft adapter in `folder` as 8-bit rows (half the bytes of bf16); peft's file is removed."""
    folder = Path(folder)
    tensors = load_file(folder / ADAPTER_FILE)
    out = {}
    for key, t in tensors.items():
        if t.dim() != 2:
            raise ValueError(f"{key} is not a matrix ({tuple(t.shape)}): only LoRA A/B weights can be stored in 8 bits")
        out[key], out[key + ".scale"] = quantize_rows(t)
    save_file(out, folder / (INT8_ADAPTER_FILE + ".tmp"), metadata={"format": "pt", "prunepath_quant": _INT8})
    os.replace(folder / (INT8_ADAPTER_FILE + ".tmp"), folder / INT8_ADAPTER_FILE)
    (folder / ADAPTER_FILE).unlink()
    return folder / INT8_ADAPTER_FILE


def adapter_file(folder: str | os.PathLike) -> Path:
    """The adapter's weights file in `folder`: peft's, or the 8-bit one.

    Raises CheckpointError if both are there: which one was meant cannot be told (a `git checkout` of an older
    default, say, brings its float file back beside the newer 8-bit one).
    """
    folder = Path(folder)
    int8, plain = folder / INT8_ADAPTER_FILE, folder / ADAPTER_FILE
    if not int8.is_file():
        return plain
    if plain.is_file():
        raise CheckpointError(f"{folder} holds two adapters, {ADAPTER_FILE} and {INT8_ADAPTER_FILE}; remove the one "
                              "you do not mean (adapter_config.json must be the one saved with it)")
    return int8


def adapter_tensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The adapter's tensors in float (peft's key names), de-quantised if they were stored in 8 bits.

    Raises FileNotFoundError if there is none, CheckpointError if it is corrupt.
    """
    path = adapter_file(folder)
    try:
        with safe_open(path, framework="pt") as f:
            quant = (f.metadata() or {}).get("prunepath_quant")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"the adapter in {path.parent} is corrupt ({e}); re-save the checkpoint") from None
    if path.name != INT8_ADAPTER_FILE:
        return tensors
    if quant != _INT8:
        raise CheckpointError(f"{path} is stored as {quant!r}, which this version cannot read (it reads {_INT8!r})")
    out = {}
    for key, q in tensors.items():
        if key.endswith(".scale"):
            continue
        scale = tensors.get(key + ".scale")
        if q.dtype != torch.int8 or scale is None or scale.shape != (q.shape[0],):
            raise CheckpointError(f"{path}: {key} has no matching 8-bit rows and scales; re-save the checkpoint")
        out[key] = q.float() * scale.float()[:, None]
    return out


@contextmanager
def peft_readable(folder: str | os.PathLike, tensors: dict[str, torch.Tensor] | None = None):
    """A folder peft can load the adapter from: `folder` itself, or a float copy of an 8-bit adapter.

    tensors: the adapter's `adapter_tensors`, if the caller has already read them.
    """
    folder = Path(folder)
    if not (folder / INT8_ADAPTER_FILE).is_file():
        yield folder
        return
    tensors = adapter_tensors(folder) if tensors is None else tensors
    with tempfile.TemporaryDirectory(prefix="prunepath-adapter-") as tmp:
        (Path(tmp) / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
        save_file(tensors, Path(tmp) / ADAPTER_FILE)
        yield Path(tmp)


def _merge_adapter(model, folder: Path):
    """Fold a LoRA adapter saved by peft into the weights: W += (lora_alpha / r) · B A per target module.

    Plain LoRA is merged here (no peft import: ~3 s saved on every load); any other adapter kind
    (DoRA, rsLoRA, per-module ranks, extra trained modules, Conv1D layouts) goes through peft.
    """
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        tensors = adapter_tensors(folder)
    except FileNotFoundError as e:
        raise CheckpointError(f"{folder} is incomplete ({e.filename} is missing); re-save the checkpoint") from None
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise CheckpointError(f"the adapter in {folder} is corrupt ({e}); re-save the checkpoint") from None
    plain = (
        cfg.get("peft_type") == "LORA"
        and not cfg.get("use_dora")
        and not cfg.get("use_rslora")
        and not cfg.get("rank_pattern")
        and not cfg.get("alpha_pattern")
        and not cfg.get("modules_to_save")
        and not cfg.get("fan_in_fan_out")
        and not cfg.get("lora_bias")
        and cfg.get("bias", "none") == "none"
    )
    if not plain:
        from peft import PeftModel

        with peft_readable(folder, tensors) as readable:
            return PeftModel.from_pretrained(model, readable).merge_and_unload()
    scale = cfg["lora_alpha"] / cfg["r"]
    modules = dict(model.named_modules())
    prefix, suffix = "base_model.model.", ".lora_A.weight"
    with torch.no_grad():
        for key, a in tensors.items():  # a: [r, in], b: [out, r]
            if not key.endswith(suffix):
                continue
            name = key[len(prefix) : -len(suffix)] if key.startswith(prefix) else key[: -len(suffix)]
            b = tensors.get(key.replace(".lora_A.", ".lora_B."))
            lin = modules.get(name)
            if b is None or lin is None or lin.weight.shape != (b.shape[0], a.shape[1]):
                raise CheckpointError(f"adapter tensor {key} in {folder} does not fit this model; re-train the adapter")
            w = lin.weight
            delta = scale * (b.float() @ a.float())  # on the CPU, where safetensors loaded it
            w.copy_((w.float() + delta.to(w.device)).to(w.dtype))
    return model


LINEAR_LAYERS = {"ffn": ["gate_proj", "up_proj", "down_proj"], "attn": ["q_proj", "k_proj", "v_proj", "o_proj"]}


ADAPTER_DTYPES = ("fp32", "bf16", "int8")  # how save_adapter stores it; training itself stays in fp32


def linear_layer_names(targets: str) -> list[str]:
    """The linear layers a LoRA adapter targets: 'ffn', 'attn' or 'all' (both)."""
    if targets not in ("ffn", "attn", "all"):
        raise ValueError(f"targets must be 'ffn', 'attn' or 'all', got {targets!r}")
    return [n for k in (("ffn", "attn") if targets == "all" else (targets,)) for n in LINEAR_LAYERS[k]]


def save_adapter(peft_model, folder, dtype: str = "fp32") -> None:
    """peft's save_pretrained, the tensors in bf16 or as 8-bit rows when asked (the loaders de-quantise them).

    int8 (`prunepath.adapter.write_int8_adapter`) halves bf16's bytes, so twice the rank fits one file size;
    peft alone cannot read that file, `prunepath.load` and `--continue-adapter` can.
    """
    from prunepath.adapter import INT8_ADAPTER_FILE, write_int8_adapter

    (Path(folder) / INT8_ADAPTER_FILE).unlink(missing_ok=True)  # an earlier save's 8-bit file would shadow this one
    state = None  # peft picks the adapter's tensors out of the state dict it is given
    if dtype == "bf16":
        state = {k: v.to(torch.bfloat16) for k, v in peft_model.state_dict().items() if "lora_" in k}
    peft_model.save_pretrained(folder, state_dict=state)
    if dtype == "int8":
        write_int8_adapter(folder)
