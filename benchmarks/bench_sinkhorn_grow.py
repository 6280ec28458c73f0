"""SmolLM2 30 -> 45 growth time with this sinkhorn.py and an older one, alternating, in one run.

    git show dd3185f:sinkhorn.py > /tmp/sinkhorn_before.py   # the solver before issue 14
    python benchmarks/bench_sinkhorn_grow.py --before /tmp/sinkhorn_before.py

Each run is the `opt-deus` command line in a child process (`--method opt --align A --new-layers 15
--position top`, one thread). The child loads the older solver as `opt_deus_core.sinkhorn` before
the tool imports it; anything else sinkhorn.py now exports that the older file lacks is taken from
today's file.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from opt_deus_tool.hardware import cpu_model  # noqa: E402


def before_dir(path: Path) -> Path:
    # A folder whose sinkhorn.py is the older file, plus whatever it lacks from today's.
    folder = Path(tempfile.mkdtemp(prefix="sinkhorn-before-"))
    shutil.copy(ROOT / "sinkhorn.py", folder / "_sinkhorn_now.py")
    (folder / "sinkhorn.py").write_text(path.read_text() + "\n\nimport _sinkhorn_now  # noqa: E402\n"
                                        "for _name in dir(_sinkhorn_now):\n"
                                        "    globals().setdefault(_name, getattr(_sinkhorn_now, _name))\n")
    return folder


def grow(base: Path, out: Path, align: str, solver_dir: Path | None) -> float:
    argv = ["opt-deus", "--base", str(base), "--out", str(out), "--overwrite", "--method", "opt", "--align", align,
            "--new-layers", "15", "--position", "top"]
    prelude = "" if solver_dir is None else (  # the package's sinkhorn module is the older file
        f"sys.path.insert(0, {str(solver_dir)!r}); import importlib.util, opt_deus_core; "
        f"spec = importlib.util.spec_from_file_location('opt_deus_core.sinkhorn', "
        f"{str(solver_dir / 'sinkhorn.py')!r}); "
        "sys.modules[spec.name] = module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); ")
    code = (f"import sys, runpy; {prelude}sys.argv = {argv!r}; "
            f"runpy.run_module('opt_deus_tool.grow_cli', run_name='__main__')")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"growth failed ({align}, {'before' if solver_dir else 'now'}): {done.stderr[-500:]}")
    return seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--before", type=Path, required=True, help="an older sinkhorn.py")
    p.add_argument("--base", type=Path, required=True,
                   help="HF folder, e.g. the SmolLM2 the tests convert into ~/.cache/opt-deus/")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    flags = p.parse_args()
    folder = before_dir(flags.before)
    work = Path(tempfile.mkdtemp(prefix="bench-grow-sinkhorn-"))
    rows = []
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores, 1 thread per growth", flush=True)
    for repeat in range(flags.repeats):
        for align in ("structured", "paper"):
            for name, solver in (("before", folder), ("now", None)):
                load = os.getloadavg()[0]
                seconds = grow(flags.base, work / f"{align}-{name}", align, solver)
                rows.append({"align": align, "solver": name, "seconds": seconds, "load": load, "repeat": repeat})
                print(f"{align:11s} {name:7s} {seconds:7.1f} s  (load average {load:.1f})", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    if flags.json:
        flags.json.write_text(json.dumps({"cpu": cpu_model(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
