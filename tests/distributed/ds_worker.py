"""DeepSpeed ZeRO worker: the engine on ZeRO stages 1, 2 and 3 (2 CPU processes, gloo).

The engine is attached to the torch optimizer before `deepspeed.initialize` (as `PmaTrainer`
does), then to the ZeRO wrapper (as `PmaCallback` does at train start). Each rank averages
its fp32 master partition; a cycle is exported through `PmaExporter` (all ranks gather, rank 0
writes); a DeepSpeed checkpoint is saved and loaded into a fresh engine.
"""

import dataclasses
import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param

from pmakit.online.deepspeed import attach_deepspeed
from pmakit.online.engine import AVG_KEY, PmaEngine, attach_engine
from pmakit.training.export import PmaExporter
from tests.distributed.reference import BEMA, CONFIG, STEPS, batch
from tests.helpers.models import tiny_llama
from tests.helpers.references import bema_reference


THETA0 = "pma_bema_theta0"


def zero_initialize(model, optimizer, stage: int):
    """`deepspeed.initialize` with ZeRO ``stage``, 4 sequences a rank and step: the engine and its ZeRO optimizer."""
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, zero_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, zero_optimizer


def run_stages(work) -> None:
    """``work(out / "zero<stage>", stage, rank)`` for each stage of ``argv[2]`` (``out`` is ``argv[1]``), on gloo."""
    out = Path(sys.argv[1])
    deepspeed.init_distributed(dist_backend="gloo")
    for stage in map(int, sys.argv[2].split(",")):
        work(out / f"zero{stage}", stage, dist.get_rank())
        dist.barrier()
    dist.destroy_process_group()


def build(stage: int, config=CONFIG):
    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pma = attach_engine(optimizer, config)
    engine, zero_optimizer = zero_initialize(model, optimizer, stage)
    assert attach_engine(zero_optimizer, config) is pma and pma.deepspeed
    return engine, zero_optimizer, pma


def train_step(engine, step: int, rank: int) -> None:
    ids = batch(step)[4 * rank : 4 * rank + 4]
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()


def check(out: Path, stage: int, rank: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    engine, zero_optimizer, pma = build(stage)
    pma.add_cycle_handler(PmaExporter(engine.module, out / "run", CONFIG, is_main_process=rank == 0))
    samples = []
    for step in range(1, STEPS + 1):
        train_step(engine, step, rank)
        if CONFIG.is_sample_step(step):  # the fp32 master weights PMA samples, gathered independently
            samples.append({n: safe_get_full_fp32_param(p).double() for n, p in engine.module.named_parameters()})
    if rank == 0:
        weights = CONFIG.rule.weights_for(len(samples))
        reference = {n: sum(w * s[n] for w, s in zip(weights, samples, strict=True)) for n in samples[0]}
        torch.save(reference, out / "reference.pt")
    facts = {"stage": stage, "counters": pma.counters, "type": type(zero_optimizer).__name__}
    averages = pma.averages()
    facts["partition_numel"] = sum(a.numel() for a in averages.values())
    facts["model_numel"] = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
    facts["flat_fp32"] = all(a.dtype == torch.float32 and a.dim() == 1 for a in averages.values())
    engine.save_checkpoint(str(out / "ds"), tag="step6")
    # write-back and PMA evaluation need the live weights, which ZeRO rebuilds from its partitions: refused.
    other = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    try:
        attach_deepspeed(PmaEngine(other, dataclasses.replace(CONFIG, write_back=True)), zero_optimizer)
        facts["refuses_write_back"] = False
    except ValueError as err:
        facts["refuses_write_back"] = "write_back" in str(err)

    engine2, _, pma2 = build(stage)
    engine2.load_checkpoint(str(out / "ds"), tag="step6")
    loaded = pma2.averages()
    facts["resume_ok"] = pma2.counters == pma.counters and len(loaded) == len(averages)
    for a1, a2 in zip(averages.values(), loaded.values(), strict=True):
        n = min(a1.numel(), a2.numel())  # DeepSpeed saves partitions without their alignment padding
        facts["resume_ok"] &= torch.equal(a1[:n], a2[:n]) and a2.dtype == torch.float32
    facts["state_ok"] = all(pma2.optimizer.state[flat][AVG_KEY] is a for flat, a in loaded.items())
    (out / f"facts_rank{rank}.json").write_text(json.dumps(facts))


def theta0(pma) -> list[torch.Tensor]:
    """BEMA's theta_0 of each fp32 partition, from the optimizer state beside the partition's average."""
    return [pma.optimizer.state[flat][THETA0] for flat in pma.averages()]


def check_bema(out: Path, stage: int, rank: int) -> None:
    """BEMA on ZeRO: theta_0 of each fp32 partition sits beside its average, is saved mid-cycle (step 4, samples
    at 2 and 4) in DeepSpeed's checkpoint and restored in fp32; the merge at step 6 is exported."""
    engine, _, pma = build(stage, BEMA)
    pma.add_cycle_handler(PmaExporter(engine.module, out / "bema", BEMA, is_main_process=rank == 0))
    samples, facts = [], {}
    for step in range(1, STEPS + 1):
        train_step(engine, step, rank)
        if BEMA.is_sample_step(step):
            samples.append({n: safe_get_full_fp32_param(p).double() for n, p in engine.module.named_parameters()})
        if step == 4:
            engine.save_checkpoint(str(out / "ds_bema"), tag="step4")
            saved, counters = [t.clone() for t in theta0(pma)], pma.counters
            facts["theta0_fp32_partition"] = all(t.dtype == torch.float32 and t.dim() == 1 for t in saved)
    if rank == 0:
        steps = [2, 4, 6]
        reference = {n: bema_reference([s[n] for s in samples], steps)[0] for n in samples[0]}
        torch.save(reference, out / "bema_reference.pt")
    engine2, _, pma2 = build(stage, BEMA)
    engine2.load_checkpoint(str(out / "ds_bema"), tag="step4")
    loaded = theta0(pma2)
    facts["resume_ok"] = pma2.counters == counters and len(loaded) == len(saved)
    for t1, t2 in zip(saved, loaded, strict=True):
        n = min(t1.numel(), t2.numel())  # DeepSpeed saves partitions without their alignment padding
        facts["resume_ok"] &= torch.equal(t1[:n], t2[:n]) and t2.dtype == torch.float32
    (out / f"bema_facts_rank{rank}.json").write_text(json.dumps(facts))


def check_all(out: Path, stage: int, rank: int) -> None:
    check(out, stage, rank)
    dist.barrier()
    check_bema(out, stage, rank)


if __name__ == "__main__":
    run_stages(check_all)
