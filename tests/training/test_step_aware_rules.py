"""A step-aware rule (`ema_halflife`) through `PmaTrainer`: merges, model cards and a resume mid-cycle."""

from __future__ import annotations

import pytest

from tests.helpers.references import gap_ema_weights
from tests.helpers.training import SnapshotCallback, StopAt, assert_folder_is, card_recipe, pma_folders, trainer_for


SPEC = "ema_halflife:0.5,step_bias=1"


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
