"""The sample store: every PMA sample kept as a model-only folder, so the merge can be chosen later.

With ``sample_store`` on, each sample the engine folds is also written as
``output_dir/pma-samples/step-<t>/`` (config, tokenizer and safetensors weights, no optimizer
state), the oldest removed beyond ``sample_store_limit``. The folders are ordinary model folders:
``pmakit.merge`` takes them as inputs, so any rule and any window of them can be merged after
training without full Trainer checkpoints (whose optimizer state is 2-3x the model).
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from ..online.distributed import unwrap_model
from ..online.engine import PmaEngine
from .export import progress_bars, save_live_model
from .writer import ModelWriter


__all__ = ["SAMPLES_DIR", "SAMPLE_PREFIX", "PmaSampleStore", "stored_samples"]

logger = logging.getLogger(__name__)

SAMPLES_DIR = "pma-samples"
SAMPLE_PREFIX = "step-"
_SAMPLE_DIR_RE = re.compile(rf"^{SAMPLE_PREFIX}(\d+)$")


def stored_samples(output_dir: str | Path) -> list[Path]:
    """The sample folders of a run, oldest first (by step)."""
    root = Path(output_dir) / SAMPLES_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _SAMPLE_DIR_RE.match(p.name))]
    return [p for _, p in sorted(found)]


class PmaSampleStore(ModelWriter):
    """Writes the live weights at each stored sample; an engine sample handler (`PmaEngine.add_sample_handler`).

    Every process must call it (sharded weights are gathered collectively); only the main process
    writes and rotates. ``disable_tqdm`` (the Trainer's setting) turns off the "Writing model
    shards" bar that ``save_pretrained`` would otherwise draw for every sample.
    """

    @property
    def root(self) -> Path:
        """``output_dir/pma-samples``: the folder the samples are written into."""
        return self.output_dir / SAMPLES_DIR

    def __call__(self, engine: PmaEngine, step: int) -> Path | None:
        folder = self.root / f"{SAMPLE_PREFIX}{step}"
        with progress_bars(not self.disable_tqdm):
            written = save_live_model(
                unwrap_model(self.model),
                folder,
                processing_class=self.processing_class,
                is_main_process=self.is_main_process,
            )
        if written is not None:
            self._rotate()
            logger.info("PMA: stored the sample of step %d in %s", step, folder)
        return written

    def _rotate(self) -> None:
        limit = self.config.sample_store_limit
        if limit is None:
            return
        folders = stored_samples(self.root.parent)
        for folder in folders[: max(0, len(folders) - limit)]:
            shutil.rmtree(folder, ignore_errors=True)
