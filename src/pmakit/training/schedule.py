"""Merge schedules in a Trainer run: the plan, the windows, and each merge written and evaluated.

`PmaCallback` hands a schedule (``merge_steps``) to `ScheduledMerges` when training starts: it
resolves ``"wsd"`` from the Trainer's ``warmup_stable_decay`` arguments (the merge goes right
before the decay, at step warmup + stable, the boundary ``transformers.get_wsd_schedule`` draws),
refuses sharded optimizers, and attaches `pmakit.online.schedule.MergeWindows` to the engine. At
each step end it writes the merges finished in that step as ``pma-<step>`` with the run's exporter
and, with ``eval``, evaluates each under ``eval_pma_<step>_*`` metrics. The schedule replaces the
back-to-back cycles: no cycle is written, ``pma/`` holds the latest scheduled merge.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..errors import InputError, brief
from ..online.config import PmaConfig
from ..online.distributed import is_dtensor
from ..online.engine import PmaEngine
from ..online.schedule import Merge, MergeWindows
from ..online.windows import WSD, checked_plan
from .export import PmaExporter


__all__ = ["ScheduledMerges", "check_wsd_scheduler", "silent_on_evaluate", "wsd_merge_step"]

logger = logging.getLogger(__name__)

WSD_SCHEDULER = "warmup_stable_decay"


@contextmanager
def silent_on_evaluate(trainer) -> Iterator[None]:
    """Keep ``trainer.evaluate`` from calling the callbacks' ``on_evaluate`` within the block.

    A PMA evaluation runs inside the main one (its metrics reach the callbacks through the main
    evaluation's ``metrics``, so each evaluation is seen once, e.g. by `EarlyStoppingCallback`), or
    on a scheduled merge (logged, not an evaluation the callbacks should act on).
    """
    handler = trainer.callback_handler
    previous = vars(handler).get("on_evaluate")
    handler.on_evaluate = lambda args, state, control, *rest, **kwargs: control
    try:
        yield
    finally:
        if previous is None:
            del handler.on_evaluate
        else:
            handler.on_evaluate = previous


def _namer(args) -> Callable[[str], str]:
    """How messages call a setting: ``pma_``-prefixed for `PmaArguments`, plain for a `PmaConfig`."""
    prefix = "pma_" if hasattr(args, "pma_merge_steps") else ""
    return lambda key: f"`{prefix}{key}`"


def check_wsd_scheduler(args) -> None:
    """Refuse ``merge_steps="wsd"`` unless the Trainer's arguments describe a ``warmup_stable_decay`` schedule."""
    kind = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    if kind != WSD_SCHEDULER:
        name = _namer(args)
        raise InputError(
            f"{name('merge_steps')}={brief(WSD)} merges right before the decay of a {WSD_SCHEDULER} schedule, but "
            f"`lr_scheduler_type` is {brief(kind)}: set lr_scheduler_type={brief(WSD_SCHEDULER)} (with "
            "lr_scheduler_kwargs num_decay_steps) or give the merge steps as a list."
        )


def wsd_merge_step(args, max_steps: int, every: int) -> int:
    """The optimizer step after which the WSD decay starts: warmup + stable steps, as `get_wsd_schedule` derives them.

    The weights after that step were trained at the warmup and stable learning rates only.
    """
    check_wsd_scheduler(args)
    kwargs = args.lr_scheduler_kwargs if isinstance(args.lr_scheduler_kwargs, dict) else {}
    warmup = args.get_warmup_steps(max_steps)
    stable = kwargs.get("num_stable_steps")
    if stable is None:
        stable = max_steps - warmup - int(kwargs.get("num_decay_steps", 0))
    step = warmup + int(stable)
    name = _namer(args)
    if step < 1 or step % every:
        raise InputError(
            f"{name('merge_steps')}={brief(WSD)}: the decay starts after optimizer step {step} (warmup {warmup} + "
            f"stable {stable}), which is not a positive multiple of {name('interleave_step')}={every}; choose the "
            "warmup and num_stable_steps (or num_decay_steps) so that it is."
        )
    return step


class ScheduledMerges:
    """The schedule's share of `PmaCallback`: windows on the engine, merges written and evaluated at step ends.

    Args:
        config: The PMA settings, with ``merge_steps`` set.
    """

    def __init__(self, config: PmaConfig) -> None:
        self.config = config
        self.windows: MergeWindows | None = None
        self.exporter: PmaExporter | None = None
        self.trainer = None
        self.written: list[int] = []

    def start(self, engine: PmaEngine, args, max_steps: int, exporter: PmaExporter, trainer=None) -> None:
        """Resolve the plan for this run, refuse what it cannot run on, and fold the windows from the engine."""
        config, name = self.config, _namer(args)
        _refuse_sharded(engine, args, name)
        if config.eval and (trainer is None or trainer.eval_dataset is None):
            raise InputError(
                f"{name('eval')} with {name('merge_steps')} evaluates each merge on the Trainer's eval_dataset: "
                "give the Trainer one (and the callback `trainer=`)."
            )
        every = config.interleave_step
        ends = [wsd_merge_step(args, max_steps, every)] if config.merge_steps == WSD else list(config.merge_steps)
        anchors = config.rule.anchors
        plan = checked_plan(ends, config.merge_window, every, config.start_step, config.merge_max_open, name, anchors)
        if self.windows is not None:
            self.windows.detach()
        self.windows = MergeWindows(engine.optimizer, plan, config)
        self.exporter, self.trainer, self.written = exporter, trainer, []
        engine.on_fold.add(self.fold)
        params = sum(p.numel() for group in engine.optimizer.param_groups for p in group["params"] if p.requires_grad)
        logger.info(
            "PMA: merges at steps %s over %d steps (%d samples each); up to %d window(s) open at once, %.1f MB each "
            "(%d fp32 cop%s of the trainable weights).",
            ends, plan.window, plan.size, len(plan.most_open()), params * 4 * (1 + len(anchors)) / 1e6,
            1 + len(anchors), "ies" if anchors else "y",
        )  # fmt: skip

    def fold(self, engine: PmaEngine, step: int) -> None:
        """The engine's fold handler (the windows of the current run)."""
        if self.windows is not None:
            self.windows(engine, step)

    def flush(self, control=None) -> None:
        """Write (and evaluate) the merges finished since the last step end; ``control``: the Trainer's, kept."""
        if self.windows is None:
            return
        for merge in self.windows.take_ready():
            self.exporter.export_merge(merge.averages, merge.step, merge.sample_steps)
            self.written.append(merge.step)
            if self.config.eval:
                self._evaluate(merge, control)

    def _evaluate(self, merge: Merge, control) -> None:
        """The Trainer's evaluation on the merged weights, logged as ``eval_pma_<step>[_<dataset>]_*``.

        Its log must not cancel the step's own: logging resets ``control.should_log``, so it is put back.
        """
        trainer, prefix = self.trainer, f"eval_pma_{merge.step}"
        datasets = trainer.eval_dataset
        named = datasets.items() if isinstance(datasets, dict) else [(None, None)]
        should_log = getattr(control, "should_log", False)
        with self.windows.swapped(merge), silent_on_evaluate(trainer):
            for dataset_name, dataset in named:
                key = f"{prefix}_{dataset_name}" if dataset_name is not None else prefix
                trainer.evaluate(eval_dataset=dataset, metric_key_prefix=key)
        if control is not None:
            control.should_log = should_log

    def finish(self, step: int) -> None:
        """End of training: write what finished last, and say so when no merge was written."""
        self.flush()
        if not self.written and self.windows is not None:
            warnings.warn(
                f"PMA: no scheduled merge was written in {step} optimizer steps (merges at steps "
                f"{', '.join(map(str, self.windows.plan.ends))}); no `pma` folder was written.",
                UserWarning,
                stacklevel=3,
            )


def _refuse_sharded(engine: PmaEngine, args, name: Callable[[str], str]) -> None:
    """The windows are kept beside an unsharded optimizer (one process, DDP): refuse FSDP and DeepSpeed."""
    params = [p for group in engine.optimizer.param_groups for p in group["params"]]
    backend = None
    if getattr(engine, "deepspeed", False) or getattr(args, "deepspeed", None):
        backend = "DeepSpeed"
    elif getattr(args, "fsdp", None) or any(is_dtensor(p) for p in params):
        backend = "FSDP"
    if backend is not None:
        raise InputError(
            f"{name('merge_steps')} keeps each open window as a full fp32 copy beside the optimizer, saved with a "
            f"single-process or DDP optimizer state; {backend} shards that state, which merge schedules do not "
            "support yet. Train with DDP or one process, or use back-to-back cycles (unset merge_steps)."
        )
