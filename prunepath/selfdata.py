"""Self-generated instruction data: the dense model's own answers to instruction prompts.

Recovering a pruned model on someone else's answers (Alpaca's GPT-4 outputs) pulls it toward their style;
recovering it on the dense model's own greedy answers keeps it close to what it already did well
(self-data distillation, Thangarasa et al. 2024). `prunepath selfdata` writes those answers as JSON Lines
(instruction, input, output, finished) and `prunepath train --data chat:FILE` trains on them through the
model's chat template.

    prunepath selfdata --out selfdata.jsonl --device cuda          # Alpaca's train split, dense base model

The file is appended batch by batch, so an interrupted run continues where it stopped (`--resume`) and
never loses the answers it already has.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a self-data (or any instruction/input/output) JSON Lines file, checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no instruction file at {path}; make one with `prunepath selfdata --out {path}`")
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
            missing = [k for k in ("instruction", "output") if not isinstance(row.get(k), str)]
            if missing:
                raise ValueError(f"{path}:{i} has no text field {missing[0]!r}; rows need instruction, input, output")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


def refuse_existing(out: Path, resume: bool) -> None:
    if out.exists() and not resume:
        raise FileExistsError(f"{out} exists; pass --resume to continue it, or choose another --out")


@torch.no_grad()
def generate_selfdata(model, tokenizer, rows, out: str | os.PathLike, max_new_tokens: int = 512,
                      batch_size: int = 16, resume: bool = False, progress: bool = True) -> Path:
    """Answer each instruction row with `model` (greedy, chat template) and append it to `out`.

    rows: dicts with instruction and input (Alpaca's fields). With resume, the rows already in `out` are
    kept and generation continues after them; without it an existing file is refused, never overwritten.
    """
    from prunepath.ifeval import alpaca_prompt, generate_responses

    out = Path(out)
    rows = [dict(r) for r in rows]
    refuse_existing(out, resume)
    done = 0
    if out.exists():
        done = len(read_rows(out)) if out.stat().st_size else 0
        if done > len(rows):
            raise ValueError(f"{out} holds {done} rows but the source has only {len(rows)}: another source?")
    out.parent.mkdir(parents=True, exist_ok=True)
    todo = range(done, len(rows), batch_size)
    if progress:
        from tqdm.auto import tqdm

        todo = tqdm(todo, desc="selfdata", unit="batch", initial=0)
    t0 = time.time()
    with open(out, "a", encoding="utf-8") as f:
        for i in todo:
            batch = rows[i:i + batch_size]
            answers, info = generate_responses(model, tokenizer, [alpaca_prompt(r) for r in batch],
                                               max_new_tokens, batch_size=len(batch))
            for r, a, fin in zip(batch, answers, info["finished"]):
                f.write(json.dumps({"instruction": r["instruction"], "input": r.get("input") or "",
                                    "output": a, "finished": fin}, ensure_ascii=False) + "\n")
            f.flush()  # a kill loses at most the batch in flight
    if progress:
        print(f"{len(rows) - done} answers in {time.time() - t0:.0f} s -> {out}")
    return out


def add_cli(subparsers) -> None:
    text = "write the dense model's own answers to instruction prompts (training data for `--data chat:FILE`)"
    p = subparsers.add_parser("selfdata", help=text, description=text + ".")
    p.add_argument("--out", required=True, help="JSON Lines file to write (appended with --resume)")
    p.add_argument("--model", default=None, help="dense model that answers (default SmolLM2-135M-Instruct)")
    p.add_argument("--source", default="alpaca", help="alpaca (its train split) or an instruction JSON Lines file")
    p.add_argument("--limit", type=int, default=None, help="first N source rows")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=None, help="prompts per generate call (CPU 4, GPU 64)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--resume", action="store_true", help="continue an interrupted file")
    p.set_defaults(func=run)


def run(args) -> int:
    from prunepath import data
    from prunepath.models import DEFAULT_MODEL, load_model

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    rows = data.load_instructions("alpaca", "train") if args.source == "alpaca" else read_rows(args.source)
    rows = [dict(r) for r in rows][: args.limit]
    if not rows:
        raise ValueError("no source rows to answer (--limit 0?)")
    refuse_existing(Path(args.out), args.resume)  # before the model loads, not after
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model, tok = load_model(args.model or DEFAULT_MODEL, dtype=dtype, device=args.device)
    batch = args.batch_size or (64 if str(args.device).startswith("cuda") else 4)
    generate_selfdata(model, tok, rows, args.out, args.max_new_tokens, batch, resume=args.resume)
    return 0
