"""Perplexity of a causal LM on a text, dense or PrunePath-converted (then with the experts kept per token)."""

from __future__ import annotations

import math
import time
from functools import lru_cache

import torch

from prunepath.evaluate.result import EvalResult, keeps_logits, model_name, recording, run_meta


@lru_cache(maxsize=4)
def _encode(tokenizer, text: str) -> torch.Tensor:
    """Token ids of a whole test set, cached: a sweep evaluates the same text under every method.  # [L]"""
    return tokenizer(text, return_tensors="pt").input_ids[0]


@torch.no_grad()
def perplexity(model, tokenizer, text: str, context: int = 1024, stride: int = 512,
               max_tokens: int | None = None, batch_size: int = 4) -> EvalResult:
    """Strided sliding-window perplexity (the HF "perplexity of fixed-length models" recipe).

    Windows of `context` tokens start every `stride` tokens; each window scores only the tokens no
    earlier window scored (its tail), so every token but the first is scored once, with at least
    `context - stride` tokens of left context (except in the first window). NLL is summed over
    tokens, not averaged per window, so a short last window carries its true weight.
    """
    if not 0 < stride <= context:
        raise ValueError(f"need 0 < stride <= context, got stride={stride}, context={context}")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2 (one to predict from, one to score), got {max_tokens}")
    t0 = time.time()
    ids = _encode(tokenizer, text)  # [L]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError(f"text has {ids.numel()} token(s); perplexity needs at least 2")
    device = next(model.parameters()).device
    # Windows (begin, end, n_scored): targets ids[end - n_scored : end], each predicted from its left.
    windows, prev_end = [], 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + context, ids.numel())
        windows.append((begin, end, min(end - prev_end, end - begin - 1)))
        prev_end = end
        if end == ids.numel():
            break
    kw = keeps_logits(model)
    nll, correct, scored = 0.0, 0, 0
    with recording(model) as rec:
        i = 0
        while i < len(windows):
            # Batch consecutive windows of the same shape (all but the first and last, in practice).
            shape = lambda w: (w[1] - w[0], w[2])  # (window length, tokens scored)
            group = [windows[i]]
            while (i + len(group) < len(windows) and len(group) < batch_size
                   and shape(windows[i + len(group)]) == shape(windows[i])):
                group.append(windows[i + len(group)])
            i += len(group)
            x = torch.stack([ids[b:e] for b, e, _ in group]).to(device)  # [B, T]
            n = group[0][2]
            rec.add_mask(torch.ones_like(x))
            out = model(input_ids=x, use_cache=False, **({"logits_to_keep": n + 1} if kw else {}))
            logits = out.logits[:, -(n + 1):-1].float()  # [B, n, V] predicts x[:, -n:]
            target = x[:, -n:]  # [B, n]
            nll += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="sum"))
            correct += int((logits.argmax(-1) == target).sum())
            scored += target.numel()
    ppl = math.exp(nll / scored)
    return EvalResult(
        task="wikitext2",
        metrics={"perplexity": ppl, "nll": nll / scored, "next_token_accuracy": correct / scored},
        n=scored, protocol=f"strided sliding window, context {context}, stride {stride}, scored tails only",
        dataset="wikitext2", split="test",
        settings={"context": context, "stride": stride, "max_tokens": max_tokens, "tokens": int(ids.numel()),
                  "windows": len(windows)},
        routing=rec.info, model=model_name(model),
        meta=run_meta(model, t0),
    )
