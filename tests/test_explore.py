"""Headless tests of the explorer's compute (prunepath.explore): no Panel, a tiny random checkpoint.

The tiny checkpoint: 4-layer random Llama (D=64, F=256 -> 8 experts of 32), byte-level tokenizer,
saved and reloaded through prunepath.save/load, so the checkpoint path the page uses is exercised.
"""

import json
import threading

import pytest
import torch

from prunepath import results
from prunepath.explore.explorer import ExploreConfig, Explorer, matched_knobs, matched_layer_taus
from prunepath.explore.loading import ExplorerError, build_tiny_checkpoint, load_for_explorer
from prunepath.explore_results import sweep_figures
from prunepath.routing.control import set_gate

PROMPT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def ex(tiny_ckpt):
    model, tok, source, note = load_for_explorer(str(tiny_ckpt))
    return Explorer(model, tok, source, note, ExploreConfig(max_tokens=64, gen_tokens=6, quick_tokens=128))


def test_route_shapes_and_labels(ex):
    r = ex.route(PROMPT, "mass", 0.5)
    ids = ex.tokenizer(PROMPT).input_ids
    assert r.counts.shape == (ex.n_layers, len(ids))  # [L, T]
    assert len(r.tokens) == len(ids) and "".join(r.tokens).replace("␣", " ") == PROMPT
    assert r.counts.min() >= 1 and r.counts.max() <= ex.n_experts  # top-1 always kept
    assert r.active_fraction == pytest.approx(float(r.counts.float().mean()) / ex.n_experts)
    assert 0 < r.flops_per_token < r.dense_flops_per_token
    assert r.spec == "mass:0.5" and r.knobs is not None


def test_labels_are_readable_in_any_script(ex):
    labels = ex.labels(torch.tensor(ex.tokenizer("日本語 Привет").input_ids))
    assert "�" not in "".join(labels) and "語 3/3" in labels  # byte pieces decoded together (prunepath.tokens)


def test_counts_monotone_in_tau_and_dense_is_everything(ex):
    lo, hi = ex.route(PROMPT, "mass", 0.2), ex.route(PROMPT, "mass", 0.95)
    assert hi.mean_experts > lo.mean_experts
    d = ex.route(PROMPT, "dense", 0.2)
    assert d.spec == "dense" and bool((d.counts == ex.n_experts).all()) and d.active_fraction == 1.0


def test_route_is_cached(ex):
    a = ex.route(PROMPT, "mass", 0.6)
    assert ex.route(PROMPT, "mass", 0.6) is a  # second call: same object, no forward


def test_matched_rules_land_near_tau_fraction(ex):
    target = ex.route(PROMPT, "mass", 0.7)
    k, t = target.knobs
    top = ex.route(PROMPT, "topk", 0.7)
    assert top.spec == f"topk:{k}" and bool((top.counts == k).all())
    thr = ex.route(PROMPT, "threshold", 0.7)
    assert thr.spec.startswith("threshold:")
    # the threshold's own forward sees other hidden states; it should still be in the neighbourhood
    assert abs(thr.active_fraction - target.active_fraction) < 0.25


def test_per_layer_tau_gives_every_layer_tau_s_fraction(ex):
    target = ex.route(PROMPT, "mass", 0.6)
    layer = ex.route(PROMPT, "mass-layer", 0.6)
    assert layer.spec == "mass:" + ",".join(f"{t:g}" for t in target.layer_taus)
    assert len(target.layer_taus) == ex.n_layers and len(set(target.layer_taus)) > 1  # really per layer
    # layer 0 sees the same input under any rule, so it hits the fraction up to one expert per token's step
    assert layer.counts[0].float().mean() / ex.n_experts == pytest.approx(target.active_fraction, abs=0.1)
    assert abs(layer.active_fraction - target.active_fraction) < 0.15
    assert ex.route(PROMPT, "mass-layer", 0.6) is layer  # cached like every rule
    c = ex.continuation(PROMPT, "mass-layer", 0.6)
    assert c.spec == layer.spec and c.new_tokens > 0


def test_matched_layer_taus_hit_the_fraction_in_each_layer():
    torch.manual_seed(0)
    logits = torch.randn(3, 400, 16) * torch.tensor([0.5, 2.0, 4.0])[:, None, None]  # [L, T, E], sharper down
    taus = matched_layer_taus(logits, 0.25)
    from prunepath.routing import cumulative_mass_mask

    for layer, tau in zip(logits, taus):
        kept = cumulative_mass_mask(layer.softmax(-1), tau).float().mean().item()
        assert kept == pytest.approx(0.25, abs=0.02)
    assert taus[0] < taus[1] < taus[2]  # a peakier router needs a larger τ for the same fraction


def test_matched_knobs_quantile():
    torch.manual_seed(0)
    logits = torch.randn(3, 50, 16)  # [L, T, E]
    k, t = matched_knobs(logits, 0.25, 16)
    assert k == 4
    assert float((torch.sigmoid(logits) > t).float().mean()) == pytest.approx(0.25, abs=0.02)


def test_empty_prompt_and_truncation(ex):
    for bad in ("", "   \n"):
        with pytest.raises(ExplorerError, match="empty"):
            ex.route(bad, "mass", 0.5)
    r = ex.route("x" * 5000, "mass", 0.5)
    assert r.counts.shape[1] == 64 and "5,000 tokens" in r.note


def test_unknown_rule(ex):
    with pytest.raises(ExplorerError, match="unknown rule"):
        ex.route(PROMPT, "bogus", 0.5)


def test_continuation_cached_and_cancellable(ex):
    c = ex.continuation(PROMPT, "mass", 0.5)
    assert c.new_tokens >= 1 and c.tokens_per_s > 0 and c.spec == "mass:0.5"
    assert ex.continuation(PROMPT, "mass", 0.5) is c and ex.cached_continuation(PROMPT, "mass", 0.5) is c
    cancel = threading.Event()
    cancel.set()
    assert ex.continuation(PROMPT, "mass", 0.3, cancel=cancel) is None
    assert ex.cached_continuation(PROMPT, "mass", 0.3) is None
    # dense greedy continuation equals transformers' own greedy generate with all experts, unit gates
    d = ex.continuation(PROMPT, "dense", 0.5)
    tw = ex.twin()
    tw._apply(ex.rule_for(PROMPT, "dense", 0.5))
    ids = ex.tokenizer(PROMPT, return_tensors="pt").input_ids
    ref = tw.model.generate(ids, max_new_tokens=d.new_tokens, do_sample=False, min_new_tokens=d.new_tokens)
    assert ex.tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True) == d.text


def test_quick_estimate(ex, monkeypatch):
    q = ex.quick_estimate(ex.rule_for(PROMPT, "mass", 0.5))
    d = ex.quick_estimate(ex.rule_for(PROMPT, "dense", 0.5))
    assert q.label == "quick estimate" and q.tokens == 127 and q.perplexity > 1
    assert q.active_fraction < 1.0 and d.active_fraction == 1.0
    assert ex.quick_estimate(ex.rule_for(PROMPT, "mass", 0.5)) is q


def test_bad_checkpoint_paths(tmp_path):
    with pytest.raises(ExplorerError, match="No checkpoint folder"):
        Explorer.open(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExplorerError, match="not a PrunePath checkpoint"):
        Explorer.open(str(tmp_path / "empty"))


def test_mismatched_checkpoint(tiny_ckpt, tmp_path):
    """A checkpoint whose base model has other weights than it was made on: a clear error."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    meta = json.loads((bad / "prunepath.json").read_text())
    meta["fingerprint"] = "0" * 16
    (bad / "prunepath.json").write_text(json.dumps(meta))
    with pytest.raises(ExplorerError, match="fingerprint"):
        Explorer.open(str(bad))


def test_heatmap_figure(ex):
    r = ex.route(PROMPT, "mass", 0.5)
    fig = r.heatmap_figure()
    hm = fig["data"][0]
    assert hm["type"] == "heatmap" and len(hm["z"]) == ex.n_layers and len(hm["z"][0]) == len(r.tokens)
    assert fig["layout"]["xaxis"]["ticktext"][0] == r.tokens[0]


def test_sweep_rows_and_figures(tmp_path, monkeypatch):
    monkeypatch.setenv(results.RESULTS_ENV, str(tmp_path))
    (tmp_path / "sweeps").mkdir()
    rows = [
        {"method": m, "knob": k, "active_fraction": f, "task": "wikitext2", "metric": "perplexity", "value": v}
        for m, k, f, v in [("prunepath-tau", 0.5, 0.3, 30.0), ("prunepath-tau", 0.9, 0.7, 20.0),
                           ("topk", 10, 0.3, 40.0), ("dense", None, 1.0, 18.0)]
    ]
    (tmp_path / "sweeps" / "x_wikitext2_cpu.json").write_text(json.dumps({"meta": {"checkpoint": "default"},
                                                                           "rows": rows}))
    (tmp_path / "sweeps" / "broken.json").write_text("{not json")  # a sweep still writing it: skipped
    (tmp_path / "training").mkdir()
    for other in ("curve_run.json", "stages_default.json"):  # several checkpoints' rows: not one sweep
        (tmp_path / "training" / other).write_text(json.dumps({"meta": {}, "rows": rows}))
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "decode_default_h200.json").write_text(json.dumps(
        {"device": "NVIDIA H200", "date": "2026-11-28", "model": "default", "rows": [
            {"variant": "dense", "tokens_per_s": 1000.0}, {"variant": "mass 50%", "tokens_per_s": 1500.0}]}))
    (tmp_path / "bench" / "ffn_h200.json").write_text(json.dumps({"device": "x", "rows": [{"us": 3.0}]}))
    got = results.sweep_rows()
    assert len(got) == 4 and got[0]["source"].startswith("sweeps/x_wikitext2_cpu.json · checkpoint default")
    figs = sweep_figures(got, tau=0.7, active_fraction=0.5)
    assert len(figs) == 1
    star = [d for d in figs[0]["data"] if d["name"].startswith("τ")][0]
    assert star["x"] == [pytest.approx(0.5)] and star["y"] == [pytest.approx(25.0)]  # interpolated at τ=0.7
    assert figs[0]["layout"]["shapes"][0]["x0"] == 0.5
    out = sweep_figures(got, tau=0.2, active_fraction=0.1)
    assert "outside the swept" in out[0]["layout"]["title"]["text"]
    b = results.decode_benchmarks()
    assert b[0].device == "NVIDIA H200" and b[0].date == "2026-11-28"
    assert len(b) == 1 and b[0].figures == (("dense", 1000.0), ("mass 50%", 1500.0))


def test_the_loaded_checkpoints_sweeps_come_first(tmp_path, monkeypatch):
    monkeypatch.setenv(results.RESULTS_ENV, str(tmp_path))
    (tmp_path / "sweeps").mkdir()
    def row(task, metric, value):
        return {"method": "topk", "knob": 8, "active_fraction": 0.5, "task": task, "metric": metric, "value": value}

    mine, other = {"steps": 1200, "final_loss": 1.43}, {"steps": 600, "final_loss": 1.45}
    files = {  # named so that alphabetical order would put the loaded checkpoint's file last
        "a_old.json": {"meta": {"train": other}, "rows": [row("wikitext2", "perplexity", 40.0)]},
        "z_mine.json": {"meta": {"train": {}, "runs": [{"train": mine}]},  # recorded by an appended run
                        "rows": [row("wikitext2", "next_token_accuracy", 0.3), row("sst2", "accuracy", 0.7),
                                 row("wikitext2", "perplexity", 38.0)]},
    }
    for name, blob in files.items():
        (tmp_path / "sweeps" / name).write_text(json.dumps(blob))
    rows = results.sweep_rows()
    titles = [f["layout"]["title"]["text"] for f in sweep_figures(rows, tau=None, active_fraction=None, train=mine)]
    assert [t.split(" (")[0] for t in titles] == ["wikitext2 perplexity", "sst2 accuracy",
                                                  "wikitext2 next_token_accuracy", "wikitext2 perplexity"]
    assert all("this checkpoint: sweeps/z_mine.json" in t for t in titles[:3])
    assert "another checkpoint: sweeps/a_old" in titles[3]
    plain = [f["layout"]["title"]["text"] for f in sweep_figures(rows, tau=None, active_fraction=None)]
    assert "a_old.json" in plain[0] and not any("checkpoint:" in t for t in plain)  # nothing loaded: no claim


@pytest.mark.slow
def test_default_checkpoint_routes(default_model):
    """The real default checkpoint (or, until it exists, the default model converted): 30 x 48 experts."""
    import copy

    import prunepath
    from prunepath.errors import CheckpointError

    model, tok = copy.deepcopy(default_model[0]), default_model[1]
    try:
        model, tok = prunepath.load("default", base=(model, tok))
    except CheckpointError:
        prunepath.moefy(model, prunepath.MoefyConfig(split="random"), progress=False)  # fast, still 48 experts
        set_gate(model, "one")
    ex = Explorer(model, tok, "default", config=ExploreConfig(max_tokens=64, gen_tokens=4))
    long = PROMPT * 8  # ~80 tokens: truncated to 64
    r5, r9 = ex.route(long, "mass", 0.5), ex.route(long, "mass", 0.9)
    assert r5.counts.shape == (30, 64) and r5.n_experts == 48
    assert r5.mean_experts < r9.mean_experts
    assert ex.route(PROMPT, "topk", 0.5).spec == f"topk:{ex.route(PROMPT, 'mass', 0.5).knobs[0]}"
    assert ex.continuation(PROMPT, "dense", 0.5).new_tokens >= 1
