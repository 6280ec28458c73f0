"""Continued training of a (grown) LLaMA: only the new layers by default, in one file.

OpT-DeUS grows a pretrained model by inserting layers; this script then trains those layers on
plain text (continued pre-training, CPT) or on Alpaca-style instructions (SFT), with everything
else frozen. Read top to bottom: tokenizers, data, the loss, trainable selection, schedules, the
training loop, checkpoints, evaluation, command lines.

    python train.py --model grown/ --data corpus/ --steps 1000            # train the new layers
    python train.py --resume runs/train/checkpoint-000500                  # continue exactly
    python train.py eval --model runs/train/checkpoint-001000 --text test.txt

Exit codes: 0 done; 2 a user error (bad path, empty data, bad resume state, non-finite loss: one
line on stderr, nothing half-written); 130/143 stopped by SIGINT/SIGTERM after saving a checkpoint;
1 under torchrun when another rank died or a collective waited past --dist-timeout.

    torchrun --nproc_per_node 8 train.py --model grown/ --data corpus/   # one model, FSDP2 over 8 GPUs
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gzip
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

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
        return [self.encode(t) for t in texts]


class HFTokenizer:
    def __init__(self, path: Path, eos_id: int, bos_id: int | None):
        from tokenizers import Tokenizer
        self.tokenizer = Tokenizer.from_file(str(path))
        self.eos_id, self.bos_id = eos_id, bos_id
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        # The cache key must change when the tokenizer does, so hash the file, not its path.
        self.name = "hf-" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]


def _special_id(model_dir: Path, key: str, tokenizer) -> int | None:
    # config.json's <key>_token_id (an int, or a list whose first entry is the main one), else
    # tokenizer_config.json's <key>_token string looked up in the vocabulary.
    for name in ("config.json", "generation_config.json"):
        path = model_dir / name
        if path.is_file():
            try:
                value = json.loads(path.read_text()).get(f"{key}_token_id")
            except (ValueError, AttributeError):
                raise TrainError(f"{path}: not a JSON object") from None
            if isinstance(value, list) and value:
                value = value[0]
            if isinstance(value, int):
                return value
    path = model_dir / "tokenizer_config.json"
    if path.is_file():
        try:
            token = json.loads(path.read_text()).get(f"{key}_token")
        except (ValueError, AttributeError):
            raise TrainError(f"{path}: not a JSON object") from None
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str):
            return tokenizer.token_to_id(token)
    return None


# A model made for the byte tokenizer has a vocabulary of 257 (maybe padded); a real subword
# vocabulary is tens of thousands. Without tokenizer.json, bytes are used only below this size.
BYTE_VOCAB_LIMIT = 512


def _config_vocab_size(model_dir: Path) -> int | None:
    try:
        value = json.loads((model_dir / "config.json").read_text()).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def load_tokenizer(model_dir, byte_tokenizer: bool = False) -> ByteTokenizer | HFTokenizer:
    # tokenizer.json when the folder has one; UTF-8 bytes for a model made for them (vocab_size <=
    # BYTE_VOCAB_LIMIT) or when asked for (byte_tokenizer, --byte-tokenizer). Anything else is an
    # error: a 49k-vocabulary model fed bytes trains "fine" and evaluates to nonsense.
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    vocab_size = _config_vocab_size(model_dir)
    made_for_bytes = byte_tokenizer or (vocab_size is not None and vocab_size <= BYTE_VOCAB_LIMIT)
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
        probe = Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises plain Exceptions on bad files
        raise TrainError(f"{path}: cannot read tokenizer ({e})") from None
    eos_id = _special_id(model_dir, "eos", probe)
    if eos_id is None:
        raise TrainError(f"{model_dir}: no eos_token_id in config.json nor eos_token in tokenizer_config.json")
    return HFTokenizer(path, eos_id, _special_id(model_dir, "bos", probe))


def check_vocab(tokenizer, vocab_size: int, where: str):
    if tokenizer.vocab_size > vocab_size and isinstance(tokenizer, ByteTokenizer):
        raise TrainError(f"{where}: the byte tokenizer needs vocab_size >= {tokenizer.vocab_size}, "
                         f"the model has {vocab_size} (ship a tokenizer.json with the checkpoint)")


# ----------------------------------------------------------------------------------------------
# Data: files -> documents -> one long uint32 token stream (cached) -> fixed blocks


def list_data_files(paths: Iterable) -> list[Path]:
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


def _batched(items: Iterable, n: int) -> Iterator[list]:
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
    if not final.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_scratch(cache_dir, final.name)  # left by a tokenisation that was killed
        tmp = cache_dir / f".{final.name}.tmp-{SCRATCH_HOST}-{os.getpid()}"
        n_tokens, t0 = 0, time.time()
        try:
            with open(tmp, "wb") as f:
                for docs in _batched(iter_documents(files), 64):
                    for ids in tokenizer.encode_batch(docs):
                        ids.append(tokenizer.eos_id)
                        np.asarray(ids, dtype=np.uint32).tofile(f)
                        n_tokens += len(ids)
            if n_tokens == 0:
                raise TrainError(f"{', '.join(map(str, paths))}: no text (the data files are empty)")
            meta = {"files": stats, "tokenizer": tokenizer.name, "n_tokens": n_tokens}
            (cache_dir / f"tokens-{key}.json").write_text(json.dumps(meta, indent=2) + "\n")
            os.replace(tmp, final)  # the .u32 file appears only once complete
        finally:
            tmp.unlink(missing_ok=True)
        log(f"tokenised {len(files)} file(s): {n_tokens:,} tokens in {time.time() - t0:.1f}s -> {final}")
    return np.memmap(final, dtype=np.uint32, mode="r")


class TokenBlocks:
    # Sample i is the block tokens[i*T : i*T + T + 1]: inputs its first T tokens, targets its last T.
    # Blocks overlap by the one token that is both the last target and the next block's first input.
    def __init__(self, tokens, block_size: int, what: str = "data"):
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.cpu().numpy()
        self.tokens, self.block_size = tokens, block_size
        if tokens.ndim != 1:
            raise TrainError(f"{what}: tokens must be a 1-D array, got shape {list(tokens.shape)}")
        if len(tokens) < block_size + 1:
            raise TrainError(f"{what}: {len(tokens)} tokens is shorter than one block of {block_size + 1} "
                             f"(block size + 1); add data or lower --block-size")
        self.n = (len(tokens) - 1) // block_size

    def __len__(self):
        return self.n

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
    prompt = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(format_prompt(example))
    response = tokenizer.encode(example["output"]) + [tokenizer.eos_id]
    ids = np.asarray(prompt + response, dtype=np.int64)[: block_size + 1]
    labels = ids.copy()
    labels[: len(prompt)] = IGNORE_INDEX
    return ids, labels


def load_alpaca(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: no such file")
    try:
        with _open_text(path) as f:
            if _is_jsonl(path):
                records = [json.loads(line) for line in f if line.strip()]
            else:
                records = json.load(f)
    except json.JSONDecodeError as e:
        raise TrainError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError:
        raise TrainError(f"{path}: not UTF-8 text") from None
    if not isinstance(records, list):
        raise TrainError(f"{path}: expected a JSON list of {{instruction, input, output}} records")
    for i, r in enumerate(records):
        if not (isinstance(r, dict) and isinstance(r.get("instruction"), str) and isinstance(r.get("output"), str)
                and isinstance(r.get("input", ""), str)):
            raise TrainError(f"{path}: record {i} needs string fields 'instruction' and 'output' (and optional 'input')")
    if not records:
        raise TrainError(f"{path}: no records")
    return records


class SFTDataset:
    # Examples kept unpadded; a batch is padded to its longest example, rounded up to a multiple of
    # 64 (bounded set of shapes for torch.compile), with eos as pad and -100 as pad label.
    def __init__(self, examples: list[dict], tokenizer, block_size: int, what: str = "SFT data"):
        self.block_size, self.pad_id = block_size, tokenizer.eos_id
        self.ids, self.labels = [], []
        for example in examples:
            ids, labels = sft_example(example, tokenizer, block_size)
            if (labels[1:] != IGNORE_INDEX).any():  # prompts longer than a block teach nothing
                self.ids.append(ids)
                self.labels.append(labels)
        self.dropped = len(examples) - len(self.ids)
        if not self.ids:
            raise TrainError(f"{what}: no example has a response within the block size {block_size}")

    def __len__(self):
        return len(self.ids)

    def split(self, n: int) -> tuple["SFTDataset", "SFTDataset"]:
        # -> (the first n examples, the rest)
        head, tail = object.__new__(SFTDataset), object.__new__(SFTDataset)
        for part, sl in ((head, slice(None, n)), (tail, slice(n, None))):
            part.block_size, part.pad_id, part.dropped = self.block_size, self.pad_id, 0
            part.ids, part.labels = self.ids[sl], self.labels[sl]
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
        self.n, self.seed, self._perms = n_samples, seed, {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        return [int(self.permutation(p // self.n)[p % self.n]) for p in range(start, start + count)]


# ----------------------------------------------------------------------------------------------
# The loss: chunked, fused linear + cross-entropy


LOSS_CHUNK_ELEMENTS = 2**27  # logits per chunk: 128M float32 = 512 MB, e.g. 1046 rows of a 128k vocab


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
    # x, y (B, T) -> summed token loss. The embeddings and the first `frozen_prefix` blocks run
    # under no_grad: nothing below the lowest trainable block needs a gradient, so they store no
    # activations and backward stops there. None: the embeddings train, everything runs with grad.
    with torch.no_grad() if frozen_prefix is not None else nullcontext():
        h = model.embed_tokens(x)  # (B, T, D)
        cos, sin = rope_cos_sin(model.args, torch.arange(x.shape[1], device=x.device), h.dtype)
        for block in model.layers[: frozen_prefix or 0]:
            h = block(h, cos, sin)
    for block in model.layers[frozen_prefix or 0:]:
        h = block(h, cos, sin)
    h = model.norm(h)
    weight = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    return linear_cross_entropy(h.flatten(0, 1), weight, y.flatten())


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
        for p in model.parameters():
            p.requires_grad_(True)
        return list(range(n_layers))
    if spec == "new":
        record = model.args.extra.get("opt_deus") or {}
        spec = record.get("new_layers")
        if not spec:
            raise TrainError("--trainable new: the checkpoint records no new layers (config.json has no "
                             "opt_deus.new_layers); pass --trainable all or a comma list of layer indices")
    layers = sorted(set(spec))
    bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < n_layers]
    if bad:
        raise TrainError(f"trainable layer {bad[0]} is out of range: the model has {n_layers} layers")
    for p in model.parameters():
        p.requires_grad_(False)
    for i in layers:
        for p in model.layers[i].parameters():
            p.requires_grad_(True)
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
# Configuration and schedules


@dataclass
class TrainConfig:
    steps: int = 1000                 # optimizer steps the schedule spans
    lr: float = 2e-4                  # peak learning rate
    min_lr_ratio: float = 0.1         # final lr = lr * min_lr_ratio
    warmup_steps: int = 100           # linear warmup from lr/warmup_steps to lr
    schedule: str = "wsd"             # "wsd" (warmup-stable-decay, linear decay) or "cosine"
    decay_fraction: float = 0.2       # wsd: the last fraction of steps decays linearly to min lr
    batch_tokens: int = 65536         # tokens per optimizer step (all ranks)
    micro_batch_size: int = 4         # sequences per forward/backward
    block_size: int = 2048            # tokens per sequence
    grad_clip: float = 1.0            # max global grad norm; 0 = no clipping
    weight_decay: float = 0.1         # on matrices only, never on norm gains
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    trainable: str | list[int] | None = "new"  # "new", "all", layer list; None: keep requires_grad as is
    eval_every: int = 200             # steps between held-out evaluations (0: only at the end)
    eval_batches: int = 20            # micro-batches per evaluation
    log_every: int = 10               # steps between progress lines
    seed: int = 0                     # data order is a function of (seed, step)
    compile: bool = False             # torch.compile the loss computation (the saved module is uncompiled)
    device: str = "auto"              # "auto": cuda if available (LOCAL_RANK under torchrun), else cpu
    checkpoint_every: int = 500       # steps between checkpoints (0: only at the end); needs out_dir
    keep_checkpoints: int = 2         # keep the newest N checkpoints (0: all)
    out_dir: str | None = None        # where checkpoints go; None: no checkpoints
    stop_after: int | None = None     # end this run after this many steps, as if interrupted
    timing_skip_steps: int = 2        # first steps left out of the mean step time (warm-up, compile)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate_config(c: TrainConfig):
    # The one check of every training hyperparameter, for the command line and the Python API alike.
    # Messages name the flag (a TrainConfig field is its flag without dashes) and its default.
    defaults = TrainConfig()

    def number(name, kind=float):
        value = getattr(c, name)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (kind is int and not isinstance(value, int)):
            raise TrainError(f"{_flag(name)} {value!r}: expected {'an integer' if kind is int else 'a finite number'}")
        return value

    def require(ok: bool, name: str, rule: str):
        if not ok:
            raise TrainError(f"{_flag(name)} {getattr(c, name)} {rule} "
                             f"(default {_flag(name)} {getattr(defaults, name)})")

    for name in ("steps", "warmup_steps", "batch_tokens", "micro_batch_size", "block_size", "eval_every",
                 "eval_batches", "log_every", "seed", "checkpoint_every", "keep_checkpoints", "timing_skip_steps"):
        number(name, int)
    for name in ("lr", "min_lr_ratio", "decay_fraction", "grad_clip", "weight_decay", "beta1", "beta2", "eps"):
        number(name)
    require(c.steps >= 1, "steps", "must be >= 1")
    require(c.lr > 0, "lr", "must be > 0")
    require(0 <= c.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
    require(0 <= c.warmup_steps < c.steps, "warmup_steps", f"must be >= 0 and below --steps {c.steps}")
    if c.schedule not in ("wsd", "cosine"):
        raise TrainError(f"--schedule {c.schedule!r}: expected 'wsd' or 'cosine'")
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
    if c.stop_after is not None and (isinstance(c.stop_after, bool) or not isinstance(c.stop_after, int)
                                     or c.stop_after < 1):
        raise TrainError(f"--stop-after {c.stop_after!r}: must be an integer >= 1")


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


def batch_geometry(config: TrainConfig, world_size: int = 1) -> tuple[int, int]:
    # -> (sequences per step on this rank, micro-batches per step = gradient accumulation)
    per_micro = config.block_size * config.micro_batch_size * world_size
    if config.batch_tokens % per_micro:
        raise TrainError(f"--batch-tokens {config.batch_tokens} is not a multiple of --block-size x --micro-batch-size"
                         f"{' x world size' if world_size > 1 else ''} = {per_micro}")
    accum = config.batch_tokens // per_micro
    return accum * config.micro_batch_size, accum


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


def rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# ----------------------------------------------------------------------------------------------
# Distributed (torchrun + FSDP2): one model sharded over all processes; the training loop is the same


def init_distributed(device_name: str, timeout_s: float) -> bool:
    # torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT; a plain `python train.py` sets none
    # and keeps the single-process path with no process group. The timeout bounds every collective,
    # so a rank that died or hangs makes the others fail with an error instead of waiting forever.
    if "WORLD_SIZE" not in os.environ or torch.distributed.is_initialized():
        return torch.distributed.is_initialized()
    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                         timeout=datetime.timedelta(seconds=timeout_s),
                                         device_id=device if device.type == "cuda" else None)
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
    # replicated (they are most of the model: 8B of 11.5B); FSDP2 gives parameters with
    # requires_grad=False no gradient and no reduce-scatter, and the frozen prefix still runs under
    # no_grad in forward_loss, so it keeps no activations and backward never reaches it.
    # CUDA: blocks are gathered in bf16 (what autocast would cast them to anyway) and their gradients
    # reduced in float32; their inputs are not cast, and the root (embeddings, final norm, head) is
    # gathered in float32, so the residual stream stays float32 under autocast exactly as in the plain
    # path. The sharded master weights and AdamW state are float32. CPU (gloo): all float32.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    cuda = device.type == "cuda"
    block_policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32, cast_forward_inputs=False) if cuda else None
    root = ShardedLoss(model, loss_fn)
    for module in (*model.layers, root):
        policy = block_policy if cuda and module is not root else MixedPrecisionPolicy(reduce_dtype=torch.float32)
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
    # A full optimizer state (what one process saves; state i belongs to the i-th trainable
    # parameter) -> this rank's shards, laid out like each parameter. Every rank reads the file
    # (memory-mapped) and keeps its own rows: no communication.
    from torch.distributed.tensor import distribute_tensor
    state = {i: {k: v if k == "step" else distribute_tensor(v.to(params[i].device), params[i].device_mesh,
                                                              params[i].placements, src_data_rank=None)
                 for k, v in s.items()} for i, s in saved["state"].items()}
    return {**saved, "state": state}


def agreed_signal(stop_signal: list[int], device: torch.device) -> int:
    # The signal every rank acts on (0: none). Ranks receive a signal at slightly different moments,
    # so they agree (max) before any of them leaves the loop; one process just reads its own flag.
    signum = stop_signal[0] if stop_signal else 0
    if torch.distributed.is_initialized():
        flag = torch.tensor([signum], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        signum = int(flag.item())
    return signum


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
# Evaluation


@torch.no_grad()
def evaluate(model: Transformer, tokens, block_size: int, batch_size: int, max_batches: int | None = None,
             sharded: ShardedLoss | None = None, log: Callable | None = None) -> dict:
    """Mean loss and perplexity on contiguous non-overlapping blocks (each token predicted once) of a
    1-D token array (or an SFTDataset). With max_batches=None the whole array is read, the last
    partial block too. sharded: the FSDP root of `model` under torchrun; ranks then split the batches."""
    device = next(model.parameters()).device
    data = as_dataset(tokens, block_size, "evaluation data")
    n = len(data) if max_batches is None else min(len(data), max_batches * batch_size)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    batches = [data.get(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    if max_batches is None and isinstance(data, TokenBlocks):
        tail = np.asarray(data.tokens[n * block_size:], dtype=np.int64)
        if len(tail) >= 2:
            tail = torch.from_numpy(tail)[None]
            batches.append((tail[:, :-1], tail[:, 1:]))
    if sharded is not None:
        # Rank r takes batches r, r+N, ...; every rank runs the same number of forwards (FSDP gathers
        # are collectives), padding with a batch whose targets are all ignored: it adds nothing.
        rank, world = rank_and_world()
        x0, y0 = batches[0]
        batches = batches[rank::world] + [(x0, torch.full_like(y0, IGNORE_INDEX))] * (
            -(-len(batches) // world) - len(batches[rank::world]))
    t_start, last_log = time.time(), time.time()
    with autocast_for(device):
        for done, (x, y) in enumerate(batches, 1):
            x, y = x.to(device), y.to(device)
            total += (sharded(x, y, None) if sharded is not None else forward_loss(model, x, y, None)).double()
            count += int((y != IGNORE_INDEX).sum())
            # log: progress of a long evaluation (opt-deus-eval), at most one line every 10 s.
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
# Checkpoints


def rng_state() -> dict:
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    # Plain tensors and numbers only, so torch.load(weights_only=True) can read it back.
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": py_gauss},
    }


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))


def save_checkpoint(path, model: Transformer, optimizer, trainer_state: dict, copy_files_from=None) -> Path:
    """A Hugging Face folder (loadable by Transformer.from_pretrained) plus trainer_state.json,
    optimizer.pt and rng_state.pt; built in a hidden temp folder and renamed into place.
    Under torchrun every rank joins the gathers and rank 0 alone writes: the same folder one process writes."""
    path = Path(path).absolute()
    distributed = torch.distributed.is_initialized()
    if distributed:
        # Gathered full state dicts rather than torch.distributed.checkpoint's per-rank shards: the
        # folder stays one HF model plus one optimizer.pt that a single process, or any number of
        # processes (shard_optimizer_state), resumes from. The cost: rank 0 holds the whole float32
        # model and AdamW state in CPU memory while it writes.
        keep = torch.distributed.get_rank() == 0
        weights, optimizer_state = gather_full(model.state_dict(), keep), gather_full(optimizer.state_dict(), keep)
        if not keep:
            torch.distributed.barrier()  # no rank goes on (or exits) before the folder is in place
            return path
        with torch.device("meta"):
            model = Transformer(model.current_args())
        model.load_state_dict(weights, assign=True)
    # model.AtomicFolder: written into a hidden temporary folder, renamed into place when complete.
    with AtomicFolder(path, overwrite=True) as folder:
        model.save_pretrained(folder.tmp, copy_files_from=copy_files_from, atomic=False)
        torch.save(optimizer_state if distributed else optimizer.state_dict(), folder.tmp / "optimizer.pt")
        torch.save(rng_state(), folder.tmp / "rng_state.pt")
        (folder.tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        folder.commit()
    if distributed:
        torch.distributed.barrier()
    return path


def find_checkpoints(out_dir) -> list[Path]:
    return sorted(p for p in Path(out_dir).glob("checkpoint-*") if (p / "trainer_state.json").is_file())


def checkpoint_run_id(path) -> str | None:
    return read_trainer_state(path).get("run", {}).get("run_id")


def resolve_checkpoint(path) -> Path:
    # A checkpoint folder, or a run folder (its newest checkpoint).
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    found = find_checkpoints(path) if path.is_dir() else []
    if not found:
        raise TrainError(f"{path}: not a checkpoint (no trainer_state.json) nor a run folder with checkpoints")
    return found[-1]


def read_trainer_state(path) -> dict:
    file = Path(path) / "trainer_state.json"
    try:
        state = json.loads(file.read_text())
        assert isinstance(state, dict) and isinstance(state["step"], int)
        return state
    except (OSError, json.JSONDecodeError, AssertionError, KeyError) as e:
        raise TrainError(f"{file}: unreadable trainer state ({e!r})") from None


def load_resume_state(path, named_params, optimizer, n_samples: int, device) -> dict:
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
    try:
        sharded = torch.distributed.is_initialized()
        saved = torch.load(path / "optimizer.pt", map_location="cpu" if sharded else device, weights_only=True,
                           mmap=sharded)  # mapped: the ranks of a node share one copy in the page cache
        optimizer.load_state_dict(shard_optimizer_state(saved, [p for _, p in named_params]) if sharded else saved)
        set_rng_state(torch.load(path / "rng_state.pt", weights_only=True))
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise TrainError(f"{path}: cannot restore optimizer/RNG state ({str(e).splitlines()[0]})") from None
    for (name, p) in named_params:
        for key, t in optimizer.state.get(p, {}).items():
            if key != "step" and t.shape != p.shape:
                raise TrainError(f"{path}: optimizer state {key} of {name} has shape {list(t.shape)}, parameter {list(p.shape)}")
    return {**state, "path": str(path)}


# ----------------------------------------------------------------------------------------------
# The training loop


@dataclass
class TrainResult:
    final_loss: float
    losses: list[float]                  # per optimizer step of this run
    eval_loss: float | None = None       # last evaluation
    eval_perplexity: float | None = None
    evals: list[dict] = field(default_factory=list)
    mean_step_s: float = float("nan")    # excluding the first timing_skip_steps
    tokens_per_s: float = float("nan")
    trainable_params: int = 0
    trainable_layers: list[int] = field(default_factory=list)
    step: int = 0                        # optimizer steps done, counting resumed ones
    stopped: str | None = None           # None (finished), "SIGINT", "SIGTERM" or "stop_after"
    checkpoint: str | None = None        # the last checkpoint written


def _say_now(message: str):
    # From a signal handler: straight to file descriptor 2, since a print() to a stream the main
    # program is in the middle of writing would raise "reentrant call".
    try:
        os.write(2, (message + "\n").encode())
    except OSError:
        pass


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _trim_metrics(path: Path, last_step: int):
    # On resume, drop rows a previous run wrote after the checkpoint we resume from.
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= last_step]
    write_text_atomic(path, "".join(r + "\n" for r in rows))


def train(model: Transformer, train_tokens, config: TrainConfig, eval_tokens=None, metrics_path=None,
          log: Callable = print, resume_from=None, copy_files_from=None, extra_state: dict | None = None,
          on_start: Callable | None = None) -> TrainResult:
    """Train `model` in place. train_tokens/eval_tokens: 1-D integer arrays (numpy, memmap, torch)
    or SFTDatasets. resume_from: a checkpoint folder whose weights the model already holds.
    extra_state: more JSON for every checkpoint's trainer_state.json. on_start: called (main rank)
    once every check has passed, before anything is written; a failed start writes nothing."""
    validate_config(config)
    if config.block_size > model.args.max_position_embeddings:
        raise TrainError(f"--block-size {config.block_size} is beyond the model's max_position_embeddings "
                         f"{model.args.max_position_embeddings}")
    rank, world = rank_and_world()
    is_main = rank == 0
    if not is_main:
        log = lambda *a, **k: None  # noqa: E731
    device = resolve_device(config.device)
    distributed = torch.distributed.is_initialized()  # under torchrun: FSDP2 shards the model below
    if not distributed:
        model.to(device)
    train_data = as_dataset(train_tokens, config.block_size, "training data")
    eval_data = as_dataset(eval_tokens, config.block_size, "evaluation data") if eval_tokens is not None else None
    layers = set_trainable(model, config.trainable) if config.trainable is not None else sorted(
        {i for i, b in enumerate(model.layers) if any(p.requires_grad for p in b.parameters())})
    if not any(p.requires_grad for p in model.parameters()):
        raise TrainError("no trainable parameters")
    frozen_prefix = frozen_prefix_of(model)
    loss_fn = torch.compile(forward_loss) if config.compile else forward_loss
    # After requires_grad is set (FSDP2 copies it into each shard); the shards replace the parameters.
    sharded = shard_model(model, device, loss_fn) if distributed else None
    named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    samples_per_step, accum = batch_geometry(config, world)
    optimizer = make_optimizer(named_params, config, device)
    n_trainable = sum(p.numel() for _, p in named_params)

    start_step, last_checkpoint = 0, None
    if resume_from is not None:
        resumed = load_resume_state(resume_from, named_params, optimizer, len(train_data), device)
        start_step, last_checkpoint = resumed["step"], resumed["path"]
        if start_step >= config.steps:
            raise TrainError(f"{resumed['path']}: already at step {start_step} of --steps {config.steps}; "
                             f"pass a larger --steps to continue")
        log(f"resumed from {resumed['path']} at step {start_step}")
    stop_step = min(config.steps, config.stop_after) if config.stop_after else config.steps
    if stop_step <= start_step:
        raise TrainError(f"--stop-after {config.stop_after} is not beyond the resumed step {start_step}")

    step_loss_fn = sharded if sharded is not None else lambda x, y, prefix: loss_fn(model, x, y, prefix)
    order = SampleOrder(len(train_data), config.seed)
    out_dir = Path(config.out_dir) if config.out_dir else None  # every rank joins a save; rank 0 writes
    if on_start is not None and is_main:
        on_start()
    if out_dir is not None and is_main:
        remove_stale_scratch(out_dir, None)  # checkpoints, metrics and run.json of a killed run into this folder
    metrics = None
    if metrics_path is not None and is_main:
        metrics_path = Path(metrics_path)
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        if start_step:
            _trim_metrics(metrics_path, start_step)
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
        state = {"format": 1, "step": step, "config": dataclasses.asdict(config), "trainable_layers": layers,
                 "trainable_params": [(n, list(p.shape)) for n, p in named_params],
                 "data": {"n_samples": len(train_data), "samples_per_step": samples_per_step * world,
                          "stream_position": step * samples_per_step * world, "seed": config.seed,
                          "epoch": step * samples_per_step * world // len(train_data)},
                 "schedule": {"name": config.schedule, "lr_last": lr_at(step - 1, config),
                              "lr_next": lr_at(min(step, config.steps - 1), config)},
                 "losses": losses[-1:], "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **(extra_state or {})}
        path = save_checkpoint(out_dir / f"checkpoint-{step:06d}", model, optimizer, state, copy_files_from)
        if config.keep_checkpoints and is_main:
            # The newest N by step of this run (another run's, if any, stay); never the one just written.
            run_id = (extra_state or {}).get("run", {}).get("run_id")
            ours = [c for c in find_checkpoints(out_dir) if checkpoint_run_id(c) in (None, run_id)]
            for old in ours[: -config.keep_checkpoints]:
                if old.resolve() != Path(path).resolve():
                    shutil.rmtree(old, ignore_errors=True)
        log(f"saved {path}")
        return str(path)

    # SIGINT/SIGTERM: said at once, then the run stops at the next micro-batch (the unfinished step is
    # dropped, nothing of it applied; under torchrun, at the end of the step, which all ranks agree on),
    # saves a checkpoint of the last whole step and ends. A second signal acts as usual.
    stop_signal: list[int] = []
    previous = {}

    def on_signal(signum, frame):
        stop_signal.append(signum)
        signal.signal(signum, previous[signum])
        if is_main:
            _say_now(f"{signal.Signals(signum).name} received: stopping at the next micro-batch and saving a "
                     f"checkpoint of the last finished step (send it again to stop at once)")

    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            previous[s] = signal.signal(s, on_signal)

    log(f"training {n_trainable:,} parameters (layers {layers}) on {device}"
        f"{f' x {world} processes (FSDP2)' if distributed else ''}; {len(train_data):,} samples, "
        f"{samples_per_step * world} x {config.block_size} tokens per step ({accum} micro-batches of {config.micro_batch_size})"
        f"{'; layers below ' + str(frozen_prefix) + ' run without autograd' if frozen_prefix else ''}")
    losses, evals, step_times = [], [], []
    stopped = None
    t_start = time.time()
    pin = device.type == "cuda"
    try:
        if eval_data is not None and config.eval_every > 0 and start_step == 0:
            evals.append(run_eval(0))
        for step in range(start_step, stop_step):
            t0 = time.perf_counter()
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            first = (step * world + rank) * samples_per_step
            indices = order.indices(first, samples_per_step)
            batches = [train_data.get(indices[i: i + config.micro_batch_size])
                       for i in range(0, samples_per_step, config.micro_batch_size)]
            # Normalise by the step's target count, so every token weighs the same whatever its micro-batch.
            n_targets = sum(int((y != IGNORE_INDEX).sum()) for _, y in batches)
            if distributed:  # the whole step's targets, over every rank's share
                counts = torch.tensor([n_targets], dtype=torch.float64, device=device)
                torch.distributed.all_reduce(counts)
                n_targets = int(counts.item())
            n_targets = max(1, n_targets)
            n_inputs = sum(x.numel() for x, _ in batches) * world
            step_loss = torch.zeros((), device=device)
            dropped = False
            for x, y in batches:
                if stop_signal and not distributed:  # a signal arrived: drop this unfinished step
                    dropped = True
                    break
                if pin:
                    x, y = x.pin_memory(), y.pin_memory()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with autocast_for(device):
                    loss = step_loss_fn(x, y, frozen_prefix) / n_targets
                loss.backward()
                step_loss += loss.detach()
            if dropped:
                optimizer.zero_grad(set_to_none=True)
                stopped = signal.Signals(stop_signal[0]).name
                saved_here = last_checkpoint is not None and Path(last_checkpoint).name == f"checkpoint-{step:06d}"
                if out_dir is not None and step > start_step and not saved_here:
                    log(f"{stopped}: step {step + 1} dropped unfinished; saving a checkpoint at step {step}")
                    last_checkpoint = checkpoint(step)
                else:
                    log(f"{stopped}: step {step + 1} dropped unfinished; stopping at step {step}")
                break
            params = [p for _, p in named_params]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else float("inf"))
            if distributed:  # FSDP2 summed the gradients; the norm is a DTensor over all shards
                torch.distributed.all_reduce(step_loss)
                grad_norm = grad_norm.full_tensor()
            loss_value, grad_value = torch.stack([step_loss.float(), grad_norm.float()]).tolist()  # one sync per step
            if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
                raise NonFiniteLossError(f"step {step + 1}: loss {loss_value}, grad norm {grad_value}: not finite; stopped "
                                         f"without applying it. Last good checkpoint: {last_checkpoint or 'none written'}")
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
            skip_eval = bool(stop_signal) and not distributed  # stopping: no evaluation first
            if eval_data is not None and not skip_eval and (
                    (config.eval_every > 0 and done % config.eval_every == 0) or done == stop_step):
                evals.append(run_eval(done))
            signum = agreed_signal(stop_signal, device)
            if signum:
                stopped = signal.Signals(signum).name
                log(f"{stopped} received: saving a checkpoint at step {done} and stopping")
            elif done == stop_step and stop_step < config.steps:
                stopped = "stop_after"
            if out_dir is not None and (stopped or done == stop_step or
                                        (config.checkpoint_every > 0 and done % config.checkpoint_every == 0)):
                last_checkpoint = checkpoint(done)
            if stopped:
                break
    finally:
        for s, handler in previous.items():
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


def build_train_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
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
    p.add_argument("--trainable", default="new", help="'new' (config.json opt_deus.new_layers), 'all', or e.g. '3,7,11'")
    p.add_argument("--byte-tokenizer", action="store_true",
                   help="use UTF-8 bytes when the model folder has no tokenizer.json (automatic for a "
                        f"vocabulary of at most {BYTE_VOCAB_LIMIT})")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps the schedule spans")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final lr = lr x this")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup steps (< --steps)")
    p.add_argument("--schedule", choices=["wsd", "cosine"], default=d.schedule, help="learning-rate schedule")
    p.add_argument("--decay-fraction", type=float, default=d.decay_fraction, help="wsd: share of steps spent decaying")
    p.add_argument("--batch-tokens", type=int, default=d.batch_tokens,
                   help="tokens per optimizer step (under torchrun: over all processes)")
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size, help="sequences per forward/backward")
    p.add_argument("--block-size", type=int, default=d.block_size,
                   help="tokens per sequence (at most the model's max_position_embeddings)")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max global gradient norm (0: no clipping)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (matrices only)")
    p.add_argument("--beta1", type=float, default=d.beta1, help="AdamW beta1, in [0, 1)")
    p.add_argument("--beta2", type=float, default=d.beta2, help="AdamW beta2, in [0, 1)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between evaluations (0: at the end)")
    p.add_argument("--eval-batches", type=int, default=d.eval_batches, help="micro-batches per evaluation")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between progress lines")
    p.add_argument("--seed", type=int, default=d.seed, help="data order seed (>= 0)")
    p.add_argument("--compile", action="store_true", help="torch.compile the loss computation")
    p.add_argument("--device", default=d.device, help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="steps between checkpoints (0: only at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints,
                   help="keep the newest N checkpoints (0: all); the last one written is never deleted")
    p.add_argument("--stop-after", type=int, default=d.stop_after,
                   help="end once this step is done, as if stopped (schedule unchanged)")
    p.add_argument("--resume", help="checkpoint folder (or run folder: its newest) to continue exactly, writing "
                                    "into the folder that holds it")
    p.add_argument("--dist-timeout", type=float, default=1800.0,
                   help="torchrun: seconds any collective may wait for the other ranks before the run fails")
    return p


# Flags that may change on resume without changing what is computed; the rest come from the checkpoint.
_RESUME_OVERRIDES = ("steps", "device", "compile", "log_every", "eval_every", "eval_batches", "checkpoint_every",
                     "keep_checkpoints", "stop_after")


def _explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    # Which options the user actually typed (so a resumed run does not take argparse defaults).
    probe = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = {"nargs": action.nargs} if action.nargs is not None else {}
            if isinstance(action, argparse._StoreTrueAction):
                kwargs = {"action": "store_true"}
            probe.add_argument(*action.option_strings, dest=action.dest, default=argparse.SUPPRESS, **kwargs)
    return set(vars(probe.parse_known_args(argv)[0]))


def _check_resume_flags(args: argparse.Namespace, explicit: set[str], saved: TrainConfig, run: dict):
    # A resumed run continues the saved training exactly; a flag typed with --resume that would change
    # it (--lr, --block-size, --seed ...) is refused by name rather than silently ignored.
    conflicts = []
    for name in explicit:
        if name in _RESUME_OVERRIDES or not hasattr(saved, name):
            continue
        value = parse_trainable(args.trainable) if name == "trainable" else getattr(args, name)
        if value != getattr(saved, name):
            conflicts.append(f"{_flag(name)} {value} (checkpoint: {getattr(saved, name)})")
    if "task" in explicit and args.task != run.get("task", "cpt"):
        conflicts.append(f"--task {args.task} (checkpoint: {run.get('task', 'cpt')})")
    if "eval_fraction" in explicit and args.eval_fraction != run.get("eval_fraction", args.eval_fraction):
        conflicts.append(f"--eval-fraction {args.eval_fraction} (checkpoint: {run.get('eval_fraction')})")
    if "model" in explicit:
        conflicts.append("--model (the checkpoint is the model)")
    if conflicts:
        raise TrainError(f"--resume {args.resume}: cannot change {'; '.join(sorted(conflicts))}. A resumed run "
                         f"continues the saved one; only {', '.join(_flag(k) for k in _RESUME_OVERRIDES)}, --out, "
                         f"--data, --eval-data and --cache-dir may be given")


def load_data(paths, task: str, tokenizer, block_size: int, cache_dir, log=print):
    if task == "sft":
        return SFTDataset([r for p in list_data_files(paths) for r in load_alpaca(p)], tokenizer, block_size,
                          what=", ".join(map(str, paths)))
    return tokenize_to_cache(paths, tokenizer, cache_dir, log)


def run_training(args: argparse.Namespace, explicit: set[str]) -> TrainResult:
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731  (stdout stays for results)
    if not (math.isfinite(args.dist_timeout) and args.dist_timeout > 0):
        raise TrainError(f"--dist-timeout {args.dist_timeout} must be a number of seconds > 0 (default --dist-timeout "
                         f"{build_train_parser().get_default('dist_timeout')})")
    resume = None
    if args.resume:
        resume = resolve_checkpoint(args.resume)
        saved = read_trainer_state(resume)
        try:
            config = TrainConfig(**saved["config"])
        except TypeError as e:
            raise TrainError(f"{resume}/trainer_state.json: config does not fit this train.py ({e})") from None
        run = saved.get("run", {})
        _check_resume_flags(args, explicit, config, run)
        # stop_after belongs to the run that stopped, not to the training: a resumed run goes on to `steps`.
        config = dataclasses.replace(config, stop_after=None)
        config = dataclasses.replace(config, **{k: getattr(args, k) for k in _RESUME_OVERRIDES if k in explicit})
        if isinstance(config.steps, int) and config.steps <= saved["step"]:  # before the checks that --steps bounds
            raise TrainError(f"--resume {args.resume}: already at step {saved['step']} of --steps {config.steps}; "
                             f"pass a larger --steps to continue")
        model_dir, task = resume, run.get("task", "cpt")
        data_paths = args.data or run.get("data")
        eval_paths = args.eval_data or run.get("eval_data")
        eval_fraction = run.get("eval_fraction", args.eval_fraction)
        cache_dir = run.get("cache_dir", args.cache_dir) if "cache_dir" not in explicit else args.cache_dir
        copy_from = run.get("copy_files_from") or resume
        # The resumed run writes into the run folder it is resumed from (the folder holding this
        # checkpoint), never the out_dir saved inside it: a copied run must not write into the original.
        run_dir = resume.parent
        out = Path(args.out) if "out" in explicit else run_dir
        if out.resolve() != run_dir.resolve() and (find_checkpoints(out) if out.is_dir() else []):
            raise TrainError(f"--out {out}: already holds checkpoints of another run; leave --out out to continue "
                             f"in {run_dir}, or choose an empty folder")
        # Each run's checkpoints carry its run_id (a copied run keeps it). A checkpoint of another run in
        # the folder would be replaced or pruned by --keep-checkpoints: refuse (none recorded: older runs).
        run_id = run.get("run_id")
        foreign = [c.name for c in find_checkpoints(out) if run_id and checkpoint_run_id(c) not in (None, run_id)]
        if foreign:
            raise TrainError(f"--resume {args.resume}: {out} also holds {', '.join(foreign)} of another run, which "
                             f"this run could replace or delete; pass --out with an empty folder")
        config = dataclasses.replace(config, out_dir=str(out))
        inputs = [("--data", p) for p in data_paths or []] + [("--eval-data", p) for p in eval_paths or []]
        inputs += [("--resume", resume)] if out.resolve() != run_dir.resolve() else []
        if copy_from is not None and Path(copy_from).resolve() != resume.resolve():
            inputs.append(("model (the run's --model)", copy_from))
        check_output_folder(out, inputs, overwrite=True)
    else:
        if not args.model:
            raise TrainError("--model is required (or --resume)")
        config = TrainConfig(
            steps=args.steps, lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup_steps,
            schedule=args.schedule, decay_fraction=args.decay_fraction, batch_tokens=args.batch_tokens,
            micro_batch_size=args.micro_batch_size, block_size=args.block_size, grad_clip=args.grad_clip,
            weight_decay=args.weight_decay, beta1=args.beta1, beta2=args.beta2,
            trainable=parse_trainable(args.trainable), eval_every=args.eval_every, eval_batches=args.eval_batches,
            log_every=args.log_every, seed=args.seed, compile=args.compile, device=args.device,
            checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
            out_dir=args.out, stop_after=args.stop_after)
        model_dir, task, data_paths, eval_paths = Path(args.model), args.task, args.data, args.eval_data
        run_id = None
        eval_fraction, cache_dir, copy_from = args.eval_fraction, args.cache_dir, Path(args.model)
        if find_checkpoints(args.out) if Path(args.out).is_dir() else []:
            raise TrainError(f"--out {args.out}: already holds checkpoints; pass --resume {args.out} or choose "
                             f"another --out")
        check_output_folder(args.out, [("--model", args.model), *[("--data", p) for p in data_paths or []],
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

    distributed = init_distributed(config.device, args.dist_timeout)
    rank, world = rank_and_world()
    if rank:
        log = lambda *a: None  # noqa: E731  (only rank 0 prints)
    device = resolve_device(config.device)
    # Under torchrun the weights load on the CPU and fully_shard moves each rank's shard to the device.
    model = Transformer.from_pretrained(model_dir, dtype=torch.float32, device="cpu" if distributed else device)
    # A run started with --byte-tokenizer resumes with it (run.json's tokenizer is "byte-v1").
    byte_tokenizer = args.byte_tokenizer or (resume is not None and run.get("tokenizer") == ByteTokenizer.name)
    tokenizer = load_tokenizer(model_dir, byte_tokenizer=byte_tokenizer)
    check_vocab(tokenizer, model.args.vocab_size, str(model_dir))
    if rank:
        torch.distributed.barrier()  # rank 0 tokenises into the cache first; the others read it
    data = load_data(data_paths, task, tokenizer, config.block_size, cache_dir, log)
    eval_data = load_data(eval_paths, task, tokenizer, config.block_size, cache_dir, log) if eval_paths else None
    if distributed and not rank:
        torch.distributed.barrier()
    for what, d in (("--data", data), ("--eval-data", eval_data)):
        largest = (int(d.max()) if isinstance(d, np.ndarray) and len(d) else
                   max(int(ids.max()) for ids in d.ids) if isinstance(d, SFTDataset) else -1)
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

    out = Path(config.out_dir)
    run_info = {"task": task, "data": [str(p) for p in data_paths], "eval_data": eval_paths,
                "eval_fraction": eval_fraction, "cache_dir": str(cache_dir), "copy_files_from": str(copy_from),
                "model": str(model_dir), "tokenizer": tokenizer.name, "world_size": world,
                "run_id": run_id or uuid.uuid4().hex}  # rank 0's is the one saved

    def write_run_json():
        # Only once train() has accepted everything: a failed start writes (and rewrites) nothing.
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "run.json", json.dumps({"config": dataclasses.asdict(config), "run": run_info},
                                                       indent=2) + "\n")

    # The run description travels in every checkpoint's trainer_state.json, so --resume needs nothing else.
    result = train(model, data, config, eval_data, metrics_path=out / "metrics.jsonl", log=log,
                   resume_from=resume, copy_files_from=copy_from, extra_state={"run": run_info},
                   on_start=write_run_json)
    if not rank:
        print(json.dumps({"step": result.step, "final_loss": result.final_loss, "eval_loss": result.eval_loss,
                          "eval_perplexity": result.eval_perplexity, "tokens_per_s": result.tokens_per_s,
                          "checkpoint": result.checkpoint, "stopped": result.stopped}))
    return result


def _fail(message: str, prog: str = "opt-deus-train", code: int = 2) -> int:
    # The tools' one error line: what and where, on stderr, whatever the exception's text held.
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def _fail_on(e: BaseException, prog: str) -> int:
    # Errors that are not a bad request but must still end in one line: the file system (full disk,
    # read-only or unwritable folder), and a signal that arrived before the training loop.
    if isinstance(e, OSError):
        return _fail(f"{e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", prog)
    if isinstance(e, Interrupted):
        return _fail(f"{e}; nothing written", prog, 128 + e.signum)
    return _fail("stopped by SIGINT; nothing written", prog, 130)


def main(argv: list[str] | None = None) -> int:
    code = _train_main(sys.argv[1:] if argv is None else list(argv))
    if argv is None and "WORLD_SIZE" in os.environ:
        # The command line under torchrun (`python train.py` or the opt-deus-train script): leave
        # without interpreter teardown, where gloo's threads now and then abort a rank that has finished
        # ("terminate called without an active exception", SIGABRT; 1 in 25 CPU runs here) and torchrun
        # then reports the whole run failed. The process group is destroyed already.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _train_main(argv: list[str]) -> int:
    if argv[:1] == ["eval"]:
        return eval_main(argv[1:])
    if argv[:1] == ["train"]:
        argv = argv[1:]
    parser = build_train_parser()
    args = parser.parse_args(argv)
    try:
        result = run_training(args, _explicit_flags(parser, argv))
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # no rank exits (torchrun would stop the others) before all are done
    except (TrainError, CheckpointError) as e:
        return _fail(str(e))
    except (torch.distributed.DistError, RuntimeError) as e:
        # Another rank died or hung past --dist-timeout (gloo reports it as a RuntimeError): one line, exit 1.
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not (torch.distributed.is_initialized() and (isinstance(e, torch.distributed.DistError) or any(
                s in message for s in ("gloo", "NCCL", "Timed out", "Connection closed", "timeout")))):
            raise
        print(f"error: rank {rank_and_world()[0]}: lost the other processes ({message})", file=sys.stderr)
        return 1
    except (OSError, KeyboardInterrupt, Interrupted) as e:
        return _fail_on(e, "opt-deus-train")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if result.stopped in ("SIGINT", "SIGTERM"):
        return 128 + signal.Signals[result.stopped].value
    return 0


EVAL_BLOCK_SIZE = 2048  # opt-deus-eval's window when the model allows it


def build_eval_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="opt-deus-eval", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                              description="Perplexity per token and per word (whitespace-separated) of a "
                                          "checkpoint on a text file; every token is predicted once.",
                              epilog="Progress goes to stderr (a line at most every 10 s), the report to stdout. "
                                     "Exit code 2: a bad request (one line on stderr, nothing written); "
                                     "130/143: stopped by SIGINT/SIGTERM.")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
    p.add_argument("--text", required=True, help="UTF-8 text file (.gz ok)")
    p.add_argument("--block-size", type=positive_int, default=None,
                   help="tokens per window (non-overlapping); None: the model's max_position_embeddings, at most "
                        f"{EVAL_BLOCK_SIZE}")
    p.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward pass")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights' dtype")
    p.add_argument("--byte-tokenizer", action="store_true",
                   help="use UTF-8 bytes when the model folder has no tokenizer.json (automatic for a "
                        f"vocabulary of at most {BYTE_VOCAB_LIMIT})")
    p.add_argument("--json", help="also write the report here as JSON")
    return p


def evaluate_text(model_dir, text_path, block_size: int | None = None, batch_size: int = 4, device: str = "auto",
                  dtype: torch.dtype = torch.float32, byte_tokenizer: bool = False,
                  log: Callable | None = None) -> dict:
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
    check_vocab(tokenizer, model.args.vocab_size, str(model_dir))
    if block_size is None:
        block_size = min(EVAL_BLOCK_SIZE, model.args.max_position_embeddings)
    if block_size > model.args.max_position_embeddings:
        raise TrainError(f"--block-size {block_size} is beyond the model's max_position_embeddings "
                         f"{model.args.max_position_embeddings}")
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


def eval_main(argv: list[str] | None = None) -> int:
    args = build_eval_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.json:  # never over an input
            json_path = Path(args.json)
            if json_path.is_dir():
                raise TrainError(f"--json {args.json}: is a folder")
            if not json_path.absolute().parent.is_dir():  # found out now, not after the evaluation
                raise TrainError(f"--json {args.json}: no such folder {json_path.absolute().parent}")
            for flag, source in (("--text", args.text), ("--model", args.model)):
                source_path = Path(source).resolve()
                if json_path.resolve() == source_path or source_path in json_path.resolve().parents:
                    raise TrainError(f"--json {args.json}: would overwrite the input {flag} {source}")
        report = evaluate_text(args.model, args.text, args.block_size, args.batch_size, args.device,
                               {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype],
                               byte_tokenizer=args.byte_tokenizer,
                               log=lambda *a: print(*a, file=sys.stderr, flush=True))
        if args.json:
            tmp = Path(args.json).with_name(f".{Path(args.json).name}.tmp-{os.getpid()}")
            try:
                tmp.write_text(json.dumps(report, indent=2) + "\n")
                os.replace(tmp, args.json)
            finally:
                tmp.unlink(missing_ok=True)
    except (TrainError, CheckpointError) as e:
        return _fail(str(e), "opt-deus-eval")
    except (OSError, KeyboardInterrupt, Interrupted) as e:
        return _fail_on(e, "opt-deus-eval")
    print(f"{report['text']}: {report['tokens']:,} tokens, {report['words']:,} words")
    print(f"loss per token: {report['loss_per_token']:.4f}")
    print(f"perplexity per token: {report['perplexity_per_token']:.3f}")
    print(f"perplexity per word: {report['perplexity_per_word']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
