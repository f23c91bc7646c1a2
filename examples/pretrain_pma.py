#!/usr/bin/env python
"""PMA in miniature: merging constant-LR checkpoints predicts what an LR decay would give.

A ~2M-parameter Llama is pre-trained from scratch on a real byte-level corpus that ships with
Python (see `bytelm.py`), with warm-up then a constant learning rate, by `PmaTrainer` with PMA in
shadow mode (``pma_write_back`` off: training is untouched). At the end the script compares, on
the same validation bytes:

* the last live weights (step T);
* the PMA merge written by the trainer (``pma/``, SMA of the last ``pma_fused_num`` samples);
* other averaging rules (EMA, WMA) over exactly the same samples, recorded during training;
* the "annealed" model: a fork resumed from the step-T checkpoint (same optimizer state, same
  data order) that decays the learning rate linearly to 0 over ``decay_steps`` more steps;

and prints the share of the decay's gain that PMA recovers for free: (live - PMA) / (live - annealed).

    python -m examples.pretrain_pma --output_dir runs/pretrain_pma
    python -m examples.pretrain_pma --output_dir runs/x --max_steps 400 --pma_interleave_step 10 --learning_rate 1e-3

Every `PmaArguments` / `TrainingArguments` flag works, plus the `ExampleArguments` below
(``--help`` lists them all).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, HfArgumentParser, LlamaForCausalLM, Trainer, TrainerCallback, set_seed

from examples.bytelm import ByteBlocks, byte_tokenizer, load_corpus, split_corpus, validation_loss
from examples.common import TRAINER_DEFAULTS, ByteModelArguments, save_figure, write_summary
from pmakit import AveragingRule, PmaArguments, PmaConfig, PmaTrainer


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The example's defaults for the Trainer and PMA settings (any of them can be changed on the command line).
TRAINING_DEFAULTS = dict(
    TRAINER_DEFAULTS,
    output_dir="runs/pretrain_pma",
    max_steps=800,
    learning_rate=3e-3,
    warmup_steps=100,
    lr_scheduler_type="constant_with_warmup",
    logging_steps=50,
    eval_strategy="steps",
    eval_steps=100,
    pma_fused_algo="sma",
    pma_interleave_step=20,
    pma_fused_num=10,
    pma_eval=True,
    pma_write_back=False,
)


@dataclass
class ExampleArguments(ByteModelArguments):
    """Data, model and comparison settings of the example."""

    compare_algos: str = field(
        default="ema,wma",
        metadata={
            "help": "Other rules scored over the same samples as the trainer's merge: "
            "comma-separated of sma, ema, wma."
        },
    )
    decay_steps: int = field(default=100, metadata={"help": "Length of the linear LR decay of the annealed fork."})
    long_decay_steps: int = field(
        default=200,
        metadata={"help": "If > 0, a second, longer annealed fork with this many decay steps (0: skip it)."},
    )
    report_md: str | None = field(
        default=None, metadata={"help": "Markdown report path (default: output_dir/results.md)."}
    )
    plot: str | None = field(default=None, metadata={"help": "PNG plot path (default: output_dir/pretrain_pma.png)."})


class SampleRecorder(TrainerCallback):
    """Keeps a CPU copy of the weights at each PMA sample step, so other rules can be scored on the same samples."""

    def __init__(self, config: PmaConfig, keep: int) -> None:
        self.config = config
        self.keep = keep
        self.samples: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if self.config.is_sample_step(step):
            self.samples[step] = {
                n: p.detach().to("cpu", torch.float32, copy=True) for n, p in model.named_parameters()
            }
            for old in sorted(self.samples)[: max(0, len(self.samples) - self.keep)]:
                del self.samples[old]


def averaged_model(template, samples: list[dict[str, torch.Tensor]], weights: list[float]):
    """A copy of ``template`` holding sum_i w_i * samples[i], computed in fp64."""
    model = copy.deepcopy(template)
    with torch.no_grad():
        for name, param in model.named_parameters():
            total = sum(w * s[name].double() for w, s in zip(weights, samples, strict=True))
            param.copy_(total.to(param.dtype))
    return model


def parse_args(argv: list[str] | None = None) -> tuple[PmaArguments, ExampleArguments]:
    parser = HfArgumentParser((PmaArguments, ExampleArguments))
    parser.set_defaults(**TRAINING_DEFAULTS)
    args, ex = parser.parse_args_into_dataclasses(args=argv)
    # The annealed fork resumes from the step-T checkpoint, so exactly that one (with optimizer state) is saved.
    args = dataclasses.replace(args, save_strategy="steps", save_steps=args.max_steps, save_only_model=False)
    return args, ex


def log_points(history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(entry["step"], entry[key]) for entry in history if key in entry]


def annealed_fork(config, args: PmaArguments, checkpoint: Path, decay_steps: int, train_ds, val_ds, tag: str):
    """Resume the step-T checkpoint with the same data order and optimizer state, decaying the LR to 0."""
    steps = args.max_steps
    warmup = args.warmup_steps if args.warmup_steps >= 1 else int(args.warmup_steps * steps)
    fork_args = dataclasses.replace(
        args,
        output_dir=str(Path(args.output_dir) / tag),
        max_steps=steps + decay_steps,
        lr_scheduler_type="warmup_stable_decay",
        lr_scheduler_kwargs={
            "num_stable_steps": steps - warmup,
            "num_decay_steps": decay_steps,
            "decay_type": "linear",
        },
        save_strategy="no",
    )
    model = LlamaForCausalLM(config)
    trainer = Trainer(model=model, args=fork_args, train_dataset=train_ds, eval_dataset=val_ds)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return trainer.model, trainer.state.log_history


def write_plot(path: Path, live, pma, forks, cycle_steps: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(*zip(*live, strict=True), "o-", color="tab:blue", label="live weights (constant LR)", markersize=3)
    full = [(s, v) for s, v in pma if s % cycle_steps == 0]
    part = [(s, v) for s, v in pma if s % cycle_steps != 0]
    if full:
        ax.plot(*zip(*full, strict=True), "s-", color="tab:red", label="PMA merge (cycle end)", markersize=5)
    if part:
        ax.plot(*zip(*part, strict=True), "x", color="tab:red", alpha=0.6, label="PMA running average (mid-cycle)")
    colors = ("tab:green", "tab:olive")[: len(forks)]  # zero, one or two annealed forks
    for (label, points), color in zip(forks, colors, strict=True):
        ax.plot(*zip(*points, strict=True), "^-", color=color, label=label, markersize=4)
    # Zoom on the stable phase: the first third (fast early descent) would flatten the interesting part.
    zoom = live[-1][0] / 3 if live else 0
    values = [v for s, v in [*live, *pma, *(p for _, pts in forks for p in pts)] if s >= zoom]
    if values:
        lo, hi = min(values), max(values)
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-6), hi + 0.6 * (hi - lo + 1e-6))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    args, ex = parse_args(argv)
    started = time.perf_counter()
    out = Path(args.output_dir)
    cfg = args.pma_config
    algos = [a.strip() for a in ex.compare_algos.split(",") if a.strip()]
    for algo in algos:
        if algo not in ("sma", "ema", "wma"):
            raise ValueError(f"--compare_algos: {algo!r} is not one of sma, ema, wma.")

    data = load_corpus(ex.corpus, ex.max_corpus_bytes)
    train_bytes, val_bytes = split_corpus(data, ex.val_fraction)
    train_ds = ByteBlocks(train_bytes, ex.block_size, ex.train_stride)
    # Whole evaluation batches only, so that the Trainer's mean of batch means equals the per-byte mean.
    val_ds = ByteBlocks(val_bytes, ex.block_size).truncate(args.per_device_eval_batch_size)
    tokenizer = byte_tokenizer()

    set_seed(args.seed)
    config = ex.model_config()
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"corpus {ex.corpus!r}: {len(train_bytes):,} train / {len(val_bytes):,} validation bytes; "
        f"model {n_params / 1e6:.2f}M parameters; torch threads {torch.get_num_threads()}",
        flush=True,
    )

    recorder = SampleRecorder(cfg, keep=2 * cfg.fused_num)
    trainer = PmaTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=tokenizer,
        callbacks=[recorder],
    )
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    steps = trainer.state.global_step
    history = list(trainer.state.log_history)
    merged_steps = list(trainer.pma_engine.counters["merged_steps"]) or list(
        trainer.pma_engine.counters["sample_steps"]
    )
    live = trainer.model

    # The trainer's own merge, loaded back from disk the way a user would (PMA-init uses the same folder).
    pma_dir = out / "pma"
    pma_model = AutoModelForCausalLM.from_pretrained(pma_dir).to(live.device)
    samples = [recorder.samples[s] for s in merged_steps]

    # Cross-check the exported folder against an fp64 SMA of the recorded samples: they must agree.
    trainer_rule = cfg.rule
    reference = averaged_model(live, samples, trainer_rule.weights_for(len(samples)))
    exported = dict(pma_model.named_parameters())
    check = max((p.detach() - exported[n].detach()).abs().max().item() for n, p in reference.named_parameters())
    del reference
    if check > 1e-5:
        raise AssertionError(f"pma/ differs from the recorded samples' {trainer_rule.describe()} by {check:.3g}.")

    t0 = time.perf_counter()
    rows = [("live weights", f"step {steps}", validation_loss(live, val_ds))]
    window = f"{len(merged_steps)} samples, steps {merged_steps[0]}-{merged_steps[-1]} every {cfg.interleave_step}"
    rows.append((f"PMA {trainer_rule.describe()} (`pma/`)", window, validation_loss(pma_model, val_ds)))
    for algo in algos:
        rule = AveragingRule(algo, cfg.ema_alpha)
        if rule == trainer_rule:
            continue
        merged = averaged_model(live, samples, rule.weights_for(len(samples)))
        rows.append((f"PMA {rule.describe()}", window, validation_loss(merged, val_ds)))
    eval_s = time.perf_counter() - t0

    checkpoint = out / f"checkpoint-{steps}"
    forks, fork_points, fork_s = [], [], 0.0
    for decay in [d for d in (ex.decay_steps, ex.long_decay_steps) if d > 0]:
        t0 = time.perf_counter()
        fork_model, fork_history = annealed_fork(
            config, args, checkpoint, decay, train_ds, val_ds, f"annealed-{decay}"
        )
        fork_s += time.perf_counter() - t0
        loss = validation_loss(fork_model, val_ds)
        forks.append((f"annealed: +{decay} steps, LR linear to 0", f"steps {steps + 1}-{steps + decay}", loss))
        # The resumed state carries the whole run's log: keep the fork's own evaluations, end on its final score.
        middle = [(s, v) for s, v in log_points(fork_history, "eval_loss") if steps < s < steps + decay]
        points = [(steps, rows[0][2]), *middle, (steps + decay, loss)]
        fork_points.append((f"annealed fork (+{decay} steps, linear decay)", points))
    total_s = time.perf_counter() - started

    live_loss = rows[0][2]
    gain = live_loss - forks[0][2] if forks else None
    table = ["| model | weights | val loss (nats/byte) | vs live | share of decay gain |", "|---|---|---|---|---|"]
    for i, (name, what, loss) in enumerate(rows + forks):
        delta = "" if i == 0 else f"{loss - live_loss:+.4f}"
        share = f"{(live_loss - loss) / gain:.0%}" if gain and gain > 0 and 0 < i < len(rows) else ""
        table.append(f"| {name} | {what} | {loss:.4f} | {delta} | {share} |")
    table_text = "\n".join(table)
    print("\n" + table_text + "\n", flush=True)
    if forks:
        print(f"Share of decay gain = (live - PMA) / (live - annealed), with the {ex.decay_steps}-step decay.")

    live_curve = log_points(history, "eval_loss")
    pma_curve = log_points(history, "eval_pma_loss")
    plot_path = Path(ex.plot) if ex.plot else out / "pretrain_pma.png"
    title = f"{n_params / 1e6:.1f}M-param Llama, byte-level '{ex.corpus}', LR {args.learning_rate:g} constant"
    write_plot(plot_path, live_curve, pma_curve, fork_points, cfg.cycle_steps, title)

    settings = {
        "corpus": ex.corpus,
        "train_bytes": len(train_bytes),
        "val_bytes": len(val_bytes),
        "parameters": n_params,
        "model": f"Llama d={ex.hidden_size}, {ex.num_layers} layers, {ex.num_heads} heads, "
        f"ffn {ex.intermediate_size}, "
        f"vocab {config.vocab_size}, tied embeddings",
        "tokens_per_step": args.per_device_train_batch_size * args.gradient_accumulation_steps * ex.block_size,
        "max_steps": steps,
        "schedule": f"{getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)}, "
        f"peak LR {args.learning_rate:g}, warm-up {args.warmup_steps}",
        "optimizer": f"{getattr(args.optim, 'value', args.optim)}, betas ({args.adam_beta1}, {args.adam_beta2}), "
        f"weight decay {args.weight_decay}, "
        f"clip {args.max_grad_norm}",
        "pma": f"{cfg.fused_algo}, fused_num {cfg.fused_num}, interleave_step {cfg.interleave_step}, "
        f"ema_alpha {cfg.ema_alpha}, write_back {cfg.write_back}",
        "seed": args.seed,
    }
    timing = {
        "train_s": round(train_s, 1),
        "scoring_s": round(eval_s, 1),
        "annealed_forks_s": round(fork_s, 1),
        "total_s": round(total_s, 1),
    }
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, " + (
        "CUDA" if torch.cuda.is_available() and not args.use_cpu else f"{torch.get_num_threads()} torch threads"
    )
    if hasattr(os, "getloadavg"):  # other processes slow a CPU run down: say how busy the machine was
        machine += f", load average {os.getloadavg()[2]:.1f} over the last 15 min at the end"
    command = "python -m examples.pretrain_pma " + " ".join(argv if argv is not None else sys.argv[1:])
    report = [
        "# PMA pre-training example: results",
        "",
        f"Command: `{command.strip()}`",
        "",
        table_text,
        "",
        "Share of decay gain = (live - PMA) / (live - annealed); the annealed model resumes the step-"
        f"{steps} checkpoint (same optimizer state and data order) and decays the LR linearly to 0.",
        "",
        "## Settings",
        "",
        *[f"- {k}: {v}" for k, v in settings.items()],
        "",
        "## Run time",
        "",
        f"- machine: {machine}",
        *[f"- {k}: {v}" for k, v in timing.items()],
        "",
        "## Validation loss during training",
        "",
        "| step | live | PMA |",
        "|---|---|---|",
        *[f"| {s} | {v:.4f} | {dict(pma_curve).get(s, float('nan')):.4f} |" for s, v in live_curve],
        "",
    ]
    report_path = Path(ex.report_md) if ex.report_md else out / "results.md"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text("\n".join(report), encoding="utf-8")
    summary = {
        "rows": [{"model": n, "weights": w, "val_loss": v} for n, w, v in rows + forks],
        "share_of_decay_gain": {n: (live_loss - v) / gain for n, _, v in rows[1:]} if gain and gain > 0 else {},
        "live_curve": live_curve,
        "pma_curve": pma_curve,
        "fork_curves": dict(fork_points),
        "settings": settings,
        "timing": timing,
        "pma_check_max_abs_diff": check,
    }
    return write_summary(out, summary, report_path, plot_path, f"total {total_s:.0f} s (training {train_s:.0f} s)")


if __name__ == "__main__":
    main()
