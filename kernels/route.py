"""The selection rules as the decode kernels know them: rule codes, and the torch references they are tested against.

Shapes: N = B*T rows, E experts.

A token keeps its most probable experts until their cumulative mass reaches tau (Gu, Fu, Yuan 2026); the
kernels also implement top-k, the dense rule and two thresholds. `rule_code` maps a routing rule to the
(code, parameter) pair the kernels read (the parameter lives in a device tensor, so it can change between
replays of a captured CUDA graph). The references below define what the kernel of `select.py` (router GEMV and
selection in one launch) must compute: the sorted rule, with exact ties kept or dropped together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton.language as tl

from prunepath.routing.gates import GATE_KINDS
from prunepath.routing.rules import CumulativeMass, Dense, Threshold, TopK

from .layout import ExpertLayout

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


# ----------------------------------------------------------------------------- kernel constants
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
class RouteResult:
    logits: torch.Tensor  # [N, E] fp32 (rounded to the model dtype, as the torch router returns)
    mask: torch.Tensor  # [N, E] bool
    gates: torch.Tensor  # [N, E] fp32, 0 where dropped
    active: torch.Tensor  # [E] int32, 1 if any token keeps the expert


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
