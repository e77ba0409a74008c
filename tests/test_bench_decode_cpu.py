"""`prunepath bench decode --model default --device cpu`: its input checks, and (slow) one short real run."""

import json

import pytest

from prunepath.bench.decode import main
from prunepath.bench.decode_cpu import parse_kept


def _error(msg):
    raise SystemExit(msg)


def test_kept_fractions_outside_0_1_are_refused_with_an_example():
    assert parse_kept("0.25,0.5,1", _error) == [0.25, 0.5, 1.0]
    for bad in ("0,0.5", "1.5", "-0.2", "", "a,b"):
        with pytest.raises(SystemExit, match=r"\(0, 1\]|as numbers"):
            parse_kept(bad, _error)


def test_the_cli_exits_2_on_bad_input(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", "default", "--device", "cpu", "--kept", "0.25,2"])
    assert e.value.code == 2 and "(0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--model", "default", "--device", "cpu", "--threads", "0"])
    assert e.value.code == 2


@pytest.mark.slow
def test_a_short_run_writes_the_schema(tmp_path):
    out = tmp_path / "decode_default_cpu.json"
    assert main(["--model", "default", "--device", "cpu", "--kept", "0.25,1", "--rounds", "1", "--chunk", "1",
                 "--no-hf", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["kind"] == "decode" and data["bandwidth_gbs"] > 0
    names = [r["variant"] for r in data["rows"]]
    assert names[:3] == ["dense", "kept=0.25", "kept=1"]
    for r in data["rows"]:
        for key in ("path", "kept_fraction", "tokens_per_s", "ms_per_token", "ms_p20", "ms_p80", "bytes_per_token",
                    "gb_per_s", "bandwidth_fraction", "speedup_vs_dense", "runs"):
            assert key in r
    assert 0.15 < data["rows"][1]["kept_fraction"] < 0.35
    assert data["rows"][1]["bytes_per_token"] < data["rows"][0]["bytes_per_token"]
