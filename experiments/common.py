"""Shared pieces of the experiments: the growth methods compared, output folders, tables, plots.

Nothing here runs at import. The scripts beside this file (compare.py, smollm2.py) are the entry
points; this module only keeps them short.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
from pathlib import Path

import torch

from opt_deus import GrowthOptions, grow

# The methods compared, by the name used in tables and file names -> GrowthOptions fields. Zero-init
# follows opt_deus.ZERO_INIT_DEFAULT (on for opt and llama-pro, off for avg and solar) except for
# "avg-zero", which isolates what zero-initialisation alone does to plain averaging.
METHODS = {
    "opt-structured": dict(method="opt", align="structured"),
    "opt-paper": dict(method="opt", align="paper"),
    "avg": dict(method="avg"),
    "avg-zero": dict(method="avg", zero_init=True),
    "llama-pro": dict(method="llama-pro"),
    "solar": dict(method="solar"),
}


class ExperimentError(ValueError):
    """A bad request (size, method, path); main() prints it on one line and exits with status 2."""


def parse_list(text: str, what: str, choices=None) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ExperimentError(f"{what}: empty list")
    if choices is not None:
        bad = [x for x in items if x not in choices]
        if bad:
            raise ExperimentError(f"{what}: unknown {bad[0]!r} (choose from {', '.join(choices)})")
    return items


def grow_by_name(model, name: str, num_new: int, position: str):
    """grow() with one of METHODS. SOLAR places its repeated layers itself, so it gets no position."""
    if name not in METHODS:
        raise ExperimentError(f"unknown method {name!r} (choose from {', '.join(METHODS)})")
    options = GrowthOptions(**METHODS[name])
    return grow(model, num_new, position=None if options.method == "solar" else position, options=options)


# ----------------------------------------------------------------------------------------------
# Outputs: everything goes into a hidden temporary folder, renamed into place at the end, so an
# interrupted run never leaves a half-written results folder behind.


@contextlib.contextmanager
def output_folder(out):
    """Yields a temporary folder beside `out`; on success it replaces `out`, on error it is deleted."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # An existing folder is moved aside first and deleted only once the new one is in place.
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path, obj):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "processor": cpu_model(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "argv": sys.argv}


def cpu_model() -> str:
    # lscpu's "Model name", from /proc/cpuinfo where there is one.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ----------------------------------------------------------------------------------------------
# Numbers and tables


def mean_std(values: list[float]) -> tuple[float, float]:
    # Sample standard deviation (n - 1); 0 for a single value.
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(x, digits: int = 4) -> str:
    if x is None:
        return "—"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}f}" if math.isfinite(x) else str(x)


def fmt_pm(values: list[float], digits: int = 2) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def ema(values: list[float], beta: float = 0.9) -> list[float]:
    # Bias-corrected exponential moving average, to read the trend of noisy per-step losses.
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return out


# ----------------------------------------------------------------------------------------------
# Plots (matplotlib is an optional extra: without it the plots are skipped with a note)


def new_figure(ncols: int, width: float = 6.0, height: float = 4.2):
    """A matplotlib Figure with ncols axes, or None if matplotlib is missing. Uses the Figure API
    directly (no pyplot): no global backend or state is touched."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None, None
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def save_figure(fig, path):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
