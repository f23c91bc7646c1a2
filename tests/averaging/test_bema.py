"""The `bema` rule: its closed form against TRL's update loop in fp64, and a merge against TRL's own BEMACallback."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import Trainer, TrainerCallback

from pmakit import PmaConfig
from pmakit.averaging import AveragingRule
from pmakit.merging import merge
from tests.helpers.folders import read_folder
from tests.helpers.models import TokenDataset, tiny_llama
from tests.helpers.training import load_folder, plain_args


def trl_loop(samples, steps, kappa=0.5, eta=0.2, rho=10.0, gamma=1.0, floor=0.0):
    """TRL's BEMACallback update, written out in fp64: theta_0 = samples[0]; EMA from it; ema + alpha (x - theta_0)."""
    theta0 = ema = samples[0]
    out = theta0
    for x, t in zip(samples[1:], steps[1:], strict=True):
        beta = max((rho + gamma * t) ** -kappa, floor)
        ema = (1 - beta) * ema + beta * x
        out = ema + (rho + gamma * t) ** -eta * (x - theta0)
    return out


@pytest.mark.parametrize(
    ("spec", "trl"),
    [
        ("bema", {}),
        (
            "bema:ema_power=0.3,bias_power=0.6,lag=4,multiplier=2,min_ema_multiplier=0.2",
            dict(kappa=0.3, eta=0.6, rho=4.0, gamma=2.0, floor=0.2),
        ),
        ("bema:ema_power=0,bias_power=8", dict(kappa=0.0, eta=8.0)),  # EMA off: the newest sample, nearly
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
    assert got == pytest.approx(trl_loop(samples, steps, **trl), rel=1e-12, abs=1e-15)


def test_theta0_weighs_negative_at_trls_defaults():
    weights = AveragingRule("bema").weights_for(11, list(range(11)))
    assert weights[0] == pytest.approx(-0.499, abs=1e-3) and weights[-1] == pytest.approx(0.773, abs=1e-3)
    assert AveragingRule("bema").weights_for(1, [7]) == [1.0]  # theta_0 alone is itself


def test_online_pma_refuses_bema_and_says_how_to_merge_it():
    with pytest.raises(ValueError, match="no running form.*merge them offline"):
        PmaConfig(fused_algo="bema", fused_num=4)


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
