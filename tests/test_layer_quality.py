"""experiments/layer_quality.py (issue 21): its random-permutation control, and a tiny run end to end."""

import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments import layer_quality  # noqa: E402
from opt_deus_core.opt_deus import avg_fuse  # noqa: E402
from test_opt_deus import block_output, random_block, tiny_args  # noqa: E402


def test_the_control_really_permutes_and_keeps_the_blocks_function():
    # A mutant that skips the shuffle (or moves o's columns without q's rows) fails one of the two halves.
    args = tiny_args(kv_heads=2, group=2, head_dim=4, hidden=16, intermediate=24)
    block = random_block(args, 3)
    moved = layer_quality.random_symmetry(block, args, torch.Generator().manual_seed(1))  # moves the groups too
    assert all(not torch.equal(moved[key], block[key]) for key in block if "norm" not in key), "nothing moved"
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(block_output(moved, args, x), block_output(block, args, x), rtol=0, atol=1e-5)


def test_the_control_arm_averages_b_with_a_shuffled_a():
    # The arm itself, not only random_symmetry: a mutant that averages the unshuffled A fails here (seed 1 moves
    # the kv groups too, so every weight moves).
    args = tiny_args(kv_heads=2, group=2, head_dim=4, hidden=16, intermediate=24)
    a, b = random_block(args, 3), random_block(args, 4)
    control = layer_quality.new_layer("shuffled-A-avg", a, b, args, (), torch.Generator().manual_seed(1))
    expected = avg_fuse(layer_quality.random_symmetry(a, args, torch.Generator().manual_seed(1)), b)
    plain = layer_quality.new_layer("avg", a, b, args, (), torch.Generator().manual_seed(1))
    for key in a:
        assert torch.equal(control[key], expected[key]), key
        assert "norm" in key or not torch.equal(control[key], plain[key]), key


def test_scaled_moves_only_the_output_projections():
    block = {"self_attn.o_proj.weight": torch.ones(2, 2), "mlp.down_proj.weight": torch.ones(2, 2),
             "mlp.up_proj.weight": torch.ones(2, 2)}
    out = layer_quality.scaled(block, 0.25)
    assert out["self_attn.o_proj.weight"].sum() == 1 and out["mlp.down_proj.weight"].sum() == 1
    assert out["mlp.up_proj.weight"].sum() == 4


def test_at_norm_interpolates_between_the_scales_and_the_base():
    curve = {1.0: [0.4, 0.8], 0.5: [0.1, 0.4]}  # s: [loss increase, norm ratio]
    assert math.isclose(layer_quality.at_norm(curve, 0.2), 0.05)
    assert math.isclose(layer_quality.at_norm(curve, 0.6), 0.25)
    assert layer_quality.at_norm(curve, 0.9) is None


def test_a_tiny_run_measures_every_arm_scale_and_gap(tmp_path):
    config = layer_quality.QualityConfig(target="embedded", seeds=(0,), arms=("copy-A", "avg", "shuffled-A-avg",
                                                                              "opt-structured-act", "lesa"),
                                         scales=(1.0, 0.5), top_gaps=2, calibration_tokens=64, base_preset="tiny")
    summary = layer_quality.run(config, tmp_path / "out", log=lambda *a: None)
    seed = summary["seeds"][0]
    assert sorted(seed["one_at_a_time"]["avg"]) == [0, 1, 2]  # the tiny base has 4 layers: 3 gaps
    for arm in config.arms:
        for gap in range(3):
            (d1, r1), (_, r05) = seed["one_at_a_time"][arm][gap][1.0], seed["one_at_a_time"][arm][gap][0.5]
            assert math.isfinite(d1) and r1 > 0 and 0.3 < r05 / r1 < 0.7, (arm, gap)  # norm ~ halves with s
    assert (tmp_path / "out" / "summary.md").read_text().startswith("# Layer quality without training")


def test_the_studys_scaled_arms_grow_and_train_at_the_tiny_preset():
    # Issue 21's training arms: s = 0.1 is not zero-init (the grown model starts off the base's loss), the
    # activation arm runs on calibration blocks of the training bytes, and every arm trains.
    from experiments import common, compare, smollm2
    assert set(common.STUDY_ARMS) <= set(common.ARM_OPTIONS)
    assert compare.preset_config("study").methods == common.STUDY_EMBEDDED_ARMS  # the s = 0.1 arms: SmolLM2 only
    assert smollm2.PRESETS["study"]["methods"] == common.STUDY_ARMS
    config = compare.preset_config("tiny", seeds=(0,), methods=("avg-zero", "avg@0.1", "opt-structured-act@0.1"),
                                   reference=False)
    arms = compare.run_compare(config, None, log=lambda *a: None)["seeds"][0]["arms"]
    base_loss = arms["avg-zero"]["after_growth"]["loss"]
    for name in ("avg@0.1", "opt-structured-act@0.1"):
        assert not arms[name]["zero_init"] and arms[name]["after_growth"]["loss"] != base_loss, name
        assert math.isfinite(arms[name]["after_training"]["loss"]), name


def test_the_control_trains_the_top_k_existing_layers_and_lesa_grows_as_its_paper_does():
    # Issue 31: no growth, the base's top k layers trained for the same steps on the same data; LESA's layers are
    # used as predicted (not zero-init), so its grown model starts off the base's loss.
    from experiments import compare
    config = compare.preset_config("tiny", seeds=(0,), methods=("avg-zero", "lesa", "no-growth-top-k"),
                                   reference=False)
    arms = compare.run_compare(config, None, log=lambda *a: None)["seeds"][0]["arms"]
    control, lesa, avg = arms["no-growth-top-k"], arms["lesa"], arms["avg-zero"]
    assert control["layers"] == config.layers and control["zero_init"]
    assert control["trainable_layers"] == list(range(config.layers - config.new_layers, config.layers))
    assert control["trainable_params"] == avg["trainable_params"]  # k blocks either way
    assert control["after_growth"]["loss"] == avg["after_growth"]["loss"]  # the base's
    assert control["after_training"]["loss"] != control["after_growth"]["loss"]  # it trained
    assert lesa["layers"] == config.layers + config.new_layers and not lesa["zero_init"]
    assert lesa["after_growth"]["loss"] != avg["after_growth"]["loss"]


def test_only_top_gaps_measures_those_gaps_alone_and_the_same_values_there(tmp_path):
    # qwen25.sh's sweep: one new layer at a time in the top gaps only, each value as the full sweep measures it
    # (the activation arm's calibration records no longer come from the gap below).
    config = layer_quality.QualityConfig(target="embedded", seeds=(0,), arms=("avg", "copy-A", "opt-structured-act"),
                                         scales=(1.0, 0.25), top_gaps=2, calibration_tokens=64,
                                         base_preset="tiny")
    full = layer_quality.run(config, None, log=lambda *a: None)["seeds"][0]
    top = layer_quality.run(layer_quality.QualityConfig(**{**vars(config), "only_top_gaps": True}), tmp_path / "out",
                            log=lambda *a: None)["seeds"][0]
    for arm in config.arms:
        assert sorted(top["one_at_a_time"][arm]) == [1, 2]
        assert top["one_at_a_time"][arm] == {gap: full["one_at_a_time"][arm][gap] for gap in (1, 2)}, arm
        assert top["all_at_once"][arm] == full["all_at_once"][arm]
    assert "at each of 2 gaps" in (tmp_path / "out" / "summary.md").read_text()
