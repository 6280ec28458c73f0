"""train.py under torchrun (FSDP2, gloo, 2 CPU processes) computes what one process computes.

Each run is a real `python -m torch.distributed.run` launch of the training command (`-m opt_deus_tool.train_cli`)
on a tiny random model, so these tests also cover process-group setup, sharded checkpoints and signal handling.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from opt_deus_core.model import ModelArgs, Transformer
from opt_deus_tool.checkpoint import load_pretrained, save_pretrained
from opt_deus_tool.runs import find_checkpoints

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

# Tolerance. The two runs differ only in float32 summation order: one process accumulates a step's
# 4 micro-batch gradients in turn, two processes each accumulate 2 and FSDP sums the halves in its
# reduce-scatter; the logged loss and the gradient norm are summed in the same two ways. Reordering
# a float32 sum of k terms changes it by at most about k * 2^-24 = 2.4e-7 (k = 4) of the sum of
# magnitudes, and AdamW, whose update m / sqrt(v) is scale-free, passes a relative gradient error of
# that size on to the weights as about the same relative error of each update (lr 1e-2). Ten
# steps compound it: we allow 1e-5 relative on every logged loss (about 40x the one-sum bound), and
# 1e-4 absolute on the weights (1% of one step's update, so a wrong data share or a missing
# gradient reduction, which changes updates by O(lr), is far outside it). Measured: see
# docs/BENCHMARKS_TRAIN.md.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-4

FLAGS = ["--block-size", 32, "--batch-tokens", 256, "--micro-batch-size", 2, "--warmup-steps", 1, "--lr", 1e-2,
         "--log-every", 1, "--eval-every", 5, "--eval-batches", 4, "--checkpoint-every", 5, "--keep-checkpoints", 0,
         "--device", "cpu", "--dist-timeout", 60]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, *args) -> list:
    # nproc 1: the plain single-process path (no process group); 2: torchrun with two CPU processes.
    prefix = [] if nproc == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                                    "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return [sys.executable, *prefix, "-m", "opt_deus_tool.train_cli", *map(str, args)]


def run(nproc: int, *args) -> subprocess.CompletedProcess:
    p = subprocess.run(launch(nproc, *args), capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(out) if "loss" in r}


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_pretrained(checkpoint).state_dict()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    # 4 layers, new layers 1 and 3: layer 0 is the frozen prefix (no autograd), layer 2 frozen in between.
    args = ModelArgs(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    args.extra["opt_deus"] = {"new_layers": [1, 3]}
    save_pretrained(Transformer(args).init_weights(torch.Generator().manual_seed(0)), root / "model")
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog while cats sleep".split()
    (root / "data.txt").write_text("\n".join(" ".join(rng.choice(words, 10)) for _ in range(200)))
    common = ["--data", root / "data.txt", "--cache-dir", root / "cache", *FLAGS]
    run(1, "--model", root / "model", "--out", root / "one", "--steps", 10, *common)
    run(2, "--model", root / "model", "--out", root / "two", "--steps", 10, *common)
    return root


def test_two_processes_compute_what_one_does(setup):
    one, two = setup / "one", setup / "two"
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 11))
    assert a == pytest.approx(b, rel=LOSS_RTOL, abs=0)
    eval_a = [r["eval_loss"] for r in rows(one) if "eval_loss" in r]
    eval_b = [r["eval_loss"] for r in rows(two) if "eval_loss" in r]
    assert len(eval_a) == 3 and eval_a == pytest.approx(eval_b, rel=LOSS_RTOL, abs=0)
    assert all(r["world_size"] == 1 for r in rows(one)) and all(r["world_size"] == 2 for r in rows(two))
    assert json.loads((two / "run.json").read_text())["run"]["world_size"] == 2

    # The same HF folder, written once: no leftovers, loadable, trained layers moved, frozen ones untouched.
    assert sorted(p.name for p in two.iterdir()) == ["checkpoint-000005", "checkpoint-000010", "metrics.jsonl",
                                                     "run.json"]
    base, wa, wb = weights(setup / "model"), weights(one / "checkpoint-000010"), weights(two / "checkpoint-000010")
    assert wa.keys() == wb.keys() == base.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= WEIGHT_ATOL, worst
    for k in base:
        if k.startswith(("layers.1.", "layers.3.")):
            assert not torch.equal(wb[k], base[k]), k
        else:
            assert torch.equal(wb[k], base[k]) and torch.equal(wa[k], base[k]), k
    # The optimizer state is the full one, as one process writes it.
    sa = torch.load(one / "checkpoint-000010" / "optimizer.pt", weights_only=True)["state"]
    sb = torch.load(two / "checkpoint-000010" / "optimizer.pt", weights_only=True)["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i]["exp_avg"].shape == sb[i]["exp_avg"].shape  # whole tensors, not one rank's rows
        assert torch.allclose(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"], rtol=1e-3, atol=1e-12)


@pytest.mark.parametrize("written_by, resumed_by", [(2, 1), (1, 2)])
def test_resume_at_another_world_size(setup, tmp_path, written_by, resumed_by):
    source = setup / ("two" if written_by == 2 else "one") / "checkpoint-000005"
    out = tmp_path / "resumed"
    run(resumed_by, "--resume", source, "--out", out)
    uninterrupted, resumed = losses(setup / "one"), losses(out)
    assert list(resumed) == list(range(6, 11))
    assert resumed == pytest.approx({s: uninterrupted[s] for s in resumed}, rel=LOSS_RTOL, abs=0)
    assert all(r["world_size"] == resumed_by for r in rows(out) if r["step"] > 5)
    wa, wr = weights(setup / "one" / "checkpoint-000010"), weights(out / "checkpoint-000010")
    assert max((wa[k] - wr[k]).abs().max().item() for k in wa) <= WEIGHT_ATOL


def test_sft_with_uneven_targets_per_rank(setup, tmp_path):
    # SFT answers differ in length, so the ranks' shares of a step hold different numbers of targets:
    # each rank must divide by the whole step's count (not its own) for the sum over ranks to be the mean.
    rng = np.random.default_rng(1)
    words = "the quick brown fox jumps over a lazy dog".split()
    records = [{"instruction": f"Say {i}", "output": " ".join(rng.choice(words, rng.integers(1, 30)))}
               for i in range(40)]
    (tmp_path / "sft.json").write_text(json.dumps(records))
    flags = ["--task", "sft", "--data", tmp_path / "sft.json", "--eval-fraction", 0, "--steps", 4, "--block-size", 256,
             "--batch-tokens", 1024, "--micro-batch-size", 2, "--warmup-steps", 1, "--lr", 1e-2, "--eval-every", 0,
             "--checkpoint-every", 0, "--device", "cpu", "--model", setup / "model"]
    run(1, *flags, "--out", tmp_path / "one")
    run(2, *flags, "--out", tmp_path / "two")
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), rel=LOSS_RTOL, abs=0)
    wa, wb = weights(tmp_path / "one" / "checkpoint-000004"), weights(tmp_path / "two" / "checkpoint-000004")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= WEIGHT_ATOL


def test_sigterm_to_launcher_leaves_one_resumable_checkpoint(setup, tmp_path):
    out = tmp_path / "run"
    args = ["--model", setup / "model", "--data", setup / "data.txt", "--cache-dir", setup / "cache", "--out", out,
            "--steps", 100000, *FLAGS, "--checkpoint-every", 0, "--eval-every", 0]
    proc = subprocess.Popen(launch(2, *args), env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text()):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert "SIGTERM received" in stderr, stderr[-3000:]
    [checkpoint] = find_checkpoints(out)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no partial folder
    step = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    assert step >= 1 and max(losses(out)) == step
    # Resumable: one more step from it (by one process) continues the run.
    run(1, "--resume", checkpoint, "--out", out, "--stop-after", step + 1)
    assert json.loads((out / f"checkpoint-{step + 1:06d}" / "trainer_state.json").read_text())["step"] == step + 1


def test_command_line_under_torchrun_skips_interpreter_teardown(tmp_path):
    # Under torchrun gloo's threads now and then abort a finished rank at interpreter teardown (SIGABRT,
    # and torchrun reports the run failed), so main() leaves with os._exit there, whichever entry point
    # started it: `python -m opt_deus_tool.train_cli` or the installed opt-deus-train script. An atexit hook
    # shows whether teardown ran. No --data: refused before any process group, so no launcher is needed.
    (tmp_path / "sitecustomize.py").write_text("import atexit\natexit.register(print, 'teardown ran')\n")
    env = {**ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    script = shutil.which("opt-deus-train", path=str(Path(sys.executable).parent))
    entries = [[sys.executable, "-m", "opt_deus_tool.train_cli"], *([[script]] if script else [])]
    for entry, torchrun in [(e, True) for e in entries] + [(entries[0], False)]:
        extra = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"} if torchrun else {}
        p = subprocess.run([*entry, "--model", tmp_path / "model", "--out", tmp_path / "run"], capture_output=True,
                           text=True, env={**env, **extra}, timeout=120)
        assert p.returncode == 2 and "--data is required" in p.stderr, (entry, p.stderr)
        assert ("teardown ran" in p.stdout) != torchrun, (entry, torchrun, p.stdout)
