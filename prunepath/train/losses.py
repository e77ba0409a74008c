"""Training losses on captured router logits and model outputs (Gu, Fu, Yuan 2026), and the hooks that capture them.

Shape legend: L layers, N real (unpadded) tokens, E experts, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def routing_losses(logits: list[torch.Tensor], mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean-over-layers token entropy, mean-over-layers load balance) of logits L x [N, E]; mask [N] bool."""
    ent, lb = [], []
    for z in logits:
        if mask is not None:
            z = z[mask]  # real tokens only
        logp = F.log_softmax(z.float(), dim=-1)  # [n, E]
        p = logp.exp()
        ent.append(-(p * logp).sum(-1).mean())
        lb.append(z.shape[-1] * (p.mean(0) ** 2).sum())
    return torch.stack(ent).mean(), torch.stack(lb).mean()


def distill_loss(z: torch.Tensor, norms: torch.Tensor, kind: str = "kl", power: float = 1.0) -> torch.Tensor:
    """Router logits z [N, E] against true expert norms [N, E]."""
    norms = norms.float() ** power
    if kind == "kl":
        q = norms / norms.sum(-1, keepdim=True).clamp_min(1e-12)  # [N, E] each expert's share
        return F.kl_div(F.log_softmax(z.float(), -1), q, reduction="batchmean")
    # MoEfication: positive-activation importance divided by the max, BCE with logits
    target = norms / norms.amax().clamp_min(1e-12)
    return F.binary_cross_entropy_with_logits(z.float(), target)


def kd_loss(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) per token, averaged: student logits [N, V], teacher log-probabilities [N, V].

    The teacher is the dense model itself, so this asks the sparse model to keep the dense next-token
    distribution — all V probabilities per token, not only the one observed next token of cross-entropy.
    """
    if student_logits.shape != teacher_logp.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher {tuple(teacher_logp.shape)} differ")
    logq = F.log_softmax(student_logits.float(), dim=-1)
    return F.kl_div(logq, teacher_logp.float(), log_target=True, reduction="batchmean")


class LogitCapture:
    """Forward hooks on every `ffn.router` (and optionally the FFN input) — removed by `close()`."""

    def __init__(self, ffns, inputs: bool = False):
        self.logits: list = [None] * len(ffns)
        self.inputs: list = [None] * len(ffns)
        self.handles = []
        for i, f in enumerate(ffns):
            self.handles.append(
                f.router.register_forward_hook(lambda _m, _a, out, i=i: self.logits.__setitem__(i, out))
            )
            if inputs:
                self.handles.append(
                    f.register_forward_pre_hook(
                        lambda _m, a, i=i: self.inputs.__setitem__(i, a[0].detach().reshape(-1, a[0].shape[-1]))
                    )
                )

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles = []
