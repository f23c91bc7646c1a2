"""Step-aware rules (`ema_halflife`, `bema`) through `PmaTrainer`: merges, model cards and a resume mid-cycle."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import TrainerCallback

from tests.helpers.models import tiny_llama
from tests.helpers.references import bema_reference, gap_ema_weights
from tests.helpers.training import (
    SnapshotCallback,
    StopAt,
    assert_folder_is,
    card_recipe,
    load_folder,
    pma_folders,
    trainer_for,
)


SPEC = "ema_halflife:0.5,step_bias=1"
BEMA = "bema:ema_power=0.3,lag=4"
THETA0 = "pma_bema_theta0"


@pytest.mark.parametrize("resume", [False, True], ids=["straight", "resumed-mid-cycle"])
def test_trainer_merges_weigh_samples_by_their_steps(tmp_path, resume):
    settings = dict(max_steps=12, pma_fused_algo=SPEC, pma_fused_num=3, pma_interleave_step=2)
    snap = SnapshotCallback()
    if resume:  # stop at step 8: the second cycle holds the sample at step 8 only
        trainer_for(tmp_path, [StopAt(8)], save_strategy="steps", save_steps=8, **settings).train()
        trainer = trainer_for(tmp_path, [snap], **settings)
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))
        # the steps before the checkpoint are replayed by the first run only: take them from the same data
        first = SnapshotCallback()
        trainer_for(tmp_path / "again", [first], **settings).train()
        snap.snapshots = {**first.snapshots, **snap.snapshots}
    else:
        trainer = trainer_for(tmp_path, [snap], **settings)
        trainer.train()
    assert pma_folders(tmp_path) == ["pma-6", "pma-12"]
    for steps in ([2, 4, 6], [8, 10, 12]):
        folder = tmp_path / f"pma-{steps[-1]}"
        assert_folder_is(folder, snap.snapshots, steps, gap_ema_weights(steps, 0.5, 1.0))
        recipe = card_recipe(folder)
        assert recipe["sample_steps"] == steps and recipe["fused_algo"] == SPEC
        assert recipe["weights"] == pytest.approx(gap_ema_weights(steps, 0.5, 1.0), abs=1e-8)  # the card rounds


def theta0(trainer) -> list[torch.Tensor]:
    optimizer = trainer.pma_engine.optimizer
    return [optimizer.state[p][THETA0].clone() for g in optimizer.param_groups for p in g["params"]]


class Theta0AtStart(TrainerCallback):
    """BEMA's theta_0 in the optimizer state right after a checkpoint was loaded, before any further step."""

    def __init__(self) -> None:
        self.theta0, self.trainer = None, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.theta0 = theta0(self.trainer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bema_merges_resume_mid_cycle_bitwise(tmp_path, dtype):
    """Cycles 2-6 and 8-12; stopped at step 10, theta_0 (step 8) and the EMA of 8, 10 must resume exactly."""
    settings = dict(max_steps=12, pma_fused_algo=BEMA, pma_fused_num=3, pma_interleave_step=2)
    snap = SnapshotCallback()
    trainer_for(tmp_path / "full", [snap], model=tiny_llama(dtype=dtype), **settings).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the horizon warning of the stopped run
        part = trainer_for(tmp_path / "part", [StopAt(10)], model=tiny_llama(dtype=dtype), save_strategy="steps",
                           save_steps=10, **settings)  # fmt: skip
        part.train()
    capture = Theta0AtStart()
    resumed = trainer_for(tmp_path / "part", [capture], model=tiny_llama(dtype=dtype), **settings)
    capture.trainer = resumed
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-10"))
    saved = theta0(part)
    assert all(t.dtype == torch.float32 and torch.equal(t, s) for t, s in zip(capture.theta0, saved, strict=True))
    for folder in ("pma-6", "pma-12", "pma"):
        full, again = load_folder(tmp_path / "full" / folder), load_folder(tmp_path / "part" / folder)
        assert full.keys() == again.keys() and all(torch.equal(full[k], again[k]) for k in full), folder
    for steps in ([2, 4, 6], [8, 10, 12]):
        folder = tmp_path / "full" / f"pma-{steps[-1]}"
        for name, merged in load_folder(folder).items():
            expected = bema_reference([snap.snapshots[t][name] for t in steps], steps, ema_power=0.3, lag=4.0)[0]
            tolerance = 2e-6 if dtype == torch.float32 else 2**-8  # bf16: the fp32 merge may round one ulp off
            torch.testing.assert_close(merged.double(), expected.to(dtype).double(), rtol=tolerance, atol=2e-6)
        recipe = card_recipe(folder)
        assert recipe["sample_steps"] == steps and recipe["fused_algo"] == BEMA and recipe["weights"][0] < 0
