#!/usr/bin/env python
"""Does a merge of constant-LR samples reach a real LR decay? Merges of several rules and windows against decays.

For each seed, one run of the small byte-level Llama of `pretrain_pma.py` (same corpus, optimizer and data)
trains with warm-up then a constant learning rate to step T, keeping every PMA sample as a model-only folder
(``pma-samples/step-N``, the sample store) and a full checkpoint at each fork step T - L. Then:

* real decays: for each window length L and each shape (linear, cosine, 1-sqrt), a fork resumes the
  step T-L checkpoint (same optimizer state, same data order) and decays the LR to 0 over its last L
  steps, ending at step T: the same steps and data as the constant run;
* merges: `pmakit.sweep` merges the samples of the last L steps with each rule of ``--merge_rules`` (SMA,
  EMA from the first sample, the bias-corrected EMA, WMA, decay-cosine and decay-1-sqrt (WSM: the merge
  dual to a decay of that shape), TRL's BEMA, torchtitan's half-life EMA) and each spec of ``--alpha_grid``,
  and scores each on the same validation bytes.

With ``--seeds 0,1,2`` each seed runs in ``output_dir/seed-N`` and the report gives mean ± std over seeds.
Each seed's results are saved in its folder after every stage (``seed_results.json``), so a rerun of the
same command reuses what is done (a crashed seed restarts the stage it stopped in; new rules are only
merged). The report gives each merge's share of each decay's gain, (live - merge) / (live - decay), as
tables (markdown), the best merge per window, and a plot. `sma` is the merge dual to the linear decay,
`decay:cosine` to the cosine one and `decay:1-sqrt` to the 1-sqrt one.

    python -m examples.decay_merge --output_dir runs/decay_merge --seeds 0,1,2 \\
        --alpha_grid ema:0.05,0.1,0.2,0.3,0.5 ema_corrected:0.05,0.1,0.2,0.3,0.5 ema_halflife:0.025,0.1,0.25 \\
        --report_md runs/decay_merge/results.md --plot runs/decay_merge/decay_merge.png
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, HfArgumentParser, LlamaForCausalLM, Trainer, TrainerCallback, set_seed

from examples.bytelm import ByteBlocks, byte_tokenizer, load_corpus, split_corpus, validation_loss
from examples.common import ByteModelArguments, write_summary
from examples.decay_report import (
    aggregate,
    gap_table,
    loss_table,
    share_matrix,
    tables,
    winners,
    winners_table,
    write_plot,
)
from examples.pretrain_pma import TRAINING_DEFAULTS
from pmakit import PmaArguments, PmaTrainer, sweep
from pmakit.tools.sweep import parse_rule


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DECAY_SHAPES = ("linear", "cosine", "1-sqrt")
MERGE_RULES = ("sma", "ema", "ema_corrected", "wma", "decay:cosine", "decay:1-sqrt", "bema", "ema_halflife:0.05")
SEED_FILE = "seed_results.json"
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
    merge_rules: list[str] = field(
        default_factory=lambda: list(MERGE_RULES),
        metadata={"help": "Merge rule specs, space-separated: sma ema:0.1 decay:cosine bema:lag=10,bias_power=0.2"},
    )
    alpha_grid: list[str] = field(
        default_factory=list,
        metadata={
            "help": "More merges scored on the same runs, space-separated RULE:V1,V2,...: one spec per value of "
            "the rule's first parameter (ema:0.05,0.1 is ema:0.05 and ema:0.1), reported as a table of their own."
        },
    )
    seeds: str = field(
        default="",
        metadata={
            "help": "Seeds, comma-separated: one constant run with its forks and merges per seed, in "
            "output_dir/seed-N, then mean ± std over seeds. Empty: --seed only, in output_dir itself."
        },
    )
    ema_alpha: float = field(default=0.2, metadata={"help": "EMA weight of the newest sample for both EMA forms."})
    report_md: str | None = field(default=None, metadata={"help": "Markdown report (default output_dir/results.md)."})
    plot: str | None = field(default=None, metadata={"help": "PNG plot (default output_dir/decay_merge.png)."})


@dataclass
class Data:
    """The model and the bytes every seed trains and is scored on."""

    config: object
    train: ByteBlocks
    val: ByteBlocks


class SaveAtSteps(TrainerCallback):
    """Save a full checkpoint (weights and optimizer state) at exactly the fork steps, and nowhere else."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        control.should_save = state.global_step in self.steps
        return control


def grid_specs(items: list[str]) -> list[str]:
    """``RULE:V1,V2`` -> ``RULE:V1``, ``RULE:V2``: one rule spec per value of the rule's first spec parameter."""
    specs = []
    for item in items:
        rule, _, values = item.partition(":")
        specs += [f"{rule}:{v.strip()}" for v in values.split(",") if v.strip()] or [rule]
    return specs


def scored_rules(ex: DecayArguments) -> list[str]:
    """Every spec a seed merges: the merge rules, then the alpha grid's, each once."""
    return list(dict.fromkeys([*ex.merge_rules, *grid_specs(ex.alpha_grid)]))


def seed_list(args, ex: DecayArguments) -> list[int]:
    """``--seeds``, or ``--seed`` alone when no seeds are given."""
    return [int(s) for s in ex.seeds.split(",") if s.strip()] or [args.seed]


def seed_dir(args, ex: DecayArguments, seed: int) -> Path:
    """Where a seed runs: ``output_dir/seed-N`` with ``--seeds``, else ``output_dir`` itself."""
    return Path(args.output_dir) / f"seed-{seed}" if ex.seeds.strip() else Path(args.output_dir)


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
    _check_rules_and_seeds(args, ex)
    limit = windows[-1] // interleave
    args = dataclasses.replace(args, save_strategy="no", pma_sample_store_limit=limit)
    return args, ex, windows


def _check_rules_and_seeds(args, ex: DecayArguments) -> None:
    """Every rule spec parses (`pmakit.sweep`'s own check) and the seeds are distinct integers, before training."""
    if not ex.merge_rules:
        raise ValueError("--merge_rules: give at least one rule.")
    for spec in scored_rules(ex):
        parse_rule(spec)
    try:
        seeds = seed_list(args, ex)
    except ValueError:
        raise ValueError(f"--seeds: {ex.seeds} must be integers separated by commas.") from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: {ex.seeds} names a seed twice.")


def load_data(ex: DecayArguments, eval_batch: int) -> Data:
    data = load_corpus(ex.corpus, ex.max_corpus_bytes)
    train_bytes, val_bytes = split_corpus(data, ex.val_fraction)
    print(f"corpus {ex.corpus!r}: {len(train_bytes)} training and {len(val_bytes)} validation bytes", flush=True)
    train = ByteBlocks(train_bytes, ex.block_size, ex.train_stride)
    return Data(model_config(ex), train, ByteBlocks(val_bytes, ex.block_size).truncate(eval_batch))


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


def run_merges(
    run: Path, windows: list[int], interleave: int, alpha: float, val_ds, evaluate=validation_loss, rules=MERGE_RULES
) -> tuple[dict, object]:
    """Every rule over every window, scored on the validation bytes by ``evaluate(model, val_ds)``, through
    `pmakit.sweep`."""

    def score(folder: Path) -> float:
        return evaluate(AutoModelForCausalLM.from_pretrained(folder), val_ds)

    result = sweep(
        run,
        list(rules),
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


# The settings a seed's results depend on: a rerun reuses saved results only when these match.
_SETTINGS = {
    "args": (
        "seed",
        "max_steps",
        "warmup_steps",
        "learning_rate",
        "per_device_train_batch_size",
        "pma_interleave_step",
    ),
    "ex": ("corpus", "max_corpus_bytes", "val_fraction", "block_size", "train_stride", "hidden_size", "num_layers")
    + ("num_heads", "intermediate_size"),
}


def load_seed(folder: Path, args, ex: DecayArguments) -> dict:
    """A seed's saved record, or a fresh one; saved merges made with another ``ema_alpha`` are dropped."""
    settings = {k: getattr(args, k) for k in _SETTINGS["args"]} | {k: getattr(ex, k) for k in _SETTINGS["ex"]}
    path = folder / SEED_FILE
    found = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if found and found["settings"] != settings:
        raise ValueError(f"{path} was written with other settings ({found['settings']}); choose another --output_dir.")
    record = {"settings": settings, "decays": {}, "merges": {}, "timing": {}, **found}
    if record.get("ema_alpha") != ex.ema_alpha:
        record |= {"ema_alpha": ex.ema_alpha, "merges": {}}
    return record


def save_seed(folder: Path, record: dict) -> None:
    """Write the record beside the run, renamed into place: a crash never leaves half a file."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{SEED_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
    os.replace(tmp, folder / SEED_FILE)


def _timed(record: dict, key: str, started: float) -> None:
    record["timing"][key] = record["timing"].get(key, 0.0) + time.perf_counter() - started


def run_seed(args, ex: DecayArguments, windows: list[int], seed: int, data: Data, evaluate) -> dict:
    """One seed: the constant run, the merges and the decay forks, each stage skipped when its results are saved."""
    folder = seed_dir(args, ex, seed)
    args = dataclasses.replace(args, seed=seed, output_dir=str(folder))
    record = load_seed(folder, args, ex)
    if "live" not in record:
        started = time.perf_counter()
        constant_run(args, ex, data.config, data.train, windows)
        last = AutoModelForCausalLM.from_pretrained(folder / "pma-samples" / f"step-{args.max_steps}")
        record["live"] = evaluate(last, data.val)
        _timed(record, "train_s", started)
        save_seed(folder, record)
    todo = [r for r in scored_rules(ex) if any(f"{r}@{w}" not in record["merges"] for w in windows)]
    if todo:
        started = time.perf_counter()
        merges, _ = run_merges(folder, windows, args.pma_interleave_step, ex.ema_alpha, data.val, evaluate, todo)
        record["merges"] |= {f"{r}@{w}": v for (r, w), v in merges.items()}
        _timed(record, "sweep_s", started)
        save_seed(folder, record)
    for w in windows:
        for shape in ex.decay_shapes.split(","):
            if f"{shape}@{w}" not in record["decays"]:
                started = time.perf_counter()
                record["decays"][f"{shape}@{w}"] = evaluate(
                    decay_fork(args, data.config, data.train, folder, w, shape), data.val
                )
                _timed(record, "decay_forks_s", started)
                save_seed(folder, record)
                print(
                    f"seed {seed}: decay {shape} over the last {w} steps: {record['decays'][f'{shape}@{w}']:.4f}",
                    flush=True,
                )
    return record


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
    """Per seed the constant run, the merges and the decay forks; then the report, plot and ``results.json``.

    ``evaluate(model, val_ds) -> loss`` scores every model (default: `validation_loss` where the model lies);
    `paper_scale.py` passes one that moves the model to the GPU under bf16 autocast.
    """
    started = time.perf_counter()
    data = load_data(ex, args.per_device_eval_batch_size)
    runs = {seed: run_seed(args, ex, windows, seed, data, evaluate) for seed in seed_list(args, ex)}
    shapes = tuple(ex.decay_shapes.split(","))
    summary = aggregate(runs, windows, shapes, ex.merge_rules)
    summary["timing"] = {"wall_s (this call; reused stages cost nothing)": time.perf_counter() - started}
    summary["timing"] |= _timing_sums(runs)
    title = (
        f"{count_params(data.config) / 1e6:.1f}M-param Llama, byte-level '{ex.corpus}', {args.max_steps} steps, "
        f"LR {args.learning_rate:g} constant; samples every {args.pma_interleave_step} steps"
    )
    out = Path(args.output_dir)
    plot_path = Path(ex.plot) if ex.plot else out / plot_name
    write_plot(plot_path, list(runs.values()), windows, title, shapes, ex.merge_rules)
    report_path = Path(ex.report_md) if ex.report_md else out / "results.md"
    text = report(list(runs.values()), args, ex, windows, title, summary["timing"])
    print("\n" + text, flush=True)
    write_report(report_path, argv, text, script)
    summary = write_summary(out, summary, report_path, plot_path, f"wall {time.perf_counter() - started:.0f} s")
    if report_path.parent.resolve() != out.resolve():  # the raw numbers beside a report kept elsewhere
        report_path.with_suffix(".json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def _timing_sums(runs: dict[int, dict]) -> dict:
    keys = dict.fromkeys(k for r in runs.values() for k in r["timing"])
    return {f"{k} (all seeds)": sum(r["timing"].get(k, 0.0) for r in runs.values()) for k in keys}


def report(runs: list[dict], args, ex: DecayArguments, windows: list[int], title: str, timing: dict) -> str:
    """The report's body: the tables, the winners per window, the alpha grid, the seeds' times and the machine."""
    interleave, shapes = args.pma_interleave_step, tuple(ex.decay_shapes.split(","))
    found = winners(runs, windows, shapes, ex.merge_rules)
    grid = grid_specs(ex.alpha_grid)
    seeds = ", ".join(str(s) for s in seed_list(args, ex))
    lines = [
        f"Setup: {title}. Seeds {seeds}: "
        + ("mean ± sample std (n - 1) over seeds. " if len(runs) > 1 else "")
        + "Validation loss in nats/byte on the same held-out bytes for every model. Decay forks resume the step "
        "T-L checkpoint and decay the LR to 0 over the last L steps; merges take the samples of the last L steps "
        f"(`ema`, `ema_corrected` with alpha {ex.ema_alpha:g} unless the spec gives one). Bold: the merge dual "
        "to that decay (WSM).",
        "",
        tables(runs, windows, interleave, shapes, ex.merge_rules),
        "",
        "Best merge per window (lowest mean loss); differences are paired per seed, then mean ± std:",
        "",
        winners_table(runs, found),
        "",
        "Each model's loss minus the best merge's at that window, paired per seed (negative: better than the best "
        "merge):",
        "",
        gap_table(runs, windows, shapes, ex.merge_rules),
    ]
    if grid:
        lines += ["", "## Alpha grid", "", loss_table(runs, windows, interleave, shapes[:1], grid), ""]
        lines += [f"Share of the {shapes[0]} decay's gain:", "", share_matrix(runs, windows, shapes[0], grid)]
    return "\n".join([*lines, "", "## Run time", "", *_run_time(runs, timing), ""])


def _run_time(runs: list[dict], timing: dict) -> list[str]:
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
    machine += f"{torch.get_num_threads()} torch threads"
    if torch.cuda.is_available():
        machine += f", GPU {torch.cuda.get_device_name()}"
    if hasattr(os, "getloadavg"):
        machine += f", load average {os.getloadavg()[2]:.1f} (15 min) at the end of this call"
    per_seed = [", ".join(f"{k} {v:.0f}" for k, v in r["timing"].items()) for r in runs]
    lines = [f"- machine: {machine}", *[f"- {k}: {v:.1f}" for k, v in timing.items()]]
    return lines + [f"- seed {r['settings']['seed']}: {t}" for r, t in zip(runs, per_seed, strict=True)]


def write_report(path: Path, argv, text: str, script="examples.decay_merge") -> None:
    command = f"python -m {script} " + " ".join(argv if argv is not None else sys.argv[1:])
    head = ["# Merging constant-LR samples against real LR decays: results", "", f"Command: `{command.strip()}`", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([*head, text]), encoding="utf-8")


if __name__ == "__main__":
    main()
