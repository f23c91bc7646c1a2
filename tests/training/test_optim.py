"""PMA through the optimizer: `create_pma_optimizer` and `PmaAdamW` with a plain `Trainer`."""

import pytest
import torch
from transformers import Trainer

from pmakit import PmaAdamW, PmaConfig, create_pma_optimizer
from pmakit.online.engine import engine_of
from tests.helpers.models import TokenDataset, tiny_llama
from tests.helpers.training import SnapshotCallback, load_folder, plain_args, weighted


def test_factory_with_plain_trainer(tmp_path):
    model = tiny_llama()
    snap = SnapshotCallback()
    optimizers = create_pma_optimizer(
        model, PmaConfig(interleave_step=2, fused_num=3, fused_algo="ema", ema_alpha=0.4), output_dir=tmp_path, lr=1e-2
    )
    trainer = Trainer(
        model=model, args=plain_args(tmp_path), train_dataset=TokenDataset(), optimizers=optimizers, callbacks=[snap]
    )
    trainer.train()
    saved = load_folder(tmp_path / "pma-6")
    weights = [0.6**2, 0.4 * 0.6, 0.4]
    for name, ref in weighted(snap.snapshots, [2, 4, 6], weights).items():
        torch.testing.assert_close(saved[name].double(), ref, rtol=2e-6, atol=2e-6)
    assert (tmp_path / "pma" / "config.json").is_file()
    assert optimizers[0].param_groups[0]["pma"]["cycles"] == 1


def test_factory_weight_decay_groups_and_scheduler():
    model = tiny_llama()
    optimizer, scheduler = create_pma_optimizer(
        model, {"interleave_step": 5}, lr=3e-3, weight_decay=0.1, lr_scheduler_type="linear", num_training_steps=10
    )
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.ndim >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])
    assert engine_of(optimizer).config.interleave_step == 5
    assert scheduler.get_last_lr()[0] == pytest.approx(3e-3)


def test_factory_needs_model_to_export(tmp_path):
    with pytest.raises(ValueError, match="needs the model"):
        PmaAdamW(tiny_llama().parameters(), lr=1e-3, output_dir=tmp_path)
    with pytest.raises(TypeError, match="PmaConfig or a dict"):
        PmaAdamW(tiny_llama().parameters(), pma=3)


def test_pma_adamw_through_optimizer_cls_and_kwargs(tmp_path):
    model = tiny_llama()
    snap = SnapshotCallback()
    trainer = Trainer(
        model=model,
        args=plain_args(tmp_path),
        train_dataset=TokenDataset(),
        callbacks=[snap],
        optimizer_cls_and_kwargs=(
            PmaAdamW,
            {
                "lr": 1e-2,
                "pma": {"interleave_step": 2, "fused_num": 3},
                "pma_model": model,
                "output_dir": str(tmp_path),
            },
        ),
    )
    trainer.train()
    saved = load_folder(tmp_path / "pma-6")
    for name, ref in weighted(snap.snapshots, [2, 4, 6], [1 / 3] * 3).items():
        torch.testing.assert_close(saved[name].double(), ref, rtol=2e-6, atol=2e-6)
