"""What the studies show a reader (issue 33): one overall progress line per finished arm with the study's elapsed
time and ETA instead of every run's per-step lines; curves.png with each arm's final paired difference as a point
and its interval beside the mean curves; summary tables without empty columns."""

import copy
import io
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from experiments import common, compare  # noqa: E402
from experiments.study_output import (Progress, fmt_duration, progress_line, quiet, study_figure,  # noqa: E402
                                      plot_study)


def test_progress_line_elapsed_and_eta_from_the_work_done():
    assert [fmt_duration(s) for s in (0, 59.6, 151, 3725)] == ["0:00", "1:00", "2:31", "1:02:05"]
    # 3 of 12 done in 151 s: the other 9 at the same rate take 453 s.
    assert progress_line("arm 3/12, seed 1", "", 151, 3, 12) == "[arm 3/12, seed 1] elapsed 2:31, eta 7:33"
    assert progress_line("seed 0", "base step 40", 10, 0, 5) == "[seed 0] base step 40; elapsed 0:10, eta ?"
    assert progress_line("arm 12/12, seed 1", "avg", 600, 12, 12).endswith("elapsed 10:00, all done")


def test_progress_counts_arms_weighs_work_and_replans():
    now, lines = [0.0], []
    progress = Progress(arms=2, work=100, log=lines.append, clock=lambda: now[0])
    now[0] = 10.0
    progress({"label": "seed 0", "work": 20})  # no note: the work counts, nothing is printed
    progress({"label": "seed 0", "work": 20, "replan": -40, "note": "base done"})  # flattened early: 60 planned
    now[0] = 40.0
    progress({"label": "seed 0", "work": 10, "arm": True, "note": "avg-zero: 1.0 -> 0.9"})
    progress({"label": "seed 1", "work": 10, "arm": True, "note": "llama-pro: 1.0 -> 0.8"})
    assert lines == ["[seed 0] base done; elapsed 0:10, eta 0:05",
                     "[arm 1/2, seed 0] avg-zero: 1.0 -> 0.9; elapsed 0:40, eta 0:08",
                     "[arm 2/2, seed 1] llama-pro: 1.0 -> 0.8; elapsed 0:40, all done"]


def test_quiet_log_keeps_stops_and_drops_training_chatter():
    kept = []
    log = quiet(lambda *a: kept.append(" ".join(a)))
    for line in ("training 1,000 parameters (layers [2, 4]) on cpu x 1", "step 2/4 | loss 4.79 | eta 0:00:00",
                 "eval step 2: loss 5.0012 | ppl 148.60", "saved /tmp/x/checkpoint-000002", "resumed from /tmp/x",
                 "SIGINT received: saving a checkpoint at step 3 and stopping", "SIGTERM: step 4 dropped unfinished"):
        log(line)
    assert kept == ["SIGINT received: saving a checkpoint at step 3 and stopping", "SIGTERM: step 4 dropped unfinished"]


@pytest.mark.parametrize("jobs", [1, 2])
def test_study_log_is_one_progress_line_per_arm(jobs):
    # The real entry point, in one process and with two workers (events cross processes): each (seed, arm) ends
    # in one "[arm i/n, seed k]" line, in order, the last "all done"; no training step, evaluation or checkpoint
    # line, no "eta 0:00:00".
    lines = []
    config = compare.preset_config("tiny", methods=("avg-zero", "llama-pro", "solar"), seeds=(0, 1))
    summary = compare.run_compare(config, None, log=lambda *a: lines.append(" ".join(map(str, a))), jobs=jobs)
    log = "\n".join(lines)
    arms = re.findall(r"^\[arm (\d+)/(\d+), seed (\d)\] (\S+)[^:]*: held-out loss", log, re.MULTILINE)
    assert [(int(i), int(n)) for i, n, _, _ in arms] == [(i, 8) for i in range(1, 9)]
    assert sorted((s, a) for _, _, s, a in arms) == sorted((str(s), a) for s in (0, 1) for a in summary["arms"])
    assert re.search(r"^\[arm 8/8, seed \d\] .*elapsed \d+:\d\d, all done$", log, re.MULTILINE)
    assert re.search(r"^\[seed 0\] base step \d+ \(at most 6\): held-out loss .*elapsed \d+:\d\d, eta", log,
                     re.MULTILINE)
    progress = log.split("\nPython ")[0]  # the log before the summary tables
    assert "eta 0:00:00" not in progress
    assert not re.search(r"step \d+/\d+ \||eval step|saved /|resumed from|training [\d,]+ param", progress)
    assert len(progress.strip().splitlines()) <= 2 + 2 * (3 + 3) + 8, log  # data, arms; per base 3 + 3 steps; 8 arms


def _item(job):
    # map_jobs' item, in a worker process: item 0 fails at once when told; the others report, take a moment and
    # leave a mark.
    index, folder, fail = job
    if fail and index == 0:
        raise ValueError("item 0 failed")
    common.report(label=str(index))
    time.sleep(0.5)
    (Path(folder) / str(index)).touch()
    return index


def test_a_failed_item_stops_the_study_items_not_started(tmp_path):
    # Two workers, six items: item 0 fails; the ones already handed to a worker (up to 3) and the rest do not
    # start (before: all five others ran, minutes each in a study, before the error was shown).
    with pytest.raises(ValueError, match="item 0 failed"):
        common.map_jobs(_item, [(i, str(tmp_path), True) for i in range(6)], jobs=2)
    assert {p.name for p in tmp_path.iterdir()} <= {"1"}  # item 1 may have started beside item 0


def test_an_interrupt_in_the_main_process_stops_the_study_items_not_started(tmp_path):
    # Ctrl-C (or SIGTERM, which raises too) while the main process waits: here, raised when the first worker's
    # progress event arrives. The two items running finish; none of the other four starts.
    def interrupted(event):
        raise KeyboardInterrupt

    with common.reporting(interrupted), pytest.raises(KeyboardInterrupt):
        common.map_jobs(_item, [(i, str(tmp_path), False) for i in range(6)], jobs=2)
    assert {p.name for p in tmp_path.iterdir()} <= {"0", "1"}


def empty_columns(markdown: str) -> list[str]:
    tables, table = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            table.append([c.strip() for c in line.strip("|").split("|")])
        elif table:
            tables.append(table)
            table = []
    return [t[0][i] for t in tables for i in range(len(t[0])) if not any(row[i] for row in t[2:])]


def test_summary_has_no_empty_column_and_equal_step_counts_once():
    config = compare.preset_config("tiny", methods=("avg-zero", "llama-pro"), seeds=(0, 1))
    summary = compare.run_compare(config, None, log=lambda *a: None)
    text = compare.summary_markdown(summary)
    assert empty_columns(text) == [] and "Δ vs its zero-init arm" not in text  # no scaled arm ran
    assert "8 steps in all" in text and "8–8" not in text
    other = copy.deepcopy(summary)
    other["seeds"][1]["base"]["steps"] = 9
    assert "8–9 steps in all" in compare.summary_markdown(other)
    assert common.markdown_table(["arm", "empty", "x"], [["a", "", 1], ["b", " ", 2]]) == \
        "| arm | x |\n|---|---|\n| a | 1 |\n| b | 2 |\n"


def synthetic_study(seeds: int = 3):
    # Five arms (any names: new arms just appear), one far off the others' scale; losses seeds x 4 evaluations,
    # up after growth (the warmup) before they fall.
    rng = np.random.default_rng(0)
    offsets = {"avg-zero": 0.0, "llama-pro": -0.004, "lesa": 0.003, "top-k": 0.0005, "solar": 0.2}
    curves = {arm: ([0, 10, 20, 30], 1.0 + off * np.linspace(0, 1, 4) + np.array([0, 0.03, -0.02, -0.05])
                    + rng.normal(0, 0.001, (seeds, 4))) for arm, off in offsets.items()}
    final = {arm: list(c[:, -1]) for arm, (_, c) in curves.items()}
    diffs = {arm: common.paired_difference(final[arm], final["avg-zero"]) for arm in curves if arm != "avg-zero"}
    zero_init = {arm: arm != "solar" for arm in curves}
    return curves, diffs, zero_init


def test_figure_puts_each_arms_final_difference_with_its_interval_beside_the_curves(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import PolyCollection
    curves, diffs, zero_init = synthetic_study()
    fig = study_figure(curves, diffs, "avg-zero", zero_init, "note", "loss (nats/byte)")
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    assert len(fig.axes) == 2
    ax, bx = fig.axes
    # Left: one mean line per arm, no band, the function-preserving ones whole; the legend outside the data.
    assert [line.get_label() for line in ax.get_lines()] == list(curves)
    bottom, top = ax.get_ylim()
    assert all(bottom < line.get_ydata().min() and line.get_ydata().max() < top for line in ax.get_lines()
               if zero_init[line.get_label()])
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]
    legend = ax.get_legend().get_window_extent(renderer)
    assert legend.y1 <= ax.get_window_extent(renderer).y0
    # Right: the arms but the reference, sorted (best on top), zero in the middle, a 95 % interval each.
    labels = [t.get_text() for t in bx.get_yticklabels()]
    assert labels == sorted(diffs, key=lambda a: diffs[a]["mean"], reverse=True)
    assert labels[-1] == "llama-pro" and labels[0] == "solar"
    lo, hi = bx.get_xlim()
    assert lo == -hi and diffs["solar"]["mean"] > hi > abs(diffs["llama-pro"]["lo"])  # solar drawn at the edge
    assert any(list(line.get_xdata()) == [0.0, 0.0] for line in bx.get_lines())
    assert "avg-zero" in bx.get_title() and "95% t-interval" in bx.get_title()
    texts = [t.get_text() for t in bx.texts]
    assert common.fmt_interval(diffs["solar"]) in texts and len(texts) == len(diffs)
    path = tmp_path / "curves.png"
    assert plot_study(path, curves, diffs, "avg-zero", zero_init, "note", "loss", print) == ["curves.png"]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves, _, zero_init = synthetic_study(seeds=1)  # one seed: points without intervals
    one = study_figure(curves, {a: common.paired_difference([d["mean"]], [0.0]) for a, d in diffs.items()},
                       "avg-zero", zero_init, "note", "loss")
    assert "no interval" in one.axes[1].get_title() and not one.axes[1].collections
    one.savefig(io.BytesIO(), format="png")
