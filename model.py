"""A LLaMA decoder and its Hugging Face checkpoint I/O.

The model computes what transformers' `LlamaForCausalLM` computes; a Hugging Face key is our parameter
name with a "model." prefix. Checkpoints stream both ways, one tensor at a time, so opt_deus.py can
grow an 8B model on a host that cannot hold it. Every tool writes its output through `AtomicFolder`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open


class CheckpointError(ValueError):
    """A checkpoint, config or output folder we refuse; the message names the file or key."""


# ----------------------------------------------------------------------------------------------
# Configuration

# LlamaConfig keys that change the function computed but that we do not implement: a config that
# sets one to anything but this default is refused by name, never silently approximated.
_UNSUPPORTED_IF_SET = {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "sliding_window": None,
                       "num_local_experts": None, "num_experts": None, "partial_rotary_factor": None,
                       "layer_types": None}
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# config.json keys that are ModelArgs fields of the same name and meaning.
_PLAIN_KEYS = (*_REQUIRED_KEYS, "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
               "tie_word_embeddings")
_ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelArgs:
    # Names and meanings are those of Hugging Face's LlamaConfig.
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None (plain RoPE) or Llama 3.1's {"rope_type": "llama3", "factor", ...}
    dtype: str | None = None  # the weights' dtype as config.json states it ("bfloat16"), if it does
    extra: dict = field(default_factory=dict)  # every other config.json key, written back unchanged
    hf_style: str = "v5"  # written as read: "v5" rope_parameters, dtype; "v4" rope_theta, rope_scaling, torch_dtype

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                                  f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise CheckpointError(f"head_dim={self.head_dim} must be even for RoPE")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ("default", "llama3"):
            raise CheckpointError(f"rope type {rope_type!r} is not supported (only 'default' and 'llama3')")
        missing = [key for key in _ROPE_SCALING_KEYS if rope_type == "llama3" and key not in self.rope_scaling]
        if missing:
            raise CheckpointError(f"llama3 rope scaling is missing {', '.join(missing)}")

    @classmethod
    def from_hf(cls, config: dict) -> ModelArgs:
        _check_config(config)
        config = dict(config)
        # transformers 5 keeps rope_theta and the scaling in rope_parameters; 4.x had them at the top
        # level, the scaling's type sometimes spelled "type".
        hf_style = "v5" if "rope_parameters" in config else "v4"
        rope = dict(config.pop("rope_scaling", None) or {})
        rope_theta = config.pop("rope_theta", None)
        if hf_style == "v5":
            rope = dict(config.pop("rope_parameters") or {})
            rope_theta = rope.pop("rope_theta", None)
        rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
        rope.pop("type", None)
        dtype, torch_dtype = config.pop("dtype", None), config.pop("torch_dtype", None)
        # null in config.json means "not set": the field keeps its default.
        values = {key: config.pop(key, None) for key in _PLAIN_KEYS}
        values = {key: value for key, value in values.items() if value is not None}
        values.setdefault("num_key_value_heads", values["num_attention_heads"])
        values.setdefault("head_dim", values["hidden_size"] // values["num_attention_heads"])
        values["rms_norm_eps"] = float(values.get("rms_norm_eps", 1e-6))
        return cls(**values, rope_theta=float(rope_theta or 10000.0),
                   rope_scaling=None if rope_type == "default" else {"rope_type": rope_type, **rope},
                   dtype=dtype or torch_dtype, extra=config, hf_style=hf_style)

    def to_hf(self) -> dict:
        config = {**self.extra, "model_type": "llama", **{key: getattr(self, key) for key in _PLAIN_KEYS}}
        config.setdefault("architectures", ["LlamaForCausalLM"])
        config.setdefault("hidden_act", "silu")
        if self.hf_style == "v5":
            rope = self.rope_scaling or {"rope_type": "default"}
            config["rope_parameters"] = {**rope, "rope_theta": self.rope_theta}
        else:
            config.update(rope_theta=self.rope_theta, rope_scaling=self.rope_scaling)
        if self.dtype is not None:
            config["dtype" if self.hf_style == "v5" else "torch_dtype"] = self.dtype
        return dict(sorted(config.items()))


def _check_config(config: dict):
    # A malformed config.json (a string where a number belongs, a list for the rope parameters) is
    # refused by key before anything computes with it. Each key's type is its ModelArgs field's.
    if not isinstance(config, dict):
        raise CheckpointError(f"expected a JSON object, got {type(config).__name__}")
    for key in _REQUIRED_KEYS:
        _check_value(key, config.get(key), "int")
    kinds = {f.name: f.type for f in dataclasses.fields(ModelArgs)}  # "int", "float", "bool", ...
    for key, value in config.items():
        if value is not None:
            _check_value(key, value, kinds.get(key))
    for key in ("rope_parameters", "rope_scaling"):
        rope = config.get(key)
        if rope is not None and not isinstance(rope, dict):
            raise CheckpointError(f"config key {key} must be an object, got {rope!r}")
        for name in ("rope_theta", *_ROPE_SCALING_KEYS):
            if rope and name in rope:
                _check_value(f"{key}.{name}", rope[name], "float")
    if config.get("model_type") != "llama":
        raise CheckpointError(f"model_type={config.get('model_type')!r}: only LLaMA checkpoints "
                              f"(model_type 'llama') are supported")
    for key, default in _UNSUPPORTED_IF_SET.items():
        if config.get(key) not in (None, default):
            raise CheckpointError(f"config key {key}={config[key]!r} is not supported (expected {default!r})")


def _check_value(key: str, value, kind: str | None):
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "int" and not (is_number and isinstance(value, int) and value > 0):
        raise CheckpointError(f"config key {key} must be a positive integer, got {value!r}")
    if kind == "float" and not (is_number and 0 < value < math.inf):
        raise CheckpointError(f"config key {key} must be a positive finite number, got {value!r}")
    if kind == "bool" and not isinstance(value, bool):
        raise CheckpointError(f"config key {key} must be true or false, got {value!r}")


# ----------------------------------------------------------------------------------------------
# The model


def rope_cos_sin(args: ModelArgs, positions: torch.Tensor, dtype: torch.dtype):
    # positions (T,) -> cos, sin (T, head_dim), in the "rotate half" layout of Hugging Face
    # checkpoints: dimension j pairs with j + head_dim/2. Computed in float32, then cast like HF does.
    exponents = torch.arange(0, args.head_dim, 2, dtype=torch.int64, device=positions.device).float() / args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** exponents)  # (head_dim/2,)
    if args.rope_scaling is not None:
        # Llama 3.1: wavelengths longer than the original context are stretched by `factor`, shorter
        # than original/high_freq_factor are kept, and the band between is interpolated smoothly.
        s = args.rope_scaling
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        original = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= original / high) & (wavelen <= original / low)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, heads, T, head_dim)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in float32 and cast back before the gain, exactly as HF's LlamaRMSNorm.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # Query head h reads key/value head h // (n_heads / n_kv_heads): the GQA grouping that
        # structured alignment in opt_deus.py must respect.
        gqa = self.n_heads != self.n_kv_heads
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # (B, heads, T, head_dim)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin):
        # A block with zeroed o_proj and down_proj adds nothing to the residual stream: the identity
        # map that function-preserving growth (LLaMA Pro, OpT-DeUS) starts new layers from.
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        # A block knows nothing of its depth, so growth can insert, remove and reorder blocks freely.
        self.layers = nn.ModuleList(Block(args) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def init_weights(self, generator: torch.Generator | None = None, std: float = 0.02):
        # For models trained from scratch: N(0, std²) weights and unit norm gains, with the output
        # projections scaled by 1/sqrt(2·depth) as in GPT-2 so the residual stream does not grow with depth.
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(("o_proj.weight", "down_proj.weight")):
                    p.normal_(0.0, std * (1 / math.sqrt(2 * len(self.layers))), generator=generator)
                else:
                    p.normal_(0.0, std, generator=generator)
        return self

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids (B, T) -> logits (B, T, vocab)
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.args, torch.arange(input_ids.shape[1], device=input_ids.device), x.dtype)
        for block in self.layers:
            x = block(x, cos, sin)
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        return F.linear(self.norm(x), head.weight)

    def current_args(self) -> ModelArgs:
        # The layer count comes from the blocks, so growth only has to edit `layers`.
        return dataclasses.replace(self.args, num_hidden_layers=len(self.layers))

    def hf_state(self):
        for name, tensor in self.state_dict().items():
            yield to_hf_key(name), tensor

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device=None) -> Transformer:
        # dtype None: the dtype config.json states, float32 if none. Built on the meta device and
        # allocated once in that dtype: peak memory is the model plus one tensor in flight.
        reader = CheckpointReader(path)
        stated = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(reader.args.dtype, torch.float32)
        dtype = dtype or stated
        with torch.device("meta"):
            model = cls(reader.args).to(dtype)
        model = model.to_empty(device=device or "cpu")
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(reader.tensor(to_hf_key(name)))
        reader.check_all_read()
        return model

    def save_pretrained(self, path, max_shard_size: int | str = "5GB", copy_files_from=None, overwrite: bool = True,
                        atomic: bool = True):
        args = dataclasses.replace(self.current_args(), dtype=dtype_name(self.embed_tokens.weight.dtype))
        with CheckpointWriter(path, max_shard_size=max_shard_size, overwrite=overwrite, atomic=atomic,
                              inputs=[("copy_files_from", copy_files_from)]) as writer:
            for key, tensor in self.hf_state():
                writer.add(key, tensor)
            writer.finish(args.to_hf(), copy_files_from=copy_files_from)


def to_hf_key(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------
# Streaming checkpoint I/O

# The tensors of one block, keyed as in `Block.state_dict()`, in the order growth writes them.
BLOCK_KEYS = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
              "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
              "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
# Files a user expects to travel with the weights: tokenizer, chat template, generation defaults.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "generation_config.json", "chat_template.jinja", "chat_template.json")


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Hugging Face key -> shape, for every tensor a checkpoint of `args` must hold."""
    h, i, d = args.hidden_size, args.intermediate_size, args.head_dim
    q, kv = args.num_attention_heads * d, args.num_key_value_heads * d
    block = dict(zip(BLOCK_KEYS, [(h,), (h,), (q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]))
    shapes = {"model.embed_tokens.weight": (args.vocab_size, h), "model.norm.weight": (h,)}
    for layer in range(args.num_hidden_layers):
        shapes.update({f"model.layers.{layer}.{key}": shape for key, shape in block.items()})
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (args.vocab_size, h)
    return shapes


class CheckpointReader:
    """A Hugging Face LLaMA folder read one tensor at a time. Opening checks every tensor's name, dtype
    and shape against the config, from the safetensors headers alone."""

    def __init__(self, path):
        self.path = Path(path)
        config_path = self.path / "config.json"
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a folder")
        if not config_path.is_file():
            raise CheckpointError(f"{config_path}: missing (not a Hugging Face checkpoint folder)")
        try:
            self.args = ModelArgs.from_hf(json.loads(config_path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
        except CheckpointError as e:
            raise CheckpointError(f"{config_path}: {e}") from None
        self._handles = {}  # file -> open safetensors file
        self._read = set()  # keys handed out, for check_all_read
        self.files = self._weight_files()  # key -> file
        self._check_tensors()

    def _weight_files(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if not index.is_file() and not single.is_file():
            raise CheckpointError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
        if not index.is_file():
            return dict.fromkeys(self._open(single).keys(), single)
        try:
            files = {key: self.path / name for key, name in json.loads(index.read_text())["weight_map"].items()}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from None
        for file in set(files.values()):
            if not file.is_file():
                raise CheckpointError(f"{file}: listed in {index.name} but missing")
        return files

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None
        return self._handles[file]

    def _check_tensors(self):
        expected = expected_shapes(self.args)
        if self.args.tie_word_embeddings and "lm_head.weight" in self.files:
            # Some tied checkpoints store the head anyway; check_all_read checks it equals the embeddings.
            expected["lm_head.weight"] = expected["model.embed_tokens.weight"]
        for key, file in self.files.items():
            if key not in expected:
                bias = key.endswith(".bias")
                why = "biases are not supported" if bias else "not part of a LLaMA model with this config"
                raise CheckpointError(f"{file}: unexpected tensor {key} ({why})")
            if key not in self._open(file).keys():
                raise CheckpointError(f"{file}: tensor {key} listed in the index but not in the file")
            header = self._open(file).get_slice(key)
            if header.get_dtype() not in ("F32", "F16", "BF16", "F64"):
                raise CheckpointError(f"{file}: tensor {key} is stored as {header.get_dtype()}; LLaMA weights "
                                      f"must be floating point (F32, F16, BF16, F64)")
            if tuple(header.get_shape()) != expected[key]:
                raise CheckpointError(f"{file}: tensor {key} has shape {header.get_shape()}, "
                                      f"config implies {list(expected[key])}")
        missing = [key for key in expected if key not in self.files]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"{self.path}: missing tensor {missing[0]}{more}")

    def dtype(self, key: str) -> torch.dtype:
        stored = self._open(self.files[key]).get_slice(key).get_dtype()  # "BF16", ...
        return next(dtype for dtype, name in _SAFETENSORS_DTYPES.items() if name == stored)

    def tensor(self, key: str, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        t = self._open(self.files[key]).get_tensor(key)
        self._read.add(key)
        return t.to(device=device, dtype=dtype or t.dtype)

    def block(self, layer: int, dtype: torch.dtype | None = None, device=None) -> dict[str, torch.Tensor]:
        """The tensors of one base block, keyed as in `Block.state_dict()`."""
        return {key: self.tensor(f"model.layers.{layer}.{key}", dtype, device) for key in BLOCK_KEYS}

    def release(self):
        # Closes the memory maps: pages read from a map count towards the process's resident memory
        # until it is closed, so a streaming pass calls this between blocks. Files reopen on the next read.
        self._handles.clear()

    def check_all_read(self):
        # Strict loading: every tensor of the checkpoint was used; a tied checkpoint's redundant head
        # by checking it is what tying implies.
        if "lm_head.weight" in self.files and self.args.tie_word_embeddings:
            if not torch.equal(self.tensor("lm_head.weight"), self.tensor("model.embed_tokens.weight")):
                raise CheckpointError(f"{self.path}: tie_word_embeddings is true but lm_head.weight differs "
                                      f"from the embeddings")
        unread = [key for key in self.files if key not in self._read]
        if unread:
            raise CheckpointError(f"{self.path}: tensor {unread[0]} was never used ({len(unread)} unused)")


class CheckpointWriter:
    """Writes a Hugging Face folder shard by shard into an AtomicFolder, holding one tensor at a time.

    A safetensors file starts with a header giving every tensor's offset, so it cannot be written
    front to back as tensors arrive. Each tensor's bytes go straight to a scratch data file; when a
    shard is full its header is written and the data copied behind it. Memory stays at one tensor
    whatever the model's size, at the price of writing the weights twice.
    """

    def __init__(self, path, max_shard_size: int | str = "5GB", overwrite: bool = False, inputs=(),
                 atomic: bool = True):
        # atomic=False writes straight into `path`, an empty folder the caller made and will rename
        # (train.py's checkpoints add optimizer state to it).
        self.max_shard_size = parse_size(max_shard_size)
        self.folder = AtomicFolder(path, overwrite=overwrite, inputs=inputs) if atomic else None
        self.tmp = self.folder.tmp if atomic else Path(path).absolute()
        self.shard_files: list[str] = []  # finished shards
        self.key_to_shard: dict[str, int] = {}  # for the finished shards
        self.header: dict[str, dict] = {}  # the open shard's entries, its data in self.data
        self.data = None
        self.offset = 0  # bytes in the open shard
        self.total_bytes = 0

    def __enter__(self):
        if self.folder is not None:
            self.folder.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.data is not None:
            self.data.close()
        if self.folder is not None:
            self.folder.__exit__(exc_type, exc, tb)

    def add(self, key: str, tensor: torch.Tensor):
        if key in self.key_to_shard or key in self.header:
            raise ValueError(f"tensor {key} written twice")
        # A down-cast (float32 -> float16 tops out at 65504) must not turn large values into inf silently.
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            fp16 = tensor.dtype == torch.float16
            hint = " (values beyond float16's range 65504? use bfloat16 or float32)" if fp16 else ""
            raise CheckpointError(f"tensor {key}: not finite (inf or NaN) as {dtype_name(tensor.dtype)}{hint}")
        nbytes = tensor.numel() * tensor.element_size()
        if self.header and self.offset + nbytes > self.max_shard_size:
            self._close_shard()
        if self.data is None:
            self.data = open(self.tmp / "shard.data", "wb")
        # Raw little-endian bytes as safetensors stores them (bfloat16 through a uint8 view: numpy has none).
        self.data.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.header[key] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                            "data_offsets": [self.offset, self.offset + nbytes]}
        self.offset += nbytes
        self.total_bytes += nbytes

    def _close_shard(self):
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data that follows starts 8-byte aligned
        name = f"shard-{len(self.shard_files):05d}.tmp"
        with open(self.tmp / name, "wb") as shard:
            shard.write(len(header).to_bytes(8, "little") + header)
            if self.data is not None:  # None in a checkpoint without tensors
                self.data.close()
                with open(self.tmp / "shard.data", "rb") as data:
                    shutil.copyfileobj(data, shard, 16 * 2**20)
                os.remove(self.tmp / "shard.data")
        self.key_to_shard.update(dict.fromkeys(self.header, len(self.shard_files)))
        self.shard_files.append(name)
        self.header, self.data, self.offset = {}, None, 0

    def finish(self, config: dict, copy_files_from=None, extra_files: dict[str, str] | None = None):
        if self.header or not self.shard_files:
            self._close_shard()
        n = len(self.shard_files)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for tmp_name, name in zip(self.shard_files, names):
            os.replace(self.tmp / tmp_name, self.tmp / name)
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {key: names[i] for key, i in sorted(self.key_to_shard.items())}}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (self.tmp / name).write_text(text)
        for name in SIDE_FILES:
            if copy_files_from is not None and (Path(copy_files_from) / name).is_file():
                shutil.copy2(Path(copy_files_from) / name, self.tmp / name)
        if self.folder is not None:
            self.folder.commit()


def parse_size(size: int | str) -> int:
    # "5GB", "500MB", "2GiB", "1048576" -> bytes (> 0); anything else is a ValueError naming the text.
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    text = str(size).strip().upper()
    unit = next((unit for unit in units if text.endswith(unit)), "B")
    try:
        value = float(text.removesuffix(unit)) * units[unit]
    except ValueError:
        value = math.nan
    if not 1 <= value < math.inf:
        raise ValueError(f"{size!r} is not a size: expected a positive number of bytes, e.g. 5GB, 500MB, 2GiB")
    return int(value)


# ----------------------------------------------------------------------------------------------
# Output folders, written whole or not at all
#
# Output goes to a hidden scratch sibling `.NAME.tmp-HOST-PID`, renamed into place when complete. An
# error, Ctrl-C or SIGTERM deletes it; a process killed outright (SIGKILL, the OOM killer) leaves it,
# and the next run into the same folder on the same host removes it once that process is gone.

SCRATCH_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", os.uname().nodename)
_SCRATCH_NAME = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)")


class Interrupted(BaseException):
    """SIGTERM arrived while an output folder was being written; its temporary folder is gone. A
    BaseException like KeyboardInterrupt (which SIGINT raises), so no `except Exception` swallows it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def check_output_folder(path, inputs=(), overwrite: bool = False, flag: str = "--out"):
    """Refuse an output folder that would destroy something: one that is, contains or lies inside an
    input (`inputs`: (flag, path) pairs), a file, or a non-empty folder without `overwrite`."""
    path, target = Path(path), Path(path).resolve()
    for what, source in inputs:
        if source is None:
            continue
        source_path = Path(source).resolve()
        if target == source_path:
            relation = "is"
        elif target in source_path.parents:
            relation = "contains"
        elif source_path in target.parents:
            relation = "is inside"
        else:
            continue
        raise CheckpointError(f"{flag} {path}: {relation} the input {what} {source}; "
                              f"choose an output folder outside every input")
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{flag} {path}: is a file, not a folder")
    # Replacing the working directory or the home folder (or a folder above either) is never what
    # `--out . --overwrite` or a mistyped `--out ~` meant.
    for what, folder in (("the current directory", Path.cwd().resolve()), ("the home folder", Path.home().resolve())):
        if target == folder or target in folder.parents:
            raise CheckpointError(f"{flag} {path}: is {what} or a folder above it; choose a new folder for the output")
    if path.is_dir() and not overwrite and any(path.iterdir()):
        raise CheckpointError(f"{flag} {path}: already exists and is not empty (pass --overwrite to replace it)")


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_scratch(folder: Path, name: str | None):
    # Scratch files and folders for NAME (None: any name, in a folder one run owns) left by a dead
    # process on this host. Another host's, or a live process's, are left alone: on a shared file
    # system that run may still be writing.
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        m = _SCRATCH_NAME.fullmatch(entry.name)
        if not m or name not in (None, m["name"]) or m["host"] != SCRATCH_HOST:
            continue
        try:
            os.kill(int(m["pid"]), 0)  # signal 0 only asks whether that process exists
        except ProcessLookupError:
            _remove(entry)
        except PermissionError:  # it exists, another user's
            pass


def write_text_atomic(path, text: str):
    # One file written whole or not at all: a scratch file beside it, then a rename.
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{SCRATCH_HOST}-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class AtomicFolder:
    """Write a folder into a hidden temporary sibling, then rename it into place:

        with AtomicFolder(out, overwrite=True, inputs=[("--base", base)]) as folder:
            ... write into folder.tmp ...
            folder.commit()

    The target is checked first (check_output_folder). Leaving the block without commit deletes the
    temporary folder; an existing target is moved aside and deleted only once the new folder is in
    place. While the block runs, SIGTERM (if nobody else handles it) raises Interrupted, so that the
    cleanup runs instead of the process dying.
    """

    def __init__(self, path, *, overwrite: bool = False, inputs=(), flag: str = "--out"):
        check_output_folder(path, inputs, overwrite, flag)
        self.path = Path(path).absolute()
        self.tmp = self.path.parent / f".{self.path.name}.tmp-{SCRATCH_HOST}-{os.getpid()}"
        self.committed = False
        self._previous_sigterm = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_scratch(self.path.parent, self.path.name)
        _remove(self.tmp)  # left by an earlier process with our pid
        self.tmp.mkdir()
        on_main_thread = threading.current_thread() is threading.main_thread()
        if on_main_thread and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    @staticmethod
    def _on_sigterm(signum, frame):
        raise Interrupted(signum)

    def commit(self):
        # Signals wait while the two renames run, so the target is never left missing between them.
        old = self.path.parent / f".{self.path.name}.old-{SCRATCH_HOST}-{os.getpid()}"
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            if self.path.exists():
                os.replace(self.path, old)
            os.replace(self.tmp, self.path)
            self.committed = True
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _remove(old)

    def __exit__(self, exc_type, exc, tb):
        if not self.committed:
            _remove(self.tmp)
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)


# ----------------------------------------------------------------------------------------------
# Command-line helpers shared by the tools


class OneLineArgumentParser(argparse.ArgumentParser):
    # argparse prints the whole usage block before an error; our tools promise one line on stderr
    # (what went wrong and which flag), exit code 2. --help still prints the full usage.
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    # argparse type for counts: "0", "-3" and "abc" all end in the same one-line error.
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def check_device(name: str, flag: str = "--device") -> torch.device:
    # Checked where the flag is parsed, instead of a traceback from the first tensor sent there.
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise CheckpointError(f"{flag} {name!r}: not a device ({str(e).splitlines()[0]})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"{flag} {name}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CheckpointError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CheckpointError(f"{flag} {name}: MPS is not available on this machine (use --device cpu)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise CheckpointError(f"{flag} {name}: unsupported device type {device.type!r} (cpu, cuda or mps)")
    return device
