"""Splitting an FFN's neurons into experts of exactly G neurons (MoEfication, as in Gu, Fu, Yuan 2026).

Neuron i of an FFN owns row i of W_gate / W_up (or W_in) and column i of W_down; any partition of the
F neurons into E = F / G groups is an exact decomposition (the experts sum to the dense FFN). The split
only decides *which* neurons travel together, and so how well a router can predict whole groups:

- "kmeans" (the authors' choice): spherical k-means on the L2-normalised key rows (W_gate for gated FFNs,
  W_in for two-layer ones) with every cluster holding exactly G members. Neurons whose keys point the same
  way fire on the same inputs, so an expert tends to be all-on or all-off for a token.
- "coact" (MoEfication's alternative): count how often neurons fire together on calibration tokens and
  partition that graph with METIS, then move members until every part has exactly G.
- "random": a seeded random split, the baseline.

The result is a permutation: new position i holds original neuron perm[i], so expert e owns the contiguous
new positions e*G .. (e+1)*G - 1 (`ffn.module` permutes the weights; the kernels rely on that layout).

Shape legend: F ffn neurons, D hidden, E experts, G expert size, N calibration tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

METHODS = ("kmeans", "coact", "random")
KMEANS_ITERS = 25  # Lloyd steps; on real gate rows assignments stop changing well before this
SEED_DIM = 64  # k-means++ seeding runs on a random projection to this many dimensions (see _seed_centres)
ACTIVE_FRACTION = 0.1  # smooth activations: a neuron counts as active if among the top 10% |h| of its token
# The coact graph keeps each neuron's 2·G strongest co-activation partners. Sparser is also better here:
# on planted groups (1536 neurons, G = 32) 2·G recovered more of them than 8·G (0.47 vs 0.39 purity at a
# noisy setting, 1.0 vs 0.90 at a cleaner one) — weak edges are mostly noise — and METIS runs 4x fewer edges.
COACT_NEIGHBOURS = 2


@dataclass(frozen=True, eq=False)
class Split:
    perm: Tensor  # [F] long: new position i holds original neuron perm[i]
    centroids: Tensor  # [E, D] mean of each expert's L2-normalised keys
    method: str
    expert_size: int

    @property
    def n_experts(self) -> int:
        return self.perm.numel() // self.expert_size

    @property
    def labels(self) -> Tensor:
        """Expert of each *original* neuron.  # [F]"""
        labels = torch.empty_like(self.perm)
        labels[self.perm] = torch.arange(self.perm.numel()) // self.expert_size
        return labels


# ----------------------------------------------------------------------------------------------------------
# validation


def divisors_near(n: int, g: int, count: int = 3) -> list[int]:
    """The `count` divisors of n closest to g in ratio (32 and 48 are equally 'near' 40), ascending."""
    divs = [d for d in range(1, n + 1) if n % d == 0]
    target = math.log(max(g, 1))
    return sorted(sorted(divs, key=lambda d: (abs(math.log(d) - target), d))[:count])


def check_expert_size(d_ff: int, expert_size: int) -> int:
    """Return G as an int, or raise a ValueError that suggests valid sizes."""
    ok = isinstance(expert_size, int) and not isinstance(expert_size, bool)
    if not ok or expert_size < 1:
        near = ", ".join(map(str, divisors_near(d_ff, 32)))
        raise ValueError(f"expert size must be a positive integer dividing d_ff {d_ff}, got {expert_size!r}; "
                         f"divisors near 32: {near}")
    if d_ff % expert_size:
        near = ", ".join(map(str, divisors_near(d_ff, expert_size)))
        raise ValueError(f"expert size {expert_size} does not divide d_ff {d_ff}; divisors near it: {near}")
    return expert_size


# ----------------------------------------------------------------------------------------------------------
# the entry point


def split_neurons(
    keys: Tensor,
    expert_size: int = 32,
    method: str = "kmeans",
    seed: int = 0,
    activations: Tensor | None = None,
    *,
    iters: int = KMEANS_ITERS,
    active_fraction: float = ACTIVE_FRACTION,
) -> Split:
    """Partition F neurons (key rows [F, D]) into E = F / G experts of exactly G neurons.

    activations [N, F] (FFN intermediate activations on calibration tokens) are needed by "coact" only.
    Deterministic for a given seed (on a given machine and thread count).
    """
    if not isinstance(keys, Tensor) or keys.dim() != 2 or not keys.is_floating_point():
        got = f"{keys.dtype} {tuple(keys.shape)}" if isinstance(keys, Tensor) else type(keys).__name__
        raise ValueError(f"keys must be a float tensor [F, D] (rows of W_gate or W_in), got {got}")
    n_neurons, d = keys.shape
    g = check_expert_size(n_neurons, expert_size)
    n_experts = n_neurons // g
    if method not in METHODS:
        raise ValueError(f"unknown split method {method!r}; choose one of {', '.join(METHODS)}")
    xn = F.normalize(keys.detach().float().cpu(), dim=-1)  # [F, D]; dead (zero) rows stay zero
    if not torch.isfinite(xn).all():
        raise ValueError("keys contain NaN or inf")
    gen = torch.Generator().manual_seed(int(seed))

    if n_experts == 1 or g == 1:
        labels = torch.arange(n_neurons) // g  # one expert, or one neuron per expert: nothing to choose
    elif method == "random":
        labels = torch.randperm(n_neurons, generator=gen) // g
    elif method == "kmeans":
        labels = balanced_kmeans(xn, n_experts, iters=iters, generator=gen)
    else:
        if activations is None:
            raise ValueError("split method 'coact' needs activations [N, F] from calibration tokens "
                             "(prunepath.convert.ffn_activations); or use method='kmeans'")
        if activations.dim() != 2 or activations.shape[1] != n_neurons:
            raise ValueError(f"activations must be [N, F={n_neurons}] (one column per neuron, as keys has "
                             f"rows), got {tuple(activations.shape)}")
        labels = coactivation_labels(activations, n_experts, seed=int(seed), active_fraction=active_fraction)

    perm = torch.argsort(labels, stable=True)  # [F] grouped by expert, original order inside an expert
    centroids = xn[perm].reshape(n_experts, g, d).mean(dim=1)  # [E, D]
    return Split(perm=perm, centroids=centroids, method=method, expert_size=g)


# ----------------------------------------------------------------------------------------------------------
# balanced assignment: the step that keeps every cluster at exactly its capacity


def balanced_assign(scores: Tensor, capacity: Tensor) -> Tensor:
    """Assign each row of scores [F, E] to one column, column e receiving exactly capacity[e] rows.

    Greedy by regret, in rounds, all vectorised: every unassigned row proposes to its best open column;
    a column that is offered more rows than it has room for keeps the rows with the largest *margin*
    (best score minus second-best open score) — the rows that would lose most by going elsewhere; the
    rest propose again next round. Every round places at least one row per open column that receives a
    proposal, and rows only propose to open columns, so the loop ends; in practice within tens of rounds.
    """
    n_rows, n_cols = scores.shape
    if int(capacity.sum()) != n_rows:
        raise ValueError(f"capacities sum to {int(capacity.sum())} but there are {n_rows} rows to place")
    labels = torch.full((n_rows,), -1, dtype=torch.long)
    free = capacity.clone().long()  # [E]
    todo = torch.arange(n_rows)  # rows still unassigned
    while todo.numel():
        s = scores[todo].masked_fill(free == 0, -math.inf)  # [U, E] full columns closed
        if int((free > 0).sum()) >= 2:
            top = s.topk(2, dim=1)
            choice = top.indices[:, 0]  # [U]
            margin = top.values[:, 0] - top.values[:, 1]  # [U] regret of not getting the first choice
        else:  # one column left open: it has room for everyone left
            choice = s.argmax(dim=1)
            margin = torch.zeros(todo.numel())
        # group proposals by column, largest margin first within a column (stable sorts: deterministic)
        order = torch.argsort(margin, descending=True, stable=True)
        order = order[torch.argsort(choice[order], stable=True)]
        col = choice[order]
        counts = torch.bincount(col, minlength=n_cols)
        rank = torch.arange(order.numel()) - (torch.cumsum(counts, 0) - counts)[col]  # place in the queue
        accepted = order[rank < free[col]]
        labels[todo[accepted]] = choice[accepted]
        free -= torch.bincount(choice[accepted], minlength=n_cols)
        still = torch.ones(todo.numel(), dtype=torch.bool)
        still[accepted] = False
        todo = todo[still]
    return labels


# ----------------------------------------------------------------------------------------------------------
# balanced spherical k-means


def balanced_kmeans(xn: Tensor, n_experts: int, iters: int = KMEANS_ITERS, generator=None) -> Tensor:
    """Labels [F] of a balanced spherical k-means of unit rows xn [F, D] into E clusters of F / E.

    Lloyd's algorithm with the assignment step replaced by balanced_assign on cosine similarity.
    Cost per step: one [F, D] x [D, E] matmul (14,336 x 4,096 x 448: ~0.3 s on 2 cores) plus the
    assignment. The objective, mean cosine of members to their centre's direction, equals the mean
    norm of the cluster means; we keep the best labelling seen, since greedy balanced assignment is not
    guaranteed to improve it monotonically.
    """
    n, d = xn.shape
    g = n // n_experts
    capacity = torch.full((n_experts,), g, dtype=torch.long)
    centres = _seed_centres(xn, n_experts, generator)  # [E, D]
    best, best_score, prev = None, -math.inf, None
    for _ in range(max(1, iters)):
        sims = xn @ F.normalize(centres, dim=-1).T  # [F, E] cosine to each centre
        labels = balanced_assign(sims, capacity)
        if prev is not None and torch.equal(labels, prev):
            break
        centres = torch.zeros(n_experts, d).index_add_(0, labels, xn) / g  # [E, D] cluster means
        score = float(centres.norm(dim=-1).mean())
        if score > best_score:
            best, best_score = labels, score
        prev = labels
    return best


def _seed_centres(xn: Tensor, n_experts: int, generator) -> Tensor:
    """k-means++ seeding: each next centre drawn with probability ∝ squared distance to the nearest one.

    Seeding is sequential (E steps over all F rows), so it runs on a Gaussian random projection of the
    rows to SEED_DIM dimensions: distances are preserved well enough to spread the seeds (the Lloyd steps
    use the full rows), and 448 steps over 14,336 x 64 take a fraction of a second instead of ~15 s.
    """
    n, d = xn.shape
    if d > SEED_DIM:
        proj = torch.randn(d, SEED_DIM, generator=generator) / math.sqrt(SEED_DIM)
        z = xn @ proj  # [F, SEED_DIM]
    else:
        z = xn
    idx = torch.empty(n_experts, dtype=torch.long)
    idx[0] = torch.randint(n, (1,), generator=generator)
    dist = (z - z[idx[0]]).pow(2).sum(-1)  # [F] squared distance to the nearest seed so far
    # Hundreds of tiny ops in sequence: one thread. With two, each op pays a thread barrier, and on a
    # busy machine that turned 1 s into 24 s (measured: 14,336 rows, 448 seeds, load average 8 on 2 cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for k in range(1, n_experts):
            total = dist.sum()
            if total <= 0:  # every remaining row coincides with a seed: any unused row will do
                unused = torch.ones(n, dtype=torch.bool)
                unused[idx[:k]] = False
                idx[k] = unused.nonzero()[0, 0]
            else:
                idx[k] = torch.multinomial(dist / total, 1, generator=generator)
            dist = torch.minimum(dist, (z - z[idx[k]]).pow(2).sum(-1))
    finally:
        torch.set_num_threads(threads)
    return xn[idx].clone()


# ----------------------------------------------------------------------------------------------------------
# co-activation graph partitioning


def coactivation_labels(
    activations: Tensor, n_experts: int, seed: int = 0, active_fraction: float = ACTIVE_FRACTION
) -> Tensor:
    """Labels [F]: METIS partition of the co-activation graph, rebalanced to exactly F / E per part.

    Which neurons are "active" on a token: for ReLU FFNs (activations >= 0, many exact zeros) simply
    h > 0, as MoEfication. SiLU·up or GELU intermediates are never exactly zero and h > 0 would mark half
    of all neurons active on every token (no signal), so for activations with negative values a neuron
    is active when its |h| is among the top `active_fraction` of that token's neurons — the ones whose
    contribution to the output matters.
    """
    import pymetis  # a core dependency, imported here so the other methods never need it

    a = activations.detach().float().cpu()
    if a.dim() != 2 or a.shape[0] < 1:
        raise ValueError(f"activations must be [N, F] with N >= 1 calibration tokens, got {tuple(a.shape)}")
    n_tok, n = a.shape
    if n % n_experts:
        raise ValueError(f"activations have {n} neurons, which E={n_experts} experts cannot share equally")
    if not 0 < active_fraction <= 1:
        raise ValueError(f"active_fraction must lie in (0, 1], got {active_fraction}")
    g = n // n_experts
    if (a < 0).any():
        k = max(1, math.ceil(active_fraction * n))
        thresh = a.abs().topk(k, dim=1).values[:, -1:]  # [N, 1]
        active = (a.abs() >= thresh) & (a != 0)
    else:
        active = a > 0
    active = active.float()  # [N, F]

    # Sparse graph: each neuron keeps its strongest partners (the dense [F, F] would be 0.8 GB at F=14,336).
    n_nb = min(n - 1, COACT_NEIGHBOURS * g)
    rows, cols, wts = [], [], []
    active_t = active.T.contiguous()  # [F, N]
    for s in range(0, n, 1024):
        block = active_t[s : s + 1024] @ active  # [b, F] co-activation counts
        block[torch.arange(block.shape[0]), torch.arange(s, s + block.shape[0])] = -1  # no self-loops
        top = block.topk(n_nb, dim=1)
        rows.append(torch.arange(s, s + block.shape[0]).repeat_interleave(n_nb))
        cols.append(top.indices.flatten())
        wts.append(top.values.flatten())
    r, c, w = torch.cat(rows), torch.cat(cols), torch.cat(wts)
    keep = w > 0  # METIS wants positive weights; never-co-active pairs are no edge at all
    r, c, w = r[keep], c[keep], w[keep]
    # symmetrise (METIS needs both directions) and drop duplicates; C is symmetric so weights agree
    key = torch.cat([r * n + c, c * n + r])
    key, first = _unique_first(key)
    w = torch.cat([w, w])[first]
    r, c = key // n, key % n
    # integer weights in 1..1000: counts up to N would overflow METIS's 32-bit cut sums on big graphs
    w_int = (w * (1000.0 / w.max())).ceil().clamp_min(1).long() if w.numel() else w.long()
    xadj = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(r, minlength=n).cumsum(0)])
    opts = pymetis.Options(seed=int(seed))
    graph = pymetis.CSRAdjacency(xadj.numpy(), c.numpy())
    _, parts = pymetis.part_graph(n_experts, graph, eweights=w_int.numpy(), options=opts)
    parts = torch.as_tensor(parts, dtype=torch.long)

    # affinity of each neuron to each part: total co-activation weight with that part's members
    aff = torch.zeros(n, n_experts).index_put_((r, parts[c]), w, accumulate=True)  # [F, E]
    return _rebalance(parts, aff, g)


def _unique_first(key: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted unique values of key and the index of one occurrence of each."""
    uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
    first = torch.full((uniq.numel(),), key.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(key.numel()), reduce="amin")
    return uniq, first


def _rebalance(parts: Tensor, aff: Tensor, g: int) -> Tensor:
    """Make every part exactly g: evict the lowest-affinity members of oversized parts, then place the
    evicted neurons in the parts with room, by affinity (balanced_assign)."""
    n, n_parts = aff.shape
    sizes = torch.bincount(parts, minlength=n_parts)
    own = aff[torch.arange(n), parts]  # [F] affinity to the part a neuron is in
    order = torch.argsort(own, stable=True)  # weakest members first ...
    order = order[torch.argsort(parts[order], stable=True)]  # ... within each part
    p_sorted = parts[order]
    rank = torch.arange(n) - (torch.cumsum(sizes, 0) - sizes)[p_sorted]
    evict = order[rank < (sizes - g).clamp_min(0)[p_sorted]]
    if evict.numel() == 0:
        return parts
    labels = parts.clone()
    room = g - torch.bincount(parts, minlength=n_parts) + torch.bincount(parts[evict], minlength=n_parts)
    labels[evict] = balanced_assign(aff[evict], room)
    return labels
