"""How sharp are the transport plans between two adjacent real layers, by alignment and epsilon?

For each setting, fuses base layers A and B of a checkpoint and prints, per plan, its sharpness
(mean row maximum of the plan scaled by n: 1 for a permutation, 1/n for uniform) and the solver's iterations, and per
weight the norm ratio of the aligned A to A (1 for a permutation, small for a blurred mix):
    python benchmarks/bench_alignment.py --base ~/.cache/opt-deus/smollm2-135m-instruct-hf

A setting `align:epsilon@activations` aligns by what the units compute on --calibration text instead of their
weights (GrowthOptions.cost "activations"; the base runs on it, streamed as opt-deus does).

With --composition, instead: for every gap of the base and each alignment (published, paper,
paper without plan normalisation, structured), what each fused weight F = (Â + B)/2 is made of (Â:
A after alignment), averaged over the gaps, as a Markdown table (docs/ALIGNMENT.md):
    python benchmarks/bench_alignment.py --base ~/.cache/opt-deus/smollm2-135m-instruct-hf --composition
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from opt_deus_core.opt_deus import GrowthOptions, make_new_block
from opt_deus_tool.checkpoint import BLOCK_KEYS, CheckpointReader
from opt_deus_tool.grow_cli import calibration_pass, calibration_tokens

# Which of structured alignment's plans move each weight's rows or columns.
STRUCTURED_PLANS = {"q_proj": ("attention.query_heads", "attention.kv_groups"), "k_proj": ("attention.kv_groups",),
                    "v_proj": ("attention.value_dims", "attention.kv_groups"),
                    "o_proj": ("attention.query_heads", "attention.value_dims", "attention.kv_groups"),
                    "gate_proj": ("mlp.neurons",), "up_proj": ("mlp.neurons",), "down_proj": ("mlp.neurons",)}


def composition(blocks: list[dict], args, gaps: list[int]) -> list[dict]:
    # One row per (mode, weight), means over the gaps: |Â|/|A|, the parts |Â/2|/|F| and |B/2|/|F| of
    # the fused weight, the plan's sharpness; the range of the plan's total mass; for published, in
    # how many gaps its solver aborted and at which iterations.
    modes = {"published": GrowthOptions(align="published", out_scale=1.0),
             "paper": GrowthOptions(align="paper", out_scale=1.0),
             "paper --no-normalize-plan": GrowthOptions(align="paper", normalize_plan=False, out_scale=1.0),
             "structured": GrowthOptions(align="structured", out_scale=1.0)}
    rows = []
    for mode, options in modes.items():
        sums, seconds = {}, time.perf_counter()
        for gap in gaps:
            A, B = blocks[gap], blocks[gap + 1]
            fused, report = make_new_block([A, B], args, options)
            for key in BLOCK_KEYS:
                a_part = fused[key] - B[key] / 2  # Â/2
                stats = report.get(key, {})
                if options.align == "structured" and "proj" in key:
                    plans = [report[name] for name in STRUCTURED_PLANS[key.split(".")[1]]]
                    stats = {"sharpness": sum(p["sharpness"] for p in plans) / len(plans),
                             "converged": all(p["converged"] for p in plans)}
                if "sharpness" in stats and "plan_mass" not in stats:
                    # log-domain Sinkhorn's plans have mass 1 to its tolerance when they converged
                    stats = {**stats, "plan_mass": 1.0 if stats["converged"] else float("nan")}
                row = sums.setdefault(key, {"a_norm": 0.0, "a_part": 0.0, "b_part": 0.0, "sharpness": 0.0,
                                            "plan_mass": [], "aborted": [], "planned": "sharpness" in stats})
                row["a_norm"] += (2 * a_part.norm() / A[key].norm()).item()
                row["a_part"] += (a_part.norm() / fused[key].norm()).item()
                row["b_part"] += (B[key].norm() / 2 / fused[key].norm()).item()
                row["sharpness"] += stats.get("sharpness", 0.0)
                row["plan_mass"].append(stats.get("plan_mass", 0.0))
                if stats.get("aborted"):
                    row["aborted"].append(stats["abort_iteration"])
        print(f"{mode}: {time.perf_counter() - seconds:.1f}s for {len(gaps)} gaps", file=sys.stderr)
        for key, row in sums.items():
            n = len(gaps)
            rows.append({"mode": mode, "weight": key, **{k: v / n for k, v in row.items()
                                                         if k in ("a_norm", "a_part", "b_part", "sharpness")},
                         "plan_mass": [min(row["plan_mass"]), max(row["plan_mass"])],
                         "planned": row["planned"], "aborted": row["aborted"], "gaps": n})
    return rows


def composition_table(rows: list[dict]) -> str:
    lines = ["| mode | weight | ‖Â‖/‖A‖ | ‖Â/2‖/‖F‖ | ‖B/2‖/‖F‖ | plan mass (min … max) "
             "| sharpness | solver aborted |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        planned = r["planned"]
        aborted = ""
        if r["mode"] == "published" and planned:
            at = sorted(set(r["aborted"]))
            aborted = f"{len(r['aborted'])}/{r['gaps']}" + (f" (at {', '.join(map(str, at))})" if at else "")
        low, high = r["plan_mass"]
        mass = ("1" if low == high == 1 else f"{low:.1e} … {high:.1e}") if planned else ""
        sharpness = f"{r['sharpness']:.2e}" if planned else ""
        lines.append(f"| {r['mode']} | {r['weight'].split('.')[-2]} | {r['a_norm']:.3f} | {r['a_part']:.3f} | "
                     f"{r['b_part']:.3f} | {mass} | {sharpness} | {aborted} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", type=Path, required=True, help="a Hugging Face LLaMA folder")
    p.add_argument("--layers", default="20,21", help="the two adjacent base layers A,B")
    p.add_argument("--settings", default="paper:0.06,structured:0.06,structured:0.02,structured:0.005",
                   help="comma list of alignment:epsilon")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--composition", action="store_true", help="what each fused weight is made of, per alignment")
    p.add_argument("--gaps", default="all", help="with --composition: comma list of gaps i (between base i and i+1)")
    p.add_argument("--calibration", default=None, help="text for the @activations settings")
    p.add_argument("--calibration-tokens", type=int, default=2048)
    flags = p.parse_args()

    reader = CheckpointReader(flags.base)
    if flags.composition:
        L = reader.args.num_hidden_layers
        gaps = list(range(L - 1)) if flags.gaps == "all" else [int(x) for x in flags.gaps.split(",")]
        blocks = [reader.block(i, torch.float32, flags.device) for i in range(L)]
        rows = composition(blocks, reader.args, gaps)
        print(composition_table(rows))
        if flags.json:
            flags.json.write_text(json.dumps({"base": str(flags.base), "gaps": gaps, "rows": rows}, indent=2) + "\n")
        return
    a, b = (int(x) for x in flags.layers.split(","))
    A = reader.block(a, torch.float32, flags.device)
    B = reader.block(b, torch.float32, flags.device)
    records = None
    if "@activations" in flags.settings:  # layers 0 .. b run on the calibration tokens, one at a time
        start = time.perf_counter()
        calibrate = calibration_pass(reader, calibration_tokens(flags.base, flags.calibration,
                                                                flags.calibration_tokens), flags.device)
        records = [calibrate(i, reader.block(i, torch.float32, flags.device)) for i in range(b + 1)][a:]
        print(f"calibration pass over layers 0..{b}: {time.perf_counter() - start:.1f}s")
    rows = []
    for setting in flags.settings.split(","):
        align, _, cost = setting.partition("@")
        align, epsilon = align.split(":")
        options = GrowthOptions(align=align, epsilon=float(epsilon), cost=cost or "weights")
        start = time.perf_counter()
        _, report = make_new_block([A, B], reader.args, options, records)
        seconds = time.perf_counter() - start
        rows.append({"align": align, "epsilon": float(epsilon), "cost": options.cost, "seconds": seconds,
                     "report": report})
        print(f"\n{align}, epsilon {epsilon}, {options.cost}: {seconds:.1f}s")
        for name, stats in report.items():
            parts = []
            if "sharpness" in stats:
                parts.append(f"sharpness {stats['sharpness']:.3f} "
                             f"({stats['iterations']} it, converged {stats['converged']})")
            if "norm_ratio" in stats:
                parts.append(f"norm ratio {stats['norm_ratio']:.3f}")
            print(f"  {name:<34}" + ", ".join(parts))
    if flags.json:
        flags.json.write_text(json.dumps({"base": str(flags.base), "layers": [a, b], "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
