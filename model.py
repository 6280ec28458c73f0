"""A LLaMA decoder in plain PyTorch: what transformers' `LlamaForCausalLM` computes, and nothing else.

`ModelArgs` holds the fields of Hugging Face's `LlamaConfig` under the same names; a parameter's name here is
its Hugging Face key without the "model." prefix. This file needs torch alone: reading and writing Hugging
Face folders (config.json, safetensors shards) is the tool's job, in opt_deus_tool/checkpoint.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelArgs:
    # Names and meanings are those of Hugging Face's LlamaConfig (and its defaults).
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
    extra: dict = field(default_factory=dict)  # every other config.json key (growth records "opt_deus" here)
    hf_style: str = "v5"  # how config.json spelled RoPE and dtype: "v5" (rope_parameters) or "v4" (rope_theta)

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope type {rope_type!r} is not supported (only 'default' and 'llama3')")
        missing = [key for key in LLAMA3_ROPE_KEYS if rope_type == "llama3" and key not in self.rope_scaling]
        if missing:
            raise ValueError(f"llama3 rope scaling is missing {', '.join(missing)}")


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

    def forward(self, x, cos, sin, record: dict | None = None):
        B, T, _ = x.shape
        q_out, k_out, v_out = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q_out.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k_out.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v_out.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # Query head h reads key/value head h // (n_heads / n_kv_heads): the GQA grouping that
        # structured alignment in opt_deus.py must respect.
        gqa = self.n_heads != self.n_kv_heads
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # (B, heads, T, head_dim)
        heads = y.transpose(1, 2)  # (B, T, heads, head_dim)
        out = self.o_proj(heads.reshape(B, T, self.n_heads * self.head_dim))
        if record is not None:  # what each unit computed: activation-based alignment's costs (opt_deus.py)
            record.update({"self_attn.q_proj": q_out, "self_attn.k_proj": k_out, "self_attn.v_proj": v_out,
                           "self_attn.heads": heads, "self_attn.o_proj": out})
        return out


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x, record: dict | None = None):
        gate, up = self.gate_proj(x), self.up_proj(x)
        swiglu = F.silu(gate) * up  # (B, T, intermediate): what each MLP neuron passes to down_proj
        out = self.down_proj(swiglu)
        if record is not None:
            record.update({"mlp.gate_proj": gate, "mlp.up_proj": up, "mlp.swiglu": swiglu, "mlp.down_proj": out})
        return out


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, record: dict | None = None):
        # A block with zeroed o_proj and down_proj adds nothing to the residual stream: the identity
        # map that function-preserving growth (LLaMA Pro, OpT-DeUS) starts new layers from. record: a dict
        # that receives every linear layer's output, the attention heads' outputs and the SwiGLU products.
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, record)
        return x + self.mlp(self.post_attention_layernorm(x), record)


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

    def embed(self, input_ids: torch.Tensor):
        # input_ids (B, T) -> the residual stream's start x (B, T, h) and the RoPE tables every block reads.
        x = self.embed_tokens(input_ids)
        return (x, *rope_cos_sin(self.args, torch.arange(input_ids.shape[1], device=input_ids.device), x.dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids (B, T) -> logits (B, T, vocab)
        x, cos, sin = self.embed(input_ids)
        for block in self.layers:
            x = block(x, cos, sin)
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        return F.linear(self.norm(x), head.weight)

    def current_args(self) -> ModelArgs:
        # The layer count comes from the blocks, so growth only has to edit `layers`.
        return dataclasses.replace(self.args, num_hidden_layers=len(self.layers))
