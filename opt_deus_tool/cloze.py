"""A local multiple-choice task read and scored with our own model, as lm-eval scores it. The Emma cloze ships
inside this package (opt_deus_tool/tasks/, package data; experiments/cloze/make_cloze.py made it).

lm-evaluation-harness 0.4.13's `multiple_choice` output type (lm_eval/api/task.py, lm_eval/api/model.py,
lm_eval/models/huggingface.py), which opt-deus-lm-eval runs and tests/test_lm_eval.py compares with this file:
- each choice is the request (context, " " + choice): the target delimiter is one space;
- the pair is encoded by tokenizing context + continuation whole and cutting it where the context's own tokens
  end (`_encode_pair`; a context's trailing spaces move to the continuation first);
- the choice's log-likelihood is the float32 sum of log-softmax of its tokens, each given everything before it;
- acc: the argmax of the log-likelihoods is the label; acc_norm: the argmax of log-likelihood / len(choice),
  the choice's length in characters (Python str length, without the delimiter); np.argmax, so a tie goes to
  the first choice.
Nothing here needs lm-eval: the study (experiments/smollm2.py) scores with this, in the worker processes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from opt_deus_core.model import Transformer

TARGET_DELIMITER = " "  # lm-eval's default for multiple_choice tasks, which our task YAML keeps
# Package data beside this module (pyproject.toml's package-data), so an installed copy has it too. A plain path:
# lm-eval and datasets need real files, and pip installs the package unpacked.
DEFAULT_TASK_DIR = Path(__file__).resolve().parent / "tasks"
DEFAULT_TASK_JSONL = DEFAULT_TASK_DIR / "emma_cloze.jsonl"


class TaskFileError(ValueError):
    """A task file that cannot be used (missing, not JSON, a field missing or of the wrong type)."""


def read_questions(path) -> list[dict]:
    """The task's JSONL: one object per line with "context" (text), "choices" (two or more texts) and
    "label" (the index of the right choice). Any other field (id, chapter, ...) is kept."""
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"{path}: no such file")
    questions = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise TaskFileError(f"{path}: not UTF-8 text") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except ValueError:
            raise TaskFileError(f"{path}:{lineno}: not JSON (expected one object per line)") from None
        questions.append(_checked(q, f"{path}:{lineno}"))
    if not questions:
        raise TaskFileError(f"{path}: no questions")
    return questions


def _checked(q, where: str) -> dict:
    if not isinstance(q, dict):
        raise TaskFileError(f"{where}: not a JSON object")
    missing = [k for k in ("context", "choices", "label") if k not in q]
    if missing:
        raise TaskFileError(f"{where}: missing field {', '.join(map(repr, missing))} (each question needs "
                            f"'context', 'choices' and 'label')")
    if not isinstance(q["context"], str) or not q["context"].strip():
        raise TaskFileError(f"{where}: 'context' must be a non-empty string")
    choices = q["choices"]
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c.strip() for c in choices)):
        raise TaskFileError(f"{where}: 'choices' must be a list of two or more non-empty strings")
    label = q["label"]
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise TaskFileError(f"{where}: 'label' must be an integer index into 'choices' (0..{len(choices) - 1}), "
                            f"got {label!r}")
    return q


@dataclass
class EncodedQuestion:
    context: list[int]              # the context's tokens, as lm-eval's _encode_pair cuts them
    continuations: list[list[int]]  # one per choice: the delimiter and the choice
    choice_chars: list[int]         # len(choice): acc_norm's denominator
    label: int


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list, list]:
    # lm-eval's _encode_pair for a causal model: trailing spaces of the context belong to the continuation,
    # then the whole text is tokenized once and cut after the context's own token count.
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole, context_ids = encode(context + continuation), encode(context)
    return context_ids, whole[len(context_ids):]


def encode_questions(encode: Callable[[str], list[int]], questions: list[dict]) -> list[EncodedQuestion]:
    """encode: text -> token ids as the model's Hugging Face tokenizer gives them by default (with the
    special tokens its post-processor adds: what lm-eval's HF model class feeds the model)."""
    out = []
    for q in questions:
        pairs = [encode_pair(encode, q["context"], TARGET_DELIMITER + c) for c in q["choices"]]
        if any(not cont for _, cont in pairs):
            raise TaskFileError(f"question {q.get('id', len(out))}: a choice encodes to no tokens")
        out.append(EncodedQuestion(pairs[0][0], [cont for _, cont in pairs], [len(c) for c in q["choices"]],
                                   q["label"]))
    return out


def tokenizer_encoder(model_dir) -> Callable[[str], list[int]]:
    # The folder's tokenizer.json with its post-processor (add_special_tokens=True, transformers' default),
    # unlike opt_deus_tool.data.HFTokenizer, which encodes training text without special tokens.
    from tokenizers import Tokenizer  # optional dependency (the `tokenizers` extra)
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise TaskFileError(f"{path}: missing; scoring the task needs the model's tokenizer")
    tokenizer = Tokenizer.from_file(str(path))
    return lambda text: tokenizer.encode(text).ids


def choice_loglikelihoods(model: Transformer, question: EncodedQuestion) -> list[float]:
    """The log-likelihood of each choice given the context: one forward pass over the choices as a batch
    (right-padded: under a causal mask padding after a sequence changes none of its logits)."""
    inputs = [(question.context + cont)[:-1] for cont in question.continuations]
    limit = model.args.max_position_embeddings
    if max(map(len, inputs)) > limit:
        raise TaskFileError(f"a question of {max(map(len, inputs))} tokens is longer than the model's "
                            f"max_position_embeddings {limit}")
    length = max(map(len, inputs))
    device = model.embed_tokens.weight.device
    batch = torch.zeros(len(inputs), length, dtype=torch.long, device=device)
    for i, ids in enumerate(inputs):
        batch[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    with torch.no_grad():
        logits = model(batch).float()  # (choices, length, vocab)
    out = []
    for i, cont in enumerate(question.continuations):
        # The continuation's tokens are predicted at the input's last len(cont) positions.
        end = len(inputs[i])
        logp = F.log_softmax(logits[i, end - len(cont):end], dim=-1)  # (len(cont), vocab)
        target = torch.tensor(cont, dtype=torch.long, device=device)
        out.append(float(logp.gather(1, target[:, None]).sum()))
    return out


def multiple_choice_metrics(loglikelihoods: list[float], choice_chars: list[int], label: int) -> dict:
    # lm-eval's process_results for multiple_choice: acc and acc_norm of one question (1.0 or 0.0).
    lls = np.asarray(loglikelihoods, dtype=np.float64)
    return {"acc": float(np.argmax(lls) == label),
            "acc_norm": float(np.argmax(lls / np.asarray(choice_chars, dtype=np.float64)) == label)}


def score_questions(model: Transformer, questions: list[EncodedQuestion], log: Callable | None = None) -> dict:
    """Per question: the choices' log-likelihoods, acc and acc_norm; their means; the seconds it took."""
    was_training = model.training
    model.eval()
    t0, last_log = time.perf_counter(), time.perf_counter()
    lls, acc, acc_norm = [], [], []
    try:
        for i, q in enumerate(questions):
            scores = choice_loglikelihoods(model, q)
            metrics = multiple_choice_metrics(scores, q.choice_chars, q.label)
            lls.append(scores)
            acc.append(metrics["acc"])
            acc_norm.append(metrics["acc_norm"])
            if log is not None and time.perf_counter() - last_log > 10:
                log(f"cloze: {i + 1}/{len(questions)} questions, {time.perf_counter() - t0:.0f}s")
                last_log = time.perf_counter()
    finally:
        model.train(was_training)
    return {"questions": len(questions), "acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm)),
            "per_question": {"acc": acc, "acc_norm": acc_norm, "loglikelihoods": lls},
            "seconds": time.perf_counter() - t0}
