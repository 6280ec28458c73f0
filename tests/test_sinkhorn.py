"""Properties of sinkhorn.py. Small problems, CPU, a few seconds in all."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opt_deus_core.sinkhorn import (
    SinkhornError,
    SinkhornWarning,
    column_normalized,
    hard_assignment,
    plan_sharpness,
    sinkhorn,
)

FAST = settings(deadline=None, max_examples=25)
seeds = st.integers(0, 2**31 - 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _uniform(n: int, dtype=torch.float64) -> torch.Tensor:
    return torch.full((n,), 1 / n, dtype=dtype)


def _l1(x: torch.Tensor, target: torch.Tensor) -> float:
    return float((x.double() - target.double()).abs().sum() / target.double().sum())


def _inv(perm: torch.Tensor) -> torch.Tensor:
    return torch.argsort(perm)


# ----------------------------------------------------------------------------------------------
# Marginals


@FAST
@given(seed=seeds, n=st.integers(1, 12), m=st.integers(1, 12), eps=st.floats(0.05, 1.0),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_marginals_met_random_cost(seed, n, m, eps, dtype):
    C = torch.rand(n, m, generator=_gen(seed), dtype=torch.float64).to(dtype)
    r = sinkhorn(C, epsilon=eps)
    assert r.converged and r.marginal_error <= r.tol
    assert r.plan.shape == (n, m) and r.plan.dtype == dtype and r.dtype == dtype
    assert (r.plan >= 0).all()
    # marginal_error is measured against 1/n and 1/m scaled to unit mass (their sums round); against
    # 1/n and 1/m themselves that scaling adds up to a few ulps.
    slack = 4 * torch.finfo(dtype).eps
    assert _l1(r.plan.sum(-1), _uniform(n)) <= r.tol + slack
    assert _l1(r.plan.sum(-2), _uniform(m)) <= r.tol + slack


def test_default_marginals_are_uniform_and_tol_depends_on_dtype():
    C = torch.rand(7, 5, generator=_gen(0), dtype=torch.float64)
    r64 = sinkhorn(C, epsilon=0.5)
    r32 = sinkhorn(C.float(), epsilon=0.5)
    assert _l1(r64.plan.sum(-1), _uniform(7)) <= r64.tol
    assert _l1(r64.plan.sum(-2), _uniform(5)) <= r64.tol
    assert r64.tol == 1e-10 and r32.tol == 1e-6  # well-conditioned: the dtype limits apply
    # half / bf16 costs are computed in float32
    r16 = sinkhorn(C.to(torch.bfloat16), epsilon=0.5)
    assert r16.dtype == torch.float32 and r16.plan.dtype == torch.float32 and r16.converged


# ----------------------------------------------------------------------------------------------
# Exact assignment


def _planted(seed: int, n: int):
    # Columns are a shuffled, slightly perturbed copy of the rows: the optimum matches row i to
    # the column holding its copy, i.e. assignment = inverse of the shuffle.
    g = _gen(seed)
    x = torch.randn(n, 8, generator=g, dtype=torch.float64)
    shuffle = torch.randperm(n, generator=g)
    y = x[shuffle] + 1e-3 * torch.randn(n, 8, generator=g, dtype=torch.float64)
    return torch.cdist(x, y) ** 2, _inv(shuffle)


@FAST
@given(seed=seeds, n=st.integers(1, 24))
def test_planted_permutation_recovered(seed, n):
    C, expected = _planted(seed, n)
    assert torch.equal(hard_assignment(C), expected)
    assert torch.equal(hard_assignment(C.float()), expected)
    # small-eps plan, rounded: eps far below the gap between matched (~1e-5) and other pairs (~16)
    r = sinkhorn(C.float(), epsilon=0.05)
    assert torch.equal(hard_assignment(-r.plan), expected)  # the assignment carrying the most plan mass
    assert float(plan_sharpness(r.plan)) > 0.99


@settings(deadline=None, max_examples=60)
@given(seed=seeds, n=st.integers(1, 6), integer=st.booleans())
def test_hard_assignment_matches_brute_force(seed, n, integer):
    g = _gen(seed)
    C = torch.rand(n, n, generator=g, dtype=torch.float64)
    if integer:  # many ties: compare optimal values, not the argmin
        C = torch.randint(0, 4, (n, n), generator=g).double()
    perm = hard_assignment(C)
    assert perm.dtype == torch.long and sorted(perm.tolist()) == list(range(n))
    rows = torch.arange(n)
    best = min(float(C[rows, list(p)].sum()) for p in itertools.permutations(range(n)))
    assert float(C[rows, perm].sum()) == pytest.approx(best, abs=1e-12)


def test_hard_assignment_rectangular_and_batched():
    g = _gen(1)
    C = torch.rand(3, 4, 7, generator=g, dtype=torch.float64)  # 3 problems, 4 rows -> 7 columns
    perm = hard_assignment(C)
    assert perm.shape == (3, 4)
    for k in range(3):
        assert len(set(perm[k].tolist())) == 4
        best = min(float(C[k, torch.arange(4), list(p)].sum()) for p in itertools.permutations(range(7), 4))
        assert float(C[k, torch.arange(4), perm[k]].sum()) == pytest.approx(best, abs=1e-12)
    plans = torch.stack([torch.eye(5)[torch.randperm(5, generator=g)] / 5 for _ in range(2)])
    assert torch.equal(hard_assignment(-plans), plans.argmax(-1))
    assert hard_assignment(torch.rand(0, 3, 4)).shape == (0, 3)  # an empty batch
    assert hard_assignment(torch.rand(2, 0, 4)).shape == (2, 0)
    with pytest.raises(ValueError, match="NaN or inf"):
        hard_assignment(torch.tensor([[0.0, float("nan")], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="n <= m"):
        hard_assignment(torch.rand(3, 2))


# ----------------------------------------------------------------------------------------------
# Invariances (float64 with a tight tolerance, so "equal" means equal to ~1e-9)


@FAST
@given(seed=seeds, n=st.integers(1, 10), m=st.integers(1, 10))
def test_plan_unchanged_by_row_and_column_constants(seed, n, m):
    g = _gen(seed)
    C = torch.rand(n, m, generator=g, dtype=torch.float64)
    r = torch.randn(n, generator=g, dtype=torch.float64) * 3
    c = torch.randn(m, generator=g, dtype=torch.float64) * 3
    p0 = sinkhorn(C, epsilon=0.2).plan
    p1 = sinkhorn(C + r[:, None] + c[None, :], epsilon=0.2).plan
    torch.testing.assert_close(p1, p0, rtol=1e-7, atol=1e-12)


@FAST
@given(seed=seeds, n=st.integers(1, 10), m=st.integers(1, 10))
def test_transpose_symmetry(seed, n, m):
    C = torch.rand(n, m, generator=_gen(seed), dtype=torch.float64)
    p = sinkhorn(C, epsilon=0.1).plan
    pt = sinkhorn(C.T, epsilon=0.1).plan
    torch.testing.assert_close(pt, p.T, rtol=1e-7, atol=1e-12)


@FAST
@given(seed=seeds, n=st.integers(1, 10), scale=st.floats(1e-3, 1e3))
def test_scaling_cost_and_epsilon_together(seed, n, scale):
    C = torch.rand(n, n + 1, generator=_gen(seed), dtype=torch.float64)
    p = sinkhorn(C, epsilon=0.1).plan
    ps = sinkhorn(C * scale, epsilon=0.1 * scale).plan
    torch.testing.assert_close(ps, p, rtol=1e-7, atol=1e-12)


@FAST
@given(seed=seeds, n=st.integers(2, 32), eps=st.floats(0.2, 0.5))
def test_float32_agrees_with_float64(seed, n, eps):
    # eps >= 0.2 max C: smaller eps on tiny random problems can need 1e4+ iterations (plans close to
    # a permutation contract slowly; POT needs as many), which is not what this test is about
    C = torch.rand(n, n, generator=_gen(seed), dtype=torch.float64)
    r64 = sinkhorn(C, epsilon=eps)
    r32 = sinkhorn(C.float(), epsilon=eps)
    assert r64.converged and r32.converged
    # entries carry ~u * |C|/eps relative rounding (u = 6e-8); allow 100x that, and 10x tol
    rel = 100 * 6e-8 * 0.5 / eps + 10 * r32.tol
    err = (r32.plan.double() - r64.plan).abs().max() / r64.plan.max()
    assert err <= rel


# ----------------------------------------------------------------------------------------------
# Robustness


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_epsilon_no_nan(dtype):
    # cost/eps ~ 1e4: the kernel exp(-C/eps) is 0 in every float format, the log domain is fine
    C = (0.5 + 0.5 * torch.rand(16, 16, generator=_gen(3), dtype=torch.float64)).to(dtype)
    assert torch.exp(-C / 1e-4).max() == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = sinkhorn(C, epsilon=1e-4, max_iter=3000)
    assert torch.isfinite(r.plan).all()
    assert math.isfinite(r.marginal_error)
    ours = [w for w in caught if issubclass(w.category, SinkhornWarning)]
    if r.converged:
        assert not ours and r.marginal_error <= r.tol
    else:
        assert len(ours) == 1 and "did not converge" in str(ours[0].message)
        assert r.marginal_error > r.tol
    # whatever the verdict, the plan is a near-permutation close to the exact assignment
    assert torch.equal(hard_assignment(-r.plan), hard_assignment(C))


def test_batch_solves_each_problem_as_alone_and_reports_the_worst_marginal_error():
    g = _gen(4)
    n, m = 5, 7
    C = torch.rand(3, 2, n, m, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0])[:, None, None]
    a, b = _uniform(n), _uniform(m)
    r = sinkhorn(C, epsilon=0.3)
    assert r.plan.shape == (3, 2, n, m)
    assert r.converged
    errors = []
    for i in range(3):
        for j in range(2):
            ri = sinkhorn(C[i, j], epsilon=0.3)
            torch.testing.assert_close(r.plan[i, j], ri.plan, rtol=1e-7, atol=1e-12)
            P = r.plan[i, j]
            errors.append(max(float((P.sum(-1) - a).abs().sum()), float((P.sum(-2) - b).abs().sum())))
    assert r.marginal_error == pytest.approx(max(errors), rel=1e-6)  # batch reports the max, not a mean


def test_batched_converged_only_if_all_converged():
    g = _gen(5)
    C = torch.stack([torch.rand(6, 6, generator=g) * 1e-3, torch.rand(6, 6, generator=g)])
    with pytest.warns(SinkhornWarning):
        r = sinkhorn(C, epsilon=0.05, max_iter=3, eps_scaling=None)
    assert not r.converged
    alone = sinkhorn(C[0], epsilon=0.05, max_iter=3, eps_scaling=None)  # easy one converges alone
    assert alone.converged and r.marginal_error > r.tol


def test_non_convergence_warns_or_raises():
    C = torch.rand(20, 20, generator=_gen(6))
    with pytest.warns(SinkhornWarning, match="did not converge"):
        r = sinkhorn(C, epsilon=1e-3, max_iter=2)
    assert r.converged is False and r.iterations == 2 and r.marginal_error > r.tol
    with pytest.raises(SinkhornError, match="did not converge"):
        sinkhorn(C, epsilon=1e-3, max_iter=2, strict=True)
    assert issubclass(SinkhornWarning, RuntimeWarning)


def test_tol_below_float32_floor_is_reported_not_hidden():
    C = torch.rand(64, 64, generator=_gen(7))
    with pytest.warns(SinkhornWarning, match="rounding floor"):
        r = sinkhorn(C, epsilon=1 / 280, tol=1e-9, max_iter=500)
    assert not r.converged and r.marginal_error > 1e-9


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_cost_raises(bad):
    C = torch.rand(4, 4)
    C[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        sinkhorn(C, epsilon=0.1)


def test_input_validation():
    C = torch.rand(4, 5)
    cases = [
        (dict(cost=torch.rand(4), epsilon=0.1), "shape"),
        (dict(cost=C, epsilon=0.0), "epsilon"),
        (dict(cost=C, epsilon=-1.0), "epsilon"),
        (dict(cost=C, epsilon=float("nan")), "epsilon"),
        (dict(cost=C, epsilon=float("inf")), "epsilon"),
        (dict(cost=C, epsilon=0.1, tol=0.0), "tol"),
        (dict(cost=C, epsilon=0.1, max_iter=0), "max_iter must be an integer >= 1"),
        (dict(cost=C, epsilon=0.1, max_iter=2.5), "max_iter must be an integer >= 1"),
        (dict(cost=C, epsilon=0.1, eps_scaling=2.0), "eps_scaling"),
        (dict(cost=C, epsilon=0.1, check_every=0), "check_every"),
        (dict(cost=torch.rand(0, 4, 5), epsilon=0.1), "non-empty batch"),
        (dict(cost=torch.rand(2, 0, 5), epsilon=0.1), "n, m >= 1"),
        # the iteration would overflow: |C|/eps beyond float32's precision, then its range
        (dict(cost=C, epsilon=1e-9), r"too small.*float32.*pass a float64 cost"),
        (dict(cost=C, epsilon=1e-45), "too small"),
        (dict(cost=C.double(), epsilon=1e-18), r"too small.*float64.*use epsilon >="),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            sinkhorn(**kwargs)
        assert "\n" not in str(info.value) and str(info.value).startswith("sinkhorn: ")  # one line, says where


@pytest.mark.parametrize("ratio", [1e6, 1e7])
def test_huge_cost_over_eps_in_float32_is_not_converged_and_says_float64(ratio):
    # max|C - centre|/eps of 1e6..1e7: float32's plan cannot get near a transport plan (its rounding
    # floor is ~ u * ratio ~ 0.03..0.3). The default tol must not grow with the ratio to call that
    # converged; the verdict is False, with the measured error, and the message says float64.
    C = torch.rand(32, 32, generator=_gen(12))
    eps = float(C.max() - C.min()) / 2 / ratio
    with pytest.warns(SinkhornWarning, match="float64") as caught:
        r = sinkhorn(C, epsilon=eps, max_iter=300)
    assert r.tol <= 1e-4 and not r.converged and r.marginal_error > r.tol
    assert "float32 cannot get there" in str(caught[0].message) and len(str(caught[0].message).splitlines()) == 1
    with pytest.raises(SinkhornError, match="pass a float64 cost"):
        sinkhorn(C, epsilon=eps, max_iter=300, strict=True)


def _real_like_cost(n: int, seed: int) -> torch.Tensor:
    # Like adjacent layers' weight rows: cdist of rows against a permuted copy sharing 30 % of their
    # variance; at range/eps = 30 plain Sinkhorn needs ~2700 iterations to 1e-6 (float64)
    g = _gen(seed)
    x = torch.randn(n, 64, generator=g, dtype=torch.float64) * 0.02
    shuffled = x[torch.randperm(n, generator=g)]
    y = 0.3**0.5 * shuffled + 0.7**0.5 * torch.randn(n, 64, generator=g, dtype=torch.float64) * 0.02
    return torch.cdist(x, y)


def test_float32_stalled_above_tol_finishes_in_float64():
    # range/eps = 300: float32's rounding floor (~5e-6) is above tol, float64's is not. The solver
    # notices the stall, finishes in float64 (result.dtype), and returns a float32 plan that meets tol.
    C = _real_like_cost(64, 3)
    eps = float(C.max() - C.min()) / 300
    ref = sinkhorn(C, epsilon=eps, tol=1e-10, max_iter=5000)
    r = sinkhorn(C.float(), epsilon=eps, tol=1e-6, max_iter=3000)
    assert ref.converged and r.converged and r.dtype == torch.float64 and r.plan.dtype == torch.float32
    uniform = _uniform(64)
    assert _l1(r.plan.sum(-1), uniform) <= 1e-6 and _l1(r.plan.sum(-2), uniform) <= 1e-6
    assert float((r.plan.double() - ref.plan).abs().sum()) <= 20 * 1e-6


def test_real_like_cost_matches_float64_reference_plan():
    C = _real_like_cost(96, 13)
    eps = float(C.max() - C.min()) / 30
    ref = sinkhorn(C, epsilon=eps, tol=1e-11, max_iter=20000)  # float64, marginals to 1e-11
    assert ref.converged
    plain = sinkhorn(C, epsilon=eps, tol=1e-6, max_iter=20000, check_every=1)  # blocks of 1: w = 1 throughout
    for dtype, tol in ((torch.float64, 1e-8), (torch.float32, 1e-5)):
        r = sinkhorn(C.to(dtype), epsilon=eps, tol=tol, max_iter=5000)
        assert r.converged and r.marginal_error <= tol
        uniform = _uniform(96)
        assert _l1(r.plan.sum(-1), uniform) <= tol and _l1(r.plan.sum(-2), uniform) <= tol
        # the plan is the float64 solution's: L1 distance of unit-mass plans within 20 x tol
        assert float((r.plan.double() - ref.plan).abs().sum()) <= 20 * tol
    # over-relaxation pays on this cost: far fewer iterations than plain Sinkhorn to a tighter tol
    fast = sinkhorn(C, epsilon=eps, tol=1e-6, max_iter=20000)
    assert plain.converged and fast.converged and fast.iterations * 3 < plain.iterations


def _numerics_switches():
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision(), torch.get_default_dtype(), torch.is_grad_enabled())


def _solve_with_tf32_enabled(C: torch.Tensor):
    # The caller turns TF32 on; returns the result and the switches as the solver left them.
    saved = _numerics_switches()
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("medium")
        r = sinkhorn(C, epsilon=0.05)
        return r, _numerics_switches()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def test_solver_leaves_the_callers_numerics_switches_as_set():
    # No global numerics switches: the solver neither resets a caller's TF32 choice nor sets its own.
    C = torch.rand(32, 48, generator=_gen(9))
    before = _numerics_switches()
    _, during = _solve_with_tf32_enabled(C)
    assert during == (True, True, "medium", *before[3:])
    sinkhorn(C, epsilon=0.05)
    assert _numerics_switches() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 only changes CUDA matmuls; on a CPU this cannot fail")
def test_tf32_enabled_by_caller_leaves_the_cuda_plan_unchanged():
    # The solver's iterations are log-sum-exps, not matmuls, so TF32 must not change a bit of the plan.
    C = torch.rand(32, 48, generator=_gen(9)).cuda()
    base = sinkhorn(C, epsilon=0.05)
    r, _ = _solve_with_tf32_enabled(C)
    assert torch.equal(r.plan, base.plan)


# ----------------------------------------------------------------------------------------------
# Plan post-processing


@FAST
@given(seed=seeds, n=st.integers(1, 16))
def test_column_normalized_permutation_plan_and_sharpness(seed, n):
    g = _gen(seed)
    perm = torch.randperm(n, generator=g)
    permutation = torch.eye(n)[perm]  # permutation[i, perm[i]] = 1
    plan = permutation / n  # the OT plan of a permutation with uniform marginals
    assert torch.equal(column_normalized(plan), permutation)
    W = torch.randn(n, 5, generator=g)
    aligned = column_normalized(plan) @ W
    assert torch.equal(aligned, W[perm])
    assert torch.linalg.norm(aligned) == pytest.approx(float(torch.linalg.norm(W)), rel=1e-6)
    assert float(plan_sharpness(plan)) == pytest.approx(1.0)
    uniform = torch.full((n, n), 1.0 / (n * n))
    assert float(plan_sharpness(uniform)) == pytest.approx(1.0 / n)
    batch = torch.stack([plan, uniform])
    torch.testing.assert_close(plan_sharpness(batch), torch.tensor([1.0, 1.0 / n]))
    rectangular = torch.full((n, n + 2), 1.0 / (n * (n + 2)))  # a b^T, n x m: columns sum to 1
    torch.testing.assert_close(column_normalized(rectangular).sum(-2), torch.ones(n + 2))
    assert float(plan_sharpness(rectangular)) == pytest.approx(1.0 / n)


def test_sharpness_grows_as_epsilon_shrinks():
    C, _ = _planted(10, 12)
    eps = [e * float(C.mean()) for e in (10.0, 1.0, 0.3, 0.1)]
    s = [float(plan_sharpness(sinkhorn(C, epsilon=e, max_iter=10000).plan)) for e in eps]
    assert s == sorted(s) and s[0] < 0.2 and s[-1] > 0.9
