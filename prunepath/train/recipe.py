"""Recipes as data: the stages that made a checkpoint, each one `prunepath` command line.

`DEFAULT_RECIPE` is how the packaged default checkpoint was made (thirteen stages). Stages 1–8 alternate
the routers (distilled, backbone frozen) and a LoRA adapter (trained through the sparse model, routers
frozen, the dense base model the teacher); stage 9 fine-tunes every linear layer, stage 10 extracts that
change as a rank-24 adapter, stage 11 trains it further; stage 12 fine-tunes every linear layer once more and
stage 13 extracts it into 8-bit rows within 15.1 MB. The adapter stages train on self-generated corpora
(`prunepath selfdata`: the dense model's continuations of real text and its own answers to instructions,
`Corpus`) mixed with real text.

    for stage in DEFAULT_RECIPE.stages:
        print(stage.number, stage.does)
        print("   ", stage.shell())

Each stage's `command` is what was run, in the form `prunepath` parses (`tests/test_recipe.py` parses every
one with the real command line). Runs stopped by a time budget are described by the steps they reached.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass


@dataclass(frozen=True)
class Corpus:
    """A self-generated training corpus: `prunepath selfdata` writers and the seeds they ran with."""

    name: str  # "A" ... "I"; the files are <letter>_calib.jsonl, <letter>_wt.jsonl, <letter>_answers.jsonl
    seed: int  # the continuation writers' seed (and the first answer writer's)
    answer_seeds: tuple[int, ...]  # one answer writer per seed, their rows concatenated
    continuation_samples: int | None = None  # --samples of each continuation writer, where it is known
    note: str = ""  # what the writers produced (they were stopped by a time limit)

    def commands(self) -> tuple[tuple[str, ...], ...]:
        """The `prunepath selfdata` commands of this corpus (continuations of calibration and WikiText-2 text,
        then the answers)."""
        p = self.name.lower()
        samples = () if self.continuation_samples is None else ("--samples", str(self.continuation_samples))
        cont = tuple(
            ("selfdata", "--mode", "continue", "--source", src, *samples, "--batch-size", "1024", "--device", "cuda",
             "--seed", str(self.seed), "--out", f"{p}_{short}.jsonl")
            for src, short in (("calibration", "calib"), ("wikitext2", "wt"))
        )
        answers = tuple(
            ("selfdata", "--samples", "4", "--temperature", "1", "--top-p", "0.95", "--max-new-tokens", "384",
             "--batch-size", "512", "--device", "cuda", "--seed", str(s),
             "--out", f"{p}_answers{'' if i == 0 else f'_{i + 1}'}.jsonl")
            for i, s in enumerate(self.answer_seeds)
        )
        return cont + answers


@dataclass(frozen=True)
class Stage:
    """One stage of a recipe."""

    number: int
    does: str  # what the stage trains or makes, in one line
    command: tuple[str, ...]  # the `prunepath` arguments, e.g. ("train", "--checkpoint", "s1", ...)
    device: str = "cuda"  # where the run was made: "cpu" or "cuda" (one H200)
    corpus: str | None = None  # the self-generated corpus its data mix names (`Recipe.corpora`)

    def shell(self) -> str:
        return "prunepath " + shlex.join(self.command)


@dataclass(frozen=True)
class Recipe:
    name: str
    stages: tuple[Stage, ...]
    corpora: tuple[Corpus, ...] = ()

    def corpus(self, name: str) -> Corpus:
        for c in self.corpora:
            if c.name == name:
                return c
        raise KeyError(f"recipe {self.name!r} has no corpus {name!r}; it has {[c.name for c in self.corpora]}")


def _mix(letter: str, answers: int) -> str:
    p = letter.lower()
    return (f"calibration@200000+wikitext2@200000+chat:{p}_answers.jsonl@{answers}"
            f"+text:{p}_calib.jsonl+text:{p}_wt.jsonl")


_DISTILL = ("--objective", "distill", "--seq-len", "256", "--batch-size", "8", "--save-every", "100", "--tau", "0.9")
_ADAPTER = ("--objective", "lm", "--gate", "one", "--seq-len", "512", "--stage1-steps", "0", "--tau", "0.7",
            "--tau-range", "0.4", "1.05", "--trainable", "lora", "--lora-targets", "all", "--backbone-lr", "5e-4",
            "--lr", "0", "--teacher", "dense", "--kd-weight", "0.7", "--device", "cuda")
_LINEAR = ("--trainable", "linear", "--objective", "lm", "--gate", "one", "--tokens", "7000000", "--seq-len", "512",
           "--batch-size", "64", "--stage1-steps", "0", "--tau", "0.7", "--tau-range", "0.4", "1.05",
           "--backbone-lr", "1e-4", "--lr", "0", "--teacher", "dense", "--kd-weight", "0.7", "--device", "cuda",
           "--save-every", "250")
_BIG = ("--tokens", "7000000", "--batch-size", "64")


def _adapter_stage(n, does, start, letter, answers, steps, seed, *extra, decay=None, cont=True, rank=8, bf16=False):
    return Stage(n, does, (
        "train", "--checkpoint", start, *(("--continue-adapter",) if cont else ()), *_ADAPTER,
        "--data", _mix(letter, answers), *extra, "--steps", str(steps),
        *(("--decay-steps", str(decay)) if decay else ()), "--lora-r", str(rank),
        *(("--adapter-dtype", "bf16") if bf16 else ()), "--seed", str(seed), "--out", f"s{n}",
    ), corpus=letter)


DEFAULT_RECIPE = Recipe(
    name="default",
    corpora=(
        Corpus("A", 0, (0,), 6144, "the answer writer was stopped by a time limit; its first 2,560 rows were kept"),
        Corpus("B", 1, (1,), 12288, "4.93M tokens with the real text"),
        Corpus("C", 2, (2, 3), None, "4.49M tokens with the real text"),
        Corpus("D", 4, (4, 5), None, "4.22M tokens with the real text"),
        Corpus("E", 6, (6, 7), None, "4.21M tokens with the real text"),
        Corpus("F", 8, (8, 9), None, "2.31M tokens with the real text"),
        Corpus("G", 10, (10, 11), None, "5.46M tokens with the real text (v8's stage 12)"),
        Corpus("H", 10, (10, 11), None, "the writers of G run again: 7M tokens or more (v9's stage 12)"),
        Corpus("I", 10, (10, 11), None, "the writers of G run once more: 4.90M tokens with the real text"),
    ),
    stages=(
        Stage(1, "routers distilled on the frozen base model", (
            "train", "--out", "s1", *_DISTILL, "--tokens", "8192", "--steps", "300", "--amp"), device="cpu"),
        _adapter_stage(2, "a new rank-8 adapter on corpus A", "s1", "A", 400000, 1750, 0,
                       "--tokens", "4000000", "--batch-size", "16", cont=False),
        Stage(3, "routers distilled again, on the adapted weights (the adapter is copied along)", (
            "train", "--checkpoint", "s2", "--out", "s3", *_DISTILL, "--tokens", "8192", "--steps", "300", "--amp")),
        _adapter_stage(4, "the adapter trained further on corpus B", "s3", "B", 400000, 1200, 1, *_BIG),
        Stage(5, "routers distilled again", (
            "train", "--checkpoint", "s4", "--out", "s5", *_DISTILL, "--tokens", "65536", "--steps", "600",
            "--device", "cuda", "--seed", "0")),
        _adapter_stage(6, "the adapter trained further on corpus C, cooling down over the last 300 steps", "s5", "C",
                       600000, 1200, 2, *_BIG, decay=300),
        _adapter_stage(7, "the adapter grown to rank 24 (exactly) and trained further on corpus D, saved in bf16",
                       "s6", "D", 600000, 600, 4, *_BIG, decay=150, rank=24, bf16=True),
        _adapter_stage(8, "the rank-24 adapter trained further on corpus E", "s7", "E", 600000, 600, 6, *_BIG,
                       decay=150, rank=24, bf16=True),
        Stage(9, "every linear layer of s8 fine-tuned on corpus F (full weights, not committed)", (
            "train", "--checkpoint", "s8", *_LINEAR, "--data", _mix("F", 600000), "--steps", "1500",
            "--decay-steps", "300", "--seed", "8", "--out", "s9"), corpus="F"),
        Stage(10, "the fine-tune's change from the base model as a rank-24 adapter, with the same routers", (
            "extract-adapter", "--checkpoint", "s9", "--rank", "24", "--out", "s10")),
        _adapter_stage(11, "that adapter trained further on corpus F", "s10", "F", 600000, 300, 9, *_BIG,
                       "--save-every", "50", decay=100, rank=24, bf16=True),
        Stage(12, "every linear layer of s11 fine-tuned on corpus I (full weights, not committed)", (
            "train", "--checkpoint", "s11", *_LINEAR, "--data", _mix("I", 600000), "--steps", "1000",
            "--decay-steps", "250", "--seed", "10", "--out", "s12"), corpus="I"),
        Stage(13, "the fine-tune's change as an 8-bit adapter within 15.1 MB, weighted by its inputs and gradients", (
            "extract-adapter", "--checkpoint", "s12", "--size-mb", "15.1", "--whiten", "65536", "--fisher",
            "--adapter-dtype", "int8", "--device", "cuda", "--out", "s13")),
    ),
)
