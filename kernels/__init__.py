"""Triton decode kernels for PrunePath FFNs (installed as `prunepath.kernels`).

One module per kernel, each with its pure-torch reference beside it:

- `layout`     : `ExpertLayout`, the expert-contiguous weight views the kernels read.
- `select`     : router GEMV and expert selection in one launch, writing the compacted list of kept experts.
- `route`      : the selection rules' codes and the torch references the kernels are tested against.
- `expert_ffn` : gate/up over the kept experts, down with fp32 atomics and the reduce folded in.
- `all_kept`   : every expert kept, or batches at high kept fractions: cuBLAS (with the router or the
                 router's rows in the gate GEMM, or no router with unit gates).
- `fastpath`   : `FastPath`, what a `PrunePathFFN` calls on; `use_fast_paths(model)` installs (or removes)
                 them, `torch_path(model)` suspends them for a block.

Triton is optional: without it (or without CUDA) `FastPath.accepts` is False and the FFN runs its
torch path. Tests run the kernels on the CPU with TRITON_INTERPRET=1.
"""

from __future__ import annotations

if __name__ == "kernels":
    # Imported as a top-level `kernels` only by accident: with the repository root on sys.path (`python -c`,
    # a script or `panel serve` run from the root) this folder shadows the unrelated Hugging Face "kernels"
    # package, which transformers (>= 5.25 requires it) imports by that name. Hand the name over to that
    # package when it is installed, so transformers gets what it asked for; else stay empty (no __version__),
    # so its probe finds nothing usable. Nothing of ours is imported: our name is prunepath.kernels.
    import importlib.util
    import os
    import sys
    from importlib.machinery import PathFinder

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # the import system returns what sys.modules holds after this runs
        _spec.loader.exec_module(_module)
    __all__: list[str] = []
else:
    from .fastpath import HAS_TRITON, FastPath, torch_path, use_fast_paths

    __all__ = ["HAS_TRITON", "FastPath", "torch_path", "use_fast_paths"]
