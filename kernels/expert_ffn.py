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
   c*SLOTS .. c*SLOTS+SLOTS-1 (expert ids read from the list; all SLOTS contiguous [G, BLOCK_D] tiles of the
   transposed down weight loaded as one [SLOTS*G, BLOCK_D] tile) over BLOCK_D output columns into an fp32
   accumulator with atomic adds, then takes a ticket for its column block; the last program of a column
   block casts the sums to the model dtype (+ bias), writes y and zeroes the accumulator and the ticket for
   the next call. The reduce is folded in: no partials pass, no zero-fill launch. The fp32 atomic order
   varies between runs, so y may differ in the last bit of the fp32 sum (before the cast) from run to run.

On Hopper and newer the three are programmatic dependent launches: each starts while the previous one drains
and first issues the loads that do not depend on it (the router's weight tile; the down weights, whose ids
were written two launches back), then waits (`gdc_wait`) for the data it does depend on.

Batches (N <= 8): an expert is streamed once if *any* row keeps it (the union); rows that dropped it
have gate 0. One row uses a GEMV path (fp32 FMA, no padding); 2..8 rows a tensor-core path with rows
padded to 16 (bf16 / fp16 operands, fp32 sums; the CPU interpreter upcasts to fp32), and the last N router
programs to finish decide one row each, side by side.
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
def _gate_up_item(x_ptr, w_in_ptr, w_up_ptr, b_in_ptr, gate_ptr, h_ptr, N, E, j, rb, e,
                  D: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, BN: tl.constexpr,
                  BLOCK_K: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                  DOT_PREC: tl.constexpr, HALF_DOT: tl.constexpr):
    """h[:, slot j, rb*BG ..] = act(x W_gate^T) * (x W_up^T) * g for BG neurons of kept expert e = ids[j]."""
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
                         other=0.0)  # [BN, BLOCK_K]
            wp = rows[:, None] * D + k_offs[None, :]
            wg = tl.load(w_in_ptr + wp, mask=km[None, :], other=0.0)  # [BG, BLOCK_K]
            if HALF_DOT:  # bf16 / fp16 operands straight into the tensor cores, fp32 sums
                hg = tl.dot(xt, tl.trans(wg), hg)
            else:
                hg = tl.dot(xt.to(tl.float32), tl.trans(wg.to(tl.float32)), hg, input_precision=DOT_PREC)
            if GATED:
                wu = tl.load(w_up_ptr + wp, mask=km[None, :], other=0.0)
                if HALF_DOT:
                    hu = tl.dot(xt, tl.trans(wu), hu)
                else:
                    hu = tl.dot(xt.to(tl.float32), tl.trans(wu.to(tl.float32)), hu, input_precision=DOT_PREC)
    if HAS_BIAS:
        hg += tl.load(b_in_ptr + rows).to(tl.float32)[None, :]
    a = _act(hg, ACT)
    if GATED:
        a = a * hu
    g = tl.load(gate_ptr + n_offs * E + e, mask=nm, other=0.0)  # [BN]; 0 for rows that dropped e
    tl.store(h_ptr + n_offs[:, None] * (E * G) + j * G + rb * BG + tl.arange(0, BG)[None, :],
             a * g[:, None], mask=nm[:, None])


@triton.jit
def _gate_up_kernel(x_ptr, w_in_ptr, w_up_ptr, b_in_ptr, gate_ptr, ids_ptr, count_ptr, h_ptr, N, E,
                    D: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, BN: tl.constexpr,
                    BLOCK_K: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                    DOT_PREC: tl.constexpr, HALF_DOT: tl.constexpr, LOOP: tl.constexpr, PDL: tl.constexpr):
    """Launch 2: program p = item (slot j = p // (G / BG), row block rb); slots past the kept count exit.
    LOOP: a grid smaller than E * G / BG, program p taking items p, p + P, ... below count * G / BG."""
    if PDL:  # dependent launch: wait for route+select, then let the down launch start its weight loads
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    j = pid // (G // BG)
    count = tl.load(count_ptr)
    e = tl.load(ids_ptr + j)  # issued with the count load (j < E): one round trip fewer
    if j < count:
        _gate_up_item(x_ptr, w_in_ptr, w_up_ptr, b_in_ptr, gate_ptr, h_ptr, N, E, j, pid % (G // BG), e, D=D, G=G,
                      BG=BG, BN=BN, BLOCK_K=BLOCK_K, ACT=ACT, GATED=GATED, HAS_BIAS=HAS_BIAS, DOT_PREC=DOT_PREC,
                      HALF_DOT=HALF_DOT)
    if LOOP:  # a smaller grid: then every nprog-th item below count * G / BG
        for it in range(pid + tl.num_programs(0), count * (G // BG), tl.num_programs(0)):
            _gate_up_item(x_ptr, w_in_ptr, w_up_ptr, b_in_ptr, gate_ptr, h_ptr, N, E, it // (G // BG),
                          it % (G // BG), tl.load(ids_ptr + it // (G // BG)), D=D, G=G, BG=BG, BN=BN,
                          BLOCK_K=BLOCK_K, ACT=ACT, GATED=GATED, HAS_BIAS=HAS_BIAS, DOT_PREC=DOT_PREC,
                          HALF_DOT=HALF_DOT)


@triton.jit
def _down_kernel(h_ptr, w_out_ptr, ids_ptr, count_ptr, acc_ptr, ticket_ptr, b_out_ptr, y_ptr, N, E, D,
                 G: tl.constexpr, BLOCK_G: tl.constexpr, SLOTS: tl.constexpr, SLOTS_P2: tl.constexpr,
                 BN: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
                 HALF_DOT: tl.constexpr, PDL: tl.constexpr):
    """Launch 3: program (chunk c, column block db) adds the down contributions of kept slots
    c*SLOTS .. c*SLOTS+SLOTS-1 over BLOCK_D columns; chunks past the kept count exit. All SLOTS weight tiles
    are one [SLOTS*BLOCK_G, BLOCK_D] load, issued (under a dependent launch) before waiting for h."""
    count = tl.load(count_ptr)  # written by route+select, which finished before gate/up released us
    c = tl.program_id(0)
    db = tl.program_id(1)
    n_chunks = (count + SLOTS - 1) // SLOTS
    if c < tl.maximum(n_chunks, 1):
        d_offs = db * BLOCK_D + tl.arange(0, BLOCK_D)
        dm = d_offs < D
        n_offs = tl.arange(0, BN)
        nm = n_offs < N
        out_m = nm[:, None] & dm[None, :]
        acc_offs = n_offs[:, None] * D + d_offs[None, :]
        r = tl.arange(0, SLOTS_P2 * BLOCK_G)  # weight row r: slot r // BLOCK_G, neuron r % BLOCK_G
        j = c * SLOTS + r // BLOCK_G
        g_offs = r % BLOCK_G
        on = (g_offs < G) & (j < count) & (r // BLOCK_G < SLOTS)
        e = tl.load(ids_ptr + j, mask=on, other=0)
        w = tl.load(w_out_ptr + e[:, None] * (G * D) + g_offs[:, None] * D + d_offs[None, :],
                    mask=on[:, None] & dm[None, :], other=0.0)  # [SLOTS_P2 * BLOCK_G, BLOCK_D]
        if PDL:
            tl.extra.cuda.gdc_wait()  # h is complete from here on
            tl.extra.cuda.gdc_launch_dependents()
        if n_chunks == 0:  # no expert kept by any row: y = bias (or 0), written by the first chunk
            y0 = tl.zeros((BN, BLOCK_D), dtype=tl.float32)
            if HAS_BIAS:
                y0 += tl.load(b_out_ptr + d_offs, mask=dm, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + acc_offs, y0.to(y_ptr.dtype.element_ty), mask=out_m)
        else:
            if BN == 1:
                hv = tl.load(h_ptr + j * G + g_offs, mask=on, other=0.0)  # [SLOTS * BLOCK_G] fp32
                acc = tl.sum(w.to(tl.float32) * hv[:, None], axis=0)[None, :]  # [1, BLOCK_D]
            else:
                ht = tl.load(h_ptr + n_offs[:, None] * (E * G) + (j * G + g_offs)[None, :],
                             mask=nm[:, None] & on[None, :], other=0.0)  # [BN, SLOTS * BLOCK_G]
                if HALF_DOT:  # h rounded to the model dtype, as the torch path's down_proj input is
                    acc = tl.dot(ht.to(w.dtype), w)
                else:
                    acc = tl.dot(ht, w.to(tl.float32), input_precision=DOT_PREC)
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
    elif PDL:
        tl.extra.cuda.gdc_launch_dependents()


# ----------------------------------------------------------------------------- launcher
@dataclass(frozen=True)
class FFNConfig:
    """Tile sizes and launch options; `for_batch` picks the GEMV (N = 1) or tensor-core (N > 1) defaults.

    Defaults from the H200 sweeps at the Llama-3-8B FFN (prunepath/bench/NOTES.md).
    """

    block_g: int = 4  # neurons per gate/up item (a power-of-two divisor of G)
    block_k: int = 1024  # K tile of the gate/up stream
    slots: int = 8  # kept experts per down item
    block_d: int = 128  # output columns per down item
    num_warps: int = 4  # gate/up and down programs
    router_block_e: int = 2  # experts per router program
    router_block_k: int = 1024  # one K tile per router program: its loads all in flight at once
    router_split: int = 4  # slices of D in the router grid
    # Programmatic dependent launch (Hopper and newer, compiled kernels only): each launch starts while the
    # previous one drains, and issues the loads that do not depend on it (router and down weights) first.
    pdl: bool = True
    # Batch path: bf16 / fp16 operands straight into the tensor cores (compiled kernels only; the CPU
    # interpreter's half dot is broken, so it upcasts to fp32 and runs tf32 / ieee dots).
    half_dots: bool = True
    # Batch path: the last N router programs decide one row each, side by side (compiled kernels only)
    parallel_select: bool = True
    # Programs of the gate/up grid (0: one per item, E * G / BG): with fewer,
    # each loops over the kept items, and fewer programs that find nothing to do are scheduled before the down
    # launch can start (it starts once every gate/up program has started)
    gate_up_programs: int = 0

    @staticmethod
    def for_batch(n: int) -> FFNConfig:
        if n == 1:
            return FFNConfig()
        # tensor-core gate/up tiles need 16 neurons; one 32-neuron expert per program (as v3)
        return FFNConfig(block_g=32, block_k=256)


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
        self.router_ticket = torch.zeros(2, **i32)  # arrivals, rows decided
        self.mask = torch.empty(n_max * E, device=dev, dtype=torch.int8)  # [N, E]
        self.gates = torch.empty(n_max * E, **f32)  # [N, E]
        self.logits = torch.empty(n_max * E, **f32)  # [N, E]
        self.flags = torch.empty(E, **i32)  # [E] union flag
        self.ids = torch.empty(E, **i32)  # [E] compacted kept experts (first `count` valid)
        self.count = torch.empty(1, **i32)
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
    return os.environ.get("TRITON_INTERPRET") == "1"


_PDL: dict = {}


def pdl_available(device: torch.device) -> bool:
    """Programmatic dependent launch: compiled kernels on compute capability >= 9.0 (Hopper and newer)."""
    if _interpreting() or device.type != "cuda":
        return False
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _PDL:
        _PDL[key] = torch.cuda.get_device_capability(key)[0] >= 9
    return _PDL[key]


def router_split(cfg: FFNConfig, D: int, E: int) -> tuple[int, int]:
    """(S, D per slice): slices of whole K tiles, none empty."""
    s = max(1, min(cfg.router_split, 8, triton.cdiv(D, cfg.router_block_k)))
    d_per = triton.cdiv(triton.cdiv(D, s), cfg.router_block_k) * cfg.router_block_k
    return triton.cdiv(D, d_per), d_per


def expert_ffn(x2d: torch.Tensor, layout: ExpertLayout, code: int, param: torch.Tensor,
               cfg: FFNConfig | None = None, scratch: Scratch | None = None,
               out: torch.Tensor | None = None, stages: int = 3) -> FFNResult | None:
    """Decode FFN for x2d [N, D] (N <= 8) with routing rule `code` and device parameter `param` [1].

    stages < 3 stops after that many launches (benchmarks time the stages by difference).
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
    pdl = cfg.pdl and pdl_available(x2d.device)
    launch = {"launch_pdl": True} if pdl else {}
    half = cfg.half_dots and x2d.dtype != torch.float32 and not _interpreting()
    mask = scratch.mask[: N * E].view(N, E)
    gates = scratch.gates[: N * E].view(N, E)
    logits = scratch.logits[: N * E].view(N, E)
    S, d_per = router_split(cfg, D, E)
    # N programs wait for one another: only where they all run at once (compiled) and the grid has N of them
    row_parallel = N > 1 and cfg.parallel_select and not _interpreting() and triton.cdiv(E, cfg.router_block_e) * S >= N
    _router_select_kernel[(triton.cdiv(E, cfg.router_block_e), S)](
        x2d, layout.w_router, scratch.rpart, scratch.router_ticket, param,
        mask, gates, logits, scratch.flags, scratch.ids, scratch.count, N, E, D, d_per,
        S=S, BE=cfg.router_block_e, BN2=next_pow2(N), BLOCK_K=min(cfg.router_block_k, next_pow2(d_per)),
        BLOCK_E=next_pow2(E), RULE=code, GATE=GATE_CODES[layout.gate], ROUND_TO=TL_DTYPES[x2d.dtype],
        ROW_PARALLEL=row_parallel, PDL=pdl, num_warps=4, **launch)
    if stages < 2:
        return None
    h = scratch.h[: N * E * G]
    w_up = layout.w_up if layout.w_up is not None else layout.w_in
    b_in = layout.b_in if layout.b_in is not None else layout.w_in
    y = out if out is not None else torch.empty(N, D, device=x2d.device, dtype=x2d.dtype)
    b_out = layout.b_out if layout.b_out is not None else y
    n_items = E * (G // bg)
    gu_grid = n_items
    if cfg.gate_up_programs > 0:
        gu_grid = min(n_items, cfg.gate_up_programs)
    _gate_up_kernel[(gu_grid,)](
        x2d, layout.w_in, w_up, b_in, gates, scratch.ids, scratch.count, h, N, E,
        D=D, G=G, BG=bg, BN=BN, BLOCK_K=min(cfg.block_k, next_pow2(D)), ACT=ACT_CODES[layout.act],
        GATED=layout.kind == "gated", HAS_BIAS=layout.b_in is not None, DOT_PREC=prec, HALF_DOT=half,
        LOOP=gu_grid < n_items, PDL=pdl, num_warps=cfg.num_warps, **launch)
    if stages < 3:
        return None
    _down_kernel[(triton.cdiv(E, cfg.slots), triton.cdiv(D, cfg.block_d))](
        h, layout.w_out, scratch.ids, scratch.count, scratch.acc, scratch.tickets, b_out, y, N, E, D,
        G=G, BLOCK_G=next_pow2(G), SLOTS=cfg.slots, SLOTS_P2=next_pow2(cfg.slots), BN=BN, BLOCK_D=cfg.block_d,
        HAS_BIAS=layout.b_out is not None, DOT_PREC=prec, HALF_DOT=half, PDL=pdl, num_warps=cfg.num_warps,
        **launch)
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
