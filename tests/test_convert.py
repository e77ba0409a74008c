"""Converting models: FFN discovery by structure, the exactness anchors, run-time controls, statistics."""

import copy
import pickle

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import prunepath
from prunepath import MoefyConfig, UnsupportedFFNError, find_ffns, moefy, routing
from prunepath.ffn.module import PrunePathFFN, prunepath_ffns
from prunepath.routing.control import rule_spec, set_rule, set_tau
from prunepath.routing.stats import record

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


def _family(name):
    """Tiny random models of each supported FFN family (d_ff = 96 = 3 experts of 32)."""
    torch.manual_seed(0)
    if name == "llama":
        return LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=2))
    if name == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**SMALL, num_key_value_heads=2))
    if name == "mistral":
        return MistralForCausalLM(MistralConfig(**SMALL, num_key_value_heads=2))
    if name == "gemma":  # GELU-tanh gated FFN
        return GemmaForCausalLM(GemmaConfig(**SMALL, num_key_value_heads=2, head_dim=16))
    if name == "gpt2":  # two-layer FFN in Conv1D modules, with biases
        return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=64, n_inner=96, n_layer=2, n_head=4))
    if name == "bert":  # two-layer FFN split over `intermediate` and `output` modules
        return BertModel(BertConfig(**SMALL))
    raise KeyError(name)


FAMILIES = ["llama", "qwen2", "mistral", "gemma", "gpt2", "bert"]
DENSE = MoefyConfig(rule=routing.Dense(), gate="one", router_init="zero")


def _out(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_found_by_structure(family):
    specs = find_ffns(_family(family).eval())
    assert len(specs) == 2
    assert {s.kind for s in specs} <= {"gated", "mlp", "intermediate"}
    assert all(s.d_ff == 96 and s.d_model == 64 for s in specs)


@pytest.mark.parametrize("family", FAMILIES)
def test_all_experts_with_unit_gates_reproduce_the_dense_model(family):
    """Exactness anchor: the permutation and the expert split change nothing when every gate is 1."""
    model = _family(family).eval()
    ids = torch.randint(0, 96, (2, 11))
    ref = _out(model, ids)
    moefy(model, DENSE, progress=False)
    assert all(isinstance(f, PrunePathFFN) for f in prunepath_ffns(model))
    torch.testing.assert_close(_out(model, ids), ref, atol=1e-5, rtol=1e-5)


def test_tau_above_one_equals_dense_rule(tiny_llama):
    """τ > 1 keeps every expert: identical to the dense rule with the same (sigmoid) gates."""
    moefy(tiny_llama, MoefyConfig(rule=routing.Dense(), gate="sigmoid"), progress=False)
    ids = torch.randint(0, 128, (1, 9))
    ref = _out(tiny_llama, ids)
    set_tau(tiny_llama, 1.05)
    with record(tiny_llama) as rec:
        torch.testing.assert_close(_out(tiny_llama, ids), ref)
    assert (rec.stats().counts == 4).all()


def test_the_model_keeps_its_class_behaviour_and_generates(tiny_llama):
    moefy(tiny_llama, MoefyConfig(rule=routing.CumulativeMass(0.5)), progress=False)
    assert type(tiny_llama) is LlamaForCausalLM  # modules are substituted; the class stays the base's
    out = tiny_llama.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8)


def _same_outputs(a, b, ids):
    torch.testing.assert_close(_out(a, ids), _out(b, ids))
    assert [f.rule for f in prunepath_ffns(a)] == [f.rule for f in prunepath_ffns(b)]
    assert a.prunepath_config == b.prunepath_config


def test_a_converted_model_deep_copies(tiny_llama):
    moefy(tiny_llama, MoefyConfig(rule=routing.CumulativeMass(0.5)), progress=False)
    set_tau(tiny_llama, 0.3, layer=1)
    twin = copy.deepcopy(tiny_llama)
    _same_outputs(tiny_llama, twin, torch.randint(0, 128, (1, 7)))
    set_tau(twin, 0.9)  # the copy's routing is its own
    assert prunepath_ffns(tiny_llama)[1].rule.tau == 0.3


def test_a_converted_model_pickles_and_torch_saves(tiny_llama, tmp_path):
    moefy(tiny_llama, MoefyConfig(rule=routing.TopK(2)), progress=False)
    ids = torch.randint(0, 128, (1, 7))
    _same_outputs(tiny_llama, pickle.loads(pickle.dumps(tiny_llama)), ids)
    torch.save(tiny_llama, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    _same_outputs(tiny_llama, loaded, ids)
    with record(loaded) as rec:  # the loaded copy routes and records like the original
        _out(loaded, ids)
    assert (rec.stats().counts == 2).all()


def test_saving_while_recording_leaves_the_recorder_behind(tiny_llama):
    moefy(tiny_llama, progress=False)
    with record(tiny_llama):
        twin = copy.deepcopy(tiny_llama)
    assert not any(f.recording for f in prunepath_ffns(tiny_llama))
    with record(twin) as rec:
        _out(twin, torch.randint(0, 128, (1, 3)))
    assert rec.tokens == 3


def test_set_tau_set_rule_and_statistics(tiny_llama):
    moefy(tiny_llama, MoefyConfig(router_init="centroid"), progress=False)
    ids = torch.randint(0, 128, (2, 16))
    means = []
    for tau in (0.2, 0.6, 0.95):
        set_tau(tiny_llama, tau)
        with record(tiny_llama) as rec:
            _out(tiny_llama, ids)
        stats = rec.stats()
        assert stats.counts.shape == (2, 32)  # [L, N]
        assert stats.counts.min() >= 1  # the top-1 expert is always kept
        means.append(stats.mean_experts)
    assert means == sorted(means)  # more budget, more experts
    s = stats.summary()
    assert 0 < s["active_fraction"] <= 1 and s["ffn_flops_per_token"] <= s["dense_ffn_flops_per_token"] * 1.01

    set_rule(tiny_llama, routing.TopK(2))
    with record(tiny_llama) as rec:
        _out(tiny_llama, ids)
    assert (rec.stats().counts == 2).all()
    set_tau(tiny_llama, 0.3, layer=1)
    assert rule_spec(tiny_llama) == "per-layer"
    with pytest.raises(ValueError, match="layer 5 out of range"):
        set_tau(tiny_llama, 0.5, layer=5)
    with pytest.raises(ValueError, match="exceeds"):
        set_rule(tiny_llama, routing.TopK(9))
    set_tau(tiny_llama, [0.4, 0.8])
    assert [f.rule.tau for f in prunepath_ffns(tiny_llama)] == [0.4, 0.8]


def test_padding_rows_can_be_excluded_from_statistics(tiny_llama):
    moefy(tiny_llama, progress=False)
    with record(tiny_llama) as rec:
        _out(tiny_llama, torch.randint(0, 128, (1, 6)))
    keep = torch.tensor([1, 1, 1, 0, 0, 0])
    assert rec.stats(keep).counts.shape == (2, 3)


def test_a_spec_string_is_refused_by_the_python_api_naming_the_rule_class(tiny_llama):
    with pytest.raises(TypeError, match=r"TopK\(k=2\)"):
        MoefyConfig(rule="topk:2")
    moefy(tiny_llama, progress=False)
    with pytest.raises(TypeError, match="CumulativeMass"):
        set_rule(tiny_llama, "mass:0.9")


def test_recorders_nest_and_see_only_their_own_block(tiny_llama):
    moefy(tiny_llama, progress=False)
    with record(tiny_llama) as outer:
        _out(tiny_llama, torch.randint(0, 128, (1, 4)))
        with record(tiny_llama) as inner:
            _out(tiny_llama, torch.randint(0, 128, (1, 3)))
    assert (outer.tokens, inner.tokens) == (7, 3)
    with pytest.raises(RuntimeError, match="no routing recorded"):
        with record(tiny_llama) as empty:
            pass
        empty.stats()


def test_bad_expert_size_is_a_clear_error_and_leaves_the_model_untouched(tiny_llama):
    with pytest.raises(ValueError, match="does not divide"):
        moefy(tiny_llama, MoefyConfig(expert_size=40), progress=False)
    assert not any(isinstance(m, PrunePathFFN) for m in tiny_llama.modules())


def test_bad_config_values_are_rejected_before_any_work():
    with pytest.raises(ValueError, match="split must be"):
        MoefyConfig(split="spectral")
    with pytest.raises(ValueError):
        MoefyConfig(rule=routing.CumulativeMass(-1))


def test_unsupported_ffn_names_the_module():
    model = _family("llama").eval()
    model.model.layers[1].mlp = torch.nn.Sequential(torch.nn.Linear(64, 64))
    with pytest.raises(UnsupportedFFNError, match=r"model\.layers\.1"):
        find_ffns(model)


def test_converting_twice_is_refused(tiny_llama):
    moefy(tiny_llama, progress=False)
    with pytest.raises(ValueError, match="already converted"):
        moefy(tiny_llama, progress=False)


def test_coactivation_split_needs_calibration(tiny_llama):
    with pytest.raises(ValueError, match="calibration"):
        moefy(tiny_llama, MoefyConfig(split="coact"), progress=False)
    calib = torch.randint(0, 128, (2, 32))
    moefy(tiny_llama, MoefyConfig(split="coact"), calib=calib, progress=False)
    for f in prunepath_ffns(tiny_llama):
        assert sorted(f.perm.tolist()) == list(range(128))


def test_oracle_rule_routes_by_true_expert_norms(tiny_llama):
    moefy(tiny_llama, MoefyConfig(rule=routing.Oracle(k=1), gate="one"), progress=False)
    ffn = prunepath_ffns(tiny_llama)[0]
    x = torch.randn(5, 64)
    mask, gates, _ = ffn.route(x)
    assert torch.equal(mask.float().argmax(-1), ffn.expert_norms(x).argmax(-1))
    assert (gates.sum(-1) == 1).all()


@pytest.mark.slow
def test_default_model_exactness_anchor(default_model):
    """On the real SmolLM2-135M-Instruct: all experts + unit gates == dense logits (fp32, < 1e-4)."""
    model, tok = copy.deepcopy(default_model[0]), default_model[1]
    ids = tok("PrunePath splits every feed-forward layer into experts of 32 neurons.", return_tensors="pt").input_ids
    ref = _out(model, ids)
    moefy(model, MoefyConfig(rule=routing.Dense(), gate="one", split="random"), progress=False)
    ffns = prunepath_ffns(model)
    assert len(ffns) == 30 and {(f.n_experts, f.expert_size) for f in ffns} == {(48, 32)}
    assert (_out(model, ids) - ref).abs().max() < 1e-4
    assert prunepath.find_ffns  # the public API exposes discovery too
