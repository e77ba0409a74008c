"""Convert a pretrained transformers model into a PrunePath model ("MoEfy" it).

Shape legend: L layers, N rows (= B*T tokens), D hidden, F ffn, E experts, G expert size.

`moefy(model)` finds every FFN by structure, splits its neurons into experts (`ffn.split`), builds a router
(`routing.router`) and substitutes a `PrunePathFFN` module for the FFN. The model object stays the same
transformers model — `generate()`, `save_pretrained`, peft all keep working — and its class becomes a
subclass that adds the PrunePath controls: `set_tau`, `set_rule`, `set_gate`, `record_stats`,
`routing_stats`. We change the instance's class (not its `forward`) so every method the base class has
is still the base class's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from prunepath import routing
from prunepath.ffn.discover import FFNSpec, find_ffns
from prunepath.ffn.module import PrunePathFFN, build_ffn
from prunepath.ffn.split import Split, split_neurons
from prunepath.models import model_fingerprint
from prunepath.routing.stats import RoutingStats


@dataclass(frozen=True)
class MoefyConfig:
    """How a model is converted. Saved with every checkpoint."""

    expert_size: int = 32
    split: str = "kmeans"  # kmeans | coact | random
    router: str = "linear"  # linear | mlp
    router_init: str = "centroid"  # centroid (ours: an untrained router already ranks experts) | zero (the paper)
    rule: str = "mass:0.9"  # any routing.parse_rule spec
    gate: str = "sigmoid"  # sigmoid (the paper) | softmax | one
    seed: int = 0

    def __post_init__(self):
        if self.split not in ("kmeans", "coact", "random"):
            raise ValueError(f"split must be 'kmeans', 'coact' or 'random', got {self.split!r}")
        if self.router not in ("linear", "mlp"):
            raise ValueError(f"router must be 'linear' or 'mlp', got {self.router!r}")
        routing.check_gate(self.gate)
        routing.parse_rule(self.rule)  # validates the spec early, before any clustering


class PrunePathMixin:
    """Methods added to a converted model (its class becomes `PrunePath<Base>`)."""

    prunepath_config: MoefyConfig

    def prunepath_ffns(self) -> list[PrunePathFFN]:
        return [m for m in self.modules() if isinstance(m, PrunePathFFN)]

    def _targets(self, layer: int | None) -> list[PrunePathFFN]:
        ffns = self.prunepath_ffns()
        if layer is None:
            return ffns
        if not 0 <= layer < len(ffns):
            raise ValueError(
                f"layer {layer} out of range: this model has {len(ffns)} PrunePath layers (0..{len(ffns) - 1})"
            )
        return [ffns[layer]]

    def set_rule(self, rule: routing.Rule | str, layer: int | None = None) -> None:
        """Change the routing rule (whole model or one layer); a spec string such as 'topk:8' works too."""
        rule = routing.as_rule(rule)
        for f in self._targets(layer):
            if isinstance(rule, routing.TopK) and rule.k > f.n_experts:
                raise ValueError(f"top-k {rule.k} exceeds the {f.n_experts} experts of layer {f.layer_idx}")
            f.rule = rule

    def set_tau(self, tau: float | list[float], layer: int | None = None) -> None:
        """Set the cumulative-mass budget τ: one value, one per layer (a list), or for one layer.

        Keeps the current exclusive/inclusive variant if the rule already is cumulative mass.
        """
        if isinstance(tau, (list, tuple)):
            ffns = self.prunepath_ffns()
            if len(tau) != len(ffns):
                raise ValueError(f"got {len(tau)} τ values for {len(ffns)} layers")
            for i, t in enumerate(tau):
                self.set_tau(float(t), layer=i)
            return
        for f in self._targets(layer):
            inclusive = isinstance(f.rule, routing.CumulativeMass) and f.rule.inclusive
            f.rule = routing.CumulativeMass(float(tau), inclusive=inclusive)

    def set_active_fraction(self, fraction: float, per_layer: bool = True) -> dict:
        """Route so that `fraction` of the FFN neurons are active on average, from the checkpoint's calibration.

        per_layer: one τ per layer, each reaching the fraction in its own layer (lower perplexity than one
        global τ at every fraction we measured), else the one global τ. Returns the calibration entry.
        Calibrate first: `prunepath calibrate --checkpoint DIR --target 0.25 0.5 0.75 --save`.
        """
        cal = getattr(self, "prunepath_calibration", None)
        where = getattr(self, "prunepath_checkpoint", "DIR")
        fix = f"`prunepath calibrate --checkpoint {where} --target {fraction:g} --save`, or set τ with model.set_tau"
        if not cal:
            raise ValueError(f"this model has no stored τ calibration for its weights; run {fix}")
        entry = next((v for k, v in cal["targets"].items() if abs(k - fraction) < 1e-9), None)
        if entry is None:
            have = ", ".join(f"{k:g}" for k in sorted(cal["targets"]))
            raise ValueError(f"no calibration for active fraction {fraction:g} (stored: {have}); run {fix}")
        self.set_tau(entry["per_layer_tau"] if per_layer else entry["tau"])
        return entry

    def set_gate(self, kind: str) -> None:
        routing.check_gate(kind)
        for f in self.prunepath_ffns():
            f.gate = kind

    def record_stats(self, on: bool = True) -> None:
        """Start (and reset) or stop recording per-token expert counts."""
        for f in self.prunepath_ffns():
            f.record, f.history, f.last_counts = on, [], None

    def reset_stats(self) -> None:
        for f in self.prunepath_ffns():
            f.history, f.last_counts = [], None

    def routing_stats(self, token_mask: torch.Tensor | None = None) -> RoutingStats:
        """Statistics over every forward since `record_stats()`; `token_mask` [N] drops padding rows."""
        ffns = self.prunepath_ffns()
        if not ffns[0].history:
            raise RuntimeError("no routing recorded: call model.record_stats() and run a forward first")
        counts = torch.stack([torch.cat(f.history) for f in ffns])  # [L, N]
        if token_mask is not None:
            counts = counts[:, token_mask.reshape(-1).bool().cpu()]
        kept = counts.float().mean(1)  # [L]
        flops = sum(f.flops_per_token(float(k)) for f, k in zip(ffns, kept))
        dense = sum(f.flops_per_token(f.n_experts) - 2.0 * f.d_model * f.n_experts for f in ffns)
        return RoutingStats(counts, tuple(f.n_experts for f in ffns), flops, dense)

    @property
    def rule_spec(self) -> str:
        """The routing rule's spec if all layers agree, else 'per-layer'."""
        specs = {f.rule.spec for f in self.prunepath_ffns()}
        return specs.pop() if len(specs) == 1 else "per-layer"


_CLASSES: dict[type, type] = {}


def _promote(model: nn.Module) -> None:
    """Make `model` an instance of PrunePath<Base>: same object, same state, extra methods."""
    if isinstance(model, PrunePathMixin):
        return
    cls = type(model)
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"PrunePath{cls.__name__}", (PrunePathMixin, cls), {"__module__": __name__})
    model.__class__ = _CLASSES[cls]


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
    rule = routing.parse_rule(config.rule)
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
    _promote(model)
    model.prunepath_config = config
    model.prunepath_base_fingerprint = base_fp  # the weights are permuted now: remember the base's
    return model


def _centroids(keys: torch.Tensor, perm: torch.Tensor, g: int) -> torch.Tensor:
    """Mean of each expert's L2-normalised keys.  # [E, D]"""
    k = torch.nn.functional.normalize(keys, dim=-1)[perm]  # [F, D] in expert order
    return k.reshape(-1, g, k.shape[-1]).mean(1)

