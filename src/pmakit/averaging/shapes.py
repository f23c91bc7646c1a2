"""The decay shapes of the `decay` rule: LR multipliers ``d`` on ``[0, 1]`` with ``d(0) = 1``, ``d(1) = 0``."""

from __future__ import annotations

import math
from collections.abc import Callable

from ..errors import brief
from .registry import MissingParameterError, RuleError


__all__ = ["DECAY_SHAPES", "DecayShape", "check_decay_shape", "shape_name"]

DecayShape = Callable[[float], float]
"""A decay shape: the LR multiplier ``d(x)`` at the fraction ``x`` of the window, ``d(0) = 1``, ``d(1) = 0``."""


def _linear(x: float) -> float:
    return 1.0 - x


def _cosine(x: float) -> float:
    return (1.0 + math.cos(math.pi * x)) / 2.0


def _one_minus_sqrt(x: float) -> float:
    return 1.0 - math.sqrt(x)


DECAY_SHAPES: dict[str, DecayShape] = {"linear": _linear, "cosine": _cosine, "1-sqrt": _one_minus_sqrt}
"""The named decay shapes of the `decay` rule: ``1 - x``, ``(1 + cos(pi x))/2`` and ``1 - sqrt(x)``."""

END_TOLERANCE = 1e-9


def check_decay_shape(shape: str | DecayShape | None) -> None:
    """Refuse an unknown name, or a callable that does not run from ``d(0) = 1`` to ``d(1) = 0``."""
    if shape is None:
        raise MissingParameterError(
            f"The `decay` rule needs a `decay_shape`: one of {', '.join(DECAY_SHAPES)}, "
            "or a callable d on [0, 1] with d(0) = 1 and d(1) = 0.",
            "decay_shape",
        )
    if isinstance(shape, str):
        if shape not in DECAY_SHAPES:
            raise RuleError(
                f"Unknown `decay_shape` {brief(shape)}; valid shapes are {', '.join(DECAY_SHAPES)}.", "decay_shape"
            )
        return
    if not callable(shape):
        message = f"`decay_shape` must be a shape name or a callable, got {type(shape).__name__}."
        raise RuleError(message, "decay_shape")
    for x, want in ((0.0, 1.0), (1.0, 0.0)):
        got = float(shape(x))
        if not (math.isfinite(got) and abs(got - want) <= END_TOLERANCE):
            raise RuleError(
                f"`decay_shape` must satisfy d({x:g}) = {want:g}; {shape_name(shape)} gives {brief(got)}.",
                "decay_shape",
            )


def shape_name(shape: str | DecayShape) -> str:
    """A shape's name: the name itself, or a callable's ``__name__``."""
    return shape if isinstance(shape, str) else getattr(shape, "__name__", repr(shape))
