"""Training PrunePath routers (PAPER.md §4): end-to-end through the gates, or distilled from the FFN itself.

Shape legend: L layers, B batch, T tokens, N = B*T rows, D hidden, E experts.

Two objectives, one loop:

* `lm` (the paper): LM cross-entropy through the gates of the kept experts
      + γ · mean_layers mean_tokens H(p)                  (entropy: sharper p, fewer experts reach τ)
      + γ_lb · mean_layers E · Σ_e (mean_tokens p_e)²     (load balance, minimal at uniform use)
  with padding masked in all three terms. Stage 1 runs at τ = 1.05 (every expert on, gates learned),
  stage 2 at the target τ (or a τ drawn per batch from --tau-range). Router logits are captured with
  forward hooks on each `ffn.router`, so nothing of the model's forward is patched.
* `distill` (MoEfication-style, backbone frozen): the target of layer l is the true importance of each
  expert, its output norm ||W_down[:, e] h_e(x)|| (`ffn.expert_norms`), taken from one *dense* forward
  over the training text; the FFN inputs and targets are cached, and the routers are fitted to them
  (KL to the normalised norms — what cumulative mass needs, p_e ∝ importance — or MoEfication's BCE to
  norms / max). Each layer's loss is local, so no gradient flows through the backbone: on a CPU this is
  ~50x cheaper per token than `lm`, and it needs no gate to be learned.

Why distillation + unit gates is our default for a frozen backbone (numbers in the report/README):
the paper's sigmoid gate starts at sigmoid(0) = 0.5 (halving every FFN) and, with centroid init, at
sigmoid(z) in ~(0.3, 0.7); the linear router has no bias, so pushing every kept gate towards 1 is
something only the full fine-tune of the paper can absorb. Unit gates make the kept experts exact.

Two options of the `lm` objective, both measured on an H200 (results/training/tau_*.json):

* `--teacher dense`: the task loss becomes KL(dense model ‖ sparse model) (or a mix with cross-entropy,
  `--kd-weight`); the teacher is the same model with every expert on, unit gates and no adapter.
* With unit gates the kept set is a hard mask, so the task loss gives the routers *no gradient*: only the
  γ terms move them, sharpening p until every τ keeps fewer experts. Freeze them with `--lr 0` when the
  backbone trains (the default checkpoint's stage 2); the trainer warns otherwise.

Trainable parts (`--trainable`): `router` (default; checkpoint ~2 MB), `lora` (peft adapters on the
FFN's gate/up/down and/or attention, saved to <out>/adapter/, merged by prunepath.load; `lora_init` /
`--continue-adapter` trains a checkpoint's own adapter further instead of starting a new one), `all`
(saved with full weights, never committed), `linear` (the same, but only the weights of the linear layers LoRA
targets, q/k/v/o and gate/up/down, train: embeddings and norms stay the base model's, so `prunepath
extract-adapter` can carry the whole change). Every K steps the run state (trainable tensors, optimizer,
step, RNG) goes to <out>/train_state.pt and the PrunePath checkpoint to <out>; `--resume` continues.
`--keep-every K` also keeps each K-th step's checkpoint in <out>/step-NNNNNN (a learning curve to evaluate).
Learning rates are constant, so a resumed run may take more or fewer `--steps`; `--decay-steps K` brings them
linearly to 0 over the last K steps (the default's stage 6), and then the schedule may change on resume only
while no decayed step has been taken. A non-finite loss stops the run before the optimizer step, leaving the
last good checkpoint untouched.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import signal
import threading
import time
import warnings
from contextlib import closing, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from prunepath.losses import LogitCapture, distill_loss, kd_loss, routing_losses
from prunepath.train_data import check_data, training_batches

OBJECTIVES = ("lm", "distill")
TRAINABLE = ("router", "lora", "all", "linear")
FULL_WEIGHTS = ("all", "linear")  # trainable sets saved with every weight (model.safetensors)
LINEAR_LAYERS = {"ffn": ["gate_proj", "up_proj", "down_proj"], "attn": ["q_proj", "k_proj", "v_proj", "o_proj"]}
TEACHERS = (None, "dense")
DENSE_TAU = 1.05  # stage 1: τ > 1 keeps every expert
STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.json"
ADAPTER_DTYPES = ("fp32", "bf16", "int8")  # how save_adapter stores it; training itself stays in fp32


def linear_layer_names(targets: str) -> list[str]:
    """The linear layers a LoRA adapter targets: 'ffn', 'attn' or 'all' (both)."""
    if targets not in ("ffn", "attn", "all"):
        raise ValueError(f"targets must be 'ffn', 'attn' or 'all', got {targets!r}")
    return [n for k in (("ffn", "attn") if targets == "all" else (targets,)) for n in LINEAR_LAYERS[k]]


def save_adapter(peft_model, folder, dtype: str = "fp32") -> None:
    """peft's save_pretrained, the tensors in bf16 or as 8-bit rows when asked (the loaders de-quantise them).

    int8 (`prunepath.checkpoint.write_int8_adapter`) halves bf16's bytes, so twice the rank fits one file size;
    peft alone cannot read that file, `prunepath.load` and `--continue-adapter` can.
    """
    from prunepath.checkpoint import INT8_ADAPTER_FILE, write_int8_adapter

    (Path(folder) / INT8_ADAPTER_FILE).unlink(missing_ok=True)  # an earlier save's 8-bit file would shadow this one
    state = None  # peft picks the adapter's tensors out of the state dict it is given
    if dtype == "bf16":
        state = {k: v.to(torch.bfloat16) for k, v in peft_model.state_dict().items() if "lora_" in k}
    peft_model.save_pretrained(folder, state_dict=state)
    if dtype == "int8":
        write_int8_adapter(folder)


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint was kept."""


class TrainingStopped(RuntimeError):
    """SIGTERM or Ctrl-C arrived: the step in flight finished, was saved, and --resume continues from it."""


class _StopOnSignal:
    """While active (main thread only), SIGTERM and the first SIGINT only raise a flag; a second SIGINT interrupts.

    Schedulers (SLURM, Kubernetes, `timeout`) send SIGTERM some seconds before they kill: finishing the step and
    saving loses nothing, where a kill loses everything since the last periodic save.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum, self._old = None, {}

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now, without saving
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}


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
        if self.gate not in (None, "sigmoid", "softmax", "one"):
            raise ValueError(f"gate must be 'sigmoid', 'softmax' or 'one', got {self.gate!r}")
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


@dataclass
class RunState:
    step: int = 0
    log: list = field(default_factory=list)  # one dict per step: the loss curves


# ---------------------------------------------------------------------------------------------------------
# the trainer


def _autocast(cfg: TrainConfig):
    device = torch.device(cfg.device)
    amp = cfg.amp if cfg.amp is not None else device.type == "cuda"
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()


def setup_trainable(model, cfg: TrainConfig):
    """Freeze/unfreeze and (for LoRA) wrap the model; returns (model, param groups)."""
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.trainable == "lora":
        from peft import LoraConfig, get_peft_model

        names = linear_layer_names(cfg.lora_targets)
        if cfg.lora_init:
            model = _continue_lora(model, cfg, names)
        else:
            model = get_peft_model(
                model, LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, target_modules=names, lora_dropout=0.0)
            )
        backbone = [p for n, p in model.named_parameters() if "lora_" in n]
    elif cfg.trainable == "all":
        backbone = [p for n, p in model.named_parameters() if ".router." not in n]
        for p in backbone:
            p.requires_grad_(True)
    elif cfg.trainable == "linear":
        linear = tuple(f".{m}.weight" for m in linear_layer_names("all"))
        backbone = [p for n, p in model.named_parameters() if n.endswith(linear)]
        for p in backbone:
            p.requires_grad_(True)
    else:
        backbone = []
    routers = [p for f in _ffns(model) for p in f.router.parameters()]
    for p in routers:
        p.requires_grad_(True)
    groups = [{"params": routers, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.backbone_lr, "weight_decay": 0.0})
    return model, groups


def _continue_lora(model, cfg: TrainConfig, names: list[str]):
    """Wrap `model` in the saved adapter cfg.lora_init, trainable, on cfg's targets at rank cfg.lora_r.

    A higher rank grows the adapter without changing what it computes: the saved A and B fill the first r₀ rows
    of the new A and columns of the new B, the new B columns start at zero (peft's own init for the new A rows),
    and lora_alpha grows with the rank so the scale α/r stays the saved one.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    from prunepath.checkpoint import adapter_tensors, peft_readable

    folder = Path(cfg.lora_init)
    saved = json.loads((folder / "adapter_config.json").read_text())
    got_r, got_names = saved.get("r"), sorted(saved.get("target_modules") or [])
    if got_names != sorted(names) or not isinstance(got_r, int) or got_r > cfg.lora_r:
        raise ValueError(
            f"the adapter in {cfg.lora_init} has rank {got_r} on {got_names}; this run asks for rank {cfg.lora_r} "
            f"on {sorted(names)}. Pass its own --lora-targets and a --lora-r of at least {got_r} to train it further"
        )
    if got_r == cfg.lora_r:
        with peft_readable(folder) as readable:  # an 8-bit adapter trains on from its de-quantised values
            return PeftModel.from_pretrained(model, str(readable), is_trainable=True)
    if saved.get("use_dora") or saved.get("use_rslora") or saved.get("rank_pattern") or saved.get("alpha_pattern"):
        raise ValueError(f"the adapter in {cfg.lora_init} is not plain LoRA (DoRA, rsLoRA or per-module ranks); "
                         "its rank cannot grow: train it further at its own --lora-r")
    alpha = saved.get("lora_alpha", 8) * cfg.lora_r / got_r  # peft's default α is 8
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=alpha, target_modules=names, lora_dropout=0.0))
    tensors = adapter_tensors(folder)
    params = dict(model.named_parameters())
    grown = 0
    with torch.no_grad():
        for key, value in tensors.items():  # base_model.model.<module>.lora_A.weight -> ....lora_A.default.weight
            name = key.replace(".weight", ".default.weight")
            p = params.get(name)
            is_a = ".lora_A." in name
            want = None if p is None else (got_r, p.shape[1]) if is_a else (p.shape[0], got_r)  # A [r, in], B [out, r]
            if ".lora_" not in name or value.shape != want:
                raise ValueError(f"adapter tensor {key} in {cfg.lora_init} does not fit this model; re-train it")
            if is_a:
                p[:got_r].copy_(value)
            else:
                p[:, :got_r].copy_(value)
                p[:, got_r:].zero_()
            grown += 1
    if grown != 2 * sum(1 for n in params if n.endswith(".lora_A.default.weight")):
        raise ValueError(f"the adapter in {cfg.lora_init} misses some of its target modules; re-train the adapter")
    return model


def _ffns(model):
    from prunepath.ffn import PrunePathFFN

    return [m for m in model.modules() if isinstance(m, PrunePathFFN)]


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _trainable_state(model) -> dict:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


@contextmanager
def _all_experts_unit_gates(ffns):
    """Every expert on with unit gates (the base model exactly) inside the block; rules and gates restored after."""
    from prunepath import routing

    saved = [(f.rule, f.gate) for f in ffns]
    try:
        for f in ffns:
            f.rule, f.gate = routing.Dense(), "one"
        yield
    finally:
        for f, (r, g) in zip(ffns, saved):
            f.rule, f.gate = r, g


def _set_tau(model, tau: float):
    for f in _ffns(model):
        from prunepath import routing

        inclusive = isinstance(f.rule, routing.CumulativeMass) and f.rule.inclusive
        f.rule = routing.CumulativeMass(float(tau), inclusive=inclusive)


class Trainer:
    """One training run writing into `out`; `run()` returns the loss log."""

    def __init__(self, model, tokenizer, cfg: TrainConfig, out, progress: bool = True, batches=None):
        import prunepath

        self.cfg, self.out, self.progress, self.tok = cfg, Path(out), progress, tokenizer
        if not hasattr(model, "prunepath_ffns"):
            raise ValueError("train needs a PrunePath model: prunepath.moefy(model) or prunepath.load(ckpt) first")
        if cfg.gate is not None:
            model.set_gate(cfg.gate)
        if cfg.objective == "lm" and cfg.lr > 0 and model.prunepath_ffns()[0].gate == "one":
            warnings.warn(
                "unit gates: the task loss gives the routers no gradient, so only the entropy and load-balance "
                "terms will move them (they sharpen, and every τ keeps fewer experts). Pass --lr 0 to freeze "
                "the routers, or --gate sigmoid to train them through the gates.",
                stacklevel=2,
            )
        # A checkpoint's LoRA adapter is folded into the weights on load. Router training keeps it (save()
        # copies it over); a second LoRA would have to be saved beside it, which the format does not hold.
        self.adapter_in = getattr(model, "prunepath_adapter", None)
        if self.adapter_in and cfg.trainable == "lora":
            raise ValueError(
                f"the starting checkpoint already carries a LoRA adapter ({self.adapter_in}), folded into its "
                "weights; a second one cannot be saved beside it. Train that adapter further (prunepath train "
                "--continue-adapter; load(ckpt, adapter=False) with TrainConfig(lora_init=<ckpt>/adapter)), start "
                "from the routers alone (--no-adapter), or train --trainable all"
            )
        # What the starting checkpoint had been trained with; save() keeps the chain in train_info['previous'].
        prev = dict(getattr(model, "prunepath_train_info", None) or {})
        self.previous = prev.pop("previous", []) + [prev] if prev else []
        self.base_fp = getattr(model, "prunepath_base_fingerprint", None)
        self.rule_after = model.rule_spec
        torch.manual_seed(cfg.seed)
        model = model.to(cfg.device)
        # The dense teacher: the starting model with every expert on and unit gates (the base model, or the
        # adapted one when the checkpoint carried an adapter) — the model itself while its backbone is frozen
        # (router) or its new LoRA adapters are switched off; a frozen copy when every weight trains.
        self.frozen_teacher = None
        if cfg.teacher == "dense" and cfg.trainable in FULL_WEIGHTS:
            self.frozen_teacher = copy.deepcopy(model).eval().requires_grad_(False)
            self.frozen_teacher.set_rule("dense")
            self.frozen_teacher.set_gate("one")
        self.model, groups = setup_trainable(model, cfg)
        self.opt = torch.optim.AdamW(groups)
        self.state = RunState()
        self._save_model = prunepath.save
        # batches: (input_ids [B, T], attention_mask [B, T]) to train on instead of cfg.data (tests, notebooks)
        self.ids, self.mask = batches if batches is not None else training_batches(tokenizer, cfg)
        self.cache = None
        held = int(self.mask.sum())
        if batches is None and held < 0.9 * cfg.tokens:  # a short file or source: say so rather than train on less
            warnings.warn(f"training data {cfg.data!r} holds {held:,} tokens of the {cfg.tokens:,} asked for; "
                          "the run repeats them more often", stacklevel=2)

    # -- checkpoints ---------------------------------------------------------------------------------

    def save(self) -> None:
        """Run state first, then the PrunePath checkpoint (+ adapter): both atomic renames."""
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / (STATE_FILE + ".tmp")
        torch.save(
            {
                "step": self.state.step,
                "log": self.state.log,
                "config": asdict(self.cfg),
                "fingerprint": self.base_fp,
                "trainable": _trainable_state(self.model),
                "optimizer": self.opt.state_dict(),
                "rng": _rng_state(),
            },
            tmp,
        )
        tmp.replace(self.out / STATE_FILE)
        base = _base(self.model)
        info = {
            "objective": self.cfg.objective,
            "trainable": self.cfg.trainable,
            "data": self.cfg.data,
            "steps": self.state.step,
            "config": asdict(self.cfg),
            "final_loss": self.state.log[-1]["loss"] if self.state.log else None,
        }
        if self.previous:
            info["previous"] = self.previous
        if self.cfg.trainable == "lora":
            save_adapter(self.model, self.out / "adapter", self.cfg.adapter_dtype)
        elif self.cfg.trainable == "router" and self.adapter_in:  # the routers serve the adapted weights
            shutil.copytree(self.adapter_in, self.out / "adapter", dirs_exist_ok=True)
        rules = [f.rule for f in _ffns(base)]
        base.set_rule(self.rule_after)  # the checkpoint records the serving rule, not a training τ
        self._save_model(base, self.out, train_info=info, full_weights=self.cfg.trainable in FULL_WEIGHTS)
        for f, r in zip(_ffns(base), rules):
            f.rule = r
        (self.out / LOG_FILE).write_text(
            json.dumps({"config": asdict(self.cfg), "log": self.state.log}, indent=1) + "\n"
        )
        if self.cfg.keep_every and self.state.step % self.cfg.keep_every == 0:
            self._keep_copy()

    def _keep_copy(self) -> None:
        """Copy the checkpoint just saved (not the run state) to <out>/step-NNNNNN: a loadable snapshot."""
        dest = self.out / f"step-{self.state.step:06d}"
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for item in self.out.iterdir():
            if item.name == STATE_FILE or item.name.startswith("step-") or item.name.endswith(".tmp"):
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.replace(dest)

    def resume(self) -> None:
        path = self.out / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"nothing to resume: {path} does not exist (start without --resume)")
        st = torch.load(path, weights_only=False, map_location="cpu")
        if st["fingerprint"] and self.base_fp and st["fingerprint"] != self.base_fp:
            raise ValueError(
                f"{path} was trained on another base model (fingerprint {st['fingerprint']}, "
                f"this model {self.base_fp}); resume with the same base"
            )
        now = asdict(self.cfg)
        # --steps and --decay-steps may change on resume (extend or shorten a run) while no step of either
        # schedule's decay has been taken: the rate was constant, so the steps already taken are the same either
        # way. Every other setting must match.
        free = ("steps", "decay_steps")
        diff = sorted(
            k for k in st["config"].keys() | now.keys() if st["config"].get(k) != now.get(k) and k not in free
        )
        if diff:
            raise ValueError(
                f"cannot resume: the saved run used other settings ({', '.join(diff)}); use the same flags"
            )
        if st["step"] > self.cfg.total_steps:
            raise ValueError(f"cannot resume: the saved run is at step {st['step']}, past the {self.cfg.total_steps} "
                             "steps now asked for; raise --steps")
        saved = replace(self.cfg, **{k: st["config"].get(k, 0) for k in free})  # the saved run's schedule
        rescheduled = (saved.steps, saved.decay_steps) != (self.cfg.steps, self.cfg.decay_steps)
        if rescheduled and (saved.decay_steps or self.cfg.decay_steps) and st["step"] > min(
            saved.decay_start, self.cfg.decay_start
        ):
            raise ValueError(
                f"cannot resume: the saved run is at step {st['step']}, inside a learning-rate decay (it decays "
                f"from step {saved.decay_start} of {saved.total_steps}; now from {self.cfg.decay_start} of "
                f"{self.cfg.total_steps}); keep its --steps and --decay-steps"
            )
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, v in st["trainable"].items():
                params[n].copy_(v)
        self.opt.load_state_dict(st["optimizer"])
        torch.set_rng_state(st["rng"]["torch"])
        if "cuda" in st["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["rng"]["cuda"])
        self.state = RunState(st["step"], st["log"])

    # -- steps ----------------------------------------------------------------------------------------

    def _stage_tau(self, step: int) -> tuple[int, float]:
        cfg = self.cfg
        if cfg.objective == "lm" and step < cfg.stage1_steps:
            return 1, DENSE_TAU
        if cfg.tau_range is not None:
            lo, hi = cfg.tau_range
            return 2, float(lo + (hi - lo) * torch.rand(()).item())
        return 2, cfg.tau

    @contextmanager
    def _dense_teacher(self):
        """The model that gives the teacher's logits: dense rule, unit gates, no adapters (restored after)."""
        if self.frozen_teacher is not None:
            yield self.frozen_teacher
            return
        adapters = self.model.disable_adapter() if self.cfg.trainable == "lora" else nullcontext()
        with _all_experts_unit_gates(_ffns(self.model)), adapters:
            yield self.model

    @torch.no_grad()
    def _teacher_logprobs(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """log p_dense(next token) at the real tokens: [N, V] (fp32)."""
        with self._dense_teacher() as teacher, _autocast(self.cfg):
            z = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [B, T, V]
        keep = mask.reshape(-1).bool()
        return F.log_softmax(z.reshape(-1, z.shape[-1])[keep].float(), dim=-1)

    def _lm_step(self, step: int, tau: float) -> dict:
        cfg = self.cfg
        n = self.ids.shape[0]
        # Batch order: a fixed permutation per epoch (seeded), so the stream of batches is reproducible.
        epoch, pos = divmod(step * cfg.batch_size, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        rows = order[torch.arange(pos, pos + cfg.batch_size) % n]
        ids, mask = self.ids[rows].to(cfg.device), self.mask[rows].to(cfg.device)  # [B, T]
        labels = ids.masked_fill(mask == 0, -100)
        teacher = self._teacher_logprobs(ids, mask) if cfg.teacher else None  # [N, V]
        _set_tau(self.model, tau)
        cap = LogitCapture(_ffns(self.model))
        try:
            with _autocast(cfg):
                out = self.model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
            ent, lb = routing_losses(cap.logits, mask.reshape(-1).bool())
        finally:
            cap.close()
        parts = {"task": out.loss.float(), "entropy": ent, "load_balance": lb}
        if teacher is not None:
            keep = mask.reshape(-1).bool()
            kd = kd_loss(out.logits.reshape(-1, out.logits.shape[-1])[keep], teacher)
            parts.update(kd=kd, ce=parts["task"], task=cfg.kd_weight * kd + (1 - cfg.kd_weight) * parts["task"])
        return parts

    @torch.no_grad()
    def _build_cache(self) -> None:
        """One dense forward: every layer's FFN input x [N, D] (bf16) and true expert norms [N, E]."""
        cfg, model = self.cfg, self.model
        ffns = _ffns(model)
        xs, norms = [[] for _ in ffns], [[] for _ in ffns]
        # dense, unit gates: the inputs the base model itself produces
        with _all_experts_unit_gates(ffns), closing(LogitCapture(ffns, inputs=True)) as cap:
            batches = range(0, self.ids.shape[0], cfg.batch_size)
            for s in tqdm(batches, desc="distill: dense forward", disable=not self.progress):
                ids, mask = self.ids[s : s + cfg.batch_size].to(cfg.device), self.mask[s : s + cfg.batch_size]
                with _autocast(cfg):
                    model(input_ids=ids, attention_mask=mask.to(cfg.device), use_cache=False)
                keep = mask.reshape(-1).bool()
                for i, f in enumerate(ffns):
                    x = cap.inputs[i][keep.to(cap.inputs[i].device)]  # [n, D] real tokens
                    xs[i].append(x.to("cpu", torch.bfloat16))
                    with _autocast(cfg):
                        norms[i].append(f.expert_norms(x.to(next(f.parameters()).dtype)).cpu())  # [n, E]
        self.cache = ([torch.cat(x) for x in xs], [torch.cat(n) for n in norms])

    def _distill_step(self, step: int) -> dict:
        cfg = self.cfg
        xs, norms = self.cache
        n = xs[0].shape[0]
        rows = torch.randint(
            0, n, (cfg.batch_size * 128,), generator=torch.Generator().manual_seed(cfg.seed * 7919 + step)
        )
        losses, logits = [], []
        for f, x, t in zip(_ffns(self.model), xs, norms):
            w = next(f.router.parameters())
            with _autocast(cfg):  # bf16 matmuls: ~3x faster on CPUs with AVX512-BF16, the loss stays fp32
                z = f.router(x[rows].to(w.device, w.dtype))  # [n, E]
            losses.append(distill_loss(z, t[rows].to(w.device), cfg.distill_loss, cfg.distill_power))
            logits.append(z)
        ent, lb = routing_losses(logits, None)
        return {"task": torch.stack(losses).mean(), "entropy": ent, "load_balance": lb}

    def run(self, resume: bool = False, stop_after: int | None = None) -> list[dict]:
        """Train to cfg.total_steps (or stop after `stop_after` steps, as an interruption would)."""
        cfg = self.cfg
        if resume:
            self.resume()
        if cfg.objective == "distill":
            self._build_cache()
        self.model.train() if cfg.trainable != "router" else self.model.eval()
        bar = tqdm(
            total=cfg.total_steps,
            initial=self.state.step,
            desc=f"train ({cfg.objective})",
            disable=not self.progress,
        )
        last_good = self.state.step if (self.out / STATE_FILE).is_file() else None
        end = cfg.total_steps if stop_after is None else min(cfg.total_steps, stop_after)
        with _StopOnSignal() as stop:
            self._loop(end, bar, last_good, stop)
        bar.close()
        self.model.eval()
        return self.state.log

    def _loop(self, end: int, bar, last_good: int | None, stop: _StopOnSignal) -> None:
        cfg = self.cfg
        while self.state.step < end:
            step = self.state.step
            stage, tau = self._stage_tau(step)
            t0 = time.time()
            try:
                parts = self._distill_step(step) if cfg.objective == "distill" else self._lm_step(step, tau)
            except ValueError as e:  # the routing rules refuse NaN logits: the router itself has diverged
                if "NaN" not in str(e):
                    raise
                parts = {
                    "task": torch.tensor(float("nan")),
                    "entropy": torch.tensor(0.0),
                    "load_balance": torch.tensor(0.0),
                }
            loss = parts["task"] + cfg.gamma * parts["entropy"] + cfg.gamma_lb * parts["load_balance"]
            if not torch.isfinite(loss):
                where = (
                    f"the last good checkpoint (step {last_good}) is kept in {self.out}"
                    if last_good is not None
                    else "no checkpoint was written yet"
                )
                raise TrainingDiverged(
                    f"loss became {loss.item()} at step {step} (stage {stage}, τ={tau:.3g}); "
                    f"training stopped; {where}. Lower --lr or check the data"
                )
            scale = cfg.lr_scale(step)
            for group, lr in zip(self.opt.param_groups, (cfg.lr, cfg.backbone_lr)):
                group["lr"] = lr * scale
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.state.step += 1
            self.state.log.append(
                {
                    "step": self.state.step,
                    "stage": stage,
                    "tau": tau,
                    "lr_scale": scale,
                    "loss": loss.item(),
                    **{k: v.item() for k, v in parts.items()},
                    "seconds": round(time.time() - t0, 3),
                }
            )
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", task=f"{parts['task'].item():.4f}", tau=f"{tau:.2f}")
            if self.state.step % cfg.save_every == 0 or self.state.step == cfg.total_steps:
                self.save()
                last_good = self.state.step
            if stop.signum is not None:
                if last_good != self.state.step:
                    self.save()
                bar.close()
                raise TrainingStopped(
                    f"{signal.Signals(stop.signum).name} after step {self.state.step} of {cfg.total_steps}: "
                    f"checkpoint and run state saved in {self.out}; continue with the same command and --resume"
                )


def train(model, tokenizer, cfg: TrainConfig, out, resume: bool = False, progress: bool = True, batches=None):
    """Train `model` (a PrunePath model) in place; writes the checkpoint to `out`; returns (model, log)."""
    tr = Trainer(model, tokenizer, cfg, out, progress, batches=batches)
    log = tr.run(resume=resume)
    model = _base(tr.model)
    if cfg.trainable == "lora":  # fold the adapter in, so the returned model equals prunepath.load(out)
        model = tr.model.merge_and_unload()
    return model.eval(), log
