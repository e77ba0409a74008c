"""What every GPU benchmark of record shares: the environment, the copy-bandwidth ceiling, CUDA-event
timing of graph replays (median and p20 / p80 of many runs after warm-up), and the input checks that
turn "no usable GPU" into a clear message instead of a stack trace.
"""

from __future__ import annotations

import datetime
import platform

import torch


class BenchInputError(ValueError):
    """Bad benchmark input (no GPU, a GPU Triton cannot target, a fraction outside (0, 1], ...)."""


def require_triton_gpu() -> None:
    """Raise BenchInputError unless a CUDA GPU that Triton compiles for (compute capability >= 8.0) is here."""
    if not torch.cuda.is_available():
        raise BenchInputError("no CUDA GPU is visible (torch.cuda.is_available() is False); the GPU benchmarks "
                              "time compiled kernels and need one. On a CPU run `prunepath bench decode "
                              "--device cpu`.")
    major, minor = torch.cuda.get_device_capability(0)
    if (major, minor) < (8, 0):
        raise BenchInputError(f"{torch.cuda.get_device_name(0)} has compute capability {major}.{minor}; the "
                              "Triton kernels need 8.0 or newer (Ampere, Hopper, ...) for bf16")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise BenchInputError("triton is not installed: pip install prunepath[kernels]") from None


def parse_fractions(text: str) -> list[float]:
    """Comma list of kept fractions, each in (0, 1]."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BenchInputError(f"--fractions {text!r}: expected a comma list of numbers, e.g. 0.25,0.5") from None
    bad = [v for v in values if not 0.0 < v <= 1.0]
    if bad or not values:
        raise BenchInputError(f"--fractions {text!r}: every kept fraction must be in (0, 1]; got {bad or 'none'}")
    return values


def environment() -> dict:
    """Device, versions (torch, triton, transformers) and today's date, as the results schema names them."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if cuda else None
    return {
        "device": torch.cuda.get_device_name(0) if cuda else (platform.processor() or "cpu"),
        "sm_count": props.multi_processor_count if props else None,
        "versions": {"torch": torch.__version__, "triton": triton_version,
                     "transformers": transformers.__version__, "cuda": torch.version.cuda},
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    }


def stats(seconds: list[float], scale: float = 1.0) -> dict:
    """median, p20, p80 (nearest rank) of per-run times, times `scale`, and the number of runs."""
    s = sorted(seconds)
    pick = lambda q: s[min(len(s) - 1, int(round(q * (len(s) - 1))))] * scale  # noqa: E731
    return {"median": pick(0.5), "p20": pick(0.2), "p80": pick(0.8), "runs": len(s)}


def event_times(fn, runs: int = 30, warmup: int = 5) -> list[float]:
    """Seconds of each of `runs` calls of fn (after `warmup` calls), each bracketed by CUDA events."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / 1e3)
    return out


def graph_times(fn, runs: int = 30) -> list[float]:
    """Per-replay seconds of `fn` captured as one CUDA graph (warmed up on a side stream first)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return event_times(g.replay, runs=runs)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy of `nbytes` (2 GiB): bytes read + written per second, median of 20 runs."""
    def median_copy_seconds() -> float:
        a = torch.empty(nbytes // 4, device="cuda", dtype=torch.float32).normal_()
        b = torch.empty_like(a)
        return stats(event_times(lambda: b.copy_(a), runs=20))["median"]

    t = median_copy_seconds()
    torch.cuda.empty_cache()
    return 2 * nbytes / t
