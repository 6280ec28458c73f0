"""Issue 32's cases against opt-deus-lm-eval, the cloze task maker (experiments/cloze/make_cloze.py) and the cloze
scorer, one test each, through the real entry points (main(argv) in this process; subprocesses for signals).

Each refusal must end as docs/CLI.md promises: exit code 2 (128 + n for signal n), one line on stderr naming the
problem, and every input and earlier output byte for byte as it was. The models are tiny (vocabulary 300, a
byte-level tokenizer written here), so nothing needs the SmolLM2 checkpoint.
"""

import gzip
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_bad_input import ENV, call, tree_hash

pytest.importorskip("lm_eval")

from opt_deus_core.model import ModelArgs, Transformer  # noqa: E402
from opt_deus_tool import CheckpointError, cloze, lm_eval_cli  # noqa: E402
from opt_deus_tool.checkpoint import save_pretrained  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ERROR = "opt-deus-lm-eval: error: "


def byte_level_tokenizer(folder: Path, offset: int = 0):
    # 256 byte symbols after an end-of-text token: ids 1..256 (+ offset: a tokenizer that is not the model's).
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0, **{c: i + 1 + offset for i, c in enumerate(alphabet)}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                              "tokenizer_class": "PreTrainedTokenizerFast"}))


def tiny(seed=0) -> Transformer:
    args = ModelArgs(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=16, tie_word_embeddings=True, max_position_embeddings=2048)
    return Transformer(args).init_weights(torch.Generator().manual_seed(seed), std=0.5)


def edit_weights(folder: Path, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("campaign32")
    good = root / "good"
    save_pretrained(tiny(), good)
    byte_level_tokenizer(good)

    def variant(name, edit=None):
        shutil.copytree(good, root / name)
        if edit is not None:
            edit_weights(root / name, edit)
        return root / name

    variant("missing", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    variant("nan", lambda t: t["model.layers.0.mlp.up_proj.weight"].view(-1)[5].fill_(math.nan))
    variant("tied_differs", lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 0.5}))
    truncated = variant("truncated") / "model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:truncated.stat().st_size // 2])
    byte_level_tokenizer(variant("other_tokenizer"), offset=100)  # ids up to 356, vocabulary 300
    # A sharded model with a stale single file beside its index (missing a tensor): transformers took the single
    # file and filled the gap with random weights.
    save_pretrained(tiny(), root / "stray", max_shard_size=20_000)
    byte_level_tokenizer(root / "stray")
    shutil.copy(good / "model.safetensors", root / "stray" / "model.safetensors")
    edit_weights(root / "stray", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    # Task YAMLs beside a copy of the shipped questions.
    shipped = lm_eval_cli.DEFAULT_TASK_YAML.read_text()
    shutil.copy(cloze.DEFAULT_TASK_JSONL, root / "emma_cloze.jsonl")
    yamls = {"dataset_kwargs_string": shipped.replace("dataset_kwargs:\n", "dataset_kwargs: emma_cloze.jsonl\nx:\n"),
             "test_split_list": shipped.replace("test_split: test", "test_split: [test]"),
             "doc_to_text_missing_field": shipped.replace("{{context}}", "{{passage}}"),
             "doc_to_choice_not_a_list": shipped.replace("doc_to_choice: choices", "doc_to_choice: \"{{context}}\""),
             "doc_to_target_out_of_range": shipped.replace("doc_to_target: label", "doc_to_target: \"{{label + 4}}\"")}
    for name, text in yamls.items():
        assert text != shipped, name
        (root / f"{name}.yaml").write_text(text)
    return root


LM_CASES = {
    # A model folder transformers would load loosely: refused as opt-deus-eval refuses it.
    "missing tensor": (["--model", "missing"], "missing tensor model.layers.1.mlp.up_proj.weight"),
    "single file beside a shard index": (["--model", "stray"], "holds both model.safetensors and"),
    "NaN weights": (["--model", "nan"], "tensor model.layers.0.mlp.up_proj.weight contains NaN or inf"),
    "tied head differs from embeddings": (["--model", "tied_differs"], "lm_head.weight differs from the embeddings"),
    "truncated model.safetensors": (["--model", "truncated"], "corrupt or truncated safetensors file"),
    "tokenizer ids beyond the vocabulary": (["--model", "other_tokenizer"], "beyond the model's vocab_size 300"),
    # Devices this machine does not have.
    "device bogus": (["--device", "bogus"], "--device 'bogus': not a device"),
    "device cuda:1 without a second GPU": (["--device", "cuda:1"], "--device cuda:1: "),
    "device cuda without a GPU": (["--device", "cuda"], "--device cuda: CUDA is not available"),
    # Malformed task YAML.
    "dataset_kwargs a string": (["--task", "dataset_kwargs_string.yaml"], "dataset_kwargs must be a mapping"),
    "test_split a list": (["--task", "test_split_list.yaml"], "test_split must be a split name"),
    "doc_to_text names a missing field": (["--task", "doc_to_text_missing_field.yaml"],
                                          "doc_to_text '{{passage}}' fails on question 1"),
    "doc_to_choice gives no list": (["--task", "doc_to_choice_not_a_list.yaml"], "doc_to_choice '{{context}}' fails"),
    "doc_to_target out of range": (["--task", "doc_to_target_out_of_range.yaml"],
                                   "doc_to_target '{{label + 4}}' gives"),
}


@pytest.mark.parametrize("case", list(LM_CASES))
def test_lm_eval_refuses(lm, case):
    flags, match = LM_CASES[case]
    if case == "device cuda:1 without a second GPU" and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has a second GPU")
    if case == "device cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv = {"--model": lm / "good", "--device": "cpu", "--limit": 3, "--json": lm / "report.json"}
    for flag, value in zip(flags[::2], flags[1::2]):
        argv[flag] = lm / value if flag in ("--model", "--task") else value
    before = tree_hash(lm)
    code, out, err = call(lm_eval_cli.main, [x for kv in argv.items() for x in kv])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(ERROR) and match in lines[0], (code, err)
    assert "Traceback" not in err and out == ""
    assert tree_hash(lm) == before  # no report, nothing changed


def test_api_refuses_a_model_the_command_refuses(lm):
    config = lm_eval_cli.read_task(lm_eval_cli.DEFAULT_TASK_YAML)
    with pytest.raises(CheckpointError, match="missing tensor"):
        lm_eval_cli.evaluate_task(lm / "missing", config, limit=2)
    with pytest.raises(ValueError, match="`device` 'bogus'"):
        lm_eval_cli.evaluate_task(lm / "good", config, limit=2, device="bogus")


def test_lm_eval_reports_the_device_it_used_and_never_asks_git(lm, tmp_path, monkeypatch, capfd):
    # Outside any git repository, where lm-eval's `git describe` printed "fatal: not a git repository".
    monkeypatch.chdir(tmp_path)
    assert lm_eval_cli.main(["--model", str(lm / "good"), "--limit", "2", "--json", "report.json"]) == 0
    out, err = capfd.readouterr()
    report = json.loads((tmp_path / "report.json").read_text())
    used = "cuda" if torch.cuda.is_available() else "cpu"
    assert report["device"] == used and report["dtype"] == ("bfloat16" if used == "cuda" else "float32")
    assert report["questions"] == 2 and "acc " in out
    assert "not a git repository" not in err and "fatal" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def default_signals():
    # A shell's background job (nohup, `pytest &`) inherits SIGHUP ignored, which the command rightly keeps.
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(s, signal.SIG_DFL)


def cache_written(temp: Path) -> bool:
    # The datasets cache holds the task's Arrow file (datasets renames its folders as it writes: races are False).
    try:
        return any(p.name.startswith("opt-deus-lm-eval-") and any(p.rglob("*.arrow")) for p in temp.iterdir())
    except OSError:
        return False


# SIGHUP (which exited 0 in the campaign) runs by default; the same path for SIGTERM and SIGUSR1 costs ~15 s each.
@pytest.mark.parametrize("signum", [pytest.param(signal.SIGTERM, marks=pytest.mark.slow), signal.SIGHUP,
                                    pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)])
def test_signal_during_lm_eval_leaves_no_cache(lm, tmp_path, signum):
    temp = tmp_path / "temp"
    temp.mkdir()
    # All 800 questions: minutes of work, so the signal lands while lm-eval runs.
    proc = subprocess.Popen([sys.executable, "-m", "opt_deus_tool.lm_eval_cli", "--model", str(lm / "good"),
                             "--device", "cpu"], cwd=tmp_path, env={**ENV, "TMPDIR": str(temp)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)
    deadline = time.time() + 120
    while not cache_written(temp):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, (proc.returncode, err[-2000:])
    assert err.strip().splitlines()[-1] == f"{ERROR}stopped by {signal.Signals(signum).name}; nothing written"
    assert not [p.name for p in temp.iterdir() if p.name.startswith("opt-deus-lm-eval-")]
    assert "not a git repository" not in err


# ----------------------------------------------------------------------------------------------
# The cloze scorer's acc_norm: lm-eval 0.4.13 divides by len(choice) in characters, without the leading space


def test_acc_norm_divides_by_characters_as_lm_eval_does(tmp_path):
    from lm_eval.api.task import ConfigurableTask
    choices = [["café au lait", "cafe au lait", "naïveté", "plain words"],
               ["éééé", "abcde", "résumé élève", "ok ok ok"],
               ["Zoë’s “book”", "Zoe's book!!", "ÆØÅ æøå", "x y z w"]]
    questions = [{"context": "She said", "choices": c, "label": i % 4} for i, c in enumerate(choices)]
    assert all(len(c) != len(c.encode()) for q in questions for c in q["choices"][:1])
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (tmp_path / "task.yaml").write_text(lm_eval_cli.DEFAULT_TASK_YAML.read_text()
                                        .replace("test: emma_cloze.jsonl", "test: task.jsonl"))
    config = lm_eval_cli.read_task(tmp_path / "task.yaml")
    config["dataset_kwargs"]["cache_dir"] = str(tmp_path / "cache")
    with lm_eval_cli.offline_environment():
        task = ConfigurableTask(config=config)
    docs = list(task.test_docs())
    encoded = cloze.encode_questions(lambda text: list(text.encode()), questions)  # the scorer's own path
    rng = np.random.default_rng(0)
    by_bytes = with_space = 0
    for doc, q in zip(docs, encoded):
        assert q.choice_chars == [len(c) for c in doc["choices"]]
        for _ in range(300):
            lls = list(-rng.uniform(5, 40, size=4))
            for label in range(4):  # every label: the choice acc_norm picks, not only whether it is the right one
                theirs = task.process_results({**doc, "label": label}, [(ll, False) for ll in lls])
                ours = cloze.multiple_choice_metrics(lls, q.choice_chars, label)
                assert ours == {"acc": theirs["acc"], "acc_norm": theirs["acc_norm"]}, (doc["choices"], lls)
            chars = np.array([len(c) for c in doc["choices"]], dtype=float)
            nbytes = np.array([len(c.encode()) for c in doc["choices"]], dtype=float)
            by_bytes += np.argmax(lls / nbytes) != np.argmax(lls / chars)
            with_space += np.argmax(lls / (chars + 1)) != np.argmax(lls / chars)
    assert by_bytes >= 20 and with_space >= 5, (by_bytes, with_space)  # both wrong denominators were exercised


# ----------------------------------------------------------------------------------------------
# experiments/cloze/make_cloze.py

def load_make_cloze():
    spec = importlib.util.spec_from_file_location("make_cloze", REPO / "experiments" / "cloze" / "make_cloze.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_cloze"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


make_cloze = load_make_cloze()
WORDS = ("the a man woman house garden letter walk evening morning friend father sister brother room door "
         "window paper quiet happy kind little great young old new long small early late").split()


def synthetic_novel(chapters=4, paragraphs=12, sentences=4, seed=0) -> str:
    # Headings as in Project Gutenberg's texts; sentences of 8 to 20 words, one paragraph per block.
    rng = random.Random(seed)
    blocks = ["A NOVEL", "by Nobody"]
    for c in range(chapters):
        blocks.append(f"CHAPTER {['I', 'II', 'III', 'IV', 'V', 'VI'][c]}")
        for _ in range(paragraphs):
            blocks.append(" ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))).capitalize() + "."
                                   for _ in range(sentences)))
    return "\n\n".join(blocks) + "\n"


@pytest.fixture
def cz(tmp_path):
    (tmp_path / "novel.txt").write_text(synthetic_novel())
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "latin1.txt").write_bytes(synthetic_novel().replace("house", "café").encode("latin-1"))
    (tmp_path / "binary.dat").write_bytes(bytes(range(256)) * 40)
    whole = gzip.compress(synthetic_novel().encode())
    (tmp_path / "truncated.txt.gz").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "a_folder").mkdir()
    os.mkfifo(tmp_path / "fifo")
    return tmp_path


CLOZE_CASES = {
    "--questions 0": (["--questions", "0"], "argument --questions: expected a positive integer"),
    "--questions -1": (["--questions", "-1"], "argument --questions: expected a positive integer"),
    "--passage-sentences 0": (["--passage-sentences", "0"], "argument --passage-sentences: expected a positive"),
    "--passage-sentences -1": (["--passage-sentences", "-1"], "argument --passage-sentences: expected a positive"),
    "task named x: y": (["--task", "x: y"], "'x: y' is not a task name"),
    "binary novel": (["--novel", "binary.dat"], "binary.dat: not UTF-8 text"),
    "Latin-1 novel": (["--novel", "latin1.txt"], "latin1.txt: not UTF-8 text"),
    "truncated gzip novel": (["--novel", "truncated.txt.gz"], "truncated or damaged gzip file"),
    "--out-dir a file": (["--out-dir", "a_file"], "--out-dir a_file: is a file, not a folder"),
    "novel a folder": (["--novel", "a_folder"], "--novel a_folder: is a folder"),
    "novel a FIFO": (["--novel", "fifo"], "--novel fifo: is a FIFO"),
    "--length-tolerance nan": (["--length-tolerance", "nan"], "argument --length-tolerance: expected a finite"),
    "--min-words above --max-words": (["--min-words", "30"], "--min-words 30 is above --max-words 25"),
    "more questions than fit": (["--questions", "500"], "questions fit the constraints (asked for --questions 500)"),
    "output named like the novel": (["--novel", "out/t.yaml", "--task", "t", "--out-dir", "out"],
                                    "would write out/t.yaml, the input --novel"),
}


@pytest.mark.parametrize("case", list(CLOZE_CASES))
def test_make_cloze_refuses(cz, case, monkeypatch):
    monkeypatch.chdir(cz)
    (cz / "out").mkdir()
    (cz / "out" / "t.yaml").write_text(synthetic_novel())  # a novel where an output would go
    flags, match = CLOZE_CASES[case]
    before = tree_hash(cz)
    code, out, err = call(make_cloze.main, ["--novel", "novel.txt", "--questions", 5, "--out-dir", "new", *flags])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("make_cloze.py: error: "), (code, err)
    assert match in lines[0] and "Traceback" not in err, err
    assert tree_hash(cz) == before and not (cz / "new").exists()


def test_make_cloze_defaults_to_runs_cloze_and_never_replaces_a_task(cz, monkeypatch):
    shipped = [REPO / "opt_deus_tool" / "tasks", REPO / "experiments" / "cloze"]
    shipped_before = [tree_hash(p) for p in shipped]
    monkeypatch.chdir(cz)
    assert call(make_cloze.main, ["--novel", "novel.txt", "--questions", 5])[0] == 0
    task = cz / "runs" / "cloze"
    assert sorted(p.name for p in task.iterdir()) == ["emma_cloze.jsonl", "emma_cloze.meta.json", "emma_cloze.yaml"]
    assert [tree_hash(p) for p in shipped] == shipped_before
    # A second run, even one that would write other questions, leaves the first task alone without --overwrite ...
    first = tree_hash(task)
    code, _, err = call(make_cloze.main, ["--novel", "novel.txt", "--questions", 6])
    assert code == 2 and "exists already" in err and "--overwrite" in err and tree_hash(task) == first
    # ... and replaces all three files with it.
    assert call(make_cloze.main, ["--novel", "novel.txt", "--questions", 6, "--overwrite"])[0] == 0
    assert len((task / "emma_cloze.jsonl").read_text().splitlines()) == 6
    assert json.loads((task / "emma_cloze.meta.json").read_text())["questions"] == 6
    assert "6 questions" in (task / "emma_cloze.yaml").read_text()


def test_make_cloze_never_overwrites_a_hard_linked_novel(cz, monkeypatch):
    monkeypatch.chdir(cz)
    (cz / "out").mkdir()
    os.link(cz / "novel.txt", cz / "out" / "t.jsonl")
    before = tree_hash(cz)
    for overwrite in ([], ["--overwrite"]):  # not even with --overwrite
        argv = ["--novel", "novel.txt", "--questions", 5, "--task", "t", "--out-dir", "out", *overwrite]
        code, _, err = call(make_cloze.main, argv)
        assert code == 2 and "the input --novel novel.txt" in err and tree_hash(cz) == before, err


def test_make_cloze_writes_valid_yaml_for_any_accepted_name(cz, monkeypatch):
    # Names YAML would read as something else (a bool, a number, null) are quoted: lm-eval gets the name as a str.
    import yaml
    monkeypatch.chdir(cz)
    for name in ("true", "1e3", "null", "no", "my-task.v2"):
        argv = ["--novel", "novel.txt", "--questions", 3, "--task", name, "--out-dir", "o"]
        assert call(make_cloze.main, argv)[0] == 0
        config = yaml.safe_load((cz / "o" / f"{name}.yaml").read_text())
        assert config["task"] == name and config["dataset_kwargs"]["data_files"]["test"] == f"{name}.jsonl"
        assert lm_eval_cli.read_task(cz / "o" / f"{name}.yaml")["task"] == name


def test_make_cloze_writes_all_three_files_or_none(cz, monkeypatch):
    # A write that fails on the second file (a full disk): no file of a new task, an earlier task whole, no scratch.
    monkeypatch.chdir(cz)
    assert call(make_cloze.main, ["--novel", "novel.txt", "--questions", 5, "--out-dir", "o"])[0] == 0
    before = tree_hash(cz / "o")
    write_text = Path.write_text
    for argv in (["--out-dir", "new"], ["--out-dir", "o", "--overwrite"]):
        calls = []

        def failing(self, *args, **kwargs):
            calls.append(self)
            if len(calls) == 2:
                raise OSError(28, "No space left on device", str(self))
            return write_text(self, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", failing)
        code, _, err = call(make_cloze.main, ["--novel", "novel.txt", "--questions", 6, *argv])
        monkeypatch.setattr(Path, "write_text", write_text)
        assert code == 2 and "No space left on device" in err and len(err.strip().splitlines()) == 1, err
        assert not (cz / "new").exists() or not any((cz / "new").iterdir())
        assert tree_hash(cz / "o") == before


@pytest.mark.slow
def test_make_cloze_defaults_still_make_the_shipped_task(austen_dir, tmp_path):
    # The flags and the writing changed; the shipped task must still be exactly what the defaults make (~10 s).
    assert call(make_cloze.main, ["--novel", austen_dir / "emma.txt.gz", "--out-dir", tmp_path])[0] == 0
    for name in ("emma_cloze.jsonl", "emma_cloze.yaml", "emma_cloze.meta.json"):
        assert (tmp_path / name).read_bytes() == (REPO / "opt_deus_tool" / "tasks" / name).read_bytes(), name
