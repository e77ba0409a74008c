"""The compiled decode step (prunepath.decode.compiled) against transformers' own forward.

On CPU the step runs eagerly (no compile, no graph); with a CUDA device and PRUNEPATH_GPU_TESTS=1 the
`gpu` tests run it compiled and captured as a CUDA graph, dense and with the Triton FFN kernels.
"""

import copy
import os

import pytest
import torch

from prunepath.decode.compiled import CompiledDecoder, UnsupportedModelError
from prunepath.ffn.module import prunepath_ffns
from prunepath.routing.control import set_tau

GPU = torch.cuda.is_available() and bool(os.environ.get("PRUNEPATH_GPU_TESTS"))


def _converted(model, tau=0.6):
    from prunepath import MoefyConfig, moefy, routing

    m = copy.deepcopy(model)
    moefy(m, MoefyConfig(split="random", router_init="zero", rule=routing.CumulativeMass(tau)), progress=False)
    torch.manual_seed(0)
    for f in prunepath_ffns(m):
        f.router.weight.data.normal_(0, 0.5)
    return m


def _last_logits(model, seq):
    with torch.no_grad():
        return model(seq).logits[:, -1].float()


def test_eager_step_matches_transformers(tiny_llama):
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (1, 7))
    dec = CompiledDecoder(tiny_llama, max_len=24)
    new = dec.generate(ids, 6)
    with torch.no_grad():
        ref = tiny_llama.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[:, 7:]
    assert torch.equal(new, ref)
    seq = torch.cat([ids, ref], 1)
    dec.prefill(seq)  # the logits after the last token equal the full forward's
    assert torch.allclose(dec.logits, _last_logits(tiny_llama, seq), atol=1e-5, rtol=1e-5)


def test_eager_step_with_split_attention_matches_transformers(tiny_llama):
    """The split-K Triton attention (CPU: the interpreter) in the step: the same greedy tokens and logits."""
    pytest.importorskip("triton")
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (1, 7))
    dec = CompiledDecoder(tiny_llama, max_len=16, attention="split")
    assert dec.attention == "split" and CompiledDecoder(tiny_llama, max_len=16).attention == "sdpa"  # CPU: auto
    new = dec.generate(ids, 6)
    with torch.no_grad():
        ref = tiny_llama.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[:, 7:]
    assert torch.equal(new, ref)
    seq = torch.cat([ids, ref], 1)
    dec.prefill(seq)
    assert torch.allclose(dec.logits, _last_logits(tiny_llama, seq), atol=1e-5, rtol=1e-5)


def test_eager_step_runs_prunepath_ffns(tiny_llama):
    model = _converted(tiny_llama)
    seq = torch.randint(0, 128, (1, 9))
    dec = CompiledDecoder(model, max_len=16)
    assert dec.sparse
    dec.prefill(seq)
    assert torch.allclose(dec.logits, _last_logits(model, seq), atol=1e-5, rtol=1e-5)


def test_bad_input_is_a_clear_error(tiny_llama):
    dec = CompiledDecoder(tiny_llama, max_len=8)
    with pytest.raises(ValueError, match="exceed the cache"):
        dec.generate(torch.zeros(1, 5, dtype=torch.long), 6)
    with pytest.raises(UnsupportedModelError, match="not a Llama-architecture"):
        CompiledDecoder(torch.nn.Linear(2, 2), max_len=8)
    with pytest.raises(ValueError, match="use 'auto', 'split' or 'sdpa'"):
        CompiledDecoder(tiny_llama, max_len=8, attention="flash")


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA device and PRUNEPATH_GPU_TESTS=1")
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("attention", ["split", "sdpa"])
def test_compiled_graph_step_matches_transformers_on_gpu(tiny_llama, sparse, attention):
    """Compiled + CUDA graph (bf16): the logits after each prompt follow transformers' forward, with the
    dense FFN and with the Triton kernels (tau changed between replays without re-capture)."""
    model = (_converted(tiny_llama) if sparse else copy.deepcopy(tiny_llama)).to("cuda", torch.bfloat16)
    dec = CompiledDecoder(model, max_len=32, attention=attention)
    assert dec.attention == attention
    torch.manual_seed(2)
    for tau in (0.6, 0.9):
        if sparse:
            set_tau(model, tau)
        seq = torch.randint(0, 128, (1, 11))
        dec.prefill(seq)
        assert dec.graph is not None
        ref = _last_logits(model, seq.cuda())
        err = (dec.logits - ref).norm() / ref.norm()
        assert err < 3e-2, f"tau={tau}: relative error {err:.3e}"


def test_greedy_is_the_first_argmax():
    """The two-stage argmax of the LM head picks what argmax picks, equal maxima included (first index)."""
    from prunepath.decode.compiled import greedy

    for V in (128256, 49152, 1000, 7):
        x = torch.randn(3, V)
        x[1, V // 3] = x[1, V - 1] = 50.0  # a tie across chunks: the first wins
        x[2] = 1.0  # every entry equal
        assert torch.equal(greedy(x), x.argmax(-1)), V
