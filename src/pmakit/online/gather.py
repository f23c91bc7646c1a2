"""Gathering the average for export: one full tensor at a time, whatever the sharding.

Under FSDP2 the averages are DTensor shards; under DeepSpeed ZeRO they sit beside the fp32
master partitions in the optimizer state. Gathering is a collective: every process calls it,
in the same order; only the main process keeps the result.
"""

from __future__ import annotations

import torch

from .distributed import is_dtensor, like_dtensor


__all__ = ["gather_averaged_state_dict"]


def _full(t, is_main_process: bool):
    """``t`` whole on the CPU of the main process (None elsewhere); a DTensor is all-gathered (collective)."""
    if is_dtensor(t):
        local = t.to_local()
        if local.device.type != t.device_mesh.device_type:  # an offloaded (pinned CPU) shard of a GPU mesh
            t = like_dtensor(t, local.to(t.device_mesh.device_type))
        t = t.full_tensor()
    return t.detach().cpu() if is_main_process else None


def gather_averaged_state_dict(
    model,
    averages: dict,
    *,
    is_main_process: bool = True,
    optimizer_state_key: str | None = None,
) -> dict | None:
    """The model's full state dict with the averages in place of its weights, on the main process.

    Returns ``{name: CPU tensor}`` on the main process and None elsewhere. Sharded tensors are
    gathered one at a time, so no rank ever holds more than one full tensor beyond its shards:
    FSDP2 DTensors with ``full_tensor`` and, with ``optimizer_state_key`` (DeepSpeed ZeRO, where the
    average lives beside the fp32 master partitions), DeepSpeed's
    ``safe_get_full_optimizer_state``; frozen ZeRO-3 parameters are gathered with
    ``GatheredParameters``. Those are collectives: every process must call this, in the same order.
    Unsharded models need no communication and other processes return at once.

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
    params = list(model.named_parameters(remove_duplicate=False))
    state_dict = model.state_dict()
    sharded = optimizer_state_key is not None or any(is_dtensor(t) for t in state_dict.values())
    if not sharded and not is_main_process:
        return None
    names_by_param: dict[int, list[str]] = {}
    unique: list = []
    for name, param in params:
        if id(param) not in names_by_param:
            unique.append(param)
        names_by_param.setdefault(id(param), []).append(name)
    by_id = {id(p): a for p, a in averages.items()}
    result: dict = {}
    covered: set[str] = set()
    for param in unique:
        names = names_by_param[id(param)]
        covered.update(names)
        if not any(name in state_dict for name in names):
            continue
        if optimizer_state_key is not None:
            full = _gather_zero(param, optimizer_state_key, is_main_process)
        else:
            value = by_id.get(id(param), param)
            full = _full(value, is_main_process)
        if full is not None:
            full = full.to(dtype=param.dtype).reshape(_full_shape(param))
            for name in names:
                if name in state_dict:
                    result[name] = full
    for name, tensor in state_dict.items():  # buffers and anything else the model saves
        if name not in covered:
            value = _full(tensor, is_main_process)
            if value is not None:
                result[name] = value
    return result if is_main_process else None


def _full_shape(param) -> torch.Size:
    shape = getattr(param, "ds_shape", None)  # a ZeRO-3 parameter is empty outside a gather
    return torch.Size(shape) if shape is not None else param.shape


def _gather_zero(param, key: str, is_main_process: bool):
    """One parameter's average (trainable) or weight (frozen) gathered from DeepSpeed ZeRO partitions."""
    from deepspeed.utils import safe_get_full_optimizer_state

    if param.requires_grad:
        full = safe_get_full_optimizer_state(param, key)
        if full is None:
            raise RuntimeError(f"DeepSpeed has no `{key}` state for a parameter of shape {tuple(_full_shape(param))}.")
        return full.detach().cpu() if is_main_process else None
    if hasattr(param, "ds_id"):
        from deepspeed.zero import GatheredParameters

        with GatheredParameters([param], modifier_rank=None):
            return param.detach().cpu().clone() if is_main_process else None
    return param.detach().cpu() if is_main_process else None
