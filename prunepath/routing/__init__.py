"""Routing: which experts each token keeps, given its router's logits (Gu, Fu, Yuan 2026).

The rules (`CumulativeMass` τ, `TopK`, `Threshold`, `Static`, `Oracle`, `Dense`) are frozen dataclasses in
`prunepath.routing.rules`; the gate kinds in `prunepath.routing.gates`; setting a model's routing in
`prunepath.routing.control`; recording it in `prunepath.routing.stats`; the routers in `prunepath.routing.router`;
knob calibration in `prunepath.routing.calibrate`.

This face hands on the rules and gates only: the modules that act on a whole model (`control`, `stats`,
`calibrate`) import the FFN module, which imports the rules, so they are reached by their own names or
through `prunepath` (`prunepath.set_tau`, `prunepath.record`).
"""

from prunepath.routing.gates import GATE_KINDS, GateKind, check_gate, gate_values
from prunepath.routing.rules import (
    RULE_TYPES,
    SPEC_FORMS,
    CumulativeMass,
    Dense,
    Oracle,
    Rule,
    Static,
    Threshold,
    TopK,
    check_rule,
    cumulative_mass_mask,
    parse_rule,
)

__all__ = [
    "GATE_KINDS",
    "RULE_TYPES",
    "SPEC_FORMS",
    "CumulativeMass",
    "Dense",
    "GateKind",
    "Oracle",
    "Rule",
    "Static",
    "Threshold",
    "TopK",
    "check_gate",
    "check_rule",
    "cumulative_mass_mask",
    "gate_values",
    "parse_rule",
]
