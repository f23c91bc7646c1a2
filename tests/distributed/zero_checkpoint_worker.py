"""DeepSpeed worker: writes ZeRO checkpoints the way the Trainer does (2 CPU processes, gloo).

For each stage, trains a tiny Llama with the PMA engine on the ZeRO optimizer and saves
`zero{stage}/run/checkpoint-N/` at every step: `global_stepN/` (each rank's `*_optim_states.pt`
and the `*_model_states.pt`), `latest` and `config.json`. Rank 0 saves the references: the fp32
master weights gathered by DeepSpeed itself (`ref/weights-N.pt`) and the fp64 closed form of
the PMA average over the samples so far (`ref/pma-N.pt`).
"""

from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_fp32_param

from pmakit.online.config import PmaConfig
from pmakit.online.engine import attach_engine
from tests.distributed.ds_worker import run_stages, zero_initialize
from tests.distributed.reference import batch
from tests.helpers.models import tiny_llama


STEPS = 4
CONFIG = PmaConfig(fused_algo="wma", fused_num=10, interleave_step=1)  # one long cycle: an average at every save


def build(stage: int):
    model = tiny_llama()
    # Two parameter groups, as the Trainer makes them (weight decay on matrices only): two flat
    # partitions per rank under ZeRO-1/2, sub-groups under ZeRO-3.
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    attach_engine(optimizer, CONFIG)
    engine, zero_optimizer = zero_initialize(model, optimizer, stage)
    attach_engine(zero_optimizer, CONFIG)
    return engine


def run(out: Path, stage: int, rank: int) -> None:
    (out / "ref").mkdir(parents=True, exist_ok=True)
    engine = build(stage)
    samples = []
    for step in range(1, STEPS + 1):
        ids = batch(step)[4 * rank : 4 * rank + 4]
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        masters = {n: safe_get_full_fp32_param(p).double() for n, p in engine.module.named_parameters()}
        samples.append(masters)
        folder = out / "run" / f"checkpoint-{step}"
        engine.save_checkpoint(str(folder), tag=f"global_step{step}")
        if rank == 0:
            engine.module.config.to_json_file(folder / "config.json")
            torch.save({n: m.float() for n, m in masters.items()}, out / "ref" / f"weights-{step}.pt")
            weights = CONFIG.rule.weights_for(len(samples))
            average = {n: sum(w * s[n] for w, s in zip(weights, samples, strict=True)) for n in masters}
            torch.save(average, out / "ref" / f"pma-{step}.pt")


if __name__ == "__main__":
    run_stages(run)
