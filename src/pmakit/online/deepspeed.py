"""DeepSpeed ZeRO: the average shadows each rank's fp32 master partition.

ZeRO re-points the torch optimizer at flat fp32 partitions and steps it once per (sub-)group,
so the engine is driven from the ZeRO optimizer's own ``step`` instead of the torch one's.

An adapter on the engine, not under it: this module imports the engine and drives it through its
public surface (`PmaEngine.drive_externally`, `PmaEngine.on_step`, `PmaEngine.layout_key`); the engine
knows nothing of DeepSpeed. `attach_engine` reaches `follow_deepspeed` through the backend adapters
that the `pmakit.online` package registers (`pmakit.online.hooks.BACKENDS`).
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .engine import PmaEngine


__all__ = ["attach_deepspeed", "find_zero_optimizer", "follow_deepspeed"]


def _relink_zero_fragments(engine: PmaEngine, zero_optimizer) -> None:
    """Let ZeRO-1/2 map each parameter to its slice of the average, as it does for its own state.

    ZeRO-1/2 links every parameter to views of its optimizer state once, after the first step;
    the average is allocated after that step, so the links are rebuilt once it exists (and
    whenever it is replaced, e.g. by a checkpoint load). `pmakit.online.gather` gathers through them.
    """
    key = engine.layout_key
    if not hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state") or key is None:
        return
    if getattr(zero_optimizer, "_pma_linked", None) != key:
        zero_optimizer._hp_optimizer_states_linked = False
        zero_optimizer._lazy_init_hp_params_optimizer_state()
        zero_optimizer._pma_linked = key


# The fp32 master partitions of each DeepSpeed wrapper: ZeRO-3, ZeRO-1/2, and BF16_Optimizer (ZeRO-1 with
# bf16 weights and fp32 gradient accumulation).
_ZERO_PARTITIONS = ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition")


def find_zero_optimizer(optimizer):
    """The DeepSpeed ZeRO optimizer in a wrapper chain (Accelerate -> ZeRO -> torch), if any."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        if any(hasattr(optimizer, name) for name in _ZERO_PARTITIONS):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def follow_deepspeed(engine: PmaEngine, optimizer) -> None:
    """Drive ``engine`` from the DeepSpeed ZeRO optimizer in ``optimizer``'s wrapper chain, if there is one.

    The backend adapter `attach_engine` runs (`pmakit.online.hooks.BACKENDS`): nothing happens without ZeRO.
    """
    zero = find_zero_optimizer(optimizer)
    if zero is not None:
        attach_deepspeed(engine, zero)


def attach_deepspeed(engine: PmaEngine, zero_optimizer) -> None:
    """Drive ``engine`` from a DeepSpeed ZeRO optimizer (stages 1-3; idempotent).

    ZeRO re-points the torch optimizer at flat fp32 master partitions (one per parameter group,
    or sub-group under ZeRO-3) and steps it once per (sub-)group, so the engine counts the ZeRO
    optimizer's own ``step`` instead (skipped on fp16 overflow) and averages each rank's fp32
    partition: the average is sharded exactly like the master weights, saved in DeepSpeed's
    optimizer checkpoints, and gathered per parameter on export (`pmakit.online.gather`).
    """
    if getattr(zero_optimizer, "_pma_engine_driven", None) is engine:
        return
    if engine.config.write_back or engine.config.eval:
        raise InputError(
            "PMA under DeepSpeed ZeRO keeps the average beside the fp32 master partitions; `write_back` and "
            "`eval` (which put the average into the live weights) are not supported there yet."
        )
    name = next(name for name in _ZERO_PARTITIONS if hasattr(zero_optimizer, name))

    def source() -> list[list[torch.Tensor]]:
        return [[t] for t in getattr(zero_optimizer, name)]

    engine.drive_externally(source)
    engine.deepspeed = True
    original_step = zero_optimizer.step

    def step(*args, **kwargs):
        result = original_step(*args, **kwargs)
        if not getattr(zero_optimizer, "overflow", False):
            engine.on_step()
            _relink_zero_fragments(engine, zero_optimizer)
        return result

    zero_optimizer.step = step
    zero_optimizer._pma_engine_driven = engine
