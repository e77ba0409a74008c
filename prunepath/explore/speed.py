"""The explorer's speed figure: decode tokens/s against the active fraction, measured live at the current τ.

`live_speed(model, tokenizer, rule)` times our decode loop (`prunepath.decode.loop.Decoder`: the Triton
kernels on a GPU, the CPU decode step otherwise, both reading only the kept experts) on this machine:
dense (every expert, unit gates: the base model's arithmetic) and the current routing, a few tokens each,
in turn (dense, routed, dense, routed, ...) so that a change in the machine's load hits both alike, each
figure from the median round. Each
measured point is kept for the session, so the curve of this machine grows as the slider moves.
`speed_figure` draws those live points with the current one marked, beside the curves recorded on an
H200 (`results/bench/decode_*_h200.json`, labelled with model shape and date; missing or unreadable
files are skipped). PrunePath (Gu, Fu, Yuan 2026) turns the kept fraction into speed only where decode
reads weights at the memory's pace; `launch_bound_note` says when that cannot happen.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# A decode step of a model under this many weight bytes is bound by GPU kernel launches, not by reading
# weights (the default SmolLM2-135M, 270 MB in bf16, decodes at 317 tok/s on an H200 at every τ).
LAUNCH_BOUND_BYTES = 1 << 30


class SpeedError(ValueError):
    """The speed cannot be measured for this input; the message names the cause and the fix."""


@dataclass(frozen=True)
class SpeedPoint:
    active_fraction: float  # realised fraction of FFN experts kept per token
    tokens_per_s: float
    label: str  # the routing: "dense" or the rule's spec


@dataclass(frozen=True)
class LiveSpeed:
    device: str  # where it was measured, in words
    dense: SpeedPoint
    routed: SpeedPoint
    seconds: float  # how long the measurement took
    note: str  # one sentence when the speed cannot follow τ on this device, else ""

    @property
    def speedup(self) -> float:
        return self.routed.tokens_per_s / self.dense.tokens_per_s


@dataclass(frozen=True)
class RecordedCurve:
    label: str  # model, shape, device, date
    points: tuple[tuple[float, float], ...]  # (active fraction, tokens/s), sorted by fraction


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from prunepath.bench.split import cpu_name

    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def launch_bound_note(model, device: torch.device) -> str:
    """One sentence when reading fewer experts cannot speed this model up on this device, else ""."""
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cuda" and nbytes < LAUNCH_BOUND_BYTES:
        return (f"On a GPU this {nbytes / 1e6:.0f} MB model's decode step is bound by kernel launches, not by "
                "reading weights, so keeping fewer experts cannot change its speed here; the H200 curves at "
                "the Llama shapes show where it does.")
    return ""


_LOCK = threading.Lock()  # one measurement at a time: two would time each other
_DECODERS: dict[int, object] = {}  # one decoder per model (its KV cache and expert layouts are reused)


def live_speed(model, tokenizer, rule, n_tokens: int = 8, prompt: str = "The quick brown fox jumps over the lazy dog",
               device: str | torch.device | None = None, rounds: int = 3) -> LiveSpeed:
    """Tokens/s of our decode loop on `model` now: dense, then under `rule` (a Rule, a list of one per
    layer, or anything with one τ per layer in `.taus`), `n_tokens` each, `rounds` times in turn; each
    figure is from the median round, so one round slowed by another process on a shared machine does not
    move it. The model's routing is restored afterwards.

    Raises SpeedError for a model without PrunePath FFNs, n_tokens or rounds < 1, or a device that is not there.
    """
    from prunepath.decode.loop import DecodeConfig, Decoder
    from prunepath.ffn.module import prunepath_ffns
    from prunepath.routing.control import routing_kept, set_gate, set_rule, set_rules, set_tau
    from prunepath.routing.rules import Dense
    from prunepath.routing.stats import record

    ffns = prunepath_ffns(model)
    if not ffns:
        raise SpeedError("the speed figure needs a PrunePath model (the expert layout); load a PrunePath "
                         "checkpoint with prunepath.load or convert the model with prunepath.moefy")
    if n_tokens < 1:
        raise SpeedError(f"n_tokens must be at least 1, got {n_tokens}")
    if rounds < 1:
        raise SpeedError(f"rounds must be at least 1, got {rounds}")
    here = next(model.parameters()).device
    if device is not None and torch.device(device) != here:
        want = torch.device(device)
        if want.type == "cuda" and not torch.cuda.is_available():
            raise SpeedError("no CUDA GPU on this machine: measure on the CPU (device='cpu')")
        raise SpeedError(f"the model is on {here}; move it to {want} first (model.to('{want}'))")
    gate = ffns[0].gate
    ids = tokenizer(prompt, return_tensors="pt").input_ids[:, :32]
    t_start = time.perf_counter()
    with _LOCK, routing_kept(model), torch.no_grad():
        dec = _DECODERS.get(id(model))
        budget = 2 * rounds * n_tokens + 3  # every round's tokens of both, the warm-up's two, the prefill's one
        if dec is None or dec.model is not model or dec.max_len < ids.shape[1] + budget:
            dec = _DECODERS[id(model)] = Decoder(model, max_len=ids.shape[1] + budget + 13,
                                                 config=DecodeConfig(max_new_tokens=n_tokens))

        def put(which):
            if which == "dense":
                set_rule(model, Dense())
                set_gate(model, "one")
            elif hasattr(rule, "taus"):
                set_tau(model, list(rule.taus))
            elif isinstance(rule, (list, tuple)):
                set_rules(model, list(rule))
            else:
                set_rule(model, rule)
            if which != "dense":
                set_gate(model, gate)
            dec._sync_rules()  # the GPU kernels read the rule from device tensors

        seconds = {"dense": [], "routed": []}
        dec.prefill(ids, new_tokens=budget)
        for which in ("routed", "dense"):  # warm-up: builds the expert and dense layouts / compiles the kernels
            put(which)
            dec.decode(1)
        kept = []
        for _ in range(rounds):
            for which in ("dense", "routed"):
                put(which)
                if here.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                if which == "routed":
                    with record(model) as rec:
                        dec.decode(n_tokens)
                    kept.append(rec.stats().active_fraction)
                else:
                    dec.decode(n_tokens)
                if here.type == "cuda":
                    torch.cuda.synchronize()
                seconds[which].append(time.perf_counter() - t0)
    spec = rule_label(rule)
    median = {which: statistics.median(t) for which, t in seconds.items()}
    return LiveSpeed(_device_name(here),
                     SpeedPoint(1.0, n_tokens / median["dense"], "dense"),
                     SpeedPoint(sum(kept) / len(kept), n_tokens / median["routed"], spec),
                     time.perf_counter() - t_start, launch_bound_note(model, here))


def rule_label(rule) -> str:
    if hasattr(rule, "spec"):
        return rule.spec
    if isinstance(rule, (list, tuple)):
        return "per-layer: " + ",".join(r.spec.split(":")[-1] for r in rule)
    return getattr(rule, "spec", str(rule))


def _fraction(row: dict) -> float | None:
    for key in ("kept_fraction", "realised_fraction"):
        v = row.get(key)
        if isinstance(v, (int, float)) and 0 < v <= 1:
            return float(v)
    return 1.0 if str(row.get("variant", "")).startswith("dense") else None


def recorded_curves(paths: list[Path] | None = None) -> list[RecordedCurve]:
    """Our decode loop's tokens/s against the kept fraction from each recorded H200 file (default: the
    results/bench/decode_*_h200.json of record; the transformers baselines and the masking torch path left
    out); missing, unreadable or empty files are skipped, and no results folder gives no curves."""
    from prunepath import results

    if paths is None:
        try:
            paths = [p for p in results.list_bench("decode") if p.name.endswith("_h200.json")]
        except results.ResultsNotFoundError:
            return []
    curves = []
    for path in paths:
        try:
            data = results.read_json(path)
        except (OSError, ValueError):
            continue
        rows = data.get("rows") if isinstance(data, dict) else None
        if not isinstance(rows, list):
            continue
        points = []
        for row in rows:
            if not isinstance(row, dict) or not isinstance(row.get("tokens_per_s"), (int, float)):
                continue
            what = f"{row.get('variant', '')} {row.get('path', '')}".lower()
            if any(b in what for b in ("generate", "transformers", "torch-mask")):  # baselines
                continue
            a = _fraction(row)
            if a is not None:
                points.append((a, float(row["tokens_per_s"])))
        if points:
            shape = data.get("shape")
            if isinstance(shape, dict) and shape.get("hidden"):
                shape_txt = f"{shape.get('hidden')}×{shape.get('ffn', '?')}"
            else:
                shape_txt = {"llama-8b": "4096×14336", "llama-1b": "2048×8192",
                             "default": "576×1536"}.get(str(data.get("model")), "?")
            label = (f"{data.get('model', path.stem)} ({shape_txt}) · {data.get('device', '?')} · "
                     f"{str(data.get('date', '?'))[:10]}")
            curves.append(RecordedCurve(label, tuple(sorted(points))))
    return curves


def speed_figure(live: list[SpeedPoint], current: SpeedPoint | None, curves: list[RecordedCurve],
                 device: str = "this machine", height: int = 380) -> dict:
    """A plotly figure (dict): tokens/s against the active fraction; this machine's live points, the
    current setting marked, and the recorded curves (log y: an H200 and a CPU differ a hundredfold)."""
    bad = [p for p in [*live, *([current] if current else [])] if not 0 < p.active_fraction <= 1]
    if bad:
        raise SpeedError(f"active fractions must lie in (0, 1]; got {bad[0].active_fraction!r} for {bad[0].label}")
    data = []
    for c in curves:
        xs, ys = zip(*c.points)
        data.append({"type": "scatter", "mode": "lines+markers", "x": xs, "y": ys, "name": c.label,
                     "line": {"dash": "dot"}, "marker": {"size": 5}})
    if live:
        pts = sorted(live, key=lambda p: p.active_fraction)
        data.append({"type": "scatter", "mode": "markers", "x": [p.active_fraction for p in pts],
                     "y": [p.tokens_per_s for p in pts], "text": [p.label for p in pts],
                     "name": f"live: {device}", "marker": {"size": 8, "color": "#1f77b4"}})
    if current is not None:
        data.append({"type": "scatter", "mode": "markers", "x": [current.active_fraction],
                     "y": [current.tokens_per_s], "text": [current.label], "name": f"now: {current.label}",
                     "marker": {"size": 16, "symbol": "star", "color": "#d62728"}})
    return {"data": data, "layout": {
        "height": height, "margin": {"l": 60, "r": 10, "t": 30, "b": 45},
        "xaxis": {"title": {"text": "active fraction (experts kept per token)"}, "range": [0, 1.05]},
        "yaxis": {"title": {"text": "decode tokens/s (batch 1)"}, "type": "log"},
        "legend": {"font": {"size": 10}}, "title": {"text": "Decode speed against the active fraction"}}}


class SpeedSection:
    """The figure's state for one explorer page: live points measured so far (per routing label)."""

    def __init__(self, recorded: list[Path] | None = None, height: int = 380):
        self.recorded = recorded  # the H200 files to draw (None: those of record)
        self.height = height  # of the figure, in pixels
        self.points: dict[str, SpeedPoint] = {}

    def update(self, model, tokenizer, rule, n_tokens: int = 8, rounds: int = 3) -> tuple[dict, str]:
        """Measure now at `rule`, then (figure, markdown line)."""
        live = live_speed(model, tokenizer, rule, n_tokens=n_tokens, rounds=rounds)
        self.points["dense"] = live.dense
        self.points[live.routed.label] = live.routed
        fig = speed_figure(list(self.points.values()), live.routed, recorded_curves(self.recorded), live.device,
                           self.height)
        text = (f"**Live on {live.device}** (our decode loop, batch 1, median of {rounds} rounds of {n_tokens} tokens "
                f"each, measured in {live.seconds:.1f} s): dense **{live.dense.tokens_per_s:.1f}** tokens/s, "
                f"`{live.routed.label}` at {live.routed.active_fraction:.0%} active "
                f"**{live.routed.tokens_per_s:.1f}** tokens/s (×{live.speedup:.2f}).")
        return fig, text + (" " + live.note if live.note else "")
