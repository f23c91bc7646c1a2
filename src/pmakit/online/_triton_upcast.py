"""The Triton kernel behind ``fused_upcast`` (imported only on CUDA machines that have Triton)."""

from __future__ import annotations

import triton
import triton.language as tl


__all__ = ["upcast_lerp"]


@triton.jit
def upcast_lerp(
    avg_ptrs,
    x_ptrs,
    numels,
    block_tensor,
    block_start,
    c,
    X_BF16: tl.constexpr,
    FMA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Block ``pid`` of tensor ``block_tensor[pid]``: ``avg = lerp(avg, float(x), c)`` on its elements.

    ``avg_ptrs`` / ``x_ptrs`` hold each tensor's address (int64), so one launch covers every tensor.
    """
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    offs = tl.load(block_start + pid) + tl.arange(0, BLOCK)
    mask = offs < tl.load(numels + t)
    avg_base = tl.load(avg_ptrs + t).to(tl.pointer_type(tl.float32))
    if X_BF16:
        x_base = tl.load(x_ptrs + t).to(tl.pointer_type(tl.bfloat16))
    else:
        x_base = tl.load(x_ptrs + t).to(tl.pointer_type(tl.float16))
    a = tl.load(avg_base + offs, mask=mask)
    x = tl.load(x_base + offs, mask=mask).to(tl.float32)
    diff = x - a
    # torch's lerp: a + c (x - a) for |c| < 0.5, else x - (x - a)(1 - c); nvcc contracts these to FMA,
    # so the FMA form is tried first (the probe in fused_upcast picks whichever is bitwise torch's).
    if FMA:
        out = tl.where(tl.abs(c) < 0.5, tl.fma(diff, c, a), tl.fma(-diff, 1.0 - c, x))
    else:
        out = tl.where(tl.abs(c) < 0.5, a + c * diff, x - diff * (1.0 - c))
    tl.store(avg_base + offs, out, mask=mask)
