"""What a training run does: `TrainConfig`, checked before any model is loaded."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from prunepath.adapter import ADAPTER_DTYPES
from prunepath.routing.gates import check_gate
from prunepath.train.data import check_data

OBJECTIVES = ("lm", "distill")


TRAINABLE = ("router", "lora", "all", "linear")


FULL_WEIGHTS = ("all", "linear")  # trainable sets saved with every weight (model.safetensors)


TEACHERS = (None, "dense")


DENSE_TAU = 1.05  # stage 1: τ > 1 keeps every expert


@dataclass(frozen=True)
class TrainConfig:
    objective: str = "distill"  # lm | distill
    trainable: str = "router"  # router | lora | all
    data: str = "calibration"  # calibration | wikitext2 (valid split) | alpaca | a classification task
    tokens: int = 16384  # training tokens (lm: per epoch over the windows; distill: cached once)
    seq_len: int = 128
    batch_size: int = 8  # lm: sequences per step; distill: x 128 cached rows per step
    stage1_steps: int = 0  # lm only: steps at τ = 1.05 (all experts, gates learned)
    steps: int = 300  # stage-2 steps (distill: router updates on the cache)
    tau: float = 0.7  # stage-2 τ (the released checkpoints: 0.70 and 0.95)
    tau_range: tuple[float, float] | None = None  # sample τ ~ U(lo, hi) per batch in stage 2
    gamma: float = 3e-4  # entropy weight
    gamma_lb: float = 1e-3  # load-balance weight
    lr: float = 1e-3  # router lr (distill uses it too)
    backbone_lr: float = 1e-4  # lora / all
    decay_steps: int = 0  # the last K steps scale every learning rate linearly down to 0 (0: constant rates)
    weight_decay: float = 1e-2  # routers only; the backbone gets none (as the paper)
    distill_loss: str = "kl"  # kl | bce
    distill_power: float = 1.0  # kl target q ∝ norm^power: < 1 flattens p, so counts vary less between tokens
    gate: str | None = None  # override the checkpoint's gate kind (sigmoid | softmax | one)
    teacher: str | None = None  # lm only: "dense" adds KL(dense model ‖ sparse model) to the task loss
    kd_weight: float = 1.0  # with a teacher: task = kd_weight · KL + (1 - kd_weight) · cross-entropy
    lora_r: int = 8
    lora_targets: str = "ffn"  # ffn | attn | all
    lora_init: str | None = None  # a saved peft LoRA adapter (folder) to train further (its rank may grow)
    adapter_dtype: str = "fp32"  # the saved adapter's dtype: bf16 halves the file, int8 quarters it (training: fp32)
    seed: int = 0
    save_every: int = 100
    keep_every: int = 0  # also keep a copy of the checkpoint in <out>/step-NNNNNN every K steps (0: never)
    device: str = "cpu"
    amp: bool | None = None  # bf16 autocast; None = on for CUDA, off for CPU

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if self.objective == "distill" and self.trainable != "router":
            raise ValueError("the distill objective trains routers only (backbone frozen); use --trainable router")
        if not (self.distill_power > 0 and math.isfinite(self.distill_power)):
            raise ValueError(f"distill_power must be a number > 0, got {self.distill_power}")
        if self.distill_loss not in ("kl", "bce"):
            raise ValueError(f"distill_loss must be 'kl' or 'bce', got {self.distill_loss!r}")
        if not (self.tau > 0 and math.isfinite(self.tau)):
            raise ValueError(f"tau must be a number > 0 (values > 1 keep every expert), got {self.tau}")
        if self.tau_range is not None:
            lo, hi = self.tau_range
            if not 0 < lo < hi:
                raise ValueError(f"tau_range must be (lo, hi) with 0 < lo < hi, got {self.tau_range}")
        if not 0 <= self.decay_steps <= self.steps:
            raise ValueError(f"decay_steps must lie in [0, steps={self.steps}], got {self.decay_steps}")
        for name in ("tokens", "seq_len", "batch_size", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.keep_every < 0 or (self.keep_every and self.keep_every % self.save_every):
            raise ValueError(
                f"keep_every must be 0 (off) or a multiple of save_every ({self.save_every}), got {self.keep_every}"
            )
        if self.steps < 0 or self.stage1_steps < 0 or self.steps + self.stage1_steps == 0:
            raise ValueError("need steps >= 0, stage1_steps >= 0 and at least one step in all")
        if self.gate is not None:
            check_gate(self.gate)
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher must be 'dense' or None, got {self.teacher!r}")
        if self.teacher is not None and self.objective != "lm":
            raise ValueError("a teacher needs the lm objective (distill already learns from the dense model)")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ValueError(f"kd_weight must lie in [0, 1], got {self.kd_weight}")
        check_data(self.data)
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"adapter_dtype must be one of {ADAPTER_DTYPES}, got {self.adapter_dtype!r}")
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {self.lora_r}")
        if self.lora_targets not in ("ffn", "attn", "all"):
            raise ValueError(f"lora_targets must be 'ffn', 'attn' or 'all', got {self.lora_targets!r}")
        if self.lora_init is not None:
            if self.trainable != "lora":
                raise ValueError("lora_init continues a LoRA adapter: it needs trainable='lora' (--trainable lora)")
            if not (Path(self.lora_init) / "adapter_config.json").is_file():
                raise ValueError(f"lora_init {self.lora_init!r} holds no adapter_config.json: give the adapter/ "
                                 "folder of a checkpoint trained with --trainable lora")

    @property
    def total_steps(self) -> int:
        return (self.stage1_steps if self.objective == "lm" else 0) + self.steps

    @property
    def decay_start(self) -> int:
        """The first step whose learning rates are scaled down (total_steps when nothing decays)."""
        return self.total_steps - self.decay_steps

    def lr_scale(self, step: int) -> float:
        """The factor on every learning rate at step (0-based): 1, then linearly down over the last decay_steps.

        As the decay phase of a warmup-stable-decay schedule: a constant rate, so a run can be extended on
        resume, and a short linear cool-down at the end, whose last step has a rate of 1/decay_steps.
        """
        if step < self.decay_start:
            return 1.0
        return (self.total_steps - step) / self.decay_steps
