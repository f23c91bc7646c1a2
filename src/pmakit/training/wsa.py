"""Weight Scope Alignment (WSA, Xu et al. 2024, arXiv 2408.12237): keep runs that will be merged at one scale.

Each layer's weights are fitted by a Gaussian ``N(mu_l, sigma_l^2)`` (their mean and population
std) and pulled towards a target ``N(mu*_l, sigma*_l^2)`` by the regulariser

    L_wsa = weight * mean_l KL(N(mu_l, sigma_l^2) || N(mu*_l, sigma*_l^2))
          = weight * mean_l [ log(sigma*_l / sigma_l) + (sigma_l^2 + (mu_l - mu*_l)^2) / (2 sigma*_l^2) - 1/2 ].

Secondary sources report the KL form for the paper; our notes (its first page only) do not fix the
loss weight, the target, or the reduction over layers. Ours: the mean over layers (so ``weight`` does
not grow with depth); the target is the run's initial weights by default, or a reference model
folder, or the fused scope (`pmakit.soups.scopes.fuse_scopes`) of several folders. These are our defaults,
not the paper's.

Cost: the per-layer moments are computed by one custom autograd function. Its forward stacks
the layers of each shape (a bounded number of elements at a time) and reduces each stack with a
mean and a norm of the centred rows, in fp32 (fp64 for fp64 weights); its backward is the closed-form
gradient ``dL/dW = a_l + b_l W`` applied to all layers at once with two ``torch._foreach_*``
kernels. Nothing of the size of the model is kept between forward and backward.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..errors import InputError, TrainingError
from ..online.distributed import unwrap_model, unwrap_optimizer
from ..soups.scopes import Scope, compute_scopes, fuse_scopes, tensor_scope
from .wsa_config import WSA_TARGETS, WsaConfig


__all__ = ["WSA_TARGETS", "WsaCallback", "WsaConfig", "WsaRegularizer", "add_wsa", "wsa_target_scopes"]

logger = logging.getLogger(__name__)

STATE_KEY = "wsa_target"  # in optimizer.param_groups[0]: the target survives checkpoint/resume
_STACK_ELEMENTS = 1 << 24  # at most this many elements are stacked for one reduction


def _aligned_parameters(model: torch.nn.Module, layers: str | None) -> list[tuple[str, torch.nn.Parameter]]:
    pattern = re.compile(layers) if layers else None
    return [
        (name, p)
        for name, p in model.named_parameters()
        if p.requires_grad and p.is_floating_point() and p.dim() >= 2 and (pattern is None or pattern.search(name))
    ]


def wsa_target_scopes(config: WsaConfig, model: torch.nn.Module | None = None) -> dict[str, Scope]:
    """The target scopes ``config`` names: of ``model`` now ('init'), of a folder, or fused from folders."""
    if config.target == "init":
        if model is None:
            raise InputError("The 'init' WSA target is the model's own weights: pass the model.")
        return {name: tensor_scope(p) for name, p in _aligned_parameters(model, config.layers)}
    scopes = [compute_scopes(folder, pattern=config.layers) for folder in config.reference]
    if config.target == "reference":
        return scopes[0]
    return fuse_scopes(scopes, config.reference_weights)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _plan(params: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of the layers reduced together: same device, shape and dtype, at most `_STACK_ELEMENTS` per stack."""
    by_key: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        by_key.setdefault((p.device, tuple(p.shape), p.dtype), []).append(i)
    chunks = []
    for idx in by_key.values():
        per = max(1, _STACK_ELEMENTS // max(params[idx[0]].numel(), 1))
        chunks += [idx[s : s + per] for s in range(0, len(idx), per)]
    return chunks


class _LayerMoments(torch.autograd.Function):
    """Per-layer (mean, population variance) of a list of tensors, with the closed-form gradient.

    ``plan`` lists the indices reduced together (`_plan`); when it visits the layers in order (as
    `WsaRegularizer` arranges) the results are simply concatenated. ``numel`` holds each layer's size.
    """

    @staticmethod
    def forward(ctx, plan, out_device, numel, *params):
        dtype = _compute_dtype(params[0].dtype)
        means, variances = [], []
        for idx in plan:
            stack = torch.stack([params[i].reshape(-1) for i in idx]).to(_compute_dtype(params[idx[0]].dtype))
            # two passes on our own copy (mean, then the norm of the centred rows): exact like var_mean, and
            # several times faster than its Welford loop on CPU
            mean = stack.mean(dim=1)
            var = torch.linalg.vector_norm(stack.sub_(mean[:, None]), dim=1).square_().div_(stack.shape[1])
            means.append(mean.to(device=out_device, dtype=dtype))
            variances.append(var.to(device=out_device, dtype=dtype))
        means, variances = torch.cat(means), torch.cat(variances)
        order = [i for idx in plan for i in idx]
        if order != list(range(len(params))):  # put the layers back in the caller's order
            inverse = torch.empty(len(order), dtype=torch.long)
            inverse[torch.tensor(order)] = torch.arange(len(order))
            inverse = inverse.to(out_device)
            means, variances = means[inverse], variances[inverse]
        ctx.save_for_backward(means, numel, *params)  # references, not copies
        return means, variances

    @staticmethod
    def backward(ctx, grad_mean, grad_var):
        means, numel, *params = ctx.saved_tensors
        # d mean/dW = 1/n, d var/dW = 2 (W - mean)/n  =>  dL/dW = a + b W with
        b = 2.0 * grad_var / numel
        a = grad_mean / numel - b * means
        grads: list[torch.Tensor | None] = [None] * len(params)
        by_device: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            by_device.setdefault((p.device, p.dtype), []).append(i)
        for (device, dtype), idx in by_device.items():
            if len(by_device) > 1:
                index = torch.tensor(idx, device=means.device)
                a_d, b_d = a.index_select(0, index), b.index_select(0, index)
            else:
                a_d, b_d = a, b
            a_d = a_d.to(device=device, dtype=_compute_dtype(dtype)).unbind()
            b_d = b_d.to(device=device, dtype=_compute_dtype(dtype)).unbind()
            group = [params[i] for i in idx]
            if dtype not in (torch.float32, torch.float64):
                group = [p.float() for p in group]
            out = torch._foreach_mul(group, list(b_d))
            torch._foreach_add_(out, list(a_d))
            for i, g in zip(idx, out, strict=True):
                grads[i] = g if g.dtype == dtype else g.to(dtype)
        return (None, None, None, *grads)


class WsaRegularizer:
    """The WSA loss of ``model``'s aligned layers against ``target`` (``{name: Scope}``), as a callable.

    ``target=None`` takes the model's current weights (the 'init' target). Layers whose target std
    is 0 (zero-initialised ones, such as LoRA's B) have no Gaussian to align to and are skipped.

    Args:
        model: The model being trained.
        target: ``{name: Scope}`` to align to (None: the model's current weights).
        weight: Weight of the averaged KL in the loss.
        layers: Regex of aligned parameter names (None: every matrix).
        eps: Floor of the variances, for numerical safety.

    Raises:
        ValueError: the target lacks an aligned layer, or there is no layer to align.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        target: Mapping[str, Scope] | None = None,
        *,
        weight: float = 0.5,
        layers: str | None = None,
        eps: float = 1e-12,
    ) -> None:
        named = _aligned_parameters(model, layers)
        if target is None:
            target = {name: tensor_scope(p) for name, p in named}
        missing = [name for name, _ in named if name not in target]
        if missing:
            raise InputError(
                f"The WSA target has no scope for {len(missing)} aligned parameter(s), e.g. {missing[:5]}; "
                "restrict the aligned layers with `layers` or use a target from the same architecture."
            )
        zero = [name for name, _ in named if not target[name].std > 0]
        if zero:
            logger.info("WSA: %d layer(s) with zero target std are not aligned: %s", len(zero), zero[:5])
        named = [(n, p) for n, p in named if target[n].std > 0]
        if not named:
            raise InputError("WSA found no layer to align (no trainable parameter with 2+ dims and a positive std).")
        named = [named[i] for idx in _plan([p for _, p in named]) for i in idx]  # layers reduced together adjacent
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.weight = float(weight)
        self.eps = eps
        self.device = self.params[0].device
        dtype = _compute_dtype(self.params[0].dtype)
        self.target_mean = torch.tensor([target[n].mean for n in self.names], dtype=dtype, device=self.device)
        self.target_std = torch.tensor([target[n].std for n in self.names], dtype=dtype, device=self.device)
        self._plan = _plan(self.params)
        self._numel = torch.tensor([p.numel() for p in self.params], dtype=dtype, device=self.device)

    @property
    def target(self) -> dict[str, Scope]:
        return {
            n: Scope(float(m), float(s), p.numel())
            for n, m, s, p in zip(
                self.names, self.target_mean.tolist(), self.target_std.tolist(), self.params, strict=True
            )
        }

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-layer (mean, std) of the aligned layers now, differentiable."""
        means, variances = _LayerMoments.apply(self._plan, self.device, self._numel, *self.params)
        return means, variances.clamp_min(self.eps).sqrt()

    def kl(self) -> torch.Tensor:
        """Per-layer KL(N(mu_l, sigma_l^2) || N(mu*_l, sigma*_l^2)), differentiable."""
        means, variances = _LayerMoments.apply(self._plan, self.device, self._numel, *self.params)
        variances = variances.clamp_min(self.eps)  # a collapsed layer (std 0) gives a finite loss
        t_var = self.target_std.square()
        return (
            0.5 * (t_var.log() - variances.log())
            + (variances + (means - self.target_mean).square()) / (2.0 * t_var)
            - 0.5
        )

    def __call__(self) -> torch.Tensor:
        """``weight * mean_l KL_l``, a scalar to add to the training loss."""
        return self.weight * self.kl().mean()


def _target_to_state(reg: WsaRegularizer) -> dict:
    return {"names": list(reg.names), "mean": reg.target_mean.tolist(), "std": reg.target_std.tolist()}


def _target_from_state(state: Mapping, model: torch.nn.Module) -> dict[str, Scope]:
    sizes = dict((n, p.numel()) for n, p in model.named_parameters())
    rows = zip(state["names"], state["mean"], state["std"], strict=True)
    return {n: Scope(float(m), float(s), sizes.get(n, 0)) for n, m, s in rows}


def _inner_optimizer(optimizer):
    return unwrap_optimizer(optimizer)


class WsaCallback(TrainerCallback):
    """Add the WSA loss to any Trainer (or subclass): ``add_wsa(trainer, WsaConfig(weight=0.5))``.

    The callback wraps the trainer's own ``compute_loss`` (so TRL's and other subclasses' losses
    are kept) and adds the WSA term in training only (``eval_loss`` stays the task loss). The
    logged ``loss`` is the total; ``wsa_loss`` is logged next to it, averaged over the same
    steps. The target is fixed at the start of training and stored in the optimizer state, so a
    resumed run keeps aligning to its original initial weights.

    Args:
        config: The settings (default: ``WsaConfig(**settings)``).
        trainer: The Trainer whose ``compute_loss`` gets the WSA term.
        **settings: `WsaConfig` fields, when ``config`` is not given.

    Raises:
        ValueError: invalid settings, both ``config`` and ``settings``, or a trainer that already
            has a WSA callback.
    """

    def __init__(self, config: WsaConfig | None = None, trainer=None, **settings) -> None:
        if config is not None and settings:
            raise InputError("Pass either a `WsaConfig` or keyword settings, not both.")
        self.config = config if config is not None else WsaConfig(**settings)
        self.regularizer: WsaRegularizer | None = None
        self.trainer = None
        self._sum: torch.Tensor | None = None
        self._count = 0
        if trainer is not None:
            self.bind(trainer)

    def bind(self, trainer) -> None:
        """Wrap ``trainer.compute_loss`` and ``trainer.log`` (once)."""
        if getattr(trainer, "_wsa_callback", None) is not None:
            raise InputError("This trainer already has a WSA callback.")
        self.trainer = trainer
        trainer._wsa_callback = self
        compute_loss, log = trainer.compute_loss, trainer.log

        def compute_loss_with_wsa(model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
            out = compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kwargs
            )
            if self.regularizer is None or self.config.weight == 0 or not model.training:
                return out
            loss, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
            term = self.regularizer()
            self._record(term)
            loss = loss + self._ga_scale(trainer, num_items_in_batch) * term.to(loss.device)
            return (loss, *rest) if rest is not None else loss

        def log_with_wsa(logs, *args, **kwargs):
            if "loss" in logs and self._count:
                logs["wsa_loss"] = float(self._sum) / self._count
                self._sum, self._count = None, 0
            return log(logs, *args, **kwargs)

        trainer.compute_loss = compute_loss_with_wsa
        trainer.log = log_with_wsa

    @staticmethod
    def _ga_scale(trainer, num_items_in_batch) -> float:
        """1/GA when the Trainer will not divide the loss by the accumulation steps itself (its own rule)."""
        scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (
                bool(getattr(trainer, "model_accepts_loss_kwargs", False)) and num_items_in_batch is not None
            ) or getattr(trainer, "compute_loss_func", None) is not None
        steps = getattr(trainer, "current_gradient_accumulation_steps", 1) or 1
        return 1.0 / steps if scaled else 1.0

    def _record(self, term: torch.Tensor) -> None:
        value = term.detach().float()
        self._sum = value if self._sum is None else self._sum + value.to(self._sum.device)
        self._count += 1

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.trainer is None:
            raise TrainingError(
                "WsaCallback adds a loss term, so it needs the trainer: use `add_wsa(trainer, config)`."
            )
        model = kwargs.get("model")
        model = unwrap_model(model if model is not None else self.trainer.model)
        optimizer = kwargs.get("optimizer")
        group = _inner_optimizer(optimizer).param_groups[0] if optimizer is not None else {}
        saved = group.get(STATE_KEY)
        if saved is not None:  # resumed: align exactly the saved layers to the saved target
            exact = "^(?:" + "|".join(map(re.escape, saved["names"])) + ")$"
            reg = WsaRegularizer(model, _target_from_state(saved, model), weight=self.config.weight, layers=exact)
        else:
            reg = WsaRegularizer(
                model, wsa_target_scopes(self.config, model), weight=self.config.weight, layers=self.config.layers
            )
        self.regularizer = reg
        if optimizer is not None:
            group[STATE_KEY] = _target_to_state(reg)
        logger.info(
            "WSA: aligning %d layer(s) to the '%s' target, weight %g", len(reg.names), self.config.target, reg.weight
        )


def add_wsa(trainer, config: WsaConfig | None = None, **settings) -> WsaCallback:
    """Add WSA to ``trainer`` (any `transformers.Trainer` subclass) and return its callback.

    Args:
        trainer: The Trainer.
        config: The settings (default: ``WsaConfig(**settings)``).
        **settings: `WsaConfig` fields, when ``config`` is not given.

    Returns:
        The callback that was added.

    Raises:
        ValueError: invalid settings.
    """
    callback = WsaCallback(config, trainer=trainer, **settings)
    trainer.add_callback(callback)
    return callback
