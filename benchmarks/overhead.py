"""Training-step overhead of online PMA: `PmaTrainer` vs a plain `Trainer`, in the same process.

Three variants train the same Llama on the same batches: a plain ``Trainer``; ``PmaTrainer`` sampling
every step (``interleave_step=1``, the worst case); and ``PmaTrainer`` at ``interleave_step=100``.
``fused_num`` is set beyond the run so no cycle ends (exports are I/O, reported apart from the step).

The machine may be shared and noisy, so each round runs every variant once in a fresh random order
(interleaved repetitions), each run's step time is the mean of its per-step times after a warm-up
(a mean, not a median: at interleave 100 only one step in a hundred carries a sample), and the overhead of a
variant is the median over rounds of its paired ratio to the plain run of the
same round. Because that ratio cannot resolve effects smaller than the machine's noise, PMA's own
time is also measured in situ: the time spent inside its optimizer-step hook (every step, sampling
or not) as a fraction of the step time. The per-sample cost is measured two ways: from the interleave-1 runs
(extra time per
step, every step samples) and directly, by timing ``engine.sample()`` on the trained engine. The
expected overhead at interleave N is that cost / (N x plain step time), which the noisy direct ratio
at N=100 can only confirm within its noise.

On CUDA the sample is also timed against the HBM bandwidth bound: the bytes a fold must move
(read the fp32 average, read the parameter, write the average: 12 B/param for fp32 weights, 10 B
for bf16) at the bandwidth ``torch._foreach_copy_`` reaches on the same tensors.

    python -m benchmarks.overhead                                   # CPU, small Llama
    python -m benchmarks.overhead --device cuda --size 100m --out benchmarks/results/overhead_gpu.md
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from itertools import pairwise
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from examples.models import tiny_llama
from pmakit import PmaArguments, PmaTrainer
from pmakit.online.engine import PmaEngine


SIZES = {
    # name: (hidden, intermediate, layers, heads, vocab, seq, batch)
    "small": (128, 344, 2, 4, 1024, 64, 8),
    "100m": (768, 2048, 11, 12, 32000, 512, 8),
}


def variant_names(interleaves: list[int], offloaded: list[int]) -> list[str]:
    """``plain``, ``pma@N`` (average on the device) and ``pma@N+cpu`` (average offloaded to pinned CPU memory)."""
    return ["plain", *(f"pma@{n}" for n in interleaves), *(f"pma@{n}+cpu" for n in offloaded)]


class StepClock(TrainerCallback):
    """Time between consecutive optimizer steps: wall time synchronised on CUDA; on the CPU the
    training thread's own CPU time (one torch thread), which other processes cannot inflate."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.stamps: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())
        else:
            self.stamps.append(time.thread_time())


class Batches(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int) -> None:
        self.ids = torch.randint(1, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build_model(size: str, dtype: torch.dtype) -> LlamaForCausalLM:
    hidden, inter, layers, heads, vocab, _, _ = SIZES[size]
    return tiny_llama(
        None,
        dtype=dtype,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=1024,
    )


def run_variant(variant: str, opts, dataset, out: Path) -> tuple[list[float], list[float], object]:
    _, _, _, _, _, _, batch = SIZES[opts.size]
    cuda = opts.device == "cuda"
    common = dict(
        output_dir=str(out),
        use_cpu=not cuda,
        bf16=cuda,
        report_to="none",
        per_device_train_batch_size=batch,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        max_steps=opts.steps,
        optim="adamw_torch",
    )
    model = build_model(opts.size, torch.bfloat16 if opts.weights == "bf16" else torch.float32)
    clock = StepClock(cuda)
    hook_times: list[float] = []
    original = PmaEngine._after_step

    def timed_hook(self, *args, **kwargs):  # PMA's own time inside each optimizer step, measured in situ
        start = time.perf_counter() if cuda else time.thread_time()
        original(self, *args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        hook_times.append((time.perf_counter() if cuda else time.thread_time()) - start)

    if not cuda:  # on CUDA the timing would need a synchronize inside every step, which itself slows the run
        PmaEngine._after_step = timed_hook
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no cycle will complete": intended, cycles would export folders
        if variant == "plain":
            trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=dataset, callbacks=[clock])
        else:
            interleave, _, offload = variant.split("@")[1].partition("+")
            args = PmaArguments(
                **common,
                pma_interleave_step=int(interleave),
                pma_offload=offload or "none",
                pma_fused_num=10**6,
                pma_save=False,
            )
            trainer = PmaTrainer(model=model, args=args, train_dataset=dataset, callbacks=[clock])
        try:
            trainer.train()
        finally:
            PmaEngine._after_step = original
    steps = [b - a for a, b in pairwise(clock.stamps)][opts.warmup :]
    return steps, hook_times[opts.warmup + 1 :], trainer


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.3%}"


def time_sample(engine, repeats: int, cuda: bool) -> float:
    """Median seconds of one `engine.sample()` (a fold into the fp32 average), steady state."""
    counters = dict(engine.counters)
    clock = time.perf_counter if cuda else time.thread_time
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = clock()
        engine.sample()
        engine.join()
        if cuda:
            torch.cuda.synchronize()
        times.append(clock() - start)
    engine.counters.update(counters)
    return statistics.median(times[1:])


def bandwidth_bound(engine, repeats: int) -> tuple[float, float]:
    """(bound in seconds for one fold, copy bandwidth in GB/s) from `_foreach_copy_` on the same tensors."""
    groups = engine._param_groups()
    src = [p for g in groups for p in g.lparams]
    dst = [torch.empty_like(p) for p in src]
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        torch._foreach_copy_(dst, src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    t_copy = statistics.median(times[1:])
    copy_bytes = sum(2 * p.numel() * p.element_size() for p in src)
    fold_bytes = sum(p.numel() * (8 + p.element_size()) for p in src)
    bandwidth = copy_bytes / t_copy
    return fold_bytes / bandwidth, bandwidth / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", default=None, choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="leading steps left out of each run's median")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of the three variants")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 is the least noisy here)")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--interleave", type=int, nargs="+", default=[1, 100], help="interleave_step values")
    parser.add_argument(
        "--offload-interleave", type=int, nargs="*", default=[], help="interleave_step values run with offload='cpu'"
    )
    parser.add_argument(
        "--weights", default="fp32", choices=["fp32", "bf16"], help="parameter dtype (CUDA trains under bf16 autocast)"
    )
    opts = parser.parse_args()
    variants = variant_names(opts.interleave, opts.offload_interleave)
    probe = next(v for v in variants if v.startswith("pma@") and "+" not in v)
    opts.size = opts.size or ("100m" if opts.device == "cuda" else "small")
    opts.steps = opts.steps or (200 if opts.device == "cuda" else 200)
    if opts.device == "cpu":
        torch.set_num_threads(opts.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    _, _, _, _, vocab, seq, batch = SIZES[opts.size]
    dataset = Batches(batch * opts.steps, seq, vocab)

    per_round: list[dict[str, float]] = []
    in_situ: dict[str, list[float]] = {}
    last_pma = None
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(opts.rounds):
            order = list(variants)
            rng.shuffle(order)
            means = {}
            for variant in order:
                steps, hooks, trainer = run_variant(variant, opts, dataset, Path(tmp) / variant)
                means[variant] = statistics.fmean(steps)
                if hooks:
                    in_situ.setdefault(variant, []).append(sum(hooks) / sum(steps))
                if variant == probe:
                    last_pma = trainer
                print(f"round {r + 1}: {variant:8s} mean step {means[variant] * 1e3:8.2f} ms", flush=True)
            per_round.append(means)

    cuda = opts.device == "cuda"
    engine = last_pma.pma_engine
    n_params = sum(p.numel() for g in engine._param_groups() for p in g.lparams)
    sample_direct = time_sample(engine, 21, cuda)
    plain = statistics.median(m["plain"] for m in per_round)
    result = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "size": opts.size,
        "params": n_params,
        "dtype": f"{opts.weights} weights" + (", bf16 autocast" if cuda else ""),
        "weights": opts.weights,
        "steps_per_run": opts.steps,
        "rounds": opts.rounds,
        "threads": opts.threads if not cuda else None,
        "plain_step_s": plain,
        "sample_direct_s": sample_direct,
    }
    for variant in variants[1:]:
        ratios = [m[variant] / m["plain"] for m in per_round]
        result[f"{variant}_step_s"] = statistics.median(m[variant] for m in per_round)
        result[f"{variant}_overhead"] = statistics.median(ratios) - 1
        result[f"{variant}_overhead_range"] = [min(ratios) - 1, max(ratios) - 1]
        result[f"{variant}_in_situ"] = statistics.median(in_situ[variant]) if variant in in_situ else None
    result["sample_from_interleave1_s"] = result["pma@1_step_s"] - plain if "pma@1" in variants else None
    result["expected_overhead_at_100"] = sample_direct / (100 * plain)
    result["plain_noise_range"] = [
        min(m["plain"] for m in per_round) / plain - 1,
        max(m["plain"] for m in per_round) / plain - 1,
    ]
    if cuda:
        bound, bandwidth = bandwidth_bound(engine, 21)
        result["fold_bound_s"] = bound
        result["copy_bandwidth_GBps"] = bandwidth
        result["fraction_of_bound"] = bound / sample_direct

    lines = [
        f"### Step overhead of PMA ({result['device']}, {opts.size} Llama, "
        f"{n_params / 1e6:.1f}M params, {result['dtype']})",
        "",
        f"{opts.rounds} interleaved rounds x {opts.steps} steps per run; each run's step time is the mean after "
        f"{opts.warmup} warm-up steps; overhead = median over rounds of the paired ratio to the plain run "
        f"(min..max over rounds in brackets)."
        + ("" if cuda else f" CPU: {opts.threads} torch thread, timed by its own CPU clock (`time.thread_time`)."),
        "",
        "| variant | step time | overhead vs plain (measured ratio) | time inside PMA's step hook / step time |",
        "|---|---|---|---|",
        f"| plain Trainer | {plain * 1e3:.2f} ms | (spread of plain runs: {result['plain_noise_range'][0]:+.2%} .. "
        f"{result['plain_noise_range'][1]:+.2%}) | - |",
    ]
    for variant in variants[1:]:
        lo, hi = result[f"{variant}_overhead_range"]
        lines.append(
            f"| PmaTrainer, interleave_step={variant.split('@')[1].replace('+cpu', ', offload=cpu')} | "
            f"{result[f'{variant}_step_s'] * 1e3:.2f} ms | "
            f"{result[f'{variant}_overhead']:+.2%} [{lo:+.2%} .. {hi:+.2%}] | "
            f"{_percent(result[f'{variant}_in_situ'])} |"
        )
    lines += [
        "",
        f"Per-sample cost: {sample_direct * 1e3:.2f} ms timed directly (`engine.sample()`), "
        + (
            f"{result['sample_from_interleave1_s'] * 1e3:.2f} ms from the interleave-1 runs; "
            if result["sample_from_interleave1_s"] is not None
            else ""
        )
        + f"{sample_direct / n_params * 1e9:.2f} ns/param. Expected overhead at interleave_step=100: "
        f"{result['expected_overhead_at_100']:.3%} (= per-sample cost / (100 x plain step)).",
    ]
    if cuda:
        lines.append(
            f"\nOne fold vs the HBM bandwidth bound: {sample_direct * 1e6:.0f} us vs "
            f"{result['fold_bound_s'] * 1e6:.0f} us ({result['fraction_of_bound']:.0%} of the bound; "
            f"`_foreach_copy_` reaches {result['copy_bandwidth_GBps']:.0f} GB/s)."
        )
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if opts.out:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(text)
    if opts.json:
        opts.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
