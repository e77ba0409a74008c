"""Split-K decode attention over a static KV cache (flash-decoding), one launch plus a combine.

Shapes: B batch, H query heads, Hkv key-value heads (G = H / Hkv query heads share one), hd head size,
L cache length (static), S splits; pos the position of the one new token (a device tensor, so a CUDA
graph replays the step at every position).

At batch 1 one decode token's attention reads the cache once: 2 * Hkv * n * hd * 2 B for the n = pos + 1
positions written so far, 4 KB per position at the Llama-3-8B shape (Hkv = 8, hd = 128). SDPA over the
static cache with a position mask reads all L positions and runs as ~4 kernels (two for the mask); here
one launch of (B * Hkv) x S programs reads only the n valid positions: program (b, kv head, s) takes the
s-th of S near-equal slices of [0, n), all G query heads of its kv head as one [G, hd] tile (padded to 16
rows for the tensor cores), and keeps an online softmax (running max m, sum l, fp32 accumulator) over its
slice. It writes its partial (acc [hd], m, l) per query head; `combine` rescales the S partials to a
common max and divides: out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s. The combine is a few
torch operations, so the compiled decode step fuses it into the O projection's GEMV.

`decode_attention_reference` is the float64 torch form the kernel is tested against.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .expert_ffn import _interpreting
from .layout import next_pow2
from .route import TL_DTYPES


@triton.jit
def _split_attention_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, acc_ptr, m_ptr, l_ptr, scale, H, L, S,
                            s_qb, s_qh, s_kb, s_kh, s_kl,
                            G: tl.constexpr, GP: tl.constexpr, HD: tl.constexpr, BLOCK_N: tl.constexpr,
                            IEEE: tl.constexpr):
    # IEEE: fp32 dots (fp32 inputs, or the CPU interpreter, whose bf16 dots are not exact); else the input dtype's
    # tensor-core dots with fp32 sums
    pid = tl.program_id(0)  # b * Hkv + kv head
    sid = tl.program_id(1)  # slice
    n_kv = H // G
    b = pid // n_kv
    kh = pid % n_kv
    n = tl.minimum(tl.load(pos_ptr).to(tl.int32) + 1, L)  # valid positions
    per = tl.cdiv(n, S)
    start = sid * per
    end = tl.minimum(start + per, n)
    rows = tl.arange(0, GP)
    cols = tl.arange(0, HD)
    qrow = rows < G
    q = tl.load(q_ptr + b * s_qb + (kh * G + rows)[:, None] * s_qh + cols[None, :], mask=qrow[:, None], other=0.0)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, HD], tl.float32)
    kv_off = b * s_kb + kh * s_kh
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        valid = offs < end
        k = tl.load(k_ptr + kv_off + offs[:, None] * s_kl + cols[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + kv_off + offs[:, None] * s_kl + cols[None, :], mask=valid[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(valid[None, :], s * scale, float("-inf"))  # [GP, BLOCK_N] fp32
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    head = b * H + kh * G + rows  # [GP] global query-head rows
    part = head * S + sid
    tl.store(acc_ptr + part[:, None] * HD + cols[None, :], acc, mask=qrow[:, None])
    tl.store(m_ptr + part, m_i, mask=qrow)
    tl.store(l_ptr + part, l_i, mask=qrow)


def default_splits(batch: int, n_kv: int, max_len: int, programs: int = 256, block_n: int = 32) -> int:
    """S: about `programs` programs in all, and no slice shorter than one block at a full cache."""
    return max(1, min(programs // max(1, batch * n_kv), triton.cdiv(max_len, block_n)))


def split_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                    splits: int | None = None, block_n: int = 32):
    """Partials of one decode token's attention: acc [B, H, S, hd] (fp32), m, l [B, H, S].

    q [B, H, hd] (rotary applied); k_cache / v_cache [B, Hkv, L, hd] with positions 0..pos written; pos [1]
    integer on the device. Attends to positions 0..pos (the causal rule for the newest token).
    """
    B, H, hd = q.shape
    Bc, n_kv, L, hdc = k_cache.shape
    if (Bc, hdc) != (B, hd) or v_cache.shape != k_cache.shape or H % n_kv:
        raise ValueError(f"q {tuple(q.shape)} and caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} do not "
                         "fit [B, H, hd] and [B, Hkv, L, hd] with H a multiple of Hkv")
    if hd != next_pow2(hd) or hd < 16:
        raise ValueError(f"head size {hd}: the split attention kernel needs a power of two >= 16")
    if q.dtype not in TL_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"dtypes {q.dtype} / {k_cache.dtype} / {v_cache.dtype}: one of fp32, fp16, bf16 for all")
    if q.stride(-1) != 1 or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("q and the caches need unit stride in the head dimension and the caches equal strides")
    G = H // n_kv
    S = splits or default_splits(B, n_kv, L, block_n=block_n)
    acc = torch.empty(B, H, S, hd, device=q.device, dtype=torch.float32)
    m = torch.empty(B, H, S, device=q.device, dtype=torch.float32)
    l_ = torch.empty(B, H, S, device=q.device, dtype=torch.float32)
    _split_attention_kernel[(B * n_kv, S)](
        q, k_cache, v_cache, pos, acc, m, l_, 1.0 / math.sqrt(hd), H, L, S,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        G=G, GP=max(16, next_pow2(G)), HD=hd, BLOCK_N=block_n, IEEE=q.dtype == torch.float32 or _interpreting(),
        num_warps=4)
    return acc, m, l_


def combine(acc: torch.Tensor, m: torch.Tensor, l_: torch.Tensor) -> torch.Tensor:
    """The S partials to the attention output [B, H, hd] (fp32). Slices with no positions have m = -inf, l = 0."""
    w = torch.exp(m - m.amax(-1, keepdim=True))  # [B, H, S]; slice 0 always holds position 0, so the max is finite
    return (acc * w[..., None]).sum(2) / (l_ * w).sum(-1)[..., None]


def decode_attention(q, k_cache, v_cache, pos, splits: int | None = None, block_n: int = 32) -> torch.Tensor:
    """One decode token's attention output [B, H, hd] in q's dtype (split kernel, then combine)."""
    return combine(*split_attention(q, k_cache, v_cache, pos, splits, block_n)).to(q.dtype)


def decode_attention_reference(q, k_cache, v_cache, pos) -> torch.Tensor:
    """float64 softmax(q K^T / sqrt(hd)) V over positions 0..pos, [B, H, hd] (GQA: G query heads per kv head)."""
    B, H, hd = q.shape
    n_kv = k_cache.shape[1]
    n = int(pos.reshape(-1)[0].item()) + 1
    k = k_cache[:, :, :n].double().repeat_interleave(H // n_kv, dim=1)  # [B, H, n, hd]
    v = v_cache[:, :, :n].double().repeat_interleave(H // n_kv, dim=1)
    s = torch.einsum("bhd,bhnd->bhn", q.double(), k) / math.sqrt(hd)
    return torch.einsum("bhn,bhnd->bhd", torch.softmax(s, -1), v)
