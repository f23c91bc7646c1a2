"""One error tree (`pmakit.errors.PmakitError`), and input values in messages always bounded by `brief`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pmakit import errors
from pmakit.averaging import AveragingRule, RuleError
from pmakit.averaging.registry import MissingParameterError, RangeError, UnknownRuleError, UnusedParameterError
from pmakit.io.folders import DiskFullError, OutputBusyError
from pmakit.io.hub import HubDownloadError, HubPushError
from pmakit.online.config import PmaConfig
from pmakit.training.background import BackgroundExportError
from pmakit.training.spike import SpikeRecoveryError


SRC = Path(errors.__file__).parent

# (class, every base it must have: the tree's, and the builtin one users' `except` clauses name)
TREE = [
    (errors.InputError, (errors.PmakitError, ValueError)),
    (errors.MergeError, (errors.InputError, ValueError)),
    (errors.HubError, (errors.PmakitError, RuntimeError)),
    (errors.TrainingError, (errors.PmakitError, RuntimeError)),
    (HubPushError, (errors.HubError, RuntimeError)),
    (HubDownloadError, (errors.HubError, RuntimeError)),
    (BackgroundExportError, (errors.TrainingError, RuntimeError)),
    (SpikeRecoveryError, (errors.TrainingError, RuntimeError)),
    (OutputBusyError, (errors.InputError, ValueError)),
    (DiskFullError, (errors.PmakitError, OSError)),
    (RuleError, (errors.InputError, ValueError)),
    (UnknownRuleError, (RuleError,)),
    (MissingParameterError, (RuleError,)),
    (UnusedParameterError, (RuleError,)),
    (RangeError, (RuleError,)),
]


@pytest.mark.parametrize(("cls", "bases"), TREE, ids=[c.__name__ for c, _ in TREE])
def test_every_error_is_in_the_tree_and_keeps_its_builtin_base(cls, bases):
    assert issubclass(cls, errors.PmakitError)
    for base in bases:
        assert issubclass(cls, base), f"{cls.__name__} is not a {base.__name__}"


def test_tree_classes_are_exported_from_the_package():
    import pmakit

    for name in ("PmakitError", "InputError", "MergeError", "HubError", "TrainingError"):
        assert getattr(pmakit, name) is getattr(errors, name)
    assert pmakit.HubPushError is HubPushError and pmakit.SpikeRecoveryError is SpikeRecoveryError


def test_disk_full_error_is_still_an_errno_oserror():
    err = DiskFullError(28, "No space left on device", "/out")
    assert (err.errno, err.filename) == (28, "/out") and isinstance(err, errors.PmakitError)


def _raises(tree: ast.AST):
    return [node for node in ast.walk(tree) if isinstance(node, ast.Raise) and node.exc is not None]


def _sources():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 40
    return [(path.relative_to(SRC), ast.parse(path.read_text(encoding="utf-8"))) for path in files]


@pytest.mark.parametrize(
    ("builtin", "ours"), [("ValueError", "InputError"), ("RuntimeError", "TrainingError or HubError")]
)
def test_src_raises_no_bare_builtin_error(builtin, ours):
    """Bad input is an `InputError` (still a `ValueError`), a failed run a `TrainingError` (still a `RuntimeError`),
    so ``except PmakitError`` sees all of it and existing ``except ValueError``/``RuntimeError`` clauses still do."""
    found = []
    for path, tree in _sources():
        for node in _raises(tree):
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id == builtin:
                found.append(f"{path}:{node.lineno}")
    assert not found, f"raise {builtin} (use pmakit.errors.{ours}): {found}"


def test_no_raise_message_holds_an_unbounded_repr():
    """``{x!r}`` or ``repr(x)`` in a raise puts the whole value in the message; `brief` bounds it."""
    found = []
    for path, tree in _sources():
        for node in _raises(tree):
            for sub in ast.walk(node.exc):
                if isinstance(sub, ast.FormattedValue) and sub.conversion == ord("r"):
                    found.append(f"{path}:{sub.lineno} {{{ast.unparse(sub.value)}!r}}")
                elif isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name) and sub.func.id == "repr":
                    found.append(f"{path}:{sub.lineno} repr({ast.unparse(sub.args[0])})")
    assert not found, f"use pmakit.errors.brief: {found}"


def test_a_huge_setting_gives_a_short_message():
    with pytest.raises(ValueError, match=r"offload.*'xxxx") as err:
        PmaConfig(offload="x" * 1_000_000)
    assert len(str(err.value)) < 300


def test_huge_weights_give_a_short_message():
    with pytest.raises(RuleError, match=r"finite numbers, got \[nan, 1\.0") as err:
        AveragingRule("weights", weights=[float("nan")] + [1.0] * 200_000)
    assert len(str(err.value)) < 300
