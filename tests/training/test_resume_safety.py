"""Resume edge cases and output safety with real `PmaTrainer` runs (issue 13, items 1-6).

Every reference is independent of the engine: fp64 snapshots of the live weights after each
optimizer step, combined with the closed-form weights of the rule.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback

from pmakit import PmaConfig, create_pma_optimizer
from tests.helpers.models import TokenDataset, tiny_llama
from tests.helpers.training import (
    SnapshotCallback,
    StopAt,
    assert_folder_is,
    card_recipe,
    plain_args,
    pma_folders,
    trainer_for,
)


# ---------------------------------------------------------------- item 1: settings changed on resume
RESUME_CASES = {
    # first run's settings, resumed settings, the cycles the resumed run must write (step: samples, weights)
    "smaller_fused_num": (
        dict(pma_fused_num=4),
        dict(pma_fused_num=2),
        "fused_num=4 -> 2",
        {10: ([8, 10], [0.5, 0.5]), 14: ([12, 14], [0.5, 0.5])},
    ),
    "larger_fused_num": (
        dict(pma_fused_num=2),
        dict(pma_fused_num=3),
        "fused_num=2 -> 3",
        {4: None, 12: ([8, 10, 12], [1 / 3, 1 / 3, 1 / 3])},
    ),
    "weights_rule": (
        dict(pma_fused_num=4),
        dict(pma_fused_num=2, pma_fused_algo="weights", pma_fused_weights=[1.0, 3.0]),
        "fused_algo=sma -> weights",
        {10: ([8, 10], [0.25, 0.75]), 14: ([12, 14], [0.25, 0.75])},
    ),
    "interleave_step": (
        dict(pma_fused_num=4),
        dict(pma_fused_num=4, pma_interleave_step=1),
        "interleave_step=2 -> 1",
        {10: ([7, 8, 9, 10], [0.25] * 4), 14: ([11, 12, 13, 14], [0.25] * 4)},
    ),
}


@pytest.mark.parametrize("case", list(RESUME_CASES), ids=list(RESUME_CASES))
def test_resume_with_changed_settings_drops_the_old_cycle_and_runs_new_ones(tmp_path, case):
    first, resumed_settings, change, cycles = RESUME_CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer_for(tmp_path, [StopAt(6)], save_strategy="steps", save_steps=6, max_steps=14, **first).train()
    snap = SnapshotCallback()
    resumed = trainer_for(tmp_path, [snap], max_steps=14, **resumed_settings)
    with pytest.warns(UserWarning, match=re.escape(change)) as caught:
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    dropped = [w for w in caught if "unfinished cycle" in str(w.message)]
    in_progress = "6" if case == "larger_fused_num" else "2, 4, 6"  # the samples of the cycle at step 6
    assert len(dropped) == 1 and f"at optimizer steps {in_progress} are dropped" in str(dropped[0].message)
    assert pma_folders(tmp_path) == [f"pma-{step}" for step in sorted(cycles)]
    for step, expected in cycles.items():
        if expected is None:  # written by the first run, before the checkpoint: kept
            continue
        steps, weights = expected
        assert_folder_is(tmp_path / f"pma-{step}", snap.snapshots, steps, weights)
        assert card_recipe(tmp_path / f"pma-{step}")["sample_steps"] == steps
    last_step = max(cycles)
    assert_folder_is(tmp_path / "pma", snap.snapshots, *cycles[last_step])
    assert resumed.pma_engine.counters["merged_steps"] == cycles[last_step][0]


def test_resume_between_cycles_with_new_settings_is_silent(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer_for(tmp_path, [StopAt(8)], save_strategy="steps", save_steps=8, max_steps=14, pma_fused_num=4).train()
    snap = SnapshotCallback()
    resumed = trainer_for(tmp_path, [snap], max_steps=14, pma_fused_num=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))
    assert pma_folders(tmp_path) == ["pma-8", "pma-14"]
    assert_folder_is(tmp_path / "pma-14", snap.snapshots, [10, 12, 14], [1 / 3] * 3)


# ---------------------------------------------------------------- item 2: resume a run that had no PMA
def test_resume_from_checkpoint_without_pma_follows_the_global_step(tmp_path):
    plain = Trainer(
        model=tiny_llama(),
        args=plain_args(tmp_path, max_steps=14, save_strategy="steps", save_steps=6, data_seed=0),
        train_dataset=TokenDataset(),
        callbacks=[StopAt(6)],
    )
    plain.train()
    snap = SnapshotCallback()
    resumed = trainer_for(tmp_path, [snap], max_steps=14, pma_interleave_step=4, pma_fused_num=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    assert pma_folders(tmp_path) == ["pma-12"]
    assert card_recipe(tmp_path / "pma-12")["sample_steps"] == [8, 12]
    assert card_recipe(tmp_path / "pma-12")["merged_at_step"] == 12
    assert_folder_is(tmp_path / "pma-12", snap.snapshots, [8, 12], [0.5, 0.5])
    assert resumed.pma_engine.step == 14


# ---------------------------------------------------------------- item 3: PMA eval with EarlyStoppingCallback
class Evaluations(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.seen.append((state.global_step, sorted(metrics)))


def test_early_stopping_on_pma_loss_sees_each_evaluation_once(tmp_path):
    seen = Evaluations()
    # lr 0: eval_pma_loss never improves, so patience 3 stops at the 4th evaluation (step 8)
    trainer = trainer_for(
        tmp_path, [EarlyStoppingCallback(early_stopping_patience=3), seen], max_steps=20, learning_rate=0.0,
        pma_eval=True, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
        load_best_model_at_end=True, metric_for_best_model="eval_pma_loss", greater_is_better=False,
        per_device_eval_batch_size=8,
    )  # fmt: skip
    trainer.train()
    assert [step for step, _ in seen.seen] == [2, 4, 6, 8]
    assert all("eval_loss" in keys and "eval_pma_loss" in keys for _, keys in seen.seen)
    assert trainer.state.global_step == 8
    assert [h["step"] for h in trainer.state.log_history if "eval_pma_loss" in h] == [2, 4, 6, 8]


# ---------------------------------------------------------------- item 4: a writer killed mid-export
KILLED_EXPORT = """
import sys, time
from pathlib import Path
from pmakit.io.folders import atomic_directory
with atomic_directory(Path(sys.argv[1]) / "pma-6", overwrite=True) as tmp:
    (tmp / "model.safetensors").write_bytes(b"half a model" * 1000)
    print(tmp, flush=True)
    time.sleep(120)
"""


def test_training_start_sweeps_temporaries_of_a_killed_export(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_EXPORT, str(tmp_path)], stdout=subprocess.PIPE, env=env, text=True
    )
    leftover = Path(child.stdout.readline().strip())
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    time.sleep(0.6)
    assert leftover.is_dir() and leftover.name.startswith("_pma-6.")
    keep = [tmp_path / "_notes", tmp_path / "_checkpoint-6.abcdefgh.tmp"]
    for folder in keep:
        folder.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer_for(tmp_path, max_steps=2).train()  # writes only `pma`, never `pma-6`
    assert not leftover.exists()
    assert all(folder.is_dir() for folder in keep)
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".old")) and p not in keep]


# ---------------------------------------------------------------- item 5: folder permissions
@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_pma_folders_get_the_mode_of_trainer_checkpoints(tmp_path, umask):
    previous = os.umask(umask)
    try:
        trainer_for(tmp_path, max_steps=6, save_strategy="steps", save_steps=6).train()
    finally:
        os.umask(previous)
    checkpoint_mode = stat.S_IMODE((tmp_path / "checkpoint-6").stat().st_mode)
    assert checkpoint_mode == 0o777 & ~umask
    for name in ("pma-6", "pma"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == checkpoint_mode, name


# ---------------------------------------------------------------- item 6: quiet exports, one warning
def test_exports_print_no_progress_bars_when_tqdm_is_disabled(tmp_path, capfd):
    trainer_for(tmp_path, max_steps=6).train()
    assert (tmp_path / "pma-6").is_dir()
    assert "Writing model shards" not in capfd.readouterr().err


def test_horizon_warning_is_given_once(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer_for(tmp_path, max_steps=4, pma_fused_num=5).train()
    assert len([w for w in caught if "sample(s) fit in" in str(w.message)]) == 1


def test_factory_takes_optimizer_and_schedule_from_trainer_arguments(tmp_path):
    args = plain_args(
        tmp_path, learning_rate=3e-3, lr_scheduler_type="linear", warmup_steps=2, weight_decay=0.1, max_steps=6,
        adam_beta2=0.95, adam_epsilon=1e-6,
    )  # fmt: skip
    model = tiny_llama()
    optimizer, scheduler = create_pma_optimizer(model, PmaConfig(interleave_step=2, fused_num=3), args=args)
    reference = Trainer(model=tiny_llama(), args=args)  # the Trainer's own optimizer and schedule
    reference.create_optimizer_and_scheduler(num_training_steps=6)
    for key in ("lr", "weight_decay", "betas", "eps"):
        assert optimizer.param_groups[0][key] == reference.optimizer.param_groups[0][key], key
    rates, reference_rates = [], []
    pairs = ((optimizer, scheduler, rates), (reference.optimizer, reference.lr_scheduler, reference_rates))
    for opt, sched, out in pairs:
        for group in opt.param_groups:
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        for _ in range(6):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
    assert rates == reference_rates and rates[:3] == [0.0, 1.5e-3, 3e-3]
    optimizers = create_pma_optimizer(model, PmaConfig(interleave_step=2, fused_num=3), args=args)
    Trainer(model=model, args=args, train_dataset=TokenDataset(), optimizers=optimizers).train()
    assert (tmp_path / "pma-6" / "config.json").is_file()  # output_dir from the arguments


def test_optimizer_route_resumed_without_pma_follows_the_optimizer_step(tmp_path):
    args = plain_args(tmp_path, max_steps=14, save_strategy="steps", save_steps=6, data_seed=0)
    Trainer(model=tiny_llama(), args=args, train_dataset=TokenDataset(), callbacks=[StopAt(6)]).train()
    model, snap = tiny_llama(), SnapshotCallback()
    optimizers = create_pma_optimizer(model, PmaConfig(interleave_step=4, fused_num=2), args=args)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(), optimizers=optimizers, callbacks=[snap])
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    assert pma_folders(tmp_path) == ["pma-12"]
    assert card_recipe(tmp_path / "pma-12")["sample_steps"] == [8, 12]
    assert_folder_is(tmp_path / "pma-12", snap.snapshots, [8, 12], [0.5, 0.5])
