"""The compiled one-token decoder layer on a CPU (`prunepath.decode.cpu_layer`) and the decode step's use of it
(`prunepath.decode.cpu_step`, fp32 at batch 1): against torch, against the eager step and the model's own
forward, bit for bit between the dense and the all-experts loop, and its fall-backs. Tiny random models."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import peaked_prunepath, with_qkv_biases
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import prunepath
from prunepath import routing
from prunepath.decode import cpu_experts, cpu_fused, cpu_layer
from prunepath.decode.cpu_step import CPUDecodeStep
from prunepath.decode.loop import DecodeConfig, Decoder

pytestmark = pytest.mark.skipif(bool(cpu_layer.compiled_layer()), reason=cpu_layer.compiled_layer() or "")

# 6 query heads on 2 key-value heads (groups of 3), head size 16: not powers of two beyond the head size
SIZES = dict(vocab_size=96, hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=64)


def _base(kind="llama", dtype=torch.float32):
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**SIZES)).eval().to(dtype)
    return with_qkv_biases(Qwen2ForCausalLM(Qwen2Config(**SIZES)).eval().to(dtype))  # q/k/v projections with biases


def _prunepath(base, rule="mass:0.5", gate="one"):
    return peaked_prunepath(base, rule, gate)


def _forward_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits[:, -1].float()


def _eager(model, max_len):
    step = CPUDecodeStep(model, max_len)
    step.compiled = False
    return step


# (input rows, output columns): the default model's QKV; rows not a multiple of four nor of the thread count;
# one input row; one output column
@pytest.mark.parametrize("shape", [(576, 960), (7, 5), (1, 3), (13, 1)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gemv_matches_torch(shape, threads):
    torch.manual_seed(0)
    x, w = torch.randn(shape[0]), torch.randn(*shape)
    y = np.full(shape[1], np.nan, np.float32)  # poisoned: every entry must be written
    parts = np.full((threads, shape[1]), np.nan, np.float32)
    cpu_layer.gemv_into(x.numpy(), w.numpy(), threads, parts, y)
    torch.testing.assert_close(torch.from_numpy(y), x @ w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
def test_dense_ffn_matches_torch(threads):
    torch.manual_seed(0)
    x, w_in, w_down = torch.randn(1, 96), torch.randn(96, 2 * 384) * 0.1, torch.randn(384, 96) * 0.1
    y = np.full(96, np.nan, np.float32)
    cpu_layer.dense_ffn_into(x.numpy()[0], w_in.numpy(), w_down.numpy(), threads,
                             np.empty((threads, 2 * 384), np.float32), np.empty(2 * 384, np.float32), y)
    pre = x @ w_in
    ref = (F.silu(pre[:, :384]) * pre[:, 384:]) @ w_down
    torch.testing.assert_close(torch.from_numpy(y)[None], ref, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # the decode step's dense FFN takes it for one fp32 row
        torch.testing.assert_close(cpu_experts.dense_gated(x, w_in, w_down, F.silu), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("threads", [1, 2])
def test_compiled_token_matches_the_eager_step_and_the_model_forward(kind, threads, monkeypatch):
    """Dense and PrunePath models; tokens one at a time after a prefill, up to the last cache slot."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    for model in (_base(kind), _prunepath(_base(kind))):
        torch.manual_seed(2)
        ids = torch.randint(0, 96, (1, 16))
        step, eager = CPUDecodeStep(model, 16), _eager(model, 16)
        assert step.compiled
        step(ids[:, :5], 0)
        eager(ids[:, :5], 0)
        for t in range(5, 16):
            got = step(ids[:, t:t + 1], t)
            torch.testing.assert_close(got, eager(ids[:, t:t + 1], t), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(got, _forward_logits(model, ids[:, :t + 1]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("gate", ["one", "sigmoid", "softmax"])
@pytest.mark.parametrize("rule", ["mass:0.3", "mass:0.8", "mass-incl:0.6", "topk:3"])
def test_kept_experts_in_the_compiled_token_match_the_eager_step(rule, gate):
    """The prepared compiled FFN call (cumulative mass) and the eager FFN (other rules) inside the compiled
    token: the same logits and the same experts kept per layer as the eager step."""
    model = _prunepath(_base(), rule=rule, gate=gate)
    torch.manual_seed(3)
    ids = torch.randint(0, 96, (1, 10))
    step, eager = CPUDecodeStep(model, 10), _eager(model, 10)
    step(ids[:, :4], 0)
    eager(ids[:, :4], 0)
    for t in range(4, 10):
        with prunepath.record(model) as rec:
            got = step(ids[:, t:t + 1], t)
        with prunepath.record(model) as ref_rec:
            ref = eager(ids[:, t:t + 1], t)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
        assert torch.equal(rec.stats().counts, ref_rec.stats().counts)
    assert 0 < rec.stats().active_fraction < 1


def test_every_expert_kept_is_the_dense_loop_bit_for_bit():
    """The sparse loop at 100 % is the dense loop on the compiled path too."""
    base = _base()
    ids = torch.randint(0, 96, (1, 6))
    for rule in ("dense", "mass:1.5"):
        dense, sparse = CPUDecodeStep(base, 12), CPUDecodeStep(_prunepath(base, rule=rule), 12)
        assert dense.compiled and sparse.compiled
        assert torch.equal(dense(ids, 0), sparse(ids, 0))
        for t in range(6, 12):
            nxt = torch.full((1, 1), t)
            assert torch.equal(dense(nxt, t), sparse(nxt, t))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_greedy_tokens_equal_the_model_forward_and_follow_tau(kind):
    model = _prunepath(_base(kind), rule="mass:0.5")
    ref_model = copy.deepcopy(model)
    ids = torch.randint(0, 96, (1, 6))
    dec = Decoder(model, max_len=32, config=DecodeConfig(max_new_tokens=12))
    ref = Decoder(ref_model, max_len=32, config=DecodeConfig(max_new_tokens=12, cpu_step=False, fast_path=False))
    fractions = []
    for tau in (0.3, 0.9, [0.2, 0.6, 0.95]):  # τ changed between calls: the prepared calls follow it
        dec.set_tau(tau)
        ref.set_tau(tau)
        assert torch.equal(dec.generate(ids), ref.generate(ids))
        with prunepath.record(model) as rec:
            dec.generate(ids, max_new_tokens=4)
        fractions.append(rec.stats().active_fraction)
    assert dec.cpu_step.compiled and fractions[0] < fractions[1]


def test_bf16_and_batches_take_the_eager_step(monkeypatch):
    monkeypatch.setattr(cpu_layer, "attention_block", lambda *a: pytest.fail("the compiled token ran"))
    bf16, base = _base(dtype=torch.bfloat16), _base()
    for model, batch in ((bf16, 1), (base, 2)):
        step = CPUDecodeStep(model, 8, batch=batch)
        assert not step.compiled
        ids = torch.randint(0, 96, (batch, 5))
        step(ids, 0)
        step(ids[:, :1], 5)


def test_without_numba_the_eager_step_runs(monkeypatch):
    base = _base()
    ids = torch.randint(0, 96, (1, 7))
    compiled = CPUDecodeStep(base, 8)
    compiled(ids[:, :6], 0)
    with torch.no_grad():
        want = compiled(ids[:, 6:], 6)
    monkeypatch.setattr(cpu_fused, "FUSED_UNAVAILABLE", "numba is not installed (test)")
    monkeypatch.setattr(cpu_layer, "dense_ffn_into", lambda *a: pytest.fail("the compiled dense FFN ran"))
    step = CPUDecodeStep(base, 8)
    assert not step.compiled and cpu_layer.compiled_layer()
    step(ids[:, :6], 0)
    got = step(ids[:, 6:], 6)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got, _forward_logits(base, ids), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_default_checkpoint_greedy_tokens_equal_the_model_forward():
    """The default checkpoint on the benchmark's prompt: dense and at 25 / 50 % kept (per-layer τ), the
    compiled loop's greedy tokens equal the model's own forward (transformers layers, torch-mask FFN)."""
    from prunepath.bench.decode_cpu import PROMPT
    from prunepath.decode.loop import encode_prompt, load_for_decode

    model, tok = load_for_decode("default", False, "cpu", torch.float32)
    ref_model = copy.deepcopy(model)
    ids = encode_prompt(tok, PROMPT)
    dec = Decoder(model, max_len=ids.shape[1] + 24, config=DecodeConfig(max_new_tokens=16))
    ref = Decoder(ref_model, max_len=ids.shape[1] + 24,
                  config=DecodeConfig(max_new_tokens=16, cpu_step=False, fast_path=False))
    for fraction in (None, 0.25, 0.5):
        for m in (model, ref_model):
            if fraction is None:
                prunepath.set_rule(m, routing.rules.Dense())
            else:
                prunepath.set_active_fraction(m, fraction, per_layer=True)
        assert torch.equal(dec.generate(ids), ref.generate(ids))
    assert dec.cpu_step.compiled
