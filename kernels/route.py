"""Router GEMV and per-token expert selection on the device (no host synchronisation).

Shapes: N = B*T rows (N <= 8 for decode), D hidden, E experts, S router split over D.

The authors' port runs router, softmax and a sorted cumulative sum in a single program, which is slow
when D*E is large (Gu, Fu, Yuan 2026). Here:

1. `select._router_partial` spreads the GEMV over a grid of (E blocks) x (S slices of D); each program writes
   fp32 partial logits `[S, N, E]`. No atomics, so no zeroing and a deterministic sum.
2. `_select_expert` (a jit helper, inlined into every consumer program) decides *one* expert for all N
   tokens without sorting: with p = softmax(z) and S_ge(v) = sum_j p_j [p_j >= v] (the mass of every
   expert at least as probable as v), the sorted exclusive rule "keep while the cumulative sum < tau,
   top-1 always" is exactly  keep(e) <=> S_ge(p_e) < tau or p_e = max p. Inclusive (keep the crossing
   expert): sum_j p_j [p_j > p_e] < tau. Top-k: #{j: z_j > z_e} < k. Each is one O(E) pass per expert,
   so the selection is spread over the same programs that stream the weights instead of serialised.
   Ties at the boundary keep all tied experts or none, where a sort would break them by position.

`route()` runs the two stages standalone (tests, stats); `expert_ffn` fuses stage 2 into its gate/up
kernel. The rule's parameter (tau, k or t) is read from a device tensor, so it can change between
replays of a captured CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from prunepath.routing.gates import GATE_KINDS
from prunepath.routing.rules import CumulativeMass, Dense, Threshold, TopK

from .layout import ExpertLayout, next_pow2
from .select import _router_partial

# rule codes shared by kernels and references
RULE_MASS, RULE_MASS_INCL, RULE_TOPK, RULE_ALL, RULE_SIGMOID, RULE_RELATIVE = 0, 1, 2, 3, 4, 5
GATE_CODES = {kind: i for i, kind in enumerate(GATE_KINDS)}  # sigmoid 0, softmax 1, one 2


def rule_code(rule) -> tuple[int, float] | None:
    """(code, parameter) for the rules the kernels implement, None for the others (torch path)."""
    if isinstance(rule, CumulativeMass):
        return (RULE_MASS_INCL if rule.inclusive else RULE_MASS), float(rule.tau)
    if isinstance(rule, TopK):
        return RULE_TOPK, float(rule.k)
    if isinstance(rule, Dense):
        return RULE_ALL, 0.0
    if isinstance(rule, Threshold):
        return (RULE_SIGMOID if rule.score == "sigmoid" else RULE_RELATIVE), float(rule.t)
    return None


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _select_expert(part_ptr, param_ptr, e, N, E, S: tl.constexpr, BN: tl.constexpr, BLOCK_E: tl.constexpr,
                   RULE: tl.constexpr, GATE: tl.constexpr, ROUND_TO: tl.constexpr):
    """Decision for expert `e` and every token: (keep [BN] bool, gate [BN] fp32, logit [BN] fp32)."""
    n_offs = tl.arange(0, BN)
    j_offs = tl.arange(0, BLOCK_E)
    nm = n_offs < N
    m2 = nm[:, None] & (j_offs[None, :] < E)
    z = tl.zeros((BN, BLOCK_E), dtype=tl.float32)  # [BN, E] logits of every expert
    ze = tl.zeros((BN,), dtype=tl.float32)  # [BN] logit of expert e
    for s in tl.static_range(S):
        base = part_ptr + s * N * E
        z += tl.load(base + n_offs[:, None] * E + j_offs[None, :], mask=m2, other=0.0)
        ze += tl.load(base + n_offs * E + e, mask=nm, other=0.0)
    # Round like the torch path, whose router returns logits in the model dtype.
    z = z.to(ROUND_TO).to(tl.float32)
    ze = ze.to(ROUND_TO).to(tl.float32)
    z = tl.where(m2, z, float("-inf"))
    zmax = tl.max(z, axis=1)  # [BN]
    zmax = tl.where(nm, zmax, 0.0)  # padded rows: keep the arithmetic finite
    ex = tl.exp(z - zmax[:, None])  # [BN, E], 0 outside the valid block
    denom = tl.sum(ex, axis=1)  # [BN]
    denom = tl.where(nm, denom, 1.0)
    p = ex / denom[:, None]
    pe = tl.exp(ze - zmax) / denom  # [BN]
    param = tl.load(param_ptr)
    top1 = ze >= zmax  # the top-1 expert is always kept (except by top-k, which keeps k anyway)
    all_on = (tl.zeros((BN,), dtype=tl.float32) + param) > 1.0  # [BN]; tau > 1 = dense stage
    if RULE == 0:  # exclusive cumulative mass; tau > 1 keeps every expert (dense training stage)
        mass_ge = tl.sum(tl.where(p >= pe[:, None], p, 0.0), axis=1)
        keep = (mass_ge < param) | top1 | all_on
    elif RULE == 1:  # inclusive cumulative mass (keeps the crossing expert)
        mass_gt = tl.sum(tl.where(p > pe[:, None], p, 0.0), axis=1)
        keep = (mass_gt < param) | top1 | all_on
    elif RULE == 2:  # top-k on logits
        n_gt = tl.sum(tl.where(z > ze[:, None], 1.0, 0.0), axis=1)
        keep = n_gt < param
    elif RULE == 3:  # dense
        keep = ze == ze
    elif RULE == 4:  # sigmoid threshold
        keep = (tl.sigmoid(ze) > param) | top1
    else:  # relative threshold (D2DMoE): p_e >= (1 - t) max p
        keep = (tl.exp(ze - zmax) >= 1.0 - param) | top1
    keep = keep & nm
    if GATE == 0:
        g = tl.sigmoid(ze)
    elif GATE == 1:
        g = pe
    else:
        g = tl.full((BN,), 1.0, tl.float32)
    g = tl.where(keep, g, 0.0)
    return keep, g, ze


@triton.jit
def _select_kernel(part_ptr, param_ptr, mask_ptr, gate_ptr, logit_ptr, flag_ptr, N, E,
                   S: tl.constexpr, BN: tl.constexpr, BLOCK_E: tl.constexpr,
                   RULE: tl.constexpr, GATE: tl.constexpr, ROUND_TO: tl.constexpr):
    """One program per expert: writes mask / gates / logits [N, E] and the union flag [E]."""
    e = tl.program_id(0)
    keep, g, ze = _select_expert(part_ptr, param_ptr, e, N, E, S, BN, BLOCK_E, RULE, GATE, ROUND_TO)
    n_offs = tl.arange(0, BN)
    nm = n_offs < N
    tl.store(mask_ptr + n_offs * E + e, keep.to(tl.int8), mask=nm)
    tl.store(gate_ptr + n_offs * E + e, g, mask=nm)
    tl.store(logit_ptr + n_offs * E + e, ze, mask=nm)
    tl.store(flag_ptr + e, tl.max(keep.to(tl.int32), axis=0))


# ----------------------------------------------------------------------------- launchers
TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def dot_precision(dtype: torch.dtype) -> str:
    """Precision of the tensor-core dots, whose operands are always upcast to fp32 first.

    bf16 and fp16 values are exact in tf32 (7 and 10 mantissa bits <= 10), so a tf32 dot of upcast
    half operands gives the half-precision dot's products with fp32 accumulation; it also sidesteps
    the CPU interpreter's broken bf16 dot. fp32 inputs (tests) ask for exact fp32 products.
    """
    return "ieee" if dtype == torch.float32 else "tf32"


def token_block(n: int) -> int:
    """Rows a program carries: 1 (GEMV path, no padding) or 16 (tensor-core tile, N padded)."""
    return 1 if n == 1 else 16


@dataclass(frozen=True)
class RouterConfig:
    block_e: int = 16
    block_k: int = 256
    split: int = 0  # slices of D; 0 = choose so that the grid fills the device
    num_warps: int = 4

    def splits(self, D: int, E: int) -> int:
        if self.split:
            return max(1, min(self.split, 8, triton.cdiv(D, self.block_k)))
        # aim for ~256 programs, each slice at least 4 K-blocks long
        want = triton.cdiv(256, triton.cdiv(E, self.block_e))
        return max(1, min(want, 8, triton.cdiv(D, 4 * self.block_k)))


def router_partial_logits(x2d: torch.Tensor, w_router: torch.Tensor, cfg: RouterConfig = RouterConfig(),
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 partial logits [S, N, E]; their sum over S is x2d @ w_router.T."""
    N, D = x2d.shape
    E = w_router.shape[0]
    S = cfg.splits(D, E)
    d_per = triton.cdiv(triton.cdiv(D, S), cfg.block_k) * cfg.block_k
    S = triton.cdiv(D, d_per)  # no empty slices
    if out is None:
        out = torch.empty(S, N, E, device=x2d.device, dtype=torch.float32)
    else:
        out = out.view(-1)[: S * N * E].view(S, N, E)
    grid = (triton.cdiv(E, cfg.block_e), S)
    _router_partial[grid](x2d, w_router, out, N, E, D, d_per, BE=cfg.block_e, BN=next_pow2(N),
                           BLOCK_K=cfg.block_k, PDL=False, num_warps=cfg.num_warps)
    return out


@dataclass(frozen=True)
class RouteResult:
    logits: torch.Tensor  # [N, E] fp32 (rounded to the model dtype, as the torch router returns)
    mask: torch.Tensor  # [N, E] bool
    gates: torch.Tensor  # [N, E] fp32, 0 where dropped
    active: torch.Tensor  # [E] int32, 1 if any token keeps the expert


def route(x2d: torch.Tensor, layout: ExpertLayout, code: int, param: torch.Tensor,
          cfg: RouterConfig = RouterConfig()) -> RouteResult:
    """Router + selection as two launches (the FFN fuses the second into its gate/up kernel)."""
    layout.check_input(x2d)
    N, _ = x2d.shape
    E = layout.n_experts
    part = router_partial_logits(x2d, layout.w_router, cfg)
    dev = x2d.device
    mask = torch.empty(N, E, device=dev, dtype=torch.int8)
    gates = torch.empty(N, E, device=dev, dtype=torch.float32)
    logits = torch.empty(N, E, device=dev, dtype=torch.float32)
    flags = torch.empty(E, device=dev, dtype=torch.int32)
    _select_kernel[(E,)](part, param, mask, gates, logits, flags, N, E, S=part.shape[0],
                         BN=next_pow2(N), BLOCK_E=next_pow2(E), RULE=code, GATE=GATE_CODES[layout.gate],
                         ROUND_TO=TL_DTYPES[x2d.dtype], num_warps=4)
    return RouteResult(logits=logits, mask=mask.bool(), gates=gates, active=flags)


# ----------------------------------------------------------------------------- references
def select_reference(logits: torch.Tensor, code: int, param: float) -> torch.Tensor:
    """Kernel semantics in torch: logits [N, E] fp32 -> keep mask [N, E] bool.

    For untied inputs this is the sorted rule of `prunepath.routing.cumulative_mass_mask`;
    at exact ties it keeps or drops all tied experts together, as the kernel does.
    """
    z = logits.float()
    p = torch.softmax(z, dim=-1)  # [N, E]
    top1 = z >= z.max(-1, keepdim=True).values  # [N, E]
    if code in (RULE_MASS, RULE_MASS_INCL) and param > 1:
        return torch.ones_like(z, dtype=torch.bool)
    if code == RULE_MASS:  # mass of every expert at least as probable as e, e included
        return ((p[:, None, :] * (p[:, None, :] >= p[:, :, None])).sum(-1) < param) | top1
    if code == RULE_MASS_INCL:  # mass strictly before e
        return ((p[:, None, :] * (p[:, None, :] > p[:, :, None])).sum(-1) < param) | top1
    if code == RULE_TOPK:
        return (z[:, None, :] > z[:, :, None]).sum(-1) < param
    if code == RULE_ALL:
        return torch.ones_like(z, dtype=torch.bool)
    if code == RULE_SIGMOID:
        return (torch.sigmoid(z) > param) | top1
    if code == RULE_RELATIVE:
        return (torch.exp(z - z.max(-1, keepdim=True).values) >= 1 - param) | top1
    raise ValueError(f"unknown rule code {code}")


def gate_reference(logits: torch.Tensor, mask: torch.Tensor, gate: str) -> torch.Tensor:
    """Gate values [N, E] fp32 for kept experts, 0 elsewhere."""
    z = logits.float()
    g = {"sigmoid": torch.sigmoid, "softmax": lambda t: torch.softmax(t, -1),
         "one": torch.ones_like}[gate](z)
    return torch.where(mask, g, torch.zeros_like(g))


def route_reference(x2d: torch.Tensor, layout: ExpertLayout, code: int, param: float) -> RouteResult:
    """Torch route: logits in the model dtype (as F.linear returns them), selection in fp32."""
    logits = (x2d.double() @ layout.w_router.double().t()).to(x2d.dtype).float()  # [N, E]
    mask = select_reference(logits, code, param)
    gates = gate_reference(logits, mask, layout.gate)
    return RouteResult(logits=logits, mask=mask, gates=gates, active=mask.any(0).int())
