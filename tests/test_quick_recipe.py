"""The quick recipe (`prunepath train --recipe quick`) and the per-layer τ refinement of `calibrate`.

Tiny random Llama (tests/conftest.py: D=64, F=128), converted with 8 experts of 16; a stand-in tokenizer maps
characters to ids so the calibration text can be read. Seconds in all.
"""

import copy
import json

import pytest
import torch

import prunepath
from prunepath import routing
from prunepath.ffn.module import prunepath_ffns
from prunepath.routing.calibrate import calibrate_tau
from prunepath.train import quick


class CharTokenizer:
    """Characters -> ids below the tiny model's vocabulary; what calibration_batches needs of a tokenizer."""

    name_or_path = "char-tokenizer"
    eos_token_id = 0

    def __len__(self):
        return 128

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[1 + ord(c) % 127 for c in t] for t in texts]}


def _moefy(model):
    model.config.prunepath_base = "tiny-llama"
    cfg = prunepath.MoefyConfig(expert_size=16, rule=routing.CumulativeMass(0.9), gate="one")
    return prunepath.moefy(model, cfg, progress=False)


def _ids(seed=0, b=8, t=32):
    return torch.randint(1, 128, (b, t), generator=torch.Generator().manual_seed(seed))


def test_capture_gives_each_layers_inputs_and_true_norms(tiny_llama):
    model = _moefy(tiny_llama)
    ids = _ids()
    xs, norms = quick.capture_ffn_io(model, ids, batch_size=3)
    seen = []
    hooks = [f.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
             for f in prunepath_ffns(model)]
    with prunepath.routing_kept(model), torch.no_grad():
        prunepath.set_rule(model, routing.Dense())
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    for f, x, n, ref in zip(prunepath_ffns(model), xs, norms, seen):
        assert x.shape == (ids.numel(), 64) and n.shape == (ids.numel(), 8)
        torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)  # the dense model's own FFN inputs
        torch.testing.assert_close(n, f.expert_norms(x), rtol=1e-4, atol=1e-6)
    assert all(isinstance(f.rule, routing.CumulativeMass) for f in prunepath_ffns(model))  # rules restored


def test_log_norm_target_is_centred_and_its_softmax_is_the_share():
    norms = torch.tensor([[1.0, 2.0, 4.0, 0.0], [3.0, 3.0, 3.0, 3.0]])
    y = quick.log_norm_target(norms)
    torch.testing.assert_close(y.mean(-1), torch.zeros(2))
    share = norms / norms.sum(-1, keepdim=True)
    torch.testing.assert_close(torch.softmax(y, -1), share, atol=1e-5, rtol=1e-5)  # a zero norm gets ~0 mass
    # with the temperature 1/β folded in, softmax(z) ∝ norm^β
    torch.testing.assert_close(torch.softmax(0.5 * y[:1, :3], -1), norms[:1, :3].sqrt() / norms[:1, :3].sqrt().sum())


def test_ridge_fit_recovers_a_linear_log_norm_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=g)
    w_true = torch.randn(6, 16, generator=g) * 0.3
    norms = torch.exp(x @ w_true.T)  # log norms linear in x
    router = prunepath.routing.router.LinearRouter(16, 6)
    quick.fit_log_norm_router(router, x, norms, ridge=0.0)
    centred = w_true - w_true.mean(0, keepdim=True)  # the target is centred over experts
    torch.testing.assert_close(router.weight.detach(), centred, atol=1e-4, rtol=1e-4)
    assert quick.relative_fit_error(router, x, norms) < 1e-6


def test_ridge_fit_refuses_a_router_it_cannot_fit():
    router = prunepath.routing.router.MLPRouter(16, 6)
    with pytest.raises(ValueError, match="linear router"):
        quick.fit_log_norm_router(router, torch.randn(10, 16), torch.rand(10, 6))


def test_fold_temperature_divides_the_logits():
    router = prunepath.routing.router.LinearRouter(64, 8)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(5, 64)
    z = router(x).detach()
    quick.fold_temperature(router, 4.0)
    torch.testing.assert_close(router(x).detach(), z / 4.0)


def test_quick_routers_fit_log_norms_and_fold_the_temperature(tiny_llama):
    model = _moefy(tiny_llama)
    cfg = quick.QuickConfig(tokens=768, seq_len=32, holdout=256, power=0.5, tune_seconds=0)
    rep = quick.quick_routers(model, CharTokenizer(), cfg, progress=False)
    assert rep.temperatures == [2.0, 2.0]
    assert all(0 <= e < 1 for e in rep.relative_error)  # better than the mean on rows it was not fitted on
    from prunepath.data import calibration_batches

    ids = calibration_batches(CharTokenizer(), 768, 32, seed=0)
    xs, norms = quick.capture_ffn_io(model, ids)
    for f, x, n in zip(prunepath_ffns(model), xs, norms):
        z = f.router(x).detach()
        y = quick.log_norm_target(n)
        # logits are half the fitted log norms: their ranking agrees with the true norms' far above chance
        agree = (z.argmax(-1) == n.argmax(-1)).float().mean()
        assert agree > 0.3 and float(torch.corrcoef(torch.stack([2 * z.flatten(), y.flatten()]))[0, 1]) > 0.5
    assert {"capture", "fit"} <= rep.seconds.keys()


def test_calibrate_meets_its_tolerance_for_per_layer_tau(tiny_llama):
    model = _moefy(tiny_llama)
    g = torch.Generator().manual_seed(1)
    for f in prunepath_ffns(model):  # sharp, input-dependent routers: the dense-input τ misses on the sparse model
        f.router.weight.data = 0.3 * torch.randn(f.router.weight.shape, generator=g)
    ids = _ids(seed=3, b=16, t=32)
    res = calibrate_tau(copy.deepcopy(model), ids, 0.5, tol=0.005)
    assert abs(res["per_layer_active_fraction"] - 0.5) <= 0.005
    prunepath.set_tau(model, res["per_layer_tau"])  # the stored τ reproduce the measured fraction
    with prunepath.record(model) as rec, torch.no_grad():
        for s in range(0, ids.shape[0], 4):
            model(input_ids=ids[s : s + 4])
    assert rec.stats().active_fraction == pytest.approx(res["per_layer_active_fraction"], abs=1e-9)


def test_quick_config_refuses_bad_values():
    with pytest.raises(ValueError, match="holdout"):
        quick.QuickConfig(tokens=100, holdout=100)
    with pytest.raises(ValueError, match="fractions"):
        quick.QuickConfig(fractions=(0.5, 1.0))
    with pytest.raises(ValueError, match="power"):
        quick.QuickConfig(power=0.0)
    with pytest.raises(ValueError, match="ridge"):
        quick.QuickConfig(ridge=-1.0)
    with pytest.raises(ValueError, match="tune_seconds"):
        quick.QuickConfig(tune_seconds=-1.0)
    with pytest.raises(ValueError, match="tune_lr"):
        quick.QuickConfig(tune_lr=0.0)
    with pytest.raises(ValueError, match="tune_tokens"):
        quick.QuickConfig(tune_tokens=0)
    with pytest.raises(ValueError, match="calibration_tol"):
        quick.QuickConfig(calibration_tol=0.0)
    with pytest.raises(ValueError, match="tune_fraction_power"):
        quick.QuickConfig(tune_fraction_power=-1.0)


def test_recipe_trains_more_often_at_the_smaller_fractions():
    weights = quick.QuickConfig(fractions=(0.25, 0.5), tune_fraction_power=1.0).tune_config().fraction_weights
    assert weights == pytest.approx((4.0, 2.0))
    assert quick.QuickConfig(fractions=(0.25, 0.5), tune_fraction_power=0.0).tune_config().fraction_weights == ()


def test_calibration_step_meets_the_recipes_tolerance_and_is_stored(tiny_llama, tmp_path):
    model = _moefy(tiny_llama)
    quick.quick_routers(model, CharTokenizer(), quick.QuickConfig(tokens=768, seq_len=32, holdout=256,
                                                                  tune_seconds=0), progress=False)
    prunepath.save(model, tmp_path / "q")
    cfg = quick.QuickConfig(fractions=(0.25, 0.5), calibration_tol=0.002)
    results = quick.calibrate_quick(model, CharTokenizer(), tmp_path / "q", cfg)
    assert [abs(r["per_layer_active_fraction"] - r["target"]) <= 0.002 for r in results] == [True, True]
    stored = json.loads((tmp_path / "q" / "prunepath.json").read_text())["calibration"]
    assert stored["tol"] == 0.002 and set(stored["targets"]) == {"0.25", "0.5"}
    assert stored["targets"]["0.5"]["per_layer_tau"] == results[1]["per_layer_tau"]


def test_quick_routers_then_train_them_through_the_selection(tiny_llama, monkeypatch):
    from prunepath.train import router_tune

    model = _moefy(tiny_llama)
    grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "router" not in n}
    cfg = quick.QuickConfig(tokens=768, seq_len=32, holdout=256, tune_seconds=60, tune_tokens=512)
    original = router_tune.tune_routers
    seen = []

    def few_steps(m, ids, c, log=None):  # the recipe's own call, with a step limit so the test takes seconds
        seen.append(c)
        fitted.extend(f.router.weight.detach().clone() for f in prunepath_ffns(m))
        return original(m, ids, router_tune.TuneConfig(seconds=60, max_steps=6, lr=1e-2, positions=8), log)

    fitted = []
    monkeypatch.setattr(router_tune, "tune_routers", few_steps)
    rep = quick.quick_routers(model, CharTokenizer(), cfg, progress=False)
    assert seen[0].seconds == 60 and seen[0].lr == cfg.tune_lr
    assert rep.tune["steps"] == 6 and rep.tune["scored_tokens"] == 6 * 2 * 8 and "tune" in rep.seconds
    assert all(not torch.equal(w, f.router.weight) for w, f in zip(fitted, prunepath_ffns(model)))  # trained
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)  # backbone frozen
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grad_before


def test_cli_recipe_needs_a_base_model(tmp_path, capsys):
    from prunepath.cli import main

    assert main(["train", "--recipe", "quick", "--checkpoint", "default", "--out", str(tmp_path / "q")]) == 2
    assert "--recipe quick converts a base model" in capsys.readouterr().err


def test_models_table_marks_where_per_layer_tau_is_at_most_topk():
    from prunepath.bench.recipe import models_table

    rows = [{"rule": "dense", "fraction": 1.0, "perplexity": 20.0},
            {"rule": "topk", "fraction": 0.5, "perplexity": 40.0},
            {"rule": "per-layer τ", "fraction": 0.5, "perplexity": 38.0, "experts_p10_p50_p90": [23, 24, 25],
             "experts_within_layer_p10_p50_p90": [10, 24, 40]},
            {"rule": "topk", "fraction": 0.25, "perplexity": 90.0},
            {"rule": "per-layer τ", "fraction": 0.25, "perplexity": 95.0}]
    rec = {"family": "Llama", "model": "m", "source": "PyPI x", "parameters": 135e6,
           "conversion_max_abs_logit_diff": 2e-5, "rows": rows,
           "train_seconds": {"total": 600.0}, "train_cpu_seconds": {"total": 500.0}}
    table = models_table([rec])
    line = table.splitlines()[2]
    assert "90.00 / 95.00 |" in line and "40.00 / 38.00 ✓" in line and "10.0 / 24.0 / 40.0" in line and "135M" in line


def test_count_spread_is_taken_within_each_layer():
    from prunepath.bench.recipe import count_spread

    # two layers whose per-token counts vary in opposite directions: the mean over layers is flat (all 5),
    # the spread within each layer is not
    counts = torch.tensor([[2, 4, 6, 8] * 25, [8, 6, 4, 2] * 25])
    s = count_spread(counts)
    assert counts.float().mean(0).std() == 0
    assert s["experts_within_layer_p10_p50_p90"] == pytest.approx([2.0, 5.0, 8.0])
    assert s["experts_within_layer_std"] == pytest.approx(float(counts[0].float().std()), abs=1e-3)
    flat = count_spread(torch.full((3, 50), 7))
    assert flat["experts_within_layer_p10_p50_p90"] == [7.0, 7.0, 7.0] and flat["experts_within_layer_std"] == 0
    with pytest.raises(ValueError, match="two tokens"):
        count_spread(torch.ones(3, 1, dtype=torch.long))


def test_cli_recipe_quick_runs_the_recipe_on_the_model(tmp_path, monkeypatch):
    from prunepath.cli import main

    calls = []
    monkeypatch.setattr(quick, "run_quick", lambda name, out, cfg, device="cpu": calls.append((name, out, cfg.seed)))
    assert main(["train", "--recipe", "quick", "--model", "some/model", "--out", str(tmp_path / "q"),
                 "--seed", "3"]) == 0
    assert calls == [("some/model", str(tmp_path / "q"), 3)]


def test_quick_config_hands_the_peak_bound_to_router_training():
    cfg = quick.QuickConfig(tune_peak_bound=0.3, tune_peak_weight=5.0).tune_config()
    assert (cfg.peak_bound, cfg.peak_weight) == (0.3, 5.0)
    with pytest.raises(ValueError, match="tune_peak_bound"):
        quick.QuickConfig(tune_peak_bound=1.5)
