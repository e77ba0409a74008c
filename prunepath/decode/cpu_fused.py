"""One compiled call per PrunePath FFN for a decoded token on a CPU: selection and the kept experts' GEMVs.

Shapes: D hidden, E experts, G expert size, K kept experts, P threads.

The eager kept-expert path (`prunepath.decode.cpu_experts.kept_ffn` after `route`) reads only the kept
experts' weights, but spends about twenty small torch operations per layer on it (sort, cumsum, index
gathers, two embedding bags, the activation, the gate products): measured in the decode step of the default
checkpoint (SmolLM2-135M, 30 layers, two threads, 23 % of the experts kept) the FFN then took ~10 ms per
token where its weight reads alone take ~3, and the step ran only 1.11x the dense step. Here one function,
compiled by numba, does per token and layer, after the router's GEMV and softmax (two torch operations,
so the probabilities are the torch path's, bit for bit):

1. the cumulative-mass selection of Gu, Fu, Yuan 2026: the E probabilities sorted descending (a stable
   insertion sort: equal probabilities keep expert order, as `torch.sort(stable=True)`), their running sum
   accumulated in float64 and rounded to float32 at each step (torch's CPU `cumsum` of float32), experts
   kept while the sum (exclusive rule) or the sum before them (inclusive rule) is below τ, the top-1
   always: the same set as `prunepath.routing.rules.cumulative_mass_mask` (tested on ties and on τ equal
   to a partial sum);
2. for each kept expert, its gate and up pre-activations from its [D, 2G] block of `ExpertWeights.blocks`
   (one contiguous read), SiLU(gate) x up x its gate value;
3. the down projection accumulated from the kept experts' G contiguous rows of `ExpertWeights.down_e`.

The kept experts are split into P contiguous parts, one per thread (numba's OpenMP threading layer; each
part sums its own output row, the P rows are added at the end). With another threading layer (numba's own
work queue, whose threads compete with torch's OpenMP threads: 1.04x instead of 1.33x at 50 % kept) the
call runs on one thread. Sums run in fp32 in a different order from the torch path: results agree to
rounding (tested), not bit for bit; with every expert kept the decode step takes the dense FFN instead.

Only fp32 weights, the gated SiLU FFN without biases and one row are compiled; `fused_kernels()` says
why not when numba is missing (the eager path then runs, with the reason in `FUSED_UNAVAILABLE`).
"""

from __future__ import annotations

import math

import numpy as np

FUSED_UNAVAILABLE = ""  # why the compiled path cannot run here ("" when it can)
try:
    import numba
except ImportError as err:  # the eager path runs; the reason is kept for the benchmark rows
    numba = None
    FUSED_UNAVAILABLE = (f"numba is not installed ({err}); install the package's dependencies "
                         "(pip install -e .) for the compiled CPU FFN")

if numba is not None:
    # numba's OpenMP layer first: its threads then wait like torch's instead of competing with them
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
    _jit = numba.njit(cache=True, boundscheck=False, nogil=True, fastmath={"contract"})

    @_jit
    def select_mass(probs, tau, inclusive, order):
        """order[:n] <- the experts the cumulative-mass rule keeps, most probable first; returns n."""
        E = probs.shape[0]
        for i in range(E):
            order[i] = i
        for i in range(1, E):  # insertion sort, descending, stable
            oi = order[i]
            p = probs[oi]
            j = i
            while j > 0 and probs[order[j - 1]] < p:
                order[j] = order[j - 1]
                j -= 1
            order[j] = oi
        total = 0.0  # float64, rounded to float32 after each term: torch's CPU cumsum of float32
        n = 0
        for i in range(E):
            before = np.float32(total)
            total += probs[order[i]]
            mass = before if inclusive else np.float32(total)
            if i > 0 and not mass < tau:
                break
            n = i + 1
        return n

    @_jit
    def _experts_part(x, gates, blocks, down_e, order, k0, k1, G, pre, y):
        """y <- sum over the kept experts order[k0:k1] of their gated SiLU FFN on x (pre: scratch [K, 2G])."""
        D = x.shape[0]
        R = 2 * G
        for k in range(k0, k1):
            base = order[k] * D
            for r in range(R):
                pre[k, r] = 0.0
            for d in range(D):
                xd = x[d]
                for r in range(R):
                    pre[k, r] += xd * blocks[base + d, r]
        Dout = y.shape[0]
        for j in range(Dout):
            y[j] = 0.0
        for k in range(k0, k1):
            e = order[k]
            gate = gates[e]
            for g in range(G):
                a = pre[k, g]
                h = a / (1.0 + math.exp(-a)) * pre[k, G + g] * gate
                row = e * G + g
                for j in range(Dout):
                    y[j] += h * down_e[row, j]

    @_jit
    def _sum_parts(parts, y):
        for j in range(y.shape[0]):
            acc = parts[0, j]
            for p in range(1, parts.shape[0]):
                acc += parts[p, j]
            y[j] = acc

    @numba.njit(cache=True, boundscheck=False, nogil=True, parallel=True)
    def mass_ffn_parallel(x, probs, gates, tau, inclusive, limit, blocks, down_e, G, P, y, order):
        """`mass_ffn` with the kept experts split into min(P, n) parts, one per thread."""
        n = select_mass(probs, tau, inclusive, order)
        if n <= limit:
            P = min(P, n)
            pre = np.empty((n, 2 * G), np.float32)
            parts = np.empty((P, y.shape[0]), np.float32)
            for p in numba.prange(P):
                _experts_part(x, gates, blocks, down_e, order, (n * p) // P, (n * (p + 1)) // P, G, pre, parts[p])
            _sum_parts(parts, y)
        return n

    @_jit
    def mass_ffn_serial(x, probs, gates, tau, inclusive, limit, blocks, down_e, G, y, order):
        """`mass_ffn` on the calling thread."""
        n = select_mass(probs, tau, inclusive, order)
        if n <= limit:
            pre = np.empty((n, 2 * G), np.float32)
            _experts_part(x, gates, blocks, down_e, order, 0, n, G, pre, y)
        return n


_PARALLEL = None  # whether the parallel kernel runs on numba's OpenMP layer (decided at its first call)


def _parallel_ok() -> bool:
    global _PARALLEL
    if _PARALLEL is None:
        z = np.zeros(1, np.float32)
        try:
            mass_ffn_parallel(z, np.ones(1, np.float32), z, 0.5, False, 1, np.zeros((1, 2), np.float32),
                              np.zeros((1, 1), np.float32), 1, 1, np.zeros(1, np.float32), np.zeros(1, np.int64))
            _PARALLEL = numba.threading_layer() == "omp"
        except (ValueError, RuntimeError):  # no threading layer could be loaded
            _PARALLEL = False
    return _PARALLEL


def compiled_threads(threads: int) -> int:
    """How many parts a compiled call splits its work into for `threads` intra-op threads: 1 unless numba runs
    on its OpenMP layer (its own work queue's threads compete with torch's)."""
    return threads if threads > 1 and (_PARALLEL or _parallel_ok()) else 1


def fused_kernels() -> str:
    """Why the compiled CPU FFN cannot run on this machine, or "" when it can."""
    return FUSED_UNAVAILABLE


def mass_ffn(x: np.ndarray, probs: np.ndarray, gates: np.ndarray, tau: float, inclusive: bool, limit: int,
             blocks: np.ndarray, down_e: np.ndarray, G: int, threads: int, y: np.ndarray | None = None,
             order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """One token's PrunePath FFN by the cumulative-mass rule, all float32 numpy arrays: x [D], probs [E]
    (softmax of the router logits), gates [E] (each expert's output scale), τ as float32 compares it,
    blocks [E·D, 2G] and down_e [E·G, D] (`ExpertWeights`). Returns (y [D], order [E], n): the first n of
    order are the kept experts; y is computed only when n <= limit (else left unset: the caller runs the
    dense FFN). y and order (int64) are made here unless given."""
    order = np.empty(probs.shape[0], np.int64) if order is None else order
    y = np.empty(down_e.shape[1], np.float32) if y is None else y
    if threads < 2 or not (_PARALLEL or _parallel_ok()):
        return y, order, mass_ffn_serial(x, probs, gates, tau, inclusive, limit, blocks, down_e, G, y, order)
    return y, order, mass_ffn_parallel(x, probs, gates, tau, inclusive, limit, blocks, down_e, G, threads, y, order)
