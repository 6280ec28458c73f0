"""The fused weights themselves, with zero-init off.

With zero-init on, a new layer's o_proj and down_proj are zero and the grown model computes the base
function whatever the other fused weights are, so the output-equivalence tests cannot see a wrong
fusion. These tests pin every tensor of a new layer made by make_new_block (out_scale=1.0).
"""

import pytest
import torch

from opt_deus_core.model import Block
from opt_deus_core.opt_deus import GrowthOptions, make_new_block
from opt_deus_tool.checkpoint import BLOCK_KEYS
from test_opt_deus import permute_block, tiny_args

ARGS = tiny_args(kv_heads=2, group=2, head_dim=4, hidden=16, intermediate=24)
# Sharp plans at every epsilon below: unit-scale weights put distinct rows several units apart, so
# the paper's absolute 0.06 (and the relative epsilons) are far below the gap between matches.
# Sinkhorn plans are accepted at a relative marginal error of GrowthOptions.tol = 1e-4, so an aligned
# weight may be off by about tol times its largest entry: that is the tolerance (measured: <= 4e-5
# at entries of ~4); exact assignment (epsilon 0) must give the weights bit for bit.
ALIGNMENTS = [("paper", 0.0), ("paper", None), ("structured", 0.0), ("structured", None), ("structured", 0.05)]


def unit_block(seed: int, args=ARGS) -> dict:
    # Unit-scale weights (not the 0.02 init) so that distinct rows are far apart; norm gains away from 1.
    generator = torch.Generator().manual_seed(seed)
    block = {}
    for key, value in Block(args).state_dict().items():
        if "norm" in key:
            block[key] = torch.rand(value.shape, generator=generator) + 0.5
        else:
            block[key] = torch.randn(value.shape, generator=generator)
    return block


def assert_fused_equal(fused_weight, expected, epsilon, key):
    if epsilon == 0:
        assert torch.equal(fused_weight, expected), key
    else:
        tolerance = GrowthOptions().tol * expected.abs().max().item()
        torch.testing.assert_close(fused_weight, expected, rtol=0, atol=tolerance, msg=key)


def fused(sources: list[dict], method="opt", align="structured", epsilon=None, args=ARGS) -> dict:
    options = GrowthOptions(method=method, align=align, epsilon=epsilon, out_scale=1.0)
    block, _ = make_new_block(sources, args, options)
    assert set(block) == set(BLOCK_KEYS)
    return block


def test_avg_new_layer_is_the_exact_elementwise_mean_of_its_two_sources():
    a, b = unit_block(0), unit_block(1)
    block = fused([a, b], method="avg")
    for key in BLOCK_KEYS:
        assert torch.equal(block[key], (a[key] + b[key]) / 2), key


@pytest.mark.parametrize("align, epsilon", ALIGNMENTS)
def test_aligning_a_block_with_itself_returns_the_block(align, epsilon):
    a = unit_block(2)
    block = fused([a, {k: v.clone() for k, v in a.items()}], align=align, epsilon=epsilon)
    for key in BLOCK_KEYS:
        assert_fused_equal(block[key], a[key], epsilon, key)


@pytest.mark.parametrize("epsilon", [0.0, None, 0.05])
@pytest.mark.parametrize("kv_heads, group, seed", [(1, 3, 3), (2, 2, 4), (3, 1, 5)])
def test_structured_fusion_of_a_block_with_a_symmetry_permuted_copy_returns_the_copy(kv_heads, group, seed, epsilon):
    # B is A moved by a symmetry of the block (kv groups, heads within a group, value dims, MLP
    # neurons): structured alignment finds that symmetry and the fused layer is B.
    args = tiny_args(kv_heads, group, head_dim=4, hidden=16, intermediate=24)
    a = unit_block(seed, args)
    b = permute_block(a, args, torch.Generator().manual_seed(seed + 100))
    assert not torch.equal(a["mlp.gate_proj.weight"], b["mlp.gate_proj.weight"])
    block = fused([a, b], align="structured", epsilon=epsilon, args=args)
    for key in BLOCK_KEYS:
        assert_fused_equal(block[key], b[key], epsilon, key)


MATRICES = [key for key in BLOCK_KEYS if "norm" not in key]


def plant_row_permutations(a: dict, norms: dict, generator: torch.Generator) -> tuple[dict, torch.Tensor]:
    # What Algorithm 1 can detect: it aligns each matrix's rows on its own and moves gate's and up's
    # input columns with the plan T_o found on o_proj's rows (the hidden dimensions). So B is A with
    # its own random row permutation of q, k, v, gate, up and down, and one permutation `hidden` of
    # o's rows that also permutes gate's and up's columns. B's norm gains are those of `norms`.
    h, n = ARGS.hidden_size, ARGS.intermediate_size
    hidden = torch.randperm(h, generator=generator)
    b = {}
    for proj in ("q_proj", "k_proj", "v_proj"):
        key = f"self_attn.{proj}.weight"
        b[key] = a[key][torch.randperm(a[key].shape[0], generator=generator)]
    b["self_attn.o_proj.weight"] = a["self_attn.o_proj.weight"][hidden]
    for proj in ("gate_proj", "up_proj"):
        key = f"mlp.{proj}.weight"
        b[key] = a[key][torch.randperm(n, generator=generator)][:, hidden]
    b["mlp.down_proj.weight"] = a["mlp.down_proj.weight"][torch.randperm(h, generator=generator)]
    for key in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        b[key] = norms[key]
    return b, hidden


@pytest.mark.parametrize("epsilon", [0.0, None])
def test_paper_fusion_recovers_planted_row_permutations(epsilon):
    # The fused matrices are exactly B's. input_layernorm is the plain mean; post_attention_layernorm
    # the mean of B's gain and A's gain through T_in = (T_o + I) / 2 (Algorithm 1 line 6).
    a = unit_block(6)
    b, hidden = plant_row_permutations(a, unit_block(7), torch.Generator().manual_seed(8))
    block = fused([a, b], align="paper", epsilon=epsilon)
    post = "post_attention_layernorm.weight"
    expected = {**b, "input_layernorm.weight": (a["input_layernorm.weight"] + b["input_layernorm.weight"]) / 2,
                post: ((a[post][hidden] + a[post]) / 2 + b[post]) / 2}
    for key in BLOCK_KEYS:
        assert_fused_equal(block[key], expected[key], epsilon, key)


@pytest.mark.parametrize("align", ["structured", "paper"])
def test_fused_matrices_are_the_mean_of_the_aligned_and_a_perturbed_permuted_copy(align):
    # B = A moved by a permutation the alignment detects, plus noise 100x smaller than the distance
    # between rows: the plan is still that permutation, and each fused matrix is the mean of A moved
    # into B's order and B (Algorithm 1 line 9), not B itself. Pins the 1/2 that a copy of A hides.
    a, generator = unit_block(9), torch.Generator().manual_seed(10)
    if align == "structured":
        moved = permute_block(a, ARGS, generator)
    else:
        moved, _ = plant_row_permutations(a, a, generator)
    b = dict(moved)
    for key in MATRICES:
        b[key] = moved[key] + 0.01 * torch.randn(moved[key].shape, generator=generator)
    block = fused([a, b], align=align, epsilon=0.0)
    for key in MATRICES:
        torch.testing.assert_close(block[key], (moved[key] + b[key]) / 2, rtol=0, atol=1e-6, msg=key)
