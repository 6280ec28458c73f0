"""Does LESA do what it claims? Leave-one-out on a real model (issue 31).

    python experiments/lesa_loo.py --base ~/.cache/opt-deus/smollm2-135m-instruct-hf --out runs/lesa_loo/smollm2
    python experiments/lesa_loo.py --base ~/.cache/opt-deus/qwen2.5-coder-0.5b-instruct-hf --out runs/lesa_loo/qwen

LESA (Yang et al. 2025, arXiv 2502.13794) claims that the layers of a trained model are continuous in the SVD space of
their concatenated weights, so that a layer can be predicted from its neighbours. Here each held-out middle layer j
is deleted from the base, LESA is fitted on the remaining L - 1 layers exactly as growth fits it (opt_deus.Growth.lesa:
every projection kind's SVD and its own predictor, the predictor never seeing layer j), and the layer it predicts
between j - 1 and j + 1 is compared with the true layer j, beside the two answers that need no learning: the average
of the neighbours (Avg-DeUS) and a copy of the layer below (LLaMA Pro). Error: |predicted - true| / |true| over the
seven projections (biases included), per kind and all together; paired differences over layers with 95 % t-intervals.

Outputs under --out: summary.json (every number), summary.md (the tables).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments.common import (ExperimentError, environment, fmt_interval, markdown_table, output_folder,  # noqa: E402
                                paired_difference, run_cli, write_json)
from opt_deus_core.opt_deus import LESA_NAMES, Growth, GrowthOptions, rows  # noqa: E402
from opt_deus_tool.cli import comma_list, non_negative_int, positive_int  # noqa: E402

ANSWERS = ("lesa", "avg", "copy-below")


def errors(guess: dict, truth: dict) -> dict:
    # Relative Frobenius error per projection kind (rows(): the bias a column) and over all seven together.
    out, num, den = {}, 0.0, 0.0
    for name in LESA_NAMES:
        g, t = rows(guess, name).float(), rows(truth, name).float()
        d, n = (g - t).pow(2).sum().item(), t.pow(2).sum().item()
        out[name], num, den = (d / n) ** 0.5, num + d, den + n
    out["all"] = (num / den) ** 0.5
    return out


def leave_one_out(blocks: list[dict], args, j: int, seed: int) -> dict:
    # Layer j removed: the reduced base's layer j - 1 is the true j - 1, its layer j the true j + 1.
    reduced = blocks[:j] + blocks[j + 1:]
    growth = Growth(dataclasses.replace(args, num_hidden_layers=len(reduced)), None, None, [j - 1],
                    GrowthOptions(method="lesa", out_scale=1.0, seed=seed), None)
    predicted = growth.lesa(lambda i: reduced[i], None)[j - 1]
    below, above = blocks[j - 1], blocks[j + 1]
    guesses = {"lesa": predicted, "copy-below": below,
               "avg": {key: (below[key].float() + above[key].float()) / 2 for key in below}}
    return {"layer": j, "errors": {a: errors(g, blocks[j]) for a, g in guesses.items()},
            "predictors": growth.predictors}


def summarize(per_layer: list[dict]) -> dict:
    kinds = (*LESA_NAMES, "all")
    values = {a: {k: [r["errors"][a][k] for r in per_layer] for k in kinds} for a in ANSWERS}
    mean = {a: {k: statistics.fmean(v) for k, v in values[a].items()} for a in ANSWERS}
    diffs = {ref: {k: paired_difference(values["lesa"][k], values[ref][k]) for k in kinds}
             for ref in ("avg", "copy-below")}
    return {"mean_error": mean, "lesa_minus": diffs,
            "lesa_better_layers": {ref: sum(r["errors"]["lesa"]["all"] < r["errors"][ref]["all"] for r in per_layer)
                                   for ref in ("avg", "copy-below")}}


def summary_markdown(s: dict) -> str:
    per_layer, summary = s["per_layer"], s["summary"]
    lines = [f"# LESA leave-one-out: {s['base']}", "",
             f"Each layer j below was deleted and predicted back from the {s['num_layers'] - 1} others (LESA fitted "
             f"without it), against the average of its neighbours and a copy of the layer below. Relative error "
             f"|guess - true| / |true| over the seven projections, biases included ({len(per_layer)} layers, "
             f"seed {s['seed']}, {s['seconds']:.0f} s).", "",
             markdown_table(["layer", *ANSWERS, "LESA predictor held-out error (q, gate)"],
                            [[r["layer"], *(f"{r['errors'][a]['all']:.4f}" for a in ANSWERS),
                              f"{r['predictors']['self_attn.q_proj']['heldout_error']:.3f}, "
                              f"{r['predictors']['mlp.gate_proj']['heldout_error']:.3f}"] for r in per_layer]), "",
             "Mean relative error per projection kind, and LESA's paired difference over layers (negative: LESA "
             "closer to the true layer), 95 % t-intervals:", ""]
    rows_ = [[kind, *(f"{summary['mean_error'][a][kind]:.4f}" for a in ANSWERS),
              *(fmt_interval(summary["lesa_minus"][ref][kind]) for ref in ("avg", "copy-below"))]
             for kind in (*LESA_NAMES, "all")]
    lines += [markdown_table(["kind", *ANSWERS, "LESA - avg", "LESA - copy-below"], rows_), "",
              f"LESA closer than avg in {summary['lesa_better_layers']['avg']} of {len(per_layer)} layers, closer "
              f"than the copy in {summary['lesa_better_layers']['copy-below']}."]
    return "\n".join(lines) + "\n"


def run(base: str, layers: list[int] | None, stride: int, seed: int, out, log=print) -> dict:
    from opt_deus_tool.checkpoint import load_pretrained
    model = load_pretrained(base, dtype=torch.float32)
    L = model.args.num_hidden_layers
    if L < 4:
        raise ExperimentError(f"--base {base}: {L} layers; leave-one-out needs at least 4")
    chosen = layers if layers is not None else list(range(1, L - 1, stride))
    bad = [j for j in chosen if not 1 <= j <= L - 2]
    if bad:
        raise ExperimentError(f"--layers {bad[0]}: a middle layer has neighbours on both sides, 1 <= j <= {L - 2}")
    blocks = [{k: v.detach() for k, v in layer.state_dict().items()} for layer in model.layers]
    args, t0, per_layer = model.current_args(), time.perf_counter(), []
    del model
    for n, j in enumerate(chosen, 1):
        per_layer.append(leave_one_out(blocks, args, j, seed))
        e, elapsed = per_layer[-1]["errors"], time.perf_counter() - t0
        log(f"[{n}/{len(chosen)}] layer {j}: lesa {e['lesa']['all']:.4f}, avg {e['avg']['all']:.4f}, copy "
            f"{e['copy-below']['all']:.4f}  elapsed {elapsed:.0f}s, eta {elapsed / n * (len(chosen) - n):.0f}s")
    summary = {"base": str(base), "num_layers": L, "seed": seed, "seconds": time.perf_counter() - t0,
               "environment": environment(), "per_layer": per_layer, "summary": summarize(per_layer)}
    text = summary_markdown(summary)
    if out is not None:
        with output_folder(out, [("--base", base)]) as folder:
            write_json(folder / "summary.json", summary)
            (folder / "summary.md").write_text(text)
    log(text)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", required=True, help="a Hugging Face model folder (LLaMA, Qwen2/3, Mistral)")
    p.add_argument("--layers", type=comma_list(positive_int, distinct=True), default=None,
                   help="middle layers to leave out (default: every --stride-th from 1)")
    p.add_argument("--stride", type=positive_int, default=4)
    p.add_argument("--seed", type=non_negative_int, default=0, help="LESA's predictors")
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=None, help="output folder (summary.json, summary.md)")
    flags = p.parse_args(argv)
    flags.jobs = 1
    return run_cli("lesa_loo.py", flags, lambda: run(flags.base, flags.layers, flags.stride, flags.seed, flags.out),
                   ())


if __name__ == "__main__":
    sys.exit(main())
