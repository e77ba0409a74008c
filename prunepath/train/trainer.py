"""Training PrunePath routers (Gu, Fu, Yuan 2026): end-to-end through the gates, or distilled from the FFN itself.

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
import shutil
import signal
import threading
import time
import warnings
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from prunepath.adapter import save_adapter
from prunepath.ffn.module import prunepath_ffns
from prunepath.routing.control import dense_routing, routing_kept, rules, set_gate, set_rule, set_rules, set_tau
from prunepath.routing.rules import Dense
from prunepath.train.config import DENSE_TAU, FULL_WEIGHTS, TrainConfig
from prunepath.train.data import training_batches
from prunepath.train.losses import LogitCapture, distill_loss, kd_loss, routing_losses
from prunepath.train.trainable import _base, _trainable_state, setup_trainable

STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.json"


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


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


class Trainer:
    """One training run writing into `out`; `run()` returns the loss log."""

    def __init__(self, model, tokenizer, cfg: TrainConfig, out, progress: bool = True, batches=None):
        import prunepath

        self.cfg, self.out, self.progress, self.tok = cfg, Path(out), progress, tokenizer
        if not prunepath_ffns(model):
            raise ValueError("train needs a PrunePath model: prunepath.moefy(model) or prunepath.load(ckpt) first")
        if cfg.routing.gate is not None:
            set_gate(model, cfg.routing.gate)
        if cfg.objective == "lm" and cfg.schedule.lr > 0 and prunepath_ffns(model)[0].gate == "one":
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
                "--continue-adapter; load(ckpt, adapter=False) with TrainConfig(lora=LoraSettings(init=ADAPTER))), "
                "start from the routers alone (--no-adapter), or train --trainable all"
            )
        # What the starting checkpoint had been trained with; save() keeps the chain in train_info['previous'].
        prev = dict(getattr(model, "prunepath_train_info", None) or {})
        self.previous = prev.pop("previous", []) + [prev] if prev else []
        self.base_fp = getattr(model, "prunepath_base_fingerprint", None)
        self.rules_after = rules(model)  # the serving rules, restored in every saved checkpoint
        torch.manual_seed(cfg.seed)
        model = model.to(cfg.device)
        # The dense teacher: the starting model with every expert on and unit gates (the base model, or the
        # adapted one when the checkpoint carried an adapter) — the model itself while its backbone is frozen
        # (router) or its new LoRA adapters are switched off; a frozen copy when every weight trains.
        self.frozen_teacher = None
        if cfg.teacher.kind == "dense" and cfg.trainable in FULL_WEIGHTS:
            self.frozen_teacher = copy.deepcopy(model).eval().requires_grad_(False)
            set_rule(self.frozen_teacher, Dense())
            set_gate(self.frozen_teacher, "one")
        self.model, groups = setup_trainable(model, cfg)
        self.opt = torch.optim.AdamW(groups)
        self.state = RunState()
        self._save_model = prunepath.save
        # batches: (input_ids [B, T], attention_mask [B, T]) to train on instead of cfg.data (tests, notebooks)
        self.ids, self.mask = batches if batches is not None else training_batches(tokenizer, cfg.data, cfg.seed)
        self.cache = None
        held = int(self.mask.sum())
        if batches is None and held < 0.9 * cfg.data.tokens:  # a short file or source: say so rather than train on less
            warnings.warn(f"training data {cfg.data.source!r} holds {held:,} tokens of the {cfg.data.tokens:,} "
                          "asked for; the run repeats them more often", stacklevel=2)

    # -- checkpoints ---------------------------------------------------------------------------------

    def save(self) -> None:
        """Run state first, then the PrunePath checkpoint (+ adapter): both atomic renames."""
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / (STATE_FILE + ".tmp")
        torch.save(
            {
                "step": self.state.step,
                "log": self.state.log,
                "config": self.cfg.flat(),
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
            "data": self.cfg.data.source,
            "steps": self.state.step,
            "config": self.cfg.flat(),
            "final_loss": self.state.log[-1]["loss"] if self.state.log else None,
        }
        if self.previous:
            info["previous"] = self.previous
        if self.cfg.trainable == "lora":
            save_adapter(self.model, self.out / "adapter", self.cfg.lora.adapter_dtype)
        elif self.cfg.trainable == "router" and self.adapter_in:  # the routers serve the adapted weights
            shutil.copytree(self.adapter_in, self.out / "adapter", dirs_exist_ok=True)
        with routing_kept(base):
            set_rules(base, self.rules_after)  # the checkpoint records the serving rules, not a training τ
            self._save_model(base, self.out, train_info=info, full_weights=self.cfg.trainable in FULL_WEIGHTS)
        (self.out / LOG_FILE).write_text(
            json.dumps({"config": self.cfg.flat(), "log": self.state.log}, indent=1) + "\n"
        )
        if self.cfg.schedule.keep_every and self.state.step % self.cfg.schedule.keep_every == 0:
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
        now = self.cfg.flat()
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
        saved = self.cfg.replace_flat(**{k: st["config"].get(k, 0) for k in free})  # the saved run's schedule
        rescheduled = (saved.schedule.steps, saved.schedule.decay_steps) != (
            self.cfg.schedule.steps, self.cfg.schedule.decay_steps)
        if rescheduled and (saved.schedule.decay_steps or self.cfg.schedule.decay_steps) and st["step"] > min(
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
        if cfg.objective == "lm" and step < cfg.schedule.stage1_steps:
            return 1, DENSE_TAU
        if cfg.routing.tau_range is not None:
            lo, hi = cfg.routing.tau_range
            return 2, float(lo + (hi - lo) * torch.rand(()).item())
        return 2, cfg.routing.tau

    @contextmanager
    def _dense_teacher(self):
        """The model that gives the teacher's logits: dense rule, unit gates, no adapters (restored after)."""
        if self.frozen_teacher is not None:
            yield self.frozen_teacher
            return
        adapters = self.model.disable_adapter() if self.cfg.trainable == "lora" else nullcontext()
        with dense_routing(self.model), adapters:
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
        epoch, pos = divmod(step * cfg.data.batch_size, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        rows = order[torch.arange(pos, pos + cfg.data.batch_size) % n]
        ids, mask = self.ids[rows].to(cfg.device), self.mask[rows].to(cfg.device)  # [B, T]
        labels = ids.masked_fill(mask == 0, -100)
        teacher = self._teacher_logprobs(ids, mask) if cfg.teacher.kind else None  # [N, V]
        set_tau(self.model, tau)
        cap = LogitCapture(prunepath_ffns(self.model))
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
            w = cfg.teacher.kd_weight
            parts.update(kd=kd, ce=parts["task"], task=w * kd + (1 - w) * parts["task"])
        return parts

    @torch.no_grad()
    def _build_cache(self) -> None:
        """One dense forward: every layer's FFN input x [N, D] (bf16) and true expert norms [N, E]."""
        cfg, model = self.cfg, self.model
        ffns = prunepath_ffns(model)
        xs, norms = [[] for _ in ffns], [[] for _ in ffns]
        # dense, unit gates: the inputs the base model itself produces
        with dense_routing(model), closing(LogitCapture(ffns, inputs=True)) as cap:
            batches = range(0, self.ids.shape[0], cfg.data.batch_size)
            for s in tqdm(batches, desc="distill: dense forward", disable=not self.progress):
                rows = slice(s, s + cfg.data.batch_size)
                ids, mask = self.ids[rows].to(cfg.device), self.mask[rows]
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
            0, n, (cfg.data.batch_size * 128,), generator=torch.Generator().manual_seed(cfg.seed * 7919 + step)
        )
        losses, logits = [], []
        for f, x, t in zip(prunepath_ffns(self.model), xs, norms):
            w = next(f.router.parameters())
            with _autocast(cfg):  # bf16 matmuls: ~3x faster on CPUs with AVX512-BF16, the loss stays fp32
                z = f.router(x[rows].to(w.device, w.dtype))  # [n, E]
            losses.append(distill_loss(z, t[rows].to(w.device), cfg.distill.loss, cfg.distill.power))
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
            loss = parts["task"] + cfg.routing.gamma * parts["entropy"] + cfg.routing.gamma_lb * parts["load_balance"]
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
            for group, lr in zip(self.opt.param_groups, (cfg.schedule.lr, cfg.schedule.backbone_lr)):
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
            if self.state.step % cfg.schedule.save_every == 0 or self.state.step == cfg.total_steps:
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
