"""The compute behind the explorer (`panel serve explorer.py`): plain classes, no GUI import.

Shape legend: L layers, T tokens, E experts per layer, N = T rows (one prompt, batch 1).

    from prunepath.explore.explorer import Explorer
    ex = Explorer.open("default")                     # loads once per process (cached)
    r = ex.route("The quick brown fox", "mass", 0.7)  # per-token, per-layer experts kept
    r.counts.shape, r.active_fraction, r.flops_per_token
    ex.continuation("The quick brown fox", "mass", 0.7).text

Everything the page shows comes from here, so a notebook gets the same numbers headless. Every model
call takes one lock: the routing rule is state of the (shared) model, so two calls must never
interleave inside a forward. Generation takes the lock per decoded token, not for the whole
continuation, so a slider move waits at most one decode step. Results are cached per
(prompt, rule spec): dragging back to a τ already seen costs nothing.

Rules the page offers, compared at a matched active fraction (the paper's protocol):
  "mass"       cumulative mass τ (PrunePath)
  "mass-layer" cumulative mass with one τ per layer, each layer at τ's active fraction on this prompt
               (what `prunepath.set_active_fraction(model, f)` does with a checkpoint's stored calibration)
  "topk"       MoEfication top-k, k = the mean experts kept at this τ on this prompt
  "threshold"  independent sigmoid threshold t, the quantile of sigmoid(logits) at τ's active fraction
  "dense"      every expert, with the checkpoint's gates
"""

from __future__ import annotations

import copy
import inspect
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from prunepath import routing
from prunepath.explore.loading import ExplorerError, load_for_explorer
from prunepath.ffn.module import prunepath_ffns
from prunepath.routing.control import set_gate, set_rule, set_tau
from prunepath.routing.stats import record
from prunepath.tokens import token_texts

RULES = ("mass", "mass-layer", "topk", "threshold", "dense")
RULE_NAMES = {"mass": "cumulative mass τ (PrunePath)", "mass-layer": "per-layer τ (PrunePath), matched",
              "topk": "top-k (MoEfication), matched", "threshold": "threshold (sigmoid), matched",
              "dense": "dense"}
EXAMPLES = {
    "Fox": "The quick brown fox jumps over the lazy dog because it was bored.",
    "Photosynthesis": "Photosynthesis is the process by which green plants use sunlight to",
    "Python": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Paris": "The capital of France is Paris. The capital of Germany is",
    "Recipe": "To make a simple tomato sauce, first heat some olive oil in a pan, then",
}


def configure_threads(n: int | None = None) -> int:
    """Give torch half the cores (1 on a 2-core machine) and return the count.

    The app runs two workers at once (routing, and the slow work on the twin model). With torch's
    default of one intra-op thread per core, each worker's OpenMP team spins waiting for threads the
    other worker (or another process) holds: a 64-token route measured 4-6 s with 2 threads and
    0.3-0.55 s with 1 thread on the shared 2-core machine (load average ~8). One thread per worker
    keeps each on its own core.
    """
    n = n or max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(n)
    return n


@dataclass(frozen=True)
class ExploreConfig:
    max_tokens: int = 256  # longer prompts are truncated (with a note): the heatmap stays readable, routing fast
    gen_tokens: int = 24  # greedy continuation length
    quick_tokens: int = 512  # WikiText-2 test tokens for the quick perplexity estimate
    cache_size: int = 512  # routed results kept (LRU)


@dataclass(frozen=True)
class LayerTaus:
    """Cumulative mass with one τ per layer: the rule `prunepath.set_active_fraction(model, f)` puts on a model."""

    taus: tuple[float, ...]

    @property
    def spec(self) -> str:
        return "mass:" + ",".join(f"{t:g}" for t in self.taus)


def apply_rule(model, rule) -> None:
    """Put a routing rule, or a LayerTaus, on every layer of `model`."""
    if isinstance(rule, LayerTaus):
        set_tau(model, list(rule.taus))
    else:
        set_rule(model, rule)


@dataclass(frozen=True)
class Routed:
    """One prompt routed under one rule."""

    tokens: tuple[str, ...]  # T display labels
    counts: torch.Tensor  # [L, T] experts kept per token per layer
    n_experts: int  # E per layer
    spec: str  # the rule actually applied, e.g. "topk:17"
    active_fraction: float  # mean fraction of FFN neurons active, over layers and tokens
    mean_experts: float
    flops_per_token: float  # FFN FLOPs per token, routers included, all layers
    dense_flops_per_token: float
    seconds: float  # wall time of the forward that produced this (0 if it came from the cache)
    note: str = ""  # e.g. the truncation message
    knobs: tuple[int, float] | None = None  # (k, t) matched to this active fraction (mass rule only)
    layer_taus: tuple[float, ...] | None = None  # one τ per layer at this active fraction (mass rule only)

    @property
    def per_token(self) -> list[float]:
        """Experts kept per token, mean over layers.  # [T]"""
        return self.counts.float().mean(0).tolist()

    def heatmap_figure(self, title: str = "") -> dict:
        """A plotly figure (plain dict, no plotly import) of counts: layers down, tokens across, labelled."""
        t = len(self.tokens)
        z = self.counts.tolist()  # [L, T]
        text = [[f"{tok!r}<br>layer {li}: {c} of {self.n_experts}" for tok, c in zip(self.tokens, row)]
                for li, row in enumerate(z)]
        step = max(1, t // 64)  # at most ~64 tick labels; hover shows every token
        return {
            "data": [{
                "type": "heatmap", "z": z, "x": list(range(t)), "y": list(range(len(z))),
                "zmin": 0, "zmax": self.n_experts, "colorscale": "Viridis",
                "colorbar": {"title": {"text": "experts<br>kept"}, "thickness": 12},
                "text": text, "hovertemplate": "%{text}<extra></extra>",
            }],
            "layout": {
                "title": {"text": title or f"experts kept per token and layer ({self.spec})", "font": {"size": 14}},
                "xaxis": {"tickmode": "array", "tickvals": list(range(0, t, step)),
                          "ticktext": [self.tokens[i] for i in range(0, t, step)], "tickangle": -60,
                          "title": {"text": "token"}},
                "yaxis": {"title": {"text": "layer"}, "autorange": "reversed"},
                "margin": {"l": 50, "r": 10, "t": 40, "b": 90}, "height": 360,
            },
        }


@dataclass(frozen=True)
class Continuation:
    spec: str
    prompt_tokens: int
    text: str
    new_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


@dataclass(frozen=True)
class QuickEstimate:
    spec: str
    perplexity: float
    tokens: int
    active_fraction: float
    label: str = "quick estimate"


class Explorer:
    """One loaded PrunePath model plus caches; thread-safe."""

    def __init__(self, model, tokenizer, source: str, note: str = "", config: ExploreConfig = ExploreConfig()):
        if not prunepath_ffns(model):
            raise ExplorerError("the explorer needs a PrunePath model: convert it with prunepath.moefy(model)")
        self.model, self.tokenizer, self.source, self.note, self.config = model.eval(), tokenizer, source, note, config
        self.ffns = prunepath_ffns(model)
        self.n_layers, self.n_experts = len(self.ffns), self.ffns[0].n_experts
        self.device = next(model.parameters()).device
        # The transformer body without the LM head: routing does not need the logits, and the head
        # (49152 x 576 for the default model) would be ~20% of the forward's FLOPs.
        self._body = getattr(model, "base_model", model)
        self.gate = self.ffns[0].gate  # the checkpoint's gates; "dense" uses unit gates (the base model exactly)
        self._lock = threading.RLock()
        self._routed: OrderedDict[tuple, Routed] = OrderedDict()
        self._continued: dict[tuple, Continuation] = {}
        self._quick: dict[str, QuickEstimate] = {}
        self._twin: Explorer | None = None

    # -- loading ----------------------------------------------------------------------------------

    _open: dict[str, Explorer] = {}
    _open_lock = threading.Lock()

    @classmethod
    def open(cls, checkpoint: str = "default", config: ExploreConfig = ExploreConfig()) -> Explorer:
        """The explorer for a checkpoint ("default", "tiny" or a folder), loaded once per process."""
        ref = (checkpoint or "").strip() or "default"
        key = ref if ref in ("default", "tiny") else str(Path(ref).expanduser().resolve())
        with cls._open_lock:
            if key not in cls._open:
                model, tok, source, note = load_for_explorer(ref)
                cls._open[key] = cls(model, tok, source, note, config)
            return cls._open[key]

    # -- prompt -> tokens -----------------------------------------------------------------------------

    def encode(self, prompt: str) -> tuple[torch.Tensor, str]:
        """Prompt -> (ids [T], note); empty prompts are an error, long ones are truncated with a note."""
        if not prompt or not prompt.strip():
            raise ExplorerError("The prompt is empty: type some text or pick an example.")
        ids = self.tokenizer(prompt, return_tensors="pt").input_ids[0]  # [T]
        if ids.numel() == 0:
            raise ExplorerError("The prompt produced no tokens: type some text or pick an example.")
        note = ""
        if ids.numel() > self.config.max_tokens:
            note = (f"The prompt has {ids.numel():,} tokens; the explorer routes and continues the first "
                    f"{self.config.max_tokens}.")
            ids = ids[: self.config.max_tokens]
        return ids, note

    def labels(self, ids: torch.Tensor) -> tuple[str, ...]:
        """One readable label per token (spaces and newlines made visible), in any script: the byte pieces of
        one character are decoded together and labelled with their place ('語 1/3', see prunepath.tokens)."""
        out = []
        for piece in token_texts(self.tokenizer, ids):
            s = piece.text
            s = s.replace("\n", "↵").replace("\t", "⇥") if s.strip() else s.replace(" ", "␣") or "∅"
            out.append(f"{s} {piece.part}/{piece.parts}" if piece.part else s)
        return tuple(out)

    # -- routing --------------------------------------------------------------------------------------

    def rule_for(self, prompt: str, rule: str, tau: float) -> routing.Rule:
        """The routing rule the controls describe; top-k and threshold at τ's matched active fraction."""
        if rule == "dense":
            return routing.Dense()
        if rule == "mass":
            return routing.CumulativeMass(float(tau))
        if rule not in RULES:
            raise ExplorerError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
        at_tau = self.route(prompt, "mass", tau)
        if rule == "mass-layer":
            return LayerTaus(at_tau.layer_taus)
        k, t = at_tau.knobs
        return routing.TopK(k) if rule == "topk" else routing.Threshold(t)

    def route(self, prompt: str, rule: str = "mass", tau: float = 0.9) -> Routed:
        """Experts kept per token per layer for `prompt` under the rule (cached)."""
        ids, note = self.encode(prompt)
        r = self.rule_for(prompt, rule, tau)
        key = (tuple(ids.tolist()), r.spec)
        with self._lock:
            if key in self._routed:
                self._routed.move_to_end(key)
                return self._routed[key]
        t0 = time.perf_counter()
        counts, logits, stats = self._forward(ids, r, capture=isinstance(r, routing.CumulativeMass))
        knobs = matched_knobs(logits, stats.active_fraction, self.n_experts) if logits is not None else None
        taus = matched_layer_taus(logits, stats.active_fraction) if logits is not None else None
        out = Routed(
            tokens=self.labels(ids), counts=counts, n_experts=self.n_experts, spec=r.spec,
            active_fraction=stats.active_fraction, mean_experts=stats.mean_experts,
            flops_per_token=stats.flops_per_token, dense_flops_per_token=stats.dense_flops_per_token,
            seconds=time.perf_counter() - t0, note=note, knobs=knobs, layer_taus=taus,
        )
        with self._lock:
            self._routed[key] = out
            while len(self._routed) > self.config.cache_size:
                self._routed.popitem(last=False)
        return out

    def _apply(self, rule: routing.Rule | LayerTaus) -> None:
        """Put `rule` on every layer; dense also means unit gates, as the sweeps' dense baseline."""
        apply_rule(self.model, rule)
        set_gate(self.model, "one" if isinstance(rule, routing.Dense) else self.gate)

    @torch.no_grad()
    def _forward(self, ids: torch.Tensor, rule: routing.Rule, capture: bool):
        """One forward of the body under `rule` -> (counts [L, T], router logits [L, T, E] or None, stats)."""
        captured: list[torch.Tensor] = []
        with self._lock:
            self._apply(rule)
            # Capture router logits with forward hooks (the documented training hook; no forward patching).
            hooks = [f.router.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
                     for f in self.ffns] if capture else []
            try:
                with record(self.model) as rec:
                    self._body(input_ids=ids[None].to(self.device), use_cache=False)
                stats = rec.stats()
            finally:
                for h in hooks:
                    h.remove()
        logits = torch.stack([c.reshape(-1, self.n_experts).float().cpu() for c in captured]) if capture else None
        return stats.counts, logits, stats  # counts [L, T]; logits [L, T, E]

    def twin(self) -> Explorer:
        """A second copy of the model for the slow work (continuations, quick estimates, decode speed).

        The routing rule is state of a model, so slow work on the routing model would hold its lock for
        seconds and the slider would wait. The twin has its own lock: the slider never waits on it.
        Costs one more copy of the weights (~0.5 GB for the default model in fp32).
        """
        with self._lock:
            if self._twin is None:
                self._twin = Explorer(copy.deepcopy(self.model), self.tokenizer, self.source, self.note, self.config)
                self._twin.gate = self.gate
            return self._twin

    # -- generation -----------------------------------------------------------------------------------

    @torch.no_grad()
    def continuation(self, prompt: str, rule: str = "mass", tau: float = 0.9,
                     cancel: threading.Event | None = None) -> Continuation | None:
        """Greedy continuation under the rule (cached); None if `cancel` was set before it finished."""
        ids, _ = self.encode(prompt)
        r = self.rule_for(prompt, rule, tau)
        key = (tuple(ids.tolist()), r.spec, self.config.gen_tokens)
        if key in self._continued:
            return self._continued[key]
        eos = self.tokenizer.eos_token_id
        twin = self.twin()
        x, past, new = ids[None].to(self.device), None, []
        # transformers >= 5.2x names the KV cache `cache`; older versions `past_key_values`
        cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        t0 = time.perf_counter()
        for _ in range(self.config.gen_tokens):
            if cancel is not None and cancel.is_set():
                return None
            with twin._lock:  # per step: cancelling takes effect after at most one decode step
                twin._apply(r)
                out = twin.model(input_ids=x, use_cache=True, **{cache_arg: past})
            past = getattr(out, cache_arg)
            nxt = int(out.logits[0, -1].argmax())
            new.append(nxt)
            if nxt == eos:
                break
            x = torch.tensor([[nxt]], device=self.device)
        c = Continuation(r.spec, ids.numel(), self.tokenizer.decode(new, skip_special_tokens=True), len(new),
                         time.perf_counter() - t0)
        self._continued[key] = c
        return c

    def cached_continuation(self, prompt: str, rule: str = "mass", tau: float = 0.9) -> Continuation | None:
        """The continuation if already generated, else None (never generates)."""
        try:
            ids, _ = self.encode(prompt)
            return self._continued.get((tuple(ids.tolist()), self.rule_for(prompt, rule, tau).spec,
                                        self.config.gen_tokens))
        except ExplorerError:
            return None

    # -- accuracy -------------------------------------------------------------------------------------

    def quick_estimate(self, rule_obj: routing.Rule) -> QuickEstimate:
        """Perplexity on the first `quick_tokens` tokens of WikiText-2 test under one rule (cached).

        A quick estimate only: one 512-token window; the committed sweeps use the whole test set.
        """
        if rule_obj.spec in self._quick:
            return self._quick[rule_obj.spec]
        from prunepath.data import load_lm_text
        from prunepath.evaluate.perplexity import perplexity

        try:
            text = load_lm_text("wikitext2", "test")[:20_000]  # plenty for 512 tokens; skips tokenizing 1 MB
        except Exception as e:  # noqa: BLE001 - any data problem becomes a message on the page
            raise ExplorerError(f"WikiText-2 is not available for the quick estimate ({e}); "
                                "set PRUNEPATH_DATA to the shared data folder") from None
        n = self.config.quick_tokens
        twin = self.twin()
        with twin._lock:
            twin._apply(rule_obj)
            res = perplexity(twin.model, self.tokenizer, text, context=n, stride=n, max_tokens=n)
        routing_info = res.routing or {}
        q = QuickEstimate(rule_obj.spec, res.metrics["perplexity"], res.n,
                          float(routing_info.get("active_fraction", 1.0)))
        self._quick[rule_obj.spec] = q
        return q


def matched_knobs(logits: torch.Tensor, fraction: float, n_experts: int) -> tuple[int, float]:
    """(k, t) that keep about `fraction` of the experts, from router logits [L, T, E] seen at τ.

    k: the mean number of experts kept, rounded. t: the sigmoid threshold whose exceedance rate over
    all layers and tokens equals the fraction (a quantile). The threshold rule's own forward then
    sees slightly different hidden states, so its actual fraction is measured, not assumed.
    """
    k = int(min(max(round(fraction * n_experts), 1), n_experts))
    s = torch.sigmoid(logits.reshape(-1).float())
    t = float(torch.quantile(s[:1_000_000], 1.0 - min(max(fraction, 0.0), 1.0)))
    return k, round(min(max(t, 1e-4), 1 - 1e-4), 4)  # 4 decimals: a readable spec, well within the quantile's noise


def matched_layer_taus(logits: torch.Tensor, fraction: float) -> tuple[float, ...]:
    """One τ per layer so that each layer keeps about `fraction` of its experts on these tokens.

    logits: router logits [L, T, E] seen at τ. The same per-layer search as the sweep's `prunepath-layer`
    (`baselines.per_layer_taus`), on the prompt's own logits. Like the threshold, the rule's own forward
    sees other hidden states; the page shows the fraction it actually reaches.
    """
    from prunepath.routing.calibrate import bisect

    target = min(max(fraction, 1e-4), 1.0)
    taus = []
    for z in logits.float():  # z: [T, E], one layer
        tau, _ = bisect(lambda t, z=z: float(routing.CumulativeMass(t).select(z).float().mean()), 1e-4, 1.0, target)
        taus.append(round(tau, 4))  # 4 decimals: a readable spec, finer than one expert's step
    return tuple(taus)


# ---------------------------------------------------------------------------------------------------
# Loading checkpoints


