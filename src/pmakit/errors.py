"""pmakit's errors for bad input: one base type, so callers and the command line tell bad input from bugs.

Every message names what is wrong (tensor, file, field) in one line, so the ``pmakit`` command
prints it as is and exits with code 2.
"""

from __future__ import annotations


__all__ = ["InputError", "MergeError"]


class InputError(ValueError):
    """Bad input: a file, tensor, folder or setting that cannot be used as given.

    Raised before anything is written; the message names the file, tensor or setting.
    """


class MergeError(InputError):
    """A merge cannot proceed: bad input, inconsistent models or an unusable output path.

    A subclass of `InputError`, so ``except InputError`` catches both.
    """
