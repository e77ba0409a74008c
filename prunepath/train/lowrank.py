"""Low-rank approximation of weight changes, plain (SVD) or whitened by calibration statistics, and rank allocation."""

from __future__ import annotations

import torch

from prunepath.checkpoint import load
from prunepath.data import calibration_batches
from prunepath.routing.control import routing_kept, set_tau

# Global τ at which `--whiten` collects the fine-tuned model's inputs: the range it was trained on (τ ~ U[0.4, 1.05]),
# dense included.
WHITEN_TAUS = (0.45, 0.6, 0.75, 0.9, 1.05)


WHITEN_SEQ_LEN = 512


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` factors of `delta` [out, in] -> (B [out, rank], A [rank, in], kept energy).

    The singular values are split evenly (B = U S^½, A = S^½ Vᵀ) so both factors have the same scale, as a
    LoRA adapter that trains further wants. A rank above min(out, in) is padded with zeros (exact).
    Kept energy: the share of ‖delta‖²_F the factors hold (1.0 for a zero delta).
    """
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b = torch.zeros(delta.shape[0], rank)
    a = torch.zeros(rank, delta.shape[1])
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    total = float((s**2).sum())
    return b, a, float((s[:k] ** 2).sum()) / total if total > 0 else 1.0


def whitening(gram: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """S and S⁻¹ [in, in] with S Sᵀ = G (a symmetric PSD input second moment), eigenvalues floored.

    G = Q Λ Qᵀ, S = Q Λ^½, S⁻¹ = Λ^-½ Qᵀ, each eigenvalue raised to at least damp × their mean, so that
    S is invertible and directions the calibration inputs never took still count a little.
    """
    if not damp > 0:
        raise ValueError(f"damp must be > 0, got {damp!r}")
    e, q = torch.linalg.eigh(gram.double())
    e = e.clamp_min(damp * float(e.clamp_min(0).mean().clamp_min(1e-30)))
    root = e.sqrt()
    return (q * root).float(), (q / root).T.float()


def whitened_low_rank(
    delta: torch.Tensor,
    white: tuple[torch.Tensor, torch.Tensor],
    rank: int,
    out_white: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """The rank-`rank` factors that change `delta`'s outputs least -> (B, A, ‖ΔW‖² kept, weighted change kept).

    Minimises ‖(delta − B A) S‖_F, white = (S, S⁻¹) from `whitening` (S Sᵀ = the inputs' second moment): the truncated
    SVD of delta·S, mapped back by S⁻¹. With out_white = (T, T⁻¹) (T Tᵀ = the outputs' gradient second moment, also
    from `whitening`) it minimises ‖Tᵀ (delta − B A) S‖_F instead: the second-order loss change under the
    Kronecker-factored (K-FAC) Fisher, tr(Rᵀ Γ R G) for R = delta − B A. Each rank-1 component's norm is split evenly
    between its column of B and its row of A, as LoRA training wants. ‖ΔW‖² kept: 1 − ‖ΔW − B A‖²_F / ‖ΔW‖²_F (it can
    fall below a plain SVD's, or below 0); weighted change kept: the share of ‖ΔW S‖²_F (‖Tᵀ ΔW S‖²_F) held (1.0
    for a zero delta).
    """
    s_mat, s_inv = white
    target = delta.float() @ s_mat
    if out_white is not None:
        target = out_white[0].T @ target
    u, sv, vh = torch.linalg.svd(target, full_matrices=False)
    k = min(rank, sv.numel())
    b_k = u[:, :k] * sv[:k]  # [out, k]
    if out_white is not None:
        b_k = out_white[1].T @ b_k  # T⁻ᵀ
    a_k = vh[:k] @ s_inv  # [k, in]
    scale = (a_k.norm(dim=1) / b_k.norm(dim=0).clamp_min(1e-30)).sqrt()  # balance each component's norms
    scale = torch.where(sv[:k] > 0, scale, torch.ones_like(scale))
    b = torch.zeros(delta.shape[0], rank)
    a = torch.zeros(rank, delta.shape[1])
    b[:, :k], a[:k] = b_k * scale, a_k / scale[:, None]
    total, energy = float((sv**2).sum()), float(delta.float().norm() ** 2)
    kept = 1.0 - float((delta.float() - b @ a).norm() ** 2) / energy if energy > 0 else 1.0
    return b, a, kept, float((sv[:k] ** 2).sum()) / total if total > 0 else 1.0


def output_kept(delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor, s_mat: torch.Tensor) -> float:
    """1 − ‖(ΔW − B A) S‖²_F / ‖ΔW S‖²_F: the share of the layer's output change on the inputs (S Sᵀ) that B A holds."""
    total = float((delta.float() @ s_mat).norm() ** 2)
    return 1.0 - float(((delta.float() - b @ a) @ s_mat).norm() ** 2) / total if total > 0 else 1.0


def layer_grams(
    model, ids: torch.Tensor, modules: set[str], taus=WHITEN_TAUS, batch_size: int = 8, gradients: bool = False
) -> tuple[dict, dict | None]:
    """E[x xᵀ] of each named module's input (and E[g gᵀ] of its output gradient) over calibration ids [B, T],
    averaged over global τ settings -> (input grams, gradient grams or None), module name -> float32 on the CPU.

    Modules called one after another on the same tensor (q/k/v, gate/up) share one input product. With gradients,
    the same forward passes also run backward: g = ∂L/∂y at each token, L the next-token cross-entropy summed over the
    batch's tokens, so that E[g gᵀ] ⊗ E[x xᵀ] is the layer's (empirical) Fisher in Kronecker factors (K-FAC, Martens &
    Grosse 2015). No parameter gradient is computed (the embeddings' output is where the graph starts). The model's
    rules and its parameters' requires_grad flags are restored afterwards.
    """
    device = next(model.parameters()).device
    ins: dict[str, torch.Tensor] = {}
    outs: dict[str, torch.Tensor] = {}
    tokens, targets = 0, 0
    last: list = [None, None]  # the latest input and its xᵀx: q/k/v (gate/up) are called one after another on it

    def gram(t):
        t2 = t.detach().reshape(-1, t.shape[-1]).float()
        return t2.T @ t2

    def add(sums, name, g):
        sums[name] = sums[name] + g if name in sums else g.clone()

    def input_hook(name):
        def fn(_module, args):
            if args[0] is not last[0]:
                last[:] = [args[0], gram(args[0])]
            add(ins, name, last[1])

        return fn

    def output_hook(name):
        def fn(_module, _args, out):
            out.register_hook(lambda g: add(outs, name, gram(g)))

        return fn

    named = dict(model.named_modules())
    handles = [named[m].register_forward_pre_hook(input_hook(m)) for m in sorted(modules)]
    flags = [(p, p.requires_grad) for p in model.parameters()] if gradients else []
    if gradients:
        handles += [named[m].register_forward_hook(output_hook(m)) for m in sorted(modules)]
        handles.append(model.get_input_embeddings().register_forward_hook(
            lambda _m, _a, out: out.detach().requires_grad_()))
    with routing_kept(model):
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            with torch.set_grad_enabled(gradients):
                for tau in taus:
                    set_tau(model, float(tau))
                    for s in range(0, ids.shape[0], batch_size):
                        batch = ids[s : s + batch_size].to(device)
                        logits = model(input_ids=batch, use_cache=False).logits
                        last[:] = [None, None]
                        tokens += batch.numel()
                        if gradients:
                            torch.nn.functional.cross_entropy(
                                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                                reduction="sum").backward()
                            targets += batch[:, 1:].numel()
        finally:
            for h in handles:
                h.remove()
            for p, flag in flags:
                p.requires_grad_(flag)
    grads = {m: (g / targets).float().cpu() for m, g in outs.items()} if gradients else None
    return {m: (g / tokens).float().cpu() for m, g in ins.items()}, grads


def input_grams(model, ids: torch.Tensor, modules: set[str], taus=WHITEN_TAUS, batch_size: int = 8) -> dict:
    """E[x xᵀ] of each named module's input (`layer_grams`), module name -> [in, in] float32 on the CPU."""
    return layer_grams(model, ids, modules, taus, batch_size)[0]


def gradient_grams(model, ids: torch.Tensor, modules: set[str], taus=WHITEN_TAUS, batch_size: int = 8) -> dict:
    """E[g gᵀ] of each named module's output gradient (`layer_grams`), module name -> [out, out] float32 on the CPU."""
    return layer_grams(model, ids, modules, taus, batch_size, gradients=True)[1]


def fine_tuned_grams(folder, base, ids, kinds, taus, device: str = "cpu", gradients: bool = False):
    """`layer_grams` of a full fine-tune's target layers (child names `kinds`), its own
    weights loaded -> (input grams, gradient grams or None, calibration tokens per τ).

    ids: token ids [B, T], or a number of tokens of the calibration text (lm/wiki_demo.txt, 512-token windows,
    seed 2: not the windows `prunepath calibrate` measures τ on).
    """
    tuned, tokenizer = load(folder, base=base, device=device)
    if isinstance(ids, int):
        if tokenizer is None:
            raise ValueError("whiten: a number of tokens needs the model's tokenizer; pass token ids instead")
        ids = calibration_batches(tokenizer, ids, WHITEN_SEQ_LEN, seed=2)
    modules = {n for n, _ in tuned.named_modules() if n.rsplit(".", 1)[-1] in kinds}
    grams, grads = layer_grams(tuned, ids, modules, taus, gradients=gradients)  # one pass over the text for both
    del tuned
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    return grams, grads, int(ids.numel())


def allocate_ranks(spectra: dict[str, list[torch.Tensor]], cost: dict[str, int], budget: int) -> dict[str, int]:
    """One rank per layer kind, keeping the most squared singular mass within `budget`.

    spectra: kind -> the singular values of each of its matrices; cost: kind -> what one more rank costs in the
    unit of `budget` (parameters, Σ out + in over its matrices, or their bytes). Each kind's gain per rank, the sum
    of its matrices' next σ², falls with the rank, so taking the best gain per cost while it fits is the greedy
    optimum of this knapsack.
    """
    gains = {}
    for kind, svals in spectra.items():
        g = torch.zeros(max(s.numel() for s in svals))
        for s in svals:
            g[: s.numel()] += s.double().pow(2).float()
        gains[kind] = g
    ranks, left = dict.fromkeys(spectra, 0), budget
    while True:
        open_ = [k for k in ranks if ranks[k] < gains[k].numel() and cost[k] <= left and gains[k][ranks[k]] > 0]
        if not open_:
            return ranks
        best = max(open_, key=lambda k: float(gains[k][ranks[k]]) / cost[k])
        ranks[best] += 1
        left -= cost[best]
