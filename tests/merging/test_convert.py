"""The fold's conversions, bitwise against ml_dtypes over every bf16 pattern and the rounding edges."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from pmakit.merging import convert


BF16 = np.dtype(ml_dtypes.bfloat16)
ALL_BF16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


def _f32(bits) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def _ml_round(values: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        return values.astype(BF16).view(np.uint16)


def _edge_patterns() -> np.ndarray:
    """fp32 patterns around every rounding decision: ties, subnormals, overflow, NaN payloads."""
    highs = np.arange(1 << 16, dtype=np.uint32) << 16
    lows = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x4000, 0xC000], dtype=np.uint32)
    return (highs[:, None] | lows[None, :]).ravel()


def test_widen_matches_ml_dtypes_for_every_bf16_pattern():
    got = convert.widen_bf16_bits(ALL_BF16, np.empty(ALL_BF16.size, np.float32))
    want = ALL_BF16.view(BF16).astype(np.float32)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))  # NaN payloads included


def test_round_matches_ml_dtypes_for_every_bf16_pattern_and_rounding_edge():
    values = _f32(_edge_patterns())
    got = convert.round_to_bf16_bits(values, np.empty(values.size, np.uint16))
    assert np.array_equal(got, _ml_round(values))


@pytest.mark.parametrize(
    ("bits", "want"),
    [
        (0x3F80_8000, 0x3F80),  # tie, kept bit even: stays
        (0x3F81_8000, 0x3F82),  # tie, kept bit odd: rounds up to even
        (0x3F80_8001, 0x3F81),  # above the tie
        (0x0000_8000, 0x0000),  # subnormal tie to even (zero)
        (0x0001_8000, 0x0002),  # subnormal tie, odd: up
        (0x007F_FFFF, 0x0080),  # largest subnormal rounds into the smallest normal
        (0x7F7F_FFFF, 0x7F80),  # largest finite fp32 overflows to +Inf
        (0xFF7F_8000, 0xFF80),  # tie at the top of the range: -Inf
        (0x7F80_0000, 0x7F80),  # +Inf stays
        (0x7F80_0001, 0x7FC0),  # signalling NaN with a low payload: quiet NaN, not Inf
        (0xFFBF_FFFF, 0xFFC0),  # negative NaN whose rounding would wrap: keeps its sign
        (0x8000_0000, 0x8000),  # -0 keeps its sign
    ],
)
def test_round_edge_cases(bits, want):
    values = _f32([bits])
    assert convert.round_to_bf16_bits(values, np.empty(1, np.uint16))[0] == want
    assert _ml_round(values)[0] == want


def test_round_random_fp32_patterns():
    rng = np.random.default_rng(0)
    values = _f32(rng.integers(0, 1 << 32, size=1 << 20, dtype=np.uint64).astype(np.uint32))
    got = convert.round_to_bf16_bits(values, np.empty(values.size, np.uint16), np.empty(values.size, np.uint32))
    assert np.array_equal(got, _ml_round(values))


def test_fold_paths_equal_the_bit_operations():
    """The cast-in-ufunc paths the fold uses give the bit-operation results, bitwise."""
    rng = np.random.default_rng(1)
    a = rng.integers(0, 1 << 16, size=1 << 16, dtype=np.uint32).astype(np.uint16)
    b = np.roll(ALL_BF16, 7)
    wa = convert.widen_bf16_bits(a, np.empty(a.size, np.float32))
    wb = convert.widen_bf16_bits(b, np.empty(b.size, np.float32))
    acc = np.empty(a.size, np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        convert.sum_into(acc, a.view(BF16), b.view(BF16))
        want = wa + wb
        assert np.array_equal(acc.view(np.uint32), want.view(np.uint32))
        convert.add_into(acc, b.view(BF16), np.float32(0.25), np.empty_like(acc))
        want = want + wb * np.float32(0.25)
        assert np.array_equal(acc.view(np.uint32), want.view(np.uint32))
        out = convert.store(acc, np.empty(acc.size, BF16), np.float32(0.5))
        ref = convert.round_to_bf16_bits(want * np.float32(0.5), np.empty(acc.size, np.uint16))
    assert np.array_equal(out.view(np.uint16), ref)


def test_store_same_dtype_scales_in_place():
    values = np.array([1.0, 3.0, -2.0], np.float32)
    assert convert.store(values, values, np.float32(0.5)) is values
    assert values.tolist() == [0.5, 1.5, -1.0]


def test_fp16_output_matches_numpy():
    values = _f32(_edge_patterns()[::5])
    out = np.empty(values.size, np.float16)
    with np.errstate(invalid="ignore", over="ignore"):
        convert.store(values, out)
        assert np.array_equal(out.view(np.uint16), values.astype(np.float16).view(np.uint16))
