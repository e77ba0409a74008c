"""The decode attention kernel (prunepath.kernels.decode_attention) against its float64 reference.

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
)

pytestmark = pytest.mark.gpu  # CPU: the interpreter; `make test-gpu`: compiled, on CUDA
DEV = "cuda" if torch.cuda.is_available() and os.environ.get("PRUNEPATH_GPU_TESTS") else "cpu"


def _inputs(B, H, n_kv, hd, L, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, (H + 2 * n_kv) * hd, generator=g).to(DEV, dtype)
    k = torch.randn(B, n_kv, L, hd, generator=g).to(DEV, dtype)
    v = torch.randn(B, n_kv, L, hd, generator=g).to(DEV, dtype)
    ang = torch.rand(L, hd // 2, generator=g) * 6.28
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(DEV, dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(DEV, dtype)
    return qkv, cos, sin, k, v


def _err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("B,H,n_kv,hd,L,pos,splits", [
    (1, 4, 2, 16, 24, 0, None),  # the first token: one position, most slices empty
    (1, 4, 2, 16, 24, 23, None),  # the last slot of the cache
    (2, 9, 3, 64, 50, 17, 4),  # a batch, 3 query heads per kv head (the default model's grouping)
    (1, 4, 4, 32, 7, 3, 16),  # more slices than positions; no grouping
    (1, 32, 8, 128, 80, 61, 8),  # the Llama-3-8B head layout
])
def test_matches_float64_reference_fp32(B, H, n_kv, hd, L, pos, splits):
    qkv, cos, sin, k, v = _inputs(B, H, n_kv, hd, L, torch.float32)
    p = torch.tensor([pos], device=DEV)
    out_ref, k_ref, v_ref = decode_attention_reference(qkv, cos, sin, k, v, p, H)
    out = decode_attention(qkv, cos, sin, k, v, p, H, splits=splits)
    assert out.shape == (B, H * hd) and out.dtype == torch.float32
    assert _err(out, out_ref) < 1e-5
    assert torch.allclose(k.double(), k_ref, atol=1e-5) and torch.allclose(v.double(), v_ref, atol=1e-6)
    out2 = decode_attention(qkv, cos, sin, k, v, p, H, splits=splits)  # tickets were left zeroed: same again
    assert torch.equal(out2, out)


def test_matches_float64_reference_bf16():
    qkv, cos, sin, k, v = _inputs(1, 32, 8, 128, 96, torch.bfloat16, seed=1)
    p = torch.tensor([70], device=DEV)
    out_ref, k_ref, _ = decode_attention_reference(qkv, cos, sin, k, v, p, 32)
    out = decode_attention(qkv, cos, sin, k, v, p, 32)
    assert out.dtype == torch.bfloat16
    assert _err(out, out_ref) < 1e-2  # bf16 q, k and p rounded as the torch step rounds them
    assert _err(k[:, :, 70], k_ref[:, :, 70]) < 1e-2


def test_positions_past_pos_are_not_read():
    """Garbage (even NaN) at and past pos must not change the output: the cache is read below pos only."""
    qkv, cos, sin, k, v = _inputs(1, 4, 2, 16, 32, torch.float32)
    p = torch.tensor([9], device=DEV)
    ref = decode_attention(qkv, cos, sin, k.clone(), v.clone(), p, 4, splits=3)
    k[:, :, 9:] = float("nan")
    v[:, :, 9:] = float("nan")
    assert torch.equal(decode_attention(qkv, cos, sin, k, v, p, 4, splits=3), ref)
    assert not torch.isnan(k[:, :, 9]).any() and torch.isnan(k[:, :, 10:]).all()  # pos written, nothing after


def test_default_splits():
    assert default_splits(1, 8, 816) == 8 and default_splits(1, 3, 816) == 21 and default_splits(1, 3, 8) == 1


def test_bad_input_is_a_clear_error():
    qkv, cos, sin, k, v = _inputs(1, 4, 2, 16, 8, torch.float32)
    p = torch.tensor([0], device=DEV)
    with pytest.raises(ValueError, match="H a multiple of Hkv"):
        decode_attention(qkv, cos, sin, k, v, p, 3)
    with pytest.raises(ValueError, match="power of two"):
        q12, c12, s12, k12, v12 = _inputs(1, 4, 2, 12, 8, torch.float32)
        decode_attention(q12, c12, s12, k12, v12, p, 4)
    with pytest.raises(ValueError, match="dtypes"):
        decode_attention(qkv, cos, sin, k.double(), v.double(), p, 4)
