"""Merge schedules through real `Trainer` runs: merges against fp64 snapshots, evaluation, WSD, resume, refusals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer

from pmakit import PmaCallback, PmaConfig
from pmakit.errors import InputError
from pmakit.online.engine import attach_engine
from pmakit.training.export import PmaExporter
from pmakit.training.schedule import ScheduledMerges
from tests.helpers.models import TokenDataset, tiny_llama
from tests.helpers.training import (
    SnapshotCallback,
    StopAt,
    assert_folder_is,
    card_recipe,
    load_folder,
    plain_args,
    pma_folders,
    trainer_for,
)


def _metrics(trainer) -> dict:
    return {k: v for entry in trainer.state.log_history for k, v in entry.items() if k.startswith("eval_pma")}


def test_overlapping_merges_are_written_and_evaluated(tmp_path):
    # windows of 4 steps, a sample every 2: {4,6} -> pma-6, {6,8} -> pma-8 (sharing step 6), {10,12} -> pma-12
    snap = SnapshotCallback()
    trainer = trainer_for(
        tmp_path, [snap], max_steps=12, pma_merge_steps=[6, 8, 12], pma_merge_window=4,
        pma_fused_algo="ema_corrected", pma_ema_alpha=0.4, pma_eval=True,
    )  # fmt: skip
    trainer.train()
    assert pma_folders(tmp_path) == ["pma-6", "pma-8", "pma-12"]  # no back-to-back cycle was written
    weights = [0.4 * 0.6 / (1 - 0.36), 0.4 / (1 - 0.36)]  # ema_corrected, alpha 0.4, 2 samples: 0.375, 0.625
    for end in (6, 8, 12):
        steps = [end - 2, end]
        assert_folder_is(tmp_path / f"pma-{end}", snap.snapshots, steps, weights)
        recipe = card_recipe(tmp_path / f"pma-{end}")
        assert (recipe["sample_steps"], recipe["merge_window"], recipe["fused_num"]) == (steps, 4, 2)
    latest, last = load_folder(tmp_path / "pma"), load_folder(tmp_path / "pma-12")
    assert latest.keys() == last.keys() and all(torch.equal(latest[k], last[k]) for k in latest)
    metrics = _metrics(trainer)
    assert {"eval_pma_6_loss", "eval_pma_8_loss", "eval_pma_12_loss"} <= metrics.keys()
    assert "eval_pma_loss" not in metrics  # the running cycle is not evaluated: the schedule replaced it
    # each metric is the Trainer's evaluation of that merge (fp32 weights: the folder holds them exactly)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "pma-8")
    args = plain_args(tmp_path / "check", per_device_eval_batch_size=8)
    loss = Trainer(model=merged, args=args, eval_dataset=TokenDataset(16, seed=9)).evaluate()["eval_loss"]
    assert loss == pytest.approx(metrics["eval_pma_8_loss"], rel=1e-6)


SCHEDULE = dict(max_steps=12, pma_merge_steps=[8, 10, 12], pma_merge_window=6, pma_merge_max_open=3)


def test_resume_in_the_middle_of_open_windows_is_bitwise(tmp_path):
    trainer_for(tmp_path / "straight", **SCHEDULE).train()
    run = tmp_path / "resumed"
    # stop at step 7: the windows ending at 8 (samples 4, 6) and 10 (sample 6) are open in checkpoint-7
    with pytest.warns(
        UserWarning, match=r"no scheduled merge was written in 7 optimizer steps \(merges at steps 8, 10"
    ):
        trainer_for(run, [StopAt(7)], save_strategy="steps", save_steps=7, **SCHEDULE).train()
    optimizer = torch.load(run / "checkpoint-7" / "optimizer.pt", weights_only=True)
    saved = optimizer["param_groups"][0]["pma_windows"]["open"]
    assert {end: entry["count"] for end, entry in saved.items()} == {"8": 2, "10": 1}
    trainer_for(run, **SCHEDULE).train(resume_from_checkpoint=str(run / "checkpoint-7"))
    assert pma_folders(run) == pma_folders(tmp_path / "straight") == ["pma-8", "pma-10", "pma-12"]
    for name in ("pma-8", "pma-10", "pma-12"):
        got, want = load_folder(run / name), load_folder(tmp_path / "straight" / name)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), name


WSD = dict(
    max_steps=12, lr_scheduler_type="warmup_stable_decay", warmup_steps=2, lr_scheduler_kwargs={"num_decay_steps": 4},
    logging_steps=1, pma_merge_steps="wsd", pma_merge_window=4,
)  # fmt: skip


def test_wsd_merges_the_stable_phase_right_before_the_decay(tmp_path):
    # warmup 2 + stable 12 - 2 - 4 = 6: the decay starts after step 8, so the merge is the samples at 6 and 8
    snap = SnapshotCallback()
    trainer = trainer_for(tmp_path, [snap], pma_eval=True, **WSD)
    trainer.eval_dataset = {"a": TokenDataset(8, seed=9), "b": TokenDataset(8, seed=10)}
    trainer.train()
    assert pma_folders(tmp_path) == ["pma-8"]
    assert_folder_is(tmp_path / "pma-8", snap.snapshots, [6, 8], [0.5, 0.5])
    assert {"eval_pma_8_a_loss", "eval_pma_8_b_loss"} <= _metrics(trainer).keys()
    # (step 8's own log is there: the merge's evaluation at that step end must not cancel it)
    # the learning rate logged at step t is the one step t trained with: warmup at steps 1-2, full from step 3
    # through step 9 (the decay's first step has factor 1), then decaying: the merged samples saw no decay
    lr = {e["step"]: e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e}
    assert lr[1] < lr[2] < 1e-2 and all(lr[t] == pytest.approx(1e-2) for t in range(3, 10))
    assert lr[10] < 1e-2 and lr[11] < lr[10] and lr[12] < lr[11]
    # and the run also yields the decayed model, to compare with the merge
    trainer.save_model(tmp_path / "decayed")
    decayed, merge = load_folder(tmp_path / "decayed"), load_folder(tmp_path / "pma-8")
    assert all(torch.equal(decayed[n].double(), snap.snapshots[12][n]) for n in snap.snapshots[12])
    assert not any(torch.equal(decayed[n], merge[n]) for n in snap.snapshots[12])


def test_wsd_boundary_off_the_sample_grid_is_refused(tmp_path):
    kwargs = {"num_decay_steps": 4, "num_stable_steps": 6}
    trainer = trainer_for(tmp_path, **{**WSD, "warmup_steps": 1, "lr_scheduler_kwargs": kwargs})
    message = r"`pma_merge_steps`='wsd': the decay starts after optimizer step 7 \(warmup 1 \+ stable 6\).*`pma_inter"
    with pytest.raises(InputError, match=message):
        trainer.train()


def test_callback_refuses_wsd_without_the_scheduler(tmp_path):
    config = PmaConfig(interleave_step=2, merge_steps="wsd", merge_window=4)
    trainer = Trainer(model=tiny_llama(), args=plain_args(tmp_path), train_dataset=TokenDataset())
    trainer.add_callback(PmaCallback(config))
    with pytest.raises(InputError, match=r"`merge_steps`='wsd' merges right before .* `lr_scheduler_type` is 'cons"):
        trainer.train()


def test_evaluating_merges_needs_an_eval_dataset(tmp_path):
    trainer = trainer_for(tmp_path, max_steps=4, pma_merge_steps=[4], pma_merge_window=2, pma_eval=True)
    trainer.eval_dataset = None
    with pytest.raises(InputError, match="`pma_eval` with `pma_merge_steps` evaluates each merge on the Trainer's"):
        trainer.train()


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_sharded_backends_are_refused(backend, tmp_path):
    config = PmaConfig(interleave_step=2, merge_steps=[4], merge_window=2)
    model = tiny_llama()
    engine = attach_engine(torch.optim.AdamW(model.parameters()), config)
    args = SimpleNamespace(
        fsdp=backend == "fsdp", deepspeed={"zero_optimization": {}} if backend == "deepspeed" else None
    )
    name = {"fsdp": "FSDP", "deepspeed": "DeepSpeed"}[backend]
    with pytest.raises(InputError, match=f"`merge_steps` keeps each open window .*; {name} shards that state"):
        ScheduledMerges(config).start(engine, args, 10, PmaExporter(model, tmp_path, config))
