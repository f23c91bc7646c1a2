"""Score merges on lm-evaluation-harness tasks: `lm_eval_scorer` for `sweep`, and the PMA weights during training.

Downstream benchmarks are how merges are judged, and lm-evaluation-harness (``lm-eval``) is what everyone runs
them with. The sweep scorer runs lm-eval's own Hugging Face model class (``hf``) on each merged folder, with the
settings of ``lm_eval --model hf --model_args pretrained=FOLDER``, so a score equals what that command prints for
the same folder. During training the same class wraps the live model (with the PMA weights swapped in).

``lm-eval`` is an optional extra (``pip install 'pmakit[lm-eval]'``) and is imported only when a scorer is built.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from ...deprecation import warn_deprecated
from ...errors import InputError, brief


__all__ = ["LmEvalScorer", "lm_eval_scorer", "pma_lm_eval_metrics", "require_lm_eval"]

EXTRA_HINT = "lm-evaluation-harness scoring needs the `lm-eval` extra: pip install 'pmakit[lm-eval]'"


def require_lm_eval():
    """Import ``lm_eval``, or raise an ImportError that names the extra to install."""
    try:
        import lm_eval
    except ImportError as e:
        raise ImportError(f"{EXTRA_HINT} ({e}).") from e
    return lm_eval


@lru_cache(maxsize=4)
def _task_manager(include_path: str | None):
    """lm-eval's task index (built once per include path: indexing its thousands of YAML files takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def _checked_task_manager(tasks: Sequence[str], include_path: str | os.PathLike | None):
    require_lm_eval()
    if include_path is not None and not Path(include_path).is_dir():
        raise InputError(f"lm-eval include path {include_path} is not a folder.")
    manager = _task_manager(str(Path(include_path).resolve()) if include_path is not None else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in {include_path}" if include_path is not None else ""
        raise InputError(f"lm-eval knows no task {', '.join(map(repr, unknown))} (not in lm-eval's tasks{where}).")
    return manager


def _task_list(tasks: Sequence[str] | str) -> list[str]:
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names or not all(isinstance(t, str) and t for t in names):
        raise InputError(f"`tasks` must name at least one lm-eval task; got {brief(tasks)}.")
    return names


def _evaluate(model, tasks: list[str], manager, **options) -> dict:
    """lm-eval's per-task results (``{task: {"acc,none": ..., ...}}``) for an ``HFLM`` or model arguments."""
    from lm_eval import simple_evaluate

    out = simple_evaluate(model=model, tasks=tasks, task_manager=manager, log_samples=False, **options)
    return out["results"]


def _metric_key(metric: str) -> str:
    """lm-eval keys results by ``metric,filter``; a bare metric means the default filter ``none``."""
    return metric if "," in metric else f"{metric},none"


class LmEvalScorer:
    """``score(folder) -> float``: the mean of one lm-eval metric over tasks, for `sweep`; see `lm_eval_scorer`.

    Attributes:
        greater_is_better: Whether a larger score is better (lm-eval's own direction for the metric); `sweep`
            reads it. ``higher_is_better`` is its deprecated name.
        metric_name: A label for the sweep table, e.g. ``"hellaswag acc_norm (lm-eval)"``.
        last_results: lm-eval's per-task results of the last scored folder.
    """

    def __init__(self, tasks, manager, metric: str, options: dict, model_args: dict) -> None:
        self.tasks, self._manager, self.metric = tasks, manager, metric
        self._options, self._model_args = options, model_args
        from lm_eval.api.registry import is_higher_better

        direction = is_higher_better(metric.split(",")[0])
        self.greater_is_better = True if direction is None else bool(direction)
        self.metric_name = f"{' '.join(tasks)} {metric} (lm-eval)"
        self.last_results: dict = {}

    def __call__(self, folder: str | os.PathLike) -> float:
        model_args = {**self._model_args, "pretrained": str(folder)}
        self.last_results = _evaluate("hf", self.tasks, self._manager, model_args=model_args, **self._options)
        return _mean_metric(self.last_results, self.tasks, self.metric)

    @property
    def higher_is_better(self) -> bool:
        """Deprecated name of ``greater_is_better``."""
        warn_deprecated("`LmEvalScorer.higher_is_better`", "read `greater_is_better`")
        return self.greater_is_better


def _mean_metric(results: dict, tasks: list[str], metric: str) -> float:
    key, values = _metric_key(metric), []
    for task in tasks:
        found = results.get(task, {})
        if key not in found:
            have = sorted(k for k, v in found.items() if "," in k and "_stderr" not in k)
            raise InputError(f"lm-eval task {brief(task)} reports no {brief(key)}; it reports {brief(have)}.")
        values.append(float(found[key]))
    return math.fsum(values) / len(values)


def lm_eval_scorer(
    tasks: Sequence[str] | str,
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    metric: str = "acc",
    include_path: str | os.PathLike | None = None,
    batch_size: int | str = 1,
    device: str | None = None,
    model_args: dict | None = None,
) -> LmEvalScorer:
    """A `sweep` scorer: lm-evaluation-harness on each merged folder with lm-eval's ``hf`` model class.

    The score of a folder equals what ``lm_eval --model hf --model_args pretrained=FOLDER --tasks ...
    --include_path ...`` reports for it with the same settings (lm-eval's defaults: batch size 1, its seeds).
    With several tasks the score is the plain mean of ``metric`` over them.

    Args:
        tasks: lm-eval task (or group) names, e.g. ``["hellaswag"]``; local YAML tasks come from ``include_path``.
        num_fewshot: Few-shot examples per prompt (lm-eval's ``--num_fewshot``; None: each task's default).
        limit: At most this many examples per task, or a fraction of them below 1 (``--limit``).
        metric: The metric to score by, e.g. ``acc``, ``acc_norm`` or ``exact_match,strict-match``
            (``metric,filter``; a bare name takes the filter ``none``).
        include_path: A folder of extra task YAMLs (``--include_path``). Relative ``data_files`` in them
            resolve from the working folder, as with ``lm_eval``.
        batch_size: lm-eval's ``--batch_size`` (an int or ``"auto"``).
        device: lm-eval's ``--device`` (default ``cuda:0`` as in ``lm_eval``: the CPU when there is no GPU).
        model_args: Further ``HFLM`` arguments (``dtype``, ``trust_remote_code``...), as in ``--model_args``.

    Returns:
        An `LmEvalScorer`: ``score(folder) -> float``, with the ``greater_is_better`` that `sweep` reads.

    Raises:
        ImportError: lm-eval is not installed (the message names the ``lm-eval`` extra).
        InputError: no task, an unknown task, or a missing include path (checked before any merge).
    """
    names = _task_list(tasks)
    manager = _checked_task_manager(names, include_path)
    device = device or "cuda:0"  # the `lm_eval` command's default: lm-eval takes the CPU when there is no GPU
    options = {"num_fewshot": num_fewshot, "limit": limit, "batch_size": batch_size, "device": device}
    return LmEvalScorer(names, manager, metric, options, dict(model_args or {}))


def check_lm_eval_settings(config) -> None:
    """Refuse, when training starts, lm-eval tasks that cannot run (missing extra, unknown task)."""
    if config.eval_lm_eval_tasks:
        _checked_task_manager(_task_list(config.eval_lm_eval_tasks), config.eval_lm_eval_include_path)


def _log_key(task: str, key: str) -> str:
    metric, _, filter_name = key.partition(",")
    return f"eval_pma_{task}_{metric}" + (f"_{filter_name}" if filter_name not in ("", "none") else "")


@contextmanager
def _training_rng_kept() -> Iterator[None]:
    """lm-eval seeds Python's, NumPy's and torch's global generators: give training its own states back."""
    import random

    import numpy as np
    import torch

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def pma_lm_eval_metrics(trainer, config, dataset_name: str | None = None) -> dict[str, float]:
    """lm-eval's metrics of the trainer's model as it is now (PMA weights swapped in): ``eval_pma_<task>_<metric>``.

    Logs them (``trainer.log``) and returns them. Runs once per evaluation: with several eval datasets, only for
    the first. The model is wrapped in memory (``HFLM(pretrained=model)``) with the trainer's tokenizer and
    ``per_device_eval_batch_size``.
    """
    if not config.eval_lm_eval_tasks:
        return {}
    datasets = trainer.eval_dataset
    if dataset_name is not None and isinstance(datasets, dict) and dataset_name != next(iter(datasets)):
        return {}
    tokenizer = trainer.processing_class
    if tokenizer is None:
        raise InputError("`eval_lm_eval_tasks` needs the tokenizer: give the Trainer a `processing_class`.")
    from lm_eval.models.huggingface import HFLM

    tasks = _task_list(config.eval_lm_eval_tasks)
    manager = _checked_task_manager(tasks, config.eval_lm_eval_include_path)
    model = HFLM(pretrained=trainer.model, tokenizer=tokenizer, batch_size=trainer.args.per_device_eval_batch_size)
    options = {"num_fewshot": config.eval_lm_eval_num_fewshot, "limit": config.eval_lm_eval_limit}
    with _training_rng_kept():
        results = _evaluate(model, tasks, manager, **options)
    metrics = {
        _log_key(task, key): float(value)
        for task, values in results.items()
        for key, value in values.items()
        if "," in key and "_stderr" not in key and isinstance(value, (int, float))
    }
    trainer.log(metrics)  # the PMA evaluation logged its own metrics already; these join the run's logs here
    return metrics
