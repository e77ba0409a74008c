"""Setting a converted model's routing: the rule (τ, top-k, ...), the gate kind, a calibrated active fraction.

    prunepath.set_tau(model, 0.7)                      # every layer
    prunepath.set_tau(model, [0.6, 0.7, ...])          # one τ per layer
    prunepath.set_rule(model, TopK(8), layer=3)        # one layer
    with prunepath.routing_kept(model):                # rules and gates restored on exit
        prunepath.set_rule(model, Dense())

These functions are the one way the routing of a model is changed; they write each PrunePath FFN's `rule`
and `gate`. Rules are the frozen dataclasses of `prunepath.routing.rules` (spec strings such as "mass:0.9" are
for the command line: `prunepath.routing.parse_rule`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from prunepath.ffn.module import PrunePathFFN, prunepath_ffns
from prunepath.routing.gates import GateKind, check_gate
from prunepath.routing.rules import CumulativeMass, Dense, Rule, TopK, check_rule


def _ffns(model: nn.Module) -> list[PrunePathFFN]:
    ffns = prunepath_ffns(model)
    if not ffns:
        raise ValueError("this model has no PrunePath FFNs: convert it first with prunepath.moefy(model)")
    return ffns


def _targets(model: nn.Module, layer: int | None) -> list[PrunePathFFN]:
    ffns = _ffns(model)
    if layer is None:
        return ffns
    if not 0 <= layer < len(ffns):
        raise ValueError(
            f"layer {layer} out of range: this model has {len(ffns)} PrunePath layers (0..{len(ffns) - 1})"
        )
    return [ffns[layer]]


def set_rule(model: nn.Module, rule: Rule, layer: int | None = None) -> None:
    """Route with `rule` (a Rule object) in every layer, or in one layer."""
    check_rule(rule)
    targets = _targets(model, layer)
    for f in targets:
        if isinstance(rule, TopK) and rule.k > f.n_experts:
            raise ValueError(f"top-k {rule.k} exceeds the {f.n_experts} experts of layer {f.layer_idx}")
    for f in targets:
        f.rule = rule


def set_tau(model: nn.Module, tau: float | list[float], layer: int | None = None) -> None:
    """Set the cumulative-mass budget τ: one value, one per layer (a list), or for one layer.

    Keeps the exclusive/inclusive variant of a layer whose rule already is cumulative mass.
    """
    if isinstance(tau, (list, tuple)):
        ffns = _ffns(model)
        if layer is not None or len(tau) != len(ffns):
            raise ValueError(f"got {len(tau)} τ values for {len(ffns)} layers" + (" and a layer" if layer else ""))
        rules = [CumulativeMass(float(t), inclusive=_inclusive(f)) for f, t in zip(ffns, tau)]
        for f, r in zip(ffns, rules):
            f.rule = r
        return
    for f in _targets(model, layer):
        f.rule = CumulativeMass(float(tau), inclusive=_inclusive(f))


def _inclusive(f: PrunePathFFN) -> bool:
    return isinstance(f.rule, CumulativeMass) and f.rule.inclusive


def set_gate(model: nn.Module, kind: GateKind, layer: int | None = None) -> None:
    """Gate kept experts by "sigmoid" (the paper), "softmax" or "one" (unit gates), in every layer or one."""
    check_gate(kind)
    for f in _targets(model, layer):
        f.gate = kind


def set_active_fraction(model: nn.Module, fraction: float, per_layer: bool = True) -> dict:
    """Route so that `fraction` of the FFN neurons are active on average, from the checkpoint's calibration.

    per_layer: one τ per layer, each reaching the fraction in its own layer (lower perplexity than one
    global τ at every fraction we measured), else the one global τ. Returns the calibration entry.
    Calibrate first: `prunepath calibrate --checkpoint DIR --target 0.25 0.5 0.75 --save`.
    """
    cal = getattr(model, "prunepath_calibration", None)
    where = getattr(model, "prunepath_checkpoint", "DIR")
    fix = (f"`prunepath calibrate --checkpoint {where} --target {fraction:g} --save`, "
           "or set τ with prunepath.set_tau(model, tau)")
    if not cal:
        raise ValueError(f"this model has no stored τ calibration for its weights; run {fix}")
    entry = next((v for k, v in cal["targets"].items() if abs(k - fraction) < 1e-9), None)
    if entry is None:
        have = ", ".join(f"{k:g}" for k in sorted(cal["targets"]))
        raise ValueError(f"no calibration for active fraction {fraction:g} (stored: {have}); run {fix}")
    set_tau(model, entry["per_layer_tau"] if per_layer else entry["tau"])
    return entry


def rules(model: nn.Module) -> list[Rule]:
    """The rule of every layer, in layer order."""
    return [f.rule for f in _ffns(model)]


def rule_spec(model: nn.Module) -> str:
    """The routing rule's spec if all layers agree, else 'per-layer'."""
    specs = {f.rule.spec for f in _ffns(model)}
    return specs.pop() if len(specs) == 1 else "per-layer"


def set_rules(model: nn.Module, rules: list[Rule]) -> None:
    """One rule per layer, in layer order (what `rules(model)` returned)."""
    ffns = _ffns(model)
    if len(rules) != len(ffns):
        raise ValueError(f"got {len(rules)} rules for {len(ffns)} layers")
    for r in rules:
        check_rule(r)
    for f, r in zip(ffns, rules):
        f.rule = r


@contextmanager
def dense_routing(model: nn.Module) -> Iterator[None]:
    """Every expert kept with unit gates inside the block (the base model exactly); routing restored after."""
    with routing_kept(model):
        set_rule(model, Dense())
        set_gate(model, "one")
        yield


@contextmanager
def routing_kept(model: nn.Module) -> Iterator[None]:
    """Restore every layer's rule and gate when the block ends (also on an error)."""
    saved = [(f, f.rule, f.gate) for f in _ffns(model)]
    try:
        yield
    finally:
        for f, rule, gate in saved:
            f.rule, f.gate = rule, gate
