"""What a training run does: a frozen, nested `TrainConfig`, checked before any model is loaded.

    TrainConfig(objective="lm", trainable="lora",
                data=DataConfig(source="alpaca-chat", tokens=200_000),
                schedule=Schedule(steps=500, lr=1e-3),
                routing=RoutingLoss(tau=0.7),
                lora=LoraSettings(r=16))

The command line (`prunepath train`) and the training logs use one flat name per field (`--lora-r`,
"lora_r"); `TrainConfig.flat()` and `TrainConfig.from_flat()` translate (`FLAT_FIELDS` is the table).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from prunepath.adapter import ADAPTER_DTYPES
from prunepath.routing.gates import GateKind, check_gate
from prunepath.train.data import DataConfig

OBJECTIVES = ("lm", "distill")
TRAINABLE = ("router", "lora", "all", "linear")
FULL_WEIGHTS = ("all", "linear")  # trainable sets saved with every weight (model.safetensors)
TEACHERS = (None, "dense")
DENSE_TAU = 1.05  # stage 1: τ > 1 keeps every expert


@dataclass(frozen=True)
class Schedule:
    """Steps, learning rates and checkpointing."""

    stage1_steps: int = 0  # lm only: steps at τ = 1.05 (all experts, gates learned)
    steps: int = 300  # stage-2 steps (distill: router updates on the cache)
    lr: float = 1e-3  # router lr (distill uses it too)
    backbone_lr: float = 1e-4  # lora / all
    decay_steps: int = 0  # the last K steps scale every learning rate linearly down to 0 (0: constant rates)
    weight_decay: float = 1e-2  # routers only; the backbone gets none (as the paper)
    save_every: int = 100
    keep_every: int = 0  # also keep a copy of the checkpoint in <out>/step-NNNNNN every K steps (0: never)

    def __post_init__(self):
        if self.steps < 0 or self.stage1_steps < 0 or self.steps + self.stage1_steps == 0:
            raise ValueError("need steps >= 0, stage1_steps >= 0 and at least one step in all")
        if not 0 <= self.decay_steps <= self.steps:
            raise ValueError(f"decay_steps must lie in [0, steps={self.steps}], got {self.decay_steps}")
        if self.save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {self.save_every}")
        if self.keep_every < 0 or (self.keep_every and self.keep_every % self.save_every):
            raise ValueError(
                f"keep_every must be 0 (off) or a multiple of save_every ({self.save_every}), got {self.keep_every}"
            )


@dataclass(frozen=True)
class RoutingLoss:
    """The routing side of training: the stage-2 τ, its regularisers and the gates."""

    tau: float = 0.7  # stage-2 τ (the released checkpoints: 0.70 and 0.95)
    tau_range: tuple[float, float] | None = None  # sample τ ~ U(lo, hi) per batch in stage 2
    gamma: float = 3e-4  # entropy weight
    gamma_lb: float = 1e-3  # load-balance weight
    gate: GateKind | None = None  # override the checkpoint's gate kind (sigmoid | softmax | one)

    def __post_init__(self):
        if not (self.tau > 0 and math.isfinite(self.tau)):
            raise ValueError(f"tau must be a number > 0 (values > 1 keep every expert), got {self.tau}")
        if self.tau_range is not None:
            lo, hi = self.tau_range
            if not 0 < lo < hi:
                raise ValueError(f"tau_range must be (lo, hi) with 0 < lo < hi, got {self.tau_range}")
        if self.gate is not None:
            check_gate(self.gate)


@dataclass(frozen=True)
class Distillation:
    """The distill objective: router targets from the dense model's expert output norms."""

    loss: str = "kl"  # kl | bce
    power: float = 1.0  # kl target q ∝ norm^power: < 1 flattens p, so counts vary less between tokens

    def __post_init__(self):
        if not (self.power > 0 and math.isfinite(self.power)):
            raise ValueError(f"distill_power must be a number > 0, got {self.power}")
        if self.loss not in ("kl", "bce"):
            raise ValueError(f"distill_loss must be 'kl' or 'bce', got {self.loss!r}")


@dataclass(frozen=True)
class Teacher:
    """lm only: kind "dense" adds KL(dense model ‖ sparse model) to the task loss."""

    kind: str | None = None
    kd_weight: float = 1.0  # with a teacher: task = kd_weight · KL + (1 - kd_weight) · cross-entropy

    def __post_init__(self):
        if self.kind not in TEACHERS:
            raise ValueError(f"teacher must be 'dense' or None, got {self.kind!r}")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ValueError(f"kd_weight must lie in [0, 1], got {self.kd_weight}")


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA adapter (trainable="lora")."""

    r: int = 8
    targets: str = "ffn"  # ffn | attn | all
    init: str | None = None  # a saved peft LoRA adapter (folder) to train further (its rank may grow)
    adapter_dtype: str = "fp32"  # the saved adapter's dtype: bf16 halves the file, int8 quarters it (training: fp32)

    def __post_init__(self):
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"adapter_dtype must be one of {ADAPTER_DTYPES}, got {self.adapter_dtype!r}")
        if self.r < 1:
            raise ValueError(f"lora_r must be >= 1, got {self.r}")
        if self.targets not in ("ffn", "attn", "all"):
            raise ValueError(f"lora_targets must be 'ffn', 'attn' or 'all', got {self.targets!r}")
        if self.init is not None and not (Path(self.init) / "adapter_config.json").is_file():
            raise ValueError(f"lora_init {self.init!r} holds no adapter_config.json: give the adapter/ "
                             "folder of a checkpoint trained with --trainable lora")


@dataclass(frozen=True)
class TrainConfig:
    objective: str = "distill"  # lm | distill
    trainable: str = "router"  # router | lora | all | linear
    data: DataConfig = field(default_factory=DataConfig)
    schedule: Schedule = field(default_factory=Schedule)
    routing: RoutingLoss = field(default_factory=RoutingLoss)
    distill: Distillation = field(default_factory=Distillation)
    teacher: Teacher = field(default_factory=Teacher)
    lora: LoraSettings = field(default_factory=LoraSettings)
    seed: int = 0
    device: str = "cpu"
    amp: bool | None = None  # bf16 autocast; None = on for CUDA, off for CPU

    def __post_init__(self):
        for f in fields(self):
            want = _SECTIONS.get(f.name)
            if want is not None and not isinstance(getattr(self, f.name), want):
                raise TypeError(f"TrainConfig.{f.name} must be a {want.__name__}, got {getattr(self, f.name)!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if self.objective == "distill" and self.trainable != "router":
            raise ValueError("the distill objective trains routers only (backbone frozen); use --trainable router")
        if self.teacher.kind is not None and self.objective != "lm":
            raise ValueError("a teacher needs the lm objective (distill already learns from the dense model)")
        if self.lora.init is not None and self.trainable != "lora":
            raise ValueError("lora_init continues a LoRA adapter: it needs trainable='lora' (--trainable lora)")

    @property
    def total_steps(self) -> int:
        return (self.schedule.stage1_steps if self.objective == "lm" else 0) + self.schedule.steps

    @property
    def decay_start(self) -> int:
        """The first step whose learning rates are scaled down (total_steps when nothing decays)."""
        return self.total_steps - self.schedule.decay_steps

    def lr_scale(self, step: int) -> float:
        """The factor on every learning rate at step (0-based): 1, then linearly down over the last decay_steps.

        As the decay phase of a warmup-stable-decay schedule: a constant rate, so a run can be extended on
        resume, and a short linear cool-down at the end, whose last step has a rate of 1/decay_steps.
        """
        if step < self.decay_start:
            return 1.0
        return (self.total_steps - step) / self.schedule.decay_steps

    def flat(self) -> dict:
        """One flat name per field (the command line's flags, the training log's "config")."""
        out = {}
        for name, (section, attr) in FLAT_FIELDS.items():
            out[name] = getattr(getattr(self, section), attr) if section else getattr(self, attr)
        return out

    @classmethod
    def from_flat(cls, flat: dict) -> TrainConfig:
        """The config that `flat()` describes; unknown names are a ValueError naming them."""
        unknown = sorted(set(flat) - set(FLAT_FIELDS))
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {', '.join(FLAT_FIELDS)}")
        top, parts = {}, {s: {} for s in _SECTIONS}
        for name, value in flat.items():
            section, attr = FLAT_FIELDS[name]
            (parts[section] if section else top)[attr] = tuple(value) if name == "tau_range" and value else value
        return cls(**top, **{s: _SECTIONS[s](**kw) for s, kw in parts.items()})

    def replace_flat(self, **flat) -> TrainConfig:
        """A copy with some fields changed, named as in `flat()`."""
        return TrainConfig.from_flat({**self.flat(), **flat})


_SECTIONS = {"data": DataConfig, "schedule": Schedule, "routing": RoutingLoss, "distill": Distillation,
             "teacher": Teacher, "lora": LoraSettings}

# flat name -> (section, field); section "" is TrainConfig itself
FLAT_FIELDS: dict[str, tuple[str, str]] = {
    "objective": ("", "objective"), "trainable": ("", "trainable"),
    "data": ("data", "source"), "tokens": ("data", "tokens"), "seq_len": ("data", "seq_len"),
    "batch_size": ("data", "batch_size"),
    "stage1_steps": ("schedule", "stage1_steps"), "steps": ("schedule", "steps"), "lr": ("schedule", "lr"),
    "backbone_lr": ("schedule", "backbone_lr"), "decay_steps": ("schedule", "decay_steps"),
    "weight_decay": ("schedule", "weight_decay"), "save_every": ("schedule", "save_every"),
    "keep_every": ("schedule", "keep_every"),
    "tau": ("routing", "tau"), "tau_range": ("routing", "tau_range"), "gamma": ("routing", "gamma"),
    "gamma_lb": ("routing", "gamma_lb"), "gate": ("routing", "gate"),
    "distill_loss": ("distill", "loss"), "distill_power": ("distill", "power"),
    "teacher": ("teacher", "kind"), "kd_weight": ("teacher", "kd_weight"),
    "lora_r": ("lora", "r"), "lora_targets": ("lora", "targets"), "lora_init": ("lora", "init"),
    "adapter_dtype": ("lora", "adapter_dtype"),
    "seed": ("", "seed"), "device": ("", "device"), "amp": ("", "amp"),
}
