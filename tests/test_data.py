"""prunepath.data: every task from the local copies (PRUNEPATH_DATA, set by conftest), file specs, errors.

Row counts are those of the offline copies (the data folder's own listing), so a wrong file or a silently
dropped row fails.
"""

import json

import pytest
import torch

from prunepath import data
from prunepath.data import (
    TASKS,
    DataError,
    DataFieldError,
    DataNotFoundError,
    EmptySplitError,
    UnknownSplitError,
    UnknownTaskError,
    calibration_batches,
    classification_spec,
    load_classification,
    load_instructions,
    load_lm_text,
)

pytestmark = pytest.mark.skipif(data.data_dir() is None, reason="PRUNEPATH_DATA not set (the folder of offline copies)")


# --------------------------------------------------------------------------- named tasks
@pytest.mark.parametrize("task,split,rows,pair", [
    ("sst2", "train", 6920, False),
    ("sst2", "validation", 872, False),
    ("sst2", "test", 1821, False),
    ("rte", "train", 2490, True),
    ("rte", "validation", 277, True),
    ("boolq", "validation", 3270, True),
])
def test_classification_tasks(task, split, rows, pair):
    ds = load_classification(task, split)
    assert len(ds) == rows
    assert ds.column_names == (["text", "text_pair", "label"] if pair else ["text", "label"])
    assert ds.features["label"].names == list(TASKS[task].label_names)
    labels = set(ds["label"])
    assert labels == {0, 1}  # both classes present, as ints
    assert all(isinstance(t, str) and t for t in list(ds["text"])[:50])


def test_boolq_passage_is_text_and_label_is_answer():
    ds = load_classification("boolq", "validation")
    first = json.loads(open(data.data_dir() / "boolq/validation.jsonl").readline())
    assert ds[0]["text"] == first["passage"] and ds[0]["text_pair"] == first["question"]
    assert ds[0]["label"] == int(first["answer"])


def test_boolq_has_only_validation():
    with pytest.raises(UnknownSplitError, match="only split.*validation"):
        load_classification("boolq", "train")


def test_unknown_task_and_split():
    with pytest.raises(UnknownTaskError, match="known: boolq, rte, sst2"):
        load_classification("mnli", "validation")
    with pytest.raises(UnknownSplitError, match="train, validation, test"):
        load_classification("sst2", "dev")
    with pytest.raises(UnknownTaskError):
        load_lm_text("sst2")  # a task of another kind


def test_lm_texts():
    test = load_lm_text()  # wikitext2 test, raw
    assert test.count("\n") == 2891 and test.startswith(" = Robert Boulter = ")
    assert "<unk>" not in test  # raw, not the tokenised variant
    valid = load_lm_text("wikitext2", "valid")
    assert valid.count("\n") == 3760 and "<unk>" in valid
    calib = load_lm_text("calibration")
    assert calib.count("\n") == 30 and calib.startswith("Anarchism")
    with pytest.raises(UnknownSplitError):
        load_lm_text("wikitext2", "train")  # not available offline; must not fall back to test


def test_instructions_alpaca_split_is_deterministic_and_disjoint():
    full = load_instructions("alpaca")
    train, test = load_instructions("alpaca", "train"), load_instructions("alpaca", "test")
    assert (len(full), len(train), len(test)) == (999, 899, 100)
    assert full.column_names == ["instruction", "input", "output"]
    # first 90 % / last 10 %, in file order
    assert list(train["instruction"]) + list(test["instruction"]) == list(full["instruction"])
    with pytest.raises(UnknownSplitError):
        load_instructions("alpaca", "validation")


def test_instructions_ifeval_keeps_kwargs():
    ds = load_instructions("ifeval")
    assert len(ds) == 541 and ds.column_names == ["key", "prompt", "instruction_id_list", "kwargs"]
    row = ds[0]
    assert len(row["instruction_id_list"]) == len(row["kwargs"])
    # Each kwargs dict exactly as in the file: no None-filled keys from other rows.
    assert row["kwargs"] == [{}, {"num_highlights": 3}, {"relation": "at least", "num_words": 300}]


# --------------------------------------------------------------------------- calibration batches
class _CharTokenizer:
    """A stand-in tokenizer (one id per byte) so batching is tested without the real model."""

    name_or_path = "char-test"
    eos_token_id = 0

    def __len__(self):
        return 256

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [list(t.encode()) for t in texts]}


def test_calibration_batches_shape_determinism_seed():
    tok = _CharTokenizer()
    a = calibration_batches(tok, n_tokens=1000, seq_len=128, seed=0)
    assert a.shape == (8, 128) and a.dtype == torch.long  # ceil(1000 / 128) windows
    assert torch.equal(a, calibration_batches(tok, 1000, 128, seed=0))
    assert not torch.equal(a, calibration_batches(tok, 1000, 128, seed=1))
    # Windows are distinct non-overlapping chunks of the stream.
    assert len({tuple(r.tolist()) for r in a}) == 8
    stream = data._token_stream(tok, "calibration")  # [L]
    chunks = stream[: len(stream) // 128 * 128].view(-1, 128)
    assert all((chunks == row).all(1).any() for row in a), "windows are aligned slices of the stream"


@pytest.mark.slow
def test_calibration_batches_real_tokenizer(default_model):
    _, tok = default_model
    b = calibration_batches(tok, 2048, 256)
    assert b.shape == (8, 256) and int(b.max()) < len(tok)
    text = tok.decode(b[0])
    assert len(text) > 500  # real words, not padding


def test_calibration_batches_errors():
    tok = _CharTokenizer()
    with pytest.raises(DataError, match="lower n_tokens"):
        calibration_batches(tok, n_tokens=10**9, seq_len=512)
    with pytest.raises(DataError, match=">= 1"):
        calibration_batches(tok, n_tokens=100, seq_len=0)


# --------------------------------------------------------------------------- file specs
def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_spec_string_labels_sorted(tmp_path):
    f = _write_jsonl(tmp_path / "reviews.jsonl", [
        {"review": "great", "stars": "pos"}, {"review": "awful", "stars": "neg"},
        {"review": "fine", "stars": "mid"}, {"review": "superb", "stars": "pos"},
    ])
    spec = f"jsonl:{f}?text=review&label=stars"
    ds = load_classification(spec, "train")
    assert ds.column_names == ["text", "label"]
    assert ds.features["label"].names == ["mid", "neg", "pos"]  # sorted, deterministic
    assert list(ds["label"]) == [2, 1, 0, 2]
    assert classification_spec(spec).label_names == ("mid", "neg", "pos")


def test_jsonl_spec_pair_bool_and_explicit_labels(tmp_path):
    f = _write_jsonl(tmp_path / "qa.jsonl", [
        {"q": "is it?", "ctx": "yes it is", "ok": True}, {"q": "was it?", "ctx": "no", "ok": False},
    ])
    ds = load_classification(f"jsonl:{f}?text=ctx&text_pair=q&label=ok", "validation")
    assert ds.column_names == ["text", "text_pair", "label"]
    assert list(ds["label"]) == [1, 0] and ds.features["label"].names == ["false", "true"]
    g = _write_jsonl(tmp_path / "s.jsonl", [{"t": "a", "y": "pos"}, {"t": "b", "y": "pos"}])
    ds = load_classification(f"jsonl:{g}?text=t&label=y&labels=neg,pos", "test")
    assert list(ds["label"]) == [1, 1] and ds.features["label"].names == ["neg", "pos"]


def test_split_placeholder_shares_label_mapping(tmp_path):
    # The test file lacks class "a": its mapping must still come from all split files.
    _write_jsonl(tmp_path / "train.jsonl", [{"t": "x", "y": "a"}, {"t": "y", "y": "b"}])
    _write_jsonl(tmp_path / "test.jsonl", [{"t": "z", "y": "b"}])
    ds = load_classification(f"jsonl:{tmp_path}/{{split}}.jsonl?text=t&label=y", "test")
    assert list(ds["label"]) == [1] and ds.features["label"].names == ["a", "b"]


def test_csv_spec_int_labels(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("sentence,label\nhello there,1\n\"a, comma\",0\n")
    ds = load_classification(f"csv:{f}?text=sentence&label=label", "train")
    assert list(ds["text"]) == ["hello there", "a, comma"] and list(ds["label"]) == [1, 0]
    assert ds.features["label"].names == ["0", "1"]
    # Labels that are not 0..K-1 are mapped in sorted order, never confused with their positions.
    g = tmp_path / "stars.csv"
    g.write_text("t,stars\na,2\nb,1\nc,5\n")
    ds = load_classification(f"csv:{g}?text=t&label=stars", "train")
    assert ds.features["label"].names == ["1", "2", "5"] and list(ds["label"]) == [1, 0, 2]
    h = tmp_path / "d.tsv"
    h.write_text("t\ty\na, b\tneg\n")  # commas inside a tab-separated field
    ds = load_classification(f"tsv:{h}?text=t&label=y&labels=neg,pos", "train")
    assert list(ds["text"]) == ["a, b"] and list(ds["label"]) == [0]
    assert classification_spec("rte").label_names == ("entailment", "not_entailment")


def test_spec_errors(tmp_path):
    f = _write_jsonl(tmp_path / "d.jsonl", [{"sentence": "x", "label": 0}])
    with pytest.raises(DataFieldError, match="no field.*review.*available: sentence, label"):
        load_classification(f"jsonl:{f}?text=review&label=label", "train")
    with pytest.raises(DataError, match="give text=FIELD and label=FIELD"):
        load_classification(f"jsonl:{f}?text=sentence", "train")
    with pytest.raises(DataError, match="unknown parameter"):
        load_classification(f"jsonl:{f}?text=sentence&label=label&colour=red", "train")
    with pytest.raises(DataNotFoundError, match="no file .*missing.jsonl.*holds: d.jsonl.*path in the spec"):
        load_classification(f"jsonl:{tmp_path}/missing.jsonl?text=a&label=b", "train")
    with pytest.raises(UnknownTaskError, match="jsonl:PATH"):
        load_classification("parquet:/x?text=a&label=b", "train")
    odd = _write_jsonl(tmp_path / "odd.jsonl", [{"t": "x", "y": "maybe"}])
    with pytest.raises(DataError, match="label 'maybe' is not one of neg, pos"):
        load_classification(f"jsonl:{odd}?text=t&label=y&labels=neg,pos", "train")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"a": 1}\nnot json at all\n')
    with pytest.raises(DataError, match="could not read .*broken.jsonl as json"):
        load_classification(f"jsonl:{broken}?text=a&label=a", "train")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(EmptySplitError, match="empty"):
        load_classification(f"jsonl:{empty}?text=a&label=b", "train")


def test_data_dir_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNEPATH_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataNotFoundError, match="PRUNEPATH_DATA=.*nowhere is not a directory"):
        load_classification("sst2", "validation")
    monkeypatch.setenv("PRUNEPATH_DATA", str(tmp_path))  # exists, but holds nothing
    with pytest.raises(DataNotFoundError, match="no file .*sst2/validation.jsonl"):
        load_classification("sst2", "validation")
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "wiki_demo.txt").write_text("\n\n  \n")
    with pytest.raises(EmptySplitError, match="calibration/train holds no text"):
        load_lm_text("calibration")


def test_without_data_dir_offline_says_set_prunepath_data(monkeypatch):
    monkeypatch.delenv("PRUNEPATH_DATA", raising=False)
    monkeypatch.setattr("prunepath.models.hub_reachable", lambda *a, **k: False)
    with pytest.raises(DataNotFoundError, match="export PRUNEPATH_DATA"):
        load_classification("rte", "validation")
    with pytest.raises(DataNotFoundError, match="GLUE hides its test labels"):
        load_classification("sst2", "test")
