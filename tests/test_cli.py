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


def test_bad_tau_is_one_clear_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["route", "text", "--tau", "0", "--checkpoint", "/nonexistent"])
    assert "τ must be > 0" in str(exit_.value)


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
