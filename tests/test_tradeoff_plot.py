"""The trade-off figure shared by the book's chapter 5 and the explorer (prunepath.evaluate.tradeoff_plot)."""

import math

import pytest

from prunepath.evaluate import tradeoff_plot as tp


def _rows(task="wikitext2", metric="perplexity", source="s.json · checkpoint c, NVIDIA H200 bf16"):
    """A small sweep: dense, global τ at three knobs, top-k and FLAP at the same fractions."""
    base = {"task": task, "metric": metric, "n": 1000, "protocol": "p", "date": "2026-11-30T00:00:00Z",
            "source": source, "trained": [{"v": 10}]}
    rows = [{**base, "method": "dense", "knob": None, "target_fraction": None, "active_fraction": 1.0, "value": 20.0}]
    for tau, frac, ppl in ((0.4, 0.25, 50.0), (0.6, 0.5, 30.0), (0.8, 0.75, 24.0)):
        rows.append({**base, "method": "prunepath", "knob": tau, "target_fraction": frac, "active_fraction": frac,
                     "value": ppl})
        rows.append({**base, "method": "topk", "knob": 12, "target_fraction": frac, "active_fraction": frac,
                     "value": ppl * 1.1})
        rows.append({**base, "method": "flap", "knob": frac, "target_fraction": frac, "active_fraction": frac,
                     "value": ppl * 3})
    return rows


def test_figure_has_one_trace_per_method_and_titles_in_words():
    fig = tp.tradeoff_figure(_rows())
    names = [t["name"] for t in fig["data"]]
    assert names == ["PrunePath, one global τ", "top-k experts (fixed count)", "FLAP (static neurons)"]
    assert fig["layout"]["title"]["text"].startswith("WikiText-2 perplexity (lower is better)")
    assert ".json" not in fig["layout"]["title"]["text"]


def test_dense_level_is_in_log10_units_on_a_log_axis():
    fig = tp.tradeoff_figure(_rows())
    assert fig["layout"]["yaxis"]["type"] == "log"
    assert fig["layout"]["shapes"][0]["y0"] == pytest.approx(math.log10(20.0))  # not 20: plotly reads log10 there


def test_accuracies_get_binomial_error_bars():
    rows = [{**r, "value": r["value"] / 200} for r in _rows("sst2", "accuracy")]  # values in (0, 1)
    fig = tp.tradeoff_figure(rows, "sst2", "accuracy")
    bars = fig["data"][0]["error_y"]["array"]
    p = fig["data"][0]["y"][0]
    assert bars[0] == pytest.approx(math.sqrt(p * (1 - p) / 1000))
    assert fig["layout"]["yaxis"]["type"] == "linear"


def test_tau_is_marked_by_interpolation_and_not_outside_the_sweep():
    rows = _rows()
    assert tp.tau_point(rows, 0.5) == pytest.approx((0.375, 40.0))
    assert tp.tau_point(rows, 0.95) is None
    star = tp.tradeoff_figure(rows, tau=0.5)["data"][-1]
    assert star["name"].startswith("τ = 0.50") and star["x"] == [pytest.approx(0.375)]


def test_value_at_and_change_against_dense():
    rows = _rows()
    assert tp.value_at(rows, "dense") == (1.0, 20.0)
    assert tp.value_at(rows, "topk", fraction=0.5)[1] == pytest.approx(33.0)
    assert tp.value_at(rows, "topk", fraction=0.1) is None
    assert tp.change_vs_dense(30.0, 20.0, "perplexity") == "+50.0 %"
    assert tp.change_vs_dense(0.75, 0.866, "accuracy") == "−11.6 points"


def test_rows_for_checkpoint_tasks_and_table():
    rows = _rows() + [{**_rows("ifeval", "prompt_strict")[1]}]  # one IFEval point: not a curve
    assert tp.rows_for_checkpoint(rows, {"v": 10}) == rows
    assert tp.rows_for_checkpoint(rows, {"v": 9}) == []
    assert tp.tasks_measured(rows) == [("wikitext2", "perplexity")]
    table = tp.tradeoff_table(rows)
    assert table[0] == {"method": "PrunePath, one global τ", "25% active": 50.0, "50% active": 30.0,
                        "75% active": 24.0}
    assert table[-1]["method"] == "dense (every expert)" and table[-1]["100% active"] == 20.0
    assert tp.measured_on(_rows()) == "1,000 tokens, p; NVIDIA H200 bf16, 2026-11-30"
