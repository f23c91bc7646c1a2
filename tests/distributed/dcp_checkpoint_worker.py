"""FSDP2 worker: writes sharded training checkpoints the way Accelerate does (2 CPU processes, gloo).

Trains a tiny Llama with `fully_shard` and the PMA engine on AdamW, and at steps 1..STEPS saves
`run/checkpoint-N/` like Accelerate's FSDP `SHARDED_STATE_DICT`: `pytorch_model_fsdp_0/` (DCP,
`{"model": get_model_state_dict(...)}`), `optimizer_0/` (DCP, `{"optimizer": get_optimizer_state_dict(...)}`)
and `config.json`. Rank 0 also saves the consolidated references: `ref/weights-N.pt` (the full
weights) and `ref/pma-N.pt` (the full PMA average, when there is one).
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from pmakit.online.config import PmaConfig
from pmakit.online.engine import attach_engine
from pmakit.online.gather import _full
from tests.distributed.reference import batch
from tests.helpers.models import tiny_llama


STEPS = 5
CONFIG = PmaConfig(fused_algo="wma", fused_num=10, interleave_step=1)  # one long cycle: an average at every save


def save_checkpoint(model, optimizer, engine, folder: Path, rank: int, dtype) -> None:
    for name, state in (
        ("pytorch_model_fsdp_0", {"model": get_model_state_dict(model)}),
        ("optimizer_0", {"optimizer": get_optimizer_state_dict(model, optimizer)}),
    ):
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder / name)), planner=DefaultSavePlanner())
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = {p: n for n, p in model.named_parameters()}
    average = {names[p]: _full(a, True) for p, a in engine.averages().items()}
    if rank == 0:
        model.config.to_json_file(folder / "config.json")
        step = int(folder.name.split("-")[1])
        torch.save(full, folder.parent.parent / "ref" / f"weights-{step}.pt")
        torch.save(average, folder.parent.parent / "ref" / f"pma-{step}.pt")


def main() -> None:
    out = Path(sys.argv[1])
    dtype = getattr(torch, sys.argv[2]) if len(sys.argv) > 2 else torch.float32
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    (out / "ref").mkdir(parents=True, exist_ok=True)
    model = tiny_llama(dtype=dtype)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = attach_engine(optimizer, CONFIG)
    for step in range(1, STEPS + 1):
        ids = batch(step)[4 * rank : 4 * rank + 4]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        save_checkpoint(model, optimizer, engine, out / "run" / f"checkpoint-{step}", rank, dtype)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
