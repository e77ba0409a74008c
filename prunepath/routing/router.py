"""Routers: a small network per FFN that scores its E experts for each token.

The router reads the FFN input x (after the pre-FFN norm) and returns logits z [..., E]; `routing.rules` turns
p = softmax(z) into the set of kept experts and sigmoid(z) into their gates (Gu, Fu, Yuan 2026).

- LinearRouter: z = W x, W [E, D], no bias — the authors' router. Zero-initialised as in the paper
  (p uniform, gates sigmoid(0) = 0.5 until trained), or initialised from the experts' cluster centres so
  that an *untrained* router already ranks experts by how strongly their neurons respond to x.
- MLPRouter: MoEfication's Linear(D, E) -> tanh -> Linear(E, E), first layer from the centres, second the
  identity, so at initialisation it is tanh of the centroid router.

Shape legend: N rows (= B*T tokens), D hidden, E experts.
"""

from __future__ import annotations

import operator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RouterKind = Literal["linear", "mlp"]
RouterInit = Literal["zero", "centroid"]
_NEEDS_CENTROIDS = "init='centroid' needs centroids [E, D] (Split.centroids); or use init='zero'"


def centroid_weight(centroids: Tensor, d_model: int, n_experts: int) -> Tensor:
    """Router weight [E, D] from expert centroids [E, D] (mean of each expert's L2-normalised keys).

    Why centroids rank experts: neuron i's pre-activation is w_i·x, so the mean pre-activation of expert e
    is proportional to c_e·x when c_e is the mean of its (normalised) key rows. An expert whose neurons
    point the way x points will fire; one pointing away will not.

    Why this scaling: a single global factor, so that the *mean* row norm is 1. Per-row normalisation
    would throw away useful information — a tight cluster (members agree, |c_e| near 1) predicts its
    neurons' response more reliably than a diffuse one (|c_e| small), and the raw dot product already
    weighs that. The global factor only sets the softmax temperature: with unit-norm rows and an input
    of RMS ~1 per coordinate (the output of a pre-FFN RMSNorm before its learned gain), logits have a
    standard deviation of about 1, which for E = 48 gives a distribution that is informative but not
    one-hot, so cumulative mass τ = 0.5..0.9 keeps a sensible fraction of experts before any training
    (Gu, Fu, Yuan 2026: std 1 keeps about a third at E = 192, τ = 0.7).
    """
    if not isinstance(centroids, Tensor) or tuple(centroids.shape) != (n_experts, d_model):
        got = tuple(centroids.shape) if isinstance(centroids, Tensor) else type(centroids).__name__
        raise ValueError(f"centroids must be a tensor [E={n_experts}, D={d_model}], got {got}; "
                         "pass Split.centroids from prunepath.ffn.split.split_neurons")
    c = centroids.detach().float()
    if not torch.isfinite(c).all():
        raise ValueError("centroids contain NaN or inf")
    mean_norm = c.norm(dim=-1).mean()
    if mean_norm <= 0:
        raise ValueError("centroids are all zero; cannot initialise a router from them (use init='zero')")
    return c / mean_norm  # [E, D]


class LinearRouter(nn.Module):
    """logits = x W^T with W [E, D], no bias (the kernels read `.weight` directly)."""

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        init: RouterInit = "zero",
        centroids: Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_sizes(d_model, n_experts)
        self.d_model, self.n_experts, self.init = int(d_model), int(n_experts), init
        self.weight = nn.Parameter(torch.zeros(n_experts, d_model, device=device, dtype=dtype))  # [E, D]
        if init == "centroid":
            if centroids is None:
                raise ValueError(_NEEDS_CENTROIDS)
            with torch.no_grad():
                self.weight.copy_(centroid_weight(centroids, d_model, n_experts))
        elif init != "zero":
            raise ValueError(f"router init must be 'zero' or 'centroid', got {init!r}")

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)  # [..., E]

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_experts={self.n_experts}, init={self.init!r}"


class MLPRouter(nn.Module):
    """MoEfication's router: Linear(D, E) -> tanh -> Linear(E, E).

    With centroids, the first layer is the centroid router (same scaling as LinearRouter) and the second
    the identity, so before training logits = tanh(centroid logits): the same ranking, squashed into
    (-1, 1) — a flat softmax, which suits MoEfication's top-k but makes cumulative mass keep many experts
    until the router is trained. Without centroids the first layer starts at zero (uniform p, as the
    paper's linear router); gradients still flow because the second layer is the identity. Biases start
    at zero.
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        centroids: Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_sizes(d_model, n_experts)
        self.d_model, self.n_experts = int(d_model), int(n_experts)
        self.fc1 = nn.Linear(d_model, n_experts, device=device, dtype=dtype)  # [E, D]
        self.fc2 = nn.Linear(n_experts, n_experts, device=device, dtype=dtype)  # [E, E]
        with torch.no_grad():
            if centroids is not None:
                self.fc1.weight.copy_(centroid_weight(centroids, d_model, n_experts))
            else:
                self.fc1.weight.zero_()
            self.fc1.bias.zero_()
            self.fc2.weight.copy_(torch.eye(n_experts))
            self.fc2.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))  # [..., E]

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_experts={self.n_experts}"


def make_router(
    kind: RouterKind,
    d_model: int,
    n_experts: int,
    init: RouterInit = "zero",
    centroids: Tensor | None = None,
) -> nn.Module:
    """Build a router by name. init='zero' ignores centroids; init='centroid' requires them."""
    if init not in ("zero", "centroid"):
        raise ValueError(f"router init must be 'zero' or 'centroid', got {init!r}")
    if init == "centroid" and centroids is None:
        raise ValueError(_NEEDS_CENTROIDS)
    if kind == "linear":
        return LinearRouter(d_model, n_experts, init=init, centroids=centroids)
    if kind == "mlp":
        return MLPRouter(d_model, n_experts, centroids=centroids if init == "centroid" else None)
    raise ValueError(f"router kind must be 'linear' or 'mlp', got {kind!r}")


def _check_sizes(d_model: int, n_experts: int) -> None:
    for name, v in (("d_model", d_model), ("n_experts", n_experts)):
        try:
            ok = not isinstance(v, bool) and operator.index(v) >= 1
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
