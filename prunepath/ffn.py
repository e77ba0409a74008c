"""The PrunePath FFN: a pretrained feed-forward layer cut into experts and routed per token.

Shape legend: N rows (= B*T tokens), D hidden, F ffn (d_ff), E experts, G expert size (F = E*G).

A dense FFN  y = W_down · (act(W_gate x) ⊙ (W_up x))  is a sum over its F neurons. Grouping the
neurons into E experts of G neurons and multiplying expert e's neurons by a per-token gate g_e gives

    y = W_down · (g ⊗ 1_G  ⊙  act(W_gate x) ⊙ (W_up x))

which equals the dense FFN when every g_e = 1. The neurons are permuted once, at conversion, so that
expert e owns the contiguous block e*G .. (e+1)*G-1 of every weight: the layout the kernels stream.

This module also finds FFNs in a transformers model by their structure (`find_ffns`).
The torch path here computes all F neurons and masks them: exact, differentiable, and the reference
for the Triton decode kernels, which read only the kept experts (see `prunepath.kernels`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from prunepath import routing
from prunepath.router import make_router


class UnsupportedFFNError(ValueError):
    """The model has a feed-forward block PrunePath does not know how to split."""


# Child-name triples (gate, up, down) of gated FFNs: Llama, Qwen2, Mistral, Gemma, Phi-3-small ...
# (gate_proj/up_proj/down_proj), Mixtral-style experts and some ports (w1/w3/w2).
_GATED_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
# Two-layer FFNs that live in one module: GPT-2 (c_fc/c_proj), OPT-style blocks (fc1/fc2), GPT-J (fc_in/fc_out).
_TWO_LAYER_NAMES = (("c_fc", "c_proj"), ("fc1", "fc2"), ("fc_in", "fc_out"), ("dense_h_to_4h", "dense_4h_to_h"))
_ACT_NAMES = ("act_fn", "act", "activation_fn", "intermediate_act_fn", "activation")


@dataclass(frozen=True)
class FFNSpec:
    """Where one FFN lives in a model and how its weights are named."""

    layer_idx: int
    path: str  # dotted module path of the module PrunePath replaces
    kind: str  # "gated" | "mlp" (in/out in one module) | "intermediate" (BERT: in here, out in a sibling)
    names: tuple[str, ...]  # child names: (gate, up, down) | (in, out) | (in,)
    d_model: int
    d_ff: int
    out_path: str | None = None  # BERT: the sibling module holding the out projection


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, Conv1D))


def _in_out(m: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a GPT-2 Conv1D (whose weight is [in, out])."""
    if isinstance(m, Conv1D):
        return m.weight.shape[0], m.weight.shape[1]
    return m.in_features, m.out_features


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


def _layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of transformer blocks: the ModuleList with num_hidden_layers entries."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == n and n > 0:
            return name, m
    raise UnsupportedFFNError(f"{type(model).__name__}: no stack of {n} transformer blocks found")


def _match(block: nn.Module, prefix: str, layer_idx: int, d_model: int) -> FFNSpec | None:
    """Find the FFN inside one transformer block by the shapes of its linear children."""
    for path, m in block.named_modules():
        full = f"{prefix}.{path}" if path else prefix
        kids = dict(m.named_children())
        for gate, up, down in _GATED_NAMES:
            if all(k in kids and _is_linear(kids[k]) for k in (gate, up, down)):
                d_in, d_ff = _in_out(kids[gate])
                if (
                    d_in == d_model
                    and _in_out(kids[up]) == (d_model, d_ff)
                    and _in_out(kids[down])
                    == (
                        d_ff,
                        d_model,
                    )
                ):
                    return FFNSpec(layer_idx, full, "gated", (gate, up, down), d_model, d_ff)
        for fin, fout in _TWO_LAYER_NAMES:
            if fin in kids and fout in kids and _is_linear(kids[fin]) and _is_linear(kids[fout]):
                d_in, d_ff = _in_out(kids[fin])
                if d_in == d_model and _in_out(kids[fout]) == (d_ff, d_model):
                    return FFNSpec(layer_idx, full, "mlp", (fin, fout), d_model, d_ff)
    # BERT-style: `intermediate.dense` (D -> F, then act) and a sibling `output.dense` (F -> D).
    inter, out = getattr(block, "intermediate", None), getattr(block, "output", None)
    if inter is not None and out is not None and _is_linear(getattr(inter, "dense", None) or nn.Identity()):
        d_in, d_ff = _in_out(inter.dense)
        if d_in == d_model and _is_linear(getattr(out, "dense", None) or nn.Identity()):
            if _in_out(out.dense) == (d_ff, d_model):
                return FFNSpec(
                    layer_idx,
                    f"{prefix}.intermediate",
                    "intermediate",
                    ("dense",),
                    d_model,
                    d_ff,
                    out_path=f"{prefix}.output.dense",
                )
    return None


def find_ffns(model: nn.Module) -> list[FFNSpec]:
    """Every transformer block's FFN, found by structure; raises UnsupportedFFNError naming the block."""
    if any(isinstance(m, PrunePathFFN) for m in model.modules()):
        raise ValueError("this model is already converted by PrunePath; load the base model to convert again")
    d_model = model.config.hidden_size
    prefix, layers = _layers(model)
    specs = []
    for i, block in enumerate(layers):
        spec = _match(block, f"{prefix}.{i}", i, d_model)
        if spec is None:
            kids = ", ".join(f"{n} ({type(c).__name__})" for n, c in block.named_children())
            raise UnsupportedFFNError(
                f"unsupported FFN in {prefix}.{i} ({type(block).__name__}): expected gate/up/down linears "
                f"(Llama, Qwen2, Mistral, Gemma) or a two-layer in/out FFN (GPT-2, BERT); its children are: {kids}"
            )
        specs.append(spec)
    return specs


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
        rule: routing.Rule,
        gate: str = "sigmoid",
        out_module: nn.Module | None = None,
    ):
        super().__init__()
        if gate not in ("sigmoid", "softmax", "one"):
            raise ValueError(f"gate must be 'sigmoid', 'softmax' or 'one', got {gate!r}")
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
        self.rule, self.gate = rule, gate
        self.record = False
        self.last_counts: torch.Tensor | None = None  # [N] experts kept per token, last forward
        self.history: list[torch.Tensor] = []  # every recorded forward since the last reset
        self.fast_path = None  # set by prunepath.kernels for GPU decode

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
        gates = routing.gate_values(logits, mask, self.gate)  # [N, E]
        return mask, gates, logits

    # -- forward -------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast_path is not None and self.fast_path.accepts(x):
            return self.fast_path(x)
        shape = x.shape
        x2d = x.reshape(-1, self.d_model)  # [N, D]
        h = self._hidden(x2d)  # [N, F]
        mask, gates, _ = self.route(x2d, h)
        if self.record:
            self._record(mask.sum(-1))
        g = gates.to(h.dtype).repeat_interleave(self.expert_size, dim=1)  # [N, F]
        h = h * g
        if self.kind == "gated":
            return self.down_proj(h).reshape(shape)
        if self.kind == "mlp":
            return self.dropout(self.fc_out(h)).reshape(shape)
        return h.reshape(*shape[:-1], self.d_ff)  # BERT: the sibling output module projects back

    def _record(self, counts: torch.Tensor) -> None:
        self.last_counts = counts.detach().to("cpu", torch.long)
        self.history.append(self.last_counts)

    def flops_per_token(self, experts_kept: float) -> float:
        """FFN multiply-add FLOPs for one token keeping `experts_kept` experts, router included."""
        n_mats = 3 if self.kind == "gated" else 2
        return 2.0 * n_mats * self.d_model * self.expert_size * experts_kept + 2.0 * self.d_model * self.n_experts

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, d_model={self.d_model}, d_ff={self.d_ff}, experts={self.n_experts}x{self.expert_size}, "
            f"rule={self.rule.spec}, gate={self.gate}"
        )


def module_device(m: nn.Module) -> torch.device:
    return next(m.parameters()).device


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
