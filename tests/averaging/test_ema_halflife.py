"""The `ema_halflife` rule (torchtitan's half-life EMA) against hand-written fp64 EMAs, online and offline."""

from __future__ import annotations

import math
import random

import pytest
import torch

from pmakit import PmaConfig
from pmakit.averaging import AveragingRule, RuleError, fold_coefficients, parse_spec
from pmakit.errors import MergeError
from pmakit.merging import merge
from tests.helpers.engine import train_and_sample, weighted_sum
from tests.helpers.folders import read_folder, reference, save_models
from tests.helpers.references import gap_ema_weights


def torchtitan_ema(samples, h, bias):
    """An EMA updated once per step 1..N (the first update seeds it), decay 2^(-1/(h (step + bias))), in fp64."""
    ema = samples[0]
    for step, x in enumerate(samples[1:], start=2):
        decay = 2.0 ** (-1.0 / (h * (step + bias)))
        ema = decay * ema + (1.0 - decay) * x
    return ema


def test_every_step_samples_are_torchtitans_decay():
    rng = random.Random(1)
    samples = [rng.uniform(-1, 1) for _ in range(40)]
    rule = AveragingRule.from_spec("ema_halflife:0.25,step_bias=3")
    steps = list(range(1, 41))
    weights = rule.weights_for(40, steps)
    assert math.fsum(weights) == pytest.approx(1.0, abs=1e-15)
    got = math.fsum(w * x for w, x in zip(weights, samples, strict=True))
    assert got == pytest.approx(torchtitan_ema(samples, 0.25, 3.0), rel=1e-13)


@pytest.mark.parametrize(("h", "bias"), [(0.05, 0.0), (0.5, 0.0), (0.2, 7.5)])
def test_spaced_steps_decay_over_each_gap(h, bias):
    steps = [30, 60, 90, 120, 200, 201, 350]
    rule = AveragingRule("ema_halflife", params={"half_life_fraction": h, "step_bias": bias})
    expected = gap_ema_weights(steps, h, bias)
    assert rule.weights_for(len(steps), steps) == pytest.approx(expected, rel=1e-13, abs=1e-300)
    rng = random.Random(2)
    samples = [rng.uniform(-1, 1) for _ in steps]
    avg = 0.0
    for c, x in zip(fold_coefficients(rule, len(steps), steps), samples, strict=True):
        avg += c * (x - avg)
    assert avg == pytest.approx(math.fsum(w * x for w, x in zip(expected, samples, strict=True)), rel=1e-12)


def test_the_window_is_a_fraction_of_the_steps_so_far():
    # a sample every step up to 1000, h = 0.1: the last 10% of the steps (901..1000) weigh about half, exactly
    # 1 - prod_t 2^(-1/(0.1 t)) (the half-life grows from 90 to 100 steps over them)
    steps = list(range(1, 1001))
    weights = AveragingRule("ema_halflife", params={"half_life_fraction": 0.1}).weights_for(1000, steps)
    expected = 1.0 - 2.0 ** -math.fsum(10.0 / t for t in range(901, 1001))
    assert math.fsum(weights[900:]) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.5, abs=0.02)


def test_spec_settings_and_checks():
    parsed = ("ema_halflife", {"half_life_fraction": 0.1, "step_bias": 5.0})
    assert parse_spec("ema_halflife:0.1,step_bias=5") == parsed
    rule = AveragingRule.from_spec("ema_halflife:0.1,step_bias=5")
    assert rule.settings() == {"half_life_fraction": 0.1, "step_bias": 5.0}
    assert rule.describe(3) == "half-life EMA (h=0.1, step_bias=5) of 3 samples"
    with pytest.raises(RuleError, match="pass `steps`"):
        rule.weights_for(3)
    with pytest.raises(RuleError, match="step \\+ step_bias > 0; the sample at step 2 gives -3"):
        AveragingRule.from_spec("ema_halflife:0.1,step_bias=-5").weights_for(2, [1, 2])
    with pytest.raises(RuleError, match="rising steps; step 5 follows step 5"):
        rule.weights_for(2, [5, 5])
    with pytest.raises(RuleError, match="half_life_fraction"):
        AveragingRule("ema_halflife", params={"half_life_fraction": 0.0})


def test_offline_merge_of_step_folders_weighs_by_their_steps(tmp_path):
    steps = [100, 200, 400]
    folders = save_models(tmp_path, 3, names=[f"step-{s}" for s in steps])
    result = merge(folders, tmp_path / "out", algo="ema_halflife:0.5", accumulate_dtype="float64")
    w = gap_ema_weights(steps, 0.5, 0.0)
    assert result.plan.weights == pytest.approx(w, rel=1e-14)
    out, ref = read_folder(tmp_path / "out"), reference(folders, w)
    for name in ref:
        assert torch.allclose(out[name].double(), ref[name], rtol=2**-23, atol=1e-30), name


def test_offline_merge_refuses_inputs_whose_steps_are_unknown(tmp_path):
    folders = save_models(tmp_path, 2, names=["step-10", "final"])
    with pytest.raises(MergeError, match="the step of .*final is unknown"):
        merge(folders, tmp_path / "out", algo="ema_halflife")
    assert not (tmp_path / "out").exists()


def test_online_engine_weighs_samples_by_their_optimizer_steps():
    config = PmaConfig(fused_algo="ema_halflife:0.5,step_bias=2", fused_num=4, interleave_step=3, start_step=2)
    model, engine, snapshots, sample_steps = train_and_sample(config)
    assert sample_steps == [3, 6, 9] and engine.counters["sample_steps"] == sample_steps
    expected = weighted_sum(snapshots, gap_ema_weights(sample_steps, 0.5, 2.0))
    u32 = torch.finfo(torch.float32).eps / 2
    for i, p in enumerate(model.parameters()):
        largest = torch.stack([s[i].abs() for s in snapshots]).amax(dim=0)
        assert ((engine.averages()[p].double() - expected[i]).abs() <= 8 * 2 * u32 * largest).all()


def test_online_settings_are_checked_against_the_first_cycle():
    # the first cycle samples at steps 3 and 6: 6 - 10 < 0
    with pytest.raises(ValueError, match="^`step_bias`: .* the sample at step 6 gives -4"):
        PmaConfig(fused_algo="ema_halflife:0.5,step_bias=-10", fused_num=2, interleave_step=3)
    with pytest.raises(ValueError, match="^`ema_alpha`: give `alpha` in its own field"):
        PmaConfig(fused_algo="ema:0.5", fused_num=2)


def test_the_cli_takes_a_rule_spec_and_refuses_a_bad_one(tmp_path, capsys):
    from pmakit.cli import main

    steps = [100, 300]
    folders = [str(f) for f in save_models(tmp_path, 2, names=[f"step-{s}" for s in steps])]
    out = tmp_path / "out"
    assert main(["average", *folders, "--algo", "ema_halflife:0.5,step_bias=10", "-o", str(out), "--no-progress"]) == 0
    w = gap_ema_weights(steps, 0.5, 10.0)
    ref, states = reference(folders, w), [read_folder(f) for f in folders]
    for name, tensor in read_folder(out).items():  # an fp32 fold of 2 terms: within 3 u sum |w x|
        bound = 3 * 2.0**-24 * sum(abs(wi) * s[name].double().abs() for wi, s in zip(w, states, strict=True))
        assert ((tensor.double() - ref[name]).abs() <= bound + 1e-30).all(), name
    assert main(["average", *folders, "--algo", "ema_halflife:-1", "-o", str(tmp_path / "bad")]) == 2
    assert "half_life_fraction" in capsys.readouterr().err
