#!/usr/bin/env python
"""Does a merge of constant-LR samples recover more of a real LR decay's gain as the model grows?

`decay_merge.py`'s experiment (its functions, not a copy) at three preset sizes:

* ``tiny``: a 19k-parameter model for 120 steps on 60 kB of the ``stdlib`` corpus (a high LR, so that the
  decays gain even this early): the CPU smoke test, about 15 s of one core;
* ``cpu``: exactly the 16.0M-parameter CPU run of the scale trend (``docstrings`` corpus, 1000 steps of
  16 x 128 bytes, samples every 10 steps, windows 100 and 200, linear decays);
* ``paper``: a 128.7M-parameter byte-level Llama (10 layers of width 1024) on the whole ``stdlib`` corpus
  (the standard library's source and docs, about 11 MB), 1500 steps of 32 x 512 bytes in bf16 autocast on a
  GPU, the same sampling and windows as ``cpu``: sized for a 9-minute slot on one H100 or H200.

Each runs: a constant-LR (WSD stable phase) run that keeps its PMA samples (the sample store); the sweep of
every merge rule over every window; real linear decays of each window length, forked from the constant
run at step T - L so that every decay and every merge ends at the same step T; the validation loss of each
on the same held-out bytes. It writes one report (``results.md``: the losses, then each merge's share of
each decay's gain per rule and window), a plot (``paper_scale.png``) and ``results.json``.

    python -m examples.paper_scale --size tiny --output_dir runs/paper_tiny
    python -m examples.paper_scale --size paper --output_dir /tmp/paper_scale   # on a GPU
    python -m examples.paper_scale --size paper --estimate 250   # time estimate at 250 TFLOP/s, runs nothing

Any further argument is a `decay_merge.py` setting and overrides the preset (``--max_steps 800``).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import torch

from examples.bytelm import load_corpus, validation_loss
from examples.decay_merge import MERGE_RULES, count_params, experiment, model_config, parse_args, scored_rules


# The rules the paper size merges: the six its GPU-slot estimate was sized for (`--merge_rules` adds more).
PAPER_RULES = tuple(r for r in MERGE_RULES if r not in ("bema", "ema_halflife:0.05"))


@dataclass(frozen=True)
class Size:
    """A preset: `decay_merge.py` settings, and whether to store only the samples the longest window merges."""

    argv: tuple[str, ...]
    window_samples_only: bool  # pma_start_step = T - longest window and no pma-N exports (same samples, less I/O)
    bf16_on_cuda: bool = False  # train in bf16 autocast where CUDA is (the Trainer refuses bf16 on a CPU)


SIZES = {
    "tiny": Size(
        (
            "--corpus", "stdlib", "--max_corpus_bytes", "60000", "--max_steps", "120", "--warmup_steps", "10",
            "--learning_rate", "2e-2",
            "--windows", "10,20", "--pma_interleave_step", "5", "--pma_fused_num", "4", "--decay_shapes", "linear",
            "--hidden_size", "32", "--num_layers", "1", "--num_heads", "2", "--intermediate_size", "64",
            "--per_device_eval_batch_size", "8", "--logging_steps", "1000",
        ),
        True,
    ),
    # The CPU run of the scale trend (16.0M parameters), setting for setting (the rest is decay_merge's default).
    "cpu": Size(
        (
            "--corpus", "docstrings", "--hidden_size", "384", "--num_layers", "9", "--num_heads", "6",
            "--intermediate_size", "1024", "--max_steps", "1000", "--windows", "100,200", "--decay_shapes", "linear",
            "--logging_steps", "50",
        ),
        False,
    ),
    "paper": Size(
        (
            "--corpus", "stdlib", "--block_size", "512", "--train_stride", "256", "--hidden_size", "1024",
            "--num_layers", "10", "--num_heads", "16", "--intermediate_size", "2816", "--max_steps", "1500",
            "--warmup_steps", "100", "--learning_rate", "1e-3", "--per_device_train_batch_size", "32",
            "--per_device_eval_batch_size", "32", "--windows", "100,200", "--decay_shapes", "linear",
            "--logging_steps", "50", "--merge_rules", *PAPER_RULES,
        ),
        True,
        bf16_on_cuda=True,
    ),
}  # fmt: skip


def settings(size: str, extra: list[str]):
    """The `decay_merge.py` settings of a size, ``extra`` arguments overriding the preset's."""
    preset = SIZES[size]
    bf16 = ["--bf16", "True"] if preset.bf16_on_cuda and torch.cuda.is_available() else []
    args, ex, windows = parse_args([*preset.argv, *bf16, *extra])
    if preset.window_samples_only and "--pma_start_step" not in extra:
        args = dataclasses.replace(args, pma_start_step=args.max_steps - windows[-1], pma_save=False)
    return args, ex, windows


def gpu_evaluate(args):
    """``evaluate(model, val_ds)`` on the training device, in bf16 autocast when the run trains in bf16."""
    device = args.device

    def evaluate(model, val_ds) -> float:
        model.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(args.bf16)):
            return validation_loss(model, val_ds)

    return evaluate


def estimate(args, ex, windows: list[int], tflops: float, corpus_bytes: int) -> dict:
    """Seconds the run should take on a GPU that sustains ``tflops`` bf16 TFLOP/s, from its FLOPs and bytes.

    Training: 6 FLOPs per parameter and token plus 12 * layers * block * width for attention, and 15 ms of
    Trainer overhead per step; evaluation: a third of that per validation token. Files written at 2 GB/s
    (samples, the fork checkpoints with their AdamW state, merged folders); merges read their inputs at
    1.5 GB/s (0.56 GB/s measured on 2 busy CPU cores; the fold uses up to 4 threads); 30 s of start-up.
    """
    config = model_config(ex)
    n = count_params(config)  # the tied embedding counted once: as the LM head (the lookup costs no FLOPs)
    per_token = 6 * n + 12 * ex.num_layers * ex.block_size * ex.hidden_size
    tokens_per_step = args.per_device_train_batch_size * ex.block_size
    shapes = len(ex.decay_shapes.split(","))
    steps = args.max_steps + sum(windows) * shapes
    rules = len(scored_rules(ex))
    evals = 1 + len(windows) * (rules + shapes)
    interleave, model_bytes = args.pma_interleave_step, 4 * n
    stored = windows[-1] // interleave if args.pma_start_step else args.max_steps // interleave
    written = model_bytes * (stored + 3 * len(windows) + len(windows) * rules + 1)
    merged_inputs = sum(w // interleave for w in windows) * rules + windows[-1] // interleave
    parts = {
        "train_s": steps * (per_token * tokens_per_step / (tflops * 1e12) + 0.015),
        "eval_s": evals * corpus_bytes * ex.val_fraction * per_token / 3 / (tflops * 1e12),
        "write_s": written / 2e9,
        "merge_s": merged_inputs * model_bytes / 1.5e9,
        "startup_s": 30.0,
    }
    found = {"params": n, "train_steps": steps, "tokens_per_step": tokens_per_step, "flops_per_token": per_token}
    return {**found, **parts, "total_s": sum(parts.values())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), required=True)
    parser.add_argument("--estimate", type=float, metavar="TFLOPS", help="Print the time estimate; run nothing.")
    known, extra = parser.parse_known_args(argv)
    if "--output_dir" not in extra:
        extra += ["--output_dir", f"runs/paper_scale_{known.size}"]
    args, ex, windows = settings(known.size, extra)
    if known.estimate:
        found = estimate(args, ex, windows, known.estimate, len(load_corpus(ex.corpus, ex.max_corpus_bytes)))
        print("\n".join(f"{k}: {v:,.1f}" if isinstance(v, float) else f"{k}: {v:,}" for k, v in found.items()))
        return found
    return experiment(
        args,
        ex,
        windows,
        argv,
        evaluate=gpu_evaluate(args),
        script="examples.paper_scale",
        plot_name="paper_scale.png",
    )


if __name__ == "__main__":
    main()
