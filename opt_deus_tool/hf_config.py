"""config.json <-> model.ModelArgs: a Hugging Face LLaMA config read strictly and written back as it was read.

transformers 5 writes RoPE as `rope_parameters` (with rope_theta inside) and `dtype`; 4.x wrote `rope_theta`,
`rope_scaling` and `torch_dtype` at the top level. Both are read; a config is written back in its own style,
with every key we do not model kept unchanged. Anything that would change the function computed but that
model.py does not implement is refused by name, never approximated.
"""

from __future__ import annotations

import math

from opt_deus_core.model import LLAMA3_ROPE_KEYS, ModelArgs
from opt_deus_tool import CheckpointError

# LlamaConfig keys that change the function computed but that we do not implement: a config that sets
# one to anything but this default is refused.
UNSUPPORTED_IF_SET = {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "sliding_window": None,
                      "num_local_experts": None, "num_experts": None, "partial_rotary_factor": None,
                      "layer_types": None}
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# The ModelArgs fields config.json holds under the same name, by type.
INT_KEYS = (*REQUIRED_KEYS, "num_key_value_heads", "head_dim", "max_position_embeddings")
FLOAT_KEYS = ("rms_norm_eps", "rope_theta")
BOOL_KEYS = ("tie_word_embeddings",)
PLAIN_KEYS = (*INT_KEYS, "rms_norm_eps", *BOOL_KEYS)


def args_from_config(config: dict) -> ModelArgs:
    """The ModelArgs of a config.json's contents; CheckpointError names the first key we refuse."""
    check_config(config)
    config = dict(config)
    hf_style = "v5" if "rope_parameters" in config else "v4"
    v4_rope = rope_of(config.pop("rope_scaling", None), config.pop("rope_theta", None))
    rope_type, rope, rope_theta = v4_rope
    if hf_style == "v5":
        v5_parameters = dict(config.pop("rope_parameters") or {})
        rope_type, rope, rope_theta = rope_of(v5_parameters, v5_parameters.pop("rope_theta", None))
        if v4_rope != (rope_type, rope, rope_theta) and v4_rope != ("default", {}, None):
            # Both styles at once, disagreeing: transformers and we could read different models. Refuse.
            raise CheckpointError(f"config keys rope_parameters ({rope_type}, theta {rope_theta}) and rope_scaling/"
                                  f"rope_theta ({v4_rope[0]}, theta {v4_rope[2]}) disagree; keep one of them")
    dtype, torch_dtype = config.pop("dtype", None), config.pop("torch_dtype", None)
    # null in config.json means "not set": the field keeps its default.
    values = {key: config.pop(key, None) for key in PLAIN_KEYS}
    values = {key: value for key, value in values.items() if value is not None}
    values.setdefault("num_key_value_heads", values["num_attention_heads"])
    values.setdefault("head_dim", values["hidden_size"] // values["num_attention_heads"])
    values["rms_norm_eps"] = float(values.get("rms_norm_eps", 1e-6))
    try:
        return ModelArgs(**values, rope_theta=float(rope_theta or 10000.0),
                         rope_scaling=None if rope_type == "default" else {"rope_type": rope_type, **rope},
                         dtype=dtype or torch_dtype, extra=config, hf_style=hf_style)
    except ValueError as e:  # ModelArgs' own checks (head counts, rope type)
        raise CheckpointError(str(e)) from None


def rope_of(scaling: dict | None, theta) -> tuple[str, dict, float | None]:
    # (rope type, its parameters, rope_theta); 4.x configs sometimes spell the rope type "type".
    rope = dict(scaling or {})
    rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    return rope_type, rope, theta


def config_from_args(args: ModelArgs) -> dict:
    """config.json's contents for `args`, in the style it was read in, keys sorted."""
    config = {**args.extra, "model_type": "llama", **{key: getattr(args, key) for key in PLAIN_KEYS}}
    config.setdefault("architectures", ["LlamaForCausalLM"])
    config.setdefault("hidden_act", "silu")
    if args.hf_style == "v5":
        rope = args.rope_scaling or {"rope_type": "default"}
        config["rope_parameters"] = {**rope, "rope_theta": args.rope_theta}
    else:
        config.update(rope_theta=args.rope_theta, rope_scaling=args.rope_scaling)
    if args.dtype is not None:
        config["dtype" if args.hf_style == "v5" else "torch_dtype"] = args.dtype
    return dict(sorted(config.items()))


def check_config(config: dict):
    # A malformed config.json (a string where a number belongs, a list for the rope parameters) is
    # refused by key before anything computes with it.
    if not isinstance(config, dict):
        raise CheckpointError(f"expected a JSON object, got {type(config).__name__}")
    for key in REQUIRED_KEYS:
        check_value(key, config.get(key), int)
    for key, value in config.items():
        if value is not None:
            check_value(key, value, int if key in INT_KEYS else float if key in FLOAT_KEYS else
                        bool if key in BOOL_KEYS else None)
    for key in ("rope_parameters", "rope_scaling"):
        rope = config.get(key)
        if rope is not None and not isinstance(rope, dict):
            raise CheckpointError(f"config key {key} must be an object, got {rope!r}")
        for name in ("rope_theta", *LLAMA3_ROPE_KEYS):
            if rope and name in rope:
                check_value(f"{key}.{name}", rope[name], float)
    if config.get("opt_deus") is not None and not isinstance(config["opt_deus"], dict):
        raise CheckpointError(f"config key opt_deus (the growth record) must be an object, got {config['opt_deus']!r}")
    if config.get("model_type") != "llama":
        raise CheckpointError(f"model_type={config.get('model_type')!r}: only LLaMA checkpoints "
                              f"(model_type 'llama') are supported")
    for key, default in UNSUPPORTED_IF_SET.items():
        if config.get(key) not in (None, default):
            raise CheckpointError(f"config key {key}={config[key]!r} is not supported (expected {default!r})")


def check_value(key: str, value, kind: type | None):
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int and not (is_number and isinstance(value, int) and value > 0):
        raise CheckpointError(f"config key {key} must be a positive integer, got {value!r}")
    if kind is float and not (is_number and 0 < value < math.inf):
        raise CheckpointError(f"config key {key} must be a positive finite number, got {value!r}")
    if kind is bool and not isinstance(value, bool):
        raise CheckpointError(f"config key {key} must be true or false, got {value!r}")
