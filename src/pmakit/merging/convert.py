"""The fold's float conversions: into the fp32 (or fp64) accumulator and back to the output dtype.

bf16 is read and written as its ``uint16`` bit patterns and converted here with integer bit
operations, bitwise equal to ``ml_dtypes`` (tested over every bf16 pattern):

* bf16 -> fp32 is the 16-bit pattern widened and shifted left by 16 (exact);
* fp32 -> bf16 is integer round-to-nearest-even on the bit pattern, NaN kept as a quiet NaN
  of the same sign (``0x7FC0`` / ``0xFFC0``, as ``ml_dtypes`` does), overflow rounding to Inf.

The merge therefore never imports ``ml_dtypes``: its 0.7 release takes 0.6 s to import (0.6 took
0.08 s), more than a 2 x 100 MB bf16 merge takes without it. Casting inside the ufunc with
``ml_dtypes`` (``np.add(acc, x_bf16, dtype=float32)``) fuses the conversion with the add and is
faster per element (measured on the 2-core benchmark machine, CPU time per element of a
2^18-element block in cache: widening add 0.23 ns against 0.39 ns for shift pass + add pass), but
the import outweighs it below about 4e9 elements per merge. fp16 goes through numpy's own cast and
fp32/fp64 need none; fp8 still needs ``ml_dtypes`` (imported only when an fp8 tensor is read).
"""

from __future__ import annotations

import numpy as np


__all__ = [
    "add_into",
    "bf16_bits_finite",
    "narrow_to_odd",
    "round_to_bf16_bits",
    "store",
    "store_bf16",
    "sum_into",
    "widen_bf16_bits",
]

_QUIET_NAN = np.uint16(0x7FC0)
_BF16_EXPONENT = 0x7F80
_SIGN = np.uint32(0x8000_0000)


def widen_bf16_bits(bits: np.ndarray, out: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (``uint16``) to fp32, exactly: each pattern becomes the high half of a float.

    Args:
        bits: ``uint16`` array of bf16 patterns.
        out: ``float32`` array of the same size, written in one pass.

    Returns:
        ``out``.
    """
    np.left_shift(bits, 16, out=out.view(np.uint32), dtype=np.uint32, casting="unsafe")
    return out


def round_to_bf16_bits(values: np.ndarray, out: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
    """fp32 to bf16 bit patterns with round-to-nearest-even, bitwise as ``ml_dtypes``.

    Adding ``0x7FFF`` plus the lowest kept bit to the pattern and dropping the low 16 bits rounds
    to nearest, ties to even; a carry out of the mantissa bumps the exponent, so the largest
    finite values round to Inf as they should. NaN becomes the quiet NaN of its sign.

    Args:
        values: ``float32`` array.
        out: ``uint16`` array of the same size.
        scratch: optional ``uint32`` array of the same size (else one is allocated).

    Returns:
        ``out``.
    """
    bits = values.view(np.uint32)
    work = np.empty(bits.shape, np.uint32) if scratch is None else scratch
    np.right_shift(bits, 16, out=work)
    np.bitwise_and(work, 1, out=work)
    np.add(work, 0x7FFF, out=work)
    np.add(work, bits, out=work)  # wraps only for negative NaN patterns, fixed below
    np.right_shift(work, 16, out=work)
    np.copyto(out, work, casting="unsafe")
    nan = np.isnan(values)
    if nan.any():
        signs = (bits[nan] & _SIGN) >> np.uint32(16)
        out[nan] = signs.astype(np.uint16) | _QUIET_NAN
    return out


def sum_into(acc: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """``acc = a + b`` in the accumulator dtype: both inputs converted on the fly, one pass."""
    np.add(a, b, out=acc, dtype=acc.dtype, casting="unsafe")


def add_into(acc: np.ndarray, x: np.ndarray, weight=None, scratch: np.ndarray | None = None) -> None:
    """``acc += x`` (or ``acc += weight * x``) in the accumulator dtype, ``x`` converted on the fly.

    A weighted add needs the product rounded in the accumulator dtype before the add (the law's
    arithmetic), so it takes two passes through ``scratch`` (same size and dtype as ``acc``).
    """
    if weight is None:
        np.add(acc, x, out=acc, dtype=acc.dtype, casting="unsafe")
        return
    np.multiply(x, weight, out=scratch, dtype=acc.dtype, casting="unsafe")
    np.add(acc, scratch, out=acc)


def store(values: np.ndarray, out: np.ndarray, scale=None) -> np.ndarray:
    """Round ``values`` (times ``scale``, computed in their dtype) into ``out``'s dtype in one pass.

    Returns:
        ``out``, or ``values`` itself when no conversion is needed (scaled in place).
    """
    if values.dtype == out.dtype:
        if scale is not None:
            np.multiply(values, scale, out=values)
        return values
    if scale is None:
        np.copyto(out, values, casting="unsafe")
    else:
        np.multiply(values, scale, out=out, dtype=values.dtype, casting="unsafe")
    return out


def bf16_bits_finite(bits: np.ndarray, scratch: np.ndarray | None = None) -> bool:
    """No Inf or NaN among bf16 bit patterns: only those have every exponent bit set.

    Args:
        bits: ``uint16`` array of bf16 patterns.
        scratch: optional ``uint16`` array of the same size (else one is allocated).
    """
    work = np.bitwise_and(bits, _BF16_EXPONENT, out=scratch)
    return int(work.max(initial=0)) != _BF16_EXPONENT


def store_bf16(values: np.ndarray, out: np.ndarray, scale=None, scratch: np.ndarray | None = None) -> np.ndarray:
    """Round ``values`` (times ``scale``, computed in their dtype, in place) to bf16 bit patterns in ``out``.

    fp64 values are rounded once, as ``ml_dtypes``' cast does: first to fp32 with round-to-odd (exact
    for the 16 extra bits it keeps), then to bf16 with round-to-nearest-even.

    Args:
        values: ``float32`` or ``float64`` array; overwritten when ``scale`` is given.
        out: ``uint16`` array of the same size.
        scale: optional factor.
        scratch: optional ``uint32`` array of the same size (else one is allocated).

    Returns:
        ``out``.
    """
    if scale is not None:
        np.multiply(values, scale, out=values)
    if values.dtype != np.float32:
        values = narrow_to_odd(values)
    return round_to_bf16_bits(values, out, scratch)


def narrow_to_odd(values: np.ndarray) -> np.ndarray:
    """fp64 to fp32 rounded to odd: an inexact result takes whichever neighbour has an odd last bit.

    Rounding to odd keeps a sticky bit, so a second rounding to a format at least 2 bits narrower
    (bf16 keeps 8 of fp32's 24) equals one rounding from fp64; plain fp32 rounding first would
    round twice and differ at ties.
    """
    with np.errstate(over="ignore"):  # beyond fp32's range is Inf, as in bf16: the fold reports it by name
        narrow = values.astype(np.float32)
    bits = narrow.view(np.uint32)
    fix = (narrow != values) & ((bits & 1) == 0) & ~np.isnan(values)  # inexact and even: take the other one
    away = np.abs(narrow, dtype=np.float64) > np.abs(values)  # the even one lies beyond the value
    bits[fix & away] -= np.uint32(1)
    bits[fix & ~away] += np.uint32(1)
    return narrow
