"""LESA (Yang et al. 2025, arXiv 2502.13794), the baseline that predicts a new layer from its neighbours
(opt_deus.lesa_fit, Growth.lesa): its SVD reconstruction learns what depth structure there is, zero-init growth
keeps the base's function in every family (tests/test_family_fusion.py streams it through transformers too), it is
deterministic under a seed without touching the caller's random state, and the report records each predictor's
training loss and held-out error."""

import json
import math

import pytest
import torch

from opt_deus_core.model import ModelArgs, Transformer
from opt_deus_core.opt_deus import LESA_NAMES, GrowthError, GrowthOptions, grow, lesa_fit, rows

FAMILIES = {"llama": dict(mlp_bias=True, attention_bias=True), "qwen2": dict(model_type="qwen2"),
            "qwen3": dict(model_type="qwen3"), "mistral": dict(model_type="mistral", sliding_window=5)}


def base(family: str, layers: int = 5, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    args = ModelArgs(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, **FAMILIES[family])
    model = Transformer(args).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_a_predictor_of_depth_linear_layers_predicts_the_midpoint_better_than_a_copy():
    # W_i = A + (i / L) B: each layer's V_i is linear in i, so a layer between base layers 5 and 6 is A + (5.5 / L) B.
    # Trained long enough on this structure, G must reconstruct it through U S: closer than LLaMA Pro's copy of
    # layer 5 (which is 0.5 B / L away). A mix-up of V's rows, layers or the U S factor fails this.
    g = torch.Generator().manual_seed(0)
    n, k, L = 24, 16, 12
    A, B = torch.randn(n, k, generator=g), torch.randn(n, k, generator=g)
    mats = [A + (i / L) * B for i in range(L)]
    new, stats = lesa_fit(mats, [5, 5], seed=0, epochs=200)
    truth = A + (5.5 / L) * B
    error = ((new[5] - truth).norm() / truth.norm()).item()
    copy_error = ((mats[5] - truth).norm() / truth.norm()).item()
    assert list(new) == [5] and new[5].shape == (n, k)
    assert error < 0.5 * copy_error, (error, copy_error)
    assert stats["rank"] == n and 0 < stats["heldout_error"] < 0.2 and stats["train_loss"] < 1e-4


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_zero_init_lesa_growth_computes_the_base_function(family):
    model = base(family)
    grown, report = grow(model, 3, options=GrowthOptions(method="lesa", out_scale=0.0))
    x = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(grown(x), model(x), rtol=0, atol=1e-5)
    assert grown.args.num_hidden_layers == 8 and report["new_layers"] == [2, 4, 6] and report["method"] == "lesa"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lesa_predicts_every_projection_and_bias_and_takes_the_norms_from_the_layer_below(family):
    model = base(family)
    grown, report = grow(model, 1, options=GrowthOptions(method="lesa", out_scale=1.0))
    (index,), (i, j) = report["new_layers"], report["sources"][report["new_layers"][0]]
    new, a, b = (layer.state_dict() for layer in (grown.layers[index], model.layers[i], model.layers[j]))
    assert set(new) == set(a)
    for key in new:
        assert new[key].shape == a[key].shape
        if key.rsplit(".", 1)[0] in LESA_NAMES:  # predicted, biases too (with their neuron, as a column)
            assert not torch.equal(new[key], a[key]) and not torch.equal(new[key], b[key]), key
        else:  # norms, Qwen3's q/k norms
            assert torch.equal(new[key], a[key]), key
    assert set(report["lesa"]) == set(LESA_NAMES)
    for name, stats in report["lesa"].items():
        assert math.isfinite(stats["train_loss"]) and stats["heldout_error"] > 0 and stats["rank"] >= 1, name


def test_lesa_is_deterministic_under_its_seed_and_leaves_the_callers_random_state_alone():
    model = base("llama")
    state = torch.random.get_rng_state()
    grown = [grow(model, 2, options=GrowthOptions(method="lesa", seed=seed))[0] for seed in (0, 0, 1)]
    assert torch.equal(torch.random.get_rng_state(), state)
    same, other = (all(torch.equal(x, y) for x, y in zip(grown[0].state_dict().values(), g.state_dict().values()))
                   for g in grown[1:])
    assert same and not other


def test_lesa_needs_three_base_layers():
    with pytest.raises(GrowthError, match="3 base layers"):
        grow(base("llama", layers=2), 1, options=GrowthOptions(method="lesa"))


def test_the_command_line_grows_with_lesa_and_its_seed_and_reports_the_predictors(tmp_path):
    from opt_deus_tool import grow_cli
    from opt_deus_tool.checkpoint import load_pretrained, save_pretrained
    save_pretrained(base("qwen2"), tmp_path / "base")
    code = grow_cli.main(["--base", str(tmp_path / "base"), "--out", str(tmp_path / "grown"), "--method", "lesa",
                          "--new-layers", "2", "--seed", "3"])
    assert code == 0
    report = json.loads((tmp_path / "grown" / "growth_report.json").read_text())
    assert report["options"]["seed"] == 3 and set(report["lesa"]) == set(LESA_NAMES)
    assert load_pretrained(tmp_path / "grown").args.num_hidden_layers == 7


def test_leave_one_out_predicts_each_left_out_layer_without_it_and_scores_the_answers(tmp_path, monkeypatch):
    # experiments/lesa_loo.py: the true layer j never reaches LESA's fit, and avg / copy-below are scored right.
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from experiments import lesa_loo
    from opt_deus_core import opt_deus
    from opt_deus_tool.checkpoint import save_pretrained
    model = base("qwen2", layers=6)
    save_pretrained(model, tmp_path / "base")
    blocks = [{k: v.detach() for k, v in layer.state_dict().items()} for layer in model.layers]
    seen, fit = [], opt_deus.lesa_fit
    monkeypatch.setattr(opt_deus, "lesa_fit", lambda mats, *a, **k: (seen.append(mats), fit(mats, *a, **k))[1])
    summary = lesa_loo.run(str(tmp_path / "base"), [2, 3], 1, 0, tmp_path / "out", log=lambda *a: None)
    assert [r["layer"] for r in summary["per_layer"]] == [2, 3] and len(seen) == 2 * len(LESA_NAMES)
    assert (tmp_path / "out" / "summary.md").read_text().startswith("# LESA leave-one-out")
    for n, r in enumerate(summary["per_layer"]):
        j = r["layer"]
        for name, mats in zip(LESA_NAMES, seen[n * len(LESA_NAMES):]):  # 5 layers, none of them layer j
            assert len(mats) == 5 and not any(torch.equal(m, rows(blocks[j], name)) for m in mats), (j, name)
        truth, below, above = blocks[j], blocks[j - 1], blocks[j + 1]
        keys = [k for k in truth if k.rsplit(".", 1)[0] in LESA_NAMES]
        num = sum(((below[k] + above[k]) / 2 - truth[k]).pow(2).sum() for k in keys)
        assert math.isclose(r["errors"]["avg"]["all"], (num / sum(truth[k].pow(2).sum() for k in keys)).sqrt().item(),
                            rel_tol=1e-5)
        num = sum((below[k] - truth[k]).pow(2).sum() for k in keys)
        assert math.isclose(r["errors"]["copy-below"]["all"],
                            (num / sum(truth[k].pow(2).sum() for k in keys)).sqrt().item(), rel_tol=1e-5)
