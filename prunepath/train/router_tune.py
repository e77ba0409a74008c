"""Stage 2 of the quick recipe: train the routers end to end through the cumulative-mass selection.

PrunePath (Gu, Fu, Yuan 2026) trains its routers on the task loss: the selection itself (sort, keep while the
cumulative mass < τ, top-1 always kept, the crossing expert dropped) has no gradient, so the loss reaches the router
through the gates of the kept experts. The quick recipe keeps unit gates (the converted model is exactly the base
model when every expert is kept, and the decode kernels need no gate), so here the gate is a straight-through one:

    g_e = m_e + s_e − stop_grad(s_e),   m_e = the rule's 0/1 mask,   s_e = σ((τ − C_e) / κ)

where C_e is the cumulative mass up to and including expert e in the token's sorted order (m_e = [C_e < τ] or
top-1). The forward pass is exactly the routed model that is evaluated (g = m); the backward pass sees ∂L/∂g_e =
⟨∂L/∂y, y_e⟩ for every expert, kept or not (the torch path computes all neurons), and moves the router's softmax
so that experts the loss wants enter the kept set and the others leave it.

The loss is the KL divergence from the dense model's next-token distribution (the base model, teacher) to the routed
model's, on calibration text; the backbone is frozen (only router weights get gradients).

Budget matching: with a fixed τ the loss alone would flatten every softmax (more experts kept, lower loss; the
paper adds an entropy term against it). Here each step draws a target active fraction f and sets every layer's τ,
on that batch's own (detached) probabilities, to keep f · E experts per token on average (`tau_for_fraction`). The
router cannot buy quality with experts; it can only share a fixed budget out better between tokens, which is what
the comparison with top-k at a matched fraction measures. One trained router serves every fraction drawn;
`fraction_weights` says how often each is drawn (the quick recipe spends most steps at the smallest).

Peak bound (the attention sink): the first token of a window carries the model's massive activations, and its
experts' output norms are concentrated, so its router softmax is peaked. The training makes that worse: on
SmolLM2-135M the sink's top-1 mass in layers 2 / 28 went from 0.28 / 0.35 after the ridge fit to 0.61 / 0.68 after
900 s (the other tokens' 99th percentile: 0.33 / 0.06), so at 25 % active cumulative mass kept 1 expert for it where
top-k keeps 12, at +7.6 nats on its own prediction and about +0.055 on every later token of the window. The
straight-through surrogate σ((τ − M_e)/κ) is flat for every expert but the first of a saturated softmax, so the KL
cannot pull it back. With `peak_bound` b > 0 every step adds

    λ · mean over layers and tokens of relu(logit(p_max) − logit(b))²,   logit(p_max) = z_max − logsumexp_{e≠max} z_e

(`peak_excess`): zero unless one expert holds more than b of a token's mass, and, being on the log-odds, with a
gradient that does not vanish where the softmax saturates. The router's forward is unchanged (a training term only),
so every selection path (torch rule, CPU and GPU kernels) runs the trained router as before. On SmolLM2 with b = 0.25,
λ = 10⁴ the sink's top-1 mass stays at or below 0.24 in every layer; λ = 100 (b = 0.2) was too weak (0.52 / 0.44).
It did not pay on both models (`prunepath.train.quick`), so the quick recipe leaves it off.

Shape legend: N rows (tokens), D hidden, F ffn neurons, E experts, G expert size, V vocabulary.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prunepath.ffn.module import PrunePathFFN, prunepath_ffns
from prunepath.routing.calibrate import model_body
from prunepath.routing.control import dense_routing
from prunepath.routing.rules import cumulative_mass_mask


@dataclass(frozen=True)
class TuneConfig:
    seconds: float = 600.0  # wall budget for the training steps (the loop stops at the first step past it)
    max_steps: int = 0  # also stop after this many steps (0: only the time budget)
    batch: int = 2  # sequences per step
    positions: int = 128  # positions per sequence scored by the loss (the LM head runs on these only)
    lr: float = 3e-4  # Adam on the router weights
    softness: float = 0.05  # κ: width of the straight-through sigmoid, in units of probability mass
    rank_temp: float = 0.25  # t: logit scale over which two experts' order is smoothed
    fractions: tuple[float, ...] = (0.25, 0.5, 0.75)  # target active fractions drawn per step
    fraction_weights: tuple[float, ...] = ()  # how often each is drawn, relative (empty: equally often)
    peak_bound: float = 0.0  # b: a token's top-1 softmax mass above this is penalised (0: no peak term)
    peak_weight: float = 1.0  # λ: weight of the peak term against the KL
    seed: int = 0

    def __post_init__(self):
        if not (self.seconds >= 0 and math.isfinite(self.seconds)):
            raise ValueError(f"seconds must be a number >= 0, got {self.seconds}")
        for name in ("batch", "positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0 (0: no limit), got {self.max_steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a number > 0, got {self.lr}")
        if not (self.softness > 0 and math.isfinite(self.softness)):
            raise ValueError(f"softness must be a number > 0 (probability mass, e.g. 0.05), got {self.softness}")
        if not self.fractions or not all(0 < f < 1 for f in self.fractions):
            raise ValueError(f"fractions must lie in (0, 1), got {self.fractions}")
        if not 0 <= self.peak_bound < 1:
            raise ValueError(f"peak_bound must lie in [0, 1) (0: no peak term), got {self.peak_bound}")
        if not (self.peak_weight >= 0 and math.isfinite(self.peak_weight)):
            raise ValueError(f"peak_weight must be a number >= 0, got {self.peak_weight}")
        w = self.fraction_weights
        if w and (len(w) != len(self.fractions) or not all(v >= 0 and math.isfinite(v) for v in w) or not sum(w) > 0):
            raise ValueError(f"fraction_weights must be one number >= 0 per fraction {self.fractions}, not all 0 "
                             f"(empty: equally often), got {w}")


# ---------------------------------------------------------------------------------------------------------
# the maths


def sorted_mass(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax sorted descending and its inclusive cumulative sum C, and the sort order.  # [N, E], [N, E]

    C is differentiable with respect to the logits (the order is not)."""
    p = torch.softmax(logits.float(), -1)
    ps, order = p.sort(dim=-1, descending=True, stable=True)
    return ps.cumsum(-1), order


def kept_counts(csum: torch.Tensor, tau: float) -> torch.Tensor:
    """Experts the exclusive rule keeps per row from the sorted cumulative mass csum [N, E] (top-1 always).  # [N]"""
    return (csum < tau).sum(-1).clamp_min(1)


@torch.no_grad()
def tau_for_fraction(logits: torch.Tensor, fraction: float, iters: int = 40) -> float:
    """τ at which the exclusive cumulative-mass rule keeps `fraction` of the E experts on average over the rows
    of logits [N, E] (bisection on τ; the mean count is monotone in τ)."""
    csum, _ = sorted_mass(logits.detach())
    target = fraction * logits.shape[-1]
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if float(kept_counts(csum, mid).float().mean()) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def soft_mass_above(logits: torch.Tensor, rank_temp: float) -> torch.Tensor:
    """Smoothed cumulative mass up to and including each expert in the token's sorted order.  # [N, E]

    M_e = p_e + Σ_{j≠e} p_j · σ((z_j − z_e) / t): as t → 0 the mass of the experts ranked at or above e (the
    quantity the exclusive rule compares with τ). Unlike the sorted cumulative sum, it is differentiable through the
    ranking: raising z_e moves mass from above e to below it."""
    z = logits.float()
    p = torch.softmax(z, -1)
    above = torch.sigmoid((z.unsqueeze(-2) - z.unsqueeze(-1)) / rank_temp)  # [N, E(e), E(j)]: σ((z_j − z_e)/t)
    above = above + 0.5 * torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)  # σ(0) = 0.5 on the diagonal -> 1
    return (above * p.unsqueeze(-2)).sum(-1)


def peak_excess(logits: torch.Tensor, bound: float) -> torch.Tensor:
    """relu(logit(p_max) − logit(bound))² per row of logits [N, E], p = softmax: zero unless the top expert holds
    more than `bound` of the row's mass; the log-odds keep a gradient where the softmax saturates.  # [N]"""
    z = logits.float()
    top, idx = z.max(-1)
    others = z.scatter(-1, idx.unsqueeze(-1), float("-inf")).logsumexp(-1)
    return torch.relu(top - others - math.log(bound / (1 - bound))).square()


def straight_through_gates(logits: torch.Tensor, tau: float, softness: float, rank_temp: float) -> torch.Tensor:
    """Gates [N, E] equal to the exclusive cumulative-mass mask (0/1), with the gradient of σ((τ − M_e) / κ),
    M_e the smoothed mass at or above expert e (`soft_mass_above`)."""
    hard = cumulative_mass_mask(torch.softmax(logits.detach().float(), -1), tau)
    soft = torch.sigmoid((tau - soft_mass_above(logits, rank_temp)) / softness)
    return hard.to(soft.dtype) + (soft - soft.detach())  # exactly the mask forward (0 + 1 - 1 could round)


# ---------------------------------------------------------------------------------------------------------
# the training forward


def _routed_forward(f: PrunePathFFN, x: torch.Tensor, fraction: float, softness: float,
                    rank_temp: float, peak: list | None = None, bound: float = 0.0) -> torch.Tensor:
    """The FFN with straight-through gates at the τ that keeps `fraction` on this batch (all neurons computed);
    with bound > 0, the layer's mean `peak_excess` is appended to `peak`."""
    shape = x.shape
    x2d = x.reshape(-1, f.d_model)  # [N, D]
    h = f._hidden(x2d)  # [N, F]
    z = f.router(x2d)  # [N, E]
    if bound > 0:
        peak.append(peak_excess(z, bound).mean())
    g = straight_through_gates(z, tau_for_fraction(z, fraction), softness, rank_temp)  # [N, E]
    return f._gated_output(h, g, shape)


@contextmanager
def straight_through(model, softness: float, rank_temp: float, peak_bound: float = 0.0):
    """Inside the block every PrunePath FFN runs `_routed_forward` at `state['fraction']` (set per step), or its
    own forward while that is None (the dense teacher pass); with peak_bound > 0 each routed layer appends its
    peak term to `state['peak']`."""
    state = {"fraction": None, "peak": []}

    def forward(f, x):
        if state["fraction"] is None:
            return PrunePathFFN.forward(f, x)
        return _routed_forward(f, x, state["fraction"], softness, rank_temp, state["peak"], peak_bound)

    ffns = prunepath_ffns(model)
    for f in ffns:
        f.forward = lambda x, f=f: forward(f, x)
    try:
        yield state
    finally:
        for f in ffns:
            del f.forward  # back to the class's forward


def router_parameters(model) -> list[torch.nn.Parameter]:
    return [p for f in prunepath_ffns(model) for p in f.router.parameters()]


def _head_logits(model, batch: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities at positions pos [P] of batch [B, T]: the body, then the LM head on those
    positions only (with a 262k vocabulary the head costs more than the body).  # [B, P, V]"""
    hidden = model_body(model)(input_ids=batch, use_cache=False).last_hidden_state[:, pos]  # [B, P, D]
    z = model.get_output_embeddings()(hidden).float()
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        z = cap * torch.tanh(z / cap)
    return torch.log_softmax(z, -1)


def tune_routers(model, ids: torch.Tensor, cfg: TuneConfig = TuneConfig(), log=None) -> dict:
    """Train the routers of a converted model (in place; backbone frozen) on ids [B, T] of calibration text.

    Each step: a batch of `cfg.batch` rows, a target fraction drawn from cfg.fractions, `cfg.positions` random
    positions per row, the dense model's log-probabilities there (no gradient), the routed model's at per-layer τ
    matched to the fraction, KL(dense || routed) per scored token plus the peak term (cfg.peak_bound), Adam on the
    router weights. Returns {"steps", "tokens", "seconds", "loss_by_fraction": mean KL of the first and last quarter
    of the steps per fraction, "peak_term": mean peak term (per layer) of the first and last quarter of the steps}."""
    if not prunepath_ffns(model):
        raise ValueError("tune_routers needs a converted model (prunepath.moefy)")
    if model.get_output_embeddings() is None:
        raise ValueError(f"router training distils next-token predictions; {type(model).__name__} has no LM head. "
                         "Fix: load the model as a causal LM")
    params = router_parameters(model)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(ids.shape[0], generator=gen)
    n_pos = min(cfg.positions, ids.shape[1])
    device = next(model.parameters()).device
    history: list[tuple[float, float]] = []
    peaks: list[float] = []
    t0, step = time.perf_counter(), 0
    was_training = model.training
    model.eval()  # no dropout: the teacher and the student must see the same function
    try:
        with straight_through(model, cfg.softness, cfg.rank_temp, cfg.peak_bound) as state:
            while time.perf_counter() - t0 < cfg.seconds and not (cfg.max_steps and step >= cfg.max_steps):
                rows = order[(step * cfg.batch + torch.arange(cfg.batch)) % ids.shape[0]]
                batch = ids[rows].to(device)
                pos = torch.randperm(ids.shape[1], generator=gen)[:n_pos].sort().values.to(device)
                state["fraction"] = None
                with torch.no_grad(), dense_routing(model):
                    teacher = _head_logits(model, batch, pos)
                state["fraction"] = frac = _draw(rng, cfg)
                state["peak"] = []
                logp = _head_logits(model, batch, pos)
                loss = F.kl_div(logp.flatten(0, -2), teacher.flatten(0, -2), log_target=True, reduction="batchmean")
                kl = float(loss.detach())
                if state["peak"]:
                    peak = torch.stack(state["peak"]).mean()
                    peaks.append(float(peak.detach()))
                    loss = loss + cfg.peak_weight * peak
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                history.append((frac, kl))
                step += 1
                if log is not None and step % 10 == 0:
                    log(f"step {step}: fraction {frac:g}, KL {history[-1][1]:.4f}, {time.perf_counter() - t0:.0f} s")
    finally:
        for p, rg in frozen:
            p.requires_grad_(rg)
        model.train(was_training)
    return {"steps": step, "tokens": step * cfg.batch * ids.shape[1], "scored_tokens": step * cfg.batch * n_pos,
            "seconds": round(time.perf_counter() - t0, 2), "loss_by_fraction": _loss_summary(history, cfg.fractions),
            **({"peak_term": _quarters(peaks)} if peaks else {})}


def _draw(rng: random.Random, cfg: TuneConfig) -> float:
    """The step's target fraction: one of cfg.fractions, as often as cfg.fraction_weights says."""
    if not cfg.fraction_weights:
        return rng.choice(cfg.fractions)
    return rng.choices(cfg.fractions, weights=cfg.fraction_weights)[0]


def _quarters(v: list[float]) -> dict:
    """Mean of the first and of the last quarter of v (at least one value each)."""
    q = max(1, len(v) // 4)
    return {"first": round(sum(v[:q]) / q, 4), "last": round(sum(v[-q:]) / q, 4)}


def _loss_summary(history: list[tuple[float, float]], fractions) -> dict:
    out = {}
    for fr in fractions:
        v = [loss for f, loss in history if f == fr]
        out[f"{fr:g}"] = _quarters(v) if v else None
    return out
