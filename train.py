"""Continued training of a (grown) LLaMA: only the new layers by default, on one process or many (FSDP2).

OpT-DeUS grows a pretrained model by inserting layers; train(model, tokens, config) trains those layers with
everything else frozen, on plain text (continued pre-training) or masked instruction data (SFT). Read top to
bottom: samples and their order, the loss, what trains, configuration and schedule, the distributed path
(under torchrun: FSDP2 once a process group exists), evaluation, the loop. The loop hands metrics, checkpoints
and stop requests to TrainHooks (opt_deus_tool/runs.py: a run folder). Errors name config fields in backticks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

if __package__:  # installed (opt_deus_core.train), or copied into a package of yours
    from .model import Transformer
else:  # copied alone beside model.py
    from model import Transformer


class TrainError(ValueError):
    """A problem the user can fix (data, configuration, resume state); one-line message."""


class NonFiniteLossError(TrainError):
    """The loss or gradient norm became nan/inf; training stopped before applying the step."""


IGNORE_INDEX = -100  # label of positions that carry no loss (SFT prompts, padding)


# ----------------------------------------------------------------------------------------------
# Samples and their order


class TokenBlocks:
    # Sample i is the block tokens[i*T : i*T + T + 1]: inputs its first T tokens, targets its last T (blocks
    # share one token). Any dataset with __len__ and get(indices) -> (x, y), (B, L) each, trains alike (SFT's).
    def __init__(self, tokens, block_size: int, what: str = "data"):
        self.tokens, self.block_size = np.asarray(tokens), block_size  # numpy, memmap or CPU torch
        if not np.issubdtype(self.tokens.dtype, np.integer) or self.tokens.ndim != 1:  # floats would be truncated
            raise TrainError(f"{what}: token ids must be a 1-D integer array, got {self.tokens.dtype} "
                             f"{self.tokens.shape}")
        if len(tokens) < block_size + 1:
            raise TrainError(f"{what}: {len(tokens)} tokens is shorter than one block of {block_size + 1} "
                             f"(block size + 1); add data or lower `block_size`")

    def __len__(self):
        return (len(self.tokens) - 1) // self.block_size

    def id_range(self) -> tuple[int, int]:
        return int(self.tokens.min()), int(self.tokens.max())

    def get(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.block_size
        rows = torch.from_numpy(np.stack([np.asarray(self.tokens[i * T: i * T + T + 1], np.int64) for i in indices]))
        return rows[:, :-1], rows[:, 1:]  # rows (B, T+1)


def as_dataset(data, block_size: int, what: str, vocab_size: int):
    # A token array becomes TokenBlocks. Every id must index the vocabulary: an embedding lookup would fail.
    data = data if hasattr(data, "get") and hasattr(data, "__len__") else TokenBlocks(data, block_size, what)
    low, high = data.id_range() if hasattr(data, "id_range") else (0, 0)
    if low < 0 or high >= vocab_size:
        raise TrainError(f"{what}: token id {low if low < 0 else high} is outside the vocabulary [0, {vocab_size})")
    return data


class SampleOrder:
    # The training stream is an endless sequence of epochs, each a permutation seeded by (seed, epoch): the sample
    # at stream position p is a function of (seed, p), so a resumed run reads what an uninterrupted one would.
    def __init__(self, n_samples: int, seed: int):
        self.n, self.seed, self.epoch, self.perm = n_samples, seed, None, None

    def indices(self, start: int, count: int) -> list[int]:
        out = []
        for position in range(start, start + count):
            if position // self.n != self.epoch:
                self.epoch = position // self.n
                self.perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
            out.append(int(self.perm[position % self.n]))
        return out


# ----------------------------------------------------------------------------------------------
# The loss


# The loss never holds the (tokens x vocabulary) float32 logits: with a frozen head (the default, only new
# layers train) this lowered the loss's peak memory from 4.36 to 2.83 GB at 2048 tokens of a 128k vocabulary
# (docs/BENCHMARKS_TRAIN.md), and it keeps the numbers of every earlier run. Logits per chunk (float32):
LOSS_CHUNK_ELEMENTS = 2**27


class _LinearCrossEntropy(torch.autograd.Function):
    # sum over valid rows of -log softmax(h @ W^T)[target] without the (N, V) float32 logits: a chunk's logits
    # live only in the loop, where the gradients (softmax - onehot) are computed too; backward only scales.
    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows: int, need_h: bool, need_w: bool):
        # h (N, D), weight (V, D), targets (N,) -> scalar float32
        N = h.shape[0]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, N, chunk_rows):
            hc, tc = h[start: start + chunk_rows], targets[start: start + chunk_rows]
            logits = (hc @ weight.t()).float()  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            valid = tc != IGNORE_INDEX
            safe = torch.where(valid, tc, torch.zeros_like(tc))
            target_logit = logits.gather(1, safe[:, None]).squeeze(1)
            total = total + torch.where(valid, lse - target_logit, torch.zeros_like(lse)).sum()
            if need_h or need_w:
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place: (c, V)
                g.scatter_add_(1, safe[:, None], -torch.ones_like(lse)[:, None])
                g = g.mul_(valid[:, None].float()).to(h.dtype)
                if need_h:
                    grad_h[start: start + chunk_rows] = g @ weight
                if need_w:
                    grad_w += (g.t() @ hc).float()
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        grad_w = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # h (N, D), weight (V, D), targets (N,) -> summed token loss over targets != -100 (float32).
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):  # compute the head in the autocast dtype, as F.linear would
        dtype = torch.get_autocast_dtype(device_type)
        h, weight = h.to(dtype), weight.to(dtype)
    grad = torch.is_grad_enabled()
    chunk_rows = max(1, LOSS_CHUNK_ELEMENTS // weight.shape[0])
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, targets, chunk_rows,
                                         grad and h.requires_grad, grad and weight.requires_grad)


def forward_loss(model: Transformer, x: torch.Tensor, y: torch.Tensor, frozen_prefix: int | None) -> torch.Tensor:
    # x, y (B, T) -> loss summed over targets != IGNORE_INDEX (float32). The embeddings and the first
    # `frozen_prefix` blocks run under no_grad (None: the embeddings train): backward stops below them.
    with torch.no_grad() if frozen_prefix is not None else nullcontext():
        h, cos, sin = model.embed(x)  # (B, T, D) and the RoPE tables
        for block in model.layers[: frozen_prefix or 0]:
            h = block(h, cos, sin)
    for block in model.layers[frozen_prefix or 0:]:
        h = block(h, cos, sin)
    weight = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    return linear_cross_entropy(model.norm(h).flatten(0, 1), weight, y.flatten())


# ----------------------------------------------------------------------------------------------
# What trains


def set_trainable(model: Transformer, spec: str | list[int]) -> list[int]:
    """Freeze everything but the chosen layers ("new": the growth record's opt_deus.new_layers; "all":
    every parameter, embeddings and head included; or a list of layer indices). Returns them."""
    if isinstance(spec, str) and spec not in ("new", "all") or not spec:
        raise TrainError(f"`trainable` {spec!r}: expected 'new', 'all' or a non-empty list of layer indices")
    n_layers = len(model.layers)
    if spec == "all":
        model.requires_grad_(True)
        return list(range(n_layers))
    if spec == "new":
        record = model.args.extra.get("opt_deus")
        spec = record.get("new_layers") if isinstance(record, dict) else None
        if not spec or not isinstance(spec, list):
            raise TrainError("`trainable` new: the checkpoint records no new layers (config.json has no "
                             "opt_deus.new_layers); pass `trainable` all or a comma list of layer indices")
    layers = sorted(set(spec))
    bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < n_layers]
    if bad:
        raise TrainError(f"trainable layer {bad[0]} is out of range: the model has {n_layers} layers")
    model.requires_grad_(False)
    for i in layers:
        model.layers[i].requires_grad_(True)
    return layers


def frozen_prefix_of(model: Transformer) -> int | None:
    # How many leading blocks can run without autograd; None when the embeddings themselves train.
    if model.embed_tokens.weight.requires_grad:
        return None
    trains = [any(p.requires_grad for p in block.parameters()) for block in model.layers]
    return trains.index(True) if True in trains else len(model.layers)


# ----------------------------------------------------------------------------------------------
# Configuration and schedule


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps the schedule spans
    lr: float = 2e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # final lr = lr x this
    warmup_steps: int = 100  # linear warmup from lr/warmup_steps to lr
    schedule: str = "wsd"  # "wsd" (warmup-stable-decay) or "cosine"
    decay_fraction: float = 0.2  # wsd: the last fraction of the steps decays linearly to the final lr
    batch_tokens: int = 65536  # tokens per optimizer step (under torchrun: over all processes)
    micro_batch_size: int = 4  # sequences per forward/backward
    block_size: int = 2048  # tokens per sequence
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    weight_decay: float = 0.1  # AdamW weight decay (matrices only, never norm gains)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8  # AdamW epsilon
    trainable: str | list[int] = "new"  # "new" (config.json opt_deus.new_layers), "all", or layer indices
    eval_every: int = 200  # steps between held-out evaluations (0: only at the end)
    eval_batches: int = 20  # micro-batches per evaluation
    log_every: int = 10  # steps between progress lines
    seed: int = 0  # the data order is a function of (seed, step)
    compile: bool = False  # torch.compile the loss computation
    device: str = "auto"  # auto: cuda if available (LOCAL_RANK's under torchrun), else cpu
    checkpoint_every: int = 500  # steps between checkpoints (0: only at the end), given to TrainHooks.save
    stop_after: int | None = None  # end once this step is done, as if stopped (schedule unchanged)
    timing_skip_steps: int = 2  # first steps left out of the mean step time (warm-up, compile)


INT_FIELDS = ("steps", "warmup_steps", "batch_tokens", "micro_batch_size", "block_size", "eval_every",
              "eval_batches", "log_every", "seed", "checkpoint_every", "stop_after", "timing_skip_steps")
FLOAT_FIELDS = ("lr", "min_lr_ratio", "decay_fraction", "grad_clip", "weight_decay", "beta1", "beta2", "eps")


def validate_config(c: TrainConfig):
    # The one check of every training hyperparameter. Messages name the field and its default.
    for name in (*INT_FIELDS, *FLOAT_FIELDS):
        value = getattr(c, name)
        if value is None and name == "stop_after":
            continue
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        kind = "an integer" if name in INT_FIELDS else "a finite number"
        if not (is_number and (isinstance(value, int) or name in FLOAT_FIELDS)):
            raise TrainError(f"`{name}` {value!r}: expected {kind}")

    def require(ok: bool, name: str, rule: str):
        if not ok:
            raise TrainError(f"`{name}` {getattr(c, name)} {rule} (default `{name}` {getattr(TrainConfig, name)})")

    require(c.steps >= 1, "steps", "must be >= 1")
    require(c.lr > 0, "lr", "must be > 0")
    require(0 <= c.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
    require(0 <= c.warmup_steps < c.steps, "warmup_steps", f"must be >= 0 and below `steps` {c.steps}")
    require(c.schedule in ("wsd", "cosine"), "schedule", "must be 'wsd' or 'cosine'")
    require(0 <= c.decay_fraction <= 1, "decay_fraction", "must be in [0, 1]")
    for name in ("block_size", "micro_batch_size", "eval_batches", "log_every"):
        require(getattr(c, name) >= 1, name, "must be >= 1")
    require(c.batch_tokens >= c.block_size * c.micro_batch_size, "batch_tokens",
            f"must be at least `block_size` x `micro_batch_size` = {c.block_size * c.micro_batch_size}")
    require(c.grad_clip >= 0, "grad_clip", "must be >= 0 (0: no clipping)")
    for name in ("weight_decay", "seed"):
        require(getattr(c, name) >= 0, name, "must be >= 0")
    for name in ("beta1", "beta2"):
        require(0 <= getattr(c, name) < 1, name, "must be in [0, 1)")
    require(c.eps > 0, "eps", "must be > 0")
    for name in ("eval_every", "checkpoint_every"):
        require(getattr(c, name) >= 0, name, "must be >= 0 (0: only at the end)")
    require(c.stop_after is None or c.stop_after >= 1, "stop_after", "must be >= 1")


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based). Warmup reaches the peak at step
    warmup_steps-1; the last step (steps-1) is at min lr."""
    peak, floor = config.lr, config.lr * config.min_lr_ratio
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    if config.schedule == "cosine":
        progress = min(1.0, (step - config.warmup_steps + 1) / (config.steps - config.warmup_steps))
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = min(round(config.decay_fraction * config.steps), config.steps - config.warmup_steps)
    decay_start = config.steps - decay_steps
    if decay_steps == 0 or step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return peak + (floor - peak) * progress


def resolve_device(name: str) -> torch.device:
    # "auto", or a device this machine has: refused here, not by a traceback from the first tensor sent there.
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except (RuntimeError, TypeError) as e:
        raise TrainError(f"`device` {name!r}: not a device ({str(e).splitlines()[0]})") from None
    count = {"cpu": 1, "cuda": torch.cuda.device_count(), "mps": int(torch.backends.mps.is_available())}
    if device.type not in count:
        raise TrainError(f"`device` {name}: unsupported device type {device.type!r} (cpu, cuda or mps)")
    kind, available = device.type.upper(), count[device.type]
    if (device.index or 0) >= available:
        why = f"only {available} {kind} device(s)" if available else f"{kind} is not available"
        raise TrainError(f"`device` {name}: {why} on this machine (use `device` cpu)")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # torchrun: one GPU per process
    return device


def autocast_for(device: torch.device):
    # bf16 autocast on CUDA (float32 master weights and optimizer state); plain float32 elsewhere.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def make_optimizer(named_params: list[tuple[str, torch.nn.Parameter]], config: TrainConfig, device: torch.device):
    matrices = [p for _, p in named_params if p.ndim >= 2]
    gains = [p for _, p in named_params if p.ndim < 2]  # RMSNorm weights: no decay
    groups = [{"params": matrices, "weight_decay": config.weight_decay}, {"params": gains, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr_at(0, config), betas=(config.beta1, config.beta2), eps=config.eps,
                             fused=device.type == "cuda")


# ----------------------------------------------------------------------------------------------
# Distributed (torchrun + FSDP2): one model sharded over all processes; the training loop is the same


def rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardedLoss(torch.nn.Module):
    # FSDP2 gathers a module's parameters in hooks around its forward. forward_loss reads the embeddings,
    # final norm and head itself, so the FSDP root that owns them is this module, whose forward is the loss.
    def __init__(self, model: Transformer, loss_fn: Callable):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, x, y, frozen_prefix):
        return self.loss_fn(self.model, x, y, frozen_prefix)


def shard_model(model: Transformer, device: torch.device, loss_fn: Callable) -> ShardedLoss:
    # fully_shard each block, then the root (embeddings, final norm, head): every rank keeps 1/N of every
    # float32 weight and gathers one block at a time. Frozen blocks are sharded too (they are most of the
    # model); FSDP2 gives parameters with requires_grad=False no gradient and no reduce-scatter. CUDA: blocks
    # are gathered in bf16 (what autocast casts them to anyway), gradients reduced in float32; the root is
    # gathered in float32, so the residual stream stays float32 as in the plain path. CPU (gloo): float32.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    root = ShardedLoss(model, loss_fn)
    for module in (*model.layers, root):
        if device.type == "cuda" and module is not root:
            policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32, cast_forward_inputs=False)
        else:
            policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
        fully_shard(module, mesh=mesh, mp_policy=policy)
        # Each rank's loss is already divided by the step's target count: sum (gloo has no PREMUL_SUM), don't average.
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    return root


def gather_full(state, keep: bool):
    # DTensor shards -> whole CPU tensors, through nested dicts and lists. Every rank joins each all-gather in the
    # same order; only ranks with `keep` hold on to the result.
    from torch.distributed.tensor import DTensor
    if isinstance(state, dict):
        return {k: gather_full(v, keep) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(gather_full(v, keep) for v in state)
    if isinstance(state, DTensor):
        full = state.full_tensor()
        return full.cpu() if keep else None
    return state


def shard_optimizer_state(saved: dict, params: list[torch.nn.Parameter]) -> dict:
    # A full optimizer state (one process's; state i is the optimizer's i-th parameter's) -> this rank's shards, laid
    # out like each parameter. Every rank reads the file (memory-mapped) and keeps its own rows: no communication.
    from torch.distributed.tensor import distribute_tensor
    state = {}
    for i, s in saved["state"].items():
        p = params[i]
        state[i] = {k: v if k == "step" else distribute_tensor(v.to(p.device), p.device_mesh, p.placements,
                                                               src_data_rank=None) for k, v in s.items()}
    return {**saved, "state": state}


# ----------------------------------------------------------------------------------------------
# Evaluation


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@torch.no_grad()
def evaluate(model: Transformer, tokens, block_size: int, batch_size: int, max_batches: int | None = None,
             sharded: ShardedLoss | None = None, log: Callable | None = None) -> dict:
    """Mean loss and perplexity on contiguous non-overlapping blocks (each token predicted once) of a 1-D
    token array (or an SFT dataset); max_batches=None reads it all, the last partial block too. sharded: the
    FSDP root under torchrun (ranks split the batches). log: progress, at most a line every 10 s."""
    device = next(model.parameters()).device
    data = as_dataset(tokens, block_size, "evaluation data", model.args.vocab_size)
    n = len(data) if max_batches is None else min(len(data), max_batches * batch_size)
    batches = [data.get(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    if max_batches is None and isinstance(data, TokenBlocks) and len(data.tokens) - n * block_size >= 2:
        tail = torch.from_numpy(np.asarray(data.tokens[n * block_size:], dtype=np.int64))[None]
        batches.append((tail[:, :-1], tail[:, 1:]))
    if sharded is not None:
        # Rank r takes batches r, r+N, ...; every rank runs as many forwards (FSDP gathers are collectives),
        # padding with a batch whose targets are all ignored: it adds nothing.
        rank, world = rank_and_world()
        x0, y0 = batches[0]
        padding = [(x0, torch.full_like(y0, IGNORE_INDEX))] * (-(-len(batches) // world) - len(batches[rank::world]))
        batches = batches[rank::world] + padding
    total = torch.zeros((), dtype=torch.float64, device=device)
    count, t_start, last_log = 0, time.time(), time.time()
    with autocast_for(device):
        for done, (x, y) in enumerate(batches, 1):
            x, y = x.to(device), y.to(device)
            total += (sharded(x, y, None) if sharded is not None else forward_loss(model, x, y, None)).double()
            count += int((y != IGNORE_INDEX).sum())
            if log is not None and (time.time() - last_log >= 10 or done == len(batches)):
                elapsed = time.time() - t_start
                log(f"eval batch {done}/{len(batches)} | {count:,} tokens | elapsed {format_eta(elapsed)} | "
                    f"eta {format_eta(elapsed / done * (len(batches) - done))}")
                last_log = time.time()
    if sharded is not None:
        sums = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=device)])
        torch.distributed.all_reduce(sums)
        total, count = sums[0], int(sums[1].item())
    loss = total.item() / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count, "nll_sum": total.item()}


# ----------------------------------------------------------------------------------------------
# The training loop


class TrainHooks:
    # What the loop hands out; each default does nothing. opt_deus_tool.runs.RunFolder writes a run folder
    # (metrics.jsonl, Hugging Face checkpoints) and turns SIGINT/SIGTERM into stop(). Rank 0 only, but stop().
    saves_checkpoints = False  # True: the loop gathers the whole state (a collective under FSDP) for save()

    def start(self, state: dict):  # every check has passed, nothing has trained; `state` as save()'s
        pass

    def record(self, row: dict):  # one step's or one evaluation's metrics
        pass

    def save(self, step: int, weights: dict, optimizer_state: dict, state: dict) -> str | None:
        return None  # a checkpoint after `step` (whole CPU tensors); state: resume_state(); returns its path

    def stop(self) -> int:  # a signal number: stop at the next micro-batch (one process) or step (torchrun)
        return 0


@dataclass
class TrainResult:
    final_loss: float
    losses: list[float]                  # per optimizer step of this run
    eval_loss: float | None = None       # the evaluation of the final weights, if one ran
    eval_perplexity: float | None = None
    evals: list[dict] = field(default_factory=list)
    mean_step_s: float = float("nan")    # excluding the first timing_skip_steps
    tokens_per_s: float = float("nan")
    trainable_params: int = 0
    trainable_layers: list[int] = field(default_factory=list)
    step: int = 0                        # optimizer steps done, counting resumed ones
    stopped: str | None = None           # None (finished), "SIGINT", "SIGTERM" (from hooks.stop) or "stop_after"
    checkpoint: str | None = None        # the last checkpoint written


class TrainRun:
    # A run set up for train() (every check passed, FSDP2 shards, optimizer, resume); its methods: the loop's parts.

    def __init__(self, model: Transformer, train_data, config: TrainConfig, eval_data, resume: dict | None):
        if not isinstance(model, Transformer):
            raise TrainError(f"`model` must be a model.Transformer, got {type(model).__name__}")
        validate_config(config)
        if config.block_size > model.args.max_position_embeddings:
            raise TrainError(f"`block_size` {config.block_size} is beyond the model's max_position_embeddings "
                             f"{model.args.max_position_embeddings}")
        self.model, self.config, (self.rank, self.world) = model, config, rank_and_world()
        self.device, self.distributed = resolve_device(config.device), torch.distributed.is_initialized()
        if not self.distributed:
            model.to(self.device)
        vocab = model.args.vocab_size
        self.train_data = as_dataset(train_data, config.block_size, "training data", vocab)
        self.eval_data = None if eval_data is None else as_dataset(eval_data, config.block_size, "evaluation data",
                                                                   vocab)
        self.layers = set_trainable(model, config.trainable)
        self.frozen_prefix = frozen_prefix_of(model)
        loss_fn = torch.compile(forward_loss) if config.compile else forward_loss
        # After requires_grad is set (FSDP2 copies it into each shard); the shards replace the parameters.
        self.sharded = shard_model(model, self.device, loss_fn) if self.distributed else None
        self.loss = self.sharded if self.distributed else functools.partial(loss_fn, model)  # (x, y, frozen_prefix)
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        per_micro_batch = config.block_size * config.micro_batch_size * self.world
        if config.batch_tokens % per_micro_batch:
            raise TrainError(f"`batch_tokens` {config.batch_tokens} is not a multiple of `block_size` x "
                             f"`micro_batch_size`{' x world size' if self.world > 1 else ''} = {per_micro_batch}")
        self.accum = config.batch_tokens // per_micro_batch  # micro-batches per step on each rank
        self.samples_per_step = self.accum * config.micro_batch_size  # on each rank
        self.optimizer = make_optimizer(self.named_params, config, self.device)
        self.start_step = 0 if resume is None else self.restore(resume)
        if self.start_step >= config.steps:
            raise TrainError(f"{resume.get('path', 'resume state')}: already at step {self.start_step} of `steps` "
                             f"{config.steps}; pass a larger `steps` to continue")
        self.stop_step = min(config.steps, config.stop_after or config.steps)
        if self.stop_step <= self.start_step:
            raise TrainError(f"`stop_after` {config.stop_after} is not beyond the resumed step {self.start_step}")

    def resume_state(self, step: int, losses: list[float]) -> dict:
        # What a checkpoint must hold to continue exactly: the step, the trainable tensors it belongs to, and
        # where the data stream stands (a pure function of seed and position, SampleOrder).
        position, n = step * self.samples_per_step * self.world, len(self.train_data)
        return {"format": 1, "step": step, "config": dataclasses.asdict(self.config), "trainable_layers": self.layers,
                "trainable_params": [(name, list(p.shape)) for name, p in self.named_params],
                "data": {"n_samples": n, "samples_per_step": self.samples_per_step * self.world,
                         "stream_position": position, "seed": self.config.seed, "epoch": position // n},
                "losses": losses[-1:]}

    def restore(self, resume: dict) -> int:
        # resume: a checkpoint's resume_state() plus its "optimizer" state dict (and "path"). No RNG state is
        # restored: no step draws from a global generator (the resume tests pin bitwise continuation).
        where = resume.get("path", "resume state")
        saved = [(n, list(s)) for n, s in resume.get("trainable_params", [])]
        current = [(n, list(p.shape)) for n, p in self.named_params]
        if saved != current:
            diff = next(((a, b) for a, b in zip(saved, current) if a != b), None)
            detail = f"{diff[0]} vs {diff[1]}" if diff else f"{len(saved)} vs {len(current)} trainable tensors"
            raise TrainError(f"{where}: resume state does not match the model's trainable parameters ({detail})")
        if (n_saved := resume.get("data", {}).get("n_samples")) != len(self.train_data):
            raise TrainError(f"{where}: the checkpoint was trained on {n_saved} samples, the data given has "
                             f"{len(self.train_data)}: resuming would not continue the same data order")
        # AdamW moments shaped like their parameter (state i: the optimizer's i-th, through its groups), and finite.
        saved, params = resume["optimizer"], [p for group in self.optimizer.param_groups for p in group["params"]]
        for index, moments in saved["state"].items():
            ok = isinstance(index, int) and 0 <= index < len(params) and isinstance(moments, dict) and all(
                key == "step" or (isinstance(value, torch.Tensor) and value.shape == params[index].shape
                                  and bool(torch.isfinite(value).all())) for key, value in moments.items())
            if not ok:
                raise TrainError(f"{where}: optimizer state of trainable tensor {index} is misshaped or not finite")
        try:
            self.optimizer.load_state_dict(shard_optimizer_state(saved, params) if self.distributed else saved)
        except (RuntimeError, ValueError, KeyError) as e:
            raise TrainError(f"{where}: cannot restore the optimizer state ({str(e).splitlines()[0]})") from None
        return resume["step"]

    def micro_batches(self, order: SampleOrder, step: int) -> list:
        # This rank's share of step `step`: the r-th contiguous run of samples_per_step samples of the stream.
        indices = order.indices((step * self.world + self.rank) * self.samples_per_step, self.samples_per_step)
        mb = self.config.micro_batch_size
        return [self.train_data.get(indices[i: i + mb]) for i in range(0, self.samples_per_step, mb)]

    def forward_backward(self, batches: list, stop: Callable[[], int]) -> torch.Tensor | None:
        # One step's gradients, None if a stop arrived between micro-batches (one process). Each micro-batch's
        # loss is divided by the step's target count over every rank: every token weighs the same.
        n_targets = sum(int((y != IGNORE_INDEX).sum()) for _, y in batches)
        if self.distributed:
            counts = torch.tensor([n_targets], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(counts)
            n_targets = int(counts.item())
        step_loss = torch.zeros((), device=self.device)
        for x, y in batches:
            if not self.distributed and stop():
                return None
            x, y = x.to(self.device), y.to(self.device)
            with autocast_for(self.device):
                loss = self.loss(x, y, self.frozen_prefix) / max(1, n_targets)
            loss.backward()
            step_loss += loss.detach()
        return step_loss

    def eval_row(self, step: int, started: float, log) -> dict:
        c = self.config
        r = evaluate(self.model, self.eval_data, c.block_size, c.micro_batch_size, c.eval_batches, self.sharded)
        log(f"eval step {step}: loss {r['loss']:.4f} | ppl {r['perplexity']:.2f}")
        return {"step": step, "world_size": self.world, "eval_loss": r["loss"], "eval_perplexity": r["perplexity"],
                "eval_tokens": r["tokens"], "elapsed_s": round(time.time() - started, 3)}

    def save(self, hooks: TrainHooks, step: int, losses: list[float]) -> str | None:
        # Every rank joins the gathers, rank 0 alone hands the whole state to hooks.save, no rank goes on before
        # it is written. Full state dicts, not per-rank shards: any number of processes resumes from them.
        if not hooks.saves_checkpoints:
            return None
        weights, optimizer_state, keep = self.model.state_dict(), self.optimizer.state_dict(), self.rank == 0
        if self.distributed:
            weights, optimizer_state = gather_full(weights, keep), gather_full(optimizer_state, keep)
        path = hooks.save(step, weights, optimizer_state, self.resume_state(step, losses)) if keep else None
        if self.distributed:
            torch.distributed.barrier()
        return path

    def agreed_stop(self, signum: int) -> int:
        if self.distributed:  # ranks receive a signal at slightly different moments: agree (the largest)
            flag = torch.tensor([signum], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            signum = int(flag.item())
        return signum


def train(model: Transformer, train_data, config: TrainConfig, eval_data=None, *, hooks: TrainHooks | None = None,
          resume: dict | None = None, log: Callable = print) -> TrainResult:
    """Train `model` in place; returns a TrainResult (losses, evaluations, timing, where it stopped).

    train_data, eval_data: 1-D integer token arrays (n_tokens,) (numpy, memmap or CPU torch; a step reads
    blocks of block_size + 1 tokens), or datasets with __len__ and get(indices) -> (x, y). hooks: where
    metrics, checkpoints and stop requests go. resume: a checkpoint's resume_state() plus its "optimizer"
    state, for a model that already holds its weights. Under torchrun the model is sharded (FSDP2)."""
    hooks = hooks or TrainHooks()
    run = TrainRun(model, train_data, config, eval_data, resume)
    c, optimizer, params = config, run.optimizer, [p for _, p in run.named_params]
    if run.rank:  # only rank 0 prints and records
        log = lambda *a, **k: None  # noqa: E731
    else:
        hooks.start(run.resume_state(run.start_step, []))
    if resume is not None:
        log(f"resumed from {resume.get('path', 'resume state')} at step {run.start_step}")
    n_trainable, prefix = sum(p.numel() for p in params), run.frozen_prefix
    log(f"training {n_trainable:,} parameters (layers {run.layers}) on {run.device}"
        f"{f' x {run.world} processes (FSDP2)' if run.world > 1 else ''}; {len(run.train_data):,} samples, "
        f"{run.samples_per_step * run.world} x {c.block_size} tokens per step ({run.accum} micro-batches of "
        f"{c.micro_batch_size}){f'; layers below {prefix} run without autograd' if prefix else ''}")
    record = hooks.record if run.rank == 0 else (lambda row: None)
    order, losses, evals, step_times = SampleOrder(len(run.train_data), c.seed), [], [], []
    stopped, started = None, time.time()
    last_checkpoint, saved_step = (resume.get("path"), run.start_step) if resume else (None, None)
    if run.eval_data is not None and c.eval_every > 0 and run.start_step == 0:
        evals.append(run.eval_row(0, started, log))
        record(evals[-1])
    for step in range(run.start_step, run.stop_step):
        t0 = time.perf_counter()
        lr = lr_at(step, c)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = run.micro_batches(order, step)
        step_loss = run.forward_backward(batches, hooks.stop)
        if step_loss is None:  # a stop arrived (one process): this unfinished step is dropped, nothing applied
            optimizer.zero_grad(set_to_none=True)
            stopped = signal.Signals(hooks.stop()).name
            log(f"{stopped}: step {step + 1} dropped unfinished; stopping at step {step}")
            if step > run.start_step and saved_step != step:
                last_checkpoint = run.save(hooks, step, losses) or last_checkpoint
            break
        grad_norm = torch.nn.utils.clip_grad_norm_(params, c.grad_clip or float("inf"))
        if run.distributed:  # FSDP2 summed the gradients; the norm is a DTensor over all shards
            torch.distributed.all_reduce(step_loss)
            grad_norm = grad_norm.full_tensor()
        loss_value, grad_value = torch.stack([step_loss.float(), grad_norm.float()]).tolist()  # one sync
        if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
            raise NonFiniteLossError(f"step {step + 1}: loss {loss_value}, grad norm {grad_value}: not finite; "
                                     f"stopped without applying it. Last good checkpoint: "
                                     f"{last_checkpoint or 'none written'}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        dt = time.perf_counter() - t0
        step_times.append(dt)
        losses.append(loss_value)
        done, n_inputs = step + 1, sum(x.numel() for x, _ in batches) * run.world
        record({"step": done, "world_size": run.world, "loss": loss_value, "lr": lr, "grad_norm": grad_value,
                "tokens_per_s": round(n_inputs / dt, 1), "elapsed_s": round(time.time() - started, 3)})
        if done % c.log_every == 0 or done == run.stop_step:
            mean = sum(step_times[-c.log_every:]) / len(step_times[-c.log_every:])
            log(f"step {done}/{c.steps} | loss {loss_value:.4f} | lr {lr:.2e} | grad {grad_value:.3f} | "
                f"{n_inputs / mean:,.0f} tok/s | eta {format_eta(mean * (run.stop_step - done))}")
        evaluate_now = (c.eval_every > 0 and done % c.eval_every == 0) or done == run.stop_step
        stopping = not run.distributed and hooks.stop()  # a single process stops without evaluating first
        if run.eval_data is not None and evaluate_now and not stopping:
            evals.append(run.eval_row(done, started, log))
            record(evals[-1])
        signum = run.agreed_stop(hooks.stop())
        if signum:
            stopped = signal.Signals(signum).name
            log(f"{stopped} received: saving a checkpoint at step {done} and stopping")
        elif done == run.stop_step and run.stop_step < c.steps:
            stopped = "stop_after"
        if stopped or done == run.stop_step or (c.checkpoint_every > 0 and done % c.checkpoint_every == 0):
            last_checkpoint, saved_step = run.save(hooks, done, losses) or last_checkpoint, done
        if stopped:
            break
    timed = step_times[c.timing_skip_steps:] or step_times
    mean_step = sum(timed) / len(timed) if timed else math.nan
    # The evaluation of the weights the run ends with, or none: an interrupted run reports no earlier one.
    last_eval = evals[-1] if evals and evals[-1]["step"] == run.start_step + len(losses) else {}
    return TrainResult(
        final_loss=losses[-1] if losses else math.nan, losses=losses, eval_loss=last_eval.get("eval_loss"),
        eval_perplexity=last_eval.get("eval_perplexity"), evals=evals, mean_step_s=mean_step,
        tokens_per_s=c.batch_tokens / mean_step, trainable_params=n_trainable, trainable_layers=run.layers,
        step=run.start_step + len(losses), stopped=stopped, checkpoint=last_checkpoint)
