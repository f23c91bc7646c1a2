"""The `bema` rule: its closed form against TRL's update loop in fp64, and a merge against TRL's own BEMACallback."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import Trainer, TrainerCallback

from pmakit import PmaConfig
from pmakit.averaging import AveragingRule, fold_coefficients
from pmakit.merging import merge
from tests.helpers.folders import read_folder
from tests.helpers.models import TokenDataset, tiny_llama
from tests.helpers.references import bema_reference
from tests.helpers.training import load_folder, plain_args


@pytest.mark.parametrize(
    ("spec", "trl"),
    [
        ("bema", {}),
        (
            "bema:ema_power=0.3,bias_power=0.6,lag=4,multiplier=2,min_ema_multiplier=0.2",
            dict(ema_power=0.3, bias_power=0.6, lag=4.0, multiplier=2.0, min_ema_multiplier=0.2),
        ),
        ("bema:ema_power=0,bias_power=8", dict(ema_power=0.0, bias_power=8.0)),  # EMA off: the newest sample, nearly
    ],
    ids=["defaults", "all-parameters", "ema-off"],
)
def test_closed_form_is_trls_update_loop(spec, trl):
    steps = [0, 400, 800, 1200, 1600, 2000, 2400, 2800, 3200, 3600, 4000]
    rng = random.Random(3)
    samples = [rng.uniform(-1, 1) for _ in steps]
    weights = AveragingRule.from_spec(spec).weights_for(len(steps), steps)
    assert math.fsum(weights) == pytest.approx(1.0, abs=1e-14)
    got = math.fsum(w * x for w, x in zip(weights, samples, strict=True))
    assert got == pytest.approx(bema_reference(samples, steps, **trl)[0], rel=1e-12, abs=1e-15)
    # the running form: an EMA folded from theta_0, then the rule's finish adds alpha (x_n - theta_0)
    rule, avg = AveragingRule.from_spec(spec), 0.0
    for c, x in zip(fold_coefficients(rule, len(steps), steps), samples, strict=True):
        avg += c * (x - avg)
    assert avg == pytest.approx(bema_reference(samples, steps, **trl)[1], rel=1e-12, abs=1e-15)
    assert rule.anchors == ("theta0",) and set(rule.finish(len(steps), steps)) == {"theta0"}
    avg += rule.finish(len(steps), steps)["theta0"] * (samples[-1] - samples[0])
    assert avg == pytest.approx(got, rel=1e-12, abs=1e-15)


def test_theta0_weighs_negative_at_trls_defaults():
    weights = AveragingRule("bema").weights_for(11, list(range(11)))
    assert weights[0] == pytest.approx(-0.499, abs=1e-3) and weights[-1] == pytest.approx(0.773, abs=1e-3)
    assert AveragingRule("bema").weights_for(1, [7]) == [1.0]  # theta_0 alone is itself


def test_online_pma_takes_bema_and_its_specs():
    assert PmaConfig(fused_algo="bema", fused_num=4).rule.anchors == ("theta0",)
    config = PmaConfig(fused_algo="bema:ema_power=0.3,lag=4,min_ema_multiplier=0.1", fused_num=4)
    assert (config.rule.rule.ema_power, config.rule.rule.lag, config.rule.rule.min_ema_multiplier) == (0.3, 4.0, 0.1)
    assert AveragingRule("bema").finish(1, [7]) == {}  # theta_0 alone needs no correction
    with pytest.raises(ValueError, match="lag \\+ multiplier \\* step > 0"):
        PmaConfig(fused_algo="bema:lag=-5000", fused_num=4, interleave_step=1000)


class SaveSamples(TrainerCallback):
    """Saves the model as `step-N` at ``steps`` (0: before training), as a sample store would."""

    def __init__(self, root, steps) -> None:
        self.root, self.steps = root, set(steps)

    def _save(self, model, step) -> None:
        if step in self.steps:
            model.save_pretrained(self.root / f"step-{step}")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._save(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._save(model, state.global_step)


@pytest.mark.parametrize(
    ("update_after", "spec", "trl"),
    [
        (0, "bema", {}),
        (
            2,
            "bema:ema_power=0.3,bias_power=0.6,lag=4,multiplier=2",
            dict(ema_power=0.3, bias_power=0.6, lag=4, multiplier=2.0),
        ),
    ],
    ids=["defaults", "update_after-2"],
)
def test_merge_of_the_samples_equals_trls_bema_callback(tmp_path, update_after, spec, trl):
    BEMACallback = pytest.importorskip("trl").BEMACallback  # noqa: N806 (the class, under its name)

    every, max_steps = 2, 10
    steps = list(range(update_after, max_steps + 1, every))  # theta_0 at update_after, then every update
    out = tmp_path / "run"
    callbacks = [
        BEMACallback(update_freq=every, update_after=update_after, **trl),
        SaveSamples(tmp_path / "samples", steps),
    ]
    args = plain_args(out, max_steps=max_steps)
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=TokenDataset(), callbacks=callbacks)
    trainer.train()
    folders = [tmp_path / "samples" / f"step-{s}" for s in steps]
    result = merge(folders, tmp_path / "merged", algo=spec, accumulate_dtype="float64")
    assert result.plan.weights[0] < 0  # theta_0
    merged, trl_weights = read_folder(tmp_path / "merged"), load_folder(out / "bema")
    states = [read_folder(f) for f in folders]
    u32 = torch.finfo(torch.float32).eps / 2
    assert trl_weights.keys() <= merged.keys()
    for name, theirs in trl_weights.items():
        # TRL folds in fp32: a few roundings per update, each at most u32 times the operands' size
        size = sum(abs(w) * s[name].double().abs() for w, s in zip(result.plan.weights, states, strict=True))
        bound = 8 * len(steps) * u32 * size + 1e-30
        assert ((merged[name].double() - theirs.double()).abs() <= bound).all(), name
        assert not torch.equal(merged[name], states[-1][name]), name  # BEMA moved the newest sample
