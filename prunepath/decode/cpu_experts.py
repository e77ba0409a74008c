"""CPU decode of a PrunePath FFN that reads only the kept experts' weights.

Shapes: N rows (= B*T tokens), D hidden, F ffn, E experts, G expert size (F = E*G), K kept experts,
R input rows per expert (2G gated: gate then up; G for a two-layer MLP).

The torch path of `PrunePathFFN` computes all F neurons and masks the dropped ones, so on a CPU a sparse
model runs no faster than the dense one. Decoding one token is memory-bound: each FFN reads 3·F·D weights
and does two FLOPs per weight read. Reading only the kept experts' weights is what buys time (Gu, Fu,
Yuan 2026 make the FFN structurally sparse for exactly this).

Layouts (`ExpertWeights`, one copy per FFN, built on first use and rebuilt when the weights change). A
CPU GEMV y = x W reads W fastest when W is stored [in, out] (each input coordinate scales one contiguous
row, ~20 GB/s on a 2-core AMD EPYC) rather than torch's [out, in] (dot products, ~11 GB/s), so:

* "blocks" [E·D, R]: expert e's input weights transposed, rows e·D .. e·D+D-1, expert-contiguous (the
  conversion already made each expert a contiguous block of neurons). The kept experts' pre-activations
  are then ONE `embedding_bag` whatever the kept set: bag k sums rows kept[k]·D + d weighted by x_d, so
  it reads exactly the kept experts' input weights, with no copy and no Python loop over experts;
* "down_e" [F, D]: W_downᵀ, expert-major (expert e's G rows contiguous); the output is one more
  `embedding_bag`, the kept neurons' rows weighted by their activations (split in two bags, summed,
  when two threads can share it). Contiguous expert rows read ~1.7x faster than the same rows scattered
  in the base model's neuron order;
* `dense_layout()`: W_inᵀ [D, R·E] and W_downᵀ [F, D] (built only when used): W_inᵀ and W_downᵀ in the base model's
  neuron order, for the dense GEMVs when (nearly) every expert is kept. In that order the all-experts
  FFN is the base model's own dense FFN (`dense_gated`) on the same kernels, bit for bit.

Measured at SmolLM2-135M's shapes (D 576, F 1536, E 48, 30 distinct layers so the weights come from
memory, one thread): the input bag on blocks 0.09 / 0.21 / 0.30 / 0.41 ms per layer at 12 / 24 / 36 / 48
experts against 0.30 ms for the dense GEMV (the same bag on the dense layout's rows, no extra copy: 0.19 ms at 12);
one GEMV per run of consecutive experts on [out, in] rows, the previous design, was slower still. In the
whole decode step (one thread, a loaded machine, top-k rules) the bags beat the dense FFN up to 38 of 48
experts (1.40x / 1.14x / 1.08x / 1.02x the dense step at 12 / 24 / 34 / 38), while the masked dense GEMVs
cost 2-17 % more than dense (routing and masking); so above `CROSSOVER` = 0.8 the masked dense GEMVs run
on one thread. The crossover is kept per thread count (`crossover()`, `CROSSOVER_BY_THREADS`); measured on
two threads it is 0.8 as well.

Compiled path (`fused_ffn`, `prunepath.decode.cpu_fused`): for one fp32 row under the cumulative-mass
rule (the decode step's case), the router GEMV and softmax run in torch and one numba-compiled call does
the selection, the kept experts' gate/up reads, the activation, the gates and the down accumulation on the
same blocks and down_e, split over the threads. In the decode step of the default checkpoint (two threads)
it took the FFN at 25 % kept from ~10 to ~4 ms per token. Other cases (bf16, batches, other rules, no numba)
run the eager bags below.

Selection (`route`): for the cumulative-mass rule on one row, the router GEMV, a softmax, a sort of the E
probabilities, a cumsum and a count give the kept experts directly (the prefix of the sorted order),
the same set as `CumulativeMass.select`; other rules and several rows go through `rule.select`.

`CPUExpertPath` puts this behind a PrunePath FFN's `fast_path` hook, so the model's own forward reads
only the kept experts (any architecture; `prunepath.decode.cpu_step` calls `expert_ffn` directly for
Llama-family models, without the hook).
"""

from __future__ import annotations

import bisect
import functools
import math
import struct
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from prunepath.decode import cpu_layer
from prunepath.decode.cpu_fused import compiled_threads, fused_kernels, mass_ffn
from prunepath.ffn.module import prunepath_ffns
from prunepath.routing.gates import gate_values
from prunepath.routing.router import LinearRouter
from prunepath.routing.rules import CumulativeMass, Dense, TopK, _compute_dtype

# Above this fraction of experts kept (the union over the rows) the dense GEMVs, masked, are faster than
# the bags over the kept experts (measured at SmolLM2-135M's shapes, see the module docstring), per number
# of intra-op threads. On two threads the dense GEMVs split over both (`gemv`), yet the masked dense FFN
# still lost to the bags at half the experts kept (whole decode step, paired rounds on a quiet 2-core
# AMD EPYC: 0.97x dense with the crossover at 0.5, 1.06x at 0.8; at 75 % kept 0.93x against 0.96x).
CROSSOVER = 0.8  # one thread
CROSSOVER_BY_THREADS = {1: 0.8, 2: 0.8}
# The compiled path (`fused_ffn`) beats the masked dense FFN at every kept fraction: in the decode step of the
# default checkpoint on two threads, 1.14x against 0.92x dense at τ = 0.9 (82 % of the experts kept), 1.07x
# against 0.92x at τ = 0.95 (90 %), 1.10x against 1.16x at 74 % (within the noise of the pairs), so it
# never hands over (with every expert kept and unit gates the dense FFN still runs, without routing).
FUSED_CROSSOVER = 1.0


def crossover(threads: int | None = None) -> float:
    """The kept fraction above which the masked dense FFN runs, for `threads` intra-op threads (default:
    torch's current number); more threads than measured take the two-thread figure."""
    t = torch.get_num_threads() if threads is None else int(threads)
    return CROSSOVER_BY_THREADS.get(t, CROSSOVER_BY_THREADS[2] if t > 2 else CROSSOVER)


class ExpertLayoutError(ValueError):
    """The FFN cannot be read expert by expert (not a PrunePath FFN with the contiguous expert layout)."""


def keeps_every_expert(rule, n_experts: int) -> bool:
    """Whether `rule` keeps all experts whatever the router says (dense, τ > 1, top-k with k = E)."""
    if isinstance(rule, Dense):
        return True
    if isinstance(rule, CumulativeMass):
        return rule.tau > 1
    return isinstance(rule, TopK) and rule.k >= n_experts


def check_expert_layout(ffn) -> None:
    kind = getattr(ffn, "kind", None)
    if kind not in ("gated", "mlp"):
        raise ExpertLayoutError(
            f"the CPU expert path needs a PrunePath FFN of kind 'gated' or 'mlp' (got {kind!r}); convert the "
            "model with prunepath.moefy or load a PrunePath checkpoint")
    if ffn.n_experts * ffn.expert_size != ffn.d_ff:
        raise ExpertLayoutError(f"FFN of layer {ffn.layer_idx}: {ffn.n_experts} experts x {ffn.expert_size} "
                                f"neurons != d_ff {ffn.d_ff}; the expert-contiguous layout is missing")


def activation_fn(act):
    """The activation as a plain function (F.silu for SiLU modules: no module call per token)."""
    return F.silu if type(act).__name__ in ("SiLU", "SiLUActivation") else act


class ExpertWeights:
    """One PrunePath FFN's weights in the CPU layouts (see the module docstring); get with `expert_weights`."""

    def __init__(self, ffn):
        check_expert_layout(ffn)
        f = ffn
        E, G, D = f.n_experts, f.expert_size, f.d_model
        self.gated, self.E, self.G, self.D = f.kind == "gated", E, G, D
        ins = [f.gate_proj, f.up_proj] if self.gated else [f.fc_in]
        out = f.down_proj if self.gated else f.fc_out
        self.R = G * len(ins)
        dev = out.weight.device
        perm = f.perm.to(dev)  # permuted position i holds the base model's neuron perm[i]
        with torch.no_grad():
            w = torch.stack([m.weight.detach().view(E, G, D) for m in ins], 1)  # [E, n_in, G, D]
            self.blocks = w.reshape(E, self.R, D).transpose(1, 2).contiguous().view(E * D, self.R)
            self.bias_in = None
            if ins[0].bias is not None:
                self.bias_in = torch.stack([m.bias.detach().view(E, G) for m in ins], 1).reshape(E, self.R)
            self.down_e = out.weight.detach().t().contiguous()  # [F, D] expert-major: expert e's rows e*G..
            self.bias_out = None if out.bias is None else out.bias.detach()
        # bag indices in int32 (embedding_bag takes them): half the bytes of the per-token index gather
        ix = dict(dtype=torch.int32 if E * D < 2 ** 31 and f.d_ff < 2 ** 31 else torch.long, device=dev)
        self.rows = torch.arange(f.d_ff, **ix).view(E, G)  # expert e's rows of down_e
        self.idx = (torch.arange(E, **ix)[:, None] * D + torch.arange(D, **ix)).contiguous()  # [E, D]
        self.bag_offsets = [torch.arange(k, **ix) * D for k in range(E + 1)]  # K bags of D rows
        # the down bag of K experts split in two (summed after) so that two threads share it
        self.down_halves = [torch.tensor([0, (k * G) // 2], **ix) for k in range(E + 1)]
        self.zero = torch.zeros(1, **ix)
        self.all_experts = torch.arange(E, device=dev)
        self.router_wt = f.router.weight.t() if isinstance(f.router, LinearRouter) else None  # a view, no copy
        self.mass_dtype = _compute_dtype(out.weight)  # the rules' cumulative sums run in at least fp32
        self.neuron_expert = torch.empty(f.d_ff, dtype=torch.long, device=dev)  # base-order neuron -> expert
        self.neuron_expert[perm] = torch.arange(f.d_ff, device=dev) // G
        self.act = activation_fn(f.act)
        # what `fused_ffn` needs of the weights (fixed for this copy): a linear router, the gated SiLU FFN
        # without biases, fp32
        self.fusable = (self.router_wt is not None and self.gated and self.act is F.silu and self.bias_in is None
                        and self.bias_out is None and self.blocks.dtype == torch.float32)
        self._ins, self._perm = ins, perm
        self._dense = None
        self._fused = None

    def _base_order(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of t (permuted, expert-contiguous order) put back in the base model's neuron order."""
        out = torch.empty_like(t)
        out[self._perm] = t.detach()
        return out

    def dense_layout(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(W_inᵀ [D, R·E], its bias [R·E] or None, W_downᵀ [F, D]) in the base model's neuron order (gate
        columns, then up columns), built on first use."""
        if self._dense is None:
            with torch.no_grad():
                in_t = torch.cat([self._base_order(m.weight) for m in self._ins]).t().contiguous()
                bias = None if self.bias_in is None else torch.cat([self._base_order(m.bias) for m in self._ins])
                self._dense = (in_t, bias, self._base_order(self.down_e))
        return self._dense

    def fused_arrays(self) -> tuple:
        """(blocks, down_e, unit gates [E]) as numpy arrays sharing the tensors' memory, for `cpu_fused`."""
        if self._fused is None:
            self._fused = (self.blocks.numpy(), self.down_e.numpy(), np.ones(self.E, np.float32))
        return self._fused

    def bytes_per_expert(self) -> int:
        """Weight bytes one kept expert costs a token (its input and output blocks)."""
        return (self.R + self.G) * self.D * self.blocks.element_size()


_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> (key, its copies)


def cached_copy(module, build, *extra):
    """build(module) once per module, shared by every decoder and rebuilt when any of its parameters changes
    (storage, in-place version, dtype, device) or when `extra` (more tensors the copy reads) does."""
    tensors = (*module.parameters(), *extra)
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
    hit = _COPIES.get(module)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = _COPIES[module] = (key, build(module))
    return hit[1]


def expert_weights(ffn) -> ExpertWeights:
    """The CPU layouts of `ffn`, shared by every decoder and rebuilt when its weights change in any way."""
    return cached_copy(ffn, ExpertWeights, ffn.perm)


# -- routing -----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _below(tau: float, dtype: torch.dtype) -> float:
    """τ as the comparison `tensor < tau` sees it for a tensor of `dtype` (rounded to float32 for float32)."""
    return struct.unpack("f", struct.pack("f", tau))[0] if dtype == torch.float32 else tau


def route(ffn, w: ExpertWeights, x2d: torch.Tensor):
    """The experts rows x2d [N, D] keep -> (kept [K] expert ids, the union over the rows; scale [N, K] per-row
    gates or 0/1 masks, or None when every row keeps them all with unit gates; counts [N] experts kept per
    row, a list for one row)."""
    rule = ffn.rule
    # x Wᵀ on the router's own weight: LinearRouter's F.linear bit for bit, so the torch path's decisions
    logits = x2d.mm(w.router_wt) if w.router_wt is not None else ffn.router(x2d)  # [N, E]
    N = x2d.shape[0]
    if N == 1 and isinstance(rule, CumulativeMass):  # the kept set is a prefix of the sorted order
        probs = None
        if rule.tau > 1:
            kept = w.all_experts
        else:
            probs = torch.softmax(logits if logits.dtype == w.mass_dtype else logits.to(w.mass_dtype), dim=-1)[0]
            sorted_p, order = probs.sort(descending=True, stable=True)
            csum = sorted_p.cumsum(0).tolist()  # nondecreasing: count the entries below τ by bisection
            if rule.inclusive:  # keep while the mass before an expert is below τ
                n = 1 + bisect.bisect_left(csum, _below(rule.tau, probs.dtype), 0, len(csum) - 1)
            else:
                n = max(1, bisect.bisect_left(csum, _below(rule.tau, probs.dtype)))
            kept = order[:n]
        counts = [kept.numel()]
        if ffn.gate == "one":
            return kept, None, counts
        if ffn.gate == "sigmoid":
            return kept, torch.sigmoid(logits.index_select(1, kept)), counts
        if probs is None:
            probs = torch.softmax(logits.to(w.mass_dtype), dim=-1)[0]
        return kept, probs[kept].to(logits.dtype)[None], counts
    mask = rule.select(logits, None)  # [N, E] bool
    union = mask.any(0)
    kept = union.nonzero()[:, 0]
    counts = mask.sum(-1)
    if ffn.gate != "one":
        return kept, gate_values(logits, mask, ffn.gate)[:, kept], counts
    if N == 1 or bool((mask == union).all()):
        return kept, None, counts
    return kept, mask[:, kept].to(x2d.dtype), counts


# -- the FFN over the kept experts, or over all of them ----------------------------------------------------


def kept_ffn(w: ExpertWeights, x2d: torch.Tensor, kept: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The FFN over the experts `kept` [K] (scale [N, K] or None), reading only their weights.  # [N, D]"""
    N, K, D, G = x2d.shape[0], kept.numel(), w.D, w.G
    idx = w.idx.index_select(0, kept).view(-1)  # [K*D] rows of blocks
    rows = w.rows.index_select(0, kept).view(-1)  # [K*G] rows of down_e
    if N == 1:  # torch.embedding_bag is F.embedding_bag without its argument checks; mode 0 = sum
        pre = torch.embedding_bag(w.blocks, idx, w.bag_offsets[K], False, 0, False, x2d.expand(K, D).reshape(-1))[0]
    else:
        starts = torch.arange(0, N * K * D, D, dtype=idx.dtype, device=x2d.device)
        pre = F.embedding_bag(idx.repeat(N), w.blocks, starts,
                              mode="sum", per_sample_weights=x2d[:, None, :].expand(N, K, D).reshape(-1))
    pre = pre.view(N, K, w.R)  # pre-activations of the kept experts
    if w.bias_in is not None:
        pre = pre + w.bias_in[kept]
    h = w.act(pre[..., :G]) * pre[..., G:] if w.gated else w.act(pre)  # [N, K, G]
    if scale is not None:
        h = h * scale.to(h.dtype)[:, :, None]
    if N == 1 and torch.get_num_threads() > 1:
        y = torch.embedding_bag(w.down_e, rows, w.down_halves[K], False, 0, False, h.view(-1))[0].sum(0, keepdim=True)
    elif N == 1:
        y = torch.embedding_bag(w.down_e, rows, w.zero, False, 0, False, h.view(-1))[0]
    else:
        y = F.embedding_bag(rows.repeat(N), w.down_e, torch.arange(0, N * K * G, K * G, dtype=rows.dtype,
                                                                   device=x2d.device),
                            mode="sum", per_sample_weights=h.reshape(-1))
    return y if w.bias_out is None else y + w.bias_out  # [N, D]


def gemv(x2d: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """x2d [N, I] @ w_t [I, O], for one row split over the intra-op threads.

    torch runs a one-row matmul on one thread (about 20 GB/s of weights here whatever the thread count);
    as a batched matmul over P slices of the reduction dimension, summed, it runs on P threads (2 threads
    on a 2-core AMD EPYC: 25-28 GB/s for [576, 3072] and the [576, 49152] LM head, 19 against 12 GB/s for
    [1536, 576]).  # [N, O]"""
    parts = torch.get_num_threads()
    if x2d.shape[0] != 1 or parts < 2 or w_t.shape[0] % parts:
        return x2d @ w_t
    k = w_t.shape[0] // parts
    return torch.bmm(x2d.view(parts, 1, k), w_t.view(parts, k, -1)).sum(0)


def dense_gated(x2d: torch.Tensor, w_in: torch.Tensor, w_down: torch.Tensor, act,
                neuron_gates: torch.Tensor | None = None) -> torch.Tensor:
    """act(x W_g) ⊙ (x W_u) W_d with w_in = [W_g | W_u] stored [D, 2F] and w_down [F, D], the neurons
    scaled by neuron_gates [N, F] when given: the dense FFN of the decode step, base model or PrunePath
    model with every expert kept (the same code, so the same bits). One fp32 row of a SiLU FFN without
    neuron gates runs compiled (`cpu_layer.dense_ffn_into`) when numba is present.  # [N, D]"""
    if (neuron_gates is None and act is F.silu and x2d.shape[0] == 1 and x2d.dtype == w_in.dtype == torch.float32
            and not torch.is_grad_enabled() and not cpu_layer.compiled_layer()):
        P = compiled_threads(torch.get_num_threads())
        parts = np.empty((P, max(w_in.shape[1], w_down.shape[1])), np.float32)
        y = np.empty(w_down.shape[1], np.float32)
        cpu_layer.dense_ffn_into(x2d.numpy()[0], w_in.numpy(), w_down.numpy(), P, parts,
                                 np.empty(w_in.shape[1], np.float32), y)
        return torch.from_numpy(y)[None]
    pre = gemv(x2d, w_in)
    n = pre.shape[1] // 2
    h = act(pre[:, :n]) * pre[:, n:]
    if neuron_gates is not None:
        h = h * neuron_gates
    return gemv(h, w_down)


def dense_ffn(w: ExpertWeights, x2d: torch.Tensor, gates: torch.Tensor | None = None) -> torch.Tensor:
    """Every neuron through the dense GEMVs on `w.dense_layout()`, gated per expert by gates [N, E] (None:
    unit gates, the base model's dense FFN bit for bit).  # [N, D]"""
    in_t, bias_in_t, down_t = w.dense_layout()
    neuron_gates = None if gates is None else gates.to(x2d.dtype)[:, w.neuron_expert]  # [N, F]
    if w.gated and bias_in_t is None:
        y = dense_gated(x2d, in_t, down_t, w.act, neuron_gates)
    else:
        pre = gemv(x2d, in_t) if bias_in_t is None else torch.addmm(bias_in_t, x2d, in_t)  # [N, R*E]
        n = pre.shape[1] // 2
        h = w.act(pre[:, :n]) * pre[:, n:] if w.gated else w.act(pre)  # [N, F]
        y = gemv(h if neuron_gates is None else h * neuron_gates, down_t)
    return y if w.bias_out is None else y + w.bias_out


def fused_applies(ffn, w: ExpertWeights, x2d: torch.Tensor) -> bool:
    """Whether `fused_ffn` runs this call: one fp32 row without autograd, the cumulative-mass rule with τ <= 1,
    a linear router, a gated SiLU FFN without biases, and numba present (`cpu_fused.fused_kernels()`)."""
    rule = ffn.rule
    return (w.fusable and x2d.shape[0] == 1 and x2d.dtype == torch.float32 and type(rule) is CumulativeMass
            and rule.tau <= 1 and not torch.is_grad_enabled() and x2d.device.type == "cpu" and not fused_kernels())


@dataclass(frozen=True)
class FusedPlan:
    """What a `fused_ffn` call needs besides the row, fixed for one FFN's weights, rule and limit (the decode step
    makes it once per rule, `fused_plan`)."""

    router_wt: torch.Tensor  # [D, E]
    ones: np.ndarray  # [E] unit gates
    tau: np.float32  # τ as float32 compares it
    inclusive: bool
    limit: int  # above this many kept experts, the dense FFN runs instead
    blocks: np.ndarray  # ExpertWeights.blocks and down_e as numpy views
    down_e: np.ndarray
    G: int
    order: np.ndarray  # [E] int64 scratch: the kept experts, most probable first


def fused_plan(ffn, w: ExpertWeights, limit: float) -> FusedPlan:
    """`FusedPlan` of `ffn` (cumulative-mass rule, `fused_applies`) with the dense FFN above `limit` of the experts."""
    blocks, down_e, ones = w.fused_arrays()
    return FusedPlan(w.router_wt, ones, np.float32(_below(ffn.rule.tau, torch.float32)), ffn.rule.inclusive,
                     math.floor(limit * w.E), blocks, down_e, w.G, np.empty(w.E, np.int64))


def fused_ffn(ffn, x2d: torch.Tensor, plan: FusedPlan, all_experts, y: np.ndarray | None = None) -> torch.Tensor:
    """One row through `cpu_fused.mass_ffn` (selection and the kept experts' GEMVs in one compiled call, into y
    when given) after the router GEMV and softmax in torch; above `plan.limit` kept experts, `all_experts(gates)`.
    Only when `fused_applies`.  # [1, D]"""
    logits = x2d.mm(plan.router_wt)  # [1, E]: LinearRouter's F.linear bit for bit, as in `route`
    probs = torch.softmax(logits, dim=-1)
    gates = (plan.ones if ffn.gate == "one"
             else (probs if ffn.gate == "softmax" else torch.sigmoid(logits)).numpy()[0])
    y, order, n = mass_ffn(x2d.numpy()[0], probs.numpy()[0], gates, plan.tau, plan.inclusive, plan.limit,
                           plan.blocks, plan.down_e, plan.G, torch.get_num_threads(), y, plan.order)
    if ffn.recording:
        ffn._record(torch.tensor([n]))
    if n > plan.limit:
        kept = torch.from_numpy(order[:n])
        g = torch.zeros(1, len(order), dtype=x2d.dtype)
        g[:, kept] = 1 if ffn.gate == "one" else torch.from_numpy(gates)[kept]
        return all_experts(g)
    return torch.from_numpy(y)[None]


def expert_ffn(ffn, x2d: torch.Tensor, w: ExpertWeights | None = None, all_experts=None,
               limit: float | None = None) -> torch.Tensor:
    """The PrunePath FFN on rows x2d [N, D] by its current rule and gate, reading only the kept experts'
    weights; records the counts inside a `prunepath.record` block.

    w: `expert_weights(ffn)`, looked up when needed and not given (a caller that checks for weight changes
    itself passes it). all_experts(gates [N, E] or None) -> [N, D] computes every neuron, gated per expert
    (None: unit gates); it runs when the rule keeps every expert with unit gates (no routing at all) and
    when more than `limit` (default `crossover()`, or `FUSED_CROSSOVER` on the compiled path) of the experts
    are kept. Default: `dense_ffn`.  # [N, D]"""
    if all_experts is None:
        def all_experts(gates):
            return dense_ffn(expert_weights(ffn) if w is None else w, x2d, gates)

    if ffn.gate == "one" and keeps_every_expert(ffn.rule, ffn.n_experts):  # no routing to do: the dense FFN
        if ffn.recording:
            ffn._record(torch.full((x2d.shape[0],), ffn.n_experts, dtype=torch.long))
        return all_experts(None)
    w = expert_weights(ffn) if w is None else w
    if fused_applies(ffn, w, x2d):
        return fused_ffn(ffn, x2d, fused_plan(ffn, w, FUSED_CROSSOVER if limit is None else limit), all_experts)
    limit = crossover() if limit is None else limit
    kept, scale, counts = route(ffn, w, x2d)
    if ffn.recording:
        ffn._record(torch.as_tensor(counts))
    if kept.numel() > limit * ffn.n_experts:
        gates = torch.zeros(x2d.shape[0], ffn.n_experts, dtype=x2d.dtype, device=x2d.device)
        gates[:, kept] = 1 if scale is None else scale.to(x2d.dtype)
        return all_experts(gates)
    return kept_ffn(w, x2d, kept, scale)


class CPUExpertPath:
    """Reads only the kept experts of one `PrunePathFFN` on a CPU, behind its `fast_path` hook (the model's
    own forward then takes it); attach with `use_cpu_paths(model)`.

    When the rule keeps every expert whatever the router says (dense, τ > 1) and the gates are one, it
    skips the router and runs the torch path's own code on the FFN's own weights, and above `crossover()` it
    runs the torch path's masked GEMVs: bit-for-bit the torch path there.
    """

    crossover = None  # a kept fraction, or None: `crossover()` for the current thread count

    def __init__(self, ffn, max_rows: int = 8):
        check_expert_layout(ffn)
        self.ffn, self.max_rows = ffn, int(max_rows)

    def accepts(self, x: torch.Tensor) -> bool:
        f = self.ffn
        w = f.down_proj.weight if f.kind == "gated" else f.fc_out.weight
        if x.device.type != "cpu" or w.device.type != "cpu" or x.dtype != w.dtype:
            return False
        if x.numel() // f.d_model > self.max_rows or f.rule.needs_scores:
            return False
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in f.parameters()))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        f = self.ffn
        x2d = x.reshape(-1, f.d_model)  # [N, D]
        y = expert_ffn(f, x2d, all_experts=lambda gates: self._all_experts(x2d, gates), limit=self.crossover)
        return (f.dropout(y) if f.kind == "mlp" else y).reshape(x.shape)

    def _all_experts(self, x2d: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        """All F neurons, gated by g [N, E] (None: unit gates): the torch path's own computation (before the
        two-layer MLP's dropout).  # [N, D]"""
        f = self.ffn
        h = f._hidden(x2d)  # [N, F]
        if g is not None:
            h = h * g.to(h.dtype).repeat_interleave(f.expert_size, dim=1)
        return f.down_proj(h) if f.kind == "gated" else f.fc_out(h)


def use_cpu_paths(model, on: bool = True, max_rows: int = 8) -> list[CPUExpertPath]:
    """Put a `CPUExpertPath` on every PrunePath FFN of `model` (through `ffn.fast_path`) and return them in
    layer order, or with on=False take them off again (other fast paths stay) and return [].

    Raises ExpertLayoutError naming the cause and the fix when the model has no PrunePath FFNs or one of
    them lacks the expert layout.
    """
    ffns = prunepath_ffns(model)
    if not ffns:
        raise ExpertLayoutError(
            f"{type(model).__name__} has no PrunePath FFNs: the CPU expert path reads the expert layout of a "
            "converted model; load a PrunePath checkpoint (prunepath.load) or convert with prunepath.moefy")
    if not on:
        for f in ffns:
            if isinstance(f.fast_path, CPUExpertPath):
                f.fast_path = None
        return []
    paths = [CPUExpertPath(f, max_rows=max_rows) for f in ffns]
    for f, p in zip(ffns, paths):
        f.fast_path = p
    return paths
