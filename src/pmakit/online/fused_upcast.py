"""A fused upcast-lerp for CUDA: ``avg <- lerp(avg, float(x), c)`` over a whole list in one Triton launch.

The fallback (``kernels.fold_into``) upcasts a bf16/fp16 sample into an fp32 scratch and lerps from
there: on a GPU the 64 MiB scratch does not stay in cache, so a sample moves 18 bytes per parameter
instead of the 10 the math needs (average read and written, sample read). This kernel reads the
sample in its own dtype, converts in registers and writes the average once: 10 bytes per parameter,
in a single launch for every tensor of the group (a table of pointers says which block is whose).

It is used only where it is known to be right and faster: Triton importable, a CUDA device, and a
one-time probe on that device finding it bitwise equal to ``avg.lerp_(x.float(), c)`` (for weights
below and above 0.5, which torch computes by different formulas) and faster than the fallback.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


__all__ = ["FusedPlan", "fused_fold", "fused_mode", "fused_plan"]

_BLOCK = 2048
_PROBE_ELEMENTS = 1 << 22


@functools.cache
def _kernel():
    """The Triton kernel, or None where Triton is missing (CPU builds of torch) or fails to import."""
    try:
        from ._triton_upcast import upcast_lerp
    except Exception:  # noqa: BLE001 - any import failure means: use the fallback
        return None
    return upcast_lerp


@dataclass
class FusedPlan:
    """Device tables of one group: the pointers, sizes and block map one launch needs."""

    ptrs: list[int]
    x_bf16: bool
    avg_ptrs: torch.Tensor
    x_ptrs: torch.Tensor
    numels: torch.Tensor
    block_tensor: torch.Tensor
    block_start: torch.Tensor


def fused_plan(avgs: list[torch.Tensor], samples: list[torch.Tensor]) -> FusedPlan:
    """Tables for contiguous fp32 ``avgs`` and same-shaped contiguous bf16/fp16 ``samples``."""
    device = avgs[0].device
    numels = [a.numel() for a in avgs]
    tensor_ids, starts = [], []
    for i, n in enumerate(numels):
        count = -(-n // _BLOCK)
        tensor_ids += [i] * count
        starts += range(0, count * _BLOCK, _BLOCK)

    def table(values, dtype=torch.int64):
        return torch.tensor(values, dtype=dtype, device=device)

    return FusedPlan(
        ptrs=[t.data_ptr() for t in avgs] + [x.data_ptr() for x in samples],
        x_bf16=samples[0].dtype == torch.bfloat16,
        avg_ptrs=table([a.data_ptr() for a in avgs]),
        x_ptrs=table([x.data_ptr() for x in samples]),
        numels=table(numels),
        block_tensor=table(tensor_ids, torch.int32),
        block_start=table(starts),
    )


def fused_fold(plan: FusedPlan, c: float, fma: bool) -> None:
    """One launch: every average of the plan lerped towards its upcast sample with weight ``c``."""
    grid = (plan.block_tensor.numel(),)
    _kernel()[grid](
        plan.avg_ptrs,
        plan.x_ptrs,
        plan.numels,
        plan.block_tensor,
        plan.block_start,
        float(c),
        X_BF16=plan.x_bf16,
        FMA=fma,
        BLOCK=_BLOCK,
    )


_MODES: dict[tuple[torch.device, torch.dtype], bool | None] = {}


def fused_mode(device: torch.device, dtype: torch.dtype, fallback: Callable) -> bool | None:
    """Whether to use the kernel on ``device`` for samples of ``dtype``: its FMA mode, or None for the fallback.

    Decided once per (device, dtype) by :func:`_probe`; any failure (no Triton, no CUDA, a Triton that
    cannot compile here, a result not bitwise torch's) means the fallback.
    """
    key = (device, dtype)
    if key not in _MODES:
        _MODES[key] = None
        if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and _kernel() is not None:
            try:
                _MODES[key] = _probe(device, dtype, fallback)
            except Exception:  # noqa: BLE001 - use the fallback
                _MODES[key] = None
    return _MODES[key]


def _probe(device: torch.device, dtype: torch.dtype, fallback: Callable) -> bool | None:
    generator = torch.Generator(device=device).manual_seed(0)
    start = torch.randn(_PROBE_ELEMENTS, device=device, generator=generator)
    sample = torch.randn(_PROBE_ELEMENTS, device=device, generator=generator).to(dtype)
    for fma in (True, False):
        if _bitwise_everywhere(device, dtype, fma):
            break
    else:
        return None
    avg = start.clone()
    plan = fused_plan([avg], [sample])
    fused = _median_seconds(lambda: fused_fold(plan, 0.25, fma), device)
    cache: dict = {}
    current = _median_seconds(lambda: fallback([avg], [sample], 0.25, cache), device)
    return fma if fused < current else None


def _bitwise_everywhere(device: torch.device, dtype: torch.dtype, fma: bool) -> bool:
    """Bitwise torch's lerp for weights below, at and above 0.5 (torch switches formula at 0.5)?"""
    generator = torch.Generator(device=device).manual_seed(1)
    start = torch.randn(1 << 20, device=device, generator=generator)
    sample = (torch.randn(1 << 20, device=device, generator=generator) * 3).to(dtype)
    return all(_bitwise(start, sample, c, fma) for c in (0.3, 1 / 3, 0.5, 0.7, 1e-3, 0.999))


def _bitwise(start: torch.Tensor, sample: torch.Tensor, c: float, fma: bool) -> bool:
    ref = start.clone().lerp_(sample.float(), c)
    out = start.clone()
    fused_fold(fused_plan([out], [sample]), c, fma)
    return torch.equal(out.view(torch.int32), ref.view(torch.int32))


def _median_seconds(fn: Callable, device: torch.device, repeat: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize(device)
        begin = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - begin)
    return sorted(times)[repeat // 2]
