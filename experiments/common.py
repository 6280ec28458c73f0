"""Shared pieces of the experiments: the growth methods compared, output folders, tables, plots.

Nothing here runs at import. The scripts beside this file (compare.py, smollm2.py) are the entry
points; this module only keeps them short.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

from opt_deus_core.opt_deus import GrowthError, GrowthOptions, grow
from opt_deus_tool import CheckpointError, DataError
from opt_deus_tool.atomic import AtomicFolder, Interrupted, write_text_atomic
from opt_deus_tool.calibration import check_calibration
from opt_deus_tool.hardware import cpu_model

# The methods compared (the study's arms), by the name used in tables and file names -> GrowthOptions
# fields. Zero-init follows opt_deus.ZERO_INIT_DEFAULT (on for opt and llama-pro, off for avg and
# solar) except for "avg-zero", which isolates what zero-initialisation alone does to plain averaging.
# "opt-published" is the public code's computation (its float32 solver, unnormalised plans: in
# effect a block of ~B/2 on real weights); "opt-paper-unnorm" is Algorithm 1 with a working solver
# but the public code's unnormalised plan; "opt-paper" the same with the OT-fusion normalisation.
ARM_OPTIONS = {
    "opt-published": dict(method="opt", align="published"),
    "opt-paper-unnorm": dict(method="opt", align="paper", normalize_plan=False),
    "opt-paper": dict(method="opt", align="paper"),
    "opt-structured": dict(method="opt", align="structured"),
    "avg-zero": dict(method="avg", out_scale=0.0),
    "llama-pro": dict(method="llama-pro"),
    "avg": dict(method="avg"),
    "solar": dict(method="solar"),
    # Issue 21: new layers' o_proj and down_proj scaled by s = 0.1 instead of zeroed, the scale at which each of
    # these four made the smallest held-out loss increase without training (docs/RESULTS.md, layer quality).
    "avg@0.1": dict(method="avg", out_scale=0.1),
    "llama-pro@0.1": dict(method="llama-pro", out_scale=0.1),
    "opt-structured@0.1": dict(method="opt", align="structured", out_scale=0.1),
    "opt-structured-act@0.1": dict(method="opt", align="structured", cost="activations", out_scale=0.1),
    # Issue 31: LESA (Yang et al. 2025) as its paper grows (new layers as predicted, not zero-initialised), and the
    # control LLaMA Pro's users ask for (TencentARC/LLaMA-Pro #9): no growth, the base's top k layers (k = the
    # number of new layers) trained instead, for the same steps on the same data (None: grow_arm).
    "lesa": dict(method="lesa"),
    "lesa-zero": dict(method="lesa", out_scale=0.0),
    "no-growth-top-k": None,
}
CONTROL = "no-growth-top-k"
# The arms of issue 13's study (README command 1 runs them); the study adds the scaled arms (experiments/study.sh).
CLASSIC_ARMS = ("opt-published", "opt-paper-unnorm", "opt-paper", "opt-structured", "avg-zero", "llama-pro", "avg",
                "solar")
# The study's arms since issue 21: the zero-init ones and the scaled ones (s = 0.1, the best s of nearly every
# arm in experiments/layer_quality.py). Left out to fit 90 minutes, with what the earlier studies measured
# (docs/RESULTS.md): opt-published (worst zero-init arm in both parts, twice), opt-paper-unnorm (equal to
# opt-published to 4 digits), avg and solar (references that do not preserve the function: the scaled arms now
# play that part). Issue 31 adds lesa and the no-growth control and, to stay within the study's time, drops
# opt-paper (never better than opt-structured: +0.0009 nats/byte embedded, +0.0090 nats/token SmolLM2) and
# llama-pro@0.1 (no better than llama-pro: −0.0002 [−0.0008, +0.0005] embedded, +0.0096 worse on SmolLM2).
# The control goes last: with --jobs 2 each worker takes the next arm (its growth and 3 seeds) when it is free, and
# the control's steps cost two thirds of a grown arm's, so the worker that frees first takes it and the two finish
# together (the SmolLM2 part's last arm ran alone for 7 of its 50 minutes with the control fifth; docs/RESULTS.md).
STUDY_ARMS = ("opt-structured", "avg-zero", "llama-pro", "lesa", "avg@0.1", "opt-structured@0.1",
              "opt-structured-act@0.1", "no-growth-top-k")
# The embedded part runs without issue 21's s = 0.1 arms (answered there; docs/RESULTS.md keeps that run's table):
# on the AMD EPYC of issue 31 the SmolLM2 part takes ~5.1 s a step where the Intel Xeon took ~4.2, and the whole
# study has to stay within the 84 minutes measured before.
STUDY_EMBEDDED_ARMS = tuple(arm for arm in STUDY_ARMS if "@" not in arm)
# The paired comparisons: every arm against these two zero-init baselines, seed by seed.
BASELINES = ("avg-zero", "llama-pro")
# ... and each scaled arm against its zero-init arm (issue 21: does a non-zero new layer train better?).
ZERO_INIT_ARM = {"avg@0.1": "avg-zero", "llama-pro@0.1": "llama-pro", "opt-structured@0.1": "opt-structured",
                 "opt-structured-act@0.1": "opt-structured"}


class ExperimentError(ValueError):
    """A bad request (size, method, path); main() prints it on one line and exits with status 2."""


def parse_list(text: str, what: str, choices=None) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ExperimentError(f"{what}: empty list")
    if choices is not None:
        bad = [x for x in items if x not in choices]
        if bad:
            raise ExperimentError(f"{what}: unknown {bad[0]!r} (choose from {', '.join(choices)})")
    return items


def growth_options(name: str) -> GrowthOptions:
    if name not in ARM_OPTIONS:
        raise ExperimentError(f"unknown method {name!r} (choose from {', '.join(ARM_OPTIONS)})")
    return GrowthOptions(**(ARM_OPTIONS[name] or {"out_scale": 0.0}))  # the control: nothing, as zero-init


def method_available(name: str) -> bool:
    # False when this opt_deus.py does not know the method's alignment (e.g. an older one without
    # --align published): the study then runs without that arm and says so.
    try:
        growth_options(name)
    except GrowthError:
        return False
    return True


def available_methods(names, log=print) -> tuple[str, ...]:
    kept = tuple(n for n in names if method_available(n))
    for name in names:
        if name not in kept:
            log(f"note: skipping {name}: this opt_deus.py cannot build {ARM_OPTIONS[name]} "
                f"(GrowthOptions rejects it); the study runs without that arm")
    return kept


def grow_arm(model, name: str, num_new: int, position: str, calibration=None):
    """(the model an arm trains, its growth report, the layers that train: None for the run's --trainable). The
    control is an un-grown copy whose top num_new layers train."""
    if name == CONTROL:
        L = model.args.num_hidden_layers
        return copy.deepcopy(model), {"method": None, "new_layers": [], "zero_init": True}, list(range(L - num_new, L))
    return (*grow_by_name(model, name, num_new, position, calibration), None)


def grow_by_name(model, name: str, num_new: int, position: str, calibration=None):
    """grow() with one of ARM_OPTIONS. SOLAR places its repeated layers itself, so it gets no position; calibration:
    token ids (B, T) for the arms aligned by activations."""
    options = growth_options(name)
    # Only an arm aligned by activations reads calibration, checked as the tool checks it (one line, not a traceback)
    calibration = check_calibration(calibration, model.args) if options.cost == "activations" else None
    return grow(model, num_new, position=None if options.method == "solar" else position, options=options,
                calibration=calibration)


# ----------------------------------------------------------------------------------------------
# Outputs: everything goes into a hidden temporary folder, renamed into place at the end, so an
# interrupted run never leaves a half-written results folder behind.


@contextlib.contextmanager
def output_folder(out, inputs=()):
    """Yields a temporary folder beside `out`; on success it replaces `out`, on error it is deleted. inputs: (flag,
    path) pairs `out` may not be, contain or lie inside (replacing earlier results would delete them)."""
    # opt_deus_tool.atomic.AtomicFolder: the project's one temp-folder-then-rename writer (an existing folder is
    # moved aside and deleted only once the new one is in place; SIGTERM cleans up too).
    def earlier_results(path):
        return None if (path / "summary.json").is_file() else "holds files but no summary.json, so no earlier results"
    with AtomicFolder(out, overwrite=True, replaceable=earlier_results, inputs=inputs, name="--out") as folder:
        yield folder.tmp
        folder.commit()


def config_inputs(config) -> list[tuple[str, str]]:  # what a study reads, by flag: its results never replace one
    values = [(f, getattr(config, f[2:].replace("-", "_"), None)) for f in ("--data-dir", "--base", "--data",
                                                                           "--accuracy-task")]
    return [(f, v) for f, value in values for v in (value if isinstance(value, (list, tuple)) else [value]) if v]


def run_study(config, run, out, log, jobs: int) -> dict:
    """The entry point both experiments share: validate, drop arms this opt_deus.py cannot build,
    then run(config, folder, log, jobs) into a temporary folder that replaces `out` on success (or
    into no folder when `out` is None). Returns the summary (what summary.json holds)."""
    config.validate()
    config = dataclasses.replace(config, methods=available_methods(config.methods, log))
    if not config.methods:
        raise ExperimentError("no method left to run")
    if out is None:
        return run(config, None, log, jobs)
    with output_folder(out, config_inputs(config)) as tmp:
        summary = run(config, tmp, log, jobs)
    log(f"wrote {Path(out)}/summary.md, summary.json, runs/" + "".join(", " + p for p in summary["plots"]))
    return summary


def write_json(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def reproducibility(corpus_sha256: str) -> dict:
    # What a rerun must match to give the same numbers: the same seed gives other losses on another
    # Python when the data is its standard library (e.g. base held-out loss 1.4102 on 3.11, 1.3915 on
    # another version), so every output names the Python and a fingerprint of the exact token stream.
    return {"python": platform.python_version(), "torch": torch.__version__, "corpus_sha256": corpus_sha256}


def stamp_jsonl(path, record: dict):
    """Puts {"run": record} as the first line of a metrics file train() wrote."""
    write_text_atomic(path, json.dumps({"run": record}) + "\n" + Path(path).read_text())


def one_thread():
    # Worker processes of map_jobs: one torch thread each, so N workers use N cores without
    # OpenMP threads spinning against each other (this process only).
    torch.set_num_threads(1)


_report = None  # where report() sends events: the study's Progress in its process, a queue to it in a worker
_stop = None  # in map_jobs' workers: set once an item failed or the study was interrupted


def report(**event):
    """A piece of the study's work done (experiments/study_output.py: Progress), from whichever process did it;
    nothing when no study listens."""
    if _report is not None:
        _report(event)


@contextlib.contextmanager
def reporting(sink):
    # report() calls sink(event) inside the block, map_jobs' workers included.
    global _report
    previous, _report = _report, sink
    try:
        yield
    finally:
        _report = previous


class _Skipped(Exception):
    """An item a worker did not start: another had failed, or the study was interrupted."""


def _worker_start(queue, stop):
    global _report, _stop
    one_thread()
    _report, _stop = (None if queue is None else queue.put), stop


def _start_item(fn, x):
    # Items already handed to a worker (one more than the workers) can no longer be cancelled: they check `_stop`.
    if _stop.is_set():
        raise _Skipped()
    try:
        return fn(x)
    except BaseException:
        _stop.set()
        raise


def map_jobs(fn, items: list, jobs: int) -> list:
    """[fn(x) for x in items], in `jobs` worker processes when jobs > 1 (fn and the items must be
    picklable: module-level functions, dataclasses). Results keep the order of `items`; a failure,
    Ctrl-C or SIGTERM cancels the items not started. The workers' report() events reach this process's."""
    if jobs <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
    # spawn, not fork: a forked child of a process that already ran torch can deadlock in OpenMP.
    context = multiprocessing.get_context("spawn")
    # SimpleQueue: put() writes before the worker's function returns, so every event is here once its job is.
    queue = context.SimpleQueue() if _report is not None else None
    stop = context.Event()
    with ProcessPoolExecutor(max_workers=min(jobs, len(items)), mp_context=context, initializer=_worker_start,
                             initargs=(queue, stop)) as pool:
        futures = [pool.submit(_start_item, fn, x) for x in items]
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
                while queue is not None and not queue.empty():
                    _report(queue.get())
                failed = next((e for e in map(Future.exception, done) if e is not None and not isinstance(e, _Skipped)),
                              None)
                if failed is not None:
                    raise failed
        except BaseException:  # without this, leaving the pool would still run every item not started
            stop.set()
            raise
        return [f.result() for f in futures]


def environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "processor": cpu_model(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "argv": sys.argv}


# ----------------------------------------------------------------------------------------------
# Numbers and tables


def mean_std(values: list[float]) -> tuple[float, float]:
    # Sample standard deviation (n - 1); 0 for a single value.
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(x, digits: int = 4) -> str:
    if x is None:
        return "—"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}f}" if math.isfinite(x) else str(x)


def fmt_pm(values: list[float], digits: int = 2) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (standard tables).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile_975(df: int) -> float:
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    # Cornish-Fisher expansion around the normal quantile; within 1e-3 of the exact value for df > 30.
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired_difference(values: list[float], baseline: list[float]) -> dict:
    """Mean of values[i] - baseline[i] (pairs share a seed) with a 95 % t-interval. With one pair
    the interval is undefined (None)."""
    if len(values) != len(baseline) or not values:
        raise ValueError(f"paired_difference needs equal, non-empty lists ({len(values)} vs {len(baseline)})")
    d = [a - b for a, b in zip(values, baseline)]
    mean = statistics.fmean(d)
    if len(d) < 2:
        return {"n": 1, "mean": mean, "sd": None, "lo": None, "hi": None}
    sd = statistics.stdev(d)
    half = t_quantile_975(len(d) - 1) * sd / math.sqrt(len(d))
    return {"n": len(d), "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half}


def paired_comparisons(final: dict[str, list[float]]) -> dict:
    """final: {arm: [final held-out loss of seed 0, seed 1, ...]} (same seeds, same order for every
    arm) -> {arm: {baseline: paired_difference(arm, baseline)}} for the BASELINES present.
    Negative: the arm ends lower (better) than the baseline."""
    return {arm: {b: paired_difference(values, final[b]) for b in (*BASELINES, ZERO_INIT_ARM.get(arm))
                  if b in final and b != arm}
            for arm, values in final.items()}


def fmt_against_zero_init(arm: str, comparisons: dict) -> str:
    # The table cell "Δ vs its zero-init arm": empty for an arm without one (or when that arm did not run).
    zero = ZERO_INIT_ARM.get(arm)
    return f"{fmt_interval(comparisons[zero])} ({zero})" if zero in comparisons else ""


def fmt_interval(diff: dict, digits: int = 4) -> str:
    if diff["lo"] is None:
        return f"{diff['mean']:+.{digits}f} (n=1)"
    return f"{diff['mean']:+.{digits}f} [{diff['lo']:+.{digits}f}, {diff['hi']:+.{digits}f}]"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    # A column with no value in any row (e.g. "Δ vs its zero-init arm" when no arm has one) is left out.
    keep = [i for i in range(len(headers)) if not rows or any(str(row[i]).strip() for row in rows)]
    headers, rows = [headers[i] for i in keep], [[row[i] for i in keep] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def ema(values: list[float], beta: float = 0.9) -> list[float]:
    # Bias-corrected exponential moving average, to read the trend of noisy per-step losses.
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return out


# ----------------------------------------------------------------------------------------------
# Plots (matplotlib is an optional extra: without it the plots are skipped with a note)


def new_figure(ncols: int, width: float = 6.0, height: float = 4.2):
    """A matplotlib Figure with ncols axes, or None if matplotlib is missing. Uses the Figure API
    directly (no pyplot): no global backend or state is touched."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None, None
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def save_figure(fig, path):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def run_cli(prog: str, flags, start, user_errors: tuple) -> int:
    """The shared ending of the experiment scripts' main(): checks --threads/--jobs, then `start()` runs the
    study; a user error is one line and exit 2, Ctrl-C / SIGTERM exit 130 with nothing written (the output
    folder is atomic)."""
    try:
        if flags.threads < 0 or flags.jobs < 1:
            raise ExperimentError("--threads must be >= 0 and --jobs >= 1")
        if flags.threads:
            torch.set_num_threads(flags.threads)  # this process only, from the command line only
        start()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing written", file=sys.stderr)
        return 130
    except Interrupted as e:  # SIGTERM, SIGHUP, ...: the output folder's scratch copy is already gone
        print(f"{prog}: {e}; nothing written", file=sys.stderr)
        return 128 + e.signum
    except (ExperimentError, GrowthError, CheckpointError, DataError, *user_errors) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


# ----------------------------------------------------------------------------------------------
# Accuracy on a multiple-choice task: paired per-question bootstrap


def paired_bootstrap(values, baseline, resamples: int = 2000, seed: int = 0) -> dict:
    """Mean of values - baseline (arrays seeds x questions, e.g. 1.0/0.0 per question: the same question and
    seed pair up) with a 95 % percentile bootstrap interval. Questions are resampled with replacement, each
    with all its seeds: the question sample is what the interval is about, and one question's seeds are not
    independent of each other. A fixed `seed` gives the same interval every run."""
    import numpy as np
    a, b = np.atleast_2d(np.asarray(values, dtype=np.float64)), np.atleast_2d(np.asarray(baseline, dtype=np.float64))
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired_bootstrap needs equal, non-empty seeds x questions arrays ({a.shape} vs {b.shape})")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    diff = a - b  # (seeds, questions)
    n_questions = diff.shape[1]
    rng = np.random.Generator(np.random.PCG64(seed))
    per_question = diff.mean(axis=0)  # (questions,): each question's mean over seeds
    picks = rng.integers(0, n_questions, size=(resamples, n_questions))
    means = per_question[picks].mean(axis=1)  # (resamples,)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"n_questions": int(n_questions), "n_seeds": int(diff.shape[0]), "mean": float(diff.mean()),
            "lo": float(lo), "hi": float(hi), "resamples": resamples, "seed": seed}


def bootstrap_comparisons(scores: dict, resamples: int = 2000, seed: int = 0) -> dict:
    """scores: {arm: seeds x questions} (the same seeds and questions, in the same order, for every arm) ->
    {arm: {baseline: paired_bootstrap(arm, baseline)}} for the BASELINES present. Positive: the arm answers
    more questions right than the baseline."""
    return {arm: {b: paired_bootstrap(values, scores[b], resamples, seed)
                  for b in BASELINES if b in scores and b != arm}
            for arm, values in scores.items()}


def fmt_bootstrap(diff: dict, digits: int = 3) -> str:
    mark = "" if diff["lo"] <= 0 <= diff["hi"] else " *"  # the interval excludes 0
    return f"{diff['mean']:+.{digits}f} [{diff['lo']:+.{digits}f}, {diff['hi']:+.{digits}f}]{mark}"
