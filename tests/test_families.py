"""model.py and the checkpoint I/O for each LLaMA-style family against transformers: Qwen2ForCausalLM (q/k/v
biases, sliding windows per layer), Qwen3ForCausalLM (q/k norms before RoPE, attention_bias), MistralForCausalLM
(one sliding window) and LlamaForCausalLM with attention_bias / mlp_bias. Per family: logits on hypothesis-drawn
configs, a strict round trip that transformers loads as the same class with no missing or unexpected key,
config.json in the family's own keys, per-layer lists that follow growth; and the real Qwen2.5-Coder-0.5B-Instruct
(the qwen25_dir fixture: tests/qwen.py) read strictly and computed as transformers computes it."""

import copy
import dataclasses
import json
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opt_deus_core.model import ModelArgs, Transformer, layer_window
from opt_deus_tool import CheckpointError
from opt_deus_tool.checkpoint import block_keys, expected_shapes, hf_key, load_pretrained, save_pretrained
from opt_deus_core.opt_deus import grown_args
from opt_deus_tool.hf_config import args_from_config, config_from_args

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()

CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
           "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM")}
T = 24  # tokens per sequence: the drawn windows (2..30) are shorter and longer than it


@st.composite
def family_configs(draw, family: str):
    kv_heads = draw(st.sampled_from([1, 2, 3]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 4]))
    layers = draw(st.integers(1, 3))
    config = dict(
        hidden_size=heads * draw(st.sampled_from([4, 8])), intermediate_size=draw(st.integers(8, 40)),
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=draw(st.sampled_from([4, 8, 16])), vocab_size=draw(st.integers(20, 90)),
        tie_word_embeddings=draw(st.booleans()), rms_norm_eps=draw(st.sampled_from([1e-5, 1e-6])),
        rope_parameters={"rope_type": "default", "rope_theta": draw(st.sampled_from([100.0, 10000.0, 1e6]))},
        max_position_embeddings=64)
    if family in ("llama", "qwen3"):
        config["attention_bias"] = draw(st.booleans())
    if family == "llama":
        config["mlp_bias"] = draw(st.booleans())
    if family in ("qwen2", "qwen3"):
        config.update(use_sliding_window=draw(st.booleans()), sliding_window=draw(st.integers(2, 30)),
                      max_window_layers=draw(st.integers(0, layers)))
    if family == "mistral":
        config["sliding_window"] = draw(st.one_of(st.none(), st.integers(2, 30)))
    return config, draw(st.integers(0, 2**31 - 1))


def make_hf_model(family: str, config: dict, seed: int):
    config_class, model_class = (getattr(transformers, name) for name in CLASSES[family])
    torch.manual_seed(seed)
    hf = model_class(config_class(**config)).float().eval()
    with torch.no_grad():  # non-trivial norm gains and biases (transformers starts them at 1 and 0)
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return hf


def check_family(family: str, config: dict, seed: int, tmp_path_factory) -> float:
    """Our model on transformers' saved folder: the same logits; our save is bit-identical on reload, in the
    family's config keys, and transformers loads it as the same class, strictly. Returns max |logit diff|."""
    base_dir = tmp_path_factory.mktemp("hf")
    hf = make_hf_model(family, config, seed)
    hf.save_pretrained(base_dir)
    ours = load_pretrained(base_dir, dtype=torch.float32).eval()
    assert ours.args.model_type == family
    tokens = torch.randint(0, config["vocab_size"], (2, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-5, diff

    out = tmp_path_factory.mktemp("ours")
    save_pretrained(ours, out)
    written, theirs = (json.loads((folder / "config.json").read_text()) for folder in (out, base_dir))
    assert written == theirs  # every key as transformers wrote it, none added
    reloaded = load_pretrained(out)
    for (name, a), (_, b) in zip(ours.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    hf_reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                         output_loading_info=True)
    assert type(hf_reloaded) is type(hf)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        assert (hf_reloaded.eval()(tokens).logits - expected).abs().max().item() <= 1e-5
    return diff


settings_per_family = settings(max_examples=15, deadline=None,
                               suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings_per_family
@given(drawn=family_configs("qwen2"))
def test_qwen2_matches_transformers(drawn, tmp_path_factory):
    check_family("qwen2", *drawn, tmp_path_factory)


@settings_per_family
@given(drawn=family_configs("qwen3"))
def test_qwen3_matches_transformers(drawn, tmp_path_factory):
    check_family("qwen3", *drawn, tmp_path_factory)


@settings_per_family
@given(drawn=family_configs("mistral"))
def test_mistral_matches_transformers(drawn, tmp_path_factory):
    check_family("mistral", *drawn, tmp_path_factory)


@settings_per_family
@given(drawn=family_configs("llama"))
def test_llama_with_biases_matches_transformers(drawn, tmp_path_factory):
    check_family("llama", *drawn, tmp_path_factory)


# Each family's deltas, pinned on one config each (so a failure names the feature, not a drawn example).
PINNED = {
    "qwen2 q/k/v biases, a window on the top layers": ("qwen2", dict(
        use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "qwen3 q/k norms, attention biases": ("qwen3", dict(attention_bias=True)),
    "mistral window": ("mistral", dict(sliding_window=7)),
    "llama attention and mlp biases": ("llama", dict(attention_bias=True, mlp_bias=True)),
}
SMALL = dict(hidden_size=32, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, vocab_size=40, max_position_embeddings=64)


@pytest.mark.parametrize("case", PINNED)
def test_each_family_delta(case, tmp_path_factory):
    family, delta = PINNED[case]
    check_family(family, {**SMALL, **delta}, 0, tmp_path_factory)


def test_shapes_and_block_keys_are_the_models_per_family():
    for family, delta in PINNED.values():
        args = ModelArgs(**{**SMALL, **delta}, model_type=family)
        model = Transformer(args)
        assert expected_shapes(args) == {hf_key(name): tuple(t.shape) for name, t in model.state_dict().items()}
        assert set(block_keys(args)) == set(model.layers[0].state_dict())
    keys = block_keys(ModelArgs(**SMALL, model_type="qwen3"))
    assert "self_attn.q_norm.weight" in keys and "self_attn.k_norm.weight" in keys
    assert [k for k in block_keys(ModelArgs(**SMALL, model_type="qwen2")) if k.endswith(".bias")] == [
        "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]


def test_windows_are_per_layer_as_transformers_places_them():
    qwen = ModelArgs(**SMALL, model_type="qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=2)
    assert qwen.layer_types == ["full_attention", "full_attention", "sliding_attention"]
    assert [layer_window(qwen, i) for i in range(3)] == [None, None, 5]
    off = dataclasses.replace(qwen, use_sliding_window=False, layer_types=None)
    assert off.layer_types == ["full_attention"] * 3 and layer_window(off, 2) is None
    assert [layer_window(ModelArgs(**SMALL, model_type="mistral", sliding_window=9), i) for i in range(3)] == [9] * 3
    assert layer_window(ModelArgs(**SMALL), 0) is None


# ----------------------------------------------------------------------------------------------
# config.json: the family's keys, refusals, and per-layer lists through growth

def qwen2_config(**changes) -> dict:
    return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 40, "hidden_size": 32,
            "intermediate_size": 24, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rope_theta": 1e6, "torch_dtype": "bfloat16", "use_sliding_window": False, "sliding_window": 32768,
            "max_window_layers": 21, "tie_word_embeddings": True, **changes}


def test_a_qwen25_config_round_trips_in_its_own_keys():
    config = qwen2_config()
    args = args_from_config(config)
    assert args.model_type == "qwen2" and args.sliding_window == 32768 and not args.use_sliding_window
    assert args.layer_types == ["full_attention"] * 4 and all(layer_window(args, i) is None for i in range(4))
    out = config_from_args(args)
    assert {key: out[key] for key in config} == config  # every key kept as it was
    assert set(out) - set(config) == {"head_dim", "hidden_act", "layer_types", "max_position_embeddings",
                                      "rms_norm_eps", "rope_scaling"}  # explicit values of the defaults
    assert config_from_args(args_from_config(out)) == out


def test_family_keys_absent_from_a_config_are_not_added_at_their_defaults():
    llama = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
             "num_hidden_layers": 2, "num_attention_heads": 2}
    out = config_from_args(args_from_config(llama))
    assert "attention_bias" not in out and "mlp_bias" not in out  # a LLaMA config.json as before
    assert config_from_args(args_from_config({**llama, "mlp_bias": False}))["mlp_bias"] is False
    assert config_from_args(dataclasses.replace(args_from_config(llama), attention_bias=True))["attention_bias"]
    # Mistral without the key means transformers' 4096; a null window is kept null, not dropped.
    mistral = {**llama, "model_type": "mistral"}
    assert args_from_config(mistral).sliding_window == 4096
    assert "sliding_window" not in config_from_args(args_from_config(mistral))
    assert config_from_args(args_from_config({**mistral, "sliding_window": None}))["sliding_window"] is None
    # Qwen3: attention_bias read; another family's key is only kept, as transformers ignores it.
    assert args_from_config({**llama, "model_type": "qwen3", "attention_bias": True}).attention_bias
    assert not args_from_config({**llama, "model_type": "qwen2", "attention_bias": True}).attention_bias


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "gemma"}, "model_type='gemma' is not supported"),
    ({"model_type": "gemma3"}, "model_type='gemma3' is not supported"),
    ({"model_type": "llama4"}, "model_type='llama4' is not supported"),
    ({"model_type": "mixtral"}, "model_type='mixtral' is not supported"),
    ({"model_type": "qwen2_moe"}, "model_type='qwen2_moe' is not supported"),
    ({"model_type": "qwen3_moe"}, "model_type='qwen3_moe' is not supported"),
    ({"model_type": None}, "model_type=None is not supported"),
    ({"layer_types": ["full_attention"] * 3}, "layer_types must list full_attention or sliding_attention for "
                                              "each of the 4 layers"),
    ({"layer_types": ["full_attention", "chunked_attention"] * 2}, "layer_types must list"),
    ({"layer_types": ["sliding_attention"] * 4}, "marks sliding_attention layers, but with use_sliding_window false"),
    ({"use_sliding_window": True, "sliding_window": None, "layer_types": ["sliding_attention"] * 4},
     "marks sliding_attention layers"),
    ({"use_sliding_window": 1}, "use_sliding_window must be true or false"),
    ({"sliding_window": 0}, "sliding_window must be a positive integer"),
    ({"max_window_layers": -1}, "max_window_layers must be an integer >= 0"),
    ({"num_experts": 8}, "num_experts=8 is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' is not supported"),
])
def test_unsupported_configs_are_refused_by_name(changes, message):
    with pytest.raises(CheckpointError, match=re.escape(message)):
        args_from_config(qwen2_config(**changes))


def test_other_families_refuse_keys_they_do_not_compute():
    mistral = qwen2_config(model_type="mistral")
    for key in ("use_sliding_window", "max_window_layers"):  # only kept (transformers ignores them)
        mistral.pop(key)
    with pytest.raises(CheckpointError, match="layer_types"):
        args_from_config({**mistral, "layer_types": ["full_attention"] * 4})
    with pytest.raises(CheckpointError, match="sliding_window=32768 is not supported"):
        args_from_config({**mistral, "model_type": "llama"})


SLIDING = dict(use_sliding_window=True, sliding_window=5, max_window_layers=2)


def grown_by_hand(base: Transformer, sources: list[list[int]]) -> Transformer:
    # In-memory growth's mechanics without its fusion: each layer a copy of base layer sources[i][0]
    # (a new one zero-initialised), the record in args.extra.
    grown = copy.deepcopy(base)
    grown.layers = torch.nn.ModuleList(copy.deepcopy(base.layers[s[0]]) for s in sources)
    with torch.no_grad():
        for block, s in zip(grown.layers, sources):
            if len(s) > 1:
                block.self_attn.o_proj.weight.zero_()
                block.mlp.down_proj.weight.zero_()
    record = {"sources": sources, "base_num_layers": len(base.layers), "new_layers": [
        i for i, s in enumerate(sources) if len(s) > 1]}
    grown.args = grown_args(base.args, record)
    return grown


@pytest.mark.parametrize("sources, types, max_window_layers, preserves", [
    # new layers fused from (i, i + 1) take base layer i's type: the gap between the full layer 1 and the
    # sliding layer 2 gets a full one, and the boundary moves up by the layers added below it
    ([[0], [1], [1, 2], [2], [2, 3], [3]], "FFFSSS", 3, True),
    ([[0], [0, 1], [1], [2], [3], [3]], "FFFSSS", 3, False),  # a copy of the last layer on top
    # solar's repeat: out of order, so no boundary implies the list; max_window_layers still counts the
    # full layers' copies (3) and transformers reads layer_types
    ([[0], [1], [2], [1], [2], [3]], "FFSFSS", 3, False),
])
def test_per_layer_lists_follow_growth_in_memory_and_streaming(tmp_path, sources, types, max_window_layers,
                                                               preserves):
    base_hf = make_hf_model("qwen2", {**SMALL, "num_hidden_layers": 4, **SLIDING}, 0)
    base_hf.save_pretrained(tmp_path / "base")
    base = load_pretrained(tmp_path / "base")
    grown = grown_by_hand(base, sources)
    want = [{"F": "full_attention", "S": "sliding_attention"}[t] for t in types]

    # Streaming growth writes config_from_args(Growth.args): opt_deus.grown_args' lists.
    streamed = config_from_args(grown.args)
    assert streamed["layer_types"] == want and streamed["max_window_layers"] == max_window_layers
    assert streamed["num_hidden_layers"] == len(sources)
    # In memory: saved, reloaded by both; the windows travelled with their blocks.
    save_pretrained(grown, tmp_path / "grown", copy_files_from=tmp_path / "base")
    config = json.loads((tmp_path / "grown" / "config.json").read_text())
    assert config == streamed
    assert config_from_args(args_from_config(config)) == config  # a grown config stays as it is
    ours = load_pretrained(tmp_path / "grown")
    assert [b.self_attn.sliding_window for b in ours.layers] == [b.self_attn.sliding_window for b in grown.layers]
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "grown", output_loading_info=True)
    assert type(hf) is transformers.Qwen2ForCausalLM and not info["missing_keys"] and not info["unexpected_keys"]
    tokens = torch.randint(0, SMALL["vocab_size"], (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf.eval()(tokens).logits - grown(tokens)).abs().max() <= 1e-5
        if preserves:  # new layers zero-initialised: the base's function, windows included
            assert (grown(tokens) - base(tokens)).abs().max() <= 1e-5


def test_a_stale_per_layer_list_without_a_record_is_refused():
    args = ModelArgs(**SMALL, model_type="qwen2")
    with pytest.raises(CheckpointError, match="layer_types has 3 entries for 5 layers"):
        config_from_args(dataclasses.replace(args, num_hidden_layers=5))


# ----------------------------------------------------------------------------------------------
# The real Qwen2.5-Coder-0.5B-Instruct (24 layers, q/k/v biases, untied head): read strictly, computed as
# transformers computes it, greedy answer included.

PROMPT = "Write a Python function that returns the square of x."


def test_qwen25_is_read_strictly_and_computes_as_transformers(qwen25_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(qwen25_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    hf, info = transformers.Qwen2ForCausalLM.from_pretrained(qwen25_dir, dtype=torch.float32,
                                                             output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        answer = hf.eval().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
        expected = hf(answer).logits
    del hf  # one 2.5 GB model in memory at a time

    ours = load_pretrained(qwen25_dir).eval()  # strict: every tensor used, every shape checked
    args = ours.args
    assert (args.model_type, args.num_hidden_layers, args.hidden_size, args.head_dim) == ("qwen2", 24, 896, 64)
    assert ours.layers[0].self_attn.q_proj.bias is not None and ours.layers[0].self_attn.o_proj.bias is None
    assert sum(p.numel() for p in ours.parameters()) == 630_167_424
    assert all(b.self_attn.sliding_window is None for b in ours.layers)  # use_sliding_window false
    with torch.no_grad():
        got = ours(answer)
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-4 * expected.abs().max().item(), diff
    # Greedy decoding with our model gives transformers' answer: at each of its prefixes our most likely next
    # token is the one it generated.
    assert torch.equal(got[0, ids.shape[1] - 1:-1].argmax(-1), answer[0, ids.shape[1]:])
    assert "Python function that returns the square" in tokenizer.decode(answer[0, ids.shape[1]:])
