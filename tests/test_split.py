"""Neuron splits: exact balance, valid permutations, determinism, recovery of planted structure, errors."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from prunepath.ffn.split import _rebalance, balanced_assign, check_expert_size, divisors_near, split_neurons


def planted(n_experts=12, g=8, d=40, noise=0.8, seed=0):
    """Keys [E*G, D] drawn around E random directions, G each, in a scrambled order."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_experts, d, generator=gen)
    truth = torch.randperm(n_experts * g, generator=gen) // g  # [F] planted expert of each neuron
    keys = centres[truth] + noise * torch.randn(n_experts * g, d, generator=gen)
    return keys, truth


def planted_activations(truth, n_tok=600, seed=0, smooth=False):
    """Calibration activations [N, F]: each token switches on ~3 planted groups, which fire together."""
    gen = torch.Generator().manual_seed(seed)
    n_groups = int(truth.max()) + 1
    on = torch.rand(n_tok, n_groups, generator=gen) < 3 / n_groups  # [N, E]
    p = torch.where(on[:, truth], 0.8, 0.03)  # [N, F]
    a = (torch.rand(p.shape, generator=gen) < p) * torch.rand(p.shape, generator=gen)
    if smooth:  # SiLU-like: small negative values everywhere, no exact zeros
        a = a - 0.05 * torch.rand(p.shape, generator=gen)
    return a


def purity(labels, truth):
    """Fraction of neurons whose expert's majority planted group is their own (1.0 = perfect recovery)."""
    n = int(truth.max()) + 1
    m = torch.zeros(n, n).index_put_((labels, truth), torch.ones(labels.numel()), accumulate=True)
    return float(m.max(1).values.sum() / labels.numel())


def check_valid(split, n_neurons, g, keys):
    assert split.perm.dtype == torch.long
    assert torch.equal(split.perm.sort().values, torch.arange(n_neurons))  # a permutation
    assert torch.equal(torch.bincount(split.labels), torch.full((n_neurons // g,), g))  # exactly G each
    # expert e owns new positions e*G..(e+1)*G-1, and its centroid is the mean of its normalised keys
    xn = F.normalize(keys, dim=-1)
    for e in (0, n_neurons // g - 1):
        members = split.perm[e * g : (e + 1) * g]
        assert (split.labels[members] == e).all()
        assert torch.allclose(split.centroids[e], xn[members].mean(0), atol=1e-6)
    assert split.centroids.shape == (n_neurons // g, keys.shape[1])


@pytest.mark.parametrize("method", ["kmeans", "coact", "random"])
def test_valid_balanced_split(method):
    keys, truth = planted()
    acts = planted_activations(truth) if method == "coact" else None
    sp = split_neurons(keys, 8, method, seed=3, activations=acts)
    check_valid(sp, 96, 8, keys)
    assert sp.method == method and sp.expert_size == 8 and sp.n_experts == 12


@pytest.mark.parametrize("method", ["kmeans", "coact", "random"])
def test_deterministic_for_a_seed(method):
    keys, truth = planted()
    acts = planted_activations(truth)
    a = split_neurons(keys, 8, method, seed=1, activations=acts)
    b = split_neurons(keys.clone(), 8, method, seed=1, activations=acts.clone())
    assert torch.equal(a.perm, b.perm)
    if method == "random":
        assert not torch.equal(a.perm, split_neurons(keys, 8, method, seed=2).perm)


def test_kmeans_recovers_planted_clusters():
    keys, truth = planted(n_experts=16, g=12, d=64, noise=0.8)
    assert purity(split_neurons(keys, 12, "kmeans").labels, truth) == 1.0
    assert purity(split_neurons(keys, 12, "random").labels, truth) < 0.5  # the test can tell them apart


@pytest.mark.parametrize("smooth", [False, True])  # ReLU-style (exact zeros) and SiLU-style activations
def test_coact_recovers_planted_groups(smooth):
    keys, truth = planted()
    acts = planted_activations(truth, smooth=smooth)
    assert purity(split_neurons(keys, 8, "coact", activations=acts).labels, truth) >= 0.95


def test_kmeans_beats_random_on_quality():
    keys, _ = planted(noise=2.0)
    quality = {m: split_neurons(keys, 8, m).centroids.norm(dim=-1).mean() for m in ("kmeans", "random")}
    assert quality["kmeans"] > quality["random"] + 0.05


def test_trivial_sizes():
    keys = torch.randn(12, 5)
    assert torch.equal(split_neurons(keys, 1).perm, torch.arange(12))  # one neuron per expert
    sp = split_neurons(keys, 12)  # one expert holds everything
    check_valid(sp, 12, 12, keys)


def test_balanced_assign_exact_capacities():
    torch.manual_seed(0)
    scores = torch.randn(30, 4)
    scores[:, 0] += 5  # everyone prefers column 0, which has room for only 3
    cap = torch.tensor([3, 7, 10, 10])
    labels = balanced_assign(scores, cap)
    assert torch.equal(torch.bincount(labels, minlength=4), cap)
    # column 0 keeps the rows that would lose most by going elsewhere (largest margin)
    margin = scores[:, 0] - scores[:, 1:].max(1).values
    assert set(labels.eq(0).nonzero().flatten().tolist()) == set(margin.topk(3).indices.tolist())


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8), st.integers(0, 2**31 - 1), st.booleans())
def test_balanced_assign_any_capacities(n_cols, seed, lopsided):
    # any scores, any capacities summing to the row count: exact capacities, every row placed
    gen = torch.Generator().manual_seed(seed)
    cap = torch.randint(0, 6, (n_cols,), generator=gen)
    cap[0] += 1  # at least one row
    scores = torch.randn(int(cap.sum()), n_cols, generator=gen)
    if lopsided:  # everyone wants the same column
        scores[:, -1] += 10
    labels = balanced_assign(scores, cap)
    assert torch.equal(torch.bincount(labels, minlength=n_cols), cap)


def test_rebalance_moves_weakest_members():
    # parts of sizes 5, 3, 4 -> 4, 4, 4: part 0 evicts its lowest-affinity member, which goes to part 1
    parts = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    aff = torch.ones(12, 3)
    aff[torch.arange(12), parts] = 5.0
    aff[3, 0] = 0.5  # neuron 3 barely belongs to part 0 ...
    aff[3, 1] = 2.0  # ... and prefers part 1 over part 2
    labels = _rebalance(parts, aff, 4)
    assert torch.equal(torch.bincount(labels), torch.tensor([4, 4, 4]))
    assert labels[3] == 1 and torch.equal(labels[[0, 1, 2, 4]], parts[[0, 1, 2, 4]])


def test_divisors_near():
    assert divisors_near(1536, 40) == [32, 48, 64]
    assert divisors_near(6144, 32)[1] == 32
    assert check_expert_size(1536, 32) == 32
    with pytest.raises(ValueError, match="divisors near it: 32, 48, 64"):
        check_expert_size(1536, 40)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((torch.randn(1536, 8), 40), {}, "size 40 does not divide d_ff 1536; divisors near it: 32, 48, 64"),
        ((torch.randn(96, 8), 0), {}, "positive integer dividing d_ff 96"),
        ((torch.randn(96, 8), 8, "spectral"), {}, "choose one of kmeans, coact, random"),
        ((torch.randn(96, 8), 8, "coact"), {}, "needs activations"),
        ((torch.randn(96, 8), 8, "coact"), {"activations": torch.rand(10, 95)}, r"activations must be \[N, F=96\]"),
        ((torch.randn(96),), {}, r"keys must be a float tensor \[F, D\]"),
        ((torch.full((96, 8), float("nan")), 8), {}, "NaN"),
    ],
)
def test_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        split_neurons(*args, **kwargs)


def test_bench_cli_dispatches_to_split_benchmark(tmp_path):
    # `prunepath bench split ARGS` reaches prunepath.bench.split.main(ARGS), which writes its JSON
    import argparse
    import json

    from prunepath.bench import add_cli

    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    out = tmp_path / "bench_split.json"
    args = parser.parse_args(["bench", "split", "--quick", "--repeats", "1", "--no-coact", "--out", str(out)])
    assert args.func(args) == 0
    result = json.loads(out.read_text())
    assert {"device", "cores", "versions", "date", "cases"} <= set(result)
    case = result["cases"][0]
    assert case["kmeans_mean_cos"] > case["random_mean_cos"]
