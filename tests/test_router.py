"""Routers: shapes, the paper's zero init, centroid init that already ranks experts, MoEfication's MLP."""

import pytest
import torch
import torch.nn.functional as F

from prunepath.routing.router import LinearRouter, MLPRouter, centroid_weight, make_router

D, E = 24, 6


def unit_centroids(seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(E, D, generator=g), dim=-1) * 0.3  # like means of 32 unit keys


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("shape", [(D,), (5, D), (2, 3, D)])  # one token, [N, D], [B, T, D]
def test_shapes(kind, shape):
    r = make_router(kind, D, E, init="centroid", centroids=unit_centroids())
    assert r(torch.randn(shape)).shape == (*shape[:-1], E)


def test_linear_router_layout():
    r = LinearRouter(D, E)
    assert r.weight.shape == (E, D)  # the kernels read .weight as [E, D]
    assert [n for n, _ in r.named_parameters()] == ["weight"]  # no bias


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_zero_init_gives_uniform_softmax(kind):
    r = make_router(kind, D, E, init="zero")
    p = torch.softmax(r(torch.randn(7, D) * 10), -1)
    assert torch.allclose(p, torch.full_like(p, 1 / E))
    assert torch.allclose(torch.sigmoid(r(torch.randn(D))), torch.full((E,), 0.5))  # gates start at 0.5


def test_centroid_init_ranks_aligned_expert_first():
    c = unit_centroids()
    r = LinearRouter(D, E, init="centroid", centroids=c)
    for e in range(E):
        x = F.normalize(c[e], dim=0) * D**0.5 + 0.1 * torch.randn(D)  # an input along expert e's centroid
        assert r(x).argmax().item() == e
        assert make_router("mlp", D, E, init="centroid", centroids=c)(x).argmax().item() == e


def test_centroid_scaling_keeps_relative_norms():
    c = unit_centroids()
    c[0] *= 3  # a tight cluster: its mean key is longer
    w = centroid_weight(c, D, E)
    assert torch.isclose(w.norm(dim=-1).mean(), torch.tensor(1.0))  # global scale: mean row norm 1
    assert torch.allclose(w / w.norm(dim=-1, keepdim=True), F.normalize(c, dim=-1), atol=1e-6)
    assert torch.isclose(w[0].norm() / w[1].norm(), c[0].norm() / c[1].norm())


def test_mlp_identity_init():
    c = unit_centroids()
    r = MLPRouter(D, E, centroids=c)
    assert torch.equal(r.fc2.weight, torch.eye(E)) and not r.fc2.bias.any() and not r.fc1.bias.any()
    x = torch.randn(4, D)
    assert torch.allclose(r(x), torch.tanh(LinearRouter(D, E, "centroid", c)(x)), atol=1e-6)


def test_routers_train():
    # the zero-initialised linear router gets a gradient (sigmoid gates carry the task loss)
    r = LinearRouter(D, E)
    torch.sigmoid(r(torch.randn(3, D)))[:, 0].sum().backward()
    assert r.weight.grad[0].abs().sum() > 0


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: LinearRouter(D, E, init="centroid"), "needs centroids"),
        (lambda: LinearRouter(D, E, init="xavier"), "'zero' or 'centroid'"),
        (lambda: LinearRouter(D, E, "centroid", torch.randn(E, D + 1)), r"\[E=6, D=24\]"),
        (lambda: LinearRouter(D, E, "centroid", torch.zeros(E, D)), "all zero"),
        (lambda: LinearRouter(D, 0), "n_experts must be a positive integer"),
        (lambda: make_router("moe", D, E), "'linear' or 'mlp'"),
        (lambda: make_router("mlp", D, E, init="centroid"), "needs centroids"),
    ],
)
def test_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()
