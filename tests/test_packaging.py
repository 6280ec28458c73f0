"""An installed, non-editable opt-deus (issue 29): `pip install` of a copy of this checkout into a folder outside it,
run by a fresh interpreter that sees that folder and the environment's site-packages but not the editable install
(-S: no .pth files, so no editable finder, no user site) and not the checkout.

(a) the install holds the packages opt_deus_core (the four reference files) and opt_deus_tool (with its package
    data, the default cloze task) and nothing else: no top-level model, train, sinkhorn or opt_deus module, no
    tests/, experiments/ or benchmarks/;
(b) from a working folder holding the user's own model.py, train.py, sinkhorn.py and opt_deus.py (each ends the
    process if imported), `python -m opt_deus_tool.<command> --help` exits 0 for the four commands, and the API
    imports; the folder is first on the path, as it is for any `python -m` or `python -c` run there;
(c) opt-deus-lm-eval (the installed script) runs its default task, shipped inside the install, on a tiny model.
"""

import importlib.metadata
import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = {"model.py", "sinkhorn.py", "opt_deus.py", "train.py"}
GENERIC = ("model", "train", "sinkhorn", "opt_deus")
COMMANDS = {"grow_cli": "opt-deus", "train_cli": "opt-deus-train", "eval_cli": "opt-deus-eval",
            "lm_eval_cli": "opt-deus-lm-eval"}
# What a checkout holds that no install needs (and the build's own leftovers).
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "runs", "out", "build", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".hypothesis")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(folder the project is installed into, environment that runs it from there and nothing else of ours)."""
    # Built here, without build isolation (no index needed): with this environment's pip and setuptools.
    try:
        setuptools_major = int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        setuptools_major = 0
    if importlib.util.find_spec("pip") is None or setuptools_major < 69:
        pytest.skip("building the project here needs pip and setuptools>=69 in this environment")
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    shutil.copytree(ROOT, source, ignore=NOT_COPIED)  # the build writes build/ and egg-info: not into the checkout
    target = root / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--no-compile", "--disable-pip-version-check", "--quiet", "--target", str(target),
                           str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join([str(target), *site.getsitepackages()])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return target, env


def run(args, cwd, env, timeout=300) -> subprocess.CompletedProcess:
    # -S: site.py does not run, so the editable install's .pth (and its finder) never loads.
    return subprocess.run([sys.executable, "-S", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_install_holds_the_two_packages_and_nothing_else(installed):
    target, _ = installed
    dist_info = [p.name for p in target.iterdir() if p.name.endswith(".dist-info")]
    assert len(dist_info) == 1 and dist_info[0].startswith("opt_deus-")
    assert sorted(p.name for p in target.iterdir()) == sorted(["bin", "opt_deus_core", "opt_deus_tool", *dist_info])
    assert (target / dist_info[0] / "top_level.txt").read_text().split() == ["opt_deus_core", "opt_deus_tool"]
    assert {p.name for p in (target / "opt_deus_core").iterdir()} == CORE
    assert sorted(p.name for p in (target / "opt_deus_tool" / "tasks").iterdir()) == [
        "emma_cloze.jsonl", "emma_cloze.meta.json", "emma_cloze.yaml"]
    for name in ("emma_cloze.jsonl", "emma_cloze.yaml"):
        assert (target / "opt_deus_tool" / "tasks" / name).read_bytes() == (ROOT / "opt_deus_tool" / "tasks" /
                                                                              name).read_bytes()
    # Every installed file, from pip's record: under the two packages, the dist-info or the scripts.
    record = (target / dist_info[0] / "RECORD").read_text().splitlines()
    tops = {line.split(",")[0].split("/")[0] for line in record if line}
    assert tops <= {"opt_deus_core", "opt_deus_tool", dist_info[0], "..", "bin"}, tops
    assert sorted(p.name for p in (target / "bin").iterdir()) == sorted(COMMANDS.values())


@pytest.fixture
def users_folder(tmp_path):
    """A working folder with the user's own model.py, train.py, sinkhorn.py and opt_deus.py in it."""
    folder = tmp_path / "work"
    folder.mkdir()
    for name in GENERIC:
        (folder / f"{name}.py").write_text(f"raise SystemExit('the user\\'s own {name}.py was imported')\n")
    return folder


API = textwrap.dedent("""
    import importlib.util, sys
    target = sys.argv[1]
    assert not [f for f in sys.meta_path if "editable" in repr(f).lower()], sys.meta_path
    for name in {generic!r}:  # the user's files are first on the path: the test would see them used
        assert importlib.util.find_spec(name).origin.startswith(sys.argv[2]), name
    from opt_deus_tool.checkpoint import load_pretrained
    from opt_deus_core.opt_deus import grow
    from opt_deus_core.train import train
    import opt_deus_core, opt_deus_tool
    assert all(p.startswith(target) for p in (*opt_deus_core.__path__, *opt_deus_tool.__path__)), sys.path
    assert not [name for name in {generic!r} if name in sys.modules]
    print("api ok")
""").format(generic=GENERIC)


def test_commands_and_api_ignore_the_users_own_files(installed, users_folder):
    target, env = installed
    # Started together (each mostly imports torch), then waited for.
    runs = {module: subprocess.Popen([sys.executable, "-S", "-m", f"opt_deus_tool.{module}", "--help"],
                                     cwd=users_folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True) for module in COMMANDS}
    api = run(["-c", API, target, users_folder], users_folder, env)
    failed = {} if api.returncode == 0 and api.stdout == "api ok\n" else {"api": api.stderr[-1500:]}
    for module, process in runs.items():
        out, err = process.communicate(timeout=300)
        if process.returncode != 0 or not out.startswith(f"usage: {COMMANDS[module]} "):
            failed[module] = f"exit {process.returncode}: {err[-1500:]}"
    assert not failed, failed  # every one that failed, with its stderr
    assert sorted(p.name for p in users_folder.iterdir()) == sorted(f"{name}.py" for name in GENERIC)


def test_lm_eval_runs_its_shipped_default_task_from_the_install(installed, users_folder, tmp_path):
    pytest.importorskip("lm_eval")
    tokenizers = pytest.importorskip("tokenizers")
    import torch

    from opt_deus_core.model import ModelArgs, Transformer
    from opt_deus_tool.checkpoint import save_pretrained

    # A byte-level tokenizer (256 byte tokens and an end-of-text token) and a one-block model over it.
    files = tmp_path / "tokenizer"
    files.mkdir()
    vocab = {c: i for i, c in enumerate(sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(files / "tokenizer.json"))
    (files / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                             "eos_token": "<|endoftext|>"}))
    args = ModelArgs(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024)
    model = tmp_path / "model"
    save_pretrained(Transformer(args).init_weights(torch.Generator().manual_seed(0), std=0.5), model,
                    copy_files_from=files)

    target, env = installed
    report = tmp_path / "report.json"
    done = run([target / "bin" / "opt-deus-lm-eval", "--model", model, "--limit", 2, "--device", "cpu",
                "--json", report], users_folder, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "emma_cloze: 2 questions, chance 0.2500" in done.stdout
    result = json.loads(report.read_text())
    shipped_yaml = target / "opt_deus_tool" / "tasks" / "emma_cloze.yaml"
    assert Path(result["task_file"]).resolve() == shipped_yaml.resolve()  # the install's own copy
    shipped = [json.loads(line) for line in
               (ROOT / "opt_deus_tool" / "tasks" / "emma_cloze.jsonl").read_text().splitlines()[:2]]
    assert [s["label"] for s in result["samples"]] == [q["label"] for q in shipped]
    assert all(len(s["loglikelihoods"]) == 4 for s in result["samples"])
