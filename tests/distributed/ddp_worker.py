"""DDP worker: `PmaTrainer` on 2 CPU processes (gloo), then a resume from its mid-run checkpoint.

Each rank dumps its averages and logs every folder it writes; the test compares ranks, the
resumed run and a single-process run over the same global batches.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import pmakit.io.folders
import pmakit.training.export
from pmakit import PmaTrainer
from tests.helpers.models import TokenDataset, tiny_llama
from tests.helpers.training import pma_args


def log_writes(out: Path, rank: int) -> None:
    original = pmakit.io.folders.atomic_directory

    def logged(path, *args, **kwargs):
        with open(out / f"writes_rank{rank}.txt", "a") as fh:
            fh.write(f"{Path(path).name}\n")
        return original(path, *args, **kwargs)

    pmakit.training.export.atomic_directory = logged  # pma-<step> folders
    pmakit.io.folders.atomic_directory = logged  # the copy into `pma`


def run(output_dir: Path, resume: str | None = None) -> PmaTrainer:
    args = pma_args(output_dir, max_steps=12, save_strategy="steps", save_steps=6, optim="adamw_torch")
    trainer = PmaTrainer(model=tiny_llama(), args=args, train_dataset=TokenDataset(96))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def dump(trainer: PmaTrainer, path: Path) -> None:
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    averages = trainer.pma_engine.averages()
    named = {name: averages[p].clone() for name, p in model.named_parameters() if p in averages}
    torch.save({"averages": named, "counters": trainer.pma_engine.counters}, path)


def main() -> None:
    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    log_writes(out, rank)
    full = run(out / "full")
    assert dist.get_world_size() == 2 and dist.get_backend() == "gloo"
    dump(full, out / f"full_rank{rank}.pt")
    resumed = run(out / "resumed", resume=str(out / "full" / "checkpoint-6"))
    dump(resumed, out / f"resumed_rank{rank}.pt")
    if rank == 0:
        (out / "done.json").write_text(json.dumps({"world_size": dist.get_world_size()}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
