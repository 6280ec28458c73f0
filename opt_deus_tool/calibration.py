"""Calibration text for cost="activations": the tokens the base runs on, read and checked where they enter.

read_calibration() reads only as much of a text file as its N tokens need (memory and time follow N, not the
file); check_calibration() is the one check of token ids handed to growth (grow_checkpoint, the experiments).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from opt_deus_core.opt_deus import GrowthOptions
from opt_deus_tool import DataError
from opt_deus_tool import data
from opt_deus_tool.data import BYTE_VOCAB_LIMIT, iter_documents, load_tokenizer
from opt_deus_tool.inputs import not_a_file, read_json_object

CALIBRATION_TOKENS = 2048  # --calibration-tokens' default: a few thousand tokens describe a unit well enough
# Fewer tokens than this are not text to compare units on: a plan from one or two tokens is noise (and an empty
# file, or `--calibration-tokens 1`, which keeps only the start token, would align on nothing at all).
MIN_CALIBRATION_TOKENS = 16


def _reader(path: Path):
    # (read(n) -> the next piece of the text as iter_documents joins it, "" at its end; close): a plain file by
    # characters, JSONL by documents (a "text" field per line).
    if not path.name.endswith((".jsonl", ".jsonl.gz")):
        f = data.open_text(path)
        return f.read, f.close
    documents, first = iter_documents([path]), [True]

    def read(n: int) -> str:
        document = next(documents, None)
        if document is None:
            return ""
        piece, first[0] = ("" if first[0] else "\n") + document, False
        return piece
    return read, documents.close


def read_calibration(base, text_path, count: int = CALIBRATION_TOKENS) -> torch.Tensor:
    """The first `count` tokens of a text file, in the base's tokenizer, as one row (1, count) after a start
    token: what the base runs on for cost="activations". Reads a prefix of the text, doubling it until two
    prefixes agree on the tokens kept (a prefix cut mid-word only changes its last tokens)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < MIN_CALIBRATION_TOKENS:
        raise DataError(f"`calibration_tokens` {count!r} must be an integer >= {MIN_CALIBRATION_TOKENS} (the start "
                        f"token and {MIN_CALIBRATION_TOKENS - 1} of text): less is too little text to compare units on")
    text_path, base = Path(text_path), Path(base)
    if (problem := not_a_file(text_path)) is not None:
        raise DataError(f"`calibration_text` {text_path}: {'' if problem == 'no such file' else 'is '}{problem}")
    if not (base / "tokenizer.json").is_file():
        vocab = read_json_object(base / "config.json", DataError, missing_ok=True).get("vocab_size")
        if not (isinstance(vocab, int) and vocab <= BYTE_VOCAB_LIMIT):  # load_tokenizer's remedy is not a flag here
            raise DataError(f"{base / 'tokenizer.json'}: missing; the calibration text is read with the base's "
                            f"tokenizer (its vocabulary has {vocab} tokens): copy the base model's tokenizer.json "
                            f"into {base}, or grow with `cost` weights")
    tokenizer = load_tokenizer(base)
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    need, want, text, done, previous = count - 1, max(4096, 8 * count), "", False, None
    try:
        read, close = _reader(text_path)
        try:
            while True:
                while len(text) < want and not done:
                    piece = read(want - len(text))
                    text, done = text + piece, not piece
                ids = tokenizer.encode(text)
                if done or (previous is not None and ids[:need] == previous):
                    break
                previous, want = (ids[:need] if len(ids) >= need else None), 2 * len(text)
        finally:
            close()
    except UnicodeDecodeError:
        raise DataError(f"`calibration_text` {text_path}: not UTF-8 text") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"`calibration_text` {text_path}: cannot read ({e})") from None
    if len(ids) < need:
        raise DataError(f"`calibration_text` {text_path}: {len(ids) + 1} tokens with the start token, fewer than "
                        f"`calibration_tokens` {count}; give a longer text or fewer tokens")
    return torch.tensor([[start] + ids[:need]])


calibration_tokens = read_calibration  # its name before this module (benchmarks/bench_alignment.py)


def check_calibration_request(options: GrowthOptions, calibration, calibration_text, count):
    # What a growth is given against what it uses: only cost "activations" runs the base on text, and only method
    # opt has plans to align; an option that would do nothing is refused, not ignored.
    by_activations = options.cost == "activations"
    given = [name for name, value in (("`calibration_text`", calibration_text), ("`calibration_tokens`", count),
                                      ("`calibration`", calibration)) if value is not None]
    if given and not by_activations:
        raise DataError(f"{given[0]} is used only with `cost` activations (`cost` is {options.cost}): drop it, or "
                        f"pass `cost` activations")
    if by_activations and calibration is None and calibration_text is None:
        raise DataError("`cost` activations runs the base on calibration text: give `calibration_text`, a text "
                        "file (.gz ok)")
    if calibration is not None and (calibration_text is not None or count is not None):
        raise DataError("give `calibration` token ids or `calibration_text` (with `calibration_tokens`), not both")


def check_calibration(tokens, args, name: str = "`calibration`") -> torch.Tensor:
    """Token ids for cost="activations" against the base (ModelArgs `args`): an integer tensor (batch, tokens)
    of at least MIN_CALIBRATION_TOKENS ids, rows no longer than its positions, every id in its vocabulary."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point \
            or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        got = (f"a {tokens.dim()}-D {str(tokens.dtype).removeprefix('torch.')} tensor"
               if isinstance(tokens, torch.Tensor) else type(tokens).__name__)
        raise DataError(f"{name} must be token ids, an integer tensor of shape (batch, tokens); got {got}")
    if tokens.numel() < MIN_CALIBRATION_TOKENS:
        raise DataError(f"{name}: {tokens.numel()} token(s), fewer than {MIN_CALIBRATION_TOKENS}: too little text "
                        f"to compare units on")
    if tokens.shape[1] > args.max_position_embeddings:
        raise DataError(f"{name}: rows of {tokens.shape[1]} tokens are beyond the base's max_position_embeddings "
                        f"{args.max_position_embeddings}; use shorter rows (`calibration_tokens`)")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= args.vocab_size:
        raise DataError(f"{name}: token id {low if low < 0 else high} is outside the base's vocabulary "
                        f"[0, {args.vocab_size}) (a tokenizer that does not belong to the base?)")
    return tokens.long()
