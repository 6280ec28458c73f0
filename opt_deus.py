"""Depth up-scaling: a grown model keeps every base layer and inserts new ones made from the base
layers around each gap, A (below) and B (above): OpT-DeUS (arXiv 2508.08011, Algorithm 1) aligns
A to B by optimal transport and averages them; Avg-DeUS averages; LLaMA Pro copies A; SOLAR repeats
middle layers. A new layer whose o_proj and down_proj are zero is the identity (out_scale 0)."""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import torch.nn.functional as F

if __package__:  # installed (opt_deus_core.opt_deus), or copied into a package of yours
    from .sinkhorn import (SinkhornError, hard_assignment, plan_sharpness, published_sinkhorn,
                           sinkhorn)
else:  # copied alone beside sinkhorn.py
    from sinkhorn import (SinkhornError, hard_assignment, plan_sharpness, published_sinkhorn,
                          sinkhorn)

if TYPE_CHECKING:  # model.py is needed only to grow a model, not to fuse two blocks
    from model import ModelArgs, Transformer


class GrowthError(ValueError):
    """A growth request we cannot carry out (what, and where)."""


# ---- Fusion --------------------------------------------------------------------------------------
# A block: a dict of float tensors keyed as a Block's parameters, e.g. self_attn.q_proj.weight
# (H*d, h), k/v_proj (G*d, h), o_proj (h, H*d), mlp.gate/up_proj (f, h), down_proj (h, f), norms
# (h,): hidden size h, H query heads in G kv groups of d dims, f MLP neurons. The new layer is,
# tensor by tensor, (A aligned to B + B) / 2 (line 9). A plan function: cost (..., n, n), the
# distances from A's units to B's -> (plan, stats), plan^T @ A putting A in B's order.

TOL = 1e-4  # the relative L1 marginal error a plan must meet
MAX_ITER = 10000  # the public code's numItermax (epsilon scaling needs far fewer)
MAX_MARGINAL_ERROR = 0.01  # refused beyond: its rows no longer sum to ~1/n


def transport(cost, epsilon: float, relative: bool, normalize_plan: bool = True, tol: float = TOL,
              max_iter: int = MAX_ITER, strict: bool = False,
              max_marginal_error: float = MAX_MARGINAL_ERROR) -> tuple[torch.Tensor, dict]:
    # Line 7, uniform marginals: cost (..., n, n) -> plan (..., n, n), times n if normalize_plan (OT
    # fusion's T diag(1/b): plan^T @ A keeps A's scale; the public code keeps mass 1). epsilon: in
    # units of each cost's mean if relative; 0: exact assignment.
    n = cost.shape[-1]
    if epsilon == 0:
        plan = F.one_hot(hard_assignment(cost), n).to(cost.dtype) / n
        stats = {"iterations": 0, "marginal_error": 0.0, "converged": True}
    else:
        scale = cost.mean(dim=(-2, -1), keepdim=True).clamp_min(1e-30) if relative else 1.0
        try:
            result = sinkhorn(cost / scale, epsilon=epsilon, tol=tol, max_iter=max_iter,
                              strict=strict)
        except (SinkhornError, ValueError) as e:  # not converged under `strict`; epsilon too small
            raise GrowthError(f"alignment of a {tuple(cost.shape)} cost: {e}") from None
        if not result.marginal_error <= max_marginal_error:  # NaN too
            raise GrowthError(f"alignment of a {tuple(cost.shape)} cost: the plan's marginal error "
                              f"is {result.marginal_error:.3g}, beyond `max_marginal_error` "
                              f"{max_marginal_error:g} (epsilon {epsilon:g}: raise `epsilon` or "
                              f"`max_iter`; `max_marginal_error` inf accepts the plan anyway)")
        plan = result.plan.to(cost.dtype)
        stats = {"iterations": result.iterations, "marginal_error": result.marginal_error,
                 "converged": result.converged}
    stats["sharpness"] = plan_sharpness(plan).mean().item()
    return (plan * n if normalize_plan else plan), stats


def _norm_ratio(aligned, original) -> float:
    return (aligned.norm() / original.norm().clamp_min(1e-30)).item()


def avg_fuse(A: dict, B: dict) -> dict:  # Avg-DeUS
    return {k: (A[k] + B[k]) / 2 for k in A}


def rows(block: dict, name: str) -> torch.Tensor:
    # A projection's rows (n, k), its bias (if any) a last column: a bias moves with its neuron.
    w, b = block[f"{name}.weight"], block.get(f"{name}.bias")
    return w if b is None else torch.cat([w, b[:, None]], -1)


def unrows(name: str, x: torch.Tensor, k: int) -> dict:  # rows()' inverse, k input features
    return {f"{name}.weight": x[:, :k], **({f"{name}.bias": x[:, k]} if x.shape[1] > k else {})}


def _align_rows(name: str, a, b, plan_fn: Callable, features: tuple | None):
    # Lines 3-4, 7-8: a, b (n, k) rows() (a moved by T_in, line 6) -> plan (n, n), plan^T a, stats.
    rows_a, rows_b = (a, b) if features is None else (
        acts[name].reshape(-1, a.shape[0]).T for acts in features)
    plan, stats = plan_fn(torch.cdist(rows_a, rows_b))  # line 4: Euclidean distances; line 7
    aligned = plan.mT @ a  # line 8
    return plan, aligned, {**stats, "norm_ratio": _norm_ratio(aligned, a)}


def paper_fuse(A: dict, B: dict, plan_fn: Callable, features: tuple | None = None):
    """Algorithm 1 as the public code implements it: each matrix's rows aligned on their own, o's
    plan T_o (h, h) standing for the residual stream's (lines 5-6); norms are means. Returns the new
    block and per weight the plan's stats and norm_ratio |aligned A| / |A|."""
    fused, report = {key: (A[key] + B[key]) / 2 for key in A}, {}  # norms: T_in = I (line 6)
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
        plan_o, aligned, report[f"{name}.weight"] = _align_rows(name, rows(A, name), rows(B, name),
                                                                plan_fn, features)  # T_in = I
        for key, value in unrows(name, aligned, A[f"{name}.weight"].shape[1]).items():
            fused[key] = (value + B[key]) / 2  # line 9
    # Lines 5-6: the residual stream "aligned" by o_proj's plan (both layers in fact share it).
    t_in = (plan_o + torch.eye(plan_o.shape[0], device=plan_o.device)) / 2
    key = "post_attention_layernorm.weight"
    aligned = A[key] @ t_in
    report[key] = {"norm_ratio": _norm_ratio(aligned, A[key])}
    fused[key] = (aligned + B[key]) / 2
    for name in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        weight = A[f"{name}.weight"]
        a = rows(A if name == "mlp.down_proj" else {**A, f"{name}.weight": weight @ plan_o}, name)
        b = rows(B, name)
        _, aligned, report[f"{name}.weight"] = _align_rows(name, a, b, plan_fn, features)
        for key, value in unrows(name, aligned, weight.shape[1]).items():
            fused[key] = (value + B[key]) / 2
    return fused, report


def published_fuse(A: dict, B: dict, epsilon: float, max_iter: int = MAX_ITER, strict=False):
    """The public code's average_weight_ot (Model/OT-DUS.py), float32 for float32, POT's solver: on
    real weights it aborts at once with plans of mass ~0, so q, k, v, gate, up come out ~B/2."""
    def plan_fn(cost):  # POT's kernel-space solver on raw distances, whatever it returns
        plan, stats = published_sinkhorn(cost, epsilon, max_iter)
        if strict and not stats["converged"]:
            where = (f"at iteration {stats['abort_iteration']}" if stats["aborted"]
                     else f"in {stats['iterations']} iterations")
            raise GrowthError(f"alignment of a {tuple(cost.shape)} cost: the published solver did "
                              f"not converge ({where}) and `strict` is set")
        return plan, {**stats, "plan_mass": plan.sum().item(),
                      "sharpness": plan_sharpness(plan).mean().item()}

    device = A["mlp.up_proj.weight"].device
    A, B = ({k: v.detach().to("cpu", torch.float32) for k, v in x.items()} for x in (A, B))
    fused, report = paper_fuse(A, B, plan_fn)
    return {k: v.to(device) for k, v in fused.items()}, report


def head_form(block: dict, G: int, d: int) -> tuple[torch.Tensor, ...]:
    # Query head g*r + j reads kv head g (HF's GQA layout, r = H / G); o's columns for a head become
    # rows -> q (G, r, d, k), k (G, d, k), v (G, d, k): rows(), k = h (+ 1: bias); o (G, r, d, h)
    q, k, v = (rows(block, f"self_attn.{p}_proj") for p in "qkv")
    h = block["self_attn.o_proj.weight"].shape[0]
    o = block["self_attn.o_proj.weight"].view(h, G, -1, d).permute(1, 2, 3, 0)
    return q.view(G, -1, d, q.shape[-1]), k.view(G, d, -1), v.view(G, d, -1), o


def by_heads(plan_q, q, o):  # A's group a in B-group b's head order: (G, G, r, d, X) each
    return torch.einsum("abij,aidh->abjdh", plan_q, q), torch.einsum("abij,aidh->abjdh", plan_q, o)


def by_dims(plan_v, v, o_b):  # then value dims in B's order, with the o columns that read them
    return torch.einsum("abst,asx->abtx", plan_v, v), torch.einsum("abst,abjsx->abjtx", plan_v, o_b)


def move_units(block: dict, plans: dict, G: int, d: int) -> dict:
    """The block's units moved by `plans`: with permutation plans a symmetry (the same function),
    with transport plans A in B's order. Heads, then value dims, then groups, as they were made."""
    q, k, v, o = head_form(block, G, d)
    q_b, o_b = by_heads(plans["query_heads"], q, o)
    v_b, o_b = by_dims(plans["value_dims"], v, o_b)
    plan_g, plan_n, h = plans["kv_groups"], plans["mlp_neurons"], o.shape[-1]
    o_moved = torch.einsum("ab,abjdh->bjdh", plan_g, o_b)  # (G, r, d, h), to o_proj's (h, H*d)
    c = q.shape[-1]  # h, or h + 1: the bias column
    return {
        **unrows("self_attn.q_proj", torch.einsum("ab,abjdh->bjdh", plan_g, q_b).reshape(-1, c), h),
        **unrows("self_attn.k_proj", torch.einsum("ab,adh->bdh", plan_g, k).reshape(-1, c), h),
        **unrows("self_attn.v_proj", torch.einsum("ab,abdh->bdh", plan_g, v_b).reshape(-1, c), h),
        "self_attn.o_proj.weight": o_moved.permute(3, 0, 1, 2).reshape(h, -1),
        # an MLP neuron is a unit: gate row, up row (with their biases), down column
        **unrows("mlp.gate_proj", plan_n.T @ rows(block, "mlp.gate_proj"), h),
        **unrows("mlp.up_proj", plan_n.T @ rows(block, "mlp.up_proj"), h),
        "mlp.down_proj.weight": block["mlp.down_proj.weight"] @ plan_n,
    }


def structured_fuse(A: dict, B: dict, num_heads: int, num_kv_heads: int, head_dim: int,
                    plan_fn: Callable, features: tuple | None = None) -> tuple[dict, dict]:
    """Our alignment: Algorithm 1's lines 4, 7-9 on what the symmetries move. The residual stream is
    never permuted (norms, o and down biases: means); whole heads move with their kv group (RoPE's
    pairs intact), value dims within it, MLP neurons as units. Plans, A's units in B's order:
    query_heads (G, G, r, r), value_dims (G, G, d, d) per pair (A's group a, B's group b), kv_groups
    (G, G), mlp_neurons (f, f). features: (A's, B's) block_activations, to compare what units
    compute. Returns the new block, the plans' stats and norm_ratio |aligned A| / |A|."""
    G, d, report, plans = num_kv_heads, head_dim, {}, {}
    r = num_heads // G

    def computed(acts):  # head form over calibration tokens; a head's output in o's place
        q, y = (acts[key].reshape(-1, G, r, d).permute(1, 2, 3, 0)
                for key in ("self_attn.q_proj", "self_attn.heads"))
        k, v = (acts[f"self_attn.{p}_proj"].reshape(-1, G, d).permute(1, 2, 0) for p in "kv")
        return q, k, v, y

    (qa, ka, va, oa), (qb, kb, vb, ob) = ((head_form(A, G, d), head_form(B, G, d))
                                          if features is None else map(computed, features))
    # 1. Query heads, from q alone: keys are shared by the group, o's columns depend on value dims.
    cost_q = torch.cdist(qa.flatten(2)[:, None], qb.flatten(2)[None, :])
    plans["query_heads"], report["attention.query_heads"] = plan_fn(cost_q)
    qa_b, oa_b = by_heads(plans["query_heads"], qa, oa)
    # 2. Value dims within each pair of groups: dim t is v's row t, the o columns of all r heads.
    feat_a = torch.cat([va[:, None].expand(-1, G, -1, -1),
                        oa_b.transpose(2, 3).reshape(G, G, d, -1)], -1)
    feat_b = torch.cat([vb, ob.transpose(1, 2).reshape(G, d, -1)], -1)
    cost_v = torch.cdist(feat_a, feat_b[None].expand(G, G, d, -1))
    plans["value_dims"], report["attention.value_dims"] = plan_fn(cost_v)
    va_b, oa_b = by_dims(plans["value_dims"], va, oa_b)
    # 3. Groups: the cost of matching a to b is the distance left after the alignment inside them.
    cost_g = ((qa_b - qb[None]).pow(2).sum((2, 3, 4)) + (ka[:, None] - kb[None]).pow(2).sum((2, 3))
              + (va_b - vb[None]).pow(2).sum((2, 3))
              + (oa_b - ob[None]).pow(2).sum((2, 3, 4))).sqrt()
    plans["kv_groups"], report["attention.kv_groups"] = plan_fn(cost_g)
    # 4. MLP neurons: gate row, up row and down column (or the neuron's SwiGLU product).
    f = A["mlp.down_proj.weight"].shape[1]
    feat_a, feat_b = ((x["mlp.swiglu"].reshape(-1, f).T for x in features) if features else (
        torch.cat([rows(x, "mlp.gate_proj"), rows(x, "mlp.up_proj"), x["mlp.down_proj.weight"].T],
                  -1) for x in (A, B)))
    plans["mlp_neurons"], report["mlp.neurons"] = plan_fn(torch.cdist(feat_a, feat_b))
    fused = {key: (A[key] + B[key]) / 2 for key in A}  # norms, o and down biases: the residual's
    for key, value in move_units(A, plans, G, d).items():  # the plans move A's weights, once
        report.setdefault(key, {})["norm_ratio"] = _norm_ratio(value, A[key])
        fused[key] = (value + B[key]) / 2
    return fused, report


def block_activations(block: torch.nn.Module, x: torch.Tensor, cos, sin):
    # A model.Block on x (B, T, h) -> (output, what its units compute, float32): each linear's
    # output by name, o's input as "self_attn.heads", down's as "mlp.swiglu". By forward hooks.
    acts, inputs = {}, {"self_attn.o_proj": "self_attn.heads", "mlp.down_proj": "mlp.swiglu"}

    def hook(name, module, args, out):
        acts[name] = out.float()
        acts.update({inputs[name]: args[0].float()} if name in inputs else {})
    handles = [module.register_forward_hook(functools.partial(hook, name))
               for name, module in block.named_modules() if isinstance(module, torch.nn.Linear)]
    try:  # no hook left on the caller's model
        with torch.no_grad():
            return block(x, cos, sin), acts
    finally:
        for handle in handles:
            handle.remove()


# ---- Growth options ----------------------------------------------------------------------------

METHODS = ("opt", "avg", "llama-pro", "solar")
ALIGNMENTS = ("structured", "paper", "published")
POSITIONS = ("top", "bottom", "middle", "top-bottom", "uniform")
COSTS = ("weights", "activations")
# Sinkhorn's epsilon: paper, published: the public code's 0.06 on raw distances; structured: 0.005
# of each cost's mean, which keeps real MLP plans sharp at any scale (docs/ALIGNMENT.md).
DEFAULT_EPSILON = {"paper": 0.06, "structured": 0.005, "published": 0.06}


def option(default, help: str, **metadata):  # a field, with its flag's help
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class GrowthOptions:
    # How new layers are made; each field is also the command line's flag of the same name.
    method: str = option("opt", "how new layers are made", choices=METHODS)
    align: str = option("structured", "opt's alignment; published: the code's", choices=ALIGNMENTS)
    epsilon: float | None = option(None, f"Sinkhorn's (0: exact); None: {DEFAULT_EPSILON}")
    normalize_plan: bool = option(True, "scale plans by n (OT fusion); off: the public code's")
    max_iter: int = option(MAX_ITER, "Sinkhorn iterations at most, per plan")
    tol: float = option(TOL, "Sinkhorn stops at this relative marginal error")
    strict: bool = option(False, "fail if a Sinkhorn plan does not converge")
    max_marginal_error: float = option(MAX_MARGINAL_ERROR, "refuse plans beyond it (inf: any)")
    cost: str = option("weights", "opt's plans compare weights or activations", choices=COSTS)
    out_scale: float | None = option(None, "new o_proj and down_proj times this (0: zero-init, the "
                                     "base's function); None: 0 for opt, llama-pro, else 1")

    def __post_init__(self):  # the one check of each option
        for f in dataclasses.fields(self):
            if getattr(self, f.name) not in f.metadata.get("choices", (getattr(self, f.name),)):
                raise GrowthError(f"unknown `{f.name}` {getattr(self, f.name)!r} "
                                  f"(choose from {', '.join(f.metadata['choices'])})")
        # Activation distances have no scale of their own: epsilon is then relative, for paper too.
        default = DEFAULT_EPSILON["structured" if self.cost == "activations" else self.align]
        self.epsilon = default if self.epsilon is None else self.epsilon
        if self.out_scale is None:
            self.out_scale = 0.0 if self.method in ("opt", "llama-pro") else 1.0
        published = self.align == "published"  # the public code: weights, Sinkhorn, raw plans
        for name, ok, rule in (
                ("cost", not (published and self.cost == "activations"), "weights if published"),
                ("epsilon", 0 < self.epsilon <= 1e30 or not published and self.epsilon == 0,
                 "a finite number >= 0, at most 1e30 (published needs `epsilon` > 0)"),
                ("tol", 0 < self.tol < float("inf"), "a finite number > 0"),
                ("max_iter", self.max_iter >= 1, "an integer >= 1"),
                ("max_marginal_error", self.max_marginal_error > 0, "> 0 (inf: accept any plan)"),
                ("out_scale", 0 <= self.out_scale <= 1e30, "a finite number >= 0")):
            if not ok:
                raise GrowthError(f"`{name}` must be {rule}, got {getattr(self, name)!r}")
        self.normalize_plan = self.normalize_plan and not published


def plan_function(options: GrowthOptions) -> Callable:
    # The one place deciding how plans are made: epsilon absolute on raw weight distances in the
    # paper's recipe (the public code's 0.06), else relative to each cost's mean.
    relative = options.align == "structured" or options.cost == "activations"
    return functools.partial(transport, epsilon=options.epsilon, relative=relative, tol=options.tol,
                             normalize_plan=options.normalize_plan, max_iter=options.max_iter,
                             strict=options.strict, max_marginal_error=options.max_marginal_error)


def make_new_block(sources: list[dict], args: ModelArgs, options: GrowthOptions,
                   features: list[dict] | None = None) -> tuple[dict, dict]:
    # A new block's tensors (float32, keyed as Block.state_dict()) from its source blocks, and a
    # report. features: the sources' block_activations, for cost="activations".
    A, B = ({key: value.float() for key, value in x.items()} for x in (sources[0], sources[-1]))
    features = (features[0], features[-1]) if options.cost == "activations" else None
    if options.method in ("llama-pro", "solar"):  # a copy of the single source
        block, report = {k: v.clone() for k, v in A.items()}, {}
    elif options.method == "avg":
        block, report = avg_fuse(A, B), {}
    elif options.align == "published":
        block, report = published_fuse(A, B, options.epsilon, options.max_iter, options.strict)
    elif options.align == "paper":
        block, report = paper_fuse(A, B, plan_function(options), features)
    else:
        heads = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        block, report = structured_fuse(A, B, *heads, plan_function(options), features)
    if options.out_scale != 1:  # what writes into the residual stream, biases too; 0: identity
        for key in [k for k in block if k.startswith(("self_attn.o_proj.", "mlp.down_proj."))]:
            scale, value = options.out_scale, block[key]
            block[key] = value * scale if scale else torch.zeros_like(value)
    return block, report


# ---- Where new layers go: pure functions of the layer counts -------------------------------------


def insert_after_for(position: str, num_base_layers: int, num_new: int, method: str = "opt"):
    # A new layer after each base layer i returned (L - 1 gaps); top, num_new = L/2: the paper's;
    # llama-pro's uniform: LLaMA Pro's block expansion (32 -> 48: after 1, 3, ..., 31).
    block_expansion = method == "llama-pro" and position == "uniform"
    gaps = num_base_layers if block_expansion else num_base_layers - 1

    def pick(k: int) -> list[int]:  # k <= gaps distinct gaps
        if position == "top":
            return list(range(gaps - k, gaps))
        if position == "bottom":
            return list(range(k))
        if position == "middle":
            return list(range((gaps - k) // 2, (gaps - k) // 2 + k))
        if position == "top-bottom":
            return sorted(set(range(k - k // 2)) | set(range(gaps - k // 2, gaps)))
        if block_expansion:  # the last layer of each of k equal groups of layers
            return [(j + 1) * gaps // k - 1 for j in range(k)]
        return [int((j + 0.5) * gaps / k) for j in range(k)]  # uniform: centred in k segments

    full, rest = divmod(num_new, gaps)
    return sorted(list(range(gaps)) * full + pick(rest))


# A layer of the grown model: a base layer kept (new False), or a new one made from `sources`.
Slot = collections.namedtuple("Slot", "sources new")


def make_layout(method: str, L: int, insert_after: list[int] | None, num_new: int | None = None):
    if method == "solar":
        # SOLAR: [0, L - m_top) of one copy, then [m_bottom, L) of another; the repeats are new.
        m_top = (L - num_new) // 2
        m_bottom = L - num_new - m_top
        return ([Slot((i,), False) for i in range(L - m_top)]
                + [Slot((i,), True) for i in range(m_bottom, L - m_top)]
                + [Slot((i,), False) for i in range(L - m_top, L)])
    layout = []
    for i in range(L):
        layout.append(Slot((i,), False))
        for _ in range(insert_after.count(i)):  # llama-pro copies the layer below; the rest fuse
            layout.append(Slot((i,) if method == "llama-pro" else (i, i + 1), True))
    return layout


def growth_layout(options: GrowthOptions, L: int, num_new: int | None, position: str | None,
                  insert_after: list[int] | None) -> tuple[list[Slot], dict]:
    # The one check of where new layers go; the layout; the record config.json keeps as "opt_deus".
    if num_new is not None and num_new <= 0:
        raise GrowthError(f"the number of new layers `num_new` must be a positive integer, "
                          f"got {num_new}")
    if options.method == "solar":
        if insert_after is not None or num_new is None or num_new > L:
            raise GrowthError(f"solar places its repeated layers itself (no `insert_after`), at "
                              f"most all {L} layers, got K={num_new}")
    elif insert_after is None:
        if num_new is None or position not in POSITIONS:
            raise GrowthError(f"give `num_new` and a `position` ({', '.join(POSITIONS)}), or "
                              f"`insert_after`; got {num_new}, {position!r}")
        if L < 2 and not (options.method == "llama-pro" and position == "uniform"):
            raise GrowthError(f"a base model of {L} layer(s) has no gap between layers to grow in")
        insert_after = insert_after_for(position, L, num_new, options.method)
    elif not insert_after or num_new not in (None, len(insert_after)):
        raise GrowthError(f"`num_new` {num_new} disagrees with {len(insert_after)} `insert_after` "
                          f"positions")
    top = L - 1 if options.method == "llama-pro" else L - 2  # a llama-pro copy follows its source
    for i in insert_after or ():
        if not 0 <= i <= top:
            raise GrowthError(f"`insert_after` {i} is out of range: a new layer goes after base "
                              f"layer i, 0 <= i <= {top} ({options.method})")
    layout = make_layout(options.method, L, insert_after, num_new)
    opt = {key: getattr(options, key) if options.method == "opt" else None
           for key in ("align", "epsilon", "normalize_plan", "cost")}  # what only OpT-DeUS has
    record = {"method": options.method, **opt, "zero_init": options.out_scale == 0,
              "out_scale": options.out_scale, "position": position, "insert_after": insert_after,
              "base_num_layers": L, "new_layers": [i for i, slot in enumerate(layout) if slot.new],
              "sources": [list(slot.sources) for slot in layout]}
    if options.method == "opt" and options.align == "published":
        record["note"] = ("align published reproduces the public OpT-DeUS code's numbers (float32 "
                          "POT Sinkhorn, raw plans); it is not a recommendation: on real weights "
                          "that solver aborts at its first iteration, leaving near-zero plans (see "
                          "each matrix's aborted, abort_iteration, plan_mass)")
    return layout, record


# ---- The growth driver, behind grow() and streaming growth (opt_deus_tool/grow_cli.py) ---------


def grown_args(args: ModelArgs, record: dict) -> ModelArgs:
    # Qwen's per-layer layer_types follow each layer's first source, the layer it sits on (in-memory
    # growth starts a new block as its copy, window too).
    sources = record["sources"]
    per_layer = {} if args.layer_types is None else {
        "layer_types": [args.layer_types[s[0]] for s in sources],
        "max_window_layers": sum(s[0] < args.max_window_layers for s in sources)}
    return dataclasses.replace(args, num_hidden_layers=len(sources), **per_layer,
                               extra={**args.extra, "opt_deus": record})


class Growth:
    # One growth (grow()'s arguments): checks the request, lays out the grown model (layout, record,
    # args), yields its layers in order (blocks) and reports how (report).

    def __init__(self, args: ModelArgs, num_new, position, insert_after, options, calibration):
        self.options, self.layers = options or GrowthOptions(), []
        by_acts = self.options.cost == "activations"
        self.calibration = calibration if by_acts else None
        if by_acts and calibration is None:
            raise GrowthError("`cost` activations needs `calibration` tokens")
        self.layout, self.record = growth_layout(self.options, args.num_hidden_layers, num_new,
                                                 position, insert_after)
        self.args = grown_args(args, self.record)

    def blocks(self, base_block: Callable, run_block: Callable | None = None, hidden=None,
               log: Callable | None = None) -> Iterator[tuple[int, Slot, dict]]:
        # (index, slot, tensors) per layer: base_block(i)'s for a kept one, make_new_block's for a
        # new one. cost="activations": hidden (B, T, h) carried up the base as it is read, by
        # run_block(i, tensors, hidden) -> (output, block_activations). The two base blocks read
        # last are held: each is read once, at most two in memory (streaming growth's bound).
        held: dict[int, tuple[dict, dict | None]] = {}  # base layer -> (tensors, activations)

        def source(i: int) -> tuple[dict, dict | None]:
            nonlocal hidden
            if i not in held:  # evicting the oldest read, not the lowest: SOLAR jumps back down
                tensors, features = base_block(i), None
                if self.options.cost == "activations":
                    hidden, features = run_block(i, tensors, hidden)
                held[i] = tensors, features
                while len(held) > 2:
                    del held[next(iter(held))]
            return held[i]

        started, total = time.perf_counter(), sum(slot.new for slot in self.layout)
        for index, slot in enumerate(self.layout):
            if not slot.new:
                yield index, slot, source(slot.sources[0])[0]
                continue
            layer_start = time.perf_counter()
            sources = [source(i) for i in slot.sources]
            tensors, matrices = make_new_block([s[0] for s in sources], self.args, self.options,
                                               [s[1] for s in sources])
            del sources  # before the next read, or a third base block would stay alive
            self.layers.append({"index": index, "sources": list(slot.sources),
                                "seconds": time.perf_counter() - layer_start, "matrices": matrices})
            done, elapsed = len(self.layers), time.perf_counter() - started
            if log:
                log(f"[{done}/{total}] new layer {index} from base {list(slot.sources)}  "
                    f"elapsed {elapsed:.1f}s  ETA {elapsed / done * (total - done):.1f}s")
            yield index, slot, tensors

    def report(self, base: str | None = None) -> dict:
        tokens = None if self.calibration is None else int(self.calibration.shape[1])
        return {**self.record, "options": dataclasses.asdict(self.options), "base": base,
                "layers": self.layers, "calibration_tokens": tokens}


def grow(model: Transformer, num_new: int | None = None, *, position: str | None = "top",
         insert_after: list[int] | None = None, options: GrowthOptions | None = None,
         log: Callable[[str], None] | None = None, calibration: torch.Tensor | None = None):
    """A deeper copy of `model` (not modified) with new layers at `position` (insert_after_for) or
    after the base layers in insert_after, made as `options` say; its args.extra["opt_deus"] is the
    growth record. And the report: per new layer its plans' stats. calibration: token ids (B, T)."""
    growth = Growth(model.current_args(), num_new, position, insert_after, options, calibration)
    grown, dtype = copy.deepcopy(model), next(model.parameters()).dtype
    grown.args, layers, hidden, cos, sin = growth.args, [], None, None, None
    if growth.calibration is not None:
        with torch.no_grad():
            hidden, cos, sin = model.embed(calibration.to(model.embed_tokens.weight.device))
    run = lambda i, tensors, x: block_activations(model.layers[i], x, cos, sin)  # noqa: E731
    for _, slot, tensors in growth.blocks(lambda i: model.layers[i].state_dict(), run, hidden, log):
        layers.append(copy.deepcopy(model.layers[slot.sources[0]]) if slot.new
                      else grown.layers[slot.sources[0]])
        if slot.new:
            layers[-1].load_state_dict({key: value.to(dtype) for key, value in tensors.items()})
    grown.layers = torch.nn.ModuleList(layers)
    return grown, growth.report()
