"""What the studies (compare.py, smollm2.py) show while and after they run: one overall progress line per finished
arm instead of every run's per-step lines, and the figure of curves.png. Nothing here runs at import."""

from __future__ import annotations

import math
import re
import statistics
import time
from pathlib import Path

from experiments.common import BASELINES, fmt_interval, save_figure

# What train() says that a study still shows: a stop (Ctrl-C, SIGTERM) or a warning. Its per-step lines,
# evaluations, checkpoints and estimates repeat for every arm and seed; the study's progress lines replace them
# (every step stays in the run's metrics file).
_KEEP = re.compile(r"SIG[A-Z]+|stop|interrupt|warning", re.IGNORECASE)


def quiet(log):
    """The log to give train_run() inside a study."""
    return lambda *a: log(*a) if _KEEP.search(" ".join(map(str, a))) else None


def fmt_duration(seconds: float) -> str:
    s = max(0, round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def eta_seconds(elapsed: float, done: float, total: float) -> float | None:
    # The rest of the work at the rate of the work done so far; None before any is done.
    return None if done <= 0 else elapsed * max(0.0, total - done) / done


def progress_line(head: str, note: str, elapsed: float, done: float, total: float) -> str:
    eta = eta_seconds(elapsed, done, total)
    left = "all done" if done >= total else f"eta {'?' if eta is None else fmt_duration(eta)}"
    return f"[{head}] {note + '; ' if note else ''}elapsed {fmt_duration(elapsed)}, {left}"


class Progress:
    """The study's overall progress, kept in its main process; events come from common.report(), in this
    process or a worker. Work is counted in training steps (a base's and an arm's cost about the same), so
    the ETA holds while the bases train; a base that flattens early replans the total. An event with
    arm=True counts one arm (of one seed); an event without a note updates the work silently."""

    def __init__(self, arms: int, work: float, log, clock=time.monotonic):
        self.arms, self.total, self.log, self.clock = arms, float(work), log, clock
        self.arms_done, self.done, self.start = 0, 0.0, clock()

    def __call__(self, event: dict):
        self.done += event.get("work", 0)
        self.total += event.get("replan", 0)
        head = event["label"]
        if event.get("arm"):
            self.arms_done += 1
            head = f"arm {self.arms_done}/{self.arms}, {head}"
        elif event.get("note") is None:
            return
        self.log(progress_line(head, event.get("note") or "", self.clock() - self.start, self.done, self.total))


def figure_reference(arms) -> str:
    # The arm every other is compared with in the figure: the first baseline that ran, else the first arm.
    return next((b for b in BASELINES if b in arms), list(arms)[0])


def interval_limit(diffs: dict) -> float:
    # The x range (-limit, limit) that shows most arms whole: an arm reaching beyond 8 x the median arm's extent
    # (SOLAR at +0.18 beside zero-init arms within 0.02; two seeds' t-intervals, 12.7 standard errors wide) is cut
    # at the edge, its numbers written beside it anyway.
    extent = [max(abs(d["mean"]), abs(d["lo"] or 0.0), abs(d["hi"] or 0.0)) for d in diffs.values()]
    median = statistics.median(extent) if extent else 0.0
    return 1.15 * max([e for e in extent if median == 0 or e <= 8 * median], default=0.0) or 1e-4


def study_figure(curves: dict, diffs: dict, reference: str, zero_init: dict, note: str, ylabel: str):
    """curves: {arm: (steps, seeds x steps held-out losses)}; diffs: {arm: common.paired_difference of its final
    loss minus the reference's}, every arm but the reference. Left: each arm's mean curve; right: each arm's final
    difference with its 95 % interval, sorted. Returns a matplotlib Figure, or None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    import numpy as np
    arms = list(curves)
    n_seeds = len(next(iter(curves.values()))[1])
    fig = Figure(figsize=(13, max(4.2, 0.32 * len(arms) + 2.2)), layout="constrained")
    ax, bx = fig.subplots(1, 2, width_ratios=(1.25, 1))
    color = {arm: f"C{i % 10}" for i, arm in enumerate(arms)}  # one colour per arm in both panels
    means = {arm: np.asarray(c, dtype=float).mean(axis=0) for arm, (_, c) in curves.items()}
    for i, arm in enumerate(arms):
        style = dict(color="black", linestyle="--", linewidth=2.0) if arm == reference else \
            dict(color=color[arm], linestyle="-" if i < 10 else ":", linewidth=1.4)
        ax.plot(curves[arm][0], means[arm], label=arm, **style)
    # Zoom on the zero-init arms' curves, whole: the arms that do not preserve the function start far above.
    preserving = [m for arm, m in means.items() if zero_init.get(arm)]
    if preserving:
        lo = min(float(m.min()) for m in means.values())
        hi = max(lo, max(float(m.max()) for m in preserving))
        ax.set_ylim(lo - 0.05 * (hi - lo) - 1e-6, hi + 0.05 * (hi - lo) + 1e-6)
    ax.set(title=f"held-out loss (mean over {n_seeds} seeds)", xlabel="step after growth", ylabel=ylabel)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)

    order = sorted(diffs, key=lambda a: diffs[a]["mean"], reverse=True)  # the best (most negative) on top
    limit = interval_limit(diffs)
    for y, arm in enumerate(order):
        d = diffs[arm]
        excludes_zero = d["lo"] is not None and (d["lo"] > 0 or d["hi"] < 0)
        if abs(d["mean"]) > limit:  # off the scale: an arrowhead at the edge, pointing where it is
            bx.plot(math.copysign(0.97 * limit, d["mean"]), y, marker=">" if d["mean"] > 0 else "<", markersize=9,
                    color=color[arm])
        else:  # an interval running off the scale is cut at the edge
            if d["lo"] is not None:
                bx.errorbar(d["mean"], y, xerr=[[d["mean"] - d["lo"]], [d["hi"] - d["mean"]]], fmt="none",
                            ecolor=color[arm], elinewidth=2, capsize=4)
            bx.plot(d["mean"], y, "o", markersize=7, color=color[arm],
                    markerfacecolor=color[arm] if excludes_zero else "white")
        bx.text(1.02, y, fmt_interval(d), transform=bx.get_yaxis_transform(), va="center", fontsize=8,
                fontweight="bold" if excludes_zero else "normal")
    bx.axvline(0.0, color="black", linewidth=1)
    bx.set_yticks(range(len(order)), order)
    bx.set_xlim(-limit, limit)
    bx.locator_params(axis="x", nbins=5)  # room for the ticks' labels
    bx.set_ylim(-0.7, len(order) - 0.3)
    interval = "95% t-interval; filled: excludes 0" if n_seeds > 1 else "one seed: no interval"
    bx.set(title=f"final loss minus {reference}'s, paired by seed\n(mean, {interval})",
           xlabel=f"Δ {ylabel}; negative: better than {reference}")
    for a in (ax, bx):
        a.grid(alpha=0.3)
    fig.suptitle(note, fontsize=9)
    return fig


def plot_study(path, curves: dict, diffs: dict, reference: str, zero_init: dict, note: str, ylabel: str,
               log) -> list[str]:
    """Writes study_figure() to `path`; returns [its file name], or [] (with a note) without matplotlib."""
    fig = study_figure(curves, diffs, reference, zero_init, note, ylabel)
    if fig is None:
        log(f"matplotlib is not installed: skipping {Path(path).name} (pip install matplotlib, or the `plots` extra)")
        return []
    save_figure(fig, path)
    return [Path(path).name]
