"""Router GEMV and expert selection in one launch: every expert resolved once per call.

Shapes: N = B*T rows (N <= 8 for decode), D hidden, E experts, S router split over D.

The programs of `_router_select_kernel` first compute fp32 partial logits `[S, N, E]` (a grid of E
blocks x S slices of D, no atomics on data). Each then takes a ticket from a device counter; the program
that draws the last ticket (every partial is written by then) sums the partials and makes the routing
decision for every token with one sort per token (Gu, Fu, Yuan 2026: a token keeps its most probable
experts until their cumulative mass reaches tau):

* exclusive mass (keep while the cumulative sum < tau, top-1 always): sort p descending, K = number of
  prefix sums below tau, v* = the K-th largest p; keep(e) <=> p_e >= v*, or p_e > v* when the (K+1)-th
  value ties with v* (then the tied group's mass crosses tau and the whole group is dropped);
* inclusive mass: the same with exclusive prefix sums and p_e >= v*;
* top-k: z_e >= the k-th largest logit;
* thresholds and dense: elementwise.

These equal `route.select_reference` (ties kept or dropped together). The program writes the per-token
mask, gates and logits [N, E], the union flag [E], and the *compacted* list of union experts (ids [E],
count [1]) that the gate/up and down kernels walk: no later program searches for its expert again.
It resets the ticket to 0, so the kernel is ready for the next call (and graph replays) without a
memset launch.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _router_partial(x_ptr, w_ptr, part_ptr, N, E, D, d_per_split,
                    BE: tl.constexpr, BN: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """part[s, n, e] = sum over d in slice s of x[n, d] * w[e, d] (fp32) for this program's BE experts and
    the BN (>= N, a power of two) rows: fp32 FMA, no tensor-core padding (N <= 8 rows).

    The weight tile of each K step is loaded one step ahead, so under a dependent launch (PDL) the first
    one is in flight before the program waits for the previous launch (which writes x)."""
    pid_e = tl.program_id(0)
    s = tl.program_id(1)
    e_offs = pid_e * BE + tl.arange(0, BE)  # [BE]
    n_offs = tl.arange(0, BN)  # [BN]
    em = e_offs < E
    k_lo = s * d_per_split
    k_hi = tl.minimum(k_lo + d_per_split, D)
    k_offs = k_lo + tl.arange(0, BLOCK_K)
    w = tl.load(w_ptr + e_offs[:, None] * D + k_offs[None, :], mask=em[:, None] & (k_offs < k_hi)[None, :],
                other=0.0)  # [BE, BLOCK_K], the first K step
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    acc = tl.zeros((BN, BE), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        k_offs = k + tl.arange(0, BLOCK_K)
        km = k_offs < k_hi
        xt = tl.load(x_ptr + n_offs[:, None] * D + k_offs[None, :], mask=(n_offs[:, None] < N) & km[None, :],
                     other=0.0).to(tl.float32)  # [BN, BLOCK_K]
        acc += tl.sum(w.to(tl.float32)[None, :, :] * xt[:, None, :], axis=2)  # [BN, BE]
        kn = k_offs + BLOCK_K  # the next step's weights (masked off past the slice: no traffic)
        w = tl.load(w_ptr + e_offs[:, None] * D + kn[None, :], mask=em[:, None] & (kn < k_hi)[None, :], other=0.0)
    out = part_ptr + s * N * E + n_offs[:, None] * E + e_offs[None, :]
    tl.store(out, acc, mask=(n_offs[:, None] < N) & em[None, :])


@triton.jit
def _kth(v, idx, k):
    """v[r, k[r]] of each row r of a 2-D tensor (0 when k[r] is out of range)."""
    return tl.sum(tl.where(idx[None, :] == k[:, None], v, 0.0), axis=1)


@triton.jit
def _keep_rows(z, em, idx, param, E, RULE: tl.constexpr):
    """Keep decisions [R, BLOCK_E] of R tokens at once from their logits z (-inf outside the E lanes)."""
    zmax = tl.max(z, axis=1)  # [R]
    ex = tl.exp(z - zmax[:, None])  # 0 on padded lanes
    p = ex / tl.sum(ex, axis=1)[:, None]
    valid = em[None, :] & (z == z)  # [R, BLOCK_E]
    top1 = (z >= zmax[:, None]) & valid
    lane = idx[None, :] + (p * 0.0).to(tl.int32)  # [R, BLOCK_E] lane index (p is finite everywhere)
    if RULE == 0 or RULE == 1:  # cumulative mass, exclusive (0) or inclusive (1) of the crossing expert
        ps = tl.sort(tl.where(valid, p, -1.0), dim=1, descending=True)  # padded lanes sort last
        cs = tl.cumsum(tl.maximum(ps, 0.0), axis=1)  # inclusive prefix mass
        if RULE == 0:
            inside = (cs < param) & (lane < E)
        else:
            inside = (cs - tl.maximum(ps, 0.0) < param) & (lane < E)
        K = tl.sum(inside.to(tl.int32), axis=1)  # [R] kept count before ties
        vstar = _kth(ps, idx, K - 1)
        if RULE == 0:
            vnext = _kth(ps, idx, K)
            keep = (p > vstar[:, None]) | ((p == vstar[:, None]) & ((p * 0.0 + vnext[:, None]) != vstar[:, None]))
        else:
            keep = p >= vstar[:, None]
        keep = (keep & ((lane * 0 + K[:, None]) > 0)) | top1
    elif RULE == 2:  # top-k on logits: #{j: z_j > z_e} < k  <=>  z_e >= k-th largest logit
        zs = tl.sort(z, dim=1, descending=True)
        kk = tl.minimum(tl.ceil(param), E * 1.0).to(tl.int32)
        zk = tl.sum(tl.where(lane == kk - 1, zs, 0.0), axis=1)  # [R]
        keep = (z >= zk[:, None]) & ((z * 0.0 + param) > 0.0)
    elif RULE == 3:  # dense
        keep = valid
    elif RULE == 4:  # sigmoid threshold
        keep = (tl.sigmoid(z) > param) | top1
    else:  # relative threshold (D2DMoE): p_e >= (1 - t) max p
        keep = (tl.exp(z - zmax[:, None]) >= 1.0 - param) | top1
    return keep & valid, p


@triton.jit
def _select_rows(part_ptr, param_ptr, mask_ptr, gate_ptr, logit_ptr, rows, N, E, S: tl.constexpr,
                 BLOCK_E: tl.constexpr, RULE: tl.constexpr, GATE: tl.constexpr, ROUND_TO: tl.constexpr):
    """Sum the partial logits of `rows` ([R] row indices), decide and write their mask / gates / logits;
    returns the keep decisions [R, BLOCK_E]."""
    idx = tl.arange(0, BLOCK_E)
    em = idx < E
    m2 = (rows[:, None] < N) & em[None, :]
    param = tl.load(param_ptr)
    z = tl.zeros((rows.shape[0], BLOCK_E), dtype=tl.float32)
    for s in tl.static_range(S):
        z += tl.load(part_ptr + s * N * E + rows[:, None] * E + idx[None, :], mask=m2, other=0.0,
                     cache_modifier=".cg")
    z = z.to(ROUND_TO).to(tl.float32)  # the torch router returns logits in the model dtype
    z = tl.where(m2, z, float("-inf"))
    zr = tl.where(rows[:, None] < N, z, tl.where(em[None, :], 0.0, float("-inf")))  # padded rows: finite
    keep, p = _keep_rows(zr, em, idx, param, E, RULE=RULE)
    keep = keep & m2
    if GATE == 0:
        g = tl.sigmoid(z)
    elif GATE == 1:
        g = p
    else:
        g = tl.full((rows.shape[0], BLOCK_E), 1.0, tl.float32)
    out = rows[:, None] * E + idx[None, :]
    tl.store(mask_ptr + out, keep.to(tl.int8), mask=m2)
    tl.store(gate_ptr + out, tl.where(keep, g, 0.0), mask=m2)
    tl.store(logit_ptr + out, z, mask=m2)
    return keep


@triton.jit
def _compact(keep, flag_ptr, ids_ptr, count_ptr, E, BLOCK_E: tl.constexpr):
    """Union over rows of keep [R, BLOCK_E] -> flags [E], the compacted list of kept experts and its count."""
    idx = tl.arange(0, BLOCK_E)
    em = idx < E
    union = tl.max(keep.to(tl.int32), axis=0)  # [BLOCK_E]
    tl.store(flag_ptr + idx, union, mask=em)
    rank = tl.cumsum(union, axis=0) - 1  # position of each union expert in the compacted list
    tl.store(ids_ptr + rank, idx, mask=em & (union != 0))
    tl.store(count_ptr, tl.sum(union, axis=0))


@triton.jit
def _router_select_kernel(x_ptr, w_ptr, part_ptr, ticket_ptr, param_ptr,
                          mask_ptr, gate_ptr, logit_ptr, flag_ptr, ids_ptr, count_ptr,
                          N, E, D, d_per_split,
                          S: tl.constexpr, BE: tl.constexpr, BN2: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, RULE: tl.constexpr, GATE: tl.constexpr,
                          ROUND_TO: tl.constexpr, ROW_PARALLEL: tl.constexpr, PDL: tl.constexpr):
    _router_partial(x_ptr, w_ptr, part_ptr, N, E, D, d_per_split, BE=BE, BN=BN2, BLOCK_K=BLOCK_K, PDL=PDL)
    # Last-arriving program(s): the barrier orders this program's stores before its release ticket (the
    # pattern of CUTLASS's split-K semaphores); the acquiring program reads the partials from L2 (.cg).
    tl.debug_barrier()
    n_prog = tl.num_programs(0) * tl.num_programs(1)
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    if ROW_PARALLEL:
        # The last N programs to arrive decide one row each (N sorts side by side, not one after another):
        # each waits until every program has arrived (at most N - 1 later tickets, all already running:
        # the whole grid is resident), then the last of them to finish forms the union.
        if ticket >= n_prog - N:
            seen = ticket + 1
            spins = seen * 0
            while (seen < n_prog) & (spins < 100000000):
                seen = tl.atomic_add(ticket_ptr, 0, sem="acquire", scope="gpu")
                spins += 1
            tl.debug_barrier()
            r = n_prog - 1 - ticket
            _select_rows(part_ptr, param_ptr, mask_ptr, gate_ptr, logit_ptr, r + tl.arange(0, 1), N, E, S=S,
                         BLOCK_E=BLOCK_E, RULE=RULE, GATE=GATE, ROUND_TO=ROUND_TO)
            tl.debug_barrier()
            done = tl.atomic_add(ticket_ptr + 1, 1, sem="acq_rel", scope="gpu")
            if done == N - 1:  # every row decided (and every program past its wait): reset, then the union
                tl.debug_barrier()
                tl.store(ticket_ptr, 0)
                tl.store(ticket_ptr + 1, 0)
                rows = tl.arange(0, BN2)
                idx = tl.arange(0, BLOCK_E)
                keep = tl.load(mask_ptr + rows[:, None] * E + idx[None, :],
                               mask=(rows[:, None] < N) & (idx[None, :] < E), other=0, cache_modifier=".cg")
                _compact(keep != 0, flag_ptr, ids_ptr, count_ptr, E, BLOCK_E=BLOCK_E)
    elif ticket == n_prog - 1:  # one program decides every row
        tl.debug_barrier()
        tl.store(ticket_ptr, 0)
        keep = _select_rows(part_ptr, param_ptr, mask_ptr, gate_ptr, logit_ptr, tl.arange(0, BN2), N, E, S=S,
                            BLOCK_E=BLOCK_E, RULE=RULE, GATE=GATE, ROUND_TO=ROUND_TO)
        _compact(keep, flag_ptr, ids_ptr, count_ptr, E, BLOCK_E=BLOCK_E)
