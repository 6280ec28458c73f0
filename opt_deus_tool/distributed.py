"""Training under torchrun: one model sharded over every process with FSDP2, behind train.py's seam.

train.train() runs one process's loop; at the few points where many processes differ it asks its
`dist` (train.OneProcess). FSDP here is that seam for torchrun: init_distributed() joins the process
group and returns it, and train() then trains one model whose every block, embedding, norm and head
is sharded over all processes (each keeps 1/N of every float32 weight, gradient and AdamW moment and
gathers one block at a time), takes 1/N of every step's samples, and writes checkpoints as one
process would, so that any number of processes resumes them (docs/TRAINING.md): the hooks
(runs.RunFolder) place a resumed optimizer state and write checkpoints through the seam's
optimizer_state and save. train() calls its `log` and hooks in every process: give rank 0 the ones
that print and write (runs.RunFolder writes only in rank 0; train_cli silences the others' log).
"""

from __future__ import annotations

import datetime
import os
from typing import Callable

import torch
import torch.distributed as td

from opt_deus_core.model import Transformer
from opt_deus_core.train import IGNORE_INDEX, OneProcess, TrainError
from opt_deus_tool.devices import resolve_device


def rank_and_world() -> tuple[int, int]:
    if td.is_available() and td.is_initialized():
        return td.get_rank(), td.get_world_size()
    return 0, 1


def init_distributed(device_name: str, timeout_s: float) -> FSDP | None:
    """Under torchrun (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT set): join the process group
    and return the FSDP seam for train(); a plain process gets None (train's OneProcess). The timeout
    bounds every collective: a rank that died or hangs fails the others."""
    if td.is_initialized():
        return FSDP(resolve_device(device_name))
    if "WORLD_SIZE" not in os.environ:
        return None
    missing = [key for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if key not in os.environ]
    if missing:
        raise TrainError(f"WORLD_SIZE is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: "
                         f"start the run with torchrun, or unset WORLD_SIZE")
    device = resolve_device(device_name)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    try:
        td.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None,
                              timeout=datetime.timedelta(seconds=timeout_s))
    except (td.DistError, ValueError) as e:
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        raise TrainError(f"cannot join the other processes at {where} (WORLD_SIZE {os.environ['WORLD_SIZE']}): "
                         f"{str(e).strip().splitlines()[0]}; start the run with torchrun") from None
    return FSDP(device)


class ShardedLoss(torch.nn.Module):
    # FSDP2 gathers a module's parameters in hooks around its forward. forward_loss reads the embeddings,
    # final norm and head itself, so the FSDP root that owns them is this module, whose forward is the loss.
    def __init__(self, model: Transformer, loss_fn: Callable):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, x, y, frozen_prefix):
        return self.loss_fn(self.model, x, y, frozen_prefix)


def shard_model(model: Transformer, device: torch.device, loss_fn: Callable) -> ShardedLoss:
    # fully_shard each block, then the root (embeddings, final norm, head): every rank keeps 1/N of every
    # float32 weight and gathers one block at a time. Frozen blocks are sharded too (they are most of the
    # model); FSDP2 gives parameters with requires_grad=False no gradient and no reduce-scatter. CUDA: blocks
    # are gathered in bf16 (what autocast casts them to anyway), gradients reduced in float32; the root is
    # gathered in float32, so the residual stream stays float32 as in the plain path. CPU (gloo): float32.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (td.get_world_size(),))
    root = ShardedLoss(model, loss_fn)
    for module in (*model.layers, root):
        if device.type == "cuda" and module is not root:
            policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32, cast_forward_inputs=False)
        else:
            policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
        fully_shard(module, mesh=mesh, mp_policy=policy)
        # Each rank's loss is already divided by the step's target count: sum (gloo has no PREMUL_SUM), don't average.
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    return root


def gather_full(state, keep: bool):
    # DTensor shards -> whole CPU tensors, through nested dicts and lists. Every rank joins each all-gather in the
    # same order; only ranks with `keep` hold on to the result.
    from torch.distributed.tensor import DTensor
    if isinstance(state, dict):
        return {k: gather_full(v, keep) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(gather_full(v, keep) for v in state)
    if isinstance(state, DTensor):
        full = state.full_tensor()
        return full.cpu() if keep else None
    return state


def shard_optimizer_state(saved: dict, params: list[torch.nn.Parameter]) -> dict:
    # A full optimizer state (one process's; state i is the optimizer's i-th parameter's) -> this rank's shards, laid
    # out like each parameter. Every rank reads the file (memory-mapped) and keeps its own rows: no communication.
    from torch.distributed.tensor import distribute_tensor
    state = {}
    for i, s in saved["state"].items():
        p = params[i]
        state[i] = {k: v if k == "step" else distribute_tensor(v.to(p.device), p.device_mesh, p.placements,
                                                               src_data_rank=None) for k, v in s.items()}
    return {**saved, "state": state}


class FSDP(OneProcess):
    """train()'s seam under torchrun: the model sharded with FSDP2 over every process of the group."""
    stops_mid_step = False  # the ranks' collectives must match: a stop waits for the end of the step

    def __init__(self, device: torch.device):
        self.rank, self.world, self.local = td.get_rank(), td.get_world_size(), device

    def device(self, name: str) -> torch.device:
        return self.local  # chosen from the same name when the process group started (LOCAL_RANK's GPU)

    def wrap(self, model: Transformer, loss_fn: Callable, device: torch.device) -> tuple:
        # After requires_grad is set (FSDP2 copies it into each shard); the shards replace the parameters,
        # on the device. Evaluation goes through the same root: its gathers are collectives.
        root = shard_model(model, device, loss_fn)
        return root, root

    def sum(self, value):
        if isinstance(value, torch.Tensor):
            td.all_reduce(value)
            return value
        counts = torch.tensor([value], dtype=torch.float64, device=self.local)
        td.all_reduce(counts)
        return int(counts.item())

    def clip_grad_norm(self, params: list, max_norm: float) -> torch.Tensor:
        # FSDP2 summed the gradients; the norm is a DTensor over all shards.
        return torch.nn.utils.clip_grad_norm_(params, max_norm).full_tensor()

    def share(self, batches: list) -> list:
        # Rank r takes batches r, r+N, ...; every rank runs as many forwards (FSDP gathers are collectives),
        # padding with a batch whose targets are all ignored: it adds nothing.
        x0, y0 = batches[0]
        padding = [(x0, torch.full_like(y0, IGNORE_INDEX))] * (
            -(-len(batches) // self.world) - len(batches[self.rank::self.world]))
        return batches[self.rank::self.world] + padding

    def optimizer_state(self, saved: dict, params: list) -> dict:
        return shard_optimizer_state(saved, params)

    def save(self, write: Callable, weights: dict, optimizer_state: dict) -> str | None:
        # Every rank joins the gathers, rank 0 alone writes the whole state, no rank goes on before it is
        # written. Full state dicts, not per-rank shards: any number of processes resumes from them.
        keep = self.rank == 0
        weights, optimizer_state = gather_full(weights, keep), gather_full(optimizer_state, keep)
        path = write(weights, optimizer_state) if keep else None
        td.barrier()
        return path

    def agree_stop(self, signum: int) -> int:
        # Ranks receive a signal at slightly different moments: they agree on the largest.
        flag = torch.tensor([signum], device=self.local)
        td.all_reduce(flag, op=td.ReduceOp.MAX)
        return int(flag.item())
