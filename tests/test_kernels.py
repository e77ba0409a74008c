"""Triton decode kernels against their pure-torch references.

On CPU (CI) tests/conftest.py sets TRITON_INTERPRET=1, so the same kernels run in Triton's interpreter;
sizes stay tiny because the interpreter is slow. On a CUDA machine run the compiled kernels with

    PRUNEPATH_GPU_TESTS=1 pytest tests/test_kernels.py tests/test_kernels_fastpath.py

(the tensors then go to the GPU). Every case draws fresh random inputs and poisons the outputs and
intermediates (NaN) first, so an element the kernels forget to write, or read before writing, fails.
"""

import math
from dataclasses import replace

import pytest
import torch

pytest.importorskip("triton")

from prunepath.kernels.expert_ffn import FFNConfig, Scratch, expert_ffn, expert_ffn_reference  # noqa: E402
from prunepath.kernels.layout import ExpertLayout, detect_activation  # noqa: E402
from prunepath.kernels.route import (  # noqa: E402
    RULE_ALL,
    RULE_MASS,
    RULE_MASS_INCL,
    RULE_RELATIVE,
    RULE_SIGMOID,
    RULE_TOPK,
    gate_reference,
    route_reference,
    select_reference,
)

pytestmark = pytest.mark.gpu  # CPU: the Triton interpreter; `make test-gpu`: compiled, on CUDA
DEV = "cuda" if torch.cuda.is_available() and __import__("os").environ.get("PRUNEPATH_GPU_TESTS") else "cpu"
# relative L2 error vs the float64 reference: fp32 arithmetic, then half-precision outputs
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 1.2e-2}


def _layout(E, G, D, dtype, kind="gated", act="silu", gate="sigmoid", logit_std=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)  # fixed: a failure must be reproducible
    F = E * G

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEV, dtype)

    return ExpertLayout.from_tensors(
        rnd(F, D, scale=D**-0.5), rnd(D, F, scale=F**-0.5), rnd(E, D, scale=logit_std * D**-0.5),
        w_up=rnd(F, D, scale=D**-0.5) if kind == "gated" else None,
        b_in=rnd(F, scale=0.1) if kind == "mlp" else None,
        b_out=rnd(D, scale=0.1) if kind == "mlp" else None,
        act=act, gate=gate,
    )


def _run(x, layout, code, param, cfg=None):
    """Run the fused FFN with poisoned scratch and output; return the result."""
    scratch = Scratch(layout)
    scratch.poison()
    out = torch.full((x.shape[0], layout.d_model), float("nan"), device=x.device, dtype=x.dtype)
    p = torch.tensor([float(param)], device=x.device)
    return expert_ffn(x, layout, code, p, cfg=cfg, scratch=scratch, out=out)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# (N, E, G, D, dtype, rule code, param, kind/act) — each line is one edge case
CASES = [
    # batch 1, non-power-of-two D and E, fp32: the exact-arithmetic anchor
    (1, 5, 32, 48, torch.float32, RULE_MASS, 0.6, "gated/silu"),
    # batch 1, bf16, E = 11: not a multiple of the router block (16) nor of the down chunk (8)
    (1, 11, 32, 40, torch.bfloat16, RULE_MASS, 0.5, "gated/silu"),
    # exactly one active expert (top-1), fp16
    (1, 6, 32, 24, torch.float16, RULE_TOPK, 1, "gated/silu"),
    # all experts active (dense rule), batch 1
    (1, 7, 16, 40, torch.float32, RULE_ALL, 0.0, "gated/silu"),
    # tau > 1: the dense training stage keeps every expert
    (1, 4, 32, 32, torch.bfloat16, RULE_MASS, 1.05, "gated/silu"),
    # batch > 1 (tensor-core path, rows padded to 16): the union of experts, per-token zero gates
    (3, 9, 32, 48, torch.float32, RULE_MASS, 0.5, "gated/silu"),
    # batch 8 (the maximum), bf16, inclusive rule
    (8, 10, 32, 40, torch.bfloat16, RULE_MASS_INCL, 0.4, "gated/silu"),
    # batch 2, top-k, fp16, expert size 16 (the smallest tensor-core tile)
    (2, 12, 16, 32, torch.float16, RULE_TOPK, 3, "gated/silu"),
    # two-layer FFN with biases and erf-GELU (BERT / OPT family), batch 1
    (1, 5, 32, 36, torch.float32, RULE_MASS, 0.7, "mlp/gelu"),
    # two-layer FFN, tanh-GELU (GPT-2), batch 4, sigmoid threshold
    (4, 6, 32, 32, torch.float32, RULE_SIGMOID, 0.6, "mlp/gelu_tanh"),
    # gated tanh-GELU (Gemma) with relative threshold, bf16, batch 2
    (2, 8, 32, 48, torch.bfloat16, RULE_RELATIVE, 0.3, "gated/gelu_tanh"),
]


@pytest.mark.parametrize("N,E,G,D,dtype,code,param,kind_act", CASES)
def test_expert_ffn_matches_reference(N, E, G, D, dtype, code, param, kind_act):
    kind, act = kind_act.split("/")
    layout = _layout(E, G, D, dtype, kind=kind, act=act)
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(1)).to(DEV, dtype)
    res = _run(x, layout, code, param)
    ref = route_reference(x, layout, code, param)
    # routing first: logits to the dtype's rounding, then the same decisions from the same logits. (Compared
    # with the float64 route's mask instead, a bf16 logit one ulp off can flip a token whose mass sits at τ:
    # seen once in CI with random weights.)
    ulp = 2.0 ** -(7 if dtype == torch.bfloat16 else 10 if dtype == torch.float16 else 20)
    assert torch.allclose(res.logits, ref.logits, rtol=2 * ulp, atol=1e-4)
    same = select_reference(res.logits.float(), code, param)
    assert torch.equal(res.mask.bool().cpu(), same.cpu())
    assert torch.equal(res.active.cpu(), same.any(0).int().cpu()), "union flag differs from any(mask)"
    # gates from the kernel's logits and the decisions they make (one bf16 ulp of a logit may differ from the
    # float64 GEMV, and flip a token at τ in ref.mask: seen once in CI)
    assert torch.allclose(res.gates, gate_reference(res.logits, same, layout.gate), rtol=1e-5, atol=1e-6)
    # then numerics: against float64 with the same gates
    y_ref = expert_ffn_reference(x, layout, res.gates)
    assert not torch.isnan(res.y).any(), "unwritten output elements"
    assert _rel(res.y, y_ref) < TOL[dtype], f"relative error {_rel(res.y, y_ref):.2e}"
    if code == RULE_TOPK:
        assert (res.mask.sum(-1) == int(param)).all()
    if code == RULE_ALL or (code == RULE_MASS and param > 1):
        assert res.mask.bool().all()


def test_one_token_matches_batch_path():
    """The GEMV path (N = 1) and the padded tensor-core path (N > 1) compute the same row."""
    layout = _layout(6, 32, 40, torch.float32)
    x = torch.randn(2, 40, device=DEV)
    both = _run(x, layout, RULE_MASS, 0.8).y
    first = _run(x[:1].contiguous(), layout, RULE_MASS, 0.8).y
    assert torch.allclose(both[:1], first, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("over", [dict(block_g=16, block_k=16), dict(parallel_select=False),
                                  dict(pdl=False, half_dots=False)])
def test_batch_paths_agree(over):
    """The batch path's options (tile sizes, one or N selecting programs, dependent launches or not, half or
    fp32 dots) give the same result."""
    layout = _layout(9, 32, 48, torch.bfloat16)
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(3)).to(DEV, torch.bfloat16)
    a = _run(x, layout, RULE_MASS, 0.7)
    b = _run(x, layout, RULE_MASS, 0.7, cfg=replace(FFNConfig.for_batch(5), **over))
    assert torch.equal(a.mask.cpu(), b.mask.cpu())
    assert _rel(b.y, expert_ffn_reference(x, layout, b.gates)) < TOL[torch.bfloat16]
    assert _rel(a.y, b.y) < TOL[torch.bfloat16]


def test_tile_configs_agree():
    """Other tile sizes (more experts per down program, small K tiles) give the same result."""
    layout = _layout(9, 32, 72, torch.float32)
    x = torch.randn(1, 72, device=DEV)
    a = _run(x, layout, RULE_MASS, 0.7).y
    cfg = FFNConfig(block_g=32, block_k=32, slots=3, block_d=16, router_block_e=2, router_block_k=16,
                    router_split=3)
    b = _run(x, layout, RULE_MASS, 0.7, cfg=cfg).y
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("N", [1, 3])
def test_scratch_state_resets_between_calls(N):
    """The tickets and the fp32 accumulator the kernels leave zeroed: back-to-back calls on one scratch
    (fewer and more kept experts, other inputs) each match their own reference."""
    layout = _layout(11, 32, 40, torch.float32)  # E = 11: not a multiple of the down chunk
    scratch = Scratch(layout)
    cfg = FFNConfig.for_batch(N)
    cfg = replace(cfg, slots=4, block_d=16)  # several column blocks, several chunks
    for tau, pdl in ((0.3, True), (0.95, False), (0.3, True), (1.05, True), (0.95, True)):
        cfg = replace(cfg, pdl=pdl)  # on a Hopper GPU: dependent launches and plain ones in turn
        x = torch.randn(N, 40, device=DEV)
        p = torch.tensor([tau], device=DEV)
        res = expert_ffn(x, layout, RULE_MASS, p, cfg=cfg, scratch=scratch)
        ref = expert_ffn_reference(x, layout, route_reference(x, layout, RULE_MASS, tau).gates)
        assert _rel(res.y, ref) < TOL[torch.float32], f"tau={tau}"
    assert not scratch.tickets.any() and not scratch.router_ticket.any() and not scratch.acc.any()


@pytest.mark.parametrize("code,param,gate,path", [
    (RULE_ALL, 0.0, "softmax", "cublas-gated"), (RULE_TOPK, 11, "sigmoid", "cublas-gated"),
    (RULE_TOPK, 10, "sigmoid", "cublas-masked"), (RULE_MASS, 1.05, "one", "cublas-dense"),
    (RULE_TOPK, 10, "one", "cublas-masked")])
def test_all_kept_path_matches_kernels(code, param, gate, path):
    """The cuBLAS path taken when every expert is kept (or, masked by the route+select kernel's gates, a top-k
    rule above a crossover) computes what the sparse kernels do; with unit gates and every expert kept it runs
    no router (the dense FFN)."""
    from prunepath.kernels.all_kept import all_kept_ffn, all_kept_path, keeps_all

    layout = _layout(11, 32, 40, torch.float32, gate=gate)
    x = torch.randn(2, 40, device=DEV)
    assert keeps_all(code, param, 11, crossover=0.9)
    assert all_kept_path(layout, code, param) == path
    y = all_kept_ffn(x, layout, code, param, param=torch.tensor([float(param)], device=DEV))
    res = _run(x, layout, code, param)
    assert _rel(y, expert_ffn_reference(x, layout, res.gates)) < TOL[torch.float32]
    assert torch.allclose(y, res.y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gate", ["sigmoid", "softmax", "one"])
def test_masked_path_slab_and_router_gemm_agree(gate):
    """The masked cuBLAS path with the router's rows stored after the gate rows (one GEMM for both, the top-k
    beside the up GEMM) and with a separate router GEMM compute the top-k routed FFN; top-0 gives 0."""
    from prunepath.kernels.all_kept import all_kept_ffn, gate_router_slab, masked_router

    plain = _layout(11, 32, 40, torch.float32, gate=gate)
    slab = ExpertLayout.from_tensors(plain.w_in.reshape(352, 40), plain.w_out.reshape(352, 40).t(), plain.w_router,
                                     w_up=plain.w_up.reshape(352, 40), gate=gate, router_after_gate=True)
    assert gate_router_slab(plain) is None and masked_router(plain) == "mm"
    assert masked_router(slab) == "slab" and torch.equal(gate_router_slab(slab)[352:], plain.w_router)
    x = torch.randn(3, 40, device=DEV)
    for k in (7, 10, 0):
        p = torch.tensor([float(k)], device=DEV)
        ref = expert_ffn_reference(x, plain, route_reference(x, plain, RULE_TOPK, k).gates)
        for lay in (plain, slab):
            y = all_kept_ffn(x, lay, RULE_TOPK, k, param=p)
            if k:
                assert _rel(y, ref) < TOL[torch.float32], masked_router(lay)
            else:
                assert not y.any()


@pytest.mark.parametrize("programs", [5, 2, 1])
def test_gate_up_grid_smaller_than_its_items(programs):
    """A gate/up grid (a program count) below the kept items: programs loop, same y."""
    layout = _layout(11, 32, 40, torch.float32)
    x = torch.randn(1, 40, device=DEV)
    for k in (3, 6):
        p = torch.tensor([float(k)], device=DEV)
        cfg = FFNConfig(gate_up_programs=programs)
        res = expert_ffn(x, layout, RULE_TOPK, p, cfg=cfg, scratch=Scratch(layout))
        ref = expert_ffn_reference(x, layout, route_reference(x, layout, RULE_TOPK, k).gates)
        assert _rel(res.y, ref) < TOL[torch.float32], f"k={k}"


def test_no_expert_kept_gives_bias():
    """Top-0 keeps nothing: y is the output bias (every element still written)."""
    layout = _layout(5, 32, 36, torch.float32, kind="mlp", act="gelu")
    x = torch.randn(2, 36, device=DEV)
    res = _run(x, layout, RULE_TOPK, 0)
    assert not res.mask.any()
    assert torch.allclose(res.y, layout.b_out.expand(2, -1))


def test_unit_gates_all_experts_equal_dense_ffn():
    """Exactness anchor: every expert on with gate 1 is the dense FFN."""
    layout = _layout(4, 32, 48, torch.float32, gate="one")
    x = torch.randn(1, 48, device=DEV)
    y = _run(x, layout, RULE_ALL, 0.0).y
    E, G, D = layout.w_in.shape
    w_in, w_up = layout.w_in.reshape(E * G, D), layout.w_up.reshape(E * G, D)
    dense = (torch.nn.functional.silu(x @ w_in.t()) * (x @ w_up.t())) @ layout.w_out.reshape(E * G, D)
    assert torch.allclose(y, dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("N,E,code,param", [
    (1, 13, RULE_MASS, 0.3),  # batch 1, E not a power of two
    (5, 20, RULE_MASS_INCL, 0.5),  # batch 5, E larger than one router block
    (3, 7, RULE_TOPK, 2),  # top-k
    (1, 40, RULE_TOPK, 9),  # one row, E over one router block
])
def test_route_select_kernel(N, E, code, param):
    """Launch 1 alone (router GEMV + selection, `select.py`) agrees with the torch reference: mask, union,
    logits, and the compacted list holds exactly the union's experts."""
    D = 36
    layout = _layout(E, 16, D, torch.float32)
    x = torch.randn(N, D, device=DEV)
    scratch = Scratch(layout)
    scratch.poison()
    p = torch.tensor([float(param)], device=DEV)
    expert_ffn(x, layout, code, p, scratch=scratch, stages=1)
    ref = route_reference(x, layout, code, param)
    mask = scratch.mask[: N * E].view(N, E)
    assert torch.equal(mask.bool().cpu(), ref.mask.cpu())
    assert torch.equal(scratch.flags.cpu(), ref.active.cpu())
    assert torch.allclose(scratch.logits[: N * E].view(N, E), ref.logits, rtol=1e-5, atol=1e-5)
    count = int(scratch.count.item())
    assert sorted(scratch.ids[:count].tolist()) == ref.active.nonzero()[:, 0].tolist()
    assert not scratch.router_ticket.any()


@pytest.mark.parametrize("inclusive", [False, True])
def test_selection_reference_matches_routing_rule(inclusive):
    """Our tie-free selection semantics equal prunepath.routing's sorted reference rule."""
    from prunepath import routing

    torch.manual_seed(1)
    logits = torch.randn(64, 48) * 1.5  # continuous values: no exact ties
    for tau in (0.2, 0.5, 0.9):
        ours = select_reference(logits, RULE_MASS_INCL if inclusive else RULE_MASS, tau)
        theirs = routing.CumulativeMass(tau, inclusive=inclusive).select(logits)
        assert torch.equal(ours, theirs), f"tau={tau}: {(ours != theirs).sum().item()} decisions differ"
    k = 5
    assert torch.equal(select_reference(logits, RULE_TOPK, k), routing.TopK(k).select(logits))


def test_selection_invariants():
    """Top-1 always kept; kept mass (minus the forced top-1) < tau; count monotone in tau."""
    z = torch.randn(32, 40) * 2
    p = torch.softmax(z, -1)
    prev = None
    for tau in (0.05, 0.3, 0.6, 0.95):
        m = select_reference(z, RULE_MASS, tau)
        assert m[torch.arange(32), z.argmax(-1)].all()
        mass = (p * m).sum(-1)
        single = m.sum(-1) == 1
        assert ((mass < tau) | single).all()
        if prev is not None:
            assert (m.sum(-1) >= prev).all()
        prev = m.sum(-1)


def test_layout_errors_are_clear():
    layout = _layout(4, 32, 32, torch.float32)
    with pytest.raises(ValueError, match="expects \\[N, 32\\]"):
        layout.check_input(torch.randn(1, 31, device=DEV))
    with pytest.raises(ValueError, match="rebuild it"):
        layout.check_input(torch.randn(1, 32, device=DEV, dtype=torch.float16))
    with pytest.raises(ValueError, match="not a multiple"):
        ExpertLayout.from_tensors(torch.randn(100, 8), torch.randn(8, 100), torch.randn(3, 8))
    bad = ExpertLayout(**{**layout.__dict__, "w_out": layout.w_out[:, :16]})
    with pytest.raises(ValueError, match="shape"):
        bad.validated()
    with pytest.raises(ValueError, match="at most 8 rows"):
        expert_ffn(torch.randn(9, 32, device=DEV), layout, RULE_MASS, torch.tensor([0.5], device=DEV))


def test_detect_activation():
    from transformers.activations import ACT2FN

    assert detect_activation(ACT2FN["silu"]) == "silu"
    assert detect_activation(ACT2FN["gelu"]) == "gelu"
    assert detect_activation(ACT2FN["gelu_new"]) == "gelu_tanh"
    assert detect_activation(ACT2FN["gelu_pytorch_tanh"]) == "gelu_tanh"
    assert detect_activation(torch.nn.ReLU()) == "relu"
    assert detect_activation(torch.tanh) is None


def test_nbytes_dense():
    layout = _layout(4, 32, 16, torch.bfloat16)
    assert layout.nbytes_dense() == 3 * 128 * 16 * 2
    assert math.isclose(layout.d_ff, 128)


def test_dispatch_follows_the_measured_paths():
    """One row with router gates stays on the Triton kernels even with every expert kept (faster there); unit
    gates with every expert kept are the dense FFN on cuBLAS (no router); batches take cuBLAS when all are kept;
    a top-k rule below E takes the masked cuBLAS path in batches from BATCH_CROSSOVER of the experts kept."""
    from prunepath.kernels.all_kept import choose_path

    sig, one = _layout(8, 32, 32, torch.float32), _layout(8, 32, 32, torch.float32, gate="one")
    assert choose_path(sig, RULE_ALL, 0.0, 1) == "triton-fused"
    assert choose_path(sig, RULE_MASS, 1.05, 4) == "cublas-gated"
    assert choose_path(one, RULE_TOPK, 8, 1) == "cublas-dense"
    assert choose_path(one, RULE_TOPK, 7, 4) == "cublas-masked"
    assert choose_path(sig, RULE_TOPK, 7, 1) == "triton-fused"
    assert choose_path(sig, RULE_TOPK, 5, 8) == "triton-fused"
    assert choose_path(sig, RULE_MASS, 0.9, 8) == "triton-fused"


def test_masked_path_needs_the_device_parameter():
    from prunepath.kernels.all_kept import all_kept_ffn

    layout = _layout(8, 32, 32, torch.float32)
    with pytest.raises(ValueError, match="device tensor"):
        all_kept_ffn(torch.randn(2, 32, device=DEV), layout, RULE_TOPK, 7)
