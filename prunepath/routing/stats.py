"""What the routers did: experts kept per token and layer, active fraction and FFN FLOPs.

    with prunepath.record(model) as rec:
        model(**batch)
    print(rec.stats().summary())

`record(model)` is the one way routing statistics are gathered: the FFNs hand each forward's experts kept per
token to the recorders attached for the block (the torch path and the decode kernels alike), and nothing is
left on the model once the block ends.

Shape legend: L layers, N tokens, E experts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from prunepath.ffn.module import PrunePathFFN, prunepath_ffns


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


class Recorder:
    """Experts kept per token in every layer, over the forwards of one `record(model)` block."""

    def __init__(self, ffns: list[PrunePathFFN]):
        self.ffns = list(ffns)
        self._position = {f.layer_idx: i for i, f in enumerate(self.ffns)}
        self.counts: list[list[torch.Tensor]] = [[] for _ in self.ffns]  # L x forwards x [N]

    def add(self, layer_idx: int, counts: torch.Tensor) -> None:
        """One forward of layer `layer_idx` (its FFN's layer index): experts kept per token [N]."""
        self.counts[self._position[layer_idx]].append(counts)

    @property
    def tokens(self) -> int:
        """Rows recorded so far (in the first layer)."""
        return sum(c.numel() for c in self.counts[0]) if self.counts else 0

    def clear(self) -> None:
        self.counts = [[] for _ in self.ffns]

    def take_last(self) -> list[torch.Tensor] | None:
        """Remove the last recorded forward from every layer and return it (L x [N]); None if there is none."""
        if not self.counts or not all(self.counts):
            return None
        return [c.pop() for c in self.counts]

    def add_repeated(self, counts: list[torch.Tensor], times: int) -> None:
        """Count one forward (`counts`, L x [N], from `take_last`) `times` times over."""
        for c, k in zip(self.counts, counts):
            c.append(k.repeat(times))

    def stats(self, token_mask: torch.Tensor | None = None) -> RoutingStats:
        """Statistics over every recorded forward; `token_mask` [N] drops padding rows."""
        if not self.counts or not self.counts[0]:
            raise RuntimeError("no routing recorded: run a forward inside `with prunepath.record(model) as rec:`")
        counts = torch.stack([torch.cat(c) for c in self.counts])  # [L, N]
        if token_mask is not None:
            counts = counts[:, token_mask.reshape(-1).bool().cpu()]
        kept = counts.float().mean(1)  # [L]
        flops = sum(f.flops_per_token(float(k)) for f, k in zip(self.ffns, kept))
        dense = sum(f.flops_per_token(f.n_experts) - 2.0 * f.d_model * f.n_experts for f in self.ffns)
        return RoutingStats(counts, tuple(f.n_experts for f in self.ffns), flops, dense)


@contextmanager
def record(model) -> Iterator[Recorder]:
    """`with record(model) as rec: <forwards>`, then `rec.stats()`: the routing of the block's forwards.

    Blocks may nest (each recorder sees the forwards of its own block). Raises ValueError for a model
    without PrunePath FFNs.
    """
    ffns = prunepath_ffns(model)
    if not ffns:
        raise ValueError("this model has no PrunePath FFNs to record: convert it with prunepath.moefy(model)")
    rec = Recorder(ffns)
    for f in ffns:
        f._recorders = (*f._recorders, rec)
    try:
        yield rec
    finally:
        for f in ffns:
            f._recorders = tuple(r for r in f._recorders if r is not rec)
