"""What the routers did: experts kept per token and layer, active fraction and FFN FLOPs.

Shape legend: L layers, N tokens, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class RoutingStats:
    """What the routers did over the recorded forwards."""

    counts: torch.Tensor  # [L, N] experts kept per token per layer
    n_experts: tuple[int, ...]  # E per layer
    flops_per_token: float  # mean FFN FLOPs per token, routers included, all layers
    dense_flops_per_token: float  # the same for the dense FFNs
    extra: dict = field(default_factory=dict)

    @property
    def mean_experts(self) -> float:
        return float(self.counts.float().mean())

    @property
    def active_fraction(self) -> float:
        """Mean fraction of FFN neurons active per token, over layers and tokens."""
        e = torch.tensor(self.n_experts, dtype=torch.float32)[:, None]  # [L, 1]
        return float((self.counts.float() / e).mean())

    def per_layer_fraction(self) -> list[float]:
        e = torch.tensor(self.n_experts, dtype=torch.float32)
        return (self.counts.float().mean(1) / e).tolist()

    def summary(self) -> dict:
        return {
            "tokens": int(self.counts.shape[1]),
            "mean_experts_kept": self.mean_experts,
            "active_fraction": self.active_fraction,
            "ffn_flops_per_token": self.flops_per_token,
            "dense_ffn_flops_per_token": self.dense_flops_per_token,
            "experts_kept_min": int(self.counts.min()) if self.counts.numel() else 0,
            "experts_kept_max": int(self.counts.max()) if self.counts.numel() else 0,
        }
