"""Entropic optimal transport (log-domain Sinkhorn) and exact assignment: what OpT-DeUS needs to
align the neurons / heads of two adjacent blocks before fusing them. The problem (Cuturi 2013;
Peyre & Cuturi, "Computational Optimal Transport", ch. 4), with uniform a = 1/n, b = 1/m:

    min_P  <P, C> + eps * KL(P | a b^T)   over P >= 0 with P 1 = a, P^T 1 = b.            (1)

Its solution is P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps) for dual potentials f (n,), g (m,)
that Sinkhorn finds by alternately making the column and the row marginal exact:

    g_j <- -eps * LSE_i( log a_i + (f_i - C_ij) / eps )        (columns sum to b)       (2a)
    f_i <- -eps * LSE_j( log b_j + (g_j - C_ij) / eps )        (rows sum to a)          (2b)

in the log domain (exp(-C/eps) underflows float32 on real weights). There plain Sinkhorn contracts
slowly, so each update is over-relaxed (Thibault et al. 2021; Lehmann et al. 2021):

    g <- (1 - w) g + w * (2a),   f <- (1 - w) f + w * (2b),   1 <= w < 2               (3)

with w = 1 until the error's observed contraction rate r gives plain Sinkhorn's rate theta by
Young's SOR relation (r + w - 1)^2 = theta w^2 r; then w = 2 / (1 + sqrt(1 - theta)), its optimum.
"""

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

OMEGA_CAP = 1.95  # (3) converges locally for w < 2 (Lehmann et al.); the cap keeps a margin


class SinkhornWarning(RuntimeWarning):
    """Sinkhorn stopped before its marginals met the tolerance (or the iterates went non-finite)."""


class SinkhornError(RuntimeError):
    """The same condition as SinkhornWarning, raised instead when strict=True."""


@dataclass
class SinkhornResult:
    plan: Tensor  # (..., n, m): rows sum to 1/n, columns to 1/m, within marginal_error
    iterations: int  # full (column + row) updates, epsilon-scaling stages included
    marginal_error: float  # max over the batch of |P 1 - a|_1 and |P^T 1 - b|_1, on `plan`
    converged: bool  # every problem of the batch reached marginal_error <= tol, all finite
    tol: float  # the tolerance used (by default from dtype and conditioning, see sinkhorn())
    dtype: torch.dtype  # precision of the last iterations (float64 after a float64 finish)


def _row_update(g: Tensor, C: Tensor, log_b: Tensor, inv_eps: float) -> Tensor:
    # (2b): g, log_b (..., m), C (..., n, m) -> f (..., n); with C^T and (f, log_a) it is (2a).
    # The LSE's exponents are floored at log(smallest normal): subnormals make exp slow on x86.
    z = torch.sub((g * inv_eps + log_b).unsqueeze(-2), C, alpha=inv_eps)  # (..., n, m)
    mx = z.amax(dim=-1, keepdim=True)  # (..., n, 1)
    floor = math.log(torch.finfo(z.dtype).tiny) + 1.0
    lse = mx.squeeze(-1) + z.sub_(mx).clamp_(min=floor).exp_().sum(dim=-1).log()
    return lse * (-1.0 / inv_eps)


def _iterate(f, C, CT, log_a, log_b, a, inv_eps: float, k: int, g=None, omega=1.0):
    # k iterations: k - 1 over-relaxed (3), then a plain one, whose (f, g) is the plan handed out.
    # Its row sums are a_i exp((f_i - f_next_i) / eps), f_next the next start: the error is free.
    for _ in range(k - 1):
        g_new = _row_update(f, CT, log_a, inv_eps)  # (2a)
        g = g_new if g is None else torch.lerp(g, g_new, omega)  # (3): (1 - w) g + w g_new
        f = torch.lerp(f, _row_update(g, C, log_b, inv_eps), omega)  # (2b), then (3)
    g = _row_update(f, CT, log_a, inv_eps)  # (2a), plain
    f_next = _row_update(g, C, log_b, inv_eps)  # (2b), plain: the next block's start
    err = (a * torch.expm1((f - f_next) * inv_eps).abs()).sum(-1)  # (...,)
    return f, g, f_next, err


def _prepare(cost, epsilon, tol, max_iter, check_every, eps_scaling):
    # Checks the arguments -> centred cost C (..., n, m), C^T, a (n,), b (m,), a's sum, spread.
    if cost.dim() < 2 or cost.numel() == 0 or cost.is_meta:
        raise ValueError(f"sinkhorn: cost must be a (..., n, m) tensor with data, n, m >= 1 and a "
                         f"non-empty batch, got shape {tuple(cost.shape)} on {cost.device}")
    for name, value, ok, rule in (
            ("epsilon", epsilon, 0 < epsilon < math.inf, "a finite number > 0"),
            ("tol", tol, tol is None or tol > 0, "> 0"),
            ("max_iter", max_iter, isinstance(max_iter, int) and max_iter >= 1, "an integer >= 1"),
            ("check_every", check_every, check_every >= 1, ">= 1"),
            ("eps_scaling", eps_scaling, eps_scaling is None or 0 < eps_scaling <= 1,
             "in (0, 1] or None")):
        if not ok:
            raise ValueError(f"sinkhorn: {name} must be {rule}, got {value!r}")
    cost = cost.detach()
    dtype = torch.float64 if cost.dtype == torch.float64 else torch.float32
    hi, lo = cost.amax(dim=(-2, -1)).to(dtype), cost.amin(dim=(-2, -1)).to(dtype)  # NaN propagates
    if not bool(torch.isfinite(hi).all() & torch.isfinite(lo).all()):
        raise ValueError("sinkhorn: cost contains NaN or inf")
    spread, u = float((hi - lo).max()) / 2, torch.finfo(dtype).eps / 2
    if spread / epsilon * u >= 1:  # the exponents (..)/eps would lose every digit, then overflow
        raise ValueError(f"sinkhorn: epsilon={epsilon:g} is too small for this cost in "
                         f"{str(dtype)[6:]}: max|C - centre|/epsilon = {spread / epsilon:.3g} is "
                         f"beyond its precision; use epsilon >= {spread * u:.3g}"
                         + (" or pass a float64 cost" if u > 1e-10 else ""))
    a, b = (torch.full((k,), 1.0 / k, dtype=dtype, device=cost.device) for k in cost.shape[-2:])
    mass = a.sum(-1)  # 1 up to rounding: solved for a / mass, the plan scaled back
    a, b = a / mass, b / b.sum(-1)
    # A constant subtracted from C moves into f; centring on the mid-range halves the rounding.
    C = (cost.to(dtype) - ((hi + lo) / 2)[..., None, None]).contiguous()
    return C, C.transpose(-1, -2).contiguous(), a, b, mass, spread


def sinkhorn(cost: Tensor, *, epsilon: float, tol: float | None = None, max_iter: int = 1000,
             check_every: int = 10, eps_scaling: float | None = 0.5,
             strict: bool = False) -> SinkhornResult:
    """Solve (1) for a batch of costs: log-domain Sinkhorn (2), epsilon-scaled, over-relaxed (3).

    cost (..., n, m): float64 is solved in float64, other dtypes in float32 (finished in float64
    if float32's rounding stalls). epsilon > 0, in cost units. tol: the relative L1 marginal error
    to reach (None: by dtype, below). max_iter counts epsilon-scaling stages. check_every: most
    iterations between error checks (a host sync each). eps_scaling: the schedule's ratio (None or
    1: off). Not converged: SinkhornError if strict, else a SinkhornWarning.
    """
    epsilon = float(epsilon)
    C, CT, a, b, mass, spread = _prepare(cost, epsilon, tol, max_iter, check_every, eps_scaling)
    dtype, device, log_a, log_b = C.dtype, C.device, a.log(), b.log()
    floor = 0.5 * torch.finfo(dtype).eps / 2 * (spread / epsilon)  # reachable error (see docs)
    if tol is None:
        tol = max(1e-6 if dtype == torch.float32 else 1e-10, min(1e-4, 4 * floor))
    # Epsilon scaling (Kosowsky & Yuille 1994; Schmitzer 2019, sec. 3.2): f from (2b) at g = 0, then
    # one iteration of (2) per stage at eps = 2 spread, 2 spread r, ... > epsilon, f carried over.
    schedule = []
    if eps_scaling is not None and eps_scaling < 1:
        e = 2 * spread  # the cost's range: at this eps the plan is already close to a b^T
        while e > epsilon:
            schedule.append(e)
            e *= eps_scaling
        schedule = schedule[len(schedule) - min(len(schedule), max_iter - 1):]  # 1 iteration at eps
    f = _row_update(torch.zeros_like(C[..., 0, :]), C, log_b, 1 / (schedule or [epsilon])[0])
    for e in schedule:
        f = _row_update(_row_update(f, CT, log_a, 1 / e), C, log_b, 1 / e)  # (2a), (2b) at eps = e
    it, g, inv_eps, omega, omega_max = len(schedule), None, 1.0 / epsilon, 1.0, OMEGA_CAP
    best, best_it, previous, stalled, measured = math.inf, it, None, False, None
    while True:
        # k iterations of (2), (3) in blocks of 1, 1, 2, 4, ... check_every: easy ones stop early.
        k = min(check_every, max(1, it - len(schedule)), max_iter - it)
        f_plan, g, f, err = _iterate(f, C, CT, log_a, log_b, a, inv_eps, k, g, omega)
        it += k
        estimate = float(err.max())  # NaN propagates: one host sync covers divergence too
        if not math.isfinite(estimate) or it >= max_iter:
            break
        # The estimate has a rounding floor of its own (~u |f| / eps): stalled or done, measure.
        if estimate <= tol or omega_max < OMEGA_CAP:
            measured = _plan_and_error(f_plan, g, C, a, b, inv_eps, dtype)
            if measured[1] <= tol:
                break
            estimate, measured = measured[1], None
        if previous is not None and previous > 0:  # choose w for (3) from the observed rate
            rate = (estimate / previous) ** (1 / k)
            theta = min(1.0, (rate + omega - 1) ** 2 / (rate * omega**2))  # Young: plain rate
            optimum = 2 / (1 + math.sqrt(1 - theta))
            omega = 1 + (omega - 1) / 2 if rate >= 1 else min(omega_max, optimum)
        previous = estimate
        if estimate < 0.9 * best:
            best, best_it = estimate, it
        elif it - best_it > max(100, it // 4):  # no 10 % gain in a quarter of the run: a floor
            if omega_max > 1:  # where w amplifies the noise (~1/(2-w)): halve w - 1, down to 1
                omega_max = omega = 1 + (omega_max - 1) / 2 if omega_max > 1.1 else 1.0
            elif C.dtype == torch.float32 and device.type != "mps" and tol > 2e-7:
                # float32 cannot get there: finish in float64 (the plan stays float32: tol > 2e-7).
                C, CT, a, b, log_a, log_b, f, g = (
                    x.double() for x in (C, CT, a, b, log_a, log_b, f, g))
                omega_max, omega, previous = OMEGA_CAP, 1.0, None
            else:
                stalled = True
                break
            best, best_it = math.inf, it
    plan, worst = measured or _plan_and_error(f_plan, g, C, a, b, inv_eps, dtype)
    converged = math.isfinite(worst) and worst <= tol
    result = SinkhornResult(plan.mul_(mass), it, worst, converged, float(tol), C.dtype)
    if not converged:
        msg = _failure(worst, tol, it, epsilon, spread, floor, dtype, C.dtype != dtype, stalled)
        if strict:
            raise SinkhornError(msg)
        warnings.warn(msg, SinkhornWarning, stacklevel=2)
    return result


def _failure(worst, tol, it, epsilon, spread, floor, dtype, finished_in_float64, stalled) -> str:
    why = (f"marginal error {worst:.3e} > tol {tol:.1e}" if math.isfinite(worst)
           else "non-finite iterates")
    f32 = f"float32 cannot get there (rounding floor ~{floor:.1e})"
    if finished_in_float64:
        hint = f"{f32}; the float64 finish fell short: raise max_iter"
    elif dtype == torch.float32 and (stalled or tol < 2 * floor):
        hint = f"{f32}: pass a float64 cost"
    else:
        hint = "stopped improving: raise epsilon" if stalled else "raise max_iter or epsilon"
    return (f"sinkhorn did not converge: {why} after {it} iterations (epsilon={epsilon:g}, "
            f"max|C - centre|/epsilon={spread / epsilon:.3g}, {str(dtype)[6:]}); {hint}")


def _plan_and_error(f, g, C, a, b, inv_eps, dtype) -> tuple[Tensor, float]:
    # P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps), a_i b_j outside the exp (less rounding). Its
    # error, measured on it (the potentials miss its rounding), summed in float64 if the device can.
    z = (f * inv_eps).unsqueeze(-1) + (g * inv_eps).unsqueeze(-2)  # (..., n, m)
    plan = z.sub_(C, alpha=inv_eps).exp_().mul_(a.unsqueeze(-1)).mul_(b.unsqueeze(-2)).to(dtype)
    acc = torch.float32 if plan.device.type == "mps" else torch.float64
    row = (plan.sum(-1, dtype=acc) - a).abs().sum(-1)  # (...,)
    col = (plan.sum(-2, dtype=acc) - b).abs().sum(-1)
    worst = float(torch.maximum(row, col).max())
    return plan, (worst if math.isfinite(worst) else math.nan)


def _assign(c: np.ndarray) -> np.ndarray:
    # Minimum-cost assignment of the n rows of c (n, m), n <= m, to distinct columns by shortest
    # augmenting paths (Jonker & Volgenant 1987; Burkard et al., "Assignment Problems", 4.4): each
    # new row runs Dijkstra over reduced costs c_ij - u_i - v_j >= 0; the duals certify it. O(n^2 m)
    n, m = c.shape
    cc = np.pad(c, ((1, 0), (1, 0)))  # 1-based rows / columns; column 0 is a virtual start column
    u, v = np.zeros(n + 1), np.zeros(m + 1)  # row and column duals
    row_of = np.zeros(m + 1, dtype=np.int64)  # row_of[j]: row matched to column j (0 = free)
    prev = np.zeros(m + 1, dtype=np.int64)  # previous column on the shortest-path tree
    for i in range(1, n + 1):
        row_of[0], j0 = i, 0  # the new row hangs off the virtual column 0
        dist = np.full(m + 1, np.inf)  # path lengths to each column, so far
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
            u[row_of[done]] += delta  # shift the duals by the distance settled: reduced costs >= 0
            v[done] -= delta
            dist[~done] -= delta
            j0 = j1
            if row_of[j0] == 0:  # reached a free column: augment
                break
        while j0:  # flip the path back to the virtual column
            row_of[j0], j0 = row_of[prev[j0]], prev[j0]
    perm = np.empty(n, dtype=np.int64)
    cols = np.nonzero(row_of[1:])[0]
    perm[row_of[1:][cols] - 1] = cols
    return perm


def hard_assignment(cost: Tensor) -> Tensor:
    # cost (..., n, m), n <= m -> (..., n): the perm minimising sum_i cost[i, perm[i]], exact (CPU).
    if cost.dim() < 2 or cost.shape[-2] > cost.shape[-1]:
        raise ValueError(f"hard_assignment: cost must be (..., n, m), n <= m: {tuple(cost.shape)}")
    c = cost.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(c).all():
        raise ValueError("hard_assignment: cost contains NaN or inf")
    *batch, n, m = c.shape
    perms = [_assign(x) for x in c.reshape(math.prod(batch), n, m)]
    return torch.from_numpy(np.array(perms, dtype=np.int64).reshape(*batch, n)).to(cost.device)


def column_normalized(plan: Tensor) -> Tensor:
    # m T (..., n, m), T a plan with uniform marginals: columns sum to 1. With n = m, m T @ W mixes
    # W's rows (m, d) convexly; a permutation plan gives its 0/1 permutation matrix.
    return plan * plan.shape[-1]


def plan_sharpness(plan: Tensor) -> Tensor:
    # (...,): mean row maximum of column_normalized(plan): 1 for a permutation plan, 1/n for a b^T.
    return column_normalized(plan).amax(dim=-1).mean(dim=-1)


def published_sinkhorn(cost: Tensor, epsilon: float = 0.06, max_iter: int = 10000,
                       stop_threshold: float = 1e-9) -> tuple[Tensor, dict]:
    # The paper's code's solver, POT 0.9's `sinkhorn_knopp`, for align="published"
    # (docs/ALIGNMENT.md): cost (n, m) -> plan diag(u) K diag(v), K = exp(-cost/eps), and stats.
    # POT's operations in its order, so its float32 numbers: v = b / (K^T u), u = 1 / ((K / a) v).
    n, m = cost.shape
    a, b = (torch.ones(k, dtype=cost.dtype, device=cost.device) / k for k in (n, m))
    u, v = torch.ones_like(a) / n, torch.ones_like(b) / m
    kernel = torch.exp(cost / -epsilon)
    kernel_over_a = (1 / a).reshape(-1, 1) * kernel
    stats = {"iterations": max_iter, "aborted": False, "abort_iteration": None, "converged": False}
    for iteration in range(max_iter):
        previous = u, v
        column_sums = kernel.T @ u
        v = b / column_sums
        u = 1.0 / (kernel_over_a @ v)
        if (column_sums == 0).any() or not (u.isfinite().all() and v.isfinite().all()):
            u, v = previous
            stats.update(iterations=iteration, aborted=True, abort_iteration=iteration)
            break
        if iteration % 10 == 0:
            error = torch.linalg.norm(torch.einsum("i,ij,j->j", u, kernel, v) - b)
            if error < stop_threshold:
                stats.update(iterations=iteration + 1, converged=True)
                break
    return u.reshape(-1, 1) * kernel * v.reshape(1, -1), stats
