"""What a 694-case campaign of bad and unusual inputs still found (issue 20), one table-driven test per case.

Every case goes through the real entry point (the commands' main(argv) in this process, true subprocesses for
signals, locks, closed streams and file-size limits; the Python APIs for the API cases) and must end as
docs/CLI.md promises: one line on stderr naming the problem, exit code 2 (128 + n for signal n), and every input
and earlier output byte for byte as it was. The helpers and the shared workspace are tests/test_bad_input.py's.
The last section kills the mutants a hand mutation run of the reference files left alive.
"""

import contextlib
import gzip
import io
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_bad_input import (ENV, TINY, assert_refused, call, command, edit_config, edit_tensors, tiny_model,
                            tree_hash, ws)  # noqa: F401  (ws: the shared workspace fixture)

from opt_deus_core import sinkhorn
from opt_deus_core import train
from opt_deus_core.model import ModelArgs, Transformer
from opt_deus_core.opt_deus import GrowthError
from opt_deus_tool import CheckpointError, eval_cli, grow_cli, train_cli
from opt_deus_tool.checkpoint import CheckpointReader, load_pretrained, save_pretrained
from opt_deus_tool.data import ByteTokenizer, tokenize_to_cache
from opt_deus_tool.grow_cli import grow_checkpoint
from opt_deus_tool.runs import RunFolder, find_checkpoints, train_run

DEEP = "[" * 100_000 + "]" * 100_000  # a RecursionError for a recursive JSON reader
HUGE_INT = "1" * 5000  # beyond Python's 4300-digit int conversion limit


def copy_run_checkpoint(workspace, name: str) -> Path:
    # A run folder of its own holding a copy of runA's second checkpoint, to tamper with.
    target = workspace["root"] / name / "checkpoint-000002"
    shutil.copytree(workspace["runA"] / "checkpoint-000002", target)
    return target


def edit_state(checkpoint: Path, edit):
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    (checkpoint / "trainer_state.json").write_text(json.dumps(edit(state)))


@pytest.fixture(scope="module")
def camp(ws):  # noqa: F811  (the fixture imported above)
    r, base = ws["root"], ws["base"]
    # Growth inputs
    shutil.copytree(base, r / "mixed_dtype")
    edit_tensors(r / "mixed_dtype", lambda t: t.update({"model.embed_tokens.weight": t["model.embed_tokens.weight"]
                                                        .bfloat16()}))
    shutil.copytree(base, r / "rope_both")
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    edit_config(r / "rope_both", lambda c: {**c, "rope_scaling": llama3, "rope_theta": 500000.0})
    save_pretrained(tiny_model(), r / "sharded", max_shard_size=20_000)
    shutil.copy(base / "model.safetensors", r / "sharded" / "model.safetensors")  # a stale single file beside
    shutil.copytree(base, r / "record_string")
    edit_config(r / "record_string", lambda c: {**c, "opt_deus": "x"})
    for name, text in (("config_deep", DEEP), ("config_huge_int", '{"vocab_size": ' + HUGE_INT + "}")):
        shutil.copytree(base, r / name)
        (r / name / "config.json").write_text(text)
    save_pretrained(tiny_model(), r / "index_deep", max_shard_size=20_000)
    (r / "index_deep" / "model.safetensors.index.json").write_text(DEEP)
    shutil.copytree(base, r / "nan_row")  # NaN in one embedding row no input ever uses
    edit_tensors(r / "nan_row", lambda t: t["model.embed_tokens.weight"][299].fill_(math.nan))
    (r / "app").mkdir()  # a folder of the user's with a config.json that is no model's
    (r / "app" / "config.json").write_text(json.dumps({"app": {"theme": "dark"}}))
    (r / "app" / "notes.txt").write_text("keep me")
    (r / "dangling").symlink_to(r / "nowhere")
    # Training data
    d = r / "bad_data"
    d.mkdir()
    (d / "deep.jsonl").write_text(DEEP + "\n")
    (d / "surrogate.jsonl").write_text('{"text": "abc \\ud800 def"}\n')
    (d / "huge_int.jsonl").write_text('{"text": "abc", "n": ' + HUGE_INT + "}\n")
    (d / "sft_deep.json").write_text(DEEP)
    (d / "sft_surrogate.json").write_text(json.dumps([{"instruction": "say", "output": "x"}])[:-3] + '\\ud800"}]')
    whole = gzip.compress(json.dumps([{"instruction": "say", "output": "hi " * 200}] * 50).encode())
    (d / "sft_truncated.json.gz").write_bytes(whole[: len(whole) // 2])
    lines = "".join(json.dumps({"instruction": "say", "output": os.urandom(200).hex()}) + "\n" for _ in range(50))
    whole = gzip.compress(lines.encode())  # incompressible: half of it ends mid-stream
    (d / "sft_truncated.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (d / "sft_not_gzip.json.gz").write_text(json.dumps([{"instruction": "say", "output": "hi"}]))
    os.mkfifo(d / "fifo")
    (d / "text_folder").mkdir()
    # Resume states (item 14): each a copy of runA's checkpoint 2 in a run folder of its own, tampered with
    checkpoints = {}
    for name, tamper in RESUME_TAMPERING.items():
        checkpoint = copy_run_checkpoint(ws, f"resume_{name}")
        tamper(checkpoint)
        checkpoints[name] = checkpoint
    # A report path that is a symlink (writing the report must not replace it)
    (r / "report_target.json").write_text("{}")
    (r / "report_link.json").symlink_to(r / "report_target.json")
    return {**ws, "bad_data": d, "checkpoints": checkpoints}


def optimizer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "optimizer.pt", weights_only=True)


def corrupt_metrics(run: Path):
    # runA's metrics with its first row cut short: a damaged middle, not a torn last line.
    lines = (run.parent / "runA" / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0][:10], *lines[1:]]) + "\n")


def tamper_moments(checkpoint: Path, value):
    state = optimizer_state(checkpoint)
    moment = state["state"][0]["exp_avg"]
    state["state"][0]["exp_avg"] = value(moment)
    torch.save(state, checkpoint / "optimizer.pt")


RESUME_TAMPERING = {
    "optimizer_random_bytes": lambda c: (c / "optimizer.pt").write_bytes(os.urandom(4096)),
    "optimizer_pickled_object": lambda c: (c / "optimizer.pt").write_bytes(
        b"\x80\x04\x95\x1a\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94\x8c\x04eval\x94\x93\x94."),
    "optimizer_empty": lambda c: (c / "optimizer.pt").write_bytes(b""),
    "optimizer_list": lambda c: torch.save([1, 2, 3], c / "optimizer.pt"),
    "moments_misshaped": lambda c: tamper_moments(c, lambda m: torch.zeros(m.shape[0] + 1, *m.shape[1:])),
    "moments_nan": lambda c: tamper_moments(c, lambda m: torch.full_like(m, math.nan)),
    "state_not_utf8": lambda c: (c / "trainer_state.json").write_bytes(b'{"step": 2, "x": "\xff\xfe"}'),
    "state_no_config": lambda c: edit_state(c, lambda s: {k: v for k, v in s.items() if k != "config"}),
    "state_run_string": lambda c: edit_state(c, lambda s: {**s, "run": "x"}),
    "state_data_list": lambda c: edit_state(c, lambda s: {**s, "data": [1]}),
    "state_trainable_params_int": lambda c: edit_state(c, lambda s: {**s, "trainable_params": 3}),
    "state_step_negative": lambda c: edit_state(c, lambda s: {**s, "step": -5}),
    "state_config_steps_text": lambda c: edit_state(c, lambda s: {**s, "config": {**s["config"], "steps": "4"}}),
    "state_deep": lambda c: (c / "trainer_state.json").write_text(DEEP),
    "metrics_corrupt_middle": lambda c: corrupt_metrics(c.parent),
}
RESUME_MESSAGES = {
    "optimizer_random_bytes": "cannot restore the optimizer state", "optimizer_pickled_object": "cannot restore",
    "optimizer_empty": "cannot restore", "optimizer_list": "holds no optimizer state dict",
    "moments_misshaped": "misshaped or not finite", "moments_nan": "misshaped or not finite",
    "state_not_utf8": "not UTF-8", "state_no_config": "config is NoneType", "state_run_string": "run is not an object",
    "state_data_list": "data is list", "state_trainable_params_int": "trainable_params is int",
    "state_step_negative": "step -5 is not a count", "state_deep": "nested too deeply",
    "state_config_steps_text": "config steps '4' is not an integer",
    "metrics_corrupt_middle": "damaged before its last line",
}


# ----------------------------------------------------------------------------------------------
# opt-deus


def growth_cases(c):
    r = c["root"]
    new = ["--new-layers", 2, "--out", r / "o"]
    return [
        # silent wrong output (items 6-8)
        ("mixed-dtype-base", ["--base", r / "mixed_dtype", *new], "mix dtypes"),
        ("rope-both-styles-disagree", ["--base", r / "rope_both", *new], "disagree"),
        ("stale-single-file-beside-index", ["--base", r / "sharded", *new], "holds both model.safetensors"),
        # data loss (item 2): a config.json that is no model's does not make a folder an earlier output
        ("overwrite-folder-with-app-config", ["--base", c["base"], "--new-layers", 2, "--out", r / "app",
                                              "--overwrite"], "no config.json of a model"),
        # tracebacks (items 13, 15)
        ("growth-record-a-string", ["--base", r / "record_string", *new], "opt_deus (the growth record) must be"),
        ("config-nested-deep", ["--base", r / "config_deep", *new], "nested too deeply"),
        ("config-int-5000-digits", ["--base", r / "config_huge_int", *new], "not valid JSON"),
        ("index-nested-deep", ["--base", r / "index_deep", *new], "not a safetensors index"),
        ("new-layers-1e20", ["--base", c["base"], "--new-layers", 10**20, "--out", r / "o"], "more than 64"),
        ("new-layers-1e9", ["--base", c["base"], "--new-layers", 10**9, "--out", r / "o"], "more than 64"),
        ("base-nan-in-an-unused-row", ["--base", r / "nan_row", *new], "NaN or inf"),
        # unclear messages (item 17)
        ("out-dangling-symlink", ["--base", c["base"], "--new-layers", 2, "--out", r / "dangling"],
         "dangling symlink"),
        ("epsilon-1e300", ["--base", c["base"], *new, "--epsilon", 1e300], "--epsilon must be a finite number"),
    ]


GROWTH_IDS = [case[0] for case in growth_cases({"root": Path("r"), "base": Path("b")})]


@pytest.mark.parametrize("case", GROWTH_IDS)
def test_growth_campaign(camp, case):
    _, argv, match = next(c for c in growth_cases(camp) if c[0] == case)
    assert_refused(camp, grow_cli.main, argv, match)


def test_growth_into_a_250_byte_name_works(camp, tmp_path):
    out = tmp_path / ("g" * 250)
    assert call(grow_cli.main, ["--base", camp["base"], "--new-layers", 2, "--out", out])[0] == 0
    assert (out / "model.safetensors").is_file() and sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_mixed_dtype_base_grows_with_a_dtype_and_keeps_the_function(camp, tmp_path):
    out = tmp_path / "grown"
    assert call(grow_cli.main, ["--base", camp["root"] / "mixed_dtype", "--new-layers", 2, "--out", out,
                                "--dtype", "float32"])[0] == 0
    base, grown = load_pretrained(camp["root"] / "mixed_dtype", dtype=torch.float32), load_pretrained(out)
    tokens = torch.arange(20)[None]
    with torch.no_grad():
        assert torch.equal(base(tokens), grown(tokens))


def slow_growth(base: Path, out: Path, **popen) -> subprocess.Popen:
    # A growth of a few seconds (paper alignment of 7 new layers of 1536 neurons) in its own process.
    # Signals at their defaults in the child: a shell's background job (`pytest &`, nohup) inherits SIGINT,
    # SIGQUIT and SIGHUP ignored, and the command rightly leaves an ignored signal ignored.
    return subprocess.Popen([*command("opt-deus"), "--base", str(base), "--out", str(out), "--new-layers", "7",
                             "--align", "paper"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_signals, **popen)


def default_signals():
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1):
        signal.signal(s, signal.SIG_DFL)


@pytest.fixture(scope="module")
def slow_base(tmp_path_factory):
    base = tmp_path_factory.mktemp("slow") / "base"
    args = ModelArgs(vocab_size=64, hidden_size=128, intermediate_size=1536, num_hidden_layers=8,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    save_pretrained(Transformer(args).init_weights(torch.Generator().manual_seed(0)), base)
    return base


def wait_for(predicate, seconds: float = 60):
    deadline = time.time() + seconds
    while time.time() < deadline and not predicate():
        time.sleep(0.005)


def test_two_growths_into_one_new_folder_the_second_fails(slow_base, tmp_path):
    # Item 1: both used to exit 0, the second's model silently replacing the first's.
    out = tmp_path / "out"
    first = slow_growth(slow_base, out)
    wait_for(lambda: any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()))
    code, _, err = call(grow_cli.main, ["--base", slow_base, "--new-layers", 7, "--out", out])
    _, first_err = first.communicate(timeout=120)
    assert code == 2 and "another process" in err.strip().splitlines()[-1], err
    assert first.returncode == 0, first_err
    assert json.loads((out / "config.json").read_text())["opt_deus"]["align"] == "paper"  # the first's model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1])
def test_other_terminating_signals_during_growth_leave_nothing(slow_base, tmp_path, signum):
    # Item 12: SIGHUP (a dropped ssh session), SIGQUIT and SIGUSR1 used to leave `.out.tmp-*` behind.
    proc = slow_growth(slow_base, tmp_path / "out")
    wait_for(lambda: any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()))
    time.sleep(0.2)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, stderr
    assert stderr.strip().splitlines()[-1] == f"opt-deus: error: stopped by {signal.Signals(signum).name}; " \
                                              f"nothing written", stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stderr", ["closed-by-reader", "/dev/full"])
def test_progress_output_never_kills_the_growth(camp, tmp_path, stderr):
    # Item 15: `2>&1 | head -1` or `2>/dev/full` used to discard the growth with exit 1.
    out = tmp_path / "grown"
    argv = [*command("opt-deus"), "--base", str(camp["base"]), "--new-layers", "2", "--out", str(out)]
    if stderr == "/dev/full":
        with open("/dev/full", "w") as full:
            code = subprocess.run(argv, env=ENV, stderr=full, stdout=subprocess.DEVNULL, timeout=120).returncode
    else:
        proc = subprocess.Popen(argv, env=ENV, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
        proc.stderr.readline()
        proc.stderr.close()  # the reader went away after one line
        code = proc.wait(timeout=120)
    assert code == 0 and (out / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------
# opt-deus-train


def training_cases(c):
    r, base, cache, d = c["root"], c["base"], c["cache"], c["bad_data"]

    def fresh(data, *extra):
        return ["--model", base, "--data", data, "--out", r / "new_run", "--cache-dir", cache, *TINY, *extra]
    cases = [
        # data loss (item 4): resuming an earlier checkpoint must not overwrite the run's later ones
        ("resume-earlier-checkpoint-overwrites-later", ["--resume", c["runA"] / "checkpoint-000001", "--cache-dir",
                                                         cache, "--steps", 4], "later than the checkpoint resumed"),
        # tracebacks (items 13, 15)
        ("cpt-jsonl-nested-deep", fresh(d / "deep.jsonl"), "deep.jsonl:1: JSON nested too deeply"),
        ("cpt-jsonl-lone-surrogate", fresh(d / "surrogate.jsonl"), "surrogate.jsonl:1: text holds a lone surrogate"),
        ("cpt-jsonl-int-5000-digits", fresh(d / "huge_int.jsonl"), "huge_int.jsonl:1: not valid JSON"),
        ("sft-json-nested-deep", fresh(d / "sft_deep.json", "--task", "sft"), "nested too deeply"),
        ("sft-json-lone-surrogate", fresh(d / "sft_surrogate.json", "--task", "sft"), "lone surrogate"),
        ("sft-json-gz-truncated", fresh(d / "sft_truncated.json.gz", "--task", "sft"), "sft_truncated.json.gz: cannot"),
        ("sft-jsonl-gz-truncated", fresh(d / "sft_truncated.jsonl.gz", "--task", "sft"),
         "sft_truncated.jsonl.gz: cannot"),
        ("sft-json-gz-not-gzip", fresh(d / "sft_not_gzip.json.gz", "--task", "sft"), "sft_not_gzip.json.gz: cannot"),
        ("model-growth-record-a-string", ["--model", r / "record_string", "--data", c["text"], "--out", r / "new_run",
                                          *TINY], "opt_deus (the growth record) must be an object"),
        ("model-nan-in-an-unused-row", ["--model", r / "nan_row", "--data", c["text"], "--out", r / "new_run",
                                        "--cache-dir", cache, *TINY], "contains NaN or inf"),
        # unclear messages (item 17)
        ("data-fifo", fresh(d / "fifo"), "is a FIFO"),
        ("data-dev-null", fresh("/dev/null"), "is a character device"),
    ]
    for name, message in RESUME_MESSAGES.items():  # item 14
        cases.append((f"resume-{name}", ["--resume", c["checkpoints"][name], "--cache-dir", cache], message))
    return cases


TRAINING_IDS = [case[0] for case in training_cases({k: Path(k) for k in ("root", "base", "cache", "bad_data",
                                                                              "runA", "text")}
                                                    | {"checkpoints": {n: Path(n) for n in RESUME_MESSAGES}})]


@pytest.mark.parametrize("case", TRAINING_IDS)
def test_training_campaign(camp, case):
    _, argv, match = next(c for c in training_cases(camp) if c[0] == case)
    assert_refused(camp, train_cli.main, argv, match)


def test_world_size_without_torchrun_is_one_line(camp, monkeypatch):
    # Item 15: WORLD_SIZE set by hand used to end in a ValueError traceback (or a 21 s hang).
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert_refused(camp, train_cli.main, ["--model", camp["base"], "--data", camp["text"], "--out",
                                          camp["root"] / "new_run", "--cache-dir", camp["cache"], *TINY],
                   "WORLD_SIZE is set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not")


def test_world_size_without_the_other_processes_is_one_line(camp, monkeypatch):
    # Item 15: every variable set by hand but no other process: a hang, then a DistStoreError traceback.
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    assert_refused(camp, train_cli.main, ["--model", camp["base"], "--data", camp["text"], "--out",
                                          camp["root"] / "new_run", "--cache-dir", camp["cache"], *TINY,
                                          "--dist-timeout", 2], "cannot join the other processes")


def test_full_out_names_the_checkpoint(camp, tmp_path):
    # Item 17: a full --out gave no path.
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
    out = tmp_path / "run"
    p = subprocess.run([*command("opt-deus-train"), "--model", str(camp["base"]), "--data", str(camp["text"]),
                        "--out", str(out), "--cache-dir", str(camp["cache"]), *map(str, TINY), "--steps", "2"],
                       capture_output=True, text=True, env=ENV, timeout=120, preexec_fn=limit)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and f"{out}/checkpoint-000002: cannot write the checkpoint" in last, p.stderr
    assert find_checkpoints(out) == [] and not [f for f in out.iterdir() if f.name.startswith(".")]


def test_metrics_torn_last_line_is_dropped_on_resume(camp, tmp_path):
    # Item 14: what SIGKILL or a full disk leaves (a half-written last line) used to make the run unresumable.
    run = tmp_path / "run"
    shutil.copytree(camp["runA"], run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 5.5')
    code, out, err = call(train_cli.main, ["--resume", run, "--cache-dir", camp["cache"]])
    assert code == 0, err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # every line whole
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


def test_stale_token_cache_is_not_read_for_edited_data(tmp_path):
    # Item 9: data edited in place with its size and mtime restored (tar, rsync -t, cp -p) trained on old tokens.
    data = tmp_path / "data.txt"
    data.write_text("the quick brown fox")
    before = tokenize_to_cache([data], ByteTokenizer(), tmp_path / "cache", log=lambda *a: None)
    stat = data.stat()
    data.write_text("THE QUICK BROWN FOX")  # same size
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = tokenize_to_cache([data], ByteTokenizer(), tmp_path / "cache", log=lambda *a: None)
    assert bytes(after[:-1].astype(np.uint8)) == b"THE QUICK BROWN FOX" != bytes(before[:-1].astype(np.uint8))


def test_full_cache_dir_names_the_cache_file(camp, tmp_path):
    # Item 17: a full --cache-dir said "40001 requested and 16384 written".
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
    p = subprocess.run([*command("opt-deus-train"), "--model", str(camp["base"]), "--data", str(camp["text"]),
                        "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), *map(str, TINY)],
                       capture_output=True, text=True, env=ENV, timeout=120, preexec_fn=limit)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and "cannot write the token cache" in last and str(tmp_path / "cache") in last, p.stderr
    assert not [f for f in (tmp_path / "cache").iterdir() if f.name.startswith(".")]


def slow_training(camp, out: Path, *extra) -> subprocess.Popen:
    argv = ["--model", camp["base"], "--data", camp["text"], "--out", out, "--cache-dir", camp["cache"], *TINY,
            "--batch-tokens", 32 * 2 * 512, "--steps", 1000, "--eval-fraction", 0.2, *extra]
    return subprocess.Popen([*command("opt-deus-train"), *map(str, argv)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)


def test_two_trainings_into_one_run_folder_the_second_fails(camp, tmp_path):
    # Item 1: checkpoints and metrics.jsonl of two runs used to interleave, a --resume of a live run too.
    out = tmp_path / "run"
    first = slow_training(camp, out, "--checkpoint-every", 1)
    wait_for(lambda: (out / "run.json").is_file(), 120)  # started; its first checkpoint is a step (~1 s) away
    second = call(train_cli.main, ["--model", camp["base"], "--data", camp["text"], "--out", out,
                                   "--cache-dir", camp["cache"], *TINY])
    wait_for(lambda: (out / "checkpoint-000001").is_dir(), 120)
    resumed = call(train_cli.main, ["--resume", out, "--cache-dir", camp["cache"]])
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    for code, _, err in (second, resumed):
        assert code == 2 and "another process" in err.strip().splitlines()[-1], err
    assert first.returncode == 143


def test_sighup_stops_training_like_sigterm(camp, tmp_path):
    # Item 12: SIGHUP (a dropped ssh session) used to kill the run with no checkpoint.
    out = tmp_path / "run"
    proc = slow_training(camp, out)
    wait_for(lambda: (out / "metrics.jsonl").is_file() and '"loss"' in (out / "metrics.jsonl").read_text(), 120)
    proc.send_signal(signal.SIGHUP)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGHUP and "SIGHUP received" in stderr, stderr
    assert len(find_checkpoints(out)) == 1


def test_second_sigint_says_what_the_run_folder_keeps(tmp_path):
    # Item 17: a double SIGINT said "nothing written" though run.json and metrics.jsonl existed.
    folder = RunFolder(tmp_path / "run", tiny_model().current_args(), metrics_path=tmp_path / "run" / "metrics.jsonl",
                       run={"run_id": "x"}, log=lambda *a: None)
    with pytest.raises(KeyboardInterrupt, match="keeps run.json, metrics.jsonl"):
        with folder:
            folder.start(SimpleNamespace(c=train.TrainConfig()))  # a train loop at step 0
            raise KeyboardInterrupt
    assert (tmp_path / "run" / "run.json").is_file()


# ----------------------------------------------------------------------------------------------
# opt-deus-eval


def evaluation_cases(c):
    r, d, ok = c["root"], c["bad_data"], ["--model", c["base"], "--device", "cpu", "--block-size", 32]
    return [
        ("json-is-a-symlink", [*ok, "--text", c["text"], "--json", r / "report_link.json"], "not a regular file"),
        ("json-is-a-fifo", [*ok, "--text", c["text"], "--json", d / "fifo"], "not a regular file"),
        ("text-is-a-folder", [*ok, "--text", d / "text_folder"], "is a folder"),
        ("text-is-a-fifo", [*ok, "--text", d / "fifo"], "is a FIFO"),
        ("text-jsonl-nested-deep", [*ok, "--text", d / "deep.jsonl"], "nested too deeply"),
        ("text-jsonl-lone-surrogate", [*ok, "--text", d / "surrogate.jsonl"], "lone surrogate"),
        ("model-nan-weights", ["--model", r / "nan_embed", "--text", c["text"], "--device", "cpu"],
         "contains NaN or inf"),
    ]


EVALUATION_IDS = [case[0] for case in evaluation_cases({k: Path(k) for k in ("root", "bad_data", "base", "text")})]


@pytest.mark.parametrize("case", EVALUATION_IDS)
def test_evaluation_campaign(camp, case):
    _, argv, match = next(c for c in evaluation_cases(camp) if c[0] == case)
    assert_refused(camp, eval_cli.main, argv, match)


def test_report_on_a_full_disk_leaves_no_temporary_file(camp, tmp_path):
    # Item 12: `--json` on a full disk left its temporary file.
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20, 20))
    p = subprocess.run([*command("opt-deus-eval"), "--model", str(camp["base"]), "--text", str(camp["text"]),
                        "--block-size", "32", "--device", "cpu", "--json", str(tmp_path / "report.json")],
                       capture_output=True, text=True, env=ENV, timeout=120, preexec_fn=limit)
    assert p.returncode == 2 and "report.json: cannot write" in p.stderr.strip().splitlines()[-1], p.stderr
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# The Python APIs (item 16 and the API halves of items 5 and 11): ValueError subclasses, nothing destroyed


def api_cases(c):
    r, base = c["root"], c["base"]

    def tokens(low=0, high=257, dtype=np.int64):
        return np.random.default_rng(0).integers(low, high, 4000).astype(dtype)

    def cfg(**kw):
        return train.TrainConfig(**{**dict(steps=2, warmup_steps=1, batch_tokens=128, micro_batch_size=2,
                                           block_size=32, eval_every=0, device="cpu"), **kw})

    return [
        ("save_pretrained-over-its-source-folder", lambda: save_pretrained(load_pretrained(base), base),
         CheckpointError, "already exists"),
        ("save_pretrained-over-user-files", lambda: save_pretrained(tiny_model(), r / "notes"), CheckpointError,
         "already exists"),
        ("save_pretrained-overwrite-user-files", lambda: save_pretrained(tiny_model(), r / "notes", overwrite=True),
         CheckpointError, "no config.json of a model"),
        ("train-float-tokens", lambda: train_run(tiny_model(), tokens(dtype=np.float32), cfg()), train.TrainError,
         "must be a 1-D integer array"),
        ("train-negative-ids", lambda: train_run(tiny_model(), tokens(-3, 10), cfg()), train.TrainError,
         "outside the vocabulary"),
        ("train-ids-beyond-vocab", lambda: train_run(tiny_model(), tokens(0, 400), cfg()), train.TrainError,
         "outside the vocabulary"),
        ("train-no-model", lambda: train_run(None, tokens(), cfg()), train.TrainError, "`model` must be"),
        ("load_pretrained-dtype-string", lambda: load_pretrained(base, dtype="float32"), CheckpointError, "`dtype`"),
        ("load_pretrained-mixed-dtype", lambda: load_pretrained(r / "mixed_dtype"), CheckpointError, "mix dtypes"),
        ("sinkhorn-meta-cost", lambda: sinkhorn.sinkhorn(torch.zeros(4, 4, device="meta"), epsilon=0.1), ValueError,
         "with data"),
        ("grow_checkpoint-1e9-layers", lambda: grow_checkpoint(base, r / "o", 10**9, log=lambda m: None), GrowthError,
         "more than 64"),
    ]


API_IDS = [case[0] for case in api_cases({"root": Path("r"), "base": Path("b")})]


@pytest.mark.parametrize("case", API_IDS)
def test_api_campaign(camp, case):
    _, fn, error, match = next(c for c in api_cases(camp) if c[0] == case)
    before = tree_hash(camp["root"])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        with pytest.raises(error, match=match):
            fn()
    assert tree_hash(camp["root"]) == before


# ----------------------------------------------------------------------------------------------
# Mutants of the reference files that the suite let live


def test_transport_refuses_a_nan_marginal_error(monkeypatch):
    from opt_deus_core import opt_deus
    real = opt_deus.sinkhorn

    def nan_error(*args, **kwargs):
        result = real(*args, **kwargs)
        result.marginal_error = math.nan
        return result
    monkeypatch.setattr(opt_deus, "sinkhorn", nan_error)
    with pytest.raises(GrowthError, match="marginal error is nan"):
        opt_deus.transport(torch.rand(6, 6), 0.1, relative=False)


def test_structured_epsilon_is_relative_to_the_mean_cost():
    from opt_deus_core import opt_deus
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(8, 8, generator=g, dtype=torch.float64) ** 3  # mean and max differ a lot
    plan, _ = opt_deus.transport(cost, 0.05, relative=True, normalize_plan=False)
    by_mean = sinkhorn.sinkhorn(cost / cost.mean(), epsilon=0.05, tol=opt_deus.TOL).plan
    torch.testing.assert_close(plan, by_mean, rtol=0, atol=1e-9)
    scaled, _ = opt_deus.transport(cost * 1000, 0.05, relative=True, normalize_plan=False)
    torch.testing.assert_close(scaled, plan, rtol=0, atol=1e-9)  # scale invariance


def test_rmsnorm_matches_transformers_in_bfloat16():
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from opt_deus_core.model import RMSNorm
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(0)).bfloat16() * 5
    ours, theirs = RMSNorm(64, 1e-5).bfloat16(), LlamaRMSNorm(64, eps=1e-5).bfloat16()
    with torch.no_grad():
        gain = torch.rand(64, generator=torch.Generator().manual_seed(1)).bfloat16() + 0.5
        ours.weight.copy_(gain)
        theirs.weight.copy_(gain)
        assert torch.equal(ours(x), theirs(x))


def test_config_defaults_are_llamaconfigs():
    transformers = pytest.importorskip("transformers")
    from opt_deus_tool.hf_config import args_from_config
    minimal = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
               "num_hidden_layers": 2, "num_attention_heads": 2}
    ours, theirs = args_from_config(minimal), transformers.LlamaConfig(**minimal)
    for key in ("rms_norm_eps", "tie_word_embeddings", "max_position_embeddings", "num_key_value_heads", "head_dim"):
        assert getattr(ours, key) == getattr(theirs, key), key
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]


def test_init_scales_the_output_projections_by_depth():
    layers = 8
    args = ModelArgs(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    model = Transformer(args).init_weights(torch.Generator().manual_seed(0))
    for name, p in model.named_parameters():
        expected = 1.0 if "norm" in name else 0.02 / math.sqrt(2 * layers) if name.endswith(
            ("o_proj.weight", "down_proj.weight")) else 0.02
        measured = p.float().mean().item() if "norm" in name else p.float().std().item()
        assert measured == pytest.approx(expected, rel=0.05), name


def test_sinkhorn_over_relaxation_stays_below_its_cap(monkeypatch):
    # On a slowly contracting problem the optimal w nears 2; the cap keeps a margin (sinkhorn.OMEGA_CAP).
    seen, real = [], sinkhorn._iterate

    def spy(f, C, CT, log_a, log_b, a, inv_eps, k, g=None, omega=1.0):
        seen.append(float(omega))
        return real(f, C, CT, log_a, log_b, a, inv_eps, k, g, omega)
    monkeypatch.setattr(sinkhorn, "_iterate", spy)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g, dtype=torch.float64), torch.randn(64, 8, generator=g, dtype=torch.float64)
    result = sinkhorn.sinkhorn(torch.cdist(x, y), epsilon=0.05, max_iter=20000, tol=1e-8)
    # measured: w reaches the cap here; uncapped it goes to 1.984
    assert result.converged and max(seen) == pytest.approx(1.95) and max(seen) <= 1.95


def test_sinkhorn_measures_the_plan_once_its_estimate_stalls(monkeypatch):
    # The potentials' error estimate has its own rounding floor (~u |f| / eps). Here that floor is imposed: the
    # estimate never drops below 100 tol, while the plan itself converges. Once progress stalls the plan is
    # measured and the solve stops: within one stall window (100 iterations) of the unfloored solve. Without that
    # measurement it goes on through every halving of w to the final stall (1,063 iterations, measured).
    real, tol, check_every = sinkhorn._iterate, 1e-8, 10
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randn(64, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    solve = dict(epsilon=0.1, tol=tol, max_iter=100_000, check_every=check_every)
    plain = sinkhorn.sinkhorn(torch.cdist(x, y), **solve)

    def floored(*args):
        f_plan, g, f, err = real(*args)
        return f_plan, g, f, err.clamp_min(100 * tol)
    monkeypatch.setattr(sinkhorn, "_iterate", floored)
    result = sinkhorn.sinkhorn(torch.cdist(x, y), **solve)
    assert plain.converged and result.converged and result.marginal_error <= tol
    # The estimate reaches its floor before the plain solve ends; the stall is seen at a check at most 100 + one
    # block later, and the plan is measured at the next check.
    assert result.iterations <= plain.iterations + 100 + 2 * check_every, (result.iterations, plain.iterations)


def test_streaming_growth_reads_each_base_block_once(camp, tmp_path, monkeypatch):
    reads, real = [], CheckpointReader.block

    def counting(self, layer, dtype=None, device=None):
        reads.append(layer)
        return real(self, layer, dtype, device)
    monkeypatch.setattr(CheckpointReader, "block", counting)
    # Two new layers in gap 0 need blocks 0 and 1 twice in a row: a one-block cache would read them again.
    grow_checkpoint(camp["base"], tmp_path / "grown", insert_after=[0, 0, 2], log=lambda m: None)
    assert sorted(reads) == [0, 1, 2, 3]


def test_evaluation_ignores_masked_targets_and_keeps_a_one_token_tail():
    from opt_deus_tool.data import SFTDataset
    model = tiny_model().eval()
    examples = [{"instruction": "Repeat after me", "output": "the quick brown fox"},
                {"instruction": "Go", "output": "a"}]
    data = SFTDataset(examples, ByteTokenizer(), 256)
    x, y = data.get([0, 1])
    with torch.no_grad():
        logits = model(x)
    keep = y != train.IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[keep], y[keep]).item()
    r = train.evaluate(model, data, 256, 2)
    assert r["tokens"] == int(keep.sum()) and r["loss"] == pytest.approx(expected, rel=1e-5)
    tokens = np.random.default_rng(0).integers(0, 257, 32 * 6 + 2)  # six blocks and a tail of one target
    assert train.evaluate(model, tokens, 32, 2)["tokens"] == 32 * 6 + 1
