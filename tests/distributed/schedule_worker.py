"""DDP worker for merge schedules: `PmaTrainer` with overlapping windows on 2 CPU processes (gloo).

Trains 12 steps straight, then again stopped at step 7 (two windows open in checkpoint-7) and resumed
from there. Each rank dumps its open windows at the stop and the `eval_pma_*` keys it logged.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pmakit import PmaTrainer
from tests.helpers.models import TokenDataset, tiny_llama
from tests.helpers.training import StopAt, pma_args


SETTINGS = dict(
    max_steps=12, pma_merge_steps=[8, 10, 12], pma_merge_window=6, pma_merge_max_open=3, pma_eval=True,
    save_strategy="steps", save_steps=7, optim="adamw_torch",
)  # fmt: skip


def trainer(output_dir: Path, callbacks=()) -> PmaTrainer:
    return PmaTrainer(
        model=tiny_llama(), args=pma_args(output_dir, **SETTINGS), train_dataset=TokenDataset(96),
        eval_dataset=TokenDataset(16, seed=9), callbacks=list(callbacks),
    )  # fmt: skip


def main() -> None:
    out, rank = Path(sys.argv[1]), int(os.environ["RANK"])
    straight = trainer(out / "straight")
    straight.train()
    stopped = trainer(out / "resumed", [StopAt(7)])
    stopped.train()
    windows = stopped.pma_callback.schedule.windows.state_dict()["open"]
    torch.save({end: entry["tensors"] for end, entry in windows.items()}, out / f"windows_rank{rank}.pt")
    trainer(out / "resumed").train(resume_from_checkpoint=str(out / "resumed" / "checkpoint-7"))
    keys = sorted({k for entry in straight.state.log_history for k in entry if k.startswith("eval_pma")})
    (out / f"facts_rank{rank}.json").write_text(json.dumps({"world": dist.get_world_size(), "eval_keys": keys}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
