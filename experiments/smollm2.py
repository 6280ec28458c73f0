"""The real-checkpoint experiment: grow SmolLM2-135M from 30 to 45 layers, continue pre-training.

    python experiments/smollm2.py --preset cpu     # ~20-30 minutes on 2 CPU cores, a reduced run
    python experiments/smollm2.py --preset study --jobs 2   # the study's SmolLM2 part (see docs/RESULTS.md)
    python experiments/smollm2.py --preset gpu     # sized for one ~10-minute call on one H100

Every method (OpT-DeUS as published, paper alignment with and without plan normalisation,
structured; Avg-DeUS with and without zero-init, LLaMA Pro, SOLAR) grows the base to the same depth
with a new layer in each of the top 15 gaps (the paper's SmolLM2 setting; SOLAR places its repeated
layers itself), and OpT-DeUS (structured) also grows into the middle and bottom gaps. Each grown
model continues pre-training with only the new layers trainable, on Jane Austen's novels
(tokenised with the checkpoint's tokenizer.json) with one novel held out for perplexity, once per
seed. Growth is deterministic, so the after-growth perplexity is measured once per grown model;
seeds change the training data order.

Zero-init arms must start at the base's held-out loss exactly (checked). Final held-out losses are
compared paired by seed against avg-zero and llama-pro (mean difference, 95 % t-interval).

Beside perplexity, every arm is scored after growth and after training (per seed) on the local downstream task,
the Emma cloze of experiments/cloze (four choices, chance 25 %; --accuracy-questions of its questions, --no-accuracy
to skip): acc and acc_norm as lm-evaluation-harness's multiple_choice computes them, with our own model's
log-likelihoods (opt_deus_tool/cloze.py; tests/test_lm_eval.py checks them against lm-eval's), and each arm's
accuracy difference against avg-zero and llama-pro with a paired per-question bootstrap 95 % interval (pairs: the
same question and seed; questions resampled; 2000 resamples, seed 0). Emma is the held-out novel, so the task is
not in the training data.

Outputs under --out: runs/<method>@<position>-seed<k>.jsonl (training metrics; first line: the run,
the Python version and the corpus fingerprint), summary.md, summary.json, curves.png, loss_curves.png
and step_time_by_position.png (with matplotlib).

--base is a Hugging Face LLaMA folder with tokenizer.json (default: the SmolLM2 folder that
tests/smollm2.py converts and caches); --data is text files or folders (.txt, .txt.gz), by
default ../shared/data/austen when it exists.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # so `python experiments/smollm2.py` works without `pip install -e .`

from experiments.common import (BASELINES, CLASSIC_ARMS, ARM_OPTIONS, STUDY_ARMS, ExperimentError,  # noqa: E402
                                bootstrap_comparisons, ema, environment, fmt, fmt_bootstrap, fmt_interval, fmt_pm,
                                fmt_against_zero_init, grow_arm, growth_options,
                                map_jobs, markdown_table, mean_std, new_figure, paired_comparisons, parse_list,
                                paired_difference, reporting, reproducibility, run_cli, run_study, save_figure,
                                stamp_jsonl, write_json)
from experiments.common import report as report_progress  # noqa: E402
from experiments.study_output import Progress, figure_reference, plot_study, quiet  # noqa: E402
from opt_deus_core.model import Transformer  # noqa: E402
from opt_deus_core.opt_deus import POSITIONS  # noqa: E402
from opt_deus_tool import CheckpointError, DataError  # noqa: E402
from opt_deus_tool.checkpoint import load_pretrained  # noqa: E402
from opt_deus_tool.cli import OneLineArgumentParser, non_negative_int, positive_float, positive_int  # noqa: E402
from opt_deus_tool.cloze import (DEFAULT_TASK_JSONL, EncodedQuestion, TaskFileError, encode_questions,  # noqa: E402
                                 read_questions, score_questions, tokenizer_encoder)
from opt_deus_tool.data import HFTokenizer, iter_documents, list_data_files, load_tokenizer  # noqa: E402
from opt_deus_tool.runs import train_run  # noqa: E402
from opt_deus_tool.devices import resolve_device  # noqa: E402
from opt_deus_core.train import TrainConfig, TrainError, evaluate  # noqa: E402

# The cloze questions the study scores per evaluation (the first of the task's, a uniform sample of them):
# sized so that 8 arms x (3 seeds + after growth) and the base add at most ~10 minutes on 2 cores with --jobs 2
# (measured: one evaluation of a 45-layer grown SmolLM2 is ~1.0 s per question in each of two one-thread
# workers, so 16 evaluations per worker + the base's ~9 minutes; docs/EVALUATION.md).
STUDY_QUESTIONS = 32
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 2000, 0

# Settings that differ between the presets; every other option has one default. Each is a flag too.
PRESETS = {
    # One H100, bf16 autocast: 10 configurations (8 arms at the top, opt-structured at 2 more
    # positions) x 3 seeds x 100 steps of 8 x 2048 tokens, the whole held-out novel evaluated every 25
    # steps. Sized (for 8 configurations) to fit a 10-minute call; not run yet. 200 cloze questions per
    # evaluation: an estimate (one forward of 4 short sequences per question, ~31 evaluations), not measured.
    "gpu": dict(device="cuda", block_size=2048, batch_size=8, micro_batch_size=8, steps=100, lr=3e-4,
                seeds=(0, 1, 2), eval_tokens=None, evals=4, accuracy_questions=200),
    # 2 CPU cores: a handful of short steps per run, a few thousand held-out tokens. Enough to see
    # function preservation, early trends and step time by position, not converged numbers.
    "cpu": dict(device="cpu", block_size=256, batch_size=2, micro_batch_size=2, steps=8, lr=3e-4,
                seeds=(0, 1), eval_tokens=2048, evals=0, accuracy_questions=8),
    # The study's SmolLM2 part, 2 CPU cores with --jobs 2: every arm at the top gaps, 3 seeds, 20 steps, 4,096
    # held-out tokens evaluated after growth (once per arm) and after step 20; the training losses draw the
    # curves. One evaluation costs ~4 steps: issue 31 dropped the one at step 10 (and the step-0 one each seed
    # repeated) to stay within the study's time. Measured time and results: docs/RESULTS.md.
    "study": dict(device="cpu", block_size=256, batch_size=2, micro_batch_size=2, steps=20, lr=3e-4,
                  seeds=(0, 1, 2), eval_tokens=4096, evals=0, positions=(), accuracy_questions=STUDY_QUESTIONS,
                  methods=STUDY_ARMS),
    # Issue 31, the second real model: Qwen2.5-Coder-0.5B-Instruct (--base: the folder tests/qwen.py converts) grown
    # 24 -> 36 in the top half, five arms, 3 seeds, 1 worker (13.6 GB peak in a 2-step smoke run that trained 15
    # layers). experiments/qwen25.sh runs it with its layer-quality sweep (55 min on 2 cores; docs/RESULTS.md).
    # lr 1e-4: at SmolLM2's 3e-4 two steps raised the held-out loss (4.21 -> 5.42 llama-pro, 9.39 the control).
    "qwen25": dict(device="cpu", block_size=256, batch_size=2, micro_batch_size=2, steps=8, lr=1e-4,
                   seeds=(0, 1, 2), eval_tokens=1024, evals=0, positions=(), accuracy_questions=50,
                   new_layers=12, methods=("no-growth-top-k", "llama-pro", "avg-zero", "opt-structured", "lesa")),
}


SMOLLM2, QWEN25 = "smollm2-135m-instruct-hf", "qwen2.5-coder-0.5b-instruct-hf"


def default_base(name: str = SMOLLM2) -> str | None:
    # Where tests/smollm2.py (tests/qwen.py) caches the converted checkpoint (same rule as its _cache_root).
    root = os.environ.get("OPT_DEUS_CACHE")
    if root:
        cache = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        cache = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "opt-deus"
    path = cache / name
    return str(path) if (path / "config.json").is_file() else None


def default_data() -> list[str] | None:
    path = ROOT.parent / "shared" / "data" / "austen"
    return [str(path)] if path.is_dir() else None


@dataclass
class SmolConfig:
    base: str                                   # Hugging Face LLaMA folder with tokenizer.json
    data: list[str]                             # text files/folders; one file is held out
    held_out: str = "emma"                      # the held-out file: its name up to the first dot
    new_layers: int = 15
    methods: tuple[str, ...] = CLASSIC_ARMS     # all at `top` positions (solar: its own)
    positions: tuple[str, ...] = ("top", "middle", "bottom")  # for opt-structured
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 8
    lr: float = 3e-4
    block_size: int = 256
    batch_size: int = 2                          # sequences per step
    micro_batch_size: int = 2
    eval_tokens: int | None = 2048               # held-out tokens evaluated (None: the whole file)
    evals: int = 0                               # held-out evaluations during training (0: only the end)
    device: str = "cpu"
    accuracy_task: str | None = None             # the cloze JSONL scored after growth and training (None: none)
    accuracy_questions: int | None = None        # its first N questions (None: all); the presets set their own

    def validate(self):
        if min(self.new_layers, self.steps, self.block_size, self.batch_size, self.micro_batch_size) < 1:
            raise ExperimentError("new layers, steps, block size and batch sizes must be >= 1")
        if self.batch_size % self.micro_batch_size:
            raise ExperimentError(f"--batch-size {self.batch_size} is not a multiple of --micro-batch-size "
                                  f"{self.micro_batch_size}")
        if self.eval_tokens is not None and self.eval_tokens < self.block_size:
            raise ExperimentError(f"--eval-tokens {self.eval_tokens} is less than one block ({self.block_size})")
        for name in self.methods:
            if name not in ARM_OPTIONS:
                raise ExperimentError(f"unknown method {name!r} (choose from {', '.join(ARM_OPTIONS)})")
        for position in self.positions:
            if position not in POSITIONS:
                raise ExperimentError(f"unknown position {position!r} (choose from {', '.join(POSITIONS)})")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):  # 0,0 would pair a run with itself
            raise ExperimentError(f"seeds {self.seeds}: need at least one, all different")
        if self.accuracy_task is not None and not Path(self.accuracy_task).is_file():
            raise ExperimentError(f"--accuracy-task {self.accuracy_task}: no such file (--no-accuracy to skip it)")
        if self.accuracy_questions is not None and self.accuracy_questions < 1:
            raise ExperimentError(f"--accuracy-questions {self.accuracy_questions}: expected >= 1 (0 on the command "
                                  f"line: all)")


def runs_of(config: SmolConfig) -> list[tuple[str, str]]:
    """(method, position) pairs: every method at top, then opt-structured at the other positions."""
    runs = [(name, "top") for name in config.methods]
    runs += [("opt-structured", p) for p in config.positions if ("opt-structured", p) not in runs]
    return runs


def run_name(method: str, position: str) -> str:
    return f"{method}@{'own' if method == 'solar' else position}"


# ----------------------------------------------------------------------------------------------
# Data


def load_tokens(config: SmolConfig, tokenizer) -> tuple[np.ndarray, np.ndarray, dict]:
    """(training tokens, held-out tokens, description): each document followed by EOS; the held-out
    file alone in the second array, cut to whole blocks (to eval_tokens when given)."""
    files = list_data_files(config.data)
    held = [f for f in files if f.name.split(".")[0] == config.held_out]
    if len(held) != 1:
        raise ExperimentError(f"--held-out {config.held_out!r}: expected one file named {config.held_out}.* in "
                              f"{', '.join(config.data)}, found {len(held)}")
    rest = [f for f in files if f not in held]
    if not rest:
        raise ExperimentError("no training files besides the held-out one")

    def tokens_of(paths):
        ids = []
        for text in iter_documents(paths):
            ids += tokenizer.encode(text) + [tokenizer.eos_id]
        return np.asarray(ids, dtype=np.uint32)

    train_tokens = tokens_of(rest)
    eval_tokens = tokens_of(held)
    # Whole blocks only: the in-training evaluations (train.py reads whole blocks) and ours then
    # read exactly the same tokens.
    limit = len(eval_tokens) - 1 if config.eval_tokens is None else min(config.eval_tokens, len(eval_tokens) - 1)
    n_blocks = limit // config.block_size
    if n_blocks < 1:
        raise ExperimentError(f"{held[0]}: fewer held-out tokens than one block of {config.block_size}")
    eval_tokens = eval_tokens[: n_blocks * config.block_size + 1]
    info = {"train_files": [str(f) for f in rest], "held_out_file": str(held[0]),
            "train_tokens": int(len(train_tokens)), "eval_tokens": int(len(eval_tokens) - 1),
            "eval_blocks": n_blocks, "tokenizer": getattr(tokenizer, "name", type(tokenizer).__name__),
            "train_sha256": hashlib.sha256(train_tokens.tobytes()).hexdigest()[:16],
            "eval_sha256": hashlib.sha256(eval_tokens.tobytes()).hexdigest()[:16],
            # The fingerprint of the data as the models read it (uint32 tokens: training, then held out).
            "corpus_sha256": hashlib.sha256(train_tokens.tobytes() + eval_tokens.tobytes()).hexdigest()}
    return train_tokens, eval_tokens, info


# ----------------------------------------------------------------------------------------------
# The experiment


def held_out(model, eval_tokens, config: SmolConfig) -> dict:
    r = evaluate(model, eval_tokens, config.block_size, config.micro_batch_size)
    return {"loss": r["loss"], "perplexity": r["perplexity"]}


def train_config(config: SmolConfig, seed: int, n_eval_blocks: int, trainable="new") -> TrainConfig:
    return TrainConfig(
        steps=config.steps, lr=config.lr, warmup_steps=max(1, config.steps // 10) if config.steps > 1 else 0,
        batch_tokens=config.batch_size * config.block_size, micro_batch_size=config.micro_batch_size,
        block_size=config.block_size, trainable=trainable,
        eval_every=max(1, config.steps // config.evals) if config.evals > 0 else 0,
        eval_batches=math.ceil(n_eval_blocks / config.micro_batch_size),  # the whole held-out set
        log_every=max(1, config.steps // 4), seed=seed, device=config.device, checkpoint_every=0,
        timing_skip_steps=1 if config.steps > 1 else 0)


def run_smollm2(config: SmolConfig, out=None, log=print, jobs: int = 1) -> dict:
    """Runs the experiment and returns the summary (what summary.json holds). With `out`, writes
    everything there (replacing it) through a temporary folder. jobs > 1 runs the grown models in
    that many worker processes (one torch thread each)."""
    return run_study(config, _run, out, log, jobs)


@dataclass
class Prepared:
    # What every run reads: the tokens, the base model and its held-out loss.
    train_tokens: np.ndarray
    eval_tokens: np.ndarray
    data_info: dict
    base: Transformer
    base_eval: dict
    questions: list[EncodedQuestion] | None  # the cloze questions scored, tokenized (None: no accuracy)


def load_questions(config: SmolConfig) -> list[EncodedQuestion] | None:
    if config.accuracy_task is None:
        return None
    questions = read_questions(config.accuracy_task)
    if config.accuracy_questions is not None:
        if config.accuracy_questions > len(questions):
            raise ExperimentError(f"--accuracy-questions {config.accuracy_questions}: {config.accuracy_task} has "
                                  f"{len(questions)}")
        questions = questions[: config.accuracy_questions]
    return encode_questions(tokenizer_encoder(config.base), questions)


def accuracy(model, prepared: Prepared) -> dict | None:
    # acc and acc_norm on the cloze, per question too (for the paired bootstrap); None when it is off.
    return None if prepared.questions is None else score_questions(model, prepared.questions)


def prepare(config: SmolConfig, log) -> Prepared:
    device = resolve_device(config.device)
    tokenizer = load_tokenizer(config.base)
    if not isinstance(tokenizer, HFTokenizer):
        raise ExperimentError(f"{config.base}: no tokenizer.json (or the tokenizers package is missing)")
    train_tokens, eval_tokens, data_info = load_tokens(config, tokenizer)
    base = load_pretrained(config.base, dtype=torch.float32, device=device)
    if base.args.vocab_size < tokenizer.vocab_size:
        raise ExperimentError(f"{config.base}: tokenizer has {tokenizer.vocab_size} tokens, "
                              f"model {base.args.vocab_size}")
    return Prepared(train_tokens, eval_tokens, data_info, base, held_out(base, eval_tokens, config),
                    load_questions(config))


def run_arm(prepared: Prepared, config: SmolConfig, method: str, position: str, runs_dir: str | None, log) -> dict:
    """Grows the base with one method at one position, then trains a copy per seed."""
    p = prepared
    name = run_name(method, position)
    L = p.base.args.num_hidden_layers
    t0 = time.perf_counter()
    calibration = torch.from_numpy(np.asarray(p.train_tokens[:2048], np.int64))[None]  # for the activation arm
    grown, report, trainable = grow_arm(p.base, method, config.new_layers, position, calibration)
    grow_s = time.perf_counter() - t0
    zero_init = growth_options(method).out_scale == 0
    after_growth = held_out(grown, p.eval_tokens, config)
    # A zero-init arm computes the base function: the same held-out loss, to the last bit.
    if zero_init and after_growth["loss"] != p.base_eval["loss"]:
        raise ExperimentError(f"{name}: held-out loss right after growth {after_growth['loss']!r} differs from "
                              f"the base's {p.base_eval['loss']!r}; a zero-init arm must start exactly at the base "
                              f"function")
    growth_accuracy = accuracy(grown, p)
    log(f"{name}: grew {L} -> {len(grown.layers)} layers in {grow_s:.1f}s (new {report['new_layers']}); "
        f"held-out perplexity {after_growth['perplexity']:.3f}" + _accuracy_note(growth_accuracy))
    stamp = reproducibility(p.data_info["corpus_sha256"])
    seeds = []
    for seed in config.seeds:
        model = copy.deepcopy(grown)
        metrics = Path(runs_dir) / f"{name}-seed{seed}.jsonl" if runs_dir else None
        r = train_run(model, p.train_tokens, train_config(config, seed, p.data_info["eval_blocks"], trainable or "new"),
                      p.eval_tokens,
                      metrics_path=metrics, log=quiet(lambda *a: log(f"[{name} seed {seed}]", *a)))
        if r.stopped is not None:  # Ctrl-C / SIGTERM: train() returned early; do not tabulate it
            raise KeyboardInterrupt(r.stopped)
        if metrics is not None:
            stamp_jsonl(metrics, {"run": name, "seed": seed, **stamp})
        # train() evaluated the whole held-out set (whole blocks) at its last step.
        after = {"loss": r.evals[-1]["eval_loss"], "perplexity": r.evals[-1]["eval_perplexity"],
                 "accuracy": accuracy(model, p)}
        evals = [{"step": e["step"], "loss": e["eval_loss"]} for e in r.evals]
        if evals[0]["step"] != 0:  # the curve starts where growth left the model
            evals.insert(0, {"step": 0, "loss": after_growth["loss"]})
        note = (f"{name}: held-out perplexity {after_growth['perplexity']:.3f} -> {after['perplexity']:.3f}, "
                f"{r.mean_step_s:.2f} s/step{_accuracy_note(after['accuracy'])}")
        report_progress(label=f"seed {seed}", arm=True, work=1, note=note)
        seeds.append({"seed": seed, "after_training": after, "mean_step_s": r.mean_step_s,
                      "tokens_per_s": r.tokens_per_s, "losses": r.losses, "evals": evals,
                      "trainable_params": r.trainable_params})
        del model
    return {"run": name, "method": method, "position": "own" if method == "solar" else position,
            "new_layers": report["new_layers"], "layers": len(grown.layers), "grow_seconds": grow_s,
            "zero_init": zero_init, "after_growth": {**after_growth, "accuracy": growth_accuracy},
            "base_held_out": p.base_eval,
            "trainable_params": seeds[0]["trainable_params"], "seeds": seeds}


def _accuracy_note(result: dict | None) -> str:
    if result is None:
        return ""
    return (f"; cloze acc {result['acc']:.3f}, acc_norm {result['acc_norm']:.3f} ({result['questions']} questions, "
            f"{result['seconds']:.0f}s)")


_prepared: tuple[SmolConfig, Prepared] | None = None  # a worker's: loaded for its first arm, read by the next ones


def _arm_job(job) -> dict:
    # map_jobs' worker: one grown model in its own process (it loads the base and the data itself, once: ~20 s of
    # tokenizing, loading and the base's held-out loss; run_arm leaves the base as it found it).
    global _prepared
    config, method, position, runs_dir = job
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    if _prepared is None or _prepared[0] != config:
        _prepared = (config, prepare(config, log))
    return run_arm(_prepared[1], config, method, position, runs_dir, log)


def _run(config: SmolConfig, folder: Path | None, log, jobs: int) -> dict:
    t_start = time.perf_counter()
    runs_dir = None
    if folder is not None:
        runs_dir = folder / "runs"
        runs_dir.mkdir()
    device = resolve_device(config.device)
    t0 = time.perf_counter()
    prepared = prepare(config, log)
    data_info, base = prepared.data_info, prepared.base
    L = base.args.num_hidden_layers
    log(f"data: {data_info['train_tokens']:,} training tokens, {data_info['eval_tokens']:,} held-out tokens "
        f"of {Path(data_info['held_out_file']).name}; Python {reproducibility('')['python']}, corpus sha256 "
        f"{data_info['corpus_sha256']}")
    base_accuracy = accuracy(base, prepared)
    log(f"base: {L} layers, {sum(p.numel() for p in base.parameters()):,} parameters; held-out perplexity "
        f"{prepared.base_eval['perplexity']:.3f}{_accuracy_note(base_accuracy)} ({time.perf_counter() - t0:.1f}s)")

    runs = runs_of(config)
    n_runs = len(runs) * len(config.seeds)  # the progress: one line per grown model trained with one seed
    with reporting(Progress(n_runs, n_runs, log)):
        if jobs > 1:
            results = map_jobs(_arm_job, [(config, m, p, str(runs_dir) if runs_dir else None) for m, p in runs], jobs)
        else:
            results = [run_arm(prepared, config, m, p, str(runs_dir) if runs_dir else None, log) for m, p in runs]
    for r in results:  # every worker loaded the same base and data
        if r["base_held_out"] != prepared.base_eval:
            raise ExperimentError(f"{r['run']}: the base's held-out loss differs between processes")
        # A zero-init arm computes the base function: every choice's log-likelihood too, to the last bit.
        grown = r["after_growth"]["accuracy"]
        if r["zero_init"] and base_accuracy is not None and (grown["per_question"]["loglikelihoods"]
                                                             != base_accuracy["per_question"]["loglikelihoods"]):
            raise ExperimentError(f"{r['run']}: cloze log-likelihoods right after growth differ from the base's; a "
                                  f"zero-init arm must start exactly at the base function")

    top = [r for r in results if r["position"] in ("top", "own")]
    summary = {"config": dataclasses.asdict(config), "data": data_info,
               "reproducibility": reproducibility(data_info["corpus_sha256"]), "environment": environment(),
               "device": str(device), "base": {"layers": L, "held_out": prepared.base_eval, "accuracy": base_accuracy},
               "results": results,
               "comparisons": paired_comparisons({r["method"]: [s["after_training"]["loss"] for s in r["seeds"]]
                                                  for r in top}),
               "accuracy_comparisons": accuracy_comparisons(top) if base_accuracy is not None else None,
               "elapsed_s": time.perf_counter() - t_start, "jobs": jobs, "plots": []}
    if folder is not None:
        (folder / "summary.md").write_text(summary_markdown(summary))
        summary["plots"] = plot(summary, folder, log)
        write_json(folder / "summary.json", summary)
    log("\n" + summary_markdown(summary))
    log(f"total time {summary['elapsed_s']:.0f}s")
    return summary


def accuracy_comparisons(top: list[dict]) -> dict:
    """{"after_growth" | "after_training": {"acc" | "acc_norm": {arm: {baseline: paired_bootstrap}}}}: per
    question and seed, each arm's score minus the baseline's (seeds x questions; after growth one row)."""
    out = {}
    for when in ("after_growth", "after_training"):
        out[when] = {}
        for metric in ("acc", "acc_norm"):
            scores = {r["method"]: [a["per_question"][metric] for a in _accuracies(r, when)] for r in top}
            out[when][metric] = bootstrap_comparisons(scores, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED)
    return out


def _accuracies(r: dict, when: str) -> list[dict]:
    return [r["after_growth"]["accuracy"]] if when == "after_growth" else [s[when]["accuracy"] for s in r["seeds"]]


def accuracy_seconds(summary: dict) -> tuple[float, int]:
    # The cloze evaluations' time summed over the processes that ran them, and how many there were.
    results = [a for r in summary["results"] for when in ("after_growth", "after_training")
               for a in _accuracies(r, when)]
    done = [a for a in [summary["base"]["accuracy"], *results] if a is not None]
    return sum(a["seconds"] for a in done), len(done)


def _ppl(r) -> list[float]:
    return [s["after_training"]["perplexity"] for s in r["seeds"]]


def summary_markdown(summary: dict) -> str:
    c, data = summary["config"], summary["data"]
    n = len(c["seeds"])
    rep = summary["reproducibility"]
    text = (f"Python {rep['python']}, torch {rep['torch']}, corpus sha256 `{rep['corpus_sha256']}`; "
            f"{summary['environment']['processor']}, wall time {summary['elapsed_s']:.0f} s with {summary['jobs']} "
            f"worker process(es).\n\n"
            f"Base {Path(c['base']).name}: {summary['base']['layers']} layers, grown by {c['new_layers']}. "
            f"Continued pre-training: {c['steps']} steps of {c['batch_size']} x {c['block_size']} tokens, "
            f"lr {c['lr']}, "
            f"only the new layers trainable, seeds {', '.join(map(str, c['seeds']))} (mean ± sample std over {n}). "
            f"Held-out: {data['eval_tokens']:,} tokens of {Path(data['held_out_file']).name}. "
            f"Device: {summary['device']}.\n\n"
            f"Base model held-out perplexity: {summary['base']['held_out']['perplexity']:.3f}\n\n"
            f"### Methods (new layers in the top gaps; solar places its own)\n\n")
    headers = ["method", "layers", "new layers", "ppl after growth", "ppl after training", "s/step", "trainable params"]
    rows = [[r["method"], r["layers"], _layers(r["new_layers"]), fmt(r["after_growth"]["perplexity"], 3),
             fmt_pm(_ppl(r), 3), fmt_pm([s["mean_step_s"] for s in r["seeds"]], 3), fmt(r["trainable_params"])]
            for r in summary["results"] if r["position"] in ("top", "own")]
    text += markdown_table(headers, rows)
    text += (f"\n### Paired by seed: final held-out loss (nats/token) minus the baseline's (negative: better), "
             f"mean over {n} seeds [95% t-interval]\n\n")
    headers = ["method", "zero-init", "final loss (mean ± sd)", "Δ vs avg-zero", "Δ vs llama-pro",
               "Δ vs its zero-init arm"]
    rows = []
    for r in summary["results"]:
        if r["position"] not in ("top", "own"):
            continue
        comp = summary["comparisons"][r["method"]]
        rows.append([r["method"], "yes" if r["zero_init"] else "no",
                     fmt_pm([s["after_training"]["loss"] for s in r["seeds"]], 4),
                     fmt_interval(comp["avg-zero"]) if "avg-zero" in comp else "",
                     fmt_interval(comp["llama-pro"]) if "llama-pro" in comp else "",
                     fmt_against_zero_init(r["method"], comp)])
    text += markdown_table(headers, rows)
    if summary.get("accuracy_comparisons"):
        text += accuracy_markdown(summary)
    rows = [[r["position"], _layers(r["new_layers"]), fmt(r["after_growth"]["perplexity"], 3), fmt_pm(_ppl(r), 3),
             fmt_pm([s["mean_step_s"] for s in r["seeds"]], 3), fmt_pm([s["tokens_per_s"] for s in r["seeds"]], 0)]
            for r in summary["results"] if r["method"] == "opt-structured"]
    if len(rows) < 2:
        return text
    text += "\n### OpT-DeUS (structured) by position\n\n"
    headers = ["position", "new layers", "ppl after growth", "ppl after training", "s/step", "tokens/s"]
    return text + markdown_table(headers, rows)


def accuracy_markdown(summary: dict) -> str:
    c, base = summary["config"], summary["base"]["accuracy"]
    n, n_seeds = base["questions"], len(c["seeds"])
    top = [r for r in summary["results"] if r["position"] in ("top", "own")]
    text = (f"\n### Accuracy on the Emma cloze ({n} questions of {Path(c['accuracy_task']).name}, 4 choices, "
            f"chance 0.25)\n\n"
            f"acc: the choice with the highest log-likelihood is the right one; acc_norm: the same per character of "
            f"the choice (lm-evaluation-harness's multiple_choice metrics, computed with our model). Base model: acc "
            f"{base['acc']:.3f}, acc_norm {base['acc_norm']:.3f}. After training: mean ± sd over {n_seeds} "
            f"seeds.\n\n")

    def seeds_of(r, metric):
        return fmt_pm([s["after_training"]["accuracy"][metric] for s in r["seeds"]], 3)

    headers = ["method", "acc after growth", "acc_norm after growth", "acc after training", "acc_norm after training"]
    text += markdown_table(headers, [[r["method"], fmt(r["after_growth"]["accuracy"]["acc"], 3),
                                      fmt(r["after_growth"]["accuracy"]["acc_norm"], 3), seeds_of(r, "acc"),
                                      seeds_of(r, "acc_norm")] for r in top])
    text += (f"\nAccuracy minus the baseline's, paired by question and seed: mean [95 % bootstrap interval: "
             f"questions resampled with their seeds, {BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}]; * marks "
             f"an interval that excludes 0. On {n} questions (and even on ~1000) a difference of a few points is "
             f"noise unless its interval excludes 0.\n")
    comparisons = summary["accuracy_comparisons"]
    headers = ["method"] + [f"Δ{m} vs {b}" for m in ("acc", "acc_norm") for b in BASELINES]
    for when, pairs in (("after_training", f"{n} questions x {n_seeds} seeds"), ("after_growth", f"{n} questions")):
        rows = [[r["method"]] + [fmt_bootstrap(comparisons[when][m][r["method"]][b])
                                 if b in comparisons[when][m][r["method"]] else ""
                                 for m in ("acc", "acc_norm") for b in BASELINES] for r in top]
        text += f"\n{when.replace('_', ' ')} ({pairs}):\n\n" + markdown_table(headers, rows)
    seconds, evaluations = accuracy_seconds(summary)
    return text + f"\nScoring time: {seconds:.0f} s for {evaluations} evaluations, summed over the processes.\n"


def _layers(indices: list[int]) -> str:
    # 15,17,...,43 -> "15..43 step 2"; contiguous -> "22..35"; anything else listed.
    steps = {b - a for a, b in zip(indices, indices[1:])}
    if len(indices) > 2 and len(steps) == 1:
        step = steps.pop()
        return f"{indices[0]}..{indices[-1]}" + (f" step {step}" if step > 1 else "")
    return ",".join(map(str, indices))


def plot(summary: dict, folder: Path, log) -> list[str]:
    fig, axes = new_figure(1)
    if fig is None:
        log("matplotlib is not installed: skipping the plots (pip install matplotlib, or the `plots` extra)")
        return []
    top = [r for r in summary["results"] if r["position"] in ("top", "own")]
    rep = summary["reproducibility"]
    final = {r["method"]: [s["after_training"]["loss"] for s in r["seeds"]] for r in top}
    ref = figure_reference(final)
    made = plot_study(
        folder / "curves.png",
        {r["method"]: ([e["step"] for e in r["seeds"][0]["evals"]],
                       np.array([[e["loss"] for e in s["evals"]] for s in r["seeds"]])) for r in top},
        {arm: paired_difference(losses, final[ref]) for arm, losses in final.items() if arm != ref}, ref,
        {r["method"]: r["zero_init"] for r in top},
        f"experiments/smollm2.py: Python {rep['python']}, corpus sha256 {rep['corpus_sha256'][:16]}…, "
        f"{len(summary['config']['seeds'])} seeds", "loss (nats/token)", log)
    ax = axes[0]
    for r in summary["results"]:
        losses = np.mean([s["losses"] for s in r["seeds"]], axis=0)
        ax.plot(range(1, len(losses) + 1), ema(list(losses), 0.5 if len(losses) < 50 else 0.9), label=r["run"])
    ax.set(title="training loss after growth (mean over seeds, EMA)", xlabel="step", ylabel="loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)  # beside the data, not on it
    stamp = f"Python {rep['python']}, corpus sha256 {rep['corpus_sha256'][:16]}…"
    fig.suptitle(stamp, fontsize=8)
    save_figure(fig, folder / "loss_curves.png")

    fig, axes = new_figure(1, width=5.0)
    ax = axes[0]
    rows = [r for r in summary["results"] if r["method"] == "opt-structured"]
    stats = [mean_std([s["mean_step_s"] for s in r["seeds"]]) for r in rows]
    ax.bar([r["position"] for r in rows], [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4)
    ax.set(title="time per step by position of the new layers (opt-structured)", ylabel="seconds per step")
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(stamp, fontsize=8)
    save_figure(fig, folder / "step_time_by_position.png")
    return made + ["loss_curves.png", "step_time_by_position.png"]


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    # One-line errors and the commands' argparse types (docs/CLI.md: the experiments follow the same contract).
    p = OneLineArgumentParser(prog="smollm2.py", description="Grow SmolLM2-135M 30 -> 45 layers with each method, "
                              "continue pre-training the new layers on Austen, compare held-out perplexity.",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="sizes: " + "; ".join(f"{k}: " + ", ".join(f"{a}={v}" for a, v in s.items())
                                             for k, s in PRESETS.items()) + ". Flags below override them")
    p.add_argument("--base", default=default_base(),
                   help="Hugging Face LLaMA folder with tokenizer.json "
                        "(default: the SmolLM2 folder cached by tests/smollm2.py)")
    p.add_argument("--data", nargs="+", default=default_data(),
                   help="text files/folders (.txt, .gz); default ../shared/data/austen if present")
    p.add_argument("--held-out", default="emma",
                   help="the file held out for perplexity (its name before the first dot)")
    p.add_argument("--new-layers", type=positive_int, default=None, help="new layers (default: the preset's, else 15)")
    p.add_argument("--methods", default=None,
                   help=f"comma list, grown at the top positions (preset; default {','.join(CLASSIC_ARMS)})")
    p.add_argument("--positions", default=None,
                   help="comma list, for opt-structured (preset; default top,middle,bottom; 'none' for none)")
    p.add_argument("--seeds", default=None, help="comma list (preset)")
    p.add_argument("--steps", type=positive_int, default=None, help="(preset)")
    p.add_argument("--lr", type=positive_float, default=None, help="(preset)")
    p.add_argument("--block-size", type=positive_int, default=None, help="(preset)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="sequences per step (preset)")
    p.add_argument("--micro-batch-size", type=positive_int, default=None, help="(preset)")
    p.add_argument("--eval-tokens", type=non_negative_int, default=None,
                   help="held-out tokens evaluated, 0 = all (preset)")
    p.add_argument("--evals", type=non_negative_int, default=None,
                   help="held-out evaluations during training, 0 = only the end (preset)")
    p.add_argument("--device", default=None, help="(preset)")
    p.add_argument("--accuracy-task", default=str(DEFAULT_TASK_JSONL),
                   help="the cloze JSONL scored (acc, acc_norm) after growth and after training")
    p.add_argument("--accuracy-questions", type=non_negative_int, default=None,
                   help="its first N questions, 0 = all (preset)")
    p.add_argument("--no-accuracy", action="store_true", help="skip the accuracy evaluation (perplexity only)")
    p.add_argument("--threads", type=non_negative_int, default=1,
                   help="CPU threads for torch (0: torch's default, all cores). On a small or busy machine, "
                        "OpenMP threads competing with other processes can be many times slower than one")
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="grown models trained in this many worker processes, one thread each")
    p.add_argument("--out", default="runs/smollm2", help="results folder (replaced)")
    return p


def config_from_flags(flags) -> SmolConfig:
    if not flags.base:
        raise ExperimentError("--base is required: a Hugging Face LLaMA folder with tokenizer.json (make the SmolLM2 "
                              "one with: python -c \"import sys; sys.path.insert(0, 'tests'); import smollm2; "
                              "print(smollm2.cached_smollm2_dir())\")")
    if not Path(flags.base).is_dir():
        raise ExperimentError(f"--base {flags.base}: no such folder")
    if not flags.data:
        raise ExperimentError("no data: pass --data with text files or folders (e.g. the Austen novels)")
    preset = dict(PRESETS[flags.preset])
    for key in ("steps", "lr", "block_size", "batch_size", "micro_batch_size", "evals", "device"):
        if getattr(flags, key) is not None:
            preset[key] = getattr(flags, key)
    if flags.eval_tokens is not None:
        preset["eval_tokens"] = flags.eval_tokens or None
    if flags.accuracy_questions is not None:
        preset["accuracy_questions"] = flags.accuracy_questions or None
    if flags.seeds is not None:
        try:
            preset["seeds"] = tuple(int(s) for s in parse_list(flags.seeds, "--seeds"))
        except ValueError:
            raise ExperimentError(f"--seeds {flags.seeds!r}: expected comma-separated integers") from None
    if flags.positions is None:
        positions = tuple(preset.get("positions", ("top", "middle", "bottom")))
    elif flags.positions.strip() == "none":
        positions = ()
    else:
        positions = tuple(parse_list(flags.positions, "--positions", POSITIONS))
    if str(preset["device"]).startswith("cuda") and not torch.cuda.is_available():
        raise ExperimentError(f"device {preset['device']}: CUDA is not available (use --preset cpu or --device cpu)")
    return SmolConfig(base=flags.base, data=list(flags.data), held_out=flags.held_out,
                      new_layers=flags.new_layers or preset.get("new_layers", 15),
                      methods=tuple(parse_list(flags.methods, "--methods", ARM_OPTIONS)) if flags.methods
                      else tuple(preset.get("methods", CLASSIC_ARMS)),
                      positions=positions,
                      seeds=tuple(preset["seeds"]), steps=preset["steps"], lr=preset["lr"],
                      block_size=preset["block_size"], batch_size=preset["batch_size"],
                      micro_batch_size=preset["micro_batch_size"], eval_tokens=preset["eval_tokens"],
                      evals=preset["evals"], device=preset["device"],
                      accuracy_task=None if flags.no_accuracy else flags.accuracy_task,
                      accuracy_questions=preset["accuracy_questions"])


def main(argv=None) -> int:
    flags = build_parser().parse_args(argv)

    def start():
        config = config_from_flags(flags)
        run_smollm2(config, flags.out, log=lambda *a: print(*a, flush=True), jobs=flags.jobs)

    return run_cli("smollm2.py", flags, start, (TrainError, CheckpointError, DataError, TaskFileError))


if __name__ == "__main__":
    sys.exit(main())
