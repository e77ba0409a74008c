"""What the explorer shows besides the live prompt: figures of the committed sweep curves, and live decode
speed. Plain functions, no GUI import.

The rows and the recorded benchmarks come from `prunepath.results` (`sweep_rows`, `decode_benchmarks`): one
number per row (method, knob, active_fraction, task, metric, value), each with its file, device and date; we
show what they recorded and never retype a number.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from dataclasses import dataclass

import torch

from prunepath import routing
from prunepath.explore.explorer import apply_rule
from prunepath.routing.control import set_gate

# Methods whose knob is τ: their rows trace the curve the τ slider moves along.
TAU_METHODS = ("prunepath", "prunepath-tau")
LOWER_IS_BETTER = ("perplexity", "nll")


def _interp(x: float, xs: list[float], ys: list[float]) -> float | None:
    """Linear interpolation of ys at x over increasing xs; None outside the range."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[0] if len(xs) == 1 and abs(x - xs[0]) < 1e-9 else None


# One colour per method in every figure; PrunePath's curves in the strong red the τ marker uses.
_PALETTE = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#ff7f0e")
_FIXED = {"prunepath": "#d62728", "prunepath-tau": "#ff9896", "dense": "#000000"}


def _color(method: str) -> str:
    if method in _FIXED:
        return _FIXED[method]
    return _PALETTE[sum(map(ord, method)) % len(_PALETTE)]  # stable across runs (str hash is salted)


# The figures shown first: each task's headline metric, in this order; then every other (task, metric).
MAIN_METRICS = (("wikitext2", "perplexity"), ("sst2", "accuracy"), ("ifeval", "prompt_strict"),
                ("boolq", "accuracy"), ("rte", "accuracy"))


def sweep_figures(rows: list[dict], tau: float | None, active_fraction: float | None,
                  train: dict | None = None) -> list[dict]:
    """One plotly figure (dict) per (source, task, metric): metric versus measured active fraction, one
    line per method, the current active fraction as a dashed line and the current τ as a star on the
    PrunePath curve (interpolated between the τ values the sweep measured).

    train: the loaded checkpoint's training record (`model.prunepath_train_info`). The sweeps that measured
    that very checkpoint come first and say so in their title; then the others, which describe other
    checkpoints. Within each, headline metrics (MAIN_METRICS) before the rest.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["source"], r["task"], r["metric"]), []).append(r)

    # a file's rows share one "trained" list, so whether it measured the loaded checkpoint is known per group
    mine = {key: bool(train) and train in rs[0].get("trained", ()) for key, rs in groups.items()}

    def order(key):
        source, task, metric = key
        main = MAIN_METRICS.index((task, metric)) if (task, metric) in MAIN_METRICS else len(MAIN_METRICS)
        return (not mine[key], main, source, task, metric)

    figs = []
    for source, task, metric in sorted(groups, key=order):
        rs = groups[(source, task, metric)]
        data = []
        for method in sorted({r["method"] for r in rs}, key=lambda m: (m not in TAU_METHODS, m)):
            pts = sorted((r["active_fraction"], r["value"]) for r in rs if r["method"] == method)
            data.append({"type": "scatter", "mode": "lines+markers", "name": method,
                         "x": [p[0] for p in pts], "y": [p[1] for p in pts],
                         "line": {"color": _color(method), "width": 3 if method in TAU_METHODS else 1.5}})
        shapes, notes, note = [], [], ""
        if active_fraction is not None:
            shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": active_fraction,
                           "x1": active_fraction, "y0": 0, "y1": 1, "line": {"dash": "dash", "color": "#d62728"}})
            notes.append({"x": active_fraction, "y": 1, "xref": "x", "yref": "paper", "yanchor": "bottom",
                          "text": f"this prompt: {active_fraction:.0%}", "showarrow": False,
                          "font": {"size": 10, "color": "#d62728"}})
        taus = sorted((float(r["knob"]), r["active_fraction"], r["value"]) for r in rs
                      if r["method"] in TAU_METHODS and isinstance(r.get("knob"), (int, float)))
        if tau is not None and taus:
            x = _interp(tau, [t[0] for t in taus], [t[1] for t in taus])
            y = _interp(tau, [t[0] for t in taus], [t[2] for t in taus])
            if x is not None and y is not None:
                data.append({"type": "scatter", "mode": "markers", "name": f"τ = {tau:.2f}", "x": [x], "y": [y],
                             "marker": {"symbol": "star", "size": 16, "color": "#d62728"}})
            elif len({t[0] for t in taus}) == 1:
                note = f" (the sweep has only τ = {taus[0][0]:.2f} so far)"
            else:
                note = f" (τ = {tau:.2f} is outside the swept τ {taus[0][0]:.2f}–{taus[-1][0]:.2f})"
        better = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
        whose = "this checkpoint: " if mine[(source, task, metric)] else ("another checkpoint: " if train else "")
        figs.append({"data": data, "layout": {
            "title": {"text": f"{task} {metric} ({better}){note}<br><sup>{whose}{source}</sup>", "font": {"size": 13}},
            "xaxis": {"title": {"text": "mean active FFN fraction"}, "range": [0, 1.02]},
            "yaxis": {"title": {"text": metric}, "type": "log" if metric == "perplexity" else "linear"},
            "shapes": shapes, "annotations": notes, "height": 320, "margin": {"l": 55, "r": 10, "t": 55, "b": 45},
            "legend": {"font": {"size": 10}},
        }})
    return figs


# ---------------------------------------------------------------------------------------------------
# decode speed


@dataclass(frozen=True)
class LiveSpeed:
    device: str
    dense_tokens_per_s: float
    prunepath_tokens_per_s: float
    spec: str
    how: str  # which loop measured it


class _GPUDecoders:
    """Our decode loops on CUDA for one explorer: the base model (dense) and a bf16 copy of the PrunePath
    model, each in a prunepath.decode.loop.Decoder (static cache, CUDA graph, Triton fast paths)."""

    def __init__(self, explorer):
        from prunepath.decode.loop import DecodeConfig, Decoder
        from prunepath.models import load_model, model_reference

        dense, _ = load_model(model_reference(explorer.model), dtype=torch.bfloat16, device="cuda")
        with explorer._lock:
            sparse = copy.deepcopy(explorer.model).to("cuda", torch.bfloat16)
        cfg = DecodeConfig(max_new_tokens=128)
        self.dense, self.sparse = Decoder(dense, 512, cfg), Decoder(sparse, 512, cfg)
        self.gate = explorer.gate
        self.lock = threading.Lock()


def live_decode_speed(explorer, rule, n_tokens: int = 64) -> LiveSpeed:
    """Tokens/s of our dense and PrunePath decode loops (prunepath.decode) on CUDA, measured now.

    Raises RuntimeError with the reason when there is no GPU or the decode loop is missing; the page
    then shows the recorded benchmark and the CPU figure from the continuations instead.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU on this machine")
    try:
        import prunepath.decode  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"the decode loop (prunepath.decode) is not available: {e}") from None
    with _GPU_LOCK:
        gpu = getattr(explorer, "_gpu_decoders", None)
        if gpu is None:
            gpu = explorer._gpu_decoders = _GPUDecoders(explorer)
    ids = explorer.tokenizer("The quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids.cuda()
    t0 = time.perf_counter()
    with gpu.lock:
        dense = gpu.dense.time_decode(ids, n_tokens)["tokens_per_s"]
        apply_rule(gpu.sparse.model, rule)
        set_gate(gpu.sparse.model, "one" if isinstance(rule, routing.Dense) else gpu.gate)
        sparse = gpu.sparse.time_decode(ids, n_tokens)["tokens_per_s"]
    if not (math.isfinite(dense) and math.isfinite(sparse)):
        raise RuntimeError("the decode loop returned no figure")
    return LiveSpeed(torch.cuda.get_device_name(), float(dense), float(sparse), rule.spec,
                     f"prunepath.decode loop, bf16, batch 1, {n_tokens} tokens, measured in "
                     f"{time.perf_counter() - t0:.1f} s")


_GPU_LOCK = threading.Lock()
