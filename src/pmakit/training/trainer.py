"""`PmaTrainer`: a `transformers.Trainer` with PMA on whatever optimizer it builds (`args.optim`)."""

from __future__ import annotations

from transformers import DefaultFlowCallback, Trainer, TrainingArguments

from ..online.config import PmaConfig
from ..online.engine import PmaEngine
from .arguments import PmaArguments
from .callback import PmaCallback
from .spike import SpikeRecoveryCallback
from .wsa import add_wsa


__all__ = ["PmaTrainer"]


class PmaTrainer(Trainer):
    """`Trainer` + PMA. Rename `TrainingArguments` -> `PmaArguments` and `Trainer` -> `PmaTrainer`.

    The PMA settings come from the `pma_*` fields of `PmaArguments`, or from ``pma_config`` when
    the arguments are plain `TrainingArguments`. The engine is attached as soon as the optimizer
    is created, before a checkpoint's optimizer state is loaded, so resuming restores the fp32
    average exactly.

    Args:
        model: As for `transformers.Trainer`.
        args: `PmaArguments`, or plain `TrainingArguments` together with ``pma_config``.
        *pargs: Further positional arguments of `transformers.Trainer`.
        pma_config: The PMA settings when ``args`` has no ``pma_*`` fields.
        **kwargs: Further keyword arguments of `transformers.Trainer`.
    """

    _tag_names = ["pmakit", "pma"]

    def __init__(
        self, model=None, args: TrainingArguments | None = None, *pargs, pma_config: PmaConfig | None = None, **kwargs
    ):
        if args is None:
            args = PmaArguments(output_dir="trainer_output")
        if pma_config is None:
            pma_config = args.pma_config if isinstance(args, PmaArguments) else PmaConfig()
        super().__init__(model, args, *pargs, **kwargs)
        self.pma_callback = PmaCallback(pma_config, trainer=self)
        # Right after the Trainer's own flow callback, before the user's: callbacks that read the
        # metrics in `on_evaluate` (EarlyStoppingCallback, a user's) then see the `eval_pma_*` ones too.
        handler = self.callback_handler.callbacks
        handler.insert(1 if handler and isinstance(handler[0], DefaultFlowCallback) else 0, self.pma_callback)
        self.wsa_callback = None
        wsa_config = args.pma_wsa_config if isinstance(args, PmaArguments) else None
        if wsa_config is not None:  # WSA loss term (pmakit.training.wsa), logged as `wsa_loss`
            self.wsa_callback = add_wsa(self, wsa_config)
        self.spike_callback = None
        if isinstance(args, PmaArguments) and args.pma_spike_recovery:
            self.spike_callback = SpikeRecoveryCallback(args.pma_spike_config, trainer=self)
            self.add_callback(self.spike_callback)
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

    @property
    def pma_engine(self) -> PmaEngine | None:
        """The engine holding the running average (None before the optimizer exists)."""
        return self.pma_callback.engine

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        self.pma_callback.attach(self.optimizer)
        return optimizer
