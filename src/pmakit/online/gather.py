"""Gathering the average for export: one full tensor at a time, whatever the sharding.

Under FSDP2 the averages are DTensor shards; under DeepSpeed ZeRO they sit beside the fp32
master partitions in the optimizer state. Gathering is a collective: every process calls it,
in the same order; only the main process keeps the result.

An export is a list of `ExportEntry` (one per distinct tensor of the model's state dict, tied
names together), so a writer can lay the output out from shapes alone and then fetch one full
tensor at a time (`gather_entry`): the main process never holds more than one of them. For a
background export, `snapshot_entry` copies a rank's local shard to the CPU and `gather_snapshot`
gathers it later over a separate (gloo) process group, from a writer thread, while training
goes on with its own collectives.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import TrainingError
from .distributed import is_dtensor, like_dtensor


__all__ = [
    "ExportEntry",
    "ShardSnapshot",
    "export_entries",
    "gather_averaged_state_dict",
    "gather_entry",
    "gather_snapshot",
    "snapshot_entry",
    "snapshot_gatherable",
]


@dataclass
class ExportEntry:
    """One distinct tensor of an export: every state-dict name it has, where its value comes from, its full layout.

    ``source`` is the average for an averaged parameter, else the model's own parameter or buffer
    (a DTensor under FSDP2); ``param`` is the parameter (None for buffers).
    """

    names: list[str]
    source: torch.Tensor
    param: torch.Tensor | None
    dtype: torch.dtype
    shape: torch.Size
    averaged: bool


def _full(t, is_main_process: bool):
    """``t`` whole on the CPU of the main process (None elsewhere); a DTensor is all-gathered (collective)."""
    if hasattr(t, "ds_id"):  # a DeepSpeed ZeRO-3 parameter: empty outside a gather
        from deepspeed.runtime.zero import GatheredParameters

        with GatheredParameters([t], modifier_rank=None):
            return t.detach().cpu().clone() if is_main_process else None
    if is_dtensor(t):
        local = t.to_local()
        if local.device.type != t.device_mesh.device_type:  # an offloaded (pinned CPU) shard of a GPU mesh
            t = like_dtensor(t, local.to(t.device_mesh.device_type))
        t = t.full_tensor()
    return t.detach().cpu() if is_main_process else None


def _full_shape(param) -> torch.Size:
    shape = getattr(param, "ds_shape", None)  # a ZeRO-3 parameter is empty outside a gather
    return torch.Size(shape) if shape is not None else param.shape


def export_entries(model, averages: dict) -> list[ExportEntry]:
    """The model's state dict as export entries, in state-dict order, averages in place of their parameters.

    Tied parameters (one tensor under several names) make one entry; no tensor is read or gathered.
    """
    names_by_param: dict[int, list[str]] = {}
    params: dict[int, torch.Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_by_param.setdefault(id(param), []).append(name)
        params[id(param)] = param
    param_of_name = {name: params[pid] for pid, names in names_by_param.items() for name in names}
    by_id = {id(p): a for p, a in averages.items()}
    entries: list[ExportEntry] = []
    done: set[int] = set()
    state_dict = model.state_dict()
    for name, tensor in state_dict.items():
        param = param_of_name.get(name)
        if param is None:
            entries.append(ExportEntry([name], tensor, None, tensor.dtype, tensor.shape, False))
            continue
        if id(param) in done:
            continue
        done.add(id(param))
        state_names = [n for n in names_by_param[id(param)] if n in state_dict]
        average = by_id.get(id(param))
        source = param if average is None else average
        entries.append(ExportEntry(state_names, source, param, param.dtype, _full_shape(param), average is not None))
    return entries


def gather_entry(entry: ExportEntry, is_main_process: bool, optimizer_state_key: str | None = None):
    """``entry``'s full tensor, in its export dtype and shape, on the main process (None elsewhere).

    A collective for sharded tensors (every process calls it, in the same order); with
    ``optimizer_state_key`` (DeepSpeed ZeRO) parameters are gathered through DeepSpeed.
    """
    if optimizer_state_key is not None and entry.param is not None:
        full = _gather_zero(entry.param, optimizer_state_key, is_main_process)
    else:
        full = _full(entry.source, is_main_process)
    if full is None:
        return None
    return full.to(dtype=entry.dtype).reshape(entry.shape)


def iter_gathered(
    entries: list[ExportEntry], is_main_process: bool, optimizer_state_key: str | None = None
) -> Iterator[tuple[ExportEntry, torch.Tensor | None]]:
    """Each entry with its full tensor (main process) or None, one gather at a time."""
    for entry in entries:
        yield entry, gather_entry(entry, is_main_process, optimizer_state_key)


def gather_averaged_state_dict(
    model,
    averages: dict,
    *,
    is_main_process: bool = True,
    optimizer_state_key: str | None = None,
) -> dict | None:
    """The model's full state dict with the averages in place of its weights, on the main process.

    Returns ``{name: CPU tensor}`` on the main process and None elsewhere. This holds the whole
    model on the main process; exports stream instead (`export_entries` + `gather_entry`). Sharded
    tensors are gathered one at a time (FSDP2 ``full_tensor``; DeepSpeed's
    ``safe_get_full_optimizer_state`` with ``optimizer_state_key``): collectives, so every process
    must call this, in the same order. Unsharded models need no communication.

    Args:
        model: The (possibly sharded) model whose state dict is exported.
        averages: ``{parameter: fp32 average}`` from the engine.
        is_main_process: Whether this process keeps the result.
        optimizer_state_key: The optimizer-state key of the average under DeepSpeed ZeRO.

    Returns:
        ``{name: CPU tensor}`` on the main process, None on the others.

    Raises:
        RuntimeError: a sharded tensor cannot be gathered (e.g. DeepSpeed is missing).
    """
    entries = export_entries(model, averages)
    sharded = optimizer_state_key is not None or any(is_dtensor(e.source) for e in entries)
    sharded = sharded or any(hasattr(e.source, "ds_id") for e in entries)  # ZeRO-3 live weights
    if not sharded and not is_main_process:
        return None
    result: dict = {}
    for entry, full in iter_gathered(entries, is_main_process, optimizer_state_key):
        for name in entry.names:
            result[name] = full
    return result if is_main_process else None


def _gather_zero(param, key: str, is_main_process: bool):
    """One parameter's average (trainable) or weight (frozen) gathered from DeepSpeed ZeRO partitions."""
    from deepspeed.utils import safe_get_full_optimizer_state

    if param.requires_grad:
        full = safe_get_full_optimizer_state(param, key)
        if full is None:
            shape = tuple(_full_shape(param))
            raise TrainingError(f"DeepSpeed has no `{key}` state for a parameter of shape {shape}.")
        return full.detach().cpu() if is_main_process else None
    if hasattr(param, "ds_id"):
        from deepspeed.runtime.zero import GatheredParameters

        with GatheredParameters([param], modifier_rank=None):
            return param.detach().cpu().clone() if is_main_process else None
    return param.detach().cpu() if is_main_process else None


# ---------------------------------------------------------------------------- background exports
@dataclass
class ShardSnapshot:
    """A rank's CPU copy of one entry's local shard, taken when the cycle ended.

    ``shard_dim`` is the dimension split across the process group (None: ``local`` is the whole tensor).
    """

    local: torch.Tensor
    shard_dim: int | None


def snapshot_gatherable(entries: list[ExportEntry], world_size: int) -> bool:
    """Whether `gather_snapshot` can rebuild every entry: unsharded, or DTensors on a 1-D mesh of every rank
    split along one dimension (FSDP2's layout) or replicated."""
    from torch.distributed.tensor import Replicate, Shard

    for entry in entries:
        if not is_dtensor(entry.source):
            continue
        mesh, placements = entry.source.device_mesh, entry.source.placements
        if mesh.ndim != 1 or mesh.size() != world_size or not isinstance(placements[0], Shard | Replicate):
            return False
    return True


def snapshot_entry(entry: ExportEntry, reuse_cpu: bool) -> ShardSnapshot:
    """``entry``'s local shard on the CPU: a copy (pinned when it comes from an accelerator).

    With ``reuse_cpu`` a tensor already on the CPU is kept as is (no copy): the caller must then
    finish with it before the tensor changes (the next fold of the average).
    """
    from torch.distributed.tensor import Shard

    shard_dim = None
    local = entry.source
    if is_dtensor(local):
        placement = local.placements[0]
        shard_dim = placement.dim if isinstance(placement, Shard) else None
        local = local.to_local()
    local = local.detach()
    if local.device.type == "cpu":
        return ShardSnapshot(local if reuse_cpu else local.clone(), shard_dim)
    copy = torch.empty(local.shape, dtype=local.dtype, pin_memory=True)
    copy.copy_(local)
    return ShardSnapshot(copy, shard_dim)


def gather_snapshot(entry: ExportEntry, snapshot: ShardSnapshot, is_main_process: bool, group=None):
    """The full tensor of ``entry`` from every rank's snapshot, on the main process (None elsewhere).

    A collective over ``group`` (a gloo group, so it may run in a thread beside training's own
    collectives). Shards follow ``torch.chunk``: padded to the first chunk's size, gathered, trimmed.
    """
    local = snapshot.local
    if snapshot.shard_dim is not None:
        local = _gather_chunks(local, snapshot.shard_dim, entry.shape, is_main_process, group)
    if not is_main_process:
        return None
    return local.to(dtype=entry.dtype).reshape(entry.shape)


def _gather_chunks(local: torch.Tensor, dim: int, shape: torch.Size, is_main_process: bool, group):
    import torch.distributed as dist

    world = dist.get_world_size(group)
    chunk = -(-shape[dim] // world)
    padded_shape = list(local.shape)
    padded_shape[dim] = chunk
    padded = torch.zeros(padded_shape, dtype=local.dtype)
    padded.narrow(dim, 0, local.shape[dim]).copy_(local)
    pieces = [torch.empty_like(padded) for _ in range(world)] if is_main_process else None
    dist.gather(padded, pieces, dst=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    if not is_main_process:
        return None
    return torch.cat(pieces, dim=dim).narrow(dim, 0, shape[dim])
