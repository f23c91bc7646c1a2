"""Parameters that get their first gradient after a PMA sample, through real Trainer runs (issue 17, item 4).

Each PMA route (`PmaTrainer` with AdamW and with Adafactor, `PmaAdamW` through ``optimizer_cls_and_kwargs``,
`PmaCallback` on a plain Trainer) trains `GatedLlama` (a head first used at step 5, a bias used at steps
3 and 6, a frozen bias) for 8 steps with samples at 2, 4, 6 (cycle ``pma-6``) and 8, checkpoints at 3 and 6:

- write-back off, the live weights equal a plain Trainer's bit for bit;
- ``pma-6`` is the fp64 mean of the live weights at steps 2, 4, 6 (a parameter not trained yet
  contributes its live value, like every other weight);
- resumed from ``checkpoint-3`` (between samples, before the head's first gradient) the run ends with
  the same live weights, ``pma-6`` and running average, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer

from pmakit import PmaAdamW, PmaCallback, PmaConfig, PmaTrainer
from pmakit.online.engine import engine_of
from tests.helpers.gated import CONDITIONAL, StepGate, gated_llama
from tests.helpers.models import TokenDataset
from tests.helpers.training import SnapshotCallback, load_folder, plain_args, pma_args


CONFIG = PmaConfig(interleave_step=2, fused_num=3)
STEPS = 8
TRAINING = dict(max_steps=STEPS, save_strategy="steps", save_steps=3, data_seed=0, dataloader_num_workers=0)
ADAMW = {"lr": 1e-2, "weight_decay": 0.0}


def build(route: str, output_dir, pma: bool, callbacks) -> Trainer:
    """A Trainer for ``route``; without ``pma`` the same training with no PMA at all (the reference)."""
    model, data = gated_llama(), TokenDataset()
    callbacks = [StepGate(), *callbacks]
    optim = "adafactor" if route == "trainer_adafactor" else "adamw_torch"
    if route.startswith("trainer"):
        if pma:
            args = pma_args(output_dir, optim=optim, **TRAINING)  # samples every 2 steps, cycles of 3
            return PmaTrainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
        return Trainer(model, plain_args(output_dir, optim=optim, **TRAINING), train_dataset=data, callbacks=callbacks)
    args = plain_args(output_dir, **TRAINING)
    if route == "pma_adamw":
        kwargs = dict(ADAMW, pma=CONFIG, pma_model=model, output_dir=output_dir) if pma else ADAMW
        optimizers = (PmaAdamW if pma else torch.optim.AdamW, kwargs)
        return Trainer(model, args, train_dataset=data, callbacks=callbacks, optimizer_cls_and_kwargs=optimizers)
    callbacks += [PmaCallback(CONFIG)] if pma else []
    return Trainer(model, args, train_dataset=data, callbacks=callbacks)


def run(route: str, output_dir, pma: bool = True, resume: str | None = None) -> tuple[Trainer, SnapshotCallback]:
    snapshots = SnapshotCallback()
    trainer = build(route, output_dir, pma, [snapshots])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, snapshots


def live(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in trainer.model.named_parameters()}


def averages(trainer) -> dict[str, torch.Tensor]:
    engine = engine_of(trainer.optimizer)
    by_param = engine.averages()
    return {name: by_param[p] for name, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("route", ["trainer_adamw", "trainer_adafactor", "pma_adamw", "callback"])
def test_late_first_gradients_shadow_closed_form_and_resume(tmp_path, route):
    plain, snaps = run(route, tmp_path / "plain", pma=False)
    first, _ = run(route, tmp_path / "pma")
    for name, p in live(first).items():
        assert torch.equal(p, live(plain)[name]), f"{route}: PMA changed the training of {name}"
    snapshot = snaps.snapshots
    late = [snapshot[t]["late_head.weight"] for t in (2, 4, 6)]
    assert torch.equal(late[0], late[1]) and not torch.equal(late[1], late[2]), "first gradient between samples"
    merged = load_folder(tmp_path / "pma" / "pma-6")
    for name in snapshot[2]:
        reference = sum(snapshot[t][name] for t in (2, 4, 6)) / 3
        torch.testing.assert_close(merged[name].double(), reference, rtol=2e-6, atol=2e-6, msg=f"{route} {name}")
    assert torch.equal(merged["frozen_bias"], live(plain)["frozen_bias"])

    resumed, _ = run(route, tmp_path / "resumed", resume=str(tmp_path / "pma" / "checkpoint-3"))
    for name, p in live(resumed).items():
        assert torch.equal(p, live(first)[name]), f"{route}: the resumed run trained {name} differently"
    again = load_folder(tmp_path / "resumed" / "pma-6")
    assert again.keys() == merged.keys() and all(torch.equal(again[n], merged[n]) for n in merged)
    expected = averages(first)
    assert set(CONDITIONAL) <= set(expected)
    for name, average in averages(resumed).items():  # the running average of the cycle after pma-6
        assert average.dtype == torch.float32 and torch.equal(average, expected[name]), f"{route} {name}"
