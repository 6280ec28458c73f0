"""Training run folders: what train.py's TrainHooks become on disk, and how a run resumes from them.

    OUT/run.json                 the run's configuration and description, written once every check has passed
    OUT/metrics.jsonl            a row per step and per evaluation
    OUT/checkpoint-000500/       a Hugging Face folder plus optimizer.pt (the whole AdamW state, as one process
                                 holds it) and trainer_state.json (trainer_state(): how to continue; the run)

A training request is checked where it enters the tool, before train() sees it (train_checks.py); a resume
state where it is read (check_resume). RunFolder.start() restores a checked resume state into the run; train()
only starts at its step.

Checkpoints are written whole or not at all (atomic.AtomicFolder), and one process at a time trains into a run
folder (atomic.FolderLock). SIGINT, SIGTERM and SIGHUP (a dropped ssh session) are said at once and stop the
loop at its next micro-batch (TrainHooks.stop); a second signal acts as usual.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from opt_deus_core.model import ModelArgs, Transformer
from opt_deus_core.train import (OneProcess, TrainConfig, TrainError, TrainHooks, TrainResult, TrainRun,
                                 as_dataset, make_optimizer, set_trainable, train)
from opt_deus_tool.atomic import (AtomicFolder, FolderLock, model_folder_problem, remove_stale_scratch,
                                  write_text_atomic)
from opt_deus_tool.checkpoint import FolderSnapshot, save_state_dict
from opt_deus_tool.growths import new_layers
from opt_deus_tool.devices import resolve_device
from opt_deus_tool.train_checks import check_config, check_training
from opt_deus_tool.distributed import rank_and_world
from opt_deus_tool.inputs import parse_json, read_json_object
from opt_deus_tool.model_card import checkpoint_card
from opt_deus_tool.progress import SignalWatch, before_first_step, first_step_line

# Run-folder settings saved beside the TrainConfig in run.json and trainer_state.json ("config").
KEEP_CHECKPOINTS = 2  # keep the newest N checkpoints of the run (0: all)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class RunFolder(TrainHooks):
    """TrainHooks that write a run folder (out_dir None: no checkpoints, no run.json) and a metrics file.

        with RunFolder("runs/a", model.current_args(), metrics_path="runs/a/metrics.jsonl") as hooks:
            hooks.resume = check_resume(load_resume("runs/a"), model, config, tokens)  # or None: from step 0
            result = train(model, tokens, config, hooks=hooks)

    run: the command line's description of the run, saved into run.json and every checkpoint; its
    copy_files_from names the folder whose tokenizer files every checkpoint gets, its run_id which
    checkpoints in out_dir are this run's (the only ones keep_checkpoints ever deletes). Under torchrun every
    process holds one; only rank 0's writes (run.json, metrics.jsonl, checkpoints)."""

    def __init__(self, out_dir, args: ModelArgs, *, metrics_path=None, keep_checkpoints: int = KEEP_CHECKPOINTS,
                 run: dict | None = None, log: Callable = print, side_files: dict[str, bytes] | None = None):
        check_keep_checkpoints(keep_checkpoints)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.args, self.metrics_path, self.keep = args, metrics_path, keep_checkpoints
        self.resume, self.saved = None, 0  # a checked load_resume() state to continue; the last saved step
        self.run, self.log = run, log
        # The tokenizer files checkpoints ship, read once now: a --model folder replaced during the run must not
        # hand its new tokenizer to weights trained on the old one's ids.
        copy_from = (run or {}).get("copy_files_from")
        self.side_files = side_files if side_files is not None or copy_from is None or out_dir is None else \
            FolderSnapshot(copy_from).side_files()
        self.metrics = None  # the open metrics.jsonl
        self.received: list[int] = []  # signals, in the order they came
        self.said: dict[int, object] = {}  # signal -> who acknowledged it first (the handler or the watch)
        self.previous_handlers, self.watch, self.loop = {}, None, None  # self.loop: the train loop, once started
        self.lock, self.started = None, False

    def folder_config(self, config: dict) -> dict:
        return {**config, "out_dir": None if self.out_dir is None else str(self.out_dir),
                "keep_checkpoints": self.keep}

    def __enter__(self):
        if self.out_dir is not None and rank_and_world()[0] == 0:  # one process at a time trains into a run folder
            self.lock = FolderLock(self.out_dir).__enter__()
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self.previous_handlers[s] = signal.signal(s, self._on_signal)
            self.watch = SignalWatch(self._woken).__enter__()  # says a signal arrived even mid-kernel
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.watch is not None:
            self.watch.__exit__()
        for s, handler in self.previous_handlers.items():
            signal.signal(s, handler)
        if self.metrics is not None:
            self.metrics.close()
        if self.lock is not None:
            self.lock.__exit__(None, None, None)
        if exc_type is KeyboardInterrupt and self.started and self.out_dir is not None:
            # A second SIGINT stops at once: say what the run folder holds rather than "nothing written".
            raise KeyboardInterrupt(f"stopped by a second SIGINT; {self.out_dir} keeps run.json, metrics.jsonl and "
                                    f"the checkpoints written before it") from None

    def _on_signal(self, signum, frame):
        signal.signal(signum, self.previous_handlers[signum])
        self._acknowledge(signum)

    def _woken(self, signum: int):
        # The watch's thread, the moment the signal arrived; ours only while our handler is the one installed.
        if signum in self.previous_handlers and signal.getsignal(signum) == self._on_signal:
            self._acknowledge(signum)

    def _acknowledge(self, signum: int):
        # Said once per signal, by whichever of the watch and the handler comes first (setdefault is atomic).
        token = object()
        if self.said.setdefault(signum, token) is not token:
            return
        self.received.append(signum)
        if rank_and_world()[0] == 0:  # straight to fd 2: a print() interrupting a print() raises "reentrant call"
            message = (f"{signal.Signals(signum).name} received: stopping at the next micro-batch and saving a "
                       f"checkpoint of the last finished step (send it again to stop at once)\n")
            os.write(2, message.encode())

    def stop(self) -> int:
        return self.received[0] if self.received else 0

    def start(self, loop) -> int:
        # The step the train loop (train.TrainRun) starts from: the resumed checkpoint's, with its AdamW state
        # placed as the loop's parameters are (each rank's shard under torchrun). No RNG state: no step draws
        # from a global generator.
        start_step = 0
        if self.resume is not None:
            params = [p for group in loop.optimizer.param_groups for p in group["params"]]
            loop.optimizer.load_state_dict(loop.dist.optimizer_state(self.resume["optimizer"], params))
            start_step, self.checkpoint = self.resume["step"], self.resume.get("path")
        self.saved = start_step
        if not rank_and_world()[0]:  # rank 0 writes the run folder; the others' record() finds no metrics file
            self.write_start(start_step, dataclasses.asdict(loop.c))
        if self.resume is not None:
            self.log(f"resumed from {self.resume.get('path', 'resume state')} at step {start_step}")
        if isinstance(loop, TrainRun):  # train.py's loop (not a stand-in): a data note; on a CPU, an estimate
            self.loop, loop.start = loop, start_step
            before_first_step(loop, self.log)
        return start_step

    def write_start(self, start_step: int, config: dict):
        path = Path(self.metrics_path or os.devnull)
        resumed_rows = None
        if self.metrics_path is not None and start_step and path.is_file():  # read (and refused) before writing
            resumed_rows = [r for r in metrics_rows(path) if r.get("step", 0) <= start_step]
        self.started = True
        if self.out_dir is not None:
            remove_stale_scratch(self.out_dir, None)  # what a killed run left in this folder
            if self.run is not None:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                write_text_atomic(self.out_dir / "run.json", json.dumps(
                    {"config": self.folder_config(config), "run": self.run}, indent=2) + "\n")
        if self.metrics_path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if resumed_rows is not None:  # drop rows written after the checkpoint resumed from
                write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in resumed_rows))
            self.metrics = open(path, "a" if start_step else "w")

    def record(self, row: dict):
        if "loss" in row and self.loop is not None and (line := first_step_line(self.loop, row)) is not None:
            self.log(line)  # the first step's progress, however --log-every falls
        if self.metrics is not None:
            try:
                self.metrics.write(json.dumps(row) + "\n")
                self.metrics.flush()
            except OSError as e:  # a full disk names no file
                raise TrainError(f"{self.metrics_path}: cannot write metrics ({e.strerror or e})") from None

    def save(self, loop, step: int):
        # A checkpoint after `step` steps, unless it has one (none without out_dir). Whole state dicts, not
        # shards: every rank joins the gathers (loop.dist.save), rank 0 writes, and any number of processes resumes.
        if self.out_dir is None or step <= self.saved:
            return

        def write(weights, optimizer_state):
            return self.write_checkpoint(step, weights, optimizer_state, trainer_state(loop, step))
        self.saved, weights, optimizer_state = step, loop.model.state_dict(), loop.optimizer.state_dict()
        self.checkpoint = loop.dist.save(write, weights, optimizer_state) or self.checkpoint

    def write_checkpoint(self, step: int, weights: dict, optimizer_state: dict, state: dict) -> str:
        state = {**state, "config": self.folder_config(state["config"]), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if self.run is not None:
            state["run"] = self.run
        path = self.out_dir / f"checkpoint-{step:06d}"
        card = checkpoint_card(path, self.args, state, self.loop.evals if self.loop is not None else [])
        path = save_checkpoint(path, self.args, weights, optimizer_state, state, self.side_files, card)
        if self.keep:  # the newest N of this run (another run's, if any, stay); never the one just written
            run_id = (self.run or {}).get("run_id")
            ours = [c for c in find_checkpoints(self.out_dir)
                    if read_trainer_state(c).get("run", {}).get("run_id") in (None, run_id)]
            for old in ours[: -self.keep]:
                if old.resolve() != path.resolve():
                    shutil.rmtree(old, ignore_errors=True)
        self.log(f"saved {path}")
        return str(path)


def check_keep_checkpoints(keep: int):
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise TrainError(f"`keep_checkpoints` {keep} must be >= 0 (0: keep all) (default `keep_checkpoints` "
                         f"{KEEP_CHECKPOINTS})")


def save_checkpoint(path, args: ModelArgs, weights: dict, optimizer_state: dict, trainer_state: dict,
                    copy_files_from=None, card: str | None = None) -> Path:
    # A Hugging Face folder plus optimizer.pt and trainer_state.json, built in a hidden temporary folder and
    # renamed into place: it loads in transformers, opt-deus-eval, as --model, and resumes at any world size.
    path = Path(path).absolute()
    with AtomicFolder(path, overwrite=True, replaceable=model_folder_problem) as folder:
        try:
            save_state_dict(args, weights, folder.tmp, copy_files_from=copy_files_from, atomic=False)
            torch.save(optimizer_state, folder.tmp / "optimizer.pt")
            (folder.tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
            if card is not None:  # README.md: the model card (model_card.checkpoint_card)
                (folder.tmp / "README.md").write_text(card)
        except (OSError, RuntimeError) as e:  # a full disk: torch.save says RuntimeError, and names no file
            message = getattr(e, "strerror", None) or str(e).strip().splitlines()[0]
            raise TrainError(f"{path}: cannot write the checkpoint ({message}); nothing of it was kept") from None
        folder.commit()
    return path


def trainer_state(loop, step: int) -> dict:
    # What a checkpoint of the train loop (train.TrainRun) after `step` steps needs to continue exactly: the config,
    # the trainable tensors, the data position (the order is a function of (seed, position)), the last loss.
    per_step, n = loop.samples * loop.dist.world, len(loop.data)
    return {"format": 1, "step": step, "config": dataclasses.asdict(loop.c), "trainable_layers": loop.layers,
            "trainable_params": [(name, list(p.shape)) for name, p in loop.named],
            "data": {"n_samples": n, "samples_per_step": per_step, "stream_position": step * per_step,
                     "seed": loop.c.seed, "epoch": step * per_step // n}, "losses": loop.losses[-1:]}


def metrics_rows(path: Path) -> list[dict]:
    # A killed run (SIGKILL, a full disk) may leave its last line half-written: dropped. A bad line before the
    # last is not a torn write but a damaged file: refused, naming the line.
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = parse_json(line, f"{path}:{number}", TrainError)
            if not isinstance(row, dict):
                raise TrainError(f"{path}:{number}: not a JSON object")
        except TrainError as e:
            if number == len(lines):
                break
            raise TrainError(f"{e}; metrics.jsonl is damaged before its last line (move it away to resume)") from None
        rows.append(row)
    return rows


def find_checkpoints(out_dir) -> list[Path]:
    return sorted(p for p in Path(out_dir).glob("checkpoint-*") if (p / "trainer_state.json").is_file())


def read_trainer_state(path) -> dict:
    # The schema trainer_state() writes, checked before anything trusts it.
    file = Path(path) / "trainer_state.json"
    state = read_json_object(file, TrainError)

    def require(ok: bool, what: str):
        if not ok:
            raise TrainError(f"{file}: unreadable trainer state ({what})")

    step = state.get("step")
    require(isinstance(step, int) and not isinstance(step, bool) and step >= 0, f"step {step!r} is not a count")
    for key, kind in (("config", dict), ("data", dict), ("trainable_params", list)):
        require(isinstance(state.get(key), kind), f"{key} is {type(state.get(key)).__name__}, not {kind.__name__}")
    require(isinstance(state.get("run", {}), dict), "run is not an object")
    require(all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], list)
                and all(isinstance(n, int) for n in p[1]) for p in state["trainable_params"]),
            "trainable_params is not a list of [name, shape]")
    return state


def resolve_checkpoint(path) -> Path:
    # A checkpoint folder, or a run folder (its newest checkpoint).
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    found = find_checkpoints(path) if path.is_dir() else []
    if not found:
        raise TrainError(f"{path}: not a checkpoint (no trainer_state.json) nor a run folder with checkpoints")
    return found[-1]


def load_resume(path, device: str = "auto") -> dict:
    """train()'s `resume` from a checkpoint folder (or a run folder: its newest): its trainer state with the
    optimizer state loaded (memory-mapped on the CPU under torchrun, where each rank keeps its own rows)."""
    path = resolve_checkpoint(path)
    state = read_trainer_state(path)
    sharded = torch.distributed.is_initialized()
    map_location = "cpu" if sharded else resolve_device(device)
    try:  # weights_only: tensors and plain containers, never arbitrary pickled objects
        optimizer = torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True, mmap=sharded)
    except Exception as e:  # torch.load raises anything from EOFError to UnpicklingError on a bad file
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainError(f"{path}: cannot restore the optimizer state (optimizer.pt: {message})") from None
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)):
        raise TrainError(f"{path}: cannot restore the optimizer state (optimizer.pt holds no optimizer state dict)")
    return {**state, "optimizer": optimizer, "path": str(path)}


def check_resume(resume: dict, model: Transformer, config: TrainConfig, train_data) -> dict:
    """load_resume()'s state checked against what it is to continue, before RunFolder.start restores it: the trainable
    tensors (set_trainable), the number of samples (the data order depends on it), the AdamW state (moments shaped
    like their tensors and finite, in make_optimizer's order) and the steps left. Returns it."""
    where = resume.get("path", "resume state")
    set_trainable(model, config.trainable)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    saved = [(n, list(s)) for n, s in resume.get("trainable_params", [])]
    current = [(n, list(p.shape)) for n, p in named]
    if saved != current:
        diff = next(((a, b) for a, b in zip(saved, current) if a != b), None)
        detail = f"{diff[0]} vs {diff[1]}" if diff else f"{len(saved)} vs {len(current)} trainable tensors"
        raise TrainError(f"{where}: resume state does not match the model's trainable parameters ({detail})")
    n = len(as_dataset(train_data, config.block_size))
    if (n_saved := resume.get("data", {}).get("n_samples")) != n:
        raise TrainError(f"{where}: the checkpoint was trained on {n_saved} samples, the data given has {n}: "
                         f"resuming would not continue the same data order")
    # AdamW moments shaped like their parameter (state i: the optimizer's i-th, through its groups), and finite.
    groups = make_optimizer(named, config, torch.device("cpu")).param_groups
    params, optimizer = [p for group in groups for p in group["params"]], resume["optimizer"]
    sizes = [len(g["params"]) if isinstance(g, dict) and isinstance(g.get("params"), list) else None
             for g in optimizer["param_groups"]]
    if sizes != [len(group["params"]) for group in groups]:
        raise TrainError(f"{where}: cannot restore the optimizer state (its parameter groups do not fit the "
                         f"trainable tensors)")
    for index, moments in optimizer["state"].items():
        ok = isinstance(index, int) and 0 <= index < len(params) and isinstance(moments, dict) and all(
            key == "step" and isinstance(value, (int, float, torch.Tensor)) or key != "step" and (
                isinstance(value, torch.Tensor) and value.shape == params[index].shape
                and bool(torch.isfinite(value).all())) for key, value in moments.items())
        if not (ok and set(moments) == {"step", "exp_avg", "exp_avg_sq"}):
            raise TrainError(f"{where}: optimizer state of trainable tensor {index} is misshaped or not finite")
    if resume["step"] >= config.steps:
        raise TrainError(f"{where}: already at step {resume['step']} of `steps` {config.steps}; pass a larger "
                         f"`steps` to continue")
    if config.stop_after is not None and config.stop_after <= resume["step"]:
        raise TrainError(f"`stop_after` {config.stop_after} is not beyond the resumed step {resume['step']}")
    return resume


def saved_train_config(state: dict, where) -> tuple[TrainConfig, int]:
    # The TrainConfig and keep_checkpoints a checkpoint's trainer_state.json was trained with.
    # JSON read from disk: its numbers are checked to be of their field's type here, where they enter, and their
    # ranges by check_config (the command line's argparse types give it numbers).
    saved = dict(state.get("config") or {})
    saved.pop("out_dir", None)
    keep = saved.pop("keep_checkpoints", KEEP_CHECKPOINTS)
    for f in dataclasses.fields(TrainConfig):
        value, integer = saved.get(f.name, f.default), f.type in ("int", "int | None")
        if (integer or f.type == "float") and not (value is None and f.type == "int | None") and (
                isinstance(value, bool) or not isinstance(value, int if integer else (int, float))):
            raise TrainError(f"{where}/trainer_state.json: config {f.name} {value!r} is not "
                             f"{'an integer' if integer else 'a number'}")
    try:
        config = TrainConfig(**saved)
    except TypeError as e:
        raise TrainError(f"{where}/trainer_state.json: config does not fit this train.py ({e})") from None
    return check_config(config), keep


def train_run(model: Transformer, train_data, config: TrainConfig, eval_data=None, *, out_dir=None,
              metrics_path=None, keep_checkpoints: int = KEEP_CHECKPOINTS, resume_from=None, run: dict | None = None,
              log: Callable = print, dist: OneProcess | None = None,
              side_files: dict[str, bytes] | None = None) -> TrainResult:
    """train() into a run folder: checkpoints under out_dir (None: none), metrics in metrics_path, resumed from
    the checkpoint resume_from (whose weights `model` already holds), stopped in order by SIGINT/SIGTERM; the
    request checked first (check_training). dist: train()'s seam (distributed.init_distributed() under torchrun).
    side_files: the tokenizer files every checkpoint gets (FolderSnapshot.side_files; None: read now from run's
    copy_files_from)."""
    check_training(model, train_data, config, eval_data, 1 if dist is None else dist.world)
    if config.trainable == "new":  # said at the start: which layers, and why (a model grown twice has two sets)
        layers, why = new_layers(model.args.extra)
        log(f"training the new layers {layers} (trainable new): {why}")
        if layers != sorted(set((model.args.extra.get("opt_deus") or {}).get("new_layers") or [])):
            # train.py's "new" is the latest growth's alone: pass every growth's layers by index
            config = dataclasses.replace(config, trainable=layers)
    hooks = RunFolder(out_dir, model.current_args(), metrics_path=metrics_path, keep_checkpoints=keep_checkpoints,
                      run=run, log=log, side_files=side_files)
    with hooks:  # the run folder is locked before its checkpoint is read
        if resume_from is not None:
            hooks.resume = check_resume(load_resume(resume_from, config.device), model, config, train_data)
        return train(model, train_data, config, eval_data, hooks=hooks, log=log, dist=dist)
