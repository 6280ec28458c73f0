"""Every growth of a model on record, in config.json: a model grown twice has two sets of new layers.

The core records one growth, its latest, as config.json's "opt_deus" (opt_deus.growth_layout). A model grown again
(opt-deus on a grown model) also keeps "opt_deus_growths": every growth's record, oldest first, each with
"new_layers_final", its new layers' indices in this model (a later growth shifts the layers above its insertions).
Written only when there is more than one growth, so a once-grown model's config.json is as before; one written
before this list existed reads as its single growth.
"""

from __future__ import annotations

import json

from opt_deus_tool import CheckpointError

GROWTHS = "opt_deus_growths"


def _indices(value, what: str) -> list[int]:
    if not (isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                           for i in value)):
        raise CheckpointError(f"config key {what} must be a list of layer indices, got {value!r}")
    return value


def _same_growth(entry: dict, record: dict) -> bool:
    # Compared as JSON (a tuple read back is a list), without the index map this module adds.
    def canonical(d):
        return json.dumps({k: v for k, v in d.items() if k != "new_layers_final"}, sort_keys=True, default=str)
    return canonical(entry) == canonical(record)


def growth_history(extra: dict) -> list[dict]:
    """The growths of the model whose config (or ModelArgs.extra) is `extra`, oldest first, each its record with
    "new_layers_final". A list whose last growth is not "opt_deus" is a model grown again in memory (grow() on a
    loaded grown model): "opt_deus" is the newest growth and shifts the others. CheckpointError names a
    malformed record."""
    latest, earlier = extra.get("opt_deus"), extra.get(GROWTHS)
    if earlier is not None and not (isinstance(earlier, list) and all(isinstance(g, dict) for g in earlier)):
        raise CheckpointError(f"config key {GROWTHS} must be a list of growth records, got {earlier!r}")
    history = [{**g, "new_layers_final": _indices(g.get("new_layers_final", g.get("new_layers")),
                                                  f"{GROWTHS}[{i}].new_layers_final")}
               for i, g in enumerate(earlier or [])]
    if not isinstance(latest, dict) or (history and _same_growth(history[-1], latest)):
        return history
    if not history and not isinstance(latest.get("new_layers"), list):
        return []  # a record without new layers: none to train or place (check_trainable says so)
    new = set(_indices(latest.get("new_layers"), "opt_deus.new_layers"))
    if history:  # the layers kept by the latest growth: base layer -> its index now
        sources = latest.get("sources")
        if not (isinstance(sources, list) and all(isinstance(s, list) and s for s in sources)):
            raise CheckpointError(f"config key opt_deus has no sources, so the earlier growths of {GROWTHS} cannot "
                                  f"be placed in this model")
        kept = {s[0]: j for j, s in enumerate(sources) if j not in new}
        for i, growth in enumerate(history):
            if any(k not in kept for k in growth["new_layers_final"]):
                raise CheckpointError(f"config key {GROWTHS}[{i}]: new layers {growth['new_layers_final']} are not "
                                      f"all layers of the model that opt_deus grew")
            growth["new_layers_final"] = [kept[k] for k in growth["new_layers_final"]]
    return history + [{**latest, "new_layers_final": sorted(new)}]


def record_growth(base_extra: dict, record: dict) -> list[dict]:
    """The growths of a model grown from a base (its config `base_extra`) by the growth `record`."""
    return growth_history({GROWTHS: growth_history(base_extra), "opt_deus": record})


def new_layers(extra: dict) -> tuple[list[int], str]:
    """What `trainable` "new" trains: the new layers of every growth, and why, in words ([] when none is recorded)."""
    history = growth_history(extra)
    layers = sorted({i for growth in history for i in growth["new_layers_final"]})
    if len(history) <= 1:
        return layers, "those of its growth (config.json opt_deus)"
    parts = [f"growth {n} ({g.get('method', '?')}) {g['new_layers_final']}" for n, g in enumerate(history, 1)]
    return layers, f"those of all {len(history)} growths ({GROWTHS}: {', '.join(parts)})"
