"""Helpers for tests that run a real `Trainer` on a tiny model."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments


def plain_args(output_dir, **overrides):
    """`TrainingArguments` for a short CPU run without PMA settings (for `PmaCallback` and the optimizer route)."""
    settings = dict(
        output_dir=str(output_dir), use_cpu=True, report_to="none", per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="constant", save_strategy="no", logging_steps=1000, disable_tqdm=True, seed=0, max_steps=6,
    )  # fmt: skip
    settings.update(overrides)
    return TrainingArguments(**settings)


def pma_args(output_dir, **overrides):
    from pmakit import PmaArguments

    settings = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        save_strategy="no",
        logging_steps=1000,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        max_steps=12,
        pma_interleave_step=2,
        pma_fused_num=3,
    )
    settings.update(overrides)
    return PmaArguments(**settings)


class SnapshotCallback(TrainerCallback):
    """Records the trainable weights (fp64) after every optimizer step: the independent reference."""

    def __init__(self) -> None:
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.snapshots[state.global_step] = {
            name: p.detach().to(torch.float64).clone() for name, p in model.named_parameters() if p.requires_grad
        }


def weighted(snapshots: dict, steps: list[int], weights: list[float]) -> dict[str, torch.Tensor]:
    names = snapshots[steps[0]].keys()
    return {n: sum(w * snapshots[s][n] for w, s in zip(weights, steps, strict=True)) for n in names}


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


class StopAt(TrainerCallback):
    """Stop training at ``step`` (a checkpoint saved there is a mid-run resume point)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def trainer_for(output_dir, callbacks=(), model=None, **overrides):
    """A `PmaTrainer` on ``model`` (the tiny Llama) with `pma_args` (``overrides`` on top) and an evaluation set."""
    from pmakit import PmaTrainer

    from .models import TokenDataset, tiny_llama

    return PmaTrainer(
        model=model if model is not None else tiny_llama(),
        args=pma_args(output_dir, **overrides),
        train_dataset=TokenDataset(),
        eval_dataset=TokenDataset(16, seed=9),
        callbacks=list(callbacks),
    )


def pma_folders(output_dir: Path) -> list[str]:
    return sorted((p.name for p in output_dir.iterdir() if re.fullmatch(r"pma-\d+", p.name)), key=lambda n: int(n[4:]))


def card_recipe(folder: Path) -> dict:
    text = (folder / "README.md").read_text()
    return yaml.safe_load(text.split("```yaml", 1)[1].split("```", 1)[0])


def assert_folder_is(folder: Path, snapshots: dict, steps: list[int], weights: list[float]) -> None:
    saved = load_folder(folder)
    for name, ref in weighted(snapshots, steps, weights).items():
        torch.testing.assert_close(saved[name].double(), ref, rtol=2e-6, atol=2e-6)
