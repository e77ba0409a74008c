"""The trade-off figure: quality against the active FFN fraction, PrunePath beside every baseline.

One figure, shared by the book (chapter 5) and the explorer (its accuracy section), so that both show
the same curves in the same colours. Plain functions over tidy sweep rows (the rows `prunepath sweep`
writes: method, knob, active_fraction, task, metric, value, n, ...); no file reading and no GUI import.
The figures are plotly figure dicts: `plotly.graph_objects.Figure(fig)` in a notebook, a Panel Plotly
pane in the explorer.

Methods compared at the same *measured* mean active fraction (Gu, Fu, Yuan 2026, the trade-off curves):
PrunePath with one global τ and with one τ per layer, top-k experts (MoEfication), the same experts for
every token (static experts), static neuron pruning (Wanda-sp, FLAP), and the oracle, which keeps experts
by their true output norms: a reference no router can beat, not a deployable method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class MethodStyle:
    label: str
    color: str
    dash: str = "solid"
    width: float = 2.0
    symbol: str = "circle"


# In the legend's order. PrunePath in reds, the dynamic baseline in blue, static methods in muted tones.
METHODS: dict[str, MethodStyle] = {
    "prunepath-layer": MethodStyle("PrunePath, one τ per layer", "#d62728", width=3.5, symbol="diamond"),
    "prunepath": MethodStyle("PrunePath, one global τ", "#ff7f0e", width=3.0),
    "topk": MethodStyle("top-k experts (fixed count)", "#1f77b4", symbol="square"),
    "static-expert": MethodStyle("static experts (same for every token)", "#7f7f7f", symbol="triangle-up"),
    "wanda-sp": MethodStyle("Wanda-sp (static neurons)", "#2ca02c", symbol="x"),
    "flap": MethodStyle("FLAP (static neurons)", "#9467bd", symbol="cross"),
    "threshold": MethodStyle("sigmoid threshold (no budget)", "#8c564b", dash="dot"),
    "oracle": MethodStyle("oracle: true expert norms (reference)", "#111111", dash="dot", width=1.5),
}
HEADLINE_METHODS = ("prunepath-layer", "prunepath", "topk", "static-expert", "wanda-sp", "flap", "oracle")
# Methods whose knob is the global τ: the explorer's τ is marked on this curve.
TAU_METHOD = "prunepath"

TASK_NAMES = {"wikitext2": "WikiText-2", "sst2": "SST-2", "rte": "RTE", "boolq": "BoolQ", "ifeval": "IFEval",
              "alpaca": "Alpaca"}
METRIC_NAMES = {"perplexity": "perplexity", "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy",
                "next_token_accuracy": "next-token accuracy", "prompt_strict": "prompt-level strict accuracy",
                "inst_strict": "instruction-level strict accuracy", "prompt_loose": "prompt-level loose accuracy",
                "inst_loose": "instruction-level loose accuracy", "rougeL": "ROUGE-L"}
LOWER_IS_BETTER = ("perplexity", "nll")
# Counts, not qualities: never plotted as a trade-off.
NOT_A_QUALITY = ("n_prompts", "n_instructions")


def title_for(task: str, metric: str) -> str:
    """'WikiText-2 perplexity (lower is better)': a figure title in words, never a file name."""
    better = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
    return f"{TASK_NAMES.get(task, task)} {METRIC_NAMES.get(metric, metric.replace('_', ' '))} ({better})"


def rows_for_checkpoint(rows: list[dict], train: dict | None) -> list[dict]:
    """The rows of the sweeps that measured the checkpoint with this training record (its `train` entry
    in prunepath.json); every row when `train` is None. Rows carry the sweep's records in row["trained"]."""
    if not train:
        return list(rows)
    return [r for r in rows if train in (r.get("trained") or ())]


def tasks_measured(rows: list[dict]) -> list[tuple[str, str]]:
    """(task, headline metric) pairs with a trade-off to show: at least three sparse points (a single
    point is not a curve), in the order a reader wants them."""
    order = [("wikitext2", "perplexity"), ("sst2", "accuracy"), ("rte", "accuracy"), ("boolq", "accuracy"),
             ("ifeval", "prompt_strict"), ("alpaca", "rougeL")]
    sparse: dict[tuple[str, str], int] = {}
    for r in rows:
        if r["method"] != "dense":
            sparse[(r["task"], r["metric"])] = sparse.get((r["task"], r["metric"]), 0) + 1
    return [tm for tm in order if sparse.get(tm, 0) >= 3]


def pick_sweep(rows: list[dict], task: str, metric: str) -> list[dict]:
    """The rows of one sweep file (row["source"]) for (task, metric): where several files measured the
    same task with different protocols, the one with a spread between demonstration sets, then the one
    with the most methods and points."""
    by_source: dict[str, list[dict]] = {}
    for r in rows:
        if r["task"] == task and r["metric"] == metric:
            by_source.setdefault(r.get("source", ""), []).append(r)
    if not by_source:
        return []

    def score(rs):
        spread = any(r.get("per_set_accuracy") for r in rs)
        return spread, len({r["method"] for r in rs}), len(rs)

    return max(by_source.values(), key=score)


def measured_on(rows: list[dict]) -> str:
    """'301,653 tokens, <protocol>; NVIDIA H200 bf16, 2026-11-30': how a sweep was measured, for a subtitle."""
    r = next((x for x in rows if x["method"] == "dense"), rows[0] if rows else None)
    if r is None:
        return ""
    where = str(r.get("source", "")).partition(", ")[2] or str(r.get("device", ""))  # "NVIDIA H200 bf16"
    unit = "tokens" if r["metric"] in LOWER_IS_BETTER else "examples"
    n = f"{r['n']:,} {unit}, " if isinstance(r.get("n"), int) else ""
    return f"{n}{r.get('protocol', '')}; {where}, {str(r.get('date', ''))[:10]}"


def standard_error(value: float, n: int | None, metric: str) -> float | None:
    """One binomial standard error of an accuracy over n examples; None for other metrics."""
    if not n or metric in LOWER_IS_BETTER or not 0 <= value <= 1:
        return None
    return math.sqrt(value * (1 - value) / n)


def _interp(x: float, xs: list[float], ys: list[float]) -> float | None:
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def tau_point(rows: list[dict], tau: float) -> tuple[float, float] | None:
    """(active fraction, value) of the global-τ curve at `tau`, interpolated between the swept τ values;
    None outside them."""
    pts = sorted((float(r["knob"]), r["active_fraction"], r["value"]) for r in rows
                 if r["method"] == TAU_METHOD and isinstance(r.get("knob"), (int, float)))
    if len(pts) < 2:
        return None
    taus = [p[0] for p in pts]
    x, y = _interp(tau, taus, [p[1] for p in pts]), _interp(tau, taus, [p[2] for p in pts])
    return None if x is None or y is None else (x, y)


def tradeoff_figure(rows: list[dict], task: str = "wikitext2", metric: str = "perplexity", *,
                    methods: tuple[str, ...] = HEADLINE_METHODS, tau: float | None = None,
                    active_fraction: float | None = None, subtitle: str = "", height: int = 440) -> dict:
    """Quality against measured mean active FFN fraction, one line per method, dense as a dashed level.

    rows: sweep rows of one checkpoint and protocol (`pick_sweep`). Accuracies get error bars of one
    binomial standard error over the n examples. tau: the explorer's current τ, marked as a star on the
    global-τ curve; active_fraction: a vertical line where the current prompt routes.
    """
    rows = [r for r in rows if r["task"] == task and r["metric"] == metric]
    data, shapes, notes = [], [], []
    dense = [r["value"] for r in rows if r["method"] == "dense"]
    for method in [m for m in methods if m in METHODS]:
        pts = sorted((r["active_fraction"], r["value"], r.get("n")) for r in rows if r["method"] == method)
        if not pts:
            continue
        style = METHODS[method]
        trace = {"type": "scatter", "mode": "lines+markers", "name": style.label,
                 "x": [p[0] for p in pts], "y": [p[1] for p in pts],
                 "line": {"color": style.color, "width": style.width, "dash": style.dash},
                 "marker": {"symbol": style.symbol, "size": 8, "color": style.color},
                 "hovertemplate": f"{style.label}<br>%{{x:.1%}} active: %{{y:.3f}}<extra></extra>"}
        errors = [standard_error(p[1], p[2], metric) for p in pts]
        if all(e is not None for e in errors):
            trace["error_y"] = {"type": "data", "array": errors, "visible": True, "thickness": 1.2, "width": 3}
        data.append(trace)
    log = metric in LOWER_IS_BETTER
    if dense:
        # shapes and annotations on a log axis take log10 coordinates
        level = math.log10(dense[0]) if log and dense[0] > 0 else dense[0]
        shapes.append({"type": "line", "xref": "paper", "x0": 0, "x1": 1, "yref": "y", "y0": level,
                       "y1": level, "line": {"color": "#000", "dash": "dash", "width": 1}})
        notes.append({"xref": "paper", "x": 0.01, "yref": "y", "y": level, "yanchor": "bottom",
                      "xanchor": "left", "text": f"dense {dense[0]:.3g}", "showarrow": False,
                      "font": {"size": 11}})
    if active_fraction is not None:
        shapes.append({"type": "line", "xref": "x", "x0": active_fraction, "x1": active_fraction, "yref": "paper",
                       "y0": 0, "y1": 1, "line": {"color": "#d62728", "dash": "dot", "width": 1}})
    if tau is not None:
        at = tau_point(rows, tau)
        if at is not None:
            data.append({"type": "scatter", "mode": "markers", "name": f"τ = {tau:.2f} (this setting)",
                         "x": [at[0]], "y": [at[1]], "marker": {"symbol": "star", "size": 18, "color": "#d62728",
                                                                "line": {"color": "#000", "width": 1}}})
    title = title_for(task, metric) + (f"<br><sup>{subtitle}</sup>" if subtitle else "")
    return {"data": data, "layout": {
        "title": {"text": title, "font": {"size": 15}},
        "xaxis": {"title": {"text": "mean active FFN fraction (measured)"}, "tickformat": ".0%"},
        "yaxis": {"title": {"text": METRIC_NAMES.get(metric, metric)}, "type": "log" if log else "linear"},
        "shapes": shapes, "annotations": notes, "height": height, "template": "plotly_white",
        "margin": {"l": 60, "r": 10, "t": 70 if subtitle else 50, "b": 45},
        "legend": {"font": {"size": 11}},
    }}


def tradeoff_table(rows: list[dict], task: str = "wikitext2", metric: str = "perplexity",
                   fractions: tuple[float, ...] = (0.25, 0.5, 0.75),
                   methods: tuple[str, ...] = HEADLINE_METHODS) -> list[dict]:
    """One row per method: its value at each target fraction (the calibrated target, measured within a
    point or two of it), dense in its own row. For a short table beside the figure."""
    rows = [r for r in rows if r["task"] == task and r["metric"] == metric]
    out = []
    for method in [m for m in methods if m in METHODS]:
        got = {}
        for f in fractions:
            hits = [r["value"] for r in rows if r["method"] == method and r.get("target_fraction") is not None
                    and abs(r["target_fraction"] - f) < 1e-6]
            got[f"{f:.0%} active"] = hits[-1] if hits else None
        if any(v is not None for v in got.values()):
            out.append({"method": METHODS[method].label, **got})
    dense = [r["value"] for r in rows if r["method"] == "dense"]
    if dense:
        out.append({"method": "dense (every expert)", **{f"{f:.0%} active": None for f in fractions},
                    "100% active": dense[0]})
    return out


def value_at(rows: list[dict], method: str, *, tau: float | None = None,
             fraction: float | None = None) -> tuple[float, float] | None:
    """(active fraction, value) the recorded curve of `method` gives at this setting: the global-τ curve
    at `tau`, another method's curve at the measured `fraction`, interpolated between the swept points;
    dense's own value for "dense". None outside the swept range."""
    if method == "dense":
        dense = [r["value"] for r in rows if r["method"] == "dense"]
        return (1.0, dense[0]) if dense else None
    if method == TAU_METHOD and tau is not None:
        return tau_point(rows, tau)
    if fraction is None:
        return None
    pts = sorted((r["active_fraction"], r["value"]) for r in rows if r["method"] == method)
    y = _interp(fraction, [p[0] for p in pts], [p[1] for p in pts]) if len(pts) >= 2 else None
    return None if y is None else (fraction, y)


def change_vs_dense(value: float, dense: float, metric: str) -> str:
    """'+41.6 %' for a perplexity (relative), '−11.7 points' for an accuracy (absolute)."""
    if metric in LOWER_IS_BETTER:
        return f"{100 * (value / dense - 1):+.1f} %".replace("-", "−")
    return f"{100 * (value - dense):+.1f} points".replace("-", "−")
