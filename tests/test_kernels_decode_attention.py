"""The split-K decode attention kernel (prunepath.kernels.decode_attention) against its float64 reference.

CPU: the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1); `make test-gpu` runs it compiled.
"""

import os

import pytest
import torch

pytest.importorskip("triton")

from prunepath.kernels.decode_attention import (  # noqa: E402
    decode_attention,
    decode_attention_reference,
    default_splits,
    split_attention,
)

pytestmark = pytest.mark.gpu  # CPU: the interpreter; `make test-gpu`: compiled, on CUDA
DEV = "cuda" if torch.cuda.is_available() and os.environ.get("PRUNEPATH_GPU_TESTS") else "cpu"


def _inputs(B, H, n_kv, hd, L, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, hd, generator=g).to(DEV, dtype)
    k = torch.randn(B, n_kv, L, hd, generator=g).to(DEV, dtype)
    v = torch.randn(B, n_kv, L, hd, generator=g).to(DEV, dtype)
    return q, k, v


def _err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("B,H,n_kv,hd,L,pos,splits", [
    (1, 4, 2, 16, 24, 0, None),  # the first token: one position, most slices empty
    (1, 4, 2, 16, 24, 23, None),  # a full cache
    (2, 9, 3, 64, 50, 17, 4),  # a batch, 3 query heads per kv head (the default model's grouping)
    (1, 4, 4, 32, 7, 3, 16),  # more slices than positions; no grouping
    (1, 32, 8, 128, 80, 61, 8),  # the Llama-3-8B head layout
])
def test_matches_float64_reference_fp32(B, H, n_kv, hd, L, pos, splits):
    q, k, v = _inputs(B, H, n_kv, hd, L, torch.float32)
    p = torch.tensor([pos], device=DEV)
    out = decode_attention(q, k, v, p, splits=splits)
    assert out.shape == (B, H, hd) and out.dtype == torch.float32
    assert _err(out, decode_attention_reference(q, k, v, p)) < 1e-5


def test_matches_float64_reference_bf16():
    q, k, v = _inputs(1, 32, 8, 128, 96, torch.bfloat16, seed=1)
    p = torch.tensor([70], device=DEV)
    out = decode_attention(q, k, v, p)
    assert out.dtype == torch.bfloat16
    assert _err(out, decode_attention_reference(q, k, v, p)) < 1e-2  # bf16 inputs, p rounded to bf16 for P V


def test_positions_past_pos_are_not_read():
    """Garbage (even NaN) past pos must not change the output: only positions 0..pos are attended to."""
    q, k, v = _inputs(1, 4, 2, 16, 32, torch.float32)
    p = torch.tensor([9], device=DEV)
    ref = decode_attention(q, k, v, p, splits=3)
    k[:, :, 10:] = float("nan")
    v[:, :, 10:] = float("nan")
    assert torch.equal(decode_attention(q, k, v, p, splits=3), ref)


def test_partials_and_splits():
    q, k, v = _inputs(1, 4, 2, 16, 40, torch.float32)
    acc, m, l_ = split_attention(q, k, v, torch.tensor([4], device=DEV), splits=4)  # 5 positions: 2/2/1/0
    assert acc.shape == (1, 4, 4, 16) and m.shape == l_.shape == (1, 4, 4)
    assert torch.isinf(m[..., 3]).all() and (l_[..., 3] == 0).all()  # the empty slice
    assert default_splits(1, 8, 816) == 26 and default_splits(1, 8, 100000) == 32 and default_splits(1, 3, 8) == 1


def test_bad_input_is_a_clear_error():
    q, k, v = _inputs(1, 4, 2, 16, 8, torch.float32)
    p = torch.tensor([0], device=DEV)
    with pytest.raises(ValueError, match="H a multiple of Hkv"):
        split_attention(q[:, :3], k, v, p)
    with pytest.raises(ValueError, match="power of two"):
        split_attention(q[..., :12], k[..., :12], v[..., :12], p)
    with pytest.raises(ValueError, match="dtypes"):
        split_attention(q, k.double(), v.double(), p)
