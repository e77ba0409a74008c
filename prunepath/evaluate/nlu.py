"""Classification accuracy of a causal LM under two stated protocols (`prunepath eval --task sst2`).

A 135M model prompted zero-shot is near chance (SST-2 ~0.68), so neither protocol is plain zero-shot:
- `prompt`: the log-probability of each class's label word after a k-shot prompt. Demonstrations are
  drawn once with a fixed seed (class-balanced) and shared by every test row, so the prompt has one
  label prior; contextual calibration (Zhao et al. 2021, "Calibrate before use") estimates it from the
  same prompt with content-free inputs ("N/A", "", "[MASK]") and divides it out. The uncalibrated
  accuracy of the same forwards is reported beside it. With `demo_sets` K > 1, K demonstration sets
  (seeds seed … seed+K-1) each score every row, and their calibrated label distributions are averaged:
  one draw of k demonstrations moves a small sparse model's accuracy by several points, K draws less.
  Each set's own accuracy and two split-half ensembles are reported, so the spread is measured too.
- `probe`: multinomial logistic regression on the frozen final hidden state (last token or mean-pooled),
  trained on (a seeded subset of) the train split, L2 chosen on a split of the training rows. It asks
  whether the representation still separates the classes after sparsification.

Tasks without an offline train split (BoolQ, a single jsonl/csv file) lend a seeded held-out part of
their evaluation rows for demonstrations / probe training, excluded from scoring; results say so.

Shapes: B batch, T tokens, V vocabulary, C classes, D hidden.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from prunepath.evaluate import scoring
from prunepath.evaluate.result import EvalResult, RoutingRecorder, keeps_logits, model_name, recording, run_meta

PROTOCOLS = ("prompt", "probe")


@dataclass(frozen=True)
class Template:
    """How one example becomes a prompt: `fmt` is filled with text/text_pair and ends where the label
    word goes; `words[c]` is the continuation scored for class c (leading space: one word token)."""

    fmt: str
    words: tuple[str, ...]


TEMPLATES = {
    "sst2": Template("Review: {text}\nSentiment:", (" negative", " positive")),
    # RTE label 0 = entailment, 1 = not entailment.
    "rte": Template("{text}\nQuestion: {text_pair} True or False?\nAnswer:", (" True", " False")),
    # BoolQ label 0 = false, 1 = true; text is the passage, text_pair the (lower-case, "?"-less) question.
    "boolq": Template("{text}\nQuestion: {text_pair}?\nAnswer:", (" no", " yes")),
}
CONTENT_FREE = ("N/A", "", "[MASK]")  # Zhao et al. 2021 average over these three


def _label_names(name: str, ds) -> tuple[str, ...]:
    feat = ds.features.get("label")
    if hasattr(feat, "names"):
        return tuple(feat.names)
    try:
        from prunepath import data

        spec = data.TASKS.get(name)
        if spec is not None and spec.label_names:
            return tuple(spec.label_names)
    except ImportError:
        pass
    return tuple(str(i) for i in range(int(max(ds["label"])) + 1))


def template_for(name: str, label_names: tuple[str, ...], has_pair: bool) -> Template:
    if name in TEMPLATES:
        return TEMPLATES[name]
    fmt = "Text: {text}\n" + ("Text 2: {text_pair}\n" if has_pair else "") + "Label:"
    return Template(fmt, tuple(" " + str(n).replace("_", " ") for n in label_names))


def _fill(t: Template, row: dict) -> str:
    return t.fmt.format(text=row["text"].strip(), text_pair=(row.get("text_pair") or "").strip())


def build_prompt(t: Template, demos: list[dict], row: dict) -> str:
    """k-shot prompt: each demonstration with its label word, blank-line separated, then the query."""
    shots = [_fill(t, d) + t.words[d["label"]] for d in demos]
    return "\n\n".join([*shots, _fill(t, row)])


def pick_demos(pool, k: int, n_classes: int, seed: int) -> list[dict]:
    """k demonstrations drawn with a fixed seed, as class-balanced as k allows, in shuffled order."""
    if k == 0:
        return []
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor(pool["label"])
    by_class = [torch.nonzero(labels == c).flatten() for c in range(n_classes)]
    by_class = [idx[torch.randperm(idx.numel(), generator=g)] for idx in by_class]
    chosen = [int(by_class[j % n_classes][j // n_classes]) for j in range(k)
              if j // n_classes < by_class[j % n_classes].numel()]
    order = torch.randperm(len(chosen), generator=g).tolist()
    return [dict(pool[chosen[i]]) for i in order]


def calibrate(probs: torch.Tensor, p_cf: torch.Tensor) -> torch.Tensor:
    """Contextual calibration: q ∝ p / p_cf (W = diag(p_cf)^-1, b = 0), renormalised.
    probs [B, C] label distribution per input; p_cf [C] the same prompt's on content-free inputs."""
    q = probs / p_cf  # [B, C]
    return q / q.sum(-1, keepdim=True)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


@torch.no_grad()
def label_logprobs(model, tokenizer, prompts: list[str], words: tuple[str, ...], batch_size: int = 8,
                   rec: RoutingRecorder | None = None, batch_tokens: int | None = None,
                   share_prefix: bool = True) -> torch.Tensor:
    """log P(words[c] | prompt), summed over the word's tokens -> [B, C].

    Single-token words (the usual case) need one forward per prompt, reading the next-token
    distribution at the prompt's last token; longer words need one forward per class. Prompts are
    sorted by length and batched (`batch_size` rows, and with `batch_tokens` at most that many prompt
    tokens, padding included) so batches pad little, and `logits_to_keep` drops the logits nobody reads.
    With `share_prefix` the prompts' common prefix (the demonstrations) runs once and every batch reuses
    its KV cache; the numbers are the same (see `prunepath.evaluate.scoring`). Pass `rec` when recording routing.
    """
    word_ids = [tokenizer(w, add_special_tokens=False).input_ids for w in words]
    if any(len(w) == 0 for w in word_ids):
        raise ValueError(f"a label word tokenizes to nothing: {words}. Fix: name the classes with words "
                         "(&labels=WORD,WORD,... in a file spec)")
    first: dict[tuple, str] = {}  # token ids -> the first word that tokenizes to them
    for w, ids in zip(words, word_ids):
        if first.setdefault(tuple(ids), w) != w or words.count(w) > 1:
            raise ValueError(f"label words {first[tuple(ids)]!r} and {w!r} are the same tokens, so their classes "
                             "cannot be told apart. Fix: give every class its own word (&labels=WORD,WORD,... in "
                             "a file spec, in the order of the label values)")
    ctx = scoring.encode_all(tokenizer, tuple(prompts))
    return scoring.word_logprobs(model, ctx, word_ids, _pad_id(tokenizer), batch_size, rec, batch_tokens,
                                 share_prefix)


# ---------------------------------------------------------------------------------------------
# Classification: linear probe


@torch.no_grad()
def hidden_features(model, tokenizer, texts: list[str], pooling: str = "last", batch_size: int = 8,
                    rec: RoutingRecorder | None = None, batch_tokens: int | None = None) -> torch.Tensor:
    """Final hidden state per text -> [B, D]: at the last real token, or averaged over real tokens."""
    if pooling not in ("last", "mean"):
        raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
    ids = scoring.encode_all(tokenizer, tuple(texts))
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    feats: list[torch.Tensor | None] = [None] * len(ids)
    device = next(model.parameters()).device
    kw = {"logits_to_keep": 1} if keeps_logits(model) else {}
    for idx in scoring.batches(order, lambda i: len(ids[i]), batch_size, batch_tokens):
        x, mask = scoring.pad([list(ids[i]) for i in idx], _pad_id(tokenizer))
        if rec is not None:
            rec.add_mask(mask)
        out = model(input_ids=x.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                    use_cache=False, **kw)
        h = out.hidden_states[-1].float().cpu()  # [B, T, D]
        if pooling == "last":
            pooled = h[torch.arange(len(idx)), mask.sum(1) - 1]  # [B, D]
        else:
            pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # [B, D]
        for j, i in enumerate(idx):
            feats[i] = pooled[j]
    return torch.stack(feats)


def fit_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = 1e-2, steps: int = 200):
    """Multinomial logistic regression on standardised features, full-batch L-BFGS.
    x [B, D], y [B] -> predict(x [M, D]) -> [M] class ids. A probe, deliberately small."""
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd  # [B, D]
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)  # [D, C]
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda q: (((q - mu) / sd) @ w + b).argmax(-1)


def select_l2(x: torch.Tensor, y: torch.Tensor, n_classes: int, seed: int,
              grid=(1e-3, 1e-2, 1e-1, 1.0, 10.0)) -> float:
    """Pick the L2 weight on a 20% split of the training features (the eval split is never seen)."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + 1))
    cut = max(1, len(y) // 5)
    va, tr = perm[:cut], perm[cut:]
    accs = [float((fit_probe(x[tr], y[tr], n_classes, l2)(x[va]) == y[va]).float().mean()) for l2 in grid]
    return grid[max(range(len(grid)), key=lambda i: (accs[i], grid[i]))]  # ties -> stronger L2


# ---------------------------------------------------------------------------------------------
# Classification: the task


def task_splits(name: str, seed: int = 0, holdout: int = 500):
    """(eval rows, demonstration/probe-training rows, where the latter came from).

    Evaluation uses the validation split (a file spec: its `{split}` = validation, else test, or the
    single file). Without an offline train split (BoolQ; a single file) a seeded held-out part of the
    evaluation rows is lent for demonstrations / probe training and excluded from scoring.
    """
    from prunepath import data

    spec = data.TASKS.get(name)
    per_split = spec is None and "{split}" in name
    ev_split = "validation"
    if per_split and not _split_file_exists(name, "validation"):
        ev_split = "test"
    ev = data.load_classification(name, ev_split)
    if len(ev) == 0:
        raise ValueError(f"task {name!r} has no rows to evaluate; check the file and its fields")
    if (spec is not None and "train" in spec.splits) or (per_split and _split_file_exists(name, "train")):
        return ev, data.load_classification(name, "train"), "train split", ev_split
    n_hold = min(holdout, len(ev) // 2)
    perm = torch.randperm(len(ev), generator=torch.Generator().manual_seed(seed)).tolist()
    source = f"held-out {n_hold} {ev_split} rows (seed {seed}), excluded from scoring"
    return ev.select(sorted(perm[n_hold:])), ev.select(sorted(perm[:n_hold])), source, ev_split


def _split_file_exists(spec: str, split: str) -> bool:
    from prunepath import data

    _, path, _ = data.parse_file_spec(spec)
    return Path(str(path).replace("{split}", split)).is_file()


def _stamp(dataset: str) -> tuple:
    """What the task's rows are read from (data folder, file times): a changed file is read again."""
    from prunepath import data

    spec = data.TASKS.get(dataset)
    if spec is None:
        path = str(data.parse_file_spec(dataset)[1])
        paths = [Path(path.replace("{split}", s)) for s in ("train", "validation", "test")] if "{split}" in path \
            else [Path(path)]
    else:
        root = data.data_dir()
        paths = [root / f for f in spec.files.values()] if root is not None else []
    return (str(data.data_dir()), *(p.stat().st_mtime_ns if p.is_file() else None for p in paths))


@dataclass(frozen=True)
class _Task:
    """A classification task's rows, read once per process (a sweep evaluates them under every method)."""

    rows: tuple  # eval rows as dicts, `limit` applied
    y: torch.Tensor  # [B] labels
    names: tuple
    template: Template
    pool: object  # demonstration / probe-training rows
    source: str
    split: str


@lru_cache(maxsize=8)
def _task(dataset: str, seed: int, limit: int | None, stamp: tuple) -> _Task:
    ev, pool, source, split = task_splits(dataset, seed)
    if limit is not None:
        ev = ev.select(range(min(limit, len(ev))))
    if len(ev) == 0:
        raise ValueError(f"nothing to score for {dataset!r} (limit={limit})")
    names = _label_names(dataset, ev)
    t = template_for(dataset, names, "text_pair" in ev.column_names)
    return _Task(tuple(dict(r) for r in ev), torch.tensor(ev["label"]), names, t, pool, source, split)


@lru_cache(maxsize=32)
def _demos(dataset: str, seed: int, limit: int | None, stamp: tuple, k: int, demo_seed: int) -> tuple:
    task = _task(dataset, seed, limit, stamp)
    return tuple(pick_demos(task.pool, k, len(task.names), demo_seed))


def class_balance(pred: torch.Tensor, y: torch.Tensor, n_classes: int) -> dict:
    """How evenly a classifier's predictions [N] spread over the classes, against the true labels [N].

    balanced_accuracy: the mean over the classes present of the share of their rows predicted right (1/C for
    a model that gives every row one label, however skewed the labels); predicted_majority_share: the share of
    rows given the most frequent predicted label (1.0: one label for every row). Near chance, accuracy alone
    cannot tell a weak classifier from one that has collapsed onto a class; these two can.
    """
    if pred.shape != y.shape or pred.ndim != 1 or len(y) == 0:
        raise ValueError(f"need predictions and labels of one equal length > 0, got {tuple(pred.shape)} and "
                         f"{tuple(y.shape)}")
    recalls = [float((pred[y == c] == c).float().mean()) for c in range(n_classes) if (y == c).any()]
    share = float(torch.bincount(pred, minlength=n_classes).max()) / len(pred)
    return {"balanced_accuracy": sum(recalls) / len(recalls), "predicted_majority_share": share}


def classify(model, tokenizer, dataset: str, protocol: str = "prompt", k: int = 4, calibrated: bool = True,
             seed: int = 0, limit: int | None = None, pooling: str = "last", n_train: int = 1000,
             batch_size: int = 8, batch_tokens: int | None = None, share_prefix: bool = True,
             demo_sets: int = 1) -> EvalResult:
    """Accuracy on `dataset` (sst2 | rte | boolq | jsonl:... | csv:...) under a stated protocol.

    `batch_size` rows (and with `batch_tokens` at most that many tokens) per forward; `share_prefix`:
    the k-shot demonstrations run once per call (see `label_logprobs`). Neither changes the numbers.
    `demo_sets` (prompt protocol): average the calibrated label distributions of this many demonstration
    sets, drawn with seeds seed, seed+1, …; it costs that many times the forwards.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    if k < 0 or n_train < 2:
        raise ValueError(f"need k >= 0 and n_train >= 2, got k={k}, n_train={n_train}")
    if demo_sets < 1 or (demo_sets > 1 and (protocol != "prompt" or k == 0)):
        raise ValueError(f"demo_sets={demo_sets}: it must be >= 1, and above 1 it averages demonstration sets, "
                         "so it needs the prompt protocol with k >= 1")
    t0 = time.time()
    key = (dataset, seed, limit, _stamp(dataset))
    task = _task(*key)
    rows, y, names, t, pool, source, split = (task.rows, task.y.clone(), task.names, task.template, task.pool,
                                              task.source, task.split)
    settings = {"seed": seed, "train_source": source, "label_words": list(t.words), "template": t.fmt}
    metrics = {"majority_rate": float(torch.bincount(y, minlength=len(names)).max()) / len(y)}
    if protocol == "prompt":
        opts = {"batch_tokens": batch_tokens, "share_prefix": share_prefix}
        sets = [[dict(d) for d in _demos(*key, k, demo_seed)] for demo_seed in range(seed, seed + demo_sets)]
        demo_labels = [[d["label"] for d in demos] for demos in sets]
        p_cfs = []  # per set, the prompt's own label prior from content-free inputs, same demonstrations
        for demos in sets if calibrated else ():
            cf = [build_prompt(t, demos, {"text": c, "text_pair": c}) for c in CONTENT_FREE]
            p_cfs.append(label_logprobs(model, tokenizer, cf, t.words, batch_size, **opts).softmax(-1).mean(0))  # [C]
        raw = []
        with recording(model) as rec:  # routing statistics over the scored rows of every set
            for demos in sets:
                lp = label_logprobs(model, tokenizer, [build_prompt(t, demos, r) for r in rows], t.words,
                                    batch_size, rec, **opts)  # [B, C]
                raw.append(lp.softmax(-1))  # renormalised over the label words
        cal = [calibrate(q, p_cf) for q, p_cf in zip(raw, p_cfs)]
        metrics["accuracy_uncalibrated"] = float((torch.stack(raw).mean(0).argmax(-1) == y).float().mean())
        used = cal if calibrated else raw
        pred = torch.stack(used).mean(0).argmax(-1)
        desc = f"{k}-shot label-word scoring, " + ("contextual calibration" if calibrated else "uncalibrated")
        one = demo_sets == 1  # one set keeps the one-set layout of demo_labels and p_content_free
        settings.update(k=k, calibrated=calibrated, demo_labels=demo_labels[0] if one else demo_labels)
        if calibrated:
            settings["p_content_free"] = p_cfs[0].tolist() if one else [p.tolist() for p in p_cfs]
        if not one:
            desc += f", averaged over {demo_sets} demonstration sets"
            half = demo_sets // 2
            settings.update(
                demo_sets=demo_sets,
                per_set_accuracy=[float((q.argmax(-1) == y).float().mean()) for q in used],
                split_half_accuracy=[float((torch.stack(h).mean(0).argmax(-1) == y).float().mean())
                                     for h in (used[:half], used[half : 2 * half])],
            )
    else:
        g = torch.Generator().manual_seed(seed)
        tr_idx = torch.randperm(len(pool), generator=g)[: min(n_train, len(pool))].tolist()
        tr = pool.select(tr_idx)
        x_tr = hidden_features(model, tokenizer, [_fill(t, dict(r)) for r in tr], pooling, batch_size,
                               batch_tokens=batch_tokens)
        y_tr = torch.tensor(tr["label"])
        l2 = select_l2(x_tr, y_tr, len(names), seed)
        predict = fit_probe(x_tr, y_tr, len(names), l2)
        with recording(model) as rec:
            x_ev = hidden_features(model, tokenizer, [_fill(t, r) for r in rows], pooling, batch_size, rec,
                                   batch_tokens)
        pred = predict(x_ev)
        metrics["train_accuracy"] = float((predict(x_tr) == y_tr).float().mean())
        desc = f"linear probe ({pooling} token final hidden state, L-BFGS, L2 {l2:g}) on {len(tr)} train rows"
        settings.update(pooling=pooling, n_train=len(tr), l2=l2)
    metrics["accuracy"] = float((pred == y).float().mean())
    metrics.update(class_balance(pred, y, len(names)))
    return EvalResult(task=dataset, metrics=metrics, n=len(y), protocol=desc, dataset=dataset, split=split,
                      settings=settings, routing=rec.info,
                      model=model_name(model), meta=run_meta(model, t0))
