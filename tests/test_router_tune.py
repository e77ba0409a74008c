"""Router training through the cumulative-mass selection (`prunepath.train.router_tune`): the maths on small
tensors, the training forward against the FFN's own, the config checks. The whole recipe with it runs on the tiny
model in tests/test_quick_recipe.py."""

import pytest
import torch

import prunepath
from prunepath import routing
from prunepath.ffn.module import prunepath_ffns
from prunepath.routing.rules import cumulative_mass_mask
from prunepath.train import router_tune as rt


def _logits(n=64, e=16, seed=0, scale=1.5):
    return scale * torch.randn(n, e, generator=torch.Generator().manual_seed(seed))


def test_tau_for_fraction_keeps_that_fraction_on_average():
    z = _logits(n=512, e=48)
    for frac in (0.25, 0.5, 0.75):
        tau = rt.tau_for_fraction(z, frac)
        kept = cumulative_mass_mask(torch.softmax(z, -1), tau).float().mean()
        assert abs(float(kept) - frac) < 2 / 512  # one token's expert either way is the granularity


def test_soft_mass_above_is_the_sorted_cumulative_mass_as_the_smoothing_vanishes():
    z = _logits()
    csum, order = rt.sorted_mass(z)
    exact = torch.empty_like(csum).scatter(-1, order, csum)  # mass at or above each expert, in expert order
    assert torch.allclose(rt.soft_mass_above(z, 1e-4), exact, atol=1e-5)
    assert not torch.allclose(rt.soft_mass_above(z, 1.0), exact, atol=1e-2)  # smoothed


def test_straight_through_gates_are_the_rule_forward_and_carry_a_gradient():
    z = _logits().requires_grad_(True)
    tau = 0.6
    g = rt.straight_through_gates(z, tau, softness=0.05, rank_temp=0.25)
    assert torch.equal(g.detach(), cumulative_mass_mask(torch.softmax(z.detach(), -1), tau).float())
    # the loss wants the best dropped expert of each row: descent must raise its logit relative to the kept ones
    dropped = g.detach() == 0
    best_dropped = torch.where(dropped, z.detach(), torch.tensor(-1e9)).argmax(-1)
    rows = torch.arange(z.shape[0])
    (-g[rows, best_dropped].sum()).backward()
    step = -z.grad  # gradient descent direction
    kept = ~dropped
    rel = step[rows, best_dropped] - (step * kept).sum(-1) / kept.sum(-1)
    assert (rel > 0).float().mean() > 0.9


def test_training_forward_is_the_routed_ffn_at_the_matched_tau(tiny_llama):
    tiny_llama.config.prunepath_base = "tiny-llama"
    model = prunepath.moefy(tiny_llama, prunepath.MoefyConfig(expert_size=16, gate="one"), progress=False)
    f = prunepath_ffns(model)[0]
    with torch.no_grad():
        f.router.weight.normal_(generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 24, f.d_model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), rt.straight_through(model, 0.05, 0.25) as state:
        state["fraction"] = 0.5
        got = f(x)
        tau = rt.tau_for_fraction(f.router(x.reshape(-1, f.d_model)), 0.5)
    assert "forward" not in f.__dict__  # the class forward is back
    prunepath.set_rule(model, routing.CumulativeMass(tau))
    with torch.no_grad():
        want = f(x)
    assert torch.allclose(got, want, atol=1e-6)


def test_tune_refuses_bad_config():
    with pytest.raises(ValueError, match="softness"):
        rt.TuneConfig(softness=0)
    with pytest.raises(ValueError, match="fractions"):
        rt.TuneConfig(fractions=(0.5, 1.0))
    with pytest.raises(ValueError, match="positions"):
        rt.TuneConfig(positions=0)
    with pytest.raises(ValueError, match="max_steps"):
        rt.TuneConfig(max_steps=-1)
    with pytest.raises(ValueError, match="fraction_weights"):
        rt.TuneConfig(fractions=(0.25, 0.5), fraction_weights=(1.0,))
    with pytest.raises(ValueError, match="fraction_weights"):
        rt.TuneConfig(fractions=(0.25, 0.5), fraction_weights=(0.0, 0.0))


def test_fractions_are_drawn_as_often_as_their_weights_say():
    import random

    cfg = rt.TuneConfig(fractions=(0.25, 0.5, 0.75), fraction_weights=(4.0, 2.0, 0.0))
    rng = random.Random(0)
    draws = [rt._draw(rng, cfg) for _ in range(6000)]
    assert draws.count(0.75) == 0
    assert draws.count(0.25) / draws.count(0.5) == pytest.approx(2.0, rel=0.1)
    equal = rt.TuneConfig(fractions=(0.25, 0.5, 0.75))
    draws = [rt._draw(rng, equal) for _ in range(6000)]
    assert all(abs(draws.count(f) / 6000 - 1 / 3) < 0.03 for f in (0.25, 0.5, 0.75))


def test_training_steps_only_at_the_weighted_fractions(tiny_llama):
    model = prunepath.moefy(tiny_llama, prunepath.MoefyConfig(expert_size=16, rule=routing.CumulativeMass(0.9),
                                                              gate="one"), progress=False)
    ids = torch.randint(1, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    rep = rt.tune_routers(model, ids, rt.TuneConfig(seconds=60, max_steps=5, positions=8,
                                                    fractions=(0.25, 0.5), fraction_weights=(1.0, 0.0)))
    assert rep["steps"] == 5 and rep["loss_by_fraction"]["0.25"] is not None
    assert rep["loss_by_fraction"]["0.5"] is None  # never drawn


def test_peak_excess_is_zero_below_the_bound_and_the_squared_log_odds_above():
    z = torch.tensor([[0.0, 0.0, 0.0, 0.0], [4.0, 0.0, 0.0, 0.0]])  # top-1 mass 0.25, and e^4 / (e^4 + 3) ≈ 0.948
    got = rt.peak_excess(z, 0.5)
    p = torch.softmax(z[1], -1)[0]
    assert got[0] == 0
    assert float(got[1]) == pytest.approx(float(torch.log(p / (1 - p))) ** 2, rel=1e-5)  # logit(0.5) = 0
    assert float(rt.peak_excess(z, 0.96)[1]) == 0  # 0.948 is below a bound of 0.96


def test_peak_excess_keeps_a_gradient_where_the_softmax_saturates():
    z = torch.tensor([[30.0, 0.0, 0.0, 0.0]], requires_grad=True)  # top-1 mass 1 - 3e-13
    rt.peak_excess(z, 0.2).sum().backward()
    assert float(z.grad[0, 0]) > 10  # 2 · (log-odds excess ≈ 31) · 1; the gradient of p_max itself is ~1e-12
    w = z.detach().double().requires_grad_(True)
    torch.softmax(w, -1).max().backward()
    assert float(w.grad.abs().max()) < 1e-9  # p_max's own gradient has vanished there


def test_tune_refuses_a_bad_peak_bound():
    with pytest.raises(ValueError, match="peak_bound"):
        rt.TuneConfig(peak_bound=1.0)
    with pytest.raises(ValueError, match="peak_bound"):
        rt.TuneConfig(peak_bound=-0.1)
    with pytest.raises(ValueError, match="peak_weight"):
        rt.TuneConfig(peak_bound=0.2, peak_weight=-1.0)


def _peaked_model(tiny_llama):
    model = prunepath.moefy(tiny_llama, prunepath.MoefyConfig(expert_size=16, rule=routing.CumulativeMass(0.9),
                                                              gate="one"), progress=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for f in prunepath_ffns(model):
            f.router.weight.copy_(2.0 * torch.randn(f.router.weight.shape, generator=gen))  # near one-hot softmax
    return model


def _mean_top1(model, ids):
    from prunepath.routing.calibrate import capture

    c = capture(model, ids)
    with torch.no_grad():
        return float(torch.stack([torch.softmax(f.router(x).float(), -1).max(-1).values.mean()
                                  for f, x in zip(prunepath_ffns(model), c.inputs)]).mean())


def test_the_peak_term_lowers_saturated_top1_mass_and_is_reported(tiny_llama):
    import copy

    ids = torch.randint(1, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    after, reps = {}, {}
    for bound in (0.0, 0.3):
        model = _peaked_model(copy.deepcopy(tiny_llama))
        before = _mean_top1(model, ids)
        assert before > 0.6
        reps[bound] = rt.tune_routers(model, ids, rt.TuneConfig(seconds=60, max_steps=20, positions=8, lr=0.1,
                                                                fractions=(0.5,), peak_bound=bound, peak_weight=10.0))
        after[bound] = _mean_top1(model, ids)
    assert "peak_term" not in reps[0.0]
    assert reps[0.3]["peak_term"]["last"] < reps[0.3]["peak_term"]["first"]
    assert after[0.3] < before - 0.05  # the term pulls the peaks down
    assert after[0.3] < after[0.0] - 0.05  # more than the KL alone does
