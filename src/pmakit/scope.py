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

import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch


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

DEFAULT_THRESHOLD = 0.1
_CHUNK_ELEMENTS = 1 << 24  # rows of a large tensor are read and reduced this many elements at a time


class Scope(NamedTuple):
    """One layer's scope: the mean and (population) standard deviation of its ``numel`` weights."""

    mean: float
    std: float
    numel: int


ScopeMap = dict[str, Scope]


def _welford_merge(a: tuple[int, float, float], b: tuple[int, float, float]) -> tuple[int, float, float]:
    """Combine (count, mean, sum of squared deviations) of two chunks (Chan et al.): exact, no cancellation."""
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    n = n_a + n_b
    if n == 0:
        return a
    delta = mean_b - mean_a
    return n, mean_a + delta * n_b / n, m2_a + m2_b + delta * delta * n_a * n_b / n


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
    for start in range(0, flat.numel(), _CHUNK_ELEMENTS):
        stats = _welford_merge(stats, _chunk_stats(flat[start : start + _CHUNK_ELEMENTS]))
    n, mean, m2 = stats
    return Scope(mean, math.sqrt(m2 / n) if n else 0.0, n)


def _selected(
    name: str, shape: Sequence[int], dtype_is_float: bool, min_ndim: int, pattern: re.Pattern | None
) -> bool:
    if not dtype_is_float or len(shape) < min_ndim or math.prod(shape) == 0:
        return False
    return pattern is None or pattern.search(name) is not None


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No safetensors weights in {folder} (expected model.safetensors or an index).")
    return files


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def _folder_scopes(folder: Path, min_ndim: int, pattern: re.Pattern | None) -> ScopeMap:
    from safetensors import safe_open

    scopes: ScopeMap = {}
    for file in _safetensors_files(folder):
        if not file.is_file():
            raise FileNotFoundError(f"{file} is named in the index of {folder} but does not exist.")
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                view = handle.get_slice(name)
                shape = list(view.get_shape())
                if not _selected(name, shape, view.get_dtype() in _FLOAT_DTYPES, min_ndim, pattern):
                    continue
                row = math.prod(shape[1:]) if len(shape) > 1 else 1
                rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(row, 1))
                stats = (0, 0.0, 0.0)
                for start in range(0, shape[0], rows_per_chunk):
                    stats = _welford_merge(stats, _chunk_stats(view[start : start + rows_per_chunk]))
                n, mean, m2 = stats
                scopes[name] = Scope(mean, math.sqrt(m2 / n), n)
    return scopes


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
    """
    regex = re.compile(pattern) if pattern else None
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise FileNotFoundError(f"Model folder {folder} does not exist.")
        return _folder_scopes(folder, min_ndim, regex)
    if isinstance(source, torch.nn.Module):
        items = [(n, p) for n, p in source.named_parameters() if p.requires_grad or not trainable_only]
    elif isinstance(source, Mapping):
        items = list(source.items())
    else:
        raise TypeError(f"compute_scopes takes a module, a state dict or a folder path; got {type(source).__name__}.")
    return {
        name: tensor_scope(t)
        for name, t in items
        if isinstance(t, torch.Tensor) and _selected(name, t.shape, t.is_floating_point(), min_ndim, regex)
    }


def _normalised(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise ValueError(f"`weights` has {len(weights)} entries for {count} models.")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"`weights` must be finite, non-negative and not all zero; got {weights}.")
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
    """
    if not scopes:
        raise ValueError("fuse_scopes needs at least one model's scopes.")
    probs = _normalised(weights, len(scopes))
    names = list(scopes[0])
    for k, other in enumerate(scopes[1:], start=1):
        missing = [n for n in names if n not in other]
        extra = [n for n in other if n not in scopes[0]]
        if missing or extra:
            raise ValueError(
                f"Model {k} does not have the same layers as model 0 (missing {missing[:3]}, extra {extra[:3]})."
            )
    fused: ScopeMap = {}
    for name in names:
        mean = sum(p * s[name].mean for p, s in zip(probs, scopes))
        second = sum(p * (s[name].std ** 2 + s[name].mean ** 2) for p, s in zip(probs, scopes))
        fused[name] = Scope(mean, math.sqrt(max(second - mean * mean, 0.0)), scopes[0][name].numel)
    return fused


@dataclass(frozen=True)
class ScopeDifference:
    """How far the scopes of one layer lie apart across several models.

    ``std_ratio`` is the largest std over the smallest; ``mean_shift`` is the spread of the means
    in units of the average std. ``score = max(std_ratio - 1, mean_shift)`` is compared with the
    threshold.
    """

    name: str
    means: tuple[float, ...]
    stds: tuple[float, ...]
    std_ratio: float
    mean_shift: float

    @property
    def score(self) -> float:
        return max(self.std_ratio - 1.0, self.mean_shift)


def compare_scopes(
    scopes: Sequence[Mapping[str, Scope]], threshold: float | None = DEFAULT_THRESHOLD
) -> list[ScopeDifference]:
    """Compare the layers the models share; return those scoring above ``threshold`` (all if None), worst first."""
    if len(scopes) < 2:
        return []
    names = [n for n in scopes[0] if all(n in s for s in scopes[1:])]
    out = []
    for name in names:
        means = tuple(s[name].mean for s in scopes)
        stds = tuple(s[name].std for s in scopes)
        low = min(stds)
        ratio = max(stds) / low if low > 0 else (1.0 if max(stds) == 0 else math.inf)
        avg_std = sum(stds) / len(stds)
        spread = max(means) - min(means)
        shift = spread / avg_std if avg_std > 0 else (0.0 if spread == 0 else math.inf)
        diff = ScopeDifference(name, means, stds, ratio, shift)
        if threshold is None or diff.score > threshold:
            out.append(diff)
    out.sort(key=lambda d: d.score, reverse=True)
    return out


def format_scope_report(
    scopes: Sequence[Mapping[str, Scope]],
    labels: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
) -> str:
    """A plain-text table: per layer the mean/std of every input, flagged (``!``) beyond ``threshold``."""
    flagged = {d.name: d for d in compare_scopes(scopes, threshold)}
    every = {d.name: d for d in compare_scopes(scopes, None)}
    lines = [f"Weight scopes (mean / std per layer) of {len(scopes)} model(s); flag threshold {threshold:g}"]
    for k, label in enumerate(labels):
        lines.append(f"  [{k}] {label}")
    header = "  layer" + "".join(f" | [{k}] mean / std" for k in range(len(scopes)))
    if len(scopes) > 1:
        header += " | std ratio | mean shift"
    lines.append(header)
    for name in scopes[0]:
        cells = []
        for s in scopes:
            cells.append(f"{s[name].mean:+.3e} / {s[name].std:.3e}" if name in s else "missing")
        row = f"{'!' if name in flagged else ' '} {name} | " + " | ".join(cells)
        if name in every:
            row += f" | {every[name].std_ratio:.3f} | {every[name].mean_shift:.3f}"
        lines.append(row)
    if len(scopes) > 1:
        lines.append(f"{len(flagged)} of {len(every)} shared layer(s) differ beyond the threshold.")
    return "\n".join(lines)


def warn_if_scopes_differ(
    sources: Sequence, threshold: float = DEFAULT_THRESHOLD, *, labels: Sequence[str] | None = None, **kwargs
) -> list[ScopeDifference]:
    """Measure the scopes of merge inputs and warn (``UserWarning``) naming the layers that differ.

    Meant to run before a merge: averaging models whose layer scales differ can land in a region
    of higher loss; WSA training (`pmakit.wsa`) keeps runs that will be merged aligned.
    """
    labels = list(labels) if labels is not None else [str(s) for s in sources]
    scopes = [compute_scopes(s, **kwargs) for s in sources]
    flagged = compare_scopes(scopes, threshold)
    if flagged:
        worst = ", ".join(
            f"{d.name} (std ratio {d.std_ratio:.3f}, mean shift {d.mean_shift:.3f})" for d in flagged[:5]
        )
        warnings.warn(
            f"Weight scopes of the merge inputs differ beyond {threshold:g} in {len(flagged)} layer(s), e.g. {worst}. "
            "Averaging models of different scales can raise the loss; compare them with `pmakit inspect --scopes`.",
            UserWarning,
            stacklevel=2,
        )
    return flagged
