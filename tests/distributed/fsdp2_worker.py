"""FSDP2 worker: the engine on a `fully_shard` model (2 CPU processes, gloo).

Trains a tiny Llama with the PMA engine on a sharded AdamW, exports a cycle through
`PmaExporter` (all ranks gather, rank 0 writes), checks swap and a DCP save/load of the sharded
optimizer state, and dumps per-rank facts for the test to compare with an unsharded run.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from pmakit.online.engine import AVG_KEY, attach_engine
from pmakit.online.gather import _full
from pmakit.training.export import PmaExporter
from tests.distributed.reference import BEMA, CONFIG, STEPS, batch
from tests.helpers.models import tiny_llama


DEVICE = "cpu"
THETA0 = "pma_bema_theta0"


def sharded_model(dtype):
    model = tiny_llama(dtype=dtype).to(DEVICE)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def train(model, optimizer, steps, rank, first=1):
    for step in range(first, steps + 1):
        ids = batch(step)[4 * rank : 4 * rank + 4].to(DEVICE)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def main() -> None:
    global DEVICE
    out = Path(sys.argv[1])
    mode = sys.argv[3] if len(sys.argv) > 3 else "cpu"
    if mode.startswith("cuda"):
        DEVICE = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(DEVICE)
    dist.init_process_group("nccl" if mode.startswith("cuda") else "gloo")
    for dtype_name in sys.argv[2].split(","):
        check(out / dtype_name, getattr(torch, dtype_name), dist.get_rank())
        check_bema(out / dtype_name, getattr(torch, dtype_name), dist.get_rank())
    dist.barrier()
    dist.destroy_process_group()


def check(out: Path, dtype: torch.dtype, rank: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model = sharded_model(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = attach_engine(optimizer, CONFIG)
    engine.add_cycle_handler(PmaExporter(model, out / "run", CONFIG, is_main_process=rank == 0))
    train(model, optimizer, STEPS, rank)

    averages = engine.averages()
    facts = {"rank": rank, "local_avg_numel": 0, "local_param_numel": 0, "full_numel": 0, "all_dtensor": True}
    facts["avg_devices"] = sorted(
        {str(a.to_local().device.type) + (":pinned" if a.to_local().is_pinned() else "") for a in averages.values()}
    )
    for p, avg in averages.items():
        facts["all_dtensor"] &= isinstance(avg, DTensor) and avg.placements == p.placements and avg.shape == p.shape
        facts["all_dtensor"] &= avg.dtype == torch.float32 and avg.to_local().shape == p.to_local().shape
        facts["local_avg_numel"] += avg.to_local().numel()
        facts["local_param_numel"] += p.to_local().numel()
        facts["full_numel"] += p.numel()
    names = {p: n for n, p in model.named_parameters()}
    torch.save({names[p]: _full(a, True) for p, a in averages.items()}, out / f"averages_rank{rank}.pt")

    # Swap: the live shards take the average and get their own bits back afterwards.
    before = {p: p.to_local().clone() for p in averages}
    with engine.swapped():
        facts["swap_ok"] = all(
            torch.equal(p.to_local(), a.to_local().to(p.device, p.dtype)) for p, a in averages.items()
        )
    facts["restore_ok"] = all(torch.equal(p.to_local(), before[p]) for p in averages)

    # Resume: the sharded optimizer state (DTensor averages included) through DCP into a fresh model.
    dcp.save({"optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(out / "dcp"))
    model2 = sharded_model(dtype)
    optimizer2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    engine2 = attach_engine(optimizer2, CONFIG)
    state = {"optim": get_optimizer_state_dict(model2, optimizer2)}
    dcp.load(state, checkpoint_id=str(out / "dcp"))
    set_optimizer_state_dict(model2, optimizer2, state["optim"])
    loaded = engine2.averages()
    facts["resume_ok"] = engine2.counters == engine.counters
    for (_, a1), (p2, a2) in zip(averages.items(), loaded.items(), strict=True):
        facts["resume_ok"] &= isinstance(a2, DTensor) and a2.dtype == torch.float32
        facts["resume_ok"] &= torch.equal(a1.to_local(), a2.to_local())
        facts["resume_ok"] &= optimizer2.state[p2][AVG_KEY] is a2
    (out / f"facts_rank{rank}.json").write_text(json.dumps(facts))


def check_bema(out: Path, dtype: torch.dtype, rank: int) -> None:
    """BEMA saved through DCP mid-cycle (samples at 2 and 4): theta_0 comes back as an fp32 DTensor sharded like
    its parameter, and the resumed run's merge at step 6 is the uninterrupted one, bit for bit."""
    model = sharded_model(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = attach_engine(optimizer, BEMA)
    train(model, optimizer, 4, rank)
    dcp.save({"optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(out / "dcp_bema"))
    model2 = sharded_model(dtype)
    with torch.no_grad():
        for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
            p2.to_local().copy_(p.to_local())
    optimizer2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    engine2 = attach_engine(optimizer2, BEMA)
    state = {"optim": get_optimizer_state_dict(model2, optimizer2)}
    dcp.load(state, checkpoint_id=str(out / "dcp_bema"))
    set_optimizer_state_dict(model2, optimizer2, state["optim"])
    ok = engine2.counters == engine.counters
    for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        theta, theta2 = optimizer.state[p][THETA0], optimizer2.state[p2][THETA0]
        ok &= isinstance(theta2, DTensor) and theta2.dtype == torch.float32 and theta2.placements == p2.placements
        ok &= torch.equal(theta.to_local(), theta2.to_local())
    train(model, optimizer, STEPS, rank, first=5)
    train(model2, optimizer2, STEPS, rank, first=5)
    averages, averages2 = engine.averages(), engine2.averages()
    for p, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        ok &= torch.equal(averages[p].to_local(), averages2[p2].to_local())
    names = {p: n for n, p in model.named_parameters()}
    torch.save({names[p]: _full(a, True) for p, a in averages.items()}, out / f"bema_averages_rank{rank}.pt")
    (out / f"bema_facts_rank{rank}.json").write_text(json.dumps({"resume_ok": bool(ok)}))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
