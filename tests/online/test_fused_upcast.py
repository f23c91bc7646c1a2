"""The Triton upcast-lerp: bitwise ``avg.lerp_(x.float(), c)`` on CUDA; the fallback everywhere else."""

from __future__ import annotations

import pytest
import torch

from pmakit.online import fused_upcast
from pmakit.online.kernels import fold_into


def _triton_present() -> bool:
    return fused_upcast._kernel() is not None


def _lists(device, dtype, seed=5):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(513, 7), (1,), (2048,), (2049,), (64, 64), (3, 5, 11), (100_003,)]
    samples = [(torch.randn(s, generator=generator) * 3).to(device=device, dtype=dtype) for s in shapes]
    avgs = [torch.randn(s, generator=generator).to(device) for s in shapes]
    return avgs, samples


def test_cpu_uses_the_fallback():
    assert fused_upcast.fused_mode(torch.device("cpu"), torch.bfloat16, lambda *a: None) is None
    avgs, samples = _lists("cpu", torch.bfloat16)
    ref = [a.clone().lerp_(x.float(), 0.3) for a, x in zip(avgs, samples, strict=True)]
    cache: dict = {}
    fold_into(avgs, samples, 0.3, cache=cache)
    assert "fused" not in cache
    assert all(torch.equal(a, r) for a, r in zip(avgs, ref, strict=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fma", [True, False])
@pytest.mark.cuda
def test_kernel_covers_every_element_of_every_tensor(dtype, fma):
    """Whatever the FMA form, every element is folded once and none outside (within one fp32 rounding)."""
    if not torch.cuda.is_available() or not _triton_present():
        pytest.skip("needs a CUDA device and Triton")
    avgs, samples = _lists("cuda", dtype)
    ref = [a.clone().lerp_(x.float(), 0.3) for a, x in zip(avgs, samples, strict=True)]
    fused_upcast.fused_fold(fused_upcast.fused_plan(avgs, samples), 0.3, fma)
    for a, r in zip(avgs, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=2.5e-7, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("c", [0.3, 1 / 3, 0.5, 0.7, 1e-3, 0.999])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fold_into_is_bitwise_lerp_of_upcast_sample(dtype, c):
    """The engine's path on CUDA (fused where chosen, else the fallback) equals lerp_ on x.float() bitwise."""
    avgs, samples = _lists("cuda", dtype)
    ref = [a.clone().lerp_(x.float(), c) for a, x in zip(avgs, samples, strict=True)]
    cache: dict = {}
    fold_into(avgs, samples, c, cache=cache)
    for a, r in zip(avgs, ref, strict=True):
        assert torch.equal(a.view(torch.int32), r.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.cuda
def test_probe_picks_a_bitwise_mode_on_cuda(dtype):
    """Where Triton exists the probe must find the FMA form that is bitwise torch's (else it is never used)."""
    if not torch.cuda.is_available() or not _triton_present():
        pytest.skip("needs a CUDA device and Triton")
    device = torch.device("cuda", torch.cuda.current_device())
    bitwise = [fma for fma in (True, False) if fused_upcast._bitwise_everywhere(device, dtype, fma)]
    assert bitwise, "neither FMA form of the kernel reproduces torch's lerp bitwise"
    mode = fused_upcast.fused_mode(device, dtype, lambda a, x, c, cache: fold_into(a, x, c, chunk=1 << 24))
    assert mode is None or mode in bitwise
    print(f"fused upcast-lerp on {torch.cuda.get_device_name(device)} for {dtype}: mode {mode}, bitwise {bitwise}")


@pytest.mark.cuda
def test_cached_plan_follows_moved_data():
    if not torch.cuda.is_available() or not _triton_present():
        pytest.skip("needs a CUDA device and Triton")
    avgs, samples = _lists("cuda", torch.bfloat16)
    cache: dict = {}
    fold_into(avgs, samples, 0.25, cache=cache)
    samples[0].data = torch.randn(samples[0].shape, device="cuda").to(torch.bfloat16)
    ref = [a.clone().lerp_(x.float(), 0.25) for a, x in zip(avgs, samples, strict=True)]
    fold_into(avgs, samples, 0.25, cache=cache)
    for a, r in zip(avgs, ref, strict=True):
        assert torch.equal(a.view(torch.int32), r.view(torch.int32))
