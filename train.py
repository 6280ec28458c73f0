"""Continued training of a grown LLaMA in one process: only its new layers, by default. Checks and
run folders: opt_deus_tool/runs.py; FSDP2: opt_deus_tool/distributed.py."""

from __future__ import annotations

import functools
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

if __package__:  # installed (opt_deus_core.train), or copied into a package of yours
    from .model import Transformer
else:  # copied alone beside model.py
    from model import Transformer


class TrainError(ValueError):
    """A problem the user can fix; the message names `fields`."""


class NonFiniteLossError(TrainError):
    """The loss or gradient norm became nan/inf; the step was not applied."""


IGNORE_INDEX = -100  # the label of positions without loss (SFT prompts, padding)


# Samples and their order
class TokenBlocks:
    # Sample i: tokens[i*T : i*T+T+1], inputs its first T, targets its last T. Any dataset with
    # __len__ and get(indices) -> (x, y), (B, L) each, trains alike (SFT: opt_deus_tool/data.py).
    def __init__(self, tokens, block_size: int):
        self.tokens, self.block_size = np.asarray(tokens), block_size

    def __len__(self):
        return (len(self.tokens) - 1) // self.block_size

    def get(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.block_size
        rows = [np.asarray(self.tokens[i * T: i * T + T + 1], np.int64) for i in indices]
        rows = torch.from_numpy(np.stack(rows))  # (B, T+1)
        return rows[:, :-1], rows[:, 1:]


def as_dataset(data, block_size: int):  # a 1-D token array -> TokenBlocks; a dataset as it is
    return data if hasattr(data, "get") else TokenBlocks(data, block_size)


@functools.lru_cache(maxsize=1)
def epoch_order(n_samples: int, seed: int, epoch: int) -> np.ndarray:
    # The data order: epochs, each a permutation seeded by (seed, epoch). The sample at stream
    # position p depends on (seed, p) alone, so a resumed run reads what an uninterrupted one would.
    return np.random.default_rng([seed, epoch]).permutation(n_samples)


# The loss
# Logits per chunk: never all (tokens x vocabulary) float32 logits at once. With a frozen head this
# lowered the loss's peak from 4.36 to 2.83 GB (2048 tokens, 128k vocabulary; BENCHMARKS_TRAIN.md).
LOSS_CHUNK_ELEMENTS = 2**27


class _LinearCrossEntropy(torch.autograd.Function):
    # sum of -log softmax(h @ W^T)[target] over valid rows. A chunk's gradients (softmax - onehot)
    # are computed beside its logits; backward only scales them.
    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows: int, need_h: bool, need_w: bool):
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_rows):
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


def linear_cross_entropy(h, weight, targets) -> torch.Tensor:
    # h (N, D), weight (V, D), targets (N,) -> the summed loss of targets != -100 (float32)
    device_type, grad = h.device.type, torch.is_grad_enabled()
    if torch.is_autocast_enabled(device_type):  # the head in the autocast dtype, as F.linear
        dtype = torch.get_autocast_dtype(device_type)
        h, weight = h.to(dtype), weight.to(dtype)
    chunk_rows = max(1, LOSS_CHUNK_ELEMENTS // weight.shape[0])
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, targets, chunk_rows,
                                         grad and h.requires_grad, grad and weight.requires_grad)


def forward_loss(model: Transformer, x, y, frozen_prefix: int | None) -> torch.Tensor:
    # x, y (B, T) -> summed loss. The embeddings and the first `frozen_prefix` blocks run without
    # autograd (None: the embeddings train), so backward stops above them.
    with torch.no_grad() if frozen_prefix is not None else nullcontext():
        h, cos, sin = model.embed(x)  # (B, T, D) and the RoPE tables
        for block in model.layers[: frozen_prefix or 0]:
            h = block(h, cos, sin)
    for block in model.layers[frozen_prefix or 0:]:
        h = block(h, cos, sin)
    weight = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    return linear_cross_entropy(model.norm(h).flatten(0, 1), weight, y.flatten())


# What trains
def set_trainable(model: Transformer, spec: str | list[int]) -> list[int]:
    """Freeze all but the chosen layers, returned: "new" (the growth record's new_layers), "all"
    (embeddings and head too) or a list of layer indices."""
    if spec == "all":
        model.requires_grad_(True)
        return list(range(len(model.layers)))
    layers = sorted(set(model.args.extra["opt_deus"]["new_layers"] if spec == "new" else spec))
    model.requires_grad_(False)
    for i in layers:
        model.layers[i].requires_grad_(True)
    return layers


def frozen_prefix_of(model: Transformer) -> int | None:
    # How many leading blocks need no autograd; None when the embeddings train.
    if model.embed_tokens.weight.requires_grad:
        return None
    trains = [any(p.requires_grad for p in block.parameters()) for block in model.layers]
    return trains.index(True) if True in trains else len(model.layers)


# Options and schedule
def option(default, help: str, **metadata):
    return field(default=default, metadata={"help": help, **metadata})


@dataclass(frozen=True)
class TrainConfig:
    # Each field is also opt-deus-train's flag; the tool checks the values (train_checks.py).
    steps: int = option(1000, "optimizer steps the schedule spans")
    lr: float = option(2e-4, "peak learning rate")
    min_lr_ratio: float = option(0.1, "final lr = lr x this")
    warmup_steps: int = option(100, "linear warmup from lr/warmup_steps to lr")
    schedule: str = option("wsd", "warmup-stable-decay or cosine", choices=("wsd", "cosine"))
    decay_fraction: float = option(0.2, "wsd: the last fraction of steps decays linearly")
    batch_tokens: int = option(65536, "tokens per optimizer step (of all processes)")
    micro_batch_size: int = option(4, "sequences per forward/backward")
    block_size: int = option(2048, "tokens per sequence")
    grad_clip: float = option(1.0, "max gradient norm (0: no clipping)")
    weight_decay: float = option(0.1, "AdamW weight decay (not of norm gains)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    trainable: str | list[int] = option("new", "'new' (the growth record's), 'all', or 3,7,11")
    eval_every: int = option(200, "steps between evaluations (0: only at the end)")
    eval_batches: int = option(20, "micro-batches per evaluation")
    log_every: int = option(10, "steps between progress lines")
    seed: int = option(0, "the data order is a function of (seed, step)")
    compile: bool = option(False, "torch.compile the loss")
    device: str = option("auto", "auto (cuda if any, else cpu), cpu, cuda:1, ...")
    checkpoint_every: int = option(500, "steps between checkpoints (0: only at the end)")
    stop_after: int | None = option(None, "end after this step, as if stopped")
    timing_skip_steps: int = option(2, "first steps left out of the mean step time")


def lr_at(step: int, c: TrainConfig) -> float:
    """The learning rate of step `step` (0-based): the peak at warmup_steps-1, min lr at steps-1."""
    peak, floor = c.lr, c.lr * c.min_lr_ratio
    if step < c.warmup_steps:
        return peak * (step + 1) / c.warmup_steps
    if c.schedule == "cosine":
        progress = min(1.0, (step - c.warmup_steps + 1) / (c.steps - c.warmup_steps))
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = min(round(c.decay_fraction * c.steps), c.steps - c.warmup_steps)
    decay_start = c.steps - decay_steps
    if decay_steps == 0 or step < decay_start:
        return peak
    return peak + (floor - peak) * min(1.0, (step - decay_start + 1) / decay_steps)


def autocast_for(device: torch.device):  # CUDA: bf16 compute, float32 weights and AdamW state
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def make_optimizer(named_params: list, c: TrainConfig, device: torch.device):
    matrices = [p for _, p in named_params if p.ndim >= 2]
    gains = [p for _, p in named_params if p.ndim < 2]  # RMSNorm weights: no decay
    groups = [{"params": matrices, "weight_decay": c.weight_decay},
              {"params": gains, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr_at(0, c), betas=(c.beta1, c.beta2), eps=c.eps,
                             fused=device.type == "cuda")


# One process, or many
class OneProcess:
    """train() in this process alone. Each method is a point where many processes differ
    (distributed.py: FSDP2 under torchrun); the hooks resume and save through it too."""
    rank, world = 0, 1
    stops_mid_step = True  # a stop drops the unfinished step (many processes finish it together)

    def device(self, name: str) -> torch.device:
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.device(auto if name == "auto" else name)

    def wrap(self, model, loss_fn, device) -> tuple:
        # The model on `device`; -> loss(x, y, frozen_prefix) to train, to evaluate (uncompiled).
        return functools.partial(loss_fn, model.to(device)), functools.partial(forward_loss, model)

    def sum(self, value): return value  # a count or a tensor, over all processes
    def clip_grad_norm(self, params, max_norm): return nn.utils.clip_grad_norm_(params, max_norm)
    def share(self, batches): return batches  # the evaluation batches this process runs
    def optimizer_state(self, saved, params): return saved  # a whole saved state, placed as params
    def save(self, write, weights, optimizer_state): return write(weights, optimizer_state)
    def agree_stop(self, signum): return signum  # the stop all processes act on (0: none)


# Evaluation
@torch.no_grad()
def evaluate(model: Transformer, tokens, block_size: int, batch_size: int, max_batches=None,
             progress=None, *, dist=None, loss=None) -> dict:
    """Mean loss on non-overlapping blocks (each token predicted once) of tokens or an SFT dataset;
    max_batches None: all, the last partial block too. progress(batches done, of, tokens)."""
    dist, device = dist or OneProcess(), next(model.parameters()).device
    loss = functools.partial(forward_loss, model) if loss is None else loss
    data = as_dataset(tokens, block_size)
    n = len(data) if max_batches is None else min(len(data), max_batches * batch_size)
    batches = [data.get(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    whole = max_batches is None and isinstance(data, TokenBlocks)
    if whole and len(data.tokens) > n * block_size + 1:  # the last, partial block
        batches.append(data.get([n]))
    batches, count = dist.share(batches), 0
    total = torch.zeros((), dtype=torch.float64, device=device)
    with autocast_for(device):
        for done, (x, y) in enumerate(batches, 1):
            total += loss(x.to(device), y.to(device), None).double()
            count += int((y != IGNORE_INDEX).sum())
            if progress is not None:
                progress(done, len(batches), count)
    total, count = dist.sum(torch.stack([total, total.new_tensor(float(count))])).tolist()
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": int(count),
            "nll_sum": total}


# The loop
class TrainHooks:  # where the loop's output goes; these drop it (opt_deus_tool/runs.py: RunFolder)
    checkpoint = None  # the path of the last checkpoint, written or resumed from
    def start(self, run): return 0  # -> the first step (a resumed run's, its optimizer restored)
    def record(self, row): pass  # a step's or an evaluation's metrics
    def save(self, run, step): pass  # a checkpoint after `step` steps, unless it has one
    def stop(self): return 0  # a signal number (0: none)


@dataclass
class TrainResult:  # eval_*: the final weights', if evaluated; stopped: a signal's name, stop_after
    final_loss: float
    losses: list[float]  # per step of this run
    eval_loss: float | None
    eval_perplexity: float | None
    evals: list[dict]
    mean_step_s: float  # after timing_skip_steps
    tokens_per_s: float
    trainable_params: int
    trainable_layers: list[int]
    step: int  # steps done, resumed ones included
    stopped: str | None
    checkpoint: str | None  # the last one written


class TrainRun:
    # train()'s state, which its hooks read: c, model, dist, layers, named, optimizer, start, losses
    def __init__(self, model: Transformer, data, c: TrainConfig, eval_data, dist, hooks):
        self.model, self.c, self.dist, self.hooks = model, c, dist, hooks
        self.data, self.device = as_dataset(data, c.block_size), dist.device(c.device)
        self.eval_data = eval_data if eval_data is None else as_dataset(eval_data, c.block_size)
        self.layers, self.prefix = set_trainable(model, c.trainable), frozen_prefix_of(model)
        # After requires_grad is set: FSDP2 copies it into the shards that replace the parameters.
        loss_fn = torch.compile(forward_loss) if c.compile else forward_loss
        self.loss, self.eval_loss = dist.wrap(model, loss_fn, self.device)
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.n_params = sum(p.numel() for _, p in self.named)
        self.samples = c.batch_tokens // (c.block_size * dist.world)  # a step's, this process's
        self.optimizer = make_optimizer(self.named, c, self.device)
        self.end = min(c.steps, c.stop_after or c.steps)
        self.losses, self.evals, self.times = [], [], []

    def forward_backward(self, step: int):
        # This process's share of the step -> (micro-batches, their loss; None: a stop came between
        # them). Losses are divided by the step's target count: every token weighs the same, any N.
        mb, n, device = self.c.micro_batch_size, len(self.data), self.device
        first = (step * self.dist.world + self.dist.rank) * self.samples  # in the stream
        order = [int(epoch_order(n, self.c.seed, p // n)[p % n])
                 for p in range(first, first + self.samples)]
        batches = [self.data.get(order[i: i + mb]) for i in range(0, self.samples, mb)]
        n_targets = self.dist.sum(sum(int((y != IGNORE_INDEX).sum()) for _, y in batches))
        step_loss = torch.zeros((), device=device)
        for x, y in batches:
            if self.dist.stops_mid_step and self.hooks.stop():
                return batches, None
            with autocast_for(device):
                loss = self.loss(x.to(device), y.to(device), self.prefix) / max(1, n_targets)
            loss.backward()
            step_loss += loss.detach()
        return batches, step_loss

    def evaluate(self, step: int, log):
        r = evaluate(self.model, self.eval_data, self.c.block_size, self.c.micro_batch_size,
                     self.c.eval_batches, dist=self.dist, loss=self.eval_loss)
        log(f"eval step {step}: loss {r['loss']:.4f} | ppl {r['perplexity']:.2f}")
        self.evals.append({"step": step, "world_size": self.dist.world, "eval_loss": r["loss"],
                           "eval_perplexity": r["perplexity"], "eval_tokens": r["tokens"],
                           "elapsed_s": round(time.time() - self.started, 3)})
        self.hooks.record(self.evals[-1])


def train(model: Transformer, train_data, config: TrainConfig, eval_data=None, *, hooks=None,
          log=print, dist: OneProcess | None = None) -> TrainResult:
    """Train `model` in place. train_data, eval_data: 1-D integer token arrays (numpy, memmap, CPU
    torch) or datasets. A run resumes through its hooks (opt_deus_tool/runs.py: RunFolder)."""
    c, dist = config, dist or OneProcess()
    run = TrainRun(model, train_data, c, eval_data, dist, hooks or TrainHooks())
    hooks, optimizer, params = run.hooks, run.optimizer, [p for _, p in run.named]
    run.start = hooks.start(run)  # no RNG state to restore: no step draws from a global generator
    log(f"training {run.n_params:,} parameters (layers {run.layers}) on {run.device} x "
        f"{dist.world}; {len(run.data):,} samples, {run.samples * dist.world} x {c.block_size} "
        f"tokens per step; {run.prefix or 0} layers without autograd")
    stopped, run.started = None, time.time()
    if run.eval_data is not None and c.eval_every > 0 and run.start == 0:
        run.evaluate(0, log)
    for step in range(run.start, run.end):
        t0, lr = time.perf_counter(), lr_at(step, c)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches, step_loss = run.forward_backward(step)
        if step_loss is None:  # a stop arrived: nothing applied
            optimizer.zero_grad(set_to_none=True)
            stopped = signal.Signals(hooks.stop()).name
            log(f"{stopped}: step {step + 1} dropped unfinished; stopping at step {step}")
            break
        grad_norm = dist.clip_grad_norm(params, c.grad_clip or float("inf"))
        loss, grad = torch.stack([dist.sum(step_loss).float(), grad_norm.float()]).tolist()
        if not (math.isfinite(loss) and math.isfinite(grad)):
            raise NonFiniteLossError(f"step {step + 1}: loss {loss}, grad norm {grad}: not finite; "
                                     f"stopped without applying it. Last good checkpoint: "
                                     f"{hooks.checkpoint or 'none written'}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        run.times.append(time.perf_counter() - t0)
        run.losses.append(loss)
        done, n_inputs = step + 1, sum(x.numel() for x, _ in batches) * dist.world
        hooks.record({"step": done, "world_size": dist.world, "loss": loss, "lr": lr,
                      "grad_norm": grad, "tokens_per_s": round(n_inputs / run.times[-1], 1),
                      "elapsed_s": round(time.time() - run.started, 3)})
        if done % c.log_every == 0 or done == run.end:
            mean = sum(run.times[-c.log_every:]) / len(run.times[-c.log_every:])
            eta = int(max(0, mean * (run.end - done)))  # seconds
            log(f"step {done}/{c.steps} | loss {loss:.4f} | lr {lr:.2e} | grad {grad:.3f} | "
                f"{n_inputs / mean:,.0f} tok/s | eta {eta // 3600}:{eta // 60 % 60:02d}:"
                f"{eta % 60:02d}")
        due = c.eval_every > 0 and done % c.eval_every == 0 or done == run.end
        if due and run.eval_data is not None and not (dist.stops_mid_step and hooks.stop()):
            run.evaluate(done, log)
        if signum := dist.agree_stop(hooks.stop()):
            stopped = signal.Signals(signum).name
            log(f"{stopped} received: saving a checkpoint at step {done} and stopping")
            break
        if c.checkpoint_every and done % c.checkpoint_every == 0:
            hooks.save(run, done)
    step = run.start + len(run.losses)
    hooks.save(run, step)  # the last finished step, however the run ended
    last = run.evals[-1] if run.evals and run.evals[-1]["step"] == step else {}  # final weights'
    timed = run.times[c.timing_skip_steps:] or run.times
    mean_step = sum(timed) / len(timed) if timed else math.nan
    return TrainResult(run.losses[-1] if run.losses else math.nan, run.losses,
                       last.get("eval_loss"), last.get("eval_perplexity"), run.evals, mean_step,
                       c.batch_tokens / mean_step, run.n_params, run.layers, step,
                       stopped or ("stop_after" if run.end < c.steps else None), hooks.checkpoint)
