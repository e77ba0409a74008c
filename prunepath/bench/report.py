"""Tables and figures from the benchmark files of record (runs anywhere; no GPU needed).

    python -m prunepath.bench.report results/bench/ffn_h200.json results/bench/decode_llama-8b_h200.json

prints Markdown tables (the schema of results/bench/*.json: kind, model, shape, device, versions, date,
bandwidth_gbs, rows), and for an FFN file writes `<name>.html` beside it (plotly, offline), titled from
the device recorded in the file — never hand-typed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _head(d: dict) -> str:
    v = d.get("versions", {})
    bw = d.get("bandwidth_gbs")
    head = (f"{d.get('device')}, {d.get('date')} (torch {v.get('torch')}, triton {v.get('triton')}, transformers "
            f"{v.get('transformers')})")
    return head + (f"; measured copy bandwidth {bw / 1e3:.2f} TB/s (read + write)" if bw else "")


def _f(r: dict, key: str, fmt: str, scale: float = 1.0) -> str:
    """One optional field of a row, formatted ('' when the file does not record it)."""
    v = r.get(key)
    return "" if not isinstance(v, (int, float)) else format(v * scale, fmt)


def ffn_table(d: dict) -> str:
    s = d["shape"]
    lines = [f"FFN decode kernels, {s['D']} x {s['F']} ({s['E']} experts of {s['G']}), bf16, {_head(d)}", "",
             "| N | variant | path | kept (union) | us [p20, p80] | roofline us | GB/s | % BW | speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        taken = "" if r.get("taken", True) else " (not taken)"
        lines.append(f"| {r['batch']} | {r['variant']} | {r['path']}{taken} | {r['kept_fraction']:.3f} "
                     f"({r.get('union_fraction', 1.0):.3f}) | {r['us']:.1f} [{r['us_p20']:.1f}, {r['us_p80']:.1f}] | "
                     f"{r['roofline_us']:.1f} | {r['gb_per_s']:.0f} | {100 * r['bandwidth_fraction']:.0f}% | "
                     f"{r['speedup_vs_dense']:.2f}x |")
    if d.get("breakdown"):
        lines += ["", "| N | kept | route+select us | gate/up us | down us | total us |", "|---|---|---|---|---|---|"]
        for b in d["breakdown"]:
            lines.append(f"| {b.get('batch', 1)} | {b['kept_fraction']} | {b['route_select_us']:.1f} | "
                         f"{b['gate_up_us']:.1f} | {b['down_us']:.1f} | {b['total_us']:.1f} |")
    if d.get("sweep"):
        lines += ["", "| config | N | variant | us | speed-up |", "|---|---|---|---|---|"]
        for r in d["sweep"]:
            if "us" in r:
                lines.append(f"| {r['config']} | {r.get('batch', 1)} | {r['variant']} | {r['us']:.1f} | "
                             f"{r['speedup_vs_dense']:.2f}x |")
    return "\n".join(lines)


def decode_table(d: dict) -> str:
    lines = [f"Decode, {d.get('model')} ({d.get('weights', 'checkpoint')} weights), batch 1, {_head(d)}", "",
             "| variant | path | kept | tokens/s | ms/token [p20, p80] | GB/token | GB/s | % BW | speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        lines.append(f"| {r.get('variant')} | {r.get('path', '')} | {_f(r, 'kept_fraction', '.3f')} | "
                     f"{_f(r, 'tokens_per_s', '.1f')} | {_f(r, 'ms_per_token', '.3f')} [{_f(r, 'ms_p20', '.3f')}, "
                     f"{_f(r, 'ms_p80', '.3f')}] | {_f(r, 'bytes_per_token', '.2f', 1e-9)} | "
                     f"{_f(r, 'gb_per_s', '.0f')} | {_f(r, 'bandwidth_fraction', '.0f', 100)}% | "
                     f"{_f(r, 'speedup_vs_dense', '.2f')}x |")
    return "\n".join(lines)


def ffn_figure(d: dict, path: Path) -> Path | None:
    """Time against kept fraction per batch: dense, the path taken, the byte roofline (offline HTML)."""
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:
        return None
    batches = sorted({r["batch"] for r in d["rows"]})
    fig = make_subplots(rows=1, cols=len(batches), subplot_titles=[f"batch {b}" for b in batches])
    for i, b in enumerate(batches, start=1):
        rows = sorted((r for r in d["rows"] if r["batch"] == b and r.get("rule") == "topk" and r.get("taken")),
                      key=lambda r: r["union_fraction"])
        dense = next(r["us"] for r in d["rows"] if r["batch"] == b and r["variant"] == "dense")
        x = [r["union_fraction"] for r in rows]
        for name, y, dash in (("dense (cuBLAS)", [dense] * len(x), "dot"), ("PrunePath", [r["us"] for r in rows], None),
                              ("byte roofline", [r["roofline_us"] for r in rows], "dash")):
            fig.add_trace(go.Scatter(x=x, y=y, name=name, legendgroup=name, showlegend=i == 1, line=dict(dash=dash)),
                          row=1, col=i)
        fig.update_xaxes(title_text="kept fraction (union of the rows)", row=1, col=i)
    fig.update_yaxes(title_text="us per FFN call", row=1, col=1)
    s = d["shape"]
    fig.update_layout(title=f"PrunePath FFN kernels vs dense, {s['D']} x {s['F']}, bf16, {d['device']} ({d['date']})",
                      height=420, width=420 * len(batches))
    fig.write_html(path, include_plotlyjs=True)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m prunepath.bench.report", description=__doc__)
    p.add_argument("files", nargs="+")
    p.add_argument("--no-html", action="store_true")
    args = p.parse_args(argv)
    for f in args.files:
        d = json.loads(Path(f).read_text())
        if d.get("kind") == "decode":
            print(decode_table(d))
        elif d.get("kind") == "ffn":
            print(ffn_table(d))
            if not args.no_html:
                out = ffn_figure(d, Path(f).with_suffix(".html"))
                if out:
                    print(f"\nwrote {out}")
        else:
            print(f"{f}: not a benchmark file of record (no kind 'ffn' or 'decode'); skipped")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
