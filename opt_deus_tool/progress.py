"""What a training run says before its first step, at its first step, and the moment a stop signal arrives.

train.py's loop prints a progress line every `log_every` steps; on a CPU a step of the defaults takes minutes, so
the run folder's hooks (runs.RunFolder) add: before the first step, a note when the data is smaller than one step
and, on a CPU, an estimate of memory and step time (one short forward/backward, measured); the first step's line
however --log-every falls; and the acknowledgement of SIGINT/SIGTERM/SIGHUP from a thread woken by the signal
itself, since Python runs a signal handler only when the main thread next runs Python (a long kernel delays it).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable

import torch

from opt_deus_core.train import autocast_for

ESTIMATE_TOKENS = 256  # the measured forward/backward: one sequence this long (or block_size, if shorter)
SLOW_STEP_S = 120  # an estimated step longer than this suggests smaller steps


def duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def gigabytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def resident_bytes() -> int | None:
    # This process's resident memory now (Linux): the weights loaded, the runtime, the data, the tokenizer.
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def small_data_note(loop) -> str | None:
    # The data order cycles through the samples: fewer samples than one step takes repeat inside every step.
    n, per_step = len(loop.data), loop.samples * loop.dist.world
    if n >= per_step:
        return None
    c = loop.c
    return (f"note: the data has {n} sample(s) of {c.block_size} tokens, fewer than the {per_step} one step takes "
            f"(--batch-tokens {c.batch_tokens} / --block-size {c.block_size}): every step repeats them about "
            f"{per_step / n:.1f} times; add data or lower --batch-tokens")


def measure_pass(loop, tokens: int) -> tuple[float, int, int]:
    # One forward/backward of one sequence of at most `tokens` tokens (an SFT example may be shorter) through the
    # loop's own loss -> (seconds, bytes autograd saved for the backward but the parameters, tokens). The gradients
    # it leaves are dropped.
    x, y = loop.data.get([0])
    x, y = x[:, :tokens].to(loop.device), y[:, :tokens].to(loop.device)
    params = {p.untyped_storage().data_ptr() for p in loop.model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    started = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast_for(loop.device):
        loss = loop.loss(x, y, loop.prefix)
    loss.backward()
    seconds = time.perf_counter() - started
    for _, p in loop.named:
        p.grad = None
    return seconds, sum(saved.values()), x.shape[1]


def flops_per_token(args, layers: int, above: int, context: int) -> float:
    # Training FLOPs per token, roughly: every block forward (2 per weight), the blocks above the frozen prefix
    # backward too (4 per weight), causal attention (about 2 T h d per layer forward, twice that backward), the head.
    h, i, heads, d = args.hidden_size, args.intermediate_size, args.num_attention_heads, args.head_dim
    block = 2 * h * heads * d + 2 * h * args.num_key_value_heads * d + 3 * h * i
    return (2 * layers + 4 * above) * block + 4 * args.vocab_size * h + 2 * context * heads * d * (layers + 2 * above)


def estimate(loop) -> str:
    """Memory and step time of the loop's training on a CPU, from one short measured forward/backward."""
    c, model = loop.c, loop.model
    measure_pass(loop, 16)  # the first call pays one-time costs: not timed
    seconds, saved, length = measure_pass(loop, min(ESTIMATE_TOKENS, c.block_size))
    micro = min(c.micro_batch_size, loop.samples)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trained = sum(p.numel() * p.element_size() for _, p in loop.named) * 3  # gradients and AdamW's two moments
    activations = saved * micro * c.block_size / length
    # The loss's logits, a chunk of rows at a time (train.LOSS_CHUNK_ELEMENTS), and logsumexp's copy of them.
    loss = 2 * min(micro * c.block_size, max(1, 2**27 // model.args.vocab_size)) * model.args.vocab_size * 4
    now = resident_bytes()  # the weights and whatever else the process holds already
    total = (now or weights) + trained + activations + loss
    layers, above = len(model.layers), len(model.layers) - (loop.prefix or 0)
    scale = flops_per_token(model.args, layers, above, c.block_size) / flops_per_token(model.args, layers, above,
                                                                                       length)
    step, steps = seconds / length * loop.samples * c.block_size * scale, loop.end - loop.start
    held = f"this process now {gigabytes(now)}" if now else f"weights {gigabytes(weights)}"
    line = (f"estimate before step 1 ({loop.device}, from one {length}-token forward/backward): memory about "
            f"{gigabytes(total)} ({held}, gradients and AdamW {gigabytes(trained)}, activations "
            f"{gigabytes(activations)} for a micro-batch of {micro} x {c.block_size} tokens, the loss "
            f"{gigabytes(loss)}); a step about {duration(step)} ({loop.samples * c.block_size:,} tokens), the {steps} "
            f"steps to go about {duration(step * steps)}")
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        physical = None
    if physical and total > 0.8 * physical:
        line += (f". That is near or beyond this machine's {gigabytes(physical)}: lower --micro-batch-size or "
                 f"--block-size")
    if step > SLOW_STEP_S:
        line += ". Smaller steps on a CPU: --batch-tokens 2048 --block-size 512"
    return line


def before_first_step(loop, log: Callable):
    if (note := small_data_note(loop)) is not None:
        log(note)
    # On a CPU, in one process (under torchrun the loss is a collective), and not when compiling (the measured
    # pass would time the compiler).
    if loop.device.type == "cpu" and loop.dist.world == 1 and not loop.c.compile and loop.end > loop.start:
        log(estimate(loop))


def first_step_line(loop, row: dict) -> str | None:
    # train.py's progress line for the run's first step, when --log-every would not print it.
    c, done = loop.c, row["step"]
    if done != loop.start + 1 or done % c.log_every == 0 or done == loop.end:
        return None
    seconds = loop.times[-1]
    return (f"step {done}/{c.steps} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | grad {row['grad_norm']:.3f} | "
            f"{row['tokens_per_s']:,.0f} tok/s | eta {duration(seconds * (loop.end - done))} (then every "
            f"--log-every {c.log_every} steps)")


class SignalWatch:
    """Calls on_signal(signum) from a thread, the moment a signal with a Python handler arrives: the handler's
    C part writes the signal's number to a wakeup pipe (signal.set_wakeup_fd) whatever the main thread is
    doing, and this thread, blocked on the pipe, wakes (torch's kernels release the GIL). Main thread only."""

    def __init__(self, on_signal: Callable[[int], None]):
        self.on_signal, self.thread, self.previous = on_signal, None, -1

    def __enter__(self):
        self.read, self.write = os.pipe()
        os.set_blocking(self.write, False)  # set_wakeup_fd's requirement: a full pipe never blocks a handler
        self.previous = signal.set_wakeup_fd(self.write, warn_on_full_buffer=False)
        self.closing = False
        self.thread = threading.Thread(target=self._watch, name="opt-deus-signals", daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while True:
            data = os.read(self.read, 64)
            if self.closing or not data:
                return
            for signum in data:
                self.on_signal(signum)

    def __exit__(self, *exc):
        signal.set_wakeup_fd(self.previous)
        self.closing = True
        os.write(self.write, b"\0")
        self.thread.join(5)
        os.close(self.write)
        if not self.thread.is_alive():
            os.close(self.read)
