"""model.py against transformers' LlamaForCausalLM, and the checkpoint I/O's strictness (opt_deus_tool)."""

import dataclasses
import json
import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from opt_deus_core.model import ModelArgs, Transformer
from opt_deus_tool import CheckpointError
from opt_deus_tool.checkpoint import (BLOCK_KEYS, CheckpointReader, CheckpointWriter, expected_shapes, hf_key,
                                      load_pretrained, save_pretrained)
from opt_deus_tool.hf_config import args_from_config, config_from_args

transformers = pytest.importorskip("transformers")


@st.composite
def hf_configs(draw):
    kv_heads = draw(st.sampled_from([1, 2, 3]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 4]))
    # head_dim is drawn independently of hidden/heads: real checkpoints (Gemma-like, some Llama
    # variants) break that ratio, and RoPE/GQA reshapes must not assume it.
    head_dim = draw(st.sampled_from([4, 8, 16]))
    hidden = heads * draw(st.sampled_from([4, 8, 12]))
    rope_scaling = None
    if draw(st.booleans()):
        rope_scaling = {"rope_type": "llama3", "factor": draw(st.sampled_from([8.0, 32.0])),
                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 16}
    return dict(
        hidden_size=hidden, intermediate_size=draw(st.integers(8, 48)),
        num_hidden_layers=draw(st.integers(1, 3)), num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, vocab_size=draw(st.integers(20, 90)), tie_word_embeddings=draw(st.booleans()),
        rope_theta=draw(st.sampled_from([100.0, 10000.0, 500000.0])), rope_scaling=rope_scaling,
        rms_norm_eps=draw(st.sampled_from([1e-5, 1e-6])), max_position_embeddings=64,
    ), draw(st.sampled_from(["v4", "v5"])), draw(st.integers(0, 2**31 - 1))


def save_hf_model(config_kwargs, style, seed, path):
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_kwargs)).float().eval()
    with torch.no_grad():  # non-trivial norm gains, so a swapped norm would be caught
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(path)
    if style == "v4":  # rewrite config.json as transformers 4.x wrote it
        config = json.loads((path / "config.json").read_text())
        rope = config.pop("rope_parameters")
        config["rope_theta"] = rope.pop("rope_theta")
        config["rope_scaling"] = None if rope["rope_type"] == "default" else rope
        config["torch_dtype"] = config.pop("dtype", "float32")
        (path / "config.json").write_text(json.dumps(config))
    return hf


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn=hf_configs())
def test_logits_match_transformers_and_round_trip(drawn, tmp_path_factory):
    config_kwargs, style, seed = drawn
    base_dir = tmp_path_factory.mktemp("hf")
    hf = save_hf_model(config_kwargs, style, seed, base_dir)
    ours = load_pretrained(base_dir, dtype=torch.float32).eval()
    tokens = torch.randint(0, config_kwargs["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    assert (got - expected).abs().max().item() <= 1e-5

    # Save/load round trips are bit-identical, single-file and sharded; transformers loads both.
    total_bytes = sum(p.numel() * p.element_size() for p in ours.state_dict().values())
    for shard_size in ("5GB", total_bytes // 3):
        out = tmp_path_factory.mktemp("ours")
        save_pretrained(ours, out, max_shard_size=shard_size)
        assert (out / "model.safetensors.index.json").is_file() == (shard_size != "5GB")
        reloaded = load_pretrained(out)
        for (name, a), (_, b) in zip(ours.state_dict().items(), reloaded.state_dict().items()):
            assert torch.equal(a, b), name
        assert reloaded.args.rope_scaling == ours.args.rope_scaling
        assert reloaded.args.rope_theta == ours.args.rope_theta
        hf_reloaded = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            assert (hf_reloaded(tokens).logits - expected).abs().max().item() <= 1e-5


def test_config_round_trip_preserves_unmodelled_keys_and_style():
    v4 = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
          "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
          "rope_theta": 500000.0, "torch_dtype": "bfloat16", "bos_token_id": 7, "eos_token_id": [8, 9],
          "rope_scaling": {"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}, "custom_field": {"kept": True}}
    args = args_from_config(v4)
    assert args.head_dim == 4 and args.hf_style == "v4" and args.dtype == "bfloat16"
    assert args.rope_scaling["rope_type"] == "llama3"
    out = config_from_args(args)
    assert out["custom_field"] == {"kept": True} and out["eos_token_id"] == [8, 9]
    assert out["rope_theta"] == 500000.0 and out["torch_dtype"] == "bfloat16" and "rope_parameters" not in out
    assert config_from_args(args_from_config(out)) == out

    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4}
    v5["dtype"] = "float32"
    args5 = args_from_config(v5)
    assert args5.rope_scaling is None and args5.rope_theta == 1e4 and args5.hf_style == "v5"
    assert config_from_args(args_from_config(config_from_args(args5))) == config_from_args(args5)


# ----------------------------------------------------------------------------------------------
# Bad input: one clear error naming what and where, nothing half-written.

TINY = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=32, tie_word_embeddings=False)


@pytest.fixture
def tiny_dir(tmp_path):
    save_hf_model(TINY, "v5", 0, tmp_path / "base")
    return tmp_path / "base"


def test_rejects_missing_folder_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        CheckpointReader(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json: missing"):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize("key, value, message", [
    ("model_type", "gemma", "model_type='gemma' is not supported"),
    ("model_type", "qwen2_moe", "model_type='qwen2_moe' is not supported"),
    ("model_type", "llama4", "model_type='llama4' is not supported"),
    ("sliding_window", 4096, "sliding_window"),
    ("layer_types", ["full_attention"] * 2, "layer_types"),
    ("num_local_experts", 8, "num_local_experts"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}, "yarn"),
])
def test_rejects_unsupported_configs(tiny_dir, key, value, message):
    config = json.loads((tiny_dir / "config.json").read_text())
    config[key] = value
    (tiny_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(tiny_dir)


def test_rejects_missing_extra_and_misshaped_tensors(tiny_dir):
    tensors = load_file(tiny_dir / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.weight"

    broken = {k: v for k, v in tensors.items() if k != key}
    save_file(broken, tiny_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"missing tensor {key}"):
        load_pretrained(tiny_dir)

    save_file({**tensors, "model.layers.0.self_attn.q_proj.bias": torch.zeros(16)}, tiny_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="q_proj.bias.*not part of a llama model with this config"):
        load_pretrained(tiny_dir)

    save_file({**tensors, key: torch.zeros(24, 15)}, tiny_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"{key} has shape \\[24, 15\\]"):
        load_pretrained(tiny_dir)


def test_rejects_truncated_safetensors(tiny_dir):
    path = tiny_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(tiny_dir).state_dict()


def test_failed_save_leaves_existing_target_untouched(tiny_dir, tmp_path):
    model = load_pretrained(tiny_dir)
    target = tmp_path / "out"
    save_pretrained(model, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(target, overwrite=True) as writer:
            writer.add("model.norm.weight", torch.ones(3))
            raise RuntimeError("boom")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(CheckpointError, match="already exists"):
        CheckpointWriter(target, overwrite=False)


def test_copies_tokenizer_files(tiny_dir, tmp_path):
    (tiny_dir / "tokenizer.json").write_text("{}")
    save_pretrained(load_pretrained(tiny_dir), tmp_path / "out", copy_files_from=tiny_dir)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"


def test_expected_shapes_and_block_keys_match_the_model():
    # The checkpoint I/O's table of shapes is written out by hand; it must be the model's own.
    for tied in (False, True):
        args = ModelArgs(vocab_size=11, hidden_size=12, intermediate_size=20, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=4, tie_word_embeddings=tied)
        model = Transformer(args)
        assert expected_shapes(args) == {hf_key(name): tuple(t.shape) for name, t in model.state_dict().items()}
        assert set(BLOCK_KEYS) == set(model.layers[0].state_dict())


BASE_CONFIG = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
               "num_hidden_layers": 2, "num_attention_heads": 2}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


@pytest.mark.parametrize("key, value, message", [
    ("vocab_size", None, "vocab_size must be a positive integer, got None"),
    ("hidden_size", True, "hidden_size must be a positive integer, got True"),
    ("num_hidden_layers", 2.0, "num_hidden_layers must be a positive integer"),
    ("head_dim", 0, "head_dim must be a positive integer"),
    ("max_position_embeddings", "2048", "max_position_embeddings must be a positive integer"),
    ("rms_norm_eps", "1e-6", "rms_norm_eps must be a positive finite number"),
    ("rope_theta", math.inf, "rope_theta must be a positive finite number"),
    ("tie_word_embeddings", 1, "tie_word_embeddings must be true or false"),
    ("rope_scaling", "llama3", "rope_scaling must be an object"),
    ("rope_parameters", {**LLAMA3, "factor": math.nan}, "rope_parameters.factor must be a positive finite"),
    ("rope_parameters", {"rope_type": "llama3", "factor": 8.0}, "missing low_freq_factor"),
    ("num_key_value_heads", 3, "not a multiple of num_key_value_heads=3"),
    ("hidden_act", "gelu", "hidden_act='gelu' is not supported"),
])
def test_config_values_of_the_wrong_type_are_refused_by_key(key, value, message):
    with pytest.raises(CheckpointError, match=re.escape(message)):
        args_from_config({**BASE_CONFIG, key: value})


def test_null_config_values_mean_not_set():
    nulls = dict.fromkeys(["num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                           "tie_word_embeddings", "rope_theta", "rope_scaling", "attention_bias", "sliding_window"])
    args = args_from_config({**BASE_CONFIG, **nulls})
    assert args == dataclasses.replace(args_from_config(BASE_CONFIG), extra=args.extra)
    assert args.head_dim == 4 and args.num_key_value_heads == 2 and args.rope_theta == 10000.0


@pytest.mark.parametrize("case, message", [
    ("config-not-json", "config.json: not valid JSON"),
    ("index-not-json", "model.safetensors.index.json: not a safetensors index"),
    ("index-without-weight-map", "not a safetensors index"),
    ("shard-missing", "listed in model.safetensors.index.json but missing"),
    ("index-lies-about-a-shard", "tensor model.norm.weight listed in the index but not in the file"),
    ("shard-truncated", "corrupt or truncated safetensors file"),
    ("tied-head-differs", "tie_word_embeddings is true but lm_head.weight differs"),
])
def test_rejects_broken_checkpoint_folders(tmp_path, case, message):
    args = ModelArgs(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)
    folder = tmp_path / "model"
    save_pretrained(Transformer(args).init_weights(torch.Generator().manual_seed(0)), folder, max_shard_size=2000)
    index = folder / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    norm_shard = folder / weight_map["model.norm.weight"]
    if case == "config-not-json":
        (folder / "config.json").write_text("{")
    elif case == "index-not-json":
        index.write_text("{")
    elif case == "index-without-weight-map":
        index.write_text("{}")
    elif case == "shard-missing":
        norm_shard.unlink()
    elif case == "index-lies-about-a-shard":
        other = next(name for name in sorted(set(weight_map.values())) if folder / name != norm_shard)
        index.write_text(json.dumps({"weight_map": {**weight_map, "model.norm.weight": other}}))
    elif case == "shard-truncated":
        norm_shard.write_bytes(norm_shard.read_bytes()[:-4])
    elif case == "tied-head-differs":
        head = torch.zeros(32, 16)
        save_file({"lm_head.weight": head}, folder / "head.safetensors")
        index.write_text(json.dumps({"weight_map": {**weight_map, "lm_head.weight": "head.safetensors"}}))
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_pretrained(folder)


def test_writer_refuses_a_key_twice_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="model.norm.weight written twice"):
        with CheckpointWriter(tmp_path / "out") as writer:
            writer.add("model.norm.weight", torch.ones(3))
            writer.add("model.norm.weight", torch.ones(3))
    assert list(tmp_path.iterdir()) == []
