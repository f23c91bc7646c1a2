"""Loss-spike recovery: detection, restore from pre-spike samples only (fp64 reference), optimizer reset,
re-warm, give-up, per-step loss in both capture modes, settings."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from pmakit import PmaArguments, PmaTrainer
from pmakit.training.spike import SpikeConfig, SpikeRecoveryCallback, SpikeRecoveryError
from tests.helpers.models import TokenDataset, tiny_llama
from tests.helpers.training import SnapshotCallback, plain_args, pma_args


class Corrupt(TrainerCallback):
    """Before the forward of the given optimizer steps: NaN into one weight, or the embeddings scaled up."""

    def __init__(self, steps, kind) -> None:
        self.steps, self.kind = set(steps), kind

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 in self.steps:
            with torch.no_grad():
                emb = model.get_input_embeddings().weight
                if self.kind == "nan":
                    emb[3, 0] = float("nan")
                else:
                    emb.mul_(60.0)


class LrRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.lrs = {}

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs[state.global_step + 1] = optimizer.param_groups[0]["lr"]


def _spike_args(tmp_path, **overrides):
    settings = dict(
        learning_rate=1e-4,
        max_steps=16,
        pma_interleave_step=1000,
        pma_save=False,
        pma_spike_recovery=True,
        pma_spike_interval=2,
        pma_spike_num_samples=3,
        pma_spike_window=10,
        pma_spike_min_history=5,
        pma_spike_patience=2,
        pma_spike_rewarm_steps=3,
    )
    settings.update(overrides)
    return pma_args(tmp_path, **settings)


def _mean_of(snapshots, steps):
    return {n: sum(snapshots[s][n] for s in steps) / len(steps) for n in snapshots[steps[0]]}


@pytest.mark.filterwarnings("ignore:PMA")
def test_ratio_spike_restores_sma_of_pre_spike_samples_resets_moments_and_rewarms(tmp_path):
    snap, lrs = SnapshotCallback(), LrRecorder()
    trainer = PmaTrainer(
        model=tiny_llama(),
        args=_spike_args(tmp_path),
        train_dataset=TokenDataset(),
        callbacks=[Corrupt([11], "scale"), snap],
    )
    trainer.add_callback(lrs)  # after the spike callback: sees the learning rate it set
    trainer.train()
    events = trainer.spike_callback.events
    assert len(events) == 1
    event = events[0]
    # Corrupted before the forward of step 11: steps 11 and 12 are suspect, the spike began at 11 and is confirmed
    # at 12. Samples every 2 steps, ring of 3: the weights of step 10 are measured by the loss of step 11, which was
    # not normal, so they never entered the ring; it holds steps 4, 6, 8.
    assert (event["step"], event["spike_began"], event["merged_steps"]) == (12, 11, [4, 6, 8])
    assert "median" in event["reason"] and event in trainer.state.log_history
    restored = _mean_of(snap.snapshots, [4, 6, 8])
    for name, ref in restored.items():  # step 12's update was dropped: the live weights are exactly the merge
        torch.testing.assert_close(snap.snapshots[12][name], ref, rtol=1e-6, atol=1e-7)
    losses = dict(trainer.spike_callback.losses)
    assert losses[11] > 2 * losses[10] and losses[13] < 1.2 * losses[10]
    # Moments reset at step 12: Adam's step count restarted there (4 updates after it, steps 13..16).
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    p = next(trainer.model.parameters())
    assert float(optimizer.state[p]["step"]) == 4
    # Re-warm over 3 steps: 1/4, 2/4, 3/4 of the scheduled LR, then the schedule again.
    assert [lrs.lrs[s] / 1e-4 for s in (11, 13, 14, 15, 16)] == pytest.approx([1, 0.25, 0.5, 0.75, 1])


@pytest.mark.filterwarnings("ignore:PMA")
def test_nan_with_plain_trainer_forward_hook_and_give_up(tmp_path):
    args = plain_args(tmp_path, learning_rate=1e-4, max_steps=16)
    snap = SnapshotCallback()
    spike = SpikeRecoveryCallback(interval=2, num_samples=2, rewarm_steps=0, reset_optimizer=False, max_recoveries=1)
    trainer = Trainer(
        model=tiny_llama(), args=args, train_dataset=TokenDataset(), callbacks=[Corrupt([9], "nan"), snap, spike]
    )
    trainer.train()
    (event,) = spike.events
    assert (event["step"], event["spike_began"], event["merged_steps"]) == (9, 9, [4, 6])
    assert event["reason"] == "non-finite loss" and event["optimizer_reset"] is False
    for name, ref in _mean_of(snap.snapshots, [4, 6]).items():
        torch.testing.assert_close(snap.snapshots[9][name], ref, rtol=1e-6, atol=1e-7)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert math.isnan(dict(spike.losses)[9]) and spike._hook is None  # the forward hook is removed at the end

    # A second spike after the one allowed recovery stops training with a clear message.
    spike = SpikeRecoveryCallback(interval=2, num_samples=2, max_recoveries=1)
    trainer = Trainer(
        model=tiny_llama(), args=args, train_dataset=TokenDataset(), callbacks=[Corrupt([9, 13], "nan"), spike]
    )
    with pytest.raises(SpikeRecoveryError, match=r"step 13 .*after 1 recoveries.*max_recoveries"):
        trainer.train()


@pytest.mark.filterwarnings("ignore:PMA")
def test_no_sample_before_the_spike_is_an_error(tmp_path):
    trainer = PmaTrainer(
        model=tiny_llama(),
        args=_spike_args(tmp_path, pma_spike_interval=8),
        train_dataset=TokenDataset(),
        callbacks=[Corrupt([3], "nan")],
    )
    with pytest.raises(SpikeRecoveryError, match=r"no recovery sample was taken before it.*`interval`=8"):
        trainer.train()


@pytest.mark.filterwarnings("ignore:PMA")
@pytest.mark.parametrize("with_trainer", [True, False])
def test_every_step_loss_is_seen_with_gradient_accumulation(tmp_path, with_trainer):
    args = _spike_args(
        tmp_path,
        max_steps=4,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
        logging_steps=1,
        pma_spike_recovery=with_trainer,
    )
    trainer = PmaTrainer(model=tiny_llama(), args=args, train_dataset=TokenDataset())
    spike = trainer.spike_callback
    if not with_trainer:  # a bare callback reads the loss from the model outputs instead
        spike = SpikeRecoveryCallback(SpikeConfig(interval=2))
        trainer.add_callback(spike)
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert [s for s, _ in spike.losses] == [1, 2, 3, 4]
    assert [loss for _, loss in spike.losses] == pytest.approx(logged, rel=1e-4)
    assert "training_step" not in vars(trainer)  # the wrapper is removed at the end of training


def test_settings_are_validated_and_parsed(tmp_path):
    with pytest.raises(ValueError, match="`pma_spike_factor` must be a finite number greater than 1"):
        PmaArguments(output_dir=str(tmp_path), pma_spike_factor=1.0)
    with pytest.raises(ValueError, match="`pma_spike_fused_algo` must be one of sma, wma, ema"):
        PmaArguments(output_dir=str(tmp_path), pma_spike_fused_algo="median")
    with pytest.raises(ValueError, match=r"`pma_spike_min_history` \(60\) cannot exceed `pma_spike_window` \(50\)"):
        PmaArguments(output_dir=str(tmp_path), pma_spike_min_history=60)
    with pytest.raises(ValueError, match="`lr_scale` must lie in"):
        SpikeConfig(lr_scale=0)
    (args,) = HfArgumentParser(PmaArguments).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--pma_spike_recovery",
            "--pma_spike_num_samples",
            "5",
            "--pma_spike_reset_optimizer",
            "false",
        ]
    )
    assert args.pma_spike_recovery and args.pma_spike_config == SpikeConfig(num_samples=5, reset_optimizer=False)
    assert SpikeConfig().rule.weights_for(3) == pytest.approx([1 / 3] * 3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.filterwarnings("ignore:PMA")
@pytest.mark.parametrize("offload", ["cpu", "none"])
def test_cuda_bf16_recovery_restores_the_pre_spike_merge(tmp_path, offload):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        report_to="none",
        learning_rate=1e-4,
        bf16=True,
        lr_scheduler_type="constant",
        per_device_train_batch_size=4,
        max_steps=12,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        logging_steps=1000,
    )
    snap = SnapshotCallback()
    spike = SpikeRecoveryCallback(interval=2, num_samples=2, offload=offload)
    trainer = Trainer(
        model=tiny_llama(dtype=torch.bfloat16),
        args=args,
        train_dataset=TokenDataset(),
        callbacks=[Corrupt([9], "nan"), snap, spike],
    )
    trainer.train()
    assert next(trainer.model.parameters()).is_cuda
    assert spike._ring[0].tensors[0].device.type == ("cpu" if offload == "cpu" else "cuda")
    (event,) = spike.events
    assert event["merged_steps"] == [4, 6]
    for name, ref in _mean_of(snap.snapshots, [4, 6]).items():  # fp32 merge of bf16 samples, cast once to bf16
        assert torch.equal(snap.snapshots[9][name], ref.to(torch.float32).to(torch.bfloat16).double()), name


class _LogitsLossTrainer(Trainer):
    """Computes the loss itself: the model's output carries no `loss` for a forward hook to read."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        logits = model(**inputs).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


@pytest.mark.filterwarnings("ignore:PMA")
def test_without_a_loss_non_finite_gradients_still_trigger_recovery(tmp_path, caplog):
    args = plain_args(tmp_path, learning_rate=1e-4, max_steps=10)
    snap = SnapshotCallback()
    spike = SpikeRecoveryCallback(interval=2, num_samples=2)
    trainer = _LogitsLossTrainer(
        model=tiny_llama(), args=args, train_dataset=TokenDataset(), callbacks=[Corrupt([7], "nan"), snap, spike]
    )
    trainer.train()
    (event,) = spike.events
    # Weights of step 6 were corrupted before step 7's forward, so they were never verified: samples 2 and 4.
    assert event["reason"] == "non-finite gradient norm" and event["merged_steps"] == [2, 4]
    assert spike.losses == type(spike.losses)() and "sees no training loss" in caplog.text
    for name, ref in _mean_of(snap.snapshots, [2, 4]).items():
        torch.testing.assert_close(snap.snapshots[7][name], ref, rtol=1e-6, atol=1e-7)
