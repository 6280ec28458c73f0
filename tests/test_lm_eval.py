"""lm-evaluation-harness (the `eval` extra) on our folders, offline, on the shipped Emma cloze:
(a) a zero-init grown folder gets exactly the per-sample log-likelihoods of its base (function preservation,
confirmed by a third-party harness running transformers' LlamaForCausalLM); (b) lm-eval's log-likelihood of a
sample is what model.Transformer computes on the same tokens; our scorer (opt_deus_tool/cloze.py, used by
experiments/smollm2.py) gives lm-eval's choice log-likelihoods, acc and acc_norm; (c) opt-deus-lm-eval ends a
corrupt task in one line and exit code 2, writing nothing."""

import copy
import json
import shutil

import pytest

pytest.importorskip("lm_eval")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from opt_deus_core.model import ModelArgs, Transformer  # noqa: E402
from opt_deus_core.opt_deus import GrowthOptions, grow  # noqa: E402
from opt_deus_tool import cloze, lm_eval_cli  # noqa: E402
from opt_deus_tool.checkpoint import load_pretrained, save_pretrained  # noqa: E402

LIMIT = 6  # questions per lm-eval run: 24 requests


def tiny_args(**changes) -> ModelArgs:
    # SmolLM2's vocabulary (so its tokenizer files serve), everything else tiny: lm-eval runs it in a second.
    return ModelArgs(**{**dict(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True,
                               max_position_embeddings=512), **changes})


@pytest.fixture(scope="module")
def task_config():
    return lm_eval_cli.read_task(lm_eval_cli.DEFAULT_TASK_YAML)


@pytest.fixture(scope="module")
def tiny_folders(smollm2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    # std 0.5, not the default 0.02: logits of a few nats, so a choice's log-likelihood depends on every weight
    # (near-uniform logits would hide a wrong RoPE or norm from test (b)).
    base = Transformer(tiny_args()).init_weights(torch.Generator().manual_seed(0), std=0.5)
    grown, report = grow(base, 2, options=GrowthOptions(method="opt", out_scale=0.0))
    assert len(grown.layers) == 4 and report["new_layers"]
    save_pretrained(base, root / "base", copy_files_from=smollm2_dir)
    save_pretrained(grown, root / "grown", copy_files_from=smollm2_dir)
    return root / "base", root / "grown"


def run_lm_eval(model_dir, config, limit=LIMIT) -> dict:
    with lm_eval_cli.offline_environment():
        return lm_eval_cli.evaluate_task(model_dir, config, limit=limit, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def tiny_results(tiny_folders, task_config):
    base_dir, grown_dir = tiny_folders
    return run_lm_eval(base_dir, task_config), run_lm_eval(grown_dir, task_config)


def choice_lls(results) -> list[list[float]]:
    (samples,) = results["samples"].values()
    return [[ll for ll, _ in s["filtered_resps"]] for s in sorted(samples, key=lambda s: s["doc_id"])]


def test_zero_init_growth_gives_lm_eval_the_same_loglikelihoods(tiny_results):
    base, grown = tiny_results
    # Two different models were evaluated (the grown one has 2 more blocks) ...
    assert grown["config"]["model_num_parameters"] > base["config"]["model_num_parameters"]
    base_lls, grown_lls = choice_lls(base), choice_lls(grown)
    assert len(base_lls) == LIMIT and all(len(q) == 4 for q in base_lls)
    assert len({ll for q in base_lls for ll in q}) == 4 * LIMIT  # real, distinct numbers, not a constant
    # ... and they give every choice of every question the same log-likelihood, to the last bit.
    assert grown_lls == base_lls
    assert grown["results"] == base["results"]


def test_lm_eval_loglikelihood_is_our_models(tiny_folders, tiny_results):
    # Each request (context, " " + choice) by hand with model.Transformer: tokenize context + continuation whole,
    # cut where the context's tokens end, sum log-softmax of the continuation's tokens given what precedes them.
    from tokenizers import Tokenizer
    base_dir, _ = tiny_folders
    model = load_pretrained(base_dir, dtype=torch.float32)
    tokenizer = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    (samples,) = tiny_results[0]["samples"].values()
    checked = 0
    for sample in samples:
        for (context, continuation), (ll, _) in zip(sample["arguments"], sample["filtered_resps"]):
            whole, context_ids = tokenizer.encode(context + continuation).ids, tokenizer.encode(context).ids
            continuation_ids = whole[len(context_ids):]
            with torch.no_grad():
                logits = model(torch.tensor([whole[:-1]]))[0]  # (len(whole) - 1, vocab)
            logp = F.log_softmax(logits[len(context_ids) - 1:], dim=-1)
            ours = float(logp.gather(1, torch.tensor(continuation_ids)[:, None]).sum())
            assert ours == pytest.approx(ll, rel=1e-6, abs=1e-4), (context, continuation)
            checked += 1
    assert checked == 4 * LIMIT


def test_our_scorer_gives_lm_evals_loglikelihoods_and_accuracy(smollm2_dir, task_config):
    # The study's scorer against lm-eval on the real checkpoint (real margins between choices): the same choice
    # log-likelihoods to float tolerance, the same acc and acc_norm per question.
    results = run_lm_eval(smollm2_dir, task_config, limit=LIMIT)
    (samples,) = results["samples"].values()
    samples = sorted(samples, key=lambda s: s["doc_id"])
    questions = cloze.read_questions(task_config["dataset_kwargs"]["data_files"]["test"])[:LIMIT]
    model = load_pretrained(smollm2_dir, dtype=torch.float32)
    ours = cloze.score_questions(model, cloze.encode_questions(cloze.tokenizer_encoder(smollm2_dir), questions))
    assert ours["questions"] == LIMIT
    for i, sample in enumerate(samples):
        assert sample["doc"]["context"] == questions[i]["context"]
        theirs = [ll for ll, _ in sample["filtered_resps"]]
        assert ours["per_question"]["loglikelihoods"][i] == pytest.approx(theirs, rel=1e-4, abs=1e-3)
        assert ours["per_question"]["acc"][i] == sample["acc"]
        assert ours["per_question"]["acc_norm"][i] == sample["acc_norm"]
    lm_acc = results["results"][task_config["task"]]
    assert (ours["acc"], ours["acc_norm"]) == pytest.approx((lm_acc["acc,none"], lm_acc["acc_norm,none"]))


def test_acc_norm_is_lm_evals_normalisation(task_config):
    # lm-eval's own process_results on made-up log-likelihoods: our metrics agree on every draw, including the
    # draws where dividing by the choice's length in characters changes the answer.
    from lm_eval.api.task import ConfigurableTask
    config = copy.deepcopy(task_config)
    task = ConfigurableTask(config=config)
    docs = list(task.test_docs())[:20]
    rng = np.random.default_rng(0)
    differ = 0
    for doc in docs:
        for draw in range(60):
            # Every sixth draw in whole nats, so that choices tie: np.argmax gives a tie to the first.
            lls = list(-rng.integers(1, 3, size=4).astype(float) if draw % 6 == 0 else -rng.uniform(10, 60, size=4))
            theirs = task.process_results(doc, [(ll, False) for ll in lls])
            ours = cloze.multiple_choice_metrics(lls, [len(c) for c in doc["choices"]], doc["label"])
            assert ours == {"acc": theirs["acc"], "acc_norm": theirs["acc_norm"]}, lls
            differ += ours["acc"] != ours["acc_norm"]
    assert differ >= 20, differ  # the normalisation was exercised


def test_our_encoding_is_lm_evals(tiny_folders, task_config):
    # lm-eval's HF model class cuts the tokens of context + continuation after the context's own: where a word
    # runs across the cut, or the context ends in a space, that is not the continuation encoded alone.
    from lm_eval.models.huggingface import HFLM
    base_dir, _ = tiny_folders
    with lm_eval_cli.offline_environment():
        lm = HFLM(pretrained=str(base_dir), device="cpu", dtype="float32")
    encode = cloze.tokenizer_encoder(base_dir)
    questions = cloze.read_questions(task_config["dataset_kwargs"]["data_files"]["test"])[:LIMIT]
    tricky = [("The cat sat on the ma", "t."), ("She said ", "hello."), ("It was in 18", "14."),
              ("Emma--", "--and then"), ("\"Well,\"", " said he.")]
    pairs = tricky + [(q["context"], " " + c) for q in questions for c in q["choices"]]
    for context, continuation in pairs:
        assert cloze.encode_pair(encode, context, continuation) == lm._encode_pair(context, continuation)
    assert any(cloze.encode_pair(encode, c, k) != (encode(c), encode(k)) for c, k in tricky)


def write_task(folder, jsonl_text=None, yaml_text=None):
    # A copy of the shipped task in `folder`, its JSONL or YAML replaced when given.
    shutil.copy(lm_eval_cli.DEFAULT_TASK_YAML, folder / "task.yaml")
    yaml = (folder / "task.yaml").read_text().replace("test: emma_cloze.jsonl", "test: task.jsonl")
    (folder / "task.yaml").write_text(yaml if yaml_text is None else yaml_text)
    (folder / "task.jsonl").write_text(cloze.DEFAULT_TASK_JSONL.read_text() if jsonl_text is None else jsonl_text)
    return folder / "task.yaml"


GOOD = {"context": "She smiled.", "choices": ["He left.", "It rained."], "label": 0}
CORRUPT = {
    "jsonl not JSON": (json.dumps(GOOD) + "\n{not json\n", None, "task.jsonl:2: not JSON"),
    "jsonl missing a field": (json.dumps({k: v for k, v in GOOD.items() if k != "label"}) + "\n", None,
                              "missing field 'label'"),
    "label out of range": (json.dumps({**GOOD, "label": 2}) + "\n", None, "'label' must be an integer index"),
    "choices not a list": (json.dumps({**GOOD, "choices": "He left."}) + "\n", None, "'choices' must be a list"),
    "empty jsonl": ("\n", None, "no questions"),
    "yaml does not parse": (None, "task: emma\ndataset_kwargs: {data_files: [unclosed\n", "not a YAML task file"),
    "yaml not a task": (None, "- just\n- a list\n", "expected a mapping with a 'task' name"),
    "yaml names no file": (None, "task: t\noutput_type: multiple_choice\ndataset_path: json\n", "data_files"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_task_ends_in_one_line_and_exit_2(case, tmp_path, capsys):
    jsonl_text, yaml_text, expected = CORRUPT[case]
    task = write_task(tmp_path, jsonl_text, yaml_text)
    model_dir = tmp_path / "model"
    save_pretrained(Transformer(tiny_args(vocab_size=64)).init_weights(torch.Generator().manual_seed(0)), model_dir)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = lm_eval_cli.main(["--model", model_dir, "--task", task, "--json", tmp_path / "report.json"])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("opt-deus-lm-eval: error: ") and expected in lines[0], err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_missing_task_file_ends_in_one_line(tmp_path, capsys):
    assert lm_eval_cli.main(["--model", tmp_path, "--task", tmp_path / "nope.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.yaml: no such task file" in err[0]


def test_command_runs_the_shipped_route_from_any_directory(tiny_folders, tmp_path, monkeypatch, capsys):
    # The same copy of the task that the corrupt cases break, intact: from an unrelated working directory the
    # command finds its data (relative to the YAML), prints the accuracies and writes the report lm-eval made.
    base_dir, _ = tiny_folders
    (tmp_path / "task").mkdir()
    task = write_task(tmp_path / "task")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert lm_eval_cli.main(["--model", base_dir, "--task", task, "--limit", 2, "--json", "report.json"]) == 0
    out = capsys.readouterr().out
    report = json.loads((elsewhere / "report.json").read_text())
    assert report["questions"] == 2 and report["chance"] == 0.25 and len(report["samples"]) == 2
    assert f"acc {report['acc']:.4f}" in out and report["lm_eval_version"] == lm_eval_cli.LM_EVAL_VERSION
    assert sorted(p.name for p in elsewhere.iterdir()) == ["report.json"]
