"""Checkpoints: round trip, and clear failures for the wrong base, bad shapes and damaged files."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import prunepath
from prunepath import CheckpointError, MoefyConfig, moefy, routing
from prunepath.ffn.module import prunepath_ffns
from prunepath.routing.control import set_tau


def _tiny(seed=0, d_ff=128):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=d_ff,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.config.prunepath_base = "tiny-test-llama"  # where it "came from": recorded in the checkpoint
    return model


class _Tok:
    """Stands in for a tokenizer: checkpoints never touch it."""


@pytest.fixture
def saved(tmp_path):
    model = moefy(_tiny(), MoefyConfig(rule=routing.CumulativeMass(0.7), router_init="centroid"), progress=False)
    with torch.no_grad():  # make the routers differ from any fresh initialisation
        for f in prunepath_ffns(model):
            f.router.weight.add_(torch.randn_like(f.router.weight))
    set_tau(model, 0.4, layer=1)
    prunepath.save(model, tmp_path / "ckpt", train_info={"steps": 3})
    return model, tmp_path / "ckpt"


def test_round_trip_restores_permutations_routers_rules_and_outputs(saved):
    model, path = saved
    loaded, _ = prunepath.load(path, base=(_tiny(), _Tok()))
    for a, b in zip(prunepath_ffns(model), prunepath_ffns(loaded)):
        assert torch.equal(a.perm, b.perm)
        assert torch.equal(a.router.weight, b.router.weight)
        assert a.rule == b.rule and a.gate == b.gate
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    meta = prunepath.read_meta(path)
    assert meta["moefy"]["expert_size"] == 32 and meta["train"] == {"steps": 3}
    assert [layer["rule"] for layer in meta["layers"]] == ["mass:0.7", "mass:0.4"]


def test_another_base_model_is_refused_with_both_fingerprints(saved):
    _, path = saved
    with pytest.raises(CheckpointError, match="fingerprint"):
        prunepath.load(path, base=(_tiny(seed=1), _Tok()))


def test_mismatched_shapes_name_the_mismatch(saved):
    _, path = saved
    with pytest.raises(CheckpointError, match="d_ff 96|fingerprint"):
        prunepath.load(path, base=(_tiny(d_ff=96), _Tok()))


@pytest.mark.parametrize("size", [64, 48])
def test_an_edited_expert_size_is_named_as_the_cause(saved, size):
    _, path = saved
    meta = json.loads((path / "prunepath.json").read_text())
    meta["moefy"]["expert_size"] = size  # 64 divides d_ff 128 (torch would say "size mismatch"), 48 does not
    (path / "prunepath.json").write_text(json.dumps(meta))
    expected = rf"expert_size {size}, but layer 0 has 128 neurons and a router over 4 experts.*\"expert_size\": 32"
    with pytest.raises(CheckpointError, match=expected):
        prunepath.load(path, base=(_tiny(), _Tok()))


def test_truncated_tensors_fail_cleanly(saved):
    _, path = saved
    blob = (path / "prunepath.safetensors").read_bytes()
    (path / "prunepath.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        prunepath.load(path, base=(_tiny(), _Tok()))


def test_corrupt_or_missing_metadata(saved, tmp_path):
    _, path = saved
    (path / "prunepath.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        prunepath.read_meta(path)
    with pytest.raises(CheckpointError, match="nowhere is missing: no such folder. Fix: check the path"):
        prunepath.read_meta(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a PrunePath checkpoint"):
        prunepath.read_meta(tmp_path / "empty")
    (path / "prunepath.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(CheckpointError, match="format"):
        prunepath.read_meta(path)


def test_saving_an_unconverted_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not converted"):
        prunepath.save(_tiny(), tmp_path / "x")


@pytest.mark.parametrize("tied", [True, False])
def test_full_weights_round_trip_with_and_without_tied_embeddings(tmp_path, tied):
    # A full fine-tune saves every weight; a tied lm_head (SmolLM2's) is written once and tied again on load.
    def base():
        m = _tiny()
        m.config.tie_word_embeddings = tied
        if tied:
            m.tie_weights()
        else:
            m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach().clone())
        return m

    model = moefy(base(), MoefyConfig(rule=routing.CumulativeMass(0.7), router_init="centroid"), progress=False)
    with torch.no_grad():  # what training does: move the backbone away from the base
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    prunepath.save(model, tmp_path / "full", full_weights=True)
    loaded, _ = prunepath.load(tmp_path / "full", base=(base(), _Tok()))
    assert (loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()) == tied
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    (tmp_path / "full" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        prunepath.load(tmp_path / "full", base=(base(), _Tok()))
