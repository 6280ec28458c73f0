"""Issue 21: output projections scaled instead of zeroed (out_scale), and alignment by activations (cost)."""

import json

import pytest
import torch

from opt_deus_core.model import Block, Transformer
from opt_deus_core.opt_deus import GrowthError, GrowthOptions, block_activations, grow, make_new_block, structured_fuse
from opt_deus_tool.checkpoint import BLOCK_KEYS, load_pretrained, save_pretrained
from opt_deus_tool.grow_cli import build_parser, calibration_pass, grow_checkpoint, main
from opt_deus_tool.checkpoint import CheckpointReader
from test_opt_deus import heads, permute_block, plan, random_model, tiny_args
from test_fusion import unit_block

TOKENS = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(0))


def record_of(tensors: dict, args, x: torch.Tensor) -> dict:
    block = Block(args)
    block.load_state_dict(tensors)
    cos, sin = Transformer(args).embed(torch.zeros(1, x.shape[1], dtype=torch.long))[1:]
    return block_activations(block, x, cos, sin)[1]


@pytest.mark.parametrize("kv_heads, group, seed", [(1, 3, 0), (2, 2, 1), (3, 1, 2)])
def test_activation_alignment_of_a_permuted_copy_gives_back_the_block(kv_heads, group, seed):
    # B is A moved by a symmetry of the block; on the same input, B's heads, value dims and neurons compute
    # A's, permuted. Aligning by those activations finds the symmetry: the fused block is B.
    args = tiny_args(kv_heads, group, head_dim=4, hidden=16, intermediate=24)
    a = unit_block(seed, args)
    b = permute_block(a, args, torch.Generator().manual_seed(seed + 10))
    x = torch.randn(2, 12, args.hidden_size, generator=torch.Generator().manual_seed(seed))
    activations = (record_of(a, args, x), record_of(b, args, x))
    fused, report = structured_fuse(a, b, *heads(args), plan(0.0), activations)
    for key in BLOCK_KEYS:
        torch.testing.assert_close(fused[key], b[key], rtol=0, atol=1e-5, msg=key)
    # ... and weights and activations may disagree: here the costs were not the weights' (a mutant using weights
    # passes only because a permuted copy is found both ways), so pin that the records were read
    with pytest.raises(KeyError):
        structured_fuse(a, b, *heads(args), plan(0.0), ({}, {}))


def test_calibration_pass_hidden_states_are_the_models_own_forward(tmp_path):
    # In memory (grow's) and streaming (grow_checkpoint's, blocks rebuilt from the checkpoint's tensors) alike,
    # the hidden states carried up the stack equal Transformer.forward's, layer by layer, bit for bit.
    model = random_model(tiny_args(layers=4), seed=5).eval()
    save_pretrained(model, tmp_path / "base")
    seen = []
    hooks = [block.register_forward_hook(lambda m, i, o: seen.append(o.detach())) for block in model.layers]
    with torch.no_grad():
        model(TOKENS[:1])
    for h in hooks:
        h.remove()
    with torch.no_grad():
        hidden, cos, sin = model.embed(TOKENS[:1])
    reader = CheckpointReader(tmp_path / "base")
    streamed, run_block = calibration_pass(reader, TOKENS[:1], "cpu")
    in_memory = hidden
    for i, expected in enumerate(seen):
        # and the records: what the model's own block computes on the same input, bit for bit
        with torch.no_grad():
            own = {"self_attn.heads": [], "mlp.swiglu": []}
            hooks = [model.layers[i].self_attn.o_proj.register_forward_pre_hook(
                         lambda m, a: own["self_attn.heads"].append(a[0].float())),
                     model.layers[i].mlp.down_proj.register_forward_pre_hook(
                         lambda m, a: own["mlp.swiglu"].append(a[0].float()))]
            model.layers[i](in_memory, cos, sin)
            for h in hooks:
                h.remove()
        (in_memory, mine), (streamed, theirs) = (block_activations(model.layers[i], in_memory, cos, sin),
                                                 run_block(i, reader.block(i), streamed))
        assert torch.equal(in_memory, expected) and torch.equal(streamed, expected), i
        for record in (mine, theirs):
            assert sorted(record) == sorted(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                             "self_attn.o_proj", "self_attn.heads", "mlp.gate_proj", "mlp.up_proj",
                                             "mlp.down_proj", "mlp.swiglu"])
            assert all(torch.equal(record[k], v[0]) for k, v in own.items())
            assert all(torch.equal(record[k], mine[k]) for k in mine)


def test_out_scale_0_is_zero_init_bit_for_bit_and_1_is_no_zero_init():
    base = random_model(tiny_args(), seed=1)
    for method in ("opt", "avg", "llama-pro"):
        zero, _ = grow(base, 2, options=GrowthOptions(method=method, out_scale=0.0))
        scaled0, _ = grow(base, 2, options=GrowthOptions(method=method, out_scale=0.0))
        plain, _ = grow(base, 2, options=GrowthOptions(method=method, out_scale=1.0))
        scaled1, _ = grow(base, 2, options=GrowthOptions(method=method, out_scale=1.0))
        half, _ = grow(base, 2, options=GrowthOptions(method=method, out_scale=0.5))
        for (name, z), s0, p, s1, h in zip(zero.state_dict().items(), scaled0.state_dict().values(),
                                           plain.state_dict().values(), scaled1.state_dict().values(),
                                           half.state_dict().values()):
            assert torch.equal(z, s0) and torch.equal(p, s1), (method, name)
            scaled = name.endswith(("o_proj.weight", "down_proj.weight")) and not torch.equal(p, z)
            assert torch.equal(h, p * 0.5 if scaled else p), (method, name)
        with torch.no_grad():
            assert torch.equal(scaled0(TOKENS), base(TOKENS))  # out_scale 0 keeps the function


def test_out_scale_is_the_one_number_and_zero_init_its_spelling(tmp_path):
    # out_scale is the one field; zero_init reads it; the command line's --zero-init / --no-zero-init spell 0 / 1
    # and may not be combined with --out-scale.
    assert GrowthOptions(out_scale=0.0).out_scale == 0 and GrowthOptions(method="avg").out_scale == 1
    with pytest.raises(SystemExit) as exit_:
        main(["--base", str(tmp_path), "--out", str(tmp_path / "o"), "--new-layers", "1", "--zero-init",
              "--out-scale", "0.5"])
    assert exit_.value.code == 2
    spelled = {flag: build_parser().parse_args(["--base", "b", "--out", "o", *flag.split()]).out_scale
               for flag in ("--zero-init", "--no-zero-init", "--out-scale 0.3", "")}
    assert spelled == {"--zero-init": 0.0, "--no-zero-init": 1.0, "--out-scale 0.3": 0.3, "": None}
    with pytest.raises(GrowthError, match="`out_scale`"):
        GrowthOptions(out_scale=-1.0)
    assert GrowthOptions(method="opt", out_scale=0.25).out_scale == 0.25
    with pytest.raises(GrowthError, match="`cost`"):
        GrowthOptions(align="published", cost="activations")


def test_activation_growth_streams_as_it_grows_in_memory(tmp_path):
    # The same layers from grow() and from grow_checkpoint(), which carries the calibration tokens up the base as
    # it reads the blocks; they differ from weight-based growth, and the report records the cost.
    model = random_model(tiny_args(layers=4, tied=True), seed=7)
    save_pretrained(model, tmp_path / "base")
    options = dict(method="opt", cost="activations", out_scale=1.0, epsilon=0.05)
    in_memory, _ = grow(model, 2, options=GrowthOptions(**options), calibration=TOKENS[:1])
    report = grow_checkpoint(tmp_path / "base", tmp_path / "grown", 2, options=GrowthOptions(**options),
                             calibration=TOKENS[:1], log=lambda m: None)
    streamed = load_pretrained(tmp_path / "grown")
    for (name, a), b in zip(in_memory.state_dict().items(), streamed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    by_weights, _ = grow(model, 2, options=GrowthOptions(**{**options, "cost": "weights"}))
    new = report["new_layers"][0]
    assert not torch.allclose(by_weights.layers[new].mlp.up_proj.weight, in_memory.layers[new].mlp.up_proj.weight)
    assert report["cost"] == "activations" and report["calibration_tokens"] == 24
    assert json.loads((tmp_path / "grown" / "config.json").read_text())["opt_deus"]["out_scale"] == 1.0
    with pytest.raises(GrowthError, match="calibration"):
        grow(model, 2, options=GrowthOptions(**options))


def test_cli_activation_cost_needs_calibration_text(tmp_path):
    save_pretrained(random_model(tiny_args(layers=4, tied=True), seed=7), tmp_path / "base")
    assert main(["--base", str(tmp_path / "base"), "--out", str(tmp_path / "o"), "--new-layers", "1",
                 "--cost", "activations"]) == 2
    assert not (tmp_path / "o").exists()


def test_structured_mlp_plan_follows_the_swiglu_outputs():
    # B = A, but B's record says its neuron j computes what A's neuron perm[j] does (silu(gate)*up); every other
    # record is A's. The MLP plan must follow the SwiGLU outputs alone, so A's neurons move: gate rows
    # (A[perm] + A)/2. A mutant comparing up_proj (or gate_proj) outputs finds the identity and leaves A.
    args = tiny_args(kv_heads=2, group=2, head_dim=4, hidden=16, intermediate=24)
    a = unit_block(5, args)
    x = torch.randn(1, 10, 16, generator=torch.Generator().manual_seed(0))
    record_a = record_of(a, args, x)
    perm = torch.randperm(args.intermediate_size, generator=torch.Generator().manual_seed(1))
    record_b = {**record_a, "mlp.swiglu": record_a["mlp.swiglu"][..., perm]}
    fused, _ = structured_fuse(a, a, *heads(args), plan(0.0), (record_a, record_b))
    gate = a["mlp.gate_proj.weight"]
    torch.testing.assert_close(fused["mlp.gate_proj.weight"], (gate[perm] + gate) / 2, rtol=0, atol=1e-6)


def test_make_new_block_with_activations_reads_them():
    args = tiny_args(kv_heads=2, group=2, head_dim=4, hidden=16, intermediate=24)
    a, b = unit_block(3, args), unit_block(4, args)
    x = torch.randn(1, 10, 16, generator=torch.Generator().manual_seed(0))
    records = [record_of(a, args, x), record_of(b, args, x)]
    for align in ("structured", "paper"):
        options = GrowthOptions(align=align, cost="activations", out_scale=1.0, epsilon=0.0)
        by_activations, _ = make_new_block([a, b], args, options, records)
        by_weights, _ = make_new_block([a, b], args, GrowthOptions(align=align, out_scale=1.0, epsilon=0.0))
        assert any(not torch.equal(by_activations[k], by_weights[k]) for k in BLOCK_KEYS), align


def test_block_activations_leaves_no_hook_on_the_callers_block_even_when_it_fails():
    # grow() records activations on the user's own model.layers: a forward that raises (here a wrong hidden size,
    # in practice Ctrl-C) must not leave hooks that would keep recording into a stale dict.
    args = tiny_args(kv_heads=2, group=2, head_dim=4, hidden=16, intermediate=24)
    block = Block(args)
    cos, sin = Transformer(args).embed(torch.zeros(1, 5, dtype=torch.long))[1:]
    with pytest.raises(RuntimeError):
        block_activations(block, torch.randn(1, 5, 17), cos, sin)
    assert not any(module._forward_hooks for module in block.modules())
    out, acts = block_activations(block, torch.randn(1, 5, 16), cos, sin)
    assert "mlp.swiglu" in acts and not any(module._forward_hooks for module in block.modules())
