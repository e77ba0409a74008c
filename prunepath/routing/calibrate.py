"""Calibration of the routing knobs: which τ (or k, or t) reaches a target mean active FFN fraction.

Shape legend: L layers, N calibration tokens, D hidden, F ffn neurons, E experts.

One dense forward over calibration text (`capture`) records every FFN's inputs; the fraction a knob gives is
then computed from the routers alone, so bisection (`bisect`, the one bisection of the package) costs no
forward passes. `calibrate_tau` refines the global τ on real forwards, since sparse earlier layers shift later
layers' inputs a little.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from prunepath import routing
from prunepath.ffn.module import prunepath_ffns
from prunepath.routing.control import dense_routing, routing_kept, set_tau
from prunepath.routing.stats import record


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
    ffns = prunepath_ffns(model)
    xs = [[] for _ in ffns]
    hooks = [
        f.register_forward_pre_hook(lambda _m, a, i=i: xs[i].append(a[0].reshape(-1, a[0].shape[-1])))
        for i, f in enumerate(ffns)
    ]
    try:
        with dense_routing(model):
            run_body(model, ids, batch_size)
    finally:
        for h in hooks:
            h.remove()
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


def down_projection(f) -> nn.Linear:
    if f.kind == "gated":
        return f.down_proj
    if f.kind == "mlp":
        return f.fc_out
    return f._out[0]


@torch.no_grad()
def router_probs(f, x: torch.Tensor) -> torch.Tensor:
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


def fraction_for(model, calib: Calibration, rule_of) -> float:
    """Mean active fraction over layers and calibration tokens; rule_of(layer) -> Rule."""
    fr = []
    for i, (f, nrm) in enumerate(zip(prunepath_ffns(model), calib.norms)):
        rule = rule_of(i)
        mask = rule.select(_calib_logits(calib, i, f), nrm if rule.needs_scores else None)  # [N, E]
        fr.append(mask.float().mean())
    return float(torch.stack(fr).mean())


def expert_counts(model, calib: Calibration, rule) -> torch.Tensor:
    """Experts kept per (layer, calibration token) under `rule`, from the captured inputs.  # [L, N]"""
    out = []
    for i, (f, nrm) in enumerate(zip(prunepath_ffns(model), calib.norms)):
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


def global_tau(model, calib: Calibration, target: float) -> tuple[float, float]:
    """One τ for every layer whose calibration active fraction is closest to `target` -> (τ, fraction)."""
    return bisect(lambda t: fraction_for(model, calib, lambda _i: routing.CumulativeMass(t)), 1e-4, 1.0, target)


def per_layer_taus(model, calib: Calibration, target: float) -> list[tuple[float, float]]:
    """Per-layer τ reaching `target` in each layer on its own inputs -> L x (τ, fraction)."""
    return _layer_taus([_calib_logits(calib, i, f) for i, f in enumerate(prunepath_ffns(model))], target)


def _layer_taus(logits: list[torch.Tensor], target: float) -> list[tuple[float, float]]:
    out = []
    for z in logits:
        out.append(bisect(lambda t, z=z: float(routing.CumulativeMass(t).select(z).float().mean()), 1e-4, 1.0, target,
                          iters=40, tol=5e-4))
    return out


@torch.no_grad()
def routed_logits(model, ids: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """Every layer's router logits on calibration ids [B, T] under the model's current rules.  # L x [N, E]"""
    ffns = prunepath_ffns(model)
    zs = [[] for _ in ffns]
    hooks = [f.router.register_forward_hook(lambda _m, _a, out, i=i: zs[i].append(out.reshape(-1, out.shape[-1])
                                                                                   .float().cpu()))
             for i, f in enumerate(ffns)]
    try:
        run_body(model, ids, batch_size)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(z) for z in zs]


def refine_layer_taus(model, ids: torch.Tensor, taus: list[float], target: float, tol: float = 0.005,
                      rounds: int = 4) -> tuple[list[float], float]:
    """Per-layer τ whose *real* forward over ids keeps `target` within tol -> (τ per layer, measured fraction).

    τ found on the dense model's FFN inputs misses on the sparse model: once earlier layers drop experts, a later
    layer sees other inputs (the default checkpoint: 0.514 for a 0.5 target). Each round re-fits every layer's τ on
    the logits the per-layer-τ model itself gives on the same text, a fixed point reached in one or two rounds.
    """
    set_tau(model, taus)
    got = measured_fraction(model, ids)
    best = (list(taus), got)
    for _ in range(rounds):
        if abs(got - target) <= tol:
            break
        taus = [t for t, _ in _layer_taus(routed_logits(model, ids), target)]
        set_tau(model, taus)
        got = measured_fraction(model, ids)
        if abs(got - target) < abs(best[1] - target):
            best = (list(taus), got)
    return best


def model_body(model):
    """The transformer stack without the LM head (transformers' base_model_prefix), or the model itself.

    Routing statistics need the FFN inputs only; with a 262k vocabulary (Gemma 3) the head costs more than the body."""
    return getattr(model, getattr(model, "base_model_prefix", ""), None) or model


def run_body(model, ids: torch.Tensor, batch_size: int) -> None:
    """The model body over ids [B, T] in batches of `batch_size` rows, on the model's device, no KV cache."""
    body, device = model_body(model), next(model.parameters()).device
    for s in range(0, ids.shape[0], batch_size):
        body(input_ids=ids[s : s + batch_size].to(device), use_cache=False)


@torch.no_grad()
def measured_fraction(model, ids: torch.Tensor, batch_size: int = 4) -> float:
    """Mean active FFN fraction over layers and tokens of calibration ids [B, T] under the current rules."""
    with record(model) as rec:
        run_body(model, ids, batch_size)
    return rec.stats().active_fraction


def check_target(target: float) -> float:
    """A calibration target: a mean active FFN fraction strictly between 0 and 1."""
    if not 0 < target < 1:
        raise ValueError(f"target active fraction must lie in (0, 1), got {target}; 1 is the dense model (τ > 1)")
    return target


def calibrate_tau(model, ids: torch.Tensor, target: float, tol: float = 0.005, iters: int = 12,
                  rounds: int = 4) -> dict:
    """Global τ (bisection on real forwards) and per-layer τ (on captured inputs, refined on real forwards, at most
    `rounds` times) for `target`; both within `tol` of it on these ids when the bisection can reach it."""
    check_target(target)
    n_exp = prunepath_ffns(model)[0].n_experts
    if target < 1 / n_exp:
        raise ValueError(
            f"target {target} is below one expert per token (1/{n_exp} = {1 / n_exp:.3f}); "
            "the top-1 expert is always kept"
        )
    with routing_kept(model):

        def frac(t):
            set_tau(model, t)
            return measured_fraction(model, ids)

        # Start from the τ that reaches the target on the dense model's FFN inputs (one forward, then free);
        # sparse earlier layers shift later layers' inputs a little, so refine by bisection on real forwards
        # in a bracket around it.
        calib = capture(model, ids)
        tau0, _ = global_tau(model, calib, target)
        got0 = frac(tau0)
        if abs(got0 - target) <= tol:
            tau, got = tau0, got0
        else:
            lo, hi = (tau0, min(1.0, tau0 + 0.15)) if got0 < target else (max(1e-4, tau0 - 0.15), tau0)
            tau, got = bisect(frac, lo, hi, target, iters=iters, tol=tol)
            if abs(got0 - target) < abs(got - target):
                tau, got = tau0, got0
        layers = per_layer_taus(model, calib, target)
        refined, per_layer_measured = refine_layer_taus(model, ids, [t for t, _ in layers], target, tol, rounds)
    return {
        "target": target,
        "tau": tau,
        "active_fraction": got,
        "tokens": int(ids.numel()),
        "per_layer_tau": refined,
        "per_layer_fraction_captured": [v for _, v in layers],
        "per_layer_active_fraction": per_layer_measured,
    }
