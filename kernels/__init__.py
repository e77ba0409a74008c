"""Triton decode kernels for PrunePath FFNs (installed as `prunepath.kernels`).

One module per kernel, each with its pure-torch reference beside it:

- `layout`     : `ExpertLayout`, the expert-contiguous weight views the kernels read.
- `select`     : router GEMV and expert selection in one launch, writing the compacted list of kept experts.
- `route`      : the selection rules' codes and the torch references the kernels are tested against.
- `expert_ffn` : gate/up over the kept experts, down with fp32 atomics and the reduce folded in.
- `all_kept`   : every expert kept, or batches at high kept fractions: cuBLAS (with the router or the
                 route+select kernel beside it, or no router with unit gates).
- `fastpath`   : `FastPath`, what a `PrunePathFFN` calls on; `use_fast_paths(model)` installs (or removes)
                 them, `torch_path(model)` suspends them for a block.

Triton is optional: without it (or without CUDA) `FastPath.accepts` is False and the FFN runs its
torch path. Tests run the kernels on the CPU with TRITON_INTERPRET=1.
"""

from __future__ import annotations

if __name__ == "kernels":
    # Imported as a top-level `kernels` only by accident: with the repository root on sys.path
    # (`python -c` or `panel serve` run from the root), transformers probes `import kernels` for the
    # unrelated Hugging Face "kernels" package. Stay empty (no __version__), so that probe finds
    # nothing usable and imports nothing of ours; the real name of this package is prunepath.kernels.
    __all__: list[str] = []
else:
    from .fastpath import HAS_TRITON, FastPath, torch_path, use_fast_paths

    __all__ = ["HAS_TRITON", "FastPath", "torch_path", "use_fast_paths"]
