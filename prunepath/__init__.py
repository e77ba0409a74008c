"""PrunePath: token-adaptive structured sparsity for the FFNs of pretrained language models (Gu, Fu, Yuan 2026).

Each FFN is split into experts of 32 neurons, a small router gives each token a softmax over its layer's
experts, and the token keeps its most probable experts until their cumulative mass reaches τ, the
inference-time sparsity knob of one checkpoint.

    import prunepath
    model, tok = prunepath.load("default")          # SmolLM2-135M-Instruct with trained routers
    prunepath.set_tau(model, 0.7)                   # or set_rule(model, prunepath.TopK(8)), set_active_fraction
    with prunepath.record(model) as rec:
        model(**tok("Hello", return_tensors="pt"))
    print(rec.stats().summary())

Convert any supported model yourself with `prunepath.moefy(model, MoefyConfig(...))`.
"""

from prunepath.checkpoint import load, read_meta, save
from prunepath.convert import MoefyConfig, moefy
from prunepath.errors import CheckpointError
from prunepath.ffn.discover import UnsupportedFFNError, find_ffns
from prunepath.ffn.module import PrunePathFFN, prunepath_ffns
from prunepath.models import DEFAULT_MODEL, load_model
from prunepath.routing.control import (
    routing_kept,
    rule_spec,
    set_active_fraction,
    set_gate,
    set_rule,
    set_tau,
)
from prunepath.routing.rules import CumulativeMass, Dense, Oracle, Static, Threshold, TopK
from prunepath.routing.stats import RoutingStats, record

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "CheckpointError",
    "CumulativeMass",
    "Dense",
    "MoefyConfig",
    "Oracle",
    "PrunePathFFN",
    "RoutingStats",
    "Static",
    "Threshold",
    "TopK",
    "UnsupportedFFNError",
    "find_ffns",
    "load",
    "load_model",
    "moefy",
    "prunepath_ffns",
    "read_meta",
    "record",
    "routing_kept",
    "rule_spec",
    "save",
    "set_active_fraction",
    "set_gate",
    "set_rule",
    "set_tau",
]
