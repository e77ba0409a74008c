"""The baselines PrunePath is compared against (Gu, Fu, Yuan 2026), all at a matched mean active FFN fraction.

Shape legend: L layers, N calibration tokens, D hidden, F ffn neurons, E experts, G expert size.

Dynamic (per token, on the same checkpoint's experts and routers; only the rule changes):
  * `topk`       MoEfication: the k experts with the largest router logits        knob k
  * `threshold`  independent expert-wise threshold sigmoid(z_e) > t                knob t
  * `prunepath-layer`  PrunePath with one τ per layer, each reaching the target in its own layer  knob [τ_l]
  * `oracle`     ground truth: cumulative mass over true expert output norms     knob τ (no speed-up)
Static (the same FFN units for every token):
  * `static-expert`  keep the experts with the highest mean router mass p_e on calibration text, per
                     layer — the same clusters as PrunePath, so it isolates static vs dynamic.   knob m
  * `wanda-sp`   neuron score mean_i |W_down[i, j]| · ||h_j|| (Wanda-sp / WIFN)                  knob fraction
  * `flap`       neuron score Var(h_j) · ||W_down[:, j]||² (FLAP / WIFV) and bias compensation:
                 a pruned neuron is replaced by its calibration mean, folded into the down bias.
  Neuron pruning keeps the same fraction in every layer (FLAP's adaptive global structure is not used).
  It is applied to a copy of the converted model run dense with unit gates — exactly the base model —
  whose pruned neurons' down-projection columns are zeroed.

Knob matching (`match_knob`) runs on FFN inputs captured from one dense forward over calibration text
(`capture`): the fraction a knob gives is computed from the routers alone, so bisection costs no
forward passes. The fraction each evaluation then *measures* (inputs shift once earlier layers are
sparse) is what the sweep reports.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from prunepath import routing
from prunepath.ffn.module import prunepath_ffns
from prunepath.routing.calibrate import (
    Calibration,
    bisect,
    down_projection,
    fraction_for,
    global_tau,
    per_layer_taus,
    router_probs,
)
from prunepath.routing.control import set_gate, set_rule, set_tau

DYNAMIC = ("prunepath", "prunepath-layer", "topk", "threshold", "oracle")
STATIC = ("static-expert", "wanda-sp", "flap")
METHODS = DYNAMIC + STATIC + ("dense",)


# ---------------------------------------------------------------------------------------------------------
# neuron scores and the pruned copy


def neuron_scores(model, calib: Calibration, method: str) -> list[torch.Tensor]:
    """Per-layer neuron importance L x [F] (higher = keep)."""
    out = []
    for f, hn, hv in zip(prunepath_ffns(model), calib.h_norm, calib.h_var):
        w = down_projection(f).weight.detach().float().cpu()  # [D, F]
        if method == "wanda-sp":
            out.append(w.abs().mean(0) * hn)
        elif method == "flap":
            out.append(hv * (w**2).sum(0))
        else:
            raise ValueError(f"unknown neuron-pruning method {method!r}; choose 'wanda-sp' or 'flap'")
    return out


def neuron_pruned(model, calib: Calibration, method: str, fraction: float):
    """A copy of `model`, run dense with unit gates, keeping `fraction` of each layer's neurons.

    Pruned neurons' down-projection columns are zeroed; for FLAP their calibration mean is added to
    the down bias (bias compensation). Returns (copy, kept fraction actually used).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"kept fraction must lie in (0, 1], got {fraction}")
    pruned = copy.deepcopy(model)
    set_rule(pruned, routing.Dense())
    set_gate(pruned, "one")
    scores = neuron_scores(model, calib, method)
    kept = []
    with torch.no_grad():
        for f, s, mu in zip(prunepath_ffns(pruned), scores, calib.h_mean):
            n_keep = max(1, round(fraction * s.numel()))
            drop = s.argsort(descending=True)[n_keep:].to(down_projection(f).weight.device)  # [F - n_keep]
            lin = down_projection(f)
            w = lin.weight  # [D, F]
            if method == "flap":
                comp = w[:, drop].float() @ mu.to(w.device)[drop]  # [D] E[h_j] of the pruned neurons
                if lin.bias is None:
                    lin.bias = nn.Parameter(
                        torch.zeros(w.shape[0], device=w.device, dtype=w.dtype), requires_grad=False
                    )
                lin.bias += comp.to(w.dtype)
            w[:, drop] = 0
            kept.append(n_keep / s.numel())
    pruned.prunepath_static_fraction = sum(kept) / len(kept)
    return pruned, pruned.prunepath_static_fraction


# ---------------------------------------------------------------------------------------------------------
# static experts


def static_experts(model, calib: Calibration, n_keep: int, by: str = "router") -> list[routing.Static]:
    """Per-layer Static rules keeping the n_keep experts of highest mean gate mass (or true norm)."""
    rules = []
    for f, x, nrm in zip(prunepath_ffns(model), calib.inputs, calib.norms):
        if not 1 <= n_keep <= f.n_experts:
            raise ValueError(f"static expert count must lie in 1..{f.n_experts}, got {n_keep}")
        if by == "router":
            score = router_probs(f, x).mean(0)  # [E] mean router mass
        else:
            score = nrm.mean(0)
        rules.append(routing.Static(tuple(score.topk(n_keep).indices.tolist())))
    return rules


# ---------------------------------------------------------------------------------------------------------
# knob matching


def match_knob(model, calib: Calibration, method: str, target: float) -> tuple[object, float]:
    """The knob of `method` whose calibration active fraction is closest to `target` -> (knob, fraction)."""
    if not 0 < target <= 1:
        raise ValueError(f"target active fraction must lie in (0, 1], got {target}")
    n_exp = prunepath_ffns(model)[0].n_experts
    if method in ("topk", "static-expert"):
        k = min(n_exp, max(1, round(target * n_exp)))
        return k, k / n_exp
    if method in ("wanda-sp", "flap"):
        return target, target
    if method == "prunepath":
        return global_tau(model, calib, target)
    if method == "prunepath-layer":
        layers = per_layer_taus(model, calib, target)
        return [round(t, 5) for t, _ in layers], sum(v for _, v in layers) / len(layers)
    if method == "oracle":
        return bisect(lambda t: fraction_for(model, calib, lambda _i: routing.Oracle(tau=t)), 1e-4, 1.0, target)
    if method == "threshold":
        return bisect(
            lambda t: fraction_for(model, calib, lambda _i: routing.Threshold(t)),
            1e-6,
            1 - 1e-6,
            target,
            increasing=False,
        )
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def configure(model, calib: Calibration, method: str, knob):
    """The model to evaluate for (method, knob): the same object re-ruled, or a pruned copy."""
    if method == "dense":
        set_rule(model, routing.Dense())
        return model
    if method == "prunepath":
        set_tau(model, float(knob))
    elif method == "prunepath-layer":
        set_tau(model, [float(t) for t in knob])
    elif method == "topk":
        set_rule(model, routing.TopK(int(knob)))
    elif method == "threshold":
        set_rule(model, routing.Threshold(float(knob)))
    elif method == "oracle":
        set_rule(model, routing.Oracle(tau=float(knob)))
    elif method == "static-expert":
        for i, r in enumerate(static_experts(model, calib, int(knob))):
            set_rule(model, r, layer=i)
    elif method in ("wanda-sp", "flap"):
        return neuron_pruned(model, calib, method, float(knob))[0]
    else:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return model
