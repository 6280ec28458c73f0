"""opt-deus-eval: perplexity per token and per word of a Hugging Face folder on a text file (evaluate_text).

    opt-deus-eval --model runs/cpt/checkpoint-001000 --text heldout.txt --json report.json

Every token of the text is predicted once, in non-overlapping windows (train.evaluate); progress goes to the log
(a line at most every 10 s).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from opt_deus_tool.atomic import write_text_atomic
from opt_deus_tool.checkpoint import load_pretrained
from opt_deus_tool.cli import (BYTE_TOKENIZER_HELP, HelpFormatter, OneLineArgumentParser, flag_names, log_to_stderr,
                               positive_int, run_command)
from opt_deus_core.train import TrainError, evaluate
from opt_deus_tool.data import iter_documents, load_tokenizer
from opt_deus_tool.devices import resolve_device
from opt_deus_tool.hub import resolve_model
from opt_deus_tool.inputs import not_a_file

EVAL_BLOCK_SIZE = 2048  # the window when the model allows it
FLAGS = flag_names("model", "text", "block_size", "batch_size", "device", "dtype", "byte_tokenizer", "json")


def evaluate_text(model_dir, text_path, block_size: int | None = None, batch_size: int = 4, device: str = "auto",
                  dtype: torch.dtype = torch.float32, byte_tokenizer: bool = False,
                  log: Callable | None = None) -> dict:
    """Perplexity per token and per word (whitespace-separated) of a checkpoint (a folder or a Hub id
    ORG/NAME[@REVISION]) on a text file."""
    for name, value in (("block_size", block_size), ("batch_size", batch_size)):
        if value is None and name == "block_size":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TrainError(f"`{name}` {value!r}: expected an integer >= 1")
    text_path = Path(text_path)
    if (problem := not_a_file(text_path)) is not None:
        raise TrainError(f"{text_path}: {problem if problem == 'no such file' else 'is ' + problem}")
    text = "\n".join(iter_documents([text_path]))
    if not text.strip():
        raise TrainError(f"{text_path}: empty")
    source, model_dir = str(model_dir), resolve_model(model_dir, "`model`")
    model = load_pretrained(model_dir, dtype=dtype, device=resolve_device(device))
    tokenizer = load_tokenizer(model_dir, byte_tokenizer=byte_tokenizer)
    max_positions = model.args.max_position_embeddings
    block_size = block_size or min(EVAL_BLOCK_SIZE, max_positions)
    if block_size > max_positions:
        raise TrainError(f"`block_size` {block_size} is beyond the model's max_position_embeddings {max_positions}")
    # The first token is predicted from a start token (bos, else the eos that separates documents
    # in training), so every token of the text is scored.
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    tokens = np.asarray([start] + tokenizer.encode(text), dtype=np.int64)
    if int(tokens.max()) >= model.args.vocab_size:
        raise TrainError(f"{text_path}: token id {int(tokens.max())} does not fit the model's vocab_size "
                         f"{model.args.vocab_size} (a tokenizer that does not belong to {model_dir}?)")
    progress = None if log is None else progress_lines(log)
    r = evaluate(model, tokens, min(block_size, len(tokens) - 1), batch_size, progress=progress)
    words = len(text.split())
    return {"model": source, "text": str(text_path), "tokens": r["tokens"], "words": words,
            "loss_per_token": r["loss"], "perplexity_per_token": r["perplexity"],
            "perplexity_per_word": math.exp(min(r["nll_sum"] / max(words, 1), 700.0))}


def format_eta(seconds: float) -> str:  # H:MM:SS
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_lines(log: Callable) -> Callable:
    # train.evaluate's progress(batches done, of, tokens) -> a line at most every 10 s, and after the last batch.
    t0 = last_log = time.time()

    def progress(done: int, total: int, tokens: int):
        nonlocal last_log
        if time.time() - last_log >= 10 or done == total:
            s, last_log = time.time() - t0, time.time()
            log(f"eval batch {done}/{total} | {tokens:,} tokens | elapsed {format_eta(s)}"
                f" | eta {format_eta(s / done * (total - done))}")
    return progress


def eval_command(flags: argparse.Namespace) -> int:
    if flags.json:  # found out now, not after the evaluation; never over an input
        json_path = Path(flags.json)
        if json_path.is_dir():
            raise TrainError(f"--json {flags.json}: is a folder")
        if json_path.is_symlink() or (json_path.exists() and not json_path.is_file()):
            raise TrainError(f"--json {flags.json}: exists and is not a regular file (a symlink, a device or a "
                             f"FIFO), which writing the report would replace; choose a file path")
        if not json_path.absolute().parent.is_dir():
            raise TrainError(f"--json {flags.json}: no such folder {json_path.absolute().parent}")
        for flag, source in (("--text", flags.text), ("--model", flags.model)):
            source_path = Path(source).resolve()
            if json_path.resolve() == source_path or source_path in json_path.resolve().parents:
                raise TrainError(f"--json {flags.json}: would overwrite the input {flag} {source}")
    report = evaluate_text(flags.model, flags.text, flags.block_size, flags.batch_size, flags.device,
                           getattr(torch, flags.dtype), flags.byte_tokenizer, log=log_to_stderr)
    if flags.json:
        write_text_atomic(flags.json, json.dumps(report, indent=2) + "\n")
    print(f"{report['text']}: {report['tokens']:,} tokens, {report['words']:,} words")
    print(f"loss per token: {report['loss_per_token']:.4f}")
    print(f"perplexity per token: {report['perplexity_per_token']:.3f}")
    print(f"perplexity per word: {report['perplexity_per_word']:.3f}")
    return 0


def build_eval_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="opt-deus-eval", formatter_class=HelpFormatter,
                              description="Perplexity per token and per word (whitespace-separated) of a "
                                          "checkpoint on a text file; every token is predicted once.",
                              epilog="Progress goes to stderr (a line at most every 10 s), the report to stdout. "
                                     "Exit code 2: a bad request (one line on stderr, nothing written); "
                                     "130/143: stopped by SIGINT/SIGTERM.")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint folder or Hub id ORG/NAME[@REVISION]")
    p.add_argument("--text", required=True, help="UTF-8 text file (.gz ok)")
    p.add_argument("--block-size", type=positive_int, default=None,
                   help=f"tokens per window (non-overlapping); None: the model's max_position_embeddings, at most "
                        f"{EVAL_BLOCK_SIZE}")
    p.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward pass")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights' dtype")
    p.add_argument("--byte-tokenizer", action="store_true", help=BYTE_TOKENIZER_HELP)
    p.add_argument("--json", help="also write the report here as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    flags = build_eval_parser().parse_args(sys.argv[1:] if argv is None else [str(a) for a in argv])
    return run_command("opt-deus-eval", lambda: eval_command(flags), FLAGS)


if __name__ == "__main__":
    sys.exit(main())
