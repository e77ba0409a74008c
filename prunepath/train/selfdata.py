"""Self-generated training data: the dense model's own answers to instructions, or its own continuations of text.

Recovering a pruned model on someone else's answers (Alpaca's GPT-4 outputs) pulls it toward their style;
recovering it on the dense model's own answers keeps it close to what it already did well (self-data
distillation, Thangarasa et al. 2024). And where real text runs out (about 750k tokens offline), the
dense model can write more: continuations sampled from short prefixes of real text are fresh contexts
on which the sparse model learns to match the dense one (`prunepath train --teacher dense`).

    prunepath selfdata --out answers.jsonl --device cuda                # greedy answers to Alpaca's train split
    prunepath selfdata --out answers4.jsonl --samples 4 --temperature 1  # four sampled answers per prompt
    prunepath selfdata --mode continue --source calibration --samples 8192 --out cont.jsonl --device cuda

Answers are JSON Lines rows (instruction, input, output, finished) for `--data chat:FILE`; continuations
are rows (source, prefix, text, finished) for `--data text:FILE`. The file is appended batch by batch, so
an interrupted run continues where it stopped (`--resume`) and never loses the rows it already has.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


def read_rows(path: str | os.PathLike, fields: tuple[str, ...] = ("instruction", "output")) -> list[dict]:
    """The rows of a self-data JSON Lines file (instruction rows, or `fields=("text",)` for text rows), checked."""
    path = Path(path)
    if not path.is_file():
        mode = " --mode continue" if fields == ("text",) else ""
        raise FileNotFoundError(f"no self-data file at {path}; make one with `prunepath selfdata{mode} --out {path}`")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i} is not JSON ({e.msg}); a killed run may have left half a line: "
                                 "delete that line and rerun with --resume") from None
            missing = [k for k in fields if not isinstance(row, dict) or not isinstance(row.get(k), str)]
            if missing:
                need = "instruction, input, output" if "instruction" in fields else ", ".join(fields)
                raise ValueError(f"{path}:{i} has no text field {missing[0]!r}; rows need {need}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


def refuse_existing(out: Path, resume: bool) -> None:
    if out.exists() and not resume:
        raise FileExistsError(f"{out} exists; pass --resume to continue it, or choose another --out")


def _append_batches(out: Path, n: int, batch_size: int, resume: bool, fields, make_rows, progress: bool) -> Path:
    """Append make_rows(start, stop) -> list[dict] to `out` for every batch not yet in the file.

    With resume, the rows already in `out` are kept and generation continues after them; without it an
    existing file is refused, never overwritten. Each batch is flushed, so a kill loses at most one.
    """
    refuse_existing(out, resume)
    done = len(read_rows(out, fields)) if out.exists() and out.stat().st_size else 0
    if done > n:
        raise ValueError(f"{out} holds {done} rows but this run makes only {n}: another source or --samples?")
    out.parent.mkdir(parents=True, exist_ok=True)
    todo = range(done, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        todo = tqdm(todo, desc="selfdata", unit="batch")
    t0 = time.time()
    with open(out, "a", encoding="utf-8") as f:
        for i in todo:
            for row in make_rows(i, min(i + batch_size, n)):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
    if progress:
        print(f"{n - done} rows in {time.time() - t0:.0f} s -> {out}")
    return out


@torch.no_grad()
def generate_selfdata(model, tokenizer, rows, out: str | os.PathLike, max_new_tokens: int = 512,
                      batch_size: int = 16, resume: bool = False, progress: bool = True,
                      temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> Path:
    """Answer each instruction row with `model` (chat template) and append it to `out`.

    rows: dicts with instruction and input (Alpaca's fields). Greedy at temperature 0; sampled otherwise,
    with torch seeded from (seed, first row of the batch), so a resumed file equals an uninterrupted one
    on the same device and batch size.
    """
    from prunepath.evaluate.ifeval import alpaca_prompt, generate_responses, sampling_kwargs

    sampling_kwargs(temperature, top_p)  # bad values fail before the first batch
    rows = [dict(r) for r in rows]

    def answer(start: int, stop: int) -> list[dict]:
        batch = rows[start:stop]
        if temperature:
            torch.manual_seed(seed * 1_000_003 + start)
        answers, info = generate_responses(model, tokenizer, [alpaca_prompt(r) for r in batch], max_new_tokens,
                                           batch_size=len(batch), temperature=temperature, top_p=top_p)
        return [{"instruction": r["instruction"], "input": r.get("input") or "", "output": a, "finished": fin}
                for r, a, fin in zip(batch, answers, info["finished"])]

    return _append_batches(Path(out), len(rows), batch_size, resume, ("instruction", "output"), answer, progress)


def text_prefixes(tokenizer, source: str, n: int, prefix_tokens: int, seed: int = 0) -> torch.Tensor:
    """[n, prefix_tokens] token windows of an LM text source (`calibration`, `wikitext2`), in a seeded order.

    The windows are the source's aligned chunks, shuffled; past the last chunk they repeat (each repeat
    gets its own sampled continuation).
    """
    from prunepath import data

    if n < 1 or prefix_tokens < 1:
        raise ValueError(f"need n >= 1 and prefix_tokens >= 1, got {n} and {prefix_tokens}")
    stream = data._token_stream(tokenizer, data.TRAIN_TEXT.get(source, source))
    chunks = len(stream) // prefix_tokens
    if chunks == 0:
        raise ValueError(f"{source!r} has {len(stream)} tokens, fewer than one {prefix_tokens}-token prefix")
    order = torch.randperm(chunks, generator=torch.Generator().manual_seed(seed))
    starts = order[torch.arange(n) % chunks] * prefix_tokens  # [n]
    return stream[starts[:, None] + torch.arange(prefix_tokens)]  # [n, P]


@torch.no_grad()
def generate_continuations(model, tokenizer, prefixes: torch.Tensor, out: str | os.PathLike, source: str = "",
                           max_new_tokens: int = 256, batch_size: int = 64, temperature: float = 1.0,
                           top_p: float = 0.95, seed: int = 0, resume: bool = False, progress: bool = True) -> Path:
    """Continue each prefix ([N, P] token ids) with `model` and append (source, prefix, text, finished) to `out`.

    text is the prefix and its continuation, up to (not including) the first end token; finished says
    the model ended the text itself. Sampled with torch seeded from (seed, first row of the batch), so a
    resumed file equals an uninterrupted one on the same device and batch size.
    """
    from prunepath.evaluate.ifeval import end_tokens, sampling_kwargs

    sampling = sampling_kwargs(temperature, top_p)
    if prefixes.ndim != 2 or prefixes.shape[1] < 1:
        raise ValueError(f"prefixes must be token ids [N, P] with P >= 1, got shape {tuple(prefixes.shape)}")
    device = next(model.parameters()).device
    eos = end_tokens(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(eos[0])

    def continue_(start: int, stop: int) -> list[dict]:
        ids = prefixes[start:stop]  # equal lengths: no padding
        torch.manual_seed(seed * 1_000_003 + start)
        gen = model.generate(input_ids=ids.to(device), attention_mask=torch.ones_like(ids, device=device),
                             max_new_tokens=max_new_tokens, pad_token_id=pad_id, **sampling).cpu()
        rows = []
        for p, g in zip(ids, gen[:, ids.shape[1]:]):
            end = torch.isin(g, eos).nonzero()
            stop_at = int(end[0]) if len(end) else len(g)
            prefix = tokenizer.decode(p, skip_special_tokens=True)
            rows.append({"source": source, "prefix": prefix,
                         "text": tokenizer.decode(torch.cat([p, g[:stop_at]]), skip_special_tokens=True),
                         "finished": bool(len(end))})
        return rows

    return _append_batches(Path(out), len(prefixes), batch_size, resume, ("text",), continue_, progress)


def add_cli(subparsers) -> None:
    text = ("write the dense model's own answers to instructions (for `--data chat:FILE`) or its own "
            "continuations of text (`--mode continue`, for `--data text:FILE`)")
    p = subparsers.add_parser("selfdata", help=text, description=text + ".")
    p.add_argument("--out", required=True, help="JSON Lines file to write (appended with --resume)")
    p.add_argument("--mode", default="answer", choices=["answer", "continue"])
    p.add_argument("--model", default=None, help="dense model that writes (default SmolLM2-135M-Instruct)")
    p.add_argument("--source", default=None,
                   help="answer: alpaca (its train split, default) or an instruction JSON Lines file; "
                        "continue: calibration (default) or wikitext2 (its valid split)")
    p.add_argument("--skip", type=int, default=0,
                   help="answer: leave out the first N source rows (another run's prompts), then --limit")
    p.add_argument("--limit", type=int, default=None, help="answer: first N source rows (after --skip)")
    p.add_argument("--samples", type=int, default=None,
                   help="answer: answers per prompt (default 1); continue: continuations in all (default 1024)")
    p.add_argument("--prefix-tokens", type=int, default=32, help="continue: tokens of real text before each")
    p.add_argument("--temperature", type=float, default=None, help="0 greedy (answer default), continue default 1")
    p.add_argument("--top-p", type=float, default=None, help="nucleus mass when sampling (default 0.95)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=None, help="answer 512, continue 256")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per generate call (CPU 4, GPU 64)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--resume", action="store_true", help="continue an interrupted file")
    p.set_defaults(func=run)


def run(args) -> int:
    from prunepath import data
    from prunepath.evaluate.ifeval import sampling_kwargs
    from prunepath.models import DEFAULT_MODEL, load_model

    cont = args.mode == "continue"
    max_new = args.max_new_tokens or (256 if cont else 512)
    temperature = args.temperature if args.temperature is not None else (1.0 if cont else 0.0)
    top_p = args.top_p if args.top_p is not None else (0.95 if temperature else 1.0)
    samples = args.samples or (1024 if cont else 1)
    if max_new < 1 or samples < 1 or args.prefix_tokens < 1:
        raise ValueError("--max-new-tokens, --samples and --prefix-tokens must be >= 1")
    if args.skip < 0:
        raise ValueError(f"--skip must be >= 0, got {args.skip}")
    sampling_kwargs(temperature, top_p)
    source = args.source or ("calibration" if cont else "alpaca")
    if cont and source not in data.TRAIN_TEXT:
        raise ValueError(f"--mode continue takes --source calibration or wikitext2, got {source!r}")
    if not cont:
        rows = data.load_instructions("alpaca", "train") if source == "alpaca" else read_rows(source)
        rows = [dict(r) for r in rows][args.skip :][: args.limit]
        if not rows:
            raise ValueError(f"no source rows to answer (--limit 0, or --skip {args.skip} past the source's end?)")
        if samples > 1 and not temperature:
            raise ValueError("--samples > 1 needs --temperature > 0: greedy answers to one prompt are all the same")
        rows = rows * samples  # each prompt once per pass, so a prompt's samples land in different batches
    refuse_existing(Path(args.out), args.resume)  # before the model loads, not after
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model, tok = load_model(args.model or DEFAULT_MODEL, dtype=dtype, device=args.device)
    batch = args.batch_size or (64 if str(args.device).startswith("cuda") else 4)
    if cont:
        prefixes = text_prefixes(tok, source, samples, args.prefix_tokens, seed=args.seed)
        generate_continuations(model, tok, prefixes, args.out, source, max_new, batch, temperature, top_p,
                               seed=args.seed, resume=args.resume)
    else:
        generate_selfdata(model, tok, rows, args.out, max_new, batch, resume=args.resume, temperature=temperature,
                          top_p=top_p, seed=args.seed)
    return 0
