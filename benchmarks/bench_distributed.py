"""train.py under torchrun (FSDP2): step time, tokens/s and peak memory at 1 and N processes.

Each measurement is a real launch: the plain single-process path (`python`, no process group) and
`python -m torch.distributed.run --nproc_per_node N` running this file's worker, which calls
train.train() on a random model with the new layers trainable. The global batch is the same at every
N; runs alternate (plain, N, plain, N, ...) so a changing machine load hits both alike. The worker
reports train's mean step time (warm-up steps left out) and the peak GPU memory of each rank.

    python benchmarks/bench_distributed.py --preset tiny --device cpu --nprocs 2     # CPU, gloo
    python benchmarks/bench_distributed.py --nprocs 1,2,8                            # grown Llama-3.2-1B, GPUs
    python benchmarks/bench_distributed.py --plan                                    # what fits where (computed)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from opt_deus_core import train  # noqa: E402
from opt_deus_tool.hardware import cpu_model  # noqa: E402
from opt_deus_core.model import ModelArgs, Transformer  # noqa: E402
from opt_deus_tool.checkpoint import expected_shapes  # noqa: E402
from opt_deus_tool.devices import resolve_device  # noqa: E402
from opt_deus_tool.distributed import init_distributed, rank_and_world  # noqa: E402
from opt_deus_tool.train_checks import check_training  # noqa: E402

LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)
LLAMA_32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=64, tie_word_embeddings=True)


def top_positions(base_layers: int, new: int) -> list[int]:
    # Indices in the grown model of `new` layers inserted after each of the top `new` base layers.
    first = base_layers - new
    return [first + 2 * k + 1 for k in range(new)]


PRESETS = {
    # Llama-3.2-1B grown 16 -> 24 layers (8 new, top), 16 x 2048 tokens a step.
    "llama-3.2-1b-grown": dict(model=dict(LLAMA_32_1B, num_hidden_layers=24), new=top_positions(16, 8),
                               batch_tokens=16 * 2048, block_size=2048, micro_batch_size=2),
    # A CPU-sized model; 16 x 128 tokens a step.
    "tiny": dict(model=dict(vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=6,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
                 new=top_positions(4, 2), batch_tokens=16 * 128, block_size=128, micro_batch_size=4),
}


def worker(flags) -> int:
    # One process of a measurement (under torchrun, or alone for the plain path).
    dist = init_distributed(flags.device, 600)  # the FSDP2 seam under torchrun, None alone
    distributed, (rank, world) = dist is not None, rank_and_world()
    p = PRESETS[flags.preset]
    args = ModelArgs(**p["model"], max_position_embeddings=max(4096, p["block_size"]))
    args.extra["opt_deus"] = {"new_layers": p["new"]}
    device = resolve_device(flags.device)
    model = Transformer(args).init_weights(torch.Generator().manual_seed(0))
    tokens = np.random.default_rng(0).integers(0, args.vocab_size, p["batch_tokens"] * 4 + 1).astype(np.uint32)
    config = train.TrainConfig(steps=flags.warmup + flags.steps, warmup_steps=0, lr=1e-5,
                               batch_tokens=p["batch_tokens"], block_size=p["block_size"],
                               micro_batch_size=p["micro_batch_size"], eval_every=0,
                               log_every=10**9, device=flags.device, checkpoint_every=0, timing_skip_steps=flags.warmup)
    check_training(model, tokens, config, world=world)  # train() checks nothing (e.g. the batch vs N)
    result = train.train(model, tokens, config, log=lambda *a, **k: None, dist=dist)
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0],
                        device=device)
    if distributed:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank == 0:
        Path(flags.worker).write_text(json.dumps({
            "world_size": world, "fsdp": distributed, "mean_step_s": result.mean_step_s,
            "tokens_per_s": result.tokens_per_s, "peak_gib_max_rank": peak.item() if device.type == "cuda" else None,
            "final_loss": result.final_loss}))
    return 0


def launch(flags, nproc: int | None, out: Path) -> dict:
    # nproc None: the plain path; otherwise torchrun with nproc processes.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prefix = [] if nproc is None else ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                                       "--master_addr", "127.0.0.1", "--master_port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": str(flags.threads), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, *prefix, __file__, "--worker", str(out), "--preset", flags.preset, "--device", flags.device,
           "--warmup", str(flags.warmup), "--steps", str(flags.steps)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"benchmark run failed ({' '.join(cmd)}):\n{p.stderr[-3000:]}")
    return json.loads(out.read_text())


def plan_rows(gpu_gib=(80, 141)) -> list[str]:
    # Static memory per GPU under FSDP2, computed from the shapes: float32 sharded weights (4 B a
    # parameter, all of them), float32 gradients and AdamW moments of the trainable ones (4 + 8 B),
    # all divided by N; plus what is unsharded at a time: the root (embeddings, head) in float32, two
    # blocks in bf16 (one computing, one prefetched) and one block's float32 gradients before the reduce.
    # Activations come on top; estimated (not measured) per 2048-token sequence from what backward keeps
    # per token in each block from the lowest trainable one up: the two norms' float32 input and
    # normalised output (4 x 4h bytes); in bf16 the two matmul inputs after the norms, q, the attention
    # output and o_proj's input (h each), k and v (kv each), gate, up, silu(gate) and their product
    # (intermediate each): (12h + 2kv + 4i) x 2 bytes.
    lines = ["| model | trainable | GPUs | weights+grads+AdamW per GPU | + unsharded in flight "
             "| total (no activations) | + activations per 2048-token sequence (estimate) |",
             "|---|---|---|---|---|---|---|"]
    models = (("Llama-3.2-1B 16->24", LLAMA_32_1B, 16, 8), ("Llama-3.1-8B 32->48", LLAMA_31_8B, 32, 16))
    for name, shape, base, new in models:
        args = ModelArgs(**shape, num_hidden_layers=base + new)
        sizes = {k: int(np.prod(s)) for k, s in expected_shapes(args).items()}
        total = sum(sizes.values())
        block = sum(v for k, v in sizes.items() if k.startswith("model.layers.0."))
        root = total - block * args.num_hidden_layers
        trainable = block * new
        kv = args.num_key_value_heads * args.head_dim
        with_grad = args.num_hidden_layers - min(top_positions(base, new))
        acts = (12 * args.hidden_size + 2 * kv + 4 * args.intermediate_size) * 2 * 2048 * with_grad / 2**30
        for n in (1, 8, 16):
            static = (4 * total + 12 * trainable) / n / 2**30
            flight = (4 * root + 2 * 2 * block + 4 * block) / 2**30
            lines.append(f"| {name} ({total / 1e9:.2f}B) | {trainable / 1e9:.2f}B | {n} | {static:.1f} GiB | "
                         f"{flight:.1f} GiB | {static + flight:.1f} GiB | {acts:.1f} GiB ({with_grad} layers) |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-3.2-1b-grown")
    parser.add_argument("--device", default="auto", help="'auto': cuda if available, else cpu")
    parser.add_argument("--nprocs", default="2", help="comma list of process counts to compare with the plain path")
    parser.add_argument("--repeats", type=int, default=3, help="alternating launches per setting (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the mean")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per launch")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process (CPU)")
    parser.add_argument("--plan", action="store_true", help="print the computed memory table and exit")
    parser.add_argument("--json", help="write the report here as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    flags = parser.parse_args(argv)
    if flags.worker:
        return worker(flags)
    if flags.plan:
        print("\n".join(plan_rows()))
        return 0
    settings = [None] + [int(n) for n in flags.nprocs.split(",")]
    runs = {s: [] for s in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(flags.repeats):
            for s in settings:
                runs[s].append(launch(flags, s, Path(tmp) / f"{s}-{r}.json"))
    load = os.getloadavg()
    base = statistics.median(x["mean_step_s"] for x in runs[None])
    lines = ["| launch | processes | s/step (median of launches) | tokens/s | vs plain | peak GiB (max rank) "
             "| final loss |", "|---|---|---|---|---|---|---|"]
    for s in settings:
        step = statistics.median(x["mean_step_s"] for x in runs[s])
        peak = runs[s][0]["peak_gib_max_rank"]
        lines.append(f"| {'plain python' if s is None else 'torchrun (FSDP2)'} | {s or 1} | {step:.4f} | "
                     f"{PRESETS[flags.preset]['batch_tokens'] / step:,.0f} | {base / step:.2f}x | "
                     f"{'n/a' if peak is None else f'{peak:.2f}'} | {runs[s][0]['final_loss']:.6f} |")
    report = {"preset": flags.preset, "device": flags.device, "cpu": cpu_model(), "cores": os.cpu_count(),
              "threads_per_process": flags.threads, "load_after": load, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "runs": {str(k): v for k, v in runs.items()}}
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}))
    print("\n".join(lines))
    if flags.json:
        Path(flags.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    code = main()
    if "WORLD_SIZE" in os.environ:  # a torchrun worker: no interpreter teardown (see opt_deus_tool/train_cli.py's main)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
