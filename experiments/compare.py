"""The study: what does optimal transport add to depth up-scaling, at equal training budget?

    python experiments/compare.py --jobs 2                              # default: 2 seeds, short budgets (~10 min)
    python experiments/compare.py --preset study --jobs 2 --threads 2  # the study's embedded part (docs/RESULTS.md)
    python experiments/compare.py --preset gpu --device cuda

Per seed:
1. Train a small LLaMA-style base from scratch (byte-level vocabulary: 256 bytes + EOS) on the
   standard library's own .py files until its held-out loss has flattened: evaluated every
   --check-every steps at a constant learning rate, it stops when the best held-out loss so far
   improved by less than --flat-tol nats over the last --flat-window steps (or at --base-max-steps,
   recorded as not flattened), then anneals for --anneal-fraction of the steps run (linear decay
   to 0.1 x lr).
2. Grow that base with every arm into the same gaps: OpT-DeUS as published, Algorithm 1
   (unnormalised and normalised plans), structured OpT-DeUS, Avg-DeUS with zero-init, LLaMA Pro, and
   as references that do not preserve the function, Avg-DeUS and SOLAR. Zero-init arms must start
   at the base's held-out loss exactly (checked; the run stops otherwise).
3. Train only the new layers of every grown model for the same --grow-steps on the same data order,
   and the un-grown base (all layers) for the same budget as a reference.
Across seeds: each arm's final held-out loss minus avg-zero's and llama-pro's, paired by seed, with
a 95 % t-interval; curves.png shows each arm's mean held-out curve beside its final difference from
avg-zero with that interval. The log has one line per finished arm, with the study's elapsed time and ETA.

Outputs under --out: runs/seed<k>/<arm>.jsonl (training metrics; first line: the run, the Python
version and the corpus fingerprint), summary.md, summary.json, curves.png (with matplotlib: pip
install matplotlib, or the project's `plots` extra). Losses are per byte; everything but the
timings is a pure function of the seed and the Python installation (its stdlib is the data).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import math
import os
import random
import sys
import sysconfig
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # so `python experiments/compare.py` works without `pip install -e .`

from experiments.common import (CLASSIC_ARMS, ARM_OPTIONS, STUDY_EMBEDDED_ARMS, ExperimentError,  # noqa: E402
                                environment, fmt, fmt_against_zero_init, fmt_interval, fmt_pm, grow_arm,
                                growth_options, map_jobs, markdown_table, mean_std, paired_comparisons,
                                paired_difference, parse_list, reporting, reproducibility, run_cli, run_study,
                                stamp_jsonl, write_json)
from experiments.common import report as report_progress  # noqa: E402
from experiments.study_output import Progress, figure_reference, plot_study, quiet  # noqa: E402
from opt_deus_core.model import ModelArgs, Transformer  # noqa: E402
from opt_deus_core.opt_deus import POSITIONS  # noqa: E402
from opt_deus_tool import CheckpointError  # noqa: E402
from opt_deus_tool.cli import (OneLineArgumentParser, finite_float, non_negative_int, positive_float,  # noqa: E402
                               positive_int)
from opt_deus_tool.data import ByteTokenizer  # noqa: E402
from opt_deus_tool.runs import train_run  # noqa: E402
from opt_deus_core.train import TrainConfig, TrainError, evaluate  # noqa: E402

EOS = ByteTokenizer.eos_id  # 256: ids 0..255 are bytes, 256 separates files
# Folders under the stdlib path that are not the standard library's own modules, or are test data
# (odd encodings, huge generated files).
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}
DATA_SEED = 1234  # the file subset is fixed, whatever the seed: seeds vary initialisation and data order
REFERENCE = "base+train"  # the un-grown base, all layers trained for the same budget as the arms


@dataclass
class CompareConfig:
    # The base model (LLaMA-style, tied embeddings, byte vocabulary)
    layers: int = 8
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    intermediate: int = 384
    block_size: int = 128
    # Growth: `new_layers` layers at `position`; SOLAR places its own
    new_layers: int = 4
    position: str = "top"
    methods: tuple[str, ...] = CLASSIC_ARMS
    reference: bool = True            # also continue training the un-grown base (all layers)
    # The base: constant lr after warmup until flat (or base_max_steps), then a linear anneal
    batch_size: int = 16              # sequences per step (one micro-batch)
    base_max_steps: int = 250
    base_warmup: int = 25
    base_lr: float = 3e-3
    check_every: int = 20             # held-out evaluation interval (base and arms)
    flat_window: int = 200            # flattened: held-out loss fell < flat_tol over this many steps
    flat_tol: float = 0.01            # nats per byte
    anneal_fraction: float = 0.25     # anneal steps = this x the steps run at constant lr
    # The arms: every grown model (and the reference) for the same budget, WSD schedule
    grow_steps: int = 80
    grow_lr: float = 1e-3
    trainable: str = "new"            # "new" (the paper) or "all", for the grown models
    # Data: the stdlib's .py files (or --data-dir), a fixed subset
    train_bytes: int = 2_000_000
    eval_blocks: int = 128            # held-out blocks of block_size bytes
    data_dir: str | None = None       # default: sysconfig.get_paths()["stdlib"]
    seeds: tuple[int, ...] = (0, 1)
    # False: one base per seed (the seed varies the base too). True: one base, trained once with the
    # first seed, grown by every seed (seeds then vary the arms' data order only): a long base run
    # paid once, for a base that flattens within a CPU budget.
    shared_base: bool = False
    device: str = "cpu"

    def validate(self):
        if min(self.layers, self.hidden, self.heads, self.kv_heads, self.head_dim, self.intermediate,
               self.block_size, self.new_layers, self.batch_size, self.base_max_steps, self.grow_steps,
               self.check_every, self.flat_window, self.train_bytes, self.eval_blocks) < 1:
            raise ExperimentError("sizes, steps, intervals and byte counts must be >= 1")
        if not 0 <= self.base_warmup < self.base_max_steps:
            raise ExperimentError(f"--base-warmup {self.base_warmup} must be in [0, --base-max-steps)")
        if not (self.flat_tol >= 0 and self.anneal_fraction >= 0):
            raise ExperimentError("--flat-tol and --anneal-fraction must be >= 0")
        if self.heads % self.kv_heads:
            raise ExperimentError(f"--heads {self.heads} is not a multiple of --kv-heads {self.kv_heads}")
        if self.position not in POSITIONS:
            raise ExperimentError(f"--position {self.position!r}: choose from {', '.join(POSITIONS)}")
        for name in self.methods:
            if name not in ARM_OPTIONS:
                raise ExperimentError(f"unknown method {name!r} (choose from {', '.join(ARM_OPTIONS)})")
        if not self.methods:
            raise ExperimentError("no methods")
        if "solar" in self.methods and self.new_layers > self.layers:
            raise ExperimentError(f"solar repeats at most all {self.layers} layers, got --new-layers {self.new_layers}")
        if self.trainable not in ("new", "all"):
            raise ExperimentError(f"--trainable {self.trainable!r}: expected 'new' or 'all'")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ExperimentError(f"seeds {self.seeds}: need at least one, all different")


# Presets: CompareConfig fields that differ from the defaults. The defaults are README command 1:
# two seeds, a base too short to flatten (the tables say so); sized for 10 minutes with --jobs 2 on
# 2 cores (measured time: README.md).
PRESETS = {
    "default": {},
    # The full CPU study, with --jobs 2: one shared base trained until flat (at most 3000 steps), then five
    # seeds of 300 steps per arm, one job per (seed, arm). Measured time and results: docs/RESULTS.md.
    "study": dict(seeds=(0, 1, 2, 3, 4), shared_base=True, base_max_steps=3000, base_warmup=50, check_every=50,
                  flat_window=250, flat_tol=0.01, grow_steps=300, methods=STUDY_EMBEDDED_ARMS,
                  reference=False),
    # One GPU (bf16 autocast): a wider, deeper base, still tiny for a GPU; sized by estimate, not run yet.
    "gpu": dict(device="cuda", layers=16, hidden=512, heads=8, kv_heads=4, head_dim=64, intermediate=1536,
                block_size=256, batch_size=32, train_bytes=8_000_000, eval_blocks=256, base_max_steps=4000,
                base_warmup=100, base_lr=1e-3, check_every=100, flat_window=500, flat_tol=0.01, grow_steps=1000,
                new_layers=8, seeds=(0, 1, 2, 3, 4)),
    # The smoke test's size (tests/test_experiments.py): seconds, every code path.
    "tiny": dict(layers=4, hidden=32, heads=2, kv_heads=1, head_dim=16, intermediate=64, block_size=32,
                 new_layers=2, batch_size=4, base_max_steps=6, base_warmup=1, check_every=2, flat_window=2,
                 grow_steps=4, train_bytes=20_000, eval_blocks=4, seeds=(0, 1)),
}


def preset_config(name: str, **overrides) -> CompareConfig:
    if name not in PRESETS:
        raise ExperimentError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return CompareConfig(**{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------------------------
# Data: the standard library's source, as bytes


def stdlib_files(root=None) -> tuple[Path, list[Path]]:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ExperimentError(f"{root}: no such folder (pass --data-dir with .py files)")
    files = []
    # os.walk with pruning, not rglob: site-packages under the stdlib folder can hold gigabytes.
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    files.sort(key=lambda f: f.relative_to(root).as_posix())
    if not files:
        raise ExperimentError(f"{root}: no .py files found")
    return root, files


def load_corpus(config: CompareConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """(train tokens, eval tokens, description). Each file's bytes followed by EOS.

    A file is held out when the CRC32 of its relative path is 0 mod 10: a split that does not move
    when other files come or go between Python versions. Files are then taken in a fixed shuffled
    order (for variety: sorted order would be all asyncio, then all concurrent, ...) until the
    budgets are met; the last file is cut.
    """
    root, files = stdlib_files(config.data_dir)
    random.Random(DATA_SEED).shuffle(files)
    need = {"train": config.train_bytes, "eval": config.eval_blocks * config.block_size + 1}
    parts = {"train": [], "eval": []}
    used = {"train": 0, "eval": 0}
    n_files = {"train": 0, "eval": 0}
    for path in files:
        split = "eval" if zlib.crc32(path.relative_to(root).as_posix().encode()) % 10 == 0 else "train"
        if used[split] >= need[split]:
            if all(used[s] >= need[s] for s in need):
                break
            continue
        data = np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.uint16)
        parts[split] += [data, np.array([EOS], dtype=np.uint16)]
        used[split] += len(data) + 1
        n_files[split] += 1
    for split in need:
        if used[split] < need[split]:
            raise ExperimentError(f"{root}: only {used[split]:,} bytes of .py files for the {split} split, "
                                  f"{need[split]:,} needed (lower --train-bytes / --eval-blocks)")
    train_tokens = np.concatenate(parts["train"])[: need["train"]]
    # Evaluation: exactly eval_blocks whole blocks, so every evaluation reads the same tokens.
    eval_tokens = np.concatenate(parts["eval"])[: need["eval"]]
    info = {"root": str(root), "files_available": len(files), "train_files": n_files["train"],
            "eval_files": n_files["eval"], "train_tokens": int(len(train_tokens)),
            "eval_tokens": int(len(eval_tokens) - 1),
            "train_sha256": hashlib.sha256(train_tokens.tobytes()).hexdigest()[:16],
            "eval_sha256": hashlib.sha256(eval_tokens.tobytes()).hexdigest()[:16],
            # The fingerprint of the whole embedded corpus as the models read it (uint16 tokens, the
            # training stream then the held-out one): equal fingerprints, equal data.
            "corpus_sha256": hashlib.sha256(train_tokens.tobytes() + eval_tokens.tobytes()).hexdigest()}
    return train_tokens, eval_tokens, info


# ----------------------------------------------------------------------------------------------
# Model and training


def make_base(config: CompareConfig, seed: int) -> Transformer:
    args = ModelArgs(vocab_size=EOS + 1, hidden_size=config.hidden, intermediate_size=config.intermediate,
                     num_hidden_layers=config.layers, num_attention_heads=config.heads,
                     num_key_value_heads=config.kv_heads, head_dim=config.head_dim, rms_norm_eps=1e-5,
                     max_position_embeddings=config.block_size, tie_word_embeddings=True)
    return Transformer(args).init_weights(torch.Generator().manual_seed(seed))


def train_config(config: CompareConfig, steps: int, lr: float, trainable, seed: int, **kw) -> TrainConfig:
    # One micro-batch per step; the held-out set is evaluated every check_every steps, all of it
    # (eval_blocks whole blocks), so the curves and the tables read the same tokens.
    base = dict(steps=steps, lr=lr, warmup_steps=max(1, steps // 10) if steps > 1 else 0,
                batch_tokens=config.batch_size * config.block_size, micro_batch_size=config.batch_size,
                block_size=config.block_size, trainable=trainable, eval_every=config.check_every,
                eval_batches=math.ceil(config.eval_blocks / config.batch_size),
                log_every=max(1, min(steps, 100) // 2), seed=seed, device=config.device, checkpoint_every=0)
    return TrainConfig(**{**base, **kw})


def checked(result):
    # train() turns Ctrl-C / SIGTERM into an early, orderly return: stop the whole study rather
    # than tabulate a run cut short.
    if result.stopped not in (None, "stop_after"):
        raise KeyboardInterrupt(result.stopped)
    return result


def held_out(model: Transformer, eval_tokens, config: CompareConfig) -> dict:
    r = evaluate(model, eval_tokens, config.block_size, config.batch_size)
    return {"loss": r["loss"], "perplexity": r["perplexity"]}


def flat_at(curve: list[tuple[int, float]], window: int, tol: float) -> bool:
    """The flatness criterion on a held-out curve [(step, loss), ...] evaluated every few steps: at
    its last step s, the best (lowest) held-out loss so far is less than tol below the best one up to
    step s - window. Early stopping with patience `window`: the running best ignores the step-to-step
    noise of a constant learning rate. False while the curve is shorter than the window."""
    if not curve:
        return False
    step = curve[-1][0]
    earlier = [loss for s, loss in curve if s <= step - window]
    return bool(earlier) and min(earlier) - min(loss for _, loss in curve) < tol


def base_cap(config: CompareConfig) -> int:
    # The most steps a base can run: --base-max-steps, then its anneal (the study's progress plans with this).
    return config.base_max_steps + round(config.anneal_fraction * config.base_max_steps)


def train_base(base: Transformer, train_tokens, eval_tokens, config: CompareConfig, seed: int, metrics, log,
               label: str = "base") -> dict:
    """Trains the base until its held-out loss is flat, then anneals; see the module docstring.

    Runs as one training run (one optimizer, one data stream) cut into chunks of check_every steps:
    train() stops after each chunk (stop_after), and the next chunk resumes from its checkpoint with
    the same state, so the result equals an uninterrupted run that happened to stop there. The
    anneal resumes with the schedule extended: steps = s + D, the last D steps decaying linearly."""
    t0 = time.perf_counter()
    # decay_fraction 0: constant lr after warmup, for as long as it takes.
    cfg = train_config(config, config.base_max_steps, config.base_lr, "all", seed, warmup_steps=config.base_warmup,
                       decay_fraction=0.0, checkpoint_every=0)
    curve, step, checkpoint = [], 0, None
    every = max(config.check_every, config.base_max_steps // 10)  # a progress line about 10 times per base
    with tempfile.TemporaryDirectory(prefix="opt-deus-base-") as tmp:
        folder = dict(out_dir=tmp, keep_checkpoints=1, metrics_path=metrics, log=quiet(log))
        while step < config.base_max_steps:
            stop = min(step + config.check_every, config.base_max_steps)
            r = checked(train_run(base, train_tokens, dataclasses.replace(cfg, stop_after=stop), eval_tokens,
                                  resume_from=checkpoint, **folder))
            note = f"base step {r.step} (at most {config.base_max_steps}): held-out loss {r.evals[-1]['eval_loss']:.4f}"
            report_progress(label=label, work=r.step - step, note=None if r.step // every == step // every else note)
            step, checkpoint = r.step, r.checkpoint
            curve += [(e["step"], e["eval_loss"]) for e in r.evals if not curve or e["step"] > curve[-1][0]]
            if flat_at(curve, config.flat_window, config.flat_tol):
                break
        flattened = flat_at(curve, config.flat_window, config.flat_tol)
        log(f"base {'flattened' if flattened else 'NOT flattened (hit --base-max-steps)'} at step {step}: "
            f"held-out loss {curve[-1][1]:.4f}")
        anneal = round(config.anneal_fraction * step)
        if anneal:
            total = step + anneal
            anneal_cfg = dataclasses.replace(cfg, steps=total, decay_fraction=anneal / total, stop_after=None,
                                             eval_every=0)
            r = checked(train_run(base, train_tokens, anneal_cfg, eval_tokens, resume_from=checkpoint, **folder))
            curve += [(e["step"], e["eval_loss"]) for e in r.evals if e["step"] > curve[-1][0]]
    report_progress(label=label, work=anneal, replan=step + anneal - base_cap(config))  # a flattened base ends early
    return {"constant_lr_steps": step, "anneal_steps": anneal, "steps": step + anneal, "flattened": flattened,
            "curve": [{"step": s, "loss": l} for s, l in curve], "seconds": time.perf_counter() - t0}


def flat_count(flattened: list[bool | None]) -> str:
    # "4/6": seeds whose curve met the criterion; "n/a": the run is shorter than the window.
    return "n/a" if None in flattened else f"{sum(flattened)}/{len(flattened)}"


def run_flat(evals: list[dict], config: CompareConfig) -> bool | None:
    # The base's criterion, read at the arm's last evaluation: the window then holds the WSD decay,
    # whose drop can only count as progress, so "flat" errs towards "not flat", never the other way.
    # None when the run is shorter than the window: it cannot be judged.
    curve = [(e["step"], e["loss"]) for e in evals]
    if not curve or curve[-1][0] - curve[0][0] < config.flat_window:
        return None
    return flat_at(curve, config.flat_window, config.flat_tol)


# ----------------------------------------------------------------------------------------------
# One seed: a base, every arm, the reference


def shared_base(config: CompareConfig, runs_dir: str | None, log) -> dict:
    """--shared-base: one base (seed = the first seed) trained once, grown by every seed's arms."""
    train_tokens, eval_tokens, data_info = load_corpus(config)
    seed = config.seeds[0]
    folder = Path(runs_dir) / "shared-base" if runs_dir else None
    metrics = folder / "base.jsonl" if folder else None
    base = make_base(config, seed)
    log(f"[shared base] {config.layers} layers, hidden {config.hidden}, {sum(p.numel() for p in base.parameters()):,} "
        f"parameters, seed {seed}")
    record = train_base(base, train_tokens, eval_tokens, config, seed, metrics, lambda *a: log("[shared base]", *a),
                        label="shared base")
    log(f"[shared base] held-out loss {held_out(base, eval_tokens, config)['loss']:.4f} after {record['steps']} steps")
    if metrics is not None:
        stamp_jsonl(metrics, {"arm": "base", "seed": seed, **reproducibility(data_info["corpus_sha256"])})
    return {"state": {k: v.clone() for k, v in base.state_dict().items()}, "record": record, "seed": seed}


def run_seed(config: CompareConfig, seed: int, runs_dir: str | None, log=print, base_given: dict | None = None,
             only: str | None = None) -> dict:
    """One seed: its own base (or the shared one), every arm, the reference (or, with `only`, that
    one arm). The seed sets the base's initialisation and data order and, through seed + 1000, the
    arms' data order."""
    t_start = time.perf_counter()
    train_tokens, eval_tokens, data_info = load_corpus(config)
    stamp = {"seed": seed, **reproducibility(data_info["corpus_sha256"])}
    folder = Path(runs_dir) / f"seed{seed}" if runs_dir else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)

    def metrics(name):
        return folder / f"{name}.jsonl" if folder else None

    def finish(name):
        if folder is not None:
            stamp_jsonl(metrics(name), {"arm": name, **stamp})

    # The activation-aligned arms' calibration text: the first 16 blocks of the training bytes, or as many whole
    # blocks as they hold (grow_by_name gives it only to those arms, and refuses too little in one line).
    rows = min(16, len(train_tokens) // config.block_size)
    calibration = torch.from_numpy(np.asarray(train_tokens[: rows * config.block_size], np.int64))
    calibration = calibration.view(rows, config.block_size)
    if rows < 16 and any(growth_options(name).cost == "activations" for name in config.methods):
        log(f"note: calibration text for the activation arms: {rows} blocks of {config.block_size} bytes (the "
            f"training bytes hold no more), not 16")
    base = make_base(config, seed)
    n_params = sum(p.numel() for p in base.parameters())
    if base_given is None:
        log(f"base: {config.layers} layers, hidden {config.hidden}, {n_params:,} parameters")
        base_run = train_base(base, train_tokens, eval_tokens, config, seed, metrics("base"), log, f"seed {seed}")
        finish("base")
    else:
        base.load_state_dict(base_given["state"])
        base_run = {**base_given["record"], "shared_from_seed": base_given["seed"]}
    base_eval = held_out(base, eval_tokens, config)
    if base_given is None:
        log(f"base held-out loss {base_eval['loss']:.4f} after {base_run['steps']} steps")

    # Every arm reads the same continued-training stream (seed + 1000), not a replay of the base's.
    grow_seed = seed + 1000
    arms = {}
    names = config.methods if only is None else [name for name in config.methods if name == only]
    for name in names:
        t0 = time.perf_counter()
        grown, report, trainable = grow_arm(base, name, config.new_layers, config.position, calibration)
        grow_s = time.perf_counter() - t0
        zero_init = growth_options(name).out_scale == 0
        after_growth = held_out(grown, eval_tokens, config)
        # A zero-init arm computes the base function: the same held-out loss, to the last bit.
        if zero_init and after_growth["loss"] != base_eval["loss"]:
            raise ExperimentError(f"seed {seed}, {name}: held-out loss right after growth {after_growth['loss']!r} "
                                  f"differs from the base's {base_eval['loss']!r}; a zero-init arm must start exactly "
                                  f"at the base function")
        r = checked(train_run(grown, train_tokens, train_config(config, config.grow_steps, config.grow_lr,
                                                                trainable or config.trainable, grow_seed), eval_tokens,
                              metrics_path=metrics(name), log=quiet(lambda *a: log(f"[{name}]", *a))))
        finish(name)
        evals = [{"step": e["step"], "loss": e["eval_loss"]} for e in r.evals]
        after = held_out(grown, eval_tokens, config)
        report_progress(label=f"seed {seed}", arm=True, work=config.grow_steps,
                        note=f"{name}: held-out loss {after_growth['loss']:.4f} -> {after['loss']:.4f} "
                             f"({r.mean_step_s:.3f} s/step)")
        arms[name] = {"growth": {k: report.get(k) for k in ("method", "align", "epsilon", "zero_init", "normalize_plan",
                                                             "position", "insert_after", "new_layers")},
                      "zero_init": zero_init, "layers": len(grown.layers), "grow_seconds": grow_s,
                      "after_growth": after_growth, "after_training": after, "evals": evals,
                      "flattened": run_flat(evals, config),
                      "losses": r.losses, "mean_step_s": r.mean_step_s, "trainable_params": r.trainable_params,
                      "trainable_layers": r.trainable_layers}
        del grown

    if config.reference and only in (None, REFERENCE):
        reference = copy.deepcopy(base)
        r = checked(train_run(reference, train_tokens, train_config(config, config.grow_steps, config.grow_lr, "all",
                                                                      grow_seed), eval_tokens,
                              metrics_path=metrics(REFERENCE), log=quiet(lambda *a: log(f"[{REFERENCE}]", *a))))
        finish(REFERENCE)
        evals = [{"step": e["step"], "loss": e["eval_loss"]} for e in r.evals]
        after = held_out(reference, eval_tokens, config)
        report_progress(label=f"seed {seed}", arm=True, work=config.grow_steps,
                        note=f"{REFERENCE} (no growth, all layers): held-out loss {base_eval['loss']:.4f} -> "
                             f"{after['loss']:.4f} ({r.mean_step_s:.3f} s/step)")
        arms[REFERENCE] = {"growth": None, "zero_init": True, "layers": config.layers, "grow_seconds": 0.0,
                           "after_growth": base_eval, "after_training": after, "evals": evals,
                           "flattened": run_flat(evals, config), "losses": r.losses,
                           "mean_step_s": r.mean_step_s, "trainable_params": r.trainable_params,
                           "trainable_layers": r.trainable_layers}

    return {"seed": seed, "data": data_info, "base": {"params": n_params, "held_out": base_eval, **base_run},
            "arms": arms, "seconds": time.perf_counter() - t_start}


def _seed_job(job) -> dict:
    # map_jobs' worker: a seed (or one arm of it) in its own process, its log lines prefixed with the seed.
    config, seed, runs_dir, base_given, only = job
    return run_seed(config, seed, runs_dir, log=lambda *a: print(f"[seed {seed}]", *a, flush=True),
                    base_given=base_given, only=only)


def merge_arms(parts: list[dict]) -> dict:
    # One seed's record from its one-arm jobs (listed in arm order): they share the base and data.
    return {**parts[0], "arms": {name: arm for part in parts for name, arm in part["arms"].items()},
            "seconds": sum(part["seconds"] for part in parts)}


# ----------------------------------------------------------------------------------------------
# The study: every seed, then the paired comparisons


def run_compare(config: CompareConfig, out=None, log=print, jobs: int = 1) -> dict:
    """Runs the study and returns the summary (what summary.json holds). With `out`, writes
    summary.md, summary.json, runs/ and curves.png there (replacing it). jobs > 1 runs seeds in
    that many worker processes (one torch thread each)."""
    return run_study(config, _run, out, log, jobs)


def _run(config: CompareConfig, folder: Path | None, log, jobs: int) -> dict:
    t_start = time.perf_counter()
    runs_dir = str(folder / "runs") if folder is not None else None
    _, _, data_info = load_corpus(config)
    log(f"data: {data_info['train_tokens']:,} training bytes from {data_info['train_files']} files, "
        f"{data_info['eval_tokens']:,} held-out bytes from {data_info['eval_files']} other files "
        f"({data_info['root']}); "
        f"Python {reproducibility('')['python']}, corpus sha256 {data_info['corpus_sha256']}")
    log(f"arms: {', '.join(config.methods)}{', ' + REFERENCE if config.reference else ''}; seeds {list(config.seeds)}"
        f"{f'; {jobs} worker processes' if jobs > 1 else ''}")
    # One line per finished arm (of a seed), the whole study's elapsed time and ETA; about ten per base.
    n_runs = len(config.seeds) * (len(config.methods) + config.reference)
    progress = Progress(n_runs, (1 if config.shared_base else len(config.seeds)) * base_cap(config)
                        + n_runs * config.grow_steps, log)
    with reporting(progress):
        # A shared base trains here, before the workers start (with --threads, on all of this process's threads).
        base_given = shared_base(config, runs_dir, log) if config.shared_base else None
        if jobs > 1 and base_given is not None:
            # One job per (seed, arm): with a shared base the arms are independent, and many short jobs
            # keep every worker busy (5 seeds as 5 jobs on 2 workers would leave one idle a third of the time).
            arms = list(config.methods) + ([REFERENCE] if config.reference else [])
            parts = map_jobs(_seed_job, [(config, seed, runs_dir, base_given, arm) for seed in config.seeds
                                         for arm in arms], jobs)
            seeds = [merge_arms(parts[i: i + len(arms)]) for i in range(0, len(parts), len(arms))]
        elif jobs > 1:
            seeds = map_jobs(_seed_job, [(config, seed, runs_dir, None, None) for seed in config.seeds], jobs)
        else:
            seeds = [run_seed(config, seed, runs_dir, log=lambda *a, s=seed: log(f"[seed {s}]", *a),
                              base_given=base_given) for seed in config.seeds]
    summary = {"config": dataclasses.asdict(config), "data": data_info,
               "reproducibility": reproducibility(data_info["corpus_sha256"]), "environment": environment(),
               "arms": list(seeds[0]["arms"]), "seeds": seeds, "comparisons": comparisons(seeds),
               "elapsed_s": time.perf_counter() - t_start, "jobs": jobs, "plots": []}
    if folder is not None:
        (folder / "summary.md").write_text(summary_markdown(summary))
        summary["plots"] = plot_curves(summary, folder / "curves.png", log)
        write_json(folder / "summary.json", summary)
    log("\n" + summary_markdown(summary))
    log(f"total time {summary['elapsed_s']:.0f}s")
    return summary


def final_losses(seeds: list[dict], arm: str) -> list[float]:
    return [s["arms"][arm]["after_training"]["loss"] for s in seeds]


def comparisons(seeds: list[dict]) -> dict:
    return paired_comparisons({arm: final_losses(seeds, arm) for arm in seeds[0]["arms"]})


def eval_curves(seeds: list[dict], arm: str) -> tuple[list[int], np.ndarray]:
    # (steps, seeds x steps held-out losses); every seed evaluates at the same steps.
    steps = [e["step"] for e in seeds[0]["arms"][arm]["evals"]]
    return steps, np.array([[e["loss"] for e in s["arms"][arm]["evals"]] for s in seeds])


def summary_markdown(summary: dict) -> str:
    c, seeds, data, rep = summary["config"], summary["seeds"], summary["data"], summary["reproducibility"]
    n = len(seeds)
    trained = "only the new layers" if c["trainable"] == "new" else "all layers"
    base_steps = [s["base"]["steps"] for s in seeds]
    n_flat = sum(s["base"]["flattened"] for s in seeds)
    if c["shared_base"]:  # one base, counted once
        steps_run = str(base_steps[0])
        flattened = (f"flattened at step {seeds[0]['base']['constant_lr_steps']}" if n_flat
                     else "not flattened (hit the step cap)")
    else:
        steps_run = f"{min(base_steps)}" + (f"–{max(base_steps)}" if max(base_steps) > min(base_steps) else "")
        flattened = f"flattened in {n_flat} of {n} seeds"
    listed = ", ".join(map(str, c["seeds"]))
    which = (f"one, trained with seed {c['seeds'][0]} and shared by seeds {listed} (they vary the arms' data order "
             f"only)" if c["shared_base"] else f"one per seed (seeds {listed})")
    text = (f"Python {rep['python']}, torch {rep['torch']}, corpus sha256 `{rep['corpus_sha256']}` "
            f"({data['train_tokens']:,} training bytes, {data['eval_tokens']:,} held-out bytes). "
            f"Device {c['device']}; {summary['environment']['processor']}; wall time {summary['elapsed_s']:.0f} s "
            f"with {summary['jobs']} worker process(es).\n\n"
            f"Base: {c['layers']} layers, hidden {c['hidden']}, {seeds[0]['base']['params']:,} parameters, {which}. "
            f"Trained at lr {c['base_lr']} until its best held-out loss improved by less than {c['flat_tol']} nats "
            f"over {c['flat_window']} steps (checked every {c['check_every']}; at most {c['base_max_steps']}), then "
            f"annealed for {c['anneal_fraction']:.0%} of that: {steps_run} steps in all; {flattened}. "
            f"Grown to {c['layers'] + c['new_layers']} "
            f"layers ({c['position']} gaps; solar places its own), then {c['grow_steps']} steps of {c['batch_size']} x "
            f"{c['block_size']} bytes (lr {c['grow_lr']}, WSD), {trained} trainable, the same data order for every arm "
            f"of a seed. Loss: nats per byte on the held-out bytes.\n\n")
    headers = ["arm", "zero-init", "loss after growth", "final loss (mean ± sd)", "Δ vs avg-zero [95% CI]",
               "Δ vs llama-pro [95% CI]", "Δ vs its zero-init arm", "flat (seeds)", "s/step"]
    rows = [["base (before growth)", "", fmt_pm([s["base"]["held_out"]["loss"] for s in seeds], 4), "", "", "", "", "",
             ""]]
    for arm in summary["arms"]:
        runs = [s["arms"][arm] for s in seeds]
        comp = summary["comparisons"][arm]
        rows.append([arm + (" (no growth, all layers)" if arm == REFERENCE else ""),
                     "yes" if runs[0]["zero_init"] else "no",
                     fmt_pm([r["after_growth"]["loss"] for r in runs], 4),
                     fmt_pm(final_losses(seeds, arm), 4),
                     fmt_interval(comp["avg-zero"]) if "avg-zero" in comp else "",
                     fmt_interval(comp["llama-pro"]) if "llama-pro" in comp else "",
                     fmt_against_zero_init(arm, comp), flat_count([r["flattened"] for r in runs]),
                     fmt(mean_std([r["mean_step_s"] for r in runs])[0], 3)])
    text += markdown_table(headers, rows)
    text += (f"\nΔ: final held-out loss of the arm minus the baseline's, paired by seed (negative: the arm is "
             f"better), mean over {n} seeds with a 95 % t-interval. flat: seeds whose best held-out loss improved by "
             f"less than {c['flat_tol']} over the last {c['flat_window']} steps of the run, the learning-rate decay "
             f"included (n/a: the run is shorter than {c['flat_window']} steps).\n\n")
    # Whole curves: mean held-out loss over seeds at (at most 9) evaluation steps.
    steps, _ = eval_curves(seeds, summary["arms"][0])
    pick = sorted({round(i * (len(steps) - 1) / 8) for i in range(9)}) if len(steps) > 9 else range(len(steps))
    headers = ["arm"] + [str(steps[i]) for i in pick]
    rows = []
    for arm in summary["arms"]:
        _, curves = eval_curves(seeds, arm)
        rows.append([arm] + [fmt(float(curves[:, i].mean())) for i in pick])
    text += "Held-out loss during training (mean over seeds), by step after growth:\n\n" + markdown_table(headers, rows)
    return text


def plot_curves(summary: dict, path: Path, log) -> list[str]:
    seeds, rep, arms = summary["seeds"], summary["reproducibility"], summary["arms"]
    ref = figure_reference(arms)
    return plot_study(path, {arm: eval_curves(seeds, arm) for arm in arms},
                      {arm: paired_difference(final_losses(seeds, arm), final_losses(seeds, ref)) for arm in arms
                       if arm != ref},
                      ref, {arm: seeds[0]["arms"][arm]["zero_init"] for arm in arms},
                      f"experiments/compare.py: Python {rep['python']}, corpus sha256 {rep['corpus_sha256'][:16]}…, "
                      f"{len(seeds)} seeds", "loss (nats/byte)", log)


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    d = CompareConfig()
    # One-line errors and the commands' argparse types (docs/CLI.md: the experiments follow the same contract).
    p = OneLineArgumentParser(prog="compare.py", description="The study: grow a small byte-level LLaMA with each "
                              "depth up-scaling method, continue training, compare held-out loss paired by seed. "
                              "Runs on the standard library's source: nothing to download.",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="sizes; every flag below overrides it. " + "; ".join(
                       f"{k}: " + (", ".join(f"{a}={v}" for a, v in s.items()) or "the defaults shown")
                       for k, s in PRESETS.items()))
    g = p.add_argument_group("base model (defaults: preset 'default')")
    for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "block_size"):
        g.add_argument("--" + name.replace("_", "-"), type=positive_int, default=None, help=f"({getattr(d, name)})")
    g = p.add_argument_group("growth")
    g.add_argument("--new-layers", type=positive_int, default=None, help=f"layers added to the base ({d.new_layers})")
    g.add_argument("--position", choices=POSITIONS, default=None, help=f"where new layers go, not solar ({d.position})")
    g.add_argument("--methods", default=None, help=f"comma list ({','.join(d.methods)})")
    g.add_argument("--reference", action=argparse.BooleanOptionalAction, default=None,
                   help=f"also train the un-grown base, all layers, for the same budget ({d.reference})")
    g = p.add_argument_group("training")
    for name, kind, what in [("batch_size", positive_int, "sequences per step"), ("base_max_steps", positive_int, ""),
                             ("base_warmup", non_negative_int, ""), ("base_lr", positive_float, ""),
                             ("check_every", positive_int, "held-out evaluation interval"),
                             ("flat_window", positive_int, "the flatness criterion's window, steps"),
                             ("flat_tol", finite_float, "flat: held-out loss fell less than this over the window"),
                             ("anneal_fraction", finite_float, "base anneal steps / constant-lr steps"),
                             ("grow_steps", positive_int, "steps after growth, every arm"),
                             ("grow_lr", positive_float, "")]:
        g.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=f"{what} ({getattr(d, name)})")
    g.add_argument("--trainable", choices=("new", "all"), default=None,
                   help=f"what trains after growth ({d.trainable})")
    g.add_argument("--seeds", default=None, help=f"comma list ({','.join(map(str, d.seeds))})")
    g.add_argument("--shared-base", action=argparse.BooleanOptionalAction, default=None,
                   help=f"one base for all seeds, trained once with the first seed ({d.shared_base})")
    g.add_argument("--device", default=None, help=f"cpu, cuda, ... (cuda trains in bf16 autocast) ({d.device})")
    g.add_argument("--threads", type=non_negative_int, default=1,
                   help="CPU threads for torch (0: torch's default, all cores). On a small or busy machine, "
                        "OpenMP threads competing with other processes can be many times slower than one")
    g.add_argument("--jobs", type=positive_int, default=1,
                   help="seeds run in this many worker processes, one thread each")
    g = p.add_argument_group("data")
    g.add_argument("--train-bytes", type=positive_int, default=None, help=f"({d.train_bytes})")
    g.add_argument("--eval-blocks", type=positive_int, default=None,
                   help=f"held-out blocks of --block-size bytes ({d.eval_blocks})")
    g.add_argument("--data-dir", default=None, help="folder of .py files (default: this Python's stdlib)")
    p.add_argument("--out", default="runs/compare", help="results folder (replaced)")
    return p


def config_from_flags(flags) -> CompareConfig:
    overrides = {}
    for f in dataclasses.fields(CompareConfig):
        value = getattr(flags, f.name, None)
        if value is None or f.name in ("methods", "seeds"):
            continue
        overrides[f.name] = value
    if flags.methods is not None:
        overrides["methods"] = tuple(parse_list(flags.methods, "--methods", ARM_OPTIONS))
    if flags.seeds is not None:
        try:
            overrides["seeds"] = tuple(int(s) for s in parse_list(flags.seeds, "--seeds"))
        except ValueError:
            raise ExperimentError(f"--seeds {flags.seeds!r}: expected comma-separated integers") from None
    return preset_config(flags.preset, **overrides)


def main(argv=None) -> int:
    flags = build_parser().parse_args(argv)

    def start():
        config = config_from_flags(flags)
        config.validate()
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise ExperimentError(f"--device {config.device}: CUDA is not available")
        run_compare(config, flags.out, log=lambda *a: print(*a, flush=True), jobs=flags.jobs)

    return run_cli("compare.py", flags, start, (TrainError, CheckpointError))


if __name__ == "__main__":
    sys.exit(main())
