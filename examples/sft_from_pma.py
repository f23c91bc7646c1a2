#!/usr/bin/env python
"""PMA-init: start a further training run from the merged weights (`pma/`) instead of the last checkpoint.

Run `pretrain_pma.py` first. This script then trains two identical continued-training runs on a
different data mix (by default the standard library's docstrings instead of the language
reference), one initialised from the pre-training run's PMA merge and one from its last live
checkpoint, both loaded with `from_pretrained`, with the same seed, data order and schedule.
It prints the validation loss of both side by side during training, the loss on the original
pre-training data at the end (forgetting), and the gradient norms (the paper reports a steadier
GradNorm under PMA-init).

    python -m examples.pretrain_pma --output_dir runs/pretrain_pma
    python -m examples.sft_from_pma --run_dir runs/pretrain_pma --output_dir runs/sft_from_pma

Every `TrainingArguments` flag works, plus the `InitArguments` below (``--help`` lists them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, Trainer, TrainingArguments, set_seed

from examples.bytelm import ByteBlocks, load_corpus, split_corpus, validation_loss
from examples.common import TRAINER_DEFAULTS, StartingPoints, newest_checkpoint


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TRAINING_DEFAULTS = dict(
    TRAINER_DEFAULTS,
    output_dir="runs/sft_from_pma",
    max_steps=200,
    learning_rate=1e-3,
    warmup_steps=20,
    lr_scheduler_type="cosine",
    logging_steps=5,
    eval_strategy="steps",
    eval_steps=25,
    save_strategy="no",
)


@dataclass
class InitArguments(StartingPoints):
    """Where the two starting points come from, and the continued-training data."""

    corpus: str = field(default="docstrings", metadata={"help": "Continued-training corpus (see bytelm.py)."})
    max_corpus_bytes: int | None = field(default=400_000, metadata={"help": "Use at most this many corpus bytes."})
    pretrain_corpus: str = field(
        default="topics", metadata={"help": "The pre-training corpus, to measure forgetting on its validation part."}
    )
    pretrain_max_corpus_bytes: int | None = field(default=None, metadata={"help": "As --max_corpus_bytes, for it."})
    val_fraction: float = field(default=0.1, metadata={"help": "Share of each corpus held out for validation."})
    block_size: int | None = field(default=None, metadata={"help": "Sequence length (default: the model's maximum)."})
    train_stride: int = field(default=64, metadata={"help": "Bytes between the starts of training windows."})
    report_md: str | None = field(
        default=None, metadata={"help": "Markdown report path (default: output_dir/results.md)."}
    )


def parse_args(argv: list[str] | None = None) -> tuple[TrainingArguments, InitArguments]:
    parser = HfArgumentParser((TrainingArguments, InitArguments))
    parser.set_defaults(**TRAINING_DEFAULTS)
    return parser.parse_args_into_dataclasses(args=argv)


def grad_norm_stats(history: list[dict]) -> dict:
    norms = [entry["grad_norm"] for entry in history if "grad_norm" in entry]
    if not norms:
        return {"mean": float("nan"), "max": float("nan"), "std": float("nan")}
    return {"mean": statistics.fmean(norms), "max": max(norms), "std": statistics.pstdev(norms)}


def continue_training(init_dir: Path, args: TrainingArguments, tag: str, train_ds, val_ds, old_val_ds) -> dict:
    """One continued-training run from ``init_dir``; everything but the initial weights is identical."""
    set_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(init_dir)
    tokenizer = AutoTokenizer.from_pretrained(init_dir)
    start = validation_loss(model, val_ds)
    run_args = dataclasses.replace(args, output_dir=str(Path(args.output_dir) / tag))
    trainer = Trainer(
        model=model, args=run_args, train_dataset=train_ds, eval_dataset=val_ds, processing_class=tokenizer
    )
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    trainer.save_model(run_args.output_dir)
    history = trainer.state.log_history
    curve = [(0, start)] + [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
    return {
        "init": str(init_dir),
        "curve": curve,
        "final_val_loss": validation_loss(trainer.model, val_ds),
        "pretrain_val_loss_before": validation_loss(AutoModelForCausalLM.from_pretrained(init_dir), old_val_ds),
        "pretrain_val_loss_after": validation_loss(trainer.model, old_val_ds),
        "grad_norm": grad_norm_stats(history),
        "train_s": seconds,
    }


def main(argv: list[str] | None = None) -> dict:
    args, ia = parse_args(argv)
    run_dir = Path(ia.run_dir)
    pma_dir = Path(ia.pma_dir) if ia.pma_dir else run_dir / "pma"
    live_dir = Path(ia.live_dir) if ia.live_dir else newest_checkpoint(run_dir)
    for name, folder in (("--pma_dir", pma_dir), ("--live_dir", live_dir)):
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{name} {folder} is not a model folder (no config.json); run pretrain_pma.py first."
            )

    from transformers import AutoConfig

    block_size = ia.block_size or AutoConfig.from_pretrained(pma_dir).max_position_embeddings
    train_bytes, val_bytes = split_corpus(load_corpus(ia.corpus, ia.max_corpus_bytes), ia.val_fraction)
    _, old_val_bytes = split_corpus(load_corpus(ia.pretrain_corpus, ia.pretrain_max_corpus_bytes), ia.val_fraction)
    train_ds = ByteBlocks(train_bytes, block_size, ia.train_stride)
    # Whole evaluation batches only, so that the Trainer's eval_loss is the same per-byte mean as step 0's score.
    val_ds = ByteBlocks(val_bytes, block_size).truncate(args.per_device_eval_batch_size)
    old_val_ds = ByteBlocks(old_val_bytes, block_size)
    print(
        f"continued training on {ia.corpus!r}: {len(train_bytes):,} train / {len(val_bytes):,} validation bytes; "
        f"from PMA {pma_dir} vs live {live_dir}",
        flush=True,
    )

    results = {
        "live-init": continue_training(live_dir, args, "from_live", train_ds, val_ds, old_val_ds),
        "pma-init": continue_training(pma_dir, args, "from_pma", train_ds, val_ds, old_val_ds),
    }
    live, pma = results["live-init"], results["pma-init"]
    pma_curve = dict(pma["curve"])
    lines = [
        "| step | from live checkpoint | from PMA (`pma/`) | PMA - live |",
        "|---|---|---|---|",
    ]
    for step, value in live["curve"]:
        other = pma_curve.get(step)
        if other is not None:
            lines.append(f"| {step} | {value:.4f} | {other:.4f} | {other - value:+.4f} |")
    lines += [
        "",
        "| at the end | from live checkpoint | from PMA (`pma/`) |",
        "|---|---|---|",
        f"| new-data validation loss | {live['final_val_loss']:.4f} | {pma['final_val_loss']:.4f} |",
        f"| pre-training validation loss, before -> after | {live['pretrain_val_loss_before']:.4f} -> "
        f"{live['pretrain_val_loss_after']:.4f} | {pma['pretrain_val_loss_before']:.4f} -> "
        f"{pma['pretrain_val_loss_after']:.4f} |",
        f"| grad norm mean / max / std | {live['grad_norm']['mean']:.3f} / {live['grad_norm']['max']:.3f} / "
        f"{live['grad_norm']['std']:.3f} | {pma['grad_norm']['mean']:.3f} / {pma['grad_norm']['max']:.3f} / "
        f"{pma['grad_norm']['std']:.3f} |",
        f"| training time (s) | {live['train_s']:.0f} | {pma['train_s']:.0f} |",
    ]
    table = "\n".join(lines)
    print("\nValidation loss on the continued-training data (nats/byte):\n\n" + table + "\n", flush=True)

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m examples.sft_from_pma " + " ".join(argv if argv is not None else sys.argv[1:])
    settings = (
        f"{args.max_steps} steps, batch {args.per_device_train_batch_size} x {block_size} bytes, "
        f"{getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)} LR {args.learning_rate:g} "
        f"with {args.warmup_steps} warm-up steps, seed {args.seed}; "
        f"corpus {ia.corpus!r} ({len(train_bytes):,} train bytes)"
    )
    report = [
        "# PMA-init example: results",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"Settings: {settings}.",
        "",
        table,
        "",
    ]
    report_path = Path(ia.report_md) if ia.report_md else out / "results.md"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text("\n".join(report), encoding="utf-8")
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"report: {report_path}", flush=True)
    return results


if __name__ == "__main__":
    main()
