"""The static-cache decode loop against transformers `generate`.

On CPU the step runs eagerly (no CUDA graph) through exactly the code the graph captures. On a CUDA
machine, `PRUNEPATH_GPU_TESTS=1 pytest tests/test_decode.py` also checks the captured graph and the
Triton fast path (the `gpu` tests).
"""

import copy
import os

import pytest
import torch
from prunepath.kernels import torch_path, use_fast_paths

from prunepath import routing
from prunepath.decode.loop import DecodeConfig, Decoder
from prunepath.ffn.module import prunepath_ffns

GPU = torch.cuda.is_available() and bool(os.environ.get("PRUNEPATH_GPU_TESTS"))


MASS_06 = routing.CumulativeMass(0.6)


def _prunepath(model, rule=MASS_06):
    from prunepath import MoefyConfig, moefy

    m = copy.deepcopy(model)
    moefy(m, MoefyConfig(split="random", router_init="centroid", rule=rule), progress=False)
    torch.manual_seed(1)
    for f in prunepath_ffns(m):  # a peaked router so that the rule really drops experts
        f.router.weight.data.normal_(0, 1.0)
    return m


def _hf_greedy(model, ids, n):
    out = model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n, pad_token_id=0)
    return out[:, ids.shape[1]:]


def test_dense_greedy_matches_generate(tiny_llama):
    """fp32 dense: our loop's greedy tokens are transformers generate's."""
    ids = torch.randint(0, 128, (1, 7))
    dec = Decoder(tiny_llama, max_len=40, config=DecodeConfig(max_new_tokens=12))
    ours = dec.generate(ids)[:, 7:]
    assert torch.equal(ours, _hf_greedy(tiny_llama, ids, 12))


def test_prunepath_greedy_matches_generate_and_reuses_cache(tiny_llama):
    """PrunePath model: same tokens as generate with the torch routing path; a second prompt reuses the cache."""
    model = _prunepath(tiny_llama)
    dec = Decoder(model, max_len=48, config=DecodeConfig(max_new_tokens=10))
    for T in (5, 9):  # batch 1, two prompt lengths on one cache
        ids = torch.randint(0, 128, (1, T))
        assert torch.equal(dec.generate(ids)[:, T:], _hf_greedy(model, ids, 10))


def test_batch_and_tau_change(tiny_llama):
    """Batch of 2, then a new tau: each row equals its own single-row generate."""
    model = _prunepath(tiny_llama)
    dec = Decoder(model, max_len=32, config=DecodeConfig(max_new_tokens=6))
    ids = torch.randint(0, 128, (2, 6))
    n_layers = len(prunepath_ffns(model))
    for tau in (0.5, 0.9, [0.5 + 0.4 * i / max(1, n_layers - 1) for i in range(n_layers)]):  # last: one per layer
        dec.set_tau(tau)
        out = dec.generate(ids)[:, 6:]
        for b in range(2):
            assert torch.equal(out[b:b + 1], _hf_greedy(model, ids[b:b + 1], 6))


def test_sampling_is_seeded_and_valid(tiny_llama):
    ids = torch.randint(0, 128, (1, 4))
    a = Decoder(tiny_llama, max_len=24, config=DecodeConfig(max_new_tokens=8, seed=3)).generate(ids, temperature=1.0)
    b = Decoder(tiny_llama, max_len=24, config=DecodeConfig(max_new_tokens=8, seed=3)).generate(ids, temperature=1.0)
    assert torch.equal(a, b) and a.shape == (1, 12) and (a >= 0).all() and (a < 128).all()


def test_too_long_prompt_is_a_clear_error(tiny_llama):
    dec = Decoder(tiny_llama, max_len=8, config=DecodeConfig(max_new_tokens=4))
    with pytest.raises(ValueError, match="larger max_len"):
        dec.generate(torch.zeros(1, 6, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA device and PRUNEPATH_GPU_TESTS=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_loop_on_gpu(tiny_llama, dtype):
    """CUDA graph + Triton fast path: dense tokens equal generate (fp32); PrunePath logits close to torch."""
    dense = copy.deepcopy(tiny_llama).to("cuda", dtype)
    model = _prunepath(tiny_llama).to("cuda", dtype)
    ids = torch.randint(0, 128, (1, 6), device="cuda")
    if dtype == torch.float32:
        d = Decoder(dense, max_len=40, config=DecodeConfig(max_new_tokens=12))
        assert torch.equal(d.generate(ids)[:, 6:], _hf_greedy(dense, ids, 12).cpu())
    dec = Decoder(model, max_len=40, config=DecodeConfig(max_new_tokens=12))
    assert dec.fast_paths, "fast paths were not attached"
    out = dec.generate(ids)
    assert dec.graph is not None
    # teacher-forced logits: the fast path (one row per step) against the torch path on the same tokens
    full = out.to("cuda")
    L = full.shape[1]
    with torch.no_grad():
        dec.prefill(full[:, :6])
        got = torch.cat([dec._forward(full[:, t:t + 1], torch.tensor([[t]], device="cuda")) for t in range(6, L)])
        with torch_path(model):
            ref = model(full).logits[0, 6:L].float()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert ((got - ref).norm() / ref.norm()).item() < tol


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA device and PRUNEPATH_GPU_TESTS=1")
def test_graph_loop_takes_one_tau_per_layer_on_gpu(tiny_llama):
    """A per-layer τ set after capture reaches the captured graph: the same tokens as transformers generate
    through the torch routing path with that τ."""
    model = _prunepath(tiny_llama).to("cuda")
    ids = torch.randint(0, 128, (1, 6), device="cuda")
    dec = Decoder(model, max_len=40, config=DecodeConfig(max_new_tokens=10))
    dec.generate(ids)  # captures the graph at the global τ
    assert dec.graph is not None and dec.fast_paths
    n_layers = len(prunepath_ffns(model))
    per_layer = [0.3 + 0.6 * i / max(1, n_layers - 1) for i in range(n_layers)]
    dec.set_tau(per_layer)
    out = dec.generate(ids)[:, 6:]
    use_fast_paths(model, False)  # the torch routing path, with the same per-layer τ
    assert torch.equal(out, _hf_greedy(model, ids, 10).cpu())
