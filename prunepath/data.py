"""Datasets PrunePath trains, calibrates and evaluates on, behind one small interface.

Everything is read with the `datasets` library. With `PRUNEPATH_DATA` set (a folder of offline copies:
sst2/, rte/, boolq/, wikitext2/, lm/, instruct/, read as `TASKS` below describes) the local JSON Lines /
text files are used and nothing touches the network; without it, the Hugging Face hub ids in `TASKS` are
used. Arrow caches go to
~/.cache/huggingface (datasets' default), never into the repository.

Task kinds:
  classification  sst2, rte, boolq, or any labelled file `jsonl:PATH?text=F&label=F[&text_pair=F]`
                  (also `csv:`), returned with columns text, [text_pair], label (int, a ClassLabel);
  lm              wikitext2 (test: raw text, valid: tokenised text), calibration (lm/wiki_demo.txt);
  instruction     alpaca (train = first 90 %, test = last 10 %), ifeval (its 541 prompts).

Shape legend: B sequences, T tokens per sequence (seq_len).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

import torch

# --------------------------------------------------------------------------- errors


class DataError(ValueError):
    """Data could not be loaded as asked; the message says what to change."""


class DataNotFoundError(DataError):
    """A file or folder is missing, or the hub is unreachable without PRUNEPATH_DATA."""


class UnknownTaskError(DataError):
    pass


class UnknownSplitError(DataError):
    pass


class DataFieldError(DataError):
    """A named field is not in the data; the message lists the fields that are."""


class EmptySplitError(DataError):
    pass


# --------------------------------------------------------------------------- task registry


@dataclass(frozen=True)
class TaskSpec:
    """What a task is and where its data lives.

    `files` maps split -> path relative to PRUNEPATH_DATA; `hub` is (path, config_name) for
    `datasets.load_dataset` and `hub_splits` maps our split names to the hub's.
    """

    name: str
    kind: str  # "classification" | "lm" | "instruction"
    text_fields: tuple[str, ...] = ()  # classification: (text,) or (text, text_pair)
    label_field: str | None = None
    label_names: tuple[str, ...] = ()
    splits: tuple[str, ...] = ()
    files: dict[str, str] = field(default_factory=dict)
    hub: tuple[str, str | None] | None = None
    hub_splits: dict[str, str] = field(default_factory=dict)


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec(
        "sst2", "classification", ("sentence",), "label", ("negative", "positive"),
        ("train", "validation", "test"),
        {s: f"sst2/{s}.jsonl" for s in ("train", "validation", "test")},
        # GLUE's train split is phrase-level (67k rows) and its test labels are hidden (-1).
        ("glue", "sst2"), {"train": "train", "validation": "validation"},
    ),
    "rte": TaskSpec(
        "rte", "classification", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"),
        ("train", "validation"), {s: f"rte/{s}.jsonl" for s in ("train", "validation")},
        ("glue", "rte"), {"train": "train", "validation": "validation"},
    ),
    "boolq": TaskSpec(
        # The passage is the context (text), the question is asked of it (text_pair).
        "boolq", "classification", ("passage", "question"), "label", ("false", "true"),
        ("validation",), {"validation": "boolq/validation.jsonl"},
        ("google/boolq", None), {"validation": "validation"},
    ),
    "wikitext2": TaskSpec(
        "wikitext2", "lm", ("text",), splits=("test", "valid"),
        files={"test": "wikitext2/wiki.test.raw.txt", "valid": "wikitext2/wiki.valid.tokens.txt"},
        hub=("wikitext", None),
        hub_splits={"test": "wikitext-2-raw-v1:test", "valid": "wikitext-2-v1:validation"},
    ),
    "calibration": TaskSpec(
        # No hub copy of our articles; online we fall back to WikiText-2 *train* (disjoint from test).
        "calibration", "lm", ("text",), splits=("train",), files={"train": "lm/wiki_demo.txt"},
        hub=("wikitext", None), hub_splits={"train": "wikitext-2-raw-v1:train"},
    ),
    "alpaca": TaskSpec(
        "alpaca", "instruction", ("instruction", "input", "output"), splits=("train", "test"),
        files={"all": "instruct/alpaca_en_demo.jsonl"}, hub=("tatsu-lab/alpaca", None),
        hub_splits={"all": "train"},
    ),
    "ifeval": TaskSpec(
        "ifeval", "instruction", ("key", "prompt", "instruction_id_list", "kwargs"), splits=("test",),
        files={"test": "instruct/ifeval_input_data.jsonl"}, hub=("google/IFEval", None),
        hub_splits={"test": "train"},
    ),
}

ALPACA_TEST_FRACTION = 0.1  # the last 10 % of rows are held out; fixed so results stay comparable


def data_dir() -> Path | None:
    """The local data folder from PRUNEPATH_DATA, or None (then the hub is used)."""
    value = os.environ.get("PRUNEPATH_DATA")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataNotFoundError(
            f"PRUNEPATH_DATA={value} is not a directory. Fix: export PRUNEPATH_DATA=/path/to/data "
            f"(the folder of offline copies: sst2/, rte/, boolq/, wikitext2/, lm/, instruct/), or unset it to use "
            f"the Hugging Face hub."
        )
    return path


def _task(name: str, kind: str | None = None) -> TaskSpec:
    if name not in TASKS or (kind is not None and TASKS[name].kind != kind):
        known = sorted(t for t, s in TASKS.items() if kind is None or s.kind == kind)
        extra = " or a file spec 'jsonl:PATH?text=FIELD&label=FIELD'" if kind == "classification" else ""
        raise UnknownTaskError(f"unknown {kind or ''} task '{name}'; known: {', '.join(known)}{extra}")
    return TASKS[name]


def _check_split(spec: TaskSpec, split: str) -> None:
    if split not in spec.splits:
        only = " only" if len(spec.splits) == 1 else ""
        raise UnknownSplitError(
            f"task '{spec.name}' has{only} split(s) {', '.join(spec.splits)}, not '{split}'"
            + ("; BoolQ's train split is not available offline" if spec.name == "boolq" else "")
        )


# --------------------------------------------------------------------------- raw reading


_FIX_DATA_DIR = ("Fix: check PRUNEPATH_DATA (it should point at the folder of offline copies: sst2/, rte/, boolq/, "
                 "wikitext2/, lm/, instruct/).")


def _read_local(builder: str, path: Path, fix: str = _FIX_DATA_DIR, **kwargs):
    """One file through datasets' packaged builders (json/text/csv), as a Dataset."""
    import datasets

    if not path.is_file():
        listing = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else []
        raise DataNotFoundError(
            f"no file {path}" + (f"; {path.parent} holds: {', '.join(listing)}" if listing else "")
            + f". {fix}"
        )
    if path.stat().st_size == 0:
        raise EmptySplitError(f"{path} is empty")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # pyarrow / json parse errors: name the file
        raise DataError(f"could not read {path} as {builder}: {type(e).__name__}: {e}") from e


def _read_hub(spec: TaskSpec, split: str):
    """The hub copy of a task split; fails fast and clearly when offline."""
    import datasets

    from prunepath.models import hub_reachable

    path, config = spec.hub
    hub_split = spec.hub_splits.get(split)
    if hub_split is None:
        raise DataNotFoundError(
            f"'{spec.name}' split '{split}' has no usable hub copy (e.g. GLUE hides its test labels). "
            f"Fix: export PRUNEPATH_DATA=/path/to/data (the offline copies) to use the local files."
        )
    if ":" in hub_split:
        config, hub_split = hub_split.split(":")
    if not hub_reachable():
        raise DataNotFoundError(
            f"'{spec.name}' needs the Hugging Face hub ({path}/{config or ''}) and it cannot be reached. "
            f"Fix: export PRUNEPATH_DATA=/path/to/data (the folder of offline copies)."
        )
    try:
        return datasets.load_dataset(path, config, split=hub_split)
    except Exception as e:
        raise DataNotFoundError(
            f"could not load {path}/{config} split {hub_split} from the hub: {e}. "
            f"Fix: export PRUNEPATH_DATA=/path/to/data (the folder of offline copies)."
        ) from e


def _read_task(spec: TaskSpec, split: str):
    root = data_dir()
    if root is None:
        return _read_hub(spec, split)
    builder = "text" if spec.files[split].endswith(".txt") else "json"
    return _read_local(builder, root / spec.files[split])


def _require_fields(ds, fields, where: str) -> None:
    missing = [f for f in fields if f and f not in ds.column_names]
    if missing:
        raise DataFieldError(
            f"{where} has no field(s) {', '.join(missing)}; available: {', '.join(ds.column_names)}"
        )


def _require_rows(ds, where: str) -> None:
    if len(ds) == 0:
        raise EmptySplitError(f"{where} has no rows")


# --------------------------------------------------------------------------- classification


def parse_file_spec(spec: str) -> tuple[str, Path, dict[str, str]]:
    """'jsonl:PATH?text=F&label=F[&text_pair=F][&labels=a,b]' -> (format, path, params).

    A `{split}` in PATH is replaced by the split asked for (e.g. data/{split}.jsonl).
    """
    if ":" not in spec:
        _task(spec, "classification")  # raises UnknownTaskError listing the named tasks
    fmt, _, rest = spec.partition(":")
    if fmt not in ("jsonl", "json", "csv", "tsv") or not rest:
        raise UnknownTaskError(
            f"cannot parse '{spec}'; expected a task ({', '.join(sorted(TASKS))}) or "
            f"'jsonl:PATH?text=FIELD&label=FIELD[&text_pair=FIELD]' (also csv:, tsv:)"
        )
    path, _, query = rest.partition("?")
    params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    unknown = set(params) - {"text", "label", "text_pair", "labels"}
    if unknown or "text" not in params or "label" not in params:
        raise DataError(
            f"'{spec}': give text=FIELD and label=FIELD (optional text_pair=FIELD, labels=NAME,NAME,...)"
            + (f"; unknown parameter(s): {', '.join(sorted(unknown))}" if unknown else "")
        )
    return fmt, Path(path).expanduser(), params


_FIX_SPEC = "Fix: correct the path in the spec (a {split} in it is replaced by the split asked for)."


def _read_file_spec(fmt: str, path: Path):
    if fmt in ("csv", "tsv") or path.suffix in (".csv", ".tsv"):
        sep = "\t" if fmt == "tsv" or path.suffix == ".tsv" else ","
        return _read_local("csv", path, _FIX_SPEC, delimiter=sep)
    return _read_local("json", path, _FIX_SPEC)


def classification_spec(name_or_spec: str) -> TaskSpec:
    """The TaskSpec of a named task, or one built from a file spec (labels from the file, sorted)."""
    if name_or_spec in TASKS:
        return _task(name_or_spec, "classification")
    return _file_task(name_or_spec, "train")[0]


def _file_task(spec_str: str, split: str):
    fmt, path, params = parse_file_spec(spec_str)
    fields = (params["text"],) + ((params["text_pair"],) if params.get("text_pair") else ())
    ds = _read_file_spec(fmt, Path(str(path).replace("{split}", split)))
    where = f"'{spec_str}' ({split})"
    _require_fields(ds, fields + (params["label"],), where)
    if params.get("labels"):
        names = tuple(params["labels"].split(","))
        if len(set(names)) < len(names) or not all(n.strip() for n in names):
            raise DataError(
                f"'{spec_str}': &labels={params['labels']} must name each class once, in the order of the label "
                "values (0, 1, 2, ... or their sorted order). Fix: one distinct, non-empty word per class"
            )
    else:
        # Labels of every split file that exists, so train and test agree on the integer mapping.
        values = set()
        for s in ({"train", "validation", "test", split} if "{split}" in str(path) else {split}):
            p = Path(str(path).replace("{split}", s))
            if p.is_file() and p.stat().st_size:
                other = ds if s == split else _read_file_spec(fmt, p)
                if params["label"] in other.column_names:
                    values.update(other[params["label"]])
        values.discard(None)
        names = _label_names(values)
    spec = TaskSpec(str(path), "classification", fields, params["label"], names, (split,))
    return spec, ds


def _label_names(values: set) -> tuple[str, ...]:
    """Label names in a fixed order: ints 0..K-1 keep their value; anything else sorted (False < True)."""
    if all(isinstance(v, bool) for v in values):
        return ("false", "true")
    if all(isinstance(v, int) for v in values) and values == set(range(len(values))):
        return tuple(str(v) for v in range(len(values)))
    try:
        return tuple(str(v) for v in sorted(values))
    except TypeError:
        return tuple(sorted(str(v) for v in values))


def load_classification(name_or_spec: str, split: str = "validation"):
    """A classification split as a Dataset with columns text, [text_pair], label (ClassLabel ints)."""
    import datasets

    if name_or_spec in TASKS:
        spec = _task(name_or_spec, "classification")
        _check_split(spec, split)
        ds = _read_task(spec, split)
        if spec.name == "boolq" and "label" not in ds.column_names:
            ds = ds.map(lambda r: {"label": int(r["answer"])})  # the hub copy has only answer (bool)
        where = f"{spec.name}/{split}"
    else:
        spec, ds = _file_task(name_or_spec, split)
        where = f"'{name_or_spec}' ({split})"
    _require_fields(ds, spec.text_fields + (spec.label_field,), where)
    _require_rows(ds, where)

    # Every accepted spelling of a label -> its integer: the name, the integer itself, and for
    # booleans "false"/"true" (sorted order, so False = 0).
    index = {name: i for i, name in enumerate(spec.label_names)}
    for i in range(len(spec.label_names)):
        index.setdefault(str(i), i)  # a name wins: labels "1","2" map to 0, 1

    def to_int(value) -> int:
        key = ("true" if value else "false") if isinstance(value, bool) else str(value)
        if key not in index:
            raise DataError(
                f"{where}: label {value!r} is not one of {', '.join(spec.label_names)}"
                " (fix the file, or name every label in order with &labels=NAME,NAME,...)"
            )
        return index[key]

    labels = [to_int(v) for v in ds[spec.label_field]]
    renames = dict(zip(spec.text_fields, ("text", "text_pair")))
    # Column operations, not a row-wise map: no per-row Python and no new cache files.
    out = ds.select_columns(list(spec.text_fields)).rename_columns(
        {k: v for k, v in renames.items() if k != v})
    out = out.add_column("label", labels)
    return out.cast(datasets.Features({
        **{v: datasets.Value("string") for v in renames.values()},
        "label": datasets.ClassLabel(names=list(spec.label_names)),
    }))


# --------------------------------------------------------------------------- language-modelling text


def load_lm_text(name: str = "wikitext2", split: str | None = None) -> str:
    """One string of running text: wikitext2 test (raw, default) or valid (tokenised), calibration."""
    spec = _task(name, "lm")
    split = split or spec.splits[0]
    _check_split(spec, split)
    root = data_dir()
    if root is None:
        rows = _read_hub(spec, split)["text"]
        text = "".join(r for r in rows if r.strip())  # hub rows keep their "\n"; drop the empty ones
    else:
        # sample_by="document": the file verbatim as one row, line breaks included.
        ds = _read_local("text", root / spec.files[split], sample_by="document", keep_linebreaks=True)
        text = ds[0]["text"] if len(ds) else ""
    if not text.strip():
        raise EmptySplitError(f"{name}/{split} holds no text")
    return text


# --------------------------------------------------------------------------- instruction data


def load_instructions(name: str = "alpaca", split: str | None = None):
    """alpaca (instruction, input, output; train/test = first 90 % / last 10 %, None = all) or ifeval."""
    spec = _task(name, "instruction")
    if split is not None:
        _check_split(spec, split)
    source_split = "all" if name == "alpaca" else "test"
    ds = _read_task(spec, source_split)
    _require_fields(ds, spec.text_fields, f"{name}")
    ds = ds.select_columns(list(spec.text_fields))
    if name == "alpaca" and split is not None:
        n_test = max(1, round(len(ds) * ALPACA_TEST_FRACTION))
        cut = len(ds) - n_test
        ds = ds.select(range(cut)) if split == "train" else ds.select(range(cut, len(ds)))
    _require_rows(ds, f"{name}/{split or 'all'}")
    return ds


# --------------------------------------------------------------------------- calibration batches

_TOKEN_CACHE: dict[tuple, torch.Tensor] = {}

# The plain-text sources training and self-generated data may use, as _token_stream names: WikiText-2 only
# through its valid split (its test split is for evaluation).
TRAIN_TEXT = {"calibration": "calibration", "wikitext2": "wikitext2:valid"}


def _token_stream(tokenizer, source: str) -> torch.Tensor:
    """All tokens of a text source, documents separated by EOS; cached per tokenizer and source."""
    key = (getattr(tokenizer, "name_or_path", ""), len(tokenizer), source, os.environ.get("PRUNEPATH_DATA"))
    if key not in _TOKEN_CACHE:
        name, _, split = source.partition(":")
        text = load_lm_text(name, split or None)
        docs = [d for d in text.split("\n") if d.strip()]
        # Per document, not the whole 1 MB at once: avoids the tokenizer's max-length warning.
        ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
        sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        flat = [t for doc in ids for t in (doc + sep)]
        _TOKEN_CACHE[key] = torch.tensor(flat, dtype=torch.long)
    return _TOKEN_CACHE[key]


def calibration_batches(tokenizer, n_tokens: int, seq_len: int, seed: int = 0,
                        source: str = "calibration") -> torch.Tensor:
    """LongTensor [B, T] with B = ceil(n_tokens / T): non-overlapping windows of the calibration text.

    Windows are drawn without replacement from the aligned chunks of the token stream by a seeded
    permutation, so the same (tokenizer, n_tokens, seq_len, seed) always gives the same batch and
    different seeds give different windows. `source` may be "wikitext2:valid" for another text.
    """
    if seq_len < 1 or n_tokens < 1:
        raise DataError(f"n_tokens ({n_tokens}) and seq_len ({seq_len}) must be >= 1")
    stream = _token_stream(tokenizer, source)
    n_chunks = len(stream) // seq_len
    batch = -(-n_tokens // seq_len)
    if batch > n_chunks:
        raise DataError(
            f"asked for {batch} windows of {seq_len} tokens but '{source}' has only {len(stream):,} tokens "
            f"({n_chunks} windows); lower n_tokens to <= {n_chunks * seq_len:,} or seq_len"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randperm(n_chunks, generator=g)[:batch] * seq_len  # [B]
    return stream[starts[:, None] + torch.arange(seq_len)]  # [B, T]
