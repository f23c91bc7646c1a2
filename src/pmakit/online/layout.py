"""The engine's kernel groups: averaged parameters grouped by (device, dtype), their tensors allocated on first use.

A foreach kernel takes lists of tensors of one device and dtype, so the engine folds group by group.
The groups are built once and cached by the engine; they are rebuilt only when the parameter lists
change or a checkpoint load replaces the tensors.
"""

from __future__ import annotations

import warnings

import torch

from .distributed import local_shard
from .offload import check_offload, moved_average, new_average, placement, staging_for
from .slots import SlotGroup
from .state import SlotStore


__all__ = ["build_groups"]


def build_groups(lists: list[list[torch.Tensor]], store: SlotStore, refill: bool) -> list[SlotGroup]:
    """The trainable tensors of ``lists`` grouped by (device, dtype), with their averages and anchors from ``store``.

    Missing tensors are allocated (zero fp32); with ``refill`` (the cycle holds samples) they start from
    the live weights instead (`_fill_missing`).
    """
    by_key: dict[tuple, SlotGroup] = {}
    fresh: list[tuple[torch.Tensor, torch.Tensor]] = []  # (average or anchor, parameter shard) allocated just now
    for params in lists:
        for p in params:
            if p.requires_grad:
                _add(by_key, p, store, fresh)
    for (device, _dtype), group in by_key.items():
        if store.offload and device.type == "cuda":
            group.staging = staging_for(group.lparams)
    if fresh and refill:
        _fill_missing(fresh)
    return list(by_key.values())


def _add(by_key: dict, p: torch.Tensor, store: SlotStore, fresh: list) -> None:
    """Put ``p`` with its tensors (the average first, then the anchors) into the group of its device and dtype."""
    local = local_shard(p)
    slots = []
    for key in store.keys:
        stored = store.stored(p, key) is not None
        slots.append(slot_for(p, key, store))
        if not stored:
            fresh.append((local_shard(slots[-1]), local))
    group = by_key.setdefault((local.device, local.dtype), SlotGroup([], [], lanchors=[[] for _ in slots[1:]]))
    group.params.append(p)
    group.avgs.append(slots[0])
    group.lparams.append(local)
    group.lavgs.append(local_shard(slots[0]))
    for anchors, anchor in zip(group.lanchors, slots[1:], strict=True):
        anchors.append(local_shard(anchor))


def slot_for(p: torch.Tensor, key: str, store: SlotStore) -> torch.Tensor:
    """``p``'s tensor ``key``: allocated if missing, moved to fp32 where the average lives if it is elsewhere."""
    avg = store.stored(p, key)
    check_offload(p, store.offload)
    device, pinned = placement(p, store.offload)
    if avg is None:
        avg = new_average(p, device, pinned)
        store.keep(p, key, avg)
    elif avg.dtype != torch.float32 or local_shard(avg).device != device:
        avg = moved_average(avg, p, device, pinned)
        store.keep(p, key, avg)
    return avg


@torch.no_grad()
def _fill_missing(fresh: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Samples were taken but some averages did not come back (a loader that dropped them): start
    those from the live weights, the best guess left, rather than from zeros, which would shrink them."""
    count = len({id(local) for _, local in fresh})
    warnings.warn(
        f"PMA: {count} parameter(s) have no stored average although the current cycle holds samples (the "
        "checkpoint loader dropped them?); their average restarts from the live weights.",
        UserWarning,
        stacklevel=4,
    )
    for avg, local in fresh:
        avg.copy_(local)
