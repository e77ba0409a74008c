"""`prunepath bench ffn` / `bench decode` (GPU rows): bad input is a clear message and exit code 2."""

import pytest
import torch

from prunepath.bench import decode, ffn
from prunepath.bench.gpu_timing import BenchInputError, parse_fractions, stats


@pytest.mark.parametrize("text", ["0,0.5", "1.5", "0.25,-1", "a,b", ""])
def test_fractions_outside_the_unit_interval_are_refused(text):
    with pytest.raises(BenchInputError, match="fractions"):
        parse_fractions(text)


def test_fraction_list_is_parsed():
    assert parse_fractions("0.125, 0.25,1") == [0.125, 0.25, 1.0]


def test_bad_fraction_exits_2_with_a_message(capsys):
    assert ffn.main(["--fractions", "0,1"]) == 2
    assert "(0, 1]" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_no_gpu_is_a_message_not_a_trace(capsys):
    assert ffn.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().out
    assert decode.main(["--device", "cuda", "--model", "llama-8b"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().out
    assert decode.main(["--device", "cpu", "--model", "default-shape"]) == 2


def test_stats_median_and_quantiles():
    s = stats([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["median"], s["p20"], s["p80"], s["runs"]) == (3.0, 2.0, 4.0, 5)
