"""Time one online PMA sample on a ~100M-parameter model, beside torch's AveragedModel and a bandwidth bound.

What is timed, per parameter dtype (fp32 and bf16), in the same process and interleaved:

* ``PmaEngine.sample()``: the engine's real per-sample path, on a real ``torch.optim.AdamW`` with an
  attached engine (EMA, so every timed sample is a fold ``avg <- avg + c (x - avg)`` into the fp32
  average kept in the optimizer state).
* ``AveragedModel.update_parameters(model)`` with ``multi_avg_fn=get_ema_multi_avg_fn(0.999)``: torch's
  own fused EMA (its average is kept in the model's dtype).
* ``torch._foreach_copy_`` over the same parameters: the memory bandwidth this device reaches on these
  tensors, scaled to the bytes PMA must move per parameter:

  ====== =============================================== ===================
  params PMA sample (read avg + read param + write avg)  copy (read + write)
  ====== =============================================== ===================
  fp32   4 + 4 + 4 = 12 B                                4 + 4 = 8 B
  bf16   4 + 2 + 4 = 10 B                                2 + 2 = 4 B
  ====== =============================================== ===================

  so the bound for one sample is ``t_copy * 12/8`` (fp32) or ``t_copy * 10/4`` (bf16).

Steady state: a warm-up, then many rounds; each round runs every method once in a fresh random order
(the machine may be shared and noisy), and the table gives the median and the interquartile range.
On CUDA each call is timed with CUDA events after a synchronize. On the CPU the default is one thread
timed by its own CPU clock (``time.thread_time``), which other processes on a shared machine cannot
inflate by preempting it; ``--clock wall --threads N`` measures wall time instead.

Before timing, a correctness check folds three perturbed samples and compares the average with the
closed-form EMA in fp64 (relative L2 error), for pmakit and for AveragedModel.

    python -m benchmarks.update                          # CPU, ~100M parameters
    python -m benchmarks.update --device cuda --out benchmarks/results/update_gpu.md
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from examples.models import tiny_llama


DECAY = 0.999  # AveragedModel's EMA decay; PMA's ema_alpha is 1 - DECAY, the same rule
SIZES = {
    # name: (hidden, intermediate, layers, heads, vocab); tied embeddings
    "100m": (768, 2048, 11, 12, 32000),  # 102.45M parameters
    "tiny": (64, 128, 2, 4, 512),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COPY_BYTES = {"fp32": 8, "bf16": 4}  # _foreach_copy_: read + write one parameter
PMA_BYTES = {"fp32": 12, "bf16": 10}  # read fp32 avg + read param + write fp32 avg
AM_BYTES = {"fp32": 12, "bf16": 6}  # AveragedModel: its average is in the model dtype


def build_model(size: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A Llama-style causal LM built locally (nothing downloaded), random init, on ``device``."""
    hidden, inter, layers, heads, vocab = SIZES[size]
    return tiny_llama(
        None,
        dtype=dtype,
        device=device,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=512,
    )


class Timer:
    """Times one call: CUDA events on CUDA, else the thread's CPU clock or the wall clock."""

    def __init__(self, device: torch.device, clock: str) -> None:
        self.cuda = device.type == "cuda"
        self.clock = time.thread_time if clock == "cpu" else time.perf_counter

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = self.clock()
        fn()
        return self.clock() - begin


def run_rounds(
    methods: dict[str, Callable[[], object]], timer: Timer, warmup: int, reps: int
) -> dict[str, list[float]]:
    """Every method once per round in a fresh random order; the first ``warmup`` rounds are dropped."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    order = list(methods)
    rng = random.Random(0)
    for round_ in range(warmup + reps):
        rng.shuffle(order)
        for name in order:
            elapsed = timer(methods[name])
            if round_ >= warmup:
                times[name].append(elapsed)
    return times


def summary(values: list[float]) -> dict[str, float]:
    """Median and interquartile range (seconds)."""
    if len(values) >= 2:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "iqr": q3 - q1}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref).norm().item() / ref.norm().item()


@torch.no_grad()
def check_correctness(model, engine, averaged, params, alpha: float) -> dict[str, float]:
    """Fold three perturbed samples into both averages; compare with the fp64 closed-form EMA."""
    watched = sorted(range(len(params)), key=lambda i: params[i].numel())[-2:]  # the two largest tensors
    snapshots = []
    generator = torch.Generator(device=params[0].device).manual_seed(1)
    for k in range(3):
        if k:
            for p in params:
                p.add_(torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype), alpha=1e-2)
        engine.sample()
        averaged.update_parameters(model)
        snapshots.append([params[i].double().clone() for i in watched])
    weights = [(1 - alpha) ** 2, alpha * (1 - alpha), alpha]
    state = engine.averages()  # the optimizer never steps here, so the averages sit beside its state
    averaged_params = list(averaged.module.parameters())
    pma, am = [], []
    for j, i in enumerate(watched):
        ref = sum(w * s[j] for w, s in zip(weights, snapshots, strict=True))
        pma.append(rel_err(state[params[i]], ref))
        am.append(rel_err(averaged_params[i], ref))
    finite = all(bool(torch.isfinite(state[p]).all()) for p in params)
    if not finite or max(pma) > 1e-5:
        raise AssertionError(f"PMA average is wrong: relative errors {pma}, all finite: {finite}")
    return {"pma_rel_err": max(pma), "averaged_model_rel_err": max(am)}


def bench_dtype(model, dtype_name: str, device, timer: Timer, args) -> dict:
    """Correctness check, then interleaved timing of PMA, AveragedModel, the copy bound and fold variants."""
    from pmakit import PmaConfig
    from pmakit.online import fused_upcast
    from pmakit.online.engine import attach_engine
    from pmakit.online.kernels import fold_into

    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    alpha = 1.0 - DECAY
    engine = attach_engine(optimizer, PmaConfig(fused_algo="ema", ema_alpha=alpha, fused_num=10**9, interleave_step=1))
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    check = check_correctness(model, engine, averaged, params, alpha)

    with torch.no_grad():
        copies = [torch.empty_like(p) for p in params]
        methods: dict[str, Callable[[], object]] = {
            "pma": engine.sample,
            "averaged_model": lambda: averaged.update_parameters(model),
            "copy": lambda: torch._foreach_copy_(copies, params),
        }
        variants: dict[str, Callable[[], object]] = {}
        if args.variants:
            scratch_avgs = [avg.clone() for avg in engine.averages().values()]
            variants["mul_+add_"] = lambda: (
                torch._foreach_mul_(scratch_avgs, 1.0 - alpha),
                torch._foreach_add_(scratch_avgs, params, alpha=alpha),
            )
            if dtype_name == "fp32":
                variants["_foreach_lerp_"] = lambda: fold_into(scratch_avgs, params, alpha)
            else:  # the engine's kernel at several scratch sizes, each with its cached plan as in the engine
                for log2 in (16, 18, 20, 22, 23, 24):
                    if (1 << log2) < n:
                        variants[f"upcast 2^{log2} + lerp"] = lambda c=1 << log2, cache={}: fold_into(
                            scratch_avgs, params, alpha, chunk=c, cache=cache
                        )
                variants["upcast all + lerp"] = lambda cache={}: fold_into(
                    scratch_avgs, params, alpha, chunk=n, cache=cache
                )
                mode = fused_upcast._MODES.get((params[0].device, params[0].dtype))
                if mode is not None:  # the probe chose the Triton kernel: time it alone too
                    plan = fused_upcast.fused_plan(scratch_avgs, params)
                    variants["fused Triton upcast-lerp"] = lambda: fused_upcast.fused_fold(plan, alpha, mode)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times = run_rounds({**methods, **variants}, timer, args.warmup, args.reps)
    copies.clear()
    stats = {name: summary(v) for name, v in times.items()}
    t_pma, t_am, t_copy = (stats[k]["median"] for k in ("pma", "averaged_model", "copy"))
    copy_gbps = COPY_BYTES[dtype_name] * n / t_copy / 1e9
    bound = t_copy * PMA_BYTES[dtype_name] / COPY_BYTES[dtype_name]
    paired = [p / a for p, a in zip(times["pma"], times["averaged_model"], strict=True)]
    mode = fused_upcast._MODES.get((params[0].device, params[0].dtype))
    return {
        "fold_kernel": "lerp"
        if dtype_name == "fp32"
        else ("scratch upcast + lerp" if mode is None else f"fused Triton upcast-lerp (fma={mode})"),
        "dtype": dtype_name,
        "params": n,
        "tensors": len(params),
        "check": check,
        "stats": stats,
        "pma_ms": t_pma * 1e3,
        "averaged_model_ms": t_am * 1e3,
        "copy_ms": t_copy * 1e3,
        "bound_ms": bound * 1e3,
        "pma_over_averaged_model": t_pma / t_am,
        "pma_over_averaged_model_paired_median": statistics.median(paired),
        "pct_of_bound": 100.0 * bound / t_pma,
        "pma_gbps": PMA_BYTES[dtype_name] * n / t_pma / 1e9,
        "averaged_model_gbps": AM_BYTES[dtype_name] * n / t_am / 1e9,
        "copy_gbps": copy_gbps,
        "variants": {
            name: {
                "ms": stats[name]["median"] * 1e3,
                "iqr_ms": stats[name]["iqr"] * 1e3,
                "pct_of_bound": 100.0 * bound / stats[name]["median"],
            }
            for name in variants
        },
    }


def markdown(results: list[dict], env: dict) -> str:
    """The tables the README quotes."""
    lines = [
        f"Device: {env['device']}; torch {env['torch']}; {env['timing']}; "
        f"{env['reps']} rounds after {env['warmup']} warm-up, order shuffled each round.",
        "",
        "| params | method | B/param moved | median ms | IQR ms | GB/s | time vs AveragedModel | % of bound |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s, d = r["stats"], r["dtype"]

        def row(label, key, nbytes, ratio, pct, s=s, r=r, d=d):
            st = s[key]
            gbps = nbytes * r["params"] / st["median"] / 1e9
            lines.append(
                f"| {d} | {label} | {nbytes} | {st['median'] * 1e3:.2f} | {st['iqr'] * 1e3:.2f} | "
                f"{gbps:.1f} | {ratio} | {pct} |"
            )

        row(
            "pmakit `PmaEngine.sample()`",
            "pma",
            PMA_BYTES[d],
            f"{r['pma_over_averaged_model']:.2f}x",
            f"{r['pct_of_bound']:.0f}%",
        )
        row(f"torch `AveragedModel` EMA ({d} average)", "averaged_model", AM_BYTES[d], "1.00x", "")
        row("`_foreach_copy_` (bandwidth probe)", "copy", COPY_BYTES[d], "", "")
        lines.append(
            f"| {d} | bound: {PMA_BYTES[d]} B/param at the copy's bandwidth | {PMA_BYTES[d]} | {r['bound_ms']:.2f} | "
            f" | {r['copy_gbps']:.1f} |  | 100% |"
        )
    kernels = "; ".join(f"{r['dtype']}: {r['fold_kernel']}" for r in results)
    lines += [
        "",
        f"Fold kernel the engine used: {kernels}.",
        "",
        "Correctness (3 folds vs closed-form EMA in fp64, relative L2 error over the two largest tensors):",
        "",
    ]
    lines += ["| params | pmakit (fp32 average) | AveragedModel (average in model dtype) |", "|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['dtype']} | {r['check']['pma_rel_err']:.1e} | {r['check']['averaged_model_rel_err']:.1e} |"
        )
    if any(r["variants"] for r in results):
        lines += ["", "Fold kernels over the same tensors (same rounds):", ""]
        lines += ["| params | kernel | median ms | IQR ms | % of bound |", "|---|---|---|---|---|"]
        for r in results:
            for name, v in r["variants"].items():
                lines.append(
                    f"| {r['dtype']} | {name} | {v['ms']:.2f} | {v['iqr_ms']:.2f} | {v['pct_of_bound']:.0f}% |"
                )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available).")
    parser.add_argument("--size", default="100m", choices=sorted(SIZES), help="Model size.")
    parser.add_argument("--dtypes", default="fp32,bf16", help="Comma-separated parameter dtypes: fp32, bf16.")
    parser.add_argument("--reps", type=int, default=None, help="Timed rounds (default: 15 on CPU, 50 on CUDA).")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed rounds first.")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads).")
    parser.add_argument(
        "--clock",
        default="auto",
        choices=["auto", "cpu", "wall"],
        help="CPU timing: the thread's CPU time (needs --threads 1) or wall time; auto picks cpu "
        "for one thread. CUDA always uses events.",
    )
    parser.add_argument(
        "--no-variants", dest="variants", action="store_false", help="Skip the table of alternative fold kernels."
    )
    parser.add_argument("--out", type=Path, default=None, help="Write the markdown tables to this file.")
    parser.add_argument("--json", type=Path, default=None, help="Write all numbers as JSON to this file.")
    args = parser.parse_args(argv)
    for name in args.dtypes.split(","):
        if name not in DTYPES:
            parser.error(f"--dtypes: unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.clock == "auto":
        args.clock = "cpu" if args.threads == 1 else "wall"
    if args.device == "cpu" and args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread's CPU time: use it with --threads 1")
    if args.reps is None:
        args.reps = 50 if args.device == "cuda" else 15
    if args.reps < 1 or args.warmup < 0:
        parser.error("--reps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if device.type == "cuda":
            timing = "CUDA events"
            name = torch.cuda.get_device_name(device)
        else:
            timing = f"{args.threads} CPU thread(s), {'thread CPU time' if args.clock == 'cpu' else 'wall clock'}"
            name = f"CPU ({platform.processor() or platform.machine()})"
        env = {
            "device": name,
            "torch": torch.__version__,
            "timing": timing,
            "reps": args.reps,
            "warmup": args.warmup,
            "python": sys.version.split()[0],
        }
        timer = Timer(device, args.clock)
        results = []
        model = build_model(args.size, device, torch.float32)
        for dtype_name in args.dtypes.split(","):
            model = model.to(DTYPES[dtype_name])
            results.append(bench_dtype(model, dtype_name, device, timer, args))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        env["params"] = results[0]["params"]
        env["tensors"] = results[0]["tensors"]
        text = f"Model: Llama-style, {env['params'] / 1e6:.2f}M parameters in {env['tensors']} tensors.\n" + markdown(
            results, env
        )
        print(text)
        for r in results:
            print(
                f"{r['dtype']}: PMA sample {r['pma_ms']:.2f} ms = {r['pma_over_averaged_model']:.2f}x AveragedModel "
                f"({r['averaged_model_ms']:.2f} ms; per-round paired ratio median "
                f"{r['pma_over_averaged_model_paired_median']:.2f}x), {r['pct_of_bound']:.0f}% of the "
                f"{r['bound_ms']:.2f} ms bound, "
                f"{r['pma_gbps']:.1f} GB/s"
            )
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"env": env, "results": results}, indent=2))
        return results
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
