"""Distributed plumbing the engine shares with exports and tools: DTensor shards and wrapper chains.

FSDP2 parameters are DTensors: the kernels work on their rank-local shards, and new tensors
must be wrapped with the template's mesh and placements. Accelerate, DDP and
``torch.compile`` wrap optimizers and models; PMA always works on what is inside.
"""

from __future__ import annotations

import os

import torch


__all__ = ["is_dtensor", "is_main_process", "like_dtensor", "local_shard", "unwrap_model", "unwrap_optimizer"]


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter, or an average sharded like one)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without torch.distributed
        return False
    return isinstance(t, DTensor)


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """The rank-local shard of a DTensor (a view: writes go to the shard), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers such as Accelerate's `AcceleratedOptimizer`."""
    seen = set()
    while hasattr(optimizer, "optimizer") and id(optimizer) not in seen and not hasattr(optimizer, "_pma_engine"):
        seen.add(id(optimizer))
        inner = optimizer.optimizer
        if not isinstance(inner, torch.optim.Optimizer) and not hasattr(inner, "param_groups"):
            break
        optimizer = inner
    return optimizer


def like_dtensor(template: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """A DTensor with ``template``'s mesh, placements and global shape around the shard ``local``.

    The global shape and stride are given explicitly: inferring them from the local shard is
    wrong for the uneven last shard of a dim-0 split.
    """
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local,
        template.device_mesh,
        template.placements,
        run_check=False,
        shape=template.shape,
        stride=template.stride(),
    )


def unwrap_model(model):
    """The model inside DDP/compile wrappers, without importing accelerate's state machinery."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def is_main_process() -> bool:
    """Rank 0 of an initialised process group, else ``RANK`` from the launcher's environment (0 if unset)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0
