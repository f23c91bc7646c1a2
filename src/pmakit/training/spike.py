"""Loss-spike recovery: PMA-init applied automatically when a run blows up.

The PMA paper (arXiv 2505.12082, section 4.6) rescued a run whose loss had spiked beyond
recovery by merging the checkpoints saved *before* the collapse and resuming from the merge.
`SpikeRecoveryCallback` does this inside any `transformers.Trainer`:

* **Samples.** Every ``interval`` optimizer steps it copies the trainable weights into a ring of
  the last ``num_samples`` samples (CPU memory by default). Memory cost: ``num_samples`` times
  the trainable weights in their own dtype (a 1B-parameter bf16 model with the default 3 samples:
  6 GB of host RAM); nothing else is kept. The weights after step ``k`` are copied only once the
  loss of step ``k + 1`` (which is computed on them) has been seen to be normal, just before
  optimizer step ``k + 1`` changes them; nothing is sampled while a spike is suspected. So every
  sample in the ring predates the spike, and the ring's memory is all usable.
* **Seeing every step's loss.** The Trainer shows the loss to callbacks only every
  ``logging_steps``. With ``trainer=`` (what `PmaTrainer` passes) the callback wraps that
  Trainer's ``training_step``, whose return value is exactly the loss it back-propagates (already
  divided for gradient accumulation), and sums it over the micro-batches of a step. Without a
  trainer it reads ``outputs.loss`` from a forward hook on the model (training forwards only).
  The decision is taken at ``on_pre_optimizer_step``: every micro-batch of the step is done and
  the gradients are there, but the optimizer has not used them yet. Under torch.distributed the
  loss is averaged over processes so every rank takes the same decision. Cost: one host sync of
  two numbers per optimizer step.
* **Detection.** A step is a spike when its loss or gradient norm is not finite (recovery at
  once), or when its loss exceeds ``factor`` times the median of the last ``window`` normal
  steps for ``patience`` consecutive steps. The spike *began* at the first of those steps.
* **Recovery.** The gradients of the triggering step are dropped (the optimizer skips the
  update, so NaN never reaches its moments); the live weights become the merge (the averaging
  law of `pmakit.averaging`) of the samples taken before the spike began; the optimizer moments
  are reset (or kept); the learning rate is re-warmed linearly over ``rewarm_steps`` steps and
  can be lowered for good by ``lr_scale`` per recovery. The event is logged (``logging``, and a
  ``spike_recovery`` entry in ``state.log_history``). After ``max_recoveries`` recoveries the
  next spike stops training with a `SpikeRecoveryError`.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from ..errors import InputError, TrainingError
from ..online.distributed import unwrap_optimizer
from ..soups.weighted_sum import weighted_sum
from .spike_config import SpikeConfig


__all__ = ["SpikeConfig", "SpikeRecoveryCallback", "SpikeRecoveryError"]

logger = logging.getLogger(__name__)


class SpikeRecoveryError(TrainingError):
    """Training cannot recover from a loss spike (no sample before it, or recoveries used up).

    The message says what to change (a lower learning rate, more samples, more recoveries).
    """


@dataclass
class _Sample:
    step: int
    tensors: list[torch.Tensor]


class SpikeRecoveryCallback(TrainerCallback):
    """Detect loss spikes and restart from the merge of the weights sampled before them.

    ``trainer.add_callback(SpikeRecoveryCallback(SpikeConfig(interval=50), trainer=trainer))`` or,
    with `PmaTrainer`, ``PmaArguments(pma_spike_recovery=True, ...)``. Passing the trainer lets
    the callback see the exact loss each step back-propagates; without it the loss is read from
    the model's outputs (fine for any model that returns ``loss``).

    ``events`` lists the recoveries (step, when the spike began, reason, the steps merged) and
    ``losses`` the per-step training loss it observed, ``(step, loss)`` (the last 100,000 steps).

    Args:
        config: The settings (default: ``SpikeConfig(**settings)``).
        trainer: The Trainer, to see every step's exact loss and to reset its optimizer.
        **settings: `SpikeConfig` fields, when ``config`` is not given.

    Raises:
        ValueError: invalid settings.
        SpikeRecoveryError: during training, when a spike cannot be recovered from.
    """

    def __init__(self, config: SpikeConfig | None = None, trainer=None, **settings) -> None:
        if config is not None and settings:
            raise InputError("Pass either a `SpikeConfig` or keyword settings, not both.")
        self.config = config if config is not None else SpikeConfig(**settings)
        self.trainer = trainer
        self.events: list[dict] = []
        self.losses: deque[tuple[int, float]] = deque(maxlen=100_000)
        self._ring: deque[_Sample] = deque(maxlen=self.config.num_samples)
        self._history: deque[float] = deque(maxlen=self.config.window)
        self._streak_start: int | None = None
        self._streak = 0
        self._step_loss: torch.Tensor | None = None
        self._micro = 0
        self._params: list[torch.Tensor] = []
        self._optimizer = None
        self._hook = None
        self._wrapped = None
        self._since_recovery: int | None = None
        self._saved_lrs: list[float] | None = None
        self._warned_no_loss = False

    # ------------------------------------------------------------------ seeing every step's loss
    def _record(self, loss) -> None:
        if loss is None:
            return
        if isinstance(loss, torch.Tensor):
            value = loss.detach().float().reshape(-1).sum()
        else:
            value = torch.tensor(float(loss))
        self._step_loss = value if self._step_loss is None else self._step_loss + value.to(self._step_loss.device)
        self._micro += 1

    def _install(self, model) -> None:
        trainer = self.trainer
        if trainer is not None:
            if self._wrapped is None:
                original = trainer.training_step

                def training_step(*args, **kwargs):
                    loss = original(*args, **kwargs)
                    self._record(loss)
                    return loss

                trainer.training_step = training_step
                self._wrapped = original
            return
        if self._hook is None and model is not None:

            def hook(module, args, output):
                if module.training and torch.is_grad_enabled():
                    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
                    self._record(loss)

            self._hook = model.register_forward_hook(hook)

    def _uninstall(self) -> None:
        if self._wrapped is not None and self.trainer is not None:
            del self.trainer.training_step  # the instance attribute; the class method shows through again
            self._wrapped = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if optimizer is None:
            raise TrainingError("SpikeRecoveryCallback needs the Trainer's optimizer, but the Trainer passed none.")
        self._optimizer = unwrap_optimizer(optimizer)
        self._params = [p for g in self._optimizer.param_groups for p in g["params"] if p.requires_grad]
        self._install(model)

    def on_train_end(self, args, state, control, **kwargs):
        self._uninstall()

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_loss, self._micro = None, 0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        step = state.global_step + 1  # the optimizer step about to happen
        loss, grad_ok = self._observe()
        self._scale_lr()
        if loss is None and grad_ok:  # no loss seen (the model returns none): only gradients can be checked
            if not self._warned_no_loss:
                logger.warning(
                    "Spike recovery sees no training loss (the model output has no `loss`; pass "
                    "`trainer=` to the callback): only non-finite gradients are detected."
                )
                self._warned_no_loss = True
            self._maybe_sample(state.global_step)
            return
        reason = None
        if not grad_ok or (loss is not None and not math.isfinite(loss)):
            reason = f"non-finite {'loss' if loss is not None and not math.isfinite(loss) else 'gradient norm'}"
            if loss is not None:
                self.losses.append((step, loss))
            if self._streak_start is None:
                self._streak_start = step
        else:
            self.losses.append((step, loss))
            if self._is_suspect(loss):
                if self._streak_start is None:
                    self._streak_start = step
                self._streak += 1
                if self._streak >= self.config.patience:
                    median = statistics.median(self._history)
                    reason = (
                        f"loss {loss:.4g} above {self.config.factor:g} x median {median:.4g} for {self._streak} steps"
                    )
            else:
                self._streak_start, self._streak = None, 0
                self._history.append(loss)
        if reason is not None:
            self._recover(args, state, step, reason)
        elif self._streak_start is None:
            self._maybe_sample(state.global_step)

    def _maybe_sample(self, step: int) -> None:
        # The live weights are still those of optimizer step `step`, and the loss just seen on them was normal:
        # only weights whose own loss was checked enter the ring.
        if step > 0 and step % self.config.interval == 0:
            self._take_sample(step)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._saved_lrs is not None:  # give the scheduler back the learning rate it set
            for group, lr in zip(self._optimizer.param_groups, self._saved_lrs, strict=True):
                group["lr"] = lr
            self._saved_lrs = None

    def on_step_end(self, args, state, control, **kwargs):
        if self._since_recovery is not None:
            self._since_recovery += 1

    # ------------------------------------------------------------------ detection
    def _observe(self) -> tuple[float | None, bool]:
        """The step's loss (mean over processes) and whether every gradient is finite, in one sync."""
        grads = [p.grad for p in self._params if p.grad is not None]
        if grads:
            norms = torch._foreach_norm(grads)
            grad_total = torch.stack([n.to(grads[0].device, torch.float32) for n in norms]).sum()
        else:
            grad_total = None
        loss = self._step_loss
        device = grads[0].device if grads else (loss.device if loss is not None else torch.device("cpu"))
        packed = torch.stack(
            [
                (loss if loss is not None else torch.zeros(())).to(device, torch.float32).reshape(()),
                torch.ones((), device=device) if loss is not None else torch.zeros((), device=device),
                (grad_total if grad_total is not None else torch.zeros(())).to(device, torch.float32),
            ]
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                torch.distributed.all_reduce(packed)
                packed[0] /= torch.distributed.get_world_size()
        loss_value, has_loss, grad_value = packed.tolist()
        return (loss_value if has_loss else None), math.isfinite(grad_value)

    def _is_suspect(self, loss: float) -> bool:
        if len(self._history) < max(self.config.min_history, 1):
            return False
        return loss > self.config.factor * statistics.median(self._history)

    # ------------------------------------------------------------------ samples and recovery
    @torch.no_grad()
    def _take_sample(self, step: int) -> None:
        device = torch.device("cpu") if self.config.offload == "cpu" else None
        if len(self._ring) == self._ring.maxlen:  # reuse the oldest sample's memory
            old = self._ring.popleft()
            torch._foreach_copy_(old.tensors, [p.detach() for p in self._params])
            old.step = step
            self._ring.append(old)
            return
        tensors = [p.detach().to(device=device or p.device, copy=True) for p in self._params]
        self._ring.append(_Sample(step, tensors))

    @torch.no_grad()
    def _recover(self, args, state, step: int, reason: str) -> None:
        began = self._streak_start if self._streak_start is not None else step
        usable = self._usable_samples(step, reason, began)
        self._restore_merge(usable)
        if self.config.reset_optimizer:
            self._reset_moments()
        # Drop the samples that are not usable and restart the detector on the pre-spike history.
        self._ring = deque(usable, maxlen=self.config.num_samples)
        self._streak_start, self._streak = None, 0
        self._since_recovery = -1  # on_step_end of this step makes it 0: the next step is the first re-warm step
        self._log_recovery(state, step, reason, began, usable)

    def _usable_samples(self, step: int, reason: str, began: int) -> list[_Sample]:
        """The ring's samples taken before the spike began; refuse when recoveries are used up or none is left."""
        config = self.config
        if len(self.events) >= config.max_recoveries:
            raise SpikeRecoveryError(
                f"Loss spike at step {step} ({reason}) after {len(self.events)} recoveries, the most allowed "
                f"(`max_recoveries`={config.max_recoveries}). The run keeps spiking from the merged weights: lower "
                "the learning rate (or set `lr_scale` < 1), lengthen the warm-up, or raise `max_recoveries`."
            )
        # A sample of step k holds the weights after optimizer step k, which the loss of step k+1 measures; the
        # spike's first bad loss (step `began`) measured the weights of step began-1, so those are suspect too.
        usable = [s for s in self._ring if s.step < began - 1]
        if not usable:
            raise SpikeRecoveryError(
                f"Loss spike at step {step} ({reason}, began at step {began}), but no recovery sample was taken "
                f"before it (samples every `interval`={config.interval} steps; taken at steps "
                f"{[s.step for s in self._ring] or 'none'}). Take samples more often (a smaller `interval`)."
            )
        return usable

    @torch.no_grad()
    def _restore_merge(self, usable: list[_Sample]) -> None:
        """Live weights <- the merge of the usable samples (the one averaging law, the soups' weighted sum)."""
        weights = self.config.rule.weights_for(len(usable))
        steps = [f"step {s.step}" for s in usable]
        for i, p in enumerate(self._params):
            merged = weighted_sum(
                [s.tensors[i] for s in usable], weights, name=f"parameter {i}", sources=steps,
                accumulate_dtype=torch.float32, out_dtype=p.dtype, device=p.device,
            )  # fmt: skip
            p.copy_(merged)
            p.grad = None  # the optimizer skips this step's update: spike gradients never reach the moments

    def _reset_moments(self) -> None:
        """Back to the freshly initialised optimizer state (Adam: step 0, zero moments), PMA entries kept.

        Zeroing in place rather than clearing keeps other entries (the PMA average) and the optimizer's
        lazy-init check consistent.
        """
        for p in self._params:
            entry = self._optimizer.state.get(p)
            for key, value in (entry or {}).items():
                if str(key).startswith("pma"):
                    continue
                if isinstance(value, torch.Tensor):
                    value.zero_()
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    entry[key] = type(value)(0)

    def _log_recovery(self, state, step: int, reason: str, began: int, usable: list[_Sample]) -> None:
        config = self.config
        event = {
            "spike_recovery": len(self.events) + 1,
            "step": step,
            "spike_began": began,
            "reason": reason,
            "merged_steps": [s.step for s in usable],
            "merge": config.rule.describe(len(usable)),
            "optimizer_reset": config.reset_optimizer,
        }
        self.events.append(event)
        state.log_history.append(dict(event))
        logger.warning(
            "Loss spike at step %d (%s, began at step %d): restored the %s taken at steps %s; optimizer moments %s; "
            "learning rate re-warmed over %d steps. Recovery %d of at most %d.",
            *(step, reason, began, event["merge"], event["merged_steps"]),
            "reset" if config.reset_optimizer else "kept",
            *(config.rewarm_steps, len(self.events), config.max_recoveries),
        )

    def lr_factor(self) -> float:
        """The factor applied to the scheduler's learning rate for the coming step (1.0 when untouched)."""
        factor = self.config.lr_scale ** len(self.events)
        if self._since_recovery is not None and self.config.rewarm_steps > 0:
            k = self._since_recovery
            if k < self.config.rewarm_steps:
                factor *= (k + 1) / (self.config.rewarm_steps + 1)
        return factor

    def _scale_lr(self) -> None:
        factor = self.lr_factor()
        if factor == 1.0 or self._optimizer is None:
            return
        self._saved_lrs = [group["lr"] for group in self._optimizer.param_groups]
        for group in self._optimizer.param_groups:
            group["lr"] = group["lr"] * factor
