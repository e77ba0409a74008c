"""The FFN when (nearly) every expert is kept: cuBLAS GEMVs plus one fused gating kernel.

Shapes: N rows, D hidden, F = E * G ffn, E experts, G expert size.

When a rule keeps all experts (the dense rule, top-k with k >= E, cumulative mass with tau > 1), or a
top-k rule keeps more than `CROSSOVER` of them, the sparse kernels cannot read fewer bytes than the
dense FFN, and cuBLAS streams the full matrices slightly faster than they do. `FastPath` then takes
this path: gate and up GEMVs (cuBLAS), the router GEMV, one Triton kernel that applies
act(gate) * up * g_e (the expert's gate value, 0 for dropped experts, computed from the router logits
in the kernel), and the down GEMV. The result equals the sparse kernels' (same routing decisions).
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

# Kept fraction of a top-k rule above which cuBLAS is at least as fast as the sparse kernels (H200,
# Llama-3-8B FFN, batch 1: prunepath/bench/NOTES.md).
CROSSOVER = 0.9


def keeps_all(code: int, value: float, n_experts: int, crossover: float = CROSSOVER) -> bool:
    """True when the rule's kept set is known on the host to be (nearly) every expert."""
    if code == RULE_ALL:
        return True
    if code in (RULE_MASS, RULE_MASS_INCL):
        return value > 1.0
    if code == RULE_TOPK:
        return value >= crossover * n_experts
    return False


@triton.jit
def _act_gate_kernel(hg_ptr, hu_ptr, z_ptr, thr_ptr, h_ptr, E, F,
                     G: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_E: tl.constexpr, ACT: tl.constexpr,
                     GATE: tl.constexpr, GATED: tl.constexpr, TOPK: tl.constexpr):
    n = tl.program_id(1)
    f = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    fm = f < F
    e_all = tl.arange(0, BLOCK_E)
    z = tl.load(z_ptr + n * E + e_all, mask=e_all < E, other=float("-inf")).to(tl.float32)  # [BLOCK_E]
    ze = tl.load(z_ptr + n * E + f // G, mask=fm, other=0.0).to(tl.float32)  # [BLOCK_F] logit of f's expert
    if GATE == 0:
        g = tl.sigmoid(ze)
    elif GATE == 1:
        zmax = tl.max(z, axis=0)
        g = tl.exp(ze - zmax) / tl.sum(tl.exp(z - zmax), axis=0)
    else:
        g = tl.full((BLOCK_F,), 1.0, tl.float32)
    if TOPK:  # keep(e) <=> #{j: z_j > z_e} < k  <=>  z_e >= the row's k-th largest logit
        g = tl.where(ze >= tl.load(thr_ptr + n), g, 0.0)
    a = _act(tl.load(hg_ptr + n * F + f, mask=fm, other=0.0).to(tl.float32), ACT)
    if GATED:
        a = a * tl.load(hu_ptr + n * F + f, mask=fm, other=0.0).to(tl.float32)
    tl.store(h_ptr + n * F + f, (a * g).to(h_ptr.dtype.element_ty), mask=fm)


def all_kept_ffn(x2d: torch.Tensor, layout: ExpertLayout, code: int, value: float) -> torch.Tensor:
    """y [N, D] for a rule that keeps every expert (or a top-k rule, `value` = k, above the crossover)."""
    N, D = x2d.shape
    E, G = layout.n_experts, layout.expert_size
    Fd = E * G
    hg = F.linear(x2d, layout.w_in.view(Fd, D), layout.b_in)  # [N, F]
    hu = F.linear(x2d, layout.w_up.view(Fd, D)) if layout.w_up is not None else hg
    z = F.linear(x2d, layout.w_router)  # [N, E] in the model dtype, as the torch router returns
    h = torch.empty_like(hg)
    topk = code == RULE_TOPK and value < E
    thr = z.float().topk(max(1, math.ceil(value)), dim=-1).values[:, -1].contiguous() if topk else z
    block_f = 1024
    _act_gate_kernel[(triton.cdiv(Fd, block_f), N)](
        hg, hu, z, thr, h, E, Fd, G=G, BLOCK_F=block_f, BLOCK_E=next_pow2(E),
        ACT=ACT_CODES[layout.act], GATE=GATE_CODES[layout.gate], GATED=layout.w_up is not None,
        TOPK=topk, num_warps=4)
    y = h @ layout.w_out.view(Fd, D)  # [N, D]
    return y if layout.b_out is None else y + layout.b_out
