"""Choose the merge after training: score candidate (rule, window) merges of a run's checkpoints or samples.

A run that kept its checkpoints (``checkpoint-N``) or its PMA samples (``pma-samples/step-N``) can be
merged later with any rule over any window. `sweep` merges each candidate with `pmakit.merge` into a
scratch folder (one candidate on disk and in memory at a time), scores it, and writes a table (markdown
and CSV) and a plot of score against window, one line per rule. The best candidate is merged again into
``output_dir/best`` with a model card that records every candidate's score, and pushed when asked.

Scores come from a user function ``score(folder) -> float``, from a Trainer's ``evaluate`` (`trainer_scorer`)
or from the causal-LM loss on a held-out text file (`text_loss_scorer`, what ``pmakit sweep --text`` uses).
Lower is better unless ``greater_is_better`` (by default the scorer's own ``greater_is_better``, if it has one).

Everything that can be checked is checked before the first merge: the rules, windows, inputs and merge
settings (each candidate is planned from the headers), the output folder, and the scorer (`text_loss_scorer`
reads and tokenises its text then). The scratch folder holds the same writer lock as the merger's temporary
folders, so scratch left by a killed sweep is removed by the next one; an interrupt removes it at once.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import shutil
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from ... import averaging
from ...deprecation import greater_is_better_of, renamed_keyword, warn_deprecated
from ...errors import InputError, brief
from ...io.folders import atomic_directory, output_lock, scratch_directory
from ...io.hub_target import HubTarget, as_hub_target


__all__ = [
    "Candidate",
    "SweepResult",
    "SweepRow",
    "TextLossScorer",
    "parse_rule",
    "sweep",
    "sweep_inputs",
    "text_loss_scorer",
    "trainer_scorer",
]

Scorer = Callable[[Path], float]
_STEP = re.compile(r"^(?:checkpoint|step)-(\d+)$")


def parse_rule(spec: str) -> dict:
    """The `pmakit.merge` keywords of a rule spec: ``ema``, ``ema:0.1``, ``decay:SHAPE``.

    The spec is parsed by `pmakit.averaging.parse_spec` and its parameters checked by the rule. Parameters
    that are merge settings (``alpha``, ``decay_shape``) become keywords; a spec with others
    (``ema_halflife:0.25``, ``bema:lag=20``) is passed whole as ``algo``, which the merge parses again.

    Raises:
        InputError: the rule is unknown or cannot be swept (``weights``), or a parameter is refused (the
            message lists the valid rules).
    """
    valid = ", ".join(averaging.spec_forms())
    try:
        algo, params = averaging.parse_spec(spec)
    except averaging.UnknownRuleError:
        raise InputError(f"Unknown sweep rule {brief(spec)}; valid rules: {valid}.") from None
    except averaging.RuleError as e:
        raise InputError(f"Rule {brief(spec)}: {str(e).rstrip('.')}; valid rules: {valid}.") from None
    from ...merging.options import option_fields

    if set(params) - {f.name for f in option_fields()}:
        return {"algo": spec}
    return {"algo": algo, **params}


@dataclass(frozen=True)
class Candidate:
    """One merge to try: a rule spec (see `parse_rule`) over the newest ``window`` inputs."""

    rule: str
    window: int


@dataclass
class SweepRow:
    """A scored candidate: its rule, window, the steps it spans and its score."""

    rule: str
    window: int
    first_step: int | None
    last_step: int | None
    score: float


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


def _step_of(folder: Path) -> int | None:
    match = _STEP.match(folder.name)
    return int(match.group(1)) if match else None


def _numbered(folder: Path, pattern: str) -> list[Path]:
    found = [p for p in folder.glob(pattern) if p.is_dir() and _step_of(p) is not None]
    return sorted(found, key=_step_of)


def sweep_inputs(inputs: Sequence[str | os.PathLike] | str | os.PathLike, source: str = "auto") -> list[Path]:
    """The model folders a sweep chooses from, oldest first.

    Args:
        inputs: A run folder, or model folders oldest first.
        source: For a run folder: ``samples`` (``pma-samples/step-N``), ``checkpoints`` (``checkpoint-N``)
            or ``auto`` (samples when the run stored any, else checkpoints).

    Raises:
        InputError: nothing to sweep, a missing folder or an unknown ``source``.
    """
    if source not in ("auto", "samples", "checkpoints"):
        raise InputError(f"`source` must be auto, samples or checkpoints, got {brief(source)}.")
    paths = [Path(inputs)] if isinstance(inputs, (str, os.PathLike)) else [Path(p) for p in inputs]
    for path in paths:
        if not path.is_dir():
            raise InputError(f"Sweep input {path} is not a folder.")
    if len(paths) > 1:
        return paths
    run = paths[0]
    samples = _numbered(run / "pma-samples", "step-*")
    checkpoints = _numbered(run, "checkpoint-*")
    chosen = {"samples": samples, "checkpoints": checkpoints, "auto": samples or checkpoints}[source]
    if not chosen:
        raise InputError(
            f"Run folder {run} holds no {'pma-samples/step-N' if source == 'samples' else 'checkpoint-N'} folders."
        )
    return chosen


def _candidates(rules: Sequence[str], windows: Sequence[int], n_inputs: int) -> list[Candidate]:
    if not rules or not windows:
        raise InputError("A sweep needs at least one rule and one window.")
    for rule in rules:
        parse_rule(rule)
    for window in windows:
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise InputError(f"Window {brief(window)} must be a positive number of inputs.")
        if window > n_inputs:
            raise InputError(f"Window {window} is longer than the {n_inputs} inputs available.")
    return [Candidate(r, w) for r in dict.fromkeys(rules) for w in sorted(set(windows))]


def _candidate_settings(candidate: Candidate, alpha: float, options: dict) -> dict:
    """The `pmakit.merge` settings of one candidate: the sweep's options, its alpha unless the spec gives one."""
    rule = parse_rule(candidate.rule)
    name = averaging.parse_spec(candidate.rule)[0]
    swept = {"alpha": alpha} if "alpha" in averaging.rule_class(name).param_names() else {}
    return {**options, **swept, **rule}


def _merge_candidate(inputs: list[Path], candidate: Candidate, output: Path, alpha: float, options: dict):
    from ...merging import merge

    settings = _candidate_settings(candidate, alpha, options)
    return merge(inputs[-candidate.window :], output, overwrite=True, progress=False, **settings)


def _plan_candidates(inputs: list[Path], candidates: list[Candidate], alpha: float, options: dict) -> list:
    """Plan every candidate from the headers: a bad setting or input fails before the first merge."""
    from ...merging import plan_merge

    return [plan_merge(inputs[-c.window :], **_candidate_settings(c, alpha, options)) for c in candidates]


def _check_output_dir(out: Path, save_best: bool, overwrite: bool) -> None:
    """``out`` can hold the reports and ``best/``: checked before the first merge, not after the last score."""
    existing = next(p for p in [out.absolute(), *out.absolute().parents] if p.exists())
    if not existing.is_dir():
        named = "" if existing == out.absolute() else f" ({existing} is a file)"
        raise InputError(f"Sweep output {out} is not a folder{named}; give a folder for the reports and best/.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"Sweep output {out}: cannot write in {existing}.")
    best = out / "best"
    if save_best and best.exists() and not best.is_dir():
        raise InputError(f"{best} exists and is not a folder; remove it or choose another output folder.")
    if save_best and not overwrite and best.is_dir() and any(best.iterdir()):
        raise InputError(f"{best} already exists; pass overwrite=True to replace it.")


def _check_scorer(score: Scorer, first_donor: Path) -> None:
    """A callable scorer; one with a ``check(folder)`` method checks itself against the first merge's files."""
    if not callable(score):
        raise InputError(f"`score` must be a function score(folder) -> float, got {type(score).__name__}.")
    check = getattr(score, "check", None)
    if callable(check):
        check(first_donor)


def _score_candidate(inputs, candidate, scratch: Path, score: Scorer, alpha: float, options: dict) -> SweepRow:
    folder = scratch / "candidate"
    try:
        _merge_candidate(inputs, candidate, folder, alpha, options)
        value = float(score(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    window = inputs[-candidate.window :]
    if not math.isfinite(value):
        warnings.warn(f"Sweep candidate {candidate.rule} over {candidate.window} scored {value}.", stacklevel=3)
    return SweepRow(candidate.rule, candidate.window, _step_of(window[0]), _step_of(window[-1]), value)


def _best(rows: list[SweepRow], greater_is_better: bool) -> SweepRow:
    finite = [r for r in rows if math.isfinite(r.score)]
    if not finite:
        raise InputError("No sweep candidate got a finite score.")
    return (max if greater_is_better else min)(finite, key=lambda r: r.score)


def _markdown(rows: list[SweepRow], best: SweepRow, metric: str) -> str:
    lines = [f"| rule | window | steps | {metric} | best |", "|---|---|---|---|---|"]
    for r in rows:
        steps = f"{r.first_step}-{r.last_step}" if r.first_step is not None else ""
        lines.append(f"| {r.rule} | {r.window} | {steps} | {r.score:.6g} | {'yes' if r is best else ''} |")
    return "\n".join(lines) + "\n"


def _csv(rows: list[SweepRow], metric: str) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["rule", "window", "first_step", "last_step", metric])
    for r in rows:
        writer.writerow([r.rule, r.window, r.first_step, r.last_step, repr(r.score)])
    return buffer.getvalue()


def write_plot(rows: list[SweepRow], path: Path, metric: str, title: str = "") -> str | None:
    """Plot score against window, one line per rule; returns a note instead when matplotlib is missing."""
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


def _write_reports(result: SweepResult, out: Path, metric: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result.markdown = _markdown(result.rows, result.best, metric)
    result.table_md, result.table_csv = out / "sweep.md", out / "sweep.csv"
    result.table_md.write_text(result.markdown, encoding="utf-8")
    result.table_csv.write_text(_csv(result.rows, metric), encoding="utf-8")
    plot = out / "sweep.png"
    result.plot_note = write_plot(result.rows, plot, metric)
    result.plot = None if result.plot_note else plot


def _card_section(result: SweepResult, metric: str) -> str:
    best = result.best
    direction = "higher" if result.greater_is_better else "lower"
    return (
        "\n## Sweep\n\n"
        f"Chosen by `pmakit sweep` as the best of {len(result.rows)} candidate merges by {metric} "
        f"({direction} is better): rule `{best.rule}` over the newest {best.window} inputs.\n\n" + result.markdown
    )


def _save_best(result, inputs, out: Path, alpha: float, options: dict, metric: str, overwrite: bool) -> Path:
    target = out / "best"
    with atomic_directory(target, overwrite=overwrite) as tmp:
        folder = tmp / "model"
        _merge_candidate(inputs, Candidate(result.best.rule, result.best.window), folder, alpha, options)
        card = folder / "README.md"
        card.write_text(card.read_text(encoding="utf-8") + _card_section(result, metric), encoding="utf-8")
        (folder / "sweep.csv").write_text(_csv(result.rows, metric), encoding="utf-8")
        for item in folder.iterdir():
            item.rename(tmp / item.name)
        folder.rmdir()
    return target


def sweep(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    rules: Sequence[str],
    windows: Sequence[int],
    *,
    score: Scorer,
    output_dir: str | os.PathLike | None = None,
    metric: str = "score",
    greater_is_better: bool | None = None,
    alpha: float = 0.2,
    source: str = "auto",
    save_best: bool = True,
    overwrite: bool = False,
    push_to_hub: str | HubTarget | None = None,
    merge_options: dict | None = None,
    private: bool | None = None,
    token: str | None = None,
    higher_is_better: bool | None = None,
) -> SweepResult:
    """Merge and score every (rule, window) candidate; write the table and plot; save and push the best.

    Args:
        inputs: A run folder (its ``pma-samples/step-N`` or ``checkpoint-N`` folders, see `sweep_inputs`) or
            model folders, oldest first. A window of ``w`` merges the newest ``w`` of them.
        rules: Rule specs (`parse_rule`): ``sma``, ``wma``, ``ema``, ``ema_corrected``, ``decay:cosine``...
        windows: Numbers of inputs to merge.
        score: ``score(folder) -> float`` on a merged model folder (`text_loss_scorer`, `trainer_scorer`).
        output_dir: Where ``sweep.md``, ``sweep.csv``, ``sweep.png`` and ``best/`` go (None: write nothing).
        metric: The score's name in the table, the plot and the card.
        greater_is_better: Pick the largest score instead of the smallest (default: the scorer's own
            ``greater_is_better`` attribute, e.g. `lm_eval_scorer`'s, else False).
        alpha: EMA weight of the newest sample for ``ema`` and ``ema_corrected``.
        source: ``auto``, ``samples`` or ``checkpoints`` for a run folder.
        save_best: Merge the best candidate again into ``output_dir/best`` with a card recording the sweep.
        overwrite: Replace an existing ``output_dir/best``.
        push_to_hub: Repo id or `HubTarget` (private, token...) to push ``best/`` to; needs ``output_dir`` and
            ``save_best``.
        merge_options: Further `pmakit.merge` keywords (``accumulate_dtype``, ``out_dtype``, ``threads``...).
        private: Deprecated: ``push_to_hub=HubTarget(repo_id, private=True)``.
        token: Deprecated: ``push_to_hub=HubTarget(repo_id, token=...)``.
        higher_is_better: Deprecated name of ``greater_is_better``.

    Returns:
        A `SweepResult`.

    Raises:
        InputError: bad rules, windows, inputs, merge settings, output folder or scorer input (all checked
            before the first merge), or no finite score.
        OutputBusyError: another sweep (or merge) is writing ``output_dir``.
    """
    folders = sweep_inputs(inputs, source)
    candidates = _candidates(rules, list(windows), len(folders))
    target = _hub_target(push_to_hub, output_dir, save_best, private=private, token=token)
    greater = renamed_keyword(
        greater_is_better, higher_is_better, new="greater_is_better", old="higher_is_better", where="sweep"
    )
    greater = greater if greater is not None else bool(greater_is_better_of(score))
    out = Path(output_dir) if output_dir is not None else None
    if out is not None:
        _check_output_dir(out, save_best, overwrite)
    options = dict(merge_options or {})
    plans = _plan_candidates(folders, candidates, alpha, options)
    _check_scorer(score, plans[0].donor.path)
    with output_lock(out) if out is not None else nullcontext(), scratch_directory("pmakit-sweep") as scratch:
        rows = [_score_candidate(folders, c, scratch, score, alpha, options) for c in candidates]
        result = SweepResult(rows=rows, best=_best(rows, greater), greater_is_better=greater)
        result.markdown = _markdown(rows, result.best, metric)
        if out is not None:
            _finish(result, folders, out, alpha, options, metric, overwrite, save_best, target)
    return result


def _finish(result: SweepResult, folders, out: Path, alpha, options, metric, overwrite, save_best, target) -> None:
    """Write the table and plot, merge the best again into ``out/best`` and push it when asked."""
    _write_reports(result, out, metric)
    if save_best:
        result.best_folder = _save_best(result, folders, out, alpha, options, metric, overwrite)
    if target is not None:
        from ...io.hub import push_folder_to_hub

        result.commit_url = push_folder_to_hub(result.best_folder, target)


def _hub_target(push_to_hub, output_dir, save_best: bool, **deprecated) -> HubTarget | None:
    message = "Upload the best merge of a pmakit sweep"
    target = as_hub_target(push_to_hub, where="sweep", default_message=message, **deprecated)
    if target is not None and (output_dir is None or not save_best):
        raise InputError("`push_to_hub` pushes the saved best model: give `output_dir` and keep `save_best`.")
    return target


def load_weights_into(model, folder: str | os.PathLike) -> None:
    """Copy a model folder's safetensors weights into ``model`` in place (tied tensors may be absent).

    Raises:
        InputError: the folder has no safetensors files, or a tensor is unknown, missing or of another shape.
    """
    import torch
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise InputError(f"{folder} holds no .safetensors files.")
    loaded = {k: v for f in files for k, v in load_file(f).items()}
    params = model.state_dict()
    unknown = sorted(set(loaded) - set(params))
    if unknown:
        raise InputError(f"{folder}: tensors {unknown[:5]} are not in the model.")
    ptrs = {params[k].data_ptr() for k in loaded}
    missing = sorted(k for k in params if k not in loaded and params[k].data_ptr() not in ptrs)
    if missing:
        raise InputError(f"{folder}: the model's tensors {missing[:5]} are missing.")
    with torch.no_grad():
        for name, value in loaded.items():
            if params[name].shape != value.shape:
                raise InputError(
                    f"{folder}: tensor {name} has shape {tuple(value.shape)}, "
                    f"the model's is {tuple(params[name].shape)}."
                )
            params[name].copy_(value)


def trainer_scorer(trainer, metric: str = "eval_loss") -> Scorer:
    """A scorer that loads each merge into ``trainer.model``, runs ``trainer.evaluate()`` and returns ``metric``.

    The trainer's own weights are restored after each evaluation, so the trainer can go on training.

    Args:
        trainer: A `transformers.Trainer` with an evaluation dataset.
        metric: The key of ``trainer.evaluate()``'s result to score by.

    Returns:
        ``score(folder) -> float`` for `sweep`.
    """

    def score(folder: Path) -> float:
        model = trainer.model
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        try:
            load_weights_into(model, folder)
            metrics = trainer.evaluate()
        finally:
            model.load_state_dict(saved)
        if metric not in metrics:
            raise InputError(f"trainer.evaluate() returned no {brief(metric)}; it returned {sorted(metrics)}.")
        return float(metrics[metric])

    return score


def _read_held_out(path: Path) -> str:
    """The held-out text: an existing, non-empty UTF-8 text file (a binary file is refused by name)."""
    if not path.is_file():
        raise InputError(f"Held-out text file {path} does not exist.")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            f"Held-out text file {path} is not UTF-8 text (byte {e.start}: {brief(data[e.start : e.start + 1])}); "
            "give a UTF-8 text file."
        ) from None
    if "\x00" in text:
        raise InputError(f"Held-out text file {path} holds NUL bytes (offset {text.index(chr(0))}): it is binary.")
    if not text.strip():
        raise InputError(f"Held-out text file {path} is empty: nothing to score.")
    return text


def _token_blocks(text: str, text_file: Path, tokenizer, max_length: int) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    blocks = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    blocks = [b for b in blocks if len(b) >= 2]
    if not blocks:
        raise InputError(f"Held-out text {text_file} has fewer than 2 tokens: nothing to score.")
    return blocks


def causal_lm_nats(model, blocks: list[list[int]], batch_size: int) -> tuple[float, int]:
    """(sum of next-token cross-entropy in nats, number of predicted tokens) over ``blocks``, in fp64."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for length in sorted({len(b) for b in blocks}, reverse=True):
            same = [b for b in blocks if len(b) == length]
            for start in range(0, len(same), batch_size):
                ids = torch.tensor(same[start : start + batch_size], device=device)
                logits = model(input_ids=ids).logits[:, :-1].double()
                targets = ids[:, 1:]
                total += torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
                ).item()
                count += targets.numel()
    return total, count


class TextLossScorer:
    """``score(folder)``: the causal-LM loss of a merged folder on a held-out text; see `text_loss_scorer`."""

    def __init__(self, text_file, tokenizer, *, batch_size: int, max_length: int, per: str, device) -> None:
        if per not in ("token", "byte"):
            raise InputError(f"`per` must be token or byte, got {brief(per)}.")
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in (batch_size, max_length)):
            raise InputError(
                f"batch_size and max_length must be integers, got {brief(batch_size)} and {brief(max_length)}."
            )
        if batch_size < 1 or max_length < 2:
            raise InputError(f"Need batch_size >= 1 and max_length >= 2, got {batch_size} and {max_length}.")
        self.path = Path(text_file)
        self.text = _read_held_out(self.path)
        self.tokenizer, self.batch_size, self.max_length, self.per = tokenizer, batch_size, max_length, per
        self.device = _checked_device(device)
        self.blocks: list[list[int]] | None = None
        self.bytes = 0

    def check(self, folder: str | os.PathLike) -> None:
        """Tokenise the text with the tokenizer (given, else ``folder``'s) and ``folder``'s position limit.

        `sweep` calls this before the first merge with the folder whose config and tokenizer the merges
        copy, so a text that gives no block fails at once.
        """
        from transformers import AutoConfig, AutoTokenizer

        tok = self.tokenizer
        if tok is None or isinstance(tok, (str, os.PathLike)):
            source = tok if tok is not None else folder
            try:
                tok = AutoTokenizer.from_pretrained(source)
            except (OSError, ValueError) as e:
                raise InputError(
                    f"Cannot load a tokenizer from {source} ({' '.join(str(e).split())[:200]}); "
                    "pass the tokenizer (--tokenizer)."
                ) from e
        positions = getattr(AutoConfig.from_pretrained(folder), "max_position_embeddings", None)
        self.blocks = _token_blocks(self.text, self.path, tok, min(self.max_length, positions or self.max_length))
        self.bytes = sum(len(tok.decode(b[1:]).encode("utf-8")) for b in self.blocks)

    def __call__(self, folder: Path) -> float:
        from transformers import AutoModelForCausalLM

        if self.blocks is None:
            self.check(folder)
        model = AutoModelForCausalLM.from_pretrained(folder).float().eval()
        if self.device is not None:
            model.to(self.device)
        rows, top = model.get_input_embeddings().num_embeddings, max(max(b) for b in self.blocks)
        if top >= rows:
            raise InputError(
                f"The tokenizer gives token id {top}, but the model in {folder} embeds only {rows} ids: "
                "the tokenizer does not belong to this model."
            )
        total, count = causal_lm_nats(model, self.blocks, self.batch_size)
        return total / (count if self.per == "token" else self.bytes)


def _checked_device(device: str | None) -> str | None:
    """``device`` if torch knows it and it is present here (a CUDA device needs CUDA)."""
    if device is None:
        return None
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"Unknown torch device {brief(device)}: {e}.") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"Device {brief(device)}: CUDA is not available on this machine.")
    return device


def text_loss_scorer(
    text_file: str | os.PathLike,
    tokenizer=None,
    *,
    batch_size: int = 8,
    max_length: int = 512,
    per: str = "token",
    device: str | None = None,
) -> TextLossScorer:
    """A scorer: the causal-LM loss of a merged folder on a held-out UTF-8 text file (nats per token or byte).

    The text is split into blocks of ``max_length`` tokens, at most the model's ``max_position_embeddings``
    (each block's first token is context only).
    ``per="byte"`` divides the summed loss by the UTF-8 bytes of the predicted tokens, which compares
    tokenizers. The file and the options are checked here; the text is tokenised once, by ``check(folder)``
    (which `sweep` calls before its first merge) or at the first call.

    Args:
        text_file: The held-out UTF-8 text.
        tokenizer: A tokenizer, or a folder/Hub id; None takes the first scored folder's (the run's).
        batch_size: Blocks per forward pass.
        max_length: Tokens per block.
        per: ``token`` or ``byte``.
        device: Torch device to score on (default: CPU).

    Returns:
        ``score(folder) -> float``: the mean loss in nats for `sweep`.

    Raises:
        InputError: a missing, empty, binary or non-UTF-8 text file, or a bad option.
    """
    return TextLossScorer(text_file, tokenizer, batch_size=batch_size, max_length=max_length, per=per, device=device)
