"""`PmaCallback`: PMA for any `transformers.Trainer` (or subclass such as TRL's `SFTTrainer`).

The callback attaches the engine to the Trainer's optimizer, writes the merged model at every
cycle end (`pma-<step>/`, and `pma/` for the latest merge), evaluates on the PMA weights when
asked, and finishes `pma/` at the end of training.

When training starts (or resumes) it also: removes the temporaries of `pma`/`pma-<step>`
folders whose writer died (`kill -9` mid-export; `pmakit.io.folders.remove_stale_temporaries`),
counts optimizer steps from the Trainer's ``global_step`` when the checkpoint carried no PMA
counters (a run resumed with PMA for the first time), and hands the Trainer's ``disable_tqdm`` to
its exports and sample store, so they draw no "Writing model shards" bar when the Trainer's own
bars are off.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..errors import InputError, TrainingError
from ..io.folders import remove_stale_temporaries
from ..online.config import PmaConfig
from ..online.engine import PmaEngine, attach_engine
from ..online.slots import is_slot_key
from ..tools.sweep.lm_eval import check_lm_eval_settings, pma_lm_eval_metrics
from .export import LATEST_DIR, PMA_PREFIX, PmaExporter
from .samples import PmaSampleStore
from .schedule import ScheduledMerges, silent_on_evaluate


__all__ = ["PmaCallback", "remove_stale_pma_temporaries"]

_PMA_FOLDER_RE = re.compile(rf"^(?:{re.escape(LATEST_DIR)}|{re.escape(PMA_PREFIX)}\d+)$")


def remove_stale_pma_temporaries(output_dir: str | Path) -> list[Path]:
    """Delete what dead writers left of ``pma``/``pma-<step>`` folders in ``output_dir`` (no other folder)."""
    return remove_stale_temporaries(output_dir, lambda name: _PMA_FOLDER_RE.match(name) is not None)


class PmaCallback(TrainerCallback):
    """Add PMA to any Trainer: ``trainer.add_callback(PmaCallback(PmaConfig(interleave_step=100)))``.

    Pass ``trainer=`` (or use `PmaTrainer`) to evaluate on the PMA weights (``eval=True``): the
    callback then runs the Trainer's own evaluation with the PMA weights swapped in and logs
    ``eval_pma_*`` metrics. The engine attaches to the optimizer at the start of training;
    `PmaTrainer` attaches it earlier, when the optimizer is created, which also keeps a resumed
    fp32 average exact for bf16/fp16 models.

    Args:
        config: The PMA settings (default: ``PmaConfig(**settings)``).
        trainer: The Trainer the callback is added to; needed for ``eval=True``.
        **settings: `PmaConfig` fields, when ``config`` is not given.

    Raises:
        ValueError: invalid settings, both ``config`` and ``settings``, or (when training starts)
            ``eval=True`` without ``trainer``.
        RuntimeError: the Trainer passed no optimizer to the callback.
    """

    def __init__(self, config: PmaConfig | None = None, trainer=None, **settings) -> None:
        if config is not None and settings:
            raise InputError("Pass either a `PmaConfig` or keyword settings, not both.")
        self.config = config if config is not None else PmaConfig(**settings)
        self.trainer = trainer
        self.engine: PmaEngine | None = None
        self.exporter: PmaExporter | None = None
        self.schedule = ScheduledMerges(self.config) if self.config.merge_steps is not None else None
        self._in_pma_eval = False

    def attach(self, optimizer) -> PmaEngine:
        """Attach (once) the PMA engine to ``optimizer`` and return it."""
        self.engine = attach_engine(optimizer, self.config)
        return self.engine

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        optimizer = kwargs.get("optimizer")
        if optimizer is None:
            raise TrainingError("PmaCallback needs the Trainer's optimizer, but the Trainer passed none.")
        engine = self.attach(optimizer)
        engine.start_counting_at(state.global_step)
        if args.should_save:
            remove_stale_pma_temporaries(args.output_dir)
        if self.config.eval and self.trainer is None:
            raise InputError(
                "PMA evaluation (`eval=True`) runs the Trainer's evaluation on the PMA weights, so the callback "
                "needs the trainer: use `PmaCallback(config, trainer=trainer)` or `PmaTrainer`."
            )
        check_lm_eval_settings(self.config)
        self.exporter = PmaExporter.for_trainer(args, self.config, kwargs)
        for handler in engine.on_cycle_end:  # a run started again replaces the exporter of the last one
            if _is_export_handler(handler):
                engine.on_cycle_end.remove(handler)
        if self.schedule is None:
            engine.on_cycle_end.add(self._export_cycle)
        else:  # the schedule replaces the back-to-back cycles (see `pmakit.training.schedule`)
            self.schedule.start(engine, args, state.max_steps, self.exporter, self.trainer)
        if getattr(args, "_pma_horizon_checked", None) != (state.max_steps, self.config):  # else done by the args
            self.config.check_horizon(state.max_steps)
        self._attach_sample_store(engine, args, kwargs)
        self._check_resumed_precision(engine)

    def _attach_sample_store(self, engine: PmaEngine, args: TrainingArguments, kwargs: dict) -> None:
        """With ``sample_store`` on, write every sample as ``pma-samples/step-<t>`` (see `PmaSampleStore`)."""
        for store in engine.on_sample:
            if isinstance(store, PmaSampleStore):
                engine.on_sample.remove(store)
        if self.config.sample_store:
            engine.on_sample.add(PmaSampleStore.for_trainer(args, self.config, kwargs))

    def _export_cycle(self, engine: PmaEngine, step: int) -> None:
        """The engine's cycle handler: the exporter (which has the Trainer's progress-bar setting)."""
        self.exporter(engine, step)

    def _check_resumed_precision(self, engine: PmaEngine) -> None:
        state = engine.optimizer.state
        cast = {
            value.dtype
            for entry in state.values()
            if isinstance(entry, dict)
            for key, value in entry.items()
            if is_slot_key(key) and value.dtype != torch.float32
        }  # the average, and anchors such as bema's theta_0
        if cast:
            warnings.warn(
                f"PMA: the resumed average was cast to {', '.join(map(str, cast))} by `Optimizer.load_state_dict` "
                "before this callback could guard it, so it lost precision. `PmaTrainer` (or "
                "`PmaCallback.attach(trainer.create_optimizer())` before `train`) keeps it exact.",
                UserWarning,
                stacklevel=2,
            )

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not self.config.eval or self._in_pma_eval or self.trainer is None or metrics is None:
            return
        if self.schedule is not None:  # each scheduled merge is evaluated once, when it is written
            return
        engine = self.engine
        if engine is None or not engine.has_average:
            return
        prefix = next((k[: -len("_runtime")] for k in metrics if k.endswith("_runtime")), "eval")
        if "_pma" in prefix:
            return
        dataset_name = prefix[len("eval_") :] if prefix.startswith("eval_") else None
        eval_dataset = None
        if dataset_name and isinstance(self.trainer.eval_dataset, dict):
            eval_dataset = self.trainer.eval_dataset.get(dataset_name)
        pma_prefix = prefix.replace("eval", "eval_pma", 1) if prefix.startswith("eval") else f"{prefix}_pma"
        self._in_pma_eval = True
        try:
            with engine.swapped(), silent_on_evaluate(self.trainer):
                pma_metrics = self.trainer.evaluate(eval_dataset=eval_dataset, metric_key_prefix=pma_prefix)
                pma_metrics.update(pma_lm_eval_metrics(self.trainer, self.config, dataset_name))
        finally:
            self._in_pma_eval = False
        metrics.update(pma_metrics)

    def on_train_end(self, args, state, control, **kwargs):
        self._finish_latest()
        if args.push_to_hub and state.is_world_process_zero and self.engine is not None:
            from .hub import push_pma_folder  # the merged model goes to the Hub with the run

            push_pma_folder(args, self.config, trainer=self.trainer, step=self.engine.step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.schedule is not None:
            self.schedule.flush(control)
        if control.should_save and self.exporter is not None:
            self.exporter.join()  # a checkpoint save must not race with a background export

    def _finish_latest(self) -> None:
        """Make sure ``pma/`` holds the latest merge (an unfinished cycle's average if none completed)."""
        if self.engine is not None and self.schedule is not None:
            self.schedule.finish(self.engine.step)
        elif self.engine is not None and self.exporter is not None:
            self.exporter.finish(self.engine)


def _is_export_handler(handler) -> bool:
    """An exporter registered by a `PmaCallback` (replaced when training starts again)."""
    return isinstance(handler, PmaExporter) or getattr(handler, "__func__", None) is PmaCallback._export_cycle
