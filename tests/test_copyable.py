"""The reference files are meant to be copied (issue 19): copied alone into an empty folder, they import and run.

Each case copies some of model.py, sinkhorn.py, opt_deus.py and train.py into a temporary folder and runs a
script there in a fresh interpreter that can import nothing else of this project: isolated mode (-I: no
PYTHONPATH, no current directory on sys.path) with the editable install's finder removed. The script first
checks that the files not copied are really out of reach, so an isolation that leaks fails the test instead
of passing it. What it computes is compared with what the project computes here.
"""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from opt_deus_core import opt_deus
from opt_deus_core.model import ModelArgs, Transformer
from opt_deus_tool.checkpoint import BLOCK_KEYS

ROOT = Path(__file__).resolve().parents[1]
PROJECT_MODULES = ("model", "sinkhorn", "opt_deus", "train", "opt_deus_tool")

PRELUDE = """
import importlib.util, sys
folder = sys.argv[1]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "").lower()]
sys.path.insert(0, folder)
copied = set(sys.argv[2].split(","))
for name in {modules!r}:  # a module not copied is out of reach; a copied one is the copy
    spec = importlib.util.find_spec(name)
    assert (spec.origin.startswith(folder) if spec else False) == (name in copied), (name, spec and spec.origin)
import torch
torch.set_num_threads(int(sys.argv[3]))  # as in this process: the same reductions, bit for bit
"""


def run_copied(tmp_path: Path, files: tuple[str, ...], script: str) -> str:
    folder = tmp_path / "copied"
    folder.mkdir()
    for name in files:
        shutil.copy(ROOT / name, folder / name)
    code = PRELUDE.format(modules=PROJECT_MODULES) + textwrap.dedent(script)
    copied = ",".join(name.removesuffix(".py") for name in files)
    done = subprocess.run([sys.executable, "-I", "-c", code, str(folder), copied, str(torch.get_num_threads())],
                          cwd=folder, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def random_block(seed: int, heads=4, kv_heads=2, head_dim=4, hidden=16, intermediate=24) -> dict:
    g = torch.Generator().manual_seed(seed)
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
              "self_attn.q_proj.weight": (q, hidden), "self_attn.k_proj.weight": (kv, hidden),
              "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, q),
              "mlp.gate_proj.weight": (intermediate, hidden), "mlp.up_proj.weight": (intermediate, hidden),
              "mlp.down_proj.weight": (hidden, intermediate)}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def test_sinkhorn_alone_solves_a_problem(tmp_path):
    out = run_copied(tmp_path, ("sinkhorn.py",), """
        from sinkhorn import hard_assignment, sinkhorn
        cost = torch.rand(9, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        r = sinkhorn(cost, epsilon=0.1)
        assert r.converged
        print((r.plan.sum(1) - 1 / 9).abs().max().item(), hard_assignment(cost).tolist())
    """)
    from opt_deus_core.sinkhorn import hard_assignment
    cost = torch.rand(9, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    row_error, assignment = out.split(" ", 1)
    assert float(row_error) < 1e-8 and eval(assignment) == hard_assignment(cost).tolist()


CASES = [("opt", "structured"), ("opt", "paper"), ("opt", "published"), ("avg", "structured"),
         ("llama-pro", "structured"), ("solar", "structured")]


def test_opt_deus_with_sinkhorn_alone_fuses_two_blocks_every_way(tmp_path):
    # Every method and alignment, zero-init off so that every fused tensor shows; bit for bit what opt_deus gives.
    a, b = random_block(1), random_block(2)
    torch.save({"a": a, "b": b}, tmp_path / "blocks.pt")
    run_copied(tmp_path, ("opt_deus.py", "sinkhorn.py"), f"""
        import types
        from opt_deus import GrowthOptions, make_new_block
        blocks = torch.load({str(tmp_path / "blocks.pt")!r})
        args = types.SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, head_dim=4)
        fused = {{f"{{m}}/{{al}}": make_new_block([blocks["a"], blocks["b"]], args,
                                                GrowthOptions(method=m, align=al, out_scale=1.0, max_iter=200))[0]
                 for m, al in {CASES!r}}}
        torch.save(fused, {str(tmp_path / "fused.pt")!r})
    """)
    lifted = torch.load(tmp_path / "fused.pt")
    args = ModelArgs(vocab_size=8, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=4)
    assert sorted(lifted) == sorted(f"{m}/{al}" for m, al in CASES)
    for method, align in CASES:
        options = opt_deus.GrowthOptions(method=method, align=align, out_scale=1.0, max_iter=200)
        ours, _ = opt_deus.make_new_block([a, b], args, options)
        for key in BLOCK_KEYS:
            assert torch.equal(lifted[f"{method}/{align}"][key], ours[key]), (method, align, key)


def test_opt_deus_sinkhorn_and_model_grow_an_in_memory_model(tmp_path):
    out = run_copied(tmp_path, ("opt_deus.py", "sinkhorn.py", "model.py"), """
        from model import ModelArgs, Transformer
        from opt_deus import GrowthOptions, grow
        args = ModelArgs(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=4)
        base = Transformer(args).init_weights(torch.Generator().manual_seed(0))
        grown, report = grow(base, 2, options=GrowthOptions())
        tokens = torch.arange(12)[None] % 50
        with torch.no_grad():
            print(len(grown.layers), report["new_layers"], (grown(tokens) - base(tokens)).abs().max().item())
    """)
    layers, rest = out.split(" ", 1)
    new_layers, difference = rest.rsplit(" ", 1)
    assert int(layers) == 5 and eval(new_layers) == [1, 3] and float(difference) == 0.0


def test_model_alone_runs_a_forward_pass(tmp_path):
    args = ModelArgs(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=4, tie_word_embeddings=True)
    model = Transformer(args).init_weights(torch.Generator().manual_seed(3))
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    run_copied(tmp_path, ("model.py",), f"""
        from model import ModelArgs, Transformer
        args = ModelArgs(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=4, tie_word_embeddings=True)
        model = Transformer(args)
        model.load_state_dict(torch.load({str(tmp_path / "weights.pt")!r}))
        with torch.no_grad():
            torch.save(model(torch.arange(10)[None]), {str(tmp_path / "logits.pt")!r})
    """)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), model(torch.arange(10)[None]))


def test_train_with_model_alone_trains_the_new_layers(tmp_path):
    steps = 3
    out = run_copied(tmp_path, ("train.py", "model.py"), f"""
        import numpy as np
        from model import ModelArgs, Transformer
        from train import TrainConfig, train
        args = ModelArgs(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=4, max_position_embeddings=64)
        args.extra["opt_deus"] = {{"new_layers": [2]}}
        model = Transformer(args).init_weights(torch.Generator().manual_seed(0))
        before = model.layers[0].mlp.up_proj.weight.clone()
        tokens = np.random.default_rng(0).integers(0, 50, 2000)
        config = TrainConfig(steps={steps}, warmup_steps=1, batch_tokens=64, micro_batch_size=2, block_size=32,
                             eval_every=0, log_every=100, device="cpu")
        result = train(model, tokens, config, log=lambda *a: None)
        assert torch.equal(model.layers[0].mlp.up_proj.weight, before)
        print(result.step, result.trainable_layers)
    """)
    assert out.split() == [str(steps), "[2]"]
