"""`sweep` itself: plan every candidate, merge and score each in a scratch folder, report, save and push the best."""

from __future__ import annotations

import math
import os
import shutil
import warnings
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path

from ...deprecation import greater_is_better_of, renamed_keyword
from ...errors import InputError
from ...io.folders import atomic_directory, output_lock, scratch_directory
from ...io.hub_target import HubTarget, as_hub_target
from .candidates import Candidate, candidate_settings, candidates, plan_candidates, step_of, sweep_inputs
from .reports import SweepResult, SweepRow, card_section, csv_table, markdown_table, write_reports
from .scorers import Scorer


__all__ = ["sweep"]


def _merge_candidate(inputs: list[Path], candidate: Candidate, output: Path, alpha: float | None, options: dict):
    from ...merging import merge

    settings = candidate_settings(candidate, alpha, options)
    return merge(inputs[-candidate.window :], output, overwrite=True, progress=False, **settings)


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


def _score_candidate(inputs, candidate: Candidate, plan, scratch: Path, score: Scorer, alpha, options) -> SweepRow:
    """Merge one candidate into the scratch folder, score it, delete it; the row carries the plan's resolved rule."""
    folder = scratch / "candidate"
    try:
        _merge_candidate(inputs, candidate, folder, alpha, options)
        value = float(score(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    window = inputs[-candidate.window :]
    if not math.isfinite(value):
        warnings.warn(f"Sweep candidate {candidate.rule} over {candidate.window} scored {value}.", stacklevel=3)
    first, last = step_of(window[0]), step_of(window[-1])
    return SweepRow(candidate.rule, candidate.window, first, last, value, plan.rule.algo, dict(plan.rule.settings()))


def _best(rows: list[SweepRow], greater_is_better: bool) -> SweepRow:
    finite = [r for r in rows if math.isfinite(r.score)]
    if not finite:
        raise InputError("No sweep candidate got a finite score.")
    return (max if greater_is_better else min)(finite, key=lambda r: r.score)


def _save_best(result, inputs, out: Path, alpha: float | None, options: dict, metric: str, overwrite: bool) -> Path:
    target = out / "best"
    with atomic_directory(target, overwrite=overwrite) as tmp:
        folder = tmp / "model"
        _merge_candidate(inputs, Candidate(result.best.rule, result.best.window), folder, alpha, options)
        card = folder / "README.md"
        card.write_text(card.read_text(encoding="utf-8") + card_section(result, metric), encoding="utf-8")
        (folder / "sweep.csv").write_text(csv_table(result.rows, metric), encoding="utf-8")
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
    alpha: float | None = None,
    alphas: Iterable[float] | None = None,
    source: str = "auto",
    save_best: bool = True,
    overwrite: bool = False,
    push_to_hub: str | HubTarget | None = None,
    merge_options: dict | None = None,
    private: bool | None = None,
    token: str | None = None,
    higher_is_better: bool | None = None,
) -> SweepResult:
    """Merge and score every (rule, window) candidate; write the tables and plot; save and push the best.

    Each row names its rule spec and the rule's parameters as merged (`SweepRow.params`: defaults and the
    sweep's ``alpha`` included), in the result, ``sweep.csv``, ``sweep.md`` and the best model's card.

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
        alpha: EMA weight of the newest sample for the specs of ``ema`` and ``ema_corrected`` that give none
            (default: the rule's, 0.2).
        alphas: An alpha grid instead: each spec of a rule with an alpha it does not give becomes one candidate
            per alpha (``ema`` -> ``ema:0.05``, ``ema:0.1``...); see `expand_alphas`.
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
    if alpha is not None and alphas is not None:
        raise InputError("Give `alpha` (for every spec without one) or `alphas` (a grid of them), not both.")
    chosen = candidates(rules, list(windows), len(folders), alphas)
    target = _hub_target(push_to_hub, output_dir, save_best, private=private, token=token)
    greater = renamed_keyword(
        greater_is_better, higher_is_better, new="greater_is_better", old="higher_is_better", where="sweep"
    )
    greater = greater if greater is not None else bool(greater_is_better_of(score))
    out = Path(output_dir) if output_dir is not None else None
    if out is not None:
        _check_output_dir(out, save_best, overwrite)
    options = dict(merge_options or {})
    plans = plan_candidates(folders, chosen, alpha, options)
    _check_scorer(score, plans[0].donor.path)
    with output_lock(out) if out is not None else nullcontext(), scratch_directory("pmakit-sweep") as scratch:
        rows = [
            _score_candidate(folders, c, p, scratch, score, alpha, options) for c, p in zip(chosen, plans, strict=True)
        ]
        result = SweepResult(rows=rows, best=_best(rows, greater), greater_is_better=greater)
        result.markdown = markdown_table(rows, result.best, metric)
        if out is not None:
            _finish(result, folders, out, alpha, options, metric, overwrite, save_best, target)
    return result


def _finish(result: SweepResult, folders, out: Path, alpha, options, metric, overwrite, save_best, target) -> None:
    """Write the table and plot, merge the best again into ``out/best`` and push it when asked."""
    write_reports(result, out, metric)
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
