"""The one weighted sum of torch tensors used by the soups (buffers, LoRA averaging, soups) and spike recovery.

Each tool used to accumulate ``sum_i w_i t_i`` its own way (fp32 here, fp64 there, some checking
shapes, some not). This is the single implementation: the terms are added in input order into a
wide accumulator (fp64 by default, fp32 when asked for speed), and the result is rounded once to
the output dtype. Inputs are checked first, and an error names the tensor and the input at fault.
The offline merger has its own numpy fold (`pmakit.merging.stream`): it streams from files and
must not import torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import InputError, brief


__all__ = ["ACCUMULATE_DTYPES", "weighted_sum"]

ACCUMULATE_DTYPES = (torch.float32, torch.float64)


def _source(sources: Sequence[object] | None, index: int) -> str:
    return str(sources[index]) if sources is not None else f"input {index}"


def _check_terms(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], name: str, sources: Sequence[object] | None
) -> None:
    """Raise a `ValueError` naming ``name`` unless the terms can be summed."""
    if not tensors:
        raise InputError(f"Tensor {brief(name)}: nothing to sum (no inputs).")
    if len(weights) != len(tensors):
        raise InputError(f"Tensor {brief(name)}: got {len(weights)} weights for {len(tensors)} inputs.")
    if sources is not None and len(sources) != len(tensors):
        raise InputError(f"Tensor {brief(name)}: got {len(sources)} input names for {len(tensors)} inputs.")
    shape = tensors[0].shape
    for index, tensor in enumerate(tensors):
        if not tensor.is_floating_point():
            raise InputError(
                f"Tensor {brief(name)} is {tensor.dtype} in {_source(sources, index)}: only floating-point tensors "
                "can be averaged."
            )
        if tensor.shape != shape:
            raise InputError(
                f"Tensor {brief(name)} has shape {tuple(tensor.shape)} in {_source(sources, index)} but "
                f"{tuple(shape)} in {_source(sources, 0)}."
            )


@torch.no_grad()
def weighted_sum(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    name: str,
    sources: Sequence[object] | None = None,
    accumulate_dtype: torch.dtype = torch.float64,
    out_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``sum_i weights[i] * tensors[i]``, accumulated in ``accumulate_dtype`` and rounded once.

    Args:
        tensors: Floating-point tensors of one shape (any dtypes and devices).
        weights: One float per tensor (already normalised if an average is wanted).
        name: The tensor's name, used in error messages.
        sources: Optional names of the inputs (folders, models), used in error messages.
        accumulate_dtype: ``torch.float64`` (default) or ``torch.float32``.
        out_dtype: The result's dtype; default: the last (newest) tensor's dtype.
        device: Where to accumulate; default: the last tensor's device.

    Returns:
        A new tensor (it shares no memory with the inputs, even for a single term of weight 1).

    Raises:
        ValueError: no inputs, counts that differ, an integer tensor, shapes that differ or an
            unsupported accumulation dtype; the message names the tensor and the input.
    """
    if accumulate_dtype not in ACCUMULATE_DTYPES:
        raise InputError(f"Tensor {brief(name)}: accumulate in float32 or float64, not {brief(accumulate_dtype)}.")
    _check_terms(tensors, weights, name, sources)
    newest = tensors[-1]
    device = newest.device if device is None else torch.device(device)
    total = torch.zeros(newest.shape, dtype=accumulate_dtype, device=device)
    for tensor, weight in zip(tensors, weights, strict=True):
        total.add_(tensor.detach().to(device=device, dtype=accumulate_dtype), alpha=float(weight))
    return total.to(out_dtype or newest.dtype)
