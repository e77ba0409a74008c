"""The FFN on cuBLAS when every expert is kept, or a batch keeps most: GEMMs plus one activation + gating kernel.

Shapes: N rows, D hidden, F = E * G ffn, E experts, G expert size.

When a rule keeps all experts by definition (the dense rule, top-k with k >= E, cumulative mass with
tau > 1), the sparse kernels cannot read fewer bytes than the dense FFN, and cuBLAS streams the full
matrices faster than they do. What is left depends on the gate (Gu, Fu, Yuan 2026):

* gate "one": every kept expert is multiplied by 1, so the FFN *is* the dense FFN, exactly, and no router
  runs: gate and up GEMVs, one kernel for act(gate) * up, the down GEMV (path "cublas-dense").
* gate "sigmoid" (the paper's) or "softmax": each expert's output is scaled by its router gate, so the
  router GEMV is needed even with every expert kept: its rows share the gate GEMM where the layout stores them
  after the gate rows (one slab, see `ExpertLayout`), else it runs on a side stream, concurrently with the
  gate and up GEMVs (a parallel branch of a captured graph); the activation kernel applies
  act(gate) * up * g_e (path "cublas-gated").

Batches (2..8 rows) at high kept fractions: the sparse kernels stream the union of the rows' experts, nearly
all of them, on a path slower than cuBLAS's GEMMs. A top-k rule keeping at least `BATCH_CROSSOVER` of the
experts per row runs cuBLAS, masked (path "cublas-masked"): where the router's rows follow the gate rows in one
slab (`ExpertLayout`, `share_down=True`), one GEMM gives the gate pre-activations and the logits, and one program
per row picks its top k (a sort, ties kept together as in `select.py`) on the side stream beside the up GEMM;
otherwise a router GEMM and that top-k run on the side stream beside both. The activation kernel multiplies by
the gates, 0 where a row dropped an expert. (On the H200, at the Llama-3-8B FFN, batch 8: the slab form ran
1-2 us faster than the dense FFN, the router GEMM form ~level with it, and the route+select kernel on the side
stream ~4 us slower; torch.topk cost ~32 us; prunepath/bench/NOTES.md v9.)
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .expert_ffn import ACT_CODES, _act
from .layout import ExpertLayout, next_pow2
from .route import GATE_CODES, RULE_ALL, RULE_MASS, RULE_MASS_INCL, RULE_TOPK

# Kept fraction of a top-k rule from which one row takes cuBLAS: every expert (one row's sparse kernels are faster
# below it; H200, Llama-3-8B FFN: prunepath/bench/NOTES.md).
CROSSOVER = 1.0
# Kept fraction per row of a top-k rule from which batches of 2..8 rows take "cublas-masked" (H200, Llama-3-8B FFN,
# batch 8, v9: the batch kernels 95.7 / 101.7-104.8 / 110-113 / 116.7-120 us at 62.5 / 75 / 87.5 / 95 %, the masked
# path with the slab 98-100 us at each, dense 99-105 in the same runs).
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

    Measured on the H200 at the Llama-3-8B FFN (results/bench/ffn_h200.json): with every expert kept, one row
    runs faster on the Triton kernels (94.9 us) than on cuBLAS with the router beside it (99.8 us; dense 98.9),
    so only unit gates, which need no router, take cuBLAS there (the dense FFN itself, 98.9 us); batches of
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
    below E: gates from a per-row top-k of the router logits) or "cublas-gated" (router gates, every expert)."""
    if code == RULE_TOPK and value < layout.n_experts:
        return "cublas-masked"
    return "cublas-dense" if layout.gate == "one" else "cublas-gated"


@triton.jit
def _topk_gates_kernel(z_ptr, k_ptr, g_ptr, E, ZS, BLOCK_E: tl.constexpr, GATE: tl.constexpr):
    """g[n, e] = e's gate (GATE 0 sigmoid / 1 softmax / 2 one of row n of the logits z, row stride ZS) where z[n, e]
    is at least the k-th largest of the row (k from the device parameter: ties kept together, as `select.py`
    decides top-k), else 0; one program per row."""
    n = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    em = e < E
    z = tl.load(z_ptr + n * ZS + e, mask=em, other=float("-inf")).to(tl.float32)
    kk = tl.minimum(tl.ceil(tl.load(k_ptr)), E * 1.0).to(tl.int32)
    zk = tl.sum(tl.where(e == kk - 1, tl.sort(z, descending=True), 0.0), axis=0)  # the k-th largest logit
    if GATE == 0:
        g = tl.sigmoid(z)
    elif GATE == 1:
        ex = tl.exp(z - tl.max(z, axis=0))
        g = ex / tl.sum(ex, axis=0)
    else:
        g = tl.full((BLOCK_E,), 1.0, tl.float32)
    tl.store(g_ptr + n * E + e, tl.where((z >= zk) & (kk > 0), g, 0.0), mask=em)


@triton.jit
def _act_gate_kernel(hg_ptr, hu_ptr, z_ptr, h_ptr, E, F, HS, ZS,
                     G: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_E: tl.constexpr, ACT: tl.constexpr,
                     GATE: tl.constexpr, GATED: tl.constexpr):
    """h[n, f] = act(hg) * hu * g: GATE 0 sigmoid / 1 softmax of the logits z [N, E], 2 one, 3 the gates z given;
    rows of hg are HS apart and rows of z ZS apart (F + E when the logits share the gate GEMM)."""
    n = tl.program_id(1)
    f = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    fm = f < F
    if GATE == 0:
        g = tl.sigmoid(tl.load(z_ptr + n * ZS + f // G, mask=fm, other=0.0).to(tl.float32))
    elif GATE == 1:
        e_all = tl.arange(0, BLOCK_E)
        z = tl.load(z_ptr + n * ZS + e_all, mask=e_all < E, other=float("-inf")).to(tl.float32)  # [BLOCK_E]
        ze = tl.load(z_ptr + n * ZS + f // G, mask=fm, other=0.0).to(tl.float32)  # [BLOCK_F] logit of f's expert
        zmax = tl.max(z, axis=0)
        g = tl.exp(ze - zmax) / tl.sum(tl.exp(z - zmax), axis=0)
    elif GATE == 2:
        g = tl.full((BLOCK_F,), 1.0, tl.float32)
    else:  # gate values given [N, E] fp32, 0 where the row dropped the expert (route+select's output)
        g = tl.load(z_ptr + n * ZS + f // G, mask=fm, other=0.0)
    a = _act(tl.load(hg_ptr + n * HS + f, mask=fm, other=0.0).to(tl.float32), ACT)
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


def gate_router_slab(layout: ExpertLayout) -> torch.Tensor | None:
    """[F + E, D]: the gate rows followed by the router's rows, when they lie so in one storage (no copy: a layout
    built with `share=True`), else None. One GEMM over it gives the gate pre-activations and the router logits."""
    w, r = layout.w_in, layout.w_router
    Fd, D = layout.d_ff, layout.d_model
    if layout.b_in is not None or r.untyped_storage().data_ptr() != w.untyped_storage().data_ptr():
        return None
    if r.storage_offset() != w.storage_offset() + Fd * D:
        return None
    return w.as_strided((Fd + layout.n_experts, D), (D, 1))


def _topk_gates(z: torch.Tensor, param: torch.Tensor, gate: str, E: int) -> torch.Tensor:
    """Gates [N, E] fp32 of each row's top k logits (z [N, E], rows possibly strided), 0 elsewhere."""
    N = z.shape[0]
    g = torch.empty(N, E, device=z.device, dtype=torch.float32)
    _topk_gates_kernel[(N,)](z, param, g, E, z.stride(0), BLOCK_E=next_pow2(E), GATE=GATE_CODES[gate], num_warps=4)
    return g


def masked_router(layout: ExpertLayout) -> str:
    """How the masked path routes: "slab" (one GEMM over the gate + router slab) or "mm" (a router GEMM)."""
    return "slab" if gate_router_slab(layout) is not None else "mm"


def all_kept_ffn(x2d: torch.Tensor, layout: ExpertLayout, code: int, value: float,
                 param: torch.Tensor | None = None) -> torch.Tensor:
    """y [N, D] on cuBLAS for a rule that keeps every expert, or (path "cublas-masked") a top-k rule below E,
    whose k is read from the device parameter `param` [1] (so a captured graph follows a new k)."""
    N, D = x2d.shape
    E, G = layout.n_experts, layout.expert_size
    Fd = E * G
    path = all_kept_path(layout, code, value)
    masked = path == "cublas-masked"
    if masked and param is None:
        raise ValueError("the masked cuBLAS path (a top-k rule below every expert) needs the rule's parameter "
                         "as a device tensor: pass param=torch.tensor([k], device=...)")
    gate = "one" if path == "cublas-dense" else layout.gate
    slab = gate_router_slab(layout) if masked or gate != "one" else None
    z = None  # logits [N, E] in the model dtype (as the torch router returns), or the masked path's gates
    main = torch.cuda.current_stream(x2d.device) if x2d.is_cuda else None
    side = _side_stream(x2d.device) if masked or (gate != "one" and slab is None) else None  # a graph branch
    if slab is not None:  # one GEMM: gate pre-activations, then the logits
        hz = F.linear(x2d, slab)  # [N, F + E]
        hg, z = hz[:, :Fd], hz[:, Fd:]
        if masked:  # each row's top k beside the up GEMM
            if side is not None:
                side.wait_stream(main)
            with torch.cuda.stream(side) if side is not None else nullcontext():
                z = _topk_gates(z, param, gate, E)
    else:
        if side is not None:
            side.wait_stream(main)
        with torch.cuda.stream(side) if side is not None else nullcontext():  # the router beside gate / up
            if masked or gate != "one":
                z = torch.mm(x2d, layout.w_router.t())
                if masked:
                    z = _topk_gates(z, param, gate, E)
        hg = F.linear(x2d, layout.w_in.view(Fd, D), layout.b_in)  # [N, F]
    hu = F.linear(x2d, layout.w_up.view(Fd, D)) if layout.w_up is not None else hg
    if z is not None and side is not None:
        main.wait_stream(side)
    h = torch.empty(N, Fd, device=x2d.device, dtype=x2d.dtype)
    block_f = 1024
    _act_gate_kernel[(triton.cdiv(Fd, block_f), N)](
        hg, hu, z if z is not None else hg, h, E, Fd, hg.stride(0), z.stride(0) if z is not None else E, G=G,
        BLOCK_F=block_f, BLOCK_E=next_pow2(E), ACT=ACT_CODES[layout.act], GATE=3 if masked else GATE_CODES[gate],
        GATED=layout.w_up is not None, num_warps=4)
    y = h @ layout.w_out.view(Fd, D)  # [N, D]
    return y if layout.b_out is None else y + layout.b_out
