"""A training request checked where it enters the tool, before train() sees it: the TrainConfig's values
(check_config: one check per field, messages naming it), the token data (check_tokens), the trainable layers
(check_trainable) and all of them against the model (check_training). train() itself trusts what it is given."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from opt_deus_core.model import Transformer
from opt_deus_core.train import TokenBlocks, TrainConfig, TrainError
from opt_deus_tool.growths import new_layers


def check_config(c: TrainConfig) -> TrainConfig:
    """The one check of a TrainConfig's values, where they enter (the command line, a checkpoint, train_run);
    their types are the caller's. Returns it."""
    for f in dataclasses.fields(c):
        if f.type == "float" and not math.isfinite(getattr(c, f.name)):
            raise TrainError(f"`{f.name}` {getattr(c, f.name)!r}: expected a finite number")
    schedules, mb = TrainConfig.__dataclass_fields__["schedule"].metadata["choices"], c.block_size * c.micro_batch_size
    for name, ok, rule in (
            ("steps", c.steps >= 1, ">= 1"), ("lr", c.lr > 0, "> 0"),
            ("min_lr_ratio", 0 <= c.min_lr_ratio <= 1, "in [0, 1]"),
            ("warmup_steps", 0 <= c.warmup_steps < c.steps, f">= 0 and below `steps` {c.steps}"),
            ("schedule", c.schedule in schedules, " or ".join(map(repr, schedules))),
            ("decay_fraction", 0 <= c.decay_fraction <= 1, "in [0, 1]"),
            *((n, getattr(c, n) >= 1, ">= 1") for n in ("block_size", "micro_batch_size", "eval_batches", "log_every")),
            ("batch_tokens", c.batch_tokens >= mb, f"at least `block_size` x `micro_batch_size` = {mb}"),
            ("grad_clip", c.grad_clip >= 0, ">= 0 (0: no clipping)"),
            ("weight_decay", c.weight_decay >= 0, ">= 0"), ("seed", c.seed >= 0, ">= 0"),
            ("beta1", 0 <= c.beta1 < 1, "in [0, 1)"), ("beta2", 0 <= c.beta2 < 1, "in [0, 1)"),
            ("eps", c.eps > 0, "> 0"),
            *((n, getattr(c, n) >= 0, ">= 0 (0: only at the end)") for n in ("eval_every", "checkpoint_every")),
            ("stop_after", c.stop_after is None or c.stop_after >= 1, ">= 1")):
        if not ok:
            raise TrainError(f"`{name}` {getattr(c, name)} must be {rule} (default `{name}` "
                             f"{getattr(TrainConfig, name)})")
    return c


def check_tokens(tokens, block_size: int, what: str) -> np.ndarray:
    # Token ids for train.TokenBlocks: a 1-D integer array (floats would be truncated) of at least one block.
    array = np.asarray(tokens)
    if not np.issubdtype(array.dtype, np.integer) or array.ndim != 1:
        raise TrainError(f"{what}: token ids must be a 1-D integer array, got {array.dtype} {array.shape}")
    if len(tokens) < block_size + 1:
        raise TrainError(f"{what}: {len(tokens)} tokens is shorter than one block of {block_size + 1} (block size + "
                         f"1); add data or lower `block_size`")
    return array


def check_trainable(model: Transformer, spec) -> list[int]:
    # train.set_trainable's spec against the model: "new" (every growth's new layers), "all", or layer indices.
    if isinstance(spec, str) and spec not in ("new", "all") or not spec:
        raise TrainError(f"`trainable` {spec!r}: expected 'new', 'all' or a non-empty list of layer indices")
    if spec == "all":
        return list(range(len(model.layers)))
    if spec == "new":  # every growth's new layers (a model grown twice has two sets: growths.py)
        spec = new_layers(model.args.extra)[0]
        if not spec:
            raise TrainError("`trainable` new: the checkpoint records no new layers (config.json has no "
                             "opt_deus.new_layers); pass `trainable` all or a comma list of layer indices")
    layers, n = sorted(set(spec)), len(model.layers)
    if bad := [i for i in layers if not isinstance(i, int) or not 0 <= i < n]:
        raise TrainError(f"trainable layer {bad[0]} is out of range: the model has {n} layers")
    return layers


def check_training(model, train_data, config: TrainConfig, eval_data=None, world: int = 1):
    """What train() is given, checked before it runs (it checks nothing): the config's values, the model, the
    block size against its positions, the data (token arrays or datasets) against its vocabulary, the trainable
    layers, and the batch against the processes (`world`)."""
    check_config(config)
    if not isinstance(model, Transformer):
        raise TrainError(f"`model` must be a model.Transformer, got {type(model).__name__}")
    if config.block_size > model.args.max_position_embeddings:
        raise TrainError(f"`block_size` {config.block_size} is beyond the model's max_position_embeddings "
                         f"{model.args.max_position_embeddings}")
    for data, what in ((train_data, "training data"), (eval_data, "evaluation data")):
        if data is None:
            continue
        if not (hasattr(data, "get") and hasattr(data, "__len__")):
            data = TokenBlocks(check_tokens(data, config.block_size, what), config.block_size)
            low, high = int(data.tokens.min()), int(data.tokens.max())
        else:
            low, high = data.id_range() if hasattr(data, "id_range") else (0, 0)
        if low < 0 or high >= model.args.vocab_size:  # an embedding lookup would fail
            raise TrainError(f"{what}: token id {low if low < 0 else high} is outside the vocabulary "
                             f"[0, {model.args.vocab_size})")
    check_trainable(model, config.trainable)
    per_micro_batch = config.block_size * config.micro_batch_size * world
    if config.batch_tokens % per_micro_batch:
        raise TrainError(f"`batch_tokens` {config.batch_tokens} is not a multiple of `block_size` x "
                         f"`micro_batch_size`{' x world size' if world > 1 else ''} = {per_micro_batch}")
