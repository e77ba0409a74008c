"""Expert-contiguous weight layout read by the decode kernels.

Shapes: D hidden, F ffn (= E * G), E experts, G expert size (neurons per expert), N = B*T rows.

The converter (`prunepath.convert`) already permutes neurons so that expert e owns the rows
e*G .. (e+1)*G-1 of `gate_proj` / `up_proj` ([F, D]) and the same columns of `down_proj` ([D, F]).
What that gives a memory-bound decode kernel:

* gate / up rows of one expert are one contiguous G*D block, so they are used as zero-copy views
  `[E, G, D]`: a tile [rows, BLOCK_K] reads BLOCK_K*2-byte segments (1 KiB for BLOCK_K=512),
  not the 64-byte row pieces the authors' port read (Gu, Fu, Yuan 2026).
* down_proj is [D, F]: one expert's columns are G=32 bf16 values, 64 bytes, in each of D rows, which
  coalesce badly. We store it transposed, `w_out` [E, G, D], so one expert's down block is again a
  contiguous G*D slab. That is a copy (one third of the FFN's bytes) unless `share_down=True`, which
  re-stores `down_proj.weight` as a transposed view of that slab (same values, no extra memory;
  `F.linear` accepts the transposed view, but `.contiguous()` it before saving with safetensors).
* the router's rows [E, D] may sit right after the gate rows [F, D] in one slab (`share_down=True` re-stores
  `gate_proj` and the router so, gated FFNs without biases; `router_after_gate=True` in `from_tensors`): then one
  GEMM over the [F + E, D] slab gives a batch's gate pre-activations and its router logits (the masked cuBLAS
  path of `all_kept.py`). Same values, no extra memory; save such a model with `torch.save`, or `.contiguous()`
  the weights first for safetensors (shared storage).

Gated and two-layer FFNs share one layout: for a two-layer FFN `w_up` is None and biases are set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prunepath.routing.gates import GATE_KINDS, check_gate

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
GATES = GATE_KINDS


def _reference_act(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    raise ValueError(f"unknown activation {name!r}; known: {ACTIVATIONS}")


def detect_activation(act) -> str | None:
    """Name of the kernel activation that computes the same function as `act`, or None.

    Probed numerically rather than by class name: transformers has several classes for the same
    function (SiLU, SiLUActivation, GELUActivation, NewGELUActivation, PytorchGELUTanh, ...).
    """
    if isinstance(act, str):
        return act if act in ACTIVATIONS else None
    x = torch.linspace(-6.0, 6.0, 97)
    try:
        y = act(x)
    except Exception:  # an activation that cannot run on a CPU fp32 tensor is not one we know
        return None
    for name in ACTIVATIONS:
        if torch.allclose(y, _reference_act(name, x), atol=1e-5, rtol=1e-5):
            return name
    return None


@dataclass(frozen=True)
class ExpertLayout:
    """Weights of one PrunePath FFN arranged for the decode kernels (see module docstring)."""

    kind: str  # "gated" | "mlp"
    act: str  # one of ACTIVATIONS
    gate: str  # one of GATES: the per-expert gate value applied to kept experts
    w_in: torch.Tensor  # [E, G, D]  gate_proj (gated) or fc_in (mlp), view of the module weight
    w_up: torch.Tensor | None  # [E, G, D]  up_proj (gated only)
    w_out: torch.Tensor  # [E, G, D]  down_proj / fc_out transposed, contiguous
    w_router: torch.Tensor  # [E, D]
    b_in: torch.Tensor | None  # [F]  fc_in bias (mlp only)
    b_out: torch.Tensor | None  # [D]  fc_out bias (mlp only)

    @property
    def n_experts(self) -> int:
        return self.w_in.shape[0]

    @property
    def expert_size(self) -> int:
        return self.w_in.shape[1]

    @property
    def d_model(self) -> int:
        return self.w_in.shape[2]

    @property
    def d_ff(self) -> int:
        return self.n_experts * self.expert_size

    @property
    def dtype(self) -> torch.dtype:
        return self.w_in.dtype

    @property
    def device(self) -> torch.device:
        return self.w_in.device

    # ------------------------------------------------------------------ construction
    @staticmethod
    def from_tensors(
        w_in: torch.Tensor,  # [F, D]
        w_out: torch.Tensor,  # [D, F]
        w_router: torch.Tensor,  # [E, D]
        *,
        w_up: torch.Tensor | None = None,  # [F, D]
        b_in: torch.Tensor | None = None,
        b_out: torch.Tensor | None = None,
        act: str = "silu",
        gate: str = "sigmoid",
        router_after_gate: bool = False,
    ) -> ExpertLayout:
        """Layout from plain tensors (tests, benchmarks); expert e = rows e*G..(e+1)*G-1 of w_in.
        router_after_gate: w_in and w_router become views of one [F + E, D] slab (a copy of both)."""
        E = w_router.shape[0]
        Fd, D = w_in.shape
        if router_after_gate:
            slab = torch.cat([w_in, w_router])
            w_in, w_router = slab[:Fd], slab[Fd:]
        if Fd % E:
            raise ValueError(f"d_ff {Fd} is not a multiple of the {E} router outputs; the router must "
                             "have one output per expert and every expert the same size")
        G = Fd // E
        kind = "gated" if w_up is not None else "mlp"
        w_out_t = w_out.t().contiguous().view(E, G, D)
        return ExpertLayout(
            kind=kind, act=act, gate=gate,
            w_in=w_in.contiguous().view(E, G, D),
            w_up=None if w_up is None else w_up.contiguous().view(E, G, D),
            w_out=w_out_t, w_router=w_router.contiguous(),
            b_in=None if b_in is None else b_in.contiguous(),
            b_out=None if b_out is None else b_out.contiguous(),
        ).validated()

    @staticmethod
    @torch.no_grad()
    def from_ffn(ffn, share_down: bool = False) -> ExpertLayout:
        """Layout from a `prunepath.ffn.module.PrunePathFFN` (weights already expert-permuted).

        share_down=True swaps `down_proj.weight`'s storage for a transposed view of the kernel's
        [E, G, D] slab, so the layout costs no extra memory (see module docstring).
        """
        act = detect_activation(getattr(ffn, "act", None))
        if act is None:
            raise ValueError(f"activation {getattr(ffn, 'act', None)!r} is none of the kernel's {ACTIVATIONS}; "
                             "use the torch path (prunepath.kernels.use_fast_paths(model, False))")
        router_w = getattr(ffn.router, "weight", None)
        if router_w is None or router_w.dim() != 2:
            raise ValueError("the kernels need a LinearRouter (a .weight of shape [E, D]); "
                             f"got {type(ffn.router).__name__}")
        E = router_w.shape[0]
        if ffn.kind == "gated":
            w_in, w_up, out_lin, b_in, b_out = (ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj,
                                                None, None)
        elif ffn.kind == "mlp":
            w_in, w_up, out_lin = ffn.fc_in.weight, None, ffn.fc_out
            b_in, b_out = ffn.fc_in.bias, ffn.fc_out.bias
        else:
            raise ValueError(f"unknown FFN kind {ffn.kind!r}; expected 'gated' or 'mlp'")
        Fd, D = w_in.shape
        G = Fd // E
        w_out_t = out_lin.weight.detach().t().contiguous().view(E, G, D)  # [E, G, D]
        if share_down:
            # Same values, new storage: [D, F] view of the [F, D] slab the kernel reads.
            out_lin.weight.data = w_out_t.view(Fd, D).t()
            if b_in is None and router_w.dtype == w_in.dtype and router_w.device == w_in.device:
                # gate rows then router rows in one slab (module docstring): same values, new storage
                slab = torch.cat([w_in.detach(), router_w.detach()])
                ffn.gate_proj.weight.data = slab[:Fd]
                ffn.router.weight.data = slab[Fd:]
                w_in, router_w = ffn.gate_proj.weight, ffn.router.weight
        return ExpertLayout(
            kind=ffn.kind, act=act, gate=str(ffn.gate),
            w_in=w_in.detach().view(E, G, D),
            w_up=None if w_up is None else w_up.detach().view(E, G, D),
            w_out=w_out_t, w_router=router_w.detach().contiguous(),
            b_in=None if b_in is None else b_in.detach(),
            b_out=None if b_out is None else b_out.detach(),
        ).validated()

    # ------------------------------------------------------------------ checks
    def validated(self) -> ExpertLayout:
        """Raise a ValueError naming the first inconsistency; return self otherwise."""
        E, G, D = self.w_in.shape
        if self.kind not in ("gated", "mlp"):
            raise ValueError(f"layout kind {self.kind!r}: expected 'gated' or 'mlp'")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"layout activation {self.act!r}: expected one of {ACTIVATIONS}")
        check_gate(self.gate)
        if (self.kind == "gated") != (self.w_up is not None):
            raise ValueError("a gated layout needs w_up and a two-layer (mlp) layout must not have one")
        named = {"w_in": self.w_in, "w_out": self.w_out, "w_up": self.w_up}
        for name, w in named.items():
            if w is None:
                continue
            if tuple(w.shape) != (E, G, D):
                raise ValueError(f"layout {name} has shape {tuple(w.shape)}, expected [E, G, D] = "
                                 f"{(E, G, D)}; rebuild it with ExpertLayout.from_ffn(ffn)")
            if not w.is_contiguous():
                raise ValueError(f"layout {name} is not contiguous; the kernels need expert-contiguous "
                                 "rows: rebuild it with ExpertLayout.from_ffn(ffn)")
            if w.dtype != self.w_in.dtype or w.device != self.w_in.device:
                raise ValueError(f"layout {name} is {w.dtype} on {w.device} but w_in is "
                                 f"{self.w_in.dtype} on {self.w_in.device}")
        if tuple(self.w_router.shape) != (E, D) or not self.w_router.is_contiguous():
            raise ValueError(f"router weight has shape {tuple(self.w_router.shape)}, expected contiguous "
                             f"[E, D] = {(E, D)}")
        if self.w_router.dtype != self.dtype or self.w_router.device != self.device:
            raise ValueError(f"router weight is {self.w_router.dtype} on {self.w_router.device}; the "
                             f"kernels need the FFN's {self.dtype} on {self.device} (cast the router too)")
        for name, b, n in (("b_in", self.b_in, E * G), ("b_out", self.b_out, D)):
            if b is not None and (tuple(b.shape) != (n,) or not b.is_contiguous()):
                raise ValueError(f"layout {name} has shape {tuple(b.shape)}, expected contiguous [{n}]")
        return self

    def check_input(self, x2d: torch.Tensor) -> None:
        """Clear error when an input does not belong to this layout."""
        if x2d.dim() != 2 or x2d.shape[1] != self.d_model:
            raise ValueError(f"input has shape {tuple(x2d.shape)}; this layout expects [N, {self.d_model}]")
        if x2d.dtype != self.dtype or x2d.device != self.device:
            raise ValueError(f"input is {x2d.dtype} on {x2d.device} but the layout was built for "
                             f"{self.dtype} on {self.device}; rebuild it after moving the model")
        if not x2d.is_contiguous():
            raise ValueError("input rows must be contiguous (call .contiguous())")

    def nbytes_dense(self) -> int:
        """Bytes of FFN weights a dense decode step reads (router excluded)."""
        n_mats = 3 if self.kind == "gated" else 2
        return n_mats * self.d_ff * self.d_model * self.w_in.element_size()


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))
