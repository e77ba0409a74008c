"""The quick recipe: usable routers for a new model in minutes on a CPU (`prunepath train --recipe quick`).

PrunePath (Gu, Fu, Yuan 2026) keeps, for each token, its most probable experts until their softmax mass reaches τ.
What that mass should mean decides how experts are shared out between tokens. Distilling the router towards each
expert's share of the FFN output (p_e ≈ ||y_e|| / Σ ||y_e'||) makes mass mean share, so every token keeps the same
share of its output; but the tokens whose FFN output is largest are also the ones whose output sits in a few experts,
so mass gives them the fewest experts and the largest absolute error. Measured on SmolLM2-135M with the true expert
norms (no router at all) at 50 % active: top-k by norm 87 WikiText-2 perplexity, cumulative mass over norm shares
244, over squared norms 383, over norms^0.5 83; one absolute norm threshold per layer 62 (results/README.md, recipes).
Mass over a flatter distribution gives back what the share took away, with counts that still vary per token.

So the recipe fits each router to the share (a convex per-layer fit on cached FFN inputs, no backbone gradient),
then picks one softmax temperature per layer: the one under which the cumulative-mass rule's squared FFN-output
error, summed over held-out tokens, is lowest relative to top-k's at the same active fractions. The temperature is
folded into the router weight, so the checkpoint is an ordinary one, and per-layer τ is calibrated and stored.

Steps (each timed in the run's log):
1. convert: balanced k-means experts of 32 neurons, routers from the cluster centres, unit gates (exact when dense);
2. one dense pass over `tokens` of calibration text through the model body (no LM head: with a 262k vocabulary the
   head costs more than the body): every FFN's input and each expert's true output norm, taken from the activations
   the forward computes anyway;
3. per layer, Adam on KL(share ‖ softmax(W x)) over the cached rows;
4. per layer, the temperature T from a grid: squared error ||Σ_dropped y_e||² from each token's expert Gram matrix
   (any mask costs E² per token), mass at per-layer τ matched to top-k's fraction, averaged over the fractions;
5. per-layer τ for the target fractions on calibration text, refined on real forwards, saved in the checkpoint.

Shape legend: N tokens, D hidden, E experts, G expert size, L layers.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from prunepath import routing
from prunepath.ffn.module import prunepath_ffns
from prunepath.routing.calibrate import bisect, model_body
from prunepath.routing.control import routing_kept, set_gate


@dataclass(frozen=True)
class QuickConfig:
    tokens: int = 8192  # calibration-text tokens cached in the dense pass
    seq_len: int = 256
    holdout: int = 2048  # of those, the tokens that choose the temperature (not fitted on)
    steps: int = 300  # Adam steps per layer
    batch: int = 1024  # rows per step
    lr: float = 1e-2
    temperatures: tuple[float, ...] = (0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0, 5.7, 8.0, 16.0)
    fractions: tuple[float, ...] = (0.25, 0.5, 0.75)  # where mass is compared with top-k, and τ is calibrated
    seed: int = 0

    def __post_init__(self):
        for name in ("tokens", "seq_len", "steps", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.holdout < self.tokens:
            raise ValueError(f"holdout must lie in (0, tokens={self.tokens}), got {self.holdout}")
        if not self.temperatures or min(self.temperatures) <= 0:
            raise ValueError(f"temperatures must be numbers > 0, got {self.temperatures}")
        if not self.fractions or not all(0 < f < 1 for f in self.fractions):
            raise ValueError(f"fractions must lie in (0, 1), got {self.fractions}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a number > 0, got {self.lr}")


# ---------------------------------------------------------------------------------------------------------
# step 2: one dense pass, FFN inputs and expert norms


class _NormTap:
    """A dense rule that keeps the expert norms the FFN hands it (needs_scores), so none is computed twice."""

    needs_scores = True
    spec = "dense"

    def __init__(self):
        self.norms: list[torch.Tensor] = []

    def select(self, logits: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        self.norms.append(scores.detach().float().cpu())  # [n, E]
        return torch.ones(logits.shape, dtype=torch.bool, device=logits.device)


@contextmanager
def _tapped(model, ffns):
    taps = [_NormTap() for _ in ffns]
    xs: list[list[torch.Tensor]] = [[] for _ in ffns]
    hooks = [
        f.register_forward_pre_hook(lambda _m, a, i=i: xs[i].append(a[0].detach().reshape(-1, a[0].shape[-1]).cpu()))
        for i, f in enumerate(ffns)
    ]
    try:
        with routing_kept(model):
            set_gate(model, "one")
            for f, t in zip(ffns, taps):
                f.rule = t  # a tap, not a Rule: keeps every expert and records the norms the FFN hands it
            yield xs, taps
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def capture_ffn_io(model, ids: torch.Tensor, mask: torch.Tensor | None = None, batch_size: int = 8,
                   progress: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Dense forward of ids [B, T] through the body: per layer FFN inputs L x [N, D] and expert norms L x [N, E].

    mask [B, T] (1 = real token) drops padding rows; N counts the real tokens. The LM head never runs, and each
    expert norm comes from the activations the forward computed (no second pass through gate and up)."""
    from tqdm.auto import tqdm

    ffns = prunepath_ffns(model)
    body = model_body(model)
    device = next(model.parameters()).device
    with _tapped(model, ffns) as (xs, taps):
        for s in tqdm(range(0, ids.shape[0], batch_size), desc="dense pass", disable=not progress):
            m = None if mask is None else mask[s : s + batch_size].to(device)
            body(input_ids=ids[s : s + batch_size].to(device), attention_mask=m, use_cache=False)
    xs, norms = [torch.cat(x) for x in xs], [torch.cat(t.norms) for t in taps]
    if mask is not None:
        keep = mask.reshape(-1).bool().cpu()
        xs, norms = [x[keep] for x in xs], [n[keep] for n in norms]
    return xs, norms


# ---------------------------------------------------------------------------------------------------------
# step 3: the router towards the share


def share(norms: torch.Tensor) -> torch.Tensor:
    """Each expert's share of the token's summed output norms.  # [N, E]"""
    n = norms.float()
    return n / n.sum(-1, keepdim=True).clamp_min(1e-12)


def fit_router(router, x: torch.Tensor, norms: torch.Tensor, cfg: QuickConfig, seed: int = 0) -> list[float]:
    """Adam on KL(share ‖ softmax(router(x))) over the rows x [N, D]; returns the loss every 50 steps."""
    q = share(norms)
    w = next(router.parameters())
    opt = torch.optim.Adam(router.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(seed)
    curve = []
    for step in range(cfg.steps):
        rows = torch.randint(0, x.shape[0], (min(cfg.batch, x.shape[0]),), generator=g)
        with torch.enable_grad():
            z = router(x[rows].to(w.device, w.dtype)).float()
            loss = F.kl_div(F.log_softmax(z, -1), q[rows].to(z.device), reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            curve.append(round(loss.item(), 5))
    return curve


# ---------------------------------------------------------------------------------------------------------
# step 4: one temperature per layer


@torch.no_grad()
def expert_gram(f, x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Per token, the Gram matrix of the experts' output vectors y_e = W_down[:, e] h_e(x).  # [N, E, E]

    The squared error of dropping a set of experts is dᵀ G d with d the dropped indicator (`drop_error`)."""
    w = f._down_weight.float().reshape(f.d_model, f.n_experts, f.expert_size)  # [D, E, G]
    out = []
    for s in range(0, x.shape[0], chunk):
        xc = x[s : s + chunk].to(w.device, next(f.parameters()).dtype)
        h = f._hidden(xc).float().reshape(-1, f.n_experts, f.expert_size)  # [n, E, G]
        y = torch.einsum("neg,deg->ned", h, w)  # [n, E, D]
        out.append((y @ y.transpose(1, 2)).cpu())  # [n, E, E]
    return torch.cat(out)


def drop_error(gram: torch.Tensor, keep: torch.Tensor) -> float:
    """Σ over tokens of ||Σ_{dropped e} y_e||² for a keep mask [N, E]."""
    d = (~keep).float()
    return float(torch.einsum("ne,nef,nf->", d, gram, d))


def _mass_at(z: torch.Tensor, fraction: float) -> tuple[float, torch.Tensor]:
    """The τ whose cumulative-mass rule keeps `fraction` of the experts of logits z [N, E], and its mask.

    The sorted cumulative sums are computed once; each bisection step only counts (the exclusive rule keeps rank i
    while the mass up to it is < τ, and always the top-1), so a step costs N·E comparisons, not a sort."""
    csum = torch.softmax(z.float(), -1).sort(-1, descending=True).values.cumsum(-1)  # [N, E]
    n_exp = z.shape[-1]
    tau, _ = bisect(lambda t: float((csum < t).sum(-1).clamp_min(1).float().mean()) / n_exp, 1e-4, 1.0, fraction,
                    iters=40, tol=1e-4)
    return tau, routing.cumulative_mass_mask(torch.softmax(z.float(), -1), tau)


@torch.no_grad()
def choose_temperature(z: torch.Tensor, gram: torch.Tensor, cfg: QuickConfig) -> tuple[float, dict]:
    """The T of cfg.temperatures whose mass rule on z / T has the lowest error relative to top-k, averaged over
    cfg.fractions (each at top-k's own fraction k/E). Returns (T, {T: relative error})."""
    n_exp = z.shape[-1]
    ks = [min(n_exp, max(1, round(f * n_exp))) for f in cfg.fractions]
    topk_err = [max(drop_error(gram, routing.TopK(k).select(z)), 1e-30) for k in ks]
    scores = {}
    for t in cfg.temperatures:
        rel = [drop_error(gram, _mass_at(z / t, k / n_exp)[1]) / e for k, e in zip(ks, topk_err)]
        scores[t] = sum(rel) / len(rel)
    best = min(scores, key=scores.get)
    return best, scores


def fold_temperature(router, t: float) -> None:
    """softmax(router(x) / t) from the router itself: the last linear layer's weights (and bias) divided by t."""
    last = [m for m in router.modules() if isinstance(m, torch.nn.Linear)] or [router]
    with torch.no_grad():
        last[-1].weight.div_(t)
        if getattr(last[-1], "bias", None) is not None:
            last[-1].bias.div_(t)


# ---------------------------------------------------------------------------------------------------------
# the recipe


@dataclass
class QuickReport:
    config: dict
    seconds: dict = field(default_factory=dict)  # wall seconds per step
    cpu_seconds: dict = field(default_factory=dict)  # process CPU seconds per step (user + system)
    temperatures: list = field(default_factory=list)
    relative_error: list = field(default_factory=list)  # per layer: mass error / top-k error at the chosen T
    fit_loss: list = field(default_factory=list)  # per layer: KL curve


class _Clock:
    def __init__(self, report: QuickReport):
        self.report = report

    @contextmanager
    def __call__(self, name: str):
        w0, c0 = time.perf_counter(), time.process_time()
        yield
        self.report.seconds[name] = round(time.perf_counter() - w0, 2)
        self.report.cpu_seconds[name] = round(time.process_time() - c0, 2)


def quick_routers(model, tokenizer, cfg: QuickConfig = QuickConfig(), progress: bool = True) -> QuickReport:
    """Steps 2–4 on a converted model (in place): fitted routers with one folded temperature per layer."""
    from prunepath.data import calibration_batches

    report = QuickReport(config=asdict(cfg))
    clock = _Clock(report)
    ffns = prunepath_ffns(model)
    with clock("capture"):
        ids = calibration_batches(tokenizer, cfg.tokens, cfg.seq_len, seed=cfg.seed)
        xs, norms = capture_ffn_io(model, ids)
    n_fit = xs[0].shape[0] - cfg.holdout
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(xs[0].shape[0], generator=g)
    fit_rows, hold_rows = order[:n_fit], order[n_fit:]
    fit_s = tune_s = 0.0
    for i, f in enumerate(ffns):
        t0 = time.perf_counter()
        report.fit_loss.append(fit_router(f.router, xs[i][fit_rows], norms[i][fit_rows], cfg, seed=cfg.seed + i))
        t1 = time.perf_counter()
        x_hold = xs[i][hold_rows]
        with torch.no_grad():
            w = next(f.router.parameters())
            z = f.router(x_hold.to(w.device, w.dtype)).float().cpu()
        t, scores = choose_temperature(z, expert_gram(f, x_hold), cfg)
        fold_temperature(f.router, t)
        report.temperatures.append(t)
        report.relative_error.append(round(scores[t], 4))
        fit_s, tune_s = fit_s + t1 - t0, tune_s + time.perf_counter() - t1
        if progress:
            print(f"layer {i:>2}: KL {report.fit_loss[-1][0]:.3f} -> {report.fit_loss[-1][-1]:.3f}, T = {t:g}, "
                  f"mass error / top-k error {scores[t]:.3f}", flush=True)
    report.seconds.update(fit=round(fit_s, 2), temperature=round(tune_s, 2))
    return report


CALIBRATION_TOKENS = 2048  # step 5: the text `prunepath calibrate` uses (calibration text, 256-token windows, seed 1)


def run_quick(model_name: str, out, cfg: QuickConfig = QuickConfig(), device: str = "cpu",
              progress: bool = True) -> QuickReport:
    """Convert `model_name`, fit its routers (steps 2–4), calibrate per-layer τ (step 5), save to `out`."""
    import prunepath
    from prunepath.checkpoint import save_calibration
    from prunepath.convert import MoefyConfig
    from prunepath.data import calibration_batches
    from prunepath.routing.calibrate import calibrate_tau

    out = Path(out)
    if (out / "prunepath.json").is_file():
        raise ValueError(f"{out} already holds a checkpoint; choose another --out (or remove it)")
    w0, c0 = time.perf_counter(), time.process_time()
    model, tok = prunepath.load_model(model_name, device=device)
    model = prunepath.moefy(model, MoefyConfig(router_init="centroid", gate="one", rule=routing.CumulativeMass(0.9),
                                               seed=cfg.seed), progress=progress)
    convert_s = (round(time.perf_counter() - w0, 2), round(time.process_time() - c0, 2))
    report = quick_routers(model, tok, cfg, progress=progress)
    report.seconds["load_convert"], report.cpu_seconds["load_convert"] = convert_s
    info = {"recipe": "quick", "objective": "share KL + per-layer temperature", **asdict(report)}
    prunepath.save(model, out, train_info=info)
    clock = _Clock(report)
    with clock("calibrate"):
        ids = calibration_batches(tok, CALIBRATION_TOKENS, 256, seed=1)
        results = [calibrate_tau(model, ids, f) for f in cfg.fractions]
    save_calibration(out, results, {
        "adapter": False, "tokens": int(ids.numel()), "source": "calibration text, 256-token windows, seed 1",
        "dtype": "fp32", "tol": 0.005, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "prunepath train --recipe quick",
    })
    report.seconds["total"] = round(time.perf_counter() - w0, 2)
    report.cpu_seconds["total"] = round(time.process_time() - c0, 2)
    (out / "quick_log.json").write_text(json.dumps({**asdict(report), "calibration": results}, indent=1) + "\n")
    if progress:
        fr = ", ".join(f"{r['target']:g}: {r['per_layer_active_fraction']:.3f}" for r in results)
        print(f"quick recipe: {report.seconds['total']:.0f} s wall, {report.cpu_seconds['total']:.0f} s CPU; "
              f"per-layer τ calibrated ({fr}); checkpoint in {out}")
    return report
