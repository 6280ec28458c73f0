"""Entropic optimal transport (log-domain Sinkhorn) and exact assignment, in plain PyTorch: what OpT-DeUS
needs to align the neurons / heads of two adjacent blocks before fusing them. The problem (Cuturi 2013;
Peyre & Cuturi, "Computational Optimal Transport", ch. 4):

    min_P  <P, C> + eps * KL(P | a b^T)   over P >= 0 with P 1 = a, P^T 1 = b.            (1)

Its solution is P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps) for dual potentials f (n,), g (m,)
that Sinkhorn finds by alternately making the column and the row marginal exact:

    g_j <- -eps * LSE_i( log a_i + (f_i - C_ij) / eps )        (columns sum to b)       (2a)
    f_i <- -eps * LSE_j( log b_j + (g_j - C_ij) / eps )        (rows sum to a)          (2b)

in the log domain (exp(-C/eps) underflows float32 on real weights). There plain Sinkhorn contracts slowly,
so each update is over-relaxed (Thibault, Chizat, Dossal & Papadakis 2021; Lehmann, von Renesse, Sambale &
Uschmajew 2021):

    g <- (1 - w) g + w * (2a),   f <- (1 - w) f + w * (2b),   1 <= w < 2               (3)

with w = 1 until the error's observed contraction rate r gives plain Sinkhorn's rate theta by Young's
SOR relation (r + w - 1)^2 = theta w^2 r; then w = 2 / (1 + sqrt(1 - theta)), its optimum.
"""

import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

OMEGA_CAP = 1.95  # (3) converges locally for w < 2 (Lehmann et al.); the cap keeps a margin below it


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
    tol: float  # the tolerance used (the default depends on dtype and conditioning, see sinkhorn())
    dtype: torch.dtype  # precision the last iterations were computed in (float64 after a float64 finish)


def _row_update(g: Tensor, C: Tensor, log_b: Tensor, inv_eps: float) -> Tensor:
    # (2b): g, log_b (..., m), C (..., n, m) -> f (..., n); with C^T (contiguous) and (f, log_a) it is (2a).
    # The LSE's shifted exponents are floored at log(smallest normal): subnormals make exp slow on x86.
    z = torch.sub((g * inv_eps + log_b).unsqueeze(-2), C, alpha=inv_eps)  # (..., n, m)
    mx = z.amax(dim=-1, keepdim=True)  # (..., n, 1)
    floor = math.log(torch.finfo(z.dtype).tiny) + 1.0
    return (mx.squeeze(-1) + z.sub_(mx).clamp_(min=floor).exp_().sum(dim=-1).log()) * (-1.0 / inv_eps)


def _iterate(f, C, CT, log_a, log_b, a, inv_eps: float, k: int, g=None, omega=1.0):
    # k iterations: k - 1 over-relaxed (3), then a plain one, whose (f, g) is the plan we hand out. Its row
    # sums are a_i exp((f_i - f_next_i) / eps), f_next the next block's start: the error costs no extra pass.
    for _ in range(k - 1):
        g_new = _row_update(f, CT, log_a, inv_eps)  # (2a)
        g = g_new if g is None else torch.lerp(g, g_new, omega)  # (3): (1 - w) g + w g_new
        f = torch.lerp(f, _row_update(g, C, log_b, inv_eps), omega)  # (2b), then (3)
    g = _row_update(f, CT, log_a, inv_eps)  # (2a), plain
    f_next = _row_update(g, C, log_b, inv_eps)  # (2b), plain: the next block's start
    err = (a * torch.expm1((f - f_next) * inv_eps).abs()).sum(-1)  # (...,)
    return f, g, f_next, err


@functools.cache  # built on first use of compile=True; nothing happens at import
def _get_compiled():
    return torch.compile(_iterate, dynamic=False)


def _marginal(w: Tensor | None, size: int, batch: torch.Size, dtype, device, name: str) -> Tensor:
    if w is None:
        return torch.full((size,), 1.0 / size, dtype=dtype, device=device)
    w = torch.as_tensor(w)
    if w.dim() < 1 or w.shape[-1] != size:
        raise ValueError(f"sinkhorn: {name} has shape {tuple(w.shape)}, expected (..., {size})")
    try:
        w.expand(*batch, size)
    except RuntimeError:
        raise ValueError(f"sinkhorn: {name} of shape {tuple(w.shape)} does not broadcast to the cost's batch "
                         f"shape {tuple(batch)}") from None
    w = w.to(device=device, dtype=dtype)
    if not bool(torch.isfinite(w).all()) or not bool((w > 0).all()):
        raise ValueError(f"sinkhorn: {name} must be finite and strictly positive (drop empty bins)")
    return w


def _prepare(cost, a, b, epsilon, tol, max_iter, check_every, eps_scaling):
    # Checks the arguments -> centred cost C (..., n, m), its transpose CT, unit-mass a, b, masses, centres, spread.
    if not isinstance(cost, Tensor):
        raise TypeError(f"sinkhorn: cost must be a torch.Tensor, got {type(cost).__name__}")
    if cost.dim() < 2 or cost.numel() == 0 or cost.is_complex() or cost.is_meta:
        raise ValueError(f"sinkhorn: cost must be a real (..., n, m) tensor with data, n, m >= 1 and a non-empty "
                         f"batch, got shape {tuple(cost.shape)} {cost.dtype} on {cost.device}")
    if not (isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool) and 0 < epsilon <= 1e30):
        raise ValueError(f"sinkhorn: epsilon must be a number in (0, 1e30] (float32 overflows beyond), got {epsilon!r}")
    if tol is not None and not (tol > 0):
        raise ValueError(f"sinkhorn: tol must be > 0, got {tol!r}")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"sinkhorn: max_iter must be an integer >= 1 (e.g. 1000), got {max_iter!r}")
    if check_every is not None and check_every < 1:
        raise ValueError(f"sinkhorn: check_every must be >= 1, got {check_every}")
    if eps_scaling is not None and not (0 < eps_scaling <= 1):
        raise ValueError(f"sinkhorn: eps_scaling must be in (0, 1] or None, got {eps_scaling!r}")
    cost = cost.detach()
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
    # Balanced OT: equal masses (rounding forgiven); solved for unit mass, the plan scaled back.
    mass_a, mass_b = a.sum(-1), b.sum(-1)
    gap = float(((mass_a - mass_b).abs() / torch.maximum(mass_a, mass_b)).max())
    if gap > 1e-5:
        raise ValueError(f"sinkhorn: a and b must have equal total mass (relative gap {gap:.2e})")
    a = (a / mass_a.unsqueeze(-1)).expand(*batch, n)
    b = (b / mass_b.unsqueeze(-1)).expand(*batch, m)
    # A constant subtracted from C moves into f; centring on the mid-range halves the exponents' rounding.
    centre = (hi + lo) / 2
    C = (cost.to(dtype) - centre[..., None, None]).contiguous()
    return C, C.transpose(-1, -2).contiguous(), a, b, mass_a.expand(batch), centre, spread


def sinkhorn(cost: Tensor, a: Tensor | None = None, b: Tensor | None = None, *, epsilon: float,
             tol: float | None = None, max_iter: int = 1000, check_every: int = 10,
             eps_scaling: float | None = 0.5, strict: bool = False, warn: bool = True,
             compile: bool = False) -> SinkhornResult:
    """Solve (1) for a batch of costs: log-domain Sinkhorn (2), epsilon-scaled, over-relaxed (3).

    cost (..., n, m), detached: float64 is solved in float64, other dtypes in float32 (with a float64 finish if
    float32's rounding stalls). a (..., n) or (n,), b (..., m) or (m,): positive marginals of equal mass (None:
    uniform). epsilon > 0, in cost units. tol: relative L1 marginal error the plan must meet (None: by dtype,
    below). max_iter counts epsilon-scaling stages too. check_every: most iterations between error checks (a host
    sync each on GPU). eps_scaling: the schedule's ratio (None or 1: off). strict: raise SinkhornError if not
    converged, else warn unless warn=False. compile: torch.compile the block of iterations. Returns a
    SinkhornResult: plan (..., n, m) in the solve's dtype, potentials f (..., n), g (..., m), error, iterations.
    """
    epsilon = float(epsilon) if isinstance(epsilon, Tensor) else epsilon
    C, CT, a, b, mass, centre, spread = _prepare(cost, a, b, epsilon, tol, max_iter, check_every, eps_scaling)
    dtype, device, batch, m = C.dtype, C.device, C.shape[:-2], C.shape[-1]
    log_a, log_b = a.log(), b.log()
    floor = 0.5 * torch.finfo(dtype).eps / 2 * (spread / epsilon)  # reachable error (docs/BENCHMARKS_SINKHORN.md)
    if tol is None:  # 1e-6 (float32) / 1e-10 (float64), raised to 4x the rounding floor but never above 1e-4
        tol = max(1e-6 if dtype == torch.float32 else 1e-10, min(1e-4, 4 * floor))
    # Epsilon scaling (Kosowsky & Yuille 1994; Schmitzer 2019, sec. 3.2): f from (2b) at g = 0, then one iteration
    # of (2) per stage along eps = 2 spread, 2 spread r, ... > epsilon, warm-starting f (cost units, carried over).
    schedule = []
    if eps_scaling is not None and eps_scaling < 1:
        e = 2 * spread  # the cost's range: at this eps the plan is already close to a b^T
        while e > epsilon:
            schedule.append(e)
            e *= eps_scaling
        schedule = schedule[len(schedule) - min(len(schedule), max_iter - 1):]  # keep 1 iteration at epsilon
    f = _row_update(torch.zeros(*batch, m, dtype=dtype, device=device), C, log_b, 1 / (schedule or [epsilon])[0])
    for e in schedule:
        f = _row_update(_row_update(f, CT, log_a, 1 / e), C, log_b, 1 / e)  # (2a), then (2b) at eps = e
    it, g, inv_eps, omega = len(schedule), None, 1.0 / epsilon, 1.0
    step = _get_compiled() if compile else _iterate
    best, best_it, previous, stalled, measured = math.inf, it, None, False, None
    omega_max = OMEGA_CAP
    while True:
        # k iterations of (2a), (2b), (3) in blocks of 1, 1, 2, 4, ... check_every: easy problems stop early.
        k = min(check_every, max(1, it - len(schedule)), max_iter - it)
        weight = torch.tensor(omega, dtype=C.dtype, device=device) if compile else omega
        f_plan, g, f, err = (step if k == check_every else _iterate)(f, C, CT, log_a, log_b, a, inv_eps, k, g, weight)
        it += k
        estimate = float(err.max())  # NaN propagates: one host sync covers divergence too
        if not math.isfinite(estimate) or it >= max_iter:
            break
        # The estimate has its own rounding floor (~u |f| / eps): once stalled, or when it says done, measure the plan.
        if estimate <= tol or omega_max < OMEGA_CAP:
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
                # float32 cannot get there: finish in float64 (the plan stays float32, hence tol > 2e-7).
                C, CT, a, b, log_a, log_b, f, g = (x.double() for x in (C, CT, a, b, log_a, log_b, f, g))
                omega_max, omega, previous = OMEGA_CAP, 1.0, None
            else:
                stalled = True
                break
            best, best_it = math.inf, it
    plan, worst = measured or _plan_and_error(f_plan, g, C, a, b, inv_eps, dtype)
    converged = math.isfinite(worst) and worst <= tol
    plan = plan.mul_(mass[..., None, None])  # back to the caller's mass
    # Undo the centring and unit mass (f + g = f~ + g~ + centre - eps log(mass)), gauge fixed by <a, f> = <b, g>.
    f_out = f_plan + (centre - epsilon * mass.log())[..., None]
    shift = ((a * f_out).sum(-1) - (b * g).sum(-1)) / 2  # (...,)
    result = SinkhornResult(plan, (f_out - shift[..., None]).to(dtype), (g + shift[..., None]).to(dtype), it, worst,
                            converged, float(epsilon), float(tol), C.dtype)
    if not converged:
        why = f"marginal error {worst:.3e} > tol {tol:.1e}" if math.isfinite(worst) else "non-finite iterates"
        if C.dtype != dtype:
            hint = (f"float32 cannot get there (rounding floor ~{floor:.1e}); the float64 finish fell short: "
                    "raise max_iter")
        elif dtype == torch.float32 and (stalled or tol < 2 * floor):
            hint = f"float32 cannot get there (its rounding floor here is ~{floor:.1e}): pass a float64 cost"
        else:
            hint = "stopped improving: raise epsilon" if stalled else "raise max_iter or epsilon"
        msg = (f"sinkhorn did not converge: {why} after {it} iterations (epsilon={epsilon:g}, "
               f"max|C - centre|/epsilon={spread / epsilon:.3g}, {str(dtype)[6:]}); {hint}")
        if strict:
            raise SinkhornError(msg)
        if warn:
            warnings.warn(msg, SinkhornWarning, stacklevel=2)
    return result


def _plan_and_error(f, g, C, a, b, inv_eps, dtype) -> tuple[Tensor, float]:
    # P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps), a_i b_j outside the exp (less rounding). Its error is
    # measured on this plan, summed in float64 where the device has it: the potentials miss its rounding.
    z = (f * inv_eps).unsqueeze(-1) + (g * inv_eps).unsqueeze(-2)  # (..., n, m)
    plan = z.sub_(C, alpha=inv_eps).exp_().mul_(a.unsqueeze(-1)).mul_(b.unsqueeze(-2)).to(dtype)
    acc = torch.float32 if plan.device.type == "mps" else torch.float64
    row = (plan.sum(-1, dtype=acc) - a).abs().sum(-1)  # (...,)
    col = (plan.sum(-2, dtype=acc) - b).abs().sum(-1)
    worst = float(torch.maximum(row, col).max())
    return plan, (worst if math.isfinite(worst) else math.nan)


def _assign(c: np.ndarray) -> np.ndarray:
    # Minimum-cost assignment of the n rows of c (n, m), n <= m, to distinct columns by shortest augmenting
    # paths (Jonker & Volgenant 1987; Burkard et al., "Assignment Problems", sec. 4.4): each new row runs
    # Dijkstra over reduced costs c_ij - u_i - v_j >= 0; the duals certify the result exact. O(n^2 m).
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
            u[row_of[done]] += delta  # shift the duals by the distance settled: reduced costs stay >= 0
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
    # cost (..., n, m), n <= m -> (..., n) long: the injective perm minimising sum_i cost[i, perm[i]], exact (CPU).
    cost = torch.as_tensor(cost)
    if cost.dim() < 2 or cost.shape[-2] > cost.shape[-1] or cost.is_meta:
        raise ValueError(f"hard_assignment: cost must be (..., n, m) with n <= m and data, got {tuple(cost.shape)} "
                         f"on {cost.device}")
    c = cost.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(c).all():
        raise ValueError("hard_assignment: cost contains NaN or inf")
    *batch, n, m = c.shape
    flat = c.reshape(math.prod(batch), n, m)
    out = np.stack([_assign(x) for x in flat]) if n and len(flat) else np.zeros((len(flat), n), np.int64)
    return torch.from_numpy(out.reshape(*batch, n)).to(cost.device)


def normalize_plan(plan: Tensor, b: Tensor | None = None) -> Tensor:
    # T diag(1/b) (..., n, m), columns summing to 1 (b None: uniform, m*T). normalize_plan(T) @ W, W (m, d),
    # takes convex combinations of W's rows; a permutation plan maps to its 0/1 permutation matrix.
    if b is None:
        return plan * plan.shape[-1]
    return plan / b.to(plan.dtype).unsqueeze(-2)


def plan_sharpness(plan: Tensor, b: Tensor | None = None) -> Tensor:
    # (...,): mean row maximum of normalize_plan(plan, b): 1 for a permutation plan, 1/n for the uniform a b^T.
    return normalize_plan(plan, b).amax(dim=-1).mean(dim=-1)


def published_sinkhorn(cost: Tensor, epsilon: float = 0.06, max_iter: int = 10000,
                       stop_threshold: float = 1e-9) -> tuple[Tensor, dict]:
    # The paper's code's solver, POT 0.9's `sinkhorn_knopp`, for align="published" (docs/ALIGNMENT.md): cost
    # (n, m) -> plan diag(u) K diag(v), K = exp(-cost/eps), and stats. POT's operations in its order, so its float32
    # numbers: v = b / (K^T u), u = 1 / ((K / a) v); a zero in K^T u or NaN/inf in u, v keeps the previous (u, v)
    # and stops; every 10 iterations it stops if ||P^T 1 - b||_2 < stop_threshold.
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
