"""The fold's float conversions: into the fp32 (or fp64) accumulator and back to the output dtype.

Two implementations of the bf16 conversions live here, and the fold uses the faster one:

* bit operations: bf16 -> fp32 is the 16-bit pattern widened and shifted left by 16 (exact);
  fp32 -> bf16 is integer round-to-nearest-even on the bit pattern, NaN kept as a quiet NaN
  of the same sign (``0x7FC0`` / ``0xFFC0``, as ``ml_dtypes`` does), overflow rounding to Inf;
* ``ml_dtypes`` casts inside the numpy ufunc (``np.add(acc, x, dtype=float32)``): numpy casts each
  small buffer of the input with ``ml_dtypes``' compiled conversion (itself the same bit operation)
  and adds it while it is still in cache, so the conversion is fused with the add in one pass.

Measured on the 2-core benchmark machine (CPU time per element of a 2^18-element block, in cache):
widening add 0.23 ns (cast in the ufunc) against 0.39 ns (shift pass + add pass); rounding with a
scale 0.66 ns (cast) against 0.78 ns (five integer passes, before the NaN fix-up). numpy has no fused
integer kernel, so the cast paths are the fast ones: ``add_into`` / ``sum_into`` / ``store`` use them,
and the bit operations are the exact reference they are tested against over every bf16 pattern.
fp16 goes through numpy's own cast and fp32/fp64 need none.
"""

from __future__ import annotations

import numpy as np


__all__ = ["add_into", "round_to_bf16_bits", "store", "sum_into", "widen_bf16_bits"]

_QUIET_NAN = np.uint16(0x7FC0)
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
