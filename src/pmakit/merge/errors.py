"""Errors of the offline merger: one type, so callers and the CLI can tell bad input from bugs."""

from __future__ import annotations


__all__ = ["MergeError"]


class MergeError(ValueError):
    """A merge cannot proceed: bad input, inconsistent models or an unusable output path.

    The message names what is wrong (tensor, file, field) in one line, so the ``pmakit``
    command prints it as is and exits with code 2.
    """
