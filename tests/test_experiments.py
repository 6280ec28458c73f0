"""The study (experiments/compare.py) at its tiny preset: every arm, paired comparisons, function
preservation, the flatness criterion, exact chunked base training, reproducibility records, files.
And the pieces of experiments/smollm2.py that run without the checkpoint."""

import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from experiments import common, compare  # noqa: E402

NOT_PRESERVING = ("avg", "solar")


def numbers(summary: dict) -> list[float]:
    out = []
    for s in summary["seeds"]:
        out += [s["base"]["held_out"]["loss"], *(p["loss"] for p in s["base"]["curve"])]
        for r in s["arms"].values():
            out += [r["after_growth"]["loss"], r["after_training"]["loss"], *r["losses"]]
            out += [e["loss"] for e in r["evals"]]
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    return compare.run_compare(compare.preset_config("tiny"), out, log=lambda *a: None), out


def test_every_arm_on_every_seed_with_finite_numbers(tiny_run):
    summary, _ = tiny_run
    expected = [*common.available_methods(common.CLASSIC_ARMS, log=lambda *a: None), compare.REFERENCE]
    assert summary["arms"] == expected
    assert [s["seed"] for s in summary["seeds"]] == [0, 1]
    assert all(math.isfinite(x) for x in numbers(summary))
    for s in summary["seeds"]:
        assert list(s["arms"]) == expected
        for name, r in s["arms"].items():
            assert r["layers"] == (4 if name == compare.REFERENCE else 6)
            assert r["trainable_params"] > 0 and r["mean_step_s"] > 0


def test_zero_init_arms_start_exactly_at_the_base(tiny_run):
    summary, _ = tiny_run
    for s in summary["seeds"]:
        base = s["base"]["held_out"]["loss"]
        for name, r in s["arms"].items():
            assert r["zero_init"] == (name not in NOT_PRESERVING), name
            if r["zero_init"]:
                assert r["after_growth"]["loss"] == base, name  # exactly, not approximately
                assert r["evals"][0] == {"step": 0, "loss": base}, name
            else:
                assert abs(r["after_growth"]["loss"] - base) > 1e-5, name


def test_only_new_layers_train(tiny_run):
    summary, _ = tiny_run
    for s in summary["seeds"]:
        for name, r in s["arms"].items():
            if name != compare.REFERENCE:
                assert r["trainable_layers"] == r["growth"]["new_layers"]


def test_comparisons_are_paired_by_seed(tiny_run):
    summary, _ = tiny_run
    for arm, by_baseline in summary["comparisons"].items():
        assert set(by_baseline) == {b for b in common.BASELINES if b != arm}
        for baseline, d in by_baseline.items():
            diffs = [s["arms"][arm]["after_training"]["loss"] - s["arms"][baseline]["after_training"]["loss"]
                     for s in summary["seeds"]]
            assert d["n"] == 2 and d["mean"] == pytest.approx(statistics.fmean(diffs), abs=1e-12)
            half = common.t_quantile_975(1) * statistics.stdev(diffs) / math.sqrt(2)
            assert (d["lo"], d["hi"]) == pytest.approx((d["mean"] - half, d["mean"] + half), abs=1e-12)


def test_paired_difference_and_t_quantiles():
    d = common.paired_difference([3.0, 5.0, 7.0], [2.0, 3.0, 4.0])  # differences 1, 2, 3: mean 2, sd 1
    assert d["mean"] == 2.0 and d["sd"] == 1.0
    assert (d["lo"], d["hi"]) == pytest.approx((2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)))
    assert common.paired_difference([1.0], [0.5])["lo"] is None
    with pytest.raises(ValueError):
        common.paired_difference([1.0, 2.0], [1.0])
    # Student's t: 12.706 at df 1, decreasing towards the normal 1.960; the expansion beyond the table
    # joins it (exact: 2.0395 at df 31, 2.0003 at df 60, 1.9799 at df 120).
    qs = [common.t_quantile_975(df) for df in range(1, 200)]
    assert qs[0] == 12.706 and all(a > b for a, b in zip(qs, qs[1:])) and qs[-1] > 1.96
    assert [common.t_quantile_975(df) for df in (31, 60, 120)] == pytest.approx([2.0395, 2.0003, 1.9799], abs=5e-4)


def test_flatness_criterion():
    dropping = [(s, 2.0 - 0.001 * s) for s in range(0, 400, 50)]
    assert not compare.flat_at(dropping, window=100, tol=0.01)  # 0.1 per 100 steps
    plateau = [(s, 1.0 + (0.003 if s % 100 else 0.0)) for s in range(0, 400, 50)]  # noise, no progress
    assert compare.flat_at(plateau, window=100, tol=0.01)
    assert not compare.flat_at(plateau[:2], window=100, tol=0.01)  # shorter than the window
    progress = [(0, 2.0), (50, 1.5), (100, 1.6), (150, 1.2)]  # a noisy point does not hide progress
    assert not compare.flat_at(progress, window=100, tol=0.01)
    spike = [(0, 1.0), (50, 1.0), (100, 1.05), (150, 1.0), (200, 1.0)]  # nor does a spike fake any
    assert compare.flat_at(spike, window=100, tol=0.01)


def test_arm_flatness_is_judged_over_the_runs_last_window_or_not_at_all():
    # The study's arms: 300 steps evaluated every 50, window 250. The criterion is read at the last
    # evaluation (step 300, the decay included); a run shorter than the window reads "n/a", never "0/5".
    config = compare.preset_config("study")
    plateau = [{"step": s, "loss": 1.0 + (0.003 if s % 100 else 0.0)} for s in range(0, 301, 50)]
    assert compare.run_flat(plateau, config) is True
    falling = [{"step": s, "loss": 2.0 - 0.0001 * s} for s in range(0, 301, 50)]  # 0.025 over the last 250
    assert compare.run_flat(falling, config) is False
    late_drop = plateau[:-1] + [{"step": 300, "loss": 0.98}]  # a decay that still gains 0.02: not flat
    assert compare.run_flat(late_drop, config) is False
    assert compare.run_flat(plateau[:5], config) is None  # steps 0..200: shorter than the window
    assert compare.flat_count([True, None]) == "n/a" and compare.flat_count([True, False, True]) == "2/3"


def test_base_trained_in_chunks_equals_one_run():
    # flat_window beyond the budget: never flat, so both run base_max_steps; the chunked run resumes
    # from a checkpoint every 2 steps and must end with the same weights as the one-chunk run.
    config = compare.preset_config("tiny", flat_window=100, anneal_fraction=0.5)
    train_tokens, eval_tokens, _ = compare.load_corpus(config)
    runs = []
    for check_every in (2, config.base_max_steps):
        chunked = dataclasses.replace(config, check_every=check_every)
        base = compare.make_base(chunked, 0)
        record = compare.train_base(base, train_tokens, eval_tokens, chunked, 0, None, lambda *a: None)
        runs.append((record, base.state_dict()))
    (a, wa), (b, wb) = runs
    assert a["steps"] == b["steps"] == 6 + 3 and not a["flattened"] and not b["flattened"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_outputs_record_python_and_corpus(tiny_run):
    summary, out = tiny_run
    rep = summary["reproducibility"]
    assert rep["python"] == platform.python_version() and len(rep["corpus_sha256"]) == 64
    assert rep["corpus_sha256"] == summary["data"]["corpus_sha256"]
    text = (out / "summary.md").read_text()
    assert rep["python"] in text and rep["corpus_sha256"] in text
    assert text.count("\n| ") >= len(summary["arms"]) + 2
    saved = json.loads((out / "summary.json").read_text())
    assert numbers(saved) == numbers(summary) and saved["reproducibility"] == rep
    for seed in (0, 1):
        for name in ["base", *summary["arms"]]:
            lines = (out / "runs" / f"seed{seed}" / f"{name}.jsonl").read_text().splitlines()
            first = json.loads(lines[0])["run"]
            assert first["python"] == rep["python"] and first["corpus_sha256"] == rep["corpus_sha256"]
            assert first["seed"] == seed
            assert any("loss" in json.loads(line) for line in lines[1:])
    pytest.importorskip("matplotlib")
    assert summary["plots"] == ["curves.png"] and (out / "curves.png").stat().st_size > 10_000
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_deterministic_and_arms_independent(tiny_run):
    # Seed 0 again with two arms only: the same base and the same numbers for those arms, to the bit.
    summary, _ = tiny_run
    config = compare.preset_config("tiny", seeds=(0,), methods=("opt-paper", "avg-zero"), reference=False)
    again = compare.run_compare(config, None, log=lambda *a: None)["seeds"][0]
    first = summary["seeds"][0]
    assert again["base"]["held_out"] == first["base"]["held_out"]
    for name in ("opt-paper", "avg-zero"):
        for key in ("after_growth", "after_training", "losses", "evals"):
            assert again["arms"][name][key] == first["arms"][name][key], (name, key)


def test_shared_base_is_the_first_seeds_base(tiny_run, tmp_path):
    # --shared-base: seed 0's base, trained once, grown by both seeds; seed 0's arm is then the very
    # run of the per-seed study, and seed 1's arm reads its own data order from the same start.
    summary, _ = tiny_run
    config = compare.preset_config("tiny", shared_base=True, methods=("avg-zero",), reference=False)
    shared = compare.run_compare(config, tmp_path / "out", log=lambda *a: None)
    first = summary["seeds"][0]
    for s in shared["seeds"]:
        assert s["base"]["held_out"] == first["base"]["held_out"] and s["base"]["shared_from_seed"] == 0
    assert shared["seeds"][0]["arms"]["avg-zero"]["losses"] == first["arms"]["avg-zero"]["losses"]
    assert shared["seeds"][1]["arms"]["avg-zero"]["losses"] != first["arms"]["avg-zero"]["losses"]
    assert (tmp_path / "out" / "runs" / "shared-base" / "base.jsonl").is_file()
    assert "shared by seeds 0, 1" in (tmp_path / "out" / "summary.md").read_text()


def test_shared_base_jobs_per_seed_and_arm_equal_one_process():
    # --jobs 2 with a shared base runs one job per (seed, arm) and merges them back per seed: the
    # same arms, in the same order, with the same numbers as one process running everything.
    config = compare.preset_config("tiny", shared_base=True, methods=("opt-paper", "avg-zero"))
    one = compare.run_compare(config, None, log=lambda *a: None)
    two = compare.run_compare(config, None, log=lambda *a: None, jobs=2)
    assert two["arms"] == one["arms"] == ["opt-paper", "avg-zero", compare.REFERENCE]
    for a, b in zip(one["seeds"], two["seeds"]):
        assert a["seed"] == b["seed"] and list(a["arms"]) == list(b["arms"])
        for name in one["arms"]:
            for key in ("after_growth", "after_training", "losses", "evals"):
                assert a["arms"][name][key] == b["arms"][name][key], (a["seed"], name, key)
    assert two["comparisons"] == one["comparisons"]


def test_a_zero_init_arm_that_moves_the_function_stops_the_study(monkeypatch):
    grow = common.grow_by_name  # what compare's grow_arm calls for a growing arm

    def nudged(model, name, num_new, position, calibration=None):
        grown, report = grow(model, name, num_new, position, calibration)
        with torch.no_grad():
            grown.layers[report["new_layers"][0]].mlp.down_proj.weight.add_(1e-2)
        return grown, report

    monkeypatch.setattr(common, "grow_by_name", nudged)
    config = compare.preset_config("tiny", seeds=(0,), methods=("avg-zero",), reference=False)
    with pytest.raises(common.ExperimentError, match="avg-zero.*exactly"):
        compare.run_compare(config, None, log=lambda *a: None)


def test_missing_method_is_skipped_with_a_note(monkeypatch):
    monkeypatch.setitem(common.ARM_OPTIONS, "opt-nope", dict(method="opt", align="no-such-alignment"))
    notes = []
    kept = common.available_methods(("opt-nope", "avg-zero"), log=notes.append)
    assert kept == ("avg-zero",) and "opt-nope" in notes[0]


def test_cli_errors_exit_2(capsys):
    assert compare.main(["--methods", "opt-paper,nope", "--out", "unused"]) == 2
    assert "nope" in capsys.readouterr().err
    assert compare.main(["--layers", "8", "--new-layers", "9", "--out", "unused"]) == 2  # solar: K > L
    assert "solar" in capsys.readouterr().err
    assert compare.main(["--seeds", "1,1", "--out", "unused"]) == 2
    assert "seeds" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# experiments/smollm2.py


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


@pytest.mark.slow
def test_smollm2_study_on_the_real_checkpoint(smollm2_dir, austen_dir, tmp_path):
    from experiments import smollm2
    config = smollm2.SmolConfig(base=str(smollm2_dir), data=[str(austen_dir)], new_layers=2, positions=(),
                                seeds=(0, 1), steps=2, block_size=32, batch_size=1, micro_batch_size=1,
                                eval_tokens=64, evals=1)
    summary = smollm2.run_smollm2(config, tmp_path / "out", log=lambda *a: None)
    base = summary["base"]["held_out"]["loss"]
    for r in summary["results"]:
        assert (r["after_growth"]["loss"] == base) == r["zero_init"], r["method"]
    assert set(summary["comparisons"]["opt-structured"]) == set(common.BASELINES)
    first = json.loads((tmp_path / "out" / "runs" / "opt-structured@top-seed0.jsonl").read_text().splitlines()[0])
    assert first["run"]["corpus_sha256"] == summary["reproducibility"]["corpus_sha256"]


def test_study_script_runs_both_parts_with_the_study_presets_and_stops_at_a_failure(tmp_path):
    # experiments/study.sh with a stand-in `python` that records its arguments (and fails when told):
    # both parts, SmolLM2 first (a missing checkpoint fails in seconds), with the study presets, into
    # OUT/smollm2 and OUT/compare; a failing part stops the script.
    script = Path(__file__).resolve().parents[1] / "experiments" / "study.sh"
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "$*" >> "$CALLS"\n[ -z "$FAIL" ] || ! echo "$*" | grep -q "$FAIL"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}", "CALLS": str(tmp_path / "calls")}
    done = subprocess.run(["bash", str(script), str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 2
    assert calls[0].split()[0].endswith("experiments/smollm2.py")
    assert calls[0].split()[1:] == ["--preset", "study", "--jobs", "2", "--out", str(tmp_path / "out" / "smollm2")]
    assert calls[1].split()[0].endswith("experiments/compare.py")
    assert calls[1].split()[1:] == ["--preset", "study", "--jobs", "2", "--threads", "2", "--out",
                                    str(tmp_path / "out" / "compare")]
    assert "total" in done.stdout
    (tmp_path / "calls").unlink()
    failed = subprocess.run(["bash", str(script), str(tmp_path / "out")], env={**env, "FAIL": "smollm2.py"},
                            capture_output=True, text=True)
    assert failed.returncode != 0 and len((tmp_path / "calls").read_text().splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# Accuracy on the Emma cloze: the paired per-question bootstrap, and experiments/smollm2.py's use of it


def test_paired_bootstrap_resamples_questions_with_their_seeds():
    import numpy as np
    rng = np.random.default_rng(0)
    baseline = (rng.random((3, 400)) < 0.5).astype(float)  # seeds x questions, right (1) or wrong (0)
    same = common.paired_bootstrap(baseline, baseline)
    assert (same["mean"], same["lo"], same["hi"]) == (0.0, 0.0, 0.0)  # paired: no difference, no spread
    # One arm right on 10 % more questions, on every seed: mean +0.1; interval ~ 1.96 * sqrt(0.1 * 0.9 / 400).
    flips = rng.random(400) < 0.1
    better = np.where(flips, 1.0, baseline)
    d = common.paired_bootstrap(better, baseline, resamples=2000, seed=0)
    diff = better - baseline
    assert d["mean"] == pytest.approx(diff.mean(), abs=1e-15) and d["lo"] < d["mean"] < d["hi"]
    half = 1.96 * diff.mean(axis=0).std() / math.sqrt(400)
    assert (d["hi"] - d["lo"]) / 2 == pytest.approx(half, rel=0.2)
    # Questions are the resampled unit: a difference the same on every seed gives the one-seed interval exactly.
    one = common.paired_bootstrap(better[:1], baseline[:1], resamples=2000, seed=0)
    same_on_seeds = common.paired_bootstrap(np.repeat(better[:1], 3, 0), np.repeat(baseline[:1], 3, 0), 2000, 0)
    assert (one["lo"], one["hi"]) == (same_on_seeds["lo"], same_on_seeds["hi"])
    assert common.paired_bootstrap(better, baseline, 2000, 0) == d  # a fixed seed: the same interval every run
    assert common.fmt_bootstrap(d).endswith(" *") and not common.fmt_bootstrap(same).endswith("*")
    with pytest.raises(ValueError):
        common.paired_bootstrap(better[:, :10], baseline)
    comps = common.bootstrap_comparisons({"a": better, "avg-zero": baseline, "llama-pro": baseline})
    assert set(comps["a"]) == {"avg-zero", "llama-pro"} and set(comps["avg-zero"]) == {"llama-pro"}
    assert comps["a"]["avg-zero"] == d


def test_smollm2_accuracy_flags(tmp_path):
    from experiments import smollm2
    from opt_deus_tool.cloze import DEFAULT_TASK_JSONL

    def config(*argv):
        return smollm2.config_from_flags(smollm2.build_parser().parse_args(
            ["--base", str(tmp_path), "--data", str(tmp_path), *argv]))

    assert config("--preset", "study").accuracy_task == str(DEFAULT_TASK_JSONL)
    assert config("--preset", "study").accuracy_questions == smollm2.STUDY_QUESTIONS
    assert config("--preset", "study", "--accuracy-questions", "0").accuracy_questions is None  # 0: all
    assert config("--preset", "study", "--no-accuracy").accuracy_task is None
    assert all(preset["accuracy_questions"] for preset in smollm2.PRESETS.values())  # on in every preset


def tiny_smollm2_config(smollm2_dir, tmp_path, **kw):
    # The study's code path at its smallest: a tiny random model with SmolLM2's tokenizer as the base, two short
    # text files (held out: emma.txt), one step, two cloze questions.
    from experiments import smollm2
    from opt_deus_core.model import ModelArgs, Transformer
    from opt_deus_tool.checkpoint import save_pretrained
    from opt_deus_tool.cloze import DEFAULT_TASK_JSONL, read_questions
    args = ModelArgs(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    base_dir = tmp_path / "base"
    save_pretrained(Transformer(args).init_weights(torch.Generator().manual_seed(0), std=0.5), base_dir,
                    copy_files_from=smollm2_dir)
    questions = read_questions(DEFAULT_TASK_JSONL)
    data = tmp_path / "data"
    data.mkdir()
    (data / "emma.txt").write_text(" ".join(q["context"] for q in questions[100:110]))
    (data / "other.txt").write_text(" ".join(q["context"] for q in questions[200:260]))
    return smollm2.SmolConfig(**{**dict(base=str(base_dir), data=[str(data)], new_layers=1, methods=("avg-zero", "avg"),
                                        positions=(), seeds=(0, 1), steps=1, block_size=16, batch_size=1,
                                        micro_batch_size=1, eval_tokens=32, accuracy_task=str(DEFAULT_TASK_JSONL),
                                        accuracy_questions=2), **kw})


def test_smollm2_reports_accuracy_with_paired_intervals(smollm2_dir, tmp_path):
    # acc and acc_norm for the base, every arm after growth and every seed after training; a zero-init arm after
    # growth scores every choice exactly as the base does, a non-preserving one does not.
    from experiments import smollm2
    config = tiny_smollm2_config(smollm2_dir, tmp_path)
    summary = smollm2.run_smollm2(config, None, log=lambda *a: None)
    base = summary["base"]["accuracy"]
    assert base["questions"] == 2 and len(base["per_question"]["loglikelihoods"]) == 2
    by_method = {r["method"]: r for r in summary["results"]}
    assert (by_method["avg-zero"]["after_growth"]["accuracy"]["per_question"]["loglikelihoods"]
            == base["per_question"]["loglikelihoods"])
    assert (by_method["avg"]["after_growth"]["accuracy"]["per_question"]["loglikelihoods"]
            != base["per_question"]["loglikelihoods"])
    for r in summary["results"]:
        assert [len(s["after_training"]["accuracy"]["per_question"]["acc"]) for s in r["seeds"]] == [2, 2]
    d = summary["accuracy_comparisons"]["after_training"]["acc"]["avg"]["avg-zero"]
    assert (d["n_questions"], d["n_seeds"], d["resamples"]) == (2, 2, smollm2.BOOTSTRAP_RESAMPLES)
    acc = [[s["after_training"]["accuracy"]["per_question"]["acc"] for s in by_method[m]["seeds"]]
           for m in ("avg", "avg-zero")]
    assert d == common.paired_bootstrap(*acc, smollm2.BOOTSTRAP_RESAMPLES, smollm2.BOOTSTRAP_SEED)
    text = smollm2.summary_markdown(summary)
    assert "Accuracy on the Emma cloze (2 questions" in text and "noise unless its interval excludes 0" in text
    saved = json.loads(json.dumps(summary, allow_nan=False))  # what summary.json holds (tuples become lists)
    assert saved["accuracy_comparisons"] == summary["accuracy_comparisons"] and saved["base"] == summary["base"]


def test_smollm2_workers_equal_one_process(smollm2_dir, tmp_path):
    # --jobs 2: each worker loads the base and data once and runs its arms on them one after another (the study's
    # 8 arms, 4 each); every number equals one process running every arm on one load.
    from experiments import smollm2

    def measured(r: dict) -> dict:  # what a run computed, not how long it took
        return {k: measured(v) if isinstance(v, dict) else v for k, v in r.items() if k != "seconds"}

    config = tiny_smollm2_config(smollm2_dir, tmp_path, methods=("avg-zero", "avg", "llama-pro", "no-growth-top-k"),
                                 steps=2, evals=0)
    one = smollm2.run_smollm2(config, None, log=lambda *a: None)
    two = smollm2.run_smollm2(config, None, log=lambda *a: None, jobs=2)
    assert [r["method"] for r in two["results"]] == [r["method"] for r in one["results"]] == list(config.methods)
    for a, b in zip(one["results"], two["results"]):
        assert measured(a["after_growth"]) == measured(b["after_growth"]), a["method"]
        for sa, sb in zip(a["seeds"], b["seeds"], strict=True):
            assert ([measured(sa["after_training"]), sa["losses"], sa["evals"]]
                    == [measured(sb["after_training"]), sb["losses"], sb["evals"]]), a["method"]
            assert [e["step"] for e in sa["evals"]] == [0, 2]  # after growth, then the end: the study preset's evals=0
    assert two["comparisons"] == one["comparisons"]


def test_smollm2_accuracy_comparisons_are_arm_minus_baseline():
    # Made-up per-question scores: opt-structured right on question 0 where the baselines are wrong, on every
    # seed; after growth every arm is the same. Positive means the arm answers more questions right.
    from experiments import smollm2

    def arm(method, right_first):
        def score(first):
            return {"acc": [first, 0.0, 1.0], "acc_norm": [first, 1.0, 0.0]}
        return {"method": method, "after_growth": {"accuracy": {"per_question": score(0.0)}},
                "seeds": [{"after_training": {"accuracy": {"per_question": score(right_first)}}} for _ in range(3)]}

    top = [arm("opt-structured", 1.0), arm("avg-zero", 0.0), arm("llama-pro", 0.0)]
    comps = smollm2.accuracy_comparisons(top)
    for metric in ("acc", "acc_norm"):
        trained = comps["after_training"][metric]["opt-structured"]
        assert trained["avg-zero"]["mean"] == pytest.approx(1 / 3) and trained["llama-pro"]["n_seeds"] == 3
        assert comps["after_training"][metric]["avg-zero"]["llama-pro"]["mean"] == 0
        assert comps["after_growth"][metric]["opt-structured"]["avg-zero"]["mean"] == 0
        assert comps["after_growth"][metric]["opt-structured"]["avg-zero"]["n_seeds"] == 1


def test_each_scaled_arm_is_also_paired_with_its_zero_init_arm():
    # Issue 21's question, per arm: the scaled arm minus its zero-init arm, seed by seed.
    final = {"avg-zero": [1.0, 2.0, 3.0], "llama-pro": [1.0, 2.0, 3.5], "opt-structured": [1.5, 2.0, 3.0],
             "opt-structured-act@0.1": [1.0, 2.5, 3.0]}
    comparisons = common.paired_comparisons(final)
    assert math.isclose(comparisons["opt-structured-act@0.1"]["opt-structured"]["mean"], 0.0)
    assert set(comparisons["opt-structured"]) == {"avg-zero", "llama-pro"}
    assert common.fmt_against_zero_init("opt-structured-act@0.1", comparisons["opt-structured-act@0.1"]) \
        .endswith("(opt-structured)")
    assert all(common.ZERO_INIT_ARM[arm] in common.STUDY_ARMS for arm in common.STUDY_ARMS if "@" in arm)


def test_a_terminating_signal_ends_an_experiment_in_one_line_with_128_plus_n(capsys):
    import signal
    from types import SimpleNamespace

    from opt_deus_tool.atomic import Interrupted

    def start():
        raise Interrupted(signal.SIGTERM)
    code = common.run_cli("compare.py", SimpleNamespace(threads=0, jobs=1), start, ())
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGTERM and err.count("\n") == 1 and "SIGTERM" in err and "Traceback" not in err
