"""`FastPath`, the kernel hook of a PrunePathFFN, against the FFN's own torch path.

Runs the Triton kernels in the interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1);
`PRUNEPATH_GPU_TESTS=1 pytest tests/test_kernels_fastpath.py` runs them compiled on a CUDA device.
"""

import copy
import os
import warnings

import pytest
import torch

pytest.importorskip("triton")

from prunepath.kernels import FastPath, torch_path, use_fast_paths  # noqa: E402
from prunepath.kernels import fastpath as fastpath_mod  # noqa: E402
from prunepath.kernels.expert_ffn import expert_ffn  # noqa: E402

from prunepath import MoefyConfig, moefy, routing  # noqa: E402
from prunepath.ffn.module import prunepath_ffns
from prunepath.routing.control import set_tau
from prunepath.routing.stats import record

pytestmark = pytest.mark.gpu  # CPU: the Triton interpreter; `make test-gpu`: compiled, on CUDA
DEV = "cuda" if torch.cuda.is_available() and os.environ.get("PRUNEPATH_GPU_TESTS") else "cpu"


@pytest.fixture
def converted(tiny_llama):
    """The 2-layer tiny Llama (D=64, 4 experts of 32) converted, with peaked random routers."""
    m = copy.deepcopy(tiny_llama).to(DEV)
    moefy(m, MoefyConfig(split="random", router_init="zero", rule=routing.CumulativeMass(0.6)), progress=False)
    torch.manual_seed(0)
    for f in prunepath_ffns(m):
        f.router.weight.data.normal_(0, 0.5)
    return m


def _both(ffn, x):
    """(fast path output, torch path output) for the same input."""
    with torch.no_grad():
        fast = ffn(x)
        with torch_path(ffn):
            ref = ffn(x)
    return fast, ref


@pytest.mark.parametrize("rows", [1, 3])  # the GEMV path and the padded tensor-core path
def test_fast_path_equals_torch_path(converted, rows):
    ffn = prunepath_ffns(converted)[0]
    use_fast_paths(ffn)
    x = torch.randn(1, rows, 64, device=DEV)
    with torch.no_grad():  # with grad enabled (trainable weights) the torch path is the one to use
        assert ffn.fast_path.accepts(x)
    fast, ref = _both(ffn, x)
    assert fast.shape == ref.shape
    assert torch.allclose(fast, ref, rtol=1e-4, atol=1e-5)


def test_tau_change_reaches_the_kernel_and_stats_are_recorded(converted):
    """set_tau updates the device parameter; a recorder counts kept experts on the fast path too."""
    use_fast_paths(converted)
    ffn = prunepath_ffns(converted)[1]
    x = torch.randn(1, 1, 64, device=DEV)
    for tau in (0.3, 0.95, 1.05):
        set_tau(converted, tau)
        fast, ref = _both(ffn, x)
        assert torch.allclose(fast, ref, rtol=1e-4, atol=1e-5), f"tau={tau}"
    with record(converted) as rec, torch.no_grad():
        ffn(x)
    assert rec.counts[1][-1].tolist() == [4]  # tau > 1 keeps all 4 experts
    use_fast_paths(converted, False)
    assert all(f.fast_path is None for f in prunepath_ffns(converted))


def test_share_down_keeps_outputs(converted):
    """share_down re-stores down_proj as a view of the kernel slab: same values, no copy."""
    ffn = prunepath_ffns(converted)[0]
    x = torch.randn(1, 2, 64, device=DEV)
    with torch.no_grad():
        before = ffn(x)
    use_fast_paths(ffn, share_down=True)
    fast, ref = _both(ffn, x)
    assert not ffn.down_proj.weight.is_contiguous()
    assert ffn.down_proj.weight.data_ptr() == ffn.fast_path.layout.w_out.data_ptr()
    assert torch.allclose(ref, before) and torch.allclose(fast, ref, rtol=1e-4, atol=1e-5)
    # the router's rows now follow the gate rows in one slab (the masked batch path's one GEMM)
    from prunepath.kernels.all_kept import gate_router_slab

    slab = gate_router_slab(ffn.fast_path.layout)
    assert slab is not None and ffn.router.weight.data_ptr() == slab[ffn.gate_proj.weight.shape[0]:].data_ptr()


def test_layout_follows_in_place_weight_updates(converted):
    """An in-place update of the down weights (an optimizer step) rebuilds the transposed copy."""
    ffn = prunepath_ffns(converted)[0]
    use_fast_paths(ffn)
    x = torch.randn(1, 1, 64, device=DEV)
    _both(ffn, x)
    with torch.no_grad():
        ffn.down_proj.weight.mul_(-2.0)
    fast, ref = _both(ffn, x)
    assert torch.allclose(fast, ref, rtol=1e-4, atol=1e-5)


def test_accepts_falls_back_where_it_must(converted):
    ffn = prunepath_ffns(converted)[0]
    fp = FastPath(ffn)
    assert not fp.accepts(torch.randn(1, 9, 64, device=DEV))  # prefill: more than 8 rows
    with torch.enable_grad():
        assert not fp.accepts(torch.randn(1, 1, 64, device=DEV))  # training: weights need grad
    with torch.no_grad():
        ffn.rule = type(ffn.rule).__mro__[0](0.5)  # still cumulative mass: accepted
        assert fp.accepts(torch.randn(1, 1, 64, device=DEV))
        from prunepath.routing import Static

        ffn.rule = Static((0, 1))  # no kernel for static rules: torch path, silently
        assert not fp.accepts(torch.randn(1, 1, 64, device=DEV))


def test_unsupported_dtype_warns_once(converted):
    ffn = prunepath_ffns(converted)[0].double()
    fp = FastPath(ffn)
    fastpath_mod._WARNED.clear()
    x = torch.randn(1, 1, 64, device=DEV, dtype=torch.float64)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not fp.accepts(x) and not fp.accepts(x)
    assert len([w for w in caught if "float64" in str(w.message)]) == 1


def test_wrong_layout_is_a_clear_error(converted):
    ffn = prunepath_ffns(converted)[0]
    fp = FastPath(ffn)
    with torch.no_grad():
        fp(torch.randn(1, 1, 64, device=DEV))  # builds the fp32 layout
    with pytest.raises(ValueError, match="rebuild it"):
        expert_ffn(torch.randn(1, 64, device=DEV, dtype=torch.float16), fp.layout, 0, fp._param)
