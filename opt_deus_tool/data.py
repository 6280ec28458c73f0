"""Tokenizers, data files, the token cache and Alpaca-style SFT examples: what train.py's loop reads.

Continued pre-training reads text files, folders of them (.gz too) or JSONL with a "text" field, tokenised once
into one uint32 stream cached on disk; SFT reads Alpaca JSON/JSONL into an SFTDataset, whose get() gives the
loop (inputs, labels) with the prompt masked.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from opt_deus_tool.atomic import remove_stale_scratch, scratch_path
from opt_deus_tool.inputs import check_text, not_a_file, parse_json, read_json_object
from opt_deus_core.train import IGNORE_INDEX
from opt_deus_tool import DataError

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


def _special_id(model_dir: Path, key: str, tokenizer) -> int | None:
    # config.json's <key>_token_id (an int, or a list whose first entry is the main one), else
    # tokenizer_config.json's <key>_token string looked up in the vocabulary.
    for name in ("config.json", "generation_config.json"):
        value = read_json_object(model_dir / name, DataError, missing_ok=True).get(f"{key}_token_id")
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, int):
            return value
    token = read_json_object(model_dir / "tokenizer_config.json", DataError, missing_ok=True).get(f"{key}_token")
    if isinstance(token, dict):
        token = token.get("content")
    return tokenizer.token_to_id(token) if isinstance(token, str) else None


# A model made for the byte tokenizer has a vocabulary of 257 (maybe padded); a real subword
# vocabulary is tens of thousands. Without tokenizer.json, bytes are used only below this size.
BYTE_VOCAB_LIMIT = 512


def load_tokenizer(model_dir, byte_tokenizer: bool = False) -> ByteTokenizer | HFTokenizer:
    # Bytes are refused for a real vocabulary unless asked for (byte_tokenizer): a 49k-vocabulary
    # model fed bytes trains "fine" and evaluates to nonsense.
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    vocab_size = read_json_object(model_dir / "config.json", DataError, missing_ok=True).get("vocab_size")
    made_for_bytes = byte_tokenizer or (isinstance(vocab_size, int) and vocab_size <= BYTE_VOCAB_LIMIT)
    if not path.is_file():
        if made_for_bytes:
            return ByteTokenizer()
        raise DataError(f"{path}: missing; the model's {vocab_size}-token vocabulary needs its tokenizer "
                         f"(copy tokenizer.json into the folder, or pass `byte_tokenizer` to use UTF-8 bytes)")
    try:
        from tokenizers import Tokenizer  # optional dependency
    except ImportError:
        if made_for_bytes:
            return ByteTokenizer()
        raise DataError(f"{path}: reading it needs the `tokenizers` package (pip install tokenizers)") from None
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises plain Exceptions on bad files
        raise DataError(f"{path}: cannot read tokenizer ({e})") from None
    eos_id = _special_id(model_dir, "eos", tokenizer)
    if eos_id is None:
        raise DataError(f"{model_dir}: no eos_token_id in config.json nor eos_token in tokenizer_config.json")
    # The token cache's key must change when the tokenizer does: the name hashes the file, not its path.
    name = "hf-" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return HFTokenizer(tokenizer, name, eos_id, _special_id(model_dir, "bos", tokenizer))


# ----------------------------------------------------------------------------------------------
# Data: files -> documents -> one long uint32 token stream (cached)


def list_data_files(paths) -> list[Path]:
    # Folders are walked recursively in sorted order; hidden files (a cache, .DS_Store) are skipped. A FIFO or a
    # device is refused by what it is: the token cache is keyed on content, so a file is read more than once.
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file()
                            and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif (problem := not_a_file(p)) is not None:
            raise DataError(f"{p}: {'no such file or folder' if problem == 'no such file' else 'is ' + problem}")
        else:
            files.append(p)
    if not files:
        raise DataError(f"{', '.join(map(str, paths))}: no data files found")
    return files


def open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz"))


def iter_documents(files: list[Path]) -> Iterator[str]:
    # A plain-text file is one document; a JSONL file holds one document per line in "text".
    for path in files:
        try:
            with open_text(path) as f:
                if not _is_jsonl(path):
                    text = f.read()
                    if text:
                        yield text
                    continue
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    record = parse_json(line, f"{path}:{lineno}", DataError)
                    if not isinstance(record, dict):
                        raise DataError(f"{path}:{lineno}: not a JSON object")
                    text = record.get("text")
                    if not isinstance(text, str):
                        raise DataError(f"{path}:{lineno}: no string field 'text'")
                    if text:
                        yield check_text(text, f"{path}:{lineno}", DataError)
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text") from None
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: cannot read ({e})") from None


def _batches(items, n: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def content_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def tokenize_to_cache(paths, tokenizer, cache_dir, log: Callable = print) -> np.ndarray:
    """Documents joined with EOS as one 1-D uint32 memmap, tokenised once and cached on disk."""
    files = list_data_files(paths)
    # Keyed by what determines the tokens: each file's path and content, and the tokenizer. Not by size and
    # mtime: `tar`, `rsync -t` and `cp -p` restore both on edited data. Hashing costs a read of the data
    # (docs/BENCHMARKS_TRAIN.md). uint32 because Llama 3's 128k vocabulary overflows uint16.
    contents = [(str(f.resolve()), content_digest(f)) for f in files]
    key = hashlib.sha256(json.dumps({"files": contents, "tokenizer": tokenizer.name,
                                     "eos": tokenizer.eos_id, "version": 2}).encode()).hexdigest()[:24]
    cache_dir = Path(cache_dir)
    final = cache_dir / f"tokens-{key}.u32"
    if final.is_file():
        return np.memmap(final, dtype=np.uint32, mode="r")
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(cache_dir, final.name)  # left by a tokenisation that was killed
    tmp = scratch_path(final)
    n_tokens, t0 = 0, time.time()
    try:
        with open(tmp, "wb") as f:
            for texts in _batches(iter_documents(files), 64):
                for ids in tokenizer.encode_batch(texts):
                    ids.append(tokenizer.eos_id)
                    np.asarray(ids, dtype=np.uint32).tofile(f)
                    n_tokens += len(ids)
        if n_tokens == 0:
            raise DataError(f"{', '.join(map(str, paths))}: no text (the data files are empty)")
        os.replace(tmp, final)  # the .u32 file appears only once complete
    except OSError as e:  # a full or read-only cache folder: numpy's message names no file
        raise DataError(f"{final}: cannot write the token cache ({e.strerror or e}); free space or choose another "
                         f"`cache_dir`") from None
    finally:
        tmp.unlink(missing_ok=True)
    log(f"tokenised {len(files)} file(s): {n_tokens:,} tokens in {time.time() - t0:.1f}s -> {final}")
    return np.memmap(final, dtype=np.uint32, mode="r")


# ----------------------------------------------------------------------------------------------
# Instruction data (SFT)

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
        with open_text(path) as f:
            if _is_jsonl(path):
                records = [parse_json(line, f"{path}:{n}", DataError) for n, line in enumerate(f, 1) if line.strip()]
            else:
                records = parse_json(f.read(), str(path), DataError)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile, a truncated .gz
        raise DataError(f"{path}: cannot read ({e})") from None
    if not isinstance(records, list) or not records:
        raise DataError(f"{path}: expected a non-empty JSON list of {{instruction, input, output}} records")
    for i, r in enumerate(records):
        ok = isinstance(r, dict) and "instruction" in r and "output" in r
        if not (ok and all(isinstance(r.get(k, ""), str) for k in ("instruction", "input", "output"))):
            raise DataError(f"{path}: record {i} needs string fields 'instruction', 'output' (and optional 'input')")
        for key in ("instruction", "input", "output"):
            check_text(r.get(key, ""), f"{path}: record {i} field {key!r}", DataError)
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
            raise DataError(f"{what}: no example has a response within the block size {block_size}")

    def __len__(self):
        return len(self.ids)

    def id_range(self) -> tuple[int, int]:
        return min(int(ids.min()) for ids in self.ids), max(int(ids.max()) for ids in self.ids)

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


def load_data(paths, task: str, tokenizer, block_size: int, cache_dir, log=print):
    """task "cpt": the token stream of `paths` (cached); "sft": an SFTDataset of their Alpaca records."""
    if task == "sft":
        examples = [r for p in list_data_files(paths) for r in load_alpaca(p)]
        return SFTDataset(examples, tokenizer, block_size, what=", ".join(map(str, paths)))
    return tokenize_to_cache(paths, tokenizer, cache_dir, log)
