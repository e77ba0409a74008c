"""The FFN on cuBLAS when every expert is kept, or a batch keeps most: GEMMs plus one activation + gating kernel.

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

Batches (2..8 rows) at high kept fractions: the sparse kernels stream the union of the rows' experts, nearly
all of them, on a path slower than cuBLAS's GEMMs. A top-k rule keeping at least `BATCH_CROSSOVER` of the
experts per row runs cuBLAS with the kept mask taken from the fused route+select kernel (`select.py`, launch 1
of `expert_ffn`) on the side stream: it writes each row's gates with zeros where the row dropped an expert, and
the activation kernel multiplies by them (path "cublas-masked"; no torch.topk, which cost ~32 us per call).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .expert_ffn import ACT_CODES, FFNConfig, Scratch, _act, expert_ffn
from .layout import ExpertLayout, next_pow2
from .route import GATE_CODES, RULE_ALL, RULE_MASS, RULE_MASS_INCL, RULE_TOPK

# Kept fraction of a top-k rule from which one row takes cuBLAS: every expert (one row's sparse kernels are faster
# below it; H200, Llama-3-8B FFN: prunepath/bench/NOTES.md).
CROSSOVER = 1.0
# Kept fraction per row of a top-k rule from which batches of 2..8 rows take "cublas-masked" (H200, Llama-3-8B FFN,
# batch 8: the batch kernels 93.5 / 101.8 / 113.6 / 118.2 us at 62.5 / 75 / 87.5 / 95 %, the masked cuBLAS path
# 102 us at every fraction, dense 98.4 us).
BATCH_CROSSOVER = 0.75


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
    2..8 rows take cuBLAS whenever every expert is kept (their tensor-core path streams the union, all of it),
    and with a top-k rule from BATCH_CROSSOVER of the experts per row ("cublas-masked").
    """
    if not keeps_all(code, value, layout.n_experts):
        if n_rows > 1 and code == RULE_TOPK and value >= BATCH_CROSSOVER * layout.n_experts:
            return "cublas-masked"
        return "triton-fused"
    path = all_kept_path(layout, code, value)
    return path if n_rows > 1 or path == "cublas-dense" else "triton-fused"


def all_kept_path(layout: ExpertLayout, code: int, value: float) -> str:
    """Which cuBLAS path runs: "cublas-dense" (unit gates, every expert: no router), "cublas-masked" (a top-k rule
    below E: gates and kept mask from the route+select kernel) or "cublas-gated" (router gates, every expert)."""
    if code == RULE_TOPK and value < layout.n_experts:
        return "cublas-masked"
    return "cublas-dense" if layout.gate == "one" else "cublas-gated"


@triton.jit
def _act_gate_kernel(hg_ptr, hu_ptr, z_ptr, h_ptr, E, F,
                     G: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_E: tl.constexpr, ACT: tl.constexpr,
                     GATE: tl.constexpr, GATED: tl.constexpr):
    """h[n, f] = act(hg) * hu * g: GATE 0 sigmoid / 1 softmax of the logits z [N, E], 2 one, 3 the gates z given."""
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
    elif GATE == 2:
        g = tl.full((BLOCK_F,), 1.0, tl.float32)
    else:  # gate values given [N, E] fp32, 0 where the row dropped the expert (route+select's output)
        g = tl.load(z_ptr + n * E + f // G, mask=fm, other=0.0)
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


def all_kept_ffn(x2d: torch.Tensor, layout: ExpertLayout, code: int, value: float,
                 param: torch.Tensor | None = None) -> torch.Tensor:
    """y [N, D] on cuBLAS for a rule that keeps every expert, or (path "cublas-masked") a top-k rule below E,
    whose kept mask and gates come from the route+select kernel reading the device parameter `param` [1]."""
    N, D = x2d.shape
    E, G = layout.n_experts, layout.expert_size
    Fd = E * G
    path = all_kept_path(layout, code, value)
    if path == "cublas-masked" and param is None:
        raise ValueError("the masked cuBLAS path (a top-k rule below every expert) needs the rule's parameter "
                         "as a device tensor: pass param=torch.tensor([k], device=...)")
    gate = {"cublas-dense": "one", "cublas-masked": "given"}.get(path, layout.gate)
    z = None
    if gate not in ("one", "given"):  # logits [N, E] in the model dtype, as the torch router returns
        z = torch.empty(N, E, device=x2d.device, dtype=x2d.dtype)
    side = _side_stream(x2d.device) if gate != "one" else None
    if side is not None:  # the router beside the gate / up GEMMs (a parallel branch of a captured graph)
        side.wait_stream(torch.cuda.current_stream(x2d.device))
    with torch.cuda.stream(side) if side is not None else nullcontext():
        if gate == "given":  # gates [N, E] fp32 with zeros where a row dropped an expert: launch 1 of expert_ffn
            scratch = Scratch.shared(layout)
            expert_ffn(x2d, layout, code, param, cfg=replace(FFNConfig.for_batch(N), pdl=False), scratch=scratch,
                       stages=1)
            z = scratch.gates[: N * E]
        elif z is not None:
            torch.mm(x2d, layout.w_router.t(), out=z)
    hg = F.linear(x2d, layout.w_in.view(Fd, D), layout.b_in)  # [N, F]
    hu = F.linear(x2d, layout.w_up.view(Fd, D)) if layout.w_up is not None else hg
    if z is not None and side is not None:
        torch.cuda.current_stream(x2d.device).wait_stream(side)
    h = torch.empty_like(hg)
    block_f = 1024
    _act_gate_kernel[(triton.cdiv(Fd, block_f), N)](
        hg, hu, z if z is not None else hg, h, E, Fd, G=G, BLOCK_F=block_f, BLOCK_E=next_pow2(E),
        ACT=ACT_CODES[layout.act], GATE=GATE_CODES.get(gate, 3), GATED=layout.w_up is not None, num_warps=4)
    y = h @ layout.w_out.view(Fd, D)  # [N, D]
    return y if layout.b_out is None else y + layout.b_out
