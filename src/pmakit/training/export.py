"""Writing the averaged model as a complete HF model folder with ``save_pretrained``.

The live model is never touched: the averages are handed to ``save_pretrained`` as its state
dict, so the folder has exactly the files and layout the model would write itself (PEFT models:
the adapter only). It is built aside and renamed into place (`pmakit.io.folders`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from ..io.cards import build_model_card
from ..io.folders import atomic_directory, copy_model_folder
from ..online.config import PmaConfig
from ..online.distributed import is_dtensor, unwrap_model
from ..online.engine import AVG_KEY, PmaEngine
from ..online.gather import gather_averaged_state_dict


__all__ = ["LATEST_DIR", "PMA_PREFIX", "PmaExporter", "save_averaged_model"]

logger = logging.getLogger(__name__)

PMA_PREFIX = "pma-"
LATEST_DIR = "pma"
_PMA_DIR_RE = re.compile(rf"^{PMA_PREFIX}(\d+)$")


def save_averaged_model(
    model,
    averages: dict,
    path: str | os.PathLike,
    *,
    processing_class=None,
    model_card: str | None = None,
    is_main_process: bool = True,
    optimizer_state_key: str | None = None,
) -> Path | None:
    """Write ``model`` with ``averages`` (``{param: fp32 tensor}``) in place of its live weights.

    The live model is not touched: the averaged tensors are cast to each parameter's dtype and
    passed to ``save_pretrained`` as its state dict, so parameters that were not averaged
    (frozen ones, buffers) come from the model. Every name of a tied parameter maps to the same
    tensor, so ``save_pretrained`` still writes it once. PEFT models write their adapter only.
    The folder is built aside and renamed into place, replacing an older one.

    In a distributed run call it on every process: sharded weights (FSDP2, DeepSpeed ZeRO) are
    gathered with collectives (see `gather_averaged_state_dict`), and only the main process
    writes; the others return None.
    """
    if is_main_process and optimizer_state_key is None and not any(is_dtensor(a) for a in averages.values()):
        state_dict = _local_state_dict(model, averages)
    else:
        state_dict = gather_averaged_state_dict(
            model, averages, is_main_process=is_main_process, optimizer_state_key=optimizer_state_key
        )
    if not is_main_process:
        return None
    with atomic_directory(path, overwrite=True) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        if processing_class is not None and hasattr(processing_class, "save_pretrained"):
            processing_class.save_pretrained(tmp)
        if model_card is not None:
            (tmp / "README.md").write_text(model_card, encoding="utf-8")
    return Path(path)


def _local_state_dict(model, averages: dict) -> dict:
    """An unsharded model's state dict with the averages cast in (no copy of anything else)."""
    state_dict = model.state_dict()
    names_by_param: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_by_param.setdefault(id(param), []).append(name)
    for param, avg in averages.items():
        names = names_by_param.get(id(param))
        if not names:
            continue
        merged = avg.detach().to(device=param.device, dtype=param.dtype)
        for name in names:
            if name in state_dict:
                state_dict[name] = merged
    return state_dict


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
        model = unwrap_model(self.model)
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
            (int(m.group(1)), p) for p in self.output_dir.iterdir() if p.is_dir() and (m := _PMA_DIR_RE.match(p.name))
        )
        for _, folder in folders[: max(0, len(folders) - limit)]:
            shutil.rmtree(folder, ignore_errors=True)


def _loading_note(peft: bool) -> str:
    if peft:
        return "An adapter folder: load it onto its base model with `PeftModel.from_pretrained(base_model, path)`."
    return "A complete model folder: `AutoModelForCausalLM.from_pretrained(path)` starts training from it (PMA-init)."
