"""Routing invariants (STYLE §6), tested as properties, plus hand-computed examples and error messages.

Generated logits are drawn without exact ties in the softmax (distinct integers scaled by a random step),
because with tied probabilities the sorted order — and so the kept set — is decided by rounding.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunepath.routing import (
    CumulativeMass,
    Dense,
    Oracle,
    Static,
    Threshold,
    TopK,
    cumulative_mass_mask,
    gate_values,
    parse_rule,
)

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def untied_logits(draw, max_rows=6, max_experts=24):
    """Logits [N, E] whose entries within a row are pairwise distinct by a clear margin."""
    n = draw(st.integers(1, max_rows))
    e = draw(st.integers(1, max_experts))
    seed = draw(st.integers(0, 2**31 - 1))
    step = draw(st.floats(0.05, 2.0))  # small step: flat p, many experts; large step: peaked p
    g = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(e, generator=g) for _ in range(n)]).float()  # distinct per row
    return ranks * step - 3.0  # [N, E]


taus = st.floats(0.01, 0.999)


def sorted_mask(logits, mask):
    """The mask in descending-probability order."""
    order = logits.argsort(dim=-1, descending=True)
    return mask.gather(-1, order)


# ----------------------------------------------------------------------------------------------------------
# properties of the cumulative-mass rule


@SETTINGS
@given(untied_logits(), taus, st.booleans())
def test_top1_always_kept(logits, tau, inclusive):
    mask = CumulativeMass(tau, inclusive).select(logits)
    assert mask.gather(-1, logits.argmax(-1, keepdim=True)).all()


@SETTINGS
@given(untied_logits(), taus)
def test_exclusive_kept_mass_below_tau(logits, tau):
    mask = CumulativeMass(tau).select(logits)
    p = torch.softmax(logits, -1)
    kept_mass = (p * mask).sum(-1)
    only_top1 = mask.sum(-1) == 1
    # below τ, except where the forced top-1 alone already reaches it
    assert ((kept_mass < tau + 1e-6) | only_top1).all()
    # and maximal: adding the next expert would reach τ (unless all are kept)
    next_p = torch.where(mask, torch.zeros_like(p), p).amax(-1)
    assert ((kept_mass + next_p >= tau - 1e-6) | mask.all(-1)).all()


@SETTINGS
@given(untied_logits(), taus)
def test_inclusive_keeps_the_crossing_expert(logits, tau):
    n_ex = CumulativeMass(tau).select(logits).sum(-1)
    n_in = CumulativeMass(tau, inclusive=True).select(logits).sum(-1)
    p = torch.softmax(logits, -1)
    top1_reaches = p.amax(-1) >= tau  # exclusive keeps top-1 only because it is forced
    all_kept = n_ex == logits.shape[-1]
    expected = torch.where(top1_reaches | all_kept, n_ex, n_ex + 1)
    assert torch.equal(n_in, expected)
    # inclusive mass reaches τ (up to fp32 rounding) unless every expert is kept
    kept_mass = (p * CumulativeMass(tau, inclusive=True).select(logits)).sum(-1)
    assert ((kept_mass >= tau - 1e-5) | (n_in == logits.shape[-1])).all()


@SETTINGS
@given(untied_logits(), taus, st.booleans())
def test_kept_set_is_prefix_of_sorted_order(logits, tau, inclusive):
    s = sorted_mask(logits, CumulativeMass(tau, inclusive).select(logits))
    count = s.sum(-1, keepdim=True)
    prefix = torch.arange(logits.shape[-1]) < count  # [N, E]
    assert torch.equal(s, prefix)


@SETTINGS
@given(untied_logits(), taus, taus, st.booleans())
def test_count_monotone_in_tau(logits, t1, t2, inclusive):
    lo, hi = min(t1, t2), max(t1, t2)
    n_lo = CumulativeMass(lo, inclusive).select(logits).sum(-1)
    n_hi = CumulativeMass(hi, inclusive).select(logits).sum(-1)
    assert (n_lo <= n_hi).all()


@SETTINGS
@given(untied_logits(), st.floats(1.0001, 10.0), st.booleans())
def test_tau_above_one_keeps_all(logits, tau, inclusive):
    assert CumulativeMass(tau, inclusive).select(logits).all()


@SETTINGS
@given(untied_logits(), st.data())
def test_topk_keeps_exactly_k_largest(logits, data):
    k = data.draw(st.integers(1, logits.shape[-1]))
    mask = TopK(k).select(logits)
    assert (mask.sum(-1) == k).all()
    assert torch.equal(sorted_mask(logits, mask), (torch.arange(logits.shape[-1]) < k).expand_as(mask))


@SETTINGS
@given(untied_logits(), st.sampled_from(["mass:0.3", "mass-incl:0.7", "topk:1", "threshold:0.9",
                                         "relthreshold:0.2", "static:0", "dense"]))
def test_every_rule_keeps_at_least_one(logits, spec):
    assert (parse_rule(spec).select(logits).sum(-1) >= 1).all()


rule_strategy = st.one_of(
    st.builds(CumulativeMass, st.floats(1e-6, 5.0), st.booleans()),
    st.builds(TopK, st.integers(1, 512)),
    st.builds(Threshold, st.floats(1e-6, 1 - 1e-6), st.just("sigmoid")),
    st.builds(Threshold, st.floats(0.0, 1.0), st.just("relative")),
    st.builds(Static, st.lists(st.integers(0, 300), min_size=1, max_size=8).map(tuple)),
    st.builds(lambda t: Oracle(tau=t), st.floats(1e-6, 5.0)),
    st.builds(lambda k: Oracle(k=k), st.integers(1, 512)),
    st.just(Dense()),
)


@SETTINGS
@given(rule_strategy)
def test_spec_round_trip(rule):
    assert parse_rule(rule.spec) == rule
    assert parse_rule(rule.spec).spec == rule.spec


# ----------------------------------------------------------------------------------------------------------
# hand-computed examples

P = torch.tensor([[0.5, 0.3, 0.15, 0.05]])  # sorted already; cumulative 0.5, 0.8, 0.95, 1.0
Z = P.log()


@pytest.mark.parametrize(
    "tau, inclusive, expected",
    [
        (0.4, False, [1, 0, 0, 0]),  # p(1) = 0.5 >= τ: only the forced top-1
        (0.4, True, [1, 0, 0, 0]),  # the crossing expert *is* the top-1
        (0.6, False, [1, 0, 0, 0]),  # 0.5 < 0.6 keeps e0; 0.8 >= 0.6 drops e1
        (0.6, True, [1, 1, 0, 0]),  # nucleus also keeps e1, which crosses 0.6
        (0.9, False, [1, 1, 0, 0]),  # 0.8 < 0.9; 0.95 crosses
        (0.9, True, [1, 1, 1, 0]),
        (0.999, False, [1, 1, 1, 0]),  # 0.95 < 0.999; the cumsum reaches 1.0 at e3
        (1.05, False, [1, 1, 1, 1]),  # τ > 1: dense stage of training
    ],
)
def test_cumulative_mass_hand_examples(tau, inclusive, expected):
    assert CumulativeMass(tau, inclusive).select(Z).int().tolist() == [expected]
    assert cumulative_mass_mask(P, tau, inclusive).int().tolist() == [expected]


def test_unsorted_rows_and_batch_shape():
    # experts in scrambled order, two rows, and a leading batch dimension [B, T, E]
    p = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.6, 0.04, 0.25, 0.11]])  # cumsums 0.5, 0.8 | 0.6, 0.85
    mask = cumulative_mass_mask(p[None], 0.9)
    assert mask.shape == (1, 2, 4)
    assert mask[0].int().tolist() == [[0, 1, 0, 1], [1, 0, 1, 0]]


def test_low_precision_logits_use_fp32_cumsum():
    torch.manual_seed(0)
    logits = torch.randn(64, 192)
    for dtype in (torch.bfloat16, torch.float16):
        low = logits.to(dtype)
        assert torch.equal(CumulativeMass(0.7).select(low), CumulativeMass(0.7).select(low.float()))


def test_thresholds_hand_examples():
    z = torch.tensor([[2.0, 0.0, -1.0, 1.0]])  # sigmoid 0.88, 0.5, 0.27, 0.73
    assert Threshold(0.6).select(z).int().tolist() == [[1, 0, 0, 1]]
    assert Threshold(0.95).select(z).int().tolist() == [[1, 0, 0, 0]]  # none pass: top-1 kept
    # relative: p_e / p_max = exp(z_e - 2) = 1, 0.135, 0.050, 0.368
    assert Threshold(0.7, "relative").select(z).int().tolist() == [[1, 0, 0, 1]]
    assert Threshold(0.9, "relative").select(z).int().tolist() == [[1, 1, 0, 1]]
    assert Threshold(1.0, "relative").select(z).all()


def test_static_dense_oracle():
    z = torch.randn(3, 8)
    assert Static((6, 1)).select(z).int().tolist() == [[0, 1, 0, 0, 0, 0, 1, 0]] * 3
    assert Dense().select(z).all()
    norms = torch.tensor([[1.0, 6.0, 3.0, 0.0]])  # distribution 1/10, 6/10, 3/10, 0
    assert Oracle(tau=0.65).select(torch.zeros(1, 4), norms).int().tolist() == [[0, 1, 0, 0]]
    assert Oracle(k=2).select(torch.zeros(1, 4), norms).int().tolist() == [[0, 1, 1, 0]]
    assert Oracle(tau=0.5).select(torch.zeros(1, 4), torch.zeros(1, 4)).sum() == 1  # dead row: one expert
    assert Oracle(k=1).needs_scores and not CumulativeMass(0.5).needs_scores


def test_gate_values():
    z = torch.tensor([[0.0, 1.0, -1.0]], requires_grad=True)
    mask = torch.tensor([[True, False, True]])
    g = gate_values(z, mask, "sigmoid")
    assert torch.allclose(g, torch.tensor([[0.5, 0.0, 1 / (1 + math.e)]]))
    g.sum().backward()  # the task loss reaches the router through the kept gates only
    assert z.grad[0, 1] == 0 and z.grad[0, 0] > 0
    p = torch.softmax(z.detach(), -1)
    assert torch.allclose(gate_values(z, mask, "softmax"), p * mask)
    assert gate_values(z, mask, "one").tolist() == [[1.0, 0.0, 1.0]]
    assert gate_values(z.detach().bfloat16(), mask, "softmax").dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------------
# errors say what is valid


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: CumulativeMass(0.0), "must be a number > 0"),
        (lambda: CumulativeMass(-0.5), "must be a number > 0"),
        (lambda: CumulativeMass(float("nan")), "must be a number > 0"),
        (lambda: TopK(0), "positive integer"),
        (lambda: TopK(2.5), "positive integer"),
        (lambda: Threshold(1.0), r"\(0, 1\)"),
        (lambda: Threshold(1.5, "relative"), r"\[0, 1\]"),
        (lambda: Threshold(0.5, "margin"), "'sigmoid' or 'relative'"),
        (lambda: Static(()), "at least one expert"),
        (lambda: Static((-1,)), ">= 0"),
        (lambda: Oracle(), "exactly one of tau or k"),
        (lambda: Oracle(tau=0.5, k=3), "exactly one of tau or k"),
        (lambda: parse_rule("nucleus:0.9"), "valid forms: mass:TAU"),
        (lambda: parse_rule("mass:"), "valid forms"),
        (lambda: parse_rule("mass:abc"), "bad routing rule"),
        (lambda: TopK(5).select(torch.zeros(2, 4)), r"exceeds the number of experts E=4; use 1 <= k <= 4"),
        (lambda: Static((0, 9)).select(torch.zeros(2, 8)), r"valid indices are 0..7"),
        (lambda: CumulativeMass(0.5).select(torch.tensor([[0.0, float("nan")]])), "NaN"),
        (lambda: Oracle(tau=0.5).select(torch.zeros(2, 4)), "needs scores"),
        (lambda: Oracle(k=1).select(torch.zeros(1, 2), -torch.ones(1, 2)), "non-negative"),
        (lambda: gate_values(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), "relu"), "'sigmoid'"),
        (lambda: gate_values(torch.zeros(1, 2), torch.ones(1, 3, dtype=torch.bool)), "shaped like logits"),
    ],
)
def test_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()
