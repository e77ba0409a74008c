"""Fused decode FFN over the active experts only: router -> gate/up (+selection) -> down -> reduce.

Shapes: N = B*T rows (<= 8), D hidden, F ffn = E*G, E experts, G expert size, C = ceil(E / SLOTS).

Decode is memory-bound: the time is the weight bytes read. A kept fraction a of the experts should
cost about a of the dense FFN's bytes. Four launches, no host synchronisation, no atomics:

1. `_router_kernel` (route.py): fp32 partial logits [S, N, E] over a grid of E blocks x D slices.
2. `_gate_up_kernel`, grid E * (G / BG): each program owns BG neurons of one expert. It first decides
   its expert for every token (route.`_select_expert`, O(E)); if no token keeps the expert it exits
   before touching a weight byte. Otherwise it streams BG rows of W_gate and W_up (contiguous
   [BLOCK_K] segments), applies act(gate) * up * g_token in fp32, and writes h [N, F] for those
   neurons (0 for tokens that dropped the expert). Programs with rb == 0 also write mask / gates /
   logits [N, E] and the union flag [E].
3. `_down_kernel` (batches, or E >= 128), grid C x (D / BLOCK_D): each program compacts the union flags itself (a cumsum
   over E in registers) and sums the contribution h[:, e] @ W_out[e] ([G, BLOCK_D] contiguous tiles)
   of SLOTS *active* experts into an fp32 partial [C, N, D]; programs past ceil(count / SLOTS) exit.
   Split-K with a second pass instead of atomics (bf16 atomics lose precision; Gu, Fu, Yuan 2026):
   deterministic, fp32 accumulation, no zero-fill launch. `_down_by_id_kernel` (one token, E < 128) walks
   expert ids instead and masks the inactive ones: no compaction latency, which wins when the whole FFN
   is a few microseconds, but a ~18 us fixed cost at the Llama-3-8B shape (prunepath/bench/NOTES.md).
4. `_reduce_kernel` / `_reduce_all_kernel`: y = sum of the written partials (+ bias), cast to the
   model dtype.

Batches (N <= 8): an expert is streamed once if *any* token keeps it (the union), so the cost follows
the union's size. One token uses a GEMV path (fp32 FMA, no padding); 2..8 tokens a tensor-core path
with rows padded to 16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .layout import ExpertLayout, _reference_act, next_pow2
from .route import (
    GATE_CODES,
    TL_DTYPES,
    RouterConfig,
    _select_expert,
    dot_precision,
    router_partial_logits,
    token_block,
)

ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}


@triton.jit
def _act(v, ACT: tl.constexpr):
    if ACT == 0:
        return v * tl.sigmoid(v)
    elif ACT == 1:
        return 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACT == 2:
        u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        return 0.5 * v * (1.0 + (2.0 * tl.sigmoid(2.0 * u) - 1.0))  # tanh(u) = 2 sigmoid(2u) - 1
    else:
        return tl.maximum(v, 0.0)


@triton.jit
def _gate_up_kernel(x_ptr, w_in_ptr, w_up_ptr, b_in_ptr, rpart_ptr, param_ptr,
                    h_ptr, mask_ptr, gate_ptr, logit_ptr, flag_ptr, N, E, D,
                    G: tl.constexpr, BG: tl.constexpr, RS: tl.constexpr, BN: tl.constexpr,
                    BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, RULE: tl.constexpr, GATE: tl.constexpr,
                    ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                    ROUND_TO: tl.constexpr, DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    e = pid // (G // BG)
    rb = pid % (G // BG)
    keep, g, ze = _select_expert(rpart_ptr, param_ptr, e, N, E, RS, BN, BLOCK_E, RULE, GATE, ROUND_TO)
    any_keep = tl.max(keep.to(tl.int32), axis=0)
    n_offs = tl.arange(0, BN)
    nm = n_offs < N
    if rb == 0:
        tl.store(mask_ptr + n_offs * E + e, keep.to(tl.int8), mask=nm)
        tl.store(gate_ptr + n_offs * E + e, g, mask=nm)
        tl.store(logit_ptr + n_offs * E + e, ze, mask=nm)
        tl.store(flag_ptr + e, any_keep)
    if any_keep == 0:
        return  # no token wants this expert: none of its bytes are read
    rows = e * G + rb * BG + tl.arange(0, BG)  # [BG] neuron indices in [0, F)
    if BN == 1:
        # GEMV: accumulate elementwise products, reduce over K once at the end
        accg = tl.zeros((BG, BLOCK_K), dtype=tl.float32)
        accu = tl.zeros((BG, BLOCK_K), dtype=tl.float32)
        for k in range(0, D, BLOCK_K):
            k_offs = k + tl.arange(0, BLOCK_K)
            km = k_offs < D
            xv = tl.load(x_ptr + k_offs, mask=km, other=0.0).to(tl.float32)  # [BLOCK_K]
            wp = rows[:, None] * D + k_offs[None, :]
            wg = tl.load(w_in_ptr + wp, mask=km[None, :], other=0.0)  # [BG, BLOCK_K]
            accg += wg.to(tl.float32) * xv[None, :]
            if GATED:
                wu = tl.load(w_up_ptr + wp, mask=km[None, :], other=0.0)
                accu += wu.to(tl.float32) * xv[None, :]
        hg = tl.sum(accg, axis=1)[None, :]  # [1, BG]
        hu = tl.sum(accu, axis=1)[None, :]
    else:
        hg = tl.zeros((BN, BG), dtype=tl.float32)
        hu = tl.zeros((BN, BG), dtype=tl.float32)
        for k in range(0, D, BLOCK_K):
            k_offs = k + tl.arange(0, BLOCK_K)
            km = k_offs < D
            xt = tl.load(x_ptr + n_offs[:, None] * D + k_offs[None, :], mask=nm[:, None] & km[None, :],
                         other=0.0).to(tl.float32)  # [BN, BLOCK_K]
            wp = rows[:, None] * D + k_offs[None, :]
            wg = tl.load(w_in_ptr + wp, mask=km[None, :], other=0.0)  # [BG, BLOCK_K]
            hg = tl.dot(xt, tl.trans(wg.to(tl.float32)), hg, input_precision=DOT_PREC)
            if GATED:
                wu = tl.load(w_up_ptr + wp, mask=km[None, :], other=0.0)
                hu = tl.dot(xt, tl.trans(wu.to(tl.float32)), hu, input_precision=DOT_PREC)
    if HAS_BIAS:
        hg += tl.load(b_in_ptr + rows).to(tl.float32)[None, :]
    a = _act(hg, ACT)
    if GATED:
        a = a * hu
    h = a * g[:, None]  # [BN, BG]; 0 for tokens that dropped the expert
    tl.store(h_ptr + n_offs[:, None] * (E * G) + rows[None, :], h, mask=nm[:, None])


@triton.jit
def _down_tile(acc, h_ptr, w_out_ptr, e, on, g_offs, d_offs, dm, n_offs, nm, E, D,
               G: tl.constexpr, BN: tl.constexpr, DOT_PREC: tl.constexpr):
    """Add expert e's down contribution h[:, e] @ W_out[e] over the BLOCK_D columns d_offs to acc and
    return it. Tile rows (neurons) where `on` is false are masked off (no memory traffic), so an empty
    slot or an inactive expert adds 0. acc is [BLOCK_G, BLOCK_D] elementwise products for one token
    (GEMV; the caller sums over G once at the end), else [BN, BLOCK_D]."""
    w = tl.load(w_out_ptr + e * G * D + g_offs[:, None] * D + d_offs[None, :],
                mask=on[:, None] & dm[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    if BN == 1:
        hv = tl.load(h_ptr + e * G + g_offs, mask=on, other=0.0)  # [BLOCK_G] fp32
        acc += w.to(tl.float32) * hv[:, None]
    else:
        ht = tl.load(h_ptr + n_offs[:, None] * (E * G) + e * G + g_offs[None, :],
                     mask=nm[:, None] & on[None, :], other=0.0)  # [BN, BLOCK_G]
        acc = tl.dot(ht, w.to(tl.float32), acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _down_kernel(h_ptr, w_out_ptr, flag_ptr, dpart_ptr, N, E, D,
                 G: tl.constexpr, BLOCK_G: tl.constexpr, SLOTS: tl.constexpr, BN: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, DOT_PREC: tl.constexpr):
    """Program (c, d) sums the down contribution of active experts c*SLOTS .. c*SLOTS+SLOTS-1 *in
    compacted order* over its BLOCK_D columns: every program streams SLOTS full tiles (balanced, no
    skipped slots), and programs past the active count exit at once."""
    c = tl.program_id(0)
    e_offs = tl.arange(0, BLOCK_E)
    fl = tl.load(flag_ptr + e_offs, mask=e_offs < E, other=0)  # [E] union flags
    count = tl.sum(fl, axis=0)
    lo = c * SLOTS
    if lo >= count:
        return
    rank = tl.cumsum(fl, axis=0)  # [E] 1-based position of each active expert in the compacted list
    d_offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d_offs < D
    g_offs = tl.arange(0, BLOCK_G)
    gm = g_offs < G
    n_offs = tl.arange(0, BN)
    nm = n_offs < N
    if BN == 1:
        acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)  # GEMV: elementwise products, summed at the end
    else:
        acc = tl.zeros((BN, BLOCK_D), dtype=tl.float32)
    for s in range(SLOTS):
        j = lo + s  # compacted slot; its expert id is the active expert of rank j + 1
        e = tl.sum(tl.where((fl != 0) & (rank == j + 1), e_offs, 0), axis=0)
        on = gm & ((g_offs * 0 + j) < count)  # [BLOCK_G]; the last chunk may be partly empty
        acc = _down_tile(acc, h_ptr, w_out_ptr, e, on, g_offs, d_offs, dm, n_offs, nm, E, D,
                         G=G, BN=BN, DOT_PREC=DOT_PREC)
    if BN == 1:
        acc = tl.sum(acc, axis=0)[None, :]  # [1, BLOCK_D]
    tl.store(dpart_ptr + c * N * D + n_offs[:, None] * D + d_offs[None, :], acc,
             mask=nm[:, None] & dm[None, :])


@triton.jit
def _reduce_kernel(dpart_ptr, b_out_ptr, y_ptr, flag_ptr, N, D, E,
                   SLOTS: tl.constexpr, BLOCK_E: tl.constexpr,
                   BN: tl.constexpr, BLOCK_R: tl.constexpr, HAS_BIAS: tl.constexpr):
    """y = sum over the ceil(count / SLOTS) written partials (+ bias), in the model dtype."""
    e_offs = tl.arange(0, BLOCK_E)
    count = tl.sum(tl.load(flag_ptr + e_offs, mask=e_offs < E, other=0), axis=0)
    n_chunks = (count + SLOTS - 1) // SLOTS
    d_offs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    n_offs = tl.arange(0, BN)
    m = (n_offs[:, None] < N) & (d_offs[None, :] < D)
    off = n_offs[:, None] * D + d_offs[None, :]
    acc = tl.zeros((BN, BLOCK_R), dtype=tl.float32)
    for c in range(0, n_chunks):
        acc += tl.load(dpart_ptr + c * N * D + off, mask=m, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_out_ptr + d_offs, mask=d_offs < D, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + off, acc.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _down_by_id_kernel(h_ptr, w_out_ptr, flag_ptr, dpart_ptr, N, E, D,
                 G: tl.constexpr, BLOCK_G: tl.constexpr, SLOTS: tl.constexpr, BN: tl.constexpr,
                 BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """Id-order variant: program (c, d) covers expert ids c*SLOTS .. c*SLOTS+SLOTS-1 and masks the
    inactive ones (no traffic for them). No compaction: the lowest latency for small E (the default
    576 x 1536 model: 15-16.5 us against 18-20 for the compacted kernel, H200)."""
    c = tl.program_id(0)
    d_offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d_offs < D
    g_offs = tl.arange(0, BLOCK_G)
    gm = g_offs < G
    n_offs = tl.arange(0, BN)
    nm = n_offs < N
    if BN == 1:
        acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)  # GEMV: elementwise products, summed at the end
    else:
        acc = tl.zeros((BN, BLOCK_D), dtype=tl.float32)
    # Unrolled, branch-free: an inactive expert's loads are masked off (no memory traffic), so the
    # compiler can issue every slot's flag and tile loads up front instead of one round trip each.
    for i in tl.static_range(SLOTS):
        e = c * SLOTS + i
        f = tl.load(flag_ptr + e, mask=e < E, other=0)
        on = gm & ((g_offs * 0 + f) != 0)  # [BLOCK_G] row valid and expert active
        acc = _down_tile(acc, h_ptr, w_out_ptr, e, on, g_offs, d_offs, dm, n_offs, nm, E, D,
                         G=G, BN=BN, DOT_PREC=DOT_PREC)
    if BN == 1:
        acc = tl.sum(acc, axis=0)[None, :]  # [1, BLOCK_D]
    tl.store(dpart_ptr + c * N * D + n_offs[:, None] * D + d_offs[None, :], acc,
             mask=nm[:, None] & dm[None, :])


@triton.jit
def _reduce_all_kernel(dpart_ptr, b_out_ptr, y_ptr, N, D, n_chunks,
                   BN: tl.constexpr, BLOCK_R: tl.constexpr, HAS_BIAS: tl.constexpr):
    d_offs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    n_offs = tl.arange(0, BN)
    m = (n_offs[:, None] < N) & (d_offs[None, :] < D)
    off = n_offs[:, None] * D + d_offs[None, :]
    acc = tl.zeros((BN, BLOCK_R), dtype=tl.float32)
    for c in range(0, n_chunks):
        acc += tl.load(dpart_ptr + c * N * D + off, mask=m, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_out_ptr + d_offs, mask=d_offs < D, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + off, acc.to(y_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------- launcher
@dataclass(frozen=True)
class FFNConfig:
    """Tile sizes; `for_batch` picks the GEMV (N = 1) or tensor-core (N > 1) defaults."""

    block_g: int = 8  # neurons per gate/up program (a divisor of G)
    block_k: int = 512  # K tile of the gate/up stream
    # 8 active experts x 128 columns per down program: the best of the H200 sweep at Llama-3-8B, 25%
    # kept (46 us against 49-57 for 2-4 slots or 256 columns); see prunepath/bench/NOTES.md
    slots: int = 8  # active experts per down program (split-K chunk)
    block_d: int = 128  # output columns per down program
    block_d_by_id: int = 256  # columns per program of the id-order down kernel (v2's measured tile)
    # compacted down (None = auto: batches, or E >= 128) or id-order down (small E, one token)
    compact: bool | None = None
    block_r: int = 64  # columns per reduce program
    num_warps: int = 4
    # K tile 512 -> at most 2 router slices at D = 4096: every gate/up program sums the slices' logits
    # for its selection, so fewer slices is cheaper there (measured: 53 -> 50 us, Llama-3-8B, 25%)
    router: RouterConfig = RouterConfig(block_k=512)

    @staticmethod
    def for_batch(n: int) -> FFNConfig:
        if n == 1:
            return FFNConfig()
        # one program per expert (block_g = G = 32): the selection is done once per expert, not twice
        # (measured on an H200, Llama-3-8B shape, 8 rows, 25%: 111 -> 77 us)
        return FFNConfig(block_g=32, block_k=128, slots=8, block_d=128,
                         router=RouterConfig(block_e=16, block_k=256, split=2))


class Scratch:
    """Intermediate buffers for N <= n_max rows; shared by every FFN of one shape (layers run in turn)."""

    _pool: dict = {}

    def __init__(self, layout: ExpertLayout, n_max: int = 8):
        E, G, D = layout.n_experts, layout.expert_size, layout.d_model
        dev = layout.device
        f32 = dict(device=dev, dtype=torch.float32)
        self.n_max = n_max
        self.rpart = torch.empty(8 * n_max * E, **f32)  # router partials [S, N, E]
        self.h = torch.empty(n_max * E * G, **f32)  # [N, F]
        self.mask = torch.empty(n_max * E, device=dev, dtype=torch.int8)  # [N, E]
        self.gates = torch.empty(n_max * E, **f32)  # [N, E]
        self.logits = torch.empty(n_max * E, **f32)  # [N, E]
        self.flags = torch.empty(E, device=dev, dtype=torch.int32)  # [E]
        self.dpart = torch.empty(E * n_max * D, **f32)  # down partials [C, N, D], C <= E

    @classmethod
    def shared(cls, layout: ExpertLayout) -> Scratch:
        key = (layout.device, layout.n_experts, layout.expert_size, layout.d_model)
        if key not in cls._pool:
            cls._pool[key] = cls(layout)
        return cls._pool[key]

    def poison(self) -> None:
        """Fill every buffer with garbage (tests): a read of an unwritten element then shows."""
        for t in (self.rpart, self.h, self.gates, self.logits, self.dpart):
            t.fill_(float("nan"))
        self.mask.fill_(-1)
        self.flags.fill_(-7)


@dataclass(frozen=True)
class FFNResult:
    y: torch.Tensor  # [N, D] in the model dtype
    mask: torch.Tensor  # [N, E] int8 (view of scratch: clone to keep)
    gates: torch.Tensor  # [N, E] fp32
    logits: torch.Tensor  # [N, E] fp32
    active: torch.Tensor  # [E] int32 union flag


def expert_ffn(x2d: torch.Tensor, layout: ExpertLayout, code: int, param: torch.Tensor,
               cfg: FFNConfig | None = None, scratch: Scratch | None = None,
               out: torch.Tensor | None = None, stages: int = 4) -> FFNResult | None:
    """Decode FFN for x2d [N, D] (N <= 8) with routing rule `code` and device parameter `param` [1].

    stages < 4 stops after that many launches (benchmarks time the stages by difference).
    """
    layout.check_input(x2d)
    N, D = x2d.shape
    E, G = layout.n_experts, layout.expert_size
    if N > 8:
        raise ValueError(f"the decode kernel takes at most 8 rows, got {N}; use the torch path for prefill")
    cfg = cfg or FFNConfig.for_batch(N)
    scratch = scratch or Scratch.shared(layout)
    BN = token_block(N)
    bg = math.gcd(G, cfg.block_g)
    if bg & (bg - 1) or (BN > 1 and bg < 16):
        raise ValueError(f"expert size {G} has no power-of-two divisor >= {16 if BN > 1 else 1} for the "
                         "gate/up tiles; use an expert size that is a multiple of 16 (e.g. 32)")
    rpart = router_partial_logits(x2d, layout.w_router, cfg.router, out=scratch.rpart)
    if stages < 2:
        return None
    S = rpart.shape[0]
    h = scratch.h[: N * E * G].view(N, E * G)
    mask = scratch.mask[: N * E].view(N, E)
    gates = scratch.gates[: N * E].view(N, E)
    logits = scratch.logits[: N * E].view(N, E)
    w_up = layout.w_up if layout.w_up is not None else layout.w_in
    b_in = layout.b_in if layout.b_in is not None else layout.w_in
    prec = dot_precision(x2d.dtype)
    _gate_up_kernel[(E * (G // bg),)](
        x2d, layout.w_in, w_up, b_in, rpart, param, h, mask, gates, logits, scratch.flags, N, E, D,
        G=G, BG=bg, RS=S, BN=BN, BLOCK_E=next_pow2(E), BLOCK_K=cfg.block_k, RULE=code,
        GATE=GATE_CODES[layout.gate], ACT=ACT_CODES[layout.act], GATED=layout.kind == "gated",
        HAS_BIAS=layout.b_in is not None, ROUND_TO=TL_DTYPES[x2d.dtype], DOT_PREC=prec,
        num_warps=cfg.num_warps)
    if stages < 3:
        return None
    C = triton.cdiv(E, cfg.slots)
    dpart = scratch.dpart[: C * N * D]
    compact = cfg.compact if cfg.compact is not None else (N > 1 or E >= 128)
    if compact:
        _down_kernel[(C, triton.cdiv(D, cfg.block_d))](
            h, layout.w_out, scratch.flags, dpart, N, E, D, G=G, BLOCK_G=next_pow2(G), SLOTS=cfg.slots,
            BN=BN, BLOCK_D=cfg.block_d, BLOCK_E=next_pow2(E), DOT_PREC=prec, num_warps=cfg.num_warps)
    else:
        _down_by_id_kernel[(C, triton.cdiv(D, cfg.block_d_by_id))](
            h, layout.w_out, scratch.flags, dpart, N, E, D, G=G, BLOCK_G=next_pow2(G), SLOTS=cfg.slots,
            BN=BN, BLOCK_D=cfg.block_d_by_id, DOT_PREC=prec, num_warps=cfg.num_warps)
    if stages < 4:
        return None
    y = out if out is not None else torch.empty(N, D, device=x2d.device, dtype=x2d.dtype)
    b_out = layout.b_out if layout.b_out is not None else dpart
    if compact:
        _reduce_kernel[(triton.cdiv(D, cfg.block_r),)](
            dpart, b_out, y, scratch.flags, N, D, E, SLOTS=cfg.slots, BLOCK_E=next_pow2(E), BN=next_pow2(N),
            BLOCK_R=cfg.block_r, HAS_BIAS=layout.b_out is not None, num_warps=4)
    else:
        _reduce_all_kernel[(triton.cdiv(D, cfg.block_r),)](
            dpart, b_out, y, N, D, C, BN=next_pow2(N), BLOCK_R=cfg.block_r,
            HAS_BIAS=layout.b_out is not None, num_warps=4)
    return FFNResult(y=y, mask=mask, gates=gates, logits=logits, active=scratch.flags)


# ----------------------------------------------------------------------------- reference
def expert_ffn_reference(x2d: torch.Tensor, layout: ExpertLayout, gates: torch.Tensor) -> torch.Tensor:
    """y [N, D] in float64: sum over experts of gate[n, e] * expert_e(x_n) (all experts, dense math).

    Equal to the kernel's active-only sum because gates are 0 for experts a token did not keep.
    """
    E, G, D = layout.w_in.shape
    x = x2d.double()
    w_in = layout.w_in.double().reshape(E * G, D)
    hg = x @ w_in.t()  # [N, F]
    if layout.b_in is not None:
        hg = hg + layout.b_in.double()
    a = _reference_act(layout.act, hg)
    if layout.w_up is not None:
        a = a * (x @ layout.w_up.double().reshape(E * G, D).t())
    a = a * gates.double().repeat_interleave(G, dim=1)  # expert gate expanded to its neurons
    y = a @ layout.w_out.double().reshape(E * G, D)  # [N, D]
    if layout.b_out is not None:
        y = y + layout.b_out.double()
    return y
