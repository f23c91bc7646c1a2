"""What a sweep reports: its rows and result, the markdown and CSV tables, the plot and the model card's words.

Each row names its rule spec and the rule's parameters as the merge used them (defaults included), so two
alphas of one rule are two rows that say which is which. Torch-free (the plot imports matplotlib when drawn).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...deprecation import warn_deprecated


__all__ = ["SweepResult", "SweepRow", "write_plot"]


@dataclass
class SweepRow:
    """A scored candidate: its rule spec, window, the steps it spans, its score, and the rule it resolved to.

    ``rule`` is the spec as swept (``ema``, ``ema:0.1`` from an alpha grid, ``decay:cosine``);
    ``rule_name`` the rule (``ema``) and ``params`` every parameter of that rule with the value the merge
    used, in the rule's declared order (``{"alpha": 0.1}``; ``{}`` for ``sma``).
    """

    rule: str
    window: int
    first_step: int | None
    last_step: int | None
    score: float
    rule_name: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rule_name = self.rule_name or self.rule.partition(":")[0]

    @property
    def params_text(self) -> str:
        """The parameters as the tables write them: ``alpha=0.1``, ``;``-joined in the rule's order."""
        return ";".join(f"{name}={value}" for name, value in self.params.items())


@dataclass
class SweepResult:
    """What a sweep produced: the rows (in the order run), the best row and the files written."""

    rows: list[SweepRow]
    best: SweepRow
    greater_is_better: bool
    table_md: Path | None = None
    table_csv: Path | None = None
    plot: Path | None = None
    plot_note: str | None = None
    best_folder: Path | None = None
    commit_url: str | None = None
    markdown: str = field(default="", repr=False)

    @property
    def higher_is_better(self) -> bool:
        """Deprecated name of `greater_is_better`."""
        warn_deprecated("`SweepResult.higher_is_better`", "read `greater_is_better`")
        return self.greater_is_better


def markdown_table(rows: list[SweepRow], best: SweepRow, metric: str) -> str:
    """The table of the report, the card and the command's output: one line per candidate."""
    lines = [f"| rule | window | steps | params | {metric} | best |", "|---|---|---|---|---|---|"]
    for r in rows:
        steps = f"{r.first_step}-{r.last_step}" if r.first_step is not None else ""
        params = r.params_text.replace(";", "; ")
        lines.append(f"| {r.rule} | {r.window} | {steps} | {params} | {r.score:.6g} | {'yes' if r is best else ''} |")
    return "\n".join(lines) + "\n"


def csv_table(rows: list[SweepRow], metric: str) -> str:
    """``sweep.csv``: the spec, window, steps and score as always, then the rule name and its parameters."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["rule", "window", "first_step", "last_step", metric, "rule_name", "params"])
    for r in rows:
        writer.writerow([r.rule, r.window, r.first_step, r.last_step, repr(r.score), r.rule_name, r.params_text])
    return buffer.getvalue()


def write_plot(rows: list[SweepRow], path: Path, metric: str, title: str = "") -> str | None:
    """Plot score against window, one line per rule spec; returns a note instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot was drawn (pip install matplotlib)."
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=110)
    for rule in dict.fromkeys(r.rule for r in rows):
        points = sorted((r.window, r.score) for r in rows if r.rule == rule)
        ax.plot(*zip(*points, strict=True), "o-", label=rule, markersize=4)
    ax.set_xlabel("window (inputs merged)")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} of each merge", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return None


def write_reports(result: SweepResult, out: Path, metric: str) -> None:
    """``sweep.md``, ``sweep.csv`` and ``sweep.png`` in ``out``; their paths (or the plot's note) go on ``result``."""
    out.mkdir(parents=True, exist_ok=True)
    result.markdown = markdown_table(result.rows, result.best, metric)
    result.table_md, result.table_csv = out / "sweep.md", out / "sweep.csv"
    result.table_md.write_text(result.markdown, encoding="utf-8")
    result.table_csv.write_text(csv_table(result.rows, metric), encoding="utf-8")
    plot = out / "sweep.png"
    result.plot_note = write_plot(result.rows, plot, metric)
    result.plot = None if result.plot_note else plot


def with_params(row: SweepRow) -> str:
    """``rule `ema:0.1` (alpha=0.1)``: a row's spec and resolved parameters, for the card and the command."""
    return f"rule `{row.rule}`" + (f" ({row.params_text.replace(';', ', ')})" if row.params else "")


def card_section(result: SweepResult, metric: str) -> str:
    """The "Sweep" section of the best model's card: how it was chosen, and every candidate's row."""
    best = result.best
    direction = "higher" if result.greater_is_better else "lower"
    return (
        "\n## Sweep\n\n"
        f"Chosen by `pmakit sweep` as the best of {len(result.rows)} candidate merges by {metric} "
        f"({direction} is better): {with_params(best)} over the newest {best.window} inputs.\n\n" + result.markdown
    )
