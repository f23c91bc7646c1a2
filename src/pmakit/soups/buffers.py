"""Buffers in merged models: what to do with state that is not a parameter, and BatchNorm statistics.

Averaging a counter makes no sense (BatchNorm's ``num_batches_tracked`` is an integer that a
merge would turn into a fraction), so integer (and bool) buffers are copied from the newest
model. Float buffers follow a policy: ``"average"`` (the same weights as the parameters; fine
for buffers that are themselves averages, such as running means) or ``"newest"`` (copied from
the last model). Averaged BatchNorm statistics are still not the statistics of the averaged
weights: `update_bn` recomputes them with one pass over training data in train mode (the idea of
SWA's ``update_bn``), which is what vision users should run after any weight merge.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..averaging import COPIED_FROM_NEWEST, merge_weights, tensor_merge_action
from ..errors import InputError, brief
from .weighted_sum import weighted_sum


__all__ = ["FLOAT_BUFFER_POLICIES", "average_models", "merge_buffers", "update_bn"]

FLOAT_BUFFER_POLICIES = ("average", "newest")


def _weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Normalised weights by the one averaging law (equal weights when none are given)."""
    return merge_weights(count, "weights" if weights is not None else "sma", weights=weights)


def _model_names(count: int) -> list[str]:
    """How errors name the models: by position, oldest first."""
    return [f"model {k}" for k in range(count)]


def _buffer_names(model: nn.Module) -> list[str]:
    """Names of the buffers that ``state_dict`` holds (persistent ones)."""
    keys = set(model.state_dict())
    return [name for name, _ in model.named_buffers() if name in keys]


def merge_buffers(
    models: Sequence[nn.Module], weights: Sequence[float] | None = None, *, float_buffers: str = "average"
) -> dict[str, torch.Tensor]:
    """The merged buffers of ``models`` (oldest first): integers copied from the newest, floats per policy.

    Averages are accumulated in fp64 and cast back to each buffer's dtype.

    Args:
        models: Models of one architecture, oldest first.
        weights: Weights of the models (None: equal).
        float_buffers: ``"average"`` or ``"newest"``: what float buffers get.

    Returns:
        ``{buffer name: tensor}``.

    Raises:
        ValueError: an unknown policy, a buffer missing from a model or shaped differently, or bad
            weights.
    """
    if float_buffers not in FLOAT_BUFFER_POLICIES:
        raise InputError(
            f"`float_buffers` must be one of {', '.join(FLOAT_BUFFER_POLICIES)}; got {brief(float_buffers)}."
        )
    probs = _weights(weights, len(models))
    states = [m.state_dict() for m in models]
    names = _buffer_names(models[-1])
    merged = {}
    for name in names:
        missing = [k for k, s in enumerate(states) if name not in s]
        if missing:
            raise InputError(f"Buffer {brief(name)} is missing from model(s) {missing}.")
        newest = states[-1][name]
        if tensor_merge_action(newest.is_floating_point()) == COPIED_FROM_NEWEST or float_buffers == "newest":
            merged[name] = newest.detach().clone()
            continue
        merged[name] = weighted_sum(
            [state[name] for state in states],
            probs,
            name=name,
            sources=_model_names(len(states)),
            device=newest.device,
        )
    return merged


def average_models(
    models: Sequence[nn.Module], weights: Sequence[float] | None = None, *, float_buffers: str = "average"
) -> dict[str, torch.Tensor]:
    """A full state dict: parameters averaged with ``weights`` (fp64 accumulation), buffers by `merge_buffers`.

    Args:
        models: Models of one architecture, oldest first.
        weights: Weights of the models (None: equal).
        float_buffers: ``"average"`` or ``"newest"``.

    Returns:
        A state dict for ``load_state_dict`` of any of the models.

    Raises:
        ValueError: a parameter or buffer missing from a model, buffers shaped differently, or bad
            weights.
    """
    probs = _weights(weights, len(models))
    merged = merge_buffers(models, probs, float_buffers=float_buffers)
    params = [dict(m.named_parameters()) for m in models]
    for name, ref in params[-1].items():
        if any(name not in ps for ps in params):
            raise InputError(f"Parameter {brief(name)} is missing from one of the models.")
        merged[name] = weighted_sum(
            [ps[name] for ps in params], probs, name=name, sources=_model_names(len(params)), device=ref.device
        )
    return {k: merged[k] for k in models[-1].state_dict() if k in merged}


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


@torch.no_grad()
def update_bn(
    loader: Iterable, model: nn.Module, device: torch.device | str | None = None, num_batches: int | None = None
) -> int:
    """Recompute every BatchNorm's running statistics of ``model`` with one pass over ``loader``.

    Each BatchNorm is reset and switched to a cumulative average (``momentum=None``), so the
    result is the mean over batches of each batch's statistics, whatever the batch order. A batch
    may be a tensor, an ``(input, target, ...)`` tuple (the first item is fed), or a dict of model
    keyword arguments (HF models). Returns the number of batches used; the model's training mode
    and the modules' momenta are restored.

    Args:
        loader: Batches of training data.
        model: The model whose BatchNorm statistics are recomputed (in place).
        device: Where the batches are moved (default: the model's device).
        num_batches: Use at most this many batches.

    Returns:
        The number of batches used.

    Raises:
        ValueError: the loader gave no batch (the statistics were reset, so they are unusable).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    used = 0
    try:
        for batch in loader:
            if num_batches is not None and used >= num_batches:
                break
            batch = _to_device(batch, device) if device is not None else batch
            if isinstance(batch, Mapping):
                model(**batch)
            elif isinstance(batch, (list, tuple)):
                model(batch[0])
            else:
                model(batch)
            used += 1
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        model.train(was_training)
    if used == 0:
        raise InputError("update_bn got no batch from the loader: the BatchNorm statistics were reset.")
    return used
