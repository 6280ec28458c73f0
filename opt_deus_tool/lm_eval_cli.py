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
import sys
import tempfile
from pathlib import Path

from opt_deus_tool.atomic import write_text_atomic
from opt_deus_tool.cli import (HelpFormatter, OneLineArgumentParser, flag_names, log_to_stderr, positive_int,
                               run_command)
from opt_deus_tool.cloze import DEFAULT_TASK_DIR, TaskFileError, read_questions

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
    data_files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(data_files, str):
        data_files = {"train": data_files}
    if not isinstance(data_files, dict) or not all(isinstance(v, str) for v in data_files.values()):
        raise TaskFileError(f"{yaml_path}: dataset_kwargs.data_files must be a file name or {{split: file name}}")
    split = config.get("test_split") or config.get("validation_split") or "train"
    if split not in data_files:
        raise TaskFileError(f"{yaml_path}: the task reads split {split!r}, data_files has {', '.join(data_files)}")
    config = copy.deepcopy(config)
    resolved = {name: str((yaml_path.parent / file).resolve()) for name, file in data_files.items()}
    for file in resolved.values():
        read_questions(file)
    config["dataset_kwargs"]["data_files"] = resolved
    if split == "train" and "test_split" not in config and "validation_split" not in config:
        config["test_split"] = "train"
    return config


@contextlib.contextmanager
def offline_environment():
    # Set for what lm-eval, datasets and huggingface_hub read, restored afterwards. They read these when first
    # imported, which is why the command sets them before importing lm_eval.
    saved = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def evaluate_task(model_dir, config: dict, limit: int | None = None, batch_size: int = 1, device: str = "cpu",
                  dtype: str = "float32") -> dict:
    """lm_eval.simple_evaluate on one checked task config (read_task), zero-shot, every sample logged.
    Returns lm-eval's results dict (results, samples, configs, versions ...)."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    with tempfile.TemporaryDirectory(prefix="opt-deus-lm-eval-") as cache:
        config = copy.deepcopy(config)
        config["dataset_kwargs"]["cache_dir"] = cache  # datasets' Arrow copy of the JSONL, deleted afterwards
        # include_defaults=False: lm-eval's ~10k built-in task files are not indexed (seconds) for one local task.
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


def lm_eval_command(flags: argparse.Namespace) -> int:
    config = read_task(flags.task)
    model_dir = Path(flags.model)
    if not (model_dir / "config.json").is_file():
        raise TaskFileError(f"--model {flags.model}: not a Hugging Face model folder (no config.json)")
    check_json_path(flags.json, [("--model", flags.model), ("--task", flags.task),
                                 *(("--task's data", f) for f in config["dataset_kwargs"]["data_files"].values())])
    device = flags.device
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = flags.dtype if flags.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    log_to_stderr(f"lm-eval: {config['task']} on {model_dir} ({device}, {dtype}), offline")
    report = report_of(evaluate_task(model_dir, config, flags.limit, flags.batch_size, device, dtype), model_dir,
                       flags.task)
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
    p.add_argument("--model", required=True, help="Hugging Face model folder (with its tokenizer)")
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
        return lm_eval_command(flags)

    with offline_environment():
        return run_command(PROG, command, FLAGS)


if __name__ == "__main__":
    sys.exit(main())
