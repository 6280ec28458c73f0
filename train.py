"""Continued training of a (grown) LLaMA: only the new layers by default, in one file.

OpT-DeUS grows a pretrained model by inserting layers; this script then trains those layers on
plain text (continued pre-training, CPT) or on Alpaca-style instructions (SFT), with everything
else frozen. Read top to bottom: tokenizers, data, the loss, trainable selection, configuration
and schedule, the distributed path, evaluation, checkpoints, the training loop, command lines.

    python train.py --model grown/ --data corpus/ --steps 1000            # train the new layers
    python train.py --resume runs/train/checkpoint-000500                  # continue exactly
    python train.py eval --model runs/train/checkpoint-001000 --text test.txt
    torchrun --nproc_per_node 8 train.py --model grown/ --data corpus/   # one model, FSDP2 over 8 GPUs

Exit codes: 0 done; 2 a user error (bad path, empty data, bad resume state, non-finite loss: one
line on stderr, nothing half-written); 130/143 stopped by SIGINT/SIGTERM after saving a checkpoint;
1 under torchrun when another rank died or a collective waited past --dist-timeout.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gzip
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from model import (SCRATCH_HOST, AtomicFolder, CheckpointError, Interrupted, OneLineArgumentParser, Transformer,
                   check_device, check_output_folder, positive_int, remove_stale_scratch, rope_cos_sin,
                   write_text_atomic)


class TrainError(ValueError):
    """A problem the user can fix (paths, data, configuration, resume state); one-line message."""


class NonFiniteLossError(TrainError):
    """The loss or gradient norm became nan/inf; training stopped before applying the step."""


IGNORE_INDEX = -100  # label of positions that carry no loss (SFT prompts, padding)


# ----------------------------------------------------------------------------------------------
# Tokenizers


class ByteTokenizer:
    # Ids 0..255 are the UTF-8 bytes, 256 is end-of-document. Used when a checkpoint ships no
    # tokenizer.json (or the `tokenizers` package is missing): enough for tiny models and tests.
    vocab_size = 257
    eos_id = 256
    bos_id = None
    name = "byte-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]


class HFTokenizer:
    def __init__(self, tokenizer, name: str, eos_id: int, bos_id: int | None):
        self.tokenizer, self.name, self.eos_id, self.bos_id = tokenizer, name, eos_id, bos_id
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # The Rust tokenizer spreads a batch over the cores (docs/BENCHMARKS_TRAIN.md: 1.4x on 2 cores).
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]


def _json_object(path: Path) -> dict:
    # {} when the file is absent; a file that is present must hold a JSON object.
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise TrainError(f"{path}: not a JSON object")
    return value


def _special_id(model_dir: Path, key: str, tokenizer) -> int | None:
    # config.json's <key>_token_id (an int, or a list whose first entry is the main one), else
    # tokenizer_config.json's <key>_token string looked up in the vocabulary.
    for name in ("config.json", "generation_config.json"):
        value = _json_object(model_dir / name).get(f"{key}_token_id")
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, int):
            return value
    token = _json_object(model_dir / "tokenizer_config.json").get(f"{key}_token")
    if isinstance(token, dict):
        token = token.get("content")
    return tokenizer.token_to_id(token) if isinstance(token, str) else None


# A model made for the byte tokenizer has a vocabulary of 257 (maybe padded); a real subword
# vocabulary is tens of thousands. Without tokenizer.json, bytes are used only below this size.
BYTE_VOCAB_LIMIT = 512


def load_tokenizer(model_dir, byte_tokenizer: bool = False) -> ByteTokenizer | HFTokenizer:
    # Bytes are refused for a real vocabulary unless asked for (--byte-tokenizer): a 49k-vocabulary
    # model fed bytes trains "fine" and evaluates to nonsense.
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    vocab_size = _json_object(model_dir / "config.json").get("vocab_size")
    made_for_bytes = byte_tokenizer or (isinstance(vocab_size, int) and vocab_size <= BYTE_VOCAB_LIMIT)
    if not path.is_file():
        if made_for_bytes:
            return ByteTokenizer()
        raise TrainError(f"{path}: missing; the model's {vocab_size}-token vocabulary needs its tokenizer "
                         f"(copy tokenizer.json into the folder, or pass --byte-tokenizer to use UTF-8 bytes)")
    try:
        from tokenizers import Tokenizer  # optional dependency
    except ImportError:
        if made_for_bytes:
            return ByteTokenizer()
        raise TrainError(f"{path}: reading it needs the `tokenizers` package (pip install tokenizers)") from None
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises plain Exceptions on bad files
        raise TrainError(f"{path}: cannot read tokenizer ({e})") from None
    eos_id = _special_id(model_dir, "eos", tokenizer)
    if eos_id is None:
        raise TrainError(f"{model_dir}: no eos_token_id in config.json nor eos_token in tokenizer_config.json")
    # The token cache's key must change when the tokenizer does: the name hashes the file, not its path.
    name = "hf-" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return HFTokenizer(tokenizer, name, eos_id, _special_id(model_dir, "bos", tokenizer))


# ----------------------------------------------------------------------------------------------
# Data: files -> documents -> one long uint32 token stream (cached) -> fixed blocks


def list_data_files(paths) -> list[Path]:
    # Folders are walked recursively in sorted order; hidden files (a cache, .DS_Store) are skipped.
    files = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file()
                            and not any(part.startswith(".") for part in f.relative_to(p).parts))
        else:
            raise TrainError(f"{p}: no such file or folder")
    if not files:
        raise TrainError(f"{', '.join(map(str, paths))}: no data files found")
    return files


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz"))


def iter_documents(files: list[Path]) -> Iterator[str]:
    # A plain-text file is one document; a JSONL file holds one document per line in "text".
    for path in files:
        try:
            with _open_text(path) as f:
                if not _is_jsonl(path):
                    text = f.read()
                    if text:
                        yield text
                    continue
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line).get("text")
                    except (json.JSONDecodeError, AttributeError):
                        raise TrainError(f"{path}:{lineno}: not a JSON object") from None
                    if not isinstance(text, str):
                        raise TrainError(f"{path}:{lineno}: no string field 'text'")
                    if text:
                        yield text
        except UnicodeDecodeError:
            raise TrainError(f"{path}: not UTF-8 text") from None
        except (OSError, EOFError) as e:
            raise TrainError(f"{path}: cannot read ({e})") from None


def _batches(items, n: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_to_cache(paths, tokenizer, cache_dir, log: Callable = print) -> np.ndarray:
    """Documents joined with EOS as one 1-D uint32 memmap, tokenised once and cached on disk."""
    files = list_data_files(paths)
    # Keyed by what determines the tokens: each file's path, size and mtime, and the tokenizer.
    # uint32 because Llama 3's 128k vocabulary overflows uint16.
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = hashlib.sha256(json.dumps({"files": stats, "tokenizer": tokenizer.name,
                                     "eos": tokenizer.eos_id, "version": 1}).encode()).hexdigest()[:24]
    cache_dir = Path(cache_dir)
    final = cache_dir / f"tokens-{key}.u32"
    if final.is_file():
        return np.memmap(final, dtype=np.uint32, mode="r")
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(cache_dir, final.name)  # left by a tokenisation that was killed
    tmp = cache_dir / f".{final.name}.tmp-{SCRATCH_HOST}-{os.getpid()}"
    n_tokens, t0 = 0, time.time()
    try:
        with open(tmp, "wb") as f:
            for texts in _batches(iter_documents(files), 64):
                for ids in tokenizer.encode_batch(texts):
                    ids.append(tokenizer.eos_id)
                    np.asarray(ids, dtype=np.uint32).tofile(f)
                    n_tokens += len(ids)
        if n_tokens == 0:
            raise TrainError(f"{', '.join(map(str, paths))}: no text (the data files are empty)")
        os.replace(tmp, final)  # the .u32 file appears only once complete
    finally:
        tmp.unlink(missing_ok=True)
    log(f"tokenised {len(files)} file(s): {n_tokens:,} tokens in {time.time() - t0:.1f}s -> {final}")
    return np.memmap(final, dtype=np.uint32, mode="r")


class TokenBlocks:
    # Sample i is the block tokens[i*T : i*T + T + 1]: inputs its first T tokens, targets its last T.
    # Blocks overlap by the one token that is both the last target and the next block's first input.
    def __init__(self, tokens, block_size: int, what: str = "data"):
        self.tokens, self.block_size = np.asarray(tokens), block_size  # numpy, memmap or CPU torch
        if len(tokens) < block_size + 1:
            raise TrainError(f"{what}: {len(tokens)} tokens is shorter than one block of {block_size + 1} "
                             f"(block size + 1); add data or lower --block-size")

    def __len__(self):
        return (len(self.tokens) - 1) // self.block_size

    def get(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.block_size
        rows = np.stack([np.asarray(self.tokens[i * T: i * T + T + 1], dtype=np.int64) for i in indices])
        rows = torch.from_numpy(rows)  # (B, T+1)
        return rows[:, :-1], rows[:, 1:]


# Alpaca's prompt templates (github.com/tatsu-lab/stanford_alpaca), verbatim. The model sees
# [bos] prompt response eos; the loss is on response and eos only.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")


def format_prompt(example: dict) -> str:
    template = PROMPT_WITH_INPUT if example.get("input") else PROMPT_NO_INPUT
    return template.format(instruction=example["instruction"], input=example.get("input", ""))


def sft_example(example: dict, tokenizer, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    # -> ids, labels, both (L,) with L <= block_size + 1; labels are -100 on the prompt.
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    prompt = bos + tokenizer.encode(format_prompt(example))
    response = tokenizer.encode(example["output"]) + [tokenizer.eos_id]
    ids = np.asarray(prompt + response, dtype=np.int64)[: block_size + 1]
    labels = ids.copy()
    labels[: len(prompt)] = IGNORE_INDEX
    return ids, labels


def load_alpaca(path) -> list[dict]:
    path = Path(path)
    try:
        with _open_text(path) as f:
            records = [json.loads(line) for line in f if line.strip()] if _is_jsonl(path) else json.load(f)
    except json.JSONDecodeError as e:
        raise TrainError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError:
        raise TrainError(f"{path}: not UTF-8 text") from None
    if not isinstance(records, list) or not records:
        raise TrainError(f"{path}: expected a non-empty JSON list of {{instruction, input, output}} records")
    for i, r in enumerate(records):
        ok = isinstance(r, dict) and "instruction" in r and "output" in r
        if not (ok and all(isinstance(r.get(k, ""), str) for k in ("instruction", "input", "output"))):
            raise TrainError(f"{path}: record {i} needs string fields 'instruction', 'output' (and optional 'input')")
    return records


class SFTDataset:
    # Examples kept unpadded; a batch is padded to its longest example, rounded up to a multiple of
    # 64 (bounded set of shapes for torch.compile), with eos as pad and -100 as pad label.
    def __init__(self, examples: list[dict], tokenizer, block_size: int, what: str = "SFT data"):
        self.block_size, self.pad_id = block_size, tokenizer.eos_id
        pairs = [sft_example(example, tokenizer, block_size) for example in examples]
        # A prompt that fills the whole block leaves no response to learn: dropped.
        pairs = [(ids, labels) for ids, labels in pairs if (labels[1:] != IGNORE_INDEX).any()]
        self.ids, self.labels = [ids for ids, _ in pairs], [labels for _, labels in pairs]
        if not self.ids:
            raise TrainError(f"{what}: no example has a response within the block size {block_size}")

    def __len__(self):
        return len(self.ids)

    def split(self, n: int) -> tuple[SFTDataset, SFTDataset]:
        # -> (the first n examples, the rest)
        head, tail = copy.copy(self), copy.copy(self)
        head.ids, head.labels = self.ids[:n], self.labels[:n]
        tail.ids, tail.labels = self.ids[n:], self.labels[n:]
        return head, tail

    def get(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        longest = max(len(self.ids[i]) - 1 for i in indices)
        L = min(self.block_size, -(-longest // 64) * 64)
        x = np.full((len(indices), L), self.pad_id, dtype=np.int64)
        y = np.full((len(indices), L), IGNORE_INDEX, dtype=np.int64)
        for row, i in enumerate(indices):
            ids, labels = self.ids[i], self.labels[i]
            x[row, : len(ids) - 1] = ids[:-1]
            y[row, : len(ids) - 1] = labels[1:]  # target at t is the label of token t+1
        return torch.from_numpy(x), torch.from_numpy(y)


def as_dataset(data, block_size: int, what: str):
    return data if isinstance(data, (TokenBlocks, SFTDataset)) else TokenBlocks(data, block_size, what)


class SampleOrder:
    # The training stream is an endless sequence of epochs, each a permutation of the samples
    # seeded by (seed, epoch): the sample at stream position p is a pure function of (seed, p),
    # so a resumed run reads exactly what an uninterrupted one would, with no iterator state.
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
    # sum over valid rows of -log softmax(h @ W^T)[target], without materialising the (N, V)
    # float32 logits: each chunk's logits live only inside the loop, and the gradients w.r.t. h
    # and W are computed right there (softmax - onehot), so backward has nothing to recompute.
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
    # x, y (B, T) -> loss summed over the targets that are not IGNORE_INDEX (float32). The embeddings and
    # the first `frozen_prefix` blocks run under no_grad: nothing below the lowest trainable block needs a
    # gradient, so they store no activations and backward stops there. None: the embeddings train.
    with torch.no_grad() if frozen_prefix is not None else nullcontext():
        h = model.embed_tokens(x)  # (B, T, D)
        cos, sin = rope_cos_sin(model.args, torch.arange(x.shape[1], device=x.device), h.dtype)
        for block in model.layers[: frozen_prefix or 0]:
            h = block(h, cos, sin)
    for block in model.layers[frozen_prefix or 0:]:
        h = block(h, cos, sin)
    weight = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    return linear_cross_entropy(model.norm(h).flatten(0, 1), weight, y.flatten())


# ----------------------------------------------------------------------------------------------
# What trains


def parse_trainable(spec: str | list[int]) -> str | list[int]:
    if isinstance(spec, str) and spec not in ("new", "all"):
        try:
            spec = [int(s) for s in spec.split(",") if s.strip()]
        except ValueError:
            raise TrainError(f"--trainable {spec!r}: expected 'new', 'all' or comma-separated layer indices") from None
    if not spec:
        raise TrainError("--trainable: empty layer list")
    return spec


def set_trainable(model: Transformer, spec: str | list[int]) -> list[int]:
    """Freeze everything but the chosen layers ("new": the checkpoint's opt_deus.new_layers; "all":
    every parameter, embeddings and head included; or a list of layer indices). Returns them."""
    spec = parse_trainable(spec)
    n_layers = len(model.layers)
    if spec == "all":
        model.requires_grad_(True)
        return list(range(n_layers))
    if spec == "new":
        spec = (model.args.extra.get("opt_deus") or {}).get("new_layers")
        if not spec:
            raise TrainError("--trainable new: the checkpoint records no new layers (config.json has no "
                             "opt_deus.new_layers); pass --trainable all or a comma list of layer indices")
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
    for i, block in enumerate(model.layers):
        if any(p.requires_grad for p in block.parameters()):
            return i
    return len(model.layers)


# ----------------------------------------------------------------------------------------------
# Configuration and schedule


def _option(default, flag_help: str | None = None, **argparse_kwargs):
    # A TrainConfig field; with a help text it is also an opt-deus-train flag (the name with dashes),
    # whose default is the field's: one source of truth for the Python API and the command line.
    return field(default=default, metadata={"help": flag_help, **argparse_kwargs})


@dataclass
class TrainConfig:
    steps: int = _option(1000, "optimizer steps the schedule spans")
    lr: float = _option(2e-4, "peak learning rate")
    min_lr_ratio: float = _option(0.1, "final lr = lr x this")
    warmup_steps: int = _option(100, "linear warmup from lr/warmup_steps to lr (< --steps)")
    schedule: str = _option("wsd", "learning-rate schedule: warmup-stable-decay or cosine", choices=["wsd", "cosine"])
    decay_fraction: float = _option(0.2, "wsd: the last fraction of the steps decays linearly to the final lr")
    batch_tokens: int = _option(65536, "tokens per optimizer step (under torchrun: over all processes)")
    micro_batch_size: int = _option(4, "sequences per forward/backward")
    block_size: int = _option(2048, "tokens per sequence (at most the model's max_position_embeddings)")
    grad_clip: float = _option(1.0, "max global gradient norm (0: no clipping)")
    weight_decay: float = _option(0.1, "AdamW weight decay (matrices only, never norm gains)")
    beta1: float = _option(0.9, "AdamW beta1, in [0, 1)")
    beta2: float = _option(0.95, "AdamW beta2, in [0, 1)")
    eps: float = _option(1e-8)  # AdamW epsilon (no flag)
    trainable: str | list[int] = _option("new", "'new' (config.json opt_deus.new_layers), 'all', or e.g. '3,7,11'")
    eval_every: int = _option(200, "steps between held-out evaluations (0: only at the end)")
    eval_batches: int = _option(20, "micro-batches per evaluation")
    log_every: int = _option(10, "steps between progress lines")
    seed: int = _option(0, "data order seed (>= 0): the data order is a function of (seed, step)")
    compile: bool = _option(False, "torch.compile the loss computation (the saved module is uncompiled)")
    device: str = _option("auto", "auto (cuda if available, else cpu; LOCAL_RANK under torchrun), cpu, cuda:1, ...")
    checkpoint_every: int = _option(500, "steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = _option(2, "keep the newest N checkpoints (0: all); the last one written is never deleted")
    out_dir: str | None = _option(None)  # where checkpoints go; None: no checkpoints (the CLI's --out)
    stop_after: int | None = _option(None, "end once this step is done, as if stopped (schedule unchanged)")
    timing_skip_steps: int = _option(2)  # first steps left out of the mean step time (warm-up, compile)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate_config(c: TrainConfig):
    # The one check of every training hyperparameter, for the command line and the Python API alike.
    # Messages name the flag (a TrainConfig field is its flag without dashes) and its default.
    for f in dataclasses.fields(c):
        value = getattr(c, f.name)
        if value is None and f.type.endswith("| None"):
            continue
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if f.type.startswith("int") and not (is_number and isinstance(value, int)):
            raise TrainError(f"{_flag(f.name)} {value!r}: expected an integer")
        if f.type == "float" and not is_number:
            raise TrainError(f"{_flag(f.name)} {value!r}: expected a finite number")

    def require(ok: bool, name: str, rule: str):
        if not ok:
            raise TrainError(f"{_flag(name)} {getattr(c, name)} {rule} "
                             f"(default {_flag(name)} {getattr(TrainConfig, name)})")

    require(c.steps >= 1, "steps", "must be >= 1")
    require(c.lr > 0, "lr", "must be > 0")
    require(0 <= c.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
    require(0 <= c.warmup_steps < c.steps, "warmup_steps", f"must be >= 0 and below --steps {c.steps}")
    require(c.schedule in ("wsd", "cosine"), "schedule", "must be 'wsd' or 'cosine'")
    require(0 <= c.decay_fraction <= 1, "decay_fraction", "must be in [0, 1]")
    require(c.block_size >= 1, "block_size", "must be >= 1")
    require(c.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")
    require(c.batch_tokens >= c.block_size * c.micro_batch_size, "batch_tokens",
            f"must be at least --block-size x --micro-batch-size = {c.block_size * c.micro_batch_size}")
    require(c.grad_clip >= 0, "grad_clip", "must be >= 0 (0: no clipping)")
    require(c.weight_decay >= 0, "weight_decay", "must be >= 0")
    require(0 <= c.beta1 < 1, "beta1", "must be in [0, 1)")
    require(0 <= c.beta2 < 1, "beta2", "must be in [0, 1)")
    require(c.eps > 0, "eps", "must be > 0")
    require(c.eval_every >= 0, "eval_every", "must be >= 0 (0: only at the end)")
    require(c.eval_batches >= 1, "eval_batches", "must be >= 1")
    require(c.log_every >= 1, "log_every", "must be >= 1")
    require(c.seed >= 0, "seed", "must be >= 0")
    require(c.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0: only at the end)")
    require(c.keep_checkpoints >= 0, "keep_checkpoints", "must be >= 0 (0: keep all)")
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
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = check_device(name)  # parsed, and present on this machine
    except CheckpointError as e:
        raise TrainError(str(e)) from None
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


def init_distributed(device_name: str, timeout_s: float) -> bool:
    # torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT; a plain `python train.py` sets none
    # and keeps the single-process path with no process group. The timeout bounds every collective,
    # so a rank that died or hangs makes the others fail with an error instead of waiting forever.
    if "WORLD_SIZE" not in os.environ or torch.distributed.is_initialized():
        return torch.distributed.is_initialized()
    device = resolve_device(device_name)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                                         device_id=device if cuda else None)
    return True


class ShardedLoss(torch.nn.Module):
    # FSDP2 gathers a module's parameters in hooks around its forward. forward_loss reads the
    # embeddings, final norm and head itself (not through Transformer.forward), so the FSDP root
    # that owns them is this module, whose forward is the loss.
    def __init__(self, model: Transformer, loss_fn: Callable):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, x, y, frozen_prefix):
        return self.loss_fn(self.model, x, y, frozen_prefix)


def shard_model(model: Transformer, device: torch.device, loss_fn: Callable) -> ShardedLoss:
    # fully_shard each block, then the root (embeddings, final norm, head): every rank keeps 1/N of
    # every float32 weight and gathers one block at a time. Frozen blocks are sharded too rather than
    # replicated (they are most of the model); FSDP2 gives parameters with requires_grad=False no
    # gradient and no reduce-scatter, and the frozen prefix runs under no_grad in forward_loss.
    # CUDA: blocks are gathered in bf16 (what autocast would cast them to anyway) and their gradients
    # reduced in float32; the root is gathered in float32, so the residual stream stays float32 under
    # autocast exactly as in the plain path. CPU (gloo): all float32.
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
        # Each rank's loss is already divided by the whole step's target count: sum, don't average
        # (a plain SUM collective: gloo has no PREMUL_SUM).
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    return root


def gather_full(state, keep: bool):
    # DTensor shards -> whole CPU tensors, through nested dicts and lists. Every rank joins each
    # all-gather in the same order; only ranks with `keep` hold on to the result.
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
    # A full optimizer state (what one process saves; state i belongs to the i-th trainable parameter)
    # -> this rank's shards, laid out like each parameter. Every rank reads the file (memory-mapped)
    # and keeps its own rows: no communication.
    from torch.distributed.tensor import distribute_tensor
    state = {}
    for i, s in saved["state"].items():
        p = params[i]
        state[i] = {k: v if k == "step" else distribute_tensor(v.to(p.device), p.device_mesh, p.placements,
                                                               src_data_rank=None) for k, v in s.items()}
    return {**saved, "state": state}


# ----------------------------------------------------------------------------------------------
# Evaluation


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@torch.no_grad()
def evaluate(model: Transformer, tokens, block_size: int, batch_size: int, max_batches: int | None = None,
             sharded: ShardedLoss | None = None, log: Callable | None = None) -> dict:
    """Mean loss and perplexity on contiguous non-overlapping blocks (each token predicted once) of a
    1-D token array (or an SFTDataset). With max_batches=None the whole array is read, the last
    partial block too. sharded: the FSDP root of `model` under torchrun; ranks then split the batches.
    log: progress of a long evaluation (opt-deus-eval), at most one line every 10 s."""
    device = next(model.parameters()).device
    data = as_dataset(tokens, block_size, "evaluation data")
    n = len(data) if max_batches is None else min(len(data), max_batches * batch_size)
    batches = [data.get(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    if max_batches is None and isinstance(data, TokenBlocks) and len(data.tokens) - n * block_size >= 2:
        tail = torch.from_numpy(np.asarray(data.tokens[n * block_size:], dtype=np.int64))[None]
        batches.append((tail[:, :-1], tail[:, 1:]))
    if sharded is not None:
        # Rank r takes batches r, r+N, ...; every rank runs the same number of forwards (FSDP gathers
        # are collectives), padding with a batch whose targets are all ignored: it adds nothing.
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
                log(f"eval batch {done}/{len(batches)} | {count:,} tokens | elapsed {_format_eta(elapsed)} | "
                    f"eta {_format_eta(elapsed / done * (len(batches) - done))}")
                last_log = time.time()
    if sharded is not None:
        sums = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=device)])
        torch.distributed.all_reduce(sums)
        total, count = sums[0], int(sums[1].item())
    loss = total.item() / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count, "nll_sum": total.item()}


# ----------------------------------------------------------------------------------------------
# Checkpoints: a Hugging Face folder plus trainer_state.json and optimizer.pt


def save_checkpoint(path, model: Transformer, optimizer, trainer_state: dict, copy_files_from=None) -> Path:
    # Built in a hidden temporary folder and renamed into place (model.AtomicFolder). Under torchrun
    # every rank joins the gathers and rank 0 alone writes the same folder one process writes: full
    # state dicts rather than torch.distributed.checkpoint's per-rank shards, so any number of processes
    # resumes from it (shard_optimizer_state). The cost: rank 0 holds the whole float32 model and AdamW
    # state in CPU memory while it writes.
    path = Path(path).absolute()
    optimizer_state = optimizer.state_dict()
    distributed = torch.distributed.is_initialized()
    if distributed:
        keep = torch.distributed.get_rank() == 0
        weights, optimizer_state = gather_full(model.state_dict(), keep), gather_full(optimizer_state, keep)
        if not keep:
            torch.distributed.barrier()  # no rank goes on (or exits) before the folder is in place
            return path
        with torch.device("meta"):
            model = Transformer(model.current_args())
        model.load_state_dict(weights, assign=True)
    with AtomicFolder(path, overwrite=True) as folder:
        model.save_pretrained(folder.tmp, copy_files_from=copy_files_from, atomic=False)
        torch.save(optimizer_state, folder.tmp / "optimizer.pt")
        (folder.tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        folder.commit()
    if distributed:
        torch.distributed.barrier()
    return path


def find_checkpoints(out_dir) -> list[Path]:
    return sorted(p for p in Path(out_dir).glob("checkpoint-*") if (p / "trainer_state.json").is_file())


def read_trainer_state(path) -> dict:
    file = Path(path) / "trainer_state.json"
    try:
        state = json.loads(file.read_text())
        assert isinstance(state, dict) and isinstance(state["step"], int)
        return state
    except (OSError, json.JSONDecodeError, AssertionError, KeyError) as e:
        raise TrainError(f"{file}: unreadable trainer state ({e!r})") from None


def resolve_checkpoint(path) -> Path:
    # A checkpoint folder, or a run folder (its newest checkpoint).
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    found = find_checkpoints(path) if path.is_dir() else []
    if not found:
        raise TrainError(f"{path}: not a checkpoint (no trainer_state.json) nor a run folder with checkpoints")
    return found[-1]


def load_resume_state(path, named_params, optimizer, n_samples: int, device) -> dict:
    # No RNG state is restored: no training step draws from a global generator (the data order is
    # SampleOrder's, seeded by (seed, epoch)), and the resume tests pin bitwise continuation.
    path = resolve_checkpoint(path)
    state = read_trainer_state(path)
    saved = [(n, list(s)) for n, s in state.get("trainable_params", [])]
    current = [(n, list(p.shape)) for n, p in named_params]
    if saved != current:
        diff = next(((a, b) for a, b in zip(saved, current) if a != b), None)
        detail = f"{diff[0]} vs {diff[1]}" if diff else f"{len(saved)} vs {len(current)} trainable tensors"
        raise TrainError(f"{path}: resume state does not match the model's trainable parameters ({detail})")
    if state.get("data", {}).get("n_samples") != n_samples:
        raise TrainError(f"{path}: the checkpoint was trained on {state.get('data', {}).get('n_samples')} samples, "
                         f"the data given has {n_samples}: resuming would not continue the same data order")
    sharded = torch.distributed.is_initialized()
    try:
        # Memory-mapped under torchrun: the ranks of a node share one copy in the page cache.
        saved = torch.load(path / "optimizer.pt", map_location="cpu" if sharded else device, weights_only=True,
                           mmap=sharded)
        optimizer.load_state_dict(shard_optimizer_state(saved, [p for _, p in named_params]) if sharded else saved)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise TrainError(f"{path}: cannot restore the optimizer state ({str(e).splitlines()[0]})") from None
    return {**state, "path": str(path)}


# ----------------------------------------------------------------------------------------------
# The training loop


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
    stopped: str | None = None           # None (finished), "SIGINT", "SIGTERM" or "stop_after"
    checkpoint: str | None = None        # the last checkpoint written


def train(model: Transformer, train_tokens, config: TrainConfig, eval_tokens=None, metrics_path=None,
          log: Callable = print, resume_from=None, run: dict | None = None) -> TrainResult:
    """Train `model` in place and return a TrainResult (losses, evaluations, timing, where it stopped).

    train_tokens, eval_tokens: 1-D integer token arrays of shape (n_tokens,) (numpy, memmap or CPU torch;
    each step reads blocks of config.block_size + 1 tokens), or SFTDatasets. metrics_path: a JSONL file
    that gets one row per step and per evaluation. resume_from: a checkpoint folder whose weights the
    model already holds; its optimizer state and step are restored. run: the command line's description
    of the run, saved into every checkpoint and, once every check has passed, with the config into
    out_dir/run.json (a failed start writes nothing); its copy_files_from names the folder whose
    tokenizer files every checkpoint gets. Under torchrun the model is sharded (FSDP2) over all ranks.
    """
    validate_config(config)
    if config.block_size > model.args.max_position_embeddings:
        raise TrainError(f"--block-size {config.block_size} is beyond the model's max_position_embeddings "
                         f"{model.args.max_position_embeddings}")
    rank, world = rank_and_world()
    is_main = rank == 0
    if not is_main:
        log = lambda *a, **k: None  # noqa: E731
    device = resolve_device(config.device)
    distributed = torch.distributed.is_initialized()
    if not distributed:
        model.to(device)
    train_data = as_dataset(train_tokens, config.block_size, "training data")
    eval_data = None if eval_tokens is None else as_dataset(eval_tokens, config.block_size, "evaluation data")
    layers = set_trainable(model, config.trainable)
    frozen_prefix = frozen_prefix_of(model)
    loss_fn = torch.compile(forward_loss) if config.compile else forward_loss
    # After requires_grad is set (FSDP2 copies it into each shard); the shards replace the parameters.
    sharded = shard_model(model, device, loss_fn) if distributed else None
    named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named_params]
    per_micro_batch = config.block_size * config.micro_batch_size * world
    if config.batch_tokens % per_micro_batch:
        raise TrainError(f"--batch-tokens {config.batch_tokens} is not a multiple of --block-size x "
                         f"--micro-batch-size{' x world size' if world > 1 else ''} = {per_micro_batch}")
    accum = config.batch_tokens // per_micro_batch  # micro-batches per step on each rank
    samples_per_step = accum * config.micro_batch_size  # on each rank
    optimizer = make_optimizer(named_params, config, device)

    start_step, last_checkpoint = 0, None
    if resume_from is not None:
        resumed = load_resume_state(resume_from, named_params, optimizer, len(train_data), device)
        start_step, last_checkpoint = resumed["step"], resumed["path"]
        if start_step >= config.steps:
            raise TrainError(f"{resumed['path']}: already at step {start_step} of --steps {config.steps}; "
                             f"pass a larger --steps to continue")
        log(f"resumed from {resumed['path']} at step {start_step}")
    stop_step = min(config.steps, config.stop_after or config.steps)
    if stop_step <= start_step:
        raise TrainError(f"--stop-after {config.stop_after} is not beyond the resumed step {start_step}")

    # Every check has passed: from here on the run writes (every rank joins a save; rank 0 writes).
    out_dir = Path(config.out_dir) if config.out_dir else None
    if out_dir is not None and is_main:
        remove_stale_scratch(out_dir, None)  # what a killed run left in this folder
        if run is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out_dir / "run.json",
                              json.dumps({"config": dataclasses.asdict(config), "run": run}, indent=2) + "\n")
    metrics = None
    if metrics_path is not None and is_main:
        metrics_path = Path(metrics_path)
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        if start_step and metrics_path.is_file():  # drop rows written after the checkpoint resumed from
            rows = [r for r in metrics_path.read_text().splitlines() if json.loads(r).get("step", 0) <= start_step]
            write_text_atomic(metrics_path, "".join(r + "\n" for r in rows))
        metrics = open(metrics_path, "a" if start_step else "w")

    def write_row(row: dict):
        if metrics is not None:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    def run_eval(step: int) -> dict:
        r = evaluate(model, eval_data, config.block_size, config.micro_batch_size, config.eval_batches, sharded)
        row = {"step": step, "world_size": world, "eval_loss": r["loss"], "eval_perplexity": r["perplexity"],
               "eval_tokens": r["tokens"], "elapsed_s": round(time.time() - t_start, 3)}
        write_row(row)
        log(f"eval step {step}: loss {r['loss']:.4f} | ppl {r['perplexity']:.2f}")
        return row

    def checkpoint(step: int) -> str:
        position = step * samples_per_step * world
        state = {"format": 1, "step": step, "config": dataclasses.asdict(config), "trainable_layers": layers,
                 "trainable_params": [(n, list(p.shape)) for n, p in named_params],
                 "data": {"n_samples": len(train_data), "samples_per_step": samples_per_step * world,
                          "stream_position": position, "seed": config.seed, "epoch": position // len(train_data)},
                 "losses": losses[-1:], "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if run is not None:
            state["run"] = run
        copy_files_from = run.get("copy_files_from") if run else None
        path = save_checkpoint(out_dir / f"checkpoint-{step:06d}", model, optimizer, state, copy_files_from)
        if config.keep_checkpoints and is_main:
            # The newest N of this run (another run's, if any, stay); never the one just written.
            run_id = run.get("run_id") if run else None
            ours = [c for c in find_checkpoints(out_dir)
                    if read_trainer_state(c).get("run", {}).get("run_id") in (None, run_id)]
            for old in ours[: -config.keep_checkpoints]:
                if old.resolve() != path.resolve():
                    shutil.rmtree(old, ignore_errors=True)
        log(f"saved {path}")
        return str(path)

    # SIGINT/SIGTERM: said at once, then the run stops at the next micro-batch (the unfinished step is
    # dropped, nothing of it applied; under torchrun, at the end of the step, which all ranks agree on),
    # saves a checkpoint of the last whole step and ends. A second signal acts as usual.
    stop_signal: list[int] = []
    previous_handlers = {}

    def on_signal(signum, frame):
        stop_signal.append(signum)
        signal.signal(signum, previous_handlers[signum])
        if is_main:  # straight to fd 2: a print() interrupting a print() raises "reentrant call"
            message = (f"{signal.Signals(signum).name} received: stopping at the next micro-batch and saving a "
                       f"checkpoint of the last finished step (send it again to stop at once)\n")
            os.write(2, message.encode())

    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            previous_handlers[s] = signal.signal(s, on_signal)

    n_trainable = sum(p.numel() for p in params)
    log(f"training {n_trainable:,} parameters (layers {layers}) on {device}"
        f"{f' x {world} processes (FSDP2)' if distributed else ''}; {len(train_data):,} samples, "
        f"{samples_per_step * world} x {config.block_size} tokens per step ({accum} micro-batches of "
        f"{config.micro_batch_size}){f'; layers below {frozen_prefix} run without autograd' if frozen_prefix else ''}")
    order = SampleOrder(len(train_data), config.seed)
    losses, evals, step_times = [], [], []
    stopped = None
    t_start = time.time()
    try:
        if eval_data is not None and config.eval_every > 0 and start_step == 0:
            evals.append(run_eval(0))
        for step in range(start_step, stop_step):
            t0 = time.perf_counter()
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            indices = order.indices((step * world + rank) * samples_per_step, samples_per_step)
            batches = [train_data.get(indices[i: i + config.micro_batch_size])
                       for i in range(0, samples_per_step, config.micro_batch_size)]
            # Each micro-batch's loss is divided by the whole step's target count (over every rank), so
            # every token weighs the same whatever its micro-batch or rank.
            n_targets = sum(int((y != IGNORE_INDEX).sum()) for _, y in batches)
            if distributed:
                counts = torch.tensor([n_targets], dtype=torch.float64, device=device)
                torch.distributed.all_reduce(counts)
                n_targets = int(counts.item())
            n_targets = max(1, n_targets)
            n_inputs = sum(x.numel() for x, _ in batches) * world
            step_loss = torch.zeros((), device=device)
            dropped = False
            for x, y in batches:
                if stop_signal and not distributed:  # a signal arrived: this unfinished step is dropped
                    dropped = True
                    break
                x, y = x.to(device), y.to(device)
                with autocast_for(device):
                    loss = sharded(x, y, frozen_prefix) if distributed else loss_fn(model, x, y, frozen_prefix)
                    loss = loss / n_targets
                loss.backward()
                step_loss += loss.detach()
            if dropped:
                optimizer.zero_grad(set_to_none=True)
                stopped = signal.Signals(stop_signal[0]).name
                log(f"{stopped}: step {step + 1} dropped unfinished; stopping at step {step}")
                saved_here = last_checkpoint is not None and Path(last_checkpoint).name == f"checkpoint-{step:06d}"
                if out_dir is not None and step > start_step and not saved_here:
                    last_checkpoint = checkpoint(step)
                break
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip or float("inf"))
            if distributed:  # FSDP2 summed the gradients; the norm is a DTensor over all shards
                torch.distributed.all_reduce(step_loss)
                grad_norm = grad_norm.full_tensor()
            loss_value, grad_value = torch.stack([step_loss.float(), grad_norm.float()]).tolist()  # one sync
            if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
                raise NonFiniteLossError(f"step {step + 1}: loss {loss_value}, grad norm {grad_value}: not finite; "
                                         f"stopped without applying it. Last good checkpoint: "
                                         f"{last_checkpoint or 'none written'}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            step_times.append(dt)
            losses.append(loss_value)
            done = step + 1
            write_row({"step": done, "world_size": world, "loss": loss_value, "lr": lr, "grad_norm": grad_value,
                       "tokens_per_s": round(n_inputs / dt, 1), "elapsed_s": round(time.time() - t_start, 3)})
            if done % config.log_every == 0 or done == stop_step:
                recent = step_times[-config.log_every:]
                mean = sum(recent) / len(recent)
                log(f"step {done}/{config.steps} | loss {loss_value:.4f} | lr {lr:.2e} | grad {grad_value:.3f} | "
                    f"{n_inputs / mean:,.0f} tok/s | eta {_format_eta(mean * (stop_step - done))}")
            evaluate_now = (config.eval_every > 0 and done % config.eval_every == 0) or done == stop_step
            stopping = stop_signal and not distributed  # a single process stops without evaluating first
            if eval_data is not None and evaluate_now and not stopping:
                evals.append(run_eval(done))
            signum = stop_signal[0] if stop_signal else 0
            if distributed:  # ranks receive a signal at slightly different moments: agree (max) before any leaves
                flag = torch.tensor([signum], device=device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                signum = int(flag.item())
            if signum:
                stopped = signal.Signals(signum).name
                log(f"{stopped} received: saving a checkpoint at step {done} and stopping")
            elif done == stop_step and stop_step < config.steps:
                stopped = "stop_after"
            periodic = config.checkpoint_every > 0 and done % config.checkpoint_every == 0
            if out_dir is not None and (stopped or done == stop_step or periodic):
                last_checkpoint = checkpoint(done)
            if stopped:
                break
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
        if metrics is not None:
            metrics.close()

    timed = step_times[config.timing_skip_steps:] or step_times
    mean_step = sum(timed) / len(timed) if timed else math.nan
    # The evaluation of the weights the run ends with, or none: an interrupted run must not report
    # an earlier (say step 0) evaluation as its result.
    last_eval = evals[-1] if evals and evals[-1]["step"] == start_step + len(losses) else {}
    return TrainResult(
        final_loss=losses[-1] if losses else math.nan, losses=losses, eval_loss=last_eval.get("eval_loss"),
        eval_perplexity=last_eval.get("eval_perplexity"), evals=evals, mean_step_s=mean_step,
        tokens_per_s=config.batch_tokens / mean_step, trainable_params=n_trainable, trainable_layers=layers,
        step=start_step + len(losses), stopped=stopped, checkpoint=last_checkpoint)


# ----------------------------------------------------------------------------------------------
# Command lines


SIGNALS_HELP = ("SIGINT (Ctrl-C) or SIGTERM (a scheduler's stop): the run says so at once, stops at the next "
                "micro-batch (the unfinished step is dropped; under torchrun, at the end of the step), saves a "
                "checkpoint of the last finished step, and exits with 130 or 143; --resume continues from it "
                "exactly. A second signal stops at once. "
                "Exit code 2: a bad request (one line on stderr; nothing written, no input touched).")
DIST_TIMEOUT_S = 1800.0  # --dist-timeout's default
BYTE_TOKENIZER_HELP = ("use UTF-8 bytes when the model folder has no tokenizer.json (automatic for a vocabulary "
                       f"of at most {BYTE_VOCAB_LIMIT})")


def build_train_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="opt-deus-train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                              description="Train the new layers of a grown LLaMA (or any layers). "
                                          "`opt-deus-eval --help` for the evaluation command.",
                              epilog=SIGNALS_HELP)
    p.add_argument("--model", help="Hugging Face checkpoint folder to start from (not needed with --resume)")
    p.add_argument("--data", nargs="+", help="CPT: text files/folders (.gz ok), JSONL with 'text'; "
                                             "SFT: Alpaca JSON/JSONL (default with --resume: the checkpoint's)")
    p.add_argument("--task", choices=["cpt", "sft"], default="cpt", help="continued pre-training or instruction tuning")
    p.add_argument("--eval-data", nargs="+", help="held-out data; default: the last --eval-fraction of --data")
    p.add_argument("--eval-fraction", type=float, default=0.01, help="share of the data held out when no --eval-data")
    p.add_argument("--out", default="runs/train", help="run folder: checkpoints, metrics.jsonl, run.json "
                                                       "(with --resume: the resumed run's folder)")
    p.add_argument("--cache-dir", default="runs/token_cache", help="where tokenised CPT data is cached")
    p.add_argument("--byte-tokenizer", action="store_true", help=BYTE_TOKENIZER_HELP)
    # Every TrainConfig field with a help text is a flag, with the field's default.
    for f in dataclasses.fields(TrainConfig):
        if f.metadata["help"] is None:
            continue
        if f.type == "bool":
            p.add_argument(_flag(f.name), action="store_true", **f.metadata)
        else:
            kind = {"int": int, "int | None": int, "float": float}.get(f.type, str)
            p.add_argument(_flag(f.name), type=kind, default=f.default, **f.metadata)
    p.add_argument("--resume", help="checkpoint folder (or run folder: its newest) to continue exactly, writing "
                                    "into the folder that holds it")
    p.add_argument("--dist-timeout", type=float, default=DIST_TIMEOUT_S,
                   help="torchrun: seconds any collective may wait for the other ranks before the run fails")
    return p


# Flags that may change on resume without changing what is computed; the rest come from the checkpoint.
RESUME_OVERRIDES = ("steps", "device", "compile", "log_every", "eval_every", "eval_batches", "checkpoint_every",
                    "keep_checkpoints", "stop_after")


def resume_config(flags: argparse.Namespace, typed: set[str], checkpoint: Path, state: dict) -> TrainConfig:
    # A resumed run continues the saved training exactly: its config is the checkpoint's, and a flag
    # typed with --resume that would change what is computed (--lr, --block-size, --seed ...) is
    # refused by name rather than silently ignored.
    try:
        saved = TrainConfig(**state["config"])
    except TypeError as e:
        raise TrainError(f"{checkpoint}/trainer_state.json: config does not fit this train.py ({e})") from None
    run = state.get("run", {})
    conflicts = []
    for name in typed - set(RESUME_OVERRIDES):
        if hasattr(saved, name):
            value = parse_trainable(flags.trainable) if name == "trainable" else getattr(flags, name)
            if value != getattr(saved, name):
                conflicts.append(f"{_flag(name)} {value} (checkpoint: {getattr(saved, name)})")
    if "task" in typed and flags.task != run.get("task", "cpt"):
        conflicts.append(f"--task {flags.task} (checkpoint: {run.get('task', 'cpt')})")
    if "eval_fraction" in typed and flags.eval_fraction != run.get("eval_fraction", flags.eval_fraction):
        conflicts.append(f"--eval-fraction {flags.eval_fraction} (checkpoint: {run.get('eval_fraction')})")
    if "model" in typed:
        conflicts.append("--model (the checkpoint is the model)")
    if conflicts:
        raise TrainError(f"--resume {flags.resume}: cannot change {'; '.join(sorted(conflicts))}. A resumed run "
                         f"continues the saved one; only {', '.join(map(_flag, RESUME_OVERRIDES))}, --out, "
                         f"--data, --eval-data and --cache-dir may be given")
    # stop_after belongs to the run that stopped, not to the training: a resumed run goes on to `steps`.
    overrides = {k: getattr(flags, k) for k in RESUME_OVERRIDES if k in typed}
    config = dataclasses.replace(saved, **{"stop_after": None, **overrides})
    if isinstance(config.steps, int) and config.steps <= state["step"]:  # before the checks that --steps bounds
        raise TrainError(f"--resume {flags.resume}: already at step {state['step']} of --steps {config.steps}; "
                         f"pass a larger --steps to continue")
    return config


def load_data(paths, task: str, tokenizer, block_size: int, cache_dir, log=print):
    if task == "sft":
        examples = [r for p in list_data_files(paths) for r in load_alpaca(p)]
        return SFTDataset(examples, tokenizer, block_size, what=", ".join(map(str, paths)))
    return tokenize_to_cache(paths, tokenizer, cache_dir, log)


def run_training(flags: argparse.Namespace, typed: set[str]) -> TrainResult:
    """The opt-deus-train command: every check of the request first, then train(). `typed`: the flags
    given on the command line (a resumed run takes the checkpoint's values, not argparse's defaults)."""
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731  (stdout stays for results)
    if not (math.isfinite(flags.dist_timeout) and flags.dist_timeout > 0):
        raise TrainError(f"--dist-timeout {flags.dist_timeout} must be a number of seconds > 0 "
                         f"(default --dist-timeout {DIST_TIMEOUT_S})")
    resume, run = None, {}
    if flags.resume:
        resume = resolve_checkpoint(flags.resume)
        state = read_trainer_state(resume)
        config = resume_config(flags, typed, resume, state)
        run = state.get("run", {})
        model_dir, task = resume, run.get("task", "cpt")
        data_paths = flags.data or run.get("data")
        eval_paths = flags.eval_data or run.get("eval_data")
        eval_fraction = run.get("eval_fraction", flags.eval_fraction)
        cache_dir = flags.cache_dir if "cache_dir" in typed else run.get("cache_dir", flags.cache_dir)
        copy_from = run.get("copy_files_from") or resume
        # The resumed run writes into the run folder it is resumed from (the folder holding this
        # checkpoint), never the out_dir saved inside it: a copied run must not write into the original.
        run_dir = resume.parent
        out = Path(flags.out) if "out" in typed else run_dir
        if out.resolve() != run_dir.resolve() and out.is_dir() and find_checkpoints(out):
            raise TrainError(f"--out {out}: already holds checkpoints of another run; leave --out out to continue "
                             f"in {run_dir}, or choose an empty folder")
        # Each run's checkpoints carry its run_id (a copied run keeps it). A checkpoint of another run in
        # the folder would be replaced or pruned by --keep-checkpoints: refuse (none recorded: older runs).
        run_id = run.get("run_id")
        foreign = [c.name for c in find_checkpoints(out)
                   if run_id and read_trainer_state(c).get("run", {}).get("run_id") not in (None, run_id)]
        if foreign:
            raise TrainError(f"--resume {flags.resume}: {out} also holds {', '.join(foreign)} of another run, which "
                             f"this run could replace or delete; pass --out with an empty folder")
        config = dataclasses.replace(config, out_dir=str(out))
        inputs = [("--data", p) for p in data_paths or []] + [("--eval-data", p) for p in eval_paths or []]
        if out.resolve() != run_dir.resolve():
            inputs.append(("--resume", resume))
        if Path(copy_from).resolve() != resume.resolve():
            inputs.append(("model (the run's --model)", copy_from))
        check_output_folder(out, inputs, overwrite=True)
    else:
        if not flags.model:
            raise TrainError("--model is required (or --resume)")
        values = {f.name: getattr(flags, f.name) for f in dataclasses.fields(TrainConfig) if f.metadata["help"]}
        config = TrainConfig(**{**values, "trainable": parse_trainable(flags.trainable), "out_dir": flags.out})
        model_dir, task, data_paths, eval_paths = Path(flags.model), flags.task, flags.data, flags.eval_data
        eval_fraction, cache_dir, copy_from = flags.eval_fraction, flags.cache_dir, Path(flags.model)
        if Path(flags.out).is_dir() and find_checkpoints(flags.out):
            raise TrainError(f"--out {flags.out}: already holds checkpoints; pass --resume {flags.out} or choose "
                             f"another --out")
        check_output_folder(flags.out, [("--model", flags.model), *[("--data", p) for p in data_paths or []],
                                        *[("--eval-data", p) for p in eval_paths or []]], overwrite=True)
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
    validate_config(config)

    distributed = init_distributed(config.device, flags.dist_timeout)
    rank, world = rank_and_world()
    if rank:
        log = lambda *a: None  # noqa: E731  (only rank 0 prints)
    # Under torchrun the weights load on the CPU and fully_shard moves each rank's shard to the device.
    device = "cpu" if distributed else resolve_device(config.device)
    model = Transformer.from_pretrained(model_dir, dtype=torch.float32, device=device)
    # A run started with --byte-tokenizer resumes with it (run.json's tokenizer is "byte-v1").
    tokenizer = load_tokenizer(model_dir, flags.byte_tokenizer or run.get("tokenizer") == ByteTokenizer.name)
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
        TokenBlocks(data, config.block_size, ", ".join(map(str, data_paths)))  # at least one block, or a clear error
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
           "model": str(model_dir), "tokenizer": tokenizer.name, "world_size": world,
           "run_id": run.get("run_id") or uuid.uuid4().hex}  # rank 0's is the one saved
    result = train(model, data, config, eval_data, metrics_path=Path(config.out_dir) / "metrics.jsonl", log=log,
                   resume_from=resume, run=run)
    if not rank:
        print(json.dumps({"step": result.step, "final_loss": result.final_loss, "eval_loss": result.eval_loss,
                          "eval_perplexity": result.eval_perplexity, "tokens_per_s": result.tokens_per_s,
                          "checkpoint": result.checkpoint, "stopped": result.stopped}))
    return result


def _one_line_errors(prog: str, command: Callable[[], int]) -> int:
    # Every error a user can cause ends in one line on stderr (what and where) and a non-zero exit:
    # a bad request, the file system (full disk, read-only folder), a signal before the training loop.
    try:
        return command()
    except (TrainError, CheckpointError) as e:
        message, code = str(e), 2
    except OSError as e:
        message, code = f"{e.filename}: {e.strerror or e}" if e.filename else str(e.strerror or e), 2
    except Interrupted as e:
        message, code = f"{e}; nothing written", 128 + e.signum
    except KeyboardInterrupt:
        message, code = "stopped by SIGINT; nothing written", 130
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def train_command(argv: list[str]) -> int:
    parser = build_train_parser()
    flags = parser.parse_args(argv)
    # Which flags were typed: the same parser with every default suppressed.
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    typed = set(vars(parser.parse_args(argv)))
    try:
        result = run_training(flags, typed)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # no rank exits (torchrun would stop the others) before all are done
    except (torch.distributed.DistError, RuntimeError) as e:
        # Another rank died or hung past --dist-timeout (gloo reports it as a RuntimeError): one line, exit 1.
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        lost = isinstance(e, torch.distributed.DistError) or any(
            s in message for s in ("gloo", "NCCL", "Timed out", "Connection closed", "timeout"))
        if not (torch.distributed.is_initialized() and lost):
            raise
        print(f"error: rank {rank_and_world()[0]}: lost the other processes ({message})", file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 128 + signal.Signals[result.stopped].value if result.stopped in ("SIGINT", "SIGTERM") else 0


def main(argv: list[str] | None = None) -> int:
    from_shell = argv is None
    argv = sys.argv[1:] if from_shell else [str(a) for a in argv]
    if argv[:1] == ["eval"]:
        return eval_main(argv[1:])
    if argv[:1] == ["train"]:
        argv = argv[1:]
    code = _one_line_errors("opt-deus-train", lambda: train_command(argv))
    if from_shell and "WORLD_SIZE" in os.environ:
        # The command line under torchrun: leave without interpreter teardown, where gloo's threads now
        # and then abort a rank that has finished ("terminate called without an active exception",
        # SIGABRT) and torchrun then reports the whole run failed. The process group is destroyed already.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


EVAL_BLOCK_SIZE = 2048  # opt-deus-eval's window when the model allows it


def evaluate_text(model_dir, text_path, block_size: int | None = None, batch_size: int = 4, device: str = "auto",
                  dtype: torch.dtype = torch.float32, byte_tokenizer: bool = False,
                  log: Callable | None = None) -> dict:
    """Perplexity per token and per word (whitespace-separated) of a checkpoint on a text file."""
    for flag, value in (("--block-size", block_size), ("--batch-size", batch_size)):
        if value is None and flag == "--block-size":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TrainError(f"{flag} {value!r}: expected an integer >= 1")
    text_path = Path(text_path)
    if not text_path.is_file():
        raise TrainError(f"{text_path}: no such file")
    text = "\n".join(iter_documents([text_path]))
    if not text.strip():
        raise TrainError(f"{text_path}: empty")
    model = Transformer.from_pretrained(model_dir, dtype=dtype, device=resolve_device(device))
    tokenizer = load_tokenizer(model_dir, byte_tokenizer=byte_tokenizer)
    max_positions = model.args.max_position_embeddings
    block_size = block_size or min(EVAL_BLOCK_SIZE, max_positions)
    if block_size > max_positions:
        raise TrainError(f"--block-size {block_size} is beyond the model's max_position_embeddings {max_positions}")
    # The first token is predicted from a start token (bos, else the eos that separates documents
    # in training), so every token of the text is scored.
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    tokens = np.asarray([start] + tokenizer.encode(text), dtype=np.int64)
    if int(tokens.max()) >= model.args.vocab_size:
        raise TrainError(f"{text_path}: token id {int(tokens.max())} does not fit the model's vocab_size "
                         f"{model.args.vocab_size} (a tokenizer that does not belong to {model_dir}?)")
    r = evaluate(model, tokens, min(block_size, len(tokens) - 1), batch_size, log=log)
    words = len(text.split())
    return {"model": str(model_dir), "text": str(text_path), "tokens": r["tokens"], "words": words,
            "loss_per_token": r["loss"], "perplexity_per_token": r["perplexity"],
            "perplexity_per_word": math.exp(min(r["nll_sum"] / max(words, 1), 700.0))}


def eval_command(flags: argparse.Namespace) -> int:
    if flags.json:  # found out now, not after the evaluation; never over an input
        json_path = Path(flags.json)
        if json_path.is_dir():
            raise TrainError(f"--json {flags.json}: is a folder")
        if not json_path.absolute().parent.is_dir():
            raise TrainError(f"--json {flags.json}: no such folder {json_path.absolute().parent}")
        for flag, source in (("--text", flags.text), ("--model", flags.model)):
            source_path = Path(source).resolve()
            if json_path.resolve() == source_path or source_path in json_path.resolve().parents:
                raise TrainError(f"--json {flags.json}: would overwrite the input {flag} {source}")
    report = evaluate_text(flags.model, flags.text, flags.block_size, flags.batch_size, flags.device,
                           getattr(torch, flags.dtype), flags.byte_tokenizer,
                           log=lambda *a: print(*a, file=sys.stderr, flush=True))
    if flags.json:
        write_text_atomic(flags.json, json.dumps(report, indent=2) + "\n")
    print(f"{report['text']}: {report['tokens']:,} tokens, {report['words']:,} words")
    print(f"loss per token: {report['loss_per_token']:.4f}")
    print(f"perplexity per token: {report['perplexity_per_token']:.3f}")
    print(f"perplexity per word: {report['perplexity_per_word']:.3f}")
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    p = OneLineArgumentParser(prog="opt-deus-eval", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                              description="Perplexity per token and per word (whitespace-separated) of a "
                                          "checkpoint on a text file; every token is predicted once.",
                              epilog="Progress goes to stderr (a line at most every 10 s), the report to stdout. "
                                     "Exit code 2: a bad request (one line on stderr, nothing written); "
                                     "130/143: stopped by SIGINT/SIGTERM.")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
    p.add_argument("--text", required=True, help="UTF-8 text file (.gz ok)")
    p.add_argument("--block-size", type=positive_int, default=None,
                   help=f"tokens per window (non-overlapping); None: the model's max_position_embeddings, at most "
                        f"{EVAL_BLOCK_SIZE}")
    p.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward pass")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights' dtype")
    p.add_argument("--byte-tokenizer", action="store_true", help=BYTE_TOKENIZER_HELP)
    p.add_argument("--json", help="also write the report here as JSON")
    flags = p.parse_args(sys.argv[1:] if argv is None else [str(a) for a in argv])
    return _one_line_errors("opt-deus-eval", lambda: eval_command(flags))


if __name__ == "__main__":
    sys.exit(main())
