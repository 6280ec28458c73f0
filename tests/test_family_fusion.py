"""Issue 30, fusion: biases move with their output neurons and per-head norms stay valid, under every alignment.

A block here may carry q/k/v biases (Qwen2), o and MLP biases (LLaMA's attention_bias / mlp_bias) and Qwen3's
per-head q_norm / k_norm. These tests are on block dicts, so they hold whatever model.py computes; the
function-level claims (a permuted block computes the same, zero-init growth keeps the base's function) are in
tests/test_families.py-style tests below, per family.
"""

import copy

import pytest
import torch

from opt_deus_core.opt_deus import GrowthOptions, grow, make_new_block, paper_fuse, structured_fuse
from test_fusion import unit_block
from test_opt_deus import heads, permute_block, plan, tiny_args

ARGS = tiny_args(kv_heads=2, group=2, head_dim=4, hidden=16, intermediate=24)
BIASES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj")


def family_block(seed: int, biases=BIASES, qk_norm=True) -> dict:
    generator = torch.Generator().manual_seed(seed + 1000)
    block = unit_block(seed, ARGS)
    for name in biases:
        block[f"{name}.bias"] = torch.randn(block[f"{name}.weight"].shape[0], generator=generator)
    if qk_norm:
        for name in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):
            block[name] = torch.rand(ARGS.head_dim, generator=generator) + 0.5
    return block


@pytest.mark.parametrize("seed", range(4))
def test_structured_fusion_with_a_permuted_copy_gives_back_biases_and_norms(seed):
    block = family_block(seed)
    permuted = permute_block(block, ARGS, torch.Generator().manual_seed(seed + 1))
    # the symmetry moved the biases of q, k, v, gate and up with their units (not o's or down's: residual side)
    for name in ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        assert not torch.equal(permuted[f"{name}.bias"], block[f"{name}.bias"]), name
    for name in ("self_attn.o_proj.bias", "mlp.down_proj.bias", "self_attn.q_norm.weight"):
        assert torch.equal(permuted[name], block[name]), name
    fused, report = structured_fuse(permuted, block, *heads(ARGS), plan(0.0))
    assert sorted(fused) == sorted(block)
    for key in block:
        assert torch.allclose(fused[key], block[key], atol=1e-6), key
    assert "self_attn.q_proj.bias" in report  # norm ratios for biases too


@pytest.mark.parametrize("seed", range(3))
def test_structured_fusion_with_biases_is_invariant_to_symmetries_of_either_layer(seed):
    a, b = family_block(seed), family_block(seed + 50)
    fused, _ = structured_fuse(a, b, *heads(ARGS), plan(0.05))
    moved, _ = structured_fuse(permute_block(a, ARGS, torch.Generator().manual_seed(seed)), b, *heads(ARGS),
                               plan(0.05))
    for key in fused:
        assert torch.allclose(fused[key], moved[key], atol=1e-5), key


def test_paper_fusion_moves_each_bias_with_its_row():
    # A's q rows (and only q's) permuted, with their bias: paper aligns q's rows on their own, exactly at epsilon 0,
    # so the fused q bias is B's. A mutant leaving the bias behind (or averaging it unaligned) fails.
    block = family_block(3, biases=("self_attn.q_proj",), qk_norm=False)
    perm = torch.randperm(block["self_attn.q_proj.weight"].shape[0], generator=torch.Generator().manual_seed(0))
    a = {**block, "self_attn.q_proj.weight": block["self_attn.q_proj.weight"][perm],
         "self_attn.q_proj.bias": block["self_attn.q_proj.bias"][perm]}
    fused, _ = paper_fuse(a, block, plan(0.0, relative=False))
    assert torch.allclose(fused["self_attn.q_proj.bias"], block["self_attn.q_proj.bias"], atol=1e-6)
    assert torch.allclose(fused["self_attn.q_proj.weight"], block["self_attn.q_proj.weight"], atol=1e-6)


@pytest.mark.parametrize("method, align", [("opt", "structured"), ("opt", "paper"), ("opt", "published"),
                                           ("avg", "structured"), ("llama-pro", "structured")])
def test_out_scale_scales_and_zero_init_zeroes_the_output_biases(method, align):
    a, b = family_block(1), family_block(2)
    made = {s: make_new_block([a, b], ARGS, GrowthOptions(method=method, align=align, out_scale=s, max_iter=200))[0]
            for s in (0.0, 0.5, 1.0)}
    for key in ("self_attn.o_proj.bias", "mlp.down_proj.bias", "self_attn.o_proj.weight", "mlp.down_proj.weight"):
        assert not made[0.0][key].any(), key
        assert torch.equal(made[0.5][key], made[1.0][key] * 0.5), key
    for key in ("self_attn.q_proj.bias", "mlp.up_proj.bias", "self_attn.k_norm.weight"):
        assert torch.equal(made[0.0][key], made[1.0][key]) and made[1.0][key].any(), key


# ----------------------------------------------------------------------------------------------
# Per family, on real model.py blocks: the symmetry is one (biases and q/k norms included), and zero-init growth
# by every method keeps the base's function through streaming growth, in transformers' own class.

FAMILIES = {  # family -> the config keys that make its block differ from LLaMA's
    "llama": dict(attention_bias=True, mlp_bias=True), "qwen2": dict(use_sliding_window=True, sliding_window=5,
                                                                     max_window_layers=2),
    "qwen3": dict(attention_bias=True), "mistral": dict(sliding_window=6)}


def family_base(family: str, tmp_path, layers: int = 4):
    from test_families import make_hf_model
    config = dict(hidden_size=32, intermediate_size=24, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, vocab_size=61, max_position_embeddings=64,
                  tie_word_embeddings=False, **FAMILIES[family])
    hf = make_hf_model(family, config, seed=3)
    hf.save_pretrained(tmp_path / "base")
    return hf


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_symmetry_of_a_family_block_leaves_its_output_unchanged(family, tmp_path):
    from opt_deus_tool.checkpoint import load_pretrained
    family_base(family, tmp_path)
    model = load_pretrained(tmp_path / "base")
    block = {k: v.detach() for k, v in model.layers[1].state_dict().items()}
    moved = permute_block(block, model.args, torch.Generator().manual_seed(7))
    assert any(not torch.equal(moved[k], block[k]) for k in block if k.endswith(".bias")) or family == "mistral"
    x = torch.randn(2, 12, model.args.hidden_size, generator=torch.Generator().manual_seed(1))
    cos, sin = model.embed(torch.zeros(1, 12, dtype=torch.long))[1:]
    outputs = []
    for tensors in (block, moved):
        layer = copy.deepcopy(model.layers[1])
        layer.load_state_dict(tensors)
        with torch.no_grad():
            outputs.append(layer(x, cos, sin))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method, align", [("opt", "structured"), ("opt", "paper"), ("opt", "published"),
                                           ("avg", "structured"), ("llama-pro", "structured"),
                                           ("solar", "structured"), ("lesa", "structured")])
def test_zero_init_growth_of_every_family_keeps_its_function_in_transformers(family, method, align, tmp_path):
    import transformers

    from opt_deus_tool.checkpoint import load_pretrained
    from opt_deus_tool.grow_cli import grow_checkpoint
    hf_base = family_base(family, tmp_path)
    options = GrowthOptions(method=method, align=align, out_scale=0.0, epsilon=0.05 if align == "structured"
                            else None, max_iter=300, max_marginal_error=float("inf"))
    report = grow_checkpoint(tmp_path / "base", tmp_path / "grown", 2, options=options, log=lambda m: None)
    grown, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "grown", output_loading_info=True)
    assert type(grown) is type(hf_base) and not any(info.values()), info
    assert grown.config.num_hidden_layers == 6 and report["new_layers"]
    tokens = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(grown.eval()(tokens).logits, hf_base(tokens).logits, rtol=0, atol=1e-5)
    # ... and in memory: the same tensors as streaming
    in_memory, _ = grow(load_pretrained(tmp_path / "base"), 2, options=options)
    for (name, a), b in zip(in_memory.state_dict().items(), load_pretrained(tmp_path / "grown").state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
