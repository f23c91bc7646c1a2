"""Overhead of the WSA loss: training step time of a small Llama with and without it.

Each configuration runs the same steps (forward, backward, AdamW step) on the same random token
batches, alternating "without" and "with" WSA in blocks so that machine noise hits both alike,
and reports the median step time of each and their ratio. The WSA loss covers every weight
matrix and the embedding (the default), with a reference target so its gradient is not zero.

    python -m benchmarks.wsa_overhead                       # CPU, a few tens of seconds
    python -m benchmarks.wsa_overhead --device cuda --hidden_size 1024 --num_layers 8 --batch_size 8 --seq 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from examples.models import tiny_llama
from pmakit.training.wsa import WsaRegularizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--hidden_size", type=int, default=128)
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--vocab_size", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=60, help="timed steps per variant")
    p.add_argument("--block", type=int, default=10, help="steps per alternating block")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = tiny_llama(
        None,
        dtype=getattr(torch, args.dtype),
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=4 * args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=max(1, args.hidden_size // 32),
        max_position_embeddings=args.seq,
        tie_word_embeddings=False,
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    reg = WsaRegularizer(model, weight=0.5)
    # a target 10% wider than the init so that the WSA gradient is not zero
    reg.target_std = reg.target_std * 1.1
    batches = [torch.randint(0, args.vocab_size, (args.batch_size, args.seq), device=device) for _ in range(4)]
    # On CPU the clock is the process's CPU time: with one thread it is what the step costs, and it does not
    # count the time other jobs on a shared machine hold the core. On CUDA it is wall time after a sync.
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times = {"without": [], "with": []}

    def step(i: int, with_wsa: bool) -> float:
        ids = batches[i % len(batches)]
        _sync(device)
        start = clock()
        loss = model(input_ids=ids, labels=ids).loss
        if with_wsa:
            loss = loss + reg()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        return clock() - start

    for i in range(5):  # warm-up both paths
        step(i, False)
        step(i, True)
    done = 0
    while done < args.steps:
        n = min(args.block, args.steps - done)
        for variant in ("without", "with"):
            times[variant] += [step(done + j, variant == "with") for j in range(n)]
        done += n
    # the regulariser alone (forward + backward), for scale
    _sync(device)
    start = clock()
    for _ in range(args.steps):
        reg().backward()
    _sync(device)
    alone = (clock() - start) / args.steps
    optimizer.zero_grad(set_to_none=True)
    result = {
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "dtype": args.dtype,
        "threads": args.threads,
        "clock": "wall (CUDA synchronised)" if device.type == "cuda" else "process CPU time",
        "parameters": sum(p.numel() for p in model.parameters()),
        "aligned_layers": len(reg.names),
        "stacks": len(reg._plan),
        "tokens_per_step": args.batch_size * args.seq,
        "median_step_s_without": statistics.median(times["without"]),
        "median_step_s_with": statistics.median(times["with"]),
        "wsa_alone_s": alone,
    }
    result["ratio"] = result["median_step_s_with"] / result["median_step_s_without"]
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
