"""Entropic optimal transport (log-domain Sinkhorn) and exact assignment, in plain PyTorch.

OpT-DeUS aligns the neurons / heads of two adjacent transformer blocks with an optimal-transport
plan before fusing them. This file holds everything that needs:

    sinkhorn(cost, a, b, epsilon=...)  -> SinkhornResult(plan, f, g, iterations, ...)
    hard_assignment(cost)              -> the exact minimum-cost permutation (epsilon -> 0)
    plan_to_permutation(plan)          -> a plan rounded to the permutation of largest mass
    normalize_plan(plan, b)            -> T diag(1/b), the OT-fusion alignment matrix
    plan_sharpness(plan, b)            -> mean row maximum of that matrix (1 = permutation)

The problem (Cuturi 2013; Peyre & Cuturi, "Computational Optimal Transport", ch. 4):

    min_P  <P, C> + eps * KL(P | a b^T)   over P >= 0 with P 1 = a, P^T 1 = b.            (1)

Its solution is P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps) for dual potentials f (n,), g (m,)
that Sinkhorn finds by alternately making the column and the row marginal exact:

    g_j <- -eps * LSE_i( log a_i + (f_i - C_ij) / eps )        (columns sum to b)       (2a)
    f_i <- -eps * LSE_j( log b_j + (g_j - C_ij) / eps )        (rows sum to a)          (2b)

in the log domain, never on the kernel exp(-C/eps), which underflows float32 at the cost/eps ~ 200
of real weights. On such costs plain Sinkhorn contracts slowly (error ~ 1/k for thousands of
iterations, docs/BENCHMARKS_SINKHORN.md), so each update is over-relaxed (Thibault, Chizat, Dossal &
Papadakis 2021; Lehmann, von Renesse, Sambale & Uschmajew 2021):

    g <- (1 - w) g + w * (2a),   f <- (1 - w) f + w * (2b),   1 <= w < 2               (3)

with w = 1 (plain Sinkhorn) until the observed contraction rate r of the error says how slow the
plain iteration is, then w = 2 / (1 + sqrt(1 - theta)), the optimum of the linearised iteration,
theta being the plain rate recovered from r by Young's SOR relation (r + w - 1)^2 = theta w^2 r.

Precision: float32 (float64 for a float64 cost; half / bfloat16 costs are upcast). Plan entries
carry a relative rounding error ~ u * max|C - centre| / eps (u = unit roundoff) however long we
iterate, so float32 cannot reach every tolerance; the result says so (converged=False, with the
floor) rather than loosening the tolerance. No matmul on the hot path and no global switch touched.
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
    iterations: int  # full (column + row) updates done, epsilon-scaling stages included
    marginal_error: float  # max over batch, rows and columns of |P 1 - a|_1 / sum(a), on `plan`
    converged: bool  # every problem of the batch reached marginal_error <= tol, all finite
    epsilon: float  # the target regularisation the plan is for
    tol: float  # the tolerance used (the default depends on dtype, see _default_tol)
    dtype: torch.dtype  # precision the iterations were computed in


OMEGA_MAX = 1.95  # (3) converges locally for w < 2 (Lehmann et al.); the cap keeps a margin below it


def _lse_rows(z: Tensor) -> Tensor:
    # logsumexp over the last dim, in place on the temporary z (..., n, m) -> (..., n). The shifted
    # exponents are floored at log(smallest normal): terms below it weigh < m * 1e-38 against the
    # max term's 1, and without the floor exp returns subnormals, which x86 CPUs process ~100x slower.
    mx = z.amax(dim=-1, keepdim=True)  # (..., n, 1)
    floor = math.log(torch.finfo(z.dtype).tiny) + 1.0  # -86.3 in float32, -707.4 in float64
    return mx.squeeze(-1) + z.sub_(mx).clamp_(min=floor).exp_().sum(dim=-1).log()


def _row_update(g: Tensor, C: Tensor, log_b: Tensor, inv_eps: float) -> Tensor:
    # (2b): g, log_b (..., m), C (..., n, m) -> f (..., n). With C^T and (f, log_a) it is (2a): the
    # column pass reads the contiguous transpose, so both reductions run along memory.
    z = torch.sub((g * inv_eps + log_b).unsqueeze(-2), C, alpha=inv_eps)  # (..., n, m)
    return _lse_rows(z) * (-1.0 / inv_eps)


def _iterate(f, C, CT, log_a, log_b, a, inv_eps: float, k: int, g=None, omega=1.0):
    # k iterations from (f, g): k - 1 over-relaxed ones (3), then a plain one, so that the returned
    # (f, g) is the plan we would hand out (columns exact after (2a)). Its row sums are
    # a_i exp((f_i - f_next_i) / eps) with f_next the next (2b), which starts the next block: the
    # L1 row error costs no extra pass over C.
    for _ in range(k - 1):
        g_new = _row_update(f, CT, log_a, inv_eps)
        g = g_new if g is None else torch.lerp(g, g_new, omega)
        f = torch.lerp(f, _row_update(g, C, log_b, inv_eps), omega)
    g = _row_update(f, CT, log_a, inv_eps)
    f_next = _row_update(g, C, log_b, inv_eps)
    err = (a * torch.expm1((f - f_next) * inv_eps).abs()).sum(-1)  # (...,)
    return f, g, f_next, err


_compiled_iterate = None  # built on first use of compile=True; nothing happens at import


def _get_compiled():
    global _compiled_iterate
    if _compiled_iterate is None:
        _compiled_iterate = torch.compile(_iterate, dynamic=False)
    return _compiled_iterate


def _rounding_floor(dtype: torch.dtype, spread_over_eps: float) -> float:
    # The marginal error a plan can reach in `dtype`: its exponents (f_i + g_j - C_ij)/eps are sums
    # of terms ~ spread/eps, each rounded to u relative. Measured on SmolLM2 costs and random ones,
    # the error stops falling at 0.3-0.7 u * spread/eps (docs/BENCHMARKS_SINKHORN.md).
    return 0.5 * torch.finfo(dtype).eps / 2 * spread_over_eps


def _default_tol(dtype: torch.dtype, spread_over_eps: float) -> float:
    # Relative L1 marginal error. 1e-6 (float32) / 1e-10 (float64), raised to 4x the rounding floor
    # when the conditioning puts that out of reach, but never above 1e-4: past that a plan is not
    # a transport plan one should use, and the result says converged=False (use float64) instead.
    base = 1e-6 if dtype == torch.float32 else 1e-10
    return max(base, min(1e-4, 4 * _rounding_floor(dtype, spread_over_eps)))


def _marginal(w: Tensor | None, size: int, batch: torch.Size, dtype, device, name: str) -> Tensor:
    if w is None:
        return torch.full((size,), 1.0 / size, dtype=dtype, device=device)
    w = torch.as_tensor(w)
    if w.dim() < 1 or w.shape[-1] != size:
        raise ValueError(f"sinkhorn: {name} has shape {tuple(w.shape)}, expected (..., {size})")
    try:
        if torch.broadcast_shapes(w.shape[:-1], batch) != batch:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"sinkhorn: {name} of shape {tuple(w.shape)} does not broadcast to the cost's batch "
                         f"shape {tuple(batch)}") from None
    w = w.to(device=device, dtype=dtype)
    if not bool(torch.isfinite(w).all()) or not bool((w > 0).all()):
        raise ValueError(f"sinkhorn: {name} must be finite and strictly positive (drop empty bins)")
    return w


def _check_args(cost, epsilon, tol, max_iter, check_every, eps_scaling):
    if not isinstance(cost, Tensor):
        raise TypeError(f"sinkhorn: cost must be a torch.Tensor, got {type(cost).__name__}")
    if cost.dim() < 2 or cost.numel() == 0 or cost.is_complex():
        raise ValueError(f"sinkhorn: cost must be a real (..., n, m) tensor with n, m >= 1 and a non-empty "
                         f"batch, got shape {tuple(cost.shape)} {cost.dtype}")
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"sinkhorn: epsilon must be a finite number > 0, got {epsilon!r}")
    if tol is not None and not (tol > 0):
        raise ValueError(f"sinkhorn: tol must be > 0, got {tol!r}")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"sinkhorn: max_iter must be an integer >= 1 (e.g. 1000), got {max_iter!r}")
    if check_every is not None and check_every < 1:
        raise ValueError(f"sinkhorn: check_every must be >= 1, got {check_every}")
    if eps_scaling is not None and not (0 < eps_scaling <= 1):
        raise ValueError(f"sinkhorn: eps_scaling must be in (0, 1] or None, got {eps_scaling!r}")


def _prepare(cost: Tensor, a, b, epsilon: float):
    # -> centred cost C (..., n, m) and its contiguous transpose CT in the compute dtype (float64 for
    # a float64 cost, else float32), unit-mass marginals a (..., n), b (..., m), their masses and
    # the centres (...,), and spread = max |C| over the batch.
    dtype = torch.float64 if cost.dtype == torch.float64 else torch.float32
    *batch, n, m = cost.shape
    batch, device = torch.Size(batch), cost.device
    hi = cost.amax(dim=(-2, -1)).to(dtype)  # (...,); amax / amin propagate NaN
    lo = cost.amin(dim=(-2, -1)).to(dtype)
    if not bool(torch.isfinite(hi).all() & torch.isfinite(lo).all()):
        raise ValueError("sinkhorn: cost contains NaN or inf")
    spread, u = float((hi - lo).max()) / 2, torch.finfo(dtype).eps / 2
    if spread / epsilon * u >= 1:  # the exponents (..)/eps would lose every digit, then overflow
        raise ValueError(f"sinkhorn: epsilon={epsilon:g} is too small for this cost in {str(dtype)[6:]}: "
                         f"max|C - centre|/epsilon = {spread / epsilon:.3g} is beyond its precision; use "
                         f"epsilon >= {spread * u:.3g}" + (" or pass a float64 cost" if u > 1e-10 else ""))
    a = _marginal(a, n, batch, dtype, device, "a")
    b = _marginal(b, m, batch, dtype, device, "b")
    # Balanced OT needs equal masses (rounding of user-normalised marginals forgiven). We solve
    # for unit mass and scale the plan back: mass M would put -eps log M into the potentials.
    mass_a, mass_b = a.sum(-1), b.sum(-1)
    gap = float(((mass_a - mass_b).abs() / torch.maximum(mass_a, mass_b)).max())
    if gap > 1e-5:
        raise ValueError(f"sinkhorn: a and b must have equal total mass (relative gap {gap:.2e})")
    a = (a / mass_a.unsqueeze(-1)).expand(*batch, n)
    b = (b / mass_b.unsqueeze(-1)).expand(*batch, m)
    # The plan does not change when a constant is subtracted from C (it moves into f); centring on
    # the mid-range halves the largest |C| and with it the exponents' rounding.
    centre = (hi + lo) / 2
    C = (cost.to(dtype) - centre[..., None, None]).contiguous()
    return C, C.transpose(-1, -2).contiguous(), a, b, mass_a.expand(batch), centre, spread


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
    check_every: int = 10,
    eps_scaling: float | None = 0.5,
    strict: bool = False,
    warn: bool = True,
    compile: bool = False,
) -> SinkhornResult:
    # cost: (..., n, m); a: (..., n) or (n,) [default uniform 1/n]; b: (..., m) or (m,) [1/m].
    # tol: relative L1 marginal error the returned plan must meet (None: _default_tol).
    # max_iter: full iterations, epsilon-scaling stages included. check_every: the most iterations
    # between error checks (each a host sync on GPU). eps_scaling: ratio of the epsilon schedule
    # (None or 1: off). strict: raise SinkhornError instead of warning; warn=False: neither.
    # compile: torch.compile the iteration block. Not differentiable: the cost is detached.
    epsilon = float(epsilon) if isinstance(epsilon, Tensor) else epsilon
    _check_args(cost, epsilon, tol, max_iter, check_every, eps_scaling)
    C, CT, a, b, mass, centre, spread = _prepare(cost.detach(), a, b, epsilon)
    dtype, device, batch, m = C.dtype, C.device, C.shape[:-2], C.shape[-1]
    log_a, log_b = a.log(), b.log()
    tol = _default_tol(dtype, spread / epsilon) if tol is None else tol

    # Epsilon scaling (Kosowsky & Yuille 1994; Schmitzer 2019, sec. 3.2): one iteration of (2) per
    # stage along eps = 2 spread, 2 spread r, ... > epsilon, warm-starting (f, g) (cost units, so they
    # carry over). More iterations per stage do not pay: the last jump to epsilon costs the same.
    schedule = []
    if eps_scaling is not None and eps_scaling < 1:
        e = 2 * spread  # the cost's range: at this eps the plan is already close to a b^T
        while e > epsilon:
            schedule.append(e)
            e *= eps_scaling
        schedule = schedule[len(schedule) - min(len(schedule), max_iter - 1):]  # keep 1 iteration at epsilon
    f = _row_update(torch.zeros(*batch, m, dtype=dtype, device=device), C, log_b, 1 / (schedule or [epsilon])[0])
    for e in schedule:
        f = _row_update(_row_update(f, CT, log_a, 1 / e), C, log_b, 1 / e)
    it, g, inv_eps, omega = len(schedule), None, 1.0 / epsilon, 1.0
    step = _get_compiled() if compile else _iterate
    best, best_it, previous, stalled, measured = math.inf, it, None, False, None
    omega_max = OMEGA_MAX
    while True:
        # Blocks of 1, 1, 2, 4, ... check_every iterations: an easy problem stops after one or two.
        k = min(check_every, max(1, it - len(schedule)), max_iter - it)
        weight = torch.tensor(omega, dtype=C.dtype, device=device) if compile else omega
        f_plan, g, f, err = (step if k == check_every else _iterate)(f, C, CT, log_a, log_b, a, inv_eps, k, g, weight)
        it += k
        estimate = float(err.max())  # NaN propagates: one host sync covers divergence too
        if not math.isfinite(estimate) or it >= max_iter:
            break
        # The estimate has a rounding floor of its own (~u |f| / eps, above the plan's): once it has
        # stalled (omega_max lowered below), or when it says done, measure the plan itself (one pass).
        if estimate <= tol or omega_max < OMEGA_MAX:
            measured = _plan_and_error(f_plan, g, C, a, b, inv_eps, dtype)
            if measured[1] <= tol:
                break
            estimate, measured = measured[1], None
        if previous is not None and previous > 0:  # choose w for (3) from the observed rate
            rate = (estimate / previous) ** (1 / k)
            theta = min(1.0, (rate + omega - 1) ** 2 / (rate * omega**2))  # Young: rate of plain Sinkhorn
            omega = 1 + (omega - 1) / 2 if rate >= 1 else min(omega_max, 2 / (1 + math.sqrt(1 - theta)))
        previous = estimate
        if estimate < 0.9 * best:
            best, best_it = estimate, it
        elif it - best_it > max(100, it // 4):  # no 10 % gain in a quarter of the run: a rounding floor
            if omega_max > 1:  # where w amplifies the noise (~1/(2-w)): halve w - 1, down to plain Sinkhorn
                omega_max = omega = 1 + (omega_max - 1) / 2 if omega_max > 1.1 else 1.0
            elif C.dtype == torch.float32 and device.type != "mps" and tol > 2e-7:
                # float32 cannot get there: finish in float64 from where it got (2x the cost per iteration).
                # The plan is still returned in float32, whose own rounding (u = 6e-8) sets the 2e-7.
                C, CT, a, b, log_a, log_b, f, g = (x.double() for x in (C, CT, a, b, log_a, log_b, f, g))
                omega_max, omega, previous = OMEGA_MAX, 1.0, None
            else:
                stalled = True
                break
            best, best_it = math.inf, it
    plan, worst = measured or _plan_and_error(f_plan, g, C, a, b, inv_eps, dtype)
    converged = math.isfinite(worst) and worst <= tol
    plan = plan.mul_(mass[..., None, None])  # back to the caller's mass

    # (f + c, g - c) gives the same plan; fix the gauge so <a, f> = <b, g>. Undo the centring and
    # the unit mass: f + g = f~ + g~ + centre - eps log M.
    f_out = f_plan + (centre - epsilon * mass.log())[..., None]
    shift = ((a * f_out).sum(-1) - (b * g).sum(-1)) / 2  # (...,)
    result = SinkhornResult(plan, (f_out - shift[..., None]).to(dtype), (g + shift[..., None]).to(dtype), it, worst,
                            converged, float(epsilon), float(tol), C.dtype)
    if not converged:
        msg = _failure_message(worst, tol, it, epsilon, spread, dtype, stalled, C.dtype != dtype)
        if strict:
            raise SinkhornError(msg)
        if warn:
            warnings.warn(msg, SinkhornWarning, stacklevel=2)
    return result


def _failure_message(worst, tol, it, epsilon, spread, dtype, stalled, upcast) -> str:
    why = f"marginal error {worst:.3e} > tol {tol:.1e}" if math.isfinite(worst) else "non-finite iterates"
    floor = _rounding_floor(dtype, spread / epsilon)
    if upcast:
        hint = f"float32 cannot get there (rounding floor ~{floor:.1e}); the float64 finish fell short: raise max_iter"
    elif dtype == torch.float32 and (stalled or tol < 2 * floor):
        hint = f"float32 cannot get there (its rounding floor here is ~{floor:.1e}): pass a float64 cost"
    else:
        hint = "stopped improving: raise epsilon" if stalled else "raise max_iter or epsilon"
    return (f"sinkhorn did not converge: {why} after {it} iterations (epsilon={epsilon:g}, "
            f"max|C - centre|/epsilon={spread / epsilon:.3g}, {str(dtype)[6:]}); {hint}")


def _plan_and_error(f, g, C, a, b, inv_eps, dtype) -> tuple[Tensor, float]:
    # P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps), a_i b_j outside the exp (inside, log a_i + log b_j
    # ~ -2 log n would add its own rounding). The error is measured on this plan, rows and columns,
    # summed in float64 where the device has it: the potentials cannot see the plan's rounding.
    z = (f * inv_eps).unsqueeze(-1) + (g * inv_eps).unsqueeze(-2)  # (..., n, m)
    plan = z.sub_(C, alpha=inv_eps).exp_().mul_(a.unsqueeze(-1)).mul_(b.unsqueeze(-2)).to(dtype)
    acc = torch.float32 if plan.device.type == "mps" else torch.float64
    row = (plan.sum(-1, dtype=acc) - a).abs().sum(-1)  # (...,)
    col = (plan.sum(-2, dtype=acc) - b).abs().sum(-1)
    worst = float(torch.maximum(row, col).max())
    return plan, (worst if math.isfinite(worst) else math.nan)


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


# ----------------------------------------------------------------------------------------------
# The paper's public code's solver, reproduced: POT's `sinkhorn_knopp` as `ot.sinkhorn(a, b, M, reg)`
# runs it on float32 tensors (kernel space, uniform marginals). Only for `--align published`: on
# real weights exp(-C/eps) underflows and it stops at its first iteration (see docs/ALIGNMENT.md).


def published_sinkhorn(cost: Tensor, epsilon: float = 0.06, max_iter: int = 10000,
                       stop_threshold: float = 1e-9) -> tuple[Tensor, dict]:
    # cost (n, m) -> plan diag(u) K diag(v) (n, m), K = exp(-cost/eps), in cost's dtype, and
    # {"iterations": updates kept, "aborted": bool, "abort_iteration": int | None, "converged": bool}.
    # The same operations in the same order as POT 0.9, so the same float32 numbers:
    #  - u = 1/n, v = 1/m; each iteration v = b / (K^T u), then u = 1 / ((K / a) v);
    #  - a zero in K^T u or a NaN/inf in u or v is a numerical error: the previous (u, v) is kept and
    #    the loop stops (at iteration 0 the plan is K / (n m), whatever its mass);
    #  - at iterations 0, 10, 20, ... it stops when || column sums - b ||_2 < stop_threshold.
    n, m = cost.shape
    a = torch.ones(n, dtype=cost.dtype, device=cost.device) / n
    b = torch.ones(m, dtype=cost.dtype, device=cost.device) / m
    u, v = torch.ones_like(a) / n, torch.ones_like(b) / m
    kernel = torch.exp(cost / -epsilon)
    kernel_over_a = (1 / a).reshape(-1, 1) * kernel
    stats = {"iterations": max_iter, "aborted": False, "abort_iteration": None, "converged": False}
    for iteration in range(max_iter):
        previous = u, v
        column_sums = kernel.T @ u
        v = b / column_sums
        u = 1.0 / (kernel_over_a @ v)
        if ((column_sums == 0).any() or u.isnan().any() or v.isnan().any()
                or u.isinf().any() or v.isinf().any()):
            u, v = previous
            stats.update(iterations=iteration, aborted=True, abort_iteration=iteration)
            break
        if iteration % 10 == 0:
            error = torch.linalg.norm(torch.einsum("i,ij,j->j", u, kernel, v) - b)
            if error < stop_threshold:
                stats.update(iterations=iteration + 1, converged=True)
                break
    return u.reshape(-1, 1) * kernel * v.reshape(1, -1), stats
