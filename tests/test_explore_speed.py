"""The explorer's speed figure (prunepath.explore.speed) on a tiny random model, CPU only."""

import json
import time
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import prunepath
from prunepath import MoefyConfig, moefy, routing
from prunepath.explore.speed import (
    SpeedError,
    SpeedPoint,
    SpeedSection,
    launch_bound_note,
    live_speed,
    recorded_curves,
    speed_figure,
)


def _tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def _converted():
    model = _tiny()
    moefy(model, MoefyConfig(split="random", router_init="centroid", rule=routing.CumulativeMass(0.9), gate="one"),
          progress=False)
    for f in prunepath.ffn.module.prunepath_ffns(model):
        f.router.weight.data.normal_(0, 1.0)
    return model


def _tokenizer(text, return_tensors="pt"):
    return types.SimpleNamespace(input_ids=torch.tensor([[ord(c) % 128 for c in text]]))


def test_live_speed_measures_both_and_restores_the_routing():
    model = _converted()
    before = prunepath.routing.control.rules(model)
    live = live_speed(model, _tokenizer, routing.TopK(2), n_tokens=2)
    assert live.dense.tokens_per_s > 0 and live.routed.tokens_per_s > 0
    assert live.dense.active_fraction == 1.0
    assert live.routed.active_fraction == pytest.approx(0.25)  # top-2 of 8 experts
    assert live.routed.label == "topk:2" and live.note == ""
    assert prunepath.routing.control.rules(model) == before


def test_more_tokens_than_the_last_call_get_a_longer_cache():
    model = _converted()
    live_speed(model, _tokenizer, routing.TopK(2), n_tokens=1)
    assert live_speed(model, _tokenizer, routing.TopK(2), n_tokens=6).routed.tokens_per_s > 0


def test_one_slow_round_does_not_move_the_figure(monkeypatch):
    """Each figure comes from the median round: a round slowed by another process (here: a 0.3 s pause in
    the first timed dense round) leaves the dense figure where the other rounds put it."""
    from prunepath.decode import loop

    calls = []
    decode = loop.Decoder.decode

    def slow_once(self, n):
        calls.append(n)
        if len(calls) == 3:  # calls 1-2: the warm-up (routed, dense); call 3: the first timed dense round
            time.sleep(0.3)
        return decode(self, n)

    monkeypatch.setattr(loop.Decoder, "decode", slow_once)
    live = live_speed(_converted(), _tokenizer, routing.TopK(2), n_tokens=2, rounds=3)
    assert len(calls) == 2 + 2 * 3
    assert live.dense.tokens_per_s > 3 * 2 * 3 / 0.3  # a mean over the rounds would be below 2 * 3 / 0.3


def test_per_layer_taus_are_accepted():
    model = _converted()
    live = live_speed(model, _tokenizer, types.SimpleNamespace(taus=(0.3, 0.6), spec="mass:0.3,0.6"), n_tokens=1)
    assert 0 < live.routed.active_fraction < 1


def test_bad_input_gets_a_message():
    with pytest.raises(SpeedError, match="prunepath.load"):
        live_speed(_tiny(), _tokenizer, routing.TopK(2))
    with pytest.raises(SpeedError, match="at least 1"):
        live_speed(_converted(), _tokenizer, routing.TopK(2), n_tokens=0)
    with pytest.raises(SpeedError, match="rounds must be at least 1"):
        live_speed(_converted(), _tokenizer, routing.TopK(2), rounds=0)
    if not torch.cuda.is_available():
        with pytest.raises(SpeedError, match="no CUDA GPU"):
            live_speed(_converted(), _tokenizer, routing.TopK(2), device="cuda")
    with pytest.raises(SpeedError, match=r"\(0, 1\]"):
        speed_figure([SpeedPoint(1.5, 3.0, "x")], None, [])


def test_recorded_curves_read_both_schemas_and_skip_broken_files(tmp_path):
    new = {"kind": "decode", "model": "llama-8b", "shape": {"hidden": 4096, "ffn": 14336}, "device": "NVIDIA H200",
           "date": "2026-12-03", "rows": [
               {"variant": "dense", "path": "cublas", "kept_fraction": 1.0, "tokens_per_s": 130.0},
               {"variant": "kept=0.25", "path": "triton-fused", "kept_fraction": 0.25, "tokens_per_s": 260.0},
               {"variant": "transformers generate", "path": "transformers", "tokens_per_s": 90.0}]}
    old = {"model": "default", "device": "NVIDIA H200", "date": "2026-11-28T23:27:55+00:00", "rows": [
        {"variant": "dense (our loop)", "tokens_per_s": 317.0},
        {"variant": "dense transformers generate (static cache)", "tokens_per_s": 40.0},
        {"variant": "prunepath tau=0.5 (our loop)", "realised_fraction": 0.36, "tokens_per_s": 318.0}]}
    (tmp_path / "decode_llama-8b_h200.json").write_text(json.dumps(new))
    (tmp_path / "decode_default_h200.json").write_text(json.dumps(old))
    (tmp_path / "decode_broken_h200.json").write_text("{not json")
    curves = recorded_curves(sorted(tmp_path.glob("*.json")) + [tmp_path / "decode_missing_h200.json"])
    assert [c.label for c in curves] == ["default (576×1536) · NVIDIA H200 · 2026-11-28",
                                         "llama-8b (4096×14336) · NVIDIA H200 · 2026-12-03"]
    assert curves[0].points == ((0.36, 318.0), (1.0, 317.0))
    assert curves[1].points == ((0.25, 260.0), (1.0, 130.0))
    assert recorded_curves([]) == []


def test_the_section_accumulates_live_points_and_marks_the_current_one(tmp_path):
    model = _converted()
    section = SpeedSection([])
    section.update(model, _tokenizer, routing.TopK(2), n_tokens=1)
    fig, text = section.update(model, _tokenizer, routing.TopK(4), n_tokens=1)
    live = next(t for t in fig["data"] if t["name"].startswith("live"))
    now = next(t for t in fig["data"] if t["name"].startswith("now"))
    assert live["x"] == [0.25, 0.5, 1.0]
    assert now["x"] == [0.5] and "topk:4" in text and "tokens/s" in text


def test_no_launch_bound_sentence_on_a_cpu():
    assert launch_bound_note(_tiny(), torch.device("cpu")) == ""
