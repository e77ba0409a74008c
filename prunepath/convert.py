"""Convert a pretrained transformers model into a PrunePath model ("MoEfy" it).

Shape legend: L layers, N rows (= B*T tokens), D hidden, F ffn, E experts, G expert size.

`moefy(model)` finds every FFN by structure, splits its neurons into experts (`ffn.split`), builds a router
(`routing.router`) and substitutes a `PrunePathFFN` module for the FFN. Nothing else changes: the model
keeps its class, so `generate()`, `save_pretrained`, peft, `torch.save(model)`, pickling and
`copy.deepcopy(model)` all work as for the base model. Routing is set with the functions of
`prunepath.routing.control` (`prunepath.set_tau(model, 0.7)`, ...) and recorded with
`prunepath.record(model)`; the conversion's config is `model.prunepath_config`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from prunepath.ffn.discover import FFNSpec, find_ffns
from prunepath.ffn.module import PrunePathFFN, build_ffn
from prunepath.ffn.split import Split, split_neurons
from prunepath.models import model_fingerprint
from prunepath.routing.gates import GateKind, check_gate
from prunepath.routing.rules import CumulativeMass, Rule, check_rule, parse_rule


@dataclass(frozen=True)
class MoefyConfig:
    """How a model is converted. Saved with every checkpoint (`to_dict` / `from_dict`)."""

    expert_size: int = 32
    split: str = "kmeans"  # kmeans | coact | random
    router: str = "linear"  # linear | mlp
    router_init: str = "centroid"  # centroid (ours: an untrained router already ranks experts) | zero (the paper)
    rule: Rule = CumulativeMass(0.9)  # the initial routing rule of every layer
    gate: GateKind = "sigmoid"  # sigmoid (the paper) | softmax | one
    seed: int = 0

    def __post_init__(self):
        if self.split not in ("kmeans", "coact", "random"):
            raise ValueError(f"split must be 'kmeans', 'coact' or 'random', got {self.split!r}")
        if self.router not in ("linear", "mlp"):
            raise ValueError(f"router must be 'linear' or 'mlp', got {self.router!r}")
        check_gate(self.gate)
        check_rule(self.rule)

    def to_dict(self) -> dict:
        """JSON-ready: the rule as its spec string (the checkpoint file format)."""
        return {**asdict(self), "rule": self.rule.spec}

    @classmethod
    def from_dict(cls, d: dict) -> MoefyConfig:
        return cls(**{**d, "rule": parse_rule(d["rule"])})


def ffn_keys(model: nn.Module, spec: FFNSpec) -> torch.Tensor:
    """The vectors neurons are clustered by: rows of W_gate (gated) or W_in (two-layer).  # [F, D]"""
    lin = getattr(model.get_submodule(spec.path), spec.names[0])
    w = lin.weight.detach()
    return w.t() if isinstance(lin, Conv1D) else w  # GPT-2's Conv1D stores its weight as [in, out]


@torch.no_grad()
def ffn_activations(model: nn.Module, specs: list[FFNSpec], calib: torch.Tensor) -> list[torch.Tensor]:
    """Intermediate activations of every FFN on calibration tokens calib [B, T].  # L x [N, F]"""
    acts: list[list[torch.Tensor]] = [[] for _ in specs]
    hooks = []
    for i, s in enumerate(specs):
        m = model.get_submodule(s.path)
        down = getattr(m, s.names[-1]) if s.kind != "intermediate" else model.get_submodule(s.out_path)
        hooks.append(
            down.register_forward_pre_hook(
                lambda _m, a, i=i: acts[i].append(a[0].reshape(-1, a[0].shape[-1]).float().cpu())
            )
        )
    try:
        for row in calib:
            model(row[None].to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(a) for a in acts]


def moefy(
    model: nn.Module,
    config: MoefyConfig = MoefyConfig(),
    calib: torch.Tensor | None = None,
    splits: list[Split] | list[torch.Tensor] | None = None,
    progress: bool = True,
) -> nn.Module:
    """Convert `model` in place and return it.

    calib [B, T]: calibration token ids (needed by the co-activation split).
    splits: precomputed permutations (one per layer), e.g. from a checkpoint; skips clustering.
    """
    if any(isinstance(m, PrunePathFFN) for m in model.modules()):
        raise ValueError("this model is already converted by PrunePath; load the base model to convert again")
    specs = find_ffns(model)
    if splits is not None and len(splits) != len(specs):
        raise ValueError(f"got {len(splits)} splits for a model with {len(specs)} FFN layers")
    if config.split == "coact" and splits is None:
        if calib is None:
            raise ValueError("split='coact' needs calibration tokens: pass calib=data.calibration_batches(tok, ...)")
        acts = ffn_activations(model, specs, calib)
    rule = config.rule
    base_fp = getattr(model, "prunepath_base_fingerprint", None) or model_fingerprint(model)
    for s in tqdm(specs, desc="moefy", disable=not progress):
        if splits is not None:
            sp = splits[s.layer_idx]
            perm, centroids = (sp.perm, sp.centroids) if isinstance(sp, Split) else (sp, None)
            if perm.numel() != s.d_ff or s.d_ff % config.expert_size:
                raise ValueError(
                    f"layer {s.layer_idx}: permutation of {perm.numel()} neurons with expert size "
                    f"{config.expert_size} does not fit this model's d_ff {s.d_ff}"
                )
        else:
            sp = split_neurons(
                ffn_keys(model, s).float().cpu(),
                config.expert_size,
                config.split,
                seed=config.seed + s.layer_idx,
                activations=acts[s.layer_idx] if config.split == "coact" else None,
            )
            perm, centroids = sp.perm, sp.centroids
        if centroids is None and config.router_init == "centroid":
            centroids = _centroids(ffn_keys(model, s).float().cpu(), perm, config.expert_size)
        ffn = build_ffn(
            model, s, perm, config.expert_size, config.router, config.router_init, centroids, rule, config.gate
        )
        parent, _, name = s.path.rpartition(".")
        setattr(model.get_submodule(parent), name, ffn)
    model.prunepath_config = config
    model.prunepath_base_fingerprint = base_fp  # the weights are permuted now: remember the base's
    return model


def _centroids(keys: torch.Tensor, perm: torch.Tensor, g: int) -> torch.Tensor:
    """Mean of each expert's L2-normalised keys.  # [E, D]"""
    k = torch.nn.functional.normalize(keys, dim=-1)[perm]  # [F, D] in expert order
    return k.reshape(-1, g, k.shape[-1]).mean(1)

