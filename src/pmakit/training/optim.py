"""PMA through the optimizer: `create_pma_optimizer` for `Trainer(optimizers=...)` and `PmaAdamW`.

Both carry the same engine as `PmaTrainer`, so averages, counters and the `pma-<step>` layout
are the same. `PmaAdamW` also works through `Trainer(optimizer_cls_and_kwargs=...)`, the route
the Trainer allows under FSDP (it refuses ``optimizers=`` there).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import get_scheduler

from ..online.config import PmaConfig
from ..online.distributed import is_main_process
from ..online.engine import PmaEngine, attach_engine
from .export import PmaExporter


__all__ = ["PmaAdamW", "create_pma_optimizer"]


def _as_config(pma: PmaConfig | dict | None) -> PmaConfig:
    if pma is None:
        return PmaConfig()
    if isinstance(pma, dict):
        return PmaConfig(**pma)
    if isinstance(pma, PmaConfig):
        return pma
    raise TypeError(f"`pma` must be a PmaConfig or a dict of its fields, got {type(pma).__name__}.")


def _attach(optimizer, config: PmaConfig, model, output_dir, processing_class) -> PmaEngine:
    engine = attach_engine(optimizer, config)
    if output_dir is not None:
        if model is None:
            raise ValueError(
                "Writing `pma-<step>` folders needs the model: pass it (`pma_model=` for `PmaAdamW`) "
                "with `output_dir=`."
            )
        engine.add_cycle_handler(
            PmaExporter(
                model, output_dir, config, processing_class=processing_class, is_main_process=is_main_process()
            )
        )
    return engine


class PmaAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` with online PMA (see `PmaConfig`).

    ``pma`` holds the settings; with ``pma_model`` and ``output_dir`` the merged model of each cycle
    is written to ``output_dir/pma-<step>`` (and ``output_dir/pma``). The model keyword is not
    ``model`` because the Trainer takes that one for itself. Example with FSDP-friendly creation by
    the Trainer:

    ```python
    trainer = Trainer(model, args, optimizer_cls_and_kwargs=(PmaAdamW, {"lr": 3e-4, "pma": {"interleave_step": 100},
                      "pma_model": model, "output_dir": args.output_dir}), ...)
    ```
    """

    def __init__(
        self,
        params: Iterable,
        *,
        pma: PmaConfig | dict | None = None,
        pma_model: torch.nn.Module | None = None,
        output_dir: str | Path | None = None,
        processing_class=None,
        **adamw_kwargs,
    ) -> None:
        super().__init__(params, **adamw_kwargs)
        self.pma_engine = _attach(self, _as_config(pma), pma_model, output_dir, processing_class)


def create_pma_optimizer(
    model: torch.nn.Module,
    pma: PmaConfig | dict | None = None,
    *,
    output_dir: str | Path | None = None,
    processing_class=None,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    num_training_steps: int | None = None,
    num_warmup_steps: int = 0,
    lr_scheduler_type: str = "constant_with_warmup",
    **optimizer_kwargs,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """``(optimizer, scheduler)`` with PMA attached, for ``Trainer(optimizers=...)``.

    Weight decay skips biases and norm weights (1-D tensors), as the Trainer does. The scheduler
    is any `transformers.get_scheduler` type; ``num_training_steps`` is needed by decaying ones.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = optimizer_cls([g for g in groups if g["params"]], lr=lr, **optimizer_kwargs)
    _attach(optimizer, _as_config(pma), model, output_dir, processing_class)
    scheduler = get_scheduler(
        lr_scheduler_type, optimizer, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps
    )
    return optimizer, scheduler
