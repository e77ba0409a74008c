"""A sweep's table and figure, written from its rows."""

from __future__ import annotations

from pathlib import Path


def _fmt(v) -> str:
    if isinstance(v, list):  # per-layer knobs: their range
        return f"{min(v):.3g}..{max(v):.3g}"
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def write_table(rows: list[dict], path: Path) -> Path:
    """Markdown table: one line per (method, target fraction), one column per (task, metric)."""
    cols = sorted({(r["task"], r["metric"]) for r in rows})
    keys = []
    for r in rows:
        k = (r["method"], r["target_fraction"])
        if k not in keys:
            keys.append(k)
    lines = [
        "| method | target | knob | active fraction (measured) | " + " | ".join(f"{t} {m}" for t, m in cols) + " |",
        "|" + "---|" * (4 + len(cols)),
    ]
    for method, target in keys:
        rs = [r for r in rows if r["method"] == method and r["target_fraction"] == target]
        cell = {(r["task"], r["metric"]): r["value"] for r in rs}
        frac = ", ".join(sorted({f"{r['active_fraction']:.3f}" for r in rs}))
        vals = " | ".join(f"{cell[c]:.4g}" if c in cell else "" for c in cols)
        lines.append(f"| {method} | {_fmt(target)} | {_fmt(rs[0]['knob'])} | {frac} | {vals} |")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_figure(rows: list[dict], path: Path, meta: dict | None = None) -> Path | None:
    """Plotly HTML: one panel per (task, metric), metric versus measured active fraction, one line per method."""
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:
        return None
    panels = sorted({(r["task"], r["metric"]) for r in rows})
    if not panels:
        return None
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[f"{t}: {m}" for t, m in panels])
    methods = sorted({r["method"] for r in rows})
    palette = [
        "#1f77b4",
        "#d62728",
        "#2ca02c",
        "#ff7f0e",
        "#9467bd",
        "#8c564b",
        "#e377c2",
        "#7f7f7f",
        "#17becf",
    ]
    for j, (task, metric) in enumerate(panels, start=1):
        for i, method in enumerate(methods):
            pts = sorted(
                (r["active_fraction"], r["value"], r["knob"])
                for r in rows
                if r["task"] == task and r["metric"] == metric and r["method"] == method
            )
            if not pts:
                continue
            mode = "markers" if method == "dense" else "lines+markers"
            fig.add_trace(
                go.Scatter(
                    x=[p[0] for p in pts],
                    y=[p[1] for p in pts],
                    mode=mode,
                    name=method,
                    legendgroup=method,
                    showlegend=j == 1,
                    marker=dict(color=palette[i % len(palette)], size=9),
                    text=[f"knob {_fmt(p[2])}" for p in pts],
                ),
                row=1,
                col=j,
            )
        fig.update_xaxes(title_text="mean active FFN fraction", row=1, col=j)
        if metric == "perplexity":
            fig.update_yaxes(type="log", row=1, col=j)
    meta = meta or {}
    fig.update_layout(
        title=f"PrunePath vs baselines — {meta.get('checkpoint', '')} on {meta.get('device', '')}",
        height=450,
        width=420 * len(panels) + 150,
    )
    fig.write_html(path, include_plotlyjs="cdn")
    return path
