"""`PmaCallback`: PMA for any `transformers.Trainer` (or subclass such as TRL's `SFTTrainer`).

The callback attaches the engine to the Trainer's optimizer, writes the merged model at every
cycle end (`pma-<step>/`, and `pma/` for the latest merge), evaluates on the PMA weights when
asked, and finishes `pma/` at the end of training.
"""

from __future__ import annotations

import logging
import re
import shutil
import warnings
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .config import PmaConfig
from .engine import AVG_KEY, PmaEngine, attach_engine
from .export import build_model_card, copy_model_folder, save_averaged_model


__all__ = ["PmaCallback", "PmaExporter"]

logger = logging.getLogger(__name__)

PMA_PREFIX = "pma-"
LATEST_DIR = "pma"
_PMA_DIR_RE = re.compile(rf"^{PMA_PREFIX}(\d+)$")


def _unwrap_model(model):
    """The model inside DDP/compile wrappers, without importing accelerate's state machinery."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def _is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


class PmaExporter:
    """Writes the merged model as a complete HF model folder; an engine cycle handler.

    With ``save`` on, each cycle end writes ``output_dir/pma-<step>`` and refreshes
    ``output_dir/pma`` (the latest merge); with ``save`` off only ``pma`` is kept.
    Only the main process writes; every process must call it (future sharded exports gather).
    """

    def __init__(
        self,
        model,
        output_dir: str | Path,
        config: PmaConfig,
        *,
        processing_class=None,
        is_main_process: bool = True,
    ) -> None:
        self.model = model
        self.output_dir = Path(output_dir)
        self.config = config
        self.processing_class = processing_class
        self.is_main_process = is_main_process

    def __call__(self, engine: PmaEngine, step: int) -> None:
        self.export_cycle(engine, step)

    def export_cycle(self, engine: PmaEngine, step: int) -> Path | None:
        """Write the merge that completes at optimizer step ``step``."""
        steps = list(engine.counters["sample_steps"])
        latest = self.output_dir / LATEST_DIR
        if self.config.save:
            folder = self.output_dir / f"{PMA_PREFIX}{step}"
            self._write(engine, folder, step, steps)  # every process: sharded averages are gathered
            if not self.is_main_process:
                return None
            copy_model_folder(folder, latest)
            self._rotate()
            logger.info("PMA: wrote the merge of steps %s to %s", steps, folder)
            return folder
        self._write(engine, latest, step, steps)
        return latest if self.is_main_process else None

    def export_latest(self, engine: PmaEngine, step: int, steps: list[int]) -> Path | None:
        """Write the current average (e.g. an unfinished cycle at the end of training) to ``pma``."""
        return self._write(engine, self.output_dir / LATEST_DIR, step, steps)

    def _write(self, engine: PmaEngine, folder: Path, step: int, steps: list[int]) -> Path | None:
        """Called on every process (gathers are collective); only the main process writes."""
        model = _unwrap_model(self.model)
        card = self.model_card(model, step, steps) if self.is_main_process else None
        deepspeed = getattr(engine, "deepspeed", False)
        return save_averaged_model(
            model,
            {} if deepspeed else engine.averages(),
            folder,
            processing_class=self.processing_class,
            model_card=card,
            is_main_process=self.is_main_process,
            optimizer_state_key=AVG_KEY if deepspeed else None,
        )

    def model_card(self, model, step: int, steps: list[int]) -> str:
        config = self.config
        rule = config.rule
        weights = rule.weights_for(len(steps)) if steps else []
        name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
        recipe = {
            "method": "pma",
            "fused_algo": config.fused_algo,
            "fused_num": config.fused_num,
            "interleave_step": config.interleave_step,
            "start_step": config.start_step,
            "write_back": config.write_back,
            "merged_at_step": step,
            "sample_steps": steps,
            "weights": [round(w, 8) for w in weights],
        }
        if config.fused_algo == "ema":
            recipe["ema_alpha"] = config.ema_alpha
        summary = (
            f"This model is the {rule.describe(len(steps))} of the weights taken during training at optimizer "
            f"steps {', '.join(map(str, steps))} (every {config.interleave_step} steps), written at step {step} "
            "by pmakit's online Pre-trained Model Averaging (PMA, arXiv 2505.12082). The average is accumulated "
            "in fp32 and cast to the model's dtype."
        )
        if config.write_back:
            summary += " Training continued from these merged weights (write-back)."
        return build_model_card(
            title=f"PMA merge at step {step}",
            summary=summary,
            base_models=[name] if name else [],
            library_name="peft" if _is_peft_model(model) else "transformers",
            recipe=recipe,
            details=[("Loading", _loading_note(_is_peft_model(model)))],
        )

    def _rotate(self) -> None:
        limit = self.config.save_total_limit
        if limit is None:
            return
        folders = sorted(
            (int(m.group(1)), p)
            for p in self.output_dir.iterdir()
            if p.is_dir() and (m := _PMA_DIR_RE.match(p.name))
        )
        for _, folder in folders[: max(0, len(folders) - limit)]:
            shutil.rmtree(folder, ignore_errors=True)


def _loading_note(peft: bool) -> str:
    if peft:
        return (
            "An adapter folder: load it onto its base model with "
            "`PeftModel.from_pretrained(base_model, path)`."
        )
    return "A complete model folder: `AutoModelForCausalLM.from_pretrained(path)` starts training from it (PMA-init)."


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
