"""How sharp are the transport plans between two adjacent real layers, by alignment and epsilon?

For each setting, fuses base layers A and B of a checkpoint and prints, per plan, its sharpness
(mean row maximum of n*T: 1 for a permutation, 1/n for uniform) and the solver's iterations, and per
weight the norm ratio of the aligned A to A (1 for a permutation, small for a blurred mix):
    python benchmarks/bench_alignment.py --base ~/.cache/opt-deus/smollm2-135m-instruct-hf
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import CheckpointReader  # noqa: E402
from opt_deus import GrowthOptions, paper_fuse, structured_fuse  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", type=Path, required=True, help="a Hugging Face LLaMA folder")
    p.add_argument("--layers", default="20,21", help="the two adjacent base layers A,B")
    p.add_argument("--settings", default="paper:0.06,structured:0.06,structured:0.02,structured:0.005",
                   help="comma list of alignment:epsilon")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None)
    parsed = p.parse_args()

    reader = CheckpointReader(parsed.base)
    a, b = (int(x) for x in parsed.layers.split(","))
    A = reader.block(a, torch.float32, parsed.device)
    B = reader.block(b, torch.float32, parsed.device)
    rows = []
    for setting in parsed.settings.split(","):
        align, epsilon = setting.split(":")
        options = GrowthOptions(align=align, epsilon=float(epsilon))
        start = time.perf_counter()
        if align == "paper":
            _, report = paper_fuse(A, B, options)
        else:
            _, report = structured_fuse(A, B, reader.args, options)
        seconds = time.perf_counter() - start
        rows.append({"align": align, "epsilon": float(epsilon), "seconds": seconds, "report": report})
        print(f"\n{align}, epsilon {epsilon}: {seconds:.1f}s")
        for name, stats in report.items():
            parts = []
            if "sharpness" in stats:
                parts.append(f"sharpness {stats['sharpness']:.3f} ({stats['iterations']} it, converged {stats['converged']})")
            if "norm_ratio" in stats:
                parts.append(f"norm ratio {stats['norm_ratio']:.3f}")
            print(f"  {name:<34}" + ", ".join(parts))
    if parsed.json:
        parsed.json.write_text(json.dumps({"base": str(parsed.base), "layers": [a, b], "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
