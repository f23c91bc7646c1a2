"""PMA through the optimizer: `create_pma_optimizer` for `Trainer(optimizers=...)` and `PmaAdamW`.

Both carry the same engine as `PmaTrainer`, so averages, counters and the `pma-<step>` layout
are the same. `PmaAdamW` also works through `Trainer(optimizer_cls_and_kwargs=...)`, the route
the Trainer allows under FSDP (it refuses ``optimizers=`` there).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch
from transformers import TrainingArguments, get_scheduler

from ..deprecation import warn_deprecated
from ..errors import InputError
from ..io.hub import push_folder_to_hub
from ..io.hub_target import HubTarget, as_hub_target
from ..online.config import PmaConfig
from ..online.distributed import is_main_process, unwrap_optimizer
from ..online.engine import PmaEngine, attach_engine
from .callback import remove_stale_pma_temporaries
from .export import PmaExporter


__all__ = ["PmaAdamW", "create_pma_optimizer", "finish_pma"]


def _as_config(pma: PmaConfig | dict | None) -> PmaConfig:
    if pma is None:
        return PmaConfig()
    if isinstance(pma, dict):
        return PmaConfig(**pma)
    if isinstance(pma, PmaConfig):
        return pma
    raise TypeError(f"`pma` must be a PmaConfig or a dict of its fields, got {type(pma).__name__}.")


def _attach(
    optimizer, config: PmaConfig, model, output_dir, processing_class, disable_tqdm: bool = False
) -> PmaEngine:
    if config.merge_steps is not None:
        raise InputError(
            "Merge schedules (`merge_steps`) run through `PmaTrainer` or `PmaCallback`, which write and evaluate each "
            "merge at the step it ends; the optimizer route supports back-to-back cycles only."
        )
    engine = attach_engine(optimizer, config)
    if output_dir is not None:
        if is_main_process():
            remove_stale_pma_temporaries(output_dir)
        if model is None:
            raise InputError(
                "Writing `pma-<step>` folders needs the model: pass it (`pma_model=` for `PmaAdamW`) "
                "with `output_dir=`."
            )
        engine.add_cycle_handler(
            PmaExporter(
                model,
                output_dir,
                config,
                processing_class=processing_class,
                is_main_process=is_main_process(),
                disable_tqdm=disable_tqdm,
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

    Args:
        params: Parameters or parameter groups, as for `torch.optim.AdamW`.
        pma: The PMA settings, a `PmaConfig` or a dict of its fields (default: ``PmaConfig()``).
        pma_model: The model, needed to write ``pma-<step>`` folders.
        output_dir: Where the ``pma-<step>`` and ``pma`` folders go (None: no folders).
        processing_class: Tokenizer or processor saved with each folder.
        **adamw_kwargs: `torch.optim.AdamW` arguments (``lr``, ``betas``, ``weight_decay``, whose
            default is torch's 0.01).

    Raises:
        TypeError: ``pma`` is neither a `PmaConfig` nor a dict.
        ValueError: invalid PMA settings, or ``output_dir`` without ``pma_model``.
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

    def pma_finish(self, *, push_to_hub: str | HubTarget | None = None, **hub_settings) -> Path | None:
        """End of training: write the final (partial) cycle to ``pma/`` and push it when asked (see `finish_pma`)."""
        return finish_pma(self, push_to_hub=push_to_hub, **hub_settings)


def create_pma_optimizer(
    model: torch.nn.Module,
    pma: PmaConfig | dict | None = None,
    *,
    args: TrainingArguments | None = None,
    output_dir: str | Path | None = None,
    processing_class=None,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    lr: float | None = None,
    weight_decay: float | None = None,
    num_training_steps: int | None = None,
    num_warmup_steps: int | None = None,
    lr_scheduler_type: str | None = None,
    **optimizer_kwargs,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """``(optimizer, scheduler)`` with PMA attached, for ``Trainer(optimizers=...)``.

    ``Trainer(optimizers=...)`` uses this optimizer and scheduler *instead of* the ones its
    arguments describe, so pass those arguments as ``args=``: the learning rate, weight decay,
    scheduler type and kwargs, warmup, ``max_steps`` and (for AdamW) betas and epsilon are then
    taken from them. Keywords given here win over ``args``. **Without** ``args`` the defaults are
    lr 1e-4, no weight decay, no warmup and a constant schedule, whatever the Trainer's arguments say.

    Weight decay skips biases and norm weights (1-D tensors), as the Trainer does. The scheduler
    is any `transformers.get_scheduler` type; ``num_training_steps`` is needed by decaying ones.

    Args:
        model: the model whose trainable parameters are optimized (and exported, with ``output_dir``).
        pma: the PMA settings (`PmaConfig` or a dict of its fields).
        args: the Trainer's `TrainingArguments`, the source of the optimizer and scheduler settings.
        output_dir: where ``pma-<step>`` and ``pma`` are written (``args.output_dir`` when ``args`` is given).

    Returns:
        ``(optimizer, scheduler)`` for ``Trainer(optimizers=...)``.

    Raises:
        TypeError: ``pma`` is neither a `PmaConfig` nor a dict.
        ValueError: invalid PMA settings.
    """
    settings = _trainer_settings(args, optimizer_cls, optimizer_kwargs, num_training_steps)
    lr = settings["lr"] if lr is None else lr
    weight_decay = settings["weight_decay"] if weight_decay is None else weight_decay
    num_training_steps = settings["num_training_steps"] if num_training_steps is None else num_training_steps
    num_warmup_steps = settings["num_warmup_steps"] if num_warmup_steps is None else num_warmup_steps
    lr_scheduler_type = settings["lr_scheduler_type"] if lr_scheduler_type is None else lr_scheduler_type
    output_dir = args.output_dir if output_dir is None and args is not None else output_dir
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {**settings["optimizer_kwargs"], **optimizer_kwargs}
    optimizer = optimizer_cls([g for g in groups if g["params"]], lr=lr, **kwargs)
    quiet = bool(args is not None and args.disable_tqdm)  # the Trainer's bar setting covers the PMA folders too
    _attach(optimizer, _as_config(pma), model, output_dir, processing_class, disable_tqdm=quiet)
    scheduler = get_scheduler(
        lr_scheduler_type, optimizer, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps,
        scheduler_specific_kwargs=settings["scheduler_kwargs"],
    )  # fmt: skip
    return optimizer, scheduler


def _trainer_settings(args, optimizer_cls, optimizer_kwargs: dict, num_training_steps: int | None) -> dict:
    """Optimizer and scheduler settings from the Trainer's arguments (the documented defaults without them)."""
    if args is None:
        return dict(
            lr=1e-4, weight_decay=0.0, num_training_steps=None, num_warmup_steps=0,
            lr_scheduler_type="constant_with_warmup", scheduler_kwargs=None, optimizer_kwargs={},
        )  # fmt: skip
    steps = num_training_steps if num_training_steps is not None else (args.max_steps if args.max_steps > 0 else None)
    adam = {}
    if issubclass(optimizer_cls, (torch.optim.Adam, torch.optim.AdamW)) and "betas" not in optimizer_kwargs:
        adam = {"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
    return dict(
        lr=args.learning_rate,
        weight_decay=args.weight_decay,
        num_training_steps=steps,
        num_warmup_steps=args.get_warmup_steps(steps or 0),
        lr_scheduler_type=args.lr_scheduler_type,
        scheduler_kwargs=dict(args.lr_scheduler_kwargs or {}) or None,
        optimizer_kwargs=adam,
    )


def finish_pma(
    optimizer: torch.optim.Optimizer,
    *,
    push_to_hub: str | HubTarget | bool | None = None,
    hub_model_id: str | None = None,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
) -> Path | None:
    """End of training for the optimizer route: what `PmaCallback` does at ``on_train_end``.

    Waits for a background export, writes ``output_dir/pma`` from the unfinished cycle when no
    cycle completed, and with ``push_to_hub`` uploads ``pma/`` there. Call it on every process once
    training ends (a sharded model is gathered); only the main process writes and pushes.

    Args:
        optimizer: a `PmaAdamW` or an optimizer from `create_pma_optimizer` (Accelerate wrappers are fine).
        push_to_hub: the repo id, or a `HubTarget` (token, private, revision...), to upload ``pma/`` to.
            ``True`` (deprecated) pushes to ``hub_model_id``, else the PMA settings' ``hub_model_id``.
        hub_model_id: deprecated: ``push_to_hub="namespace/name"``.
        token: deprecated: ``push_to_hub=HubTarget(repo_id, token=...)``.
        private: deprecated: ``push_to_hub=HubTarget(repo_id, private=True)``.
        revision: deprecated: ``push_to_hub=HubTarget(repo_id, revision=...)``.

    Returns:
        The ``pma`` folder on the main process (None elsewhere, or when no sample was taken).

    Raises:
        ValueError: the optimizer carries no PMA exporter, a push has no repo id, or a `HubTarget` is
            given together with a separate Hub setting.
    """
    engine: PmaEngine | None = getattr(unwrap_optimizer(optimizer), "_pma_engine", None)
    exporter = next((h for h in engine._handlers if isinstance(h, PmaExporter)), None) if engine else None
    if exporter is None:
        raise InputError("This optimizer writes no PMA folders: create it with `output_dir=` (and the model).")
    target = _finish_target(
        push_to_hub, hub_model_id, exporter.config, token=token, private=private, revision=revision
    )
    folder = exporter.finish(engine)
    if folder is None or target is None or not exporter.is_main_process:
        return folder
    message = f"PMA merged model (end of training, step {engine.step})"
    push_folder_to_hub(folder, target if target.commit_message else replace(target, commit_message=message))
    return folder


def _finish_target(push_to_hub, hub_model_id: str | None, config: PmaConfig, **deprecated) -> HubTarget | None:
    """`finish_pma`'s push target: the one `as_hub_target`, plus its deprecated ``hub_model_id``."""
    if hub_model_id is not None:
        warn_deprecated("`hub_model_id=` of finish_pma", "pass the repo id: push_to_hub='namespace/name'")
        if not isinstance(push_to_hub, bool) and push_to_hub is not None:
            raise InputError("finish_pma: give the repo in `push_to_hub` only, not also `hub_model_id`.")

    def repo_for_true() -> str:
        if not (hub_model_id or config.hub_model_id):
            raise InputError("`push_to_hub=True` needs `hub_model_id` (or `hub_model_id` in the PMA settings).")
        return hub_model_id or config.hub_model_id

    return as_hub_target(push_to_hub, where="finish_pma", repo_for_true=repo_for_true, **deprecated)
