"""Finding the FFNs of a transformers model by their structure (Llama-style gated, GPT-2/OPT two-layer, BERT).

Shape legend: D hidden, F ffn (d_ff).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D


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
    """Every transformer block's FFN, found by structure (on a model not yet converted).

    Raises UnsupportedFFNError naming the block it cannot read.
    """
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
