"""pmakit's errors: one tree under `PmakitError`, so callers and the command line tell bad input from bugs.

- `InputError` (a `ValueError`): a file, tensor, folder or setting that cannot be used as given;
  `MergeError` (a merge cannot proceed), `pmakit.averaging.RuleError` (a wrong averaging rule) and
  `pmakit.io.folders.OutputBusyError` are kinds of it.
- `HubError` (a `RuntimeError`): the Hub refused or failed; `pmakit.io.hub.HubPushError` and
  `pmakit.io.hub.HubDownloadError`.
- `TrainingError` (a `RuntimeError`): a training run cannot go on; `pmakit.training.BackgroundExportError`
  and `pmakit.training.spike.SpikeRecoveryError`.
- `pmakit.io.folders.DiskFullError` (an `OSError`): the disk filled up while a folder was written.

Every message names what is wrong (tensor, file, field) in one line, and shows input values through
`brief`, so the ``pmakit`` command prints it as is and exits with code 2.
"""

from __future__ import annotations

import reprlib


__all__ = ["HubError", "InputError", "MergeError", "PmakitError", "TrainingError", "brief"]


class PmakitError(Exception):
    """The base of every error pmakit raises on purpose: ``except PmakitError`` catches them all.

    Anything else that escapes pmakit is a bug (or an error from a library below it).
    """


class InputError(PmakitError, ValueError):
    """Bad input: a file, tensor, folder or setting that cannot be used as given.

    Raised before anything is written; the message names the file, tensor or setting.
    A `ValueError`, so ``except ValueError`` keeps working.
    """


class MergeError(InputError):
    """A merge cannot proceed: bad input, inconsistent models or an unusable output path.

    A subclass of `InputError`, so ``except InputError`` catches both.
    """


class HubError(PmakitError, RuntimeError):
    """The Hub refused or failed a request (push, download); the message says what to retry or fix."""


class TrainingError(PmakitError, RuntimeError):
    """A training run cannot go on (a failed background export, a loss spike it cannot recover from)."""


class _Brief(reprlib.Repr):
    """A repr bounded in depth, items and length: an input value never makes a message big or slow."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxdict, self.maxlist, self.maxtuple = 3, 4, 6, 6
        self.maxset = self.maxfrozenset = self.maxdeque = self.maxarray = 6
        self.maxstring, self.maxother, self.maxlong = 80, 80, 40

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:  # str() of a huge int is slow, and refused past 4300 digits
            return f"<int of {x.bit_length()} bits>"
        return super().repr_int(x, level)

    def repr_instance(self, x: object, level: int) -> str:
        if isinstance(x, BaseException):  # its str() is the repr of its arguments: unbounded
            return f"{type(x).__name__}({', '.join(self.repr1(a, level - 1) for a in x.args[:3])})"
        for base in (str, dict, list, tuple, set, frozenset):  # subclasses (OrderedDict...) bounded as their base
            if isinstance(x, base):
                return getattr(self, f"repr_{base.__name__}")(base(x), level)
        return super().repr_instance(x, level)


_BRIEF = _Brief()


def brief(value: object, limit: int = 120) -> str:
    """``repr(value)``, bounded (depth, items, length): how every message shows a value read from input.

    A file or recipe can hold a huge value, or a small one that expands (YAML aliases, shared pickle
    objects); a plain ``repr`` of it in an error message can take unbounded time and memory.
    """
    text = _BRIEF.repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
