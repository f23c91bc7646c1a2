"""Weight scopes, torch front-end: the per-layer mean and std of live models, state dicts and tensors.

Weight Scope Alignment (WSA, Xu et al. 2024, arXiv 2408.12237) observes that each layer's
weights are roughly Gaussian, and that this "scope" (mean, std) drifts apart between runs
trained under different conditions (other data, other learning rates). Averaging models
whose scopes differ mixes weights of different scales, which is a warning sign for a merge.

The scopes logic lives once, torch-free, in `pmakit.merging.scopes` (saved folders streamed from
safetensors, comparison, report, fusion, the warning). This module only adds what needs torch:
measuring tensors, modules and state dicts, chunk by chunk in fp64 on their own device, and
re-exports the rest so torch callers import one place.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..merging import scopes as core
from ..merging.scopes import (
    DEFAULT_THRESHOLD,
    Scope,
    ScopeDifference,
    ScopeMap,
    compare_scopes,
    format_scope_report,
    fuse_scopes,
)


__all__ = [
    "Scope",
    "ScopeDifference",
    "compare_scopes",
    "compute_scopes",
    "tensor_scope",
    "format_scope_report",
    "fuse_scopes",
    "warn_on_scope_differences",
    "warn_if_scopes_differ",
]


def _chunk_stats(chunk: torch.Tensor) -> tuple[int, float, float]:
    flat = chunk.to(torch.float64)
    if flat.numel() == 0:
        return 0, 0.0, 0.0
    mean = flat.mean()
    return flat.numel(), float(mean), float((flat - mean).square().sum())


def tensor_scope(tensor: torch.Tensor) -> Scope:
    """The scope of one tensor, reduced in fp64 chunk by chunk on its own device."""
    flat = tensor.detach().reshape(-1)
    chunks = (flat[start : start + core.CHUNK_ELEMENTS] for start in range(0, flat.numel(), core.CHUNK_ELEMENTS))
    return core.scope_of_chunks(chunks, _chunk_stats)


def compute_scopes(
    source,
    *,
    min_ndim: int = 2,
    pattern: str | None = None,
    trainable_only: bool = False,
) -> ScopeMap:
    """Per-layer scopes of ``source``: an ``nn.Module``, a state dict, or a model folder (safetensors).

    Only floating tensors with at least ``min_ndim`` dimensions are measured (weight matrices and
    embeddings; 1-D norm scales are constant at initialisation, so their std is 0 and a Gaussian
    fit means nothing), optionally only those whose name matches the regex ``pattern``. Folders
    are streamed from memory-mapped safetensors in row chunks, and all sums are taken in fp64.

    Args:
        source: A module, a state dict or a model folder.
        min_ndim: Smallest number of dimensions a measured tensor has.
        pattern: Regex of tensor names to measure (None: all).
        trainable_only: For a module, measure only parameters that require gradients.

    Returns:
        ``{tensor name: Scope}``.

    Raises:
        FileNotFoundError: the folder does not exist.
        TypeError: an unsupported ``source``.
    """
    regex = re.compile(pattern) if pattern else None
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise FileNotFoundError(f"Model folder {folder} does not exist.")
        return core.folder_scopes(folder, min_ndim=min_ndim, pattern=regex)
    if isinstance(source, torch.nn.Module):
        items = [(n, p) for n, p in source.named_parameters() if p.requires_grad or not trainable_only]
    elif isinstance(source, Mapping):
        items = list(source.items())
    else:
        raise TypeError(f"compute_scopes takes a module, a state dict or a folder path; got {type(source).__name__}.")
    return {
        name: tensor_scope(t)
        for name, t in items
        if isinstance(t, torch.Tensor) and core.is_selected(name, t.shape, t.is_floating_point(), min_ndim, regex)
    }


def warn_on_scope_differences(
    inputs: Sequence, threshold: float = DEFAULT_THRESHOLD, *, stacklevel: int = 1, **measure
) -> list[ScopeDifference]:
    """Warn (``UserWarning``) naming the layers whose scopes differ beyond ``threshold``; return them.

    `pmakit.merging.scopes.warn_on_scope_differences`, taking also modules and state dicts: meant
    to run before a merge, since averaging models whose layer scales differ can land in a region
    of higher loss; WSA training (`pmakit.training.wsa`) keeps runs that will be merged aligned.

    Args:
        inputs: ``{layer: Scope}`` maps, modules, state dicts or model folders.
        threshold: Flag a layer when ``max(std ratio - 1, mean spread / std)`` exceeds it.
        stacklevel: Where the warning points: 1, the line that calls this function; 2, its caller.
        **measure: Passed to `compute_scopes` for the inputs that are measured.

    Returns:
        The flagged layers, worst first (empty when the scopes agree).
    """
    scopes = [x if core.is_scope_map(x) else compute_scopes(x, **measure) for x in inputs]
    return core.warn_on_scope_differences(scopes, threshold, stacklevel=stacklevel + 1)


def warn_if_scopes_differ(
    sources: Sequence, threshold: float = DEFAULT_THRESHOLD, *, labels: Sequence[str] | None = None, **kwargs
) -> list[ScopeDifference]:
    """Deprecated name of `warn_on_scope_differences` (a ``FutureWarning``); ``labels`` are ignored."""
    warnings.warn(
        "`warn_if_scopes_differ` is renamed `warn_on_scope_differences` (same arguments, less `labels`); "
        "the old name goes in a future release.",
        FutureWarning,
        stacklevel=2,
    )
    return warn_on_scope_differences(sources, threshold, stacklevel=2, **kwargs)
