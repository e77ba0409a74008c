"""Fused decode FFN over the kept experts only: route+select -> gate/up -> down+reduce, three launches.

Shapes: N = B*T rows (<= 8), D hidden, F ffn = E*G, E experts, G expert size, C = ceil(E / SLOTS).

Decode is memory-bound: the time is the weight bytes read, 3 * kept * G * D * 2 B for a gated FFN in
bf16, plus the router's E * D * 2 B. A kept fraction a of the experts should cost about a of the dense
FFN's time. The launches, with no host synchronisation:

1. `select._router_select_kernel`: router GEMV over (E blocks) x (S slices of D); the last program to
   finish makes the routing decision for every token and writes the compacted list of kept experts
   (the union over the N rows): ids [E], count [1].
2. `_gate_up_kernel`, grid E * (G / BG): program p owns BG neurons of the expert in slot p // (G / BG)
   of that list (programs past the kept count exit at once, so the first count * G / BG programs,
   all streaming, are the ones the scheduler spreads over the SMs). It streams BG rows of W_gate and
   W_up over the whole of D (no split-K, so the activation needs no second pass), applies
   act(gate) * up * g_token in fp32 and writes h [N, slot, G].
3. `_down_kernel`, grid C x (D / BLOCK_D): program (c, d) adds the down contributions of slots
   c*SLOTS .. c*SLOTS+SLOTS-1 (expert ids read from the list: contiguous [G, BLOCK_D] tiles of the
   transposed down weight, every slot's loads issued together) over BLOCK_D output columns into an
   fp32 accumulator with atomic adds, then takes a ticket for its column block; the last program of
   a column block casts the sums to the model dtype (+ bias), writes y and zeroes the accumulator and
   the ticket for the next call. The reduce is folded in: no partials pass, no zero-fill launch. The
   fp32 atomic order varies between runs, so y may differ in the last bit of the fp32 sum (before the
   cast to bf16) from run to run.

Batches (N <= 8): an expert is streamed once if *any* row keeps it (the union); rows that dropped it
have gate 0. One row uses a GEMV path (fp32 FMA, no padding); 2..8 rows a tensor-core path with rows
padded to 16 (tf32 dots of upcast half operands: exact products, fp32 sums).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .layout import ExpertLayout, _reference_act, next_pow2
from .route import GATE_CODES, TL_DTYPES, dot_precision, token_block
from .select import _router_select_kernel

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
def _gate_up_item(x_ptr, w_in_ptr, w_up_ptr, b_in_ptr, gate_ptr, ids_ptr, h_ptr, j, rb, N, E,
                  D: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, BN: tl.constexpr,
                  BLOCK_K: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr,
                  HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr):
    """h[:, slot j, rows rb*BG ..] = act(x W_gate^T) * (x W_up^T) * g for BG neurons of kept expert j."""
    e = tl.load(ids_ptr + j)
    rows = e * G + rb * BG + tl.arange(0, BG)  # [BG] neuron indices in [0, F)
    n_offs = tl.arange(0, BN)
    nm = n_offs < N
    if BN == 1:
        # D is a compile-time constant: the K loop unrolls and every tile's loads can be issued up front
        accg = tl.zeros((BG, BLOCK_K), dtype=tl.float32)  # elementwise products, summed once at the end
        accu = tl.zeros((BG, BLOCK_K), dtype=tl.float32)
        for k in tl.static_range(0, D, BLOCK_K):
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
        for k in range(0, D, BLOCK_K):  # tensor-core tiles: a pipelined loop, not an unrolled one
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
    g = tl.load(gate_ptr + n_offs * E + e, mask=nm, other=0.0)  # [BN]; 0 for rows that dropped e
    tl.store(h_ptr + n_offs[:, None] * (E * G) + j * G + rb * BG + tl.arange(0, BG)[None, :], a * g[:, None],
             mask=nm[:, None])


@triton.jit
def _down_item(h_ptr, w_out_ptr, ids_ptr, ready_ptr, acc_ptr, ticket_ptr, b_out_ptr, y_ptr, c, db, count,
               N, E, D, G: tl.constexpr, BLOCK_G: tl.constexpr, SLOTS: tl.constexpr, BN: tl.constexpr,
               BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr, WAIT: tl.constexpr,
               RB: tl.constexpr):
    """Down contributions of kept slots c*SLOTS .. c*SLOTS+SLOTS-1 over columns db*BLOCK_D ..; the last
    chunk of the column block to arrive writes y. WAIT: spin until the slots' h is written (fused kernel)."""
    n_chunks = (count + SLOTS - 1) // SLOTS
    d_offs = db * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d_offs < D
    n_offs = tl.arange(0, BN)
    nm = n_offs < N
    out_m = nm[:, None] & dm[None, :]
    acc_offs = n_offs[:, None] * D + d_offs[None, :]
    if n_chunks == 0:  # no expert kept by any row: y = bias (or 0), written by the first chunk
        if c == 0:
            y0 = tl.zeros((BN, BLOCK_D), dtype=tl.float32)
            if HAS_BIAS:
                y0 += tl.load(b_out_ptr + d_offs, mask=dm, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + acc_offs, y0.to(y_ptr.dtype.element_ty), mask=out_m)
    else:
        g_offs = tl.arange(0, BLOCK_G)
        gm = g_offs < G
        if BN == 1:
            acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)  # elementwise products, summed at the end
        else:
            acc = tl.zeros((BN, BLOCK_D), dtype=tl.float32)
        for s in tl.static_range(SLOTS):
            j = c * SLOTS + s
            e = tl.load(ids_ptr + tl.minimum(j, count - 1))  # a valid id; empty slots are masked below
            on = gm & ((g_offs * 0 + j) < count)  # [BLOCK_G]; the last chunk may be partly empty (no traffic)
            w = tl.load(w_out_ptr + e * G * D + g_offs[:, None] * D + d_offs[None, :],
                        mask=on[:, None] & dm[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
            if WAIT:  # the weights are on their way; now wait for this slot's h (all RB row blocks)
                if j < count:
                    r = tl.atomic_add(ready_ptr + j, 0, sem="acquire", scope="gpu")
                    spins = r * 0
                    while (r < RB) & (spins < 1000000):
                        r = tl.atomic_add(ready_ptr + j, 0, sem="acquire", scope="gpu")
                        spins += 1
                tl.debug_barrier()
            if BN == 1:
                hv = tl.load(h_ptr + j * G + g_offs, mask=on, other=0.0, cache_modifier=".cg")  # [BLOCK_G]
                acc += w.to(tl.float32) * hv[:, None]
            else:
                ht = tl.load(h_ptr + n_offs[:, None] * (E * G) + j * G + g_offs[None, :],
                             mask=nm[:, None] & on[None, :], other=0.0, cache_modifier=".cg")  # [BN, BLOCK_G]
                acc = tl.dot(ht, w.to(tl.float32), acc, input_precision=DOT_PREC)
        if BN == 1:
            acc = tl.sum(acc, axis=0)[None, :]  # [1, BLOCK_D]
        tl.atomic_add(acc_ptr + acc_offs, acc, mask=out_m, sem="relaxed", scope="gpu")
        # The last chunk of this column block to arrive writes y (barrier + release ticket, as in select.py).
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr + db, 1, sem="acq_rel", scope="gpu")
        if ticket == n_chunks - 1:
            tl.debug_barrier()
            y = tl.load(acc_ptr + acc_offs, mask=out_m, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                y += tl.load(b_out_ptr + d_offs, mask=dm, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + acc_offs, y.to(y_ptr.dtype.element_ty), mask=out_m)
            tl.store(acc_ptr + acc_offs, tl.zeros((BN, BLOCK_D), dtype=tl.float32), mask=out_m)
            tl.store(ticket_ptr + db, 0)


@triton.jit
def _gate_up_kernel(x_ptr, w_in_ptr, w_up_ptr, b_in_ptr, gate_ptr, ids_ptr, count_ptr, h_ptr, N, E,
                    D: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, BN: tl.constexpr,
                    BLOCK_K: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr,
                    HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr):
    """Two-launch form, launch 2: program p = (slot p // (G / BG), row block); past the count: exit."""
    pid = tl.program_id(0)
    j = pid // (G // BG)
    if j < tl.load(count_ptr):
        _gate_up_item(x_ptr, w_in_ptr, w_up_ptr, b_in_ptr, gate_ptr, ids_ptr, h_ptr, j, pid % (G // BG), N, E,
                      D=D, G=G, BG=BG, BN=BN, BLOCK_K=BLOCK_K, ACT=ACT, GATED=GATED, HAS_BIAS=HAS_BIAS,
                      DOT_PREC=DOT_PREC)


@triton.jit
def _down_kernel(h_ptr, w_out_ptr, ids_ptr, count_ptr, acc_ptr, ticket_ptr, b_out_ptr, y_ptr, N, E, D,
                 G: tl.constexpr, BLOCK_G: tl.constexpr, SLOTS: tl.constexpr, BN: tl.constexpr,
                 BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr):
    """Two-launch form, launch 3: program (chunk, column block); chunks past the kept count exit."""
    count = tl.load(count_ptr)
    c = tl.program_id(0)
    if c < tl.maximum((count + SLOTS - 1) // SLOTS, 1):
        _down_item(h_ptr, w_out_ptr, ids_ptr, count_ptr, acc_ptr, ticket_ptr, b_out_ptr, y_ptr, c, tl.program_id(1),
                   count, N, E, D, G=G, BLOCK_G=BLOCK_G, SLOTS=SLOTS, BN=BN, BLOCK_D=BLOCK_D, HAS_BIAS=HAS_BIAS,
                   DOT_PREC=DOT_PREC, WAIT=False, RB=1)


@triton.jit
def _fused_kernel(x_ptr, w_in_ptr, w_up_ptr, b_in_ptr, gate_ptr, ids_ptr, count_ptr, h_ptr, ready_ptr,
                  w_out_ptr, acc_ptr, ticket_ptr, b_out_ptr, y_ptr, N, E,
                  D: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, BN: tl.constexpr, BLOCK_K: tl.constexpr,
                  ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS_IN: tl.constexpr, BLOCK_G: tl.constexpr,
                  SLOTS: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS_OUT: tl.constexpr, DOT_PREC: tl.constexpr):
    """One persistent launch for gate/up and down: every program first streams its gate/up items (slot,
    row block) in turn, publishing each slot's progress in ready[slot], then its down items (chunk, column
    block), each spinning until its slots' h is complete. The grid is small enough that every program is
    resident at once (launcher), so a waiting program never blocks one it waits for."""
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    count = tl.load(count_ptr)
    RB = G // BG
    for i in range(pid, count * RB, P):
        _gate_up_item(x_ptr, w_in_ptr, w_up_ptr, b_in_ptr, gate_ptr, ids_ptr, h_ptr, i // RB, i % RB, N, E,
                      D=D, G=G, BG=BG, BN=BN, BLOCK_K=BLOCK_K, ACT=ACT, GATED=GATED, HAS_BIAS=HAS_BIAS_IN,
                      DOT_PREC=DOT_PREC)
        tl.debug_barrier()
        tl.atomic_add(ready_ptr + i // RB, 1, sem="release", scope="gpu")
    n_db = (D + BLOCK_D - 1) // BLOCK_D
    n_down = tl.maximum((count + SLOTS - 1) // SLOTS, 1) * n_db
    for i in range(pid, n_down, P):
        _down_item(h_ptr, w_out_ptr, ids_ptr, ready_ptr, acc_ptr, ticket_ptr, b_out_ptr, y_ptr, i // n_db,
                   i % n_db, count, N, E, D, G=G, BLOCK_G=BLOCK_G, SLOTS=SLOTS, BN=BN, BLOCK_D=BLOCK_D,
                   HAS_BIAS=HAS_BIAS_OUT, DOT_PREC=DOT_PREC, WAIT=True, RB=RB)


# ----------------------------------------------------------------------------- launcher
@dataclass(frozen=True)
class FFNConfig:
    """Tile sizes; `for_batch` picks the GEMV (N = 1) or tensor-core (N > 1) defaults.

    Batch-1 defaults from the H200 sweep at the Llama-3-8B FFN (prunepath/bench/NOTES.md).
    """

    block_g: int = 4  # neurons per gate/up item (a power-of-two divisor of G)
    block_k: int = 1024  # K tile of the gate/up stream
    slots: int = 4  # kept experts per down item
    block_d: int = 512  # output columns per down item
    num_warps: int = 4  # gate/up and down programs
    router_block_e: int = 2  # experts per router program
    router_block_k: int = 1024  # one K tile per router program: its loads all in flight at once
    router_split: int = 4  # slices of D in the router grid
    # gate/up and down in one persistent launch: measured slower than two launches on the H200 (37.2 against
    # 40.2 us at 25 % kept, 59.7 against 65.9 at 50 %; prunepath/bench/NOTES.md v6), so off by default
    fused: bool = False
    ctas_per_sm: int = 2  # programs per multiprocessor of the persistent launch

    @staticmethod
    def for_batch(n: int) -> FFNConfig:
        if n == 1:
            return FFNConfig()
        # tensor-core tiles need 16 neurons and 16 router experts per program
        return FFNConfig(block_g=16, block_k=256, slots=8, block_d=128, router_block_e=16,
                         router_block_k=512, router_split=4)


class Scratch:
    """Intermediate buffers for N <= n_max rows; shared by every FFN of one shape (layers run in turn).

    `acc`, `tickets` and `router_ticket` are state the kernels leave zeroed after each call.
    """

    _pool: dict = {}

    def __init__(self, layout: ExpertLayout, n_max: int = 8, max_split: int = 8):
        E, G, D = layout.n_experts, layout.expert_size, layout.d_model
        dev = layout.device
        f32 = dict(device=dev, dtype=torch.float32)
        i32 = dict(device=dev, dtype=torch.int32)
        self.n_max = n_max
        self.rpart = torch.empty(max_split * n_max * E, **f32)  # router partials [S, N, E]
        self.router_ticket = torch.zeros(1, **i32)
        self.mask = torch.empty(n_max * E, device=dev, dtype=torch.int8)  # [N, E]
        self.gates = torch.empty(n_max * E, **f32)  # [N, E]
        self.logits = torch.empty(n_max * E, **f32)  # [N, E]
        self.flags = torch.empty(E, **i32)  # [E] union flag
        self.ids = torch.empty(E, **i32)  # [E] compacted kept experts (first `count` valid)
        self.count = torch.empty(1, **i32)
        self.ready = torch.zeros(E, **i32)  # [E] gate/up row blocks done per slot (fused launch)
        self.h = torch.empty(n_max * E * G, **f32)  # [N, slot, G]
        self.acc = torch.zeros(n_max * D, **f32)  # [N, D] fp32 sums of the down pass
        self.tickets = torch.zeros(D, **i32)  # one per down column block

    @classmethod
    def shared(cls, layout: ExpertLayout) -> Scratch:
        key = (layout.device, layout.n_experts, layout.expert_size, layout.d_model)
        if key not in cls._pool:
            cls._pool[key] = cls(layout)
        return cls._pool[key]

    def poison(self) -> None:
        """Fill every per-call buffer with garbage (tests): a read of an unwritten element then shows."""
        for t in (self.rpart, self.h, self.gates, self.logits):
            t.fill_(float("nan"))
        self.mask.fill_(-1)
        self.flags.fill_(-7)
        self.ids.fill_(-7)
        self.count.fill_(-7)


@dataclass(frozen=True)
class FFNResult:
    y: torch.Tensor  # [N, D] in the model dtype
    mask: torch.Tensor  # [N, E] int8 (view of scratch: clone to keep)
    gates: torch.Tensor  # [N, E] fp32
    logits: torch.Tensor  # [N, E] fp32
    active: torch.Tensor  # [E] int32 union flag


def _interpreting() -> bool:
    """Triton's CPU interpreter runs programs one after another: the persistent launch's waits would never
    end there, so it takes the two-launch form."""
    return os.environ.get("TRITON_INTERPRET") == "1"


_SMS: dict = {}


def _sm_count(device: torch.device) -> int:
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SMS:
        _SMS[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SMS[key]


def router_split(cfg: FFNConfig, D: int, E: int) -> tuple[int, int]:
    """(S, D per slice): slices of whole K tiles, none empty."""
    s = max(1, min(cfg.router_split, 8, triton.cdiv(D, cfg.router_block_k)))
    d_per = triton.cdiv(triton.cdiv(D, s), cfg.router_block_k) * cfg.router_block_k
    return triton.cdiv(D, d_per), d_per


def expert_ffn(x2d: torch.Tensor, layout: ExpertLayout, code: int, param: torch.Tensor,
               cfg: FFNConfig | None = None, scratch: Scratch | None = None,
               out: torch.Tensor | None = None, stages: int = 3) -> FFNResult | None:
    """Decode FFN for x2d [N, D] (N <= 8) with routing rule `code` and device parameter `param` [1].

    stages < 3 stops after that many launches of the two-launch form (benchmarks time the stages by
    difference with cfg.fused=False; stages=1 also stops the fused form after route+select).
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
    prec = dot_precision(x2d.dtype)
    mask = scratch.mask[: N * E].view(N, E)
    gates = scratch.gates[: N * E].view(N, E)
    logits = scratch.logits[: N * E].view(N, E)
    S, d_per = router_split(cfg, D, E)
    be = cfg.router_block_e if BN == 1 else max(16, cfg.router_block_e)
    _router_select_kernel[(triton.cdiv(E, be), S)](
        x2d, layout.w_router, scratch.rpart, scratch.router_ticket, param,
        mask, gates, logits, scratch.flags, scratch.ids, scratch.count, scratch.ready, N, E, D, d_per,
        S=S, BE=be, BN=BN, BN2=next_pow2(N), BLOCK_K=min(cfg.router_block_k, next_pow2(d_per)),
        BLOCK_E=next_pow2(E), RULE=code,
        GATE=GATE_CODES[layout.gate], ROUND_TO=TL_DTYPES[x2d.dtype], DOT_PREC=prec, num_warps=4)
    if stages < 2:
        return None
    h = scratch.h[: N * E * G]
    w_up = layout.w_up if layout.w_up is not None else layout.w_in
    b_in = layout.b_in if layout.b_in is not None else layout.w_in
    y = out if out is not None else torch.empty(N, D, device=x2d.device, dtype=x2d.dtype)
    b_out = layout.b_out if layout.b_out is not None else y
    common = dict(D=D, G=G, BG=bg, BN=BN, BLOCK_K=min(cfg.block_k, next_pow2(D)), ACT=ACT_CODES[layout.act],
                  GATED=layout.kind == "gated", DOT_PREC=prec)
    if cfg.fused and not _interpreting():
        items = E * (G // bg)
        grid = min(items, _sm_count(x2d.device) * cfg.ctas_per_sm)
        _fused_kernel[(grid,)](
            x2d, layout.w_in, w_up, b_in, gates, scratch.ids, scratch.count, h, scratch.ready, layout.w_out,
            scratch.acc, scratch.tickets, b_out, y, N, E, HAS_BIAS_IN=layout.b_in is not None,
            BLOCK_G=next_pow2(G), SLOTS=cfg.slots, BLOCK_D=cfg.block_d, HAS_BIAS_OUT=layout.b_out is not None,
            num_warps=cfg.num_warps, **common)
        return FFNResult(y=y, mask=mask, gates=gates, logits=logits, active=scratch.flags)
    _gate_up_kernel[(E * (G // bg),)](
        x2d, layout.w_in, w_up, b_in, gates, scratch.ids, scratch.count, h, N, E,
        HAS_BIAS=layout.b_in is not None, num_warps=cfg.num_warps, **common)
    if stages < 3:
        return None
    _down_kernel[(triton.cdiv(E, cfg.slots), triton.cdiv(D, cfg.block_d))](
        h, layout.w_out, scratch.ids, scratch.count, scratch.acc, scratch.tickets, b_out, y, N, E, D,
        G=G, BLOCK_G=next_pow2(G), SLOTS=cfg.slots, BN=BN, BLOCK_D=cfg.block_d,
        HAS_BIAS=layout.b_out is not None, DOT_PREC=prec, num_warps=cfg.num_warps)
    return FFNResult(y=y, mask=mask, gates=gates, logits=logits, active=scratch.flags)


# ----------------------------------------------------------------------------- reference
def expert_ffn_reference(x2d: torch.Tensor, layout: ExpertLayout, gates: torch.Tensor) -> torch.Tensor:
    """y [N, D] in float64: sum over experts of gate[n, e] * expert_e(x_n) (all experts, dense math).

    Equal to the kernel's kept-only sum because gates are 0 for experts a token did not keep.
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
