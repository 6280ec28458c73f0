"""opt-deus-train: train the new layers of a grown LLaMA (or any layers) from the command line.

    opt-deus-train --model grown/ --data corpus/ --out runs/cpt --steps 1000      # train the new layers
    opt-deus-train --resume runs/cpt                                              # continue exactly
    torchrun --standalone --nproc_per_node 8 -m opt_deus_tool.train_cli --model grown/ --data corpus/ ...

run_training() checks the whole request first (paths, data, resume state), then runs runs.train_run(); under
torchrun with the FSDP2 seam of distributed.py. Every TrainConfig field is a flag (cli.add_fields). Exit codes: 0
done; 2 a bad request (one line on stderr, nothing half-written); 130/143 stopped by SIGINT/SIGTERM after saving a
checkpoint; 1 under torchrun when another rank died or a collective waited past --dist-timeout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import uuid
from pathlib import Path

import torch

from opt_deus_tool.atomic import check_output_folder
from opt_deus_tool.checkpoint import FolderSnapshot, load_pretrained
from opt_deus_core.train import TrainConfig, TrainError, TrainResult
from opt_deus_tool.cli import (BYTE_TOKENIZER_HELP, HelpFormatter, OneLineArgumentParser, add_fields, field_values,
                               flag_names, log_to_stderr, run_command)
from opt_deus_tool.data import ByteTokenizer, load_data, load_tokenizer
from opt_deus_tool.devices import resolve_device
from opt_deus_tool.distributed import init_distributed, rank_and_world
from opt_deus_tool.hub import resolve_model
from opt_deus_tool.runs import (KEEP_CHECKPOINTS, check_keep_checkpoints, find_checkpoints, read_trainer_state,
                                resolve_checkpoint, saved_train_config, train_run)
from opt_deus_tool.train_checks import check_config, check_tokens

SIGNALS_HELP = ("SIGINT (Ctrl-C) or SIGTERM (a scheduler's stop): the run says so at once, stops at the next "
                "micro-batch (the unfinished step is dropped; under torchrun, at the end of the step), saves a "
                "checkpoint of the last finished step, and exits with 130 or 143; --resume continues from it "
                "exactly. A second signal stops at once. "
                "Exit code 2: a bad request (one line on stderr; nothing written, no input touched).")
DIST_TIMEOUT_S = 1800.0  # --dist-timeout's default
# Every TrainConfig field is the flag of its name (dashes for underscores); a few more are the command's.
FLAGS = flag_names(*(f.name for f in dataclasses.fields(TrainConfig)), "keep_checkpoints", "byte_tokenizer",
                   "eval_fraction", "cache_dir", "resume", "dist_timeout", out_dir="--out")
# Flags that may change on resume without changing what is computed; the rest come from the checkpoint.
RESUME_OVERRIDES = ("steps", "device", "compile", "log_every", "eval_every", "eval_batches", "checkpoint_every",
                    "keep_checkpoints", "stop_after", "timing_skip_steps")


def build_train_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="opt-deus-train", formatter_class=HelpFormatter,
                              description="Train the new layers of a grown LLaMA (or any layers). "
                                          "`opt-deus-eval --help` for the evaluation command.",
                              epilog=SIGNALS_HELP)
    p.add_argument("--model", help="Hugging Face checkpoint folder to start from, or a Hub id ORG/NAME[@REVISION] "
                                   "(not needed with --resume)")
    p.add_argument("--data", nargs="+", help="CPT: text files/folders (.gz ok), JSONL with 'text'; "
                                             "SFT: Alpaca JSON/JSONL (default with --resume: the checkpoint's)")
    p.add_argument("--task", choices=["cpt", "sft"], default="cpt", help="continued pre-training or instruction tuning")
    p.add_argument("--eval-data", nargs="+", help="held-out data; default: the last --eval-fraction of --data")
    p.add_argument("--eval-fraction", type=float, default=0.01, help="share of the data held out when no --eval-data")
    p.add_argument("--out", default="runs/train", help="run folder: checkpoints, metrics.jsonl, run.json "
                                                       "(with --resume: the resumed run's folder)")
    p.add_argument("--cache-dir", default="runs/token_cache", help="where tokenised CPT data is cached")
    p.add_argument("--byte-tokenizer", action="store_true", help=BYTE_TOKENIZER_HELP)
    p.add_argument("--keep-checkpoints", type=int, default=KEEP_CHECKPOINTS,
                   help="keep the newest N checkpoints (0: all); the last one written is never deleted")
    p.add_argument("--resume", help="checkpoint folder (or run folder: its newest) to continue exactly, writing "
                                    "into the folder that holds it")
    p.add_argument("--dist-timeout", type=float, default=DIST_TIMEOUT_S,
                   help="torchrun: seconds any collective may wait for the other ranks before the run fails")
    add_fields(p.add_argument_group("training (train.TrainConfig; checked by train_checks.check_config)"), TrainConfig,
               types={"trainable": parse_trainable})
    return p


def typed_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    # The flags given on the command line: a second parse into a namespace whose every attribute is preset
    # to a marker, which argparse replaces only for the flags it meets.
    unset = object()
    preset = argparse.Namespace(**dict.fromkeys(vars(parser.parse_args([])), unset))
    return {name for name, value in vars(parser.parse_args(argv, namespace=preset)).items() if value is not unset}


def parse_trainable(spec: str) -> str | list[int]:
    # argparse type of --trainable: 'new', 'all' or comma-separated layer indices.
    if spec in ("new", "all"):
        return spec
    try:
        layers = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected 'new', 'all' or comma-separated layer indices") from None
    if not layers:
        raise argparse.ArgumentTypeError("empty layer list")
    return layers


def resume_config(flags: argparse.Namespace, typed: set[str], checkpoint: Path, state: dict) -> tuple[TrainConfig, int]:
    # A resumed run continues the saved training exactly: its config is the checkpoint's, and a flag typed
    # with --resume that would change what is computed (--lr, --block-size, --seed ...) is refused by name
    # rather than silently ignored. Returns the config and keep_checkpoints.
    saved, keep = saved_train_config(state, checkpoint)
    run = state.get("run", {})
    conflicts = []
    for name in typed - set(RESUME_OVERRIDES):
        if hasattr(saved, name):
            value = getattr(flags, name)
            if value != getattr(saved, name):
                conflicts.append(f"{FLAGS[name]} {value} (checkpoint: {getattr(saved, name)})")
    if "task" in typed and flags.task != run.get("task", "cpt"):
        conflicts.append(f"--task {flags.task} (checkpoint: {run.get('task', 'cpt')})")
    if "eval_fraction" in typed and flags.eval_fraction != run.get("eval_fraction", flags.eval_fraction):
        conflicts.append(f"--eval-fraction {flags.eval_fraction} (checkpoint: {run.get('eval_fraction')})")
    if "model" in typed:
        conflicts.append("--model (the checkpoint is the model)")
    if conflicts:
        raise TrainError(f"--resume {flags.resume}: cannot change {'; '.join(sorted(conflicts))}. A resumed run "
                         f"continues the saved one; only {', '.join(FLAGS[k] for k in RESUME_OVERRIDES)}, --out, "
                         f"--data, --eval-data and --cache-dir may be given")
    # stop_after belongs to the run that stopped, not to the training: a resumed run goes on to `steps`.
    overrides = {k: getattr(flags, k) for k in RESUME_OVERRIDES if k in typed and k != "keep_checkpoints"}
    steps = overrides.get("steps", saved.steps)
    if steps <= state["step"]:  # before check_config, which --steps bounds
        raise TrainError(f"--resume {flags.resume}: already at step {state['step']} of --steps {steps}; "
                         f"pass a larger --steps to continue")
    config = check_config(dataclasses.replace(saved, **{"stop_after": None, **overrides}))
    return config, flags.keep_checkpoints if "keep_checkpoints" in typed else keep


def check_run_folder(flags, typed: set[str], resume: Path | None, run: dict, inputs: list) -> Path:
    # Where the run writes. A fresh run's --out may hold no checkpoints; a resumed run writes into the run
    # folder it is resumed from (the folder holding the checkpoint), never the out_dir saved inside it (a copied
    # run must not write into the original), or into the --out given, if that holds no other run's checkpoints.
    if resume is None:
        if Path(flags.out).is_dir() and find_checkpoints(flags.out):
            raise TrainError(f"--out {flags.out}: already holds checkpoints; pass --resume {flags.out} or choose "
                             f"another --out")
        check_output_folder(flags.out, inputs, overwrite=True, name="--out")
        return Path(flags.out)
    run_dir = resume.parent
    out = Path(flags.out) if "out" in typed else run_dir
    if out.resolve() != run_dir.resolve() and out.is_dir() and find_checkpoints(out):
        raise TrainError(f"--out {out}: already holds checkpoints of another run; leave --out out to continue "
                         f"in {run_dir}, or choose an empty folder")
    # Each run's checkpoints carry its run_id (a copied run keeps it). A checkpoint of another run in the
    # folder would be replaced or pruned by --keep-checkpoints: refuse (none recorded: older runs).
    run_id = run.get("run_id")
    foreign = [c.name for c in find_checkpoints(out)
               if run_id and read_trainer_state(c).get("run", {}).get("run_id") not in (None, run_id)]
    if foreign:
        raise TrainError(f"--resume {flags.resume}: {out} also holds {', '.join(foreign)} of another run, which "
                         f"this run could replace or delete; pass --out with an empty folder")
    # Checkpoints of this run's own future (resumed from checkpoint 2 of a run that kept 1-4) would be
    # overwritten by a different history: refuse, never replace them.
    resumed_step = read_trainer_state(resume)["step"]
    later = [c.name for c in find_checkpoints(out) if read_trainer_state(c)["step"] > resumed_step]
    if later:
        raise TrainError(f"--resume {flags.resume}: {out} already holds {', '.join(later)}, later than the "
                         f"checkpoint resumed, which this run would overwrite; resume from the newest (--resume "
                         f"{run_dir}) or pass --out with an empty folder to branch")
    if out.resolve() != run_dir.resolve():
        inputs.append(("--resume", resume))
    copy_from = run.get("copy_files_from") or resume
    if Path(copy_from).resolve() != resume.resolve():
        inputs.append(("model (the run's --model)", copy_from))
    check_output_folder(out, inputs, overwrite=True, name="--out")
    return out


def run_training(flags: argparse.Namespace, typed: set[str]) -> TrainResult:
    """The opt-deus-train command: every check of the request first, then runs.train_run(). `typed`: the
    flags given on the command line (a resumed run takes the checkpoint's values, not argparse's defaults)."""
    log = log_to_stderr
    if not (math.isfinite(flags.dist_timeout) and flags.dist_timeout > 0):
        raise TrainError(f"--dist-timeout {flags.dist_timeout} must be a number of seconds > 0 "
                         f"(default --dist-timeout {DIST_TIMEOUT_S})")
    resume, run = None, {}
    if flags.resume:
        resume = resolve_checkpoint(flags.resume)
        state = read_trainer_state(resume)
        config, keep = resume_config(flags, typed, resume, state)
        run = state.get("run", {})
        model_dir, task, model_name = resume, run.get("task", "cpt"), run.get("model") or str(resume)
        data_paths, eval_paths = flags.data or run.get("data"), flags.eval_data or run.get("eval_data")
        eval_fraction = run.get("eval_fraction", flags.eval_fraction)
        cache_dir = flags.cache_dir if "cache_dir" in typed else run.get("cache_dir", flags.cache_dir)
        copy_from = run.get("copy_files_from") or resume
    else:
        if not flags.model:
            raise TrainError("--model is required (or --resume)")
        config = check_config(TrainConfig(**field_values(flags, TrainConfig)))
        keep, task, model_name = flags.keep_checkpoints, flags.task, flags.model
        model_dir = Path(resolve_model(flags.model, "--model"))  # a Hub id: downloaded (or found in the cache)
        data_paths, eval_paths = flags.data, flags.eval_data
        eval_fraction, cache_dir, copy_from = flags.eval_fraction, flags.cache_dir, model_dir
    inputs = [("--model", model_dir)] * (resume is None) + [("--data", p) for p in data_paths or []] + \
        [("--eval-data", p) for p in eval_paths or []]
    out = check_run_folder(flags, typed, resume, run, inputs)
    if not data_paths:
        raise TrainError("--data is required")
    if task == "cpt":
        # The token cache is written into: never into an input folder (a cache inside a --data folder
        # would be read back as training data by the next run, one inside --model would change it).
        cache = Path(cache_dir).resolve()
        for flag, source in [("--model", model_dir), *[("--data", p) for p in data_paths],
                             *[("--eval-data", p) for p in eval_paths or []]]:
            source_path = Path(source).resolve()
            if cache == source_path or source_path in cache.parents:
                raise TrainError(f"--cache-dir {cache_dir}: is {'' if cache == source_path else 'inside '}the "
                                 f"input {flag} {source}; choose a cache folder outside every input")
    if not 0 <= eval_fraction < 1:
        raise TrainError(f"--eval-fraction {eval_fraction} must be in [0, 1)")
    check_keep_checkpoints(keep)

    dist = init_distributed(config.device, flags.dist_timeout)  # None: one process (train.OneProcess)
    distributed, (rank, world) = dist is not None, rank_and_world()
    if rank:
        log = lambda *a: None  # noqa: E731  (only rank 0 prints)
    # Under torchrun the weights load on the CPU and fully_shard moves each rank's shard to the device.
    device = "cpu" if distributed else resolve_device(config.device)
    snapshot = FolderSnapshot(model_dir)  # weights, tokenizer and the files checkpoints ship: one version of them
    model = load_pretrained(model_dir, dtype=torch.float32, device=device)
    # A run started with --byte-tokenizer resumes with it (run.json's tokenizer is "byte-v1").
    tokenizer = load_tokenizer(model_dir, flags.byte_tokenizer or run.get("tokenizer") == ByteTokenizer.name)
    side_files = snapshot.side_files()  # read now, not when a checkpoint is saved (on resume: the checkpoint's)
    if rank:
        torch.distributed.barrier()  # rank 0 tokenises into the cache first; the others read it
    data = load_data(data_paths, task, tokenizer, config.block_size, cache_dir, log)
    eval_data = load_data(eval_paths, task, tokenizer, config.block_size, cache_dir, log) if eval_paths else None
    if distributed and not rank:
        torch.distributed.barrier()
    for what, d in (("--data", data), ("--eval-data", eval_data)):
        if d is None:
            continue
        largest = max(int(ids.max()) for ids in d.ids) if task == "sft" else int(d.max())
        if largest >= model.args.vocab_size:
            raise TrainError(f"{what}: token id {largest} does not fit the model's vocab_size {model.args.vocab_size} "
                             f"(a tokenizer that does not belong to {model_dir}?)")
    if task == "cpt":
        check_tokens(data, config.block_size, ", ".join(map(str, data_paths)))  # at least one block
    if eval_data is None and eval_fraction > 0:
        # Hold out the tail: whole blocks of the token stream, or whole examples.
        n = len(data) if task == "sft" else (len(data) - 1) // config.block_size
        held = max(1, round(n * eval_fraction))
        if n - held < 1:
            raise TrainError(f"{', '.join(data_paths)}: {n} sample(s) cannot be split into training and evaluation "
                             f"(add data, pass --eval-data, or --eval-fraction 0)")
        if task == "sft":
            data, eval_data = data.split(len(data) - held)
        else:
            split = (n - held) * config.block_size
            data, eval_data = data[: split + 1], data[split:]

    # The run description travels in every checkpoint's trainer_state.json, so --resume needs nothing else.
    run = {"task": task, "data": [str(p) for p in data_paths], "eval_data": eval_paths,
           "eval_fraction": eval_fraction, "cache_dir": str(cache_dir), "copy_files_from": str(copy_from),
           "model": model_name, "tokenizer": tokenizer.name, "world_size": world,
           "run_id": run.get("run_id") or uuid.uuid4().hex}  # rank 0's is the one saved
    result = train_run(model, data, config, eval_data, out_dir=out, metrics_path=out / "metrics.jsonl",
                       keep_checkpoints=keep, resume_from=resume, run=run, log=log, dist=dist, side_files=side_files)
    if not rank:
        print(json.dumps({"step": result.step, "final_loss": result.final_loss, "eval_loss": result.eval_loss,
                          "eval_perplexity": result.eval_perplexity, "tokens_per_s": result.tokens_per_s,
                          "checkpoint": result.checkpoint, "stopped": result.stopped}))
    return result


def train_command(argv: list[str]) -> int:
    parser = build_train_parser()
    flags = parser.parse_args(argv)
    try:
        result = run_training(flags, typed_flags(parser, argv))
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # no rank exits (torchrun would stop the others) before all are done
    except RuntimeError as e:
        # Under torchrun a rank that died or hung past --dist-timeout fails the others' next collective (gloo
        # raises RuntimeError, NCCL its DistError subclass): one line, exit 1, and torchrun stops the rest.
        # Without a process group a RuntimeError is a bug: the traceback stays.
        if not torch.distributed.is_initialized():
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: rank {rank_and_world()[0]}: {message}", file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 128 + signal.Signals[result.stopped].value if result.stopped not in (None, "stop_after") else 0


def main(argv: list[str] | None = None) -> int:
    from_shell = argv is None
    argv = sys.argv[1:] if from_shell else [str(a) for a in argv]
    code = run_command("opt-deus-train", lambda: train_command(argv), FLAGS)
    if from_shell and "WORLD_SIZE" in os.environ:
        # The command line under torchrun: leave without interpreter teardown, where gloo's threads now
        # and then abort a rank that has finished ("terminate called without an active exception",
        # SIGABRT) and torchrun then reports the whole run failed. The process group is destroyed already.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
