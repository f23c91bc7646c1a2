#!/usr/bin/env python
"""Does a merge of constant-LR samples reach a real LR decay? Merges of several rules and windows against decays.

One run of the small byte-level Llama of `pretrain_pma.py` (same corpus, optimizer and data) trains with warm-up
then a constant learning rate to step T, keeping every PMA sample as a model-only folder
(``pma-samples/step-N``, the sample store) and a full checkpoint at each fork step T - L. Then:

* real decays: for each window length L and each shape (linear, cosine, 1-sqrt), a fork resumes the
  step T-L checkpoint (same optimizer state, same data order) and decays the LR to 0 over its last L
  steps, ending at step T: the same steps and data as the constant run;
* merges: `pmakit.sweep` merges the samples of the last L steps with SMA, EMA (pmakit's, starting at the
  first sample), the bias-corrected EMA, WMA, decay-cosine and decay-1-sqrt (WSM: the merge dual to a
  decay of that shape), and scores each on the same validation bytes.

The report gives each merge's share of each decay's gain, (live - merge) / (live - decay), as a table
(markdown) and a plot. `sma` is the merge dual to the linear decay, `decay:cosine` to the cosine one and
`decay:1-sqrt` to the 1-sqrt one.

    python -m examples.decay_merge --output_dir runs/decay_merge --report_md docs/decay_merge.md \\
        --plot docs/decay_merge.png
"""

from __future__ import annotations

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
from examples.common import ByteModelArguments, save_figure, write_summary
from examples.pretrain_pma import TRAINING_DEFAULTS
from pmakit import PmaArguments, PmaTrainer, sweep


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DECAY_SHAPES = ("linear", "cosine", "1-sqrt")
MERGE_RULES = ("sma", "ema", "ema_corrected", "wma", "decay:cosine", "decay:1-sqrt")
DUAL = {"sma": "linear", "decay:cosine": "cosine", "decay:1-sqrt": "1-sqrt"}
DEFAULTS = {
    **TRAINING_DEFAULTS,
    "output_dir": "runs/decay_merge",
    "max_steps": 600,
    "eval_strategy": "no",
    "pma_interleave_step": 10,
    "pma_fused_num": 5,
    "pma_eval": False,
    "pma_sample_store": True,
}


@dataclass
class DecayArguments(ByteModelArguments):
    """Data, model and experiment settings (the model is smaller than pretrain_pma's, to fit ~10 CPU minutes)."""

    hidden_size: int = field(default=128, metadata={"help": "Model width."})
    intermediate_size: int = field(default=384, metadata={"help": "SwiGLU width."})
    windows: str = field(
        default="50,100,200", metadata={"help": "Window lengths L in steps (multiples of interleave)."}
    )
    decay_shapes: str = field(
        default="linear,cosine,1-sqrt",
        metadata={"help": "Real decays to fork, comma-separated (of linear, cosine, 1-sqrt)."},
    )
    ema_alpha: float = field(default=0.2, metadata={"help": "EMA weight of the newest sample for both EMA forms."})
    report_md: str | None = field(default=None, metadata={"help": "Markdown report (default output_dir/results.md)."})
    plot: str | None = field(default=None, metadata={"help": "PNG plot (default output_dir/decay_merge.png)."})


class SaveAtSteps(TrainerCallback):
    """Save a full checkpoint (weights and optimizer state) at exactly the fork steps, and nowhere else."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        control.should_save = state.global_step in self.steps
        return control


def parse_args(argv: list[str] | None) -> tuple[PmaArguments, DecayArguments, list[int]]:
    parser = HfArgumentParser((PmaArguments, DecayArguments))
    parser.set_defaults(**DEFAULTS)
    args, ex = parser.parse_args_into_dataclasses(args=argv)
    windows = sorted({int(w) for w in ex.windows.split(",") if w.strip()})
    interleave = args.pma_interleave_step
    for w in windows:
        if w % interleave or w <= 0 or w >= args.max_steps - args.warmup_steps:
            raise ValueError(
                f"--windows: {w} must be a positive multiple of --pma_interleave_step ({interleave}) that starts "
                f"after the warm-up ({args.warmup_steps} of {args.max_steps} steps)."
            )
    shapes = tuple(s.strip() for s in ex.decay_shapes.split(",") if s.strip())
    unknown = sorted(set(shapes) - set(DECAY_SHAPES))
    if unknown or not shapes:
        raise ValueError(f"--decay_shapes: {unknown or 'none given'}; choose from {', '.join(DECAY_SHAPES)}.")
    ex = dataclasses.replace(ex, decay_shapes=",".join(s for s in DECAY_SHAPES if s in shapes))
    limit = windows[-1] // interleave
    args = dataclasses.replace(args, save_strategy="no", pma_sample_store_limit=limit)
    return args, ex, windows


def constant_run(args, ex, config, train_ds, windows) -> Path:
    """Train at a constant LR to step T, storing the samples and a checkpoint at each fork step T - L."""
    set_seed(args.seed)
    trainer = PmaTrainer(
        model=LlamaForCausalLM(config),
        args=args,
        train_dataset=train_ds,
        processing_class=byte_tokenizer(),
        callbacks=[SaveAtSteps({args.max_steps - w for w in windows})],
    )
    trainer.train()
    return Path(args.output_dir)


def decay_fork(args, config, train_ds, run: Path, window: int, shape: str):
    """Resume the step T-L checkpoint and decay the LR to 0 over the last L steps with ``shape``."""
    steps = args.max_steps
    warmup = args.warmup_steps
    fork_args = dataclasses.replace(
        args,
        output_dir=str(run / f"decay-{shape}-{window}"),
        lr_scheduler_type="warmup_stable_decay",
        lr_scheduler_kwargs={
            "num_stable_steps": steps - window - warmup,
            "num_decay_steps": window,
            "decay_type": shape,
        },
        save_strategy="no",
    )
    trainer = Trainer(model=LlamaForCausalLM(config), args=fork_args, train_dataset=train_ds)
    trainer.train(resume_from_checkpoint=str(run / f"checkpoint-{steps - window}"))
    return trainer.model


def share(live: float, merged: float, decayed: float) -> float | None:
    """(live - merged) / (live - decayed): the share of the decay's gain that the merge recovers."""
    gain = live - decayed
    return (live - merged) / gain if gain > 0 else None


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def tables(live: float, decays: dict, merges: dict, windows: list[int], interleave: int, shapes=DECAY_SHAPES) -> str:
    """The markdown report tables: losses per window, then each merge's share of each decay's gain."""
    head = "| window (steps / samples) | " + " | ".join(f"{w} / {w // interleave}" for w in windows) + " |"
    sep = "|---|" + "---|" * len(windows)
    lines = [head, sep, "| live, constant LR (step T) | " + " | ".join(f"{live:.4f}" for _ in windows) + " |"]
    for shape in shapes:
        lines.append(f"| decay {shape} | " + " | ".join(f"{decays[shape, w]:.4f}" for w in windows) + " |")
    for rule in MERGE_RULES:
        lines.append(f"| merge {rule} | " + " | ".join(f"{merges[rule, w]:.4f}" for w in windows) + " |")
    lines += ["", "| window | merge | " + " | ".join(f"share of {s} decay" for s in shapes) + " |"]
    lines.append("|---|---|" + "---|" * len(shapes))
    for w in windows:
        for rule in MERGE_RULES:
            cells = []
            for shape in shapes:
                cell = _pct(share(live, merges[rule, w], decays[shape, w]))
                cells.append(f"**{cell}**" if DUAL.get(rule) == shape else cell)
            lines.append(f"| {w} | {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_plot(
    path: Path, live: float, decays: dict, merges: dict, windows: list[int], title: str, shapes=DECAY_SHAPES
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.4), dpi=120)
    ax.axhline(live, color="black", lw=1, label="live, constant LR")
    for shape, color in zip(DECAY_SHAPES, ("tab:blue", "tab:orange", "tab:green"), strict=True):
        if shape not in shapes:
            continue
        ax.plot(windows, [decays[shape, w] for w in windows], "s--", color=color, label=f"decay {shape}")
    # each merge in its dual decay's colour; the rules without a dual decay in colours of their own
    colors = {"sma": "tab:blue", "decay:cosine": "tab:orange", "decay:1-sqrt": "tab:green"}
    colors |= {"ema": "tab:red", "ema_corrected": "tab:purple", "wma": "tab:brown"}
    for rule in MERGE_RULES:
        ax.plot(windows, [merges[rule, w] for w in windows], "o-", color=colors[rule], label=f"merge {rule}")
    ax.set_xlabel("window L (steps): decay length = merge span")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(windows, [str(w) for w in windows])
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def run_merges(
    run: Path, windows: list[int], interleave: int, alpha: float, val_ds, evaluate=validation_loss
) -> tuple[dict, object]:
    """Every rule over every window, scored on the validation bytes by ``evaluate(model, val_ds)``, through
    `pmakit.sweep`."""

    def score(folder: Path) -> float:
        return evaluate(AutoModelForCausalLM.from_pretrained(folder), val_ds)

    result = sweep(
        run,
        MERGE_RULES,
        [w // interleave for w in windows],
        score=score,
        output_dir=run / "sweep",
        metric="val loss (nats/byte)",
        alpha=alpha,
        source="samples",
        overwrite=True,
    )
    return {(r.rule, r.window * interleave): r.score for r in result.rows}, result


def model_config(ex: DecayArguments):
    """The Llama that the settings describe."""
    return ex.model_config()


def count_params(config) -> int:
    """Parameters of the Llama of ``config`` (tied embeddings once), counted without allocating the weights."""
    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(config).parameters())


def main(argv: list[str] | None = None) -> dict:
    args, ex, windows = parse_args(argv)
    return experiment(args, ex, windows, argv)


def experiment(
    args,
    ex,
    windows: list[int],
    argv: list[str] | None,
    *,
    evaluate=validation_loss,
    script: str = "examples.decay_merge",
    plot_name: str = "decay_merge.png",
) -> dict:
    """The constant run, the sweep of merges and the decay forks, then the report, plot and ``results.json``.

    ``evaluate(model, val_ds) -> loss`` scores every model (default: `validation_loss` where the model lies);
    `paper_scale.py` passes one that moves the model to the GPU under bf16 autocast.
    """
    started = time.perf_counter()
    data = load_corpus(ex.corpus, ex.max_corpus_bytes)
    train_bytes, val_bytes = split_corpus(data, ex.val_fraction)
    train_ds = ByteBlocks(train_bytes, ex.block_size, ex.train_stride)
    val_ds = ByteBlocks(val_bytes, ex.block_size).truncate(args.per_device_eval_batch_size)
    config = model_config(ex)
    interleave, steps = args.pma_interleave_step, args.max_steps
    print(f"corpus {ex.corpus!r}: {len(train_bytes)} training and {len(val_bytes)} validation bytes", flush=True)

    run = constant_run(args, ex, config, train_ds, windows)
    train_s = time.perf_counter() - started
    live = evaluate(AutoModelForCausalLM.from_pretrained(run / "pma-samples" / f"step-{steps}"), val_ds)
    t0 = time.perf_counter()
    merges, result = run_merges(run, windows, interleave, ex.ema_alpha, val_ds, evaluate)
    sweep_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    decays = {}
    shapes = tuple(ex.decay_shapes.split(","))
    for w in windows:
        for shape in shapes:
            decays[shape, w] = evaluate(decay_fork(args, config, train_ds, run, w, shape), val_ds)
            print(f"decay {shape} over the last {w} steps: {decays[shape, w]:.4f}", flush=True)
    forks_s = time.perf_counter() - t0
    total_s = time.perf_counter() - started

    text = tables(live, decays, merges, windows, interleave, shapes)
    print("\n" + text + "\n", flush=True)
    n_params = count_params(config)
    title = (
        f"{n_params / 1e6:.1f}M-param Llama, byte-level '{ex.corpus}', {steps} steps, LR {args.learning_rate:g} "
        f"constant; samples every {interleave} steps"
    )
    plot_path = Path(ex.plot) if ex.plot else run / plot_name
    write_plot(plot_path, live, decays, merges, windows, title, shapes)
    timing = {"train_s": train_s, "sweep_s": sweep_s, "decay_forks_s": forks_s, "total_s": total_s}
    report_path = Path(ex.report_md) if ex.report_md else run / "results.md"
    write_report(report_path, argv, text, title, timing, ex.ema_alpha, result, script)
    summary = {
        "live": live,
        "decays": {f"{s}@{w}": v for (s, w), v in decays.items()},
        "merges": {f"{r}@{w}": v for (r, w), v in merges.items()},
        "timing": timing,
    }
    return write_summary(run, summary, report_path, plot_path, f"total {total_s:.0f} s")


def write_report(
    path: Path, argv, table: str, title: str, timing: dict, alpha: float, result, script="examples.decay_merge"
) -> None:
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
    machine += f"{torch.get_num_threads()} torch threads"
    if torch.cuda.is_available():
        machine += f", GPU {torch.cuda.get_device_name()}"
    if hasattr(os, "getloadavg"):
        machine += f", load average {os.getloadavg()[2]:.1f} (15 min) at the end"
    command = f"python -m {script} " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Merging constant-LR samples against real LR decays: results",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"Setup: {title}. Validation loss in nats/byte on the same held-out bytes for every model. "
        "Decay forks resume the step T-L checkpoint and decay the LR to 0 over the last L steps; merges "
        f"take the samples of the last L steps (both EMA forms with alpha {alpha:g}). Bold: the merge dual to "
        "that decay (WSM).",
        "",
        table,
        "",
        f"Best merge by the sweep: {result.best.rule} over {result.best.window} samples.",
        "",
        "## Run time",
        "",
        f"- machine: {machine}",
        *[f"- {k}: {v:.1f}" for k, v in timing.items()],
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    main()
