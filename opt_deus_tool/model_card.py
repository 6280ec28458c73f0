"""README.md model cards for the folders the tool writes: a grown model (opt-deus) and a training checkpoint.

The Hub reads a card's YAML front matter (base_model, tags, library_name, pipeline_tag, license) and shows its
text. A grown folder's card says what was grown how and how to train the new layers next; a checkpoint's the
training so far. The base's own README.md describes the base, not the grown model: it is never copied (only its
license is carried over), see checkpoint.SIDE_FILES.
"""

from __future__ import annotations

import json
import shlex
import statistics
from pathlib import Path

from opt_deus_tool.hub import hub_id

LICENSE_KEYS = ("license", "license_name", "license_link")


def front_matter(path) -> dict[str, str]:
    # The top-level `key: value` lines of a README's YAML front matter ({} without one, or unreadable):
    # all a card takes from its base is the license.
    try:
        lines = Path(path).read_text(encoding="utf-8")[:65536].splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    if not lines or lines[0].strip() != "---":
        return {}
    fields = {}
    for line in lines[1:]:
        if line.strip() == "---":
            break
        key, colon, value = line.partition(":")
        if colon and key == key.strip() and value.strip():
            fields[key] = value.strip().strip("'\"")
    return fields


def model_name(source) -> str:
    # base_model: a Hub id as the Hub spells it (the revision is named in the text), else the folder's name.
    parsed = hub_id(source)
    return parsed[0] if parsed else Path(source).resolve().name


def header(base_model: str, tags: list[str], license_from=None) -> str:
    license = {k: v for k, v in front_matter(Path(license_from) / "README.md").items() if k in LICENSE_KEYS} \
        if license_from is not None else {}
    lines = ["---", f"base_model: {json.dumps(base_model)}", "tags:", *(f"- {json.dumps(t)}" for t in tags),
             "library_name: transformers", "pipeline_tag: text-generation",
             *(f"{k}: {json.dumps(v)}" for k, v in license.items()), "---", ""]
    return "\n".join(lines)


def growth_headline(report: dict) -> str:
    # The growth report's numbers a reader looks at first: did the plans converge, how far off, how sharp;
    # how large the new layers' weights are against their sources'.
    plans = [m for layer in report.get("layers", []) for m in layer["matrices"].values() if "marginal_error" in m]
    ratios = [m["norm_ratio"] for layer in report.get("layers", []) for m in layer["matrices"].values()
              if "norm_ratio" in m]
    parts = []
    if plans:
        unconverged = sum(not m.get("converged", True) for m in plans)
        converged = f"{unconverged} not converged" if unconverged else "all converged"
        worst, sharpness = max(m["marginal_error"] for m in plans), statistics.median(m["sharpness"] for m in plans)
        parts.append(f"{len(plans)} transport plans, {converged}, largest marginal error {worst:.2e}, median "
                     f"sharpness {sharpness:.3f}")
    if ratios:
        parts.append(f"weight norm of a new layer / its sources' {min(ratios):.3f}-{max(ratios):.3f}")
    if report.get("lesa"):  # lesa's predictors, one per projection kind: how well they predict held-out rows
        errors = [m["heldout_error"] for m in report["lesa"].values()]
        parts.append(f"lesa predictors' held-out error {min(errors):.3f}-{max(errors):.3f}")
    seconds = sum(layer.get("seconds", 0) for layer in report.get("layers", []))
    parts.append(f"{seconds:.1f} s to make the new layers")
    return "; ".join(parts)


def growth_card(report: dict, base, base_folder, out, model_type: str) -> str:
    """README.md of a grown folder: `report` is growth_report.json's content, `base` the base as given (a Hub id
    or a folder), base_folder where it was read, out the grown folder as given."""
    parsed, options = hub_id(base), report.get("options", {})
    method, new, L, after = report["method"], report["new_layers"], report["base_num_layers"], report["insert_after"]
    source = (f"the Hugging Face model `{parsed[0]}` (revision `{parsed[1] or 'main'}`, commit "
              f"`{Path(base_folder).name}`)" if parsed else f"the folder `{base}`")
    how = method + (f", {report['align']} alignment, epsilon {report['epsilon']}, cost {report['cost']}, plans "
                    f"{'normalised' if report['normalize_plan'] else 'raw'}" if method == "opt" else "")
    where = (f"position {report['position']}: a new layer after base layers {', '.join(map(str, after))}" if after
             else f"{method}: base layers repeated as {report['sources']}")
    scale = report["out_scale"]
    init = ("zero (out-scale 0): the grown model computes the base's function until they train" if scale == 0
            else "as made (out-scale 1)" if scale == 1 else f"scaled by {scale} (out-scale {scale})")
    train = shlex.join(["opt-deus-train", "--model", str(out), "--data", "CORPUS/", "--out",
                        f"runs/{Path(out).resolve().name}", "--steps", "1000"])
    return header(model_name(base), ["opt-deus", "depth-up-scaling", method, model_type], base_folder) + f"""
# {Path(out).resolve().name}

Grown from {source} ({L} layers) to {L + len(new)} layers by opt-deus: depth up-scaling (OpT-DeUS,
[arXiv 2508.08011](https://arxiv.org/abs/2508.08011)) inserts new layers made from the base's own. They are untrained.

| | |
| --- | --- |
| method | {how} |
| where | {where} |
| new layer indices | {', '.join(map(str, new))} of 0-{L + len(new) - 1} (config.json: `opt_deus.new_layers`) |
| new o_proj, down_proj | {init} |
| growth report | {growth_headline(report)} (`growth_report.json`, per layer and matrix) |
| options | `{json.dumps(options)}` |

## Train the new layers next

```bash
{train}
# on a CPU, smaller steps: --batch-tokens 2048 --block-size 512
```

Only the new layers train (`--trainable new`), everything else frozen; `opt-deus-train --help` for the rest.
"""


def checkpoint_card(path, args, state: dict, evals: list[dict]) -> str:
    """README.md of the training checkpoint at `path`: args its ModelArgs, state its trainer_state.json, evals the
    run's evaluations so far."""
    run, config, step, path = state.get("run") or {}, state["config"], state["step"], Path(path)
    model = run.get("model") or "a model given in Python"
    growth = args.extra.get("opt_deus") or {}
    grown = (f", grown by opt-deus ({growth.get('method', 'opt')}; new layers {growth.get('new_layers')})"
             if growth else "")
    tags = ["opt-deus", "depth-up-scaling"] * bool(growth) + [run.get("task", "cpt"), args.model_type]
    last = evals[-1] if evals else None
    loss = f"{state['losses'][-1]:.4f}" if state.get("losses") else "none yet"
    evaluated = (f"step {last['step']}: loss {last['eval_loss']:.4f}, perplexity {last['eval_perplexity']:.2f}"
                 if last else "none yet")
    tokens, epoch = config["batch_tokens"], (state.get("data") or {}).get("epoch")
    return header(model_name(model), tags, run.get("copy_files_from")) + f"""
# {path.parent.name}/{path.name}

Step {step} of {config['steps']} of `opt-deus-train` on `{model}`{grown}.

| | |
| --- | --- |
| trained | layers {state.get('trainable_layers')} (`--trainable {config['trainable']}`), the rest frozen |
| task, data | {run.get('task', 'cpt')}: {', '.join(run.get('data') or []) or 'given in Python'} |
| so far | {step * tokens:,} tokens ({step} steps of {tokens:,}, blocks of {config['block_size']}), data epoch {epoch} |
| last training loss | {loss} |
| last evaluation | {evaluated} |
| schedule | {config['schedule']}, peak lr {config['lr']}, warmup {config['warmup_steps']} steps |

## Go on

```bash
{shlex.join(['opt-deus-train', '--resume', str(path.parent)])}   # continues exactly, to step {config['steps']}
{shlex.join(['opt-deus-eval', '--model', str(path), '--text', 'HELDOUT.txt'])}
```
"""
