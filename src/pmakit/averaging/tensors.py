"""How a merge treats a tensor by its kind, whatever the rule: the buffer rule."""

from __future__ import annotations


__all__ = ["AVERAGED", "COPIED_FROM_NEWEST", "tensor_merge_action"]

AVERAGED = "average"
COPIED_FROM_NEWEST = "newest"


def tensor_merge_action(is_floating_point: bool) -> str:
    """The buffer rule: what a merge does with a tensor of this kind, whatever the rule.

    Floating-point tensors (parameters, and buffers such as BatchNorm's running mean and variance)
    are averaged like parameters: :data:`AVERAGED`. Integer and bool tensors (BatchNorm's
    ``num_batches_tracked``, masks, position ids) are copied from the newest sample:
    :data:`COPIED_FROM_NEWEST`, because averaging a counter turns it into a fraction and the
    newest model's count is the one that goes with its statistics. The offline merger (from
    safetensors dtypes) and `pmakit.soups.buffers` (from torch dtypes) both follow it.

    Args:
        is_floating_point: whether the tensor holds floating-point values.

    Returns:
        ``"average"`` or ``"newest"``.
    """
    return AVERAGED if is_floating_point else COPIED_FROM_NEWEST
