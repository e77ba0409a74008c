"""Tables and figures from the benchmark JSON files (runs anywhere; no GPU needed).

    python -m prunepath.bench.report results/bench/ffn_h200.json results/bench/decode_llama-8b_h200.json

prints Markdown tables, and for an FFN file writes `<name>.html` beside it (plotly, offline), titled
from the device recorded in the file — never hand-typed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_ceiling(d: dict) -> float:
    """Fastest read rate any dense cuBLAS FFN reached in this run (bytes / s): the practical ceiling."""
    return max(3 * r["D"] * r["F"] * 2 / (r["dense_us"] * 1e-6) for r in d["rows"])


def ffn_table(d: dict) -> str:
    ceil = read_ceiling(d)
    lines = [f"FFN decode kernels, {d['device']}, {d['date']} (torch {d['torch']}, triton {d['triton']}); "
             f"copy bandwidth {d['copy_bandwidth_Bps'] / 1e12:.2f} TB/s (read+write), "
             f"dense cuBLAS read rate {ceil / 1e12:.2f} TB/s",
             "",
             "| shape | N | rule | kept (union) | dense us | ours us | speed-up | roofline speed-up "
             "| % copy BW | % dense read rate | rel. err |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        roof = r["dense_us"] / max(r["roofline_us"], 1e-9)
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['rule']} | {r['union_fraction']:.3f} | {r['dense_us']:.1f} | "
            f"{r['ours_us']:.1f} | {r['speedup']:.2f}x | {roof:.1f}x | {100 * r['frac_of_copy_bw']:.0f}% | "
            f"{100 * r['bytes_read'] / (r['ours_us'] * 1e-6) / ceil:.0f}% | {r['rel_err_vs_fp64']:.1e} |")
    if d.get("breakdown"):
        lines += ["", "| kept | router us | gate/up us | down us | reduce us | total us |", "|---|---|---|---|---|---|"]
        for b in d["breakdown"]:
            lines.append(f"| {b['fraction']} | {b['router_us']:.1f} | {b['gate_up_us']:.1f} | {b['down_us']:.1f} | "
                         f"{b['reduce_us']:.1f} | {b['total_us']:.1f} |")
    if d.get("sweep"):
        lines += ["", "| variant | N | rule | ours us | speed-up |", "|---|---|---|---|---|"]
        for r in d["sweep"]:
            lines.append(f"| {r['variant']} | {r['batch']} | {r['rule']} | {r['ours_us']:.1f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def decode_table(d: dict) -> str:
    lines = [f"Decode, {d['model']}, {d['device']}, {d['date']}, {d['dtype']}, {d['new_tokens']} new tokens",
             "", "| variant | kept | tokens/s | ms/token | speed-up | peak GB |", "|---|---|---|---|---|---|"]
    for r in d["rows"]:
        kept = r.get("realised_fraction")
        peak = r.get("peak_memory_bytes")
        lines.append(f"| {r['variant']} | {'' if kept is None else f'{kept:.3f}'} | {r['tokens_per_s']:.1f} | "
                     f"{r['ms_per_token']:.2f} | {r.get('speedup_vs_dense', 1.0):.2f}x | "
                     f"{'' if peak is None else f'{peak / 1e9:.2f}'} |")
    return "\n".join(lines)


def ffn_figure(d: dict, path: Path) -> Path | None:
    """Time vs kept fraction per shape and batch: dense, ours, roofline (offline HTML)."""
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:
        return None
    keys = sorted({(r["shape"], r["batch"]) for r in d["rows"]}, key=lambda k: (k[0], k[1]))
    fig = make_subplots(rows=1, cols=len(keys), subplot_titles=[f"{s}, N={b}" for s, b in keys])
    for i, (shape, batch) in enumerate(keys, start=1):
        rows = sorted((r for r in d["rows"] if r["shape"] == shape and r["batch"] == batch and r["rule"] == "topk"),
                      key=lambda r: r["union_fraction"])
        x = [r["union_fraction"] for r in rows]
        for name, key, dash in (("dense (cuBLAS)", "dense_us", "dot"), ("PrunePath kernels", "ours_us", None),
                                ("roofline", "roofline_us", "dash")):
            fig.add_trace(go.Scatter(x=x, y=[r[key] for r in rows], name=name, legendgroup=name,
                                     showlegend=i == 1, line=dict(dash=dash)), row=1, col=i)
        fig.update_xaxes(title_text="kept fraction (union)", row=1, col=i)
    fig.update_yaxes(title_text="us per FFN call", row=1, col=1)
    fig.update_layout(title=f"PrunePath FFN decode kernels vs dense, bf16, {d['device']} ({d['date'][:10]})",
                      height=420, width=360 * len(keys))
    fig.write_html(path, include_plotlyjs=True)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m prunepath.bench.report", description=__doc__)
    p.add_argument("files", nargs="+")
    p.add_argument("--no-html", action="store_true")
    args = p.parse_args(argv)
    for f in args.files:
        d = json.loads(Path(f).read_text())
        if "model" in d:
            print(decode_table(d))
        else:
            print(ffn_table(d))
            if not args.no_html:
                out = ffn_figure(d, Path(f).with_suffix(".html"))
                if out:
                    print(f"\nwrote {out}")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
