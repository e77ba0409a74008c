"""The `prunepath` command line: help for every subcommand, the core commands, clear errors."""

import json

import pytest

from prunepath.cli import _PLUGINS, main


@pytest.mark.parametrize("command", ["moefy", "info", "route", *_PLUGINS])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: prunepath " + command in capsys.readouterr().out


@pytest.mark.slow
def test_info_on_the_default_checkpoint(capsys):
    assert main(["info", "--checkpoint", "default", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["layers"], info["experts_per_layer"], info["expert_size"]) == (30, 48, 32)
    assert info["router_parameters"] == 30 * 48 * 576


@pytest.mark.slow
def test_route_prints_per_token_counts_at_each_tau(capsys):
    assert main(["route", "Sparse experts, one token at a time.", "--tau", "0.5", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "τ=0.5" in out and "τ=0.9" in out and "' experts'" in out
    fractions = [
        float(line.rsplit(" ", 1)[1].rstrip("%")) for line in out.splitlines() if "active FFN fraction" in line
    ]
    assert len(fractions) == 2 and fractions[0] < fractions[1]  # a larger budget keeps more experts


def test_missing_checkpoint_is_a_clear_error(capsys, tmp_path):
    assert main(["info", "--checkpoint", str(tmp_path)]) == 2
    assert "not a PrunePath checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_no_adapter_gives_the_routers_on_the_base_model(capsys):
    # The default checkpoint folds a LoRA adapter in; --no-adapter leaves it out, so the dense model is the base
    ppl = {}
    for flag in ([], ["--no-adapter"]):
        assert main(["eval", "--task", "wikitext2", "--limit", "128", "--tau", "1.5", "--json", *flag]) == 0
        ppl[bool(flag)] = json.loads(capsys.readouterr().out)["metrics"]["perplexity"]
    assert ppl[True] != pytest.approx(ppl[False], rel=1e-3)


def test_eval_fraction_and_tau_together_are_refused_before_loading(capsys):
    args = ["eval", "--task", "wikitext2", "--tau", "0.5", "--fraction", "0.5", "--checkpoint", "/nonexistent"]
    assert main(args) == 2
    assert "one of --tau, --rule or --fraction" in capsys.readouterr().err


def test_calibrate_refuses_a_bad_target_before_loading(capsys):
    assert main(["calibrate", "--target", "0.5", "1.2", "--checkpoint", "/nonexistent"]) == 2
    assert "must lie in (0, 1)" in capsys.readouterr().err


def test_continue_adapter_refusals_come_before_any_model_loads(tmp_path, capsys):
    (tmp_path / "prunepath.json").write_text("{}")  # a folder without adapter/
    cases = [
        (["--checkpoint", "default", "--trainable", "lora", "--no-adapter"], "contradicts --no-adapter"),
        (["--checkpoint", "default"], "needs --checkpoint and --trainable lora"),
        (["--checkpoint", str(tmp_path), "--trainable", "lora"], "has no adapter/ to continue"),
    ]
    for extra, message in cases:
        assert main(["train", "--continue-adapter", "--objective", "lm", "--out", str(tmp_path / "out"), *extra]) == 2
        assert message in capsys.readouterr().err


# --------------------------------------------------------------------------- tiny models made here (no hub)
def _byte_level_tokenizer():
    """A byte-level BPE tokenizer (as GPT-2's, SmolLM2's): 256 byte symbols, a few merges, one end token."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    vocab = {s: i for i, s in enumerate([*symbols, "Ġt", "he", "Ġthe", "<|endoftext|>"])}
    tk = Tokenizer(BPE(vocab, merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture
def tiny_dir(tmp_path):
    """A save_pretrained folder: a random 2-layer Llama (d_ff 128: 4 experts of 32) and a byte-level tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _byte_level_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


# --------------------------------------------------------------------------- python -m, exit codes
def test_python_m_prunepath_runs_the_cli():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "prunepath", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage: prunepath" in out.stdout and "route" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "prunepath", "route", "x", "--tau", "-1", "--checkpoint", "/nope"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "τ must be > 0" in bad.stderr


@pytest.mark.parametrize("argv, message", [
    (["route", "text", "--tau", "0", "--checkpoint", "/nonexistent"], "τ must be > 0"),  # before any loading
    (["eval", "--task", "wikitext2", "--tau", "50", "--checkpoint", "/nonexistent"], "did you mean 0.5"),
    (["info", "--checkpoint", "/nonexistent/ckpt"], "checkpoint /nonexistent/ckpt is missing"),
    (["route", "text", "--model", "/nonexistent/m.gguf"], "GGUF file /nonexistent/m.gguf is missing"),
    (["eval", "--task", "nosuchtask"], "unknown task 'nosuchtask'"),
])
def test_every_user_error_exits_2_with_its_cause(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # one line, no traceback


def test_a_missing_checkpoint_is_called_missing_and_the_fix_is_named(tmp_path, capsys):
    assert main(["route", "text", "--checkpoint", str(tmp_path / "gone")]) == 2
    err = capsys.readouterr().err
    assert "is missing" in err and "Fix:" in err


# --------------------------------------------------------------------------- route: readable tokens
def test_route_shows_readable_tokens_for_any_script(tiny_dir, capsys):
    text = "on the 日本語 Привет"
    assert main(["route", text, "--model", str(tiny_dir), "--tau", "0.5", "1.5"]) == 0
    out = capsys.readouterr().out
    assert "�" not in out
    # 語 is three UTF-8 bytes, so three byte-level tokens: each row says which piece of the character it is.
    assert "'語' 1/3" in out and "'語' 3/3" in out and "'П' 2/2" in out and "' the'" in out


def test_token_texts_group_byte_pieces_and_give_the_text_back():
    from prunepath.tokens import token_texts

    tok = _byte_level_tokenizer()
    for text in ("plain ascii", "日本語のテキスト", "Γειά σου κόσμε", "नमस्ते", "mixed: naïve 🙂 done"):
        ids = tok(text).input_ids
        pieces = token_texts(tok, ids)
        assert len(pieces) == len(ids) and not any("\ufffd" in p.text for p in pieces)
        # Each group counted once gives the text back, in order.
        assert "".join(p.text for p in pieces if p.part <= 1) == text
    assert [p.label() for p in token_texts(tok, tok("é").input_ids)] == ["'é' 1/2", "'é' 2/2"]


# --------------------------------------------------------------------------- eval: classes and label words
def _three_class_file(tmp_path):
    # Each class has its own words, so a probe on any features that see the words can separate all three.
    words = ["the cat sat", "blue green red", "one two three"]
    rows = [{"t": f"{words[i % 3]} {i}", "y": i % 3} for i in range(60)]
    (tmp_path / "three.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return f"jsonl:{tmp_path / 'three.jsonl'}?text=t&label=y"


def test_eval_scores_every_class_of_a_three_class_file(tiny_dir, tmp_path, capsys):
    spec = _three_class_file(tmp_path)
    assert main(["eval", "--task", spec + "&labels=animal,colour,number", "--model", str(tiny_dir), "--k", "3",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["settings"]["label_words"] == [" animal", " colour", " number"]
    assert len(res["settings"]["p_content_free"]) == 3 and sorted(res["settings"]["demo_labels"]) == [0, 1, 2]
    # The probe separates the three classes: as binary it could not pass 2/3.
    assert main(["eval", "--task", spec, "--model", str(tiny_dir), "--protocol", "probe", "--pooling", "mean",
                 "--n-train", "40"]) == 0
    out, err = capsys.readouterr()
    assert "3 classes, label words ' 0', ' 1', ' 2'" in out
    accuracy = float(next(line.split()[1] for line in out.splitlines() if line.strip().startswith("accuracy ")))
    assert accuracy > 0.9


def test_eval_refusals_name_the_cause_and_the_fix(tiny_dir, tmp_path, capsys):
    spec = _three_class_file(tmp_path)
    cases = [
        (spec + "&labels=a,b", "label 2 is not one of a, b"),  # fewer names than classes
        (spec + "&labels=cat,dog,cat", "must name each class once"),  # two classes, one word
    ]
    for task, message in cases:
        assert main(["eval", "--task", task, "--model", str(tiny_dir), "--k", "2"]) == 2
        err = capsys.readouterr().err
        assert message in err and ("Fix" in err or "&labels=" in err)


def test_eval_help_documents_label_words_and_both_meanings_of_dense(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "&labels=" in out and "any number of classes" in out
    assert "'dense' = the base model alone, without routers" in out and "still weighted by its gate" in out
