"""`CPUExpertPath`: a CPU decode path for a PrunePath FFN that reads only the kept experts' weights.

Shapes: N rows (= B*T tokens), D hidden, F ffn, E experts, G expert size (F = E*G), K kept experts.

The torch path of `PrunePathFFN` computes all F neurons and masks the dropped ones, so on a CPU a sparse
model runs no faster than the dense one. Decoding one token is memory-bound: each FFN reads 3·F·D weights
and does two FLOPs per weight read. Reading only the kept experts' weights is what buys time (Gu, Fu,
Yuan 2026 make the FFN structurally sparse for exactly this).

The layout makes that cheap. Conversion permutes the neurons so that expert e owns the contiguous
neurons e·G .. (e+1)·G-1: rows of W_gate and W_up, columns of W_down. This path keeps the same weights
expert-major: "in" [E·2G, D] holds expert e's G gate rows then its G up rows, and "down" [F, D] is
W_downᵀ (expert e's rows e·G .. (e+1)·G-1). A *run* of consecutive kept experts a..b-1 is then one
contiguous block of rows of each. Per token and layer:

    route: logits = router(x), kept mask by the FFN's rule (cumulative mass τ, top-k, ...)
    for each run a..b-1 of kept experts (the union over the N rows):
        pre[run] = in[a·2G : b·2G] xᵀ                         # one GEMV on a view, gate and up rows
    h = act(pre_gate) ⊙ pre_up  (⊙ per-row gates, zero where a row dropped the expert)   # [N, K·G]
    y = Σ_j h[:, j] · downᵀ[neuron j]  over the kept neurons    # one embedding_bag, reads only those rows

Nothing is copied per token: per layer there is one GEMV per run and one `embedding_bag` (a weighted sum
of the kept rows of W_downᵀ, which reads only those rows). We measured the alternatives on a 2-core AMD
EPYC (SmolLM2-135M shapes, D 576, F 1536, E 48): gathering the kept blocks into a buffer (`index_select`)
and one GEMV is a little faster on one thread but 10-50x slower on two threads when the cores are shared;
three GEMVs per run on W_gate / W_up views (no gate/up copy) cost about 1.5x this at 25 % kept, the
per-operation overhead of eager PyTorch being of the order of the bytes of one expert. Above `crossover`
kept experts the dense GEMVs (masked) are faster; when the rule keeps every expert whatever the router
says (dense, τ > 1) and the gates are one, the path skips the router and runs the torch path's own
code on the FFN's own weights: bit-for-bit the dense FFN, never slower than it. Memory: one more copy
of the FFN weights (gate/up expert-major, W_downᵀ), built on first use.

Used by the decode loop on a CPU (`prunepath.decode.loop.Decoder` attaches it through `ffn.fast_path`, the hook
the GPU kernels use); the FFN's forward falls back to its torch path when `accepts` says no (prefill
with many rows, autograd, a rule that needs the oracle's scores, another device or dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prunepath.ffn.module import prunepath_ffns
from prunepath.routing.gates import gate_values
from prunepath.routing.rules import CumulativeMass, Dense, TopK


class ExpertLayoutError(ValueError):
    """The FFN cannot be read expert by expert (not a PrunePath FFN with the contiguous expert layout)."""


def expert_runs(kept: list[bool]) -> list[tuple[int, int]]:
    """Maximal runs [a, b) of consecutive True entries: [F, T, T, F, T] -> [(1, 3), (4, 5)]."""
    runs, start = [], None
    for i, k in enumerate(kept):
        if k and start is None:
            start = i
        elif not k and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(kept)))
    return runs


def keeps_every_expert(rule, n_experts: int) -> bool:
    """Whether `rule` keeps all experts whatever the router says (dense, τ > 1, top-k with k = E)."""
    if isinstance(rule, Dense):
        return True
    if isinstance(rule, CumulativeMass):
        return rule.tau > 1
    return isinstance(rule, TopK) and rule.k >= n_experts


class CPUExpertPath:
    """Reads only the kept experts of one `PrunePathFFN` on a CPU; build with `attach_cpu_paths(model)`.

    crossover: above this fraction of experts kept (the union over the rows) the dense GEMVs over all
    neurons, masked, are faster than one GEMV per run. Measured on a 2-core AMD EPYC at SmolLM2-135M's shapes
    (30 FFNs, one token, one thread, random kept sets): 30 / 36 / 42 of 48 experts through the runs 32.8 /
    36.2 / 38.5 ms, the masked dense GEMVs 36.8 ms.
    """

    crossover = 0.7

    def __init__(self, ffn, max_rows: int = 8):
        kind = getattr(ffn, "kind", None)
        if kind not in ("gated", "mlp"):
            raise ExpertLayoutError(
                f"the CPU expert path needs a PrunePath FFN of kind 'gated' or 'mlp' (got {kind!r}); convert the "
                "model with prunepath.moefy or load a PrunePath checkpoint")
        if ffn.n_experts * ffn.expert_size != ffn.d_ff:
            raise ExpertLayoutError(f"FFN of layer {ffn.layer_idx}: {ffn.n_experts} experts x {ffn.expert_size} "
                                    f"neurons != d_ff {ffn.d_ff}; the expert-contiguous layout is missing")
        self.ffn, self.max_rows = ffn, int(max_rows)
        self._layout: dict[str, torch.Tensor] = {}
        self._layout_key = None

    # -- what this path reads ----------------------------------------------------------------------

    def _weights(self) -> tuple[torch.Tensor, ...]:
        f = self.ffn
        if f.kind == "gated":
            return f.gate_proj.weight, f.up_proj.weight, f.down_proj.weight
        return f.fc_in.weight, f.fc_out.weight

    def layout(self) -> dict[str, torch.Tensor]:
        """The expert-major weights this path streams, rebuilt when the FFN's weights change.

        "in" [E*R, D]: per expert its R rows of input weights, gate rows then up rows (R = 2G) for a gated
        FFN (a copy), W_in itself (R = G, a view) otherwise; "down" [F, D]: W_down transposed (a copy);
        "rows" [E, G]: neuron ids.
        """
        ws = self._weights()
        key = tuple((w.data_ptr(), w._version, w.dtype) for w in ws)
        if key != self._layout_key:
            f = self.ffn
            E, G, D = f.n_experts, f.expert_size, f.d_model
            with torch.no_grad():
                if f.kind == "gated":
                    w_in = torch.stack([ws[0].view(E, G, D), ws[1].view(E, G, D)], 1).reshape(E * 2 * G, D)
                else:
                    w_in = ws[0].detach()
                self._layout = {"in": w_in, "down": ws[-1].detach().t().contiguous(),
                                "rows": torch.arange(E * G, device=w_in.device).view(E, G),
                                "zero": torch.zeros(1, dtype=torch.long, device=w_in.device)}
            self._layout_key = key
        return self._layout

    def accepts(self, x: torch.Tensor) -> bool:
        f = self.ffn
        w = self._weights()[0]
        if x.device.type != "cpu" or w.device.type != "cpu" or x.dtype != w.dtype:
            return False
        if x.numel() // f.d_model > self.max_rows or f.rule.needs_scores:
            return False
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in f.parameters()))

    def bytes_per_expert(self) -> int:
        """Weight bytes one kept expert costs a token (its W_in, W_up and W_down blocks)."""
        f = self.ffn
        return len(self._weights()) * f.expert_size * f.d_model * self._weights()[0].element_size()

    # -- forward -----------------------------------------------------------------------------------

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        f = self.ffn
        shape = x.shape
        x2d = x.reshape(-1, f.d_model)  # [N, D]
        if f.gate == "one" and keeps_every_expert(f.rule, f.n_experts):  # no routing to do: the dense FFN
            if f.recording:
                f._record(torch.full((x2d.shape[0],), f.n_experts, dtype=torch.long))
            return self._all_experts(x2d, None).reshape(shape)
        logits = f.router(x2d)  # [N, E]
        mask = f.rule.select(logits, None)  # [N, E] bool
        if f.recording:
            f._record(mask.sum(-1))
        gates = None if f.gate == "one" else gate_values(logits, mask, f.gate)  # [N, E]
        union = mask.any(0)  # [E]
        kept = union.tolist()
        if sum(kept) > self.crossover * f.n_experts:  # most experts kept: the dense GEMVs are faster
            y = self._all_experts(x2d, mask if gates is None else gates)
        else:
            same_rows = x2d.shape[0] == 1 or bool((mask == union).all())
            scale = gates if gates is not None else (None if same_rows else mask)
            y = self._kept_experts(x2d, union, expert_runs(kept), scale)
        return y.reshape(shape)

    def _kept_experts(self, x2d: torch.Tensor, union: torch.Tensor, runs: list[tuple[int, int]],
                      scale: torch.Tensor | None) -> torch.Tensor:
        """The FFN over the experts in `runs` (scale [N, E]: per-row gates or masks, or None).  # [N, D]"""
        f, lay = self.ffn, self.layout()
        N, G = x2d.shape[0], f.expert_size
        R = lay["in"].shape[0] // f.n_experts  # input rows per expert: 2G gated, G otherwise
        K = sum(b - a for a, b in runs)
        pre = torch.empty(K * R, N, dtype=x2d.dtype)  # [K*R, N] pre-activations, expert-major
        xt, o = x2d.t(), 0
        for a, b in runs:  # one GEMV per run of consecutive kept experts, on a view of the weights
            torch.mm(lay["in"][a * R : b * R], xt, out=pre[o : o + (b - a) * R])
            o += (b - a) * R
        if f.kind == "gated":
            pre = pre.view(K, 2, G, N)
            h = f.act(pre[:, 0]) * pre[:, 1]  # [K, G, N]
        else:
            if f.fc_in.bias is not None:
                pre = pre + f.fc_in.bias[lay["rows"][union].reshape(-1)][:, None]
            h = f.act(pre)
        h = h.reshape(K, G, N).permute(2, 0, 1)  # [N, K, G]
        if scale is not None:
            h = h * scale[:, union].to(h.dtype)[:, :, None]
        # y[n] = sum over the kept neurons j of h[n, j] * W_down^T[j]: one weighted row-sum per token row
        rows = lay["rows"][union].reshape(-1)  # [K*G]
        if N == 1:  # one bag (the common decode case: no per-row copies of the ids)
            rows_n, offsets = rows, lay["zero"]
        else:
            rows_n, offsets = rows.repeat(N), torch.arange(0, N * K * G, K * G)
        y = F.embedding_bag(rows_n, lay["down"], offsets, mode="sum", per_sample_weights=h.reshape(-1))  # [N, D]
        if f.kind == "mlp":
            if f.fc_out.bias is not None:
                y = y + f.fc_out.bias
            y = f.dropout(y)
        return y

    def _all_experts(self, x2d: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        """All F neurons, masked or gated by g [N, E] (None: unit gates): the torch path's own computation,
        bit-for-bit the same.  # [N, D]"""
        f = self.ffn
        h = f._hidden(x2d)  # [N, F]
        if g is not None:
            h = h * g.to(h.dtype).repeat_interleave(f.expert_size, dim=1)
        if f.kind == "gated":
            return f.down_proj(h)
        return f.dropout(f.fc_out(h))


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
