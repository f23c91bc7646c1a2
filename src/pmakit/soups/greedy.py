"""Greedy soup (Wortsman et al. 2022, "Model soups", recipe 1), streamed from safetensors.

Candidates (model folders fine-tuned from one initialisation, or checkpoints of one run) are
scored on a held-out set and sorted best first. The soup starts as the best candidate; each
next candidate is tried in the soup (the uniform average of the kept ones plus it) and kept only
if the held-out metric does not get worse (``strict=True``: only if it gets better, as the
authors' code does; ties matter when the metric is discrete, e.g. accuracy). On the held-out set
the soup is never worse than the best single candidate.

Memory: one fp32 running average of the kept ingredients plus the evaluation model; a candidate
is read tensor by tensor from memory-mapped safetensors, so memory does not grow with the
number of candidates. The running average follows `pmakit.averaging` (SMA: ``c_k = 1/k``).

The evaluation is a function ``score(model) -> float`` or a `transformers.Trainer` with an
eval set (``trainer.evaluate()[metric_key]``, e.g. ``eval_loss``; lower is better for losses).
The result is written like any merge: an atomic folder with the config and tokenizer of the best
ingredient and a model card listing each candidate with its score and whether it was kept; it
can be pushed to the Hub (`pmakit.io.hub.push_folder_to_hub`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..averaging import AveragingRule
from ..deprecation import greater_is_better_of, renamed_keyword
from ..errors import InputError, brief
from ..io.cards import build_model_card
from ..io.folders import atomic_directory, check_output_outside_inputs
from ..io.hub_target import HubTarget, as_hub_target
from ..io.side_files import copy_side_files
from ..io.weight_files import find_weight_files
from .weighted_sum import weighted_sum


__all__ = ["GreedySoupResult", "SoupStep", "greedy_soup"]


@dataclass
class SoupStep:
    """One candidate: its own score, the soup's score with it added (None for the first), whether it was kept."""

    path: str
    score: float
    soup_score: float | None
    kept: bool


@dataclass
class GreedySoupResult:
    """What the greedy procedure did; ``steps`` in the order tried (best single candidate first).

    Attributes:
        steps: Each candidate tried, its own score, the soup's score with it and whether it was kept.
        final_score: The soup's score.
        greater_is_better: Direction of the score.
        strict: Whether ties were rejected.
        output_dir: Where the soup was written, if it was.
        hub_url: The Hub commit URL, if pushed.
        metric: The metric's name.
    """

    steps: list[SoupStep]
    final_score: float
    greater_is_better: bool
    strict: bool
    output_dir: Path | None = None
    hub_url: str | None = None
    metric: str = "score"
    kept: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.kept = [s.path for s in self.steps if s.kept]


class _Candidate:
    """A candidate's tensors, memory-mapped: ``get(name)`` reads one tensor."""

    def __init__(self, folder: Path, stack: ExitStack) -> None:
        from safetensors import safe_open

        self.folder = folder
        self.where: dict[str, object] = {}
        for file in find_weight_files(folder):
            try:
                handle = stack.enter_context(safe_open(str(file), framework="pt"))
            except Exception as err:
                raise InputError(f"{file} cannot be read as safetensors: {err}") from err
            for key in handle.keys():
                self.where[key] = handle

    def get(self, key: str) -> torch.Tensor:
        return self.where[key].get_tensor(key)


def _check_keys(model_state: dict, candidates: Sequence[_Candidate]) -> list[str]:
    first = candidates[0]
    keys = sorted(first.where)
    for cand in candidates[1:]:
        if set(cand.where) != set(keys):
            diff = sorted(set(cand.where) ^ set(keys))[:3]
            raise InputError(f"{cand.folder} and {first.folder} hold different tensors (e.g. {brief(diff)}).")
    unknown = [k for k in keys if k not in model_state]
    if unknown:
        raise InputError(
            f"Tensor {brief(unknown[0])} of {first.folder} is not in the evaluation model "
            f"({len(unknown)} such): a different architecture?"
        )
    return keys


@torch.no_grad()
def _load(model_state: dict, cand: _Candidate, keys: Sequence[str]) -> None:
    for key in keys:
        value = cand.get(key)
        target = model_state[key]
        if value.shape != target.shape:
            raise InputError(
                f"Tensor {brief(key)} has shape {tuple(value.shape)} in {cand.folder} but "
                f"{tuple(target.shape)} in the evaluation model."
            )
        target.copy_(value)


def _make_scorer(score, metric_key: str | None, greater_is_better: bool | None):
    """(score function of the model, metric name, greater_is_better) for a callable or a Trainer."""
    if hasattr(score, "evaluate") and hasattr(score, "model"):
        trainer = score
        args = trainer.args
        key = metric_key or getattr(args, "metric_for_best_model", None) or "eval_loss"
        if not key.startswith("eval_"):
            key = f"eval_{key}"
        if greater_is_better is None:
            if getattr(args, "metric_for_best_model", None) and args.greater_is_better is not None:
                greater_is_better = bool(args.greater_is_better)
            else:
                greater_is_better = not key.endswith("loss")
        if trainer.eval_dataset is None:
            raise InputError("The Trainer passed to greedy_soup needs an `eval_dataset` (the held-out set).")

        def by_trainer(model) -> float:
            metrics = trainer.evaluate()
            if key not in metrics:
                raise KeyError(f"The Trainer's evaluation has no metric {brief(key)}; it returned {sorted(metrics)}.")
            return float(metrics[key])

        return by_trainer, key, greater_is_better, trainer.model
    if not callable(score):
        raise TypeError("`score` must be a function model -> float or a transformers Trainer with an eval set.")
    greater_is_better = greater_is_better if greater_is_better is not None else greater_is_better_of(score)
    if greater_is_better is None:
        raise InputError("With a score function, say whether higher is better: greater_is_better=True or False.")
    return (lambda model: float(score(model))), metric_key or "score", greater_is_better, None


def greedy_soup(
    candidates: Sequence[str | os.PathLike],
    score: Callable[[torch.nn.Module], float] | object = None,
    *,
    output_dir: str | os.PathLike | None = None,
    model: torch.nn.Module | None = None,
    scores: Sequence[float] | None = None,
    greater_is_better: bool | None = None,
    metric_key: str | None = None,
    strict: bool = False,
    overwrite: bool = False,
    push_to_hub: str | HubTarget | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    evaluate: Callable[[torch.nn.Module], float] | object = None,
) -> GreedySoupResult:
    """Build a greedy soup of ``candidates`` (model folders with safetensors weights).

    ``score`` scores the model it is given (its weights are set to the candidate or trial soup
    first), or is a `Trainer` whose model is used. ``model`` is the evaluation model for a
    function (default: ``AutoModelForCausalLM.from_pretrained`` of the first candidate).
    ``scores`` are the candidates' own held-out scores if already known (skips evaluating them
    one by one). ``strict``: keep a candidate only if the soup gets strictly better. With
    ``output_dir`` the soup is written there (and pushed to ``push_to_hub`` if given). On return
    the evaluation model holds the soup.

    Args:
        candidates: Model folders, in any order (they are sorted by their own score).
        score: A function ``model -> score`` or a `transformers.Trainer` with an eval set.
        output_dir: Where the soup is written (None: not written).
        model: The evaluation model for a function ``score``.
        scores: The candidates' own scores, if known.
        greater_is_better: Direction of the score (default: the Trainer's metric, or the function's own
            ``greater_is_better`` attribute).
        metric_key: The Trainer metric to use (default: its ``metric_for_best_model`` or ``eval_loss``).
        strict: Keep a candidate only if the score strictly improves.
        overwrite: Replace an existing output folder.
        push_to_hub: A repo id or `HubTarget` (private, revision, commit message, token) to push the soup to.
        private: Deprecated: ``push_to_hub=HubTarget(repo_id, private=True)``.
        revision: Deprecated: ``push_to_hub=HubTarget(repo_id, revision=...)``.
        commit_message: Deprecated: ``push_to_hub=HubTarget(repo_id, commit_message=...)``.
        token: Deprecated: ``push_to_hub=HubTarget(repo_id, token=...)``.
        evaluate: Deprecated name of ``score``.

    Returns:
        What was tried and kept, the final score, and where the soup went.

    Raises:
        FileNotFoundError: a candidate folder is missing.
        KeyError: the Trainer's evaluation has no ``metric_key``.
        TypeError: ``score`` is neither a function nor a Trainer.
        ValueError: no candidates or one listed twice, candidates whose tensors differ, a Trainer
            without ``eval_dataset``, a function without ``greater_is_better``, one score per
            candidate missing, or ``push_to_hub`` without ``output_dir``.
    """
    score = renamed_keyword(score, evaluate, new="score", old="evaluate", where="greedy_soup")
    folders = _candidate_folders(candidates, scores)
    hub = dict(private=private, revision=revision, commit_message=commit_message, token=token)
    target = as_hub_target(push_to_hub, where="greedy_soup", **hub)
    if target is not None and output_dir is None:
        raise InputError("`push_to_hub` uploads the written soup: pass `output_dir` too.")
    score_fn, metric, higher, trainer_model = _make_scorer(score, metric_key, greater_is_better)
    model = _evaluation_model(model, trainer_model, folders)
    with ExitStack() as stack:
        cands = [_Candidate(f, stack) for f in folders]
        run = _GreedyRun(model, cands, score_fn, higher, strict)
        steps, best = run.cook(scores)
    result = GreedySoupResult(steps, run.current, higher, strict, metric=metric)
    if output_dir is not None:
        result.output_dir = _write(model, Path(output_dir), best.folder, result, overwrite)
        if target is not None:
            result.hub_url = _push(result, target)
    return result


def _candidate_folders(candidates: Sequence[str | os.PathLike], scores: Sequence[float] | None) -> list[Path]:
    """The candidate folders, checked: at least one, each an existing folder, none twice, one score each."""
    if not candidates:
        raise InputError("Give at least one candidate model folder.")
    folders = [Path(c) for c in candidates]
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"Candidate {folder} is not a folder.")
    if len(set(map(os.path.abspath, folders))) != len(folders):
        raise InputError("A candidate is listed twice; each folder may enter the soup once.")
    if scores is not None and len(scores) != len(folders):
        raise InputError(f"Got {len(scores)} scores for {len(folders)} candidates; give one score per candidate.")
    return folders


def _evaluation_model(model, trainer_model, folders: Sequence[Path]) -> torch.nn.Module:
    """The Trainer's model, else the given one, else the first candidate loaded with transformers."""
    if trainer_model is not None:
        return trainer_model
    if model is not None:
        return model
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folders[0])


class _GreedyRun:
    """The greedy procedure on one evaluation model: ``cook`` tries the candidates best first.

    Only the fp32 running average of the kept ingredients is held; a trial soup is written straight
    into the evaluation model's weights, tensor by tensor.
    """

    def __init__(self, model, cands: Sequence[_Candidate], score_fn, higher: bool, strict: bool) -> None:
        self.model, self.cands, self.score_fn = model, cands, score_fn
        self.higher, self.strict = higher, strict
        self.state = model.state_dict()
        self.keys = _check_keys(self.state, cands)
        self.floating = [k for k in self.keys if self.state[k].is_floating_point()]
        self.rule = AveragingRule("sma")
        self.current = math.nan

    def better(self, new: float, old: float) -> bool:
        if self.strict:
            return new > old if self.higher else new < old
        return new >= old if self.higher else new <= old

    def own_scores(self, scores: Sequence[float] | None) -> list[float]:
        """Each candidate's own held-out score (given, or evaluated one by one)."""
        if scores is not None:
            return [float(s) for s in scores]
        own = []
        for cand in self.cands:
            _load(self.state, cand, self.keys)
            own.append(self.score_fn(self.model))
        return own

    def cook(self, scores: Sequence[float] | None) -> tuple[list[SoupStep], _Candidate]:
        """Try every candidate, best first; leave the soup in the model. Returns the steps and the best one."""
        own = self.own_scores(scores)
        order = sorted(range(len(own)), key=lambda i: -own[i] if self.higher else own[i])  # stable on ties
        best = self.cands[order[0]]
        average = {k: best.get(k).to(torch.float32) for k in self.floating}
        _load(self.state, best, self.keys)  # integer tensors (and the start of the soup) come from the best
        self.current = own[order[0]]
        steps = [SoupStep(str(best.folder), own[order[0]], None, True)]
        for i in order[1:]:
            c = self.rule.coefficient(sum(step.kept for step in steps) + 1)
            trial = self.try_candidate(average, self.cands[i], c)
            keep = self.better(trial, self.current)
            steps.append(SoupStep(str(self.cands[i].folder), own[i], trial, keep))
            if keep:
                self.add(average, self.cands[i], c)
                self.current = trial
        with torch.no_grad():
            for k in self.floating:
                self.state[k].copy_(average[k])
        return steps, best

    def try_candidate(self, average: dict[str, torch.Tensor], cand: _Candidate, c: float) -> float:
        """Score the soup with ``cand`` added (``(1 - c) avg + c x``, rounded once into the model)."""
        with torch.no_grad():
            for k in self.floating:
                mixed = _mixed(average[k], cand, k, c, self.state[k].dtype)
                self.state[k].copy_(mixed)
        return self.score_fn(self.model)

    def add(self, average: dict[str, torch.Tensor], cand: _Candidate, c: float) -> None:
        """Fold a kept candidate into the fp32 running average."""
        for k in self.floating:
            average[k] = _mixed(average[k], cand, k, c, torch.float32)


def _mixed(average: torch.Tensor, cand: _Candidate, key: str, c: float, dtype: torch.dtype) -> torch.Tensor:
    """One step of the running form, ``avg + c (x - avg) = (1 - c) avg + c x``, via the tools' weighted sum."""
    return weighted_sum(
        [average, cand.get(key)], [1.0 - c, c], name=key, sources=["the soup", cand.folder], out_dtype=dtype
    )


def _push(result: GreedySoupResult, target: HubTarget) -> str:
    from ..io.hub import push_folder_to_hub

    if target.commit_message is None:
        message = f"Greedy soup of {len(result.kept)} of {len(result.steps)} candidates"
        target = replace(target, commit_message=message)
    return push_folder_to_hub(result.output_dir, target)


def _write(model, output: Path, best: Path, result: GreedySoupResult, overwrite: bool) -> Path:
    check_output_outside_inputs(output, [(step.path, step.path) for step in result.steps])
    with atomic_directory(output, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        copy_side_files(best, tmp)  # config and tokenizer of the best ingredient
        (tmp / "README.md").write_text(_card(result, best), encoding="utf-8")
    return output


def _card(result: GreedySoupResult, best: Path) -> str:
    direction = "higher" if result.greater_is_better else "lower"
    rows = ["| # | candidate | own score | soup score with it | kept |", "|---|---|---|---|---|"]
    for i, s in enumerate(result.steps, 1):
        soup = "(first: the best single candidate)" if s.soup_score is None else f"{s.soup_score:.6g}"
        rows.append(f"| {i} | `{s.path}` | {s.score:.6g} | {soup} | {'yes' if s.kept else 'no'} |")
    recipe = {
        "method": "greedy_soup",
        "metric": result.metric,
        "greater_is_better": result.greater_is_better,
        "strict": result.strict,
        "final_score": result.final_score,
        "ingredients": [
            {"path": s.path, "score": s.score, "soup_score": s.soup_score, "kept": s.kept} for s in result.steps
        ],
        "weights": {p: 1.0 / len(result.kept) for p in result.kept},
    }
    summary = (
        f"A greedy soup (Wortsman et al., 2022): the uniform average of {len(result.kept)} of {len(result.steps)} "
        f"candidates. Candidates were sorted by their held-out `{result.metric}` ({direction} is better) and each "
        f"was kept only if the soup's score {'improved' if result.strict else 'did not get worse'}. Final held-out "
        f"`{result.metric}`: {result.final_score:.6g} (best single candidate: {result.steps[0].score:.6g}). "
        f"Config and tokenizer come from the best candidate, `{best}`."
    )
    return build_model_card(
        title="Greedy soup",
        summary=summary,
        base_models=[s.path for s in result.steps if s.kept],
        tags=("merge", "pma", "model-soup", "greedy-soup"),
        recipe=recipe,
        details=[("Ingredients", "\n".join(rows))],
    )
