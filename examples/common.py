"""What the example scripts share beyond the data: Trainer defaults, the byte-model arguments, run folders."""

from __future__ import annotations

import json
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from examples.bytelm import llama_config


# The Trainer settings every example starts from (each adds its own run length, learning rate and folders).
TRAINER_DEFAULTS = dict(
    per_device_train_batch_size=16,
    per_device_eval_batch_size=32,
    weight_decay=0.1,
    adam_beta2=0.95,
    max_grad_norm=1.0,
    report_to="none",
    seed=0,
    dataloader_num_workers=0,
    disable_tqdm=True,
)


@dataclass
class ByteModelArguments:
    """The byte corpus and the Llama that trains on it (`pretrain_pma.py`'s defaults)."""

    corpus: str = field(
        default="topics", metadata={"help": "'topics', 'docstrings', 'stdlib', or a text file/folder (bytelm.py)."}
    )
    max_corpus_bytes: int | None = field(default=None, metadata={"help": "Use at most this many bytes of the corpus."})
    val_fraction: float = field(default=0.1, metadata={"help": "Share of the corpus held out for validation."})
    block_size: int = field(default=128, metadata={"help": "Training sequence length in bytes."})
    train_stride: int = field(default=64, metadata={"help": "Bytes between the starts of training windows."})
    hidden_size: int = field(default=192, metadata={"help": "Model width."})
    num_layers: int = field(default=4, metadata={"help": "Transformer layers."})
    num_heads: int = field(default=4, metadata={"help": "Attention heads."})
    intermediate_size: int = field(default=512, metadata={"help": "SwiGLU width."})

    def model_config(self):
        """The Llama these settings describe."""
        return llama_config(self.hidden_size, self.num_layers, self.num_heads, self.intermediate_size, self.block_size)


@dataclass
class StartingPoints:
    """The two models a continued training starts from: the PMA average and the live weights of one run."""

    run_dir: str = field(default="runs/pretrain_pma", metadata={"help": "Output folder of pretrain_pma.py."})
    pma_dir: str | None = field(default=None, metadata={"help": "PMA model folder (default: run_dir/pma)."})
    live_dir: str | None = field(
        default=None, metadata={"help": "Live model folder (default: the newest run_dir/checkpoint-N)."}
    )


def newest_checkpoint(run_dir: Path) -> Path:
    """The ``checkpoint-N`` folder of ``run_dir`` with the largest N."""
    found = sorted(
        (int(m.group(1)), p) for p in run_dir.glob("checkpoint-*") if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
    )
    if not found:
        raise FileNotFoundError(f"No checkpoint-N folder in {run_dir}; pass --live_dir or run pretrain_pma.py first.")
    return found[-1][1]


def write_summary(folder: Path, summary: dict, report: Path, plot: Path, note: str) -> dict:
    """Write ``folder/results.json`` (``summary`` with the report's and the plot's paths) and say where all is."""
    summary = {**summary, "report": str(report), "plot": str(plot)}
    (folder / "results.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"report: {report}\nplot: {plot}\n{note}", flush=True)
    return summary


def save_figure(fig, path: str | Path) -> None:
    """Write ``fig`` to ``path`` (drawn beside it, then renamed: no half-written PNG is ever seen) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1) of ``values``; the std of one value is 0."""
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
