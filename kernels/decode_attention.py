"""Decode attention over a static KV cache in one launch: rotary, cache write, split-K attention, combine.

Shapes: B batch, H query heads, Hkv key-value heads (G = H / Hkv query heads share one), hd head size,
L cache length (static), S splits; pos the position of the one new token (a device tensor, so a CUDA
graph replays the step at every position).

At batch 1 one decode token's attention reads the cache once: 2 * Hkv * n * hd * 2 B for the n = pos + 1
positions written so far, 4 KB per position at the Llama-3-8B shape (Hkv = 8, hd = 128). SDPA over the
static cache with a position mask reads all L positions and runs as ~4 kernels (two for the mask), after
~3 pointwise kernels for rotary and the cache write. Here one launch of (B * Hkv) x S programs does all of
it (flash-decoding, split-K over the positions):

* every program rotates the G query heads of its kv head from the QKV projection (rotary from the cos /
  sin tables at pos, rounded to the model dtype as the torch step rounds q) into one [G, hd] tile, padded
  to 16 rows for the tensor cores;
* program (b, kv head, s) takes the s-th of S near-equal slices of [0, n) and keeps an online softmax
  (running max m, sum l, fp32 accumulator) over its slice, reading cached positions < pos only; the
  program whose slice holds pos rotates the new key, writes key and value into the cache at pos and adds
  the new position from registers (so no program reads a cache row while another writes it);
* each program writes its partial (acc [hd], m, l per query head) and takes a ticket for its (b, kv head);
  the last of the S to arrive combines them, out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s, writes
  the output in the model dtype and resets the ticket.

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
def _rotated(ptr, cos, sin, cols, sign, HD: tl.constexpr, row_offs, row_mask):
    """x * cos + rotate_half(x) * sin for rows of HD at ptr + row_offs (fp32)."""
    a = tl.load(ptr + row_offs[:, None] + cols[None, :], mask=row_mask[:, None], other=0.0).to(tl.float32)
    b = tl.load(ptr + row_offs[:, None] + ((cols + HD // 2) % HD)[None, :], mask=row_mask[:, None],
                other=0.0).to(tl.float32)
    return a * cos[None, :] + sign[None, :] * b * sin[None, :]


@triton.jit
def _decode_attention_kernel(qkv_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, pos_ptr, acc_ptr, m_ptr, l_ptr,
                             ticket_ptr, out_ptr, scale, H, L, S, s_qkv, s_kb, s_kh, s_kl,
                             G: tl.constexpr, GP: tl.constexpr, HD: tl.constexpr, BLOCK_N: tl.constexpr,
                             SP: tl.constexpr, IEEE: tl.constexpr):
    # IEEE: fp32 dots (fp32 inputs, or the CPU interpreter, whose bf16 dots are not exact); else the input
    # dtype's tensor-core dots with fp32 sums
    pid = tl.program_id(0)  # b * Hkv + kv head
    sid = tl.program_id(1)  # slice
    n_kv = H // G
    b = pid // n_kv
    kh = pid % n_kv
    pos = tl.minimum(tl.load(pos_ptr).to(tl.int32), L - 1)
    n = pos + 1  # valid positions
    per = tl.cdiv(n, S)
    start = sid * per
    end = tl.minimum(start + per, n)
    rows = tl.arange(0, GP)
    cols = tl.arange(0, HD)
    qrow = rows < G
    dt = k_ptr.dtype.element_ty
    cos = tl.load(cos_ptr + pos * HD + cols).to(tl.float32)
    sin = tl.load(sin_ptr + pos * HD + cols).to(tl.float32)
    sign = tl.where(cols < HD // 2, -1.0, 1.0)
    qkv_row = qkv_ptr + b * s_qkv
    q = _rotated(qkv_row, cos, sin, cols, sign, HD, (kh * G + rows) * HD, qrow).to(dt)  # [GP, HD]
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, HD], tl.float32)
    kv_off = b * s_kb + kh * s_kh
    cached_end = tl.minimum(end, pos)  # the cache holds positions < pos; pos itself comes from qkv
    for n0 in range(start, cached_end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        valid = offs < cached_end
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
            pv = tl.dot(p.to(dt), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    if (start < n) & (end == n):  # this slice holds pos (the last non-empty one): the new key and value
        one = tl.arange(0, 1)
        k_new = _rotated(qkv_row, cos, sin, cols, sign, HD, (H + kh) * HD + one, one < 1).to(dt)  # [1, HD]
        v_new = tl.load(qkv_row + (H + n_kv + kh) * HD + cols)  # [HD]
        tl.store(k_ptr + kv_off + pos * s_kl + one[:, None] * s_kl + cols[None, :], k_new)
        tl.store(v_ptr + kv_off + pos * s_kl + cols, v_new)
        s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32), 1) * scale  # [GP]
        m_new = tl.maximum(m_i, s_new)
        alpha = tl.exp(m_i - m_new)
        p_new = tl.exp(s_new - m_new)
        l_i = l_i * alpha + p_new
        acc = acc * alpha[:, None] + p_new.to(dt).to(tl.float32)[:, None] * v_new.to(tl.float32)[None, :]
        m_i = m_new
    head = b * H + kh * G + rows  # [GP] global query-head rows
    part = head * S + sid
    tl.store(acc_ptr + part[:, None] * HD + cols[None, :], acc, mask=qrow[:, None])
    tl.store(m_ptr + part, m_i, mask=qrow)
    tl.store(l_ptr + part, l_i, mask=qrow)
    # The last of the S programs of this (b, kv head) combines (barrier + release ticket, as in expert_ffn.py).
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr + pid, 1, sem="acq_rel", scope="gpu")
    if ticket == S - 1:
        tl.debug_barrier()
        _combine_heads(acc_ptr, m_ptr, l_ptr, out_ptr, b, kh, H, S, cols, G, HD, SP)
        tl.store(ticket_ptr + pid, 0)


@triton.jit
def _combine_heads(acc_ptr, m_ptr, l_ptr, out_ptr, b, kh, H, S, cols, G: tl.constexpr, HD: tl.constexpr,
                   SP: tl.constexpr):
    """out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s for the G query heads of kv head kh (unrolled)."""
    sl = tl.arange(0, SP)
    sm = sl < S
    for g in tl.static_range(G):
        hp = (b * H + kh * G + g) * S + sl  # [SP]
        ms = tl.load(m_ptr + hp, mask=sm, other=float("-inf"), cache_modifier=".cg")
        ls = tl.load(l_ptr + hp, mask=sm, other=0.0, cache_modifier=".cg")
        accs = tl.load(acc_ptr + hp[:, None] * HD + cols[None, :], mask=sm[:, None], other=0.0,
                       cache_modifier=".cg")  # [SP, HD]
        w = tl.exp(ms - tl.max(ms, 0))  # slice 0 holds position 0: the max is finite; empty slices weigh 0
        o = tl.sum(accs * w[:, None], 0) / tl.sum(ls * w, 0)
        tl.store(out_ptr + b * (H * HD) + (kh * G + g) * HD + cols, o.to(out_ptr.dtype.element_ty))


def default_splits(batch: int, n_kv: int, max_len: int, programs: int = 64, block_n: int = 32) -> int:
    """S: about `programs` programs in all, and no slice shorter than one block at a full cache. 64: at the
    Llama-3-8B shape S = 8 measured 7.8 / 9.2 / 10.1 us per layer at positions 100 / 420 / 800 against 11.3 /
    12.9 / 13.3 with S = 26 and 7.7 / 10.4 / 12.4 with S = 4 (H200; the combine's cost grows with S)."""
    return max(1, min(programs // max(1, batch * n_kv), triton.cdiv(max_len, block_n)))


_TICKETS: dict = {}


def _tickets(device: torch.device, n: int) -> torch.Tensor:
    """One arrival counter per (b, kv head), left zeroed by each call (shared by all layers: they run in turn)."""
    key = (device, n)
    if key not in _TICKETS:
        _TICKETS[key] = torch.zeros(n, device=device, dtype=torch.int32)
    return _TICKETS[key]


def decode_attention(qkv: torch.Tensor, cos_t: torch.Tensor, sin_t: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, pos: torch.Tensor, n_heads: int, splits: int | None = None,
                     block_n: int = 32) -> torch.Tensor:
    """One decode token's attention output [B, H * hd] in the model dtype; writes its key and value at pos.

    qkv [B, (H + 2 Hkv) hd], the QKV projection before rotary; cos_t / sin_t [L, hd] rotary tables;
    k_cache / v_cache [B, Hkv, L, hd] holding positions 0..pos-1; pos [1] integer on the device (< L).
    Attends to positions 0..pos (the causal rule for the newest token).
    """
    B, n_kv, L, hd = k_cache.shape
    H = n_heads
    if v_cache.shape != k_cache.shape or H % n_kv or tuple(qkv.shape) != (B, (H + 2 * n_kv) * hd) or \
            tuple(cos_t.shape) != (L, hd) or sin_t.shape != cos_t.shape:
        raise ValueError(f"qkv {tuple(qkv.shape)}, caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)}, rotary "
                         f"tables {tuple(cos_t.shape)} / {tuple(sin_t.shape)} with {H} heads do not fit "
                         "[B, (H + 2 Hkv) hd], [B, Hkv, L, hd], [L, hd] with H a multiple of Hkv")
    if hd != next_pow2(hd) or hd < 16:
        raise ValueError(f"head size {hd}: the decode attention kernel needs a power of two >= 16")
    if qkv.dtype not in TL_DTYPES or k_cache.dtype != qkv.dtype or v_cache.dtype != qkv.dtype:
        raise ValueError(f"dtypes {qkv.dtype} / {k_cache.dtype} / {v_cache.dtype}: one of fp32, fp16, bf16 for all")
    if qkv.stride(-1) != 1 or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or \
            not (cos_t.is_contiguous() and sin_t.is_contiguous()):
        raise ValueError("qkv and the caches need unit stride in the head dimension, the caches equal strides "
                         "and the rotary tables contiguous")
    G = H // n_kv
    S = splits or default_splits(B, n_kv, L, block_n=block_n)
    acc = torch.empty(B, H, S, hd, device=qkv.device, dtype=torch.float32)
    m = torch.empty(B, H, S, device=qkv.device, dtype=torch.float32)
    l_ = torch.empty(B, H, S, device=qkv.device, dtype=torch.float32)
    out = torch.empty(B, H * hd, device=qkv.device, dtype=qkv.dtype)
    _decode_attention_kernel[(B * n_kv, S)](
        qkv, cos_t, sin_t, k_cache, v_cache, pos, acc, m, l_, _tickets(qkv.device, B * n_kv), out,
        1.0 / math.sqrt(hd), H, L, S, qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        G=G, GP=max(16, next_pow2(G)), HD=hd, BLOCK_N=block_n, SP=next_pow2(S),
        IEEE=qkv.dtype == torch.float32 or _interpreting(), num_warps=4)
    return out


def decode_attention_reference(qkv, cos_t, sin_t, k_cache, v_cache, pos, n_heads: int):
    """float64 form: (out [B, H * hd], k_cache, v_cache) with rotary applied and the new key and value written
    at pos into copies of the caches; softmax(q K^T / sqrt(hd)) V over positions 0..pos (G heads per kv head)."""
    B, n_kv, L, hd = k_cache.shape
    H = n_heads
    p = int(pos.reshape(-1)[0].item())
    x = qkv.double().view(B, H + 2 * n_kv, hd)
    cos, sin = cos_t[p].double(), sin_t[p].double()

    def rot(t):
        return t * cos + torch.cat((-t[..., hd // 2:], t[..., : hd // 2]), -1) * sin

    q, k_new, v_new = rot(x[:, :H]), rot(x[:, H: H + n_kv]), x[:, H + n_kv:]
    kc, vc = k_cache.double().clone(), v_cache.double().clone()
    kc[:, :, p], vc[:, :, p] = k_new, v_new
    k = kc[:, :, : p + 1].repeat_interleave(H // n_kv, dim=1)  # [B, H, n, hd]
    v = vc[:, :, : p + 1].repeat_interleave(H // n_kv, dim=1)
    s = torch.einsum("bhd,bhnd->bhn", q, k) / math.sqrt(hd)
    out = torch.einsum("bhn,bhnd->bhd", torch.softmax(s, -1), v).reshape(B, H * hd)
    return out, kc, vc
