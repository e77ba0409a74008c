"""What the explorer shows besides the live prompt: committed sweep curves, recorded GPU benchmarks,
and live decode speed. Plain functions, no GUI import.

Sweeps (`prunepath sweep`, sweep.py) write `results/<stem>.json` = {"meta": ..., "rows": [...]}, one
number per row: method, knob, active_fraction, task, metric, value. Benchmarks write JSON under
`results/bench/` with the device and the date; we show what they recorded and never retype a number.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from prunepath import routing

# Methods whose knob is τ: their rows trace the curve the τ slider moves along.
TAU_METHODS = ("prunepath", "prunepath-tau")
LOWER_IS_BETTER = ("perplexity", "nll")


def load_sweep_rows(results_dir: Path) -> list[dict]:
    """Every sweep row under `results_dir` (not results/bench), with its source file in row["source"]."""
    rows = []
    for path in sorted(Path(results_dir).glob("**/*.json")):
        if "bench" in path.relative_to(results_dir).parts[:-1] or path.name.startswith("bench"):
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a half-written file from a sweep in progress: skip it, show the rest
        for r in data.get("rows", []) if isinstance(data, dict) else []:
            if isinstance(r, dict) and {"method", "task", "metric", "value", "active_fraction"} <= r.keys():
                if isinstance(r["value"], (int, float)) and isinstance(r["active_fraction"], (int, float)):
                    rows.append({**r, "source": str(path.relative_to(results_dir))})
    return rows


def _interp(x: float, xs: list[float], ys: list[float]) -> float | None:
    """Linear interpolation of ys at x over increasing xs; None outside the range."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[0] if len(xs) == 1 and abs(x - xs[0]) < 1e-9 else None


def sweep_figures(rows: list[dict], tau: float | None, active_fraction: float | None) -> list[dict]:
    """One plotly figure (dict) per (source, task, metric): metric versus measured active fraction, one
    line per method, the current active fraction as a dashed line and the current τ as a star on the
    PrunePath curve (interpolated between the τ values the sweep measured)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["source"], r["task"], r["metric"]), []).append(r)
    figs = []
    for (source, task, metric), rs in sorted(groups.items()):
        data = []
        for method in sorted({r["method"] for r in rs}):
            pts = sorted((r["active_fraction"], r["value"]) for r in rs if r["method"] == method)
            data.append({"type": "scatter", "mode": "lines+markers", "name": method,
                         "x": [p[0] for p in pts], "y": [p[1] for p in pts]})
        shapes, note = [], ""
        if active_fraction is not None:
            shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": active_fraction,
                           "x1": active_fraction, "y0": 0, "y1": 1, "line": {"dash": "dash", "color": "#d62728"}})
        taus = sorted((float(r["knob"]), r["active_fraction"], r["value"]) for r in rs
                      if r["method"] in TAU_METHODS and isinstance(r.get("knob"), (int, float)))
        if tau is not None and taus:
            x = _interp(tau, [t[0] for t in taus], [t[1] for t in taus])
            y = _interp(tau, [t[0] for t in taus], [t[2] for t in taus])
            if x is not None and y is not None:
                data.append({"type": "scatter", "mode": "markers", "name": f"τ = {tau:.2f}", "x": [x], "y": [y],
                             "marker": {"symbol": "star", "size": 16, "color": "#d62728"}})
            else:
                note = f" (τ = {tau:.2f} is outside the swept τ {taus[0][0]:g}–{taus[-1][0]:g})"
        better = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
        figs.append({"data": data, "layout": {
            "title": {"text": f"{task} {metric} ({better}){note}<br><sup>{source}</sup>", "font": {"size": 13}},
            "xaxis": {"title": {"text": "mean active FFN fraction"}, "range": [0, 1.02]},
            "yaxis": {"title": {"text": metric}, "type": "log" if metric == "perplexity" else "linear"},
            "shapes": shapes, "height": 320, "margin": {"l": 55, "r": 10, "t": 55, "b": 45},
            "legend": {"font": {"size": 10}},
        }})
    return figs


# ---------------------------------------------------------------------------------------------------
# decode speed


@dataclass(frozen=True)
class RecordedBench:
    """One recorded benchmark file: where it ran, when, and its tokens/s figures."""

    source: str
    device: str
    date: str
    figures: tuple[tuple[str, float], ...]  # (what, tokens/s)


def _walk(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, (*path, str(k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            name = v.get("name") or v.get("label") or v.get("method") if isinstance(v, dict) else None
            yield from _walk(v, (*path, str(name) if name else str(i)))
    else:
        yield path, obj


def recorded_benchmarks(bench_dir: Path, limit: int = 12) -> list[RecordedBench]:
    """Decode tokens/s recorded under results/bench/*.json, each with its device and date."""
    out = []
    for path in sorted(Path(bench_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        meta = data.get("meta", data) if isinstance(data, dict) else {}
        device = str(meta.get("device") or meta.get("gpu") or (data.get("device") if isinstance(data, dict) else "")
                     or "unknown device")
        date = str(meta.get("date") or (data.get("date") if isinstance(data, dict) else "") or "unknown date")
        figs = [(" / ".join(p[:-1] + (p[-1],)), float(v)) for p, v in _walk(data)
                if p and isinstance(v, (int, float)) and not isinstance(v, bool)
                and any(s in p[-1].lower() for s in ("tokens_per_s", "tok_s", "tokens/s", "tok_per_s"))]
        if figs:
            out.append(RecordedBench(path.name, device, date, tuple(figs[:limit])))
    return out


@dataclass(frozen=True)
class LiveSpeed:
    device: str
    dense_tokens_per_s: float
    prunepath_tokens_per_s: float
    spec: str
    how: str  # which loop measured it


def live_decode_speed(explorer, rule: routing.Rule, n_tokens: int = 32) -> LiveSpeed:
    """Tokens/s of our dense and PrunePath decode loops on CUDA (prunepath.decode), measured now.

    Raises RuntimeError with the reason when there is no GPU or the decode loop is not available; the
    page then shows the recorded benchmark and the CPU figure from the continuations instead.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU on this machine")
    try:
        from prunepath import decode
    except ImportError as e:
        raise RuntimeError(f"the decode loop (prunepath.decode) is not available: {e}") from None
    bench = getattr(decode, "decode_tokens_per_s", None) or getattr(decode, "tokens_per_s", None)
    if bench is None:
        raise RuntimeError("prunepath.decode has no tokens/s entry point (decode_tokens_per_s)")
    ids = explorer.tokenizer("The quick brown fox", return_tensors="pt").input_ids
    t0 = time.perf_counter()
    with explorer._lock:
        dense = float(bench(explorer.model, ids, rule=routing.Dense(), n_tokens=n_tokens, device="cuda"))
        sparse = float(bench(explorer.model, ids, rule=rule, n_tokens=n_tokens, device="cuda"))
        explorer.model.to("cpu")
    if not (math.isfinite(dense) and math.isfinite(sparse)):
        raise RuntimeError("the decode benchmark returned no figure")
    return LiveSpeed(torch.cuda.get_device_name(), dense, sparse, rule.spec,
                     f"prunepath.decode, {n_tokens} tokens, {time.perf_counter() - t0:.1f} s")
