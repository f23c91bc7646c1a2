"""The fp32 tensors the engine keeps per parameter ("slots"): the average, and the anchors of its rule.

Most rules need the average alone. A rule whose running form is not an average of itself (``bema``)
declares anchors (`Rule.anchors`): copies of the cycle's first sample kept beside the average, which
its `Rule.finish` uses after the last sample to correct the average in place (``avg += f (x_n -
anchor)``), so that the average then holds the closed-form merge and every reader (export,
write-back, evaluation) reads it as for any rule. An anchor lives exactly where the average does:
fp32 in the optimizer state under ``pma_<rule>_<anchor>`` (``pma_bema_theta0``), allocated at the
first step, offloaded, sharded and saved with it, and beside the state, saved as ``<key>_pending``,
for parameters the optimizer has not stepped yet.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..averaging import AveragingRule, rule_class, rule_names
from .kernels import fold_into


__all__ = ["AVG_KEY", "fold_sample", "is_slot_key", "pending_key", "pop_pending", "slot_keys"]

AVG_KEY = "pma_avg"
_PENDING = "_pending"


def anchor_key(algo: str, anchor: str) -> str:
    """The optimizer-state key of a rule's anchor: ``pma_bema_theta0``."""
    return f"pma_{algo}_{anchor}"


def slot_keys(rule: AveragingRule) -> tuple[str, ...]:
    """The state keys of the tensors kept per parameter under ``rule``: the average first, then its anchors."""
    return (AVG_KEY, *(anchor_key(rule.algo, anchor) for anchor in rule.anchors))


def is_slot_key(key: object) -> bool:
    """Whether an optimizer-state key holds one of the engine's tensors, under any registered rule."""
    if key == AVG_KEY:
        return True
    return isinstance(key, str) and any(
        key == anchor_key(name, anchor) for name in rule_names() for anchor in rule_class(name).anchors
    )


def pending_key(key: str) -> str:
    """Where ``param_groups[0]`` saves the ``key`` tensors of parameters without optimizer state yet."""
    return key + _PENDING


def pop_pending(group: dict, keep: bool = False) -> dict[str, dict]:
    """``{slot key: {position: tensor}}`` saved in a param group, taken out of it (``keep``: left in place)."""
    keys = [k for k in group if isinstance(k, str) and k.endswith(_PENDING) and is_slot_key(k[: -len(_PENDING)])]
    return {k[: -len(_PENDING)]: (group[k] if keep else group.pop(k)) or {} for k in keys}


@torch.no_grad()
def fold_sample(
    avgs: list[torch.Tensor],
    samples: list[torch.Tensor],
    c: float,
    cache: dict,
    anchors: Sequence[list[torch.Tensor]] = (),
    start: bool = False,
    finish: Sequence[float] = (),
) -> None:
    """Fold one sample (`fold_into`); the cycle's first (``start``) is copied into each anchor, and the last
    one adds ``finish[i] (x_n - anchor_i)`` to the average. The anchor is spent then (it holds the difference):
    the next cycle's first sample overwrites it."""
    fold_into(avgs, samples, c, cache=cache)
    for anchor, f in zip(anchors, finish or [0.0] * len(anchors), strict=True):
        if start:
            torch._foreach_copy_(anchor, samples)
        if f:
            torch._foreach_sub_(anchor, samples)  # anchor - x_n, in place: no temporary of the model's size
            torch._foreach_add_(avgs, anchor, alpha=-f)
