"""What the training-time writers of model folders share (the PMA exporter, the sample store).

Both write a complete HF model folder from inside a training run: they need the model, where to
write, the PMA settings, the tokenizer or processor to save beside the weights, whether this process
writes (every process calls them, since sharded weights are gathered collectively) and whether
``save_pretrained`` may draw its progress bar.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..online.config import PmaConfig


__all__ = ["ModelWriter"]


class ModelWriter:
    """The model, the output folder and the writing settings of a training-time writer."""

    def __init__(
        self,
        model,
        output_dir: str | Path,
        config: PmaConfig,
        *,
        processing_class=None,
        is_main_process: bool = True,
        disable_tqdm: bool = False,
    ) -> None:
        self.model = model
        self.output_dir = Path(output_dir)
        self.config = config
        self.processing_class = processing_class
        self.is_main_process = is_main_process
        self.disable_tqdm = disable_tqdm

    @classmethod
    def for_trainer(cls, args, config: PmaConfig, callback_kwargs: dict[str, Any]):
        """The writer a Trainer callback builds: the Trainer's model, output folder, saving process and bars."""
        return cls(
            callback_kwargs.get("model"),
            args.output_dir,
            config,
            processing_class=callback_kwargs.get("processing_class"),
            is_main_process=args.should_save,
            disable_tqdm=bool(args.disable_tqdm),
        )
