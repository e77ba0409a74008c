"""Selection rules: which experts each token keeps, given its router logits.

This is the heart of PrunePath (Gu, Fu, Yuan 2026). A router turns a token into logits z over the E experts of
one FFN; p = softmax(z); a *rule* turns (z, p) into a boolean mask of kept experts. The cumulative-mass
rule keeps the most probable experts until their mass reaches τ, so a token with a peaked distribution
gets few experts and an uncertain token gets many — one checkpoint, one knob τ at inference time.

Every rule here is a frozen dataclass with the same interface:

    rule.select(logits [N, E], scores [N, E] | None = None) -> BoolTensor [N, E]
    rule.spec          -> "mass:0.9"   (parse_rule(rule.spec) == rule)
    rule.needs_scores  -> True only for the oracle (scores = true expert output norms)

Invariant shared by all rules: every token keeps at least one expert (its top-1). A token with no FFN at
all is a degenerate case that the kernels and statistics need not handle, and it keeps the comparison
between rules fair ([ours] for the sigmoid threshold; the paper states it for cumulative mass).

All functions are pure tensor code: no nn.Module, no Python loop over tokens, any leading batch shape
([..., E] works wherever [N, E] is written). The cumulative sums run in fp32 even for bf16/fp16 logits,
because a bf16 cumsum of 192 probabilities drifts by more than the gaps the rule compares.

Shape legend: N rows (= B*T tokens), E experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

# ----------------------------------------------------------------------------------------------------------
# validation helpers: every error says what was wrong and what would be valid


def _check_tau(tau: float, what: str = "tau") -> float:
    try:
        tau = float(tau)
    except (TypeError, ValueError):
        tau = math.nan
    if math.isnan(tau) or tau <= 0:
        raise ValueError(
            f"{what} must be a number > 0 (a cumulative probability budget; values > 1 keep every expert), "
            f"got {tau}"
        )
    return tau


def _check_logits(logits: Tensor, name: str = "logits") -> None:
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor [N, E], got {type(logits).__name__}"
                         + (f" of dtype {logits.dtype}" if isinstance(logits, Tensor) else ""))
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [N, E] with E >= 1 experts, got {tuple(logits.shape)}")
    if _can_sync(logits) and torch.isnan(logits).any():
        raise ValueError(f"{name} contain NaN; check the router weights and the FFN input for overflow")


def _can_sync(t: Tensor) -> bool:
    """Whether a data-dependent check (a host sync) is allowed: not while torch.compile traces, nor while
    a CUDA graph is being captured (the decode loop captures the one-token step)."""
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _compute_dtype(t: Tensor) -> torch.dtype:
    # fp32 for half types, fp64 stays fp64
    return torch.promote_types(t.dtype, torch.float32)


def _keep_top1(mask: Tensor, logits: Tensor) -> Tensor:
    """Force each row's argmax expert into the mask (the shared 'at least one expert' invariant)."""
    top1 = logits.argmax(dim=-1, keepdim=True)  # [N, 1]
    return mask.scatter(-1, top1, True)


# ----------------------------------------------------------------------------------------------------------
# the reference rule (the kernels test against this function)


def cumulative_mass_mask(probs: Tensor, tau: float, inclusive: bool = False) -> Tensor:
    """Keep the most probable experts until their cumulative mass reaches τ.

    probs [N, E] are per-row distributions (softmax of the router logits). Sorted descending,
    p(1) >= p(2) >= ..., the exclusive rule (the authors' code) keeps e(i) while p(1)+...+p(i) < τ;
    the inclusive rule (nucleus / top-p routing) also keeps the expert whose mass crosses τ.
    The top-1 expert is always kept; τ > 1 keeps every expert. Returns BoolTensor [N, E].
    """
    tau = _check_tau(tau)
    _check_logits(probs, "probs")
    if tau > 1:
        # Explicit rather than left to rounding: a cumsum that ends at 1.0000001 must not drop the
        # last expert in the dense stage of training (τ = 1.05).
        return torch.ones(probs.shape, dtype=torch.bool, device=probs.device)
    p = probs.to(_compute_dtype(probs))
    sorted_p, order = p.sort(dim=-1, descending=True, stable=True)  # [N, E] each
    csum = sorted_p.cumsum(dim=-1)  # [N, E] mass up to and including rank i
    if inclusive:
        # keep rank i while the mass *before* it is < τ: that is the exclusive set plus the crossing expert
        before = torch.cat([torch.zeros_like(csum[..., :1]), csum[..., :-1]], dim=-1)
        keep_sorted = before < tau
    else:
        keep_sorted = csum < tau
    keep_sorted[..., 0] = True  # top-1 always kept, even when p(1) >= τ
    # back from sorted order to expert order
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


# ----------------------------------------------------------------------------------------------------------
# the rules


@dataclass(frozen=True)
class CumulativeMass:
    """PrunePath: keep experts in order of softmax probability until the mass reaches τ."""

    tau: float
    inclusive: bool = False
    needs_scores: ClassVar[bool] = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "tau", _check_tau(self.tau))
        object.__setattr__(self, "inclusive", bool(self.inclusive))

    def select(self, logits: Tensor, scores: Tensor | None = None) -> Tensor:
        _check_logits(logits)
        probs = torch.softmax(logits.to(_compute_dtype(logits)), dim=-1)  # [N, E]
        return cumulative_mass_mask(probs, self.tau, self.inclusive)

    @property
    def spec(self) -> str:
        return f"{'mass-incl' if self.inclusive else 'mass'}:{self.tau!r}"


@dataclass(frozen=True)
class TopK:
    """MoEfication: a fixed number k of experts per token (the k largest logits)."""

    k: int
    needs_scores: ClassVar[bool] = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", _check_k(self.k))

    def select(self, logits: Tensor, scores: Tensor | None = None) -> Tensor:
        _check_logits(logits)
        return _topk_mask(logits, self.k)

    @property
    def spec(self) -> str:
        return f"topk:{self.k}"


@dataclass(frozen=True)
class Threshold:
    """Independent expert-wise thresholds (the baseline the cumulative rule replaces).

    score="sigmoid": keep e if sigmoid(z_e) > t, with t in (0, 1).
    score="relative": D2DMoE's rule, keep e if p_e >= (1 - t) * max_e' p_e', with t in [0, 1]
    (t = 0 keeps only the maximum, t = 1 keeps everything).
    """

    t: float
    score: Literal["sigmoid", "relative"] = "sigmoid"
    needs_scores: ClassVar[bool] = False

    def __post_init__(self) -> None:
        t = float(self.t)
        if self.score == "sigmoid":
            if not 0 < t < 1:
                raise ValueError(f"sigmoid threshold t must lie in (0, 1), got {self.t}")
        elif self.score == "relative":
            if not 0 <= t <= 1:
                raise ValueError(
                    f"relative threshold t must lie in [0, 1] (keep p >= (1-t)·max p), got {self.t}"
                )
        else:
            raise ValueError(f"threshold score must be 'sigmoid' or 'relative', got {self.score!r}")
        object.__setattr__(self, "t", t)

    def select(self, logits: Tensor, scores: Tensor | None = None) -> Tensor:
        _check_logits(logits)
        z = logits.to(_compute_dtype(logits))
        if self.score == "sigmoid":
            mask = torch.sigmoid(z) > self.t  # [N, E]
        else:
            # p_e / max p = exp(z_e - max z): no softmax normaliser needed, and no underflow of p_max
            rel = torch.exp(z - z.amax(dim=-1, keepdim=True))  # [N, E] in (0, 1]
            mask = rel >= 1 - self.t
        return _keep_top1(mask, z)

    @property
    def spec(self) -> str:
        return f"{'threshold' if self.score == 'sigmoid' else 'relthreshold'}:{self.t!r}"


@dataclass(frozen=True)
class Static:
    """The same experts for every token (static expert pruning on the same clusters)."""

    experts: tuple[int, ...]
    needs_scores: ClassVar[bool] = False

    def __post_init__(self) -> None:
        try:
            experts = tuple(sorted({int(e) for e in self.experts}))
        except (TypeError, ValueError):
            raise ValueError(f"static experts must be integers, got {self.experts!r}") from None
        if not experts:
            raise ValueError(
                "static rule needs at least one expert index, e.g. Static((0, 3, 7)) or 'static:0,3,7'"
            )
        if experts[0] < 0:
            raise ValueError(f"static expert indices must be >= 0, got {experts[0]}")
        object.__setattr__(self, "experts", experts)

    def select(self, logits: Tensor, scores: Tensor | None = None) -> Tensor:
        _check_logits(logits)
        n_experts = logits.shape[-1]
        if self.experts[-1] >= n_experts:
            raise ValueError(
                f"static expert {self.experts[-1]} is out of range for a layer with E={n_experts} experts; "
                f"valid indices are 0..{n_experts - 1}"
            )
        keep = torch.zeros(n_experts, dtype=torch.bool, device=logits.device)
        keep[list(self.experts)] = True
        return keep.expand(logits.shape).clone()

    @property
    def spec(self) -> str:
        return "static:" + ",".join(str(e) for e in self.experts)


@dataclass(frozen=True)
class Oracle:
    """Ground truth: rank experts by their true output norms (an upper bound, no speed-up).

    Give exactly one of tau (norms normalised to a distribution, then the exclusive cumulative-mass rule)
    or k (top-k by norm). `scores` [N, E] are the norms, e.g. PrunePathFFN.expert_norms(x).
    """

    tau: float | None = None
    k: int | None = None
    needs_scores: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if (self.tau is None) == (self.k is None):
            raise ValueError(f"Oracle needs exactly one of tau or k, got tau={self.tau}, k={self.k}")
        if self.tau is not None:
            object.__setattr__(self, "tau", _check_tau(self.tau))
        else:
            object.__setattr__(self, "k", _check_k(self.k))

    def select(self, logits: Tensor, scores: Tensor | None = None) -> Tensor:
        if scores is None:
            raise ValueError("the oracle rule needs scores [N, E] (true expert output norms, "
                             "PrunePathFFN.expert_norms); got scores=None")
        _check_logits(scores, "scores")
        if logits is not None and tuple(logits.shape) != tuple(scores.shape):
            raise ValueError(
                f"scores shape {tuple(scores.shape)} does not match logits {tuple(logits.shape)}"
            )
        if _can_sync(scores) and (scores < 0).any():
            raise ValueError("oracle scores must be non-negative (expert output norms)")
        s = scores.to(_compute_dtype(scores))
        if self.k is not None:
            return _topk_mask(s, self.k)
        total = s.sum(dim=-1, keepdim=True)  # [N, 1]
        # A row whose experts all output exactly zero: nothing to keep, but the top-1 invariant holds,
        # so give it a point mass (keeps one expert) instead of 0/0.
        point = torch.zeros_like(s)
        point[..., 0] = 1
        probs = torch.where(total > 0, s / total.clamp_min(torch.finfo(s.dtype).tiny), point)  # [N, E]
        return cumulative_mass_mask(probs, self.tau)

    @property
    def spec(self) -> str:
        return f"oracle-mass:{self.tau!r}" if self.tau is not None else f"oracle-topk:{self.k}"


@dataclass(frozen=True)
class Dense:
    """Every expert, every token: the dense FFN (with gates, the stage-1 training setting)."""

    needs_scores: ClassVar[bool] = False

    def select(self, logits: Tensor, scores: Tensor | None = None) -> Tensor:
        _check_logits(logits)
        return torch.ones(logits.shape, dtype=torch.bool, device=logits.device)

    @property
    def spec(self) -> str:
        return "dense"


Rule = CumulativeMass | TopK | Threshold | Static | Oracle | Dense
RULE_TYPES = (CumulativeMass, TopK, Threshold, Static, Oracle, Dense)


def _check_k(k: int) -> int:
    try:
        ok = not isinstance(k, bool) and float(k).is_integer() and int(k) >= 1
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise ValueError(f"k must be a positive integer number of experts, got {k!r}")
    return int(k)


def _topk_mask(values: Tensor, k: int) -> Tensor:
    n_experts = values.shape[-1]
    if k > n_experts:
        raise ValueError(f"k={k} exceeds the number of experts E={n_experts}; use 1 <= k <= {n_experts}")
    idx = values.topk(k, dim=-1).indices  # [N, k]
    return torch.zeros(values.shape, dtype=torch.bool, device=values.device).scatter(-1, idx, True)


# ----------------------------------------------------------------------------------------------------------
# specs: "mass:0.9" <-> CumulativeMass(0.9)

SPEC_FORMS = ("mass:TAU", "mass-incl:TAU", "topk:K", "threshold:T", "relthreshold:T", "static:I,J,...",
              "oracle-mass:TAU", "oracle-topk:K", "dense")


def parse_rule(spec: str) -> Rule:
    """Parse a rule spec such as "mass:0.9"; `parse_rule(rule.spec) == rule` for every rule."""
    if not isinstance(spec, str):
        raise ValueError(f"rule spec must be a string like 'mass:0.9', got {type(spec).__name__}")
    text = spec.strip().lower()
    name, _, arg = text.partition(":")
    name, arg = name.strip(), arg.strip()
    if name == "dense" and not arg:
        return Dense()
    if name not in _PARSERS or not arg:
        raise ValueError(f"unknown routing rule {spec!r}; valid forms: {', '.join(SPEC_FORMS)}")
    try:
        return _PARSERS[name](arg)
    except ValueError as err:
        raise ValueError(f"bad routing rule {spec!r}: {err}") from None


def _int_list(arg: str) -> tuple[int, ...]:
    return tuple(int(a) for a in arg.split(",") if a.strip())


_PARSERS = {
    "mass": lambda a: CumulativeMass(float(a)),
    "mass-incl": lambda a: CumulativeMass(float(a), inclusive=True),
    "topk": lambda a: TopK(int(a)),
    "threshold": lambda a: Threshold(float(a), "sigmoid"),
    "relthreshold": lambda a: Threshold(float(a), "relative"),
    "static": lambda a: Static(_int_list(a)),
    "oracle-mass": lambda a: Oracle(tau=float(a)),
    "oracle-topk": lambda a: Oracle(k=int(a)),
}


def check_rule(rule: Rule) -> Rule:
    """`rule` if it is a routing rule object; a clear error for a spec string or anything else.

    Spec strings ("mass:0.9", "topk:8") belong to the command line and to checkpoint files (`parse_rule`);
    the Python API takes the rule objects.
    """
    if isinstance(rule, str):
        try:
            example = f"{parse_rule(rule)!r}"
        except ValueError:
            example = "CumulativeMass(0.9)"
        raise TypeError(f"routing rule {rule!r} is a command-line spec; the Python API takes a Rule object, "
                        f"e.g. prunepath.routing.{example} (parse a spec with prunepath.routing.parse_rule)")
    if not isinstance(rule, RULE_TYPES):
        raise TypeError(f"expected a routing rule ({', '.join(c.__name__ for c in RULE_TYPES)}), got {rule!r}")
    return rule
