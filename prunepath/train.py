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

Trainable parts (`--trainable`): `router` (default; checkpoint ~2 MB), `lora` (peft adapters on the
FFN's gate/up/down and/or attention, saved to <out>/adapter/, merged by prunepath.load), `all`
(saved with full weights, never committed). Every K steps the run state (trainable tensors, optimizer,
step, RNG) goes to <out>/train_state.pt and the PrunePath checkpoint to <out>; `--resume` continues.
A non-finite loss stops the run before the optimizer step, leaving the last good checkpoint untouched.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

OBJECTIVES = ("lm", "distill")
TRAINABLE = ("router", "lora", "all")
DENSE_TAU = 1.05  # stage 1: τ > 1 keeps every expert
STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.json"


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint was kept."""


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
    weight_decay: float = 1e-2  # routers only; the backbone gets none (as the paper)
    distill_loss: str = "kl"  # kl | bce
    distill_power: float = 1.0  # kl target q ∝ norm^power: < 1 flattens p, so counts vary less between tokens
    gate: str | None = None  # override the checkpoint's gate kind (sigmoid | softmax | one)
    lora_r: int = 8
    lora_targets: str = "ffn"  # ffn | attn | all
    seed: int = 0
    save_every: int = 100
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
        for name in ("tokens", "seq_len", "batch_size", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 0 or self.stage1_steps < 0 or self.steps + self.stage1_steps == 0:
            raise ValueError("need steps >= 0, stage1_steps >= 0 and at least one step in all")
        if self.gate not in (None, "sigmoid", "softmax", "one"):
            raise ValueError(f"gate must be 'sigmoid', 'softmax' or 'one', got {self.gate!r}")
        check_data(self.data)
        if self.lora_targets not in ("ffn", "attn", "all"):
            raise ValueError(f"lora_targets must be 'ffn', 'attn' or 'all', got {self.lora_targets!r}")

    @property
    def total_steps(self) -> int:
        return (self.stage1_steps if self.objective == "lm" else 0) + self.steps


@dataclass
class RunState:
    step: int = 0
    log: list = field(default_factory=list)  # one dict per step: the loss curves


# ---------------------------------------------------------------------------------------------------------
# losses on captured router logits


def routing_losses(logits: list[torch.Tensor], mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean-over-layers token entropy, mean-over-layers load balance) of logits L x [N, E]; mask [N] bool."""
    ent, lb = [], []
    for z in logits:
        if mask is not None:
            z = z[mask]  # real tokens only
        logp = F.log_softmax(z.float(), dim=-1)  # [n, E]
        p = logp.exp()
        ent.append(-(p * logp).sum(-1).mean())
        lb.append(z.shape[-1] * (p.mean(0) ** 2).sum())
    return torch.stack(ent).mean(), torch.stack(lb).mean()


def distill_loss(z: torch.Tensor, norms: torch.Tensor, kind: str = "kl", power: float = 1.0) -> torch.Tensor:
    """Router logits z [N, E] against true expert norms [N, E]."""
    norms = norms.float() ** power
    if kind == "kl":
        q = norms / norms.sum(-1, keepdim=True).clamp_min(1e-12)  # [N, E] each expert's share
        return F.kl_div(F.log_softmax(z.float(), -1), q, reduction="batchmean")
    # MoEfication: positive-activation importance divided by the max, BCE with logits
    target = norms / norms.amax().clamp_min(1e-12)
    return F.binary_cross_entropy_with_logits(z.float(), target)


class LogitCapture:
    """Forward hooks on every `ffn.router` (and optionally the FFN input) — removed by `close()`."""

    def __init__(self, ffns, inputs: bool = False):
        self.logits: list = [None] * len(ffns)
        self.inputs: list = [None] * len(ffns)
        self.handles = []
        for i, f in enumerate(ffns):
            self.handles.append(
                f.router.register_forward_hook(lambda _m, _a, out, i=i: self.logits.__setitem__(i, out))
            )
            if inputs:
                self.handles.append(
                    f.register_forward_pre_hook(
                        lambda _m, a, i=i: self.inputs.__setitem__(i, a[0].detach().reshape(-1, a[0].shape[-1]))
                    )
                )

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles = []


# ---------------------------------------------------------------------------------------------------------
# data


def check_data(name: str) -> str:
    """Refuse an unknown training source before any model is loaded."""
    from prunepath import data

    lm = ("calibration", "wikitext2", "alpaca")
    cls = tuple(t for t, s in data.TASKS.items() if s.kind == "classification")
    if name in lm + cls or name.split(":", 1)[0] in ("jsonl", "json", "csv", "tsv"):
        return name
    raise ValueError(
        f"unknown training data {name!r}; choose one of {', '.join(lm + cls)} or a labelled file "
        "'jsonl:PATH?text=FIELD&label=FIELD' (also csv:)"
    )


def training_batches(tokenizer, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, T], attention_mask [B, T]) for the configured data, cfg.tokens in all."""
    from prunepath import data

    if cfg.data in ("calibration", "wikitext2"):
        source = "calibration" if cfg.data == "calibration" else "wikitext2:valid"
        ids = data.calibration_batches(tokenizer, cfg.tokens, cfg.seq_len, seed=cfg.seed, source=source)
        return ids, torch.ones_like(ids)
    if cfg.data == "alpaca":
        rows = data.load_instructions("alpaca", "train")
        texts = [f"{r['instruction']}\n{r['input']}\n{r['output']}".replace("\n\n", "\n") for r in rows]
    elif cfg.data in data.TASKS and data.TASKS[cfg.data].kind == "classification" or ":" in cfg.data:
        ds = data.load_classification(cfg.data, "train")
        names = ds.features["label"].names
        texts = [" ".join(filter(None, [r["text"], r.get("text_pair")])) + f"\nLabel: {names[r['label']]}" for r in ds]
    else:
        known = ", ".join(
            ["calibration", "wikitext2", "alpaca"] + [t for t, s in data.TASKS.items() if s.kind == "classification"]
        )
        raise ValueError(
            f"unknown training data {cfg.data!r}; choose one of {known} or a 'jsonl:PATH?text=..&label=..' spec"
        )
    if not texts:
        raise ValueError(f"training data {cfg.data!r} has no rows")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(texts), generator=g).tolist()
    seqs, total = [], 0
    for i in order:
        s = tokenizer(texts[i], add_special_tokens=False)["input_ids"][: cfg.seq_len]
        if len(s) < 2:
            continue
        seqs.append(s)
        total += len(s)
        if total >= cfg.tokens:
            break
    if not seqs:
        raise ValueError(f"training data {cfg.data!r} yields no sequence of >= 2 tokens")
    ids = torch.full((len(seqs), cfg.seq_len), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):  # right padding; the mask keeps it out of every loss term
        ids[r, : len(s)], mask[r, : len(s)] = torch.tensor(s), 1
    return ids, mask


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

        targets = {
            "ffn": ["gate_proj", "up_proj", "down_proj"],
            "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
        }
        names = targets["ffn"] + targets["attn"] if cfg.lora_targets == "all" else targets[cfg.lora_targets]
        model = get_peft_model(
            model, LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, target_modules=names, lora_dropout=0.0)
        )
        backbone = [p for n, p in model.named_parameters() if "lora_" in n]
    elif cfg.trainable == "all":
        backbone = [p for n, p in model.named_parameters() if ".router." not in n]
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
        self.base_fp = getattr(model, "prunepath_base_fingerprint", None)
        self.rule_after = model.rule_spec
        torch.manual_seed(cfg.seed)
        self.model, groups = setup_trainable(model.to(cfg.device), cfg)
        self.opt = torch.optim.AdamW(groups)
        self.state = RunState()
        self._save_model = prunepath.save
        # batches: (input_ids [B, T], attention_mask [B, T]) to train on instead of cfg.data (tests, notebooks)
        self.ids, self.mask = batches if batches is not None else training_batches(tokenizer, cfg)
        self.cache = None

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
        if self.cfg.trainable == "lora":
            self.model.save_pretrained(self.out / "adapter")
        rules = [f.rule for f in _ffns(base)]
        base.set_rule(self.rule_after)  # the checkpoint records the serving rule, not a training τ
        self._save_model(base, self.out, train_info=info, full_weights=self.cfg.trainable == "all")
        for f, r in zip(_ffns(base), rules):
            f.rule = r
        (self.out / LOG_FILE).write_text(
            json.dumps({"config": asdict(self.cfg), "log": self.state.log}, indent=1) + "\n"
        )

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
        if st["config"] != asdict(self.cfg):
            diff = sorted(k for k in st["config"] if st["config"][k] != asdict(self.cfg).get(k))
            raise ValueError(
                f"cannot resume: the saved run used other settings ({', '.join(diff)}); use the same flags"
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

    def _lm_step(self, step: int, tau: float) -> dict:
        cfg = self.cfg
        n = self.ids.shape[0]
        # Batch order: a fixed permutation per epoch (seeded), so the stream of batches is reproducible.
        epoch, pos = divmod(step * cfg.batch_size, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        rows = order[torch.arange(pos, pos + cfg.batch_size) % n]
        ids, mask = self.ids[rows].to(cfg.device), self.mask[rows].to(cfg.device)  # [B, T]
        labels = ids.masked_fill(mask == 0, -100)
        _set_tau(self.model, tau)
        cap = LogitCapture(_ffns(self.model))
        try:
            with _autocast(cfg):
                task = self.model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
            ent, lb = routing_losses(cap.logits, mask.reshape(-1).bool())
        finally:
            cap.close()
        return {"task": task.float(), "entropy": ent, "load_balance": lb}

    @torch.no_grad()
    def _build_cache(self) -> None:
        """One dense forward: every layer's FFN input x [N, D] (bf16) and true expert norms [N, E]."""
        cfg, model = self.cfg, self.model
        ffns = _ffns(model)
        saved = [(f.rule, f.gate) for f in ffns]
        from prunepath import routing

        for f in ffns:  # dense, unit gates: the inputs the base model itself produces
            f.rule, f.gate = routing.Dense(), "one"
        xs, norms = [[] for _ in ffns], [[] for _ in ffns]
        cap = LogitCapture(ffns, inputs=True)
        try:
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
        finally:
            cap.close()
            for f, (r, g) in zip(ffns, saved):
                f.rule, f.gate = r, g
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
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.state.step += 1
            self.state.log.append(
                {
                    "step": self.state.step,
                    "stage": stage,
                    "tau": tau,
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
        bar.close()
        self.model.eval()
        return self.state.log


def train(model, tokenizer, cfg: TrainConfig, out, resume: bool = False, progress: bool = True, batches=None):
    """Train `model` (a PrunePath model) in place; writes the checkpoint to `out`; returns (model, log)."""
    tr = Trainer(model, tokenizer, cfg, out, progress, batches=batches)
    log = tr.run(resume=resume)
    model = _base(tr.model)
    if cfg.trainable == "lora":  # fold the adapter in, so the returned model equals prunepath.load(out)
        model = tr.model.merge_and_unload()
    return model.eval(), log


# ---------------------------------------------------------------------------------------------------------
# CLI


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train PrunePath routers (and optionally LoRA / all weights)",
        description=__doc__.split("\n\n")[0],
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="start from this PrunePath checkpoint ('default' or a folder)")
    src.add_argument("--model", default=None, help="convert this base model first (default SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="folder for the checkpoint, train_state.pt and train_log.json")
    p.add_argument("--resume", action="store_true", help="continue from <out>/train_state.pt")
    d = TrainConfig()
    for name, kind, help_ in (
        (
            "objective",
            str,
            "lm (paper: task loss through gates) | distill (MoEfication-style, frozen backbone)",
        ),
        ("trainable", str, "router | lora | all"),
        ("data", str, "calibration | wikitext2 | alpaca | sst2 | rte | jsonl:..."),
        ("tokens", int, "training tokens"),
        ("seq_len", int, "tokens per sequence"),
        ("batch_size", int, "sequences per step"),
        ("stage1_steps", int, "lm: steps at τ=1.05 (all experts)"),
        ("steps", int, "stage-2 steps"),
        ("tau", float, "stage-2 τ"),
        ("gamma", float, "entropy weight γ"),
        ("gamma_lb", float, "load-balance weight γ_lb"),
        ("lr", float, "router learning rate"),
        ("backbone_lr", float, "LoRA / full learning rate"),
        ("weight_decay", float, "router weight decay"),
        ("distill_loss", str, "kl | bce"),
        ("distill_power", float, "KL target q ∝ expert norm^power (<1 flattens p)"),
        ("gate", str, "set the gate kind: sigmoid | softmax | one"),
        ("lora_r", int, "LoRA rank"),
        ("lora_targets", str, "ffn | attn | all"),
        ("seed", int, "random seed"),
        ("save_every", int, "save every K steps"),
    ):
        p.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=kind,
            default=getattr(d, name),
            help=f"{help_} (default {getattr(d, name)})",
        )
    p.add_argument("--tau-range", type=float, nargs=2, default=None, metavar=("LO", "HI"), help="sample τ per batch")
    p.add_argument("--device", default="cpu", help="cpu | cuda (bf16 autocast on CUDA)")
    p.add_argument("--amp", action=_BoolFlag, default=None, help="bf16 autocast (--amp / --no-amp)")
    p.add_argument("--router-init", default="centroid", choices=["zero", "centroid"], help="with --model")
    p.add_argument("--expert-size", type=int, default=32, help="with --model")
    p.set_defaults(func=run)


class _BoolFlag(argparse.Action):
    def __init__(self, option_strings, dest, **kw):
        opts = option_strings + [s.replace("--", "--no-") for s in option_strings]
        super().__init__(opts, dest, nargs=0, **kw)

    def __call__(self, parser, ns, values, option_string=None):
        setattr(ns, self.dest, not option_string.startswith("--no-"))


def run(args) -> int:
    import prunepath
    from prunepath.convert import MoefyConfig

    fields = {f for f in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig(**{k: (tuple(v) if k == "tau_range" and v else v) for k, v in vars(args).items() if k in fields})
    out = Path(args.out)
    # A resumed run starts from the same source as the interrupted one; train_state.pt restores the rest.
    if args.checkpoint:
        model, tok = prunepath.load(args.checkpoint, device=cfg.device)
    else:
        model, tok = prunepath.load_model(args.model or prunepath.DEFAULT_MODEL, device=cfg.device)
        gate = cfg.gate or ("one" if cfg.objective == "distill" else "sigmoid")
        model = prunepath.moefy(
            model,
            MoefyConfig(
                expert_size=args.expert_size,
                router_init=args.router_init,
                rule=f"mass:{cfg.tau}",
                gate=gate,
                seed=cfg.seed,
            ),
        )
    if not args.resume and (out / STATE_FILE).is_file():
        raise ValueError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    try:
        _, log = train(model, tok, cfg, out, resume=args.resume)
    except TrainingDiverged as e:
        print(f"prunepath train: {e}")
        return 3
    print(f"trained {len(log)} steps; final loss {log[-1]['loss']:.4f}; checkpoint in {out}")
    return 0
