"""FSDP2 export worker (2 CPU processes, gloo): streaming and background exports of a sharded average.

Trains a Llama of ~22M parameters (88 MB in fp32, largest tensor 8 MB) under `fully_shard` for a
few steps, then on every rank:

* streams the average into ``stream/`` (20 MB shards) while a thread samples rank 0's RSS;
* gathers the whole average into one state dict (the old way) under the same probe, and writes
  it with ``save_pretrained`` into ``reference/``: the probe must see that full copy;
* exports one cycle synchronously and one in the background (`PmaExporter`, ``export="async"``),
  timing how long each call holds the training thread.

Facts (peaks, stalls, sizes) go to ``facts_rank<r>.json`` for the test.
"""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import LlamaForCausalLM

from benchmarks.rss import PeakRss
from examples.models import tiny_llama
from pmakit import PmaConfig
from pmakit.online.engine import attach_engine
from pmakit.online.gather import gather_averaged_state_dict
from pmakit.training.export import PmaExporter, save_averaged_model


def big_llama():
    model = tiny_llama("22m")
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def train(model, optimizer, steps: int, rank: int) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(1, 4096, (4, 16), generator=generator)[2 * rank : 2 * rank + 2]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    main_process = rank == 0
    model = big_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = attach_engine(optimizer, PmaConfig(interleave_step=1, fused_num=100))
    train(model, optimizer, 2, rank)
    averages = engine.averages()
    facts = {"full_bytes": sum(p.numel() * 4 for p in model.parameters())}
    facts["largest_bytes"] = max(p.numel() * 4 for p in model.parameters())

    # The least of three streamed exports: the allocator and gloo's buffers add noise on top of what an export
    # holds (one reading in a few ran 10% over), never below it; a full copy would show in every reading.
    peaks = []
    for i in range(3):
        dist.barrier()
        folder = out / ("stream" if i == 0 else f"stream-again-{i}")
        with PeakRss() as probe:
            save_averaged_model(model, averages, folder, is_main_process=main_process, max_shard_size="20MB")
        peaks.append(probe.peak)
        if i and main_process:
            shutil.rmtree(folder)
    facts["stream_peak"], facts["stream_peaks"] = min(peaks), peaks
    dist.barrier()
    with PeakRss() as probe:
        full = gather_averaged_state_dict(model, averages, is_main_process=main_process)
    facts["full_gather_peak"] = probe.peak
    if main_process:
        reference = LlamaForCausalLM(model.config)
        reference.save_pretrained(out / "reference", state_dict=full, max_shard_size="20MB")
    del full
    dist.barrier()

    for mode in ("sync", "async"):
        exporter = PmaExporter(model, out / mode, PmaConfig(export=mode, save=True), is_main_process=main_process)
        started = time.perf_counter()
        exporter.export_cycle(engine, 2)
        facts[f"{mode}_stall"] = time.perf_counter() - started
        exporter.join()
        facts[f"{mode}_total"] = time.perf_counter() - started
    (out / f"facts_rank{rank}.json").write_text(json.dumps(facts))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
