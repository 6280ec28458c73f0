"""opt-deus: grow a Hugging Face LLaMA folder into a new one, streaming (grow_checkpoint), and its command line.

    opt-deus --base Llama-3.2-1B/ --out grown/ --method opt --new-layers 8 --position top --device cuda
    python -m opt_deus_tool.grow_cli --help

Base blocks are read one at a time and the grown model is written shard by shard as opt_deus.grown_blocks()
yields its layers: peak memory is two base blocks and a cost matrix, whatever the model's size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from opt_deus_core.model import Block, layer_window, rope_cos_sin
from opt_deus_core.opt_deus import POSITIONS, Growth, GrowthError, GrowthOptions, block_activations
from opt_deus_tool.atomic import check_output_folder, model_folder_problem
from opt_deus_tool.checkpoint import CheckpointReader, CheckpointWriter, dtype_name
from opt_deus_tool.cli import (HelpFormatter, OneLineArgumentParser, add_fields, at_least, field_values,
                               finite_float, flag_names, int_list, log_to_stderr, positive_int, run_command, size)
from opt_deus_tool.calibration import (CALIBRATION_TOKENS, MIN_CALIBRATION_TOKENS, calibration_tokens,  # noqa: F401
                                       check_calibration, check_calibration_request, read_calibration)
from opt_deus_tool.growths import GROWTHS, record_growth
from opt_deus_tool.hf_config import config_from_args
from opt_deus_tool.devices import resolve_device
from opt_deus_tool.hub import resolve_model
from opt_deus_tool.model_card import growth_card


def calibration_pass(reader: CheckpointReader, tokens: torch.Tensor, device):
    # The calibration tokens' hidden states (1, T, h), carried up the base as its blocks stream in: one block at
    # a time runs in float32 on `device` (no second model in memory). -> (hidden, run_block for Growth.blocks)
    args = reader.args  # tokens checked by check_calibration
    hidden = reader.tensor("model.embed_tokens.weight", torch.float32, device)[tokens.to(device)]
    cos, sin = rope_cos_sin(args, torch.arange(tokens.shape[1], device=device), torch.float32)

    def run_block(i, tensors, x):
        with torch.device("meta"):
            block = Block(args, layer_window(args, i))
        block.load_state_dict({key: value.float() for key, value in tensors.items()}, assign=True)
        return block_activations(block, x, cos, sin)
    return hidden, run_block


def check_finite(block: dict, where: str):
    for key, tensor in block.items():
        if not torch.isfinite(tensor).all():
            raise GrowthError(f"{where}: {key} contains NaN or inf")


def grow_checkpoint(base: str | Path, out: str | Path, num_new: int | None = None, *, position: str | None = "top",
                    insert_after: list[int] | None = None, options: GrowthOptions | None = None,
                    device: str = "cpu", dtype: torch.dtype | None = None, overwrite: bool = False,
                    max_shard_size: str | int = "5GB", calibration: torch.Tensor | None = None, log=print,
                    source: str | None = None, calibration_text: str | Path | None = None,
                    calibration_tokens: int | None = None) -> dict:
    """Grow the Hugging Face LLaMA folder `base` (or Hub id ORG/NAME[@REVISION], hub.py) into a new folder `out`,
    streaming; returns the report. source: what the base is called in the report and model card (default: `base`).

    Positions, options and report as opt_deus.grow(); the report also has "options" and "base". Base blocks are
    read one at a time onto `device`, where new layers are computed; tensors are written in `dtype` (None: the
    base's) to shards of at most max_shard_size, with config.json, growth_report.json and the base's tokenizer
    files. options.cost "activations" runs the base on calibration text: `calibration_text`, a text file whose
    first `calibration_tokens` tokens (default CALIBRATION_TOKENS) are read, or `calibration`, token ids (B, T)
    (check_calibration). On any error nothing is left at `out`; a base changed while it is read is refused.
    """
    source = str(base) if source is None else source
    base = resolve_model(base, "`base`")
    reader = CheckpointReader(base)
    side_files = reader.snapshot.side_files()  # read now: what `out` ships comes from the base read
    args = reader.args
    limit = MAX_NEW_PER_BASE_LAYER * args.num_hidden_layers
    if max(num_new or 0, len(insert_after or ())) > limit:  # a typo, before positions are allocated
        raise GrowthError(f"`num_new` {num_new or len(insert_after)} is more than {MAX_NEW_PER_BASE_LAYER} new layers "
                          f"per base layer ({limit} for {args.num_hidden_layers} layers)")
    check_calibration_request(options or GrowthOptions(), calibration, calibration_text, calibration_tokens)
    out, inputs = Path(out), [("`base`", base), ("`calibration_text`", calibration_text)]
    # `out` may not be, contain or lie inside an input (with `overwrite` that would delete it); `overwrite`
    # replaces an earlier output, not whatever folder a mistyped `out` names. Checked before any work.
    check_output_folder(out, inputs, overwrite, replaceable=model_folder_problem)
    if calibration_text is not None:
        count = CALIBRATION_TOKENS if calibration_tokens is None else calibration_tokens
        calibration = read_calibration(base, calibration_text, count)
    if calibration is not None:
        calibration = check_calibration(calibration, args)
    growth = Growth(args, num_new, position, insert_after, options, calibration)
    options, layout, record = growth.options, growth.layout, growth.record
    growths = record_growth(args.extra, record)  # a grown base's growths stay on record (growths.py)
    if not any((Path(base) / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        log(f"note: {base} has no tokenizer.json or tokenizer.model; {out} will have none either")
    if dtype is None:  # "the base's dtype" must be one: a mixed base (bf16 embeddings) would be rounded silently
        reader.check_one_dtype("`dtype`")
    out_dtype = dtype or reader.dtype("model.embed_tokens.weight")
    log(f"growing {source} ({args.num_hidden_layers} layers) -> {out} ({len(layout)} layers): method {options.method}"
        + (f", {options.align} alignment, epsilon {options.epsilon}" if options.method == "opt" else "")
        + f", new layers at {record['new_layers']}, zero-init {record['zero_init']}, {device}")

    def base_block(i: int) -> dict:
        block = reader.block(i, device=device)
        check_finite(block, f"base layer {i} ({base})")
        return block

    def checked(key: str) -> torch.Tensor:
        tensor = reader.tensor(key)
        check_finite({key: tensor}, f"base {base}")
        return tensor.to(out_dtype)

    hidden, run_block = calibration_pass(reader, calibration, device) if options.cost == "activations" else (None, None)
    started = time.perf_counter()
    grown_args = dataclasses.replace(growth.args, dtype=dtype_name(out_dtype),
                                     extra={**growth.args.extra, **({GROWTHS: growths} if len(growths) > 1 else {})})
    if len(growths) > 1:
        log(f"note: {base} was grown before; its growths' new layers will be layers "
            + "; ".join(str(g["new_layers_final"]) for g in growths[:-1]) + f" of {out} (config.json {GROWTHS})")
    with CheckpointWriter(out, max_shard_size=max_shard_size, overwrite=overwrite, inputs=inputs) as writer:
        writer.add("model.embed_tokens.weight", checked("model.embed_tokens.weight"))
        for index, slot, tensors in growth.blocks(base_block, run_block, hidden, log):
            for key in reader.block_keys:
                writer.add(f"model.layers.{index}.{key}", tensors[key].to(out_dtype))
            reader.release()
        writer.add("model.norm.weight", checked("model.norm.weight"))
        if not args.tie_word_embeddings:
            writer.add("lm_head.weight", checked("lm_head.weight"))
        reader.check_all_read()  # also checks a redundant tied head equals the embeddings (not copied)
        growth_report = growth.report(source)
        writer.finish(config_from_args(grown_args), copy_files_from=side_files,
                      extra_files={"growth_report.json": json.dumps(growth_report, indent=2) + "\n",
                                   "README.md": growth_card(growth_report, source, base, out, args.model_type)})
    log(f"wrote {out} ({len(layout)} layers, new {record['new_layers']}) in {time.perf_counter() - started:.1f}s")
    return growth_report


# ----------------------------------------------------------------------------------------------
# Command line

FLAGS = flag_names(*(f.name for f in dataclasses.fields(GrowthOptions)), "base", "out", "position", "insert_after",
                   "device", "dtype", "max_shard_size", "overwrite", "calibration", "calibration_tokens",
                   num_new="--new-layers", calibration_text="--calibration")
# Depth up-scaling adds a fraction of a model's depth; beyond this many new layers per base layer a request is a
# typo (10**9 would otherwise allocate gigabytes of positions before any other check).
MAX_NEW_PER_BASE_LAYER = 64


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="opt-deus", description="Grow a LLaMA checkpoint by inserting new layers "
                              "(OpT-DeUS and baselines). Hugging Face folder in, Hugging Face folder out.",
                              formatter_class=HelpFormatter,
                              epilog="Exit codes: 0 written; 2 a bad request (one line on stderr, nothing "
                                     "written, no input touched); 130/143 stopped by SIGINT/SIGTERM (the "
                                     "partial output is deleted). --out may not be, contain or lie inside an input "
                                     "(--base, --calibration).")
    p.add_argument("--base", required=True, help="base model: a Hugging Face folder (llama, qwen2, qwen3, mistral) or "
                                                 "a Hub id ORG/NAME[@REVISION] (read through the Hugging Face cache)")
    p.add_argument("--out", required=True, help="output folder for the grown model")
    p.add_argument("--new-layers", type=positive_int, default=None, dest="num_new", help="how many layers to add (K)")
    p.add_argument("--position", choices=POSITIONS, default="top",
                   help="where the K new layers go (llama-pro: uniform is LLaMA Pro's block expansion, a copy "
                        "after the last layer of each of K groups)")
    p.add_argument("--insert-after", type=int_list, default=None,
                   help="explicit base-layer indices i (a new layer between i and i+1; llama-pro: a copy of i "
                        "right after it, the top layer included), e.g. 7,9,11")
    # GrowthOptions' fields are the growth flags, one home each; --zero-init / --no-zero-init spell out_scale 0 / 1.
    scale = p.add_mutually_exclusive_group()
    add_fields(p, GrowthOptions, types={"epsilon": finite_float, "out_scale": finite_float, "tol": finite_float,
                                       "max_iter": positive_int}, into={"out_scale": scale})
    scale.add_argument("--zero-init", action="store_const", const=0.0, dest="out_scale",
                   help="zero new layers' o_proj and down_proj (--out-scale 0): the grown model computes the base's "
                        "function; the default for opt and llama-pro")
    scale.add_argument("--no-zero-init", action="store_const", const=1.0, dest="out_scale",
                   help="keep new layers' o_proj and down_proj as made (--out-scale 1); the default for avg, solar")
    p.add_argument("--calibration", default=None, help="--cost activations: a text file (.gz ok) the base runs on")
    p.add_argument("--calibration-tokens", type=at_least(MIN_CALIBRATION_TOKENS), default=None,
                   help=f"--cost activations: how many tokens of --calibration (the start token included), as one "
                        f"sequence; at least {MIN_CALIBRATION_TOKENS} (default: {CALIBRATION_TOKENS})")
    p.add_argument("--device", default="auto",
                   help="where the alignment is computed: auto (cuda if available, else cpu), cpu, cuda:1, ...")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of the written weights; None keeps the base checkpoint's")
    p.add_argument("--max-shard-size", type=size, default="5GB", help="safetensors shard size of the output")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out (never one that is, contains or is inside an input)")
    return p


def grow_command(flags: argparse.Namespace) -> int:
    device = resolve_device(flags.device)  # refused now, not after the first blocks
    options = GrowthOptions(**field_values(flags, GrowthOptions))
    base = resolve_model(flags.base, "--base")  # a Hub id: downloaded (or found in the cache) now
    grow_checkpoint(base, flags.out, flags.num_new, position=flags.position, insert_after=flags.insert_after,
                    options=options, device=device, dtype=getattr(torch, flags.dtype) if flags.dtype else None,
                    overwrite=flags.overwrite, max_shard_size=flags.max_shard_size, calibration_text=flags.calibration,
                    calibration_tokens=flags.calibration_tokens, log=log_to_stderr, source=flags.base)
    return 0


def main(argv=None) -> int:
    flags = build_parser().parse_args(argv)
    return run_command("opt-deus", lambda: grow_command(flags), FLAGS, where=flags.out)


if __name__ == "__main__":
    sys.exit(main())
