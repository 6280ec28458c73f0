"""Entropic optimal transport (log-domain Sinkhorn) and exact assignment, in plain PyTorch.

OpT-DeUS aligns the neurons / heads of two adjacent transformer blocks with an optimal-transport
plan before fusing them. This file holds everything that needs:

    sinkhorn(cost, a, b, epsilon=...)  -> SinkhornResult(plan, f, g, iterations, ...)
    hard_assignment(cost)              -> the exact minimum-cost permutation (epsilon -> 0)
    plan_to_permutation(plan)          -> a plan rounded to the permutation of largest mass
    normalize_plan(plan, b)            -> T diag(1/b), the OT-fusion alignment matrix
    plan_sharpness(plan, b)            -> mean row maximum of that matrix (1 = permutation)

The problem (Cuturi 2013; Peyre & Cuturi, "Computational Optimal Transport", ch. 4):

    min_P  <P, C> + eps * KL(P | a b^T)   over P >= 0 with P 1 = a, P^T 1 = b.

Its solution is P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps) for dual potentials f (n,), g (m,)
that Sinkhorn finds by alternately making the row and the column marginal exact:

    f_i = -eps * LSE_j( log b_j + (g_j - C_ij) / eps )        (rows sum to a)
    g_j = -eps * LSE_i( log a_i + (f_i - C_ij) / eps )        (columns sum to b)

We iterate in this log domain, never on the kernel exp(-C/eps): with real weights C/eps reaches
~280 and exp(-280) = 2e-122 underflows float32 (min normal 1.2e-38), which is what breaks the
textbook u / (K v) iteration at small eps. logsumexp subtracts the row maximum first, so every
exponent it evaluates is <= 0 and at least one term is exp(0) = 1: no overflow, no 0/0.

Precision. The solver computes in float32 (float64 when the cost is float64; half / bfloat16 costs
are upcast, unless cost_dtype=torch.bfloat16 asks to *store* the cost in bf16 to halve memory
traffic, still accumulating in fp32). The hot path is elementwise ops + logsumexp: no matmul, so a
caller's TF32 setting cannot change the numbers, and we never touch any global switch.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


class SinkhornWarning(RuntimeWarning):
    """Sinkhorn stopped before its marginals met the tolerance (or the iterates went non-finite)."""


class SinkhornError(RuntimeError):
    """The same condition as SinkhornWarning, raised instead when strict=True."""


@dataclass
class SinkhornResult:
    plan: Tensor  # (..., n, m) transport plan; columns sum to b, rows to a within marginal_error
    f: Tensor  # (..., n) dual potential of the rows, in cost units
    g: Tensor  # (..., m) dual potential of the columns, in cost units
    iterations: int  # full (row + column) updates done, epsilon-scaling stages included
    marginal_error: float  # max over batch, rows and columns of |P 1 - a|_1 / sum(a), on `plan`
    converged: bool  # every problem of the batch reached marginal_error <= tol, all finite
    epsilon: float  # the target regularisation the plan is for
    tol: float  # the tolerance used (the default depends on dtype, see _default_tol)
    dtype: torch.dtype  # precision the iterations were computed in


# ----------------------------------------------------------------------------------------------
# The two half-steps. Each reads the whole cost once: memory bound, so the "k iterations" block
# below is what torch.compile fuses (one pass over C per half-step instead of ~5 in eager).


def _lse_rows(z: Tensor) -> Tensor:
    # logsumexp over the last dim, in place on the temporary z (..., n, m) -> (..., n).
    # Like torch.logsumexp (shift by the row max, so exp never overflows), plus a floor on the
    # shifted exponents at log(smallest normal): terms below it weigh < m * 1e-38 against the
    # max term's 1, and without the floor exp returns subnormals, which x86 CPUs process ~100x
    # slower (a 30x slowdown of a whole solve at cost/eps ~ 300, measured).
    mx = z.amax(dim=-1, keepdim=True)  # (..., n, 1)
    floor = math.log(torch.finfo(z.dtype).tiny) + 1.0  # -86.3 in float32, -707.4 in float64
    s = z.sub_(mx).clamp_(min=floor).exp_().sum(dim=-1)
    return mx.squeeze(-1) + s.log()


def _row_update(g: Tensor, C: Tensor, log_b: Tensor, inv_eps: float) -> Tensor:
    # f_i = -eps * LSE_j(log b_j + (g_j - C_ij) / eps);  g, log_b: (..., m), C: (..., n, m) -> (..., n)
    h = (g * inv_eps + log_b).unsqueeze(-2)  # (..., 1, m)
    # h - C/eps in one kernel; a bf16 C is promoted to h's fp32 element by element, never stored.
    z = torch.sub(h, C, alpha=inv_eps)  # (..., n, m)
    return _lse_rows(z) * (-1.0 / inv_eps)


def _col_update(f: Tensor, C: Tensor, CT: Tensor | None, log_a: Tensor, inv_eps: float) -> Tensor:
    # g_j = -eps * LSE_i(log a_i + (f_i - C_ij) / eps) -> (..., m)
    if CT is not None:  # contiguous C^T: the reduction runs along memory, like the row pass
        return _row_update(f, CT, log_a, inv_eps)
    z = torch.sub((f * inv_eps + log_a).unsqueeze(-1), C, alpha=inv_eps)  # (..., n, m)
    return _lse_rows(z.transpose(-1, -2)) * (-1.0 / inv_eps)  # strided reduction over rows


def _iterate(f, C, CT, log_a, log_b, a, inv_eps: float, k: int):
    # k full iterations from f; returns the plan's potentials (f, g), the next row update f_next
    # (which starts the next block, so measuring the error costs nothing) and the error.
    f_next = f
    for _ in range(k):
        f = f_next
        g = _col_update(f, C, CT, log_a, inv_eps)
        f_next = _row_update(g, C, log_b, inv_eps)
    # After the column update the plan P(f, g) has exact column sums b. Its row sums are
    # a_i * exp((f_i - f_next_i) / eps) (f_next is exactly what would make them a_i), so the
    # L1 row error is sum_i a_i |expm1((f_i - f_next_i) / eps)| with no extra pass over C.
    err = (a * torch.expm1((f - f_next) * inv_eps).abs()).sum(-1)  # (...,)
    return f, g, f_next, err


_compiled_iterate = None  # built on first use of compile=True; nothing happens at import


def _get_compiled():
    global _compiled_iterate
    if _compiled_iterate is None:
        _compiled_iterate = torch.compile(_iterate, dynamic=False)
    return _compiled_iterate


# ----------------------------------------------------------------------------------------------
# Input checks


def _default_tol(dtype: torch.dtype, spread_over_eps: float) -> float:
    # Relative L1 marginal error |P 1 - a|_1 / sum(a) (and the same for columns). Two limits:
    # - the dtype: 1e-6 in float32 (~10 ulps of the total mass, above the rounding of an n-term
    #   sum) and 1e-10 in float64;
    # - the conditioning: the exponents (f_i + g_j - C_ij)/eps are O(spread/eps) with
    #   spread = max|C - centre|, so each plan entry carries a relative rounding error of
    #   ~u * spread/eps (u = unit roundoff) however long we iterate. Measured on random costs,
    #   the float32 plan's marginal error bottoms out at 0.3-0.7 u * spread/eps (n = 64..2048,
    #   spread/eps = 10..3000); 4 u * spread/eps leaves room over that floor. Real weights give
    #   cost/eps up to ~280, so spread/eps <= 280: at most 6.7e-5 in float32, 1.2e-13 in float64.
    u = torch.finfo(dtype).eps / 2
    base = 1e-6 if dtype == torch.float32 else 1e-10
    return max(base, 4.0 * u * spread_over_eps)


def _marginal(w: Tensor | None, size: int, batch: torch.Size, dtype, device, name: str) -> Tensor:
    if w is None:
        return torch.full((size,), 1.0 / size, dtype=dtype, device=device)
    if not isinstance(w, Tensor):
        w = torch.as_tensor(w)
    if w.dim() < 1 or w.shape[-1] != size:
        raise ValueError(f"sinkhorn: {name} has shape {tuple(w.shape)}, expected (..., {size})")
    try:
        if torch.broadcast_shapes(w.shape[:-1], batch) != batch:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(
            f"sinkhorn: {name} of shape {tuple(w.shape)} does not broadcast to the cost's batch "
            f"shape {tuple(batch)}"
        ) from None
    w = w.to(device=device, dtype=dtype)
    if not bool(torch.isfinite(w).all()) or not bool((w > 0).all()):
        raise ValueError(f"sinkhorn: {name} must be finite and strictly positive (drop empty bins)")
    return w


# ----------------------------------------------------------------------------------------------
# Sinkhorn


def sinkhorn(
    cost: Tensor,
    a: Tensor | None = None,
    b: Tensor | None = None,
    *,
    epsilon: float,
    tol: float | None = None,
    max_iter: int = 1000,
    check_every: int | None = None,
    eps_scaling: float | None = 0.5,
    strict: bool = False,
    warn: bool = True,
    cost_dtype: torch.dtype | None = None,
    transpose_copy: bool = True,
    compile: bool = False,
) -> SinkhornResult:
    # cost: (..., n, m); a: (..., n) or (n,) [default uniform 1/n]; b: (..., m) or (m,) [1/m].
    # tol: relative L1 marginal error (None: _default_tol). The loop stops when the row error of
    # the potentials is <= tol/2 (columns are exact after each column update); converged means
    # the returned plan, measured, has max(row, column) error <= tol.
    # max_iter: full iterations, epsilon-scaling stages included. check_every: iterations between
    # convergence checks, each a host sync on GPU (None: 1 on CPU, 10 elsewhere).
    # eps_scaling: ratio of the geometric epsilon schedule (None or 1: off).
    # strict: raise SinkhornError instead of warning; warn=False silences the SinkhornWarning.
    # cost_dtype: store the (centred) cost in this dtype, e.g. torch.bfloat16 to halve the bytes
    # read per iteration; arithmetic stays in the compute dtype. transpose_copy: keep a contiguous
    # C^T for the column pass (2x memory, faster). compile: torch.compile the iteration block.
    # Not differentiable: the cost is detached.
    if not isinstance(cost, Tensor):
        raise TypeError(f"sinkhorn: cost must be a torch.Tensor, got {type(cost).__name__}")
    cost = cost.detach()
    if cost.dim() < 2 or cost.shape[-1] == 0 or cost.shape[-2] == 0:
        raise ValueError(f"sinkhorn: cost must have shape (..., n, m), n, m >= 1; got {tuple(cost.shape)}")
    if cost.is_complex():
        raise ValueError("sinkhorn: cost must be real")
    if isinstance(epsilon, Tensor):
        epsilon = float(epsilon)
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"sinkhorn: epsilon must be a finite number > 0, got {epsilon!r}")
    if tol is not None and not (tol > 0):
        raise ValueError(f"sinkhorn: tol must be > 0, got {tol!r}")
    if max_iter < 1:
        raise ValueError(f"sinkhorn: max_iter must be >= 1, got {max_iter}")
    if check_every is None:
        check_every = 1 if cost.device.type == "cpu" else 10
    if check_every < 1:
        raise ValueError(f"sinkhorn: check_every must be >= 1, got {check_every}")
    if eps_scaling is not None and not (0 < eps_scaling <= 1):
        raise ValueError(f"sinkhorn: eps_scaling must be in (0, 1] or None, got {eps_scaling!r}")

    dtype = torch.float64 if cost.dtype == torch.float64 else torch.float32  # compute precision
    store = dtype if cost_dtype is None else cost_dtype
    if store not in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"sinkhorn: cost_dtype must be a float dtype, got {cost_dtype}")
    if store.itemsize > dtype.itemsize:
        raise ValueError(f"sinkhorn: cost_dtype {store} is wider than the compute dtype {dtype}")

    *batch, n, m = cost.shape
    batch = torch.Size(batch)
    device = cost.device

    # One pass for the range: it detects NaN / inf too (amax and amin propagate NaN).
    hi = cost.amax(dim=(-2, -1)).to(dtype)  # (...,)
    lo = cost.amin(dim=(-2, -1)).to(dtype)
    if not bool(torch.isfinite(hi).all() & torch.isfinite(lo).all()):
        raise ValueError("sinkhorn: cost contains NaN or inf")

    a = _marginal(a, n, batch, dtype, device, "a")
    b = _marginal(b, m, batch, dtype, device, "b")
    mass_a, mass_b = a.sum(-1), b.sum(-1)
    # Balanced OT needs equal masses. Float rounding of user-normalised marginals is forgiven
    # (1e-5 relative; enough for float32 sums of ~1e5 terms). We solve for unit mass, scaling a
    # and b separately (so a tiny gap cannot stall the iteration above tol) and scale the plan
    # back at the end: with mass M the potentials would carry -eps log M, and every unit of
    # |exponent| costs float32 another 6e-8 of relative rounding in the plan.
    gap = ((mass_a - mass_b).abs() / torch.maximum(mass_a, mass_b)).max()
    if float(gap) > 1e-5:
        raise ValueError(f"sinkhorn: a and b must have equal total mass (relative gap {float(gap):.2e})")
    mass = mass_a.expand(batch)  # (...,)
    a = (a / mass_a.unsqueeze(-1)).expand(*batch, n)  # (..., n), sums to 1
    b = (b / mass_b.unsqueeze(-1)).expand(*batch, m)  # (..., m), sums to 1
    log_a, log_b = a.log(), b.log()

    # The plan does not change when a constant is subtracted from C (it moves into f). Centering
    # each problem's cost on its mid-range halves the largest |C|, and with it the size of the
    # potentials and the rounding error of the exponents (see _default_tol); it is also the copy
    # we would make anyway to upcast / downcast. C: (..., n, m) in the storage dtype.
    centre = (hi + lo) / 2  # (...,)
    C = (cost.to(dtype) - centre[..., None, None]).to(store).contiguous()
    CT = C.transpose(-1, -2).contiguous() if transpose_copy else None  # (..., m, n)
    spread = float((hi - lo).max()) / 2  # max |C| over the batch
    if tol is None:
        tol = _default_tol(dtype, spread / epsilon)

    # Epsilon scaling (Kosowsky & Yuille 1994; Schmitzer 2019, sec. 3.2; geomloss): solve at a
    # large eps, where the plan is near a b^T and Sinkhorn contracts fast, then shrink eps
    # geometrically, warm-starting (f, g) from the previous stage (potentials are in cost units,
    # so they carry over). One iteration per stage is enough to track the moving solution; the
    # remaining iterations run at the target eps until converged.
    schedule = []
    if eps_scaling is not None and eps_scaling < 1:
        e = 2 * spread  # the cost's range: at this eps the plan is already close to a b^T
        while e > epsilon:
            schedule.append(e)
            e *= eps_scaling
        schedule = schedule[len(schedule) - min(len(schedule), max_iter - 1):]  # keep 1 iter at eps

    inv0 = 1.0 / (schedule[0] if schedule else epsilon)
    f = _row_update(torch.zeros(*batch, m, dtype=dtype, device=device), C, log_b, inv0)
    for e in schedule:
        g = _col_update(f, C, CT, log_a, 1.0 / e)
        f = _row_update(g, C, log_b, 1.0 / e)
    it = len(schedule)

    step = _get_compiled() if compile else _iterate
    inv_eps = 1.0 / epsilon
    while True:
        k = min(check_every, max_iter - it) if it < max_iter else 1
        fn = step if k == check_every else _iterate  # a short tail would make compile recompile
        f_plan, g, f, err = fn(f, C, CT, log_a, log_b, a, inv_eps, k)
        it += k
        # max() propagates NaN, so one host sync per check covers divergence too.
        estimate = float(err.max()) if err.numel() else 0.0
        finite = math.isfinite(estimate)
        # Stop at tol/2: the plan built below adds its own rounding (measured there) on top of
        # this estimate, which would otherwise fail tol by a hair when the estimate just made it.
        if not finite or estimate <= tol / 2 or it >= max_iter:
            break

    # P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps), with the C we iterated on (centred, stored).
    # a_i b_j multiplies outside the exp: inside, log a_i + log b_j ~ -2 log n (-19 at n = 14336)
    # would put a relative rounding error of u * 19 ~ 1e-6 on every entry; the exponent left,
    # (f_i + g_j - C_ij)/eps, is only O(spread/eps).
    z = (f_plan * inv_eps).unsqueeze(-1) + (g * inv_eps).unsqueeze(-2)  # (..., n, m)
    plan = z.sub_(C, alpha=inv_eps).exp_().mul_(a.unsqueeze(-1)).mul_(b.unsqueeze(-2))
    worst, converged = float("nan"), False
    if finite:
        # The in-loop error is exact arithmetic on the potentials; the plan we hand out also has
        # the rounding of its own exponents (see _default_tol), which the potentials cannot see:
        # once f stops moving in float32 the in-loop error reads 0. So the reported error is
        # measured on the plan itself, rows and columns, summed in float64 where the device has
        # it (one read of the plan).
        acc = torch.float32 if device.type == "mps" else torch.float64
        row = (plan.sum(-1, dtype=acc) - a).abs().sum(-1)  # (...,)
        col = (plan.sum(-2, dtype=acc) - b).abs().sum(-1)
        measured = float(torch.maximum(row, col).max()) if row.numel() else 0.0
        finite = math.isfinite(measured)
        worst = measured if finite else float("nan")
        converged = finite and measured <= tol  # False also when tol is below the dtype's floor

    plan = plan.mul_(mass[..., None, None])  # back to the caller's mass

    # (f + c, g - c) gives the same plan; fix the gauge so <a, f> = <b, g> (half the dual value
    # each), which makes the potentials independent of the schedule, centring and batching.
    # Undo the centring and the unit mass: a_i b_j exp((f_i + g_j - C_ij)/eps) must be the plan
    # for the caller's cost and marginals, i.e. f + g = f~ + g~ + centre - eps log M.
    f_out = f_plan + (centre - epsilon * mass.log())[..., None]
    shift = ((a * f_out).sum(-1) - (b * g).sum(-1)) / 2  # (...,), a and b have unit mass here
    result = SinkhornResult(
        plan=plan,
        f=f_out - shift[..., None],
        g=g + shift[..., None],
        iterations=it,
        marginal_error=worst,
        converged=converged,
        epsilon=float(epsilon),
        tol=float(tol),
        dtype=dtype,
    )
    if not converged:
        why = "non-finite iterates" if not finite else f"marginal error {worst:.3e} > tol {tol:.1e}"
        floor = 0.7 * torch.finfo(dtype).eps / 2 * spread / epsilon  # see _default_tol
        hint = (
            f"tol is below the {dtype} rounding floor ~{floor:.1e} at this epsilon: raise tol or "
            "pass a float64 cost"
            if finite and tol < floor
            else "raise max_iter or epsilon"
        )
        msg = (
            f"sinkhorn did not converge: {why} after {it} iterations (epsilon={epsilon:g}, "
            f"max|C - centre|/epsilon={spread / epsilon:.3g}, {dtype}); {hint}"
        )
        if strict:
            raise SinkhornError(msg)
        if warn:
            warnings.warn(msg, SinkhornWarning, stacklevel=2)
    return result


# ----------------------------------------------------------------------------------------------
# Exact assignment (the epsilon -> 0 limit)


def _assign(c: np.ndarray) -> np.ndarray:
    # Minimum-cost assignment of the n rows of c (n, m), n <= m, to distinct columns, by successive
    # shortest augmenting paths with dual potentials (Kuhn-Munkres as reformulated by
    # Jonker & Volgenant 1987; Burkard, Dell'Amico & Martello, "Assignment Problems", sec. 4.4).
    # Rows are added one at a time; for each, a Dijkstra search over reduced costs
    # c_ij - u_i - v_j >= 0 finds the cheapest way to re-route existing matches and free one
    # column. The duals keep reduced costs non-negative and are 0 on matched edges, which is the
    # LP optimality certificate, so the result is exact (up to float ties). O(n^2 m) time; the
    # inner loop is vectorised over columns.
    n, m = c.shape
    cc = np.zeros((n + 1, m + 1))  # 1-based rows / columns; column 0 is a virtual start column
    cc[1:, 1:] = c
    u = np.zeros(n + 1)  # row duals
    v = np.zeros(m + 1)  # column duals
    row_of = np.zeros(m + 1, dtype=np.int64)  # row_of[j]: row matched to column j (0 = free)
    prev = np.zeros(m + 1, dtype=np.int64)  # previous column on the shortest-path tree
    for i in range(1, n + 1):
        row_of[0] = i  # the new row hangs off the virtual column 0
        j0 = 0
        dist = np.full(m + 1, np.inf)  # tentative path lengths to each column
        done = np.zeros(m + 1, dtype=bool)  # columns whose distance is final
        while True:
            done[j0] = True
            i0 = row_of[j0]
            reduced = cc[i0] - u[i0] - v  # (m+1,) reduced costs of the edges out of row i0
            closer = ~done & (reduced < dist)
            dist[closer] = reduced[closer]
            prev[closer] = j0
            open_dist = np.where(done, np.inf, dist)
            j1 = int(np.argmin(open_dist))
            delta = open_dist[j1]
            # Shift the duals by the distance settled so far: keeps reduced costs >= 0 and makes
            # the tree edges tight, so dist stays relative to the current frontier.
            u[row_of[done]] += delta
            v[done] -= delta
            dist[~done] -= delta
            j0 = j1
            if row_of[j0] == 0:  # reached a free column: augment
                break
        while j0:  # flip the path back to the virtual column
            j1 = prev[j0]
            row_of[j0] = row_of[j1]
            j0 = j1
    perm = np.empty(n, dtype=np.int64)
    cols = np.nonzero(row_of[1:])[0]
    perm[row_of[1:][cols] - 1] = cols
    return perm


def hard_assignment(cost: Tensor) -> Tensor:
    # cost (..., n, m), n <= m -> (..., n) long: perm minimising sum_i cost[i, perm[i]], perm
    # injective (a permutation when n == m). Exact, solved on the CPU in float64 (host sync).
    if not isinstance(cost, Tensor):
        cost = torch.as_tensor(cost)
    if cost.dim() < 2 or cost.shape[-2] > cost.shape[-1]:
        raise ValueError(f"hard_assignment: cost must be (..., n, m) with n <= m, got {tuple(cost.shape)}")
    c = cost.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(c).all():
        raise ValueError("hard_assignment: cost contains NaN or inf")
    *batch, n, m = c.shape
    flat = c.reshape(math.prod(batch), n, m)
    out = np.stack([_assign(x) for x in flat]) if n and len(flat) else np.zeros((len(flat), n), np.int64)
    return torch.from_numpy(out.reshape(*batch, n)).to(cost.device)


def plan_to_permutation(plan: Tensor) -> Tensor:
    # plan (..., n, m), n <= m -> (..., n) long: the assignment carrying the most plan mass,
    # argmax_perm sum_i plan[i, perm[i]]. For a plan near a permutation this is that permutation.
    return hard_assignment(-plan)


# ----------------------------------------------------------------------------------------------
# Using a plan to align weights (OT fusion, Singh & Jaggi 2020)


def normalize_plan(plan: Tensor, b: Tensor | None = None) -> Tensor:
    # T diag(1/b): (..., n, m), each column summing to 1 (b = the plan's column marginal; None:
    # uniform 1/m, making it m*T). With uniform marginals and n == m it is doubly stochastic, so
    # aligning a weight with it (normalize_plan(T) @ W, W: (m, d)) takes convex combinations of
    # rows of W and keeps their scale, where T itself would shrink them by 1/m. A permutation plan
    # (entries 1/m) maps to exactly the 0/1 permutation matrix.
    if b is None:
        return plan * plan.shape[-1]
    return plan / b.to(plan.dtype).unsqueeze(-2)


def plan_sharpness(plan: Tensor, b: Tensor | None = None) -> Tensor:
    # (...,): mean over rows of the row maximum of normalize_plan(plan, b); 1 for a permutation
    # plan, 1/n for the uniform plan a b^T (square, uniform marginals). How "hard" the matching is.
    return normalize_plan(plan, b).amax(dim=-1).mean(dim=-1)
