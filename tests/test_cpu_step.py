"""The eager CPU decode step (prunepath.decode.cpu_step) against the model's own forward, and its PrunePath
FFN (prunepath.decode.cpu_experts.expert_ffn) against the torch path. Tiny random models, CPU only."""

import bisect
import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_models import peaked_prunepath, with_qkv_biases
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import prunepath
from prunepath import routing
from prunepath.decode import cpu_experts
from prunepath.decode.cpu_step import CPUDecodeStep, rms_norm, step_unsupported
from prunepath.decode.loop import DecodeConfig, Decoder
from prunepath.ffn.module import prunepath_ffns

SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _llama(dtype=torch.float32):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SIZES)).eval().to(dtype)


def _qwen2():  # q/k/v projections with biases
    torch.manual_seed(0)
    return with_qkv_biases(Qwen2ForCausalLM(Qwen2Config(**SIZES)).eval())


def _convert(model, rule="mass:0.6", gate="one"):
    return peaked_prunepath(model, rule, gate)


def _reference_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits[:, -1].float()


@pytest.mark.parametrize("make", [_llama, _qwen2])
@pytest.mark.parametrize("batch", [1, 2])
def test_dense_step_matches_the_model_forward(make, batch):
    model = make()
    torch.manual_seed(2)
    ids = torch.randint(0, 128, (batch, 9))
    step = CPUDecodeStep(model, max_len=16, batch=batch)
    torch.testing.assert_close(step(ids[:, :6], 0), _reference_logits(model, ids[:, :6]), atol=1e-5, rtol=1e-4)
    for t in range(6, 9):  # one token at a time on the cache
        torch.testing.assert_close(step(ids[:, t:t + 1], t), _reference_logits(model, ids[:, :t + 1]),
                                   atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(step(ids[:, 6:9], 6), _reference_logits(model, ids), atol=1e-5, rtol=1e-4)


def test_bf16_step_is_close_to_the_model_forward():
    model = _llama(torch.bfloat16)
    ids = torch.randint(0, 128, (1, 8))
    step = CPUDecodeStep(model, max_len=16)
    step(ids[:, :7], 0)
    torch.testing.assert_close(step(ids[:, 7:], 7), _reference_logits(model, ids), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", ["dense", "mass:1.5", f"topk:{256 // 32}"])
def test_every_expert_kept_is_the_dense_step_bit_for_bit(dtype, rule):
    """The PrunePath model with every expert kept (unit gates) decodes exactly as the base model: the sparse
    loop at 100 % is the dense loop."""
    base = _llama(dtype)
    model = _convert(base, rule=rule)
    ids = torch.randint(0, 128, (2, 6))
    dense, sparse = CPUDecodeStep(base, 16, batch=2), CPUDecodeStep(model, 16, batch=2)
    assert torch.equal(dense(ids, 0), sparse(ids, 0))
    for t in range(6, 10):
        nxt = torch.full((2, 1), t)
        assert torch.equal(dense(nxt, t), sparse(nxt, t))


@pytest.mark.parametrize("rule", ["mass:0.4", "mass:0.8", "mass-incl:0.6", "topk:3", "topk:1", "threshold:0.6"])
@pytest.mark.parametrize("gate", ["one", "sigmoid", "softmax"])
def test_kept_experts_match_the_torch_path(rule, gate):
    """One token and a batch of 3 whose rows keep different experts: the FFN of the step equals the torch path."""
    model = _convert(_llama(), rule=rule, gate=gate)
    torch.manual_seed(3)
    dropped = False
    with torch.no_grad():
        for ffn in prunepath_ffns(model):
            for rows in (1, 3):
                x = torch.randn(rows, 64)
                mask = ffn.rule.select(ffn.router(x), None)
                dropped |= not bool(mask.all())
                torch.testing.assert_close(cpu_experts.expert_ffn(ffn, x), ffn(x[None])[0], atol=1e-5, rtol=1e-4)
    assert dropped, "the test routing must drop some experts"


def test_many_kept_experts_take_the_dense_gemvs_and_stay_exact():
    model = _convert(_llama(), rule="topk:7")  # 7 of 8 experts: above the crossover
    with torch.no_grad():
        for ffn in prunepath_ffns(model):
            x = torch.randn(2, 64)
            torch.testing.assert_close(cpu_experts.expert_ffn(ffn, x), ffn(x[None])[0], atol=1e-5, rtol=1e-4)


def test_the_cumulative_mass_shortcut_keeps_the_rules_experts():
    """The one-row selection (sort, cumsum, bisection) against CumulativeMass.select, with ties (a zero router
    gives every expert the same probability) and τ exactly at a cumulative sum."""
    model = _convert(_llama())
    ffn = prunepath_ffns(model)[0]
    w = cpu_experts.expert_weights(ffn)
    torch.manual_seed(4)
    cases = [torch.randn(1, 64) * s for s in (0.1, 1.0, 5.0) for _ in range(30)]
    with torch.no_grad():
        for x in cases:
            probs = torch.softmax(ffn.router(x), -1)
            at_a_sum = float(probs.sort(descending=True).values.cumsum(-1)[0, 2])
            for tau in (0.05, 0.3, 0.7, 0.95, 1.0, at_a_sum):
                for inclusive in (False, True):
                    ffn.rule = routing.CumulativeMass(tau, inclusive=inclusive)
                    kept, _, counts = cpu_experts.route(ffn, w, x)
                    want = ffn.rule.select(ffn.router(x))[0].nonzero()[:, 0]
                    assert sorted(kept.tolist()) == want.tolist() and counts == [len(want)]
        ffn.router.weight.data.zero_()  # uniform: all ties, the stable order keeps the first experts
        ffn.rule = routing.CumulativeMass(0.3)
        kept, _, _ = cpu_experts.route(ffn, w, torch.randn(1, 64))
        assert kept.tolist() == ffn.rule.select(torch.zeros(1, 8))[0].nonzero()[:, 0].tolist()
    assert bisect.bisect_left([0.1, 0.2], 0.2) == 1  # the count the shortcut relies on: entries strictly below


@pytest.mark.parametrize("make", [_llama, _qwen2])
def test_decoder_tokens_equal_the_torch_path_and_follow_tau(make):
    model = _convert(make(), rule="mass:0.5")
    ref_model = copy.deepcopy(model)
    ids = torch.randint(0, 128, (2, 6))
    dec = Decoder(model, max_len=32, config=DecodeConfig(max_new_tokens=10))
    ref = Decoder(ref_model, max_len=32, config=DecodeConfig(max_new_tokens=10, cpu_step=False, fast_path=False))
    assert dec.use_cpu_step and all(f.fast_path is None for f in prunepath_ffns(model))  # no hooks
    for tau in (0.5, 0.9, [0.3, 0.8]):
        dec.set_tau(tau)
        ref.set_tau(tau)
        assert torch.equal(dec.generate(ids), ref.generate(ids))
    with prunepath.record(model) as rec:
        dec.generate(ids[:1], max_new_tokens=4)
    assert 0 < rec.stats().active_fraction < 1.0  # routing statistics recorded by the step


def test_weight_changes_reach_the_step():
    model = _convert(_llama(), rule="topk:2")
    ids = torch.randint(0, 128, (1, 5))
    dec = Decoder(model, max_len=24, config=DecodeConfig(max_new_tokens=4))
    dec.generate(ids)
    with torch.no_grad():
        for f in prunepath_ffns(model):
            f.up_proj.weight.mul_(3.0)  # in place: same tensor, new version
        model.model.layers[0].self_attn.q_proj.weight.mul_(2.0)
        model.lm_head.weight.add_(0.05)
    ref = Decoder(copy.deepcopy(model), max_len=24, config=DecodeConfig(max_new_tokens=4, cpu_step=False,
                                                                       fast_path=False))
    assert torch.equal(dec.generate(ids), ref.generate(ids))


def test_other_architectures_fall_back_to_the_model_forward_with_the_expert_hook():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_inner=256, n_layer=2, n_head=4,
                                      n_positions=64)).eval()
    assert "not one of" in step_unsupported(gpt2)
    model = _convert(gpt2, rule="mass:0.5")
    dec = Decoder(model, max_len=32, config=DecodeConfig(max_new_tokens=6))
    assert not dec.use_cpu_step
    assert all(isinstance(f.fast_path, cpu_experts.CPUExpertPath) for f in prunepath_ffns(model))
    ref = Decoder(copy.deepcopy(model), max_len=32, config=DecodeConfig(max_new_tokens=6, fast_path=False))
    ids = torch.randint(0, 128, (1, 5))
    assert torch.equal(dec.generate(ids), ref.generate(ids))
    with pytest.raises(ValueError, match="cannot run this model"):
        CPUDecodeStep(gpt2, 16)


def test_bad_calls_get_a_message():
    step = CPUDecodeStep(_llama(), max_len=8, batch=1)
    with pytest.raises(ValueError, match="batch 2"):
        step(torch.zeros(2, 1, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="do not fit the cache of 8"):
        step(torch.zeros(1, 3, dtype=torch.long), 6)


@pytest.mark.parametrize("threads", [1, 2])
def test_gemv_and_norm_agree_with_torch(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(5)
        for rows in (1, 3):
            x, w = torch.randn(rows, 576), torch.randn(576, 300)
            torch.testing.assert_close(cpu_experts.gemv(x, w), x @ w, atol=1e-4, rtol=1e-4)
            g = torch.rand(576) + 0.5
            torch.testing.assert_close(rms_norm(x, g, 1e-5), F.rms_norm(x, (576,), g, 1e-5), atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(before)
