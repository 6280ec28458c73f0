"""A LLaMA-style decoder and Hugging Face checkpoint I/O, in one file.

The model computes what transformers' `LlamaForCausalLM` computes (RMSNorm, rotate-half RoPE,
grouped-query attention, SwiGLU MLP), with parameter names chosen so that a Hugging Face key is
ours with a "model." prefix. Every block owns all of its state and knows nothing of its depth, so
depth up-scaling can insert, remove and reorder blocks freely.

Checkpoint I/O is streaming on both sides: `CheckpointReader` hands out one tensor at a time from
(sharded) safetensors, `CheckpointWriter` writes shards as tensors arrive and renames the finished
folder into place. `Transformer.from_pretrained` / `save_pretrained` are thin layers over them, and
opt_deus.py uses them directly to grow an 8B model without holding it in memory.
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
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open


class CheckpointError(ValueError):
    """A checkpoint folder or config we cannot read; the message names the file or key."""


# ----------------------------------------------------------------------------------------------
# Configuration


# Keys of a Hugging Face LlamaConfig that change the function the model computes but that we do
# not implement. A checkpoint using any of them with a non-default value is refused by name,
# never silently approximated.
_UNSUPPORTED_IF_SET = {
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
    "sliding_window": None,
    "num_local_experts": None,
    "num_experts": None,
    "partial_rotary_factor": None,
    "layer_types": None,
}

_ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _check_config_types(config: dict):
    # A malformed config.json (a string where a number belongs, a list for the rope parameters)
    # is refused by key here, before anything computes with it.
    def positive_int(key, required=False):
        value = config.get(key)
        if value is None and not required:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"config key {key} must be a positive integer, got {value!r}")

    def positive_number(value, key):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
            raise CheckpointError(f"config key {key} must be a positive finite number, got {value!r}")

    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        positive_int(key, required=True)
    for key in ("num_key_value_heads", "head_dim", "max_position_embeddings"):
        positive_int(key)
    for key in ("rms_norm_eps", "rope_theta"):
        if config.get(key) is not None:
            positive_number(config[key], key)
    if not isinstance(config.get("tie_word_embeddings", False), bool):
        raise CheckpointError(f"config key tie_word_embeddings must be true or false, "
                              f"got {config['tie_word_embeddings']!r}")
    for key in ("rope_parameters", "rope_scaling"):
        rope = config.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise CheckpointError(f"config key {key} must be an object, got {rope!r}")
        for name, value in rope.items():
            if name in ("rope_theta", *_ROPE_SCALING_KEYS):
                positive_number(value, f"{key}.{name}")


@dataclass
class ModelArgs:
    # Field names are the Hugging Face LlamaConfig names.
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
    # None (plain RoPE) or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}, as in Llama 3.1 / 3.2 checkpoints.
    rope_scaling: dict | None = None
    # The dtype the checkpoint says its weights are stored in ("bfloat16", ...), if it says.
    dtype: str | None = None
    # Every other key of the source config.json (bos/eos ids, architectures, our "opt_deus" record
    # ...), written back unchanged on save.
    extra: dict = field(default_factory=dict)
    # transformers 5 writes `rope_parameters` and `dtype`; 4.x wrote `rope_theta`/`rope_scaling` and
    # `torch_dtype`. We write back in the style we read.
    hf_style: str = "v5"

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise CheckpointError(f"head_dim={self.head_dim} must be even for RoPE")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ("default", "llama3"):
            raise CheckpointError(f"rope type {rope_type!r} is not supported (only 'default' and 'llama3')")
        if rope_type == "llama3":
            missing = [k for k in _ROPE_SCALING_KEYS if k not in self.rope_scaling]
            if missing:
                raise CheckpointError(f"llama3 rope scaling is missing {', '.join(missing)}")

    @classmethod
    def from_hf(cls, config: dict) -> "ModelArgs":
        if not isinstance(config, dict):
            raise CheckpointError(f"expected a JSON object, got {type(config).__name__}")
        config = dict(config)
        _check_config_types(config)
        model_type = config.get("model_type")
        if model_type != "llama":
            raise CheckpointError(
                f"model_type={model_type!r}: only LLaMA checkpoints (model_type 'llama') are supported")
        for key, default in _UNSUPPORTED_IF_SET.items():
            value = config.get(key, default)
            if value is not None and value != default:
                raise CheckpointError(f"config key {key}={value!r} is not supported (expected {default!r})")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(config.get(key), int) or config[key] <= 0:
                raise CheckpointError(f"config key {key} must be a positive integer, got {config.get(key)!r}")

        hf_style = "v5" if "rope_parameters" in config else "v4"
        if "rope_parameters" in config:
            rope = dict(config.pop("rope_parameters") or {})
            rope_theta = float(rope.pop("rope_theta", 10000.0))
            config.pop("rope_theta", None)
            config.pop("rope_scaling", None)
        else:
            rope = dict(config.pop("rope_scaling", None) or {})
            rope_theta = float(config.pop("rope_theta", 10000.0))
        # 4.x checkpoints may spell the type "type"; we keep the 5.x spelling "rope_type".
        rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
        rope.pop("type", None)
        rope_scaling = None if rope_type == "default" else {"rope_type": rope_type, **rope}

        dtype = config.pop("dtype", None)
        torch_dtype = config.pop("torch_dtype", None)
        heads = config.pop("num_attention_heads")
        hidden = config.pop("hidden_size")
        return cls(
            vocab_size=config.pop("vocab_size"),
            hidden_size=hidden,
            intermediate_size=config.pop("intermediate_size"),
            num_hidden_layers=config.pop("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=config.pop("num_key_value_heads", None) or heads,
            head_dim=config.pop("head_dim", None) or hidden // heads,
            rms_norm_eps=float(config.pop("rms_norm_eps", 1e-6)),
            max_position_embeddings=config.pop("max_position_embeddings", 2048),
            tie_word_embeddings=bool(config.pop("tie_word_embeddings", False)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            dtype=dtype or torch_dtype,
            extra=config,
            hf_style=hf_style,
        )

    def to_hf(self) -> dict:
        config = dict(self.extra)
        config.update(
            model_type="llama",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
        )
        config.setdefault("architectures", ["LlamaForCausalLM"])
        config.setdefault("hidden_act", "silu")
        rope = dict(self.rope_scaling or {"rope_type": "default"})
        if self.hf_style == "v5":
            config["rope_parameters"] = {**rope, "rope_theta": self.rope_theta}
            if self.dtype is not None:
                config["dtype"] = self.dtype
        else:
            config["rope_theta"] = self.rope_theta
            config["rope_scaling"] = self.rope_scaling
            if self.dtype is not None:
                config["torch_dtype"] = self.dtype
        return dict(sorted(config.items()))


# ----------------------------------------------------------------------------------------------
# The model


def rope_inv_freq(args: ModelArgs, device=None) -> torch.Tensor:
    """Inverse frequencies of RoPE, (head_dim/2,) float32, with Llama 3's frequency-dependent scaling."""
    exponents = torch.arange(0, args.head_dim, 2, dtype=torch.int64, device=device).float() / args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** exponents)
    if args.rope_scaling is None:
        return inv_freq
    # Llama 3.1: wavelengths longer than the original context are stretched by `factor`, shorter than
    # original/high_freq_factor are kept, and the band between is interpolated smoothly.
    s = args.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    original = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(args: ModelArgs, positions: torch.Tensor, dtype: torch.dtype):
    # positions (T,) -> cos, sin (T, head_dim), in the "rotate half" layout of Hugging Face
    # checkpoints: dimension j pairs with j + head_dim/2. Computed in float32, then cast like HF does.
    freqs = positions.float()[:, None] * rope_inv_freq(args, positions.device)[None, :]
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
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
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
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_heads != self.n_kv_heads)
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
        self.layers = nn.ModuleList(Block(args) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def init_weights(self, generator: torch.Generator | None = None, std: float = 0.02):
        # For models trained from scratch: N(0, std²) matrices and embeddings, unit norm gains,
        # output projections scaled by 1/sqrt(2·depth) as in GPT-2, so the residual stream's variance
        # does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                nn.init.ones_(p)
            else:
                scale = 1 / math.sqrt(2 * len(self.layers)) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
                with torch.no_grad():
                    p.normal_(0.0, std * scale, generator=generator)
        return self

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids (B, T) -> logits (B, T, vocab)
        return self.output(self.hidden_states(input_ids))

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.args, torch.arange(input_ids.shape[1], device=input_ids.device), x.dtype)
        for block in self.layers:
            x = block(x, cos, sin)
        return self.norm(x)

    def output(self, h: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, weight)

    def current_args(self) -> ModelArgs:
        # The layer count is derived from the blocks, so growth only has to edit `layers`.
        return dataclasses.replace(self.args, num_hidden_layers=len(self.layers))

    def hf_state(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.state_dict().items():
            yield to_hf_key(name), tensor

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device=None) -> "Transformer":
        # dtype=None keeps the dtype the checkpoint's config states (float32 if it states none).
        reader = CheckpointReader(path)
        if dtype is None:
            dtype = _DTYPES.get(reader.args.dtype or "float32", torch.float32)
        # Build on the meta device and allocate once in the target dtype: peak memory is the
        # model itself plus one tensor in flight.
        with torch.device("meta"):
            model = cls(reader.args).to(dtype)
        model = model.to_empty(device=device or "cpu")
        params = dict(model.named_parameters())
        for name, param in params.items():
            with torch.no_grad():
                param.copy_(reader.tensor(to_hf_key(name)))
        reader.check_all_read()
        return model

    def save_pretrained(self, path, max_shard_size: int | str = "5GB", copy_files_from=None, overwrite: bool = True,
                        atomic: bool = True, check_finite: bool = True):
        args = self.current_args()
        tensors = dict(self.hf_state())
        first = next(iter(tensors.values()))
        args = dataclasses.replace(args, dtype=dtype_name(first.dtype))
        inputs = [("copy_files_from", copy_files_from)] if copy_files_from is not None else []
        with CheckpointWriter(path, max_shard_size=max_shard_size, overwrite=overwrite, inputs=inputs,
                              atomic=atomic, check_finite=check_finite) as writer:
            for key, tensor in tensors.items():
                writer.add(key, tensor)
            writer.finish(args.to_hf(), copy_files_from=copy_files_from)


def check_device(name: str, flag: str = "--device") -> torch.device:
    # A device the tools can compute on, checked where the flag is parsed instead of failing later
    # with a traceback from the first tensor sent there.
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


def to_hf_key(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Hugging Face key -> shape, for every tensor a checkpoint of `args` must hold."""
    h, i, d = args.hidden_size, args.intermediate_size, args.head_dim
    q, kv = args.num_attention_heads * d, args.num_key_value_heads * d
    block = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
    }
    shapes = {"model.embed_tokens.weight": (args.vocab_size, h), "model.norm.weight": (h,)}
    for layer in range(args.num_hidden_layers):
        shapes.update({f"model.layers.{layer}.{k}": s for k, s in block.items()})
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (args.vocab_size, h)
    return shapes


BLOCK_KEYS = tuple(k.removeprefix("model.layers.0.") for k in expected_shapes(
    ModelArgs(vocab_size=1, hidden_size=2, intermediate_size=2, num_hidden_layers=1,
              num_attention_heads=1, num_key_value_heads=1, head_dim=2)) if k.startswith("model.layers.0."))


# ----------------------------------------------------------------------------------------------
# Streaming checkpoint I/O


class CheckpointReader:
    """A Hugging Face LLaMA folder, validated up front, read one tensor at a time.

    On opening, config.json is parsed, and the set of tensor names and their shapes is checked
    against what the config implies, from the safetensors headers alone (no tensor data read).
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a folder")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{config_path}: missing (not a Hugging Face checkpoint folder)")
        try:
            self.config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
        try:
            self.args = ModelArgs.from_hf(self.config)
        except CheckpointError as e:
            raise CheckpointError(f"{config_path}: {e}") from None

        self._handles: dict[Path, Any] = {}
        self._read: set[str] = set()
        self.files = self._weight_files()  # key -> file
        self._check_keys()

    def _weight_files(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from None
            files = {key: self.path / name for key, name in weight_map.items()}
            for file in set(files.values()):
                if not file.is_file():
                    raise CheckpointError(f"{file}: listed in {index.name} but missing")
            return files
        if single.is_file():
            return {key: single for key in self._open(single).keys()}
        raise CheckpointError(f"{self.path}: no model.safetensors or model.safetensors.index.json")

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None
        return self._handles[file]

    def _check_keys(self):
        expected = expected_shapes(self.args)
        for key, file in self.files.items():
            if key not in expected:
                if key == "lm_head.weight" and self.args.tie_word_embeddings:
                    continue  # some tied checkpoints store the head anyway; checked equal in tensor()
                what = "biases are not supported" if key.endswith(".bias") else "not part of a LLaMA model with this config"
                raise CheckpointError(f"{file}: unexpected tensor {key} ({what})")
            handle = self._open(file)
            if key not in handle.keys():
                raise CheckpointError(f"{file}: tensor {key} listed in the index but not in the file")
            shape = tuple(handle.get_slice(key).get_shape())
            stored = handle.get_slice(key).get_dtype()
            if stored not in _FLOAT_DTYPE_NAMES:
                raise CheckpointError(f"{file}: tensor {key} is stored as {stored}; LLaMA weights must be floating "
                                      f"point ({', '.join(_FLOAT_DTYPE_NAMES)})")
            if shape != expected[key]:
                raise CheckpointError(f"{file}: tensor {key} has shape {list(shape)}, config implies {list(expected[key])}")
        missing = [key for key in expected if key not in self.files]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"{self.path}: missing tensor {missing[0]}{more}")

    def tensor(self, key: str, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        if key not in self.files:
            raise CheckpointError(f"{self.path}: no tensor {key}")
        file = self.files[key]
        try:
            t = self._open(file).get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{file}: cannot read tensor {key} ({e})") from None
        self._read.add(key)
        return t.to(device=device, dtype=dtype or t.dtype)

    def block(self, layer: int, dtype: torch.dtype | None = None, device=None) -> dict[str, torch.Tensor]:
        """The tensors of one base block, keyed as in `Block.state_dict()`."""
        return {k: self.tensor(f"model.layers.{layer}.{k}", dtype, device) for k in BLOCK_KEYS}

    def release(self):
        # Closes the memory maps. Pages of a map that were read count towards the process's
        # resident memory until it is closed, so a streaming pass over a large checkpoint calls
        # this between blocks; files reopen on the next read.
        self._handles.clear()

    def dtype(self, key: str) -> torch.dtype:
        name = self._open(self.files[key]).get_slice(key).get_dtype()
        return {v: k for k, v in _SAFETENSORS_DTYPES.items()}[name]

    def check_all_read(self):
        # Strict loading: every tensor of the checkpoint was used. A tied checkpoint's redundant
        # head is "used" by checking it is what tying implies.
        if "lm_head.weight" in self.files and self.args.tie_word_embeddings:
            if not torch.equal(self.tensor("lm_head.weight"), self.tensor("model.embed_tokens.weight")):
                raise CheckpointError(f"{self.path}: tie_word_embeddings is true but lm_head.weight differs from the embeddings")
        unread = [k for k in self.files if k not in self._read]
        if unread:
            raise CheckpointError(f"{self.path}: tensor {unread[0]} was never used ({len(unread)} unused)")


def parse_size(size: int | str) -> int:
    # "5GB", "500MB", "2GiB", "1048576" -> bytes (> 0); anything else is a ValueError naming the text.
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
        text = str(size).strip().upper()
        factor = next((f for unit, f in units.items() if text.endswith(unit)), 1)
        number = next((text[: -len(unit)] for unit in units if text.endswith(unit)), text)
        try:
            value = float(number) * factor
        except ValueError:
            value = math.nan
    if not (1 <= value < math.inf):
        raise ValueError(f"{size!r} is not a size: expected a positive number of bytes, e.g. 5GB, 500MB, 2GiB")
    return int(value)


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}

_FLOAT_DTYPE_NAMES = ("F32", "F16", "BF16", "F64")

# Files a user expects to travel with the weights: tokenizer, chat template, generation defaults.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "generation_config.json", "chat_template.jinja", "chat_template.json")


class Interrupted(BaseException):
    """SIGTERM arrived while an output folder was being written; its temporary folder is already gone.

    A BaseException like KeyboardInterrupt (which SIGINT raises), so no `except Exception` swallows it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def check_output_folder(path, inputs=(), overwrite: bool = False, flag: str = "--out"):
    """Refuse an output folder that would destroy something: one that is, contains or lies inside an
    input (`inputs`: (flag, path) pairs), a file, or a non-empty folder without `overwrite`."""
    path = Path(path)
    target = path.resolve()
    for what, source in inputs:
        if source is None:
            continue
        source_path = Path(source).resolve()
        relation = ("is" if target == source_path else "contains" if target in source_path.parents
                    else "is inside" if source_path in target.parents else None)
        if relation:
            raise CheckpointError(f"{flag} {path}: {relation} the input {what} {source}; "
                                  f"choose an output folder outside every input")
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{flag} {path}: is a file, not a folder")
    # Replacing the working directory or the home folder (or a folder above either) is never what
    # `--out . --overwrite` or a mistyped `--out ~` meant.
    for what, folder in (("the current directory", Path.cwd()), ("the home folder", Path.home())):
        if target == folder.resolve() or target in folder.resolve().parents:
            raise CheckpointError(f"{flag} {path}: is {what} or a folder above it; choose a new folder for the output")
    if path.is_dir() and not overwrite and any(path.iterdir()):
        raise CheckpointError(f"{flag} {path}: already exists and is not empty (pass --overwrite to replace it)")


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


SCRATCH_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", os.uname().nodename if hasattr(os, "uname") else "host")
_SCRATCH = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)")


def remove_stale_scratch(folder: Path, name: str | None):
    # Scratch folders `.NAME.tmp-HOST-PID` / `.NAME.old-HOST-PID` of a run on this host that was
    # killed (SIGKILL, OOM killer) before it could clean up (name None: whatever NAME, for a folder
    # that only one run writes into). Another host's, or a live process's, are left alone: on a
    # shared file system that run may still be writing.
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        m = _SCRATCH.fullmatch(entry.name)
        if m and name in (None, m["name"]) and m["host"] == SCRATCH_HOST and (int(m["pid"]) != os.getpid()) \
                and not _pid_alive(int(m["pid"])):
            _remove(entry)


def write_text_atomic(path, text: str):
    # One file written whole or not at all: a hidden scratch file beside it (cleaned by
    # remove_stale_scratch if the process is killed), then a rename.
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{SCRATCH_HOST}-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class AtomicFolder:
    """Write a folder into a hidden temporary sibling, then rename it into place: the one way every
    tool here writes its output (checkpoints, grown models, experiment results).

        with AtomicFolder(out, overwrite=True, inputs=[("--base", base)]) as folder:
            ... write into folder.tmp ...
            folder.commit()

    The target is checked first (check_output_folder). Leaving the block without commit (an error,
    Ctrl-C, SIGTERM) deletes the temporary folder; an existing target is moved aside and deleted only
    once the new folder is in place, so it is never lost half-way. While the block runs, SIGTERM (if
    nobody else handles it) raises Interrupted so that the cleanup runs instead of the process dying.
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
        _remove(self.tmp)
        self.tmp.mkdir()
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    @staticmethod
    def _on_sigterm(signum, frame):
        raise Interrupted(signum)

    def commit(self):
        # Signals wait while the two renames run, so the target is never left missing between them.
        blocked = {signal.SIGINT, signal.SIGTERM}
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked) if hasattr(signal, "pthread_sigmask") else None
        try:
            old = self.path.parent / f".{self.path.name}.old-{SCRATCH_HOST}-{os.getpid()}"
            if self.path.exists():
                os.replace(self.path, old)
            os.replace(self.tmp, self.path)
            self.committed = True
            _remove(old)
        finally:
            if mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def __exit__(self, exc_type, exc, tb):
        try:
            if not self.committed:
                _remove(self.tmp)
        finally:
            if self._previous_sigterm is not None:
                signal.signal(signal.SIGTERM, self._previous_sigterm)
        return False


class CheckpointWriter:
    """Writes a Hugging Face folder shard by shard, atomically, holding one tensor at a time.

    Everything goes into a hidden temporary folder beside the target; `finish` writes config and
    index and renames it into place. Leaving the `with` block without `finish` (an error, Ctrl-C)
    deletes the temporary folder, so a target is never left half-written.

    A safetensors file starts with a header giving every tensor's offset, so it cannot be written
    front to back as tensors arrive. Each tensor's bytes go straight to a scratch data file; when a
    shard is full its header is written and the data copied behind it in chunks. Memory stays at one
    tensor whatever the model's size, at the price of writing the weights twice.
    """

    def __init__(self, path, max_shard_size: int | str = "5GB", overwrite: bool = False, inputs=(),
                 atomic: bool = True, check_finite: bool = True):
        # atomic=False writes straight into `path`, an empty folder the caller made (and will rename):
        # train.py's checkpoints add optimizer and RNG state to the same temporary folder.
        self.max_shard_size = parse_size(max_shard_size)
        self.check_finite = check_finite  # False only to write a broken checkpoint on purpose (tests)
        self.folder = AtomicFolder(path, overwrite=overwrite, inputs=inputs) if atomic else None
        self.path = Path(path).absolute()
        self.tmp = self.folder.tmp if atomic else self.path
        self.shard_files: list[str] = []
        self.key_to_shard: dict[str, int] = {}
        self.header: dict[str, dict] = {}  # the open shard's entries
        self.data = None  # the open shard's scratch data file
        self.offset = 0
        self.total_bytes = 0
        self.finished = False

    def __enter__(self):
        if self.folder is not None:
            self.folder.__enter__()
        elif not self.tmp.is_dir() or any(self.tmp.iterdir()):
            raise CheckpointError(f"{self.tmp}: a non-atomic write needs an existing empty folder")
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.data is not None:
            self.data.close()
        if self.folder is not None:
            self.folder.__exit__(exc_type, exc, tb)
        return False

    def add(self, key: str, tensor: torch.Tensor):
        if key in self.key_to_shard or key in self.header:
            raise ValueError(f"tensor {key} written twice")
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {key}: dtype {tensor.dtype} cannot be saved")
        # Every written weight is finite: a down-cast (float32 -> float16 tops out at 65504) must
        # not turn large values into inf without a word.
        if self.check_finite and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"tensor {key}: not finite (inf or NaN) as {dtype_name(tensor.dtype)}"
                                  + (" (values beyond float16's range 65504? use bfloat16 or float32)"
                                     if tensor.dtype == torch.float16 else ""))
        nbytes = tensor.numel() * tensor.element_size()
        if self.header and self.offset + nbytes > self.max_shard_size:
            self._close_shard()
        if self.data is None:
            self.data = open(self.tmp / "shard.data", "wb")
        # Raw little-endian bytes, as safetensors stores them (bf16 goes through a uint8 view,
        # numpy having no bfloat16).
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self.data.write(raw.data)
        self.header[key] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                            "data_offsets": [self.offset, self.offset + nbytes]}
        self.offset += nbytes
        self.total_bytes += nbytes

    def _close_shard(self):
        index = len(self.shard_files)
        name = f"shard-{index:05d}.tmp"
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data that follows starts 8-byte aligned
        if self.data is None:
            self.data = open(self.tmp / "shard.data", "wb")
        self.data.close()
        with open(self.tmp / name, "wb") as shard, open(self.tmp / "shard.data", "rb") as data:
            shard.write(len(header).to_bytes(8, "little"))
            shard.write(header)
            shutil.copyfileobj(data, shard, 16 * 2**20)
        os.remove(self.tmp / "shard.data")
        self.shard_files.append(name)
        self.key_to_shard.update({key: index for key in self.header})
        self.header, self.data, self.offset = {}, None, 0

    def finish(self, config: dict, copy_files_from=None, extra_files: dict[str, str] | None = None):
        if self.header or not self.shard_files:
            self._close_shard()
        n = len(self.shard_files)
        final = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for tmp_name, name in zip(self.shard_files, final):
            os.replace(self.tmp / tmp_name, self.tmp / name)
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {k: final[i] for k, i in sorted(self.key_to_shard.items())}}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (self.tmp / name).write_text(text)
        if copy_files_from is not None:
            for name in SIDE_FILES:
                source = Path(copy_files_from) / name
                if source.is_file():
                    shutil.copy2(source, self.tmp / name)
        if self.folder is not None:
            self.folder.commit()
        self.finished = True
