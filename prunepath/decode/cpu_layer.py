"""A decoder layer for one decoded token on a CPU, compiled: its attention half in one call (norm, QKV, rotary,
cache, attention, O projection, residual, the FFN's input norm), the dense FFN, and the GEMV both use.

Shapes: D hidden, H / Hkv query / key-value heads, hd head size, L cache length, Q = (H + 2 Hkv) hd, P threads.

The decode step of a small model on a CPU is bound by reading weights and by the cost of each eager
operation. In the eager step (`prunepath.decode.cpu_step`) the attention half of a layer is about fifteen
torch operations around two GEMVs; for the default checkpoint of Gu, Fu, Yuan 2026 (SmolLM2-135M, 30 layers,
two threads of a 2-core AMD EPYC) the step spent ~11.6 ms per token outside the FFN where its weight reads
(QKV, O, LM head: ~219 MB) take ~8 ms. The dense and the sparse loop share that part, so it caps the speed-up
that reading only the kept experts buys. Here one numba-compiled call per layer, on the step's own weight
copies and static cache, does:

1. h += the previous layer's FFN output (the residual of the FFN, folded into this call);
2. x = RMSNorm(h) · w_ln1;
3. qkv = x W_qkv, W_qkv stored [D, Q] (each input coordinate scales one contiguous row), split over the P
   threads by input rows, four rows per pass over the output (`gemv_into`; the two partial rows are summed);
4. rotary on the queries and keys, q·cos + roll(q, hd/2)·sin with the step's sign-folded sin table;
   the key and value rows are written into the static cache at position `pos`;
5. attention of each query head over the cache positions 0..pos (its key-value head `h // (H / Hkv)`),
   scaled by 1/sqrt(hd), softmax with the maximum subtracted; heads split over the threads;
6. h += attn W_o (W_o stored [H hd, D], the same split GEMV);
7. x2 = RMSNorm(h) · w_ln2, the FFN's input.

`gemv_into` alone runs the LM head; `dense_ffn_into` is the dense SiLU FFN as two such GEMVs (the decode
step's dense FFN, `cpu_experts.dense_gated`, takes it for one fp32 row). Measured in the decode step of the
default checkpoint (scratch pairs, two threads): the compiled attention half and LM head made the dense step
1.13x faster, the compiled dense FFN on top of them 1.29x in all (the eager dense FFN's torch GEMVs between
compiled calls cost more than their bytes). Sums run in fp32 in a different order from torch's, sums of squares
in float64: results agree with the eager step to rounding (tested), not bit for bit; both loops (dense
and sparse) run this same code, so the sparse loop with every expert kept is still the dense loop bit for bit.

Only fp32, one row (batch 1, one new token) is compiled; other cases run the eager step. `compiled_layer()`
says why the compiled call cannot run (numba missing: the reason from `prunepath.decode.cpu_fused`);
`cpu_fused.compiled_threads(n)` is the number of parts the work is split into (1 unless numba's OpenMP layer runs).
The first call on a machine compiles for ~7 s (2-core AMD EPYC); numba caches the result beside the module.
"""

from __future__ import annotations

import math

import numpy as np

from prunepath.decode import cpu_fused
from prunepath.decode.cpu_fused import numba


def compiled_layer() -> str:
    """Why the compiled attention half cannot run on this machine, or "" when it can."""
    return cpu_fused.fused_kernels()


if numba is not None:
    _jit = numba.njit(cache=True, boundscheck=False, nogil=True, fastmath={"contract"})
    _par = numba.njit(cache=True, boundscheck=False, nogil=True, parallel=True, fastmath={"contract"})

    @_jit
    def _rows_gemv(x, w, d0, d1, y):
        """y <- x[d0:d1] @ w[d0:d1] (w [I, O]): four input rows per pass over y, so y is read and written
        once per four weight rows while four weight streams are read."""
        n_out = w.shape[1]
        for j in range(n_out):
            y[j] = 0.0
        d = d0
        while d + 4 <= d1:
            x0, x1, x2, x3 = x[d], x[d + 1], x[d + 2], x[d + 3]
            for j in range(n_out):
                y[j] += x0 * w[d, j] + x1 * w[d + 1, j] + x2 * w[d + 2, j] + x3 * w[d + 3, j]
            d += 4
        while d < d1:
            xd = x[d]
            for j in range(n_out):
                y[j] += xd * w[d, j]
            d += 1

    @_jit
    def _sum_parts(parts, P, y, add):
        """y[j] (+)= parts[0, j] + ... + parts[P - 1, j]: the P threads' partial GEMV rows, summed in order."""
        for j in range(y.shape[0]):
            acc = parts[0, j]
            for p in range(1, P):
                acc += parts[p, j]
            if add:
                y[j] += acc
            else:
                y[j] = acc

    @_jit
    def _rms_norm(h, w, eps, out):
        """out <- w ⊙ h / sqrt(mean(h²) + eps), the sum of squares in float64."""
        s = 0.0
        for i in range(h.shape[0]):
            s += np.float64(h[i]) * h[i]
        scale = np.float32(1.0 / math.sqrt(s / h.shape[0] + eps))
        for i in range(h.shape[0]):
            out[i] = h[i] * w[i] * scale

    @_par
    def gemv_into(x, w, P, parts, y):
        """y [O] <- x [I] @ w [I, O], the input rows split into P parts, one per thread (parts: scratch
        [>= P, >= O]); returns y."""
        n_in, n_out = w.shape
        for p in numba.prange(P):
            _rows_gemv(x, w, (n_in * p) // P, (n_in * (p + 1)) // P, parts[p])
        _sum_parts(parts, P, y, False)
        return y

    @_jit
    def _head_attention(q, k_cache, v_cache, n, scores, out):
        """out [hd] <- softmax(q·K[:n]ᵀ) V[:n] for one head (q already scaled), scores: scratch [>= n]."""
        hd = q.shape[0]
        top = -np.inf
        for t in range(n):
            s = np.float32(0.0)
            for i in range(hd):
                s += q[i] * k_cache[t, i]
            scores[t] = s
            top = max(top, s)
        total = 0.0
        for t in range(n):
            e = math.exp(scores[t] - top)
            scores[t] = e
            total += e
        for i in range(hd):
            out[i] = 0.0
        for t in range(n):
            p = np.float32(scores[t] / total)
            for i in range(hd):
                out[i] += p * v_cache[t, i]

    @_par
    def attention_block(h, y_prev, add_prev, ln1, ln2, eps, w_qkv, b_qkv, w_o, cos, sin, k_cache, v_cache, pos,
                        H, Hkv, P, parts, x, qkv, att, scores, x2):
        """The attention half of one layer for one token (steps 1-7 of the module docstring): h [D] updated
        in place, x2 [D] <- the FFN's input. k_cache, v_cache [Hkv, L, hd] (row `pos` written); cos, sin
        [hd] at `pos`; b_qkv [Q] (zeros for none); x [D], qkv [Q], att [H hd], scores [H, >= pos + 1] and
        parts [>= P, >= max(Q, D)] scratch."""
        D = h.shape[0]
        hd = cos.shape[0]
        half = hd // 2
        if add_prev:
            for i in range(D):
                h[i] += y_prev[i]
        _rms_norm(h, ln1, eps, x)
        Q = w_qkv.shape[1]
        for p in numba.prange(P):
            _rows_gemv(x, w_qkv, (D * p) // P, (D * (p + 1)) // P, parts[p])
        for j in range(Q):
            acc = b_qkv[j]
            for p in range(P):
                acc += parts[p, j]
            qkv[j] = acc
        for head in range(H + Hkv):  # rotary on queries and keys: q cos + roll(q, hd/2) sin
            o = head * hd
            for i in range(hd):
                parts[0, i] = qkv[o + i] * cos[i] + qkv[o + (i + half) % hd] * sin[i]
            for i in range(hd):
                qkv[o + i] = parts[0, i]
        for g in range(Hkv):
            ko, vo = (H + g) * hd, (H + Hkv + g) * hd
            for i in range(hd):
                k_cache[g, pos, i] = qkv[ko + i]
                v_cache[g, pos, i] = qkv[vo + i]
        scale = np.float32(1.0 / math.sqrt(hd))
        for i in range(H * hd):
            qkv[i] *= scale
        group = H // Hkv
        for p in numba.prange(P):
            for head in range((H * p) // P, (H * (p + 1)) // P):
                g = head // group
                _head_attention(qkv[head * hd:(head + 1) * hd], k_cache[g], v_cache[g], pos + 1, scores[head],
                                att[head * hd:(head + 1) * hd])
        HD = att.shape[0]
        for p in numba.prange(P):
            _rows_gemv(att, w_o, (HD * p) // P, (HD * (p + 1)) // P, parts[p])
        _sum_parts(parts, P, h, True)
        _rms_norm(h, ln2, eps, x2)

    @_par
    def dense_ffn_into(x, w_in, w_down, P, parts, pre, y):
        """y [D] <- SiLU(x W_g) ⊙ (x W_u) W_d, w_in = [W_g | W_u] stored [D, 2F], w_down [F, D]; both GEMVs
        split over P threads as in `gemv_into` (pre: scratch [2F]); returns y."""
        D, R = w_in.shape
        F = R // 2
        for p in numba.prange(P):
            _rows_gemv(x, w_in, (D * p) // P, (D * (p + 1)) // P, parts[p])
        _sum_parts(parts, P, pre, False)
        for f in range(F):
            a = pre[f]
            pre[f] = a / (np.float32(1.0) + np.float32(math.exp(-a))) * pre[F + f]
        for p in numba.prange(P):
            _rows_gemv(pre, w_down, (F * p) // P, (F * (p + 1)) // P, parts[p])
        _sum_parts(parts, P, y, False)
        return y

    @_jit
    def add_norm(h, y_prev, w, eps, out):
        """h += y_prev, out <- RMSNorm(h) · w: the last layer's FFN residual and the final norm."""
        for i in range(h.shape[0]):
            h[i] += y_prev[i]
        _rms_norm(h, w, eps, out)
