"""The baselines PrunePath is compared against (PAPER.md §5), all at a matched mean active FFN fraction.

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
from dataclasses import dataclass, field

import torch
from torch import nn

from prunepath import routing

DYNAMIC = ("prunepath", "prunepath-layer", "topk", "threshold", "oracle")
STATIC = ("static-expert", "wanda-sp", "flap")
METHODS = DYNAMIC + STATIC + ("dense",)


@dataclass(frozen=True)
class Calibration:
    """What one dense forward over calibration text tells the baselines, per layer."""

    inputs: list  # L x [N, D] FFN inputs (model dtype, CPU)
    norms: list  # L x [N, E] true expert output norms
    h_norm: list  # L x [F] ||h_j||_2 over tokens (permuted neuron order)
    h_mean: list  # L x [F] mean h_j
    h_var: list  # L x [F] variance of h_j
    memo: dict = field(default_factory=dict, repr=False, compare=False)  # layer -> (router state, logits)


@torch.no_grad()
def capture(model, ids: torch.Tensor, batch_size: int = 4) -> Calibration:
    """Dense forward over calibration ids [B, T] with unit gates; gather FFN inputs and neuron statistics."""
    ffns = model.prunepath_ffns()
    saved = [(f.rule, f.gate) for f in ffns]
    xs = [[] for _ in ffns]
    hooks = [
        f.register_forward_pre_hook(lambda _m, a, i=i: xs[i].append(a[0].reshape(-1, a[0].shape[-1])))
        for i, f in enumerate(ffns)
    ]
    try:
        for f in ffns:
            f.rule, f.gate = routing.Dense(), "one"
        device = next(model.parameters()).device
        for s in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[s : s + batch_size].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        for f, (r, g) in zip(ffns, saved):
            f.rule, f.gate = r, g
    inputs, norms, h_norm, h_mean, h_var = [], [], [], [], []
    for f, chunks in zip(ffns, xs):
        x = torch.cat(chunks)  # [N, D]
        h = f._hidden(x).float()  # [N, F] every neuron's activation before gating (the lead's FFN math)
        norms.append(f.expert_norms(x, h.to(x.dtype)).cpu())
        h_norm.append(h.norm(dim=0).cpu())
        h_mean.append(h.mean(0).cpu())
        h_var.append(h.var(0).cpu())
        inputs.append(x.cpu())
    return Calibration(inputs, norms, h_norm, h_mean, h_var)


def _down(f) -> nn.Linear:
    if f.kind == "gated":
        return f.down_proj
    if f.kind == "mlp":
        return f.fc_out
    return f._out[0]


# ---------------------------------------------------------------------------------------------------------
# neuron scores and the pruned copy


def neuron_scores(model, calib: Calibration, method: str) -> list[torch.Tensor]:
    """Per-layer neuron importance L x [F] (higher = keep)."""
    out = []
    for f, hn, hv in zip(model.prunepath_ffns(), calib.h_norm, calib.h_var):
        w = _down(f).weight.detach().float().cpu()  # [D, F]
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
    pruned.set_rule(routing.Dense())
    pruned.set_gate("one")
    scores = neuron_scores(model, calib, method)
    kept = []
    with torch.no_grad():
        for f, s, mu in zip(pruned.prunepath_ffns(), scores, calib.h_mean):
            n_keep = max(1, round(fraction * s.numel()))
            drop = s.argsort(descending=True)[n_keep:].to(_down(f).weight.device)  # [F - n_keep]
            lin = _down(f)
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
    for f, x, nrm in zip(model.prunepath_ffns(), calib.inputs, calib.norms):
        if not 1 <= n_keep <= f.n_experts:
            raise ValueError(f"static expert count must lie in 1..{f.n_experts}, got {n_keep}")
        if by == "router":
            score = _probs(f, x).mean(0)  # [E] mean router mass
        else:
            score = nrm.mean(0)
        rules.append(routing.Static(tuple(score.topk(n_keep).indices.tolist())))
    return rules


@torch.no_grad()
def _probs(f, x: torch.Tensor) -> torch.Tensor:
    w = next(f.router.parameters())
    return torch.softmax(f.router(x.to(w.device, w.dtype)).float(), -1).cpu()  # [N, E]


@torch.no_grad()
def _logits(f, x: torch.Tensor) -> torch.Tensor:
    w = next(f.router.parameters())
    return f.router(x.to(w.device, w.dtype)).float().cpu()  # [N, E]


def _calib_logits(calib: Calibration, i: int, f) -> torch.Tensor:
    """Layer i's router logits on its calibration inputs, computed once per router state.  # [N, E]

    Knob matching evaluates many knobs on the same logits; the router runs once, not once per step."""
    state = (id(f.router), tuple((p.data_ptr(), p._version) for p in f.router.parameters()))
    hit = calib.memo.get(i)
    if hit is None or hit[0] != state:
        hit = calib.memo[i] = (state, _logits(f, calib.inputs[i]))
    return hit[1]


# ---------------------------------------------------------------------------------------------------------
# knob matching


def fraction_for(model, calib: Calibration, rule_of) -> float:
    """Mean active fraction over layers and calibration tokens; rule_of(layer) -> Rule."""
    fr = []
    for i, (f, nrm) in enumerate(zip(model.prunepath_ffns(), calib.norms)):
        rule = rule_of(i)
        mask = rule.select(_calib_logits(calib, i, f), nrm if rule.needs_scores else None)  # [N, E]
        fr.append(mask.float().mean())
    return float(torch.stack(fr).mean())


def expert_counts(model, calib: Calibration, rule) -> torch.Tensor:
    """Experts kept per (layer, calibration token) under `rule`, from the captured inputs.  # [L, N]"""
    out = []
    for i, (f, nrm) in enumerate(zip(model.prunepath_ffns(), calib.norms)):
        out.append(rule.select(_calib_logits(calib, i, f), nrm if rule.needs_scores else None).sum(-1))
    return torch.stack(out)


def count_distribution(counts: torch.Tensor, n_experts: int) -> dict:
    """Histogram of experts kept per (layer, token) and quantiles of the per-token mean over layers."""
    per_token = counts.float().mean(0)  # [N]
    q = torch.quantile(per_token, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])).tolist()
    return {
        "histogram_per_layer_token": torch.bincount(counts.reshape(-1), minlength=n_experts + 1).tolist(),
        "per_token_mean_quantiles_5_25_50_75_95": q,
        "per_token_mean_std": float(per_token.std()),
        "per_layer_token_std": float(counts.float().std()),
        "min": int(counts.min()),
        "max": int(counts.max()),
    }


def bisect(fn, lo: float, hi: float, target: float, increasing: bool = True, iters: int = 30, tol: float = 2e-3):
    """x in [lo, hi] with fn(x) ≈ target for a monotone fn; returns (x, fn(x))."""
    best = None
    for _ in range(iters):
        mid = (lo + hi) / 2
        v = fn(mid)
        if best is None or abs(v - target) < abs(best[1] - target):
            best = (mid, v)
        if abs(v - target) <= tol:
            break
        if (v < target) == increasing:
            lo = mid
        else:
            hi = mid
    return best


def match_knob(model, calib: Calibration, method: str, target: float) -> tuple[object, float]:
    """The knob of `method` whose calibration active fraction is closest to `target` -> (knob, fraction)."""
    if not 0 < target <= 1:
        raise ValueError(f"target active fraction must lie in (0, 1], got {target}")
    n_exp = model.prunepath_ffns()[0].n_experts
    if method in ("topk", "static-expert"):
        k = min(n_exp, max(1, round(target * n_exp)))
        return k, k / n_exp
    if method in ("wanda-sp", "flap"):
        return target, target
    if method == "prunepath":
        return bisect(lambda t: fraction_for(model, calib, lambda _i: routing.CumulativeMass(t)), 1e-4, 1.0, target)
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


def per_layer_taus(model, calib: Calibration, target: float) -> list[tuple[float, float]]:
    """Per-layer τ reaching `target` in each layer on its own inputs -> L x (τ, fraction)."""
    out = []
    for i, f in enumerate(model.prunepath_ffns()):
        z = _calib_logits(calib, i, f)
        out.append(bisect(lambda t, z=z: float(routing.CumulativeMass(t).select(z).float().mean()), 1e-4, 1.0, target))
    return out


def configure(model, calib: Calibration, method: str, knob):
    """The model to evaluate for (method, knob): the same object re-ruled, or a pruned copy."""
    if method == "dense":
        model.set_rule(routing.Dense())
        return model
    if method == "prunepath":
        model.set_tau(float(knob))
    elif method == "prunepath-layer":
        model.set_tau([float(t) for t in knob])
    elif method == "topk":
        model.set_rule(routing.TopK(int(knob)))
    elif method == "threshold":
        model.set_rule(routing.Threshold(float(knob)))
    elif method == "oracle":
        model.set_rule(routing.Oracle(tau=float(knob)))
    elif method == "static-expert":
        for i, r in enumerate(static_experts(model, calib, int(knob))):
            model.set_rule(r, layer=i)
    elif method in ("wanda-sp", "flap"):
        return neuron_pruned(model, calib, method, float(knob))[0]
    else:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return model
