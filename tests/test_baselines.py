"""Baselines: static neuron pruning keeps what it says, FLAP compensates, knobs match the target fraction."""

import copy

import pytest
import torch

import prunepath
from prunepath import routing
from prunepath.evaluate import baselines
from prunepath.ffn.module import prunepath_ffns
from prunepath.routing import calibrate


@pytest.fixture
def tiny(tiny_llama):
    """The tiny Llama with 8 experts of 16 per layer, plus calibration statistics on random tokens."""
    model = prunepath.moefy(tiny_llama, prunepath.MoefyConfig(expert_size=16, gate="one"), progress=False)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    return model, ids, calibrate.capture(model, ids)


@pytest.mark.parametrize("method", ["wanda-sp", "flap"])
@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_neuron_pruning_keeps_requested_fraction(tiny, method, fraction):
    model, _, calib = tiny
    pruned, kept = baselines.neuron_pruned(model, calib, method, fraction)
    assert kept == pytest.approx(fraction)
    for f in prunepath_ffns(pruned):
        live = (f.down_proj.weight != 0).any(0).sum().item()  # columns still in use
        assert live == round(fraction * f.d_ff)
        assert f.rule == routing.Dense() and f.gate == "one"
    # the original is untouched
    assert all((f.down_proj.weight != 0).any(0).all() for f in prunepath_ffns(model))


def test_wanda_keeps_high_scoring_neurons(tiny):
    model, _, calib = tiny
    pruned, _ = baselines.neuron_pruned(model, calib, "wanda-sp", 0.5)
    f, g = prunepath_ffns(model)[0], prunepath_ffns(pruned)[0]
    score = baselines.neuron_scores(model, calib, "wanda-sp")[0]
    kept = (g.down_proj.weight != 0).any(0)
    assert score[kept].min() >= score[~kept].max()
    assert torch.equal(g.down_proj.weight[:, kept], f.down_proj.weight[:, kept])


def test_flap_bias_compensation_preserves_mean_output(tiny):
    """With the pruned neurons' mean folded into the bias, the mean FFN output over calibration tokens is kept."""
    model, _, calib = tiny
    flap, _ = baselines.neuron_pruned(model, calib, "flap", 0.5)
    x = calib.inputs[0].float()  # [N, D] the inputs the means were taken on
    f, g = prunepath_ffns(model)[0], prunepath_ffns(flap)[0]
    f.rule = routing.Dense()  # the unpruned reference: every neuron, unit gates
    with torch.no_grad():
        full, comp = f(x).mean(0), g(x).mean(0)
        g.down_proj.bias.zero_()
        bare = g(x).mean(0)
    assert (comp - full).norm() < 1e-4 * max(1.0, full.norm())
    assert (bare - full).norm() > 10 * (comp - full).norm()


def test_per_layer_taus_hit_target_in_every_layer(tiny):
    model, _, calib = tiny
    taus, est = baselines.match_knob(model, calib, "prunepath-layer", 0.5)
    assert len(taus) == 2 and abs(est - 0.5) < 0.05
    for i, t in enumerate(taus):
        got = calibrate.expert_counts(model, calib, routing.CumulativeMass(t))[i].float().mean() / 8
        assert abs(got - 0.5) < 0.05


def test_static_experts_keep_highest_router_mass(tiny):
    model, _, calib = tiny
    rules = baselines.static_experts(model, calib, 3)
    assert len(rules) == 2 and all(len(r.experts) == 3 for r in rules)
    with pytest.raises(ValueError, match="1..8"):
        baselines.static_experts(model, calib, 9)


@pytest.mark.parametrize("method", ["prunepath", "threshold", "oracle", "topk", "static-expert"])
def test_match_knob_hits_target(tiny, method):
    model, _, calib = tiny
    for target in (0.25, 0.5, 0.75):
        knob, est = baselines.match_knob(model, calib, method, target)
        if method in ("topk", "static-expert"):
            assert knob == round(target * 8)
            continue
        rule = {
            "prunepath": lambda: routing.CumulativeMass(knob),  # noqa: B023 (called at once)
            "threshold": lambda: routing.Threshold(knob),  # noqa: B023
            "oracle": lambda: routing.Oracle(tau=knob),  # noqa: B023
        }[method]()
        got = calibrate.fraction_for(model, calib, lambda _i, r=rule: r)
        assert got == pytest.approx(est)
        assert abs(got - target) < 0.05, (method, target, got)


def test_router_logits_are_computed_once_per_router_state(tiny):
    """Knob matching reuses each layer's calibration logits, and recomputes them once a router changes."""
    model, _, calib = tiny
    rule = routing.CumulativeMass(0.6)
    fresh = lambda: torch.stack(  # noqa: E731
        [rule.select(calibrate._logits(f, x)).sum(-1) for f, x in zip(prunepath_ffns(model), calib.inputs)]
    )
    assert torch.equal(calibrate.expert_counts(model, calib, rule), fresh())
    first = calib.memo[0][1]
    calibrate.fraction_for(model, calib, lambda _i: rule)
    assert calib.memo[0][1] is first  # reused
    with torch.no_grad():
        next(prunepath_ffns(model)[0].router.parameters()).mul_(-1)
    assert torch.equal(calibrate.expert_counts(model, calib, rule), fresh())
    assert calib.memo[0][1] is not first


def test_dense_configuration_is_the_base_model(tiny_llama):
    base = copy.deepcopy(tiny_llama)
    model = prunepath.moefy(tiny_llama, prunepath.MoefyConfig(expert_size=16, gate="one"), progress=False)
    ids = torch.randint(0, 128, (2, 16))
    calib = calibrate.capture(model, ids)
    m = baselines.configure(model, calib, "dense", None)
    with torch.no_grad():
        assert torch.allclose(m(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-5)


def test_bad_knobs_are_refused(tiny):
    model, _, calib = tiny
    with pytest.raises(ValueError, match="target"):
        baselines.match_knob(model, calib, "topk", 1.5)
    with pytest.raises(ValueError, match="unknown method"):
        baselines.match_knob(model, calib, "magic", 0.5)
    with pytest.raises(ValueError, match="fraction"):
        baselines.neuron_pruned(model, calib, "flap", 0.0)
