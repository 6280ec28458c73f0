"""Benchmark sinkhorn.py: CPU against POT, and GPU per-iteration time against the memory floor.

    python benchmarks/bench_sinkhorn.py                  # CPU part (+ GPU part if CUDA is there)
    python benchmarks/bench_sinkhorn.py --json out.json  # also save the numbers

CPU part: cost = cdist of two independent n x dim matrices of N(0, std^2) entries (what OpT-DeUS
compares: rows of two weight matrices), uniform marginals, epsilon = 0.06. Ours is timed to a
relative L1 marginal error <= tol; POT is called the way the paper's code calls it,
ot.sinkhorn(a, b, C, reg=0.06, method='sinkhorn_log', numItermax=10000) on the same float32
torch tensors, plus two cheap POT variants for context. Every plan is scored with the same
metric, in float64: max(|P 1 - a|_1, |P^T 1 - b|_1) / sum(a). POT is optional (pip install pot).

GPU part (only with CUDA): per-iteration time at n = m = 14336 of the eager loop, the compiled
loop and the bf16-cost variants, against the memory floor of one iteration (reading the cost
once per half-step: 2 n^2 elements), with the bandwidth measured by a device-to-device copy.
sinkhorn() has no compile option (issue 29: no measured gain kept it); `compiled_iterations`
below compiles its iteration blocks from outside, to measure whether one would pay.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from opt_deus_core import sinkhorn as S  # noqa: E402
from opt_deus_tool.hardware import cpu_model  # noqa: E402


def marginal_error(plan: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    P = plan.double()
    a, b = a.double(), b.double()
    row = (P.sum(-1) - a).abs().sum() / a.sum()
    col = (P.sum(-2) - b).abs().sum() / a.sum()
    return float(torch.maximum(row, col))


@contextlib.contextmanager
def compiled_iterations(check_every: int = 10, backend: str = "inductor"):
    """Inside it, sinkhorn() runs its full blocks of check_every iterations through
    torch.compile(sinkhorn._iterate), w passed as a tensor so that one graph serves every w: what
    sinkhorn(compile=True) did before issue 29 removed the option."""
    eager = S._iterate
    compiled = torch.compile(eager, dynamic=False, backend=backend)

    def step(f, C, CT, log_a, log_b, a, inv_eps, k, g=None, omega=1.0):
        omega = torch.tensor(omega, dtype=C.dtype, device=C.device)
        return (compiled if k == check_every else eager)(f, C, CT, log_a, log_b, a, inv_eps, k, g, omega)
    S._iterate = step
    try:
        yield
    finally:
        S._iterate = eager


def timed(fn, repeats: int) -> tuple[float, list[float], object]:
    out = fn()  # warm-up (allocator, first-call dispatch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


# ----------------------------------------------------------------------------------------------
# CPU: ours against POT


def run_cpu(flags) -> dict:
    g = torch.Generator().manual_seed(flags.seed)
    X = torch.randn(flags.n, flags.dim, generator=g) * flags.std
    Y = torch.randn(flags.n, flags.dim, generator=g) * flags.std
    C = torch.cdist(X, Y)  # (n, n) float32
    n = flags.n
    a = torch.full((n,), 1.0 / n)
    b = torch.full((n,), 1.0 / n)
    res: dict = {
        "n": n,
        "dim": flags.dim,
        "std": flags.std,
        "epsilon": flags.eps,
        "tol": flags.tol,
        "cost_min": float(C.min()),
        "cost_max": float(C.max()),
        "cost_range_over_eps": float(C.max() - C.min()) / flags.eps,
        "threads": torch.get_num_threads(),
    }
    print(f"cost: cdist of two {n}x{flags.dim} N(0, {flags.std}^2) matrices, range "
          f"[{res['cost_min']:.4f}, {res['cost_max']:.4f}], range/eps = {res['cost_range_over_eps']:.2f}")

    rows = []
    med, times, r = timed(lambda: S.sinkhorn(C, epsilon=flags.eps, tol=flags.tol), flags.repeats)
    ours = r.plan
    rows.append(dict(name="ours (eps-scaling, eager)", time_s=med, times_s=times, iterations=r.iterations,
                     marginal_error=marginal_error(r.plan, a, b), converged=r.converged))
    med, times, r = timed(lambda: S.sinkhorn(C, epsilon=flags.eps, tol=flags.tol, eps_scaling=None), flags.repeats)
    rows.append(dict(name="ours (no eps-scaling)", time_s=med, times_s=times, iterations=r.iterations,
                     marginal_error=marginal_error(r.plan, a, b), converged=r.converged,
                     max_abs_plan_diff_vs_ours=float((r.plan - ours).abs().max())))
    # per-iteration cost of ours: a fixed number of iterations (tol unreachable on purpose)
    k = 50
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", S.SinkhornWarning)
        med_k, _, _ = timed(lambda: S.sinkhorn(C, epsilon=flags.eps, tol=1e-30, max_iter=k, eps_scaling=None),
                            max(1, flags.repeats // 2))
    res["ours_per_iteration_s"] = med_k / k

    try:
        import ot
    except ImportError:
        ot = None
        print("POT not installed (pip install pot): skipping the POT comparison")
    if ot is not None and not flags.skip_pot:
        res["pot_version"] = ot.__version__
        variants = [
            ("POT sinkhorn_log, torch f32 (paper's call)", a, b, C, dict(method="sinkhorn_log"), flags.pot_max_iter),
            ("POT sinkhorn_log, numpy f64", a.double().numpy(), b.double().numpy(), C.double().numpy(),
             dict(method="sinkhorn_log"), flags.pot_max_iter),
            ("POT sinkhorn_knopp, torch f32", a, b, C, dict(method="sinkhorn"), flags.pot_max_iter),
            # POT's default stopThr=1e-9 (L2 norm of its column error) is out of float32's reach,
            # so the paper's call always runs numItermax iterations; this one stops like we do.
            (f"POT sinkhorn_log, torch f32, stopThr={flags.pot_matched_thr:g}", a, b, C,
             dict(method="sinkhorn_log", stopThr=flags.pot_matched_thr), flags.pot_max_iter),
        ]
        if flags.pot_only_paper:
            variants = variants[:1]
        for name, pa, pb, pC, kw, it in variants:
            ot.sinkhorn(pa, pb, pC, reg=flags.eps, numItermax=2, warn=False, **kw)  # warm-up
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                P, log = ot.sinkhorn(pa, pb, pC, reg=flags.eps, numItermax=it, log=True, **kw)
            dt = time.perf_counter() - t0
            P = torch.as_tensor(P)
            err = log.get("err", [])
            rows.append(dict(name=name, time_s=dt, iterations=int(log.get("niter", -1)),
                             marginal_error=marginal_error(P, a, b),
                             pot_own_err_last=float(err[-1]) if len(err) else None,
                             max_abs_plan_diff_vs_ours=float((P.double() - ours.double()).abs().max())))
            print(f"  ran {name}: {dt:.2f} s")
        paper = rows[2]
        res["speedup_vs_paper_call"] = paper["time_s"] / rows[0]["time_s"]
        if len(rows) > 3:
            res["speedup_vs_pot_log_f64"] = rows[3]["time_s"] / rows[0]["time_s"]
            res["speedup_vs_pot_log_matched_stop"] = rows[5]["time_s"] / rows[0]["time_s"]
        res["plan_max_entry"] = float(ours.max())

    if not flags.skip_assignment:
        t0 = time.perf_counter()
        perm = S.hard_assignment(C)
        res["hard_assignment_s"] = time.perf_counter() - t0
        res["hard_assignment_cost"] = float(C[torch.arange(n), perm].sum())
        res["plan_sharpness"] = float(S.plan_sharpness(ours))

    res["rows"] = rows
    print(f"\nCPU, {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
          + (f", POT {res['pot_version']}" if "pot_version" in res else ""))
    print(f"{'solver':50s} {'time':>10s} {'iters':>6s} {'marg. err':>10s} {'max|P-ours|':>12s}")
    for row in rows:
        d = row.get("max_abs_plan_diff_vs_ours")
        print(f"{row['name']:50s} {row['time_s']:9.4f}s {row['iterations']:6d} {row['marginal_error']:10.2e} "
              f"{'' if d is None else f'{d:12.2e}'}")
    print(f"ours: median of {flags.repeats} runs (min {min(rows[0]['times_s']) * 1e3:.1f} ms); "
          f"per iteration {res['ours_per_iteration_s'] * 1e3:.2f} ms")
    if "speedup_vs_paper_call" in res:
        print(f"speed-up vs the paper's POT call: {res['speedup_vs_paper_call']:.0f}x"
              f" (plan entries ~{res['plan_max_entry']:.2e})")
    if "speedup_vs_pot_log_f64" in res:
        print(f"speed-up vs POT sinkhorn_log in float64: {res['speedup_vs_pot_log_f64']:.1f}x; "
              f"vs POT sinkhorn_log f32 stopping at a matched error: "
              f"{res['speedup_vs_pot_log_matched_stop']:.1f}x")
    if "hard_assignment_s" in res:
        print(f"hard_assignment (exact, n={n}): {res['hard_assignment_s']:.2f} s; "
              f"plan_sharpness of ours: {res['plan_sharpness']:.4f}")
    return res


# ----------------------------------------------------------------------------------------------
# GPU: per-iteration time against the memory floor


def cuda_time(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def run_gpu(flags) -> dict:
    dev = torch.device("cuda")
    n, k = flags.gpu_n, flags.gpu_block
    res: dict = {"device": torch.cuda.get_device_name(dev), "n": n, "block_iterations": k}

    # Bandwidth: device-to-device copy of a large buffer (read + write each byte once).
    src = torch.empty(flags.copy_gib * 2**30 // 4, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), flags.warmup, flags.repeats)
    bw = 2 * src.numel() * 4 / t
    res["copy_bandwidth_GBps"] = bw / 1e9
    del src, dst

    g = torch.Generator(device=dev).manual_seed(flags.seed)
    X = torch.randn(n, flags.gpu_dim, generator=g, device=dev) * flags.std
    Y = torch.randn(n, flags.gpu_dim, generator=g, device=dev) * flags.std
    C = torch.cdist(X, Y).contiguous()  # (n, n) float32; how it is made does not matter here
    del X, Y
    CT = C.T.contiguous()
    a = torch.full((n,), 1.0 / n, device=dev)
    log_a = a.log()
    f0 = torch.zeros(n, device=dev)
    inv = 1.0 / flags.eps
    C16, CT16 = C.to(torch.bfloat16), CT.to(torch.bfloat16)

    floor32 = 2 * n * n * 4 / bw  # seconds per iteration: each half-step reads the cost once
    floor16 = 2 * n * n * 2 / bw
    compiled = torch.compile(S._iterate, dynamic=False)
    variants = [
        ("eager fp32", S._iterate, C, CT, floor32),
        ("compiled fp32", compiled, C, CT, floor32),
        ("eager bf16 cost", S._iterate, C16, CT16, floor16),
        ("compiled bf16 cost", compiled, C16, CT16, floor16),
    ]
    rows = []
    for name, fn, c, ct, floor in variants:
        t = cuda_time(lambda: fn(f0, c, ct, log_a, log_a, a, inv, k), flags.warmup, flags.repeats) / k
        rows.append(dict(name=name, per_iteration_s=t, floor_s=floor, ratio_to_floor=t / floor))
    res["rows"] = rows

    # End to end through the public API (setup copies, checks and the final plan included).
    for name, mode in [("solve eager", contextlib.nullcontext), ("solve compiled", compiled_iterations)]:
        with mode():
            r = S.sinkhorn(C, epsilon=flags.eps)  # warm-up / compile
            t = cuda_time(lambda: S.sinkhorn(C, epsilon=flags.eps), 1, max(3, flags.repeats // 3))
        res[name] = dict(time_s=t, iterations=r.iterations, marginal_error=r.marginal_error, converged=r.converged)

    print(f"\nGPU, {res['device']}, torch {torch.__version__}; n = m = {n}, copy bandwidth {bw / 1e9:.0f} GB/s")
    print(f"{'variant':22s} {'ms / iter':>10s} {'floor ms':>9s} {'x floor':>8s}")
    for row in rows:
        print(f"{row['name']:22s} {row['per_iteration_s'] * 1e3:10.3f} {row['floor_s'] * 1e3:9.3f} "
              f"{row['ratio_to_floor']:8.2f}")
    for name in ("solve eager", "solve compiled"):
        s = res[name]
        print(f"{name}: {s['time_s'] * 1e3:.1f} ms, {s['iterations']} iterations, "
              f"marginal error {s['marginal_error']:.2e}, converged {s['converged']}")
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1024, help="CPU problem size n = m (default 1024)")
    p.add_argument("--dim", type=int, default=1024, help="columns of the two matrices (default 1024)")
    p.add_argument("--std", type=float, default=0.02, help="std of their entries (default 0.02)")
    p.add_argument("--eps", type=float, default=0.06, help="entropic regularisation (default 0.06)")
    p.add_argument("--tol", type=float, default=1e-6, help="our relative L1 marginal tolerance (default 1e-6)")
    p.add_argument("--seed", type=int, default=0, help="(default 0)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats of ours, median (default 7)")
    p.add_argument("--pot-max-iter", type=int, default=10000, help="POT numItermax (default 10000)")
    p.add_argument("--pot-matched-thr", type=float, default=3e-8,
                   help="stopThr of the extra POT log run (default 3e-8: its L2 column error, ~tol/sqrt(n))")
    p.add_argument("--pot-only-paper", action="store_true", help="run only the paper's POT call")
    p.add_argument("--skip-pot", action="store_true", help="skip POT even if installed")
    p.add_argument("--skip-assignment", action="store_true", help="skip timing hard_assignment")
    p.add_argument("--skip-gpu", action="store_true", help="skip the GPU part even with CUDA")
    p.add_argument("--gpu-n", type=int, default=14336, help="GPU problem size n = m (default 14336)")
    p.add_argument("--gpu-dim", type=int, default=1024, help="(default 1024)")
    p.add_argument("--gpu-block", type=int, default=10, help="iterations per timed block (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="GPU warm-up runs (default 3)")
    p.add_argument("--copy-gib", type=int, default=2, help="GiB copied to measure bandwidth (default 2)")
    p.add_argument("--json", type=Path, default=None, help="save the results as JSON here")
    flags = p.parse_args()

    # Timings on a shared machine: the load average before and after says whether others ran.
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"load average (1, 5, 15 min) before: {load}")
    out = {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_model(),
           "argv": sys.argv[1:], "load_before": load, "cpu_part": run_cpu(flags)}
    out["load_after"] = os.getloadavg() if load is not None else None
    print(f"load average after: {out['load_after']}")
    if torch.cuda.is_available() and not flags.skip_gpu:
        out["gpu_part"] = run_gpu(flags)
    else:
        print("\nGPU part skipped: " + ("--skip-gpu" if flags.skip_gpu else "no CUDA device"))
    if flags.json is not None:
        flags.json.parent.mkdir(parents=True, exist_ok=True)
        flags.json.write_text(json.dumps(out, indent=2, default=str))
        print(f"saved {flags.json}")


if __name__ == "__main__":
    main()
