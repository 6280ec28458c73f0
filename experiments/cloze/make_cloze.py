"""Builds the local downstream task: a four-way multiple-choice cloze from a public-domain novel.

    python experiments/cloze/make_cloze.py      # ../shared/data/austen/emma.txt.gz -> runs/cloze/emma_cloze.jsonl
    python experiments/cloze/make_cloze.py --novel emma.txt.gz --questions 500 --seed 0 --out-dir my_task/

The task opt-deus-lm-eval runs by default ships inside the package, in opt_deus_tool/tasks/ (made by this script
with its defaults); this script writes elsewhere unless --out-dir names that folder, so a trial run cannot replace
it.

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
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_NOVEL = ROOT.parent / "shared" / "data" / "austen" / "emma.txt.gz"

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


def read_novel(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()


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
        raise SystemExit(f"make_cloze.py: error: only {len(questions)} questions fit the constraints "
                         f"(asked for {n_questions}); relax --max-passage-words or --length-tolerance")
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write a multiple-choice cloze task (JSONL + lm-eval YAML) from a novel.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--novel", default=str(DEFAULT_NOVEL), help="the novel as UTF-8 text (.gz ok)")
    p.add_argument("--task", default="emma_cloze", help="the task's name: <task>.jsonl and <task>.yaml")
    p.add_argument("--out-dir", default="runs/cloze",
                   help="where the JSONL, YAML and meta JSON go (the shipped task: opt_deus_tool/tasks)")
    p.add_argument("--questions", type=int, default=800)
    p.add_argument("--passage-sentences", type=int, default=2, help="sentences of context before the answer")
    p.add_argument("--min-words", type=int, default=8, help="shortest answer, in words")
    p.add_argument("--max-words", type=int, default=25, help="longest answer, in words")
    p.add_argument("--max-passage-words", type=int, default=60, help="longest passage, in words")
    p.add_argument("--length-tolerance", type=float, default=0.2,
                   help="a distractor's length in words is within this fraction of the answer's")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> int:
    flags = build_parser().parse_args(argv)
    novel = Path(flags.novel)
    if not novel.is_file():
        print(f"make_cloze.py: error: --novel {novel}: no such file", file=sys.stderr)
        return 2
    text = read_novel(novel)
    questions = make_questions(sentences_of(text), flags.questions, flags.passage_sentences, flags.min_words,
                               flags.max_words, flags.max_passage_words, flags.length_tolerance, flags.seed)
    out = Path(flags.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / f"{flags.task}.jsonl"
    jsonl.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions), encoding="utf-8")
    name = novel.name.split(".")[0]
    (out / f"{flags.task}.yaml").write_text(TASK_YAML.format(lm_eval="0.4.13", novel=name, n=len(questions),
                                                             task=flags.task, jsonl=jsonl.name))
    meta = {"novel": name, "novel_text_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "jsonl_sha256": hashlib.sha256(jsonl.read_bytes()).hexdigest(), "questions": len(questions),
            "flags": {k: v for k, v in vars(flags).items() if k not in ("novel", "out_dir")}}
    (out / f"{flags.task}.meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {jsonl} ({len(questions)} questions) and {flags.task}.yaml, {flags.task}.meta.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
