"""What a sweep tries (`pmakit.tools.sweep.candidates`): the inputs of a run, rule specs parsed by the registry (a
spec may carry the rule's parameters, `ema:0.5`), the alpha grid, and every candidate checked before any merge."""

from __future__ import annotations

import math

import numpy
import pytest

from pmakit.errors import InputError
from pmakit.tools.sweep import expand_alphas, parse_rule, sweep, sweep_inputs
from tests.helpers.folders import read_folder, reference, save_models


def _never(folder):
    raise AssertionError("no merge should be scored")


def test_sweep_inputs_from_run_folder(run_dir):
    folders = sweep_inputs(run_dir)
    assert [f.name for f in folders] == [f"checkpoint-{s}" for s in (2, 4, 6, 8, 10, 12)]
    with pytest.raises(InputError, match="pma-samples/step-N"):
        sweep_inputs(run_dir, source="samples")


def test_bad_candidates_fail_before_any_merge(run_dir, tmp_path):
    with pytest.raises(InputError, match="Unknown sweep rule 'smaa'"):
        sweep(run_dir, ["sma", "smaa"], [2], score=_never)
    with pytest.raises(InputError, match="Window 7 is longer than the 6 inputs"):
        sweep(run_dir, ["sma"], [2, 7], score=_never)
    with pytest.raises(InputError, match="positive"):
        sweep(run_dir, ["sma"], [0], score=_never)
    with pytest.raises(InputError, match="output_dir"):
        sweep(run_dir, ["sma"], [2], score=_never, push_to_hub="alice/x")
    assert parse_rule("ema") == {"algo": "ema"}


def test_alphas_expand_the_rules_that_take_one():
    rules = ["sma", "ema", "ema:0.3", "ema_corrected", "decay:cosine", "ema_corrected:alpha=0.05"]
    assert expand_alphas(rules, [0.05, 0.5, 0.05]) == [
        *("sma", "ema:0.05", "ema:0.5", "ema:0.3", "ema_corrected:0.05", "ema_corrected:0.5", "decay:cosine"),
        "ema_corrected:alpha=0.05",
    ]  # a spec's own alpha stays as written; a repeated alpha counts once
    assert expand_alphas(["ema"], [1 / 3]) == ["ema:0.3333333333333333"]  # every digit: the spec is the value
    assert parse_rule(expand_alphas(["ema"], [1 / 3])[0]) == {"algo": "ema", "alpha": 1 / 3}
    assert expand_alphas(rules, None) == rules
    assert expand_alphas(["ema"], numpy.array([0.25, 0.5], dtype=numpy.float32)) == ["ema:0.25", "ema:0.5"]


@pytest.mark.parametrize(
    ("alphas", "message"),
    [
        ([], r"non-empty list of numbers, got \[\]"),
        ("0.1", r"non-empty list of numbers, got '0.1'"),
        ([0.1, "0.2"], r"numbers in \(0, 1\), got '0.2'"),
        ([True], r"numbers in \(0, 1\), got True"),
        ([0.1, 1.5], r"Rule 'ema:1.5': The `ema` rule's `alpha` must lie in \(0, 1\), got 1.5"),
        ([math.nan], r"Rule 'ema:nan'.*must lie in \(0, 1\)"),
    ],
)
def test_bad_alphas_are_refused(alphas, message):
    with pytest.raises(InputError, match=message):
        expand_alphas(["sma", "ema"], alphas)


def test_alphas_need_a_rule_that_takes_one_and_exclude_alpha(run_dir):
    with pytest.raises(InputError, match=r"rules that take an alpha \(ema, ema_corrected\).*no rule here does"):
        sweep(run_dir, ["sma", "wma", "ema:0.2"], [2], score=_never, alphas=[0.1])
    with pytest.raises(InputError, match=r"Give `alpha` .* or `alphas` .*, not both"):
        sweep(run_dir, ["ema"], [2], score=_never, alpha=0.3, alphas=[0.1])
    with pytest.raises(InputError, match=r"must lie in \(0, 1\), got 0.0"):
        sweep(run_dir, ["ema"], [2], score=_never, alphas=[0.1, 0.0])


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
