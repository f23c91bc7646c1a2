"""What a PMA export costs the training run: the stall (sync vs async) and rank 0's peak memory.

``stall``: a ~110M-parameter Llama (fp32, tied embeddings) trains a few steps on one process with
the PMA engine; then each export is timed as the training thread sees it (the exporter's call:
the whole write when sync; the snapshot and the thread start when async) and until its folder is
complete. (The slowdown of training steps while a background writer shares the cores is left out:
on a shared 2-core machine it drowns in noise.)

``memory``: FSDP2 on 2 CPU processes (gloo): the same average exported by streaming and by
gathering a full state dict first, for models of growing depth (the largest tensor stays the same);
rank 0's RSS rise is sampled in a thread (after ``malloc_trim``).

    python -m benchmarks.export_cost stall [--repeats 3]
    python -m benchmarks.export_cost memory [--layers 4 8 16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.rss import PeakRss
from examples.models import tiny_llama


ROOT = Path(__file__).resolve().parents[1]


def stall(args: argparse.Namespace) -> dict:
    """How long an export holds the training thread, sync vs async, on a ~110M-parameter model.

    The model trains a few steps (the average then holds real samples); each export is then timed
    as the training thread sees it (the call), and until its folder is complete (call + join).
    """
    import torch

    from pmakit import PmaConfig
    from pmakit.online.engine import attach_engine
    from pmakit.training.export import PmaExporter

    model = tiny_llama("110m", num_key_value_heads=4, max_position_embeddings=128, pad_token_id=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine = attach_engine(optimizer, PmaConfig(interleave_step=1, fused_num=1000))
    generator = torch.Generator().manual_seed(0)
    step_times = []
    for _ in range(args.steps):
        ids = torch.randint(1, 32000, (args.batch, args.seq), generator=generator)
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step_times.append(time.perf_counter() - started)
    results = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "median_step_s": round(statistics.median(step_times), 3),
    }
    for mode in ("sync", "async"):
        calls, totals = [], []
        with tempfile.TemporaryDirectory(dir=args.scratch) as out:
            exporter = PmaExporter(model, out, PmaConfig(export=mode, fused_num=1000))
            for repeat in range(args.repeats):
                started = time.perf_counter()
                exporter.export_cycle(engine, repeat + 1)
                calls.append(time.perf_counter() - started)
                exporter.join()
                totals.append(time.perf_counter() - started)
        results[mode] = {"stall_s": [round(t, 3) for t in calls], "until_written_s": [round(t, 3) for t in totals]}
        print(mode, json.dumps(results[mode]), flush=True)
    return results


def memory(args: argparse.Namespace) -> dict:
    """Rank 0's peak RSS rise, streamed vs full gather, for each depth (FSDP2, 2 CPU processes)."""
    results = {}
    for layers in args.layers:
        with tempfile.TemporaryDirectory(dir=args.scratch) as out:
            env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
            env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
            command += ["-m", "benchmarks.export_cost", "memory-worker", "--out", out, "--layers", str(layers)]
            subprocess.run(command, env=env, check=True, capture_output=True, text=True, timeout=1200)
            results[layers] = json.loads((Path(out) / "facts.json").read_text())
        print(layers, json.dumps(results[layers]), flush=True)
    return results


def memory_worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from pmakit import PmaConfig
    from pmakit.online.engine import attach_engine
    from pmakit.online.gather import gather_averaged_state_dict
    from pmakit.training.export import save_averaged_model

    dist.init_process_group("gloo")
    main = dist.get_rank() == 0
    model = tiny_llama("22m", num_hidden_layers=args.layers[0])
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = attach_engine(optimizer, PmaConfig(interleave_step=1, fused_num=100))
    ids = torch.randint(1, 4096, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    averages = engine.averages()
    facts = {"model_fp32_MB": sum(p.numel() for p in model.parameters()) * 4 / 2**20}
    facts["largest_tensor_MB"] = max(p.numel() for p in model.parameters()) * 4 / 2**20
    dist.barrier()
    with PeakRss() as probe:
        save_averaged_model(model, averages, Path(args.out) / "stream", is_main_process=main)
    facts["stream_peak_MB"] = probe.peak / 2**20
    dist.barrier()
    with PeakRss() as probe:
        full = gather_averaged_state_dict(model, averages, is_main_process=main)
    facts["full_gather_peak_MB"] = probe.peak / 2**20
    del full
    if main:
        Path(args.out, "facts.json").write_text(json.dumps({k: round(v, 1) for k, v in facts.items()}))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["stall", "memory", "memory-worker"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--out", default=None)
    parser.add_argument("--scratch", default=None, help="Where exports are written (a temporary folder inside).")
    parser.add_argument("--json", default=None, help="Also write the results here.")
    args = parser.parse_args()
    if args.what == "memory-worker":
        memory_worker(args)
        return
    results = stall(args) if args.what == "stall" else memory(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
