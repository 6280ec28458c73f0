"""Nothing a user types may destroy a model or a run, or pass silently (issue 10).

One table per tool (opt-deus, opt-deus-train, opt-deus-eval, the Python APIs). Every bad input
goes through the real entry point (`main(argv)` in this process, for speed; a few true subprocess
runs for signals, file-size limits and the installed commands) and must end with a non-zero exit,
exactly one line on stderr naming the problem, no traceback, and every input folder and earlier
output byte-for-byte as it was (a hash of the whole workspace, hidden files included, so nothing
half-written is left either).
"""

import contextlib
import hashlib
import io
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from opt_deus_core import train
from opt_deus_core.model import ModelArgs, Transformer
from opt_deus_core.opt_deus import GrowthError, GrowthOptions, grow
from opt_deus_tool import CheckpointError
from opt_deus_tool import eval_cli, grow_cli, train_cli
from opt_deus_tool.atomic import SCRATCH_HOST
from opt_deus_tool.checkpoint import CheckpointWriter, load_pretrained, parse_size, save_pretrained
from opt_deus_tool.eval_cli import evaluate_text
from opt_deus_tool.grow_cli import grow_checkpoint
from opt_deus_tool.runs import find_checkpoints, train_run

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
WORDS = "the quick brown fox jumps over a lazy dog while cats sleep".split()


# ----------------------------------------------------------------------------------------------
# A workspace of inputs and earlier outputs, made once


def tiny_model(vocab=300, tied=True, layers=4, seed=0, **extra) -> Transformer:
    args = ModelArgs(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tied,
                     max_position_embeddings=256)
    args.extra.update({"opt_deus": {"new_layers": [1, 3]}, **extra})
    return Transformer(args).init_weights(torch.Generator().manual_seed(seed))


def edit_config(folder: Path, edit):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(edit(config)))


def edit_tensors(folder: Path, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def word_level_tokenizer(path: Path):
    # A tokenizer whose ids (350+) do not fit a 300-token model: a tokenizer from another model.
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<eos>": 0, "[UNK]": 1, **{w: 350 + i for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))


def call(entry, argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    # Warnings (a solver's non-convergence note) are recorded apart, whatever pytest's warning capture.
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings(record=True):
        try:
            code = entry([str(a) for a in argv])
        except SystemExit as e:  # argparse
            code = e.code
    return code, out.getvalue(), err.getvalue()


def tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("workspace")
    cache = tmp_path_factory.mktemp("token_cache")  # outside the hashed workspace: a cache may fill
    base = root / "base"
    save_pretrained(tiny_model(), base)
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    (data / "text.txt").write_text("\n".join(" ".join(rng.choice(WORDS, 10)) for _ in range(120)))
    (data / "sft.json").write_text(json.dumps([{"instruction": "say", "input": "", "output": " ".join(WORDS)}] * 8))
    (root / "empty.txt").write_text("")
    (root / "a_file.txt").write_text("not a folder")
    (root / "notes").mkdir()  # a folder of the user's that is no model
    (root / "notes" / "todo.txt").write_text("keep me")

    save_pretrained(tiny_model(vocab=1000), root / "big_vocab")  # a real-size vocabulary, no tokenizer.json
    save_pretrained(tiny_model(eos_token_id=0), root / "other_tokenizer")
    word_level_tokenizer(root / "other_tokenizer" / "tokenizer.json")

    for name, edit in [("config_list", lambda c: [c]),
                       ("config_string", lambda c: {**c, "hidden_size": "32"}),
                       ("config_rope_list", lambda c: {**c, "rope_parameters": ["default"]}),
                       ("config_kv_zero", lambda c: {**c, "num_key_value_heads": 0}),
                       ("config_tie_text", lambda c: {**c, "tie_word_embeddings": "yes"}),
                       ("gpt2", lambda c: {**c, "model_type": "gpt2"})]:
        shutil.copytree(base, root / name)
        edit_config(root / name, edit)
    shutil.copytree(base, root / "int32")
    edit_tensors(root / "int32", lambda t: t.update({k: (v * 100).to(torch.int32) for k, v in t.items()}))
    shutil.copytree(base, root / "nan_embed")
    edit_tensors(root / "nan_embed", lambda t: t["model.embed_tokens.weight"].__setitem__((0, 0), math.nan))
    shutil.copytree(base, root / "huge")  # fine in float32, inf in float16
    edit_tensors(root / "huge", lambda t: t["model.layers.0.self_attn.q_proj.weight"].mul_(1e7))

    # Earlier outputs: a grown model and a training run stopped at step 2 of 4 (checkpoints 1 and 2).
    assert grow_cli.main(["--base", str(base), "--out", str(root / "grown"), "--new-layers", "2"]) == 0
    code, _, err = call(train_cli.main, ["--model", base, "--data", data / "text.txt", "--out", root / "runA",
                                         "--cache-dir", cache, *TINY, "--steps", 4, "--stop-after", 2,
                                         "--checkpoint-every", 1])
    assert code == 0, err
    # A folder holding a checkpoint of runA beside one of another run (a checkpoint copied in).
    for step in (1, 2):
        shutil.copytree(root / "runA" / f"checkpoint-00000{step}", root / "mixed" / f"checkpoint-00000{step}")
    edit_state = root / "mixed" / "checkpoint-000001" / "trainer_state.json"
    edit_state.write_text(json.dumps({**json.loads(edit_state.read_text()), "run": {"run_id": "another run"}}))
    return {"root": root, "cache": cache, "base": base, "data": data, "text": data / "text.txt",
            "runA": root / "runA", "grown": root / "grown"}


TINY = ["--block-size", 32, "--batch-tokens", 128, "--micro-batch-size", 2, "--warmup-steps", 1, "--lr", 0.01,
        "--device", "cpu", "--eval-every", 0, "--log-every", 100]


# Progress lines a tool may print before it meets the problem (growth starts before a plan fails).
PROGRESS = ("note: ", "growing ", "[", "tokenised ", "resumed from ", "training ", "eval ", "step ")


def assert_refused(ws, entry, argv, match, code=2):
    before = tree_hash(ws["root"])
    rc, out, err = call(entry, argv)
    lines = err.strip().splitlines()
    assert rc == code, (rc, err)
    assert lines and all(line.startswith(PROGRESS) for line in lines[:-1]), err
    assert ": error: " in lines[-1] and match in lines[-1] and "Traceback" not in err, err
    assert tree_hash(ws["root"]) == before, "an input or earlier output changed, or something was left behind"


# ----------------------------------------------------------------------------------------------
# opt-deus


def opt_deus_cases(ws):
    r, base = ws["root"], ws["base"]
    grow_args = ["--base", base, "--new-layers", 2]
    cases = [
        # data loss: --out against --base
        ("out-is-base+overwrite", [*grow_args, "--out", base, "--overwrite"], "is the input --base"),
        ("out-contains-base+overwrite", [*grow_args, "--out", r, "--overwrite"], "contains the input --base"),
        ("out-inside-base", [*grow_args, "--out", base / "grown"], "is inside the input --base"),
        ("out-symlink-to-base+overwrite", [*grow_args, "--out", r / "link_to_base", "--overwrite"], "is the input"),
        ("out-earlier-output", [*grow_args, "--out", ws["grown"]], "already exists"),
        ("out-is-a-file+overwrite", [*grow_args, "--out", r / "a_file.txt", "--overwrite"], "is a file"),
        ("out-not-a-model+overwrite", [*grow_args, "--out", r / "notes", "--overwrite"], "no config.json"),
        # flags
        ("new-layers-0", ["--base", base, "--new-layers", 0, "--out", r / "o"], "positive integer"),
        ("new-layers-text", ["--base", base, "--new-layers", "two", "--out", r / "o"], "--new-layers"),
        ("insert-after-range", ["--base", base, "--insert-after", 3, "--out", r / "o"], "out of range"),
        ("insert-after-text", ["--base", base, "--insert-after", "a,b", "--out", r / "o"], "--insert-after"),
        ("max-shard-size-text", [*grow_args, "--out", r / "o", "--max-shard-size", "abc"], "--max-shard-size"),
        ("max-shard-size-negative", [*grow_args, "--out", r / "o", "--max-shard-size=-5"], "--max-shard-size"),
        ("max-iter-0", [*grow_args, "--out", r / "o", "--max-iter", 0], "--max-iter"),
        ("epsilon-nan", [*grow_args, "--out", r / "o", "--epsilon", "nan"], "--epsilon"),
        ("epsilon-negative", [*grow_args, "--out", r / "o", "--epsilon=-1"], "--epsilon"),
        ("tol-0", [*grow_args, "--out", r / "o", "--tol", 0], "--tol"),
        ("max-marginal-error-0", [*grow_args, "--out", r / "o", "--max-marginal-error", 0], "--max-marginal-error"),
        ("method-unknown", [*grow_args, "--out", r / "o", "--method", "magic"], "--method"),
        ("device-bogus", [*grow_args, "--out", r / "o", "--device", "tpu9"], "--device"),
        # a plan far from its marginals would write weights far beyond the base's norm
        ("plan-marginal-error", [*grow_args, "--out", r / "o", "--epsilon", 1e-3, "--max-iter", 3],
         "marginal error"),
        # corrupt and lying checkpoints
        ("base-missing", ["--base", r / "nope", "--new-layers", 2, "--out", r / "o"], "not a folder"),
        ("base-int32-tensors", ["--base", r / "int32", "--new-layers", 2, "--out", r / "o"], "floating point"),
        ("base-config-list", ["--base", r / "config_list", "--new-layers", 2, "--out", r / "o"], "JSON object"),
        ("base-config-string", ["--base", r / "config_string", "--new-layers", 2, "--out", r / "o"],
         "hidden_size must be a positive integer"),
        ("base-config-rope-list", ["--base", r / "config_rope_list", "--new-layers", 2, "--out", r / "o"],
         "rope_parameters must be an object"),
        ("base-gpt2", ["--base", r / "gpt2", "--new-layers", 2, "--out", r / "o"], "only LLaMA"),
        ("base-nan", ["--base", r / "nan_embed", "--new-layers", 2, "--out", r / "o"], "NaN or inf"),
        ("dtype-float16-overflow", ["--base", r / "huge", "--new-layers", 2, "--out", r / "o", "--dtype", "float16"],
         "not finite"),
    ]
    if not torch.cuda.is_available():
        cases.append(("device-cuda-absent", [*grow_args, "--out", r / "o", "--device", "cuda"], "CUDA"))
    return cases


OPT_DEUS_IDS = [c[0] for c in opt_deus_cases({"root": Path("r"), "base": Path("b"), "grown": Path("g")})]


def test_opt_deus_never_replaces_the_working_directory(ws, monkeypatch):
    monkeypatch.chdir(ws["data"])
    assert_refused(ws, grow_cli.main, ["--base", ws["base"], "--new-layers", 2, "--out", ".", "--overwrite"],
                   "is the current directory")
    assert_refused(ws, grow_cli.main, ["--base", ws["base"], "--new-layers", 2, "--out", "", "--overwrite"],
                   "is the current directory")


@pytest.mark.parametrize("case", OPT_DEUS_IDS)
def test_opt_deus_bad_input(ws, case):
    if not (ws["root"] / "link_to_base").exists():
        (ws["root"] / "link_to_base").symlink_to(ws["base"], target_is_directory=True)
    _, argv, match = next(c for c in opt_deus_cases(ws) if c[0] == case)
    assert_refused(ws, grow_cli.main, argv, match)


def test_opt_deus_accepts_far_plans_only_when_asked(ws, tmp_path):
    out = tmp_path / "grown"
    argv = ["--base", ws["base"], "--new-layers", 2, "--epsilon", 1e-3, "--max-iter", 3]
    assert call(grow_cli.main, [*argv, "--out", out, "--max-marginal-error", "inf"])[0] == 0
    assert (out / "model.safetensors").is_file()


def test_opt_deus_removes_stale_temporary_folders(ws, tmp_path):
    # A run killed by SIGKILL leaves its temporary folder; the next run into the same place removes it
    # (a live process's, or another host's, would be left alone).
    stale = tmp_path / f".grown.tmp-{SCRATCH_HOST}-999999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    other_host = tmp_path / ".grown.tmp-otherhost-999999999"
    other_host.mkdir()
    assert call(grow_cli.main, ["--base", ws["base"], "--new-layers", 2, "--out", tmp_path / "grown"])[0] == 0
    assert not stale.exists() and other_host.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".grown.tmp-otherhost-999999999", "grown"]


# ----------------------------------------------------------------------------------------------
# opt-deus-train


def train_cases(ws):
    r, base, text, run_a, cache = ws["root"], ws["base"], ws["text"], ws["runA"], ws["cache"]
    start = ["--model", base, "--data", text, "--cache-dir", cache, *TINY, "--steps", 2]

    def fresh(*extra):
        return [*start, "--out", r / "new_run", *extra]
    resume = ["--resume", run_a, "--cache-dir", cache]
    cases = [
        # data loss: --out against the inputs and earlier runs
        ("out-is-model", [*start, "--out", base], "is the input --model"),
        ("out-contains-model", [*start, "--out", r], "contains the input --model"),
        ("out-inside-model", [*start, "--out", base / "run"], "is inside the input --model"),
        ("out-contains-data", [*start, "--out", ws["data"]], "contains the input --data"),
        ("out-is-a-file", [*start, "--out", r / "a_file.txt"], "is a file"),
        ("out-holds-another-run", [*start, "--out", run_a], "already holds checkpoints"),
        ("keep-checkpoints-negative", fresh("--keep-checkpoints=-1"), "--keep-checkpoints -1"),
        ("resume-out-inside-checkpoint", [*resume, "--out", run_a / "checkpoint-000002" / "x"], "is inside"),
        ("resume-beside-another-run", ["--resume", r / "mixed" / "checkpoint-000002", "--cache-dir", cache],
         "also holds checkpoint-000001 of another run"),
        # the token cache is written too: not into an input (inside --data it would be read back as data)
        ("cache-dir-inside-data", ["--model", base, "--data", ws["data"], "--cache-dir", ws["data"] / "cache",
                                   "--out", r / "new_run", *TINY], "--cache-dir"),
        ("cache-dir-is-model", ["--model", base, "--data", text, "--cache-dir", base, "--out", r / "new_run", *TINY],
         "is the input --model"),
        # silent wrong output
        ("batch-tokens-0", fresh("--batch-tokens", 0), "--batch-tokens 0"),
        ("batch-tokens-negative", fresh("--batch-tokens=-128"), "--batch-tokens -128"),
        ("batch-tokens-not-a-multiple", fresh("--batch-tokens", 100), "not a multiple"),
        ("block-size-beyond-positions", fresh("--block-size", 512, "--batch-tokens", 1024),
         "max_position_embeddings 256"),
        ("resume-changed-lr", [*resume, "--lr", 0.5], "cannot change --lr 0.5"),
        ("resume-changed-block-size", [*resume, "--block-size", 64], "--block-size 64"),
        ("resume-changed-seed", [*resume, "--seed", 3], "--seed 3"),
        ("resume-with-model", [*resume, "--model", base], "--model"),
        ("resume-already-done", [*resume, "--steps", 2], "already at step 2"),
        ("resume-steps-below-checkpoint", [*resume, "--steps", 1], "already at step 2 of --steps 1"),
        ("resume-stop-after-behind", [*resume, "--stop-after", 1], "--stop-after 1 is not beyond"),
        ("no-tokenizer-big-vocab", ["--model", r / "big_vocab", "--data", text, "--out", r / "new_run",
                                    "--cache-dir", cache, *TINY], "tokenizer.json: missing"),
        ("tokenizer-ids-beyond-vocab", ["--model", r / "other_tokenizer", "--data", text, "--out", r / "new_run",
                                        "--cache-dir", cache, *TINY], "does not fit the model's vocab_size"),
        ("sft-ids-beyond-vocab", ["--model", r / "other_tokenizer", "--task", "sft", "--data", ws["data"] / "sft.json",
                                  "--out", r / "new_run", "--cache-dir", cache, *TINY],
         "does not fit the model's vocab_size"),
        # flags, named as typed, with their default
        ("steps-below-default-warmup", ["--model", base, "--data", text, "--out", r / "new_run", "--steps", 20],
         "--warmup-steps 100 must be >= 0 and below --steps 20 (default --warmup-steps 100)"),
        ("beta1-2", fresh("--beta1", 2), "--beta1 2"),
        ("beta2-negative", fresh("--beta2=-0.1"), "--beta2"),
        ("lr-nan", fresh("--lr", "nan"), "--lr"),
        ("lr-0", fresh("--lr", 0), "--lr 0"),
        ("seed-negative", fresh("--seed=-1"), "--seed -1"),
        ("eval-fraction-1.5", fresh("--eval-fraction", 1.5), "--eval-fraction"),
        ("eval-every-negative", fresh("--eval-every=-1"), "--eval-every"),
        ("stop-after-0", fresh("--stop-after", 0), "--stop-after"),
        ("dist-timeout-negative", fresh("--dist-timeout=-5"), "--dist-timeout -5"),
        ("dist-timeout-nan", fresh("--dist-timeout", "nan"), "--dist-timeout nan"),
        ("steps-text", fresh("--steps", "many"), "--steps"),
        ("device-bogus", fresh("--device", "tpu9"), "--device"),
        ("trainable-out-of-range", fresh("--trainable", 9), "out of range"),
        ("trainable-text", fresh("--trainable", "x,y"), "--trainable"),
        # missing, corrupt and lying inputs
        ("data-missing", ["--model", base, "--data", r / "nope.txt", "--out", r / "new_run", *TINY], "no such file"),
        ("data-empty", ["--model", base, "--data", r / "empty.txt", "--out", r / "new_run",
                        "--cache-dir", cache, *TINY], "empty"),
        ("model-missing", ["--model", r / "nope", "--data", text, "--out", r / "new_run", *TINY], "not a folder"),
        ("model-int32", ["--model", r / "int32", "--data", text, "--out", r / "new_run", *TINY], "floating point"),
        ("model-config-list", ["--model", r / "config_list", "--data", text, "--out", r / "new_run", *TINY],
         "JSON object"),
        ("resume-not-a-checkpoint", ["--resume", ws["data"]], "not a checkpoint"),
    ]
    if not torch.cuda.is_available():
        cases.append(("device-cuda-absent", fresh("--device", "cuda"), "CUDA is not available"))
    return cases


TRAIN_IDS = [c[0] for c in train_cases({k: Path(k) for k in ("root", "base", "text", "runA", "cache", "data")})]


@pytest.mark.parametrize("case", TRAIN_IDS)
def test_train_bad_input(ws, case):
    _, argv, match = next(c for c in train_cases(ws) if c[0] == case)
    assert_refused(ws, train_cli.main, argv, match)


def test_resumed_copy_writes_only_into_its_own_folder(ws, tmp_path):
    # cp -r runs/A runs/B; --resume runs/B: B continues, A (whose path is saved inside B) is untouched.
    run_b = tmp_path / "runB"
    shutil.copytree(ws["runA"], run_b)
    # What a run killed by SIGKILL left in its folder (a checkpoint this run will not write again, a
    # run.json) is removed; another host's is left alone.
    stale = [run_b / f".checkpoint-000009.tmp-{SCRATCH_HOST}-999999999",
             run_b / f".run.json.tmp-{SCRATCH_HOST}-999999999"]
    stale[0].mkdir()
    stale[1].write_text("{")
    (run_b / ".checkpoint-000009.tmp-otherhost-999999999").mkdir()
    before = tree_hash(ws["root"])
    code, out, err = call(train_cli.main, ["--resume", run_b, "--cache-dir", ws["cache"], "--keep-checkpoints", 1])
    assert code == 0, err
    assert tree_hash(ws["root"]) == before
    assert [c.name for c in find_checkpoints(run_b)] == ["checkpoint-000004"]
    assert not any(p.exists() for p in stale) and (run_b / ".checkpoint-000009.tmp-otherhost-999999999").is_dir()
    assert json.loads((run_b / "run.json").read_text())["config"]["out_dir"] == str(run_b)
    assert json.loads(out.strip().splitlines()[-1])["step"] == 4


# ----------------------------------------------------------------------------------------------
# opt-deus-eval


def eval_cases(ws):
    r, base, text = ws["root"], ws["base"], ws["text"]
    ok = ["--model", base, "--text", text, "--device", "cpu"]
    cases = [
        ("block-size-0", [*ok, "--block-size", 0], "--block-size"),
        ("batch-size-0", [*ok, "--batch-size", 0], "--batch-size"),
        ("block-size-text", [*ok, "--block-size", "big"], "--block-size"),
        ("block-size-beyond-positions", [*ok, "--block-size", 512], "max_position_embeddings 256"),
        ("no-tokenizer-big-vocab", ["--model", r / "big_vocab", "--text", text], "tokenizer.json: missing"),
        ("tokenizer-ids-beyond-vocab", ["--model", r / "other_tokenizer", "--text", text], "does not fit"),
        ("json-over-text", [*ok, "--json", text], "would overwrite the input --text"),
        ("json-into-model", [*ok, "--json", base / "report.json"], "would overwrite the input --model"),
        ("json-is-a-folder", [*ok, "--json", ws["data"]], "is a folder"),
        ("json-folder-missing", [*ok, "--json", r / "nope" / "report.json"], "--json"),
        ("text-missing", ["--model", base, "--text", r / "nope.txt"], "no such file"),
        ("text-empty", ["--model", base, "--text", r / "empty.txt"], "empty"),
        ("model-missing", ["--model", r / "nope", "--text", text], "not a folder"),
        ("model-int32", ["--model", r / "int32", "--text", text], "floating point"),
        ("device-bogus", [*ok, "--device", "tpu9"], "--device"),
    ]
    if not torch.cuda.is_available():
        cases.append(("device-cuda-absent", [*ok, "--device", "cuda"], "CUDA is not available"))
    return cases


EVAL_IDS = [c[0] for c in eval_cases({k: Path(k) for k in ("root", "base", "text", "data")})]


@pytest.mark.parametrize("case", EVAL_IDS)
def test_eval_bad_input(ws, case):
    _, argv, match = next(c for c in eval_cases(ws) if c[0] == case)
    assert_refused(ws, eval_cli.main, argv, match)


def test_eval_shows_progress(ws):
    code, out, err = call(eval_cli.main, ["--model", ws["base"], "--text", ws["text"], "--block-size", 32,
                                          "--device", "cpu"])
    assert code == 0 and "perplexity per token" in out
    assert "eval batch" in err and "eta" in err


# ----------------------------------------------------------------------------------------------
# The Python APIs: the same checks as the command lines


def api_cases(ws):
    r, base = ws["root"], ws["base"]

    def tokens():
        return np.random.default_rng(0).integers(0, 257, 4000).astype(np.uint32)

    def cfg(**kw):
        base_kw = dict(steps=2, lr=1e-2, warmup_steps=1, batch_tokens=128, micro_batch_size=2, block_size=32,
                       eval_every=0, device="cpu")
        return train.TrainConfig(**{**base_kw, **kw})

    return [
        ("from_pretrained-int32", lambda: load_pretrained(r / "int32"), CheckpointError, "floating point"),
        ("from_pretrained-config-list", lambda: load_pretrained(r / "config_list"), CheckpointError,
         "JSON object"),
        ("from_pretrained-config-string", lambda: load_pretrained(r / "config_string"), CheckpointError,
         "hidden_size"),
        ("from_pretrained-rope-list", lambda: load_pretrained(r / "config_rope_list"), CheckpointError,
         "rope_parameters"),
        ("from_pretrained-kv-heads-0", lambda: load_pretrained(r / "config_kv_zero"), CheckpointError,
         "num_key_value_heads"),
        ("from_pretrained-tie-text", lambda: load_pretrained(r / "config_tie_text"), CheckpointError,
         "tie_word_embeddings"),
        ("grow-0-layers", lambda: grow(tiny_model(), 0), GrowthError, "positive integer"),
        ("grow-far-plan", lambda: grow(tiny_model(), 2, options=GrowthOptions(epsilon=1e-3, max_iter=3)),
         GrowthError, "marginal error"),
        ("options-max-iter-0", lambda: GrowthOptions(max_iter=0), GrowthError, "max_iter"),
        ("options-epsilon-nan", lambda: GrowthOptions(epsilon=math.nan), GrowthError, "epsilon"),
        ("options-tol-0", lambda: GrowthOptions(tol=0), GrowthError, "tol"),
        ("grow_checkpoint-out-is-base", lambda: grow_checkpoint(base, base, 2, overwrite=True, log=print),
         CheckpointError, "is the input `base`"),
        ("save_pretrained-over-its-source", lambda: save_pretrained(
            load_pretrained(base), base, copy_files_from=base), CheckpointError, "is the input"),
        ("writer-target-is-a-file", lambda: CheckpointWriter(r / "a_file.txt", overwrite=True), CheckpointError,
         "is a file"),
        ("writer-float16-overflow", lambda: _write_overflow(r / "o"), CheckpointError, "not finite"),
        ("parse_size-text", lambda: parse_size("lots"), ValueError, "not a size"),
        ("train-keep-checkpoints-negative", lambda: train_run(tiny_model(), tokens(), cfg(), keep_checkpoints=-1),
         train.TrainError, "`keep_checkpoints`"),
        ("train-batch-tokens-0", lambda: train_run(tiny_model(), tokens(), cfg(batch_tokens=0)),
         train.TrainError, "`batch_tokens`"),
        ("train-block-beyond-positions", lambda: train_run(tiny_model(), tokens(), cfg(block_size=512,
                                                                                        batch_tokens=1024)),
         train.TrainError, "max_position_embeddings"),
        ("evaluate_text-block-0", lambda: evaluate_text(base, ws["text"], block_size=0), train.TrainError,
         "`block_size`"),
    ]


def _write_overflow(path):
    with CheckpointWriter(path) as writer:
        writer.add("model.norm.weight", torch.full((4,), 1e6).half())


API_IDS = [c[0] for c in api_cases({k: Path(k) for k in ("root", "base", "text")})]


@pytest.mark.parametrize("case", API_IDS)
def test_api_bad_input(ws, case):
    _, fn, error, match = next(c for c in api_cases(ws) if c[0] == case)
    before = tree_hash(ws["root"])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        with pytest.raises(error, match=match):
            fn()
    assert tree_hash(ws["root"]) == before


# ----------------------------------------------------------------------------------------------
# True processes: the installed commands, a file-size limit, signals


def command(name: str) -> list[str]:
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    module = {"opt-deus": ["-m", "opt_deus_tool.grow_cli"], "opt-deus-train": ["-m", "opt_deus_tool.train_cli"],
              "opt-deus-eval": ["-m", "opt_deus_tool.eval_cli"]}[name]
    return [found] if found else [sys.executable, *module]


def test_installed_commands_end_in_one_line(ws):
    before = tree_hash(ws["root"])
    for argv in (["opt-deus", "--base", ws["root"] / "huge", "--out", ws["root"] / "o", "--new-layers", 2,
                  "--dtype", "float16"],
                 ["opt-deus-train", "--model", ws["base"], "--data", ws["text"], "--out", ws["base"], "--steps", 2]):
        p = subprocess.run([*command(argv[0]), *map(str, argv[1:])], capture_output=True, text=True, env=ENV,
                           timeout=120)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and all(line.startswith(PROGRESS) for line in lines[:-1]), p.stderr
        assert lines[-1].startswith(f"{argv[0]}: error: ") and "Traceback" not in p.stderr
    assert tree_hash(ws["root"]) == before
    usage = subprocess.run([*command("opt-deus-train"), "--help"], capture_output=True, text=True, env=ENV)
    assert usage.stdout.startswith("usage: opt-deus-train") and "SIGTERM" in usage.stdout
    for flag in ("--steps", "--lr", "--warmup-steps", "--seed", "--beta1", "--keep-checkpoints"):
        line = usage.stdout[usage.stdout.index(f"  {flag} "):].split("\n  -")[0]
        assert "(default:" in line, line


def test_full_disk_ends_in_one_line(ws, tmp_path):
    # ulimit -f: the output cannot be written. One line, exit 2, no temporary folder left.
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))
    p = subprocess.run([*command("opt-deus"), "--base", str(ws["base"]), "--out", str(tmp_path / "o"),
                        "--new-layers", "2"], capture_output=True, text=True, env=ENV, timeout=120, preexec_fn=limit)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("opt-deus: error: ") and "too large" in p.stderr
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_growth_leaves_nothing(tmp_path):
    base = tmp_path / "base"
    args = ModelArgs(vocab_size=64, hidden_size=128, intermediate_size=1536, num_hidden_layers=8,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    save_pretrained(Transformer(args).init_weights(torch.Generator().manual_seed(0)), base)
    out = tmp_path / "out"
    proc = subprocess.Popen([*command("opt-deus"), "--base", str(base), "--out", str(out), "--new-layers", "7",
                             "--align", "paper"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()):
        time.sleep(0.005)
    time.sleep(0.2)  # inside the growth loop
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "opt-deus: error: stopped by SIGTERM; nothing written", stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_sigterm_during_training_stops_at_the_next_micro_batch(ws, tmp_path):
    # Steps of 512 micro-batches: the signal is acknowledged at once, the unfinished step is dropped
    # (the checkpoint is of the last finished step, the final JSON reports no stale step-0 eval),
    # and the process ends, checkpoint written, within one step's time.
    out = tmp_path / "run"
    argv = ["--model", ws["base"], "--data", ws["text"], "--out", out, "--cache-dir", ws["cache"], *TINY,
            "--batch-tokens", 32 * 2 * 512, "--steps", 1000, "--eval-every", 100, "--eval-fraction", 0.2]
    proc = subprocess.Popen([*command("opt-deus-train"), *map(str, argv)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and len([r for r in (metrics.read_text() if metrics.is_file() else "").splitlines()
                                          if '"loss"' in r]) < 1:
        time.sleep(0.02)
    time.sleep(0.3)  # into step 2
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    stopped_after = time.time() - sent
    rows = [json.loads(r) for r in metrics.read_text().splitlines() if '"loss"' in r]
    step_s = 32 * 2 * 512 / rows[0]["tokens_per_s"]
    assert proc.returncode == 143, stderr
    assert "SIGTERM received: stopping at the next micro-batch" in stderr
    [checkpoint] = find_checkpoints(out)
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == rows[-1]["step"]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["stopped"] == "SIGTERM" and result["step"] == rows[-1]["step"] and result["eval_loss"] is None
    assert stopped_after < step_s, (stopped_after, step_s)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
