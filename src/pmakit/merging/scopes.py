"""Weight scopes of merge inputs: per-layer mean and std, compared across checkpoints before a merge.

Averaging models whose layers have different scales (a "scope", after Weight Scope Alignment,
arXiv 2408.12237) is a warning sign. This module measures the scopes of saved model folders
without torch, streaming each tensor from its memory-mapped safetensors file in chunks with
fp64 sums, flags the layers whose scopes differ, and fuses several models' scopes into one target.
This is the one scopes module: `pmakit.soups.scopes` is its torch front-end (live models, state
dicts and tensors are measured there, with the same chunked reduction and the same checks).
"""

from __future__ import annotations

import math
import mmap
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import InputError, brief
from ..io.safetensors import FLOAT_DTYPES, TensorInfo, storage_dtype
from .checkpoints import read_checkpoint_tensors
from .convert import widen_bf16_bits


__all__ = [
    "DEFAULT_THRESHOLD",
    "Scope",
    "ScopeDifference",
    "compare_scopes",
    "folder_scopes",
    "format_scope_report",
    "fuse_scopes",
    "is_scope_map",
    "is_selected",
    "scope_of_chunks",
    "warn_on_scope_differences",
    "welford_merge",
]

DEFAULT_THRESHOLD = 0.1
CHUNK_ELEMENTS = 1 << 24  # a large tensor is reduced this many elements at a time


class Scope(NamedTuple):
    """One layer's scope: the mean and (population) standard deviation of its ``numel`` weights."""

    mean: float
    std: float
    numel: int


ScopeMap = dict[str, Scope]


def welford_merge(a: tuple[int, float, float], b: tuple[int, float, float]) -> tuple[int, float, float]:
    """Combine (count, mean, sum of squared deviations) of two chunks (Chan et al.): exact, no cancellation."""
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    n = n_a + n_b
    if n == 0:
        return a
    delta = mean_b - mean_a
    return n, mean_a + delta * n_b / n, m2_a + m2_b + delta * delta * n_a * n_b / n


def is_selected(
    name: str, shape: Sequence[int], dtype_is_float: bool, min_ndim: int, pattern: re.Pattern | None
) -> bool:
    if not dtype_is_float or len(shape) < min_ndim or math.prod(shape) == 0:
        return False
    return pattern is None or pattern.search(name) is not None


def chunk_stats(values: np.ndarray) -> tuple[int, float, float]:
    """(count, mean, sum of squared deviations) of ``values``, in fp64."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    if flat.size == 0:
        return 0, 0.0, 0.0
    mean = float(flat.mean())
    return flat.size, mean, float(np.square(flat - mean).sum())


Stats = tuple[int, float, float]


def scope_of_chunks(chunks: Iterable, stats: Callable[[object], Stats] = chunk_stats) -> Scope:
    """The scope of the values in ``chunks``, each reduced by ``stats`` and folded exactly (`welford_merge`).

    The torch front-end passes tensor chunks and a torch ``stats``; everything after the per-chunk
    reduction is shared.
    """
    total: Stats = (0, 0.0, 0.0)
    for chunk in chunks:
        total = welford_merge(total, stats(chunk))
    n, mean, m2 = total
    return Scope(mean, math.sqrt(m2 / n) if n else 0.0, n)


def _stored_chunks(maps: Mapping[Path, mmap.mmap], info: TensorInfo):
    """One tensor's values, chunk by chunk, across the files its pieces lie in (sharded checkpoints)."""
    dtype = storage_dtype(info.dtype)
    for start in range(0, info.numel, CHUNK_ELEMENTS):
        end = min(info.numel, start + CHUNK_ELEMENTS)
        for file, byte, lo, hi in info.spans(start, end):
            chunk = np.frombuffer(maps[file], dtype, hi - lo, byte)
            if info.dtype == "BF16":  # bit patterns: widened exactly, no ml_dtypes import
                chunk = widen_bf16_bits(chunk, np.empty(chunk.size, np.float32))
            yield chunk
            del chunk


def folder_scopes(
    folder: str | os.PathLike, *, min_ndim: int = 2, pattern: str | re.Pattern | None = None
) -> ScopeMap:
    """Per-layer scopes of a saved model folder, streamed from its safetensors files (no torch).

    Only floating tensors with at least ``min_ndim`` dimensions are measured, optionally only
    those whose name matches the regex ``pattern``.
    """
    regex = re.compile(pattern) if isinstance(pattern, str) else pattern
    # Any layout a merge reads (safetensors, DCP, ZeRO, .bin); pickles through the allow-list unpickler.
    _, tensors = read_checkpoint_tensors(Path(folder), allow_pickle=True)
    scopes: ScopeMap = {}
    with ExitStack() as stack:
        maps: dict[Path, mmap.mmap] = {}
        for name, info in tensors.items():
            if not is_selected(name, info.shape, info.dtype in FLOAT_DTYPES, min_ndim, regex):
                continue
            for file in info.files:
                if file not in maps:
                    fh = stack.enter_context(open(file, "rb"))
                    maps[file] = stack.enter_context(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))
            scopes[name] = scope_of_chunks(_stored_chunks(maps, info))
    return scopes


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


def is_scope_map(value: object) -> bool:
    """Whether ``value`` is already measured (``{layer: Scope}``), as opposed to something to measure."""
    return isinstance(value, Mapping) and all(isinstance(s, Scope) for s in value.values())


def _measured(value: object, measure: dict) -> ScopeMap:
    if is_scope_map(value):
        return dict(value)
    if isinstance(value, (str, os.PathLike)):
        return folder_scopes(value, **measure)
    raise InputError(
        f"Scopes are compared from `{{layer: Scope}}` maps or model folders; got {brief(value)} "
        "(modules and state dicts: `pmakit.soups.scopes.warn_on_scope_differences`)."
    )


def warn_on_scope_differences(
    inputs: Sequence, threshold: float = DEFAULT_THRESHOLD, *, stacklevel: int = 2, **measure
) -> list[ScopeDifference]:
    """Warn (``UserWarning``) naming the layers whose scopes differ beyond ``threshold``; return them.

    Meant to run before a merge: averaging models whose layer scales differ can land in a region
    of higher loss; WSA training (`pmakit.training.wsa`) keeps runs that will be merged aligned.

    Args:
        inputs: ``{layer: Scope}`` maps, or model folders (measured with `folder_scopes`); the torch
            front-end of the same name also takes modules and state dicts.
        threshold: Flag a layer when ``max(std ratio - 1, mean spread / std)`` exceeds it.
        stacklevel: Where the warning points: 1, the line that calls this function; 2 (the
            default, for the merger), its caller.
        **measure: ``min_ndim`` / ``pattern``, for the inputs that are measured here.

    Returns:
        The flagged layers, worst first (empty when the scopes agree).
    """
    flagged = compare_scopes([_measured(x, measure) for x in inputs], threshold)
    if flagged:
        worst = ", ".join(
            f"{d.name} (std ratio {d.std_ratio:.3f}, mean shift {d.mean_shift:.3f})" for d in flagged[:5]
        )
        warnings.warn(
            f"Weight scopes of the merge inputs differ beyond {threshold:g} in {len(flagged)} layer(s), e.g. {worst}. "
            "Averaging models of different scales can raise the loss; compare them with `pmakit inspect --scopes`.",
            UserWarning,
            stacklevel=stacklevel + 1,
        )
    return flagged
