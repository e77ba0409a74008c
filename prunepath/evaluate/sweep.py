"""Sparsity–accuracy sweeps on one checkpoint: τ, the inference-time knob, against the baselines at matched
active FFN fractions (the comparison of Gu, Fu, Yuan 2026).

    prunepath sweep --checkpoint default --fractions 0.25 0.5 0.75 --tasks wikitext2 sst2 rte
    prunepath calibrate --checkpoint default --target 0.5

The sweep turns τ on one checkpoint (`--taus`) and, at each matched mean active FFN fraction
(`--fractions`), runs PrunePath and every baseline of `evaluate.baselines`: each method's knob is calibrated on
calibration text to the target fraction, then every task is evaluated with the evaluator's functions
(`prunepath.evaluate.tasks.evaluate_task`). Rows are tidy — one number per row:

    method, knob, target_fraction, active_fraction, mean_experts, task, metric, value, n, protocol

plus the per-token expert-count quantiles. They are appended to one JSON file as they come (by default
results/sweeps/<checkpoint>_<tasks>_<device>.json, through `prunepath.results`), so an interrupted sweep
resumes where it stopped; `prunepath report` makes its table, CSV and figure. Active fraction is
measured during each evaluation (not the calibration value); for neuron pruning it is the kept-neuron fraction.

Cost. A sweep evaluates the same texts under every (method, knob), so what does not depend on the
model is done once per process: tokenised test text and prompts, task rows and demonstrations
(`nlu`), and each layer's router logits on the calibration inputs (`baselines`). On a GPU the evaluators
get large batches (`GPU_BATCHING`), and the k-shot demonstrations every prompt starts with run once per
task and method, their KV cache shared by all rows (`prunepath.evaluate.scoring`); none of this changes a number
beyond float rounding.

`calibrate` finds the global τ by bisection on real forwards of calibration text (each step runs the
model with that τ, so later layers see the inputs the sparse earlier layers give them), and per-layer τ
by bisection on each layer's own captured inputs.

Shape legend: B sequences, T tokens, L layers.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prunepath import results, routing
from prunepath.evaluate import baselines
from prunepath.ffn.module import prunepath_ffns
from prunepath.report import format_knob
from prunepath.routing import calibrate
from prunepath.routing.control import set_gate

METRICS = {"wikitext2": ("perplexity", "next_token_accuracy"), "ifeval": None, "alpaca": None}


# ---------------------------------------------------------------------------------------------------------
# calibration of τ


# ---------------------------------------------------------------------------------------------------------
# the sweep


def _rows(res: dict, method: str, knob, target, static_fraction: float | None, gate: str) -> list[dict]:
    r = res.get("routing") or {}
    q = r.get("experts_kept_p10_p50_p90") or [None] * 3
    frac = static_fraction if static_fraction is not None else r.get("active_fraction", 1.0)
    # classification: accuracy, and balanced accuracy (which shows a model that gives every row one label)
    named = [m for m in ("accuracy", "balanced_accuracy") if m in res["metrics"]]
    metrics = METRICS.get(res["task"]) or named or list(res["metrics"])
    out = []
    for m in metrics:
        out.append(
            {
                "method": method,
                "knob": knob,
                "target_fraction": target,
                "active_fraction": frac,
                "mean_experts": r.get("mean_experts_kept"),
                "task": res["task"],
                "metric": m,
                "value": res["metrics"][m],
                "n": res["n"],
                "protocol": res["protocol"],
                "experts_p10": q[0],
                "experts_p50": q[1],
                "experts_p90": q[2],
                "rule": r.get("rule", "dense") if static_fraction is None else f"{method}:{knob}",
                "dtype": res["meta"].get("dtype"),
                "device": res["meta"].get("device"),
                "date": res["meta"].get("date"),
                "gate": gate,
                "experts_std": r.get("experts_kept_std"),
                "per_layer_fraction": r.get("per_layer_fraction"),
            }
        )
    spread = {k: res.get("settings", {}).get(k) for k in ("demo_sets", "per_set_accuracy", "split_half_accuracy")}
    for row in out if spread["demo_sets"] else ():  # several demonstration sets: how far apart they land
        if row["metric"] == "accuracy":
            row.update(spread)
    return out


class Sweep:
    """Rows accumulate in <out>.json (prunepath.results writes it); finished (method, knob, task) are skipped."""

    def __init__(self, out: str | Path, meta: dict):
        self.out = Path(out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.json = self.out.with_suffix(".json")
        self.rows: list[dict] = []
        self.meta = dict(meta)
        if self.json.is_file():  # resume / extend: keep the rows, the first run's meta, and every run's meta
            old = results.load_sweep(self.json)
            self.rows = old.rows
            self.meta = old.meta or dict(meta)
        self.meta.setdefault("runs", []).append({k: v for k, v in meta.items() if k != "runs"})

    def done(self, method, target, task) -> bool:
        return any(r["method"] == method and r["target_fraction"] == target and r["task"] == task for r in self.rows)

    def add(self, rows: list[dict]) -> None:
        self.rows.extend(rows)
        results.write_sweep(self.json, self.meta, self.rows)


@dataclass(frozen=True)
class SweepConfig:
    """What a sweep evaluates: methods at matched active fractions, τ values, tasks, and how much text."""

    fractions: tuple[float, ...] = (0.25, 0.5, 0.75)  # matched mean active FFN fractions, each in (0, 1)
    taus: tuple[float, ...] = ()  # PrunePath at these τ as well ("prunepath-tau" rows)
    methods: tuple[str, ...] = baselines.METHODS  # PrunePath and the baselines (prunepath.evaluate.baselines)
    tasks: tuple[str, ...] = ("wikitext2",)
    limit: int | None = None  # examples per task (None: all); WikiText-2 takes wt_tokens instead
    wt_tokens: int = 4096  # WikiText-2 tokens scored
    calib_tokens: int = 2048  # calibration tokens the knobs are matched on
    task_opts: dict = field(default_factory=dict)  # per task: keyword options of its evaluator
    tag: str = ""  # appended to every method name (several checkpoints in one file)

    def __post_init__(self):
        from prunepath.evaluate.tasks import check_task

        for name in ("fractions", "taus", "methods", "tasks"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for t in self.tasks:
            check_task(t)
        for m in self.methods:
            if m not in baselines.METHODS:
                raise ValueError(f"unknown method {m!r}; choose from {', '.join(baselines.METHODS)}")
        for f in self.fractions:
            if not 0 < f < 1:
                raise ValueError(f"matched fractions must lie in (0, 1), got {f}")
        for t in self.taus:
            routing.CumulativeMass(t)  # validates τ


def run_sweep(model, tok, out, config: SweepConfig = SweepConfig(), progress: bool = True,
              meta: dict | None = None) -> Sweep:
    """Evaluate every (method, fraction) and every τ of `config` on every task; returns the Sweep with its rows.

    out: the sweep's file (`.json` is added; `prunepath report` makes its table, CSV and figure); a run that
    stopped resumes from the rows already in it. meta: recorded with the rows (device, checkpoint...).
    """
    from prunepath.data import calibration_batches
    from prunepath.evaluate.tasks import evaluate_task

    fractions, taus, methods, tasks = config.fractions, config.taus, config.methods, config.tasks
    limit, wt_tokens, calib_tokens, tag = config.limit, config.wt_tokens, config.calib_tokens, config.tag
    task_opts = config.task_opts
    gate = prunepath_ffns(model)[0].gate
    sw = Sweep(out, meta or {})
    ids = calibration_batches(tok, calib_tokens, 256, seed=1)  # seed 1: not the training windows (seed 0)
    calib = calibrate.capture(model, ids)
    plan = [("dense", None)] if "dense" in methods else []
    plan += [(m, f) for f in fractions for m in methods if m != "dense"]
    plan += [("prunepath-tau", t) for t in taus]
    for method, target in plan:
        todo = [t for t in tasks if not sw.done(method + tag, target, t)]
        if not todo:
            continue
        if method == "prunepath-tau":
            knob, est = target, None
            m = baselines.configure(model, calib, "prunepath", knob)
        elif method == "dense":
            knob, est = None, 1.0
            m = baselines.configure(model, calib, "dense", None)
            set_gate(m, "one")  # the base model exactly
        else:
            knob, est = baselines.match_knob(model, calib, method, target)
            m = baselines.configure(model, calib, method, knob)
            if method == "prunepath":  # the adaptive count is the point of the method: keep its distribution
                counts = calibrate.expert_counts(model, calib, routing.CumulativeMass(knob))
                dist = calibrate.count_distribution(counts, prunepath_ffns(model)[0].n_experts)
                sw.meta.setdefault("expert_counts", {})[f"{target}{tag}"] = {"tau": knob, **dist}
        static = getattr(m, "prunepath_static_fraction", None)
        for task in todo:
            t0 = time.time()
            opts = _batching(model, task, task_opts.get(task, {}))
            limit_t = wt_tokens if task == "wikitext2" else limit
            res = evaluate_task(m, tok, task, limit=limit_t, **opts).to_dict()
            rows = _rows(res, method + tag, knob, target, static, gate)
            for r in rows:
                r["calibrated_fraction"] = est
            sw.add(rows)
            if progress:
                main = rows[0]
                print(
                    f"[{time.time() - t0:6.1f}s] {method:<14} knob={format_knob(knob):<8} "
                    f"frac={main['active_fraction']:.3f} "
                    f"{task}: {main['metric']}={main['value']:.4f}",
                    flush=True,
                )
        if m is model:
            set_gate(model, gate)
        del m
    sw.add([])  # writes the meta (expert-count distributions) even when every row was already done
    return sw


# Batches on a GPU: many rows per forward (the scoring is per row, so the numbers do not change, up to
# float rounding). A CPU gains little from bigger batches and keeps the evaluators' defaults. Greedy
# generation gets 64 prompts per batch on a GPU (4 on a CPU): decoding is launch-bound, so this is ~16x
# faster, and the batch size is recorded with each row because left padding can flip a near-tied token.
GPU_BATCHING = {"lm": {"batch_size": 16}, "nlu": {"batch_size": 1024, "batch_tokens": 131072},
                "gen": {"batch_size": 64}}


def _batching(model, task: str, opts: dict) -> dict:
    """The task's options, with GPU batch sizes where the caller gave none."""
    from prunepath.evaluate.tasks import check_task

    if next(model.parameters()).device.type != "cuda":
        return dict(opts)
    return {**GPU_BATCHING[check_task(task)], **opts}


# ---------------------------------------------------------------------------------------------------------
# CLI


def _load(args):
    import prunepath

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model, tok = prunepath.load(args.checkpoint, device=args.device, adapter=args.adapter)
    return model.to(dtype), tok


def _meta(args, model) -> dict:
    import platform

    import transformers

    dev = args.device
    if dev.startswith("cuda") and torch.cuda.is_available():
        dev = torch.cuda.get_device_name()
    return {
        "checkpoint": args.checkpoint,
        "adapter": getattr(model, "prunepath_adapter", None),
        "device": dev,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commands": ["prunepath " + " ".join(sys.argv[1:])],
        "train": getattr(model, "prunepath_train_info", {}),
    }


