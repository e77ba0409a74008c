"""The CPU expert path (reads only the kept experts) against the torch path of the PrunePath FFN.

Tiny random models (8 experts of 32 neurons per layer), no real model.
"""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import prunepath
from prunepath import MoefyConfig, moefy, routing
from prunepath.decode import cpu_experts
from prunepath.decode.cpu_experts import CPUExpertPath, ExpertLayoutError, use_cpu_paths
from prunepath.decode.loop import DecodeConfig, Decoder
from prunepath.ffn.module import prunepath_ffns


def _llama(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval().to(dtype)


def _gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_embd=64, n_inner=256, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def _convert(model, rule="mass:0.6", gate="one"):
    rule = routing.parse_rule(rule)
    moefy(model, MoefyConfig(split="random", router_init="centroid", rule=rule, gate=gate), progress=False)
    torch.manual_seed(1)
    for f in prunepath_ffns(model):  # a peaked router so that the rule really drops experts
        f.router.weight.data.normal_(0, 1.0)
    return model


def _both(ffn, x):
    """(torch path, CPU expert path) outputs of one FFN on x, and whether the CPU path took x."""
    ffn.fast_path = None
    ref = ffn(x)
    path = CPUExpertPath(ffn)
    took = path.accepts(x)
    ffn.fast_path = path
    return ref, ffn(x), took


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gate", ["one", "sigmoid"])
def test_all_experts_kept_is_bit_for_bit_the_torch_path(dtype, gate):
    model = _convert(_llama(dtype), rule="mass:1.5", gate=gate)
    torch.manual_seed(2)
    with torch.no_grad():
        for ffn in prunepath_ffns(model):
            for n in (1, 3):
                x = torch.randn(n, 1, 64, dtype=dtype)
                ref, out, took = _both(ffn, x)
                assert took and torch.equal(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", ["mass:0.4", "mass:0.8", "topk:3", "topk:1", "mass-incl:0.6"])
@pytest.mark.parametrize("gate", ["one", "sigmoid", "softmax"])
@pytest.mark.parametrize("rows", [1, 4])
def test_kept_experts_match_the_torch_path(dtype, rule, gate, rows):
    """Random routing: one token, and a small batch whose rows keep different experts (their union runs)."""
    model = _convert(_llama(dtype), rule=rule, gate=gate)
    torch.manual_seed(3)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    dropped = False
    with torch.no_grad():
        for ffn in prunepath_ffns(model):
            x = torch.randn(rows, 1, 64, dtype=dtype)
            mask = ffn.rule.select(ffn.router(x.reshape(-1, 64)), None)
            dropped |= not bool(mask.any(0).all())
            ref, out, took = _both(ffn, x)
            assert took
            torch.testing.assert_close(out, ref, **tol)
    assert dropped or rows > 1, "the test routing must drop some experts"


def test_random_masks_through_a_forced_rule():
    """Every union pattern of 8 experts: runs at both ends, in the middle, single experts."""
    model = _convert(_llama())
    ffn = prunepath_ffns(model)[0]
    torch.manual_seed(4)
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        for pattern in range(1, 256):
            keep = torch.tensor([(pattern >> e) & 1 for e in range(8)], dtype=torch.bool)
            ffn.rule = routing.Static(tuple(int(e) for e in keep.nonzero().flatten()))
            ref, out, _ = _both(ffn, x)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_two_layer_mlp_ffn_with_biases():
    model = _convert(_gpt2(), rule="mass:0.5")
    torch.manual_seed(5)
    with torch.no_grad():
        for ffn in prunepath_ffns(model):
            for n in (1, 3):
                x = torch.randn(n, 1, 64)
                ref, out, took = _both(ffn, x)
                assert took
                torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_prefill_autograd_and_oracle_fall_back_to_the_torch_path():
    model = _convert(_llama())
    ffn = prunepath_ffns(model)[0]
    path = CPUExpertPath(ffn)
    with torch.no_grad():
        assert not path.accepts(torch.randn(1, 16, 64))  # 16 rows: prefill
        assert not path.accepts(torch.randn(1, 1, 64, dtype=torch.float64))
    assert not path.accepts(torch.randn(1, 1, 64))  # gradients wanted
    ffn.rule = routing.Oracle(tau=0.5)
    with torch.no_grad():
        assert not path.accepts(torch.randn(1, 1, 64))


def test_layout_follows_weight_updates():
    model = _convert(_llama(), rule="topk:2")
    ffn = prunepath_ffns(model)[0]
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        _both(ffn, x)
        ffn.down_proj.weight.mul_(2.0)
        ffn.gate_proj.weight.add_(0.1)
        ref, out, _ = _both(ffn, x)
        path = ffn.fast_path
        path(x)
        ffn.up_proj.weight.mul_(0.5)  # in place on the same tensor: the path must notice
        ffn.fast_path = None
        ref = ffn(x)
        ffn.fast_path = path
        torch.testing.assert_close(ffn(x), ref, atol=1e-5, rtol=1e-4)


def test_the_model_forward_with_the_hook_gives_the_torch_path_tokens():
    """Without the CPU step (cpu_step=False) the decode loop runs the model's own forward, and the hook puts
    the kept-expert path under every PrunePath FFN."""
    model = _convert(_llama(), rule="mass:0.5")
    ref_model = copy.deepcopy(model)
    ids = torch.randint(0, 128, (2, 6))
    ref = Decoder(ref_model, max_len=32, config=DecodeConfig(max_new_tokens=10, cpu_step=False,
                                                             fast_path=False)).generate(ids)
    dec = Decoder(model, max_len=32, config=DecodeConfig(max_new_tokens=10, cpu_step=False))
    assert all(isinstance(f.fast_path, CPUExpertPath) for f in prunepath_ffns(model))
    assert prunepath_ffns(ref_model)[0].fast_path is None
    calls = []
    for f in prunepath_ffns(model):
        f.register_forward_hook(lambda m, a, o: calls.append(m.fast_path.accepts(a[0])))
    assert torch.equal(dec.generate(ids), ref)
    assert sum(calls) >= 2 * 9  # every decode step of both layers took the CPU path
    with prunepath.record(model) as rec:
        dec.generate(ids[:1], max_new_tokens=3)
    assert rec.stats().active_fraction < 1.0  # routing statistics still recorded
    use_cpu_paths(model, on=False)
    assert all(f.fast_path is None for f in prunepath_ffns(model))


def test_a_model_without_the_expert_layout_is_refused_with_the_fix():
    with pytest.raises(ExpertLayoutError, match="prunepath.load"):
        use_cpu_paths(_llama())


def test_every_expert_rule_skips_the_router_and_still_records():
    model = _convert(_llama(), rule="mass:0.5")
    ffn = prunepath_ffns(model)[0]
    prunepath.set_rule(model, routing.Dense())
    prunepath.set_gate(model, "one")
    x = torch.randn(2, 1, 64)
    calls = []
    ffn.router.register_forward_hook(lambda m, a, o: calls.append(1))
    with torch.no_grad(), prunepath.record(model) as rec:
        ref, out, took = _both(ffn, x)
    assert took and torch.equal(out, ref)
    assert len(calls) == 1  # the torch path's call only
    assert torch.cat(rec.counts[0]).tolist() == [8, 8, 8, 8]  # both forwards recorded every expert


def test_many_kept_experts_take_the_masked_dense_gemvs():
    model = _convert(_llama(), rule="topk:7")
    with torch.no_grad():
        for ffn in prunepath_ffns(model):
            x = torch.randn(1, 1, 64)
            ref, out, took = _both(ffn, x)
            assert took and torch.equal(out, ref)  # 7 of 8 > crossover: the torch path's own arithmetic


@pytest.fixture
def threads():
    """Set torch's intra-op threads inside a test, restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_the_crossover_depends_on_the_thread_count(threads, monkeypatch):
    assert cpu_experts.crossover(1) == cpu_experts.CROSSOVER == 0.8
    assert cpu_experts.crossover(8) == cpu_experts.crossover(2) == cpu_experts.CROSSOVER_BY_THREADS[2]
    threads(1)
    assert cpu_experts.crossover() == 0.8
    monkeypatch.setitem(cpu_experts.CROSSOVER_BY_THREADS, 2, 0.5)
    threads(2)
    assert cpu_experts.crossover() == 0.5


@pytest.mark.parametrize("n_threads, dense", [(1, False), (2, True)])
def test_five_of_eight_experts_take_the_path_of_the_thread_count(threads, monkeypatch, n_threads, dense):
    """5 of 8 experts kept (0.625), a crossover of 0.8 on one thread and 0.5 on two: the bags on one thread,
    the masked dense FFN on two; both exact."""
    model = _convert(_llama(), rule="topk:5")
    monkeypatch.setattr(cpu_experts, "CROSSOVER_BY_THREADS", {1: 0.8, 2: 0.5})
    threads(n_threads)
    ran = []
    for name in ("kept_ffn", "dense_ffn"):
        fn = getattr(cpu_experts, name)
        monkeypatch.setattr(cpu_experts, name, lambda *a, _fn=fn, _n=name, **k: ran.append(_n) or _fn(*a, **k))
    with torch.no_grad():
        for ffn in prunepath_ffns(model):
            x = torch.randn(1, 1, 64)
            ref, out, took = _both(ffn, x)
            assert took
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(cpu_experts.expert_ffn(ffn, x[0]), ref[0], atol=1e-5, rtol=1e-4)
    assert ran and set(ran) == {"dense_ffn" if dense else "kept_ffn"}


def test_bag_indices_are_int32_and_several_rows_still_match(threads):
    model = _convert(_llama(), rule="mass:0.6")
    threads(1)
    with torch.no_grad():
        for ffn in prunepath_ffns(model):
            w = cpu_experts.expert_weights(ffn)
            assert w.idx.dtype == w.rows.dtype == w.zero.dtype == torch.int32
            x = torch.randn(3, 64)
            torch.testing.assert_close(cpu_experts.expert_ffn(ffn, x), ffn(x[None])[0], atol=1e-5, rtol=1e-4)
