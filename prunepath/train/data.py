"""Training text for prunepath.train: LM windows, instruction rows or a labelled task, as padded id batches.

Shape legend: B sequences, T tokens per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

LM_SOURCES = ("calibration", "wikitext2", "alpaca", "alpaca-chat")


@dataclass(frozen=True)
class DataConfig:
    """The training text: where it comes from and how much of it, in sequences of `seq_len` tokens.

    source: calibration | wikitext2 (valid split) | alpaca | alpaca-chat | chat:FILE | text:FILE | a labelled
    task (sst2, rte, jsonl:PATH?text=F&label=F); 'a+b' mixes sources, 'a@N' takes N tokens of a in a mix.
    """

    source: str = "calibration"
    tokens: int = 16384  # training tokens (lm: per epoch over the windows; distill: cached once)
    seq_len: int = 128
    batch_size: int = 8  # lm: sequences per step; distill: x 128 cached rows per step

    def __post_init__(self):
        for name in ("tokens", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_data(self.source)


def _mix_specs(name: str) -> list[tuple[str, int | None]]:
    """'a+b@N+c' -> [(a, None), (b, N), (c, None)]. A file path inside a mix may not contain '+' or '@'."""
    parts = []
    for part in name.split("+"):
        spec, at, n = part.rpartition("@") if "@" in part else (part, "", "")
        if at and not (n.isdigit() and int(n) > 0):
            raise ValueError(f"training data {part!r}: the token count after '@' must be a whole number > 0")
        parts.append((spec, int(n) if at else None))
    return parts


def mix_parts(name: str, tokens: int) -> list[tuple[str, int]]:
    """The sources of a mix 'a+b@N+c' with their token counts: 'part@N' takes N tokens, the other parts
    share the rest equally."""
    parts = _mix_specs(name)
    fixed = sum(n for _, n in parts if n)
    free = [s for s, n in parts if n is None]
    if free and fixed >= tokens:
        raise ValueError(f"training data {name!r}: the '@' counts ({fixed:,}) leave none of --tokens ({tokens:,}) "
                         f"for {', '.join(free)}; raise --tokens")
    share = -(-(tokens - fixed) // len(free)) if free else 0
    return [(s, n or share) for s, n in parts]


def check_data(name: str) -> str:
    """Refuse an unknown training source (or a missing self-data file) before any model is loaded.

    'a+b' mixes sources, 'a@N' takes N tokens of a in a mix.
    """
    from pathlib import Path

    from prunepath import data

    cls = tuple(t for t, s in data.TASKS.items() if s.kind == "classification")
    if "+" in name or "@" in name:
        for part, _ in _mix_specs(name):
            check_data(part)
        return name
    kind, _, path = name.partition(":")
    if kind in ("chat", "text"):
        if not Path(path).is_file():
            mode = " --mode continue" if kind == "text" else ""
            raise FileNotFoundError(f"training data {name!r}: no file at {path!r}; "
                                    f"make one with `prunepath selfdata{mode} --out {path or 'FILE'}`")
        return name
    if name in LM_SOURCES + cls or kind in ("jsonl", "json", "csv", "tsv"):
        return name
    raise ValueError(
        f"unknown training data {name!r}; choose one of {', '.join(LM_SOURCES + cls)}, 'chat:FILE' "
        "(instruction rows from `prunepath selfdata`), 'text:FILE' (text rows from `prunepath selfdata "
        "--mode continue`) or a labelled file "
        "'jsonl:PATH?text=FIELD&label=FIELD' (also csv:)"
    )


def chat_text(tokenizer, row) -> str:
    """One instruction row as a chat turn pair in the model's own template (plain text without one).

    An answer cut off by a generation cap (row["finished"] False) ends where the text ends, without the
    template's end-of-turn token, so training never teaches the model to stop mid-answer.
    """
    from prunepath.evaluate.ifeval import alpaca_prompt

    user, answer = alpaca_prompt(row), row["output"].strip()
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], tokenize=False
        )
        at = text.rfind(answer) if answer else -1
        if row.get("finished", True) or at < 0:  # a template that rewrote the answer: keep the whole turn
            return text
        return text[: at + len(answer)]
    return f"{user}\n{answer}"


def _packed_text(tokenizer, cfg: DataConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Text rows (`selfdata --mode continue`) in a seeded order, joined by EOS and cut into full windows,
    as the LM sources are: no padding is trained on or computed."""
    from prunepath.train.selfdata import read_rows

    rows = read_rows(cfg.source[5:], fields=("text",))
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    need = -(-cfg.tokens // cfg.seq_len) * cfg.seq_len
    flat: list[int] = []
    for i in order:
        flat += tokenizer(rows[i]["text"], add_special_tokens=False)["input_ids"] + sep
        if len(flat) >= need:
            break
    n = min(len(flat), need) // cfg.seq_len
    if n == 0:
        raise ValueError(f"training data {cfg.source!r} has {len(flat)} tokens, fewer than one {cfg.seq_len}-token "
                         "sequence; lower --seq-len or write more rows")
    ids = torch.tensor(flat[: n * cfg.seq_len]).view(n, cfg.seq_len)
    return ids, torch.ones_like(ids)


def training_batches(tokenizer, cfg: DataConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, T], attention_mask [B, T]) for the configured data, cfg.tokens in all.

    'a+b' takes cfg.tokens / 2 from each source, 'a@N+b' N tokens from a and the rest from b (in order, so
    the mix is reproducible); the trainer's per-epoch permutation interleaves them.
    """
    from prunepath import data

    if "+" in cfg.source or "@" in cfg.source:
        parts = mix_parts(cfg.source, cfg.tokens)
        got = [training_batches(tokenizer, replace(cfg, source=d, tokens=n), seed) for d, n in parts]
        return torch.cat([g[0] for g in got]), torch.cat([g[1] for g in got])
    if cfg.source in data.TRAIN_TEXT:
        ids = data.calibration_batches(tokenizer, cfg.tokens, cfg.seq_len, seed=seed,
                                       source=data.TRAIN_TEXT[cfg.source])
        return ids, torch.ones_like(ids)
    if cfg.source == "alpaca":
        rows = data.load_instructions("alpaca", "train")
        texts = [f"{r['instruction']}\n{r['input']}\n{r['output']}".replace("\n\n", "\n") for r in rows]
    elif cfg.source == "alpaca-chat" or cfg.source.startswith("chat:"):
        from prunepath.train.selfdata import read_rows

        rows = data.load_instructions("alpaca", "train") if cfg.source == "alpaca-chat" else read_rows(cfg.source[5:])
        texts = [chat_text(tokenizer, r) for r in rows]
    elif cfg.source.startswith("text:"):
        return _packed_text(tokenizer, cfg, seed)
    elif cfg.source in data.TASKS and data.TASKS[cfg.source].kind == "classification" or ":" in cfg.source:
        ds = data.load_classification(cfg.source, "train")
        names = ds.features["label"].names
        texts = [" ".join(filter(None, [r["text"], r.get("text_pair")])) + f"\nLabel: {names[r['label']]}" for r in ds]
    else:
        check_data(cfg.source)  # raises: every name it accepts is handled above
        raise AssertionError(f"training data {cfg.source!r} passed check_data but has no loader")
    if not texts:
        raise ValueError(f"training data {cfg.source!r} has no rows")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    g = torch.Generator().manual_seed(seed)
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
        raise ValueError(f"training data {cfg.source!r} yields no sequence of >= 2 tokens")
    ids = torch.full((len(seqs), cfg.seq_len), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):  # right padding; the mask keeps it out of every loss term
        ids[r, : len(s)], mask[r, : len(s)] = torch.tensor(s), 1
    return ids, mask
