"""experiments/compare.py at a tiny size: every method reported, finite numbers, function
preservation of the zero-init methods, determinism, and the files it writes."""

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from experiments import compare  # noqa: E402
from experiments.common import METHODS  # noqa: E402

ZERO_INIT = ("opt-structured", "opt-paper", "avg-zero", "llama-pro")


def tiny_config(**kw) -> compare.CompareConfig:
    base = dict(layers=4, hidden=32, heads=2, kv_heads=1, head_dim=16, intermediate=64, block_size=32,
                new_layers=2, batch_size=4, base_steps=2, grow_steps=2, evals=1, train_bytes=20_000, eval_blocks=4)
    return compare.CompareConfig(**{**base, **kw})


def numbers(summary: dict) -> list[float]:
    out = [summary["base"]["held_out"]["loss"], *summary["base"]["losses"]]
    for r in summary["results"]:
        out += [r["after_growth"]["loss"], r["after_training"]["loss"], *r["losses"], *(e["loss"] for e in r["evals"])]
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    return compare.run_compare(tiny_config(), out, log=lambda *a: None), out


def test_every_method_reported_with_finite_numbers(tiny_run):
    summary, _ = tiny_run
    assert [r["method"] for r in summary["results"]] == [*METHODS, "base+train"]
    assert all(math.isfinite(x) for x in numbers(summary))
    for r in summary["results"]:
        assert r["layers"] == (4 if r["method"] == "base+train" else 6)
        assert r["trainable_params"] > 0 and r["mean_step_s"] > 0


def test_zero_init_methods_preserve_the_base_function(tiny_run):
    summary, _ = tiny_run
    base = summary["base"]["held_out"]["loss"]
    by_method = {r["method"]: r for r in summary["results"]}
    for name in ZERO_INIT:
        assert abs(by_method[name]["after_growth"]["loss"] - base) < 1e-5, name
    # avg and solar copy or average weights without zeroing: a different function.
    assert abs(by_method["avg"]["after_growth"]["loss"] - base) > 1e-5


def test_only_new_layers_train(tiny_run):
    summary, _ = tiny_run
    for r in summary["results"]:
        if r["method"] != "base+train":
            assert r["trainable_layers"] == r["growth"]["new_layers"]


def test_outputs_written(tiny_run):
    summary, out = tiny_run
    assert (out / "summary.md").read_text().count("\n| ") >= len(METHODS) + 2
    saved = json.loads((out / "summary.json").read_text())
    assert numbers(saved) == numbers(summary)
    for name in [*METHODS, "base", "base+train"]:
        rows = [json.loads(line) for line in (out / "runs" / f"{name}.jsonl").read_text().splitlines()]
        assert any("loss" in row for row in rows)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_deterministic(tiny_run):
    summary, _ = tiny_run
    again = compare.run_compare(tiny_config(), None, log=lambda *a: None)
    assert numbers(again) == numbers(summary)


def test_cli_errors_exit_2(capsys):
    assert compare.main(["--methods", "opt-paper,nope", "--out", "unused"]) == 2
    assert "nope" in capsys.readouterr().err
    assert compare.main(["--layers", "8", "--new-layers", "9", "--out", "unused"]) == 2  # solar: K > L
    assert "solar" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# experiments/smollm2.py: the pieces that run without the checkpoint


def test_smollm2_plan():
    from experiments import smollm2
    config = smollm2.SmolConfig(base="b", data=["d"], methods=("opt-structured", "avg"), positions=("top", "bottom"))
    assert smollm2.runs_of(config) == [("opt-structured", "top"), ("avg", "top"), ("opt-structured", "bottom")]
    assert smollm2._layers([15, 17, 19, 21]) == "15..21 step 2" and smollm2._layers([3, 4, 5]) == "3..5"


def test_smollm2_cli_errors_exit_2(tmp_path, capsys):
    from experiments import smollm2
    assert smollm2.main(["--base", str(tmp_path / "missing"), "--data", str(tmp_path)]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert smollm2.main(["--base", str(tmp_path), "--data", str(tmp_path), "--preset", "gpu", "--device", "cpu",
                         "--methods", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
