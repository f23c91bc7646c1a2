"""The fused fold kernel of online PMA: ``avg <- avg + c (x - avg)`` over lists of tensors.

One idea, kept apart from the engine's bookkeeping: a sample must move as few bytes as the
hardware allows (the average read and written once, the sample read once), in a handful of
``torch._foreach_*`` launches, whatever the parameters' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .fused_upcast import fused_fold, fused_mode, fused_plan


__all__ = ["fold_into"]


# Elements of the fp32 scratch that low-precision samples are upcast into before the lerp: small enough
# that the scratch stays in cache between the two passes (CPU: 1 MiB, inside one core's L2), large
# enough to keep kernel launches few (CUDA: 64 MiB, measured on an H200: 2^23 elements reached 59% of the
# bandwidth bound, 2^24 74%, the whole model at once 79%, at 4 bytes per parameter of extra memory). The scratch
# lives in the group's fold plan.
_UPCAST_CHUNK = {"cpu": 1 << 18, "cuda": 1 << 24}


@dataclass
class _UpcastPlan:
    """Averages, samples and slices of one fp32 scratch, batched so that each batch fills the scratch once."""

    avgs: list[torch.Tensor]
    samples: list[torch.Tensor]
    size: int
    ptrs: list[int]  # where each tensor's data was when planned: a moved `.data` invalidates the slices
    batches: list[tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]] = field(default_factory=list)
    strided: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def _data_ptrs(avgs: list[torch.Tensor], samples: list[torch.Tensor]) -> list[int]:
    return [t.data_ptr() for t in avgs] + [t.data_ptr() for t in samples]


def _upcast_plan(avgs: list[torch.Tensor], samples: list[torch.Tensor], size: int) -> _UpcastPlan:
    plan = _UpcastPlan(avgs, samples, size, _data_ptrs(avgs, samples))
    pairs = []
    for avg, x in zip(avgs, samples, strict=True):
        (pairs if avg.is_contiguous() and x.is_contiguous() else plan.strided).append((avg, x))
    if not pairs:
        return plan
    size = max(1, min(size, sum(avg.numel() for avg, _ in pairs)))
    scratch = torch.empty(size, dtype=pairs[0][0].dtype, device=pairs[0][0].device)
    dst, src, buf, used = [], [], [], 0
    for avg, x in pairs:
        n = avg.numel()
        if n <= size - used:  # the whole tensor fits in what is left of the scratch: no slicing
            dst.append(avg)
            src.append(x)
            buf.append(scratch[used : used + n].view(avg.shape))
            used += n
        else:
            flat_avg, flat_x, start = avg.view(-1), x.view(-1), 0
            while start < n:
                take = min(n - start, size - used)
                dst.append(flat_avg[start : start + take])
                src.append(flat_x[start : start + take])
                buf.append(scratch[used : used + take])
                start += take
                used += take
                if used == size:
                    plan.batches.append((dst, src, buf))
                    dst, src, buf, used = [], [], [], 0
        if used == size:
            plan.batches.append((dst, src, buf))
            dst, src, buf, used = [], [], [], 0
    if dst:
        plan.batches.append((dst, src, buf))
    return plan


def fold_into(
    avgs: list[torch.Tensor],
    samples: list[torch.Tensor],
    c: float,
    chunk: int | None = None,
    cache: dict | None = None,
) -> None:
    """``avg <- avg + c (x - avg)`` over a list; ``c == 1`` starts a new average (a plain copy).

    Samples of another dtype (bf16/fp16 parameters into the fp32 average) cannot go straight into
    ``lerp``, and ``mul_`` then ``add_`` passes over the average twice (18 bytes per bf16 parameter
    instead of 10). So they are upcast batch by batch into a small fp32 scratch that stays in cache,
    and lerped from there: the average is read and written once, the sample read once. The result is
    bitwise ``avg.lerp_(x.float(), c)``. On CUDA with Triton, a fused kernel (``fused_upcast``) does the
    same in one launch at 10 bytes per parameter, where a one-time probe found it bitwise equal and
    faster. ``cache`` (a dict owned by the caller, one per group) keeps the plans and the scratch between
    samples; ``chunk`` overrides the scratch size in elements (and forces the scratch path).
    """
    if c == 1.0:
        torch._foreach_copy_(avgs, samples)
        return
    if samples[0].dtype == avgs[0].dtype:
        torch._foreach_lerp_(avgs, samples, c)
        return
    if chunk is None and _fused_fold(avgs, samples, c, cache):
        return
    _upcast_fold(avgs, samples, c, chunk, cache)


def _fused_fold(avgs: list[torch.Tensor], samples: list[torch.Tensor], c: float, cache: dict | None) -> bool:
    """The one-launch Triton upcast-lerp where the device's probe chose it (CUDA only); False otherwise."""
    if avgs[0].device.type != "cuda" or avgs[0].dtype != torch.float32:
        return False
    mode = fused_mode(avgs[0].device, samples[0].dtype, _probe_fallback)
    if mode is None:
        return False
    plan = cache.get("fused") if cache is not None else None
    if plan is None or plan.ptrs != _data_ptrs(avgs, samples):
        if not all(a.is_contiguous() and x.is_contiguous() for a, x in zip(avgs, samples, strict=True)):
            return False
        plan = fused_plan(avgs, samples)
        if cache is not None:
            cache["fused"] = plan
    fused_fold(plan, c, mode)
    return True


def _probe_fallback(avgs: list[torch.Tensor], samples: list[torch.Tensor], c: float, cache: dict) -> None:
    _upcast_fold(avgs, samples, c, None, cache)


def _upcast_fold(
    avgs: list[torch.Tensor], samples: list[torch.Tensor], c: float, chunk: int | None, cache: dict | None
) -> None:
    """Upcast batch by batch into the fp32 scratch, lerp from there (the portable path)."""
    size = chunk or _UPCAST_CHUNK.get(avgs[0].device.type, 1 << 20)
    plan = cache.get("upcast") if cache is not None else None
    if (
        plan is None
        or plan.avgs is not avgs
        or plan.samples is not samples
        or plan.size != size
        or plan.ptrs != _data_ptrs(avgs, samples)
    ):
        plan = _upcast_plan(avgs, samples, size)
        if cache is not None:
            cache["upcast"] = plan
    for avg, x in plan.strided:  # rare (strided shards): one temporary of this tensor's size
        avg.lerp_(x.to(avg.dtype), c)
    for dst, src, buf in plan.batches:
        torch._foreach_copy_(buf, src)
        torch._foreach_lerp_(dst, buf, c)
