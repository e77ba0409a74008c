"""Views of the results of record, made on demand (`prunepath report`), never committed.

    prunepath report                                 a Markdown table of every sweep of record
    prunepath report default_wikitext2_h200 --html out/   one sweep as a table and a plotly figure
    prunepath report results/bench/ffn_h200.json     a benchmark file as tables
    prunepath report --readme                        rewrite README.md's results table from the sweeps
    prunepath report --readme --check                fail (exit 1) if README.md's table has drifted from them
    prunepath report --figure                        the README's figure (results/figures/, needs matplotlib)

The README's table is made here from `results/sweeps/` (HEADLINE: which files, metrics, methods and
fractions), so it cannot drift from the files: a test runs `--readme --check`.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from prunepath import results

# The columns of a sweep row, in the order a CSV view lists them.
ROW_COLUMNS = ("method", "knob", "target_fraction", "active_fraction", "mean_experts", "task", "metric", "value",
               "n", "protocol", "experts_p10", "experts_p50", "experts_p90", "rule", "dtype", "device", "date")

# The README's table: the current default's headline figures, against top-k and the static baselines.
HEADLINE_ROWS = (  # (sweep of record, task, metric, label, lower is better)
    ("default_wikitext2_h200", "wikitext2", "perplexity", "WikiText-2 perplexity ↓", True),
    ("default_sst2-probe_h200", "sst2", "accuracy", "SST-2 accuracy, linear probe ↑", False),
    ("default_sst2-prompt-8sets_h200", "sst2", "accuracy", "SST-2 accuracy, 4-shot prompt, 8 sets ↑", False),
)
HEADLINE_METHODS = (("prunepath", "PrunePath τ"), ("prunepath-layer", "PrunePath τ per layer"), ("topk", "top-k"),
                    ("static-expert", "static experts"), ("wanda-sp", "Wanda-sp"), ("flap", "FLAP"))
HEADLINE_FRACTIONS = (0.75, 0.5, 0.25)
README_START, README_END = "<!-- results-table: made by `prunepath report --readme` -->", "<!-- /results-table -->"


def format_knob(v) -> str:
    """A method's knob for a table: a number, a per-layer range, or '-'."""
    if isinstance(v, list):  # per-layer knobs: their range
        return f"{min(v):.3g}..{max(v):.3g}"
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def sweep_table(sweep: results.Sweep) -> str:
    """Markdown: one line per (method, target fraction), one column per (task, metric)."""
    rows = sweep.rows
    cols = sorted({(r["task"], r["metric"]) for r in rows})
    keys = list(dict.fromkeys((r["method"], r["target_fraction"]) for r in rows))
    lines = [f"**{sweep.name}**: checkpoint {sweep.meta.get('checkpoint', '?')}, {sweep.meta.get('device', '?')} "
             f"{sweep.meta.get('dtype', '')}, {str(sweep.meta.get('date', '?'))[:10]}", "",
             "| method | target | knob | active fraction (measured) | "
             + " | ".join(f"{t} {m}" for t, m in cols) + " |",
             "|" + "---|" * (4 + len(cols))]
    for method, target in keys:
        rs = [r for r in rows if r["method"] == method and r["target_fraction"] == target]
        cell = {(r["task"], r["metric"]): r["value"] for r in rs}
        frac = ", ".join(sorted({f"{r['active_fraction']:.3f}" for r in rs
                                 if isinstance(r.get("active_fraction"), (int, float))}))
        vals = " | ".join(f"{cell[c]:.4g}" if isinstance(cell.get(c), (int, float)) else "" for c in cols)
        lines.append(f"| {method} | {format_knob(target)} | {format_knob(rs[0].get('knob'))} | {frac} | {vals} |")
    return "\n".join(lines)


def sweep_csv(sweep: results.Sweep, path: Path) -> Path:
    """The rows as CSV (ROW_COLUMNS)."""
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=ROW_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(sweep.rows)
    return path


_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf")


def sweep_figure(sweep: results.Sweep, path: Path) -> Path:
    """Plotly HTML: one panel per (task, metric), metric versus measured active fraction, one line per method."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = [r for r in sweep.rows if isinstance(r.get("active_fraction"), (int, float))
            and isinstance(r.get("value"), (int, float))]
    panels = sorted({(r["task"], r["metric"]) for r in rows})
    if not panels:
        raise ValueError(f"{sweep.path} has no rows with a value and an active fraction to plot")
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[f"{t}: {m}" for t, m in panels])
    methods = sorted({r["method"] for r in rows})
    for j, (task, metric) in enumerate(panels, start=1):
        for i, method in enumerate(methods):
            pts = sorted((r["active_fraction"], r["value"], format_knob(r.get("knob"))) for r in rows
                         if r["task"] == task and r["metric"] == metric and r["method"] == method)
            if pts:
                fig.add_trace(go.Scatter(
                    x=[p[0] for p in pts], y=[p[1] for p in pts],
                    mode="markers" if method == "dense" else "lines+markers",
                    name=method, legendgroup=method, showlegend=j == 1, text=[f"knob {p[2]}" for p in pts],
                    marker=dict(color=_PALETTE[i % len(_PALETTE)], size=9)), row=1, col=j)
        fig.update_xaxes(title_text="mean active FFN fraction", row=1, col=j)
        if metric == "perplexity":
            fig.update_yaxes(type="log", row=1, col=j)
    fig.update_layout(title=f"PrunePath vs baselines: {sweep.name} ({sweep.meta.get('checkpoint', '')} on "
                            f"{sweep.meta.get('device', '')})", height=450, width=420 * len(panels) + 150)
    fig.write_html(path, include_plotlyjs="cdn")
    return path


def headline_table() -> str:
    """The README's results table, from the sweeps of record (HEADLINE_*); the best figure of a row in bold."""
    head = "| | dense | " + " | ".join(label for _, label in HEADLINE_METHODS) + " |"
    lines = [head, "|---" * (2 + len(HEADLINE_METHODS)) + "|"]
    sources = []
    for name, task, metric, label, lower in HEADLINE_ROWS:
        sweep = results.load_sweep(name)
        values = sweep.values(task, metric)
        dense = values.get(("dense", None))
        sources.append(f"`results/sweeps/{sweep.path.name}` ({sweep.meta.get('device', '?')}, "
                       f"{sweep.meta.get('dtype', '?')}, {str(sweep.meta.get('date', '?'))[:10]})")
        for frac in HEADLINE_FRACTIONS:
            cells = [values.get((m, frac)) for m, _ in HEADLINE_METHODS]
            found = [v for v in cells if v is not None]
            if not found:
                raise ValueError(f"{sweep.path} has no {task} {metric} row at {frac:.0%} active for any of "
                                 f"{', '.join(m for m, _ in HEADLINE_METHODS)}")
            best = (min if lower else max)(found)
            digits = 2 if lower else 3
            text = ["—" if v is None else (f"**{v:.{digits}f}**" if v == best else f"{v:.{digits}f}") for v in cells]
            lines.append(f"| {label}, {frac:.0%} active | {'' if dense is None else f'{dense:.{digits}f}'} | "
                         + " | ".join(text) + " |")
    lines += ["", "From " + "; ".join(sources) + ". " + _against_dense() + "."]
    return "\n".join(lines)


FIGURE = "figures/tradeoff_default.svg"  # under results/: the README's figure, made by `prunepath report --figure`


def tradeoff_figure(path: Path | None = None) -> Path:
    """The README's figure: WikiText-2 perplexity of the default checkpoint against the measured active FFN fraction,
    PrunePath against top-k and the static baselines (`default_wikitext2_h200`), as a small SVG (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = results.load_sweep(HEADLINE_ROWS[0][0])
    path = Path(path) if path else results.results_dir(create=True) / FIGURE
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [r for r in sweep.rows if r.get("task") == "wikitext2" and r.get("metric") == "perplexity"]
    plt.rcParams["svg.hashsalt"] = "prunepath"  # the same file from the same rows
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for i, (method, label) in enumerate(HEADLINE_METHODS):
        pts = sorted((r["active_fraction"], r["value"]) for r in rows if r["method"] == method)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3.5, label=label, color=_PALETTE[i],
                    lw=2.2 if method.startswith("prunepath") else 1.2)
    dense = [r["value"] for r in rows if r["method"] == "dense"]
    if dense:
        ax.axhline(dense[0], color="black", lw=0.8, ls="--", label="dense")
    ax.set(yscale="log", xlabel="mean active FFN fraction (measured)", ylabel="WikiText-2 perplexity",
           title=f"SmolLM2-135M, default checkpoint: {sweep.meta.get('device', '?')}, {sweep.meta.get('dtype', '')}")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}" if v in (30, 50, 200) else ""))
    ax.title.set_fontsize(10)
    ax.legend(fontsize=7, ncol=2, frameon=False)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, format="svg", metadata={"Date": None, "Creator": "prunepath report --figure"})
    plt.close(fig)
    return path


def _against_dense() -> str:
    """The perplexity of one τ per layer and of the ground-truth oracle as multiples of dense, at 50 and 25 %."""
    name, task, metric = HEADLINE_ROWS[0][:3]
    values = results.load_sweep(name).values(task, metric)
    dense = values.get(("dense", None))
    parts = []
    for method, label in (("prunepath-layer", "τ per layer"), ("oracle", "the ground-truth oracle")):
        found = [f"{values[(method, f)] / dense:.2f}× at {f:.0%}" for f in (0.5, 0.25) if (method, f) in values]
        if dense and found:
            parts.append(f"{label} {' and '.join(found)}")
    return ("WikiText-2 perplexity against dense: " + "; ".join(parts)) if parts else "no dense row"


def readme_with_table(text: str) -> str:
    """README text with the block between README_START and README_END replaced by headline_table()."""
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"README.md has no results table block: put the lines {README_START!r} and "
                         f"{README_END!r} where the table goes")
    return text[: start + len(README_START)] + "\n" + headline_table() + "\n" + text[end:]


def readme_path() -> Path:
    """The README.md of the checkout the results folder belongs to."""
    return results.results_dir().parent / "README.md"


def bench_tables(data: dict) -> str:
    """A benchmark file as Markdown tables (decode or FFN)."""
    from prunepath.bench import report as bench_report

    return bench_report.decode_table(data) if data.get("kind") == "decode" else bench_report.ffn_table(data)


def run(args) -> int:
    if args.figure:
        print(f"wrote {tradeoff_figure()}")
        return 0
    if args.readme:
        path = Path(args.readme_file) if args.readme_file else readme_path()
        old = path.read_text()
        new = readme_with_table(old)
        if args.check:
            if new != old:
                print(f"{path}: the results table differs from results/sweeps/; run `prunepath report --readme`",
                      file=sys.stderr)
                return 1
            print(f"{path}: the results table matches results/sweeps/")
            return 0
        path.write_text(new)
        print(f"{path}: results table {'rewritten' if new != old else 'already up to date'}")
        return 0
    names = args.files or [s.path for s in results.list_sweeps()]
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = Path(name)
        bench_name = not path.exists() and str(name).startswith(("decode_", "ffn_"))
        in_bench = path.parent.name == results.BENCH or bench_name
        if in_bench:
            print(bench_tables(results.load_bench(name)), end="\n\n")
            continue
        sweep = results.load_sweep(name)
        table = sweep_table(sweep)
        if out:
            (out / f"{sweep.name}.md").write_text(table + "\n")
            written = [out / f"{sweep.name}.md", sweep_csv(sweep, out / f"{sweep.name}.csv")]
            if args.html:
                written.append(sweep_figure(sweep, out / f"{sweep.name}.html"))
            print("wrote " + ", ".join(str(p) for p in written))
        else:
            print(table, end="\n\n")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("report", help="tables and figures from the results files; the README's table",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="sweep or benchmark files, by path or name (default: every sweep)")
    p.add_argument("--out", help="write <name>.md and <name>.csv (and .html with --html) here instead of printing")
    p.add_argument("--html", action="store_true", help="with --out: a plotly figure per sweep too")
    p.add_argument("--readme", action="store_true", help="rewrite README.md's results table from results/sweeps/")
    p.add_argument("--readme-file", help="another README to rewrite or check (default: the checkout's README.md)")
    p.add_argument("--figure", action="store_true", help=f"write the README's figure, results/{FIGURE}")
    p.add_argument("--check", action="store_true", help="with --readme: exit 1 if the table has drifted, write nothing")
    p.set_defaults(func=run)
