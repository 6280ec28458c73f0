"""Depth up-scaling of a LLaMA model: OpT-DeUS and the baselines it is compared with.

A grown model keeps every base layer and inserts new ones, each made from the base layers around its gap,
A (below) and B (above):
  opt        OpT-DeUS (Cao, Aletras, Wang 2025, arXiv 2508.08011, Algorithm 1): A aligned to B with optimal
             transport, then averaged with B; align "structured" (default, structured_fuse), "paper"
             (paper_fuse) or "published" (published_fuse: the public code's numbers, not a recommendation);
  avg        Avg-DeUS: the element-wise mean of A and B (avg_fuse);
  llama-pro  LLaMA Pro block expansion (Wu et al. 2024): a copy of A;
  solar      SOLAR (Kim et al. 2023): two copies of the stack joined with the seam's overlapping layers
             dropped, i.e. a run of copied middle layers.
Zero-initialising a new layer's o_proj and down_proj makes it the identity map, so the grown model computes the
base model's function: the default for opt and llama-pro, an option for every method (out_scale generalises it).
Read top to bottom: the fusion of two blocks (torch and sinkhorn.py only), where new layers go, grown_blocks()
(the one growth loop) and grow(); streaming growth: opt_deus_tool/grow_cli.py. Errors name parameters in `ticks`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import torch.nn.functional as F

if __package__:  # installed (opt_deus_core.opt_deus), or copied into a package of yours
    from .sinkhorn import SinkhornError, hard_assignment, plan_sharpness, published_sinkhorn, sinkhorn
else:  # copied alone beside sinkhorn.py
    from sinkhorn import SinkhornError, hard_assignment, plan_sharpness, published_sinkhorn, sinkhorn

if TYPE_CHECKING:  # model.py is needed only to grow a model, not to fuse two blocks
    from model import ModelArgs, Transformer

# ----------------------------------------------------------------------------------------------
# Fusion. A block is a dict of float tensors keyed by a LLaMA decoder layer's parameter names:
#   input_layernorm.weight, post_attention_layernorm.weight (h,); self_attn.q_proj.weight (H*d, h);
#   self_attn.k_proj.weight, self_attn.v_proj.weight (G*d, h); self_attn.o_proj.weight (h, H*d);
#   mlp.gate_proj.weight, mlp.up_proj.weight (f, h); mlp.down_proj.weight (h, f)
# for hidden size h, H query heads and G key/value heads of d dims, f MLP neurons. A is the base layer
# below the gap, B the one above. The new layer is, tensor by tensor, (A aligned to B + B) / 2. This
# section uses nothing from model.py: with sinkhorn.py beside it, it runs anywhere.


class GrowthError(ValueError):
    """A growth request we cannot carry out; the message says what and where."""


# Sinkhorn's regulariser epsilon per alignment. paper and published: the public code's 0.06, on raw distances.
# structured: relative to each cost matrix's mean, so one value suits any weight scale; 0.005 keeps real MLP
# plans sharp. GrowthOptions and the command line take their defaults from here (docs/ALIGNMENT.md, "How sharp").
DEFAULT_EPSILON = {"paper": 0.06, "structured": 0.005, "published": 0.06}
TOL = 1e-4  # relative L1 marginal error at which a plan is accepted: plans weight convex combinations
MAX_ITER = 10000  # the public code's numItermax; epsilon scaling needs far fewer on real weights
MAX_MARGINAL_ERROR = 0.01  # a plan beyond this is refused, converged or not: its rows no longer sum to ~1/n


def transport(cost: torch.Tensor, epsilon: float, relative: bool, normalize_plan: bool = True, tol: float = TOL,
              max_iter: int = MAX_ITER, strict: bool = False,
              max_marginal_error: float = MAX_MARGINAL_ERROR) -> tuple[torch.Tensor, dict]:
    """The transport plan from A's rows to B's, given their distances (Algorithm 1 lines 3 and 7).

    cost (..., n, n): cost[..., i, j] the distance from A's row i to B's row j; leading dimensions batch
    independent problems; marginals uniform. epsilon: in units of each cost matrix's mean if `relative`, else
    of the cost; 0: exact assignment (O(n^3), CPU). Returns the plan (..., n, n), plan^T @ A putting A's rows
    in B's order, and {iterations, marginal_error, converged, sharpness}. normalize_plan: scale it by n (OT
    fusion's T diag(1/b): plan^T @ A keeps A's scale), else the public code's mass 1 (A shrinks by 1/n).
    GrowthError if the solver fails under `strict` or the marginal error is beyond max_marginal_error.
    """
    n = cost.shape[-1]
    if epsilon == 0:
        assignment = hard_assignment(cost)  # (..., n): A's row i goes to B's row assignment[i]
        plan = F.one_hot(assignment, n).to(cost.dtype) / n
        stats = {"iterations": 0, "marginal_error": 0.0, "converged": True}
    else:
        scale = cost.mean(dim=(-2, -1), keepdim=True).clamp_min(1e-30) if relative else 1.0
        try:
            result = sinkhorn(cost / scale, epsilon=epsilon, tol=tol, max_iter=max_iter, strict=strict)
        except (SinkhornError, ValueError) as e:  # non-convergence under `strict`; an epsilon out of range
            raise GrowthError(f"alignment of a {tuple(cost.shape)} cost: {e}") from None
        if not result.marginal_error <= max_marginal_error:  # NaN too
            raise GrowthError(f"alignment of a {tuple(cost.shape)} cost: the plan's marginal error is "
                              f"{result.marginal_error:.3g}, beyond `max_marginal_error` "
                              f"{max_marginal_error:g} (epsilon {epsilon:g}: raise `epsilon` or "
                              f"`max_iter`; `max_marginal_error` inf accepts the plan anyway)")
        plan = result.plan.to(cost.dtype)
        stats = {"iterations": result.iterations, "marginal_error": result.marginal_error,
                 "converged": result.converged}
    stats["sharpness"] = plan_sharpness(plan).mean().item()
    if normalize_plan:
        plan = plan * n
    return plan, stats


def _norm_ratio(aligned: torch.Tensor, original: torch.Tensor) -> float:
    return (aligned.norm() / original.norm().clamp_min(1e-30)).item()


def avg_fuse(A: dict, B: dict) -> dict:
    """Avg-DeUS: the new block is the element-wise mean of A and B (same keys and shapes)."""
    return {key: (A[key] + B[key]) / 2 for key in A}


def _align_rows(key: str, a: torch.Tensor, b: torch.Tensor, epsilon: float, published: bool, solver: dict,
                activations: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    # Algorithm 1 lines 3-4 and 7-8 for one matrix: a, b (n, k), rows = output neurons, a already moved by
    # T_in (line 6) -> plan (n, n), a's rows in b's order plan^T a (n, k), statistics. activations: A's and B's
    # recorded outputs of this matrix on the calibration tokens (..., n): rows described by what they compute.
    rows_a, rows_b = (a, b) if activations is None else (
        record[key.removesuffix(".weight")].reshape(-1, a.shape[0]).T for record in activations)
    cost = torch.cdist(rows_a, rows_b)  # line 4: Euclidean distances between rows (or what they compute)
    if published:  # POT's kernel-space solver, whatever it returns, raw plan (see published_fuse)
        plan, stats = published_sinkhorn(cost, epsilon, solver["max_iter"])
        if solver["strict"] and not stats["converged"]:
            where = (f"at iteration {stats['abort_iteration']}" if stats["aborted"]
                     else f"in {stats['iterations']} iterations")
            raise GrowthError(f"{key}: the published solver did not converge ({where}) and `strict` is set")
        stats = {**stats, "plan_mass": plan.sum().item(), "sharpness": plan_sharpness(plan).mean().item()}
    else:
        plan, stats = transport(cost, epsilon, relative=activations is not None, **solver)  # line 7
    aligned = plan.mT @ a  # line 8
    return plan, aligned, {**stats, "norm_ratio": _norm_ratio(aligned, a)}


def paper_fuse(A: dict, B: dict, epsilon: float = DEFAULT_EPSILON["paper"], published: bool = False,
               activations: tuple | None = None, **solver) -> tuple[dict, dict]:
    """Algorithm 1 as the public code implements it, with a solver that converges.

    q, k, v, o, gate, up and down each have their rows (output neurons) aligned on their own, by a plan from the
    distances between A's and B's rows (epsilon absolute). o_proj's plan, plan_o (h, h) (T_o in the paper), stands
    for the residual stream's: gate and up are first multiplied by it on their input side, the post-attention
    norm's gain by (plan_o + I) / 2. solver: transport()'s other arguments (published=True: published_fuse's
    solver). activations: (A's, B's) Block.forward records on calibration tokens: rows compared by their outputs.
    Returns the new block and per aligned tensor the plan's statistics and norm_ratio = |aligned A| / |A|.
    """
    fused, report, plans = {}, {}, {}
    key = "input_layernorm.weight"
    fused[key] = (A[key] + B[key]) / 2  # T_in = I (line 6), then the mean (line 9)
    for key in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                "self_attn.o_proj.weight"):  # T_in = I
        plans[key], aligned, report[key] = _align_rows(key, A[key], B[key], epsilon, published, solver, activations)
        fused[key] = (aligned + B[key]) / 2  # line 9
    plan_o = plans["self_attn.o_proj.weight"]
    # Lines 5-6: the residual stream "aligned" by o_proj's plan (both layers in fact share that basis):
    # T_in = (plan_o + I) / 2 on the norm's gain, plan_o itself on the input side of gate and up.
    t_in = (plan_o + torch.eye(plan_o.shape[0], device=plan_o.device)) / 2
    key = "post_attention_layernorm.weight"
    aligned = A[key] @ t_in
    report[key] = {"norm_ratio": _norm_ratio(aligned, A[key])}
    fused[key] = (aligned + B[key]) / 2
    for key in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"):
        a = A[key] if key == "mlp.down_proj.weight" else A[key] @ plan_o
        _, aligned, report[key] = _align_rows(key, a, B[key], epsilon, published, solver, activations)
        fused[key] = (aligned + B[key]) / 2
    return fused, report


def published_fuse(A: dict, B: dict, epsilon: float = DEFAULT_EPSILON["published"], max_iter: int = MAX_ITER,
                   strict: bool = False) -> tuple[dict, dict]:
    """The public code's average_weight_ot (Model/OT-DUS.py), float32 number for float32 number.

    paper_fuse's recipe in float32 on the CPU (moved back to A's device after), with POT's kernel-space solver
    (sinkhorn.published_sinkhorn) and raw plans. On real weights exp(-C/0.06) underflows and it stops at its first
    iteration with a plan of mass near 0: q, k, v, gate and up come out as about B/2, the post-attention norm as
    about A/4 + B/2 (docs/ALIGNMENT.md). A reproduction, not a recommendation; statistics add plan_mass.
    """
    device = A["mlp.up_proj.weight"].device
    A = {k: v.detach().to("cpu", torch.float32) for k, v in A.items()}
    B = {k: v.detach().to("cpu", torch.float32) for k, v in B.items()}
    fused, report = paper_fuse(A, B, epsilon, published=True, max_iter=max_iter, strict=strict)
    return {k: v.to(device) for k, v in fused.items()}, report


def structured_fuse(A: dict, B: dict, num_heads: int, num_kv_heads: int, head_dim: int,
                    epsilon: float = DEFAULT_EPSILON["structured"], activations: tuple | None = None,
                    **solver) -> tuple[dict, dict]:
    """Our alignment: Algorithm 1's lines 4 and 7-9, applied only to what the block's symmetries let move.

    The residual stream is shared by both layers and never permuted (the norms are plain means). Attention moves
    per key/value group with its query heads (whole heads, so RoPE's rotation pairs stay intact); within a
    matched pair of groups, query heads (q rows with their o_proj columns) and value dimensions (v rows with the
    o_proj columns that read them) move. MLP neurons move as units (gate row, up row, down column). epsilon:
    relative to each cost's mean; solver: transport()'s other arguments. activations: (A's, B's) Block.forward
    records on calibration tokens: costs then compare what units compute (q's, k's, v's outputs, each head's
    output in o's place, SwiGLU products). Returns the new block and the statistics of its four plans
    (attention.query_heads, value_dims, kv_groups, mlp.neurons), and per aligned matrix norm_ratio |aligned A|/|A|.
    """
    fused, report = {}, {}
    for key in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        fused[key] = (A[key] + B[key]) / 2  # the residual stream is shared: nothing to align

    # Attention in head form. G kv groups of r query heads of d dims over a hidden size h; query head
    # g*r + j reads kv head g (HF's GQA layout). o_proj's columns for a head are turned into rows so
    # that a head is one (d, h) slice of q and one of o.
    G, d, h = num_kv_heads, head_dim, A["self_attn.q_proj.weight"].shape[1]
    r = num_heads // G

    def heads(block):
        q = block["self_attn.q_proj.weight"].view(G, r, d, h)
        k = block["self_attn.k_proj.weight"].view(G, d, h)
        v = block["self_attn.v_proj.weight"].view(G, d, h)
        o = block["self_attn.o_proj.weight"].view(h, G, r, d).permute(1, 2, 3, 0)  # (G, r, d, h)
        return q, k, v, o

    def heads_computed(record):  # that layout over calibration tokens; a head's output in o's place (o reads it)
        q, y = (record[key].reshape(-1, G, r, d).permute(1, 2, 3, 0) for key in ("self_attn.q_proj", "self_attn.heads"))
        k, v = (record[f"self_attn.{p}_proj"].reshape(-1, G, d).permute(1, 2, 0) for p in ("k", "v"))
        return q, k, v, y

    # What the costs compare: the weights (q rows, k and v rows, o columns), or what the units compute.
    weights_a, weights_b = heads(A), heads(B)
    (qa, ka, va, oa), (qb, kb, vb, ob) = ((weights_a, weights_b) if activations is None
                                          else (heads_computed(record) for record in activations))
    X = va.shape[-1]  # h for weights, calibration tokens for activations

    # 1. Query heads, for every pair (group a of A, group b of B): (G, G, r, r) problems at once.
    # Cost from q alone: keys are shared by the group, and o's columns depend on the value
    # dimensions aligned next.
    cost_q = torch.cdist(qa.flatten(2)[:, None], qb.flatten(2)[None, :])
    plan_q, report["attention.query_heads"] = transport(cost_q, epsilon, relative=True, **solver)

    def by_heads(q, o):  # A's group a in B-group b's head order: (G, G, r, d, X) each
        return torch.einsum("abij,aidh->abjdh", plan_q, q), torch.einsum("abij,aidh->abjdh", plan_q, o)

    qa_b, oa_b = by_heads(qa, oa)

    # 2. Value dimensions within each pair of groups: value dim t is v's row t together with the o
    # columns of all r query heads that read it. (G, G, d, d) problems.
    feat_a = torch.cat([va[:, None].expand(G, G, d, X), oa_b.transpose(2, 3).reshape(G, G, d, r * X)], -1)
    feat_b = torch.cat([vb, ob.transpose(1, 2).reshape(G, d, r * X)], -1)
    cost_v = torch.cdist(feat_a, feat_b[None].expand(G, G, d, -1))
    plan_v, report["attention.value_dims"] = transport(cost_v, epsilon, relative=True, **solver)

    def by_dims(v, o_b):  # then value dims in B's order, with the o columns that read them
        return torch.einsum("abst,asx->abtx", plan_v, v), torch.einsum("abst,abjsx->abjtx", plan_v, o_b)

    va_b, oa_b = by_dims(va, oa_b)

    # 3. Groups: the cost of matching a to b is the distance left after the alignment inside them.
    # (G, G) problem; keys and values move only with their group.
    cost_g = ((qa_b - qb[None]).pow(2).sum((2, 3, 4)) + (ka[:, None] - kb[None]).pow(2).sum((2, 3))
              + (va_b - vb[None]).pow(2).sum((2, 3)) + (oa_b - ob[None]).pow(2).sum((2, 3, 4))).sqrt()
    plan_g, report["attention.kv_groups"] = transport(cost_g, epsilon, relative=True, **solver)
    # The three plans move A's weights (with activations, the costs above moved A's activations).
    qa, ka, va, oa = weights_a
    qa_b, oa_b = by_heads(qa, oa)
    va_b, oa_b = by_dims(va, oa_b)
    o_aligned = torch.einsum("ab,abjdh->bjdh", plan_g, oa_b)  # (G, r, d, h), back to o_proj's (h, H*d) below
    aligned = {
        "self_attn.q_proj.weight": torch.einsum("ab,abjdh->bjdh", plan_g, qa_b).reshape(G * r * d, h),
        "self_attn.k_proj.weight": torch.einsum("ab,adh->bdh", plan_g, ka).reshape(G * d, h),
        "self_attn.v_proj.weight": torch.einsum("ab,abdh->bdh", plan_g, va_b).reshape(G * d, h),
        "self_attn.o_proj.weight": o_aligned.permute(3, 0, 1, 2).reshape(h, G * r * d),
    }

    # 4. MLP neurons as units: neuron t is gate row t, up row t and down column t (or its SwiGLU product).
    gate, up, down = "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"
    if activations is None:
        feat_a, feat_b = (torch.cat([block[gate], block[up], block[down].T], -1) for block in (A, B))
    else:
        feat_a, feat_b = (record["mlp.swiglu"].reshape(-1, A[gate].shape[0]).T for record in activations)
    plan_n, report["mlp.neurons"] = transport(torch.cdist(feat_a, feat_b), epsilon, relative=True, **solver)
    aligned[gate] = plan_n.T @ A[gate]
    aligned[up] = plan_n.T @ A[up]
    aligned[down] = A[down] @ plan_n

    for key, value in aligned.items():
        report.setdefault(key, {})["norm_ratio"] = _norm_ratio(value, A[key])
        fused[key] = (value + B[key]) / 2
    return fused, report


# ----------------------------------------------------------------------------------------------
# Growth options, and where new layers go (pure functions of the layer counts)

METHODS = ("opt", "avg", "llama-pro", "solar")
ALIGNMENTS = ("structured", "paper", "published")
POSITIONS = ("top", "bottom", "middle", "top-bottom", "uniform")
ZERO_INIT_DEFAULT = {"opt": True, "avg": False, "llama-pro": True, "solar": False}
COSTS = ("weights", "activations")


@dataclass
class GrowthOptions:
    """How new layers are made (the command line's flags of the same names take their defaults from here)."""
    method: str = "opt"
    align: str = "structured"
    epsilon: float | None = None  # None: DEFAULT_EPSILON of the alignment
    zero_init: bool | None = None  # None: the method's default (ZERO_INIT_DEFAULT)
    normalize_plan: bool = True  # False reproduces the public code's unnormalised plan
    max_iter: int = MAX_ITER
    tol: float = TOL
    strict: bool = False  # a Sinkhorn problem that did not converge raises instead of warning
    max_marginal_error: float = MAX_MARGINAL_ERROR  # inf accepts any plan
    cost: str = "weights"  # "activations": units compared by what they compute on calibration tokens
    out_scale: float | None = None  # new layers' o_proj and down_proj times this; None: 0 if zero_init, else 1

    def __post_init__(self):
        for name in ("epsilon", "tol", "max_marginal_error", "out_scale"):  # numbers, not True (Python's 1)
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number or (value is None and name in ("epsilon", "out_scale"))):
                raise GrowthError(f"`{name}` must be a number, got {value!r}")
        for name in ("zero_init", "normalize_plan", "strict"):
            value = getattr(self, name)
            if not (isinstance(value, bool) or (value is None and name == "zero_init")):
                raise GrowthError(f"`{name}` must be True or False, got {value!r}")
        if self.method not in METHODS:
            raise GrowthError(f"unknown `method` {self.method!r} (choose from {', '.join(METHODS)})")
        if self.align not in ALIGNMENTS:
            raise GrowthError(f"unknown alignment `align` {self.align!r} (choose from {', '.join(ALIGNMENTS)})")
        if self.cost not in COSTS or (self.cost == "activations" and self.align == "published"):
            raise GrowthError(f"`cost` {self.cost!r}: choose from {', '.join(COSTS)} (`align` published compares "
                              f"weights, as the public code)")
        # Activation distances have no scale of their own: epsilon is then relative, structured's, for paper too.
        default = DEFAULT_EPSILON["structured" if self.cost == "activations" else self.align]
        self.epsilon = default if self.epsilon is None else self.epsilon
        if not 0 <= self.epsilon <= 1e30:  # NaN too; beyond 1e30 float32 overflows (and the plan is a b^T anyway)
            raise GrowthError(f"`epsilon` must be a finite number >= 0 (at most 1e30), got {self.epsilon}")
        if self.align == "published":
            # The public code has no exact-assignment case and never rescales its plans.
            if self.epsilon == 0:
                raise GrowthError("`align` published needs `epsilon` > 0 (its solver is kernel-space Sinkhorn)")
            self.normalize_plan = False
        if not (self.tol > 0 and math.isfinite(self.tol)):
            raise GrowthError(f"`tol` must be a finite number > 0, got {self.tol}")
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise GrowthError(f"`max_iter` must be an integer >= 1, got {self.max_iter!r}")
        if not self.max_marginal_error > 0:
            raise GrowthError(f"`max_marginal_error` must be > 0 (inf: accept any plan), got {self.max_marginal_error}")
        if self.out_scale is not None:  # out_scale 0 is zero-init, any other none: an explicit zero_init must agree
            if not 0 <= self.out_scale <= 1e30 or self.zero_init not in (None, self.out_scale == 0):
                raise GrowthError(f"`out_scale` {self.out_scale} must be a finite number >= 0 (0 only with "
                                  f"`zero_init`, which it generalises)")
            self.zero_init = self.out_scale == 0
        self.zero_init = ZERO_INIT_DEFAULT[self.method] if self.zero_init is None else self.zero_init
        self.out_scale = (0.0 if self.zero_init else 1.0) if self.out_scale is None else self.out_scale


def insert_after_for(position: str, num_base_layers: int, num_new: int, method: str = "opt") -> list[int]:
    """Base-layer indices i, one per new layer, each new layer going right after base layer i.

    The named positions choose among the L - 1 gaps (i = 0 .. L-2), for every method, so methods compared at one
    position get new layers at the same places. `top` takes the highest num_new gaps: the paper's default of a
    new layer in every gap of the top half (16 -> 24, 30 -> 45; the public code's 32 -> 48: after 15 .. 30) is
    top with num_new = L/2. llama-pro's `uniform` is LLaMA Pro's block expansion: a copy needs no upper
    neighbour, so L slots, the last above the top layer, a copy after the last layer of each of num_new equal
    groups (32 -> 48: after 1, 3, ..., 31, as published). Beyond one per slot, slots take a second in order.
    """
    block_expansion = method == "llama-pro" and position == "uniform"
    gaps = num_base_layers if block_expansion else num_base_layers - 1
    if gaps < 1:
        raise GrowthError(f"a base model of {num_base_layers} layer(s) has no gap between layers to grow into")
    if num_new <= 0:
        raise GrowthError(f"the number of new layers must be positive, got {num_new}")
    if position not in POSITIONS:
        raise GrowthError(f"unknown `position` {position!r} (choose from {', '.join(POSITIONS)})")

    def pick(k: int) -> list[int]:  # k <= gaps distinct gaps
        if position == "top":
            return list(range(gaps - k, gaps))
        if position == "bottom":
            return list(range(k))
        if position == "middle":
            start = (gaps - k) // 2
            return list(range(start, start + k))
        if position == "top-bottom":
            return sorted(set(range(k - k // 2)) | set(range(gaps - k // 2, gaps)))
        if block_expansion:  # the last layer of each of k equal groups of layers
            return [(j + 1) * gaps // k - 1 for j in range(k)]
        # uniform: k gaps spread evenly, centred within equal-sized segments
        return [int((j + 0.5) * gaps / k) for j in range(k)]

    full, rest = divmod(num_new, gaps)
    return sorted(list(range(gaps)) * full + pick(rest))


@dataclass(frozen=True)
class Slot:
    """One layer of the grown model: a base layer kept as it is, or a new layer made from `sources`."""
    sources: tuple[int, ...]
    new: bool


def make_layout(method: str, num_base_layers: int, insert_after: list[int] | None = None,
                num_new: int | None = None) -> list[Slot]:
    if method == "solar":
        # SOLAR: layers [0, L - m_top) of one copy, then [m_bottom, L) of another, with m_top + m_bottom = L - K
        # (the paper drops m = L - K / 2 from each side of the seam; for odd L - K the second copy drops one
        # more). The second copy's layers m_bottom .. L - m_top - 1 are the repeated ones, which we call new.
        L = num_base_layers
        if num_new is None or num_new <= 0:
            raise GrowthError(f"the number of new layers must be positive, got {num_new}")
        if insert_after is not None:
            raise GrowthError("solar places its repeated layers itself; `insert_after` does not apply")
        if num_new > L:
            raise GrowthError(f"solar repeats at most all {L} layers, got K={num_new}")
        m_top = (L - num_new) // 2
        m_bottom = L - num_new - m_top
        return ([Slot((i,), False) for i in range(L - m_top)] + [Slot((i,), True) for i in range(m_bottom, L - m_top)]
                + [Slot((i,), False) for i in range(L - m_top, L)])
    if insert_after is None or len(insert_after) == 0:
        raise GrowthError("no positions for the new layers")
    for i in insert_after:
        if method == "llama-pro":  # a copy of base layer i right after it: the top layer too
            if not 0 <= i < num_base_layers:
                raise GrowthError(f"`insert_after` {i} is out of range: a llama-pro copy of base layer i goes right "
                                  f"after it, 0 <= i <= {num_base_layers - 1}")
        elif not 0 <= i < num_base_layers - 1:
            raise GrowthError(f"`insert_after` {i} is out of range: a new layer goes between base layers i and i+1, "
                              f"0 <= i <= {num_base_layers - 2}")
    layout = []
    for i in range(num_base_layers):
        layout.append(Slot((i,), False))
        for _ in range(insert_after.count(i)):
            # llama-pro copies the layer below; opt and avg fuse the two neighbours.
            layout.append(Slot((i,) if method == "llama-pro" else (i, i + 1), True))
    return layout


# Depth up-scaling adds a fraction of a model's depth; beyond this many new layers per base layer a request is a
# typo (num_new=10**9 would otherwise allocate gigabytes of positions before any other check).
MAX_NEW_PER_BASE_LAYER = 64


def check_request(num_new, insert_after, options: GrowthOptions | None) -> GrowthOptions:
    # What grow() and streaming growth (so the command line) both check before any work.
    if num_new is not None and (isinstance(num_new, bool) or not isinstance(num_new, int) or num_new <= 0):
        raise GrowthError(f"the number of new layers `num_new` must be a positive integer, got {num_new!r}")
    if insert_after is not None and not all(isinstance(i, int) and not isinstance(i, bool) for i in insert_after):
        raise GrowthError(f"`insert_after`: expected integer layer indices, got {insert_after!r}")
    if options is not None and not isinstance(options, GrowthOptions):
        raise GrowthError(f"`options` must be a GrowthOptions, got {type(options).__name__}")
    return options or GrowthOptions()


def growth_layout(options: GrowthOptions, num_base_layers: int, num_new: int | None, position: str | None,
                  insert_after: list[int] | None) -> tuple[list[Slot], dict]:
    # The grown model's layout, and the record config.json keeps under "opt_deus": enough to know how
    # the model was made and which layers train.py should train by default.
    limit = MAX_NEW_PER_BASE_LAYER * num_base_layers
    if max(num_new or 0, len(insert_after or ())) > limit:
        raise GrowthError(f"`num_new` {num_new or len(insert_after)} is more than {MAX_NEW_PER_BASE_LAYER} new layers "
                          f"per base layer ({limit} for {num_base_layers} layers)")
    if options.method == "solar":
        layout, insert_after = make_layout("solar", num_base_layers, insert_after, num_new), None
    else:
        if insert_after is None:
            if num_new is None:
                raise GrowthError("give the number of new layers `num_new` or `insert_after`")
            insert_after = insert_after_for(position or "top", num_base_layers, num_new, options.method)
        elif num_new is not None and num_new != len(insert_after):
            raise GrowthError(f"`num_new` {num_new} disagrees with {len(insert_after)} `insert_after` positions")
        layout = make_layout(options.method, num_base_layers, insert_after)
    opt = {key: getattr(options, key) if options.method == "opt" else None
           for key in ("align", "epsilon", "normalize_plan", "cost")}  # what only OpT-DeUS has
    record = {"method": options.method, **opt, "zero_init": options.zero_init, "out_scale": options.out_scale,
              "position": position, "insert_after": insert_after, "base_num_layers": num_base_layers,
              "new_layers": [i for i, slot in enumerate(layout) if slot.new],
              "sources": [list(slot.sources) for slot in layout]}
    if options.method == "opt" and options.align == "published":
        record["note"] = ("align published reproduces the public OpT-DeUS code's numbers (float32 POT Sinkhorn, raw "
                          "plans); it is not a recommendation: on real weights that solver aborts at its first "
                          "iteration, leaving near-zero plans (see each matrix's aborted, abort_iteration, plan_mass)")
    return layout, record


# ----------------------------------------------------------------------------------------------
# The growth loop, shared by grow() and streaming growth


def make_new_block(sources: list[dict], args: ModelArgs, options: GrowthOptions,
                   activations: list[dict] | None = None) -> tuple[dict, dict]:
    """A new block's tensors (float32, keyed as Block.state_dict()) from its source blocks, and a report.
    activations: the sources' records of Block.forward on calibration tokens, for cost="activations"."""
    A, B = ({key: value.float() for key, value in source.items()} for source in (sources[0], sources[-1]))
    solver = dict(normalize_plan=options.normalize_plan, tol=options.tol, max_iter=options.max_iter,
                  strict=options.strict, max_marginal_error=options.max_marginal_error)
    if options.cost == "activations" and options.method == "opt":
        if activations is None:
            raise GrowthError("`cost` activations compares what units compute: it needs `calibration` tokens")
        solver["activations"] = (activations[0], activations[-1])
    if options.method in ("llama-pro", "solar"):  # a copy of the single source
        block, report = {k: v.clone() for k, v in A.items()}, {}
    elif options.method == "avg":
        block, report = avg_fuse(A, B), {}
    elif options.align == "paper":
        block, report = paper_fuse(A, B, options.epsilon, **solver)
    elif options.align == "published":
        block, report = published_fuse(A, B, options.epsilon, options.max_iter, options.strict)  # weights only
    else:
        block, report = structured_fuse(A, B, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
                                        options.epsilon, **solver)
    if options.out_scale != 1:  # the two projections that write into the residual stream; 0: the identity
        for key in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            block[key] = torch.zeros_like(block[key]) if options.out_scale == 0 else block[key] * options.out_scale
    return block, report


class CalibrationPass:
    """Calibration tokens carried up the base stack as grown_blocks() reads it (cost="activations"; an opt layout
    reads base layers 0, 1, ... in order): given layer i's tensors, what it computes on its own input
    (Block.forward's record, float32); the hidden states (B, T, h) move on. run(i, tensors, hidden, record)."""

    def __init__(self, hidden: torch.Tensor, run: Callable):
        self.hidden, self.run = hidden, run

    def __call__(self, i: int, tensors: dict) -> dict:
        record = {}
        with torch.no_grad():
            self.hidden = self.run(i, tensors, self.hidden, record)
        return {key: value.float() for key, value in record.items()}


def grown_blocks(layout: list[Slot], base_block: Callable[[int], dict], args: ModelArgs, options: GrowthOptions,
                 log: Callable[[str], None] | None = None,
                 calibrate: CalibrationPass | None = None) -> Iterator[tuple[int, Slot, dict, dict | None]]:
    """The grown model's blocks in order: (index, slot, tensors, report) for each slot of the layout.

    base_block(i) gives base layer i's tensors (keyed as Block.state_dict()). A kept layer's tensors are
    base_block(i) itself, its report None; a new layer's are make_new_block's (float32), its report {index,
    sources, seconds, matrices}. The two base blocks read last are held, so each is read once (SOLAR's repeated
    run reads some again) and at most two are in memory: streaming growth's bound. log: a line per new layer."""
    held: dict[int, tuple[dict, dict | None]] = {}  # base layer -> (tensors, calibration record)

    def source(i: int) -> tuple[dict, dict | None]:
        # Evicting the oldest read, not the lowest index, keeps the block just read when SOLAR jumps back down.
        if i not in held:
            tensors = base_block(i)
            held[i] = tensors, calibrate(i, tensors) if calibrate is not None else None
            while len(held) > 2:
                del held[next(iter(held))]
        return held[i]

    started, total, done = time.perf_counter(), sum(slot.new for slot in layout), 0
    for index, slot in enumerate(layout):
        if not slot.new:
            yield index, slot, source(slot.sources[0])[0], None
            continue
        layer_start = time.perf_counter()
        sources = [source(i) for i in slot.sources]
        records = [record for _, record in sources] if calibrate is not None else None
        tensors, matrices = make_new_block([block for block, _ in sources], args, options, records)
        del sources, records  # before the next read, or a third base block would stay alive
        done += 1
        if log is not None:
            elapsed = time.perf_counter() - started
            log(f"[{done}/{total}] new layer {index} from base {list(slot.sources)}  elapsed {elapsed:.1f}s  "
                f"ETA {elapsed / done * (total - done):.1f}s")
        yield index, slot, tensors, {"index": index, "sources": list(slot.sources),
                                     "seconds": time.perf_counter() - layer_start, "matrices": matrices}


def check_finite(block: dict, where: str, problem: str = "contains NaN or inf"):
    for key, tensor in block.items():
        if not torch.isfinite(tensor).all():
            raise GrowthError(f"{where}: {key} {problem}")


def grow(model: Transformer, num_new: int | None = None, *, position: str | None = "top",
         insert_after: list[int] | None = None, options: GrowthOptions | None = None,
         log: Callable[[str], None] | None = None, calibration: torch.Tensor | None = None) -> tuple[Transformer, dict]:
    """A deeper copy of `model` (not modified) with new layers inserted, and the growth report.

    The new layers go at `position` (see insert_after_for) or right after the base layers in insert_after, made
    as `options` say (default GrowthOptions()). Returns the grown Transformer (base dtype), whose
    args.extra["opt_deus"] is the growth record (method, options, positions, "new_layers": their indices), and
    the report: the record plus "layers", per new layer its index, sources, seconds and "matrices" (the fuse
    function's statistics). log: a line per new layer. calibration: token ids (B, T), for cost "activations".
    """
    if not (hasattr(model, "layers") and hasattr(model, "current_args")):  # a folder: grow_cli.grow_checkpoint
        raise GrowthError(f"`model` must be a model.Transformer, got {type(model).__name__}")
    if any(tensor.is_meta for tensor in model.state_dict().values()):
        raise GrowthError("`model` has tensors on the meta device, without data: load its weights first")
    options = check_request(num_new, insert_after, options)
    args = model.current_args()
    layout, record = growth_layout(options, args.num_hidden_layers, num_new, position, insert_after)
    check_finite(model.state_dict(), "base model")  # every tensor, as streaming growth checks a checkpoint's
    dtype = next(model.parameters()).dtype
    grown = copy.deepcopy(model)
    grown.args = dataclasses.replace(args, num_hidden_layers=len(layout), extra={**args.extra, "opt_deus": record})
    calibrate = None
    if options.cost == "activations" and options.method == "opt" and calibration is not None:
        with torch.no_grad():
            hidden, cos, sin = model.embed(torch.as_tensor(calibration, device=model.embed_tokens.weight.device))
        calibrate = CalibrationPass(hidden, lambda i, tensors, x, record: model.layers[i](x, cos, sin, record))
    layers, reports = [], []
    for index, slot, tensors, report in grown_blocks(layout, lambda i: model.layers[i].state_dict(), args, options,
                                                     log, calibrate):
        if report is None:  # a kept base layer: grown's copy of it
            layers.append(grown.layers[slot.sources[0]])
            continue
        block = copy.deepcopy(model.layers[slot.sources[0]])
        tensors = {key: value.to(dtype) for key, value in tensors.items()}
        check_finite(tensors, f"new layer {index}", f"is not finite in {str(dtype)[6:]} (values beyond its range?)")
        block.load_state_dict(tensors)
        layers.append(block)
        reports.append(report)
    grown.layers = torch.nn.ModuleList(layers)
    return grown, {**record, "layers": reports}
