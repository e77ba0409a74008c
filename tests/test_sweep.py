"""τ calibration hits its target; a small sweep writes tidy rows, a CSV and a figure, and resumes."""

import csv
import json
from types import SimpleNamespace

import pytest
import torch

import prunepath
from prunepath import report, results, routing
from prunepath.evaluate import sweep
from prunepath.ffn.module import prunepath_ffns
from prunepath.routing import calibrate
from prunepath.routing.control import rule_spec, set_active_fraction, set_rule, set_tau


@pytest.fixture
def tiny16(tiny_llama):
    """The tiny Llama with 16 experts of 8 per layer: fine enough steps for fractions near any target."""
    return prunepath.moefy(tiny_llama, prunepath.MoefyConfig(expert_size=8, gate="one"), progress=False)


@pytest.mark.parametrize("target", [0.3, 0.5])
def test_calibrate_hits_target(tiny16, target):
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    res = calibrate.calibrate_tau(tiny16, ids, target, tol=0.01)
    assert abs(res["active_fraction"] - target) <= 0.02, res
    set_tau(tiny16, res["tau"])  # the reported τ really gives that fraction
    assert calibrate.measured_fraction(tiny16, ids) == pytest.approx(res["active_fraction"])
    assert len(res["per_layer_tau"]) == 2
    assert all(abs(v - target) <= 0.03 for v in res["per_layer_fraction_captured"])
    set_tau(tiny16, res["per_layer_tau"])  # per-layer τ, run for real: near the target too
    assert abs(calibrate.measured_fraction(tiny16, ids) - target) <= 0.05


def test_calibrate_restores_rules_and_refuses_bad_targets(tiny16):
    ids = torch.randint(0, 128, (4, 16))
    set_rule(tiny16, routing.TopK(3))
    calibrate.calibrate_tau(tiny16, ids, 0.5, tol=0.05, iters=4)
    assert rule_spec(tiny16) == "topk:3"
    for bad in (0.0, 1.0, 1.5, 0.01):
        with pytest.raises(ValueError, match="target"):
            calibrate.calibrate_tau(tiny16, ids, bad)


def test_small_sweep_writes_tidy_rows(tmp_path):
    """End to end on a tiny random Llama that speaks the real tokenizer's vocabulary (no real weights)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from prunepath.models import model_cache_dir

    if not (model_cache_dir() / "tokenizer.json").is_file():
        pytest.skip("the default model's tokenizer is not cached yet")
    tok = AutoTokenizer.from_pretrained(model_cache_dir())
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
    )
    model = prunepath.moefy(
        LlamaForCausalLM(cfg).eval(), prunepath.MoefyConfig(expert_size=8, gate="one"), progress=False
    )
    out = tmp_path / "sw"
    config = sweep.SweepConfig(
        fractions=(0.5,),
        taus=(0.9,),
        tasks=("wikitext2",),
        wt_tokens=48,
        calib_tokens=256,
        task_opts={"wikitext2": {"context": 16, "stride": 16}},
    )
    kw = dict(progress=False, meta={"device": "cpu"})
    sw = sweep.run_sweep(model, tok, out, config, **kw)
    methods = {r["method"] for r in sw.rows}
    assert methods == {
        "dense",
        "prunepath",
        "prunepath-layer",
        "topk",
        "threshold",
        "oracle",
        "static-expert",
        "wanda-sp",
        "flap",
        "prunepath-tau",
    }
    ppl = [r for r in sw.rows if r["metric"] == "perplexity"]
    assert len(ppl) == 10 and all(r["value"] > 1 for r in ppl)
    for r in ppl:
        if r["method"] in ("topk", "static-expert", "wanda-sp", "flap"):
            assert r["active_fraction"] == pytest.approx(0.5)
        elif r["method"] == "dense":
            assert r["active_fraction"] == 1.0
    assert json.loads(out.with_suffix(".json").read_text())["meta"]["device"] == "cpu"
    assert not out.with_suffix(".csv").exists() and not out.with_suffix(".html").exists()  # views: prunepath report
    saved = results.load_sweep(out.with_suffix(".json"))
    assert "| prunepath | 0.5 |" in report.sweep_table(saved)
    rows = list(csv.DictReader(open(report.sweep_csv(saved, tmp_path / "v.csv"))))
    assert len(rows) == len(sw.rows) and set(report.ROW_COLUMNS) <= set(rows[0])
    assert "0.5" in json.loads(out.with_suffix(".json").read_text())["meta"]["expert_counts"]
    # a second call finds every row done and evaluates nothing new
    again = sweep.run_sweep(model, tok, out, config, **kw)
    assert len(again.rows) == len(sw.rows)


def test_sweep_refuses_bad_input():
    with pytest.raises(ValueError, match="unknown task"):
        sweep.SweepConfig(tasks=("nope",))
    with pytest.raises(ValueError, match="unknown method"):
        sweep.SweepConfig(methods=("magic",))
    with pytest.raises(ValueError, match="fractions"):
        sweep.SweepConfig(fractions=(1.5,))
    with pytest.raises(ValueError, match="tau"):
        sweep.SweepConfig(taus=(-1.0,))


def test_gpu_batching_only_fills_in_what_is_missing(tiny16):
    assert sweep._batching(tiny16, "sst2", {"k": 4}) == {"k": 4}  # a CPU model keeps the evaluator defaults
    weight = SimpleNamespace(device=torch.device("cuda"))
    gpu = SimpleNamespace(parameters=lambda: iter([weight]))  # a model whose weights are on a GPU
    opts = sweep._batching(gpu, "sst2", {"batch_size": 4})
    assert opts["batch_size"] == 4 and opts["batch_tokens"] == sweep.GPU_BATCHING["nlu"]["batch_tokens"]
    assert sweep._batching(gpu, "wikitext2", {}) == sweep.GPU_BATCHING["lm"]


def test_saved_calibration_routes_a_loaded_checkpoint_to_its_fraction(tiny_llama, tmp_path):
    import copy

    from prunepath.checkpoint import save_calibration

    tiny_llama.config.prunepath_base = "tiny-llama"
    base = copy.deepcopy(tiny_llama)
    model = prunepath.moefy(tiny_llama, prunepath.MoefyConfig(expert_size=8, gate="one"), progress=False)
    prunepath.save(model, tmp_path)
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    results = [calibrate.calibrate_tau(model, ids, t, tol=0.01) for t in (0.3, 0.5)]
    save_calibration(tmp_path, results[:1], {"adapter": False, "tokens": ids.numel()})
    save_calibration(tmp_path, results[1:], {"adapter": False, "tokens": ids.numel()})  # merged by target
    loaded, _ = prunepath.load(tmp_path, base=(base, None))
    assert sorted(loaded.prunepath_calibration["targets"]) == [0.3, 0.5]
    entry = set_active_fraction(loaded, 0.5)
    assert rule_spec(loaded) == "per-layer" and entry["per_layer_tau"] == results[1]["per_layer_tau"]
    assert calibrate.measured_fraction(loaded, ids) == pytest.approx(results[1]["per_layer_active_fraction"], abs=1e-6)
    set_active_fraction(loaded, 0.3, per_layer=False)
    assert all(f.rule.tau == results[0]["tau"] for f in prunepath_ffns(loaded))  # one global τ
    with pytest.raises(ValueError, match=r"no calibration for active fraction 0.4 \(stored: 0.3, 0.5\).*--save"):
        set_active_fraction(loaded, 0.4)


def test_calibration_is_dropped_for_other_weights_and_checked_when_damaged(tiny_llama, tmp_path):
    import copy

    from prunepath.checkpoint import save_calibration

    tiny_llama.config.prunepath_base = "tiny-llama"
    bases = [copy.deepcopy(tiny_llama) for _ in range(3)]
    model = prunepath.moefy(tiny_llama, prunepath.MoefyConfig(expert_size=8, gate="one"), progress=False)
    prunepath.save(model, tmp_path)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    # measured with an adapter folded in: a load without one (this checkpoint has none) must not use it
    save_calibration(tmp_path, [calibrate.calibrate_tau(model, ids, 0.5, tol=0.05)], {"adapter": True})
    loaded, _ = prunepath.load(tmp_path, base=(bases[0], None))
    assert loaded.prunepath_calibration is None
    with pytest.raises(ValueError, match="no stored τ calibration.*prunepath calibrate"):
        set_active_fraction(loaded, 0.5)
    meta = json.loads((tmp_path / "prunepath.json").read_text())
    meta["calibration"]["targets"]["0.5"]["per_layer_tau"] = [0.5]  # one value for a two-layer model
    (tmp_path / "prunepath.json").write_text(json.dumps(meta))
    with pytest.raises(prunepath.CheckpointError, match="calibration is corrupt"):
        prunepath.load(tmp_path, base=(bases[1], None))
    prunepath.save(model, tmp_path)  # new weights or routers: a stale calibration must not survive a save
    assert "calibration" not in prunepath.read_meta(tmp_path)


@pytest.mark.slow
def test_the_default_checkpoint_ships_calibrated_fractions():
    model, tok = prunepath.load("default")
    assert sorted(model.prunepath_calibration["targets"]) == [0.25, 0.375, 0.5, 0.625, 0.75, 0.875]
    text = "The committee met on Tuesday to discuss the budget. " * 6  # not the calibration text
    ids = tok(text, return_tensors="pt")["input_ids"]
    set_active_fraction(model, 0.5)
    assert calibrate.measured_fraction(model, ids) == pytest.approx(0.5, abs=0.06)
    plain, _ = prunepath.load("default", adapter=False)  # calibrated with the adapter: not for the bare routers
    assert plain.prunepath_calibration is None


@pytest.mark.parametrize(
    "flags, warned",
    [
        (["--tasks", "sst2", "--dtype", "bf16"], True),
        (["--tasks", "sst2", "--dtype", "fp32"], False),
        (["--tasks", "sst2", "--dtype", "bf16", "--protocol", "probe"], False),
        (["--tasks", "wikitext2", "--dtype", "bf16"], False),
    ],
)
def test_a_bf16_prompt_sweep_is_warned_before_the_model_loads(tmp_path, capsys, flags, warned):
    from prunepath.cli import main

    assert main(["sweep", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "s"), *flags]) != 0
    err = capsys.readouterr().err
    assert ("ranks nothing" in err and "--dtype fp32" in err) == warned
    assert "missing" in err  # and the missing checkpoint is still reported


def test_rows_of_several_demonstration_sets_carry_their_spread():
    res = {"task": "sst2", "n": 10, "protocol": "4-shot", "meta": {}, "routing": {"active_fraction": 0.5},
           "metrics": {"accuracy": 0.7, "balanced_accuracy": 0.68, "majority_rate": 0.5},
           "settings": {"demo_sets": 4, "per_set_accuracy": [0.6, 0.7, 0.8, 0.5], "split_half_accuracy": [0.7, 0.6]}}
    acc, bal = sweep._rows(res, "topk", 24, 0.5, None, "one")
    assert (acc["metric"], acc["demo_sets"], acc["split_half_accuracy"]) == ("accuracy", 4, [0.7, 0.6])
    assert bal["metric"] == "balanced_accuracy" and "per_set_accuracy" not in bal
    res["settings"] = {"seed": 0}  # one set: nothing to add
    assert all("demo_sets" not in r for r in sweep._rows(res, "topk", 24, 0.5, None, "one"))
