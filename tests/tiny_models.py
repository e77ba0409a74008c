"""Tiny random models shared by the CPU decode tests (imported by them; not a test module)."""

from __future__ import annotations

import copy

import torch

from prunepath import MoefyConfig, moefy, routing
from prunepath.ffn.module import prunepath_ffns


def with_qkv_biases(model):
    """`model` (a Qwen2, whose q/k/v projections have biases) with those biases drawn from N(0, 0.5²)."""
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                lin.bias.normal_(0, 0.5)
    return model


def peaked_prunepath(model, rule: str, gate: str = "one"):
    """A PrunePath copy of `model` (random split, `rule`, `gate`) whose routers are redrawn from N(0, 1), seed 1:
    peaked, so that the rule really drops experts."""
    model = copy.deepcopy(model)
    moefy(model, MoefyConfig(split="random", router_init="centroid", rule=routing.parse_rule(rule), gate=gate),
          progress=False)
    torch.manual_seed(1)
    for f in prunepath_ffns(model):
        f.router.weight.data.normal_(0, 1.0)
    return model
