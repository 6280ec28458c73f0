"""opt-deus-lm-eval: lm-evaluation-harness (the `eval` extra, lm-eval 0.4.13), offline, on a model folder
with a local multiple-choice task; zero-shot, as the paper evaluates.

    opt-deus-lm-eval --model grown/                       # the shipped Emma cloze: opt_deus_tool/tasks/emma_cloze.yaml
    opt-deus-lm-eval --model grown/ --task my_task.yaml --limit 50 --json report.json

The task is a YAML with `dataset_path: json` and `dataset_kwargs: {data_files: ...}` naming JSONL files of
{"context", "choices", "label"}. lm-eval hands data_files to datasets.load_dataset as written, so plain `lm_eval`
resolves a relative path against the working directory; here it is resolved against the YAML's folder and handed
to lm-eval absolute, so the command works from any directory. lm-eval runs in this process with
HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1 (nothing is downloaded) and its datasets cache in a temporary folder.
lm_eval is imported only when a command runs: the package imports without the extra.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from unittest import mock

import torch

from opt_deus_tool import CheckpointError
from opt_deus_tool.atomic import TERMINATING_SIGNALS, AtomicFolder, write_text_atomic
from opt_deus_tool.checkpoint import CheckpointReader
from opt_deus_tool.cli import (HelpFormatter, OneLineArgumentParser, flag_names, log_to_stderr, positive_int,
                               run_command)
from opt_deus_tool.cloze import DEFAULT_TASK_DIR, TARGET_DELIMITER, TaskFileError, read_questions
from opt_deus_tool.devices import resolve_device
from opt_deus_tool.hub import resolve_model

PROG = "opt-deus-lm-eval"
LM_EVAL_VERSION = "0.4.13"  # the version the `eval` extra pins and this wrapper was tested with
DEFAULT_TASK_YAML = DEFAULT_TASK_DIR / "emma_cloze.yaml"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
FLAGS = flag_names("model", "task", "limit", "batch_size", "device", "dtype", "json")


def read_task(yaml_path) -> dict:
    """The task's lm-eval config, checked, with every data file absolute (a relative one: against the YAML's
    folder) and its questions read once to find a broken file before lm-eval starts."""
    import yaml  # PyYAML comes with lm-eval (and transformers)
    yaml_path = Path(yaml_path)
    if not yaml_path.is_file():
        raise TaskFileError(f"{yaml_path}: no such task file")
    try:
        config = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        problem = " ".join(str(e).split())
        raise TaskFileError(f"{yaml_path}: not a YAML task file ({problem})") from None
    if not isinstance(config, dict) or not isinstance(config.get("task"), str):
        raise TaskFileError(f"{yaml_path}: expected a mapping with a 'task' name (an lm-eval task YAML)")
    for key, wanted in (("output_type", "multiple_choice"), ("dataset_path", "json")):
        if config.get(key) != wanted:
            raise TaskFileError(f"{yaml_path}: {key} is {config.get(key)!r}; this command runs local "
                                f"{wanted} tasks ({key}: {wanted})")
    kwargs = config.get("dataset_kwargs")
    if not isinstance(kwargs, dict):
        raise TaskFileError(f"{yaml_path}: dataset_kwargs must be a mapping (dataset_kwargs: {{data_files: {{test: "
                            f"FILE.jsonl}}}}), got {type(kwargs).__name__} {kwargs!r}"[:300])
    for key in ("test_split", "validation_split"):
        if config.get(key) is not None and not isinstance(config[key], str):
            raise TaskFileError(f"{yaml_path}: {key} must be a split name such as test, got "
                                f"{type(config[key]).__name__} {config[key]!r}"[:300])
    data_files = kwargs.get("data_files")
    if isinstance(data_files, str):
        data_files = {"train": data_files}
    if not isinstance(data_files, dict) or not all(isinstance(v, str) for v in data_files.values()):
        raise TaskFileError(f"{yaml_path}: dataset_kwargs.data_files must be a file name or {{split: file name}}")
    split = config.get("test_split") or config.get("validation_split") or "train"
    if split not in data_files:
        raise TaskFileError(f"{yaml_path}: the task reads split {split!r}, data_files has {', '.join(data_files)}")
    config = copy.deepcopy(config)
    resolved = {name: str((yaml_path.parent / file).resolve()) for name, file in data_files.items()}
    questions = {name: read_questions(file) for name, file in resolved.items()}
    check_templates(config, questions[split], resolved[split], yaml_path)
    config["dataset_kwargs"]["data_files"] = resolved
    if split == "train" and "test_split" not in config and "validation_split" not in config:
        config["test_split"] = "train"
    return config


def check_templates(config: dict, questions: list[dict], data_file, yaml_path):
    # doc_to_text, doc_to_choice and doc_to_target as lm-eval 0.4.13 applies them (ConfigurableTask: a field name
    # of the data, else a Jinja template with StrictUndefined), on every question before lm-eval starts: a
    # template naming a missing field is one line here, not a traceback minutes into the run.
    fields = sorted({key for q in questions for key in q})
    for key, kinds in (("doc_to_text", (str,)), ("doc_to_choice", (str, list)), ("doc_to_target", (str, int))):
        if not isinstance(config.get(key), kinds) or isinstance(config.get(key), bool):
            raise TaskFileError(f"{yaml_path}: {key} must be a field name or a Jinja template such as "
                                f"\"{{{{context}}}}\" (fields: {', '.join(fields)}), got {config.get(key)!r}"[:300])
    for i, q in enumerate(questions, 1):
        text, choices, target = (apply_spec(config, key, q, fields, f"question {i} of {data_file}", yaml_path)
                                 for key in ("doc_to_text", "doc_to_choice", "doc_to_target"))
        problem = next((key for key, ok in (
            ("doc_to_text", isinstance(text, str) and text.strip()),
            ("doc_to_choice", isinstance(choices, list) and len(choices) >= 2
             and all(isinstance(c, str) and c.strip() for c in choices)),
            ("doc_to_target", target in choices if isinstance(target, str) else
             isinstance(target, int) and not isinstance(target, bool) and 0 <= target < len(choices))) if not ok), None)
        if problem:
            value = {"doc_to_text": text, "doc_to_choice": choices, "doc_to_target": target}[problem]
            raise TaskFileError(f"{yaml_path}: {problem} {config[problem]!r} gives {value!r} on question {i} of "
                                f"{data_file} (expected {TEMPLATE_RESULTS[problem]})"[:400])


TEMPLATE_RESULTS = {"doc_to_text": "a non-empty text", "doc_to_choice": "a list of two or more non-empty texts",
                    "doc_to_target": "the index of a choice, or a choice's text"}


def apply_spec(config: dict, key: str, question: dict, fields: list[str], where: str, yaml_path):
    # lm-eval's ConfigurableTask.doc_to_text / doc_to_choice / doc_to_target for a str, int or list spec.
    import ast
    import jinja2
    from lm_eval.utils import apply_template
    spec = config[key]
    if not isinstance(spec, str):
        return spec
    if spec in fields:
        return question.get(spec)
    try:
        value = apply_template(spec, question)
        return ast.literal_eval(value) if key == "doc_to_choice" or (key == "doc_to_target" and value.isdigit()) \
            else value
    except (jinja2.TemplateError, ValueError, SyntaxError) as e:
        problem = " ".join(str(e).split())[:200]
        raise TaskFileError(f"{yaml_path}: {key} {spec!r} fails on {where} ({problem}); its fields: "
                            f"{', '.join(fields)}") from None


@contextlib.contextmanager
def offline_environment():
    # Set for what lm-eval, datasets and huggingface_hub read, restored afterwards. They read these when first
    # imported, which is why the command sets them before importing lm_eval.
    # huggingface_hub imported already (a Hub id resolved just before) keeps what it read then: told too.
    hub = sys.modules.get("huggingface_hub.constants")
    saved, hub_offline = {k: os.environ.get(k) for k in OFFLINE}, getattr(hub, "HF_HUB_OFFLINE", None)
    os.environ.update(OFFLINE)
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if hub is not None:
            hub.HF_HUB_OFFLINE = hub_offline
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def lm_eval_device(name) -> str:
    # A device this machine has (devices.resolve_device: "cuda:1" without a second GPU is refused), spelled as
    # lm-eval's HFLM lists devices: it runs any name not in its list ("cpu:0", "bogus") on cuda-if-available.
    device = resolve_device(str(name))
    return str(device) if device.type == "cuda" and device.index is not None else device.type


def check_model(model_dir, config: dict, limit: int | None = None):
    """The folder loaded as strictly as every other command loads it (checkpoint.CheckpointReader: every tensor
    present, of its shape, used, none beside a shard index; a tied head equal to the embeddings) and every value
    finite, one tensor at a time; then the tokenizer lm-eval will use, on the questions it will score: no token
    id beyond the model's vocabulary. transformers would fill a missing tensor with random weights and score it."""
    reader = CheckpointReader(model_dir)
    for key, file in reader.files.items():
        if not torch.isfinite(reader.tensor(key)).all():
            raise CheckpointError(f"{file}: tensor {key} contains NaN or inf")
        reader.release()  # one tensor's pages resident at a time
    reader.check_all_read()
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))  # as lm-eval's HFLM loads it
    except Exception as e:  # transformers raises OSError, ValueError, TypeError ... for a missing or bad tokenizer
        problem = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{model_dir}: cannot load its tokenizer ({problem})") from None
    split = config["test_split"] if config.get("test_split") else config.get("validation_split") or "train"
    questions = read_questions(config["dataset_kwargs"]["data_files"][split])[:limit]
    texts = [q["context"] + TARGET_DELIMITER + c for q in questions for c in q["choices"]]
    top = max(max(ids, default=0) for ids in tokenizer(texts)["input_ids"])
    if top >= reader.args.vocab_size:
        raise CheckpointError(f"{model_dir}: its tokenizer gives token id {top} on the task's questions, beyond the "
                              f"model's vocab_size {reader.args.vocab_size} (a tokenizer that does not belong to "
                              f"this model?)")


@contextlib.contextmanager
def signals_raise():
    # SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 (where nobody else handles them) raise Interrupted, so that the
    # temporary datasets cache is deleted on the way out and the command exits 128 + n (run_command).
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, AtomicFolder._on_signal) for s in TERMINATING_SIGNALS
                    if signal.getsignal(s) == signal.SIG_DFL}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def evaluate_task(model_dir, config: dict, limit: int | None = None, batch_size: int = 1, device: str = "cpu",
                  dtype: str = "float32", check: bool = True) -> dict:
    """lm_eval.simple_evaluate on one checked task config (read_task), zero-shot, every sample logged, after
    check_model (check=False: the caller ran it). Returns lm-eval's results dict (results, samples, configs ...)."""
    device = lm_eval_device(device)
    with signals_raise():
        if check:
            check_model(model_dir, config, limit)
        import lm_eval
        import lm_eval.evaluator
        from lm_eval.tasks import TaskManager
        with tempfile.TemporaryDirectory(prefix="opt-deus-lm-eval-") as cache, \
                mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None):
            # get_git_commit_hash runs `git describe` in the working directory, which prints "fatal: not a git
            # repository" outside one and records an unrelated repository's commit inside one.
            config = copy.deepcopy(config)
            config["dataset_kwargs"]["cache_dir"] = cache  # datasets' Arrow copy of the JSONL, deleted afterwards
            # include_defaults=False: lm-eval's ~10k built-in task files are not indexed (seconds) for one task.
            return lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(model_dir), "dtype": dtype},
                                           tasks=[config], num_fewshot=0, limit=limit, batch_size=batch_size,
                                           device=device, log_samples=True,
                                           task_manager=TaskManager(include_defaults=False))


def report_of(results: dict, model_dir, task_yaml) -> dict:
    # lm-eval's results for the one task: its metrics and, per question, the choices' log-likelihoods.
    import lm_eval
    (name, metrics), = results["results"].items()
    samples = [{"doc_id": s["doc_id"], "label": s["target"], "loglikelihoods": [ll for ll, _ in s["filtered_resps"]],
                "acc": s["acc"], "acc_norm": s["acc_norm"]} for s in results["samples"][name]]
    chance = sum(1 / len(s["loglikelihoods"]) for s in samples) / len(samples)
    return {"model": str(model_dir), "task": name, "task_file": str(task_yaml),
            "lm_eval_version": getattr(lm_eval, "__version__", "unknown"), "questions": len(samples),
            "chance": chance, "acc": metrics["acc,none"], "acc_stderr": metrics["acc_stderr,none"],
            "acc_norm": metrics["acc_norm,none"], "acc_norm_stderr": metrics["acc_norm_stderr,none"],
            "samples": samples}


def check_json_path(json_flag: str | None, inputs: list[tuple[str, str]]):
    # Found out before the evaluation, and never over an input.
    if not json_flag:
        return
    json_path = Path(json_flag)
    if json_path.is_dir():
        raise TaskFileError(f"--json {json_flag}: is a folder")
    if not json_path.absolute().parent.is_dir():
        raise TaskFileError(f"--json {json_flag}: no such folder {json_path.absolute().parent}")
    for flag, source in inputs:
        source_path = Path(source).resolve()
        if json_path.resolve() == source_path or source_path in json_path.resolve().parents:
            raise TaskFileError(f"--json {json_flag}: would overwrite the input {flag} {source}")


def lm_eval_command(flags: argparse.Namespace, model: str | None = None) -> int:
    # model: --model's folder (hub.resolve_model: a Hub id's snapshot in the cache); None: --model itself.
    config = read_task(flags.task)
    model_dir = Path(flags.model if model is None else model)
    if not (model_dir / "config.json").is_file():
        raise TaskFileError(f"--model {flags.model}: not a Hugging Face model folder (no config.json)")
    check_json_path(flags.json, [("--model", flags.model), ("--task", flags.task),
                                 *(("--task's data", f) for f in config["dataset_kwargs"]["data_files"].values())])
    device = lm_eval_device(flags.device)
    dtype = flags.dtype if flags.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    with signals_raise():
        check_model(model_dir, config, flags.limit)
        log_to_stderr(f"lm-eval: {config['task']} on {model_dir} ({device}, {dtype}), offline")
        results = evaluate_task(model_dir, config, flags.limit, flags.batch_size, device, dtype, check=False)
    report = report_of(results, model_dir, flags.task)
    report.update(device=device, dtype=dtype)
    if flags.json:
        write_text_atomic(flags.json, json.dumps(report, indent=2) + "\n")
    print(f"{report['task']}: {report['questions']} questions, chance {report['chance']:.4f}")
    print(f"acc {report['acc']:.4f} ± {report['acc_stderr']:.4f}, acc_norm {report['acc_norm']:.4f} ± "
          f"{report['acc_norm_stderr']:.4f} (lm-eval {report['lm_eval_version']}, zero-shot)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog=PROG, formatter_class=HelpFormatter,
                              description=f"Zero-shot accuracy (acc, acc_norm) of a model folder on a local "
                                          f"multiple-choice task with lm-evaluation-harness {LM_EVAL_VERSION}, "
                                          f"offline.",
                              epilog="lm-eval's progress goes to stderr, the accuracies to stdout. Exit code 2: a "
                                     "bad request (one line on stderr, nothing written). Needs the `eval` extra: "
                                     "pip install -e \".[eval]\".")
    p.add_argument("--model", required=True, help="Hugging Face model folder (with its tokenizer) or Hub id "
                                                  "ORG/NAME[@REVISION]")
    p.add_argument("--task", default=str(DEFAULT_TASK_YAML),
                   help="lm-eval task YAML (dataset_path: json; a relative data_files path is taken from the YAML's "
                        "folder)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N questions (None: all)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="lm-eval's requests per forward pass")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights' dtype; auto: bfloat16 on cuda (the paper's setting), float32 on cpu")
    p.add_argument("--json", help="also write the report (metrics and per-question log-likelihoods) here as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    flags = build_parser().parse_args(sys.argv[1:] if argv is None else [str(a) for a in argv])

    def command() -> int:
        # find_spec, not an import: a bad request is answered without loading lm-eval (seconds).
        if importlib.util.find_spec("lm_eval") is None:
            raise TaskFileError(f"lm-eval is not installed: pip install -e \".[eval]\" "
                                f"(lm-eval[hf]=={LM_EVAL_VERSION})")
        model = resolve_model(flags.model, "--model")  # a Hub id is read (downloaded) before going offline
        with offline_environment():
            return lm_eval_command(flags, model)

    return run_command(PROG, command, FLAGS)


if __name__ == "__main__":
    sys.exit(main())
