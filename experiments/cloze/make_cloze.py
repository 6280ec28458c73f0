"""Builds the local downstream task: a four-way multiple-choice cloze from a public-domain novel.

    python experiments/cloze/make_cloze.py      # ../shared/data/austen/emma.txt.gz -> runs/cloze/emma_cloze.jsonl
    python experiments/cloze/make_cloze.py --novel emma.txt.gz --questions 500 --seed 0 --out-dir my_task/

The task opt-deus-lm-eval runs by default ships inside the package, in opt_deus_tool/tasks/ (made by this script
with its defaults); this script writes elsewhere unless --out-dir names that folder, and replaces a task's files
only with --overwrite, so a trial run cannot replace it. No output may be the --novel. Errors follow the commands'
contract (docs/CLI.md): one line on stderr, exit code 2, nothing written; the three files are renamed into place
together.

Each question is a passage of --passage-sentences consecutive sentences of one paragraph; the answer is the
sentence that follows it in that paragraph, and the three distractors are sentences from other chapters of the
same novel with the answer's shape (the same opening and closing quotation marks, an unclosed quotation where
the answer has one) and about its length in words, so neither length nor punctuation gives the answer away. The
choices are shuffled; chance is 25 %. Questions are written in a random order (seeded), so the first N of the
file are a uniform sample of it.

The output is deterministic: the same novel and flags give the same bytes (random.Random(seed) only; the sha256
of the novel's text, of the JSONL and every flag are recorded in <task>.meta.json).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from opt_deus_tool.atomic import TERMINATING_SIGNALS, scratch_path  # noqa: E402
from opt_deus_tool.cli import (HelpFormatter, OneLineArgumentParser, any_int, finite_float,  # noqa: E402
                               positive_int, run_command)
from opt_deus_tool.inputs import not_a_file  # noqa: E402

PROG = "make_cloze.py"
DEFAULT_NOVEL = ROOT.parent / "shared" / "data" / "austen" / "emma.txt.gz"
# A task name is a file name and an lm-eval task name: no path separators, spaces or YAML syntax (`x: y`).
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")

HEADING = re.compile(r"^(VOLUME|CHAPTER) [IVXLC]+$")
# A sentence ends at . ! or ? (then any closing quote, underscore or bracket) before whitespace and the
# capital letter (maybe after an opening quote) that starts the next one ...
BOUNDARY = re.compile(r"(?<=[.!?])([\"'_)]*)\s+(?=[\"'_(]*[A-Z])")
# ... except after a title or an initial: "Mr. Knightley", "F. C. Weston".
NOT_AN_END = re.compile(r"(?:\b(?:Mr|Mrs|Dr|St|Messrs)|\b[A-Z])\.$")


@dataclass
class Sentence:
    text: str
    chapter: int
    paragraph: int
    index: int  # position in the book, counting every sentence

    @property
    def words(self) -> int:
        return len(self.text.split())

    @property
    def shape(self) -> tuple[bool, bool, int]:
        # Opens with a quote, closes with one, and whether its quotes pair up: a distractor with the
        # answer's shape cannot be ruled out by its punctuation alone.
        return self.text.startswith('"'), self.text.endswith('"'), self.text.count('"') % 2


class ClozeError(ValueError):
    """A bad request: main() prints it on one line and exits with status 2."""


def read_novel(path: Path) -> str:
    # UTF-8 text, gzipped or not (told by its first bytes, not its name), newlines as text mode reads them.
    if (problem := not_a_file(path)) is not None:
        raise ClozeError(f"--novel {path}: {problem if problem == 'no such file' else 'is ' + problem}")
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        with (gzip.open if gzipped else open)(path, "rb") as f:
            text = f.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ClozeError(f"--novel {path}: not UTF-8 text (byte {e.start}); a binary file, or another encoding "
                         f"such as Latin-1 (convert it: iconv -f latin1 -t utf-8)") from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile, a truncated .gz
        raise ClozeError(f"--novel {path}: cannot read ({e}; a truncated or damaged gzip file?)") from None
    if "\x00" in text:
        raise ClozeError(f"--novel {path}: holds NUL bytes: a binary file, not the text of a novel")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def split_sentences(paragraph: str) -> list[str]:
    # BOUNDARY cuts after the closing marks (group 1 keeps them with the sentence before).
    pieces, start = [], 0
    for m in BOUNDARY.finditer(paragraph):
        end = m.start() + len(m.group(1))
        if NOT_AN_END.search(paragraph[start:m.start()]):
            continue
        pieces.append(paragraph[start:end])
        start = m.end()
    pieces.append(paragraph[start:])
    return [p.strip() for p in pieces if p.strip()]


def paragraphs_of(text: str) -> list[tuple[int, list[str]]]:
    """(chapter number, sentences) per paragraph; line breaks inside a paragraph become spaces. Text before the
    first chapter heading (title, author) and the headings themselves are dropped."""
    out, chapter = [], 0
    for block in re.split(r"\n\s*\n", text):
        joined = " ".join(block.split())
        if not joined:
            continue
        if HEADING.match(joined):
            chapter += joined.startswith("CHAPTER")
            continue
        if chapter == 0 or joined == "FINIS":
            continue
        out.append((chapter, split_sentences(joined)))
    return out


def sentences_of(text: str) -> list[list[Sentence]]:
    # Per paragraph, the sentences with their place in the book.
    out, index = [], 0
    for p, (chapter, texts) in enumerate(paragraphs_of(text)):
        row = []
        for t in texts:
            row.append(Sentence(t, chapter, p, index))
            index += 1
        out.append(row)
    return out


def make_questions(paragraphs: list[list[Sentence]], n_questions: int, passage_sentences: int, min_words: int,
                   max_words: int, max_passage_words: int, length_tolerance: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    every = [s for row in paragraphs for s in row]
    candidates = [s for s in every if min_words <= s.words <= max_words * (1 + length_tolerance)]
    # Windows: passage_sentences sentences of one paragraph and the one after them, short enough to score fast.
    windows = [row[i:i + passage_sentences + 1] for row in paragraphs
               for i in range(len(row) - passage_sentences)]
    windows = [w for w in windows if min_words <= w[-1].words <= max_words
               and sum(s.words for s in w[:-1]) <= max_passage_words]
    rng.shuffle(windows)
    used, questions = set(), []
    for window in windows:
        if len(questions) == n_questions:
            break
        if any(s.index in used for s in window):  # questions never share a sentence
            continue
        answer = window[-1]
        low, high = answer.words * (1 - length_tolerance), answer.words * (1 + length_tolerance)
        pool = [s for s in candidates if s.chapter != answer.chapter and s.shape == answer.shape
                and low <= s.words <= high and s.text != answer.text]
        distinct = list(dict.fromkeys(s.text for s in pool))
        if len(distinct) < 3:
            continue
        distractors = rng.sample(distinct, 3)
        choices = [answer.text, *distractors]
        rng.shuffle(choices)
        used.update(s.index for s in window)
        questions.append({"id": f"q{len(questions):04d}", "context": " ".join(s.text for s in window[:-1]),
                          "choices": choices, "label": choices.index(answer.text), "chapter": answer.chapter,
                          "sentence": answer.index})
    if len(questions) < n_questions:
        raise ClozeError(f"only {len(questions)} questions fit the constraints (asked for --questions "
                         f"{n_questions}); ask for fewer, or relax --max-passage-words or --length-tolerance")
    return questions


TASK_YAML = """\
# lm-evaluation-harness {lm_eval} task: a four-way cloze from {novel} (public domain), {n} questions, chance 25 %;
# made by experiments/cloze/make_cloze.py. From any directory: opt-deus-lm-eval --model DIR --task THIS_YAML (it
# reads data_files relative to this file; emma_cloze in opt_deus_tool/tasks/ is its default task). Plain lm_eval
# hands data_files to datasets.load_dataset as written, which resolves a relative path against the working
# directory, not this file; so run it from this file's folder:
#   lm_eval --model hf --model_args pretrained=/abs/DIR --include_path . --tasks {task}
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {jsonl}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def tolerance(text: str) -> float:
    value = finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def task_name(text: str) -> str:
    if not TASK_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a task name: letters, digits, '_', '-' and '.', "
                                         f"starting with a letter or digit (it names files and the lm-eval task)")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog=PROG, formatter_class=HelpFormatter,
                              description="Write a multiple-choice cloze task (JSONL + lm-eval YAML) from a novel.",
                              epilog="Exit code 2: a bad request (one line on stderr, nothing written).")
    p.add_argument("--novel", default=str(DEFAULT_NOVEL), help="the novel as UTF-8 text (gzipped ok)")
    p.add_argument("--task", type=task_name, default="emma_cloze",
                   help="the task's name: <task>.jsonl, <task>.yaml and <task>.meta.json")
    p.add_argument("--out-dir", default="runs/cloze",
                   help="where the JSONL, YAML and meta JSON go, from the working directory (the shipped task: "
                        "opt_deus_tool/tasks, with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace the task's files where they exist already")
    p.add_argument("--questions", type=positive_int, default=800, help="questions to write")
    p.add_argument("--passage-sentences", type=positive_int, default=2, help="sentences of context before the answer")
    p.add_argument("--min-words", type=positive_int, default=8, help="shortest answer, in words")
    p.add_argument("--max-words", type=positive_int, default=25, help="longest answer, in words")
    p.add_argument("--max-passage-words", type=positive_int, default=60, help="longest passage, in words")
    p.add_argument("--length-tolerance", type=tolerance, default=0.2,
                   help="a distractor's length in words is within this fraction of the answer's")
    p.add_argument("--seed", type=any_int, default=0, help="seeds random.Random: which questions, choice order")
    return p


def yaml_scalar(text: str) -> str:
    # The name as written where YAML reads it back as that string, else quoted ("true", "1e3", "null").
    import yaml
    return text if yaml.safe_load(f"k: {text}") == {"k": text} else json.dumps(text)


def output_paths(flags) -> dict[str, Path]:
    # The three outputs, refused before any work where they would destroy something: an input (the novel, by
    # any path or hard link), an earlier task without --overwrite (the shipped one included), a non-file.
    out, novel = Path(flags.out_dir), Path(flags.novel)
    if out.exists() and not out.is_dir():
        raise ClozeError(f"--out-dir {out}: is a file, not a folder; choose a folder")
    paths = {kind: out / f"{flags.task}.{kind}" for kind in ("jsonl", "yaml", "meta.json")}
    for path in paths.values():
        if path.resolve() == novel.resolve() or (path.exists() and novel.exists() and os.path.samefile(path, novel)):
            raise ClozeError(f"--out-dir {out} --task {flags.task}: would write {path}, the input --novel "
                             f"{flags.novel}; choose another --task or --out-dir")
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise ClozeError(f"--out-dir {out}: {path} exists and is not a regular file; choose another --out-dir")
        if path.exists() and not flags.overwrite:
            raise ClozeError(f"--out-dir {out}: {path} exists already (a task made earlier); pass --overwrite to "
                             f"replace it, or choose another --out-dir or --task")
    return paths


def write_outputs(files: dict[Path, str]):
    # Each file written beside its target under a scratch name, then all renamed in one go with the terminating
    # signals held back: the three files are replaced together or not at all.
    scratch = {path: scratch_path(path) for path in files}
    try:
        for path, text in files.items():
            scratch[path].write_text(text, encoding="utf-8")
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, *TERMINATING_SIGNALS})
        try:
            for path in files:
                os.replace(scratch[path], path)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    finally:
        for tmp in scratch.values():
            tmp.unlink(missing_ok=True)


def make_cloze(flags) -> int:
    if flags.min_words > flags.max_words:
        raise ClozeError(f"--min-words {flags.min_words} is above --max-words {flags.max_words}")
    paths = output_paths(flags)
    novel = Path(flags.novel)
    text = read_novel(novel)
    paragraphs = sentences_of(text)
    if not paragraphs:
        raise ClozeError(f"--novel {novel}: no chapters found (the text is read from its first 'CHAPTER I' "
                         f"heading on, as in Project Gutenberg's texts)")
    questions = make_questions(paragraphs, flags.questions, flags.passage_sentences, flags.min_words,
                               flags.max_words, flags.max_passage_words, flags.length_tolerance, flags.seed)
    jsonl = "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions)
    name = novel.name.split(".")[0]
    task_yaml = TASK_YAML.format(lm_eval="0.4.13", novel=name, n=len(questions), task=yaml_scalar(flags.task),
                                 jsonl=yaml_scalar(paths["jsonl"].name))
    meta = {"novel": name, "novel_text_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "jsonl_sha256": hashlib.sha256(jsonl.encode()).hexdigest(), "questions": len(questions),
            "flags": {k: v for k, v in vars(flags).items() if k not in ("novel", "out_dir", "overwrite")}}
    paths["jsonl"].parent.mkdir(parents=True, exist_ok=True)
    write_outputs({paths["jsonl"]: jsonl, paths["yaml"]: task_yaml, paths["meta.json"]: json.dumps(meta, indent=2)
                   + "\n"})
    print(f"wrote {paths['jsonl']} ({len(questions)} questions) and {flags.task}.yaml, {flags.task}.meta.json")
    return 0


def main(argv=None) -> int:
    flags = build_parser().parse_args(sys.argv[1:] if argv is None else [str(a) for a in argv])
    return run_command(PROG, lambda: make_cloze(flags), {})


if __name__ == "__main__":
    sys.exit(main())
