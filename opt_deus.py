"""Depth up-scaling: a grown model keeps every base layer and inserts new ones made from the base
layers around each gap, A (below) and B (above): OpT-DeUS (arXiv 2508.08011, Algorithm 1) aligns
A to B by optimal transport and averages them; Avg-DeUS averages; LLaMA Pro copies A; SOLAR repeats
middle layers; LESA predicts it. With o_proj and down_proj zero, a new layer is the identity."""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import time
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

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


# ---- Fusion
# A block: a dict of float tensors keyed as a Block's parameters: self_attn.q_proj.weight (H*d, h),
# k/v_proj (G*d, h), o_proj (h, H*d), mlp.gate/up_proj (f, h), down_proj (h, f), norms (h,), for
# hidden size h, H query heads in G kv groups of d dims, f MLP neurons. A plan function: a cost
# (..., n, n), A's units' distances to B's -> (plan, stats); plan^T @ A puts A in B's order.
TOL = 1e-4  # the relative L1 marginal error a plan must meet
MAX_ITER = 10000  # the public code's numItermax (epsilon scaling needs far fewer)
MAX_MARGINAL_ERROR = 0.01  # refused beyond: its rows no longer sum to ~1/n


def transport(cost, epsilon: float, relative: bool, normalize_plan: bool = True, tol: float = TOL,
              max_iter: int = MAX_ITER, strict: bool = False,
              max_marginal_error: float = MAX_MARGINAL_ERROR) -> tuple[torch.Tensor, dict]:
    # Line 7, uniform marginals: cost (..., n, n) -> plan, times n if normalize_plan (OT fusion's T
    # diag(1/b): A's scale kept; public code: mass 1). epsilon: in cost means if relative; 0: exact.
    n, where = cost.shape[-1], f"alignment of a {tuple(cost.shape)} cost"
    if epsilon == 0:
        plan = F.one_hot(hard_assignment(cost), n).to(cost.dtype) / n
        stats = {"iterations": 0, "marginal_error": 0.0, "converged": True}
    else:
        scaled = cost / (cost.mean((-2, -1), keepdim=True).clamp_min(1e-30) if relative else 1.0)
        try:
            result = sinkhorn(scaled, epsilon=epsilon, tol=tol, max_iter=max_iter, strict=strict)
        except (SinkhornError, ValueError) as e:  # not converged under `strict`; epsilon too small
            raise GrowthError(f"{where}: {e}") from None
        if not result.marginal_error <= max_marginal_error:  # NaN too
            raise GrowthError(f"{where}: marginal error is {result.marginal_error:.3g}, beyond "
                              f"`max_marginal_error` {max_marginal_error:g} (raise `epsilon`)")
        plan = result.plan.to(cost.dtype)
        stats = {key: getattr(result, key) for key in ("iterations", "marginal_error", "converged")}
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


def paper_fuse(A: dict, B: dict, plan_fn: Callable, features: tuple | None = None):
    """Algorithm 1 as the public code does it: each matrix's rows aligned alone, o's plan T_o (h, h)
    standing for the residual stream's (lines 5-6). Reports stats, norm_ratio |aligned A| / |A|."""
    fused, report = avg_fuse(A, B), {}  # norms: T_in = I (line 6)

    def fuse(name, block):  # lines 3-4, 7-9 on the block's rows of `name` -> the plan
        a = rows(block, name)  # (n, k)
        cost_a, cost_b = (a, rows(B, name)) if features is None else (
            acts[name].reshape(-1, a.shape[0]).T for acts in features)
        plan, stats = plan_fn(torch.cdist(cost_a, cost_b))  # line 4: Euclidean distances; line 7
        aligned = plan.mT @ a  # line 8
        report[f"{name}.weight"] = {**stats, "norm_ratio": _norm_ratio(aligned, a)}
        for key, value in unrows(name, aligned, block[f"{name}.weight"].shape[1]).items():
            fused[key] = (value + B[key]) / 2  # line 9
        return plan
    for p in "qkvo":  # T_in = I
        plan_o = fuse(f"self_attn.{p}_proj", A)
    # Lines 5-6: the residual stream "aligned" by o_proj's plan (both layers in fact share it).
    key, eye = "post_attention_layernorm.weight", torch.eye(len(plan_o), device=plan_o.device)
    aligned = A[key] @ ((plan_o + eye) / 2)  # T_in
    report[key], fused[key] = {"norm_ratio": _norm_ratio(aligned, A[key])}, (aligned + B[key]) / 2
    for name in ("mlp.gate_proj", "mlp.up_proj"):  # their inputs in o's order
        fuse(name, {**A, f"{name}.weight": A[f"{name}.weight"] @ plan_o})
    fuse("mlp.down_proj", A)
    return fused, report


def published_fuse(A: dict, B: dict, epsilon: float, max_iter: int = MAX_ITER, strict=False):
    """The public code's average_weight_ot (Model/OT-DUS.py), float32 for float32, POT's solver: on
    real weights it aborts at once with plans of mass ~0, so q, k, v, gate, up come out ~B/2."""
    def plan_fn(cost):  # POT's kernel-space solver on raw distances, whatever it returns
        plan, stats = published_sinkhorn(cost, epsilon, max_iter)
        if strict and not stats["converged"]:
            raise GrowthError(f"alignment of a {tuple(cost.shape)} cost: the published solver did "
                              f"not converge (at iteration {stats['iterations']}"
                              f"{', aborted' * stats['aborted']}) and `strict` is set")
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
    o = block["self_attn.o_proj.weight"].unflatten(1, (G, -1, d)).permute(1, 2, 3, 0)
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
    plan_g, plan_n, h, c = plans["kv_groups"], plans["mlp_neurons"], o.shape[-1], q.shape[-1]
    o_moved = torch.einsum("ab,abjdh->bjdh", plan_g, o_b)  # (G, r, d, h), to o_proj's (h, H*d)
    return {
        **unrows("self_attn.q_proj", torch.einsum("ab,abjdh->bjdh", plan_g, q_b).reshape(-1, c), h),
        **unrows("self_attn.k_proj", torch.einsum("ab,adh->bdh", plan_g, k).reshape(-1, c), h),
        **unrows("self_attn.v_proj", torch.einsum("ab,abdh->bdh", plan_g, v_b).reshape(-1, c), h),
        "self_attn.o_proj.weight": o_moved.permute(3, 0, 1, 2).reshape(h, -1),
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
    (G, G), mlp_neurons (f, f). features: A's and B's block_activations. Returns as paper_fuse."""
    G, d, r, report, plans = num_kv_heads, head_dim, num_heads // num_kv_heads, {}, {}

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
    feat_a, feat_b = ((x["mlp.swiglu"].flatten(0, -2).T for x in features) if features else (
        torch.cat([rows(x, "mlp.gate_proj"), rows(x, "mlp.up_proj"), x["mlp.down_proj.weight"].T],
                  -1) for x in (A, B)))
    plans["mlp_neurons"], report["mlp.neurons"] = plan_fn(torch.cdist(feat_a, feat_b))
    fused = avg_fuse(A, B)  # norms, o and down biases: the residual's
    for key, value in move_units(A, plans, G, d).items():  # the plans move A's weights, once
        report.setdefault(key, {})["norm_ratio"] = _norm_ratio(value, A[key])
        fused[key] = (value + B[key]) / 2
    return fused, report


def block_activations(block: nn.Module, x: torch.Tensor, cos, sin):
    # A model.Block on x (B, T, h) -> (output, what its units compute, float32): each linear's
    # output by name, o's input as "self_attn.heads", down's as "mlp.swiglu".
    acts, inputs = {}, {"self_attn.o_proj": "self_attn.heads", "mlp.down_proj": "mlp.swiglu"}

    def hook(name, module, args, out):
        acts[name] = out.float()
        acts.update({inputs[name]: args[0].float()} if name in inputs else {})
    handles = [module.register_forward_hook(functools.partial(hook, name))
               for name, module in block.named_modules() if isinstance(module, nn.Linear)]
    try:  # no hook left on the caller's model
        with torch.no_grad():
            return block(x, cos, sin), acts
    finally:
        for handle in handles:
            handle.remove()


# ---- LESA (Yang et al. 2025, arXiv 2502.13794): a new layer predicted from its neighbours
LESA_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def lesa_fit(mats: list, gaps, seed: int, w: int = 256, epochs: int = 10, lam: float = 5e-4):
    # mats: a projection's rows() (n, k) in each of the L base layers. SVD: [W_0 ... W_L-1] = U S
    # [V_0 ... V_L-1], W_i = U S V_i. G, a ReLU MLP (width w), learns V_i from [V_i-1, V_i+1] row by
    # row, loss (1 - lam) MSE + lam (|G x| - |V|)^2; the new layer after base layer i is U S G([V_i,
    # V_i+1]). heldout_error, on a tenth of the rows: |S (G x - V)| / |S V|.
    L, k = len(mats), mats[0].shape[1]
    U, S, Vh = torch.linalg.svd(torch.cat(mats, 1), full_matrices=False)
    V, r = Vh.view(-1, L, k).transpose(0, 1), len(S)  # (L, r, k)
    x, y = torch.cat([V[:-2], V[2:]], 2).flatten(0, 1), V[1:-1].flatten(0, 1)  # ((L-2) r, 2k | k)
    with torch.random.fork_rng(devices=[]):  # seeded; the caller's generator is left as it was
        torch.manual_seed(seed)
        G = nn.Sequential(nn.Linear(2 * k, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(),
                          nn.Linear(w, k))
        test, train = torch.randperm(len(x)).tensor_split([max(1, len(x) // 10)])
        optimizer = torch.optim.AdamW(G.parameters(), lr=1e-3)
        for _ in range(epochs):
            losses = []
            for batch in train[torch.randperm(len(train))].split(64):
                out, target = G(x[batch]), y[batch]
                loss = (1 - lam) * F.mse_loss(out, target) + lam * (out.norm() - target.norm()) ** 2
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
    with torch.no_grad():
        s = S[test % r, None]
        error = ((G(x[test]) - y[test]) * s).norm() / (y[test] * s).norm().clamp_min(1e-30)
        new = {i: (U * S) @ G(torch.cat([V[i], V[i + 1]], 1)) for i in set(gaps)}
    return new, {"train_loss": sum(losses) / len(losses), "heldout_error": error.item(), "rank": r}


# ---- Growth options
METHODS = ("opt", "avg", "llama-pro", "solar", "lesa")
ALIGNMENTS = ("structured", "paper", "published")
POSITIONS = ("top", "bottom", "middle", "top-bottom", "uniform")
COSTS = ("weights", "activations")
# The public code's 0.06 on raw distances; structured: 0.005 of a cost's mean (docs/ALIGNMENT.md).
DEFAULT_EPSILON = {"paper": 0.06, "structured": 0.005, "published": 0.06}


def option(default, help: str, **metadata):
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


@dataclasses.dataclass
class GrowthOptions:
    # How new layers are made; each field is also the command line's flag.
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
    seed: int = option(0, "lesa's predictor: its initialisation and sample order")

    def __post_init__(self):  # the one check of each option
        for f in dataclasses.fields(self):
            if (value := getattr(self, f.name)) not in f.metadata.get("choices", (value,)):
                raise GrowthError(f"unknown `{f.name}` {value!r}: one of {f.metadata['choices']}")
        if self.epsilon is None:  # activation distances have no scale of their own: relative
            self.epsilon = DEFAULT_EPSILON[self.align if self.cost == "weights" else "structured"]
        if self.out_scale is None:
            self.out_scale = 0.0 if self.method in ("opt", "llama-pro") else 1.0
        published = self.align == "published"
        for name, ok, rule in (
                ("cost", self.cost == "weights" or self.method == "opt" and not published,
                 "weights unless `method` opt (structured or paper)"),
                ("epsilon", 0 < self.epsilon <= 1e30 or not published and self.epsilon == 0,
                 "a finite number >= 0, at most 1e30 (published needs `epsilon` > 0)"),
                ("tol", 0 < self.tol < float("inf"), "a finite number > 0"),
                ("max_iter", self.max_iter >= 1, "an integer >= 1"),
                ("max_marginal_error", self.max_marginal_error > 0, "> 0 (inf: accept any plan)"),
                ("out_scale", 0 <= self.out_scale <= 1e30, "a finite number >= 0")):
            if not ok:
                raise GrowthError(f"`{name}` must be {rule}, got {getattr(self, name)!r}")
        self.normalize_plan = self.normalize_plan and not published


def plan_function(options: GrowthOptions) -> Callable:  # the one place deciding how plans are made
    keys = ("epsilon", "tol", "normalize_plan", "max_iter", "strict", "max_marginal_error")
    relative = options.align == "structured" or options.cost == "activations"
    return functools.partial(transport, relative=relative, **{k: getattr(options, k) for k in keys})


def make_new_block(sources: list[dict], args: ModelArgs, options: GrowthOptions,
                   features: list[dict] | None = None, predicted: dict | None = None):
    # A new block's tensors (float32, as Block.state_dict()) from its source blocks, and a report.
    # features: the sources' block_activations (cost="activations"); predicted: lesa's projections.
    A, B = ({k: v.float() for k, v in x.items()} for x in (sources[0], sources[-1]))
    features = (features[0], features[-1]) if options.cost == "activations" else None
    if options.method in ("llama-pro", "solar"):  # a copy of the single source
        block, report = {k: v.clone() for k, v in A.items()}, {}
    elif options.method == "avg":
        block, report = avg_fuse(A, B), {}
    elif options.method == "lesa":  # norms, Qwen3's q/k norms too, are A's
        block, report = {**A, **predicted}, {}
    elif options.align == "published":
        block, report = published_fuse(A, B, options.epsilon, options.max_iter, options.strict)
    elif options.align == "paper":
        block, report = paper_fuse(A, B, plan_function(options), features)
    else:
        heads = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        block, report = structured_fuse(A, B, *heads, plan_function(options), features)
    scale = options.out_scale  # of what writes into the residual stream, biases too; 0: identity
    for key in [k for k in block if k.startswith(("self_attn.o_proj.", "mlp.down_proj."))]:
        block[key] = block[key] * scale if scale else torch.zeros_like(block[key])
    return block, report


# ---- Where new layers go: pure functions of the layer counts
def insert_after_for(position: str, num_base_layers: int, num_new: int, method: str = "opt"):
    # A new layer after each base layer i returned (L - 1 gaps); top, num_new = L/2: the paper's;
    # llama-pro's uniform: LLaMA Pro's block expansion (32 -> 48: after 1, 3, ..., 31).
    block_expansion = method == "llama-pro" and position == "uniform"
    gaps = num_base_layers if block_expansion else num_base_layers - 1

    def pick(k):  # k <= gaps distinct gaps
        first = {"top": gaps - k, "bottom": 0, "middle": (gaps - k) // 2}.get(position)
        if first is not None:
            return list(range(first, first + k))
        if position == "top-bottom":
            return sorted(set(range(k - k // 2)) | set(range(gaps - k // 2, gaps)))
        if block_expansion:  # the last layer of each of k equal groups of layers
            return [(j + 1) * gaps // k - 1 for j in range(k)]
        return [int((j + 0.5) * gaps / k) for j in range(k)]  # uniform: centred in k segments
    full, rest = divmod(num_new, gaps)
    return sorted(list(range(gaps)) * full + pick(rest))


Slot = collections.namedtuple("Slot", "sources new")  # a grown layer: kept, or new from sources


def make_layout(method: str, L: int, insert_after: list[int] | None, num_new: int | None = None):
    if method == "solar":
        # SOLAR: [0, L - m_top) of one copy, then [m_bottom, L) of another; the repeats are new.
        m_top, m_bottom = (L - num_new) // 2, (L - num_new + 1) // 2
        return ([Slot((i,), False) for i in range(L - m_top)]
                + [Slot((i,), i < L - m_top) for i in range(m_bottom, L)])
    layout = []
    for i in range(L):  # llama-pro copies the layer below; the rest fuse
        new = Slot((i,) if method == "llama-pro" else (i, i + 1), True)
        layout += [Slot((i,), False)] + [new] * insert_after.count(i)
    return layout


def growth_layout(options: GrowthOptions, L: int, num_new: int | None, position: str | None,
                  insert_after: list[int] | None) -> tuple[list[Slot], dict]:
    # The one check of where new layers go; the layout; the record config.json keeps as "opt_deus".
    if num_new is not None and num_new <= 0:
        raise GrowthError(f"new layers `num_new` must be a positive integer, got {num_new}")
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
        raise GrowthError(f"`num_new` {num_new} != {len(insert_after)} `insert_after` positions")
    if options.method == "lesa" and L < 3:
        raise GrowthError(f"lesa learns a layer from its neighbours: needs 3 base layers, got {L}")
    top = L - 1 if options.method == "llama-pro" else L - 2  # a llama-pro copy follows its source
    for i in insert_after or ():
        if not 0 <= i <= top:
            raise GrowthError(f"`insert_after` {i} is out of range 0..{top} ({options.method})")
    layout = make_layout(options.method, L, insert_after, num_new)
    opt = {key: getattr(options, key) if options.method == "opt" else None
           for key in ("align", "epsilon", "normalize_plan", "cost")}  # what only OpT-DeUS has
    record = {"method": options.method, **opt, "zero_init": options.out_scale == 0,
              "out_scale": options.out_scale, "position": position, "insert_after": insert_after,
              "base_num_layers": L, "new_layers": [i for i, slot in enumerate(layout) if slot.new],
              "sources": [list(slot.sources) for slot in layout]}
    if options.method == "opt" and options.align == "published":
        record["note"] = "the public code's numbers, not a recommendation: docs/ALIGNMENT.md"
    return layout, record


# ---- The growth driver, behind grow() and streaming growth (opt_deus_tool/grow_cli.py)
def grown_args(args: ModelArgs, record: dict) -> ModelArgs:
    # Qwen's per-layer layer_types follow each layer's first source: grow() copies it, window too.
    sources = record["sources"]
    per_layer = {} if args.layer_types is None else {
        "layer_types": [args.layer_types[s[0]] for s in sources],
        "max_window_layers": sum(s[0] < args.max_window_layers for s in sources)}
    # A grown model grown again keeps its earlier growths (opt_deus_tool/growths.py places them).
    old = args.extra.get("opt_deus_growths") or [*filter(None, [args.extra.get("opt_deus")])]
    return dataclasses.replace(args, num_hidden_layers=len(sources), **per_layer, extra={
        **args.extra, "opt_deus": record, **({"opt_deus_growths": old} if old else {})})


class Growth:
    # One growth (grow()'s arguments): its checks, layout, record, args, layers (blocks) and report.
    def __init__(self, args: ModelArgs, num_new, position, insert_after, options, calibration):
        self.options, self.layers, self.predictors = options or GrowthOptions(), [], {}
        c, acts = calibration, self.options.cost == "activations"
        if acts and not (c is not None and c.dim() == 2 and not c.is_floating_point()
                         and c.numel() >= 16 and 0 <= c.min() and c.max() < args.vocab_size
                         and c.shape[1] <= args.max_position_embeddings):
            raise GrowthError("`cost` activations needs `calibration`, token ids (B, T): integers, "
                              "at least 16, below vocab_size, T at most max_position_embeddings")
        self.calibration = c if acts else None
        self.layout, self.record = growth_layout(self.options, args.num_hidden_layers, num_new,
                                                 position, insert_after)
        self.args = grown_args(args, self.record)

    def blocks(self, base_block: Callable, run_block: Callable | None = None, hidden=None,
               log: Callable | None = None) -> Iterator[tuple[int, Slot, dict]]:
        # (index, slot, tensors) per layer: base_block(i)'s if kept, make_new_block's if new. With
        # cost="activations", hidden (B, T, h) goes up the base by run_block(i, tensors, hidden) ->
        # (output, block_activations). Base blocks read once (lesa: all first), the last two held.
        held = {}  # base layer -> source(i)

        def source(i):  # -> (tensors, activations)
            nonlocal hidden
            if i not in held:  # evicting the oldest read, not the lowest: SOLAR jumps back down
                tensors, features = base_block(i), None
                if self.options.cost == "activations":
                    hidden, features = run_block(i, tensors, hidden)
                held[i] = tensors, features
                while len(held) > 2:
                    del held[next(iter(held))]
            return held[i]
        predicted = self.lesa(base_block, log) if self.options.method == "lesa" else {}
        started, total = time.perf_counter(), sum(slot.new for slot in self.layout)
        for index, slot in enumerate(self.layout):
            if not slot.new:
                yield index, slot, source(slot.sources[0])[0]
                continue
            layer_start = time.perf_counter()
            blocks, features = zip(*map(source, slot.sources))
            tensors, matrices = make_new_block(blocks, self.args, self.options, features,
                                               predicted.get(slot.sources[0]))
            del blocks, features  # before the next read, or a third base block would stay alive
            self.layers.append({"index": index, "sources": list(slot.sources),
                                "seconds": time.perf_counter() - layer_start, "matrices": matrices})
            done, elapsed = len(self.layers), time.perf_counter() - started
            if log:
                log(f"[{done}/{total}] new layer {index} from base {list(slot.sources)}  "
                    f"elapsed {elapsed:.1f}s  ETA {elapsed / done * (total - done):.1f}s")
            yield index, slot, tensors

    def lesa(self, base_block: Callable, log: Callable | None) -> dict:
        # The whole base, read once -> {base layer i: the projections of the new layer after it}.
        blocks = [base_block(i) for i in range(self.record["base_num_layers"])]
        gaps, predicted = self.record["insert_after"], collections.defaultdict(dict)
        for name in LESA_NAMES:
            started = time.perf_counter()
            new, stats = lesa_fit([rows(b, name).float() for b in blocks], gaps, self.options.seed)
            for i, x in new.items():
                predicted[i].update(unrows(name, x, blocks[0][f"{name}.weight"].shape[1]))
            self.predictors[name] = {**stats, "seconds": round(time.perf_counter() - started, 2)}
            if log:
                log(f"lesa {name}: {self.predictors[name]}")
        return predicted

    def report(self, base: str | None = None) -> dict:
        tokens = None if self.calibration is None else int(self.calibration.shape[1])
        return {**self.record, "options": dataclasses.asdict(self.options), "base": base, "layers":
                self.layers, "calibration_tokens": tokens, "lesa": self.predictors or None}


def grow(model: Transformer, num_new: int | None = None, *, position: str | None = "top",
         insert_after: list[int] | None = None, options: GrowthOptions | None = None,
         log: Callable[[str], None] | None = None, calibration: torch.Tensor | None = None):
    """A deeper copy of `model` (unmodified), new layers at `position` or after `insert_after` as
    `options` say, and the report. args.extra["opt_deus"]: the record; calibration: ids (B, T)."""
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
            layers[-1].load_state_dict({k: v.to(dtype) for k, v in tensors.items()})
    grown.layers = nn.ModuleList(layers)
    return grown, growth.report()
