"""PrunePath: token-adaptive structured sparsity for the FFNs of pretrained language models.

    import prunepath
    model, tok = prunepath.load("default")          # SmolLM2-135M-Instruct with trained routers
    model.set_tau(0.7)                              # the inference-time sparsity knob
    model.record_stats(); model(**tok("Hello", return_tensors="pt"))
    print(model.routing_stats().summary())

Convert any supported model yourself with `prunepath.moefy(model, MoefyConfig(...))`.
"""

from prunepath.checkpoint import load, read_meta, save
from prunepath.convert import MoefyConfig, moefy
from prunepath.errors import CheckpointError
from prunepath.ffn.discover import UnsupportedFFNError, find_ffns
from prunepath.ffn.module import PrunePathFFN
from prunepath.models import DEFAULT_MODEL, load_model
from prunepath.routing.stats import RoutingStats

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "CheckpointError",
    "MoefyConfig",
    "PrunePathFFN",
    "RoutingStats",
    "UnsupportedFFNError",
    "find_ffns",
    "load",
    "load_model",
    "moefy",
    "read_meta",
    "save",
]
