"""Compare depth up-scaling methods end to end on a small model, on text every Python has.

    python experiments/compare.py                     # ~5-7 minutes on 2 CPU cores
    python experiments/compare.py --device cuda --hidden 512 --layers 16 --base-steps 3000 --grow-steps 1000

1. Train a small LLaMA-style base model from scratch (byte-level vocabulary: 256 bytes + EOS) on
   the standard library's own .py files (a fixed subset; some files held out for evaluation).
2. Grow it with each method (OpT-DeUS structured and paper alignment, Avg-DeUS with and without
   zero-init, LLaMA Pro, SOLAR) to the same depth: by default 8 -> 12 layers, one new layer in each
   of the top gaps (the paper's default), SOLAR placing its repeated layers itself.
3. Continue training every grown model on the same data order and token budget, only the new
   layers trainable (the paper's setup; --trainable all to train everything), and, as a reference,
   the un-grown base with all its layers trainable for the same budget.
4. Report held-out loss/perplexity right after growth and after training, time per step and the
   number of trainable parameters: summary.md (a Markdown table), summary.json, per-run metrics
   (runs/*.jsonl) and loss_curves.png (with matplotlib) under --out.

Perplexities are per byte. Everything is a pure function of the seed and the Python installation
(its stdlib is the data), except the timings.
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
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # so `python experiments/compare.py` works without `pip install -e .`

from experiments.common import (METHODS, ExperimentError, environment, ema, fmt, grow_by_name,  # noqa: E402
                                markdown_table, new_figure, output_folder, parse_list, save_figure,
                                write_json)
from model import CheckpointError, ModelArgs, Transformer  # noqa: E402
from opt_deus import POSITIONS, GrowthError  # noqa: E402
from train import TrainConfig, TrainError, ByteTokenizer, evaluate, train  # noqa: E402

EOS = ByteTokenizer.eos_id  # 256: ids 0..255 are bytes, 256 separates files
# Folders under the stdlib path that are not the standard library's own modules, or are test data
# (odd encodings, huge generated files).
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}
DATA_SEED = 1234  # the file subset is fixed, whatever --seed: seeds vary initialisation and data order


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
    # Growth: `new_layers` layers at `position`; SOLAR needs (layers - new_layers) even
    new_layers: int = 4
    position: str = "top"
    methods: tuple[str, ...] = tuple(METHODS)
    reference: bool = True            # also continue training the un-grown base (all layers)
    # Training: the base from scratch, then every grown model for the same budget
    batch_size: int = 16              # sequences per step (one micro-batch)
    base_steps: int = 300
    base_lr: float = 3e-3
    grow_steps: int = 100
    grow_lr: float = 1e-3
    trainable: str = "new"            # "new" (the paper) or "all", for the grown models
    evals: int = 5                    # held-out evaluations per run (besides step 0 and the end)
    # Data: the stdlib's .py files (or --data-dir), a fixed subset
    train_bytes: int = 2_000_000
    eval_blocks: int = 128            # held-out blocks of block_size bytes
    data_dir: str | None = None       # default: sysconfig.get_paths()["stdlib"]
    seed: int = 0
    device: str = "cpu"

    def validate(self):
        if min(self.layers, self.hidden, self.heads, self.kv_heads, self.head_dim, self.intermediate,
               self.block_size, self.new_layers, self.batch_size, self.base_steps, self.grow_steps,
               self.train_bytes, self.eval_blocks) < 1:
            raise ExperimentError("sizes, steps and byte counts must be >= 1")
        if self.heads % self.kv_heads:
            raise ExperimentError(f"--heads {self.heads} is not a multiple of --kv-heads {self.kv_heads}")
        if self.position not in POSITIONS:
            raise ExperimentError(f"--position {self.position!r}: choose from {', '.join(POSITIONS)}")
        for name in self.methods:
            if name not in METHODS:
                raise ExperimentError(f"unknown method {name!r} (choose from {', '.join(METHODS)})")
        if "solar" in self.methods and self.new_layers > self.layers:
            raise ExperimentError(f"solar repeats at most all {self.layers} layers, got --new-layers {self.new_layers}")
        if self.trainable not in ("new", "all"):
            raise ExperimentError(f"--trainable {self.trainable!r}: expected 'new' or 'all'")


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
            "eval_sha256": hashlib.sha256(eval_tokens.tobytes()).hexdigest()[:16]}
    return train_tokens, eval_tokens, info


# ----------------------------------------------------------------------------------------------
# Model and training


def make_base(config: CompareConfig) -> Transformer:
    args = ModelArgs(vocab_size=EOS + 1, hidden_size=config.hidden, intermediate_size=config.intermediate,
                     num_hidden_layers=config.layers, num_attention_heads=config.heads,
                     num_key_value_heads=config.kv_heads, head_dim=config.head_dim, rms_norm_eps=1e-5,
                     max_position_embeddings=config.block_size, tie_word_embeddings=True)
    return Transformer(args).init_weights(torch.Generator().manual_seed(config.seed))


def train_config(config: CompareConfig, steps: int, lr: float, trainable, seed: int) -> TrainConfig:
    # One micro-batch per step; warmup 10% of the steps; WSD schedule (train.py's default).
    return TrainConfig(
        steps=steps, lr=lr, warmup_steps=max(1, steps // 10) if steps > 1 else 0,
        batch_tokens=config.batch_size * config.block_size, micro_batch_size=config.batch_size,
        block_size=config.block_size, trainable=trainable,
        eval_every=max(1, steps // config.evals) if config.evals > 0 else 0,
        # The held-out set is eval_blocks whole blocks: enough micro-batches to read all of it, so the
        # in-training evaluations and the table read the same tokens.
        eval_batches=math.ceil(config.eval_blocks / config.batch_size),
        log_every=max(1, steps // 5), seed=seed, device=config.device, checkpoint_every=0, out_dir=None)


def run_training(name: str, model: Transformer, train_tokens, eval_tokens, tconfig: TrainConfig,
                 metrics_path: Path | None, log) -> dict:
    result = train(model, train_tokens, tconfig, eval_tokens, metrics_path=metrics_path,
                   log=lambda *a: log(f"[{name}]", *a))
    if result.stopped is not None:
        # train() turns Ctrl-C / SIGTERM into an early, orderly return: stop the whole comparison
        # rather than tabulate a run cut short.
        raise KeyboardInterrupt(result.stopped)
    return {"final_train_loss": result.final_loss, "mean_step_s": result.mean_step_s,
            "tokens_per_s": result.tokens_per_s, "trainable_params": result.trainable_params,
            "trainable_layers": result.trainable_layers, "losses": result.losses,
            "evals": [{"step": e["step"], "loss": e["eval_loss"]} for e in result.evals]}


def held_out(model: Transformer, eval_tokens, config: CompareConfig) -> dict:
    r = evaluate(model, eval_tokens, config.block_size, config.batch_size)
    return {"loss": r["loss"], "perplexity": r["perplexity"]}


# ----------------------------------------------------------------------------------------------
# The experiment


def run_compare(config: CompareConfig, out=None, log=print) -> dict:
    """Runs the whole comparison and returns the summary (what summary.json holds). With `out`,
    writes summary.md, summary.json, runs/*.jsonl and loss_curves.png there (replacing it)."""
    config.validate()
    if out is None:
        return _run(config, None, log)
    with output_folder(out) as tmp:
        summary = _run(config, tmp, log)
    log(f"wrote {Path(out)}/summary.md, summary.json, runs/" + (", loss_curves.png" if summary["plot"] else ""))
    return summary


def _run(config: CompareConfig, folder: Path | None, log) -> dict:
    t_start = time.perf_counter()
    runs_dir = None
    if folder is not None:
        runs_dir = folder / "runs"
        runs_dir.mkdir()

    def metrics(name):
        return runs_dir / f"{name}.jsonl" if runs_dir else None

    train_tokens, eval_tokens, data_info = load_corpus(config)
    log(f"data: {data_info['train_tokens']:,} training bytes from {data_info['train_files']} files, "
        f"{data_info['eval_tokens']:,} held-out bytes from {data_info['eval_files']} other files ({data_info['root']})")

    # 1. The base model, trained from scratch.
    base = make_base(config)
    n_params = sum(p.numel() for p in base.parameters())
    log(f"base: {config.layers} layers, hidden {config.hidden}, {n_params:,} parameters; "
        f"training {config.base_steps} steps of {config.batch_size} x {config.block_size} bytes")
    base_run = run_training("base", base, train_tokens, eval_tokens,
                            train_config(config, config.base_steps, config.base_lr, "all", config.seed),
                            metrics("base"), log)
    base_eval = held_out(base, eval_tokens, config)
    log(f"base held-out loss {base_eval['loss']:.4f} (perplexity {base_eval['perplexity']:.3f})")

    # 2-3. Every method, then the reference. The continued training reads its own shuffle
    # (seed + 1), not a replay of the base's first batches, and the same one for every method.
    results = []
    grow_seed = config.seed + 1
    for name in config.methods:
        t0 = time.perf_counter()
        grown, report = grow_by_name(base, name, config.new_layers, config.position)
        grow_s = time.perf_counter() - t0
        after_growth = held_out(grown, eval_tokens, config)
        log(f"{name}: grew {config.layers} -> {len(grown.layers)} layers in {grow_s:.1f}s, new layers "
            f"{report['new_layers']}; held-out loss right after growth {after_growth['loss']:.4f}")
        run = run_training(name, grown, train_tokens, eval_tokens,
                           train_config(config, config.grow_steps, config.grow_lr, config.trainable, grow_seed),
                           metrics(name), log)
        after = held_out(grown, eval_tokens, config)
        log(f"{name}: held-out loss after training {after['loss']:.4f} ({run['mean_step_s']:.3f} s/step)")
        results.append({"method": name, "growth": {k: report[k] for k in ("method", "align", "epsilon", "zero_init",
                                                                         "position", "insert_after", "new_layers")},
                        "layers": len(grown.layers), "grow_seconds": grow_s,
                        "after_growth": after_growth, "after_training": after, **run})
        del grown

    if config.reference:
        reference = copy.deepcopy(base)
        run = run_training("base+train", reference, train_tokens, eval_tokens,
                           train_config(config, config.grow_steps, config.grow_lr, "all", grow_seed),
                           metrics("base+train"), log)
        after = held_out(reference, eval_tokens, config)
        log(f"base+train (no growth, all layers): held-out loss {after['loss']:.4f}")
        results.append({"method": "base+train", "growth": None, "layers": config.layers, "grow_seconds": 0.0,
                        "after_growth": base_eval, "after_training": after, **run})

    summary = {"config": dataclasses.asdict(config), "data": data_info, "environment": environment(),
               "base": {"params": n_params, "held_out": base_eval, **base_run}, "results": results,
               "elapsed_s": time.perf_counter() - t_start, "plot": None}
    if folder is not None:
        (folder / "summary.md").write_text(summary_markdown(summary))
        summary["plot"] = plot_curves(summary, folder / "loss_curves.png", log)
        write_json(folder / "summary.json", summary)
    log("\n" + summary_markdown(summary))
    log(f"total time {summary['elapsed_s']:.0f}s")
    return summary


def summary_markdown(summary: dict) -> str:
    c, base = summary["config"], summary["base"]
    headers = ["method", "layers", "held-out loss after growth", "ppl after growth", "held-out loss after training",
               "ppl after training", "s/step", "trainable params"]
    rows = [["base (before growth)", c["layers"], fmt(base["held_out"]["loss"]), fmt(base["held_out"]["perplexity"], 3),
             "", "", "", ""]]
    for r in summary["results"]:
        name = r["method"] + (" (no growth, all layers trained)" if r["growth"] is None else "")
        rows.append([name, r["layers"], fmt(r["after_growth"]["loss"]), fmt(r["after_growth"]["perplexity"], 3),
                     fmt(r["after_training"]["loss"]), fmt(r["after_training"]["perplexity"], 3),
                     fmt(r["mean_step_s"], 3), fmt(r["trainable_params"])])
    trained = "only the new layers" if c["trainable"] == "new" else "all layers"
    head = (f"Base: {c['layers']} layers, hidden {c['hidden']}, {base['params']:,} parameters, trained "
            f"{c['base_steps']} steps. Grown to {c['layers'] + c['new_layers']} layers ({c['position']} positions; "
            f"solar places its own), then {c['grow_steps']} steps of {c['batch_size']} x {c['block_size']} bytes, "
            f"{trained} trainable. Held-out: {summary['data']['eval_tokens']:,} bytes of other stdlib files; "
            f"perplexity per byte. s/step: mean wall time per training step (noisy on a shared machine).\n\n")
    return head + markdown_table(headers, rows)


def plot_curves(summary: dict, path: Path, log) -> str | None:
    fig, axes = new_figure(2)
    if fig is None:
        log("matplotlib is not installed: skipping loss_curves.png (pip install matplotlib)")
        return None
    for r in summary["results"]:
        steps = range(1, len(r["losses"]) + 1)
        axes[0].plot(steps, ema(r["losses"]), label=r["method"])
        axes[1].plot([e["step"] for e in r["evals"]], [e["loss"] for e in r["evals"]], marker="o", label=r["method"])
    axes[0].set(title="training loss (EMA 0.9)", xlabel="step after growth", ylabel="loss (nats/byte)")
    axes[1].set(title="held-out loss", xlabel="step after growth", ylabel="loss (nats/byte)")
    axes[1].axhline(summary["base"]["held_out"]["loss"], color="gray", linestyle=":", label="base")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)
    return path.name


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    d = CompareConfig()
    p = argparse.ArgumentParser(description="Grow a small byte-level LLaMA with each depth up-scaling method, "
                                            "continue training, compare held-out loss. Runs on the standard "
                                            "library's source: nothing to download.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("base model")
    g.add_argument("--layers", type=int, default=d.layers)
    g.add_argument("--hidden", type=int, default=d.hidden)
    g.add_argument("--heads", type=int, default=d.heads)
    g.add_argument("--kv-heads", type=int, default=d.kv_heads)
    g.add_argument("--head-dim", type=int, default=d.head_dim)
    g.add_argument("--intermediate", type=int, default=d.intermediate)
    g.add_argument("--block-size", type=int, default=d.block_size, help="bytes per sequence")
    g = p.add_argument_group("growth")
    g.add_argument("--new-layers", type=int, default=d.new_layers, help="layers added to the base")
    g.add_argument("--position", choices=POSITIONS, default=d.position, help="where new layers go (not solar)")
    g.add_argument("--methods", default=",".join(d.methods), help=f"comma list from {', '.join(METHODS)}")
    g.add_argument("--reference", action=argparse.BooleanOptionalAction, default=d.reference,
                   help="also train the un-grown base (all layers) for the same budget")
    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step")
    g.add_argument("--base-steps", type=int, default=d.base_steps)
    g.add_argument("--base-lr", type=float, default=d.base_lr)
    g.add_argument("--grow-steps", type=int, default=d.grow_steps, help="steps of training after growth, per method")
    g.add_argument("--grow-lr", type=float, default=d.grow_lr)
    g.add_argument("--trainable", choices=("new", "all"), default=d.trainable, help="what trains after growth")
    g.add_argument("--evals", type=int, default=d.evals, help="held-out evaluations per run (0: only the end)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, ... (cuda trains in bf16 autocast)")
    g.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (0: torch's default, all cores). On a small or busy machine, "
                        "OpenMP threads competing with other processes can be many times slower than one")
    g = p.add_argument_group("data")
    g.add_argument("--train-bytes", type=int, default=d.train_bytes)
    g.add_argument("--eval-blocks", type=int, default=d.eval_blocks, help="held-out blocks of --block-size bytes")
    g.add_argument("--data-dir", default=d.data_dir, help="folder of .py files (default: this Python's stdlib)")
    p.add_argument("--out", default="runs/compare", help="results folder (replaced)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ExperimentError(f"--device {args.device}: CUDA is not available")
        if args.threads < 0:
            raise ExperimentError("--threads must be >= 0")
        config = CompareConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(CompareConfig)
                                  if f.name != "methods"},
                               methods=tuple(parse_list(args.methods, "--methods", METHODS)))
        if args.threads:
            torch.set_num_threads(args.threads)  # this process only, from the command line only
        run_compare(config, args.out, log=lambda *a: print(*a, flush=True))
    except KeyboardInterrupt:
        print("compare.py: interrupted; nothing written", file=sys.stderr)
        return 130
    except (ExperimentError, GrowthError, TrainError, CheckpointError) as e:
        print(f"compare.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
