"""Layer quality without training (issue 21): how much does a new layer raise the base's held-out loss?

    python experiments/layer_quality.py --target embedded --jobs 2 --out runs/layer_quality/embedded
    python experiments/layer_quality.py --target smollm2 --out runs/layer_quality/smollm2

With zero-init a new layer's fused q, k, v, gate and up weights do not touch the function, so training studies
hide whatever alignment does. Here the new layers' o_proj and down_proj are scaled by s instead of zeroed
(GrowthOptions.out_scale), and nothing is trained: the held-out loss increase over the base measures the layer.
A fused layer can perturb less only because its output is smaller (a blurred plan shrinks A), so every arm is
swept over s and compared at each arm's best s and at an equal output norm (the new layer's residual update
relative to B's, the base layer above it, on the held-out text), not only at s = 1.

Arms: copy-A (LLaMA Pro's copy of the layer below), copy-B (of the layer above), avg (Avg-DeUS), OpT-DeUS paper
(normalised and not), structured and published, by weights, and paper and structured by activations on
calibration text (cost "activations"); controls: shuffled-A-avg (A moved by a random symmetry of the block, then
averaged with B: what alignment is worth against misalignment) and, in the tables, copy-B at the output norm of
the structured layer (what size alone does). Two settings: (a) a new layer in each of the top gaps at once, as
grown models have them; (b) one new layer at a time, at every gap. Paired differences with 95 % t-intervals,
over seeds (the embedded task trains one base per seed) and over gaps.

Outputs under --out: summary.json (every measurement), summary.md (the tables).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments.common import (ExperimentError, environment, fmt_interval, map_jobs, markdown_table,  # noqa: E402
                                output_folder, paired_difference, run_cli, write_json)
from opt_deus_core.model import Block, Transformer, layer_window  # noqa: E402
from opt_deus_core.opt_deus import (Growth, GrowthOptions, avg_fuse, block_activations, make_new_block,  # noqa: E402
                                    move_units)
from opt_deus_core.train import TokenBlocks, linear_cross_entropy  # noqa: E402
from opt_deus_tool.calibration import MIN_CALIBRATION_TOKENS, check_calibration  # noqa: E402
from opt_deus_tool.cli import OneLineArgumentParser, at_least, comma_list, non_negative_int  # noqa: E402
from opt_deus_tool.cli import positive_float, positive_int  # noqa: E402

# arm -> GrowthOptions fields (with out_scale 1: the scale is applied afterwards), or a construction of its own
ARMS = {
    "copy-A": "copy-A", "copy-B": "copy-B", "avg": "avg", "shuffled-A-avg": "shuffled-A-avg",
    "opt-paper": dict(align="paper"), "opt-paper-unnorm": dict(align="paper", normalize_plan=False),
    "opt-published": dict(align="published"), "opt-structured": dict(align="structured"),
    "opt-structured-act": dict(align="structured", cost="activations"),
    "opt-paper-act": dict(align="paper", cost="activations"),
    "lesa": "lesa",  # issue 31: LESA's predictor, fitted once on the whole base as growth fits it
}
SCALES = (1.0, 0.5, 0.25, 0.1)
TARGETS = ("embedded", "smollm2", "qwen25")  # qwen25: Qwen2.5-Coder-0.5B-Instruct, converted by tests/qwen.py
REFERENCE_ARMS = ("avg", "copy-A")  # every arm is compared against these, paired
EQUAL_NORMS = (0.05, 0.1, 0.2)  # output norms (relative to B's update) at which arms are compared


@dataclass
class QualityConfig:
    target: str = "embedded"          # "embedded" (compare.py's base, one per seed) or "smollm2"
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    arms: tuple[str, ...] = tuple(ARMS)
    scales: tuple[float, ...] = SCALES
    top_gaps: int = 4                 # setting (a): new layers in the top gaps at once (smollm2: 15)
    eval_tokens: int | None = None    # held-out tokens (None: the target's default)
    calibration_tokens: int = 2048    # for the activation arms, from the training text
    base_preset: str = "default"      # embedded: compare.py's preset for the base ("tiny": the tests')
    only_top_gaps: bool = False       # one-at-a-time in the top_gaps only (qwen25.sh: to fit its 90 minutes)


def random_symmetry(block: dict, args, generator: torch.Generator) -> dict:
    """A moved by a random symmetry of the block: kv groups (with their query heads), query heads inside a group,
    value dimensions (v rows with the o columns that read them), MLP neurons, applied by opt_deus.move_units as
    structured fusion applies its plans. The block computes the same function; only its units' order changes."""
    G, d, f = args.num_key_value_heads, args.head_dim, args.intermediate_size
    r = args.num_attention_heads // G
    groups = torch.randperm(G, generator=generator)
    heads = torch.stack([torch.randperm(r, generator=generator) for _ in range(G)])  # per new group
    dims = torch.stack([torch.randperm(d, generator=generator) for _ in range(G)])
    neurons = torch.randperm(f, generator=generator)
    onehot = lambda perm, n: F.one_hot(perm, n).transpose(-1, -2).float()  # [old, new] = 1  # noqa: E731
    plans = {"kv_groups": onehot(groups, G), "query_heads": onehot(heads, r)[None].expand(G, -1, -1, -1),
             "value_dims": onehot(dims, d)[None].expand(G, -1, -1, -1), "mlp_neurons": onehot(neurons, f)}
    return {**block, **move_units(block, plans, G, d)}


def lesa_layers(blocks: list[dict], args, seed: int) -> dict:
    # LESA's layer for every gap i (after base layer i), its predictors fitted once on the whole base.
    options = GrowthOptions(method="lesa", out_scale=1.0, seed=seed)
    return Growth(args, None, None, list(range(len(blocks) - 1)), options, None).lesa(lambda i: blocks[i], None)


def new_layer(arm: str, A: dict, B: dict, args, records: tuple, generator: torch.Generator,
              predicted: dict | None = None) -> dict:
    # The new layer between A and B, its output projections unscaled (s = 1), float32; predicted: LESA's for the gap.
    A, B = ({key: value.float() for key, value in block.items()} for block in (A, B))
    kind = ARMS[arm]
    if kind == "lesa":
        return make_new_block([A, B], args, GrowthOptions(method="lesa", out_scale=1.0), predicted=predicted)[0]
    if kind in ("copy-A", "copy-B"):
        return dict(A if kind == "copy-A" else B)
    if kind == "avg":
        return avg_fuse(A, B)
    if kind == "shuffled-A-avg":
        return avg_fuse(random_symmetry(A, args, generator), B)
    options = GrowthOptions(method="opt", out_scale=1.0, **kind)
    return make_new_block([A, B], args, options, list(records) if options.cost == "activations" else None)[0]


def scaled(tensors: dict, s: float) -> dict:
    return {key: value * s if key.endswith(("o_proj.weight", "down_proj.weight")) else value
            for key, value in tensors.items()}


class Stack:
    """A base model's held-out hidden states at every layer input, kept, so that a new layer at gap i costs only
    the layers above it; and the calibration tokens' hidden states, for the activation arms' records."""

    def __init__(self, base: Transformer, eval_x, eval_y, calibration):
        self.base, self.y = base, eval_y
        with torch.no_grad():
            h, self.cos, self.sin = base.embed(eval_x)
            self.hidden = [h]
            for layer in base.layers:
                self.hidden.append(layer(self.hidden[-1], self.cos, self.sin))
            c, self.c_cos, self.c_sin = base.embed(calibration)
            self.calibration = [c]
            for layer in base.layers:
                self.calibration.append(layer(self.calibration[-1], self.c_cos, self.c_sin))
        self.base_loss = self.loss(self.hidden[-1])
        self.args = base.current_args()

    def loss(self, h) -> float:
        weight = self.base.embed_tokens.weight if self.base.lm_head is None else self.base.lm_head.weight
        with torch.no_grad():
            total = linear_cross_entropy(self.base.norm(h).flatten(0, 1), weight, self.y.flatten())
        return total.item() / self.y.numel()

    def record(self, i: int) -> dict:
        return block_activations(self.base.layers[i], self.calibration[i], self.c_cos, self.c_sin)[1]

    def block(self, tensors: dict, i: int) -> Block:  # a new layer after base layer i: i's window, as growth
        with torch.device("meta"):
            block = Block(self.args, layer_window(self.args, i))
        block.load_state_dict(tensors, assign=True)
        return block.eval()

    def run(self, gaps: dict[int, dict]) -> tuple[float, float]:
        """The held-out loss with new layers at `gaps` ({i: tensors}: one right after base layer i), and the new
        layers' mean output norm relative to B's (each new layer's residual update over the update of the base
        layer right above it, both in the grown model)."""
        first = min(gaps)
        L, h, ratios = len(self.base.layers), self.hidden[first + 1], []  # base layer first's output
        with torch.no_grad():
            for i in range(first + 1, L):  # base layer i, after a new layer if one follows base layer i - 1
                if i - 1 in gaps:
                    new = self.block(gaps[i - 1], i - 1)(h, self.cos, self.sin)
                    update, h = (new - h).norm().item(), new
                    out = self.base.layers[i](h, self.cos, self.sin)
                    ratios.append(update / max((out - h).norm().item(), 1e-30))  # B's update, on what it now reads
                    h = out
                else:
                    h = self.base.layers[i](h, self.cos, self.sin)
        return self.loss(h), (statistics.fmean(ratios) if ratios else math.nan)


def measure(stack: Stack, config: QualityConfig, seed: int, log) -> dict:
    """Every arm at every scale: {"one_at_a_time": {arm: {gap: {s: [loss increase, norm ratio]}}},
    "all_at_once": {arm: {s: [...]}}} for one base."""
    L = len(stack.base.layers)
    if config.top_gaps > L - 1:  # the embedded bases' are checked before they train (validate)
        raise ExperimentError(f"--top-gaps {config.top_gaps}: the base has {L} layers, {L - 1} gaps")
    blocks = [{key: value.detach() for key, value in layer.state_dict().items()} for layer in stack.base.layers]
    top = list(range(L - 1 - config.top_gaps, L - 1))
    gaps = top if config.only_top_gaps else list(range(L - 1))
    one, every = {arm: {} for arm in config.arms}, {arm: {} for arm in config.arms}
    t0 = time.perf_counter()
    for arm in config.arms:
        generator = torch.Generator().manual_seed(seed * 1000 + 17)  # the control's symmetry, per seed
        by_activations = isinstance(ARMS[arm], dict) and ARMS[arm].get("cost") == "activations"
        made, record = {}, None
        predicted = lesa_layers(blocks, stack.args, seed) if ARMS[arm] == "lesa" else {}
        for i in gaps:  # contiguous, and holding every top gap: layer i + 1's record serves gap i + 1 as well
            records = (record or stack.record(i), stack.record(i + 1)) if by_activations else (None, None)
            record = records[1]
            made[i] = new_layer(arm, blocks[i], blocks[i + 1], stack.args, records, generator, predicted.get(i))
        for i in gaps:
            one[arm][i] = {s: [loss - stack.base_loss, ratio] for s in config.scales
                           for loss, ratio in [stack.run({i: scaled(made[i], s)})]}
        for s in config.scales:
            loss, ratio = stack.run({i: scaled(made[i], s) for i in top})
            every[arm][s] = [loss - stack.base_loss, ratio]
        log(f"[seed {seed}] {arm}: done ({time.perf_counter() - t0:.0f} s)")
    return {"seed": seed, "base_loss": stack.base_loss, "top_gaps": top, "one_at_a_time": one, "all_at_once": every}


# ----------------------------------------------------------------------------------------------
# Targets


def embedded_seed(job) -> dict:
    config, seed = job
    from experiments import compare
    base_config = compare.preset_config(config.base_preset, seeds=(seed,))
    train_tokens, eval_tokens, _ = compare.load_corpus(base_config)
    base = compare.make_base(base_config, seed)
    compare.train_base(base, train_tokens, eval_tokens, base_config, seed, None, lambda *a: None)
    T = base_config.block_size
    held_out = TokenBlocks(eval_tokens[: config.eval_tokens or len(eval_tokens)], T)
    x, y = held_out.get(range(len(held_out)))
    rows = config.calibration_tokens // T  # calibration text as whole rows of the base's context
    calibration = torch.from_numpy(np.asarray(train_tokens[: rows * T], np.int64)).view(rows, T)
    return measure(Stack(base.eval(), x, y, calibration), config, seed, print)


def smollm2_base(config: QualityConfig, log) -> dict:
    from experiments import smollm2
    from opt_deus_tool.checkpoint import load_pretrained
    from opt_deus_tool.data import load_tokenizer
    folder = smollm2.default_base(smollm2.QWEN25 if config.target == "qwen25" else smollm2.SMOLLM2)
    if folder is None or smollm2.default_data() is None:
        raise ExperimentError(f"the {config.target} target needs its checkpoint (tests/smollm2.py, tests/qwen.py) "
                              f"and the Austen novels (../shared/data/austen)")
    smol = smollm2.SmolConfig(base=folder, data=smollm2.default_data(),
                              eval_tokens=config.eval_tokens or 1024, block_size=256)
    smol.validate()  # --eval-tokens: at least one block
    train_tokens, eval_tokens, _ = smollm2.load_tokens(smol, load_tokenizer(smol.base))
    base = load_pretrained(smol.base, dtype=torch.float32).eval()
    x, y = TokenBlocks(eval_tokens, smol.block_size).get(range((len(eval_tokens) - 1) // smol.block_size))
    calibration = torch.from_numpy(np.asarray(train_tokens[: config.calibration_tokens], np.int64))[None]
    check_calibration(calibration, base.args, "--calibration-tokens")  # at most the base's positions
    return measure(Stack(base, x, y, calibration), config, 0, log)


# ----------------------------------------------------------------------------------------------
# Tables


def at_best_scale(points: dict) -> tuple[float, float]:
    # (s, loss increase) at the scale with the lowest mean increase; points: {s: [per-unit increases]}
    s = min(points, key=lambda k: statistics.fmean(points[k]))
    return s, points[s]


def at_norm(curve: dict, target: float) -> float | None:
    # A unit's loss increase interpolated at output norm `target` from its scales {s: [increase, ratio]}, with
    # (0, 0) for s = 0 (the base); None outside the measured norms.
    points = sorted([(0.0, 0.0)] + [(ratio, increase) for increase, ratio in curve.values()])
    for (r0, d0), (r1, d1) in zip(points, points[1:]):
        if r0 <= target <= r1 and r1 > r0:
            return d0 + (d1 - d0) * (target - r0) / (r1 - r0)
    return None


def units(seeds: list[dict], arm: str) -> dict:
    # one-at-a-time measurements as {s: [unit values]} over (seed, gap) units, in a fixed order
    return {s: [seed["one_at_a_time"][arm][gap][s][0] for seed in seeds for gap in sorted(seed["one_at_a_time"][arm])]
            for s in next(iter(seeds[0]["one_at_a_time"][arm].values()))}


def paired(a: list, b: list) -> dict | None:
    # The paired difference over the units both arms have a value for (None: outside an arm's measured norms).
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    return {**paired_difference([x for x, _ in pairs], [y for _, y in pairs]), "units": len(pairs)} \
        if len(pairs) > 1 else None


def summarize(seeds: list[dict], config: QualityConfig) -> dict:
    arms = list(seeds[0]["one_at_a_time"])
    table = {}
    for arm in arms:
        curves = [seed["one_at_a_time"][arm][gap] for seed in seeds for gap in sorted(seed["one_at_a_time"][arm])]
        best_s, best = at_best_scale(units(seeds, arm))
        table[arm] = {"per_scale": {str(s): statistics.fmean(v) for s, v in units(seeds, arm).items()},
                      "best_scale": best_s, "best": best,
                      "at_equal_norm": {str(n): [at_norm(c, n) for c in curves] for n in EQUAL_NORMS},
                      "norm_ratio_at_s1": statistics.fmean(c[max(config.scales)][1] for c in curves),
                      "all_at_once": {str(s): [seed["all_at_once"][arm][s] for seed in seeds] for s in config.scales}}
    comparisons = {}
    for arm in arms:
        for ref in REFERENCE_ARMS:
            if ref in table and ref != arm:
                comparisons.setdefault(arm, {})[ref] = {
                    "best": paired(table[arm]["best"], table[ref]["best"]),
                    "best_over_seeds": paired(*(per_seed(seeds, x, table[x]["best_scale"]) for x in (arm, ref))),
                    **{f"norm {n}": paired(table[arm]["at_equal_norm"][str(n)], table[ref]["at_equal_norm"][str(n)])
                       for n in EQUAL_NORMS}}
    # Size alone: copy-B scaled to the structured layer's output norm, against the structured layer (s = 1).
    if "copy-B" in table and "opt-structured" in table and 1.0 in config.scales:
        b, st = ([seed["one_at_a_time"][a][gap] for seed in seeds for gap in sorted(seed["one_at_a_time"][a])]
                 for a in ("copy-B", "opt-structured"))
        comparisons["copy-B at opt-structured's norm"] = {"opt-structured": {
            "opt-structured's norm at s = 1": paired([at_norm(x, y[1.0][1]) for x, y in zip(b, st)],
                                                     [y[1.0][0] for y in st])}}
    return {"arms": table, "comparisons": comparisons}


def per_seed(seeds: list[dict], arm: str, s: float) -> list[float]:
    # each seed's mean one-at-a-time loss increase over its gaps, at scale s
    return [statistics.fmean(seed["one_at_a_time"][arm][gap][s][0] for gap in seed["one_at_a_time"][arm])
            for seed in seeds]


def summary_markdown(summary: dict, config: QualityConfig) -> str:
    s, unit = summary["summary"], "byte" if config.target == "embedded" else "token"
    gaps = len(summary["seeds"][0]["one_at_a_time"]["avg"])
    lines = [f"# Layer quality without training: {config.target}", "",
             f"Held-out loss increase over the base (nats per {unit}) of a new layer whose o_proj and down_proj are "
             f"scaled by s, nothing trained; {len(summary['seeds'])} base(s), one new layer at a time at each of "
             f"{gaps} gaps (units: base x gap). Norm: the new layer's residual update relative to B's (the base layer "
             f"above it), mean over units, at s = 1.", ""]
    rows = []
    for arm, row in s["arms"].items():
        per_scale = [f"{row['per_scale'][str(x)]:+.4f}" for x in config.scales]
        rows.append([arm, *per_scale, f"{row['norm_ratio_at_s1']:.3f}", row["best_scale"],
                     f"{statistics.fmean(row['best']):+.4f}"])
    lines += [markdown_table(["arm", *(f"s={x}" for x in config.scales), "norm at s=1", "best s", "at best s"], rows)]
    for ref in (*REFERENCE_ARMS, "opt-structured"):
        rows, columns = [], None
        for arm, comparison in s["comparisons"].items():
            if ref in comparison:
                columns = columns or list(comparison[ref])
                rows.append([arm, *(f"{fmt_interval(d)} (n={d['units']})" if d else "—"
                                    for d in comparison[ref].values())])
        if not rows:  # ref not among the arms run
            continue
        headers = [{"best": "each at its best s, over units", "best_over_seeds": "... over bases"}.get(c, f"at {c}")
                   for c in columns]
        lines += ["", f"Paired differences against {ref} (negative: the arm's layer perturbs less), 95 % t-intervals "
                  f"(at norm n: each arm's increase interpolated at output norm n):", "",
                  markdown_table(["arm", *headers], rows)]
    rows = [[arm, *(f"{statistics.fmean(d for d, _ in row['all_at_once'][str(x)]):+.4f}" for x in config.scales),
             f"{statistics.fmean(r for _, r in row['all_at_once'][str(max(config.scales))]):.3f}"]
            for arm, row in s["arms"].items()]
    lines += ["", f"New layers in the top {config.top_gaps} gaps at once (mean over bases; norm at the largest s):",
              "", markdown_table(["arm", *(f"s={x}" for x in config.scales), "norm"], rows)]
    return "\n".join(lines) + "\n"


def resummarize(path) -> dict:
    # Tables again from a summary.json (its keys as JSON wrote them: strings), without measuring anything. A file
    # that is no such summary is one line, whatever part of it is missing or malformed.
    import json
    try:
        summary = json.loads(Path(path).read_text(encoding="utf-8"))
        for seed in summary["seeds"]:
            seed["one_at_a_time"] = {arm: {int(g): {float(k): v for k, v in c.items()} for g, c in gaps.items()}
                                     for arm, gaps in seed["one_at_a_time"].items()}
            seed["all_at_once"] = {arm: {float(k): v for k, v in c.items()} for arm, c in seed["all_at_once"].items()}
        config = QualityConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in summary["config"].items()})
        summary["summary"] = summarize(summary["seeds"], config)
    except (OSError, ValueError, LookupError, TypeError, AttributeError, ArithmeticError) as e:
        raise ExperimentError(f"--resummarize {path}: not a summary.json that layer_quality.py wrote "
                              f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})") from None
    return summary, config


def validate(config: QualityConfig):
    # Before any base trains: what the flags' types cannot know, the embedded base's size (and the API's values).
    unknown, scales = [arm for arm in config.arms if arm not in ARMS], config.scales
    if unknown or config.target not in TARGETS or not scales or not min(scales) > 0:
        raise ExperimentError(f"--target {'|'.join(TARGETS)}, --arms from {', '.join(ARMS)}, --scales > 0")
    if config.target == "embedded":
        from experiments import compare
        base = compare.preset_config(config.base_preset)
        T, held_out, e = base.block_size, base.eval_blocks * base.block_size + 1, config.eval_tokens
        for ok, problem in ((config.top_gaps <= base.layers - 1, f"--top-gaps {config.top_gaps}: the base has "
                             f"{base.layers} layers, {base.layers - 1} gaps"),
                            (config.calibration_tokens >= T, f"--calibration-tokens {config.calibration_tokens} is "
                             f"below one block of the base's context ({T}): no calibration text"),
                            (e is None or T + 1 <= e <= held_out, f"--eval-tokens {e}: the held-out text has "
                             f"{held_out} tokens; give {T + 1}..{held_out} (a block and its next token at least)")):
            if not ok:
                raise ExperimentError(problem)


def run(config: QualityConfig, out, log=print, jobs: int = 1) -> dict:
    validate(config)
    for ref in REFERENCE_ARMS:
        if ref not in config.arms:
            raise ExperimentError(f"--arms must include {ref}, the reference of the paired comparisons")
    t0 = time.perf_counter()
    if config.target == "embedded":
        seeds = map_jobs(embedded_seed, [(config, seed) for seed in config.seeds], jobs)
    else:
        seeds = [smollm2_base(config, log)]
    summary = {"config": dataclasses.asdict(config), "environment": environment(), "seconds": time.perf_counter() - t0,
               "seeds": seeds, "summary": summarize(seeds, config)}
    write_outputs(summary, config, out, log)
    return summary


def write_outputs(summary: dict, config: QualityConfig, out, log=print, inputs=()):
    if out is not None:
        with output_folder(out, inputs) as folder:
            write_json(folder / "summary.json", summary)
            (folder / "summary.md").write_text(summary_markdown(summary, config))
    log(summary_markdown(summary, config))


def main(argv=None) -> int:
    from experiments import compare
    # One-line errors and the commands' argparse types (docs/CLI.md: the experiments follow the same contract).
    p = OneLineArgumentParser(prog="layer_quality.py", description=__doc__.splitlines()[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--target", choices=TARGETS, default="embedded")
    p.add_argument("--seeds", type=comma_list(non_negative_int, distinct=True), default=[0, 1, 2, 3, 4],
                   help="embedded: one base per seed, all different")
    p.add_argument("--arms", type=comma_list(str, distinct=True, choices=tuple(ARMS)), default=list(ARMS))
    p.add_argument("--scales", type=comma_list(positive_float, distinct=True), default=list(SCALES),
                   help="the values of s swept (each > 0, all different)")
    p.add_argument("--top-gaps", type=positive_int, help="setting (a)'s new layers (None: 4; smollm2: 15)")
    p.add_argument("--eval-tokens", type=positive_int, help="held-out tokens (None: embedded all, smollm2 1024)")
    p.add_argument("--calibration-tokens", type=at_least(MIN_CALIBRATION_TOKENS), default=2048,
                   help="the activation arms' calibration text (embedded: at least one block of the base's context)")
    p.add_argument("--base-preset", choices=sorted(compare.PRESETS), default="default",
                   help="embedded: compare.py's preset for the bases")
    p.add_argument("--only-top-gaps", action="store_true",
                   help="measure one new layer at a time only in the --top-gaps (default: every gap)")
    p.add_argument("--jobs", type=positive_int, default=1, help="worker processes (embedded: one base each)")
    p.add_argument("--threads", type=non_negative_int, default=0,
                   help="torch threads in this process (0: torch's default)")
    p.add_argument("--out", default=None, help="output folder (summary.json, summary.md)")
    p.add_argument("--resummarize", default=None, help="a summary.json: write its tables again into --out")
    flags = p.parse_args(argv)

    def start():
        if flags.resummarize:
            summary, config = resummarize(flags.resummarize)
            write_outputs(summary, config, flags.out, inputs=[("--resummarize", flags.resummarize)])
            return
        config = QualityConfig(target=flags.target, seeds=tuple(flags.seeds), arms=tuple(flags.arms),
                               scales=tuple(flags.scales),
                               top_gaps=flags.top_gaps or {"smollm2": 15, "qwen25": 12}.get(flags.target, 4),
                               eval_tokens=flags.eval_tokens, calibration_tokens=flags.calibration_tokens,
                               base_preset=flags.base_preset, only_top_gaps=flags.only_top_gaps)
        run(config, flags.out, jobs=flags.jobs)
    return run_cli("layer_quality.py", flags, start, ())


if __name__ == "__main__":
    sys.exit(main())
