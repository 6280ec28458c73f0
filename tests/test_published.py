"""`--align published` and the paper-setting layouts reproduce the public OpT-DeUS code.

The reference is the public repository (github.com/voalmciaf/OpT-DeUS): Model/OT-DUS.py,
Model/Average.py and Model/LLaMA_PRO&SOLAR.py, which grow a 32-layer base to 48 layers, all on the
CPU in float32 with POT's `ot.sinkhorn`. POT is a test-only dependency: the project's own solver
(sinkhorn.published_sinkhorn) must give the same float32 numbers, bit for bit.
"""

import json
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from opt_deus_core.opt_deus import GrowthError, GrowthOptions, grow, insert_after_for, make_new_block, published_fuse
from opt_deus_tool.checkpoint import BLOCK_KEYS, CheckpointReader, load_pretrained, save_pretrained
from opt_deus_tool.grow_cli import main
from opt_deus_core.sinkhorn import published_sinkhorn
from test_opt_deus import random_model, tiny_args

ot = pytest.importorskip("ot")

TOKENS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 7042, 30, 2]])
OUTPUTS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def pot_plan(cost: torch.Tensor, reg: float = 0.06, max_iter: int = 10000):
    # What Model/OT-DUS.py calls: uniform float32 marginals, POT's default method (sinkhorn_knopp).
    n, m = cost.shape
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan, log = ot.sinkhorn(torch.ones(n) / n, torch.ones(m) / m, cost, reg, numItermax=max_iter, log=True)
    aborted = [str(w.message) for w in caught if "numerical errors" in str(w.message)]
    return plan, log["niter"], bool(aborted)


def public_recipe(A: dict, B: dict, max_iter: int = 10000) -> dict:
    # Model/OT-DUS.py's fusion of the layers below (A) and above (B) a new layer, restated from its
    # description: T = POT plan on cdist of rows; q, k, v, o, down: (T^T A + B)/2; gate, up: A is
    # first multiplied by o_proj's raw plan; the post-attention norm by (T_o + I)/2; the input norm
    # averaged; then o_proj and down_proj zeroed. Keys in Hugging Face's order (o before the MLP).
    def plan(a, b):
        return pot_plan(torch.cdist(a, b, p=2), 0.06, max_iter)[0]

    out, t_o = {}, None
    for key in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                "input_layernorm.weight", "post_attention_layernorm.weight"):
        a, b = A[key], B[key]
        if key == "input_layernorm.weight":
            out[key] = (a + b) / 2
        elif key == "post_attention_layernorm.weight":
            identity = torch.zeros_like(t_o)
            identity.fill_diagonal_(1.0)
            out[key] = (a @ (0.5 * t_o + 0.5 * identity) + b) / 2
        else:
            if key in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                a = a @ t_o
            t = plan(a, b)
            if key == "self_attn.o_proj.weight":
                t_o = t
            out[key] = (t.T @ a + b) / 2
    for key in OUTPUTS:
        out[key] = torch.zeros_like(out[key])
    return out


def assert_blocks_equal(ours: dict, reference: dict, where=""):
    assert set(ours) == set(reference) == set(BLOCK_KEYS)
    for key in BLOCK_KEYS:
        assert ours[key].dtype == torch.float32
        assert torch.equal(ours[key], reference[key]), (where, key, (ours[key] - reference[key]).abs().max().item())


# ----------------------------------------------------------------------------------------------
# 1. The solver: POT's float32 sinkhorn_knopp, bit for bit, in all three of its regimes


def cost_cases():
    # Distances between random points scaled so that exp(-C/0.06) spans the regimes: a kernel of
    # moderate values (converges, or runs all iterations at float32's floor), one that has fully
    # underflowed columns (error at iteration 0), and one that overflows u or v only later.
    generator = torch.Generator().manual_seed(1)
    for trial in range(300):
        n = int(torch.randint(3, 16, (1,), generator=generator))
        m = n + int(torch.randint(0, 3, (1,), generator=generator))
        cost = torch.cdist(torch.randn(n, 4, generator=generator), torch.randn(m, 4, generator=generator))
        scale = float(torch.empty(1).uniform_(0.05, 6.0, generator=generator))
        yield cost / cost.min() * scale


def test_published_solver_is_pots_sinkhorn_knopp():
    seen = set()
    for cost in cost_cases():
        ours, stats = published_sinkhorn(cost, 0.06, max_iter=300)
        theirs, last_iteration, aborted = pot_plan(cost, 0.06, 300)
        assert torch.equal(ours, theirs)
        assert stats["aborted"] == aborted
        if aborted:
            assert stats["abort_iteration"] == last_iteration == stats["iterations"]
            seen.add("abort at 0" if last_iteration == 0 else "abort later")
        elif stats["converged"]:
            assert stats["iterations"] == last_iteration + 1 < 300
            seen.add("converged")
        else:
            assert stats["iterations"] == 300 and last_iteration == 299
            seen.add("ran out of iterations")
    assert seen == {"abort at 0", "abort later", "converged", "ran out of iterations"}


def test_aborting_at_iteration_0_returns_the_kernel_over_nm():
    # A kernel with an all-zero column: K^T u has a zero at once, the initial u = 1/n, v = 1/m stay.
    cost = torch.tensor([[1.0, 9.0, 2.0], [2.0, 9.0, 1.0]])
    plan, stats = published_sinkhorn(cost, 0.06)
    assert stats == {"iterations": 0, "aborted": True, "abort_iteration": 0, "converged": False}
    assert torch.allclose(plan, torch.exp(cost / -0.06) / 6, rtol=1e-6, atol=0) and plan.sum() < 1e-7


# ----------------------------------------------------------------------------------------------
# 2. The whole published block equals the public recipe


def scaled_block(args, seed, scale):
    block = {k: v.detach().clone() for k, v in random_model(args, seed).layers[0].state_dict().items()}
    return {k: v if "norm" in k else v * scale for k, v in block.items()}


@settings(max_examples=12, deadline=None)
@given(kv_heads=st.sampled_from([1, 2]), group=st.sampled_from([1, 2, 3]), head_dim=st.sampled_from([4, 8]),
       hidden=st.sampled_from([16, 24]), intermediate=st.integers(8, 40), seed=st.integers(0, 1000),
       scale=st.sampled_from([1.0, 8.0, 30.0, 200.0]))
def test_published_block_is_the_public_recipe_on_random_configs(kv_heads, group, head_dim, hidden, intermediate,
                                                                seed, scale):
    # scale 1: the plans converge or run out of iterations; 30 and 200: kernels underflow (as on real
    # weights) and POT aborts, at iteration 0 or later.
    args = tiny_args(kv_heads, group, head_dim, hidden, intermediate, layers=1)
    A, B = scaled_block(args, seed, scale), scaled_block(args, seed + 1, scale)
    options = GrowthOptions(align="published", max_iter=200)
    block, report = make_new_block([A, B], args, options)
    assert_blocks_equal(block, public_recipe(A, B, max_iter=200))
    # without zero-init, o_proj and down_proj are the fused ones too
    fused, _ = published_fuse(A, B, 0.06, max_iter=200)
    for key in OUTPUTS:
        plan, _, _ = pot_plan(torch.cdist(A[key], B[key]), 0.06, 200)
        assert torch.equal(fused[key], (plan.T @ A[key] + B[key]) / 2)
    for name, stats in report.items():
        if "plan_mass" in stats:
            assert stats["aborted"] or abs(stats["plan_mass"] - 1) < 1e-4


@pytest.fixture(scope="module")
def smollm2_blocks(smollm2_dir):
    reader = CheckpointReader(smollm2_dir)
    return [reader.block(i, torch.float32, "cpu") for i in range(reader.args.num_hidden_layers)]


@pytest.mark.parametrize("gap", [0, 20])  # 0: v_proj's plan runs all 10 000 iterations; 20: all abort at 0
def test_published_block_is_the_public_recipe_on_smollm2(smollm2_blocks, gap):
    options = GrowthOptions(align="published")
    block, report = make_new_block(smollm2_blocks[gap:gap + 2], None, options)
    assert_blocks_equal(block, public_recipe(*smollm2_blocks[gap:gap + 2]), f"gap {gap}")
    # what the issue describes: the solver aborts at iteration 0 with a plan of mass ~0
    for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.gate_proj.weight",
                 "mlp.up_proj.weight", "self_attn.o_proj.weight", "mlp.down_proj.weight"):
        assert report[name]["abort_iteration"] == 0 and report[name]["plan_mass"] < 1e-10, name
    v = report["self_attn.v_proj.weight"]
    assert (v["abort_iteration"], v["iterations"]) == ((None, 10000) if gap == 0 else (0, 0))
    # hence q, k, gate and up are B/2 to float32 rounding, the post-attention norm A/4 + B/2
    A, B = smollm2_blocks[gap:gap + 2]
    for key in ("self_attn.q_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight"):
        assert torch.allclose(block[key], B[key] / 2, rtol=1e-5, atol=1e-9), key
    key = "post_attention_layernorm.weight"
    assert torch.allclose(block[key], A[key] / 4 + B[key] / 2, rtol=1e-5)


@pytest.mark.slow
def test_published_cli_is_the_public_recipe_on_smollm2_top_half(smollm2_dir, smollm2_blocks, tmp_path):
    # The paper's setting, 30 -> 45 with a new layer in each gap of the top half, through the CLI.
    out = tmp_path / "grown"
    assert main(["--base", str(smollm2_dir), "--out", str(out), "--align", "published", "--new-layers", "15",
                 "--dtype", "float32"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["opt_deus"]["insert_after"] == list(range(14, 29))
    written = read_layers(out)
    for index, gap in zip(config["opt_deus"]["new_layers"], range(14, 29)):
        assert_blocks_equal(written[index], public_recipe(*smollm2_blocks[gap:gap + 2]), f"gap {gap}")
    report = json.loads((out / "growth_report.json").read_text())
    assert "not a recommendation" in report["note"]
    assert all(layer["matrices"]["mlp.up_proj.weight"]["aborted"] for layer in report["layers"])


def test_published_growth_preserves_the_function():
    base = random_model(tiny_args(layers=4), seed=3)
    grown, report = grow(base, 3, position="top", options=GrowthOptions(align="published", max_iter=50))
    with torch.no_grad():
        assert (grown(TOKENS % 61) - base(TOKENS % 61)).abs().max().item() <= 1e-6
    with pytest.raises(GrowthError, match="`epsilon` > 0"):
        GrowthOptions(align="published", epsilon=0.0)
    args = tiny_args(layers=1)
    blocks = [scaled_block(args, seed, 200.0) for seed in (1, 2)]  # kernels underflow: POT aborts
    with pytest.raises(GrowthError, match="the published solver did not converge .at iteration 0"):
        make_new_block(blocks, args, GrowthOptions(align="published", strict=True))
    assert GrowthOptions(align="published").normalize_plan is False


# ----------------------------------------------------------------------------------------------
# 3. Layouts: 16 -> 24 and 32 -> 48 of every method are the public index mappings, as written


def public_layout(method: str, L: int) -> list[tuple]:
    # The public files' index mappings, for L -> 3L/2, as ("base", j) a copy of base layer j,
    # ("fused", i) a new layer made from base i and i + 1, ("zeroed copy", j) a copy of j with o_proj
    # and down_proj zeroed. OT-DUS.py and Average.py: one new layer in each gap of the top half;
    # LLaMA Pro: base 2t+1 copied right after itself; SOLAR: base 0 .. 3L/4-1, then L/4 .. L-1.
    half = L // 2
    if method in ("opt", "avg"):
        layout = [("base", j) for j in range(half)]
        for t in range(half):
            layout += [("fused", half - 1 + t), ("base", half + t)]
        return layout
    if method == "llama-pro":
        return [entry for t in range(half) for entry in (("base", 2 * t), ("base", 2 * t + 1),
                                                          ("zeroed copy", 2 * t + 1))]
    return [("base", j) for j in range(3 * L // 4)] + [("base", j) for j in range(L // 4, L)]


def test_public_layouts_32_to_48_are_the_published_indices():
    # The literal lists of the public files: the trainable (new) layers of OT-DUS.py / Average.py and
    # of the LLaMA Pro part, and SOLAR's two ranges.
    opt = public_layout("opt", 32)
    assert [i for i, (kind, _) in enumerate(opt) if kind == "fused"] == list(range(16, 48, 2))
    assert [j for kind, j in opt if kind == "base"] == list(range(32))
    pro = public_layout("llama-pro", 32)
    assert [i for i, (kind, _) in enumerate(pro) if kind != "base"] == list(range(2, 48, 3))
    assert [j for kind, j in pro if kind != "base"] == list(range(1, 32, 2))
    assert [j for _, j in public_layout("solar", 32)] == list(range(24)) + list(range(8, 32))


def read_layers(folder: Path) -> list[dict]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    count = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    return [{k: tensors[f"model.layers.{i}.{k}"] for k in BLOCK_KEYS} for i in range(count)]


def identify(layer: dict, base: list[dict], method: str) -> tuple:
    # Which base layer(s) a written layer was made from, from its weights alone.
    zero = all(not layer[k].any() for k in OUTPUTS)
    for j, block in enumerate(base):
        if all(torch.equal(layer[k], block[k]) for k in BLOCK_KEYS):
            return ("base", j)
        if zero and all(torch.equal(layer[k], block[k]) for k in BLOCK_KEYS if k not in OUTPUTS):
            return ("zeroed copy", j)
    for i in range(len(base) - 1):
        A, B = base[i], base[i + 1]
        if method == "avg" and all(torch.equal(layer[k], (A[k] + B[k]) / 2) for k in BLOCK_KEYS):
            return ("fused", i)  # Average.py: every tensor averaged, nothing zeroed
        if method == "opt" and torch.equal(layer["input_layernorm.weight"], (A["input_layernorm.weight"]
                                                                            + B["input_layernorm.weight"]) / 2):
            assert_blocks_equal(layer, public_recipe(A, B, max_iter=20), f"fused {i}")
            return ("fused", i)
    return ("unknown",)


@pytest.fixture(scope="module")
def deep_checkpoints(tmp_path_factory):
    paths = {}
    for layers in (16, 32):
        path = tmp_path_factory.mktemp("base") / f"tiny{layers}"
        model = random_model(tiny_args(kv_heads=1, group=2, head_dim=4, hidden=8, intermediate=12, layers=layers),
                             seed=layers)
        generator = torch.Generator().manual_seed(layers)
        with torch.no_grad():  # norm gains that differ from layer to layer, so each layer is recognisable
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5, generator=generator)
        save_pretrained(model, path)
        paths[layers] = path
    return paths


# the command line of each method at the public setting
PUBLIC_SETTINGS = {"opt": ["--align", "published", "--max-iter", "20", "--position", "top"],
                   "avg": ["--position", "top"], "llama-pro": ["--position", "uniform"], "solar": []}


@pytest.mark.parametrize("layers", [16, 32])
@pytest.mark.parametrize("method", ["opt", "avg", "llama-pro", "solar"])
def test_cli_layouts_are_the_public_index_mappings(deep_checkpoints, tmp_path, method, layers):
    base_dir = deep_checkpoints[layers]
    out = tmp_path / "grown"
    assert main(["--base", str(base_dir), "--out", str(out), "--method", method, "--new-layers", str(layers // 2),
                 *PUBLIC_SETTINGS[method]]) == 0
    reader = CheckpointReader(base_dir)
    base = [reader.block(i, torch.float32, "cpu") for i in range(layers)]
    written = read_layers(out)
    assert [identify(layer, base, method) for layer in written] == public_layout(method, layers)
    if method == "opt":  # the report says what the published solver did, matrix by matrix
        report = json.loads((out / "growth_report.json").read_text())
        assert "not a recommendation" in report["note"] and len(report["layers"]) == layers // 2
        for layer in report["layers"]:
            fields = [m for m in layer["matrices"].values() if {"aborted", "abort_iteration", "plan_mass"} <= set(m)]
            assert len(fields) == 7


def test_llama_pro_copies_above_the_top_layer():
    # uniform = LLaMA Pro's block expansion: a copy after the last layer of each of K equal groups
    assert insert_after_for("uniform", 32, 16, "llama-pro") == list(range(1, 32, 2))
    assert insert_after_for("uniform", 32, 8, "llama-pro") == list(range(3, 32, 4))
    assert insert_after_for("uniform", 30, 4, "llama-pro") == [6, 14, 21, 29]
    assert insert_after_for("uniform", 3, 5, "llama-pro") == [0, 0, 1, 2, 2]
    base = random_model(tiny_args(layers=4), seed=5)
    for position, expected in (("uniform", [1, 3]), ("top", [1, 2])):  # named positions: gaps, as for opt
        grown, report = grow(base, 2, position=position, options=GrowthOptions(method="llama-pro"))
        assert report["insert_after"] == expected
        with torch.no_grad():
            assert (grown(TOKENS % 61) - base(TOKENS % 61)).abs().max().item() <= 1e-6
    grown, report = grow(base, 1, insert_after=[3], options=GrowthOptions(method="llama-pro"))
    assert report["new_layers"] == [4] and report["sources"][4] == [3]
    with pytest.raises(GrowthError, match="out of range"):
        grow(base, 1, insert_after=[3], options=GrowthOptions(method="avg"))


def test_streaming_solar_at_every_size_keeps_two_blocks(tmp_path, monkeypatch):
    # The paper's SOLAR settings (16 -> 24, 32 -> 48) crashed: the block cache evicted by index and
    # dropped the block it had just read when the layout jumped back down. Every L and K, and the
    # cache still holds at most two base blocks (all of them would also "fix" the crash).
    import weakref

    from opt_deus_tool import checkpoint
    live, most_alive, read = [], [0], checkpoint.CheckpointReader.block

    def counting_block(self, layer, dtype=None, device=None):
        most_alive[0] = max(most_alive[0], sum(ref() is not None for ref in live))
        block = read(self, layer, dtype, device)
        live.append(weakref.ref(block["input_layernorm.weight"]))
        return block

    monkeypatch.setattr(checkpoint.CheckpointReader, "block", counting_block)
    for layers in (2, 5, 8, 9):
        base_dir = tmp_path / f"base{layers}"
        model = random_model(tiny_args(kv_heads=1, group=1, head_dim=4, hidden=4, intermediate=4, layers=layers), 1)
        save_pretrained(model, base_dir)
        for new in range(1, layers + 1):
            out = tmp_path / f"out{layers}-{new}"
            # bfloat16 output: the writer keeps converted copies, not the base blocks themselves
            assert main(["--base", str(base_dir), "--out", str(out), "--method", "solar", "--new-layers", str(new),
                         "--dtype", "bfloat16"]) == 0
            written = load_pretrained(out)
            sources = json.loads((out / "config.json").read_text())["opt_deus"]["sources"]
            for layer, (source,) in zip(written.layers, sources):
                assert torch.equal(layer.mlp.up_proj.weight, model.layers[source].mlp.up_proj.weight.bfloat16())
    assert most_alive[0] <= 2
