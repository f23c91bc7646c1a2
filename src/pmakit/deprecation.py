"""Old spellings kept for one minor version: one warning, worded once, that says what to write instead.

pmakit follows transformers: a deprecated keyword still works, with a `FutureWarning` (shown to users by
default, unlike `DeprecationWarning`) naming the release that removes it and the new spelling. The
warning points at the user's line, not at pmakit's: frames inside the package are skipped.
"""

from __future__ import annotations

import os
import sys
import warnings

from .errors import InputError


__all__ = ["REMOVED_IN", "greater_is_better_of", "renamed_keyword", "warn_deprecated"]

# The next minor release after the current one (`pmakit.__version__`); tests/test_deprecation.py checks it.
REMOVED_IN = "0.2.0"
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside pmakit (and outside dataclasses' generated ``__init__``)."""
    frame, level = sys._getframe(2), 2  # frame 1 is warn_deprecated (stacklevel 1), frame 2 its caller
    while frame is not None and (
        frame.f_code.co_filename.startswith(_PACKAGE) or frame.f_code.co_filename == "<string>"
    ):
        frame, level = frame.f_back, level + 1
    return level


def warn_deprecated(old: str, instead: str) -> None:
    """Warn (`FutureWarning`) that ``old`` goes away in `REMOVED_IN`; ``instead`` says what to write."""
    warnings.warn(
        f"{old} is deprecated and will be removed in pmakit {REMOVED_IN}; {instead}.",
        FutureWarning,
        stacklevel=_user_stacklevel(),
    )


def renamed_keyword(new_value, old_value, *, new: str, old: str, where: str):
    """The value of a keyword renamed from ``old`` to ``new``: the old one still works, with a warning.

    ``None`` means "not given" for both.

    Raises:
        InputError: both spellings were given.
    """
    if old_value is None:
        return new_value
    if new_value is not None:
        raise InputError(f"{where}: give `{new}` only; `{old}` is its deprecated name.")
    warn_deprecated(f"`{old}=` of {where}", f"write `{new}=` instead")
    return old_value


def greater_is_better_of(scorer: object) -> bool | None:
    """A scorer's own direction: its ``greater_is_better``, else its deprecated ``higher_is_better``, else None."""
    value = getattr(scorer, "greater_is_better", None)
    if value is None and getattr(scorer, "higher_is_better", None) is not None:
        warn_deprecated(
            f"A scorer's `higher_is_better` ({type(scorer).__name__})", "name the attribute `greater_is_better`"
        )
        value = scorer.higher_is_better
    return None if value is None else bool(value)
