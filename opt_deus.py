"""Depth up-scaling of a LLaMA model: OpT-DeUS and the baselines it is compared with.

A grown model keeps every base layer and inserts new ones. Methods, by how a new layer is made:
  opt        OpT-DeUS (Cao, Aletras, Wang 2025, arXiv 2508.08011, Algorithm 1): the two base layers
             around the gap, A (below) and B (above), are aligned with optimal transport and averaged;
  avg        Avg-DeUS: the element-wise average of A and B, with no alignment;
  llama-pro  LLaMA Pro block expansion (Wu et al. 2024): a copy of A;
  solar      SOLAR depth up-scaling (Kim et al. 2023): two copies of the stack joined with the
             seam's overlapping layers dropped, i.e. a run of copied middle layers.
Zero-initialising a new layer's o_proj and down_proj makes it the identity map (see model.Block),
so the grown model computes exactly the base model's function; that is the default for opt and
llama-pro and a flag for every method.

Three alignments for `opt`:
  paper       Algorithm 1 as the public code implements it: a Sinkhorn plan over the rows of each of
              q, k, v, o independently (cost = Euclidean distance between rows, epsilon = 0.06
              absolute), T_in = (T_o + I)/2 for the post-attention norm, gate and up aligned on their
              input side by T_o and then on rows, down on rows. The public code never renormalises
              the plan, so T^T A is A shrunk by 1/n; we apply the OT-fusion normalisation n*T
              (T diag(1/b)) by default and keep the raw plan behind --no-normalize-plan.
  structured  (default) Only what the network's symmetries allow moves. The residual stream is
              shared by both layers and is never permuted; attention is aligned per key/value group
              with its query heads (whole heads move, so RoPE's rotation pairs stay intact); within
              a matched pair of groups, query heads (q rows with their o_proj columns) and value
              dimensions (v rows with the o_proj columns that read them) are aligned; MLP neurons
              move as units (gate row, up row and down column share one plan). Epsilon is relative
              to the mean of each cost matrix, so one value suits any weight scale.
  published   A reproduction of what the public code computes, not a recommendation: paper's recipe
              in float32 on the CPU with POT's kernel-space solver (sinkhorn.published_sinkhorn) and
              raw plans. On real weights exp(-C/0.06) underflows and that solver stops at its first
              iteration, so the plan is exp(-C/0.06)/n^2 with a total mass near 0: q, k, v, gate
              and up come out as about B/2, the post-attention norm as about A/4 + B/2.
Epsilon 0 means exact (hard) assignment instead of Sinkhorn (O(n^3) on the CPU: small models only).

The command line streams: base tensors are read one block at a time and the grown model is written
shard by shard, so peak memory is about two blocks plus a cost matrix.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from model import (BLOCK_KEYS, CheckpointError, CheckpointReader, CheckpointWriter, Interrupted, ModelArgs,
                   OneLineArgumentParser, Transformer, check_device, check_output_folder, dtype_name, parse_size,
                   positive_int)
from sinkhorn import (SinkhornError, hard_assignment, normalize_plan, plan_sharpness, published_sinkhorn,
                      sinkhorn)

METHODS = ("opt", "avg", "llama-pro", "solar")
ALIGNMENTS = ("structured", "paper", "published")
POSITIONS = ("top", "bottom", "middle", "top-bottom", "uniform")
# Paper: the public code's absolute 0.06. Structured: relative to each cost matrix's mean. On
# SmolLM2's adjacent layers, relative 0.06 blurs an MLP plan to a sharpness of 0.003 (a near-uniform
# mix, aligned weights at 3% of their norm); 0.005 gives 0.38 and half the norm (docs/ALIGNMENT.md).
# Published: the public code's reg, on the same raw distances.
DEFAULT_EPSILON = {"paper": 0.06, "structured": 0.005, "published": 0.06}
ZERO_INIT_DEFAULT = {"opt": True, "avg": False, "llama-pro": True, "solar": False}
OUTPUT_PROJECTIONS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


class GrowthError(ValueError):
    """A growth request we cannot carry out; the message says what and where."""


@dataclass
class GrowthOptions:
    method: str = "opt"
    align: str = "structured"
    epsilon: float | None = None  # None: DEFAULT_EPSILON of the alignment
    zero_init: bool | None = None  # None: the method's default (ZERO_INIT_DEFAULT)
    normalize_plan: bool = True  # False reproduces the public code's unnormalised plan
    max_iter: int = 10000  # the public code's numItermax; ε-scaling needs far fewer on real weights
    # Relative L1 marginal error at which a plan is accepted. Fusion uses the plan as weights of a
    # convex combination, so 1e-4 is far below anything that matters, and on SmolLM2 it takes a
    # third of the iterations of float32's floor (1e-6..1e-5) for the same sharpness to 5 digits.
    tol: float = 1e-4
    strict: bool = False  # a Sinkhorn problem that did not converge raises instead of warning
    # A plan whose relative marginal error is beyond this is refused, converged or not: its rows no
    # longer sum to ~1/n, so the "aligned" weights are a sum of many rows (with --epsilon 1e-9 we
    # saw an error of 600 and weights thousands of times the base's norm). inf accepts any plan.
    max_marginal_error: float = 0.01

    def __post_init__(self):
        if self.method not in METHODS:
            raise GrowthError(f"unknown method {self.method!r} (choose from {', '.join(METHODS)})")
        if self.align not in ALIGNMENTS:
            raise GrowthError(f"unknown alignment {self.align!r} (choose from {', '.join(ALIGNMENTS)})")
        if self.epsilon is None:
            self.epsilon = DEFAULT_EPSILON[self.align]
        if not (self.epsilon >= 0 and math.isfinite(self.epsilon)):
            raise GrowthError(f"epsilon (--epsilon) must be a finite number >= 0, got {self.epsilon}")
        if self.align == "published":
            # The public code has no exact-assignment case and never rescales its plans.
            if self.epsilon == 0:
                raise GrowthError("--align published needs epsilon > 0 (its solver is kernel-space Sinkhorn)")
            self.normalize_plan = False
        if not (self.tol > 0 and math.isfinite(self.tol)):
            raise GrowthError(f"tol (--tol) must be a finite number > 0, got {self.tol}")
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise GrowthError(f"max_iter (--max-iter) must be an integer >= 1, got {self.max_iter!r}")
        if not self.max_marginal_error > 0:
            raise GrowthError(f"max_marginal_error (--max-marginal-error) must be > 0 (inf: accept any plan), "
                              f"got {self.max_marginal_error}")
        if self.zero_init is None:
            self.zero_init = ZERO_INIT_DEFAULT[self.method]


# ----------------------------------------------------------------------------------------------
# Where new layers go (pure functions of the layer counts)


def insert_after_for(position: str, num_base_layers: int, num_new: int, method: str = "opt") -> list[int]:
    """Base-layer indices i, one per new layer, each new layer going right after base layer i.

    The named positions choose among the L - 1 gaps (i = 0 .. L-2), for every method, so that
    methods compared at one position get new layers at the same places. `top` takes the highest
    num_new gaps: the paper's default of one new layer in every gap of the top half (Llama-3.2-1B
    16 -> 24, SmolLM2 30 -> 45; the public code's 32 -> 48 puts them after base 15 .. 30) is top
    with num_new = L/2. The exception is llama-pro's `uniform`, LLaMA Pro's block expansion: a copy
    needs no upper neighbour, so it chooses among L slots, the last one above the top layer, and
    puts a copy after the last layer of each of num_new equal groups (32 -> 48: after 1, 3, ..., 31,
    as published). With more new layers than slots, slots take a second one in the same order.
    """
    block_expansion = method == "llama-pro" and position == "uniform"
    gaps = num_base_layers if block_expansion else num_base_layers - 1
    if gaps < 1:
        raise GrowthError(f"a base model of {num_base_layers} layer(s) has no gap between layers to grow into")
    if num_new <= 0:
        raise GrowthError(f"the number of new layers must be positive, got {num_new}")
    if position not in POSITIONS:
        raise GrowthError(f"unknown position {position!r} (choose from {', '.join(POSITIONS)})")

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


def plan_layout(method: str, num_base_layers: int, insert_after: list[int] | None = None,
                num_new: int | None = None) -> list[Slot]:
    if method == "solar":
        # SOLAR: layers [0, L - m_top) of one copy, then [m_bottom, L) of another, with
        # m_top + m_bottom = L - K (the paper drops m = L - K / 2 from each side of the seam; for odd
        # L - K the second copy drops one more). The second copy's layers m_bottom .. L - m_top - 1
        # are the repeated ones, which we call new (they can be zero-initialised and trained).
        L = num_base_layers
        if num_new is None or num_new <= 0:
            raise GrowthError(f"the number of new layers must be positive, got {num_new}")
        if insert_after is not None:
            raise GrowthError("solar places its repeated layers itself; --insert-after does not apply")
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
                raise GrowthError(f"--insert-after {i} is out of range: a llama-pro copy of base layer i goes right "
                                  f"after it, 0 <= i <= {num_base_layers - 1}")
        elif not 0 <= i < num_base_layers - 1:
            raise GrowthError(f"--insert-after {i} is out of range: a new layer goes between base layers i and i+1, "
                              f"0 <= i <= {num_base_layers - 2}")
    layout = []
    for i in range(num_base_layers):
        layout.append(Slot((i,), False))
        for _ in range(insert_after.count(i)):
            # llama-pro copies the layer below; opt and avg fuse the two neighbours.
            layout.append(Slot((i,) if method == "llama-pro" else (i, i + 1), True))
    return layout


def new_layer_indices(layout: list[Slot]) -> list[int]:
    return [index for index, slot in enumerate(layout) if slot.new]


# ----------------------------------------------------------------------------------------------
# Transport plans


def transport(cost: torch.Tensor, options: GrowthOptions, relative: bool) -> tuple[torch.Tensor, dict]:
    # cost (..., n, n) -> coupling M (..., n, n) such that M^T @ A puts A's rows in B's order, and
    # solver statistics. With the normalisation M = T diag(1/b) = n T, a permutation plan gives a
    # 0/1 permutation matrix; without it (the public code), M = T and aligned rows shrink by 1/n.
    n = cost.shape[-1]
    if options.epsilon == 0:
        perm = hard_assignment(cost)
        plan = F.one_hot(perm, n).to(cost.dtype) / n
        stats = {"iterations": 0, "marginal_error": 0.0, "converged": True}
    else:
        scale = cost.mean(dim=(-2, -1), keepdim=True).clamp_min(1e-30) if relative else 1.0
        try:
            result = sinkhorn(cost / scale, epsilon=options.epsilon, tol=options.tol,
                              max_iter=options.max_iter, strict=options.strict)
        except (SinkhornError, ValueError) as e:  # non-convergence under --strict; an epsilon out of range
            raise GrowthError(f"alignment of a {tuple(cost.shape)} cost: {e}") from None
        if not result.marginal_error <= options.max_marginal_error:  # NaN too
            raise GrowthError(f"alignment of a {tuple(cost.shape)} cost: the plan's marginal error is "
                              f"{result.marginal_error:.3g}, beyond --max-marginal-error "
                              f"{options.max_marginal_error:g} (epsilon {options.epsilon:g}: raise --epsilon or "
                              f"--max-iter; --max-marginal-error inf accepts the plan anyway)")
        plan = result.plan.to(cost.dtype)
        stats = {"iterations": result.iterations, "marginal_error": result.marginal_error,
                 "converged": result.converged}
    stats["sharpness"] = plan_sharpness(plan).mean().item()
    return (normalize_plan(plan) if options.normalize_plan else plan), stats


def _norm_ratio(aligned: torch.Tensor, original: torch.Tensor) -> float:
    return (aligned.norm() / original.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------------------
# Algorithm 1 as published (rows of every matrix aligned on their own)


def paper_fuse(A: dict, B: dict, options: GrowthOptions) -> tuple[dict, dict]:
    fused, report = {}, {}

    def align_rows(name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # a, b (n, d): rows are the output neurons. M^T a is a in b's row order.
        coupling, stats = transport(torch.cdist(a, b), options, relative=False)
        aligned = coupling.mT @ a
        report[name] = {**stats, "norm_ratio": _norm_ratio(aligned, a)}
        fused[name] = (aligned + b) / 2
        return coupling

    fused["input_layernorm.weight"] = (A["input_layernorm.weight"] + B["input_layernorm.weight"]) / 2
    for proj in ("q_proj", "k_proj", "v_proj"):
        key = f"self_attn.{proj}.weight"
        align_rows(key, A[key], B[key])
    coupling_o = align_rows("self_attn.o_proj.weight", A["self_attn.o_proj.weight"], B["self_attn.o_proj.weight"])

    # The residual stream "aligned" by o_proj's plan (Algorithm 1 line 6; both layers in fact share
    # this basis): T_in = (T_o + I) / 2 on the norm's gain, T_o itself on the input side of gate and
    # up, as the public code does.
    t_in = (coupling_o + torch.eye(coupling_o.shape[0], device=coupling_o.device)) / 2
    key = "post_attention_layernorm.weight"
    aligned_norm = A[key] @ t_in
    report[key] = {"norm_ratio": _norm_ratio(aligned_norm, A[key])}
    fused[key] = (aligned_norm + B[key]) / 2
    for proj in ("gate_proj", "up_proj"):
        key = f"mlp.{proj}.weight"
        align_rows(key, A[key] @ coupling_o, B[key])
    align_rows("mlp.down_proj.weight", A["mlp.down_proj.weight"], B["mlp.down_proj.weight"])
    return fused, report


def published_fuse(A: dict, B: dict, options: GrowthOptions) -> tuple[dict, dict]:
    # The public code's average_weight_ot (Model/OT-DUS.py), operation for operation, so that the
    # float32 numbers are the same: Algorithm 1 with POT's solver, whatever it returns (it aborts on
    # real weights), and no renormalisation. Computed on the CPU, as published.
    device = A["mlp.up_proj.weight"].device
    A = {k: v.detach().to("cpu", torch.float32) for k, v in A.items()}
    B = {k: v.detach().to("cpu", torch.float32) for k, v in B.items()}
    fused, report, plans = {}, {}, {}

    def align_rows(name: str, a: torch.Tensor, b: torch.Tensor):
        # a, b (n, d); plan (n, n) of total mass 1 if the solver converged, anything in [0, 1] if
        # it aborted; its transpose applied as it is (cf. Algorithm 1 line 8), then averaged (line 9).
        plan, stats = published_sinkhorn(torch.cdist(a, b, p=2), options.epsilon, options.max_iter)
        if options.strict and not stats["converged"]:
            where = (f"at iteration {stats['abort_iteration']}" if stats["aborted"]
                     else f"in {stats['iterations']} iterations")
            raise GrowthError(f"{name}: the published solver did not converge ({where}) and --strict is set")
        aligned = plan.T @ a
        report[name] = {**stats, "plan_mass": plan.sum().item(), "sharpness": plan_sharpness(plan).mean().item(),
                        "norm_ratio": _norm_ratio(aligned, a)}
        fused[name] = (aligned + b) / 2
        plans[name] = plan

    fused["input_layernorm.weight"] = (A["input_layernorm.weight"] + B["input_layernorm.weight"]) / 2
    for key in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                "self_attn.o_proj.weight"):
        align_rows(key, A[key], B[key])
    plan_o = plans["self_attn.o_proj.weight"]  # (h, h)
    # T_in = (T_o + I)/2 on the norm's gain only; gate and up get the raw T_o on their input side.
    key = "post_attention_layernorm.weight"
    t_in = 0.5 * plan_o + 0.5 * torch.eye(plan_o.shape[0])
    aligned_norm = A[key] @ t_in
    report[key] = {"norm_ratio": _norm_ratio(aligned_norm, A[key])}
    fused[key] = (aligned_norm + B[key]) / 2
    for key in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
        align_rows(key, A[key] @ plan_o, B[key])
    align_rows("mlp.down_proj.weight", A["mlp.down_proj.weight"], B["mlp.down_proj.weight"])
    return {k: v.to(device) for k, v in fused.items()}, report


# ----------------------------------------------------------------------------------------------
# Structured alignment: only the block's real symmetries move


def structured_fuse(A: dict, B: dict, args: ModelArgs, options: GrowthOptions) -> tuple[dict, dict]:
    fused, report = {}, {}
    for key in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        fused[key] = (A[key] + B[key]) / 2  # the residual stream is shared: nothing to align

    # Attention in head form. G kv groups of r query heads of d dims over a hidden size h; query head
    # g*r + j reads kv head g (HF's GQA layout). o_proj's columns for a head are turned into rows so
    # that a head is one (d, h) slice of q and one of o.
    G, d, h = args.num_key_value_heads, args.head_dim, args.hidden_size
    r = args.num_attention_heads // G

    def heads(block):
        q = block["self_attn.q_proj.weight"].view(G, r, d, h)
        k = block["self_attn.k_proj.weight"].view(G, d, h)
        v = block["self_attn.v_proj.weight"].view(G, d, h)
        o = block["self_attn.o_proj.weight"].view(h, G, r, d).permute(1, 2, 3, 0)  # (G, r, d, h)
        return q, k, v, o

    qa, ka, va, oa = heads(A)
    qb, kb, vb, ob = heads(B)

    # 1. Query heads, for every pair (group a of A, group b of B): (G, G, r, r) problems at once.
    # Cost from q alone: keys are shared by the group, and o's columns depend on the value
    # dimensions aligned next.
    cost_q = torch.cdist(qa.flatten(2)[:, None], qb.flatten(2)[None, :])
    coupling_q, stats_q = transport(cost_q, options, relative=True)
    qa_b = torch.einsum("abij,aidh->abjdh", coupling_q, qa)  # A's group a in B-group b's head order
    oa_b = torch.einsum("abij,aidh->abjdh", coupling_q, oa)

    # 2. Value dimensions within each pair of groups: value dim t is v's row t together with the o
    # columns of all r query heads that read it. (G, G, d, d) problems.
    feat_a = torch.cat([va[:, None].expand(G, G, d, h), oa_b.transpose(2, 3).reshape(G, G, d, r * h)], -1)
    feat_b = torch.cat([vb, ob.transpose(1, 2).reshape(G, d, r * h)], -1)
    coupling_v, stats_v = transport(torch.cdist(feat_a, feat_b[None].expand(G, G, d, -1)), options, relative=True)
    va_b = torch.einsum("abst,asx->abtx", coupling_v, va)
    oa_b = torch.einsum("abst,abjsx->abjtx", coupling_v, oa_b)

    # 3. Groups: the cost of matching a to b is the distance left after the alignment inside them.
    # (G, G) problem; keys and values move only with their group.
    cost_g = ((qa_b - qb[None]).pow(2).sum((2, 3, 4)) + (ka[:, None] - kb[None]).pow(2).sum((2, 3))
              + (va_b - vb[None]).pow(2).sum((2, 3)) + (oa_b - ob[None]).pow(2).sum((2, 3, 4))).sqrt()
    coupling_g, stats_g = transport(cost_g, options, relative=True)
    aligned = {
        "self_attn.q_proj.weight": torch.einsum("ab,abjdh->bjdh", coupling_g, qa_b).reshape(G * r * d, h),
        "self_attn.k_proj.weight": torch.einsum("ab,adh->bdh", coupling_g, ka).reshape(G * d, h),
        "self_attn.v_proj.weight": torch.einsum("ab,abdh->bdh", coupling_g, va_b).reshape(G * d, h),
        "self_attn.o_proj.weight": torch.einsum("ab,abjdh->bjdh", coupling_g, oa_b).permute(3, 0, 1, 2).reshape(h, G * r * d),
    }
    report["attention.query_heads"] = stats_q
    report["attention.value_dims"] = stats_v
    report["attention.kv_groups"] = stats_g

    # 4. MLP neurons as units: neuron t is gate row t, up row t and down column t.
    gate, up, down = "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"
    feat_a = torch.cat([A[gate], A[up], A[down].T], -1)
    feat_b = torch.cat([B[gate], B[up], B[down].T], -1)
    coupling_n, report["mlp.neurons"] = transport(torch.cdist(feat_a, feat_b), options, relative=True)
    aligned[gate] = coupling_n.T @ A[gate]
    aligned[up] = coupling_n.T @ A[up]
    aligned[down] = A[down] @ coupling_n

    for key, value in aligned.items():
        report.setdefault(key, {})["norm_ratio"] = _norm_ratio(value, A[key])
        fused[key] = (value + B[key]) / 2
    return fused, report


# ----------------------------------------------------------------------------------------------
# One new layer


def make_new_block(sources: list[dict], args: ModelArgs, options: GrowthOptions) -> tuple[dict, dict]:
    """A new block's tensors (float32, keyed as Block.state_dict()) from its source blocks, and a report."""
    if options.method in ("llama-pro", "solar"):
        block, report = {k: v.clone() for k, v in sources[0].items()}, {}
    elif options.method == "avg":
        block, report = {k: (sources[0][k] + sources[1][k]) / 2 for k in BLOCK_KEYS}, {}
    elif options.align == "paper":
        block, report = paper_fuse(sources[0], sources[1], options)
    elif options.align == "published":
        block, report = published_fuse(sources[0], sources[1], options)
    else:
        block, report = structured_fuse(sources[0], sources[1], args, options)
    if options.zero_init:
        for key in OUTPUT_PROJECTIONS:
            block[key] = torch.zeros_like(block[key])
    return block, report


def growth_record(options: GrowthOptions, layout: list[Slot], num_base_layers: int, position, insert_after) -> dict:
    # What config.json keeps under "opt_deus": enough to know how the model was made and which
    # layers train.py should train by default.
    record = {
        "method": options.method, "align": options.align if options.method == "opt" else None,
        "epsilon": options.epsilon if options.method == "opt" else None,
        "normalize_plan": options.normalize_plan if options.method == "opt" else None,
        "zero_init": options.zero_init, "position": position, "insert_after": insert_after,
        "base_num_layers": num_base_layers, "new_layers": new_layer_indices(layout),
        "sources": [list(slot.sources) for slot in layout],
    }
    if options.method == "opt" and options.align == "published":
        record["note"] = ("align published reproduces the public OpT-DeUS code's numbers (float32 POT Sinkhorn, raw "
                          "plans); it is not a recommendation: on real weights that solver aborts at its first "
                          "iteration, leaving near-zero plans (see each matrix's aborted, abort_iteration, plan_mass)")
    return record


def resolve_positions(method: str, num_base_layers: int, num_new: int | None, position: str | None,
                      insert_after: list[int] | None) -> tuple[list[Slot], list[int] | None]:
    if method == "solar":
        return plan_layout(method, num_base_layers, insert_after, num_new), None
    if insert_after is None:
        if num_new is None:
            raise GrowthError("give the number of new layers or --insert-after")
        insert_after = insert_after_for(position or "top", num_base_layers, num_new, method)
    elif num_new is not None and num_new != len(insert_after):
        raise GrowthError(f"--new-layers {num_new} disagrees with {len(insert_after)} --insert-after positions")
    return plan_layout(method, num_base_layers, insert_after), insert_after


class _Progress:
    def __init__(self, total: int, log):
        self.total, self.log, self.start, self.done = total, log, time.perf_counter(), 0

    def step(self, what: str):
        self.done += 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        self.log(f"[{self.done}/{self.total}] {what}  elapsed {elapsed:.1f}s  ETA {eta:.1f}s")


def _quiet(_message: str):
    pass


# ----------------------------------------------------------------------------------------------
# Python API: grow a model in memory


def grow(model: Transformer, num_new: int | None = None, *, position: str | None = "top",
         insert_after: list[int] | None = None, options: GrowthOptions | None = None,
         log=_quiet) -> tuple[Transformer, dict]:
    """A new, deeper Transformer (the base model is not modified) and the growth report."""
    options = check_request(num_new, insert_after, options)
    args = model.current_args()
    layout, insert_after = resolve_positions(options.method, args.num_hidden_layers, num_new, position, insert_after)
    base_blocks = [{k: v.detach().float() for k, v in block.state_dict().items()} for block in model.layers]
    for i, block in enumerate(base_blocks):
        _check_finite(block, f"layer {i}")
    # Embeddings, final norm and head too: the same checks the command line makes on a checkpoint.
    _check_finite({k: v for k, v in model.state_dict().items() if not k.startswith("layers.")}, "model")

    record = growth_record(options, layout, args.num_hidden_layers, position, insert_after)
    grown = copy.deepcopy(model)
    grown.args = dataclasses.replace(args, num_hidden_layers=len(layout),
                                     extra={**args.extra, "opt_deus": record})
    layers, report_layers = [], []
    progress = _Progress(len(record["new_layers"]), log)
    dtype = next(model.parameters()).dtype
    for index, slot in enumerate(layout):
        if not slot.new:
            layers.append(grown.layers[slot.sources[0]])
            continue
        start = time.perf_counter()
        tensors, report = make_new_block([base_blocks[i] for i in slot.sources], args, options)
        block = copy.deepcopy(model.layers[slot.sources[0]])
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
        _check_cast_finite(tensors, f"new layer {index}", dtype)
        block.load_state_dict(tensors)
        layers.append(block)
        report_layers.append({"index": index, "sources": list(slot.sources),
                              "seconds": time.perf_counter() - start, "matrices": report})
        progress.step(f"new layer {index} from base {list(slot.sources)}")
    grown.layers = torch.nn.ModuleList(layers)
    return grown, {**record, "layers": report_layers}


def _check_finite(block: dict, where: str):
    for key, tensor in block.items():
        if not torch.isfinite(tensor).all():
            raise GrowthError(f"base {where}: {key} contains NaN or inf")


def _check_cast_finite(block: dict, where: str, dtype: torch.dtype):
    for key, tensor in block.items():
        if not torch.isfinite(tensor).all():
            raise GrowthError(f"{where}: {key} is not finite in {dtype_name(dtype)} (values beyond its range?)")


def check_request(num_new, insert_after, options: GrowthOptions | None) -> GrowthOptions:
    # What grow() and grow_checkpoint() (and so the command line) both check before any work.
    if num_new is not None and (isinstance(num_new, bool) or not isinstance(num_new, int) or num_new <= 0):
        raise GrowthError(f"the number of new layers (--new-layers) must be a positive integer, got {num_new!r}")
    if insert_after is not None and not all(isinstance(i, int) and not isinstance(i, bool) for i in insert_after):
        raise GrowthError(f"--insert-after: expected integer layer indices, got {insert_after!r}")
    if options is not None and not isinstance(options, GrowthOptions):
        raise GrowthError(f"options must be a GrowthOptions, got {type(options).__name__}")
    return options or GrowthOptions()


# ----------------------------------------------------------------------------------------------
# Streaming: Hugging Face folder in, Hugging Face folder out


def grow_checkpoint(base: str | Path, out: str | Path, num_new: int | None = None, *, position: str | None = "top",
                    insert_after: list[int] | None = None, options: GrowthOptions | None = None,
                    device: str = "cpu", dtype: torch.dtype | None = None, overwrite: bool = False,
                    max_shard_size: str | int = "5GB", log=print) -> dict:
    options = check_request(num_new, insert_after, options)
    reader = CheckpointReader(base)
    args = reader.args
    layout, insert_after = resolve_positions(options.method, args.num_hidden_layers, num_new, position, insert_after)
    out = Path(out)
    # --out may not be, contain or lie inside --base (with --overwrite that would delete the base).
    check_output_folder(out, [("--base", base)], overwrite)
    # --overwrite replaces an earlier output, not whatever folder a mistyped --out names.
    if overwrite and out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise CheckpointError(f"--out {out}: holds files but no config.json, so it is not an earlier output; "
                              f"--overwrite only replaces a model folder (choose a new or empty folder)")
    if not any((Path(base) / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        log(f"note: {base} has no tokenizer.json or tokenizer.model; {out} will have none either")
    out_dtype = dtype or reader.dtype("model.embed_tokens.weight")

    record = growth_record(options, layout, args.num_hidden_layers, position, insert_after)
    log(f"growing {base} ({args.num_hidden_layers} layers) -> {out} ({len(layout)} layers): method {options.method}"
        + (f", {options.align} alignment, epsilon {options.epsilon}" if options.method == "opt" else "")
        + f", new layers at {record['new_layers']}, zero-init {options.zero_init}, {device}")

    cache: dict[int, dict] = {}

    def base_block(i: int) -> dict:
        # The two most recently read base blocks stay in memory: each is written once and fused
        # with its neighbour, so a block is normally read once (SOLAR's repeated run reads its
        # blocks a second time). Evicting the oldest read, not the lowest index, keeps the block
        # just read when the layout jumps back down (SOLAR's second copy starts below the first's end).
        if i not in cache:
            block = reader.block(i, dtype=torch.float32, device=device)
            _check_finite(block, f"layer {i} ({base})")
            cache[i] = block
            while len(cache) > 2:
                del cache[next(iter(cache))]
        return cache[i]

    def checked(key: str) -> torch.Tensor:
        tensor = reader.tensor(key)
        if not torch.isfinite(tensor).all():
            raise GrowthError(f"base {base}: {key} contains NaN or inf")
        return tensor.to(out_dtype)

    report_layers = []
    progress = _Progress(len(record["new_layers"]), log)
    grown_args = dataclasses.replace(args, num_hidden_layers=len(layout), dtype=dtype_name(out_dtype),
                                     extra={**args.extra, "opt_deus": record})
    with CheckpointWriter(out, max_shard_size=max_shard_size, overwrite=overwrite,
                          inputs=[("--base", base)]) as writer:
        writer.add("model.embed_tokens.weight", checked("model.embed_tokens.weight"))
        for index, slot in enumerate(layout):
            if slot.new:
                start = time.perf_counter()
                tensors, report = make_new_block([base_block(i) for i in slot.sources], args, options)
                report_layers.append({"index": index, "sources": list(slot.sources),
                                      "seconds": time.perf_counter() - start, "matrices": report})
                progress.step(f"new layer {index} from base {list(slot.sources)}")
            else:
                tensors = base_block(slot.sources[0])
            for key in BLOCK_KEYS:
                writer.add(f"model.layers.{index}.{key}", tensors[key].to(out_dtype))
            reader.release()
        writer.add("model.norm.weight", checked("model.norm.weight"))
        if not args.tie_word_embeddings:
            writer.add("lm_head.weight", checked("lm_head.weight"))
        reader.check_all_read()  # also checks a redundant tied head equals the embeddings (not copied)
        growth_report = {**record, "options": dataclasses.asdict(options), "base": str(base), "layers": report_layers}
        writer.finish(grown_args.to_hf(), copy_files_from=base,
                      extra_files={"growth_report.json": json.dumps(growth_report, indent=2) + "\n"})
    log(f"wrote {out} ({len(layout)} layers, new {record['new_layers']}) in {time.perf_counter() - progress.start:.1f}s")
    return growth_report


# ----------------------------------------------------------------------------------------------
# Command line


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="opt-deus", description="Grow a LLaMA checkpoint by inserting new layers "
                              "(OpT-DeUS and baselines). Hugging Face folder in, Hugging Face folder out.",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                              epilog="Exit codes: 0 written; 2 a bad request (one line on stderr, nothing "
                                     "written, no input touched); 130/143 stopped by SIGINT/SIGTERM (the "
                                     "partial output is deleted). --out may not be, contain or lie inside --base.")
    p.add_argument("--base", required=True, help="base model: a Hugging Face LLaMA folder")
    p.add_argument("--out", required=True, help="output folder for the grown model")
    p.add_argument("--method", choices=METHODS, default="opt", help="how new layers are made")
    p.add_argument("--new-layers", type=positive_int, default=None, help="how many layers to add (K)")
    p.add_argument("--position", choices=POSITIONS, default="top",
                   help="where the K new layers go (llama-pro: uniform is LLaMA Pro's block expansion, a copy "
                        "after the last layer of each of K groups)")
    p.add_argument("--insert-after", type=_int_list, default=None,
                   help="explicit base-layer indices i (a new layer between i and i+1; llama-pro: a copy of i "
                        "right after it, the top layer included), e.g. 7,9,11")
    p.add_argument("--align", choices=ALIGNMENTS, default="structured",
                   help="alignment for --method opt; published reproduces the public code's float32 numbers "
                        "(a reproduction, not a recommendation: its solver aborts on real weights)")
    p.add_argument("--epsilon", type=_finite_float, default=None,
                   help="Sinkhorn regularisation; 0 = exact assignment (small problems only); None: "
                        "paper and published 0.06 (absolute, as published), structured 0.005 (relative to the mean "
                        "cost)")
    p.add_argument("--normalize-plan", action=argparse.BooleanOptionalAction, default=True,
                   help="rescale the plan to n*T (OT fusion); --no-normalize-plan keeps the public code's raw plan "
                        "(always so under --align published)")
    p.add_argument("--zero-init", action=argparse.BooleanOptionalAction, default=None,
                   help="zero o_proj and down_proj of new layers; None: on for opt and llama-pro, off otherwise")
    p.add_argument("--max-iter", type=positive_int, default=10000, help="Sinkhorn iterations at most, per problem")
    p.add_argument("--tol", type=_finite_float, default=1e-4,
                   help="Sinkhorn stops at this relative marginal error (--align published: POT's own stopping rule)")
    p.add_argument("--strict", action="store_true", help="fail if a Sinkhorn problem does not converge")
    p.add_argument("--device", default="cpu", help="where the alignment is computed (cpu, cuda, cuda:1, ...)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of the written weights; None keeps the base checkpoint's")
    p.add_argument("--max-marginal-error", type=float, default=GrowthOptions.max_marginal_error,
                   help="refuse a transport plan whose relative marginal error is beyond this (inf: accept any)")
    p.add_argument("--max-shard-size", type=_size, default="5GB", help="safetensors shard size of the output")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out (never one that is, contains or is inside --base)")
    return p


def main(argv=None) -> int:
    parsed = build_parser().parse_args(argv)
    try:
        check_device(parsed.device)
        options = GrowthOptions(method=parsed.method, align=parsed.align, epsilon=parsed.epsilon,
                                zero_init=parsed.zero_init, normalize_plan=parsed.normalize_plan,
                                max_iter=parsed.max_iter, tol=parsed.tol, strict=parsed.strict,
                                max_marginal_error=parsed.max_marginal_error)
        grow_checkpoint(parsed.base, parsed.out, parsed.new_layers, position=parsed.position,
                        insert_after=parsed.insert_after, options=options, device=parsed.device,
                        dtype=getattr(torch, parsed.dtype) if parsed.dtype else None,
                        overwrite=parsed.overwrite, max_shard_size=parsed.max_shard_size,
                        log=lambda message: print(message, file=sys.stderr, flush=True))
    except (GrowthError, CheckpointError, SinkhornError, ValueError) as e:
        return _fail(str(e))
    except OSError as e:  # an unwritable or full output location, a file vanishing under us
        return _fail(f"{e.filename or parsed.out}: {e.strerror or e}")
    except KeyboardInterrupt:
        return _fail("stopped by SIGINT; nothing written", 130)
    except Interrupted as e:
        return _fail(f"{e}; nothing written", 128 + e.signum)
    return 0


def _fail(message: str, code: int = 2) -> int:
    print(f"opt-deus: error: {' '.join(message.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
