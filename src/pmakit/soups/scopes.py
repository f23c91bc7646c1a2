"""Weight scopes: the per-layer mean and standard deviation of a model's weights.

Weight Scope Alignment (WSA, Xu et al. 2024, arXiv 2408.12237) observes that each layer's
weights are roughly Gaussian, and that this "scope" (mean, std) drifts apart between runs
trained under different conditions (other data, other learning rates). Averaging models
whose scopes differ mixes weights of different scales, which is a warning sign for a merge.
This module measures scopes (of a live model, a state dict or a saved model folder, streamed
from safetensors so a large folder never sits in memory), compares the scopes of several
merge inputs and flags the layers that differ, and fuses several models' scopes into one
target (the moments of their weighted mixture) for the next stage of a multi-stage merge.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..errors import InputError, brief
from ..merging.scopes import (
    CHUNK_ELEMENTS,
    DEFAULT_THRESHOLD,
    Scope,
    ScopeDifference,
    ScopeMap,
    compare_scopes,
    folder_scopes,
    format_scope_report,
    is_selected,
    warn_on_scope_differences,
    welford_merge,
)


__all__ = [
    "Scope",
    "ScopeDifference",
    "compare_scopes",
    "compute_scopes",
    "tensor_scope",
    "format_scope_report",
    "fuse_scopes",
    "warn_if_scopes_differ",
]


def _chunk_stats(chunk: torch.Tensor) -> tuple[int, float, float]:
    flat = chunk.detach().reshape(-1).to(torch.float64)
    n = flat.numel()
    if n == 0:
        return 0, 0.0, 0.0
    mean = flat.mean()
    return n, float(mean), float((flat - mean).square().sum())


def tensor_scope(tensor: torch.Tensor) -> Scope:
    """The scope of one tensor, reduced in fp64 chunk by chunk."""
    stats = (0, 0.0, 0.0)
    flat = tensor.detach().reshape(-1)
    for start in range(0, flat.numel(), CHUNK_ELEMENTS):
        stats = welford_merge(stats, _chunk_stats(flat[start : start + CHUNK_ELEMENTS]))
    n, mean, m2 = stats
    return Scope(mean, math.sqrt(m2 / n) if n else 0.0, n)


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
        return folder_scopes(folder, min_ndim=min_ndim, pattern=regex)
    if isinstance(source, torch.nn.Module):
        items = [(n, p) for n, p in source.named_parameters() if p.requires_grad or not trainable_only]
    elif isinstance(source, Mapping):
        items = list(source.items())
    else:
        raise TypeError(f"compute_scopes takes a module, a state dict or a folder path; got {type(source).__name__}.")
    return {
        name: tensor_scope(t)
        for name, t in items
        if isinstance(t, torch.Tensor) and is_selected(name, t.shape, t.is_floating_point(), min_ndim, regex)
    }


def _normalised(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise InputError(f"`weights` has {len(weights)} entries for {count} models.")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise InputError(f"`weights` must be finite, non-negative and not all zero; got {brief(weights)}.")
    total = sum(weights)
    return [w / total for w in weights]


def fuse_scopes(scopes: Sequence[Mapping[str, Scope]], weights: Sequence[float] | None = None) -> ScopeMap:
    """One target scope per layer from several models: the moments of their weighted mixture.

    With normalised weights ``p_k`` the fused layer is the Gaussian matching the mixture
    ``sum_k p_k N(mu_k, sigma_k^2)``: ``mu = sum_k p_k mu_k`` and
    ``sigma^2 = sum_k p_k (sigma_k^2 + mu_k^2) - mu^2``. With equal weights and equal layer sizes
    this is exactly the mean and std of all the models' weights pooled together. The WSA paper
    fuses scopes for multi-stage merges but our notes do not give its formula; this is our choice.
    Every model must have the same layers.

    Args:
        scopes: One ``{layer: Scope}`` per model.
        weights: Mixture weights (None: equal).

    Returns:
        ``{layer: Scope}`` of the fused target.

    Raises:
        ValueError: no models, models with different layers, or bad weights.
    """
    if not scopes:
        raise InputError("fuse_scopes needs at least one model's scopes.")
    probs = _normalised(weights, len(scopes))
    names = list(scopes[0])
    for k, other in enumerate(scopes[1:], start=1):
        missing = [n for n in names if n not in other]
        extra = [n for n in other if n not in scopes[0]]
        if missing or extra:
            raise InputError(
                f"Model {k} does not have the same layers as model 0 (missing {missing[:3]}, extra {extra[:3]})."
            )
    fused: ScopeMap = {}
    for name in names:
        mean = sum(p * s[name].mean for p, s in zip(probs, scopes, strict=True))
        second = sum(p * (s[name].std ** 2 + s[name].mean ** 2) for p, s in zip(probs, scopes, strict=True))
        fused[name] = Scope(mean, math.sqrt(max(second - mean * mean, 0.0)), scopes[0][name].numel)
    return fused


def warn_if_scopes_differ(
    sources: Sequence, threshold: float = DEFAULT_THRESHOLD, *, labels: Sequence[str] | None = None, **kwargs
) -> list[ScopeDifference]:
    """Measure the scopes of merge inputs and warn (``UserWarning``) naming the layers that differ.

    Meant to run before a merge: averaging models whose layer scales differ can land in a region
    of higher loss; WSA training (`pmakit.tools.wsa`) keeps runs that will be merged aligned.
    ``labels`` are accepted for symmetry with the report; the warning names layers.

    Args:
        sources: Modules, state dicts or model folders.
        threshold: Flag a layer when ``max(std ratio - 1, mean spread / std)`` exceeds it.
        labels: Names of the sources.
        **kwargs: Passed to `compute_scopes`.

    Returns:
        The flagged layers (empty when the scopes agree).
    """
    return warn_on_scope_differences([compute_scopes(s, **kwargs) for s in sources], threshold, stacklevel=2)
