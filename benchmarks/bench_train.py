"""Training-step speed and memory: train.py's step vs transformers' LlamaForCausalLM, side by side.

Same random weights, same synthetic tokens, same optimizer (AdamW, fused on CUDA, no decay on
norms), same clipping, bf16 autocast over float32 weights on CUDA (float32 on CPU). Three settings:
everything trainable, only the top third of the layers, only the bottom third. Warm-up steps are
excluded; each step is timed between device synchronisations and the median is reported.

    python benchmarks/bench_train.py                       # grown Llama-3.2-1B shape, one GPU
    python benchmarks/bench_train.py --preset tiny --device cpu
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from opt_deus_core import train  # noqa: E402
from opt_deus_core.model import ModelArgs, Transformer  # noqa: E402
from opt_deus_tool.checkpoint import hf_key  # noqa: E402
from opt_deus_tool.devices import resolve_device  # noqa: E402
from opt_deus_tool.hf_config import config_from_args  # noqa: E402

PRESETS = {
    # Llama-3.2-1B grown from 16 to 24 layers; 4 x 2048 tokens a step.
    "llama-3.2-1b-grown": dict(
        model=dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                   rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192),
        batch_size=4, block_size=2048),
    # Small enough for a CPU: exercises every code path of the benchmark.
    "tiny": dict(
        model=dict(vocab_size=4096, hidden_size=128, intermediate_size=512, num_hidden_layers=6,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                   rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=1024),
        batch_size=4, block_size=256),
}


def settings_for(n_layers: int) -> dict[str, list[int] | str]:
    third = n_layers // 3
    return {"all": "all", f"top {third}": list(range(n_layers - third, n_layers)),
            f"bottom {third}": list(range(third))}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device, warmup: int, steps: int) -> tuple[list[float], float]:
    losses = []
    for _ in range(warmup):
        losses.append(step())
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        losses.append(step())
        sync(device)
        times.append(time.perf_counter() - t0)
    return times, losses[0]


def bench_ours(args: ModelArgs, spec, tokens, device, cfg: train.TrainConfig, compile_: bool, warmup, steps,
               backend: str = "inductor"):
    model = Transformer(args).init_weights(torch.Generator().manual_seed(0)).to(device)
    train.set_trainable(model, spec)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = train.make_optimizer(named, cfg, device)
    frozen_prefix = train.frozen_prefix_of(model)
    # backend "eager" runs the same dynamo path without generating code (benchmarks/gpu.py --tiny, CI).
    loss_fn = torch.compile(train.forward_loss, backend=backend) if compile_ else train.forward_loss
    x, y = tokens[:, :-1], tokens[:, 1:]
    params = [p for _, p in named]

    def step() -> float:
        with train.autocast_for(device):
            loss = loss_fn(model, x, y, frozen_prefix) / y.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return model, step


def bench_hf(args: ModelArgs, spec, tokens, device, cfg: train.TrainConfig, source: Transformer, warmup, steps,
             compile_: bool = False, backend: str = "inductor"):
    import transformers
    config = transformers.LlamaConfig(**config_from_args(args))
    config._attn_implementation = "sdpa"
    with torch.device(device):  # its random init runs on the device (1B on a CPU: many seconds); replaced below
        hf = transformers.LlamaForCausalLM(config)
    # The very same weights as ours (HF names are ours with a "model." prefix).
    missing, unexpected = hf.load_state_dict({hf_key(k): v for k, v in source.state_dict().items()}, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    layers = list(range(args.num_hidden_layers)) if spec == "all" else spec
    for name, p in hf.named_parameters():
        p.requires_grad_(spec == "all" or any(name.startswith(f"model.layers.{i}.") for i in layers))
    if compile_:
        hf.compile(backend=backend)  # in place: hf(...) below runs the compiled forward
    named = [(n, p) for n, p in hf.named_parameters() if p.requires_grad]
    optimizer = train.make_optimizer(named, cfg, device)
    params = [p for _, p in named]
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step() -> float:
        with train.autocast_for(device):
            logits = hf(input_ids=x).logits
            # What LlamaForCausalLM's loss does (float32 logits, mean CE), on the same targets as ours.
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return hf, step


def run(preset: str, device: str, warmup: int, steps: int, compile_: bool, skip_hf: bool) -> dict:
    p = PRESETS[preset]
    device = resolve_device(device)
    args = ModelArgs(**p["model"])
    B, T = p["batch_size"], p["block_size"]
    tokens = torch.randint(0, args.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0)).to(device)
    cfg = train.TrainConfig(lr=1e-5, warmup_steps=0, grad_clip=1.0)
    rows = []
    for name, spec in settings_for(args.num_hidden_layers).items():
        row = {"setting": name}
        source = None
        impls = [("ours", None)] + ([] if skip_hf else [("transformers", None)])
        for impl, _ in impls:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            if impl == "ours":
                model, step = bench_ours(args, spec, tokens, device, cfg, compile_, warmup, steps)
                source = Transformer(args).init_weights(torch.Generator().manual_seed(0))  # CPU copy for HF
            else:
                model, step = bench_hf(args, spec, tokens, device, cfg, source, warmup, steps)
            times, first_loss = time_steps(step, device, warmup, steps)
            median = statistics.median(times)
            row[impl] = {"s_per_step": median, "tokens_per_s": B * T / median, "first_loss": first_loss,
                         "peak_mem_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                                          if device.type == "cuda" else None)}
            del model, step
        if "transformers" in row:
            row["speedup"] = row["ours"]["tokens_per_s"] / row["transformers"]["tokens_per_s"]
            if device.type == "cuda":
                row["memory_ratio"] = row["ours"]["peak_mem_gib"] / row["transformers"]["peak_mem_gib"]
        rows.append(row)
    return {"preset": preset, "device": str(device), "batch": [B, T], "warmup_steps": warmup, "steps": steps,
            "compile": compile_, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "results": rows}


def markdown(report: dict) -> str:
    lines = ["| setting | impl | s/step (median) | tokens/s | peak GPU mem (GiB) | first loss | ours / transformers |",
             "|---|---|---|---|---|---|---|"]
    for row in report["results"]:
        for impl in ("ours", "transformers"):
            if impl not in row:
                continue
            r = row[impl]
            mem = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
            ratio = ""
            if impl == "ours" and "speedup" in row:
                ratio = f"{row['speedup']:.2f}x tokens/s"
                if "memory_ratio" in row:
                    ratio += f", {row['memory_ratio']:.2f}x memory"
            lines.append(f"| {row['setting']} | {impl} | {r['s_per_step']:.4f} | {r['tokens_per_s']:,.0f} | {mem} | "
                         f"{r['first_loss']:.4f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-3.2-1b-grown")
    parser.add_argument("--device", default="auto", help="'auto': cuda if available, else cpu")
    parser.add_argument("--warmup", type=int, default=3, help="steps run before timing")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--compile", action="store_true", help="torch.compile our loss computation")
    parser.add_argument("--skip-transformers", action="store_true", help="time ours only")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    parser.add_argument("--json", help="write the report here as JSON")
    flags = parser.parse_args(argv)
    if flags.threads:
        torch.set_num_threads(flags.threads)
    report = run(flags.preset, flags.device, flags.warmup, flags.steps, flags.compile, flags.skip_transformers)
    print(json.dumps({k: v for k, v in report.items() if k != "results"}))
    print(markdown(report))
    if flags.json:
        Path(flags.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
