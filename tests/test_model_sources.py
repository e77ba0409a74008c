"""load_model beyond the default: a local GGUF file (written here with the `gguf` package) and encoders.

Everything is tiny and random and made in the test; no hub. The GGUF is written the way llama.cpp's
converter writes a Llama (tensor names from gguf's own TensorNameMap, q/k rows permuted for its rotary
layout, a byte-level BPE vocabulary with merges), so transformers' GGUF reader has to undo all of it.
"""

import os
import warnings

import numpy as np
import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import prunepath
from prunepath import CheckpointError, CumulativeMass, Dense, MoefyConfig, moefy
from prunepath.models import UnknownModelError, load_model, model_fingerprint, model_reference

gguf = pytest.importorskip("gguf")

# A byte-level BPE vocabulary: the 256 byte symbols, three merges, and an end-of-text control token.
_MERGES = ["Ġ t", "h e", "Ġt he"]


def _vocab() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return [*bytes_to_unicode().values(), "Ġt", "he", "Ġthe", "<|endoftext|>"]


def _tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def _rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for q/k projections (its converter's `permute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, model: LlamaForCausalLM, tokens: list[str], merges: list[str]) -> None:
    """Write `model` and a byte-level BPE tokenizer as a float32 GGUF file of architecture llama."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")  # byte-level BPE
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL])
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for key, value in model.state_dict().items():
        t = value.detach().float().numpy()
        if key.endswith("q_proj.weight"):
            t = _rope_permute(t, cfg.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            t = _rope_permute(t, cfg.num_key_value_heads)
        w.add_tensor(names.get_name(key, try_suffixes=(".weight", ".bias")), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
    """(path of a tiny GGUF, the transformers model it was written from); the cache lives in tmp_path."""
    monkeypatch.setenv("PRUNEPATH_CACHE", str(tmp_path / "cache"))
    tokens = _vocab()
    model = _tiny_llama(len(tokens))
    path = tmp_path / "files" / "tiny-llama.F32.gguf"
    path.parent.mkdir()
    write_tiny_gguf(path, model, tokens, _MERGES)
    return path, model


# --------------------------------------------------------------------------- GGUF files
def test_a_local_gguf_loads_as_its_model_and_is_cached(tiny_gguf, monkeypatch):
    from prunepath import models

    path, source = tiny_gguf
    built = []
    real = models._dequantise
    monkeypatch.setattr(models, "_dequantise", lambda p: built.append(p) or real(p))

    model, tok = load_model(path)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model_reference(model) == str(path.resolve())  # absolute: a checkpoint finds it from anywhere
    ids = tok("the theta", return_tensors="pt").input_ids
    assert ids.tolist() == [[83, 257, 258, 83, 64]]  # t, he, Ġthe, t, a: the file's merges are used
    with torch.no_grad():  # the same network: tensor names, rotary row order and untied head all undone
        torch.testing.assert_close(model(ids).logits, source(ids).logits)

    again, _ = load_model(str(path))
    assert len(built) == 1, "the second load must come from the float cache"
    assert model_fingerprint(again) == model_fingerprint(model) == model.config.prunepath_fingerprint

    # A new version of the file at the same path is noticed (size and modification time) and re-read.
    write_tiny_gguf(path, _tiny_llama(len(_vocab()), seed=1), _vocab(), _MERGES)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    with pytest.warns(UserWarning, match="rebuilding"):
        newer, _ = load_model(path)
    assert len(built) == 2 and model_fingerprint(newer) != model_fingerprint(model)


def test_a_checkpoint_made_on_a_gguf_loads_back_from_its_reference(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    model, tok = load_model(path)
    moefy(model, MoefyConfig(rule=CumulativeMass(0.8)), progress=False)
    prunepath.save(model, tmp_path / "ckpt")
    loaded, _ = prunepath.load(tmp_path / "ckpt")  # finds the base through the recorded path of the file
    ids = tok("the the theta", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_gguf_errors_name_the_cause(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEPATH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UnknownModelError, match=r"GGUF file .*nope\.gguf is missing"):
        load_model(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(UnknownModelError, match="transformers cannot read .*bad.gguf"):
        load_model(bad)


# --------------------------------------------------------------------------- encoders
def _word_tokenizer():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "hello", "world", "prune", "path", "experts"])}
    tk = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]")


def _bert_dir(tmp_path, cls, name):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=32)
    model = cls(cfg).eval()
    model.save_pretrained(tmp_path / name)
    _word_tokenizer().save_pretrained(tmp_path / name)
    return tmp_path / name, model


@pytest.mark.parametrize("cls", [BertModel, BertForMaskedLM])
def test_an_encoder_loads_as_the_class_its_weights_fill(tmp_path, cls):
    folder, source = _bert_dir(tmp_path, cls, cls.__name__)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no randomly initialised weights to warn about
        model, _ = load_model(folder)
    assert type(model) is cls and model.prunepath_untrained == ()
    assert model_fingerprint(model) == model_fingerprint(source)
    assert model_fingerprint(load_model(folder)[0]) == model_fingerprint(model)  # repeatable: nothing random


def test_the_fingerprint_covers_the_backbone_not_a_random_head(tmp_path):
    folder, bare = _bert_dir(tmp_path, BertModel, "bare")
    fp = model_fingerprint(bare)
    # A head the checkpoint does not hold gets random weights (here a fresh classifier on the same encoder,
    # pooler included); they must not enter the fingerprint, or it would differ between two loads.
    for seed in (1, 2):
        torch.manual_seed(seed)
        head = BertForSequenceClassification.from_pretrained(folder)
        assert model_fingerprint(head) == fp


def test_an_encoder_checkpoint_round_trips_and_keeps_every_output(tmp_path):
    folder, _ = _bert_dir(tmp_path, BertModel, "bert")
    model, tok = load_model(folder)
    ids = tok("hello prune path experts world", return_tensors="pt").input_ids
    with torch.no_grad():
        dense = model(ids, output_hidden_states=True)
    moefy(model, MoefyConfig(rule=Dense(), gate="one"), progress=False)  # all experts, unit gates: exact
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    assert out.hidden_states is not None and len(out.hidden_states) == len(dense.hidden_states) == 3
    for a, b in zip(out.hidden_states, dense.hidden_states):
        torch.testing.assert_close(a, b)
    # Attentions too (sdpa cannot return them; eager can, before and after the conversion alike).
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(ids, output_attentions=True).attentions
    assert att is not None and len(att) == 2 and att[0].shape == (1, 4, ids.shape[1], ids.shape[1])
    prunepath.save(model, tmp_path / "ckpt")
    loaded, _ = prunepath.load(tmp_path / "ckpt")  # the fingerprint of the reloaded base matches
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).last_hidden_state, dense.last_hidden_state)
    # An encoder with other weights is still refused.
    torch.manual_seed(5)
    other = BertModel(BertConfig(**{k: getattr(model.config, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "max_position_embeddings")})).eval()
    with pytest.raises(CheckpointError, match="fingerprint"):
        prunepath.load(tmp_path / "ckpt", base=(other, tok))


def test_language_model_tasks_refuse_an_encoder_with_the_fix(tmp_path, capsys):
    from prunepath.cli import main

    folder, _ = _bert_dir(tmp_path, BertModel, "bert")
    assert main(["eval", "--task", "wikitext2", "--model", str(folder), "--limit", "16"]) == 2
    err = capsys.readouterr().err
    assert "BertModel is not a causal language model" in err and "--protocol probe" in err
