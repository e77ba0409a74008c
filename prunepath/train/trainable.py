"""Which parameters a training run updates: routers, a LoRA adapter (new or continued) or all weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from prunepath.adapter import linear_layer_names
from prunepath.ffn.module import prunepath_ffns
from prunepath.train.config import TrainConfig


def setup_trainable(model, cfg: TrainConfig):
    """Freeze/unfreeze and (for LoRA) wrap the model; returns (model, param groups)."""
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.trainable == "lora":
        from peft import LoraConfig, get_peft_model

        names = linear_layer_names(cfg.lora.targets)
        if cfg.lora.init:
            model = _continue_lora(model, cfg, names)
        else:
            model = get_peft_model(
                model, LoraConfig(r=cfg.lora.r, lora_alpha=2 * cfg.lora.r, target_modules=names, lora_dropout=0.0)
            )
        backbone = [p for n, p in model.named_parameters() if "lora_" in n]
    elif cfg.trainable == "all":
        backbone = [p for n, p in model.named_parameters() if ".router." not in n]
        for p in backbone:
            p.requires_grad_(True)
    elif cfg.trainable == "linear":
        linear = tuple(f".{m}.weight" for m in linear_layer_names("all"))
        backbone = [p for n, p in model.named_parameters() if n.endswith(linear)]
        for p in backbone:
            p.requires_grad_(True)
    else:
        backbone = []
    routers = [p for f in prunepath_ffns(model) for p in f.router.parameters()]
    for p in routers:
        p.requires_grad_(True)
    groups = [{"params": routers, "lr": cfg.schedule.lr, "weight_decay": cfg.schedule.weight_decay}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.schedule.backbone_lr, "weight_decay": 0.0})
    return model, groups


def _continue_lora(model, cfg: TrainConfig, names: list[str]):
    """Wrap `model` in the saved adapter cfg.lora.init, trainable, on cfg's targets at rank cfg.lora.r.

    A higher rank grows the adapter without changing what it computes: the saved A and B fill the first r₀ rows
    of the new A and columns of the new B, the new B columns start at zero (peft's own init for the new A rows),
    and lora_alpha grows with the rank so the scale α/r stays the saved one.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    from prunepath.adapter import adapter_tensors, peft_readable

    folder = Path(cfg.lora.init)
    saved = json.loads((folder / "adapter_config.json").read_text())
    got_r, got_names = saved.get("r"), sorted(saved.get("target_modules") or [])
    if got_names != sorted(names) or not isinstance(got_r, int) or got_r > cfg.lora.r:
        raise ValueError(
            f"the adapter in {cfg.lora.init} has rank {got_r} on {got_names}; this run asks for rank {cfg.lora.r} "
            f"on {sorted(names)}. Pass its own --lora-targets and a --lora-r of at least {got_r} to train it further"
        )
    if got_r == cfg.lora.r:
        with peft_readable(folder) as readable:  # an 8-bit adapter trains on from its de-quantised values
            return PeftModel.from_pretrained(model, str(readable), is_trainable=True)
    if saved.get("use_dora") or saved.get("use_rslora") or saved.get("rank_pattern") or saved.get("alpha_pattern"):
        raise ValueError(f"the adapter in {cfg.lora.init} is not plain LoRA (DoRA, rsLoRA or per-module ranks); "
                         "its rank cannot grow: train it further at its own --lora-r")
    alpha = saved.get("lora_alpha", 8) * cfg.lora.r / got_r  # peft's default α is 8
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=alpha, target_modules=names, lora_dropout=0.0))
    tensors = adapter_tensors(folder)
    params = dict(model.named_parameters())
    grown = 0
    with torch.no_grad():
        for key, value in tensors.items():  # base_model.model.<module>.lora_A.weight -> ....lora_A.default.weight
            name = key.replace(".weight", ".default.weight")
            p = params.get(name)
            is_a = ".lora_A." in name
            want = None if p is None else (got_r, p.shape[1]) if is_a else (p.shape[0], got_r)  # A [r, in], B [out, r]
            if ".lora_" not in name or value.shape != want:
                raise ValueError(f"adapter tensor {key} in {cfg.lora.init} does not fit this model; re-train it")
            if is_a:
                p[:got_r].copy_(value)
            else:
                p[:, :got_r].copy_(value)
                p[:, got_r:].zero_()
            grown += 1
    if grown != 2 * sum(1 for n in params if n.endswith(".lora_A.default.weight")):
        raise ValueError(f"the adapter in {cfg.lora.init} misses some of its target modules; re-train the adapter")
    return model


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _trainable_state(model) -> dict:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
