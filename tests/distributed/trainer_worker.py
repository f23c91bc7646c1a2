"""`PmaTrainer` under a sharding backend (FSDP2 or DeepSpeed ZeRO), with a resume.

Usage: torchrun ... trainer_worker.py OUT MODE [cpu]   MODE: fsdp2 | zero1 | zero2 | zero3
Trains 6 steps (samples at 2, 4, 6; checkpoints at 3 and 6), resumes a second run from
checkpoint-3, and writes per-rank facts for the test: the layout of the average, that it is
restored exactly, and the exported folder.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pmakit import PmaTrainer
from tests.helpers.models import TokenDataset, tiny_llama
from tests.helpers.training import pma_args


def finish(out: Path, rank: int, facts: dict) -> None:
    """Write this rank's facts for the test, then leave the process group (where the Trainer made one)."""
    (out / f"facts_rank{rank}.json").write_text(json.dumps(facts))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def backend_args(mode: str, on_cpu: bool) -> dict:
    common = dict(
        use_cpu=on_cpu, bf16=not on_cpu, max_steps=6, save_strategy="steps", save_steps=3, pma_sample_store=True
    )
    if mode == "fsdp2":
        return dict(
            common,
            fsdp="full_shard auto_wrap",
            fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
        )
    stage = int(mode[-1])
    config = {
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_allow_untested_optimizer": True,
    }
    return dict(common, deepspeed=config)


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    on_cpu = len(sys.argv) > 3 and sys.argv[3] == "cpu"
    settings = backend_args(mode, on_cpu)
    first = PmaTrainer(model=tiny_llama(), args=pma_args(out / "run", **settings), train_dataset=TokenDataset(96))
    first.train()
    engine = first.pma_engine
    rank = int(os.environ.get("RANK", "0"))
    averages = engine.averages()
    facts = {
        "mode": mode,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "counters": engine.counters,
        "average_types": sorted({type(a).__name__ for a in averages.values()}),
        "average_dtypes": sorted({str(a.dtype) for a in averages.values()}),
        "average_numel": sum(local(a).numel() for a in averages.values()),
        "model_numel": sum(getattr(p, "ds_numel", p.numel()) for p in first.model.parameters()),
        "deepspeed": engine.deepspeed,
        "folders": sorted(p.name for p in (out / "run").iterdir()),
    }
    second = PmaTrainer(model=tiny_llama(), args=pma_args(out / "resumed", **settings), train_dataset=TokenDataset(96))
    second.train(resume_from_checkpoint=str(out / "run" / "checkpoint-3"))
    resumed = second.pma_engine.averages()
    facts["resume_counters_ok"] = second.pma_engine.counters == engine.counters
    facts["resume_exact"] = len(resumed) == len(averages) and all(
        torch.equal(local(a), local(b)) for a, b in zip(averages.values(), resumed.values(), strict=True)
    )
    if not engine.deepspeed:
        names = {p: n for n, p in first.model.named_parameters()}
        full = {names[p]: (a.full_tensor() if hasattr(a, "full_tensor") else a).cpu() for p, a in averages.items()}
        # the live weights after the last step: what the sample store kept as pma-samples/step-6
        live = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu() for p, n in names.items()}
        if rank == 0:
            torch.save(full, out / "averages.pt")
            torch.save(live, out / "live.pt")
    finish(out, rank, facts)


if __name__ == "__main__":
    main()
