"""The FFN when every expert is kept: cuBLAS GEMVs, plus one fused activation (and gating) kernel.

Shapes: N rows, D hidden, F = E * G ffn, E experts, G expert size.

When a rule keeps all experts by definition (the dense rule, top-k with k >= E, cumulative mass with
tau > 1), the sparse kernels cannot read fewer bytes than the dense FFN, and cuBLAS streams the full
matrices faster than they do. What is left depends on the gate (Gu, Fu, Yuan 2026):

* gate "one": every kept expert is multiplied by 1, so the FFN *is* the dense FFN, exactly, and no router
  runs: gate and up GEMVs, one kernel for act(gate) * up, the down GEMV (path "cublas-dense").
* gate "sigmoid" (the paper's) or "softmax": each expert's output is scaled by its router gate, so the
  router GEMV is needed even with every expert kept. It runs on a side stream, concurrently with the gate
  and up GEMVs (a parallel branch of a captured graph), and the activation kernel applies
  act(gate) * up * g_e (path "cublas-gated").

A top-k rule with k < E (above `CROSSOVER`) would also need every row's k-th largest logit; the
measured crossover (prunepath/bench/NOTES.md) says where that is still worth it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .expert_ffn import ACT_CODES, _act
from .layout import ExpertLayout, next_pow2
from .route import GATE_CODES, RULE_ALL, RULE_MASS, RULE_MASS_INCL, RULE_TOPK

# Kept fraction of a top-k rule from which cuBLAS may take over: every expert. Below it cuBLAS would also need
# each row's k-th largest logit (torch.topk: ~32 us at E = 448), and the sparse kernels are faster (H200,
# Llama-3-8B FFN: prunepath/bench/NOTES.md).
CROSSOVER = 1.0


def keeps_all(code: int, value: float, n_experts: int, crossover: float = CROSSOVER) -> bool:
    """True when the rule's kept set is known on the host to be (nearly) every expert."""
    if code == RULE_ALL:
        return True
    if code in (RULE_MASS, RULE_MASS_INCL):
        return value > 1.0
    if code == RULE_TOPK:
        return value >= crossover * n_experts
    return False


def choose_path(layout: ExpertLayout, code: int, value: float, n_rows: int) -> str:
    """The path the dispatcher (`FastPath`) takes: "triton-fused" (the sparse kernels) or an all-kept path.

    Measured on the H200 at the Llama-3-8B FFN (prunepath/bench/NOTES.md, v7): with every expert kept, one row
    runs faster on the Triton kernels (93.8 us) than on cuBLAS with the router beside it (99.2 us; dense 99.8),
    so only unit gates, which need no router, take cuBLAS there (the dense FFN itself, 95.6 us); batches of
    2..8 rows take cuBLAS whenever every expert is kept (their tensor-core path streams the union, all of it).
    """
    if not keeps_all(code, value, layout.n_experts):
        return "triton-fused"
    path = all_kept_path(layout, code, value)
    return path if n_rows > 1 or path == "cublas-dense" else "triton-fused"


def all_kept_path(layout: ExpertLayout, code: int, value: float) -> str:
    """Which all-kept path runs: "cublas-dense" (unit gates, every expert: no router) or "cublas-gated"."""
    topk = code == RULE_TOPK and value < layout.n_experts
    return "cublas-dense" if layout.gate == "one" and not topk else "cublas-gated"


@triton.jit
def _act_gate_kernel(hg_ptr, hu_ptr, z_ptr, thr_ptr, h_ptr, E, F,
                     G: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_E: tl.constexpr, ACT: tl.constexpr,
                     GATE: tl.constexpr, GATED: tl.constexpr, TOPK: tl.constexpr):
    n = tl.program_id(1)
    f = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    fm = f < F
    if GATE == 0:
        g = tl.sigmoid(tl.load(z_ptr + n * E + f // G, mask=fm, other=0.0).to(tl.float32))
    elif GATE == 1:
        e_all = tl.arange(0, BLOCK_E)
        z = tl.load(z_ptr + n * E + e_all, mask=e_all < E, other=float("-inf")).to(tl.float32)  # [BLOCK_E]
        ze = tl.load(z_ptr + n * E + f // G, mask=fm, other=0.0).to(tl.float32)  # [BLOCK_F] logit of f's expert
        zmax = tl.max(z, axis=0)
        g = tl.exp(ze - zmax) / tl.sum(tl.exp(z - zmax), axis=0)
    else:
        g = tl.full((BLOCK_F,), 1.0, tl.float32)
    if TOPK:  # keep(e) <=> #{j: z_j > z_e} < k  <=>  z_e >= the row's k-th largest logit
        ze = tl.load(z_ptr + n * E + f // G, mask=fm, other=0.0).to(tl.float32)
        g = tl.where(ze >= tl.load(thr_ptr + n), g, 0.0)
    a = _act(tl.load(hg_ptr + n * F + f, mask=fm, other=0.0).to(tl.float32), ACT)
    if GATED:
        a = a * tl.load(hu_ptr + n * F + f, mask=fm, other=0.0).to(tl.float32)
    tl.store(h_ptr + n * F + f, (a * g).to(h_ptr.dtype.element_ty), mask=fm)


_SIDE: dict = {}


def _side_stream(device: torch.device):
    """One side stream per CUDA device for the router GEMV (None on the CPU: run it in line)."""
    if device.type != "cuda":
        return None
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SIDE:
        _SIDE[key] = torch.cuda.Stream(device=key)
    return _SIDE[key]


def all_kept_ffn(x2d: torch.Tensor, layout: ExpertLayout, code: int, value: float) -> torch.Tensor:
    """y [N, D] for a rule that keeps every expert (or a top-k rule, `value` = k, above the crossover)."""
    N, D = x2d.shape
    E, G = layout.n_experts, layout.expert_size
    Fd = E * G
    topk = code == RULE_TOPK and value < E
    gate = "one" if all_kept_path(layout, code, value) == "cublas-dense" else layout.gate
    z = None
    if gate != "one" or topk:
        # [N, E] in the model dtype, as the torch router returns; on a side stream, beside the gate / up GEMVs
        z = torch.empty(N, E, device=x2d.device, dtype=x2d.dtype)
        side = _side_stream(x2d.device)
        if side is None:
            torch.mm(x2d, layout.w_router.t(), out=z)
        else:
            main = torch.cuda.current_stream(x2d.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                torch.mm(x2d, layout.w_router.t(), out=z)
    hg = F.linear(x2d, layout.w_in.view(Fd, D), layout.b_in)  # [N, F]
    hu = F.linear(x2d, layout.w_up.view(Fd, D)) if layout.w_up is not None else hg
    if z is not None and x2d.device.type == "cuda":
        torch.cuda.current_stream(x2d.device).wait_stream(_side_stream(x2d.device))
    h = torch.empty_like(hg)
    thr = z.float().topk(max(1, math.ceil(value)), dim=-1).values[:, -1].contiguous() if topk else hg
    block_f = 1024
    _act_gate_kernel[(triton.cdiv(Fd, block_f), N)](
        hg, hu, z if z is not None else hg, thr, h, E, Fd, G=G, BLOCK_F=block_f, BLOCK_E=next_pow2(E),
        ACT=ACT_CODES[layout.act], GATE=GATE_CODES[gate], GATED=layout.w_up is not None,
        TOPK=topk, num_warps=4)
    y = h @ layout.w_out.view(Fd, D)  # [N, D]
    return y if layout.b_out is None else y + layout.b_out
