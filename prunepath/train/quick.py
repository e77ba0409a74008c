"""The quick recipe: usable routers for a new model in minutes on a CPU (`prunepath train --recipe quick`).

PrunePath (Gu, Fu, Yuan 2026) keeps, for each token, its most probable experts until their softmax mass reaches τ.
What that mass should mean decides how experts are shared out between tokens. Distilling the router towards each
expert's share of the FFN output (p_e ≈ ||y_e|| / Σ ||y_e'||) makes mass mean share, so every token keeps the same
share of its output; but the tokens whose FFN output is largest are also the ones whose output sits in a few experts,
so mass gives them the fewest experts and the largest absolute error. Measured on SmolLM2-135M with the true expert
norms (no router at all) at 50 % active: top-k by norm 87 WikiText-2 perplexity, cumulative mass over norm shares
244, over squared norms 383, over norms^0.5 83; one absolute norm threshold per layer 62 (results/README.md, recipes).
Mass over a flatter distribution, p_e ∝ ||y_e||^β with β < 1, gives back what the share took away.

So the router is fitted to the *logarithm* of each expert's output norm and the softmax is tempered:

    z = W x ≈ β · (log ||y_e|| − mean_e' log ||y_e'||),   softmax(z)_e ≈ ||y_e||^β / Σ_e' ||y_e'||^β

W is the closed-form ridge regression of the centred log norms on the FFN inputs (a least-squares solve per layer,
seconds, no backbone gradient), then multiplied by β (a softmax temperature T = 1/β, folded into the weight, so the
checkpoint is an ordinary one). The regression ranks every expert of every token (a KL fit to the share only learns
the few experts that hold most of the mass, and top-k with such a router ranks the rest badly). Per-layer τ is then
calibrated for the target fractions and stored in the checkpoint; `prunepath.set_active_fraction(model, f)` turns
the one knob. Held-out check on SmolLM2-135M (WikiText-2 *valid*, 4,096 tokens, same routers for both rules), log-norm
routers with β = 0.5: top-k / per-layer τ perplexity 9145 / 13496 at 25 %, 149.0 / 142.7 at 50 %, 44.7 / 44.8 at
75 %; the share-distilled routers of the previous recipe: 158.5 / 623 at 50 % (at T = 1). β = 0.25 gave 11,684 at
25 % and 143.4 at 50 %: no β of the grid beats top-k at 25 %, where every token is short of experts and any
variation of the count costs more where it takes than it gains where it gives.

The regression ranks experts but was fitted to norms, not to the loss: the two rules came out level within text
noise. So, stage 2 of the paper, the routers are then trained end to end (backbone frozen) through the selection
itself on a distillation loss, every step at a target fraction drawn from `fractions` with each layer's τ matched to it
on the batch (`prunepath.train.router_tune`: straight-through unit gates, so the forward is the evaluated model).
The small fractions get most of the steps (f drawn with probability ∝ f^-2: 74 / 18 / 8 % of the steps at 25 / 50 /
75 %): there every token is short of experts and an allocation that is a little off costs the most, and training
there was far from done. Held-out check on SmolLM2-135M (WikiText-2 *valid*, first 16,384 tokens, top-k / per-layer
τ on the same routers, per-layer τ recalibrated): after 600 s with the fractions drawn equally often, 1147 / 1390
(+21 %) at 25 %, 59.1 / 58.1 at 50 %, 22.89 / 22.88 at 75 %; 300 s more at 25 % only, 557 / 587 (+5 %), 61.3 / 59.4,
23.11 / 23.06: the gap at 25 % shrank fourfold and the others held.

What was left at 25 % was the attention sink (the first token of a window): the training drives its softmax to one
expert in a few layers (top-1 mass 0.61 / 0.68 in SmolLM2's layers 2 / 28), so cumulative mass keeps 1 expert for it
where top-k keeps 12. `tune_peak_bound` b bounds every token's top-1 mass during training (`router_tune`, "Peak
bound"); it is off by default because it did not hold on both models. Same 900-s recipe, top-k / per-layer τ at 25 /
50 / 75 % (2026-12-03, 2-core CPU):
- SmolLM2, b = 0.2, weight 100 (sink's top-1 mass only down to 0.52 / 0.44): valid (first 16,384 tokens) 644.6 /
  726.9, 57.57 / 56.41, 22.88 / 22.93; test (first 4,096) 562.3 / 578.9, 92.21 / 92.41, 37.00 / 37.34.
- SmolLM2, b = 0.25, weight 10⁴ (sink at most 0.24 in every layer): valid 657.0 / 684.0 (+4.1 %), 62.84 / 59.11,
  23.34 / 23.11; test 632.8 / 626.3 (at 0.2515 active), 93.52 / 91.38, 37.72 / 37.90 (+0.5 %).
- Gemma 3 270M, b = 0.25, weight 10⁴: valid (first 4,096) 322.4 / 314.5, 126.3 / 130.7, 65.48 / 67.51; test 168.5 /
  184.5 (+9.5 %), 65.16 / 65.71 (+0.9 %), 38.75 / 37.38; without the bound (the record) 147.1 / 140.4, 55.56 / 53.91,
  39.03 / 38.43.
The bound repairs the sink and moves SmolLM2's miss from 25 % to 75 %, and costs Gemma 3 two cells and 15 % of top-k's
perplexity at 25 %: between runs the rules' order moves by several per cent, and the bound is not worth its price.

Steps (each timed in the run's log):
1. convert: balanced k-means experts of 32 neurons, routers from the cluster centres, unit gates (exact when dense);
2. one dense pass over `tokens` of calibration text through the model body (no LM head: with a 262k vocabulary the
   head costs more than the body): every FFN's input and each expert's true output norm, taken from the activations
   the forward computes anyway;
3. per layer, the ridge regression of the centred log norms on the inputs (`holdout` rows left out to measure it),
   scaled by β;
4. `tune_seconds` of router training through the cumulative-mass selection (KL to the dense model), most steps at
   the smallest fraction (`tune_fraction_power`; optionally no token's top-1 mass above `tune_peak_bound`);
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

from prunepath import routing
from prunepath.ffn.module import prunepath_ffns
from prunepath.routing.calibrate import model_body
from prunepath.routing.control import routing_kept, set_gate


@dataclass(frozen=True)
class QuickConfig:
    tokens: int = 8192  # calibration-text tokens cached in the dense pass
    seq_len: int = 256
    holdout: int = 2048  # of those, the tokens the fit is measured on (not fitted on)
    ridge: float = 1e-3  # ridge penalty, relative to the mean diagonal of XᵀX
    power: float = 0.5  # β: softmax(z) ∝ ||y_e||^β (a folded softmax temperature T = 1/β)
    fractions: tuple[float, ...] = (0.25, 0.5, 0.75)  # where per-layer τ is calibrated and stored
    tune_seconds: float = 900.0  # step 4: end-to-end router training budget (wall seconds; 0 skips it)
    tune_lr: float = 1e-3
    tune_tokens: int = 65536  # calibration text the training batches are drawn from
    tune_fraction_power: float = 2.0  # step 4 draws fraction f with probability ∝ f^-power (0: all equally often)
    tune_peak_bound: float = 0.0  # step 4 penalises a token's top-1 mass above this (the attention sink; 0: off)
    tune_peak_weight: float = 1e4  # weight of that penalty against the KL (when tune_peak_bound > 0)
    calibration_tol: float = 0.001  # step 5: per-layer τ within this of each target fraction on calibration text
    seed: int = 0

    def __post_init__(self):
        for name in ("tokens", "seq_len", "tune_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.holdout < self.tokens:
            raise ValueError(f"holdout must lie in (0, tokens={self.tokens}), got {self.holdout}")
        if not (self.ridge >= 0 and math.isfinite(self.ridge)):
            raise ValueError(f"ridge must be a number >= 0, got {self.ridge}")
        if not (self.power > 0 and math.isfinite(self.power)):
            raise ValueError(f"power must be a number > 0 (0.5: softmax over the square roots of the expert norms), "
                             f"got {self.power}")
        if not self.fractions or not all(0 < f < 1 for f in self.fractions):
            raise ValueError(f"fractions must lie in (0, 1), got {self.fractions}")
        if not 0 < self.calibration_tol < 0.05:
            raise ValueError(f"calibration_tol must lie in (0, 0.05), got {self.calibration_tol}")
        self.tune_config()  # its checks name the tune_* field at fault

    def tune_config(self):
        from prunepath.train.router_tune import TuneConfig

        try:
            if not (self.tune_fraction_power >= 0 and math.isfinite(self.tune_fraction_power)):
                raise ValueError(f"fraction_power must be a number >= 0 (0: every fraction equally often), "
                                 f"got {self.tune_fraction_power}")
            weights = tuple(f ** -self.tune_fraction_power for f in self.fractions) if self.tune_fraction_power else ()
            return TuneConfig(seconds=self.tune_seconds, lr=self.tune_lr, fractions=self.fractions,
                              fraction_weights=weights, peak_bound=self.tune_peak_bound,
                              peak_weight=self.tune_peak_weight, seed=self.seed)
        except ValueError as err:
            raise ValueError(f"tune_{err}") from None


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
# step 3: the router regresses the centred log norms


def log_norm_target(norms: torch.Tensor) -> torch.Tensor:
    """log ||y_e|| minus its mean over the token's experts (softmax of it is the share).  # [N, E]

    A norm of exactly 0 (an expert none of whose neurons fire) is floored at 1e-6 of the token's mean norm."""
    n = norms.float()
    floor = 1e-6 * n.mean(-1, keepdim=True) + 1e-30
    y = torch.maximum(n, floor).log()
    return y - y.mean(-1, keepdim=True)


@torch.no_grad()
def fit_log_norm_router(router, x: torch.Tensor, norms: torch.Tensor, ridge: float = 1e-3) -> None:
    """Set a linear router's weight to the ridge regression of `log_norm_target(norms)` [N, E] on x [N, D].

    W = Yᵀ X (XᵀX + λ I)⁻¹ with λ = ridge · mean diag(XᵀX), solved in float64 (one D x D solve per layer)."""
    w = getattr(router, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or tuple(w.shape) != (norms.shape[-1], x.shape[-1]):
        raise ValueError(f"the quick recipe fits a linear router (weight [E, D]); got {type(router).__name__}. "
                         "Fix: convert with router='linear' (the default)")
    xd = x.double()
    gram = xd.T @ xd  # [D, D]
    lam = ridge * float(gram.diagonal().mean())
    gram.diagonal().add_(lam)
    rhs = xd.T @ log_norm_target(norms).double()  # [D, E]
    w.copy_(torch.linalg.solve(gram, rhs).T.to(w.dtype))


@torch.no_grad()
def relative_fit_error(router, x: torch.Tensor, norms: torch.Tensor) -> float:
    """||router(x) − target||² / ||target||² over rows x [N, D] (1 = no better than predicting the mean)."""
    w = next(router.parameters())
    y = log_norm_target(norms)
    z = router(x.to(w.device, w.dtype)).float().cpu()
    return float((z - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30))


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
    temperatures: list = field(default_factory=list)  # per layer: the folded softmax temperature 1/β
    relative_error: list = field(default_factory=list)  # per layer: the fit's relative squared error on held-out rows
    tune: dict = field(default_factory=dict)  # step 4: steps, tokens, KL per fraction at the start and the end

    @classmethod
    def from_log(cls, log: dict) -> QuickReport:
        """The report stored in a checkpoint's quick_log.json (read as a dict)."""
        return cls(**{k: log[k] for k in cls.__dataclass_fields__})


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
    """Steps 2–4 on a converted model (in place): log-norm routers with the temperature 1/β folded in, then
    trained end to end through the selection for `cfg.tune_seconds` (`prunepath.train.router_tune`)."""
    from prunepath.data import calibration_batches

    report = QuickReport(config=asdict(cfg))
    clock = _Clock(report)
    ffns = prunepath_ffns(model)
    with clock("capture"):
        ids = calibration_batches(tokenizer, cfg.tokens, cfg.seq_len, seed=cfg.seed)
        xs, norms = capture_ffn_io(model, ids)
    n_fit = xs[0].shape[0] - cfg.holdout
    order = torch.randperm(xs[0].shape[0], generator=torch.Generator().manual_seed(cfg.seed))
    fit_rows, hold_rows = order[:n_fit], order[n_fit:]
    with clock("fit"):
        for i, f in enumerate(ffns):
            fit_log_norm_router(f.router, xs[i][fit_rows], norms[i][fit_rows], cfg.ridge)
            report.relative_error.append(round(relative_fit_error(f.router, xs[i][hold_rows], norms[i][hold_rows]), 4))
            fold_temperature(f.router, 1.0 / cfg.power)
            report.temperatures.append(1.0 / cfg.power)
            if progress:
                print(f"layer {i:>2}: log-norm fit, held-out relative error {report.relative_error[-1]:.3f}",
                      flush=True)
    del xs, norms
    if cfg.tune_seconds > 0:
        from prunepath.train.router_tune import tune_routers

        with clock("tune"):
            ids = calibration_batches(tokenizer, cfg.tune_tokens, cfg.seq_len, seed=cfg.seed + 3)
            report.tune = tune_routers(model, ids, cfg.tune_config(), log=print if progress else None)
    return report


CALIBRATION_TOKENS = 2048  # step 5: the text `prunepath calibrate` uses (calibration text, 256-token windows, seed 1)
CALIBRATION_ROUNDS = 8  # step 5: real-forward refinements of per-layer τ at most


def calibrate_quick(model, tokenizer, out, cfg: QuickConfig) -> list[dict]:
    """Step 5: per-layer (and global) τ for each of cfg.fractions within cfg.calibration_tol on calibration text,
    stored in the checkpoint at `out`. Matched-fraction comparisons need it tight: on SmolLM2 a per-layer τ at 0.497
    instead of 0.5 costs about 0.9 % perplexity, the size of the difference between the two rules."""
    from prunepath.checkpoint import save_calibration
    from prunepath.data import calibration_batches
    from prunepath.routing.calibrate import calibrate_tau

    ids = calibration_batches(tokenizer, CALIBRATION_TOKENS, 256, seed=1)
    results = [calibrate_tau(model, ids, f, tol=cfg.calibration_tol, rounds=CALIBRATION_ROUNDS)
               for f in cfg.fractions]
    save_calibration(out, results, {
        "adapter": False, "tokens": int(ids.numel()), "source": "calibration text, 256-token windows, seed 1",
        "dtype": "fp32", "tol": cfg.calibration_tol, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "prunepath train --recipe quick",
    })
    return results


def recalibrate(out, cfg: QuickConfig = QuickConfig(), device: str = "cpu") -> dict:
    """Run step 5 again on a quick checkpoint at `out` (e.g. with another calibration_tol); its quick_log.json
    gets the new calibration, the new step-5 time, and a total of the stored steps 1–4 plus the new step 5."""
    import prunepath

    out = Path(out)
    log = json.loads((out / "quick_log.json").read_text())
    model, tok = prunepath.load(str(out), device=device)
    report = QuickReport.from_log(log)
    old = report.seconds.get("calibrate", 0.0), report.cpu_seconds.get("calibrate", 0.0)
    with _Clock(report)("calibrate"):
        results = calibrate_quick(model, tok, out, cfg)
    report.seconds["total"] = round(report.seconds["total"] - old[0] + report.seconds["calibrate"], 2)
    report.cpu_seconds["total"] = round(report.cpu_seconds["total"] - old[1] + report.cpu_seconds["calibrate"], 2)
    report.config = {**report.config, "calibration_tol": cfg.calibration_tol}
    log = {**log, **asdict(report), "calibration": results,
           "recalibrated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / "quick_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return log


def run_quick(model_name: str, out, cfg: QuickConfig = QuickConfig(), device: str = "cpu",
              progress: bool = True) -> QuickReport:
    """Convert `model_name`, fit and train its routers (steps 2–4), calibrate per-layer τ (step 5), save to `out`."""
    import prunepath
    from prunepath.convert import MoefyConfig

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
    info = {"recipe": "quick", "objective": "log-norm ridge regression, softmax temperature 1/β"
            + (", then KL distillation through the cumulative-mass selection" if cfg.tune_seconds > 0 else ""),
            **asdict(report)}
    prunepath.save(model, out, train_info=info)
    with _Clock(report)("calibrate"):
        results = calibrate_quick(model, tok, out, cfg)
    report.seconds["total"] = round(time.perf_counter() - w0, 2)
    report.cpu_seconds["total"] = round(time.process_time() - c0, 2)
    (out / "quick_log.json").write_text(json.dumps({**asdict(report), "calibration": results}, indent=1) + "\n")
    if progress:
        fr = ", ".join(f"{r['target']:g}: {r['per_layer_active_fraction']:.3f}" for r in results)
        print(f"quick recipe: {report.seconds['total']:.0f} s wall, {report.cpu_seconds['total']:.0f} s CPU; "
              f"per-layer τ calibrated ({fr}); checkpoint in {out}")
    return report
