"""Writing the averaged model as a complete HF model folder with ``save_pretrained``.

The live model is never touched. An unsharded model hands the averages to ``save_pretrained`` as
its state dict, so the folder has exactly the files and layout the model would write itself (PEFT
models: the adapter only); a sharded one (and a background export) streams one gathered tensor at
a time into the same layout (`pmakit.training.streaming`). Folders are built aside and renamed into
place (`pmakit.io.folders`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

from ..io.cards import build_model_card
from ..io.folders import atomic_directory, copy_model_folder, reporting_disk_full
from ..online.distributed import is_dtensor, unwrap_model
from ..online.engine import AVG_KEY, PmaEngine
from ..online.gather import (
    export_entries,
    gather_averaged_state_dict,
    gather_entry,
    gather_snapshot,
    snapshot_entry,
    snapshot_gatherable,
)
from .background import BackgroundWriter, side_process_group
from .streaming import DEFAULT_MAX_SHARD_SIZE, plan_layout, streamable, write_side_files, write_streamed
from .writer import ModelWriter


__all__ = ["LATEST_DIR", "PMA_PREFIX", "PmaExporter", "progress_bars", "save_averaged_model", "save_live_model"]

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
    stream: bool | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path | None:
    """Write ``model`` with ``averages`` (``{param: fp32 tensor}``) in place of its live weights.

    The live model is not touched: the averaged tensors are cast to each parameter's dtype, and
    parameters that were not averaged (frozen ones, buffers) come from the model. Tied weights are
    written once. PEFT models write their adapter only. The folder is built aside and renamed into
    place, replacing an older one.

    Sharded models (FSDP2 DTensors, DeepSpeed ZeRO with ``optimizer_state_key``) stream: one tensor
    is gathered at a time and written straight into safetensors shards (HF's names, shard split,
    index and ``max_shard_size`` default), so the main process never holds the whole model. An
    unsharded model is handed to ``save_pretrained`` (``stream=True`` streams it too).

    In a distributed run call it on every process: the gathers are collectives, and only the main
    process writes; the others return None.
    """
    entries = export_entries(model, averages)
    sharded = optimizer_state_key is not None or any(is_dtensor(e.source) for e in entries)
    sharded = sharded or any(hasattr(e.source, "ds_id") for e in entries)  # ZeRO-3 live weights
    if not sharded and not is_main_process:
        return None
    if (stream if stream is not None else sharded) and streamable(model, entries):
        layout = plan_layout(model, entries, max_shard_size)

        def fetch(entry):
            return gather_entry(entry, is_main_process, optimizer_state_key)

        if not is_main_process:
            write_streamed(None, layout, entries, fetch)
            return None
        with _building(path) as tmp:
            write_streamed(tmp, layout, entries, fetch)
            write_side_files(model, tmp, processing_class, model_card)
        return Path(path)
    if sharded:
        state_dict = gather_averaged_state_dict(
            model, averages, is_main_process=is_main_process, optimizer_state_key=optimizer_state_key
        )
    else:
        state_dict = _local_state_dict(model, averages)
    if not is_main_process:
        return None
    return _write_model_folder(model, state_dict, path, processing_class, model_card, max_shard_size)


def save_live_model(
    model, path: str | os.PathLike, *, processing_class=None, is_main_process: bool = True
) -> Path | None:
    """Write ``model``'s live weights as a model-only folder (no optimizer state), built aside and renamed.

    The sibling of `save_averaged_model` for the live weights, through the same gather: FSDP2
    DTensors and DeepSpeed ZeRO-3 partitions are gathered one tensor at a time (collectives: call
    it on every process); only the main process writes, the others return None.
    """
    return save_averaged_model(model, {}, path, processing_class=processing_class, is_main_process=is_main_process)


@contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Turn transformers' progress bars ("Writing model shards") off for the block unless ``enabled``.

    Exports pass their Trainer's ``not disable_tqdm``, so a run without bars prints none for its PMA
    folders either, and one with bars shows ``save_pretrained``'s as the Trainer's own saves do.
    Streamed and background exports draw no bar.
    """
    from transformers.utils import logging as hf_logging

    if enabled or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


@contextmanager
def _building(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder that replaces ``path`` when complete; a full disk is one line naming ``path``."""
    with reporting_disk_full(path), atomic_directory(path, overwrite=True) as tmp:
        yield tmp


def _write_model_folder(
    model, state_dict: dict, path, processing_class, model_card: str | None, max_shard_size: int | str
) -> Path:
    with _building(path) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict, max_shard_size=max_shard_size)
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


class PmaExporter(ModelWriter):
    """Writes the merged model as a complete HF model folder; an engine cycle handler.

    With ``save`` on, each cycle end writes ``output_dir/pma-<step>`` and refreshes
    ``output_dir/pma`` (the latest merge); with ``save`` off only ``pma`` is kept.
    Only the main process writes; every process must call it (sharded exports gather).
    ``disable_tqdm`` (the Trainer's setting) turns off ``save_pretrained``'s "Writing model shards" bar.
    With ``config.export == "async"`` the folder is written by a background thread (see
    `pmakit.training.background`); `join` waits for it, and the engine joins it before it touches
    the average again (next fold, checkpoint save, reads).
    """

    _warned_sync = False  # the one warning that async export fell back to a synchronous write

    @cached_property
    def background(self) -> BackgroundWriter:
        """The thread that writes an ``export="async"`` folder while training goes on."""
        return BackgroundWriter()

    def __call__(self, engine: PmaEngine, step: int) -> None:
        self.export_cycle(engine, step)

    def join(self) -> None:
        """Wait for a background export (no-op when none is running); raises its failure."""
        self.background.join()

    def export_cycle(self, engine: PmaEngine, step: int) -> Path | None:
        """Write the merge that completes at optimizer step ``step`` (in the background with ``export='async'``)."""
        self.join()
        steps = list(engine.counters["sample_steps"])
        latest = self.output_dir / LATEST_DIR
        folder = self.output_dir / f"{PMA_PREFIX}{step}" if self.config.save else latest
        publish = self._publish_latest if self.config.save else None
        if self.config.export == "async" and self._start_background(engine, folder, step, steps, publish):
            return folder if self.is_main_process else None
        self._write(engine, folder, step, steps)  # every process: sharded averages are gathered
        if not self.is_main_process:
            return None
        if publish is not None:
            publish(folder, steps)
        return folder

    def _publish_latest(self, folder: Path, steps: list[int]) -> None:
        latest = self.output_dir / LATEST_DIR
        with reporting_disk_full(latest):
            copy_model_folder(folder, latest)
        self._rotate()
        logger.info("PMA: wrote the merge of steps %s to %s", steps, folder)

    def export_latest(self, engine: PmaEngine, step: int, steps: list[int]) -> Path | None:
        """Write the current average (e.g. an unfinished cycle at the end of training) to ``pma`` (synchronously)."""
        self.join()
        return self._write(engine, self.output_dir / LATEST_DIR, step, steps)

    def finish(self, engine: PmaEngine) -> Path | None:
        """End of training: wait for a background export and make sure ``pma/`` holds the latest merge.

        Without a completed cycle, ``pma/`` gets the average of the samples so far (with a warning);
        without any sample nothing is written. Returns the ``pma`` folder on the main process.
        """
        engine.join()
        self.join()
        counters = engine.counters
        latest = self.output_dir / LATEST_DIR
        if counters["cycles"] > 0:
            return latest if self.is_main_process else None
        if counters["count"] == 0:
            warnings.warn(
                f"PMA took no sample in {engine.step} optimizer steps (interleave_step={self.config.interleave_step}, "
                f"start_step={self.config.start_step}); no `pma` folder was written.",
                UserWarning,
                stacklevel=3,
            )
            return None
        warnings.warn(
            f"PMA: no cycle completed ({counters['count']} of fused_num={self.config.fused_num} samples); "
            f"`{LATEST_DIR}` holds the average of the samples so far.",
            UserWarning,
            stacklevel=3,
        )
        return self.export_latest(engine, engine.step, list(counters["sample_steps"]))

    def _write(self, engine: PmaEngine, folder: Path, step: int, steps: list[int]) -> Path | None:
        """Called on every process (gathers are collective); only the main process writes."""
        deepspeed = getattr(engine, "deepspeed", False)
        averages, key = ({}, AVG_KEY) if deepspeed else (engine.averages(), None)
        return self._save(averages, folder, step, steps, optimizer_state_key=key)

    def _save(self, averages: dict, folder: Path, step: int, steps: list[int], **options) -> Path | None:
        model = unwrap_model(self.model)
        card = self.model_card(model, step, steps) if self.is_main_process else None
        with progress_bars(not self.disable_tqdm):
            return save_averaged_model(
                model, averages, folder, processing_class=self.processing_class, model_card=card,
                is_main_process=self.is_main_process, **options,
            )  # fmt: skip

    def export_merge(self, averages: dict, step: int, steps: list[int]) -> Path | None:
        """Write a merge held outside the engine (a scheduled window's ``{param: fp32}``) as ``pma-<step>``, now."""
        folder = self.output_dir / (f"{PMA_PREFIX}{step}" if self.config.save else LATEST_DIR)
        self._save(averages, folder, step, steps)
        if self.is_main_process and self.config.save:
            self._publish_latest(folder, steps)
        return folder if self.is_main_process else None

    def _start_background(self, engine: PmaEngine, folder: Path, step: int, steps: list[int], publish) -> bool:
        """Snapshot this rank's share of the average and start the writer thread; False: export synchronously.

        Every process decides alike (same model, same settings), so the gathers stay matched.
        """
        model = unwrap_model(self.model)
        why = self._why_not_background(engine, model)
        if why is not None:
            if not self._warned_sync:
                warnings.warn(f"PMA: `export='async'` falls back to synchronous exports: {why}.", stacklevel=3)
                self._warned_sync = True
            return False
        entries = export_entries(model, engine.averages())
        sharded = any(is_dtensor(e.source) for e in entries)
        if not sharded and not self.is_main_process:
            return True  # nothing to gather: the main process writes from its own copy
        group = side_process_group() if sharded else None
        snapshots = {id(e): snapshot_entry(e, reuse_cpu=e.averaged) for e in entries}
        engine.on_join.add(self.join)  # a CPU average is used as is: the next fold waits for the writer
        layout = plan_layout(model, entries)
        card = self.model_card(model, step, steps) if self.is_main_process else None

        def fetch(entry):
            return gather_snapshot(entry, snapshots[id(entry)], self.is_main_process, group)

        def work() -> None:
            if not self.is_main_process:
                write_streamed(None, layout, entries, fetch)
                return
            with _building(folder) as tmp:
                write_streamed(tmp, layout, entries, fetch)
                write_side_files(model, tmp, self.processing_class, card)
            if publish is not None:
                publish(folder, steps)

        self.background.start(folder.name, work)
        return True

    def _why_not_background(self, engine: PmaEngine, model) -> str | None:
        import torch.distributed as dist

        if getattr(engine, "deepspeed", False):
            return "DeepSpeed ZeRO gathers on its own process groups, which a background thread must not use"
        entries = export_entries(model, engine.averages())
        if not streamable(model, entries):
            return "this model's folder is written by `save_pretrained` (PEFT adapter or converted weights)"
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if not snapshot_gatherable(entries, world):
            return "the average is sharded over a mesh other than one dimension of every rank"
        return None

    def model_card(self, model, step: int, steps: list[int]) -> str:
        config = self.config
        rule = config.rule
        weights = rule.weights_for(len(steps), steps) if steps else []
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
        recipe.update(config.rule_card_settings())
        if config.merge_steps is not None:  # a scheduled merge: the samples of the last merge_window steps
            recipe["merge_window"] = config.merge_window
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
