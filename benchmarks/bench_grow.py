"""Time and peak memory of streaming growth (the opt-deus command line), one child process per run.

CPU (the issue's target): SmolLM2-135M, 30 -> 45 layers (a new layer in every gap of the top half),
`opt` with both alignments, in under 3 minutes with peak RSS under 1.5x the base's float32 size:
    python benchmarks/bench_grow.py --base ~/.cache/opt-deus/smollm2-135m-instruct-hf --new-layers 15
GPU: a random Llama-3.1-8B-shaped bf16 checkpoint, 32 -> 48 layers, under 2 minutes, host RSS < 4 GB:
    python benchmarks/bench_grow.py --make-random llama-8b --new-layers 16 --device cuda
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from opt_deus_core.model import ModelArgs
from opt_deus_tool.checkpoint import CheckpointWriter, expected_shapes
from opt_deus_tool.hardware import cpu_model
from opt_deus_tool.hf_config import args_from_config, config_from_args

ROOT = Path(__file__).resolve().parents[1]

PRESETS = {
    "llama-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                     max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tiny": dict(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
    # benchmarks/gpu.py --tiny (CI): a second or two of growth.
    "micro": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
}


def make_random_checkpoint(preset: str, path: Path, dtype=torch.bfloat16, device="cpu"):
    # Streams random N(0, 0.02^2) weights (ones for norms) straight to disk: no model in memory.
    # device="cuda" draws them on the GPU (8B normals take ~a minute on a CPU, a second there).
    args = ModelArgs(**PRESETS[preset], dtype=str(dtype).removeprefix("torch."))
    generator = torch.Generator(device=device).manual_seed(0)
    with CheckpointWriter(path, overwrite=True) as writer:
        for key, shape in expected_shapes(args).items():
            if key.endswith("norm.weight"):
                tensor = torch.ones(shape)
            else:
                tensor = (torch.randn(shape, generator=generator, device=device) * 0.02).to(dtype).cpu()
            writer.add(key, tensor.to(dtype))
        writer.finish(config_from_args(args))
    return path


def checkpoint_bytes_float32(path: Path) -> int:
    config = json.loads((path / "config.json").read_text())
    args = args_from_config(config)
    return sum(4 * torch.Size(s).numel() for s in expected_shapes(args).values())


def run_growth(base: Path, out: Path, extra: list[str], threads: int | None = None) -> dict:
    command = [sys.executable, "-m", "opt_deus_tool.grow_cli", "--base", str(base), "--out", str(out), "--overwrite",
               *extra]
    # On a small shared CPU, OpenMP threads spinning against other processes can slow a solve
    # 100-fold; --threads 1 gives numbers that do not depend on what else the machine runs.
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    output = process.stdout.read()
    # wait4 reaps this child alone and gives its own peak resident memory (KiB on Linux).
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    return {"command": " ".join(command[1:]), "returncode": os.waitstatus_to_exitcode(status),
            "seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024,
            "output_tail": output.strip().splitlines()[-3:]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", type=Path, default=None, help="a Hugging Face LLaMA folder to grow")
    p.add_argument("--make-random", choices=sorted(PRESETS), default=None,
                   help="grow a random checkpoint of this shape instead of --base (written to --workdir)")
    p.add_argument("--new-layers", type=int, default=15)
    p.add_argument("--aligns", default="structured,paper", help="comma list of opt alignments to run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS for the growth process (default: torch's)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--extra", default="", help="more opt-deus flags for every run, e.g. '--cost activations "
                                               "--calibration novel.txt' (issue 21: its extra time and memory)")
    flags = p.parse_args()

    workdir = flags.workdir or Path(tempfile.mkdtemp(prefix="bench-grow-"))
    base = flags.base
    if flags.make_random:
        start = time.perf_counter()
        base = make_random_checkpoint(flags.make_random, workdir / f"random-{flags.make_random}")
        print(f"made random {flags.make_random} checkpoint in {time.perf_counter() - start:.1f}s", flush=True)
    if base is None:
        p.error("give --base or --make-random")

    results = {"hardware": {"cpu": cpu_model(), "cores": os.cpu_count(),
                            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                            "torch": torch.__version__, "threads": flags.threads},
               "base": str(base), "base_float32_bytes": checkpoint_bytes_float32(base), "runs": []}
    for align in flags.aligns.split(","):
        run = run_growth(base, workdir / f"grown-{align}", ["--method", "opt", "--align", align,
                                                            "--new-layers", str(flags.new_layers),
                                                            "--device", flags.device, *flags.extra.split()],
                          flags.threads)
        run["align"] = align
        results["runs"].append(run)
        print(json.dumps(run), flush=True)

    base_mb = results["base_float32_bytes"] / 2**20
    print(f"\nbase float32 size {base_mb:.0f} MiB ({results['hardware']})")
    print(f"{'alignment':<12}{'seconds':>10}{'peak RSS MiB':>14}{'RSS / base':>12}  exit")
    for run in results["runs"]:
        rss_mb = run["peak_rss_bytes"] / 2**20
        print(f"{run['align']:<12}{run['seconds']:10.1f}{rss_mb:14.0f}{rss_mb / base_mb:12.2f}  {run['returncode']}")
    if flags.json:
        flags.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
