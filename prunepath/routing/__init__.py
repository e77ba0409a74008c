"""Routing: which experts each token keeps, given its router's logits (Gu, Fu, Yuan 2026).

The rules (`CumulativeMass` τ, `TopK`, `Threshold`, `Static`, `Oracle`, `Dense`) are frozen dataclasses in
`prunepath.routing.rules`; the gate kinds in `prunepath.routing.gates`; the routers in `prunepath.routing.router`;
knob calibration in `prunepath.routing.calibrate`; statistics in `prunepath.routing.stats`.
"""

from prunepath.routing.gates import GATE_KINDS, GateKind, check_gate, gate_values
from prunepath.routing.rules import (
    SPEC_FORMS,
    CumulativeMass,
    Dense,
    Oracle,
    Rule,
    Static,
    Threshold,
    TopK,
    as_rule,
    cumulative_mass_mask,
    parse_rule,
)

__all__ = [
    "GATE_KINDS",
    "SPEC_FORMS",
    "CumulativeMass",
    "Dense",
    "GateKind",
    "Oracle",
    "Rule",
    "Static",
    "Threshold",
    "TopK",
    "as_rule",
    "check_gate",
    "cumulative_mass_mask",
    "gate_values",
    "parse_rule",
]
