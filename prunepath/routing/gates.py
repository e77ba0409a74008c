"""Gates: the factor each kept expert's neurons are multiplied by. The one place the gate kinds are known.

Shape legend: N rows (tokens), E experts.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from prunepath.routing.rules import _check_logits, _compute_dtype

GateKind = Literal["sigmoid", "softmax", "one"]
GATE_KINDS: tuple[str, ...] = get_args(GateKind)  # ("sigmoid", "softmax", "one")


def check_gate(kind: str) -> str:
    """`kind` if it is a gate kind, else a ValueError naming the kinds."""
    if kind not in GATE_KINDS:
        raise ValueError(f"gate must be one of {', '.join(map(repr, GATE_KINDS))}, got {kind!r}")
    return kind


def gate_values(logits: Tensor, mask: Tensor, kind: GateKind = "sigmoid") -> Tensor:
    """Per-expert gate values [N, E], zero where dropped.

    "sigmoid" (the paper): sigmoid(z_e) — not renormalised, so it carries the task-loss gradient back to
    the router regardless of how many experts were kept. "softmax": p_e. "one": unit gates (with all experts
    kept this reproduces the dense FFN exactly — the exactness anchor).
    The result has the dtype of `logits` and is differentiable with respect to them.
    """
    _check_logits(logits)
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(logits.shape):
        raise ValueError(f"mask must be a bool tensor shaped like logits {tuple(logits.shape)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    if kind == "sigmoid":
        g = torch.sigmoid(logits)
    elif kind == "softmax":
        g = torch.softmax(logits.to(_compute_dtype(logits)), dim=-1).to(logits.dtype)
    elif kind == "one":
        g = torch.ones_like(logits)
    else:
        check_gate(kind)
    return torch.where(mask, g, torch.zeros((), dtype=g.dtype, device=g.device))  # [N, E]
