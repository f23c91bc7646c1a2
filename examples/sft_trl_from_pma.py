#!/usr/bin/env python
"""PMA-init with TRL's `SFTTrainer`: supervised fine-tuning from the PMA merge vs from the last live checkpoint.

Run `pretrain_pma.py` first (it writes ``pma/``, the merge, and ``checkpoint-<T>``, the last live
weights). This script fine-tunes both on the same chat dataset with TRL's ``SFTTrainer``, over
several seeds (data order), everything but the initial weights identical, and reports mean ± std of:

* the SFT loss on held-out chats before and after fine-tuning (completion tokens only);
* the loss on held-out pre-training text before and after (what PMA-init keeps);
* the peak gradient norm over the first steps (the paper reports a calmer start from PMA weights).

The chats are built locally from the Python language reference that CPython ships
(``pydoc_data.topics``, also the pre-training corpus): the user asks for a paragraph of a topic and
the assistant quotes it. Topics are split between training and held-out chats. The byte-level
tokenizer gets a small chat template (``CHAT_TEMPLATE``), so TRL formats the conversations itself.

    python -m examples.pretrain_pma --output_dir runs/pretrain_pma
    python -m examples.sft_trl_from_pma --run_dir runs/pretrain_pma --output_dir runs/sft_trl_from_pma

Every `SFTConfig` / `TrainingArguments` flag works, plus the `ChatSftArguments` below (``--help``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoModelForCausalLM, HfArgumentParser, set_seed

from examples.bytelm import ByteBlocks, byte_tokenizer, load_corpus, split_corpus, validation_loss
from examples.common import TRAINER_DEFAULTS, StartingPoints, newest_checkpoint


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Renders the prompt alone (with the generation prompt) as a prefix of prompt + answer, as TRL's
# completion-only loss needs; the answer ends with the end-of-text token so the model learns to stop.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

TRAINING_DEFAULTS = dict(
    TRAINER_DEFAULTS,
    output_dir="runs/sft_trl_from_pma",
    max_steps=150,
    learning_rate=1e-3,
    warmup_steps=10,
    lr_scheduler_type="cosine",
    logging_steps=1,
    eval_strategy="no",
    save_strategy="no",
    bf16=False,  # a tiny fp32 model (SFTConfig would otherwise ask for bf16)
)


@dataclass
class ChatSftArguments(StartingPoints):
    """Where the two starting points come from, the chat data and the comparison."""

    seeds: str = field(default="0,1,2", metadata={"help": "Comma-separated seeds (data order); at least one."})
    max_answer_bytes: int = field(
        default=48, metadata={"help": "Answers are cut at a word before this many bytes (prompt + answer fit 128)."}
    )
    max_chats: int | None = field(default=None, metadata={"help": "Use at most this many chats (small runs)."})
    heldout_fraction: float = field(default=0.1, metadata={"help": "Share of topics whose chats are held out."})
    peak_steps: int = field(default=20, metadata={"help": "The grad-norm peak is taken over the first N steps."})
    pretrain_corpus: str = field(default="topics", metadata={"help": "Pre-training corpus (see bytelm.py)."})
    pretrain_max_corpus_bytes: int | None = field(default=None, metadata={"help": "Use at most this many bytes."})
    val_fraction: float = field(default=0.1, metadata={"help": "Held-out share of the pre-training corpus."})
    report_md: str | None = field(default=None, metadata={"help": "Markdown report (default: output_dir/results.md)."})


def parse_args(argv: list[str] | None = None):
    from trl import SFTConfig

    parser = HfArgumentParser((SFTConfig, ChatSftArguments))
    parser.set_defaults(**TRAINING_DEFAULTS)
    return parser.parse_args_into_dataclasses(args=argv)


def chat_tokenizer():
    """The byte-level tokenizer of the pre-training run, with a chat template."""
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _clip(text: str, max_bytes: int) -> str:
    """``text`` cut at the last space before ``max_bytes`` UTF-8 bytes."""
    if len(text.encode("utf-8")) <= max_bytes:
        return text
    cut = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    return cut.rsplit(" ", 1)[0] if " " in cut else cut


def topic_chats(max_answer_bytes: int) -> dict[str, list[dict]]:
    """``{topic: [chat, ...]}``: per prose paragraph of a topic, a question and the quoted paragraph."""
    from pydoc_data.topics import topics

    chats: dict[str, list[dict]] = {}
    for key in sorted(topics):
        lines = topics[key].strip().split("\n")
        paragraphs = [" ".join(p.split()) for p in "\n".join(lines[1:]).split("\n\n")]
        prose = [p for p in paragraphs if len(p) >= 40 and not set(p) <= set("*=-")]
        chats[key] = [
            {
                "prompt": [{"role": "user", "content": f"Quote `{key}`, paragraph {j}."}],
                "completion": [{"role": "assistant", "content": _clip(text, max_answer_bytes)}],
            }
            for j, text in enumerate(prose, start=1)
        ]
    return chats


def chat_datasets(ca: ChatSftArguments):
    """Training and held-out chats, split by topic (a stable hash of its name) so no topic is in both."""
    from datasets import Dataset

    train, heldout = [], []
    for key, chats in topic_chats(ca.max_answer_bytes).items():
        into_heldout = zlib.crc32(key.encode()) % 1000 < ca.heldout_fraction * 1000
        (heldout if into_heldout else train).extend(chats)
    if ca.max_chats is not None:
        train, heldout = train[: ca.max_chats], heldout[: max(8, ca.max_chats // 8)]
    if not train or not heldout:
        raise ValueError("The chat split left no training or no held-out chats; change --heldout_fraction.")
    return Dataset.from_list(train), Dataset.from_list(heldout)


def sft_run(init_dir: Path, args, seed: int, data: dict, tag: str, peak_steps: int) -> dict:
    """One SFT run from ``init_dir``: everything but the initial weights is shared with the other start."""
    from trl import SFTTrainer

    set_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(init_dir)
    run_args = dataclasses.replace(args, output_dir=str(Path(args.output_dir) / f"{tag}-seed{seed}"), seed=seed)
    trainer = SFTTrainer(
        model=model,
        args=run_args,
        train_dataset=data["train"],
        eval_dataset=data["heldout"],
        processing_class=chat_tokenizer(),
    )
    pretrain_before = validation_loss(model, data["pretrain_val"])
    initial = trainer.evaluate()["eval_loss"]
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    history = trainer.state.log_history
    norms = [e["grad_norm"] for e in history if "grad_norm" in e and e["step"] <= peak_steps]
    return {
        "initial_sft_loss": initial,
        "final_sft_loss": trainer.evaluate()["eval_loss"],
        "first_train_loss": next((e["loss"] for e in history if "loss" in e), float("nan")),
        "pretrain_loss_before": pretrain_before,
        "pretrain_loss_after": validation_loss(trainer.model, data["pretrain_val"]),
        "grad_norm_peak": max(norms) if norms else float("nan"),
        "train_s": seconds,
    }


METRICS = [
    ("initial_sft_loss", "SFT loss on held-out chats, before SFT"),
    ("final_sft_loss", "SFT loss on held-out chats, after SFT"),
    ("first_train_loss", "training loss at the first step"),
    ("pretrain_loss_before", "pre-training held-out loss, before SFT"),
    ("pretrain_loss_after", "pre-training held-out loss, after SFT"),
    ("grad_norm_peak", "grad-norm peak, first {peak} steps"),
]


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {std:.4f}"


def results_table(runs: dict[str, list[dict]], seeds: list[int], peak_steps: int) -> str:
    lines = [
        f"| mean ± std over seeds {', '.join(map(str, seeds))} | from live checkpoint | from PMA (`pma/`) |",
        "|---|---|---|",
    ]
    for key, label in METRICS:
        cells = [mean_std([r[key] for r in runs[start]]) for start in ("live", "pma")]
        lines.append(f"| {label.format(peak=peak_steps)} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def load_inputs(args, ca: ChatSftArguments) -> tuple[dict[str, Path], dict]:
    run_dir = Path(ca.run_dir)
    starts = {
        "live": Path(ca.live_dir) if ca.live_dir else newest_checkpoint(run_dir),
        "pma": Path(ca.pma_dir) if ca.pma_dir else run_dir / "pma",
    }
    for name, folder in starts.items():
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"The {name} start {folder} is not a model folder (no config.json).")
    from transformers import AutoConfig

    block_size = AutoConfig.from_pretrained(starts["pma"]).max_position_embeddings
    train, heldout = chat_datasets(ca)
    _, pretrain_val = split_corpus(load_corpus(ca.pretrain_corpus, ca.pretrain_max_corpus_bytes), ca.val_fraction)
    data = {"train": train, "heldout": heldout, "pretrain_val": ByteBlocks(pretrain_val, block_size)}
    return starts, data


def main(argv: list[str] | None = None) -> dict:
    args, ca = parse_args(argv)
    seeds = [int(s) for s in ca.seeds.split(",") if s.strip()]
    if not seeds:
        raise ValueError("--seeds needs at least one seed, e.g. 0,1,2.")
    starts, data = load_inputs(args, ca)
    if args.max_length is None or args.max_length > data["pretrain_val"].block_size:  # the model's positions
        args = dataclasses.replace(args, max_length=data["pretrain_val"].block_size)
    print(
        f"SFT with TRL on {len(data['train'])} chats ({len(data['heldout'])} held out), seeds {seeds}: "
        f"from PMA {starts['pma']} vs live {starts['live']}",
        flush=True,
    )
    runs = {
        start: [sft_run(folder, args, seed, data, start, ca.peak_steps) for seed in seeds]
        for start, folder in starts.items()
    }
    table = results_table(runs, seeds, ca.peak_steps)
    print("\n" + table + "\n", flush=True)
    write_report(args, ca, argv, runs, table, seeds)
    return {"runs": runs, "table": table}


def write_report(args, ca: ChatSftArguments, argv, runs: dict, table: str, seeds: list[int]) -> None:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m examples.sft_trl_from_pma " + " ".join(argv if argv is not None else sys.argv[1:])
    settings = (
        f"TRL SFTTrainer, {args.max_steps} steps, batch {args.per_device_train_batch_size}, max_length "
        f"{args.max_length}, {getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)} LR "
        f"{args.learning_rate:g} with {args.warmup_steps:g} warm-up steps, seeds {seeds}; loss in nats per byte"
    )
    report = ["# PMA-init with TRL's SFTTrainer: results", "", f"Command: `{command.strip()}`", "", settings, ""]
    report_path = Path(ca.report_md) if ca.report_md else out / "results.md"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text("\n".join([*report, table, ""]), encoding="utf-8")
    (out / "results.json").write_text(json.dumps(runs, indent=2), encoding="utf-8")
    print(f"report: {report_path}", flush=True)


if __name__ == "__main__":
    main()
