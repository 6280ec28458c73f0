"""One GPU call that measures every GPU claim of the project, in under 8 minutes on one GPU.

    python benchmarks/gpu.py                      # on a machine with one CUDA GPU; writes runs/gpu/
    python benchmarks/gpu.py --tiny               # the same code at tiny shapes on the CPU (CI, < 1 min)

Sections, each in its own child process with its own time budget (a section that fails, runs out
of memory or overruns is recorded as such and the next one runs):
  hardware  the GPU's name and a device-to-device copy bandwidth, measured now;
  parity    our model against transformers' LlamaForCausalLM on the device, fp32 and bf16 weights:
            max |logit difference| (and, for scale, transformers bf16 against its own fp32);
  sinkhorn  per-iteration time at n = 14336 (the 8B MLP), eager and compiled, against the floor of
            reading the cost once per half-step at the measured bandwidth (target <= 1.5x), and a
            whole solve on a cost made like a real one (rows of a weight and a permuted, noisy copy);
  grow      an 8B-shaped random bf16 checkpoint (32 layers) written to disk, then grown 32 -> 48 by
            the streaming command line on the GPU: wall time and the child's peak host RSS
            (targets <= 2 min, <= 4 GB);
  train     a training step of the grown Llama-3.2-1B shape (24 layers, 4 x 2048 tokens, bf16
            autocast), new layers only and all layers: ours against transformers, eager and
            compiled, alternating in one process (target: ours >= 1.25x transformers eager tok/s);
  study     experiments/compare.py's GPU preset, shortened to fit (2 seeds, short budgets).
Outputs: gpu.json and gpu.md under --out. The sections reuse benchmarks/bench_train.py,
benchmarks/bench_grow.py and experiments/compare.py.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

# The project comes from its install (pip install -e .); the benchmarks beside this file are on the path as the
# script's own folder.
import bench_grow
import bench_sinkhorn
import bench_train

ROOT = Path(__file__).resolve().parents[1]

SECTIONS = ("hardware", "parity", "sinkhorn", "grow", "train", "study")
# Seconds per section on the GPU (sum 450, plus ~5 s of start-up each: under 8 minutes; estimates,
# not yet run on a GPU) and with --tiny.
BUDGETS = {"hardware": 20, "parity": 40, "sinkhorn": 90, "grow": 130, "train": 130, "study": 40}
TINY_BUDGETS = {"hardware": 30, "parity": 60, "sinkhorn": 60, "grow": 60, "train": 90, "study": 90}


@dataclasses.dataclass
class Shapes:
    # Everything a section sizes itself by; --tiny swaps in the CPU sizes.
    copy_mib: int = 2048
    # Llama-3.2-1B's shape with 4 of its 16 layers: every kind of tensor and the 128k vocabulary, a
    # quarter of the set-up time.
    parity_model: dict = dataclasses.field(default_factory=lambda: dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=4, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}, max_position_embeddings=131072))
    parity_tokens: tuple[int, int] = (2, 1024)
    sinkhorn_n: int = 14336
    sinkhorn_dim: int = 4096
    sinkhorn_block: int = 10           # iterations per timed call
    grow_preset: str = "llama-8b"      # benchmarks/bench_grow.py PRESETS
    grow_new_layers: int = 16
    # benchmarks/bench_train.py's preset (model, batch_size, block_size): Llama-3.2-1B grown 16 -> 24
    train_shape: dict = dataclasses.field(default_factory=lambda: bench_train.PRESETS["llama-3.2-1b-grown"])
    train_new_layers: int = 8          # of the preset's layers, the top gaps of the base
    train_rounds: int = 3              # alternations of (ours, transformers), each train_steps steps
    train_steps: int = 3
    train_warmup: int = 2
    compile_backend: str = "inductor"
    study_overrides: dict = dataclasses.field(default_factory=lambda: dict(
        seeds=(0, 1), base_max_steps=200, base_warmup=20, check_every=20, flat_window=100, grow_steps=60))
    study_preset: str = "gpu"


TINY = Shapes(
    copy_mib=64,
    parity_model=dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, rope_theta=500000.0,
                      rms_norm_eps=1e-5, max_position_embeddings=256),
    parity_tokens=(2, 64), sinkhorn_n=256, sinkhorn_dim=64, sinkhorn_block=5, grow_preset="micro", grow_new_layers=2,
    train_shape=dict(model=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                                max_position_embeddings=256), batch_size=2, block_size=64),
    train_new_layers=2, train_rounds=2, train_steps=1, train_warmup=1,
    # "eager": dynamo traces the same code but generates none; CI needs no C++ compiler.
    compile_backend="eager",
    study_overrides=dict(methods=("opt-paper", "avg-zero", "llama-pro"), reference=False),
    study_preset="tiny")


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_time(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of fn() after warm-up: CUDA events on a GPU, the wall clock elsewhere."""
    if device.type == "cuda":
        return bench_sinkhorn.cuda_time(fn, warmup, repeats)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, mib: int) -> float:
    # Bytes per second of a device-to-device copy (each byte read once and written once).
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = device_time(lambda: dst.copy_(src), device, 3, 10)
    return 2 * src.numel() * 4 / seconds


# ----------------------------------------------------------------------------------------------
# Sections. Each takes (shapes, device, results, context) and fills `results` (a dict saved after
# every measurement, so an overrun still leaves what was measured).


def section_hardware(shapes: Shapes, device, results, context):
    results["device"] = str(device)
    results["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    results["cuda"] = torch.version.cuda
    results["torch"] = torch.__version__
    results["python"] = platform.python_version()
    from opt_deus_tool.hardware import cpu_model
    results["cpu"] = cpu_model()
    results["cpu_cores"] = os.cpu_count()
    results["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results["copy_mib"] = shapes.copy_mib
    results["copy_bandwidth_GBps"] = copy_bandwidth(device, shapes.copy_mib) / 1e9


def section_parity(shapes: Shapes, device, results, context):
    import transformers
    from opt_deus_core.model import ModelArgs, Transformer
    from opt_deus_tool.checkpoint import hf_key
    from opt_deus_tool.hf_config import config_from_args
    args = ModelArgs(**shapes.parity_model)
    ours = Transformer(args).init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():  # non-trivial norm gains, so a swapped or missing norm shows
        for name, p in ours.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
    config = transformers.LlamaConfig(**config_from_args(args))
    config._attn_implementation = "sdpa"
    with torch.device(device):  # its own random init on the device (fast); overwritten just below
        hf = transformers.LlamaForCausalLM(config)
    missing, unexpected = hf.load_state_dict({hf_key(k): v for k, v in ours.state_dict().items()},
                                             strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    batch, length = shapes.parity_tokens
    tokens = torch.randint(0, args.vocab_size, (batch, length), generator=torch.Generator().manual_seed(2)).to(device)
    results["model"] = {"layers": args.num_hidden_layers, "hidden": args.hidden_size, "vocab": args.vocab_size}
    results["tokens"] = [batch, length]
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        ours.to(device=device, dtype=dtype)
        hf.to(device=device, dtype=dtype)
        with torch.no_grad():
            a = ours(tokens).float()
            b = hf(input_ids=tokens).logits.float()
        logits[name] = b
        results[name] = {"max_abs_logit_error": float((a - b).abs().max()),
                         "mean_abs_logit_error": float((a - b).abs().mean()),
                         "max_abs_logit": float(b.abs().max())}
        context.save()
    # For scale: what bf16 costs transformers itself.
    bf16_vs_fp32 = (logits["bfloat16"] - logits["float32"]).abs().max()
    results["bfloat16"]["transformers_bf16_vs_fp32_max_abs"] = float(bf16_vs_fp32)


def section_sinkhorn(shapes: Shapes, device, results, context):
    from opt_deus_core import sinkhorn as S
    from opt_deus_core.opt_deus import DEFAULT_EPSILON, GrowthOptions
    n, k = shapes.sinkhorn_n, shapes.sinkhorn_block
    bandwidth = context.bandwidth or copy_bandwidth(device, shapes.copy_mib)
    results.update(n=n, iterations_per_call=k, bandwidth_GBps=bandwidth / 1e9)
    g = torch.Generator(device=device).manual_seed(0)
    # The per-iteration time does not depend on the cost's values (a fixed amount of memory is read),
    # so the synthetic cost of benchmarks/bench_sinkhorn.py is used for it.
    X = torch.randn(n, shapes.sinkhorn_dim, generator=g, device=device) * 0.02
    Y = torch.randn(n, shapes.sinkhorn_dim, generator=g, device=device) * 0.02
    C = torch.cdist(X, Y).contiguous()
    del X, Y
    CT = C.T.contiguous()
    a = torch.full((n,), 1.0 / n, device=device)
    log_a, f0, inv_eps = a.log(), torch.zeros(n, device=device), 1.0 / 0.06
    floor = 2 * n * n * C.element_size() / bandwidth  # each half-step reads the cost once
    compiled = torch.compile(S._iterate, dynamic=False, backend=shapes.compile_backend)
    results["rows"] = []
    for name, fn in [("eager", S._iterate), ("compiled", compiled)]:
        seconds = device_time(lambda: fn(f0, C, CT, log_a, log_a, a, inv_eps, k), device, 2, 5) / k
        results["rows"].append({"variant": name, "per_iteration_s": seconds, "floor_s": floor,
                                "ratio_to_floor": seconds / floor})
        context.save()
    del C, CT

    # A cost like structured alignment's: rows of a weight against a permuted copy that shares 30 %
    # of its variance with it (adjacent layers are related, not equal), scaled by its mean and solved
    # at the structured default epsilon and tolerance, the way growth calls the solver.
    W = torch.randn(n, shapes.sinkhorn_dim, generator=g, device=device) * 0.02
    perm = torch.randperm(n, generator=g, device=device)
    V = 0.3 ** 0.5 * W[perm] + 0.7 ** 0.5 * torch.randn(n, shapes.sinkhorn_dim, generator=g, device=device) * 0.02
    C = torch.cdist(W, V)
    C = C / C.mean()
    del W, V
    eps, tol = DEFAULT_EPSILON["structured"], GrowthOptions().tol
    results["real_like"] = {"epsilon": eps, "tol": tol}
    warnings.simplefilter("ignore", S.SinkhornWarning)  # this child reports convergence in its results
    for name in ("eager", "compiled"):
        # compiled: the iteration blocks through torch.compile (bench_sinkhorn.compiled_iterations, what
        # sinkhorn(compile=True) was); --tiny stays compiler-free and runs it eager
        compiled = name == "compiled" and shapes.compile_backend == "inductor"
        with bench_sinkhorn.compiled_iterations() if compiled else contextlib.nullcontext():
            S.sinkhorn(C, epsilon=eps, tol=tol, max_iter=10000)  # warm-up (compilation)
            sync(device)
            t0 = time.perf_counter()
            r = S.sinkhorn(C, epsilon=eps, tol=tol, max_iter=10000)
            sync(device)
        seconds = time.perf_counter() - t0
        results["real_like"][name] = {"seconds": seconds, "iterations": r.iterations,
                                      "marginal_error": r.marginal_error, "converged": bool(r.converged),
                                      "per_iteration_s": seconds / max(1, r.iterations),
                                      "sharpness": float(S.plan_sharpness(r.plan))}
        context.save()
    del C

    # Issue 14's case at 8B shape: the paper's call (epsilon = 0.06 absolute) on the Euclidean cdist of
    # two adjacent layers' gate_proj rows, solved to POT's achieved accuracy there (tol 2e-6, float64
    # finish allowed). No real 8B weights here, so a surrogate calibrated on SmolLM2 layers 20/21 (1536 x
    # 576, docs/BENCHMARKS_SINKHORN.md): row norms log-normal with their mean 4.28 and std 1.14, each
    # second-layer row sharing 5 % of its variance with a permuted first-layer row. At SmolLM2's shape
    # that gives the real cost's min / median / max distance (2.3 / 6.0 / 14.6 against 2.3 / 5.9 / 15.2)
    # and a like solve (1644 iterations to 2e-6 against 2244; plan sharpness 0.66 against 0.30). The
    # cost is then scaled, as the weights would be, to the real range/epsilon of 215.
    eps, tol, range_over_eps = 0.06, 2e-6, 215.0
    d = shapes.sinkhorn_dim
    norms = torch.exp(math.log(4.28) - 0.26 ** 2 / 2 + 0.26 * torch.randn(2, n, 1, generator=g, device=device))
    Z = torch.randn(n, d, generator=g, device=device)
    W = norms[0] * Z / d ** 0.5
    perm = torch.randperm(n, generator=g, device=device)
    V = norms[1] * (0.05 ** 0.5 * Z[perm] + 0.95 ** 0.5 * torch.randn(n, d, generator=g, device=device)) / d ** 0.5
    del Z
    C = torch.cdist(W, V)
    C = C * (range_over_eps * eps / float(C.max() - C.min()))
    del W, V
    S.sinkhorn(C, epsilon=eps, tol=tol, max_iter=2)  # warm-up (kernels, allocator)
    sync(device)
    t0 = time.perf_counter()
    r = S.sinkhorn(C, epsilon=eps, tol=tol, max_iter=20000)
    sync(device)
    seconds = time.perf_counter() - t0
    results["issue14_gate"] = {"n": n, "epsilon": eps, "tol": tol, "range_over_epsilon": range_over_eps,
                               "seconds": seconds, "iterations": r.iterations, "marginal_error": r.marginal_error,
                               "converged": bool(r.converged), "finished_in": str(r.dtype).removeprefix("torch."),
                               "per_iteration_s": seconds / max(1, r.iterations)}
    context.save()


def section_grow(shapes: Shapes, device, results, context):
    with tempfile.TemporaryDirectory(prefix="gpu-grow-", dir=context.workdir) as tmp:
        t0 = time.perf_counter()
        base = bench_grow.make_random_checkpoint(shapes.grow_preset, Path(tmp) / "base", device=device)
        results["make_checkpoint_s"] = time.perf_counter() - t0
        results["base_bytes"] = sum(f.stat().st_size for f in (Path(tmp) / "base").glob("*.safetensors"))
        context.save()
        run = bench_grow.run_growth(base, Path(tmp) / "grown", ["--method", "opt", "--new-layers",
                                                                str(shapes.grow_new_layers), "--device", str(device)])
        results.update(preset=shapes.grow_preset, new_layers=shapes.grow_new_layers, seconds=run["seconds"],
                       peak_rss_bytes=run["peak_rss_bytes"], peak_rss_GB=run["peak_rss_bytes"] / 1e9,
                       returncode=run["returncode"], output_tail=run["output_tail"])
        if run["returncode"] != 0:
            raise RuntimeError(f"opt-deus exited with {run['returncode']}: {run['output_tail']}")
        report = json.loads((Path(tmp) / "grown" / "growth_report.json").read_text())
        results["grown_bytes"] = sum(f.stat().st_size for f in (Path(tmp) / "grown").glob("*.safetensors"))
        results["growth_report_keys"] = sorted(report)[:10]


def top_new_layers(total_layers: int, num_new: int) -> list[int]:
    # The grown model's new layers when num_new layers went into the top gaps of a base of
    # total_layers - num_new layers (opt_deus.insert_after_for "top"): a new layer after base layer
    # i sits at i + 1 + (new layers below it).
    from opt_deus_core.opt_deus import insert_after_for
    after = sorted(insert_after_for("top", total_layers - num_new, num_new))
    return [i + 1 + k for k, i in enumerate(after)]


def measure_pair(shapes: Shapes, args, spec, tokens, device, cfg, source, compile_: bool) -> dict:
    """Ours and transformers' LlamaForCausalLM, the same weights and batch, timed in alternating rounds
    (a slow spell of the machine hits both alike). Both models live only inside this call."""
    steps = {
        "ours": bench_train.bench_ours(args, spec, tokens, device, cfg, compile_, 0, 0,
                                       backend=shapes.compile_backend)[1],
        "transformers": bench_train.bench_hf(args, spec, tokens, device, cfg, source, 0, 0, compile_=compile_,
                                             backend=shapes.compile_backend)[1],
    }
    first_loss = {name: bench_train.time_steps(step, device, shapes.train_warmup, 0)[1] for name, step in steps.items()}
    times = {name: [] for name in steps}
    for _ in range(shapes.train_rounds):
        for name, step in steps.items():
            times[name] += bench_train.time_steps(step, device, 0, shapes.train_steps)[0]
    tokens_per_step = tokens.shape[0] * (tokens.shape[1] - 1)
    return {name: {"s_per_step": statistics.median(t), "tokens_per_s": tokens_per_step / statistics.median(t),
                   "first_loss": first_loss[name]} for name, t in times.items()}


def section_train(shapes: Shapes, device, results, context):
    from opt_deus_core import train
    from opt_deus_core.model import ModelArgs, Transformer
    from opt_deus_tool.hf_config import config_from_args
    preset = shapes.train_shape
    args = ModelArgs(**preset["model"])
    B, T = preset["batch_size"], preset["block_size"]
    tokens = torch.randint(0, args.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0)).to(device)
    cfg = train.TrainConfig(lr=1e-5, warmup_steps=0, grad_clip=1.0)
    new = top_new_layers(args.num_hidden_layers, shapes.train_new_layers)
    results.update(model={k: config_from_args(args)[k] for k in ("num_hidden_layers", "hidden_size", "vocab_size")},
                   batch=[B, T], new_layers=new, rounds=shapes.train_rounds, steps_per_round=shapes.train_steps,
                   groups=[])
    source = Transformer(args).init_weights(torch.Generator().manual_seed(0))  # transformers copies these weights
    # The most important comparison first (eager), so an overrun loses the least.
    for mode in ("eager", "compiled"):
        for setting, spec in (("new layers", new), ("all layers", "all")):
            group = {"setting": setting, "mode": mode}
            if context.remaining() < (60 if mode == "compiled" and device.type == "cuda" else 5):
                group["skipped"] = "out of time budget"
            else:
                group.update(measure_pair(shapes, args, spec, tokens, device, cfg, source, mode == "compiled"))
                group["speedup"] = group["ours"]["tokens_per_s"] / group["transformers"]["tokens_per_s"]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            results["groups"].append(group)
            context.save()
    eager = {g["setting"]: g for g in results["groups"] if g["mode"] == "eager" and "ours" in g}
    for g in results["groups"]:
        if "ours" in g and g["setting"] in eager:
            reference = eager[g["setting"]]["transformers"]["tokens_per_s"]
            g["ours_vs_transformers_eager"] = g["ours"]["tokens_per_s"] / reference


def section_study(shapes: Shapes, device, results, context):
    if str(ROOT) not in sys.path:  # the study's code is experiments/compare.py, in the checkout (this child only)
        sys.path.insert(0, str(ROOT))
    from experiments import compare
    config = compare.preset_config(shapes.study_preset, **{**shapes.study_overrides, "device": str(device)})
    lines = []
    summary = compare.run_compare(config, Path(context.workdir) / "study",
                                  log=lambda *a: lines.append(" ".join(map(str, a))))
    results["config"] = {k: v for k, v in dataclasses.asdict(config).items() if k != "data_dir"}
    results["reproducibility"] = summary["reproducibility"]
    results["elapsed_s"] = summary["elapsed_s"]
    results["final_loss"] = {arm: statistics.fmean(compare.final_losses(summary["seeds"], arm))
                             for arm in summary["arms"]}
    results["comparisons"] = {arm: {b: {k: v for k, v in d.items() if v is not None} for b, d in c.items()}
                              for arm, c in summary["comparisons"].items()}
    results["summary_md"] = (Path(context.workdir) / "study" / "summary.md").read_text()


# ----------------------------------------------------------------------------------------------
# Running a section (child process) and the whole call (parent)


class Context:
    def __init__(self, path: Path, results: dict, deadline: float, bandwidth: float | None, workdir: str):
        self.path, self.results, self.deadline = path, results, deadline
        self.bandwidth, self.workdir = bandwidth, workdir

    def save(self):
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.results, default=str))
        os.replace(tmp, self.path)

    def remaining(self) -> float:
        return self.deadline - time.time()


def run_section_here(name: str, shapes: Shapes, device: torch.device, out: Path, budget: float,
                     bandwidth: float | None, workdir: str) -> int:
    results: dict = {}
    context = Context(out, results, time.time() + budget, bandwidth, workdir)
    globals()[f"section_{name}"](shapes, device, results, context)
    context.save()
    return 0


def run_section_child(name: str, flags, budget: float, bandwidth: float | None, workdir: str, log) -> dict:
    """Runs one section in a child process, kills it past its budget; returns its record."""
    out = Path(workdir) / f"{name}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--section-out", str(out),
               "--budget-s", str(budget), "--workdir", workdir, "--device", flags.device]
    command += ["--tiny"] if flags.tiny else []
    command += ["--bandwidth", repr(bandwidth)] if bandwidth else []
    t0 = time.perf_counter()
    # Its own process group, so a timeout also ends what it started (the growth's child).
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=budget + 15)  # + start-up and imports
        status = "ok" if process.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        status = "timeout"
    record = {"status": status, "seconds": time.perf_counter() - t0, "budget_s": budget}
    try:
        record["results"] = json.loads(out.read_text())
    except (OSError, json.JSONDecodeError):
        record["results"] = {}
    if status != "ok":
        record["error"] = "\n".join(output.strip().splitlines()[-8:])
    log(f"{name}: {status} in {record['seconds']:.1f}s (budget {budget:.0f}s)")
    if status != "ok":
        log("  " + record["error"].replace("\n", "\n  "))
    return record


def targets(sections: dict) -> list[dict]:
    """The project's GPU targets, checked against what was measured (None: not measured)."""
    out = []

    def add(what, value, target, ok):
        out.append({"what": what, "value": value, "target": target, "met": None if value is None else bool(ok(value))})

    rows = {r["variant"]: r for r in sections.get("sinkhorn", {}).get("results", {}).get("rows", [])}
    for variant in ("eager", "compiled"):
        r = rows.get(variant)
        add(f"Sinkhorn iteration, {variant}, x memory floor", r and r["ratio_to_floor"], "<= 1.5", lambda v: v <= 1.5)
    g = sections.get("grow", {}).get("results", {})
    add("growth 32 -> 48, seconds", g.get("seconds"), "<= 120", lambda v: v <= 120)
    add("growth 32 -> 48, host peak RSS GB", g.get("peak_rss_GB"), "<= 4", lambda v: v <= 4)
    for group in sections.get("train", {}).get("results", {}).get("groups", []):
        if "ours_vs_transformers_eager" in group:
            add(f"train step, {group['setting']}, ours {group['mode']} / transformers eager tok/s",
                group["ours_vs_transformers_eager"], ">= 1.25", lambda v: v >= 1.25)
    return out


def markdown(report: dict) -> str:
    s, hw = report["sections"], report["sections"].get("hardware", {}).get("results", {})
    lines = [f"# benchmarks/gpu.py{' --tiny' if report['tiny'] else ''}: {report['finished']}", "",
             f"Device: {hw.get('gpu') or hw.get('device')}; "
             f"copy bandwidth {fmt(hw.get('copy_bandwidth_GBps'), 0)} GB/s "
             f"(device-to-device, {hw.get('copy_mib')} MiB, measured in this run); torch {hw.get('torch')}, CUDA "
             f"{hw.get('cuda')}, Python {hw.get('python')}; host {hw.get('cpu')} ({hw.get('cpu_cores')} cores, load "
             f"{hw.get('load_average')}). Total {report['total_seconds']:.0f} s.", "",
             "| section | status | seconds | budget |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['status']} | {r['seconds']:.1f} | {r['budget_s']:.0f} |" for name, r in s.items()]
    lines += ["", "## Targets", "", "| what | measured | target | met |", "|---|---|---|---|"]
    met = {None: "—", True: "yes", False: "NO"}
    lines += [f"| {t['what']} | {fmt(t['value'], 3)} | {t['target']} | {met[t['met']]} |" for t in report["targets"]]
    p = s.get("parity", {}).get("results", {})
    if "float32" in p:
        lines += ["", "## Parity with transformers", "", f"Model {p['model']}, tokens {p['tokens']}.", "",
                  "| weights | max abs logit error | mean abs | max abs logit |", "|---|---|---|---|"]
        lines += [f"| {d} | {p[d]['max_abs_logit_error']:.3g} | {p[d]['mean_abs_logit_error']:.3g} | "
                  f"{p[d]['max_abs_logit']:.3g} |" for d in ("float32", "bfloat16") if d in p]
        if "transformers_bf16_vs_fp32_max_abs" in p.get("bfloat16", {}):
            lines += ["", f"For scale, transformers bf16 against transformers fp32: max abs "
                          f"{p['bfloat16']['transformers_bf16_vs_fp32_max_abs']:.3g}."]
    k = s.get("sinkhorn", {}).get("results", {})
    if k.get("rows"):
        lines += ["", "## Sinkhorn", "",
                  f"n = m = {k['n']}, fp32 cost; floor = 2 n² x 4 bytes / {k['bandwidth_GBps']:.0f} GB/s.",
                  "", "| variant | ms / iteration | floor ms | x floor |", "|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['per_iteration_s'] * 1e3:.3f} | {r['floor_s'] * 1e3:.3f} | "
                  f"{r['ratio_to_floor']:.2f} |" for r in k["rows"]]
        rl = k.get("real_like", {})
        for name in ("eager", "compiled"):
            if name in rl:
                r = rl[name]
                lines.append(f"\nReal-like cost ({name}, epsilon {rl['epsilon']} of the mean cost, tol {rl['tol']}): "
                             f"{r['seconds']:.2f} s, {r['iterations']} iterations, "
                             f"marginal error {r['marginal_error']:.2e}, "
                             f"converged {r['converged']}, sharpness {r['sharpness']:.3f}.")
        if "issue14_gate" in k:
            r = k["issue14_gate"]
            lines.append(f"\nIssue-14 gate-like cost (epsilon {r['epsilon']}, "
                         f"range/epsilon {r['range_over_epsilon']:.0f}, tol {r['tol']}): "
                         f"{r['seconds']:.2f} s, {r['iterations']} iterations, "
                         f"marginal error {r['marginal_error']:.2e}, converged {r['converged']}, "
                         f"finished in {r['finished_in']}.")
    g = s.get("grow", {}).get("results", {})
    if "seconds" in g:
        lines += ["", "## Growth", "", f"Random {g['preset']} bf16 checkpoint ({g['base_bytes'] / 1e9:.1f} GB, "
                  f"written in {g['make_checkpoint_s']:.0f} s), grown by {g['new_layers']} layers on the device: "
                  f"{g['seconds']:.1f} s, "
                  f"host peak RSS {g['peak_rss_GB']:.2f} GB."]
    t = s.get("train", {}).get("results", {})
    if t.get("groups"):
        lines += ["", "## Training step", "", f"Model {t['model']}, batch {t['batch']}, new layers {t['new_layers']}; "
                  f"{t['rounds']} alternating rounds of {t['steps_per_round']} steps, median.", "",
                  "| setting | mode | ours tok/s | transformers tok/s | ours / transformers "
                  "| ours / transformers eager |",
                  "|---|---|---|---|---|---|"]
        for g in t["groups"]:
            if "ours" not in g:
                lines.append(f"| {g['setting']} | {g['mode']} | {g.get('skipped', '')} | | | |")
                continue
            lines.append(f"| {g['setting']} | {g['mode']} | {g['ours']['tokens_per_s']:,.0f} | "
                         f"{g['transformers']['tokens_per_s']:,.0f} | {g['speedup']:.2f} | "
                         f"{fmt(g.get('ours_vs_transformers_eager'), 2)} |")
    st = s.get("study", {}).get("results", {})
    if "summary_md" in st:
        lines += ["", "## Study (experiments/compare.py, GPU preset shortened)", "", st["summary_md"]]
    for name, r in s.items():
        if r["status"] != "ok":
            lines += ["", f"## {name}: {r['status']}", "", "```", r.get("error", ""), "```"]
    return "\n".join(lines) + "\n"


def fmt(x, digits: int) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def finite_numbers(obj) -> list[float]:
    # Every number in a JSON-like tree (booleans excluded).
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [float(obj)]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in finite_numbers(v)]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in finite_numbers(v)]
    return []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: the same code, in seconds (CI)")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma list, run in this order")
    p.add_argument("--out", default="runs/gpu", help="gpu.json and gpu.md go here")
    p.add_argument("--workdir", default=None, help="scratch space, e.g. for the 16 + 24 GB checkpoints of 'grow' "
                                                   "(None: a temporary folder)")
    p.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)  # the child process
    p.add_argument("--section-out", help=argparse.SUPPRESS)
    p.add_argument("--budget-s", type=float, default=60.0, help=argparse.SUPPRESS)
    p.add_argument("--bandwidth", type=float, default=None, help=argparse.SUPPRESS)
    flags = p.parse_args(argv)
    flags.device = flags.device or ("cpu" if flags.tiny else "cuda")
    shapes = TINY if flags.tiny else Shapes()
    if flags.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu.py: error: no CUDA device (use --tiny for the CPU check)", file=sys.stderr)
        return 2
    device = torch.device(flags.device)
    if flags.tiny:
        torch.set_num_threads(1)  # this process only: the CI machine is small and shared

    if flags.section:  # child: one section, results to --section-out
        return run_section_here(flags.section, shapes, device, Path(flags.section_out), flags.budget_s,
                                flags.bandwidth, flags.workdir)

    names = [s.strip() for s in flags.sections.split(",") if s.strip()]
    bad = [s for s in names if s not in SECTIONS]
    if bad or not names:
        print(f"gpu.py: error: --sections: unknown {bad[0] if bad else '(empty)'} (choose from {', '.join(SECTIONS)})",
              file=sys.stderr)
        return 2
    budgets = TINY_BUDGETS if flags.tiny else BUDGETS
    out = Path(flags.out)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    report = {"tiny": flags.tiny, "argv": sys.argv[1:], "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "sections": {}}
    with tempfile.TemporaryDirectory(prefix="opt-deus-gpu-", dir=flags.workdir) as workdir:
        bandwidth = None
        for name in names:
            record = run_section_child(name, flags, budgets[name], bandwidth, workdir, log)
            report["sections"][name] = record
            if name == "hardware":
                bandwidth = (record["results"].get("copy_bandwidth_GBps") or 0) * 1e9 or None
    report["total_seconds"] = time.perf_counter() - t_start
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    report["targets"] = targets(report["sections"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "gpu.md").write_text(markdown(report))
    log(markdown(report))
    log(f"wrote {out}/gpu.json and {out}/gpu.md ({report['total_seconds']:.0f} s)")
    return 0 if all(r["status"] == "ok" for r in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
