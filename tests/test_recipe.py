"""The default checkpoint's recipe is data: every stage's command is one the command line accepts."""

import pytest

from prunepath.cli import build_parser
from prunepath.train.config import FLAT_FIELDS, TrainConfig
from prunepath.train.recipe import DEFAULT_RECIPE


def test_the_default_recipe_has_thirteen_numbered_stages():
    assert [s.number for s in DEFAULT_RECIPE.stages] == list(range(1, 14))
    assert all(s.command[0] in ("train", "extract-adapter") for s in DEFAULT_RECIPE.stages)
    for s in DEFAULT_RECIPE.stages:  # each stage starts from the one before it (stage 1 from the base model)
        if s.number > 1:
            assert s.command[s.command.index("--checkpoint") + 1] == f"s{s.number - 1}"
        assert s.command[s.command.index("--out") + 1] == f"s{s.number}"


@pytest.mark.parametrize("stage", DEFAULT_RECIPE.stages, ids=lambda s: f"stage{s.number}")
def test_every_stage_parses_with_the_command_line(stage, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    if stage.corpus:  # the data mix names the corpus files: make them so the source check passes
        for path in ("calib", "wt", "answers"):
            (tmp_path / f"{stage.corpus.lower()}_{path}.jsonl").write_text("{}\n")
    args = build_parser(list(stage.command)).parse_args(list(stage.command))
    if stage.command[0] == "train":
        cfg = TrainConfig.from_flat({k: v for k, v in vars(args).items() if k in FLAT_FIELDS})
        assert cfg.schedule.steps > 0


def test_corpus_commands_parse_too():
    for corpus in DEFAULT_RECIPE.corpora:
        for command in corpus.commands():
            build_parser(list(command)).parse_args(list(command))
    assert DEFAULT_RECIPE.corpus("A").commands()[0][-1] == "a_calib.jsonl"
    with pytest.raises(KeyError, match="no corpus 'Z'"):
        DEFAULT_RECIPE.corpus("Z")
