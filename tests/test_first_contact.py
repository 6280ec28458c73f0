"""Issue 33, a newcomer's first contact: Hub ids where a model folder is taken (opt_deus_tool/hub.py), model cards
in what opt-deus and opt-deus-train write (model_card.py), and training that talks from its first step
(progress.py: the first step's line, the estimate before it, the small-data note, Ctrl-C said at once).

Hub ids are tested offline, from a Hugging Face cache laid out here (models--ORG--NAME/{blobs,snapshots,refs}) with
HF_HUB_OFFLINE=1, as huggingface_hub itself lays one out."""

from __future__ import annotations

import hashlib
import json
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_bad_input import ENV, TINY, WORDS, call, tiny_model, tree_hash

from opt_deus_core.opt_deus import GrowthOptions
from opt_deus_core.train import TrainConfig, train
from opt_deus_tool import eval_cli, grow_cli, lm_eval_cli, runs, train_cli
from opt_deus_tool.checkpoint import load_pretrained, save_pretrained
from opt_deus_tool.runs import find_checkpoints

REPO = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"
BASE_README = "---\nlicense: apache-2.0\nlanguage: en\n---\n# The base's own card\nNot the grown model's.\n"


def lay_out_cache(hub: Path, repo: str, folder: Path, commit: str = COMMIT, ref: str = "main"):
    # huggingface_hub's cache: files as content-addressed blobs, a snapshot per commit of links to them, and
    # refs/<branch> holding the commit.
    storage = hub / f"models--{repo.replace('/', '--')}"
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    (storage / "snapshots" / commit).mkdir(parents=True)
    for file in folder.iterdir():
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        (storage / "blobs" / blob).write_bytes(file.read_bytes())
        (storage / "snapshots" / commit / file.name).symlink_to(Path("../../blobs") / blob)
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / ref).write_text(commit)


def front_matter(readme: Path) -> dict:
    yaml = pytest.importorskip("yaml")
    text = readme.read_text()
    assert text.startswith("---\n"), text[:200]
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture
def hub(tmp_path, monkeypatch):
    # A cache holding acme/tiny-llama (main) and nothing else, offline; the working folder holds no acme/.
    base = tiny_model(seed=1)
    del base.args.extra["opt_deus"]
    staged = tmp_path / "staged"
    save_pretrained(base, staged)
    (staged / "README.md").write_text(BASE_README)
    lay_out_cache(tmp_path / "hub", "acme/tiny-llama", staged)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    work.mkdir()
    text = work / "text.txt"
    rng = np.random.default_rng(0)
    text.write_text("\n".join(" ".join(rng.choice(WORDS, 10)) for _ in range(60)))
    monkeypatch.chdir(work)
    return SimpleNamespace(root=tmp_path, cache=tmp_path / "hub", base=base, text=text, work=work)


def test_hub_id_grows_from_the_cache_offline_with_a_model_card(hub):
    before = tree_hash(hub.cache)
    for spelled in ("acme/tiny-llama", f"acme/tiny-llama@{COMMIT}"):  # main, and a commit as revision
        out = hub.work / ("grown-" + str(len(spelled)))
        code, _, err = call(grow_cli.main, ["--base", spelled, "--out", out, "--new-layers", 2])
        assert code == 0, err
        grown = load_pretrained(out)
        tokens = torch.arange(20)[None]
        with torch.no_grad():  # zero-init growth of the cached base computes the base's function
            assert torch.allclose(grown(tokens), hub.base(tokens), atol=1e-5)
        assert json.loads((out / "growth_report.json").read_text())["base"] == spelled
        card = front_matter(out / "README.md")
        assert card["base_model"] == "acme/tiny-llama"
        assert {"opt-deus", "depth-up-scaling", "opt", "llama"} <= set(card["tags"])
        assert card["library_name"] == "transformers" and card["pipeline_tag"] == "text-generation"
        assert card["license"] == "apache-2.0"  # the base's license, carried over
        body = (out / "README.md").read_text()
        assert "base's own card" not in body and "language" not in card  # the base's README is not passed off
        assert COMMIT in body and "new layer indices | 2, 4" in body and "zero (out-scale 0)" in body
        assert f"opt-deus-train --model {out}" in body and "transport plans, all converged" in body
    assert tree_hash(hub.cache) == before


@pytest.mark.parametrize("method", ["opt", "avg", "llama-pro", "solar", "lesa"])
def test_every_method_writes_a_model_card(tmp_path, method):
    base = tiny_model(layers=4)
    del base.args.extra["opt_deus"]
    save_pretrained(base, tmp_path / "base")
    (tmp_path / "base" / "README.md").write_text(BASE_README)
    grow_cli.grow_checkpoint(tmp_path / "base", tmp_path / "grown", 2, options=GrowthOptions(method=method),
                             log=lambda *a: None)
    card = front_matter(tmp_path / "grown" / "README.md")
    assert card["base_model"] == "base" and method in card["tags"] and card["license"] == "apache-2.0"
    body = (tmp_path / "grown" / "README.md").read_text()
    new = json.loads((tmp_path / "grown" / "config.json").read_text())["opt_deus"]["new_layers"]
    assert f"| method | {method}" in body and f"new layer indices | {', '.join(map(str, new))} of 0-5" in body
    assert "base's own card" not in body


def test_hub_id_trains_and_evaluates_from_the_cache(hub):
    out = hub.work / "run"
    code, _, err = call(train_cli.main, ["--model", "acme/tiny-llama", "--data", hub.text, "--out", out,
                                         "--cache-dir", hub.root / "tokens", "--steps", 2, "--trainable", "1,3",
                                         *TINY])
    assert code == 0, err
    [checkpoint] = find_checkpoints(out)
    card = front_matter(checkpoint / "README.md")
    assert card["base_model"] == "acme/tiny-llama" and card["license"] == "apache-2.0"
    assert "cpt" in card["tags"] and "opt-deus" not in card["tags"]  # trained, not grown
    body = (checkpoint / "README.md").read_text()
    assert "Step 2 of 2" in body and f"opt-deus-train --resume {out}" in body and "last training loss" in body
    code, stdout, err = call(eval_cli.main, ["--model", "acme/tiny-llama", "--text", hub.text, "--block-size", 32,
                                             "--device", "cpu"])
    assert code == 0 and "perplexity per token" in stdout, err


def test_a_local_folder_wins_over_a_hub_id(hub):
    # acme/tiny-llama as a folder of the working directory: read as a folder, though the cache has that id.
    local = tiny_model(seed=7)
    del local.args.extra["opt_deus"]
    save_pretrained(local, hub.work / "acme" / "tiny-llama")
    code, _, err = call(grow_cli.main, ["--base", "acme/tiny-llama", "--out", hub.work / "g", "--new-layers", 1])
    assert code == 0, err
    with torch.no_grad():
        tokens = torch.arange(9)[None]
        assert torch.allclose(load_pretrained(hub.work / "g")(tokens), local(tokens), atol=1e-5)
    assert front_matter(hub.work / "g" / "README.md")["base_model"] == "tiny-llama"  # a folder: its name


def one_line(code, err, *parts):
    lines = err.strip().splitlines()
    assert code == 2 and lines and "Traceback" not in err, err
    assert ": error: " in lines[-1] and all(part in lines[-1] for part in parts), lines[-1]


@pytest.mark.parametrize("entry, flag", [(grow_cli.main, "--base"), (train_cli.main, "--model"),
                                         (eval_cli.main, "--model"), (lm_eval_cli.main, "--model")])
def test_an_id_missing_from_the_offline_cache_is_one_line(hub, entry, flag):
    before = tree_hash(hub.root)
    rest = {"--base": ["--out", "o", "--new-layers", 1], "--model": ["--text", hub.text]}[flag] \
        if entry is not train_cli.main else ["--data", hub.text, "--out", "run", "--steps", 2, *TINY]
    if entry is lm_eval_cli.main:
        rest = []
    for spelled in ("acme/missing", "acme/tiny-llama@v9"):  # an id, a revision the cache does not hold
        code, _, err = call(entry, [flag, spelled, *rest])
        one_line(code, err, f"{flag} {spelled}", "no such folder", "not in the Hugging Face cache", "HF_HUB_OFFLINE")
    assert tree_hash(hub.root) == before


def test_without_huggingface_hub_an_id_is_one_line(hub, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails, as when not installed
    code, _, err = call(grow_cli.main, ["--base", "acme/tiny-llama", "--out", "o", "--new-layers", 1])
    one_line(code, err, "--base acme/tiny-llama", 'pip install -e ".[hub]"')


@pytest.mark.parametrize("error, says", [("RepositoryNotFoundError", "no model acme/tiny-llama on the Hugging Face"),
                                         ("GatedRepoError", "is gated on the Hugging Face Hub"),
                                         ("RevisionNotFoundError", "has no revision 'v9'")])
@pytest.mark.parametrize("entry", [train_cli.main, lm_eval_cli.main])
def test_online_refusals_of_the_hub_are_one_line(hub, monkeypatch, error, says, entry):
    # What the Hub answers online, as huggingface_hub raises it. opt-deus-lm-eval evaluates offline, but reads a
    # Hub id before going offline (a lookup from inside its offline environment would find only the cache).
    import huggingface_hub
    from huggingface_hub import utils as errors

    def refuse(*args, local_files_only=False, **kwargs):
        if local_files_only:
            raise errors.LocalEntryNotFoundError("offline")
        raise getattr(errors, error)("404 Client Error", response=SimpleNamespace(headers={}, request=None))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    rest = ["--data", hub.text, "--out", "r"] if entry is train_cli.main else []
    code, _, err = call(entry, ["--model", "acme/tiny-llama@v9", *rest])
    one_line(code, err, "--model acme/tiny-llama@v9", says)


# ----------------------------------------------------------------------------------------------
# Training that talks

@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    root = tmp_path_factory.mktemp("talk")
    base = tiny_model()
    save_pretrained(base, root / "grown")
    rng = np.random.default_rng(0)
    (root / "text.txt").write_text("\n".join(" ".join(rng.choice(WORDS, 10)) for _ in range(60)))
    (root / "short.txt").write_text("the quick brown fox jumps over a lazy dog " * 2)  # 84 bytes: 2 blocks of 32
    return root


def test_progress_from_the_first_step_and_an_estimate_before_it(grown, tmp_path):
    code, _, err = call(train_cli.main, ["--model", grown / "grown", "--data", grown / "text.txt", "--out",
                                         tmp_path / "run", "--cache-dir", tmp_path / "c", "--steps", 3, *TINY])
    assert code == 0, err
    lines = err.splitlines()
    [estimate] = [i for i, line in enumerate(lines) if line.startswith("estimate before step 1 (cpu")]
    [first] = [i for i, line in enumerate(lines) if line.startswith("step 1/3 | loss ")]
    assert estimate < first  # said before the first step; the step's line although --log-every is 100
    assert all(part in lines[estimate] for part in ("memory about", "a step about", "the 3 steps to go about"))
    assert " tok/s | eta 0:00:" in lines[first] and "every --log-every 100 steps" in lines[first]
    assert sum(line.startswith("step ") for line in lines) == 2  # step 1, then the last as before
    code, _, err = call(train_cli.main, ["--model", grown / "grown", "--data", grown / "text.txt", "--out",
                                         tmp_path / "run1", "--cache-dir", tmp_path / "c", "--steps", 3, *TINY,
                                         "--log-every", 1])
    assert code == 0 and [line[:8] for line in err.splitlines() if line.startswith("step ")] == \
        ["step 1/3", "step 2/3", "step 3/3"], err  # with --log-every 1, train.py's own line, once


def test_data_smaller_than_a_step_is_noted(grown, tmp_path):
    code, _, err = call(train_cli.main, ["--model", grown / "grown", "--data", grown / "short.txt", "--out",
                                         tmp_path / "run", "--cache-dir", tmp_path / "c", "--steps", 2,
                                         "--eval-fraction", 0, *TINY])
    assert code == 0, err
    [note] = [line for line in err.splitlines() if line.startswith("note: the data has")]
    assert "2 sample(s) of 32 tokens, fewer than the 4 one step takes" in note and "2.0 times" in note


def test_the_estimate_leaves_training_unchanged(grown):
    # The measured forward/backward before step 1 leaves no gradient behind: the same losses as train() alone.
    tokens = np.frombuffer((grown / "text.txt").read_bytes(), dtype=np.uint8).astype(np.int64)
    config = TrainConfig(steps=3, warmup_steps=1, batch_tokens=128, block_size=32, micro_batch_size=2, lr=0.01,
                         device="cpu", eval_every=0)
    alone = train(load_pretrained(grown / "grown"), tokens, config, log=lambda *a: None).losses
    said = []
    talked = runs.train_run(load_pretrained(grown / "grown"), tokens, config, log=said.append).losses
    assert talked == alone and any(line.startswith("estimate before step 1") for line in said)


STALLED_CHILD = """
import hashlib, sys, time
from opt_deus_core import train
from opt_deus_tool import train_cli
start = time.perf_counter(); hashlib.pbkdf2_hmac("sha256", b"k", b"s", 20000)
rounds = int(20000 * 3 / (time.perf_counter() - start))  # about 3 s in one C call that never returns to Python
real, stalled = train.forward_loss, []
def forward_loss(model, x, y, prefix):
    if x.shape[0] > 1 and not stalled:  # the first micro-batch of step 1 (the estimate runs single sequences)
        stalled.append(print("stalling", flush=True))
        hashlib.pbkdf2_hmac("sha256", b"k", b"s", rounds)
    return real(model, x, y, prefix)
train.forward_loss = forward_loss
sys.exit(train_cli.main(sys.argv[1:]))
"""


def test_ctrl_c_is_acknowledged_at_once_while_a_kernel_runs(grown, tmp_path):
    # Python runs a signal handler only when the main thread next runs Python; a long kernel (here one C call
    # of ~3 s that releases the GIL, like torch's) delayed the acknowledgement until it returned.
    argv = ["--model", grown / "grown", "--data", grown / "text.txt", "--out", tmp_path / "run", "--cache-dir",
            tmp_path / "c", "--steps", 1000, *TINY]
    child = subprocess.Popen([sys.executable, "-c", STALLED_CHILD, *map(str, argv)], env=ENV, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put((time.monotonic(), line)) for line in child.stderr],
                     daemon=True).start()
    try:
        assert child.stdout.readline().strip() == "stalling"
        time.sleep(0.3)  # inside the C call
        sent = time.monotonic()
        child.send_signal(signal.SIGINT)
        said = None
        while said is None and time.monotonic() < sent + 30:
            try:
                at, line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if line.startswith("SIGINT received: stopping at the next micro-batch"):
                said = at - sent
        assert said is not None and said < 1.0, f"acknowledged after {said} s"  # (the C call lasts ~3 s)
        assert child.wait(timeout=120) == 130
    finally:
        child.kill()
        child.wait()
