"""Batched scoring forwards for the evaluators (`prunepath.evaluate.nlu`): length-sorted, right-padded batches
under a row and a token budget, and a shared prompt prefix run once, its KV cache reused by every row.

Shared prefix. Every k-shot prompt of a task starts with the same demonstrations. A causal LM's states
at those positions do not depend on what follows them, so the prefix runs once ([1, P]) and each batch
continues from a copy of its KV cache, feeding only the rows' own tokens. What the evaluator reports
does not change: the logits are those of the full prompts (up to float rounding), and the routing
statistics count the prefix's tokens once per scored row — its per-token routing decisions, taken once,
are replicated — exactly as if every row had run its whole prompt. Models whose forward takes no cache
fall back to full prompts.

Shapes: B batch, P shared prefix tokens, T suffix tokens, V vocabulary.
"""

from __future__ import annotations

import copy
import inspect
import os
from dataclasses import dataclass
from functools import lru_cache

import torch

MIN_PREFIX = 8  # a shorter shared prefix is not worth a cache


def pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists -> (ids [B, T], attention mask [B, T])."""
    lengths = torch.tensor([len(q) for q in seqs])
    x = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)  # [B, T]
    for i, q in enumerate(seqs):
        x[i, : len(q)] = torch.tensor(q)
    return x, (torch.arange(x.shape[1])[None] < lengths[:, None]).long()


def batches(order: list[int], length, batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Consecutive groups of `order` (sorted by length): at most `batch_size` rows and, with `max_tokens`,
    rows x longest row <= max_tokens (a longer row goes alone). Without `max_tokens`: fixed-size chunks."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out, cur, longest = [], [], 0
    for i in order:
        n = max(longest, length(i)) if cur else length(i)
        if cur and (len(cur) >= batch_size or (max_tokens is not None and (len(cur) + 1) * n > max_tokens)):
            out.append(cur)
            cur, n = [], length(i)
        cur.append(i)
        longest = n
    if cur:
        out.append(cur)
    return out


def shared_prefix_len(seqs: list[list[int]]) -> int:
    """Tokens every sequence starts with, leaving each at least its last token  (0 for < 2 sequences)."""
    if len(seqs) < 2:
        return 0
    return max(0, min(len(os.path.commonprefix([tuple(q) for q in seqs])), min(len(q) for q in seqs) - 1))


@lru_cache(maxsize=8)
def encode_all(tokenizer, texts: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    """Token ids of many texts, cached: a sweep scores the same prompts under every method."""
    return tuple(tuple(ids) for ids in tokenizer(list(texts)).input_ids)


def _cache_kwarg(model) -> str | None:
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):  # transformers >= 5.x renamed past_key_values to cache
        if name in params:
            return name
    return None


@dataclass
class Prefix:
    """A prompt prefix run once: its KV cache (batch 1), and its routing counts if they were recorded."""

    length: int
    cache: object
    kwarg: str
    counts: list | None  # L x [P] experts kept per prefix token (PrunePath models under recording)

    def expand(self, b: int):
        """A fresh cache holding the prefix for b rows (the forward appends to it)."""
        c = copy.deepcopy(self.cache)
        c.batch_repeat_interleave(b)
        return c


@torch.no_grad()
def run_prefix(model, ids: list[int], rec=None) -> Prefix | None:
    """Run `ids` [P] once and keep the cache; None where the model's forward takes no cache."""
    kwarg = _cache_kwarg(model)
    if kwarg is None or len(ids) < MIN_PREFIX:
        return None
    device = next(model.parameters()).device
    kw = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(input_ids=torch.tensor([ids], device=device), use_cache=True, **kw)
    # Its routing counts leave the record now; they are re-added once per scored row at the end (and stay
    # out if the model returned no usable cache: then every row runs its whole prompt).
    counts = rec.take_last() if rec is not None else None
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    return Prefix(len(ids), cache, kwarg, counts)


@torch.no_grad()
def forward_tail(model, seqs: list[list[int]], first: int, pad_id: int, rec=None, prefix: Prefix | None = None):
    """Logits at positions >= `first` of right-padded rows (positions after the prefix, if any)
    -> [B, T - first, V] (model dtype, on the model's device)."""
    x, mask = pad(seqs, pad_id)
    if rec is not None:
        rec.add_mask(mask)
    device = next(model.parameters()).device
    keep = x.shape[1] - first
    kw = {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    if prefix is not None:
        mask = torch.cat([torch.ones(len(seqs), prefix.length, dtype=mask.dtype), mask], 1)  # [B, P + T]
        kw[prefix.kwarg] = prefix.expand(len(seqs))
    out = model(input_ids=x.to(device), attention_mask=mask.to(device), use_cache=prefix is not None, **kw)
    return out.logits[:, -keep:]


@torch.no_grad()
def word_logprobs(model, ctx: list[list[int]], word_ids: list[list[int]], pad_id: int, batch_size: int = 8,
                  rec=None, batch_tokens: int | None = None, share_prefix: bool = True) -> torch.Tensor:
    """log P(word c | ctx[i]), summed over the word's tokens -> [B, C] (float32, CPU).

    Single-token words need one forward per row (the next-token distribution at its last token);
    longer words one forward per (row, word). Rows are sorted by length so batches pad little, and
    `logits_to_keep` drops the logits nobody reads. The rows' common prefix runs once (`share_prefix`).
    """
    single = all(len(w) == 1 for w in word_ids)
    n_pre = shared_prefix_len(ctx) if share_prefix else 0
    prefix = run_prefix(model, list(ctx[0][:n_pre]), rec) if n_pre >= MIN_PREFIX else None
    p = prefix.length if prefix is not None else 0
    order = sorted(range(len(ctx)), key=lambda i: len(ctx[i]))
    extra = 0 if single else max(len(w) for w in word_ids)
    groups = batches(order, lambda i: len(ctx[i]) + extra, batch_size, batch_tokens)
    out = torch.zeros(len(ctx), len(word_ids))  # [B, C]
    rows_run = 0  # (row, forward) pairs: how often the old full-prompt forwards ran the prefix
    words = torch.tensor([w[0] for w in word_ids])
    for idx in groups:
        first = min(len(ctx[i]) for i in idx) - 1 - p  # earliest suffix position whose logits we read
        if single:
            logits = forward_tail(model, [list(ctx[i][p:]) for i in idx], first, pad_id, rec, prefix)
            pos = torch.tensor([len(ctx[i]) - 1 - p - first for i in idx], device=logits.device)  # [B]
            last = logits[torch.arange(len(idx), device=logits.device), pos].float()  # [B, V]
            out[idx] = torch.log_softmax(last, -1)[:, words.to(logits.device)].cpu()
            rows_run += len(idx)
            continue
        for c, w in enumerate(word_ids):
            logits = forward_tail(model, [list(ctx[i][p:]) + list(w) for i in idx], first, pad_id, rec, prefix)
            for j, i in enumerate(idx):
                pos = torch.arange(len(ctx[i]) - 1 - p, len(ctx[i]) - 1 - p + len(w)) - first  # predicts w
                lp = torch.log_softmax(logits[j, pos.to(logits.device)].float(), -1)  # [len(w), V]
                out[i, c] = lp[torch.arange(len(w)), torch.tensor(w)].sum().cpu()
            rows_run += len(idx)
    if prefix is not None and rec is not None:
        rec.add_repeated(prefix.counts, rows_run)
    return out
