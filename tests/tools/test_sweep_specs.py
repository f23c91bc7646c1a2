"""Sweep rule specs are parsed by the registry: a spec may carry the rule's parameters (`ema:0.5`)."""

from __future__ import annotations

import pytest

from pmakit.errors import InputError
from pmakit.tools.sweep import parse_rule, sweep
from tests.helpers.folders import read_folder, reference, save_models


def test_spec_parameters_reach_the_merge(tmp_path):
    folders = save_models(tmp_path, 3)
    # EMA with alpha 0.5 over 3 samples, started at the first: (1-a)^2, a(1-a), a
    expected = reference(folders, [0.25, 0.25, 0.5])

    def distance(folder):
        out = read_folder(folder)
        return max(float((out[k].double() - expected[k]).abs().max()) for k in expected)

    result = sweep(folders, ["ema:0.5", "ema"], [3], score=distance, alpha=0.2, save_best=False)
    scores = {row.rule: row.score for row in result.rows}
    assert scores["ema:0.5"] < 1e-6 < scores["ema"]  # the spec's alpha, not the sweep's 0.2
    assert result.best.rule == "ema:0.5"
    assert parse_rule("ema_corrected:alpha=0.05") == {"algo": "ema_corrected", "alpha": 0.05}
    with pytest.raises(InputError, match=r"Rule 'ema:2': The `ema` rule's `alpha` must lie in \(0, 1\)"):
        parse_rule("ema:2")
    with pytest.raises(InputError, match="Unknown sweep rule 'weights'"):
        parse_rule("weights")
