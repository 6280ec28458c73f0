"""train.py (schedules, the frozen/trainable split, the loss, exact resume) and the tool around it: data and SFT
masking (opt_deus_tool/data.py), run folders (runs.py), the command line (train_cli.py)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from opt_deus_core import train
from opt_deus_core.model import ModelArgs, Transformer
from opt_deus_tool import data as data_io
from opt_deus_tool.checkpoint import load_pretrained, save_pretrained
from opt_deus_tool.runs import find_checkpoints, train_run, trainer_state
from opt_deus_tool.train_checks import check_config, check_trainable
from opt_deus_tool.train_cli import build_train_parser, parse_trainable

REPO = Path(__file__).resolve().parents[1]
# One thread per process: on a small shared CPU, OpenMP threads spinning against other processes
# make tiny models orders of magnitude slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def tiny_model(layers=4, new_layers=(1, 3), vocab=300, tied=True, seed=0) -> Transformer:
    args = ModelArgs(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tied,
                     max_position_embeddings=256)
    if new_layers is not None:
        args.extra["opt_deus"] = {"new_layers": list(new_layers)}
    return Transformer(args).init_weights(torch.Generator().manual_seed(seed))


def tiny_config(**kw) -> train.TrainConfig:
    base = dict(steps=6, lr=1e-2, warmup_steps=1, batch_tokens=4 * 32, micro_batch_size=2, block_size=32,
                eval_every=0, log_every=100, device="cpu", checkpoint_every=0)
    return train.TrainConfig(**{**base, **kw})


def random_tokens(n=4000, vocab=257, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n).astype(np.uint32)


def quiet(*args, **kwargs):
    pass


# ----------------------------------------------------------------------------------------------
# Schedules


@pytest.mark.parametrize("kind", ["bytes", "hf"])
def test_token_cache_is_every_document_in_order_each_ended_by_eos(kind, tmp_path, request):
    # 150 documents: several batches of 64, the last one partial. The cache must hold exactly each
    # document's own encoding followed by EOS, in file order, whatever the batching.
    if kind == "hf":
        tokenizer = data_io.load_tokenizer(request.getfixturevalue("smollm2_dir"))
    else:
        tokenizer = data_io.ByteTokenizer()
    docs = [f"document {i}: " + "word " * (i % 7) + ("é" if i % 5 == 0 else "") for i in range(150)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tokens = data_io.tokenize_to_cache([data], tokenizer, tmp_path / "cache", log=lambda *a: None)
    expected = [t for d in docs for t in tokenizer.encode(d) + [tokenizer.eos_id]]
    assert tokens.tolist() == expected


def test_config_checks_each_option_once_naming_it():
    # train_checks.check_config is the one check of the options, where they enter the tool (the command line's flags are
    # the fields); train.py checks nothing.
    with pytest.raises(train.TrainError, match=r"^`lr` inf: expected a finite number$"):
        check_config(train.TrainConfig(lr=float("inf")))
    with pytest.raises(train.TrainError, match=r"^`warmup_steps` 100 must be >= 0 and below `steps` 20 "
                                               r"\(default `warmup_steps` 100\)$"):
        check_config(train.TrainConfig(steps=20))
    with pytest.raises(train.TrainError, match="`schedule` x must be 'wsd' or 'cosine'"):
        check_config(train.TrainConfig(schedule="x"))
    with pytest.raises(dataclasses.FrozenInstanceError):  # checked once: a config does not change after
        train.TrainConfig().steps = 0


def test_wsd_key_values():
    c = train.TrainConfig(steps=100, lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    assert train.lr_at(0, c) == pytest.approx(0.1)       # warmup start: lr / warmup_steps
    assert train.lr_at(9, c) == pytest.approx(1.0)       # warmup end: peak
    assert all(train.lr_at(s, c) == 1.0 for s in range(9, 80))  # stable plateau
    assert train.lr_at(80, c) < 1.0
    assert train.lr_at(99, c) == pytest.approx(0.1)      # decay end: min lr
    assert train.lr_at(89, c) == pytest.approx(0.55)     # linear half-way


def test_cosine_key_values():
    c = train.TrainConfig(steps=110, lr=2.0, min_lr_ratio=0.0, warmup_steps=10, schedule="cosine")
    assert train.lr_at(0, c) == pytest.approx(0.2)
    assert train.lr_at(9, c) == pytest.approx(2.0)
    assert train.lr_at(59, c) == pytest.approx(1.0)      # half-way through the cosine
    assert train.lr_at(109, c) == pytest.approx(0.0)


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(2, 400), warmup_frac=st.floats(0, 0.9), decay=st.floats(0, 1),
       ratio=st.floats(0, 1), schedule=st.sampled_from(["wsd", "cosine"]))
def test_schedules_monotonic(steps, warmup_frac, decay, ratio, schedule):
    c = train.TrainConfig(steps=steps, lr=3e-4, min_lr_ratio=ratio, warmup_steps=int(warmup_frac * (steps - 1)),
                          schedule=schedule, decay_fraction=decay)
    lrs = [train.lr_at(s, c) for s in range(steps)]
    w = c.warmup_steps
    assert all(a < b for a, b in zip(lrs[:w - 1], lrs[1:w]))          # warmup strictly rises ...
    assert w == 0 or lrs[w - 1] == pytest.approx(c.lr)                 # ... to the peak
    top = max(w - 1, 0)
    assert all(a >= b - 1e-15 for a, b in zip(lrs[top:], lrs[top + 1:]))  # then never rises
    assert max(lrs) <= c.lr * (1 + 1e-12)
    assert all(c.lr * ratio - 1e-12 <= x <= c.lr + 1e-12 for x in lrs[w:])
    if schedule == "cosine" or round(decay * steps) > 0:
        assert lrs[-1] == pytest.approx(c.lr * ratio)


# ----------------------------------------------------------------------------------------------
# What trains


def test_trainable_new_only_and_no_backward_below():
    model = tiny_model(layers=4, new_layers=(2, 3))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = {"grad_enabled": [], "output_requires_grad": [], "backward_calls": 0}

    def forward_hook(module, inputs, output):
        seen["grad_enabled"].append(torch.is_grad_enabled())
        seen["output_requires_grad"].append(output.requires_grad)

    def backward_hook(module, grad_input, grad_output):
        seen["backward_calls"] += 1

    for i in (0, 1):  # frozen layers below the lowest trainable one
        model.layers[i].register_forward_hook(forward_hook)
        model.layers[i].register_full_backward_hook(backward_hook)
    grads = {}
    for n, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, n=n: grads.update({n: True}))
    result = train.train(model, random_tokens(), tiny_config(), log=quiet)

    assert result.trainable_layers == [2, 3]
    assert seen["grad_enabled"] and not any(seen["grad_enabled"]) and not any(seen["output_requires_grad"])
    assert seen["backward_calls"] == 0
    assert set(grads) == {n for n in before if n.startswith(("layers.2.", "layers.3."))}
    for n, p in model.named_parameters():
        if n.startswith(("layers.2.", "layers.3.")):
            assert not torch.equal(p, before[n]), f"{n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    assert result.trainable_params == sum(p.numel() for i in (2, 3) for p in model.layers[i].parameters())


def test_trainable_specs_and_errors():
    model = tiny_model(layers=4, new_layers=None, tied=False)
    with pytest.raises(train.TrainError, match="records no new layers"):  # the tool's check (runs.py)
        check_trainable(model, "new")
    with pytest.raises(train.TrainError, match="out of range"):
        check_trainable(model, [4])
    assert train.set_trainable(model, parse_trainable("1,3")) == [1, 3]
    assert train.frozen_prefix_of(model) == 1
    assert not model.lm_head.weight.requires_grad and not model.norm.weight.requires_grad
    assert train.set_trainable(model, "all") == [0, 1, 2, 3]
    assert all(p.requires_grad for p in model.parameters()) and train.frozen_prefix_of(model) is None


# ----------------------------------------------------------------------------------------------
# SFT


def test_chunked_linear_cross_entropy_equals_full_cross_entropy_and_its_gradients():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (37,), generator=g)
    y[::5] = train.IGNORE_INDEX
    old = train.LOSS_CHUNK_ELEMENTS
    train.LOSS_CHUNK_ELEMENTS = 50 * 8  # several chunks, the last one partial
    try:
        ours = train.linear_cross_entropy(h, w, y)
    finally:
        train.LOSS_CHUNK_ELEMENTS = old
    gh, gw = torch.autograd.grad(ours * 0.5, (h, w))
    ref = F.cross_entropy(h @ w.t(), y, reduction="sum")
    rh, rw = torch.autograd.grad(ref * 0.5, (h, w))
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-6)


def test_sft_labels_mask_prompt_and_padding():
    tok = data_io.ByteTokenizer()
    examples = [{"instruction": "Add.", "input": "2 and 3", "output": "5"},
                {"instruction": "Say hi to the reader, politely.", "output": "Hello there, reader!"}]
    block = 256
    for ex in examples:
        ids, labels = data_io.sft_example(ex, tok, block)
        prompt = tok.encode(data_io.format_prompt(ex))
        response = tok.encode(ex["output"]) + [tok.eos_id]
        assert ids.tolist() == prompt + response
        assert (labels[: len(prompt)] == -100).all()
        assert labels[len(prompt):].tolist() == response
    assert "### Input:\n2 and 3" in data_io.format_prompt(examples[0])
    assert "### Input" not in data_io.format_prompt(examples[1])

    data = data_io.SFTDataset(examples, tok, block)
    x, y = data.get([0, 1])
    for row, ex in enumerate(examples):
        ids, labels = data_io.sft_example(ex, tok, block)
        n = len(ids) - 1
        assert x[row, :n].tolist() == ids[:-1].tolist() and y[row, :n].tolist() == labels[1:].tolist()
        assert (y[row, n:] == -100).all() and (x[row, n:] == tok.eos_id).all()  # padding

    # The loss is the mean over response tokens only.
    model = tiny_model(vocab=300)
    with torch.no_grad():
        ours = train.forward_loss(model, x, y, frozen_prefix=None) / (y != -100).sum()
        logits = model(x)
    keep = y != -100
    expected = F.cross_entropy(logits[keep], y[keep])
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)


def test_sft_training_runs():
    tok = data_io.ByteTokenizer()
    examples = [{"instruction": f"Repeat {i}", "output": f"{i} {i}"} for i in range(12)]
    data = data_io.SFTDataset(examples, tok, 256)
    result = train.train(tiny_model(), data, tiny_config(steps=3, block_size=256, batch_tokens=4 * 256),
                         eval_data=data, log=quiet)
    assert len(result.losses) == 3 and result.eval_loss is not None


# ----------------------------------------------------------------------------------------------
# Exact resume


def test_resume_is_exact_without_global_rng_state(tmp_path):
    tokens, N = random_tokens(), 6
    full = train_run(tiny_model(), tokens, tiny_config(steps=N), out_dir=tmp_path / "a", log=quiet)

    first = train_run(tiny_model(), tokens, tiny_config(steps=N, stop_after=N // 2), out_dir=tmp_path / "b",
                      metrics_path=tmp_path / "b.jsonl", log=quiet)
    assert first.stopped == "stop_after" and first.step == N // 2
    checkpoint = Path(first.checkpoint)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] == N // 2 and state["data"]["stream_position"] == N // 2 * 4
    resumed_model = load_pretrained(checkpoint)
    # Nothing restores the global RNGs on resume, and nothing needs to: no step draws from them.
    torch.manual_seed(12345)
    np.random.seed(12345)
    second = train_run(resumed_model, tokens, tiny_config(steps=N), out_dir=tmp_path / "b",
                       metrics_path=tmp_path / "b.jsonl", log=quiet, resume_from=checkpoint)
    assert first.losses + second.losses == full.losses  # bitwise
    assert second.step == N
    rows = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, N + 1))
    a, b = load_pretrained(full.checkpoint), load_pretrained(second.checkpoint)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_resume_state_must_match_model(tmp_path):
    tokens = random_tokens()
    r = train_run(tiny_model(layers=4), tokens, tiny_config(steps=2, trainable="all"), out_dir=tmp_path, log=quiet)
    with pytest.raises(train.TrainError, match="does not match"):
        train_run(tiny_model(layers=5), tokens, tiny_config(steps=4, trainable="all"), log=quiet,
                  resume_from=r.checkpoint)
    with pytest.raises(train.TrainError, match="samples"):
        train_run(load_pretrained(r.checkpoint), tokens[:2000], tiny_config(steps=4, trainable="all"),
                  log=quiet, resume_from=r.checkpoint)
    with pytest.raises(train.TrainError, match="already at step 2 of `steps` 2"):
        train_run(load_pretrained(r.checkpoint), tokens, tiny_config(steps=2, trainable="all"), log=quiet,
                  resume_from=r.checkpoint)


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    tokens = random_tokens()
    good = train_run(tiny_model(), tokens, tiny_config(steps=2), out_dir=tmp_path, log=quiet)
    checkpoint = Path(good.checkpoint)
    before = {f.name: f.read_bytes() for f in checkpoint.iterdir()}
    model = load_pretrained(checkpoint)
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")  # a frozen layer: loss becomes nan
    with pytest.raises(train.NonFiniteLossError, match="not finite.*checkpoint-000002"):
        train_run(model, tokens, tiny_config(steps=4), out_dir=tmp_path, log=quiet, resume_from=checkpoint)
    assert {f.name: f.read_bytes() for f in checkpoint.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000002"]  # no partial folders


def test_each_checkpoint_is_written_once(tmp_path):
    # The hooks keep the step last saved (runs.RunFolder.save): a periodic checkpoint at the last step is also
    # the final one, written once.
    lines = []
    r = train_run(tiny_model(), random_tokens(), tiny_config(steps=4, checkpoint_every=2), out_dir=tmp_path,
                  log=lines.append)
    assert [line.split("/")[-1] for line in lines if line.startswith("saved ")] == ["checkpoint-000002",
                                                                                 "checkpoint-000004"]
    assert r.checkpoint.endswith("checkpoint-000004")


def test_train_py_is_one_process_and_asks_its_seam_the_rest():
    # train.py imports nothing of torch.distributed: where many processes differ, the loop asks its `dist`
    # (opt_deus_tool/distributed.py's FSDP under torchrun). Here a seam whose processes agree on SIGTERM
    # after the first step: the loop saves that step and stops, as under torchrun.
    source = (REPO / "train.py").read_text()
    assert "torch.distributed" not in source and "import os" not in source

    class AgreedStop(train.OneProcess):
        stops_mid_step = False

        def agree_stop(self, signum):
            return signal.SIGTERM

    class Saves(train.TrainHooks):
        saved = []

        def save(self, run, step):  # through the seam, as runs.RunFolder does
            def write(weights, optimizer_state):
                self.saved.append((step, trainer_state(run, step)["step"], sorted(optimizer_state["state"])))
                return f"checkpoint-{step}"
            self.checkpoint = run.dist.save(write, run.model.state_dict(), run.optimizer.state_dict())

    hooks = Saves()
    result = train.train(tiny_model(), random_tokens(), tiny_config(), hooks=hooks, log=quiet, dist=AgreedStop())
    assert (result.step, result.stopped, result.checkpoint, len(result.losses)) == (1, "SIGTERM", "checkpoint-1", 1)
    assert hooks.saved == [(1, 1, list(range(len(hooks.saved[0][2]))))] and hooks.saved[0][2]


def test_evaluate_is_deterministic_and_covers_all_tokens():
    model, tokens = tiny_model(), random_tokens(n=200)
    a = train.evaluate(model, tokens, block_size=32, batch_size=2)
    b = train.evaluate(model, tokens, block_size=32, batch_size=3)
    assert a["tokens"] == b["tokens"] == 199
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert train.evaluate(model, tokens, 32, 2, max_batches=1)["tokens"] == 64


# ----------------------------------------------------------------------------------------------
# Command line


def test_cli_defaults_are_the_train_config_defaults():
    # Every TrainConfig field is a flag (generated from the fields), with the field's default and help.
    parser = build_train_parser()
    flags, help_text = parser.parse_args([]), parser.format_help()
    flagged = [f for f in dataclasses.fields(train.TrainConfig) if hasattr(flags, f.name)]
    assert len(flagged) >= 20 and len(flagged) == len(dataclasses.fields(train.TrainConfig))
    for f in flagged:
        assert getattr(flags, f.name) == f.default, f.name
        assert "--" + f.name.replace("_", "-") in help_text and f.metadata["help"], f.name


def run_cli(*args, check_rc=None):
    p = subprocess.run([sys.executable, "-m", "opt_deus_tool.train_cli", *map(str, args)], capture_output=True,
                       text=True, env=ENV, cwd=REPO, timeout=120)
    if check_rc is not None:
        assert p.returncode == check_rc, p.stderr
    return p


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny"
    save_pretrained(tiny_model(), path)
    text = tmp_path_factory.mktemp("data") / "data.txt"
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog while cats sleep".split()
    text.write_text("\n".join(" ".join(rng.choice(words, 10)) for _ in range(120)))
    return path, text


TINY_FLAGS = ["--block-size", 32, "--batch-tokens", 128, "--micro-batch-size", 2, "--warmup-steps", 1,
              "--lr", 1e-2, "--log-every", 2, "--device", "cpu"]


def test_cli_end_to_end(saved_model, tmp_path):
    model_dir, text = saved_model
    out = tmp_path / "run"
    p = run_cli("--model", model_dir, "--data", text, "--out", out, "--cache-dir", tmp_path / "cache",
                "--steps", 4, "--eval-every", 2, "--checkpoint-every", 2, *TINY_FLAGS, check_rc=0)
    assert "step 4/4" in p.stderr and "tok/s" in p.stderr and "eta" in p.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert set(steps[0]) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"}
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 2, 4]
    checkpoint = out / "checkpoint-000004"
    loaded = load_pretrained(checkpoint)
    assert loaded.args.extra["opt_deus"]["new_layers"] == [1, 3]
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 4
    assert sorted(os.listdir(tmp_path / "cache"))[0].startswith("tokens-")

    p = subprocess.run([sys.executable, "-m", "opt_deus_tool.eval_cli", *map(str, ["--model", checkpoint, "--text",
                        text, "--block-size", 32, "--json", tmp_path / "e.json"])], capture_output=True, text=True,
                       env=ENV, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "perplexity per token" in p.stdout and "perplexity per word" in p.stdout
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["words"] == len(text.read_text().split())
    assert report["tokens"] == len(text.read_text().encode())
    assert report["perplexity_per_word"] > report["perplexity_per_token"]

    # Resuming from the step-2 checkpoint needs no other flag and ends at the same weights.
    p = run_cli("--resume", out / "checkpoint-000002", "--out", tmp_path / "resumed", check_rc=0)
    resumed = load_pretrained(tmp_path / "resumed" / "checkpoint-000004")
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), resumed.parameters()))


def test_cli_sigint_saves_and_exits(saved_model, tmp_path):
    model_dir, text = saved_model
    out = tmp_path / "run"
    args = ["--model", model_dir, "--data", text, "--out", out, "--cache-dir", tmp_path / "cache", "--steps", 100000,
            "--eval-every", 0, "--eval-fraction", 0, *TINY_FLAGS]
    proc = subprocess.Popen([sys.executable, "-m", "opt_deus_tool.train_cli", *map(str, args)], env=ENV, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text()):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "SIGINT received" in stderr
    [checkpoint] = find_checkpoints(out)
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] >= 1


def bad(args, match, saved_model, tmp_path):
    p = run_cli(*args, "--out", tmp_path / "run", "--cache-dir", tmp_path / "cache", "--steps", 2, *TINY_FLAGS)
    assert p.returncode == 2, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("opt-deus-train: error: ") and match in last and "Traceback" not in p.stderr
    assert not list((tmp_path / "run").glob("checkpoint-*")) if (tmp_path / "run").exists() else True


def test_cli_bad_inputs(saved_model, tmp_path):
    model_dir, text = saved_model
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    bad(["--model", model_dir, "--data", tmp_path / "missing.txt"], "no such file", saved_model, tmp_path)
    bad(["--model", model_dir, "--data", empty], "empty", saved_model, tmp_path)
    bad(["--model", model_dir, "--data", short], "shorter than one block", saved_model, tmp_path)
    bad(["--model", tmp_path / "nomodel", "--data", text], "not a folder", saved_model, tmp_path)
    bad(["--resume", tmp_path], "not a checkpoint", saved_model, tmp_path)
    bad(["--model", model_dir, "--data", text, "--trainable", "9"], "out of range", saved_model, tmp_path)


def test_cli_bad_resume_and_nan(saved_model, tmp_path):
    model_dir, text = saved_model
    out = tmp_path / "run"
    run_cli("--model", model_dir, "--data", text, "--out", out, "--cache-dir", tmp_path / "cache", "--steps", 4,
            "--stop-after", 2, "--eval-every", 0, *TINY_FLAGS, check_rc=0)
    checkpoint = out / "checkpoint-000002"
    before = {f.name: f.read_bytes() for f in checkpoint.iterdir()}

    # A trainer state whose trainable tensors do not fit the model.
    tampered = tmp_path / "tampered"
    save_pretrained(tiny_model(layers=3, new_layers=(1, 2)), tampered)
    for name in ("trainer_state.json", "optimizer.pt"):
        (tampered / name).write_bytes((checkpoint / name).read_bytes())
    p = run_cli("--resume", tampered, "--out", tmp_path / "other")
    assert p.returncode == 2 and "does not match" in p.stderr.strip().splitlines()[-1]

    # A poisoned weight is refused when the checkpoint loads, naming the tensor (issue 20: before, the loss went
    # nan steps later), with exit 2 and nothing written. The loop's own guard: test_nonfinite_loss_stops_....
    poisoned = tmp_path / "poisoned"  # resumed into its own run folder (tmp_path)
    save_pretrained(load_pretrained(checkpoint), poisoned)
    weights = load_file(poisoned / "model.safetensors")  # poisoned behind the writer's finiteness check
    weights["model.embed_tokens.weight"].fill_(float("inf"))
    save_file(weights, poisoned / "model.safetensors")
    for name in ("trainer_state.json", "optimizer.pt"):
        (poisoned / name).write_bytes((checkpoint / name).read_bytes())
    p = run_cli("--resume", poisoned)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and "model.embed_tokens.weight contains NaN or inf" in last, p.stderr
    assert [c.name for c in find_checkpoints(out)] == ["checkpoint-000002"]
    assert {f.name: f.read_bytes() for f in checkpoint.iterdir()} == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
