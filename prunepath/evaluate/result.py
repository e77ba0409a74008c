"""An evaluation's result and the routing statistics recorded while it ran."""

from __future__ import annotations

import dataclasses
import inspect
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from prunepath.ffn.module import prunepath_ffns
from prunepath.routing.control import rule_spec, rules
from prunepath.routing.stats import Recorder, record


@dataclass(frozen=True)
class EvalResult:
    """One number-bearing evaluation; `to_dict()` is what `--json` prints."""

    task: str
    metrics: dict  # e.g. {"perplexity": 23.1, "next_token_accuracy": 0.41}
    n: int  # examples (or tokens, for perplexity) scored
    protocol: str  # how the number was obtained, in words a reader can reproduce
    dataset: str
    split: str
    settings: dict = field(default_factory=dict)  # k, seed, context, stride, ...
    routing: dict | None = None  # rule, knob, experts kept, active fraction, FLOPs (PrunePath models)
    model: str = ""
    meta: dict = field(default_factory=dict)  # date, device, versions, seconds

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _knob(rule) -> float | int | None:
    """The rule's numeric knob (τ, k or t): its first numeric dataclass field."""
    for f in dataclasses.fields(rule) if dataclasses.is_dataclass(rule) else ():
        v = getattr(rule, f.name)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return v
    return None


class RoutingRecorder:
    """Routing over a block of forwards (a `prunepath.record` recorder); masks of real tokens are optional.

    For a model without PrunePath FFNs it records nothing and reports the dense model.
    """

    def __init__(self, model, rec: Recorder | None = None):
        self.model = model
        self.rec = rec
        self.active = rec is not None
        self.masks: list[torch.Tensor] = []
        self.info: dict | None = None  # set when the `recording` block ends

    def add_mask(self, attention_mask: torch.Tensor) -> None:
        if self.active:
            self.masks.append(attention_mask.reshape(-1).bool().cpu())  # [N], the order forwards see rows

    def take_last(self) -> list[torch.Tensor] | None:
        """Remove the last recorded forward's counts from every layer and return them (L x [N])."""
        return self.rec.take_last() if self.active else None

    def add_repeated(self, counts: list[torch.Tensor] | None, times: int) -> None:
        """Count one forward's real tokens (`counts`, L x [N], from `take_last`) `times` times over, as if
        that many forwards had run them (a shared prompt prefix run once for many rows)."""
        if not self.active or counts is None or times < 1:
            return
        self.rec.add_repeated(counts, times)
        self.masks.append(torch.ones(counts[0].numel() * times, dtype=torch.bool))

    def summary(self) -> dict:
        if not self.active:
            return {"rule": "dense", "active_fraction": 1.0}
        recorded = self.rec.tokens
        mask = torch.cat(self.masks) if self.masks else None
        # Masks line up only if every recorded forward supplied one; otherwise every routed row counts.
        stats = self.rec.stats(mask if mask is not None and mask.numel() == recorded else None)
        per_token = stats.counts.float().mean(0)  # [N] experts kept per token, averaged over layers
        cells = stats.counts.flatten()  # [L*N] every (layer, token) decision; count_quantiles takes any size
        qs = torch.tensor([0.1, 0.5, 0.9])
        q = torch.quantile(per_token, qs).tolist() if len(per_token) else [0] * 3
        q_cells = count_quantiles(cells, qs) if len(cells) else [0] * 3
        knobs = {_knob(r) for r in rules(self.model)}
        return {
            "rule": rule_spec(self.model),
            "knob": knobs.pop() if len(knobs) == 1 else "per-layer",
            **stats.summary(),
            "experts_kept_p10_p50_p90": q,  # of the per-token mean over layers
            "experts_kept_layer_token_p10_p50_p90": q_cells,  # of single (layer, token) decisions
            "experts_kept_std": float(per_token.std()) if per_token.numel() > 1 else 0.0,
            "per_layer_fraction": stats.per_layer_fraction(),
            "padding_excluded": mask is not None and mask.numel() == recorded,
        }


def count_quantiles(counts: torch.Tensor, qs: torch.Tensor) -> list[float]:
    """`torch.quantile(counts.float(), qs)` (linear interpolation) for non-negative integer counts,
    read off their histogram instead of sorting them: the same numbers, for tens of millions of cells."""
    cum = torch.bincount(counts.reshape(-1)).cumsum(0)  # [max + 1] how many counts are <= v
    ranks = qs * (counts.numel() - 1)  # as torch.quantile computes them
    below, above = ranks.long(), ranks.ceil().long()
    value = lambda k: torch.searchsorted(cum, k, right=True).float()  # the k-th smallest count
    return torch.lerp(value(below), value(above), ranks - below).tolist()


@contextmanager
def recording(model):
    """`with recording(model) as rec: <forwards>` then `rec.info`: the block's routing summary (None if it
    ran no forward); a model without PrunePath FFNs is reported as dense."""
    if not prunepath_ffns(model):
        rec = RoutingRecorder(model)
        yield rec
        rec.info = rec.summary()
        return
    with record(model) as recorder:
        rec = RoutingRecorder(model, recorder)
        yield rec
        rec.info = rec.summary() if recorder.tokens else None


def run_meta(model, t0: float) -> dict:
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.time() - t0, 2),
            "device": str(next(model.parameters()).device), "dtype": str(next(model.parameters()).dtype),
            "torch": torch.__version__, "python": platform.python_version()}


def model_name(model) -> str:
    try:
        from prunepath.models import model_reference

        return model_reference(model)
    except Exception:  # any model of transformers, loaded by anyone
        return getattr(model.config, "_name_or_path", type(model).__name__)


def keeps_logits(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters
