"""sinkhorn() against POT's sinkhorn_log on the real costs growth solves, at a common accuracy.

    python benchmarks/bench_sinkhorn_real.py                      # every SmolLM2 cost below
    python benchmarks/bench_sinkhorn_real.py --only issue/gate_raw --before /tmp/sinkhorn_before.py

Costs (SmolLM2-135M fixture, base layers --layer and --layer + 1, captured from opt_deus's own
transport() calls): `paper/*` are the q, k, v, o, gate, up, down row costs of --align paper at
epsilon 0.06 (absolute); `structured/*` the heads, value dims, groups and MLP units of --align
structured at its relative epsilon 0.005 (cost / mean cost); `issue/gate_raw` is torch.cdist of the
two layers' gate_proj rows at 0.06, the case of issue 14 (range/eps = 215).

For each cost, in one process, one thread, alternating:
  1. a float64 reference plan (ours, float64, tol --ref-tol; cached under ~/.cache/opt-deus);
  2. POT ot.bregman.sinkhorn_log on float32 torch tensors, numItermax --pot-iters (the paper's call);
  3. ours (and --before, an older sinkhorn.py imported by path) with tol = POT's achieved error,
     then at growth's tol 1e-4.
Accuracy of every plan: marginal error max(|P1 - a|_1, |P^T1 - b|_1) / sum(a) in float64, and the
L1 distance |P - P_ref|_1 (plans have unit mass) to the reference.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from opt_deus_core import sinkhorn as S  # noqa: E402
from opt_deus_tool.hardware import cpu_model  # noqa: E402


def load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def real_costs(folder: Path, layer: int) -> dict[str, tuple[torch.Tensor, float]]:
    # The (cost, epsilon) pairs opt_deus.transport() receives when fusing base layers layer and
    # layer + 1, in call order, for both alignments (relative costs already divided by their mean).
    from opt_deus_core import opt_deus as O
    from safetensors import safe_open

    from opt_deus_tool.hf_config import args_from_config
    args = args_from_config(json.loads((folder / "config.json").read_text()))
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        def block(i):
            p = f"model.layers.{i}."
            return {k[len(p):]: f.get_tensor(k).float() for k in f.keys() if k.startswith(p)}
        A, B = block(layer), block(layer + 1)
    captured, real = [], O.transport

    def spy(cost, epsilon, relative, **solver):
        scale = cost.mean(dim=(-2, -1), keepdim=True).clamp_min(1e-30) if relative else 1.0
        captured.append(((cost / scale).clone(), epsilon))
        return real(cost, epsilon, relative, **solver)

    costs = {}
    O.transport = spy
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for align, names in (("paper", "q k v o gate up down"),
                                 ("structured", "heads value_dims groups mlp_units")):
                captured.clear()
                O.make_new_block([A, B], args, O.GrowthOptions(align=align))
                costs.update({f"{align}/{name}": c for name, c in zip(names.split(), captured)})
    finally:
        O.transport = real
    costs["issue/gate_raw"] = (torch.cdist(A["mlp.gate_proj.weight"], B["mlp.gate_proj.weight"]), 0.06)
    return costs


def accuracy(plan: torch.Tensor, ref: torch.Tensor | None) -> dict:
    P = plan.double()
    n, m = P.shape[-2:]
    row = (P.sum(-1) - 1 / n).abs().sum(-1)
    col = (P.sum(-2) - 1 / m).abs().sum(-1)
    out = {"marginal_error": float(torch.maximum(row, col).max())}
    if ref is not None:
        out["l1_to_ref"] = float((P - ref).abs().sum((-2, -1)).max())
    return out


def reference(name: str, C: torch.Tensor, eps: float, tol: float, max_iter: int) -> tuple[torch.Tensor, dict]:
    key = hashlib.sha256(C.double().numpy().tobytes() + repr((eps, tol, max_iter)).encode()).hexdigest()[:16]
    path = Path.home() / ".cache" / "opt-deus" / "bench-sinkhorn" / f"{name.replace('/', '_')}-{key}.pt"
    if path.exists():
        return torch.load(path), {"cached": str(path)}
    t0 = time.perf_counter()
    r = S.sinkhorn(C.double(), epsilon=eps, tol=tol, max_iter=max_iter)
    info = {"seconds": time.perf_counter() - t0, "iterations": r.iterations, "marginal_error": r.marginal_error}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(r.plan, path)
    return r.plan, info


def run_pot(C: torch.Tensor, eps: float, iters: int) -> tuple[torch.Tensor, dict]:
    import ot
    n, m = C.shape[-2:]
    a, b = torch.full((n,), 1 / n), torch.full((m,), 1 / m)
    flat = C.reshape(-1, n, m)
    t0 = time.perf_counter()
    plans, niter = [], 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c in flat:  # POT solves one problem at a time
            P, log = ot.bregman.sinkhorn_log(a, b, c, eps, numItermax=iters, log=True)
            stopped = len(log["err"]) and float(log["err"][-1]) < 1e-9
            niter = max(niter, 10 * (len(log["err"]) - 1) + 1 if stopped else iters)
            plans.append(P)
    return torch.stack(plans).reshape(C.shape), {"seconds": time.perf_counter() - t0, "iterations": niter}


def run_ours(module, C: torch.Tensor, eps: float, tol: float, max_iter: int) -> tuple[torch.Tensor, dict]:
    t0 = time.perf_counter()
    r = module.sinkhorn(C, epsilon=eps, tol=tol, max_iter=max_iter)
    return r.plan, {"seconds": time.perf_counter() - t0, "iterations": r.iterations, "converged": r.converged}


def run_easy(solvers, repeats: int) -> list[dict]:
    # The easy problem of bench_sinkhorn.py: cdist of two independent 1024 x 1024 N(0, 0.02^2) matrices,
    # epsilon 0.06 (range/eps 3.4). Solvers alternate within each repeat; medians.
    g = torch.Generator().manual_seed(0)
    C = torch.cdist(torch.randn(1024, 1024, generator=g) * 0.02, torch.randn(1024, 1024, generator=g) * 0.02)
    rows = []
    for tol in (None, 1e-6):
        times = {name: [] for name, _ in solvers}
        for _ in range(repeats + 1):  # the first round warms up
            for name, module in solvers:
                t0 = time.perf_counter()
                r = module.sinkhorn(C, epsilon=0.06, tol=tol)
                times[name].append(time.perf_counter() - t0)
                info = {"iterations": r.iterations, "marginal_error": r.marginal_error, "tol": r.tol}
                times.setdefault(name + "_info", info)
        for name, _ in solvers:
            median = sorted(times[name][1:])[repeats // 2]
            rows.append({"solver": name, "tol": tol, "median_s": median, **times[name + "_info"]})
            print(f"easy 1024x1024 range/eps 3.4, tol {tol}: {name} {median * 1e3:.1f} ms median of {repeats}, "
                  f"{rows[-1]['iterations']} it, err {rows[-1]['marginal_error']:.1e} (load {os.getloadavg()[0]:.1f})")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", type=Path, default=None,
                   help="HF folder of the real costs, e.g. the SmolLM2 the tests convert into ~/.cache/opt-deus/")
    p.add_argument("--layer", type=int, default=20, help="fuse base layers LAYER and LAYER + 1")
    p.add_argument("--only", default=None, help="comma-separated cost names (default: all)")
    p.add_argument("--pot-iters", type=int, default=10000, help="POT numItermax (the paper's call: 10000)")
    p.add_argument("--before", default=None, help="path of an older sinkhorn.py to time alongside")
    p.add_argument("--max-iter", type=int, default=20000, help="our max_iter at POT's accuracy")
    p.add_argument("--ref-tol", type=float, default=1e-8)
    p.add_argument("--ref-max-iter", type=int, default=5000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--easy", action="store_true", help="only the easy random problem of bench_sinkhorn.py")
    flags = p.parse_args(argv)
    torch.set_num_threads(flags.threads)
    # A solve that stops short is reported in the tables (iterations, error), not warned about (either solver).
    warnings.filterwarnings("ignore", message="sinkhorn did not converge")
    solvers = [("ours", S)] + ([("before", load_module(flags.before, "sinkhorn_before"))] if flags.before else [])
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores, torch threads {flags.threads}, torch {torch.__version__}")
    if flags.easy:
        results = {"cpu": cpu_model(), "threads": flags.threads, "easy": run_easy(solvers, 9)}
        if flags.json:
            Path(flags.json).write_text(json.dumps(results, indent=1))
        return
    if flags.base is None:
        p.error("--base is required (a Hugging Face LLaMA folder) unless --easy")
    costs = real_costs(flags.base, flags.layer)
    names = flags.only.split(",") if flags.only else list(costs)
    results = {"cpu": cpu_model(), "threads": flags.threads, "layer": flags.layer, "pot_iters": flags.pot_iters,
               "costs": {}}
    for name in names:
        C, eps = costs[name]
        spread = float(C.amax() - C.amin())
        ref, ref_info = reference(name, C, eps, flags.ref_tol, flags.ref_max_iter)
        row = {"shape": list(C.shape), "epsilon": eps, "range_over_eps": spread / eps, "reference": ref_info,
               "load_before": os.getloadavg()[0]}
        plan, info = run_pot(C, eps, flags.pot_iters)
        row["pot"] = {**info, **accuracy(plan, ref)}
        target = row["pot"]["marginal_error"]
        row["target_tol"] = target
        # Ours at POT's accuracy, then at growth's tol, alternating with --before.
        for tol_name, tol in (("at_pot", target), ("at_1e-4", 1e-4)):
            for solver_name, module in solvers:
                plan, info = run_ours(module, C, eps, tol, flags.max_iter)
                row[f"{solver_name}_{tol_name}"] = {**info, **accuracy(plan, ref)}
        row["load_after"] = os.getloadavg()[0]
        results["costs"][name] = row
        pot = row["pot"]
        line = (f"{name:22s} {tuple(C.shape)} range/eps {spread / eps:6.1f} | POT {pot['seconds']:7.2f}s "
                f"{pot['iterations']:5d} it err {pot['marginal_error']:.2e} L1 {pot['l1_to_ref']:.1e}")
        for solver_name, _ in solvers:
            o = row[f"{solver_name}_at_pot"]
            line += (f" | {solver_name} {o['seconds']:7.2f}s {o['iterations']:5d} it err {o['marginal_error']:.2e} "
                     f"L1 {o['l1_to_ref']:.1e} ({pot['seconds'] / o['seconds']:.1f}x POT)")
        print(line + f" | load {row['load_before']:.1f}->{row['load_after']:.1f}", flush=True)
        for solver_name, _ in solvers:
            o = row[f"{solver_name}_at_1e-4"]
            print(f"{'':22s} tol 1e-4: {solver_name} {o['seconds']:.2f}s {o['iterations']} it err "
                  f"{o['marginal_error']:.2e} L1 {o['l1_to_ref']:.1e}", flush=True)
        if flags.json:
            Path(flags.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
