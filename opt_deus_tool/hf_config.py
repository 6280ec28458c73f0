"""config.json <-> model.ModelArgs: a Hugging Face config of a LLaMA-style family (llama, qwen2, qwen3, mistral)
read strictly and written back as it was read.

transformers 5 writes RoPE as `rope_parameters` (with rope_theta inside) and `dtype`; 4.x wrote `rope_theta`,
`rope_scaling` and `torch_dtype` at the top level. Both are read; a config is written back in its own style,
with every key we do not model kept unchanged. Anything that would change the function computed but that
model.py does not implement is refused by name, never approximated; so is every other model_type.

A family's own keys (FAMILIES) are read into ModelArgs with transformers' defaults for the family and also stay
in `extra` as read, so that one the config did not have is written back only when its value is not the
default. Growth changes the layer count: the per-layer settings (`layer_types`, and `max_window_layers` that
places them) follow the growth record's sources (opt_deus.grown_args).
"""

from __future__ import annotations

import math

from opt_deus_core.model import LLAMA3_ROPE_KEYS, ModelArgs
from opt_deus_tool import CheckpointError
from opt_deus_tool.growths import GROWTHS, growth_history

# model_type -> (the transformers class config.json names, the family's own keys with its config's defaults).
# In every family q, k, v and o have biases as transformers builds them: llama and qwen3 with attention_bias,
# qwen2 always on q, k and v (no key); gate, up and down only in llama with mlp_bias; qwen3 adds q/k norms.
QWEN_WINDOWS = {"use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28, "layer_types": None}
FAMILIES = {
    "llama": ("LlamaForCausalLM", {"attention_bias": False, "mlp_bias": False}),
    "qwen2": ("Qwen2ForCausalLM", QWEN_WINDOWS),
    "qwen3": ("Qwen3ForCausalLM", {"attention_bias": False, **QWEN_WINDOWS}),
    "mistral": ("MistralForCausalLM", {"sliding_window": 4096}),
}
# Keys that change the function computed but that we do not implement (unless they are the family's own,
# above): a config that sets one to anything but this default is refused.
UNSUPPORTED_IF_SET = {"hidden_act": "silu", "sliding_window": None, "num_local_experts": None, "num_experts": None,
                      "partial_rotary_factor": None, "layer_types": None}
LAYER_TYPES = ("full_attention", "sliding_attention")
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
    # The family's keys stay in `extra` too (config_from_args); null means "not set" except for a window.
    family = {}
    for key, default in FAMILIES[config["model_type"]][1].items():
        value = config.get(key, default)
        family[key] = default if value is None and key != "sliding_window" else value
    # null in config.json means "not set": the field keeps its default.
    values = {key: config.pop(key, None) for key in PLAIN_KEYS}
    values = {key: value for key, value in values.items() if value is not None}
    values.setdefault("num_key_value_heads", values["num_attention_heads"])
    values.setdefault("head_dim", values["hidden_size"] // values["num_attention_heads"])
    values["rms_norm_eps"] = float(values.get("rms_norm_eps", 1e-6))
    try:
        return ModelArgs(**values, **family, model_type=config["model_type"], rope_theta=float(rope_theta or 10000.0),
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
    """config.json's contents for `args`, in the style it was read in, keys sorted (a grown model's
    per-layer lists are opt_deus.grown_args')."""
    if args.layer_types is not None and len(args.layer_types) != args.num_hidden_layers:
        raise CheckpointError(f"layer_types has {len(args.layer_types)} entries for {args.num_hidden_layers} "
                              f"layers (grow with opt_deus.Growth, whose args extend it)")
    architecture, family = FAMILIES[args.model_type]
    config = {**args.extra, "model_type": args.model_type, **{key: getattr(args, key) for key in PLAIN_KEYS}}
    for key, default in family.items():
        if key in args.extra or getattr(args, key) != default:
            config[key] = getattr(args, key)
    if GROWTHS in args.extra:  # a model grown again in memory: its latest growth joins the list (growths.py)
        history, _ = growth_history(args.extra), config.pop(GROWTHS)
        config.update({GROWTHS: history} if len(history) > 1 else {})  # one growth: opt_deus alone, as before
    config.setdefault("architectures", [architecture])
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
    if config.get(GROWTHS) is not None:
        growth_history(config)  # every growth on record must place in this model
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(f"model_type={model_type!r} is not supported: only LLaMA and the families that "
                              f"compute like it are ({', '.join(FAMILIES)})")
    family = FAMILIES[model_type][1]
    for key, default in UNSUPPORTED_IF_SET.items():
        if key not in family and config.get(key) not in (None, default):
            raise CheckpointError(f"config key {key}={config[key]!r} is not supported (expected {default!r})")
    for key in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if key in family and config.get(key) is not None:
            check_value(key, config[key], bool)
    window, layer_types = config.get("sliding_window", family.get("sliding_window")), config.get("layer_types")
    if "sliding_window" in family and window is not None:
        check_value("sliding_window", window, int)
    if "max_window_layers" in family and config.get("max_window_layers") is not None:
        check_value("max_window_layers", config["max_window_layers"], int, minimum=0)
    if "layer_types" in family and layer_types is not None:
        check_layer_types(layer_types, config["num_hidden_layers"],
                          config.get("use_sliding_window") and window is not None)


def check_layer_types(layer_types, num_layers: int, sliding: bool):
    if not (isinstance(layer_types, list) and len(layer_types) == num_layers
            and all(kind in LAYER_TYPES for kind in layer_types)):
        raise CheckpointError(f"config key layer_types must list {' or '.join(LAYER_TYPES)} for each of the "
                              f"{num_layers} layers, got {layer_types!r}")
    if "sliding_attention" in layer_types and not sliding:
        raise CheckpointError("config key layer_types marks sliding_attention layers, but with use_sliding_window "
                              "false or no sliding_window they have no window (transformers refuses to run them)")


def check_value(key: str, value, kind: type | None, minimum: int = 1):
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int and not (is_number and isinstance(value, int) and value >= minimum):
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise CheckpointError(f"config key {key} must be {what}, got {value!r}")
    if kind is float and not (is_number and 0 < value < math.inf):
        raise CheckpointError(f"config key {key} must be a positive finite number, got {value!r}")
    if kind is bool and not isinstance(value, bool):
        raise CheckpointError(f"config key {key} must be true or false, got {value!r}")
