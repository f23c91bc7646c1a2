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


def test_step_aware_specs_reach_the_merge(tmp_path):
    """Parameters with no merge setting of their own (``ema_halflife:h``, ``bema:...``) go to the merge in the spec."""
    from pmakit import merge

    folders = save_models(tmp_path, 3, names=["step-100", "step-200", "step-300"])
    specs = ["ema_halflife:0.5", "ema_halflife:0.05", "bema:bias_power=1,lag=5"]
    expected = {}
    for spec in specs:
        merge(folders, tmp_path / spec, algo=spec, progress=False)
        expected[spec] = read_folder(tmp_path / spec)

    def score_for(spec):
        return lambda folder: max(float((read_folder(folder)[k] - v).abs().max()) for k, v in expected[spec].items())

    for spec in specs:
        result = sweep(folders, [spec], [3], score=score_for(spec), save_best=False)
        assert result.rows[0].score == 0.0  # the same merge, bit for bit
    # the two half-lives weigh the samples differently, so a spec's parameter is not lost on the way
    assert any(not (expected[specs[0]][k] == expected[specs[1]][k]).all() for k in expected[specs[0]])
    assert parse_rule("ema_halflife:0.25") == {"algo": "ema_halflife:0.25"}
    assert parse_rule("decay:cosine") == {"algo": "decay", "decay_shape": "cosine"}
