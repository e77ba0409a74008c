"""`FastPath`: what a `PrunePathFFN` calls to run the decode kernels; `use_fast_paths(model)` installs them.

Shapes: N = B*T rows, D hidden, E experts.

The FFN's forward asks `fast_path.accepts(x)` first and uses the torch path when it says no, so this
object only has to know when the kernels apply:

* a CUDA tensor (or any tensor under TRITON_INTERPRET=1, which runs the kernels on the CPU for tests),
* bf16 / fp16 (fp32 for testing) matching the FFN weights,
* N <= 8 rows (decode; prefill takes the torch path — the kernels are not a grouped GEMM),
* a linear router, a rule the kernels implement (cumulative mass, top-k, thresholds, dense), a known
  activation, and no gradient needed (the kernels have no backward).

An unsupported device or dtype falls back with one warning per reason; a layout that does not match
the input raises (see `ExpertLayout.check_input`).

The rule's parameter (tau, k, t) lives in a device tensor that is refreshed outside CUDA-graph capture,
so `prunepath.set_tau(model, ...)` followed by `sync()` changes a captured decode graph without re-capturing it.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from prunepath.ffn.module import prunepath_ffns
from prunepath.routing.router import LinearRouter

from .layout import ExpertLayout, detect_activation

try:  # triton is an optional extra (`pip install prunepath[kernels]`)
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the installation
    HAS_TRITON = False

_WARNED: set[str] = set()
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, stacklevel=3)


def rule_code(rule):
    """route.rule_code, imported late: this module must import without triton (CPU installs)."""
    from .route import rule_code as code

    return code(rule)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class FastPath:
    """Decode kernels for one `PrunePathFFN`; installed with `use_fast_paths(model)`."""

    max_rows = 8

    def __init__(self, ffn, share_down: bool = False, cfg=None):
        self.ffn = ffn
        self.share_down = share_down
        self.cfg = cfg  # expert_ffn.FFNConfig or None for the per-batch defaults
        self.layout: ExpertLayout | None = None
        self._key = None
        self._param: torch.Tensor | None = None  # [1] fp32 on the device: tau / k / t
        self._param_value: float | None = None
        self.act = detect_activation(getattr(ffn, "act", None))

    # ------------------------------------------------------------------ when the kernels apply
    def _why_not(self, x: torch.Tensor) -> tuple[str, str] | None:
        """(reason key, message) when the kernels cannot run, None when they can."""
        ffn = self.ffn
        if not HAS_TRITON:
            return "triton", "triton is not installed (pip install prunepath[kernels]); using the torch FFN"
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        if not (x.is_cuda or interpret):
            return f"device:{x.device.type}", (f"prunepath.kernels: input on {x.device.type}; the Triton fast "
                                               "path needs a CUDA device, using the torch FFN")
        if x.dtype not in _DTYPES:
            return f"dtype:{x.dtype}", (f"prunepath.kernels: {x.dtype} is not supported (bf16, fp16, fp32); "
                                        "using the torch FFN")
        if ffn.kind not in ("gated", "mlp"):
            return f"kind:{ffn.kind}", f"prunepath.kernels: FFN kind {ffn.kind!r} has no kernel; using torch"
        if not isinstance(ffn.router, LinearRouter):
            return "router", (f"prunepath.kernels: {type(ffn.router).__name__} is not a linear router; "
                              "using the torch FFN")
        if self.act is None:
            return "act", f"prunepath.kernels: activation {ffn.act!r} has no kernel; using the torch FFN"
        if ffn.expert_size % 16:
            return "g", (f"prunepath.kernels: expert size {ffn.expert_size} is not a multiple of 16; "
                         "using the torch FFN")
        return None

    def accepts(self, x: torch.Tensor) -> bool:
        ffn = self.ffn
        n = x.numel() // ffn.d_model
        if n == 0 or n > self.max_rows:
            return False  # prefill / large batches: the torch path (expected, no warning)
        if not HAS_TRITON:
            _warn_once("triton", "prunepath.kernels: triton is not installed (pip install prunepath[kernels]); "
                                 "using the torch FFN")
            return False
        if rule_code(ffn.rule) is None:
            return False  # oracle / static rules: torch path
        if torch.is_grad_enabled() and (x.requires_grad or ffn.router.weight.requires_grad):
            return False  # training: the kernels have no backward
        why = self._why_not(x)
        if why is not None:
            _warn_once(*why)
            return False
        w = ffn.gate_proj.weight if ffn.kind == "gated" else ffn.fc_in.weight
        return w.dtype == x.dtype and w.device == x.device

    # ------------------------------------------------------------------ state kept on the device
    def _weights(self):
        f = self.ffn
        if f.kind == "gated":
            mods = (f.gate_proj.weight, f.up_proj.weight, f.down_proj.weight)
        else:
            mods = (f.fc_in.weight, f.fc_out.weight, f.fc_in.bias, f.fc_out.bias)
        return mods + (f.router.weight,)

    def _weights_key(self) -> tuple:
        """Storage, dtype, device and in-place version of every weight: a change means a stale layout
        (the transposed down copy would not see an optimizer step, for instance)."""
        def one(t):
            if t is None:
                return None
            try:
                version = t._version
            except RuntimeError:  # inference tensors keep no version counter
                version = 0
            return t.data_ptr(), t.dtype, t.device, version

        return tuple(one(t) for t in self._weights())

    def _layout(self) -> ExpertLayout:
        key = self._weights_key()
        if self.layout is None or key != self._key:
            if _capturing():
                raise RuntimeError("the PrunePath layout must be built before CUDA-graph capture: run one "
                                   "eager step first (prunepath.decode does)")
            self.layout = ExpertLayout.from_ffn(self.ffn, share_down=self.share_down)
            self._key = self._weights_key()
        if self.layout.gate != self.ffn.gate:
            from dataclasses import replace

            self.layout = replace(self.layout, gate=str(self.ffn.gate))
        return self.layout

    def sync(self) -> None:
        """Copy the rule's parameter into the device tensor (call outside graph capture)."""
        code_param = rule_code(self.ffn.rule)
        if code_param is None:
            return
        value = code_param[1]
        dev = self._layout().device
        if self._param is None or self._param.device != dev:
            self._param = torch.full((1,), value, device=dev, dtype=torch.float32)
        elif value != self._param_value:
            self._param.fill_(value)
        self._param_value = value

    @property
    def rule_key(self) -> tuple:
        """What a captured graph bakes in: changing it needs a re-capture (tau does not)."""
        from .all_kept import keeps_all

        code, value = rule_code(self.ffn.rule)
        return code, self.ffn.gate, keeps_all(code, value, self.ffn.router.weight.shape[0])

    def path(self, n_rows: int = 1) -> str:
        """The code the current rule runs for n_rows rows: "triton-fused" (the sparse kernels), "cublas-gated"
        (every expert kept, gates from the router), "cublas-dense" (every expert kept with unit gates: the
        dense FFN, no router) or "cublas-masked" (batches, top-k at high fractions: cuBLAS with the kept mask
        and gates of a per-row top-k over the router logits); `all_kept.choose_path` says when."""
        from .all_kept import choose_path

        code, value = rule_code(self.ffn.rule)
        return choose_path(self._layout(), code, value, n_rows)

    # ------------------------------------------------------------------ the call
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from .all_kept import choose_path
        from .expert_ffn import expert_ffn

        layout = self._layout()
        code, value = rule_code(self.ffn.rule)
        if not _capturing() and (self._param is None or value != self._param_value):
            self.sync()
        shape = x.shape
        x2d = x.reshape(-1, layout.d_model).contiguous()  # [N, D]
        if choose_path(layout, code, value, x2d.shape[0]) != "triton-fused":
            from .all_kept import all_kept_ffn
            from .route import RULE_TOPK

            y = all_kept_ffn(x2d, layout, code, value, param=self._param)
            if self.ffn.recording and not _capturing():
                kept = min(layout.n_experts, math.ceil(value)) if code == RULE_TOPK else layout.n_experts
                self.ffn._record(torch.full((x2d.shape[0],), kept, device=x.device))
            return y.reshape(shape)
        res = expert_ffn(x2d, layout, code, self._param, cfg=self.cfg)
        if self.ffn.recording:
            if _capturing():
                _warn_once("record", "prunepath.kernels: routing stats are not recorded inside a CUDA graph")
            else:
                self.ffn._record(res.mask.sum(-1))  # [N]
        return res.y.reshape(shape)


def use_fast_paths(model, on: bool = True, share_down: bool = False, cfg=None) -> list[FastPath]:
    """The one way the decode kernels are put on (or taken off) the PrunePath FFNs of `model` (a model or
    one FFN). on=True gives every FFN a new FastPath and returns them in layer order; on=False removes them
    (the torch path) and returns []. Raises ValueError for a model without PrunePath FFNs."""
    ffns = prunepath_ffns(model)
    if not ffns:
        raise ValueError("no PrunePath FFNs in this model: convert it first with prunepath.moefy(model)")
    for f in ffns:
        f.fast_path = FastPath(f, share_down=share_down, cfg=cfg) if on else None
    return [f.fast_path for f in ffns] if on else []


@contextmanager
def torch_path(model) -> Iterator[None]:
    """Run the block on the torch FFN path; the fast paths that were installed come back afterwards."""
    ffns = prunepath_ffns(model)
    saved = [f.fast_path for f in ffns]
    for f in ffns:
        f.fast_path = None
    try:
        yield
    finally:
        for f, fp in zip(ffns, saved):
            f.fast_path = fp
