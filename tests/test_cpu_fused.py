"""The compiled CPU FFN (`prunepath.decode.cpu_fused`): its selection against the repository's
cumulative-mass rule, and its output against the torch path of the PrunePath FFN (tiny random models)."""

import numpy as np
import pytest
import torch
from tiny_models import peaked_prunepath
from transformers import LlamaConfig, LlamaForCausalLM

from prunepath import record
from prunepath.decode import cpu_experts, cpu_fused
from prunepath.decode.cpu_experts import _below, expert_ffn, expert_weights, fused_applies
from prunepath.ffn.module import prunepath_ffns
from prunepath.routing.rules import cumulative_mass_mask

pytestmark = pytest.mark.skipif(bool(cpu_fused.fused_kernels()), reason=cpu_fused.fused_kernels() or "")


def _model(rule="mass:0.6", gate="one", dtype=torch.float32):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return peaked_prunepath(LlamaForCausalLM(cfg).eval().to(dtype), rule, gate)


def _kept(probs: torch.Tensor, tau: float, inclusive: bool) -> torch.Tensor:
    order = np.empty(probs.shape[-1], np.int64)
    n = cpu_fused.select_mass(probs.numpy(), _below(tau, torch.float32), inclusive, order)
    mask = torch.zeros(probs.shape[-1], dtype=torch.bool)
    mask[torch.from_numpy(order[:n])] = True
    return mask


@pytest.mark.parametrize("inclusive", [False, True])
def test_selection_is_the_cumulative_mass_rule_with_ties(inclusive):
    g = torch.Generator().manual_seed(0)
    checked = ties = 0
    for i in range(600):
        z = torch.randn(48, generator=g) * float(torch.rand(1, generator=g) * 4)
        if i % 2:
            z = (z * 2).round() / 2  # many equal probabilities
        p = torch.softmax(z, -1)
        sorted_mass = p.sort(descending=True, stable=True)[0].cumsum(0)
        taus = [float(torch.rand(1, generator=g)), min(1.0, float(sorted_mass[i % 48])), 1.0, 1e-6]
        for tau in taus:  # a random τ, τ equal to a partial sum, τ = 1, the top-1 alone
            ref = cumulative_mass_mask(p[None], tau, inclusive)[0]
            assert torch.equal(_kept(p, tau, inclusive), ref), (i, tau)
            checked += 1
        ties += int(p.unique().numel() < 48)
    assert checked == 2400 and ties > 200


def test_selection_breaks_ties_by_expert_order():
    p = torch.tensor([0.1, 0.3, 0.3, 0.3], dtype=torch.float32)  # three equal experts, two of them kept
    order = np.empty(4, np.int64)
    for tau, inclusive, want in ((0.61, False, [1, 2]), (0.95, False, [1, 2, 3]), (0.35, True, [1, 2])):
        n = cpu_fused.select_mass(p.numpy(), _below(tau, torch.float32), inclusive, order)
        assert order[:n].tolist() == want
        assert torch.equal(_kept(p, tau, inclusive), cumulative_mass_mask(p[None], tau, inclusive)[0])


@pytest.mark.parametrize("gate", ["one", "sigmoid", "softmax"])
@pytest.mark.parametrize("rule", ["mass:0.3", "mass:0.7", "mass-incl:0.5", "mass:1.0"])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_ffn_matches_the_torch_path(gate, rule, threads, monkeypatch):
    model = _model(rule, gate)
    calls = []
    real = cpu_experts.mass_ffn
    monkeypatch.setattr(cpu_experts, "mass_ffn", lambda *a: calls.append(a) or real(*a))
    torch.manual_seed(3)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    dropped = False
    try:
        with torch.no_grad():
            for ffn in prunepath_ffns(model):
                for _ in range(4):
                    x = torch.randn(1, 64)
                    mask = ffn.rule.select(ffn.router(x), None)
                    dropped |= not bool(mask.all())
                    ffn.fast_path = None
                    ref = ffn(x[None])[0]
                    w = expert_weights(ffn)
                    assert fused_applies(ffn, w, x)
                    out = expert_ffn(ffn, x, w, limit=1.0)
                    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    finally:
        torch.set_num_threads(old)
    assert len(calls) == 8
    assert dropped or rule == "mass:1.0"


def test_fused_counts_are_recorded_and_match_the_rule():
    model = _model("mass:0.95")
    torch.manual_seed(4)
    xs = [torch.randn(1, 64) * s for s in (0.05, 0.1, 0.3, 1.0, 3.0)]
    ffn = prunepath_ffns(model)[0]
    w = expert_weights(ffn)
    with torch.no_grad(), record(model) as rec:
        for x in xs:
            expert_ffn(ffn, x, w, limit=1.0)
    with torch.no_grad():
        want = [int(ffn.rule.select(ffn.router(x), None).sum()) for x in xs]
    assert [int(c) for c in torch.cat(rec.counts[0])] == want
    assert len(set(want)) > 1  # the tokens keep different numbers of experts


def test_above_the_crossover_the_masked_dense_ffn_runs_with_the_kept_gates():
    model = _model("mass:0.7", "sigmoid")
    ffn = prunepath_ffns(model)[0]
    w = expert_weights(ffn)
    torch.manual_seed(5)
    x = torch.randn(1, 64)
    seen = []

    def all_experts(gates):
        seen.append(gates)
        return torch.zeros(1, 64)

    with torch.no_grad():
        expert_ffn(ffn, x, w, all_experts=all_experts, limit=0.0)
        logits = ffn.router(x)
        mask = ffn.rule.select(logits, None)
    assert len(seen) == 1
    want = torch.where(mask, torch.sigmoid(logits), torch.zeros(()))
    torch.testing.assert_close(seen[0], want, atol=0, rtol=0)


def test_bf16_and_batches_take_the_eager_path(monkeypatch):
    monkeypatch.setattr(cpu_experts, "mass_ffn", lambda *a: pytest.fail("the compiled path ran"))
    for dtype, rows in ((torch.bfloat16, 1), (torch.float32, 3)):
        model = _model("mass:0.6", dtype=dtype)
        ffn = prunepath_ffns(model)[0]
        torch.manual_seed(6)
        x = torch.randn(rows, 64, dtype=dtype)
        with torch.no_grad():
            ffn.fast_path = None
            ref = ffn(x[None])[0]
            out = expert_ffn(ffn, x)
        tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(out, ref, **tol)


def test_without_numba_the_eager_path_runs(monkeypatch):
    model = _model("mass:0.6")
    ffn = prunepath_ffns(model)[0]
    x = torch.randn(1, 64)
    with torch.no_grad():
        fused = expert_ffn(ffn, x)
        monkeypatch.setattr(cpu_fused, "FUSED_UNAVAILABLE", "numba is not installed (test)")
        assert not fused_applies(ffn, expert_weights(ffn), x)
        eager = expert_ffn(ffn, x)
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-4)


def test_the_compiled_path_does_not_hand_over_to_the_masked_dense_ffn(monkeypatch):
    """FUSED_CROSSOVER = 1: with nearly every expert kept the compiled call still runs (it measured faster)."""
    model = _model("mass:0.999")
    monkeypatch.setattr(cpu_experts, "dense_ffn", lambda *a, **k: pytest.fail("the masked dense FFN ran"))
    torch.manual_seed(7)
    with torch.no_grad():
        for ffn in prunepath_ffns(model):
            x = torch.randn(1, 64) * 0.01  # a flat softmax: nearly every expert kept
            kept = int(ffn.rule.select(ffn.router(x), None).sum())
            assert kept > cpu_experts.crossover() * ffn.n_experts
            ffn.fast_path = None
            torch.testing.assert_close(expert_ffn(ffn, x), ffn(x[None])[0], atol=1e-5, rtol=1e-4)
