"""Issue 32's campaign against growth, calibration text, growing a grown model and the experiment scripts.

Every case goes through the real entry point (the commands' and scripts' main(argv), or the Python API) and must end
as docs/CLI.md promises: one line on stderr naming the problem and the flag, exit code 2, every input and earlier
output byte for byte as it was; and every exit-0 result right. The helpers and the shared workspace are
tests/test_bad_input.py's.
"""

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from test_bad_input import TINY, WORDS, assert_refused, call, tiny_model, tree_hash, ws  # noqa: F401  (ws: fixture)

from opt_deus_core.opt_deus import GrowthOptions, grow
from opt_deus_tool import CheckpointError, DataError, data, grow_cli, runs, train_cli
from opt_deus_tool.checkpoint import CheckpointReader, load_pretrained, save_pretrained
from opt_deus_tool.data import load_tokenizer
from opt_deus_tool.grow_cli import grow_checkpoint
from opt_deus_tool.growths import growth_history
from opt_deus_tool.runs import find_checkpoints

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments import compare, layer_quality, smollm2  # noqa: E402

ACTIVATIONS = ["--cost", "activations", "--calibration-tokens", 16]


def plain_model(seed=0, **kw):
    # A base that was never grown (tiny_model records a growth).
    model = tiny_model(seed=seed, **kw)
    model.args.extra.pop("opt_deus")
    return model


def word_tokenizer(path: Path, first_id: int = 2):
    # A word-level tokenizer whose ids fit the 300-token test models (first_id moves every word's id).
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<eos>": 0, "[UNK]": 1, **{w: first_id + i for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))


@pytest.fixture(scope="module")
def c32(ws):  # noqa: F811  (the fixture imported above)
    r = ws["root"]
    save_pretrained(tiny_model(eos_token_id=0), r / "words_base")
    word_tokenizer(r / "words_base" / "tokenizer.json")
    (r / "calib.txt").write_text(" ".join(WORDS * 20) + "\n")
    (r / "empty_calib.txt").write_text("")
    shutil.copytree(ws["grown"], r / "grown_with_calib")  # an earlier output a calibration file was saved into
    (r / "grown_with_calib" / "calib.txt").write_text(" ".join(WORDS * 20) + "\n")
    return ws


def one_line_refusal(rc, err, match):
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err)
    assert ": error: " in lines[0] and match in lines[0], err


# ----------------------------------------------------------------------------------------------
# Data loss: every input counts against --out


def test_overwrite_never_deletes_a_calibration_file_inside_out(c32):
    r = c32["root"]
    out = r / "grown_with_calib"
    assert_refused(c32, grow_cli.main, ["--base", r / "words_base", "--out", out, "--overwrite", "--new-layers", 1,
                                        *ACTIVATIONS, "--calibration", out / "calib.txt"],
                   "contains the input --calibration")
    with pytest.raises(CheckpointError, match="contains the input `calibration_text`"):
        grow_checkpoint(r / "words_base", out, 1, options=GrowthOptions(cost="activations"), overwrite=True,
                        calibration_text=out / "calib.txt", calibration_tokens=16, log=lambda m: None)
    assert (out / "calib.txt").is_file()


# ----------------------------------------------------------------------------------------------
# Silent wrong: inputs replaced while they are read


@pytest.mark.parametrize("change", ["folder replaced", "tokenizer rewritten"])
def test_growth_refuses_a_base_changed_while_it_is_read(c32, tmp_path, monkeypatch, change):
    # Another `opt-deus --overwrite` into --base renames a new folder into place between two blocks (or a file is
    # rewritten in place): the growth must not splice the two bases (layers of one, head and tokenizer of the other).
    base = tmp_path / "base"
    shutil.copytree(c32["root"] / "words_base", base)
    release, calls = CheckpointReader.release, []

    def change_then_release(self):
        if not calls:
            if change == "folder replaced":
                save_pretrained(plain_model(seed=1), base, overwrite=True)
                word_tokenizer(base / "tokenizer.json", first_id=100)
            else:
                word_tokenizer(base / "tokenizer.json", first_id=100)
        calls.append(1)
        release(self)
    monkeypatch.setattr(CheckpointReader, "release", change_then_release)
    rc, _, err = call(grow_cli.main, ["--base", base, "--out", tmp_path / "out", "--new-layers", 2])
    assert calls and rc == 2 and "changed while this command was reading" in err.strip().splitlines()[-1], err
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["base"]


def test_training_ships_the_tokenizer_it_read_at_the_start(c32, tmp_path, monkeypatch):
    # --model replaced after the run started: its checkpoints must carry the tokenizer the data was read with.
    model = tmp_path / "model"
    shutil.copytree(c32["root"] / "words_base", model)
    original = (model / "tokenizer.json").read_bytes()
    real_train = runs.train

    def replace_model_then_train(*args, **kwargs):
        save_pretrained(plain_model(seed=1, eos_token_id=0), model, overwrite=True)
        word_tokenizer(model / "tokenizer.json", first_id=100)
        return real_train(*args, **kwargs)
    monkeypatch.setattr(runs, "train", replace_model_then_train)
    rc, _, err = call(train_cli.main, ["--model", model, "--data", c32["text"], "--out", tmp_path / "run",
                                       "--cache-dir", tmp_path / "cache", *TINY, "--steps", 2])
    assert rc == 0, err
    [checkpoint] = find_checkpoints(tmp_path / "run")
    assert (checkpoint / "tokenizer.json").read_bytes() == original


# ----------------------------------------------------------------------------------------------
# Silent wrong: a grown model grown again


def same_layer(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_model_grown_twice_keeps_both_growths_and_trains_all_their_layers(c32, tmp_path):
    base, once, twice = tmp_path / "base", tmp_path / "once", tmp_path / "twice"
    save_pretrained(plain_model(), base)
    assert grow_cli.main(["--base", str(base), "--out", str(once), "--new-layers", "2", "--position", "top"]) == 0
    assert grow_cli.main(["--base", str(once), "--out", str(twice), "--new-layers", "2", "--position", "bottom"]) == 0
    assert "opt_deus_growths" not in json.loads((once / "config.json").read_text())  # one growth: as before
    config = json.loads((twice / "config.json").read_text())
    first, second = config["opt_deus_growths"]
    assert second["new_layers_final"] == config["opt_deus"]["new_layers"] == [1, 3]
    assert first["new_layers"] == [2, 4] and first["new_layers_final"] == [4, 6]  # shifted by the bottom growth
    m1, m2 = load_pretrained(once), load_pretrained(twice)
    for i, j in zip(first["new_layers"], first["new_layers_final"]):
        assert same_layer(m1.layers[i], m2.layers[j])
    # --trainable new trains every growth's new layers, and says which and why at the start
    rc, _, err = call(train_cli.main, ["--model", twice, "--data", c32["text"], "--out", tmp_path / "run",
                                       "--cache-dir", tmp_path / "cache", *TINY, "--steps", 2])
    assert rc == 0, err
    assert "training the new layers [1, 3, 4, 6] (trainable new): those of all 2 growths" in err
    trained = load_pretrained(find_checkpoints(tmp_path / "run")[0])
    assert [i for i in range(len(m2.layers)) if not same_layer(m2.layers[i], trained.layers[i])] == [1, 3, 4, 6]
    # Grown a third time in memory (grow() on the loaded model), then saved: all three on record
    grown, _ = grow(m2, 1, position="top")
    save_pretrained(grown, tmp_path / "thrice")
    history = json.loads((tmp_path / "thrice" / "config.json").read_text())["opt_deus_growths"]
    assert [g["new_layers_final"] for g in history] == [[4, 6], [1, 3], [7]]


def test_old_single_record_configs_read_as_one_growth():
    assert growth_history({"opt_deus": {"new_layers": [1, 3]}}) == [{"new_layers": [1, 3], "new_layers_final": [1, 3]}]
    assert growth_history({}) == [] and growth_history({"opt_deus": {"method": "opt"}}) == []


def test_a_growth_list_that_does_not_place_is_refused_when_read(c32, tmp_path):
    folder = tmp_path / "bad"
    save_pretrained(plain_model(), folder)
    config = json.loads((folder / "config.json").read_text())
    record = {"new_layers": [1], "sources": [[0], [0, 1], [1], [2], [3]]}
    config.update(num_hidden_layers=4, opt_deus=record, opt_deus_growths=[{"new_layers": [9]}])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="opt_deus_growths"):
        load_pretrained(folder)


# ----------------------------------------------------------------------------------------------
# Calibration: real text or a one-line refusal


def test_calibration_that_is_no_text_is_refused(c32):
    r = c32["root"]
    grow_args = ["--base", r / "words_base", "--out", r / "o", "--new-layers", 1, "--cost", "activations"]
    assert_refused(c32, grow_cli.main, [*grow_args, "--calibration", r / "empty_calib.txt"],
                   "fewer than --calibration-tokens 2048")
    for count in ("1", "15", "-64", "abc"):  # 1: the start token alone
        assert_refused(c32, grow_cli.main, [*grow_args, "--calibration", r / "calib.txt", "--calibration-tokens",
                                            count], "--calibration-tokens: expected an integer" + " >= 16" * (
                                                count != "abc"))


@pytest.mark.parametrize("tokens, match", [
    (torch.zeros(1, 0, dtype=torch.long), "0 token(s), fewer than 16"),
    (torch.zeros(1, 8, dtype=torch.long), "8 token(s), fewer than 16"),
    (torch.zeros(24, dtype=torch.long), "integer tensor of shape (batch, tokens); got a 1-D int64"),
    (torch.zeros(1, 24), "got a 2-D float32"),
    (torch.full((1, 24), 300), "token id 300 is outside the base's vocabulary [0, 300)"),
    (torch.full((1, 24), -1), "token id -1 is outside"),
    (torch.zeros(1, 257, dtype=torch.long), "beyond the base's max_position_embeddings 256"),
    ([[1, 2, 3]], "got list"),
])
def test_calibration_token_ids_are_checked_by_the_api(c32, tmp_path, tokens, match):
    with pytest.raises(DataError) as e:
        grow_checkpoint(c32["root"] / "words_base", tmp_path / "o", 1, options=GrowthOptions(cost="activations"),
                        calibration=tokens, log=lambda m: None)
    assert match in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()


def test_the_experiments_check_calibration_before_growing():
    # grow() trusts its calibration (the core checks nothing): the experiments' grow_by_name checks it as the tool.
    from experiments import common
    model = plain_model()
    with pytest.raises(DataError, match="beyond the base's max_position_embeddings 256"):
        common.grow_by_name(model, "opt-structured-act@0.1", 1, "top", torch.zeros(1, 257, dtype=torch.long))
    with pytest.raises(DataError, match="0 token"):
        common.grow_by_name(model, "opt-structured-act@0.1", 1, "top", torch.zeros(1, 0, dtype=torch.long))


def test_calibration_reads_only_what_its_tokens_need(c32, tmp_path, monkeypatch):
    # 16 tokens of a 20 MB text: a few kilobytes read, not the file; the same tokens as the whole text's first 15.
    big = tmp_path / "big.txt"
    line = " ".join(WORDS) + "\n"
    big.write_text(line * (20_000_000 // len(line)))
    read, real_open = [], data.open_text

    class Counting:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            text = self.f.read(n)
            read.append(len(text))
            return text

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __iter__(self):
            return iter(self.read, "")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
    monkeypatch.setattr(data, "open_text", lambda path: Counting(real_open(path)))
    base = c32["root"] / "words_base"
    t0 = time.perf_counter()
    tokens = grow_cli.calibration_tokens(base, big, 16)
    assert sum(read) < 200_000 and time.perf_counter() - t0 < 5, (sum(read), time.perf_counter() - t0)
    tokenizer = load_tokenizer(base)
    assert tokens.tolist() == [[tokenizer.eos_id] + tokenizer.encode(line * 20)[:15]]


def test_calibration_read_in_pieces_is_the_whole_texts_first_tokens(c32, tmp_path):
    # The first piece read (4096 characters) ends inside the 15th word: its last token would be [UNK] for "qu";
    # reading on until two prefixes agree gives the whole text's tokens.
    head = " ".join((WORDS * 2)[:14]) + " "
    text = head + " " * (4094 - len(head)) + "quick brown fox\n" * 50
    (tmp_path / "cut.txt").write_text(text)
    base = c32["root"] / "words_base"
    tokenizer = load_tokenizer(base)
    cut = tokenizer.encode(text[:4096])
    assert len(cut) == 15 and cut[:14] == tokenizer.encode(text)[:14] and cut[14] != tokenizer.encode(text)[14]
    tokens = grow_cli.calibration_tokens(base, tmp_path / "cut.txt", 16)
    assert tokens.tolist() == [[tokenizer.eos_id] + tokenizer.encode(text)[:15]]


# ----------------------------------------------------------------------------------------------
# Tracebacks and leftovers of the grow command


def test_a_tokenizer_beyond_the_vocabulary_is_one_line_during_growth(c32):
    r = c32["root"]  # other_tokenizer's ids are 350 and up; the model has 300
    assert_refused(c32, grow_cli.main, ["--base", r / "other_tokenizer", "--out", r / "o", "--new-layers", 1,
                                        *ACTIVATIONS, "--calibration", r / "calib.txt"],
                   "is outside the base's vocabulary [0, 300)")


@pytest.mark.parametrize("extra, match", [
    (["--method", "avg", *ACTIVATIONS, "--calibration", "calib.txt"], "--cost must be weights unless --method opt"),
    (["--method", "solar", *ACTIVATIONS, "--calibration", "calib.txt"], "--cost must be weights unless --method opt"),
    (["--method", "lesa", *ACTIVATIONS, "--calibration", "calib.txt"], "--cost must be weights unless --method opt"),
    (["--calibration", "calib.txt"], "--calibration is used only with --cost activations"),
    (["--calibration-tokens", "64"], "--calibration-tokens is used only with --cost activations"),
    (["--calibration", "missing.txt"], "--calibration is used only with --cost activations"),
    (["--cost", "activations"], "--cost activations runs the base on calibration text: give --calibration"),
    (["--cost", "activations", "--calibration", "missing.txt"], "--calibration missing.txt: no such file"),
])
def test_options_that_would_do_nothing_are_refused(c32, extra, match):
    r = c32["root"]
    extra = [str(r / x) if str(x).endswith(".txt") else x for x in extra]
    match = match.replace("missing.txt", str(r / "missing.txt"))
    assert_refused(c32, grow_cli.main, ["--base", r / "words_base", "--out", r / "o", "--new-layers", 2, *extra],
                   match)


def test_a_base_without_its_tokenizer_names_a_remedy_opt_deus_has(c32):
    r = c32["root"]
    before = tree_hash(r)
    rc, _, err = call(grow_cli.main, ["--base", r / "big_vocab", "--out", r / "o", "--new-layers", 1, *ACTIVATIONS,
                                      "--calibration", r / "calib.txt"])
    one_line_refusal(rc, err, "copy the base model's tokenizer.json into")
    assert "--cost weights" in err and "byte" not in err and tree_hash(r) == before


# ----------------------------------------------------------------------------------------------
# The experiment scripts: the same contract


LAYER_QUALITY_CASES = [
    (["--seeds", "abc"], "--seeds: 'abc': expected an integer"),
    (["--seeds", "0,0"], "'0' appears twice"),
    (["--seeds", "0,,1"], "without empty entries"),
    (["--scales", "nan"], "expected a finite number"),
    (["--scales", "0"], "expected a finite number > 0"),
    (["--scales", "1,1"], "appears twice"),
    (["--top-gaps", "0"], "--top-gaps: expected a positive integer"),
    (["--top-gaps", "99"], "--top-gaps 99: the base has 8 layers, 7 gaps"),
    (["--calibration-tokens", "-64"], "--calibration-tokens: expected an integer >= 16"),
    (["--calibration-tokens", "64"], "below one block of the base's context (128)"),
    (["--eval-tokens", "-5"], "--eval-tokens: expected a positive integer"),
    (["--eval-tokens", "100"], "--eval-tokens 100: the held-out text has 16385 tokens"),
    (["--eval-tokens", "999999"], "give 129..16385"),
    (["--arms", "copy-A,nope"], "unknown 'nope'"),
    (["--base-preset", "nope"], "--base-preset: invalid choice: 'nope'"),
    (["--jobs", "0"], "--jobs: expected a positive integer"),
    (["--threads", "-1"], "--threads: expected an integer >= 0"),
    (["--resummarize", "MISSING"], "not a summary.json that layer_quality.py wrote (FileNotFoundError"),
    (["--resummarize", "CORRUPT"], "not a summary.json that layer_quality.py wrote (JSONDecodeError"),
    (["--resummarize", "WRONG"], "not a summary.json that layer_quality.py wrote (KeyError"),
]


@pytest.mark.parametrize("argv, match", LAYER_QUALITY_CASES, ids=[" ".join(a) for a, _ in LAYER_QUALITY_CASES])
def test_layer_quality_refuses_bad_flags_in_one_line_before_any_work(tmp_path, argv, match):
    (tmp_path / "CORRUPT").write_text("{not json")
    (tmp_path / "WRONG").write_text(json.dumps({"seeds": [{"one_at_a_time": {}}]}))
    argv = [str(tmp_path / a) if a in ("MISSING", "CORRUPT", "WRONG") else a for a in argv]
    t0 = time.perf_counter()
    rc, _, err = call(layer_quality.main, [*argv, "--out", tmp_path / "out"])
    one_line_refusal(rc, err, match)
    assert err.startswith("layer_quality.py: error: ") and time.perf_counter() - t0 < 10
    assert not (tmp_path / "out").exists()


def test_layer_quality_resummarize_never_replaces_its_own_input(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "summary.json").write_text("{}")
    before = tree_hash(tmp_path)
    rc, _, err = call(layer_quality.main, ["--resummarize", tmp_path / "results" / "summary.json",
                                           "--out", tmp_path / "results"])
    one_line_refusal(rc, err, "")
    assert tree_hash(tmp_path) == before


def test_compare_runs_with_less_training_text_than_the_calibration_blocks(tmp_path):
    # Ran at 74b0825; then every arm failed on 1001 training bytes (16 calibration blocks of 64 asked for 1024).
    rc, out, err = call(compare.main, ["--preset", "tiny", "--train-bytes", 1001, "--block-size", 64, "--seeds", 0,
                                       "--methods", "avg-zero,opt-structured-act@0.1", "--no-reference",
                                       "--out", tmp_path / "out"])
    assert rc == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["seeds"][0]["arms"]) == {"avg-zero", "opt-structured-act@0.1"}
    assert "calibration text for the activation arms: 15 blocks of 64 bytes" in out


@pytest.mark.parametrize("script, argv, match", [
    (compare, ["--layers", "abc"], "--layers: expected a positive integer, got 'abc'"),
    (compare, ["--layers", "0"], "--layers: expected a positive integer"),
    (compare, ["--anneal-fraction", "inf"], "--anneal-fraction: expected a finite number"),
    (compare, ["--base-lr", "nan"], "--base-lr: expected a finite number"),
    (compare, ["--threads", "-2"], "--threads: expected an integer >= 0"),
    (smollm2, ["--seeds", "0,0"], "seeds (0, 0): need at least one, all different"),
    (smollm2, ["--lr", "nan"], "--lr: expected a finite number"),
    (smollm2, ["--eval-tokens", "-5"], "--eval-tokens: expected an integer >= 0"),
    (smollm2, ["--jobs", "0"], "--jobs: expected a positive integer"),
])
def test_experiment_scripts_end_bad_flags_in_one_line(tmp_path, script, argv, match):
    given = ["--base", tmp_path, "--data", tmp_path, "--no-accuracy"] if script is smollm2 else []
    rc, _, err = call(script.main, [*given, *argv, "--out", tmp_path / "out"])
    one_line_refusal(rc, err, match)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("calibration", [
    torch.zeros(1, 0, dtype=torch.long), torch.arange(20), torch.rand(1, 20), torch.full((1, 20), 999),
    torch.full((1, 20), -1), torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 200, dtype=torch.long)],
    ids=["zero tokens", "1-D", "float", "beyond vocab", "negative", "8 tokens", "beyond positions"])
def test_grow_itself_refuses_calibration_that_is_no_token_ids_in_one_line(calibration):
    from opt_deus_core.model import ModelArgs, Transformer
    from opt_deus_core.opt_deus import GrowthError
    model = Transformer(ModelArgs(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                  max_position_embeddings=64))
    with pytest.raises(GrowthError, match="needs `calibration`, token ids"):
        grow(model, 1, options=GrowthOptions(cost="activations"), calibration=calibration)


def test_grow_in_memory_twice_keeps_the_first_growth_on_record():
    from opt_deus_core.model import ModelArgs, Transformer
    from opt_deus_tool.growths import new_layers
    model = Transformer(ModelArgs(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    once, _ = grow(model, 1)
    twice, _ = grow(once, 2, position="bottom")
    layers, why = new_layers(twice.args.extra)
    assert len(twice.args.extra["opt_deus_growths"]) == 1 and "2 growths" in why
    # the first growth's new layer (after base layer 1 of 3: index 2) sits after the second growth's two new layers
    assert once.args.extra["opt_deus"]["new_layers"] == [2] and twice.args.extra["opt_deus"]["new_layers"] == [1, 3]
    assert layers == [1, 3, 4], (layers, why)
