"""The PrunePath FFN: a pretrained feed-forward layer cut into experts and routed per token.

Shape legend: N rows (= B*T tokens), D hidden, F ffn (d_ff), E experts, G expert size (F = E*G).

A dense FFN  y = W_down · (act(W_gate x) ⊙ (W_up x))  is a sum over its F neurons. Grouping the
neurons into E experts of G neurons and multiplying expert e's neurons by a per-token gate g_e gives

    y = W_down · (g ⊗ 1_G  ⊙  act(W_gate x) ⊙ (W_up x))

which equals the dense FFN when every g_e = 1. The neurons are permuted once, at conversion, so that
expert e owns the contiguous block e*G .. (e+1)*G-1 of every weight: the layout the kernels stream.

FFNs are found in a transformers model by their structure in `prunepath.ffn.discover`.
The torch path here computes all F neurons and masks them: exact, differentiable, and the reference
for the Triton decode kernels, which read only the kept experts (see `prunepath.kernels`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from prunepath.ffn.discover import _ACT_NAMES, FFNSpec, UnsupportedFFNError, _in_out
from prunepath.routing.gates import check_gate, gate_values
from prunepath.routing.router import make_router
from prunepath.routing.rules import Rule


class PrunePathFFN(nn.Module):
    """A feed-forward layer split into E experts of G contiguous neurons, routed per token."""

    def __init__(
        self,
        spec: FFNSpec,
        module: nn.Module,
        config,
        perm: torch.Tensor,  # [F] new position i holds original neuron perm[i]
        expert_size: int,
        router: nn.Module,
        rule: Rule,
        gate: str = "sigmoid",
        out_module: nn.Module | None = None,
    ):
        super().__init__()
        check_gate(gate)
        self.kind, self.layer_idx = spec.kind, spec.layer_idx
        self.d_model, self.d_ff, self.expert_size = spec.d_model, spec.d_ff, expert_size
        self.n_experts = spec.d_ff // expert_size
        self.register_buffer("perm", perm.to(torch.long).clone(), persistent=False)
        perm = self.perm.to(module_device(module))
        kids = dict(module.named_children())
        if self.kind == "gated":
            g, u, d = (_as_linear(kids[n]) for n in spec.names)
            self.gate_proj, self.up_proj, self.down_proj = (
                _permute_in(g, perm),
                _permute_in(u, perm),
                _permute_out(d, perm),
            )
        elif self.kind == "mlp":
            self.fc_in = _permute_in(_as_linear(kids[spec.names[0]]), perm)
            self.fc_out = _permute_out(_as_linear(kids[spec.names[1]]), perm)
            self.dropout = kids.get("dropout", nn.Identity())
        else:  # "intermediate": the out projection stays in the sibling module; permute its columns there
            self.fc_in = _permute_in(_as_linear(kids[spec.names[0]]), perm)
            if out_module is None:
                raise ValueError("a BERT-style FFN needs its output projection")
            out_module.weight.data = out_module.weight.data[:, perm].contiguous()
            self._out = [out_module]  # a plain list: the sibling still owns (and registers) it
        self.act = _activation(module, config)
        self.router = router
        self.rule, self.gate = rule, gate  # set through prunepath.routing.control (set_rule, set_tau, set_gate)
        self._recorders: tuple = ()  # attached by prunepath.routing.stats.record(model) while it records
        self.fast_path = None  # installed and removed by prunepath.kernels.use_fast_paths(model, ...)

    # -- routing -----------------------------------------------------------------------------------

    def _hidden(self, x2d: torch.Tensor) -> torch.Tensor:
        """Every neuron's activation, before gating.  # [N, F]"""
        if self.kind == "gated":
            return self.act(self.gate_proj(x2d)) * self.up_proj(x2d)
        return self.act(self.fc_in(x2d))

    @property
    def _down_weight(self) -> torch.Tensor:  # [D, F]
        if self.kind == "gated":
            return self.down_proj.weight
        return self.fc_out.weight if self.kind == "mlp" else self._out[0].weight

    def expert_norms(self, x2d: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """True L2 norm of each expert's contribution to the output (the oracle's scores).  # [N, E]"""
        h = self._hidden(x2d) if h is None else h  # [N, F]
        w = self._down_weight.reshape(self.d_model, self.n_experts, self.expert_size)  # [D, E, G]
        hg = h.reshape(-1, self.n_experts, self.expert_size)  # [N, E, G]
        out = torch.empty(h.shape[0], self.n_experts, device=h.device, dtype=torch.float32)
        for s in range(0, h.shape[0], 256):  # chunks keep the [n, E, D] intermediate small
            out[s : s + 256] = torch.einsum("neg,deg->ned", hg[s : s + 256], w).float().norm(dim=-1)
        return out

    def route(self, x2d: torch.Tensor, h: torch.Tensor | None = None):
        """Routing decision for rows x2d [N, D] -> (mask [N, E] bool, gates [N, E], logits [N, E])."""
        logits = self.router(x2d)  # [N, E]
        scores = self.expert_norms(x2d, h) if self.rule.needs_scores else None
        mask = self.rule.select(logits, scores)  # [N, E]
        gates = gate_values(logits, mask, self.gate)  # [N, E]
        return mask, gates, logits

    # -- forward -------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast_path is not None and self.fast_path.accepts(x):
            return self.fast_path(x)
        shape = x.shape
        x2d = x.reshape(-1, self.d_model)  # [N, D]
        h = self._hidden(x2d)  # [N, F]
        mask, gates, _ = self.route(x2d, h)
        if self._recorders:
            self._record(mask.sum(-1))
        return self._gated_output(h, gates, shape)

    def _gated_output(self, h: torch.Tensor, gates: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The neurons h [N, F] scaled by their experts' gates [N, E], projected back to the input's shape."""
        h = h * gates.to(h.dtype).repeat_interleave(self.expert_size, dim=1)  # [N, F]
        if self.kind == "gated":
            return self.down_proj(h).reshape(shape)
        if self.kind == "mlp":
            return self.dropout(self.fc_out(h)).reshape(shape)
        return h.reshape(*shape[:-1], self.d_ff)  # BERT: the sibling output module projects back

    @property
    def recording(self) -> bool:
        """Whether a `prunepath.record(model)` block is gathering this layer's expert counts."""
        return bool(self._recorders)

    def _record(self, counts: torch.Tensor) -> None:
        """Hand one forward's experts kept per token [N] to the recorders (the torch path and the kernels)."""
        counts = counts.detach().to("cpu", torch.long)
        for rec in self._recorders:
            rec.add(self.layer_idx, counts)

    def flops_per_token(self, experts_kept: float) -> float:
        """FFN multiply-add FLOPs for one token keeping `experts_kept` experts, router included."""
        n_mats = 3 if self.kind == "gated" else 2
        return 2.0 * n_mats * self.d_model * self.expert_size * experts_kept + 2.0 * self.d_model * self.n_experts

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, d_model={self.d_model}, d_ff={self.d_ff}, experts={self.n_experts}x{self.expert_size}, "
            f"rule={self.rule.spec}, gate={self.gate}"
        )


def prunepath_ffns(model: nn.Module) -> list[PrunePathFFN]:
    """The PrunePath FFNs of `model`, in layer order (empty for a model that is not converted)."""
    return [m for m in model.modules() if isinstance(m, PrunePathFFN)]


def module_device(m: nn.Module) -> torch.device:
    return next(m.parameters()).device


def _as_linear(m: nn.Module) -> nn.Linear:
    """Copy an nn.Linear / Conv1D into a fresh nn.Linear (weight [out, in])."""
    d_in, d_out = _in_out(m)
    lin = nn.Linear(d_in, d_out, bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
    w = m.weight.detach()
    lin.weight.data.copy_(w.t() if isinstance(m, Conv1D) else w)
    if m.bias is not None:
        lin.bias.data.copy_(m.bias.detach())
    return lin


def _activation(module: nn.Module, config) -> nn.Module:
    for name in _ACT_NAMES:
        act = getattr(module, name, None)
        if act is not None and callable(act):
            return act
    name = getattr(config, "hidden_act", None) or getattr(config, "activation_function", None)
    if name is None:
        raise UnsupportedFFNError(f"cannot find the activation of {type(module).__name__}")
    return ACT2FN[name]


def _permute_in(lin: nn.Linear, perm: torch.Tensor) -> nn.Linear:
    """Reorder the output rows (neurons) of a D -> F projection."""
    lin.weight.data = lin.weight.data[perm].contiguous()
    if lin.bias is not None:
        lin.bias.data = lin.bias.data[perm].contiguous()
    return lin


def _permute_out(lin: nn.Linear, perm: torch.Tensor) -> nn.Linear:
    """Reorder the input columns (neurons) of an F -> D projection; its bias is per output, unchanged."""
    lin.weight.data = lin.weight.data[:, perm].contiguous()
    return lin


def build_ffn(model: nn.Module, spec: FFNSpec, perm, expert_size, router_kind, router_init, centroids, rule, gate):
    """Create the PrunePathFFN for one spec from the model's current module (does not install it)."""
    module = model.get_submodule(spec.path)
    out_module = model.get_submodule(spec.out_path) if spec.out_path else None
    router = make_router(router_kind, spec.d_model, spec.d_ff // expert_size, init=router_init, centroids=centroids)
    ref = next(module.parameters())
    router = router.to(device=ref.device, dtype=ref.dtype)
    return PrunePathFFN(spec, module, model.config, perm, expert_size, router, rule, gate, out_module)
