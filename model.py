"""A LLaMA-style decoder in plain PyTorch: what transformers' `LlamaForCausalLM` computes, nothing
else, and the small deltas of `Qwen2ForCausalLM` (q/k/v biases, sliding windows), `Qwen3ForCausalLM`
(per-head q/k norms before RoPE) and `MistralForCausalLM` (a sliding window).

`ModelArgs` holds their Hugging Face configs' fields under the same names; a parameter's name is its
Hugging Face key without "model.". This file needs torch alone: Hugging Face folders are the tool's
job (opt_deus_tool/checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings")
MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass
class ModelArgs:
    # Names, meanings and defaults are those of Hugging Face's LlamaConfig; the family's own below.
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
    rope_scaling: dict | None = None  # None (plain RoPE) or Llama 3.1's {"rope_type": "llama3"...}
    model_type: str = "llama"  # the family: one of MODEL_TYPES (qwen2 always biases q, k and v)
    attention_bias: bool = False  # llama, qwen3: biases on q, k, v and o
    mlp_bias: bool = False  # llama: biases on gate, up and down
    sliding_window: int | None = None  # mistral: every layer's; qwen2/3: layer_types' sliding ones
    use_sliding_window: bool = False  # qwen2/3: without it no layer slides
    max_window_layers: int = 28  # qwen2/3: the first sliding layer, when layer_types is not given
    layer_types: list[str] | None = None  # qwen2/3: "full_attention" or "sliding_attention" each
    dtype: str | None = None  # the weights' dtype as config.json states it ("bfloat16"), if it does
    extra: dict = field(default_factory=dict)  # every other config.json key (growth's "opt_deus")
    hf_style: str = "v5"  # config.json's RoPE/dtype: "v5" (rope_parameters) or "v4" (rope_theta)

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        scaling = self.rope_scaling or {}
        rope_type = scaling.get("rope_type", "default")
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope type {rope_type!r} is not supported ('default' and 'llama3')")
        missing = [k for k in LLAMA3_ROPE_KEYS if rope_type == "llama3" and k not in scaling]
        if missing:
            raise ValueError(f"llama3 rope scaling is missing {', '.join(missing)}")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not one of {MODEL_TYPES}")
        if self.model_type in ("qwen2", "qwen3") and self.layer_types is None:  # as Qwen2Config
            slides = self.use_sliding_window and self.sliding_window is not None
            self.layer_types = ["sliding_attention" if slides and i >= self.max_window_layers
                                else "full_attention" for i in range(self.num_hidden_layers)]


def layer_window(args: ModelArgs, layer: int) -> int | None:
    # How many positions back (itself included) a query of this layer sees; None: all before it.
    if args.model_type == "mistral":
        return args.sliding_window
    sliding = args.layer_types is not None and args.layer_types[layer] == "sliding_attention"
    return args.sliding_window if sliding and args.use_sliding_window else None


def rope_cos_sin(args: ModelArgs, positions: torch.Tensor, dtype: torch.dtype):
    # positions (T,) -> cos, sin (T, head_dim), in the "rotate half" layout of Hugging Face
    # checkpoints: dimension j pairs with j + head_dim/2. Computed in float32, then cast like HF.
    exponents = torch.arange(0, args.head_dim, 2, dtype=torch.int64, device=positions.device)
    exponents = exponents.float() / args.head_dim
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
    def __init__(self, args: ModelArgs, window: int | None = None):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = d = args.head_dim
        self.sliding_window = window
        qkv_bias = args.attention_bias or args.model_type == "qwen2"
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * d, bias=qkv_bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * d, bias=qkv_bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * d, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * d, args.hidden_size, bias=args.attention_bias)
        qk_norm = args.model_type == "qwen3"  # Qwen3: an RMSNorm over each query and key head
        self.q_norm = RMSNorm(d, args.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(d, args.rms_norm_eps) if qk_norm else None

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:  # the same gain for every head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # Query head h reads key/value head h // (n_heads / n_kv_heads): the GQA grouping that
        # structured alignment in opt_deus.py must respect.
        gqa, mask = self.n_heads != self.n_kv_heads, None
        if self.sliding_window is not None and T > self.sliding_window:
            # A sliding window: query i sees keys i - window < j <= i (transformers' mask).
            i = torch.arange(T, device=x.device)
            mask = (i[:, None] >= i) & (i[:, None] - i < self.sliding_window)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=gqa)  # (B, heads, T, d)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x):
        # SwiGLU: down_proj reads (B, T, intermediate), one value per MLP neuron
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, window: int | None = None):  # window: layer_window's
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, window)
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
        # A block knows nothing of its depth (its attention window, if any, travels with it): growth
        # can insert, remove and reorder blocks freely.
        self.layers = nn.ModuleList(Block(args, layer_window(args, i))
                                    for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = (None if args.tie_word_embeddings
                        else nn.Linear(args.hidden_size, args.vocab_size, bias=False))

    def init_weights(self, generator: torch.Generator | None = None, std: float = 0.02):
        # For models trained from scratch: N(0, std²) weights and unit norm gains, with the output
        # projections scaled by 1/sqrt(2·depth) as in GPT-2: the residual stream stays bounded.
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                elif name.endswith(("o_proj.weight", "down_proj.weight")):
                    p.normal_(0.0, std * (1 / math.sqrt(2 * len(self.layers))), generator=generator)
                else:
                    p.normal_(0.0, std, generator=generator)
        return self

    def embed(self, input_ids: torch.Tensor):
        # input_ids (B, T) -> the residual stream's start x (B, T, h), and the RoPE tables.
        x = self.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return (x, *rope_cos_sin(self.args, positions, x.dtype))

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
