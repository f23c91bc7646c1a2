"""`GatedLlama` (parameters first used after PMA samples) under DeepSpeed ZeRO-1/2, plain and with PMA.

Usage: torchrun ... late_grad_worker.py OUT STAGE     (CPU, gloo, DeepSpeed's CPU accelerator)
Trains 8 steps three times: a plain Trainer, a `PmaTrainer` (samples at 2, 4, 6 -> pma-6, then 8;
checkpoints at 3 and 6), and a `PmaTrainer` resumed from checkpoint-3. Rank 0 saves the gathered
live weights of each run and the fp64 live weights at the sample steps; every rank writes facts
about its own fp32 partition (the average restored bit for bit, no average alone as optimizer state).
"""

import os
import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from pmakit import PmaTrainer
from pmakit.online.distributed import unwrap_optimizer
from pmakit.online.engine import AVG_KEY
from tests.distributed.trainer_worker import backend_args, finish
from tests.helpers.gated import StepGate, gated_llama
from tests.helpers.models import TokenDataset
from tests.helpers.training import plain_args, pma_args


SAMPLES = (2, 4, 6)


def settings(stage: int) -> dict:
    common = backend_args(f"zero{stage}", on_cpu=True)
    return dict(common, max_steps=8, save_steps=3, pma_sample_store=False, data_seed=0, dataloader_num_workers=0)


class LiveAt(TrainerCallback):
    """fp64 copies of the plain run's trainable weights after the sample steps (ZeRO-1/2 keep parameters whole)."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in SAMPLES:
            self.weights[state.global_step] = {
                n: p.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad
            }


def live(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in trainer.model.named_parameters()}


def partitions(trainer) -> list[torch.Tensor]:
    return [a.detach().clone() for a in trainer.pma_engine.averages().values()]


def main() -> None:
    out, stage = Path(sys.argv[1]), int(sys.argv[2])
    rank = int(os.environ.get("RANK", "0"))
    kwargs = settings(stage)
    plain_kwargs = {k: v for k, v in kwargs.items() if not k.startswith("pma_")}
    sampled = LiveAt()
    plain = Trainer(
        gated_llama(), plain_args(out / "plain", **plain_kwargs), train_dataset=TokenDataset(),
        callbacks=[StepGate(), sampled],
    )  # fmt: skip
    plain.train()
    first = PmaTrainer(
        model=gated_llama(), args=pma_args(out / "pma", **kwargs), train_dataset=TokenDataset(), callbacks=[StepGate()]
    )
    first.train()
    state = unwrap_optimizer(first.optimizer).state
    resumed = PmaTrainer(
        model=gated_llama(), args=pma_args(out / "resumed", **kwargs), train_dataset=TokenDataset(),
        callbacks=[StepGate()],
    )  # fmt: skip
    resumed.train(resume_from_checkpoint=str(out / "pma" / "checkpoint-3"))
    first_avg, resumed_avg = partitions(first), partitions(resumed)
    facts = {
        "deepspeed": first.pma_engine.deepspeed,
        "counters_equal": first.pma_engine.counters == resumed.pma_engine.counters,
        "resume_average_exact": len(first_avg) == len(resumed_avg)
        and all(torch.equal(a, b) for a, b in zip(first_avg, resumed_avg, strict=True)),
        "average_alone": any(isinstance(e, dict) and set(e) == {AVG_KEY} for e in state.values()),
        "averages_in_state": sum(1 for e in state.values() if isinstance(e, dict) and AVG_KEY in e),
    }
    if rank == 0:
        torch.save({"plain": live(plain), "pma": live(first), "resumed": live(resumed)}, out / "live.pt")
        torch.save(sampled.weights, out / "samples.pt")
    finish(out, rank, facts)


if __name__ == "__main__":
    main()
