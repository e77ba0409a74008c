"""The results of record (prunepath.results), their views (prunepath report), the README and the wheel's contents."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from prunepath import report, results

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_results_dir_is_the_checkouts_and_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(results.RESULTS_ENV, raising=False)
    assert results.results_dir() == ROOT / "results"
    monkeypatch.setenv(results.RESULTS_ENV, str(tmp_path))
    assert results.results_dir() == tmp_path
    monkeypatch.setenv(results.RESULTS_ENV, str(tmp_path / "missing"))
    with pytest.raises(results.ResultsNotFoundError, match="PRUNEPATH_RESULTS=.*missing is not a folder"):
        results.results_dir()


def test_installed_without_a_checkout_says_how_to_find_the_results(tmp_path, monkeypatch):
    """An installed wheel has no results/ beside it: reading says to set PRUNEPATH_RESULTS; writing uses ./results."""
    monkeypatch.delenv(results.RESULTS_ENV, raising=False)
    monkeypatch.setattr(results, "_checkout_results", lambda: None)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(results.ResultsNotFoundError, match="export PRUNEPATH_RESULTS="):
        results.load_sweep("default_wikitext2_h200")
    assert results.decode_benchmarks() == []  # the explorer then says none is recorded
    path = results.write_sweep(results.sweep_path("my-ckpt", "wikitext2", "cpu"), {"device": "cpu"}, [])
    assert path == tmp_path / "results" / "sweeps" / "my-ckpt_wikitext2_cpu.json"
    assert results.load_sweep("my-ckpt_wikitext2_cpu").checkpoint == "my-ckpt"


def test_every_sweep_of_record_loads_and_says_where_and_when_it_ran():
    sweeps = results.list_sweeps()
    assert {"default_wikitext2_h200", "default_sst2-probe_h200", "default_sst2-prompt_h200"} <= {s.name for s in sweeps}
    for s in sweeps:
        assert s.rows and s.meta.get("device") and s.meta.get("date") and s.commands, s.name
        assert re.fullmatch(r"[a-z0-9.-]+_[a-z0-9.-]+_[a-z0-9]+", s.name), f"{s.name}: <checkpoint>_<task>_<device>"
    assert all(s.checkpoint == "default" for s in results.list_sweeps("default"))
    wt = results.load_sweep("default_wikitext2_h200").values("wikitext2", "perplexity")
    assert wt[("prunepath-layer", 0.5)] < wt[("topk", 0.5)] and ("dense", None) in wt


def test_the_results_folder_stays_small_and_one_json_per_result():
    tracked = subprocess.run(["git", "ls-files", "results"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    assert len(tracked) <= 60, f"results/ holds {len(tracked)} tracked files (at most 60)"
    views = [p for p in tracked if p.endswith((".html", ".csv")) or (p.endswith(".md") and p.count("/") > 1)]
    assert not views, f"views are made by `prunepath report`, not committed: {views}"
    for p in tracked:
        if p.startswith("results/bench/"):
            data = results.load_bench(ROOT / p)
            assert data.get("device") and data.get("date"), p


def test_sweep_rows_name_their_file_and_the_checkpoints_training():
    rows = results.sweep_rows("default")
    assert rows and all(r["source"].startswith("sweeps/default_") for r in rows)
    assert all(isinstance(r["value"], (int, float)) for r in rows)
    assert any(r["trained"] for r in rows)


def test_a_missing_or_foreign_file_is_a_clear_error(tmp_path):
    with pytest.raises(results.ResultsNotFoundError, match="there are: .*default_wikitext2_h200"):
        results.load_sweep("no_such_sweep")
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="one JSON object"):
        results.load_sweep(tmp_path / "x.json")
    (tmp_path / "y.json").write_text('{"meta": {}, "rows": 3}')
    with pytest.raises(ValueError, match="is not a sweep"):
        results.load_sweep(tmp_path / "y.json")
    (tmp_path / "z.json").write_text('{"meta": {}, "rows": [')  # a sweep still writing it
    with pytest.raises(ValueError, match="not JSON"):
        results.load_sweep(tmp_path / "z.json")


def test_write_is_atomic_and_round_trips(tmp_path):
    rows = [{"method": "dense", "target_fraction": None, "task": "wikitext2", "metric": "perplexity", "value": 20.5,
             "active_fraction": 1.0}]
    path = results.write_sweep(tmp_path / "sub" / "ck_wikitext2_cpu", {"device": "cpu"}, rows)
    assert path.suffix == ".json" and not list(tmp_path.glob("sub/*.tmp"))
    again = results.load_sweep(path)
    assert again.rows == rows and again.values("wikitext2", "perplexity") == {("dense", None): 20.5}
    bench = results.write_bench(tmp_path / "b.json", {"kind": "decode", "device": "cpu", "rows": []})
    assert results.load_bench(bench)["kind"] == "decode"


def test_bench_file_names_follow_the_convention():
    assert results.bench_path("decode", "NVIDIA H200", "default").name == "decode_default_h200.json"
    assert results.bench_path("decode", "cpu", "llama-8b").name == "decode_llama-8b_cpu.json"
    assert results.bench_path("ffn", "NVIDIA H200").name == "ffn_h200.json"
    assert results.device_slug("CPU: AMD EPYC 7B13") == "cpu"
    recorded = results.decode_benchmarks()
    assert any(r.source.startswith("decode_default_h200.json") and r.device == "NVIDIA H200" for r in recorded)


def test_readme_results_table_is_made_from_the_sweeps():
    text = README.read_text()
    assert report.readme_with_table(text) == text, "README's results table drifted: run `prunepath report --readme`"
    table = text[text.index(report.README_START):text.index(report.README_END)]
    wt = results.load_sweep("default_wikitext2_h200").values("wikitext2", "perplexity")
    assert f"**{wt[('prunepath-layer', 0.5)]:.2f}**" in table  # the best figure of its row, from the file


def test_readme_check_fails_on_a_drifted_table(tmp_path, capsys):
    from prunepath.cli import main

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{report.README_START}\n| stale |\n{report.README_END}\n")
    cli = ["report", "--readme", "--readme-file", str(readme)]
    assert main(cli + ["--check"]) == 1
    assert main(cli) == 0 and main(cli + ["--check"]) == 0
    assert "| stale |" not in readme.read_text()
    readme.write_text("# no markers\n")
    assert main(cli) == 2 and "no results table block" in capsys.readouterr().err


def test_report_writes_views_on_demand(tmp_path, capsys):
    from prunepath.cli import main

    assert main(["report", "default_rte-probe_h200", "--out", str(tmp_path), "--html"]) == 0
    assert "| prunepath-layer | 0.5 |" in (tmp_path / "default_rte-probe_h200.md").read_text()
    assert (tmp_path / "default_rte-probe_h200.csv").read_text().startswith("method,knob,target_fraction")
    assert (tmp_path / "default_rte-probe_h200.html").stat().st_size > 1000
    assert main(["report", "decode_default_h200"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    assert main(["report", "no_such_sweep"]) == 2


def test_readme_figure_is_made_from_the_sweep(tmp_path):
    pytest.importorskip("matplotlib")
    path = report.tradeoff_figure(tmp_path / "f.svg")
    assert "<svg" in path.read_text()[:2000]
    assert (ROOT / "results" / report.FIGURE).is_file()
    assert report.FIGURE in README.read_text()


def test_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    for target in ("make test-fast", "make test", "make test-gpu", "make explorer", "make book"):
        assert target in text
    from prunepath.cli import _PLUGINS, build_parser

    commands = set(build_parser(["--help"])._subparsers._group_actions[0].choices) | set(_PLUGINS)
    listed = set(re.findall(r"^\| `prunepath ([a-z-]+)", text, flags=re.M))
    assert commands <= listed, f"commands missing from the README's CLI table: {sorted(commands - listed)}"
    for doc in (README, ROOT / "results" / "README.md", ROOT / "results" / "HISTORY.md"):
        for line in doc.read_text().splitlines():
            assert "../shared" not in line or "shared/data" in line, f"{doc.name} points outside the repository: {line}"


def test_the_wheel_carries_what_load_default_reads_and_nothing_else():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setuptools["package-data"]["prunepath"]
    excluded = setuptools.get("exclude-package-data", {}).get("prunepath", [])
    pkg = ROOT / "prunepath"
    shipped = {p.relative_to(pkg / "checkpoints" / "default").as_posix()
               for pattern in patterns for p in pkg.glob(pattern)
               if p.is_file() and not any(p.match(str(pkg / x)) for x in excluded)}
    assert shipped == {"prunepath.json", "prunepath.safetensors", "adapter/adapter_config.json",
                       "adapter/adapter_model.int8.safetensors"}


def test_default_checkpoint_training_logs_are_one_file():
    folder = ROOT / "prunepath" / "checkpoints" / "default"
    assert not list(folder.glob("train_log*.json"))
    logs = json.loads((folder / "training_logs.json").read_text())
    stages = [s["recipe_stage"] for s in logs["stages"]]
    assert stages == [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12]
    assert all(s["log"] and "loss" in s["log"][0] and s["config"] for s in logs["stages"])


def _readme_python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def test_readme_has_python_blocks():
    assert len(_readme_python_blocks()) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_readme_python_blocks())))
def test_readme_python_block_runs(index):
    """Each Python block of the README, as written, on the real default model."""
    code = _readme_python_blocks()[index]
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"README block {index} failed:\n{code}\n{run.stderr[-3000:]}"
