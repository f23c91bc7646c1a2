"""The fused fold kernel: bitwise ``avg.lerp_(x.float(), c)`` whatever the dtype, slicing and plan cache."""

from __future__ import annotations

import pytest
import torch


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
    ),
]


def assert_same(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Bitwise on CPU (same kernels); on CUDA within one fp32 rounding, since the reference's per-tensor
    lerp kernel is compiled apart from the foreach one and may contract its multiply-add differently."""
    if out.device.type == "cpu":
        assert torch.equal(out, ref)
    else:
        torch.testing.assert_close(out, ref, rtol=2.5e-7, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_upcast_fold_equals_lerp_on_upcast_samples_bitwise(device):
    """The chunked fold is exactly ``lerp_(x.float())``, whatever the slicing."""
    from pmakit.online.kernels import fold_into

    generator = torch.Generator().manual_seed(3)
    shapes = [(513, 7), (1,), (64, 64), (3, 5, 11), (1000,)]
    for dtype in (torch.bfloat16, torch.float16):
        samples = [torch.randn(s, generator=generator).to(device=device, dtype=dtype) for s in shapes]
        samples.append(torch.randn(40, 30, generator=generator).to(device=device, dtype=dtype).t())  # strided
        start = [torch.randn(x.shape, generator=generator).to(device) for x in samples]
        for c in (0.37, 1e-3, 0.9):
            ref = [a.clone() for a in start]
            for a, x in zip(ref, samples, strict=True):
                a.lerp_(x.float(), c)
            for chunk in (1, 97, 4096, None):
                out = [a.clone() for a in start]
                fold_into(out, samples, c, chunk=chunk)
                for o, r in zip(out, ref, strict=True):
                    assert_same(o, r)


@pytest.mark.parametrize("device", DEVICES)
def test_cached_fold_plan_is_reused_and_follows_moved_data(device):
    """The engine keeps the plan per group; it must follow parameters whose ``.data`` was replaced."""
    from pmakit.online.kernels import fold_into

    generator = torch.Generator().manual_seed(4)
    samples = [torch.randn(s, generator=generator).to(device=device, dtype=torch.bfloat16) for s in [(300,), (20, 9)]]
    avgs = [torch.randn(x.shape, generator=generator).to(device) for x in samples]
    ref = [a.clone() for a in avgs]
    cache: dict = {}
    for step in range(3):
        if step == 2:  # e.g. `module.to()` swaps `.data`: the old slices would read stale memory
            samples[0].data = torch.randn(300, generator=generator).to(device=device, dtype=torch.bfloat16)
        plan_before = cache.get("upcast")
        fold_into(avgs, samples, 0.25, chunk=128, cache=cache)
        for a, x in zip(ref, samples, strict=True):
            a.lerp_(x.float(), 0.25)
        for a, r in zip(avgs, ref, strict=True):
            assert_same(a, r)
        assert (cache["upcast"] is plan_before) == (step == 1)
