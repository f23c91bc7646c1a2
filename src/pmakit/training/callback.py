"""`PmaCallback`: PMA for any `transformers.Trainer` (or subclass such as TRL's `SFTTrainer`).

The callback attaches the engine to the Trainer's optimizer, writes the merged model at every
cycle end (`pma-<step>/`, and `pma/` for the latest merge), evaluates on the PMA weights when
asked, and finishes `pma/` at the end of training.
"""

from __future__ import annotations

import warnings

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..online.config import PmaConfig
from ..online.engine import AVG_KEY, PmaEngine, attach_engine
from .export import LATEST_DIR, PmaExporter


__all__ = ["PmaCallback"]


class PmaCallback(TrainerCallback):
    """Add PMA to any Trainer: ``trainer.add_callback(PmaCallback(PmaConfig(interleave_step=100)))``.

    Pass ``trainer=`` (or use `PmaTrainer`) to evaluate on the PMA weights (``eval=True``): the
    callback then runs the Trainer's own evaluation with the PMA weights swapped in and logs
    ``eval_pma_*`` metrics. The engine attaches to the optimizer at the start of training;
    `PmaTrainer` attaches it earlier, when the optimizer is created, which also keeps a resumed
    fp32 average exact for bf16/fp16 models.
    """

    def __init__(self, config: PmaConfig | None = None, trainer=None, **settings) -> None:
        if config is not None and settings:
            raise ValueError("Pass either a `PmaConfig` or keyword settings, not both.")
        self.config = config if config is not None else PmaConfig(**settings)
        self.trainer = trainer
        self.engine: PmaEngine | None = None
        self.exporter: PmaExporter | None = None
        self._in_pma_eval = False

    def attach(self, optimizer) -> PmaEngine:
        """Attach (once) the PMA engine to ``optimizer`` and return it."""
        self.engine = attach_engine(optimizer, self.config)
        return self.engine

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        optimizer = kwargs.get("optimizer")
        if optimizer is None:
            raise RuntimeError("PmaCallback needs the Trainer's optimizer, but the Trainer passed none.")
        engine = self.attach(optimizer)
        if self.config.eval and self.trainer is None:
            raise ValueError(
                "PMA evaluation (`eval=True`) runs the Trainer's evaluation on the PMA weights, so the callback "
                "needs the trainer: use `PmaCallback(config, trainer=trainer)` or `PmaTrainer`."
            )
        self.exporter = PmaExporter(
            kwargs.get("model"),
            args.output_dir,
            self.config,
            processing_class=kwargs.get("processing_class"),
            is_main_process=args.should_save,
        )
        engine._handlers = [h for h in engine._handlers if not isinstance(h, PmaExporter)]
        engine.add_cycle_handler(self.exporter)
        self.config.check_horizon(state.max_steps)
        self._check_resumed_precision(engine)

    def _check_resumed_precision(self, engine: PmaEngine) -> None:
        state = engine.optimizer.state
        cast = {
            entry[AVG_KEY].dtype
            for entry in state.values()
            if isinstance(entry, dict) and AVG_KEY in entry and entry[AVG_KEY].dtype != torch.float32
        }
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
            with engine.swapped():
                pma_metrics = self.trainer.evaluate(eval_dataset=eval_dataset, metric_key_prefix=pma_prefix)
        finally:
            self._in_pma_eval = False
        metrics.update(pma_metrics)

    def on_train_end(self, args, state, control, **kwargs):
        self._finish_latest()
        if args.push_to_hub and state.is_world_process_zero and self.engine is not None:
            from .hub import push_pma_folder  # the merged model goes to the Hub with the run

            push_pma_folder(args, self.config, trainer=self.trainer, step=self.engine.step)

    def _finish_latest(self) -> None:
        """Make sure ``pma/`` holds the latest merge (an unfinished cycle's average if none completed)."""
        engine, exporter = self.engine, self.exporter
        if engine is None or exporter is None:
            return
        engine.join()
        counters = engine.counters
        if counters["cycles"] > 0:
            return  # `pma/` already holds the latest completed merge
        if counters["count"] == 0:
            warnings.warn(
                f"PMA took no sample in {engine.step} optimizer steps (interleave_step={self.config.interleave_step}, "
                f"start_step={self.config.start_step}); no `pma` folder was written.",
                UserWarning,
                stacklevel=2,
            )
            return
        warnings.warn(
            f"PMA: no cycle completed ({counters['count']} of fused_num={self.config.fused_num} samples); "
            f"`{LATEST_DIR}` holds the average of the samples so far.",
            UserWarning,
            stacklevel=2,
        )
        exporter.export_latest(engine, engine.step, list(counters["sample_steps"]))
