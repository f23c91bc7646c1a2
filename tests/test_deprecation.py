"""Old spellings: one FutureWarning, at the user's line, naming the removal release (the next minor one)."""

from __future__ import annotations

import pytest

import pmakit
from pmakit import InputError
from pmakit.deprecation import REMOVED_IN, greater_is_better_of, renamed_keyword, warn_deprecated


def test_removal_is_the_next_minor_release():
    major, minor, *_ = (int(part) for part in pmakit.__version__.split("."))
    assert REMOVED_IN == f"{major}.{minor + 1}.0"


def test_the_warning_points_at_the_callers_line():
    with pytest.warns(
        FutureWarning, match=rf"`old` is deprecated and will be removed in pmakit {REMOVED_IN}; do"
    ) as w:
        warn_deprecated("`old`", "do this instead")
    assert w[0].filename == __file__  # not pmakit's own file
    with pytest.warns(FutureWarning) as w:
        pmakit.MergeOptions(push_to_hub="me/m", private=True)  # through the dataclass's generated __init__
    assert w[0].filename == __file__


def test_renamed_keyword():
    assert renamed_keyword(1, None, new="new", old="old", where="f") == 1
    assert renamed_keyword(None, None, new="new", old="old", where="f") is None
    with pytest.warns(FutureWarning, match="`old=` of f is deprecated .*; write `new=` instead"):
        assert renamed_keyword(None, 2, new="new", old="old", where="f") == 2
    with pytest.raises(InputError, match="f: give `new` only; `old` is its deprecated name"):
        renamed_keyword(1, 2, new="new", old="old", where="f")


def test_a_scorers_direction():
    class New:
        greater_is_better = True

    class Old:
        higher_is_better = True

    class Both:
        greater_is_better, higher_is_better = False, True

    assert greater_is_better_of(New()) is True and greater_is_better_of(Both()) is False
    assert greater_is_better_of(lambda folder: 0.0) is None
    with pytest.warns(FutureWarning, match=r"A scorer's `higher_is_better` \(Old\) is deprecated"):
        assert greater_is_better_of(Old()) is True
