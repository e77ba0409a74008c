"""Self-generated instruction data (`prunepath selfdata`) and chat-format training data (`--data chat:FILE`)."""

import json

import pytest
import torch

from prunepath.train.config import RoutingLoss, Schedule, TrainConfig
from prunepath.train.data import DataConfig, check_data, training_batches
from prunepath.train.selfdata import generate_selfdata, read_rows

ROWS = [{"instruction": "Name a colour.", "input": ""},
        {"instruction": "Add the numbers.", "input": "2 and 3"},
        {"instruction": "Say hello.", "input": ""}]


@pytest.mark.slow
def test_selfdata_answers_every_row_and_resumes_without_redoing_any(default_model, tmp_path):
    model, tok = default_model
    out = tmp_path / "self.jsonl"
    generate_selfdata(model, tok, ROWS[:2], out, max_new_tokens=6, batch_size=2, progress=False)
    first = read_rows(out)
    assert [r["instruction"] for r in first] == ["Name a colour.", "Add the numbers."]
    assert first[1]["input"] == "2 and 3" and all(isinstance(r["finished"], bool) for r in first)
    with pytest.raises(FileExistsError, match="--resume"):
        generate_selfdata(model, tok, ROWS, out, max_new_tokens=6, progress=False)
    generate_selfdata(model, tok, ROWS, out, max_new_tokens=6, batch_size=2, resume=True, progress=False)
    rows = read_rows(out)
    assert len(rows) == 3 and rows[:2] == first  # the first two kept as they were, only the third added
    # Greedy answers are the model's own: the same prompt alone gives the same text.
    alone = tmp_path / "alone.jsonl"
    generate_selfdata(model, tok, ROWS[2:], alone, max_new_tokens=6, batch_size=1, progress=False)
    assert read_rows(alone)[0]["output"] == rows[2]["output"]


@pytest.mark.slow
def test_a_cut_off_answer_is_marked_unfinished(default_model, tmp_path):
    model, tok = default_model
    out = tmp_path / "cut.jsonl"
    generate_selfdata(model, tok, [{"instruction": "Write a long story about a dragon.", "input": ""}], out,
                      max_new_tokens=3, batch_size=1, progress=False)
    row = read_rows(out)[0]
    assert row["finished"] is False and len(tok(row["output"], add_special_tokens=False)["input_ids"]) <= 4


def test_damaged_instruction_files_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="prunepath selfdata --out"):
        read_rows(tmp_path / "none.jsonl")
    half = tmp_path / "half.jsonl"
    half.write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}) + '\n{"instruction": "c", "out')
    with pytest.raises(ValueError, match=r"half.jsonl:2 is not JSON.*--resume"):
        read_rows(half)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "a", "input": ""}) + "\n")
    with pytest.raises(ValueError, match="no text field 'output'"):
        read_rows(bad)
    with pytest.raises(FileNotFoundError, match="prunepath selfdata"):
        check_data(f"calibration+chat:{tmp_path / 'missing.jsonl'}")


@pytest.mark.slow
def test_chat_training_data_uses_the_template_and_cut_off_answers_do_not_end(default_model, tmp_path):
    tok = default_model[1]
    path = tmp_path / "chat.jsonl"
    rows = [{"instruction": "Say yes.", "input": "", "output": "Yes.", "finished": True},
            {"instruction": "Count.", "input": "to three", "output": "One, two", "finished": False},
            {"instruction": "Say no.", "input": "", "output": "No.", "finished": True}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ids, mask = training_batches(tok, DataConfig(source=f"chat:{path}", tokens=10_000, seq_len=96))
    texts = {t.split("<|im_start|>user\n")[1][:5]: t for t in (tok.decode(i[m.bool()]) for i, m in zip(ids, mask))}
    assert sorted(texts) == ["Count", "Say n", "Say y"]
    user, answer = "<|im_start|>user\nSay yes.<|im_end|>\n", "<|im_start|>assistant\nYes.<|im_end|>"
    assert texts["Say y"].startswith("<|im_start|>system") and user in texts["Say y"] and answer in texts["Say y"]
    # the cut-off answer is kept but has no end-of-turn token: nothing teaches stopping mid-answer
    assert texts["Count"].endswith("<|im_start|>assistant\nOne, two")
    assert ids[0, 0].item() == tok.convert_tokens_to_ids("<|im_start|>")  # the template's start, nothing added
    mixed, _ = training_batches(tok, DataConfig(source=f"calibration+chat:{path}", tokens=512, seq_len=96))
    assert torch.equal(mixed[-len(ids):], ids)  # the mix puts the chat rows after the LM windows


def test_the_command_refuses_an_existing_file_before_loading_a_model(tmp_path, capsys, monkeypatch):
    import prunepath.models
    from prunepath.cli import main

    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(prunepath.models, "load_model", no_load)
    out = tmp_path / "self.jsonl"
    out.write_text("")
    assert main(["selfdata", "--out", str(out), "--limit", "1"]) == 2
    assert "--resume" in capsys.readouterr().err and out.read_text() == ""
    new = str(tmp_path / "new.jsonl")
    assert main(["selfdata", "--mode", "continue", "--source", "alpaca", "--out", new]) == 2
    assert "calibration or wikitext2" in capsys.readouterr().err
    assert main(["selfdata", "--samples", "2", "--limit", "1", "--out", new]) == 2  # greedy twice: the same answer
    assert "--temperature" in capsys.readouterr().err
    assert main(["selfdata", "--temperature", "1", "--top-p", "0", "--limit", "1", "--out", new]) == 2
    assert "top_p" in capsys.readouterr().err and not (tmp_path / "new.jsonl").exists()


def test_skip_answers_the_rows_after_another_runs_prompts(tmp_path, capsys, monkeypatch):
    import json

    import prunepath.models
    import prunepath.train.selfdata
    from prunepath.cli import main

    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n" for i in range(5)))
    asked = []
    monkeypatch.setattr(prunepath.models, "load_model", lambda *_a, **_k: (None, None))
    monkeypatch.setattr(prunepath.train.selfdata, "generate_selfdata",
                        lambda _m, _t, rows, *_a, **_k: asked.append(rows))
    assert main(["selfdata", "--source", str(src), "--skip", "3", "--out", str(tmp_path / "a.jsonl")]) == 0
    assert main(["selfdata", "--source", str(src), "--skip", "1", "--limit", "2", "--samples", "2",
                 "--temperature", "1", "--out", str(tmp_path / "b.jsonl")]) == 0
    assert [[r["instruction"] for r in rows] for rows in asked] == [["q3", "q4"], ["q1", "q2", "q1", "q2"]]
    assert main(["selfdata", "--source", str(src), "--skip", "5", "--out", str(tmp_path / "c.jsonl")]) == 2
    assert "--skip 5 past the source's end" in capsys.readouterr().err


@pytest.mark.slow
def test_sampled_answers_repeat_with_the_seed_and_resume_to_the_same_file(default_model, tmp_path):
    model, tok = default_model
    rows = [{"instruction": "Name an animal.", "input": ""}] * 3
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    kw = dict(max_new_tokens=5, batch_size=1, progress=False, temperature=1.0, top_p=1.0, seed=3)
    generate_selfdata(model, tok, rows, whole, **kw)
    generate_selfdata(model, tok, rows[:1], part, **kw)
    generate_selfdata(model, tok, rows, part, resume=True, **kw)
    assert read_rows(part) == read_rows(whole)  # an interrupted file equals an uninterrupted one
    assert len({r["output"] for r in read_rows(whole)}) > 1  # sampled: one prompt, different answers
    with pytest.raises(ValueError, match="temperature"):
        generate_selfdata(model, tok, rows, tmp_path / "bad.jsonl", temperature=-1.0, progress=False)
    assert not (tmp_path / "bad.jsonl").exists()


@pytest.mark.slow
def test_continuations_start_with_the_real_prefix_and_train_packed(default_model, tmp_path):
    from prunepath.train.selfdata import generate_continuations, text_prefixes

    model, tok = default_model
    prefixes = text_prefixes(tok, "calibration", 5, prefix_tokens=8, seed=1)
    assert prefixes.shape == (5, 8)
    assert torch.equal(prefixes, text_prefixes(tok, "calibration", 5, prefix_tokens=8, seed=1))
    assert not torch.equal(prefixes, text_prefixes(tok, "calibration", 5, prefix_tokens=8, seed=2))
    out = tmp_path / "cont.jsonl"
    generate_continuations(model, tok, prefixes[:2], out, "calibration", max_new_tokens=6, batch_size=2,
                           progress=False)
    generate_continuations(model, tok, prefixes, out, "calibration", max_new_tokens=6, batch_size=2, resume=True,
                           progress=False)
    rows = read_rows(out, fields=("text",))
    assert len(rows) == 5 and all(r["source"] == "calibration" and r["text"].startswith(r["prefix"]) for r in rows)
    assert all(len(tok(r["text"], add_special_tokens=False)["input_ids"]) <= 8 + 6 + 2 for r in rows)
    assert [r["prefix"] for r in rows] == [tok.decode(p) for p in prefixes]
    # text:FILE packs the rows (EOS between them) into full windows: no padding at all
    ids, mask = training_batches(tok, DataConfig(source=f"text:{out}", tokens=24, seq_len=12))
    assert ids.shape == (2, 12) and bool(mask.all())
    assert (ids == tok.eos_token_id).any()
    with pytest.raises(ValueError, match="fewer than one"):
        training_batches(tok, DataConfig(source=f"text:{out}", tokens=10_000, seq_len=4096))
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text('{"prefix": "a"}\n')
    with pytest.raises(ValueError, match="no text field 'text'"):
        read_rows(no_text, fields=("text",))
    with pytest.raises(FileNotFoundError, match="selfdata --mode continue"):
        check_data(f"calibration+text:{tmp_path / 'missing.jsonl'}")


def test_a_mix_takes_the_stated_tokens_of_each_part():
    from prunepath.train.data import mix_parts

    assert mix_parts("calibration+wikitext2", 1000) == [("calibration", 500), ("wikitext2", 500)]
    assert mix_parts("calibration@200+wikitext2+alpaca", 1000) == [("calibration", 200), ("wikitext2", 400),
                                                                    ("alpaca", 400)]
    assert mix_parts("calibration@300", 10) == [("calibration", 300)]
    with pytest.raises(ValueError, match="whole number"):
        mix_parts("calibration@many+alpaca", 1000)
    with pytest.raises(ValueError, match="raise --tokens"):
        mix_parts("calibration@1000+alpaca", 1000)
    assert check_data("calibration@200+wikitext2") == "calibration@200+wikitext2"
    with pytest.raises(ValueError, match="unknown training data"):
        check_data("calibration@200+wikipedia")


@pytest.mark.slow
def test_the_trainer_says_when_the_data_holds_fewer_tokens_than_asked(default_model, tmp_path):
    from prunepath.convert import MoefyConfig, moefy
    from prunepath.models import load_model
    from prunepath.train.trainer import Trainer

    tok = default_model[1]
    path = tmp_path / "short.jsonl"
    path.write_text(json.dumps({"text": "One short line of text, far fewer tokens than asked."}) + "\n")
    model, _ = load_model()
    moefy(model, MoefyConfig(router_init="zero"), progress=False)
    cfg = TrainConfig(objective="lm",
                      data=DataConfig(source=f"text:{path}", tokens=4096, seq_len=8),
                      schedule=Schedule(lr=0.0),
                      routing=RoutingLoss(gate="one"))
    with pytest.warns(UserWarning, match="holds 8 tokens of the 4,096 asked for"):
        Trainer(model, tok, cfg, tmp_path / "run", progress=False)  # 12 tokens pack into one 8-token window
