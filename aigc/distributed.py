"""Data-parallel training under ``torchrun``: the few pieces the training loop needs, kept apart.

    torchrun --standalone --nproc_per_node 2 -m pipeline.train -- --processed ...
    (docs/team.md, "Multi-GPU and multi-node training")

``torchrun`` starts one process per device and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``; without them everything here is a no-op and training is the
single-process loop, unchanged.

What data parallelism means here, so that N processes at global batch B follow the same
trajectory as one process at batch B (tests/test_distributed.py checks it):

* every rank seeds identically, so every rank draws the same global batch order and the same
  global z; each takes its own slice (:func:`shard`) -- the DistributedSampler idea, applied to
  the split that already lives on the device;
* G and D are wrapped in ``DistributedDataParallel``, which averages gradients across ranks:
  the mean of N per-rank means over B/N rows is the mean over B;
* on CUDA (NCCL) BatchNorm layers become ``SyncBatchNorm``, whose statistics are over the global
  batch. PyTorch's SyncBatchNorm runs on GPUs only; on CPU (gloo) each rank normalises with its
  own B/N rows, which is close to, not equal to, the global batch (the test uses a model
  without BatchNorm for its exact comparison and states the BatchNorm one separately);
* the G step runs D without its DDP wrapper: D is frozen there and receives no gradient, and a
  DDP forward whose parameters get none would stall the next reduction;
* the per-step scalars are averaged across ranks once per logging window (:func:`mean_across`),
  so rank 0 reports the global batch's losses; only rank 0 runs hooks, writes files and tracks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from aigc.errors import UserError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that runs hooks, writes outputs and talks to MLflow."""
        return self.rank == 0


def from_env(environ: Mapping[str, str] | None = None) -> Dist:
    """The job as ``torchrun`` describes it in the environment; one process when it does not."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        return Dist(int(env.get("RANK", "0")), world, int(env.get("LOCAL_RANK", "0"))) if world > 1 else Dist()
    except ValueError:
        raise UserError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers (got RANK={env.get('RANK')!r}, "
                        f"WORLD_SIZE={env.get('WORLD_SIZE')!r}); start the job with torchrun") from None


def setup(d: Dist, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on CPU); each rank's device (``cuda:LOCAL_RANK``)."""
    if not d.enabled:
        return device
    if device.type == "cuda":
        if d.local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {d.local_rank} but only {torch.cuda.device_count()} GPU(s) here; "
                            f"lower torchrun's --nproc_per_node")
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return device


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def per_rank_batch(global_batch: int, d: Dist) -> int:
    """``train.batch_size`` is the global batch; each rank takes an equal share of it."""
    if global_batch % d.world_size:
        raise UserError(f"train.batch_size = {global_batch} does not split over {d.world_size} processes; "
                        f"use a multiple of {d.world_size}")
    return global_batch // d.world_size


def shard(rows: torch.Tensor, d: Dist) -> torch.Tensor:
    """This rank's contiguous slice of a global batch's rows (indices, or z)."""
    if not d.enabled:
        return rows
    b = len(rows) // d.world_size
    return rows[d.rank * b:(d.rank + 1) * b]


def wrap(G: nn.Module, D: nn.Module, d: Dist, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """G and D for the training step: DDP-wrapped (BatchNorm synchronised on CUDA) when distributed.

    Call it before building the optimisers or after, either works: SyncBatchNorm conversion keeps
    the same parameter objects, and DDP wraps the modules without copying them.
    """
    if not d.enabled:
        return G, D
    if device.type == "cuda":
        G, D = nn.SyncBatchNorm.convert_sync_batchnorm(G), nn.SyncBatchNorm.convert_sync_batchnorm(D)
    ids = [device.index] if device.type == "cuda" else None
    # broadcast_buffers=False: BatchNorm running statistics are not gradients; each rank keeps its
    # own (identical under SyncBatchNorm), and rank 0's are the ones saved.
    return (nn.parallel.DistributedDataParallel(G, device_ids=ids, broadcast_buffers=False),
            nn.parallel.DistributedDataParallel(D, device_ids=ids, broadcast_buffers=False))


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (for the frozen-D pass of the G step)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def mean_across(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """The element-wise mean of ``t`` over the ranks (one collective call; every rank must call it)."""
    if not d.enabled:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / d.world_size
