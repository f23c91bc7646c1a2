"""Learned soup (Wortsman et al. 2022, appendix I): mixing coefficients fitted on held-out data.

The soup is ``theta = sum_i softmax(a)_i theta_i`` over k candidate models fine-tuned from one
initialisation. The logits ``a`` (started equal: a uniform soup) and a temperature ``beta``
(the logits of the model are multiplied by it) are fitted with Adam on the cross-entropy of the
souped model over held-out batches; the model is evaluated at the mixed weights with
``torch.func.functional_call``, so gradients flow to the k + 1 scalars only.

Memory: every candidate is held at once, as one fp32 stack of k copies per parameter on the
fitting device, plus the candidates themselves (modules as given; folders loaded into CPU memory),
the template model and the activations of one batch: about ``4k`` bytes per parameter on the device
and ``k`` times the checkpoint size in CPU memory for folders, against a few tensors for the
streaming offline merger. The authors themselves recommend the
greedy soup over the learned one; use this when the candidates are few and a held-out set exists.

The temperature only rescales the output logits; it does not change the merged weights and is
recorded in the model card (apply it to logits yourself if you want the calibrated loss).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from ..errors import InputError
from ..io.cards import build_model_card
from ..io.folders import atomic_directory
from ..io.hub_target import HubTarget, as_hub_target
from ..io.weight_files import find_weight_files
from .weighted_sum import weighted_sum


__all__ = ["LearnedSoup", "fit_learned_soup", "soup_loss"]


def _folder_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in find_weight_files(folder):
        state.update(load_file(str(path)))
    return state


def _candidate_state(candidate) -> dict[str, torch.Tensor]:
    if isinstance(candidate, nn.Module):
        return {k: v.detach() for k, v in candidate.state_dict().items()}
    if isinstance(candidate, Mapping):
        return dict(candidate)
    if isinstance(candidate, (str, os.PathLike)):
        folder = Path(candidate)
        if not folder.is_dir():
            raise FileNotFoundError(f"Candidate folder {folder} does not exist.")
        return _folder_state(folder)
    raise TypeError(f"A soup candidate is a module, a state dict or a model folder; got {type(candidate).__name__}.")


def soup_loss(outputs, batch, temperature: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``temperature * logits``: next-token for causal LMs (3-D logits), else per example.

    ``batch`` is a dict with ``labels`` (ignored positions -100) or an ``(inputs, labels)`` pair.
    """
    logits = outputs.logits if hasattr(outputs, "logits") else outputs
    labels = batch["labels"] if isinstance(batch, Mapping) else batch[1]
    logits = logits * temperature
    if logits.dim() == 3:  # causal LM: position t predicts token t + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1).to(logits.device), ignore_index=-100
    )


def _forward(model, params, batch, device):
    if isinstance(batch, Mapping):
        kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k != "labels"}
        return functional_call(model, params, (), kwargs)
    return functional_call(model, params, (batch[0].to(device),))


@dataclass
class LearnedSoup:
    """A fitted learned soup: coefficients (summing to 1), temperature, merged weights and the fit's history.

    Attributes:
        coefficients: Mixing weight of each candidate, summing to 1.
        temperature: The fitted output temperature.
        state_dict: The merged weights.
        labels: The candidates' names.
        losses: The held-out loss at each fit step.
        settings: The fit's settings, for the model card.
    """

    coefficients: list[float]
    temperature: float
    state_dict: dict[str, torch.Tensor]
    labels: list[str]
    losses: list[float] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def model_card(self, base_models: Sequence[str] = ()) -> str:
        rows = "\n".join(f"| {label} | {c:.6f} |" for label, c in zip(self.labels, self.coefficients, strict=True))
        summary = (
            f"A learned soup (Wortsman et al. 2022) of {len(self.labels)} models: their weights mixed with "
            "softmax coefficients fitted on held-out data, together with an output temperature "
            f"(fitted: {self.temperature:.6g}; it is not applied to the saved weights). Made with pmakit."
        )
        recipe = {
            "method": "learned_soup",
            "models": list(self.labels),
            "coefficients": [round(c, 8) for c in self.coefficients],
            "temperature": round(self.temperature, 8),
            **self.settings,
        }
        if self.losses:
            recipe["held_out_loss_first_last"] = [round(self.losses[0], 6), round(self.losses[-1], 6)]
        return build_model_card(
            title="Learned soup",
            summary=summary,
            base_models=list(base_models) or list(self.labels),
            tags=("merge", "model-soup", "learned-soup"),
            recipe=recipe,
            details=[("Mixing coefficients", "| model | coefficient |\n|---|---|\n" + rows)],
        )

    def save(
        self,
        model: nn.Module,
        path: str | os.PathLike,
        *,
        processing_class=None,
        push_to_hub: str | HubTarget | None = None,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        token: str | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Write the soup as a model folder (``model`` is the template: config and save format), optionally push it.

        The folder is built aside and renamed into place; the card (README.md) lists the coefficients.
        ``push_to_hub`` is a repo id or a `HubTarget`; ``private``, ``revision``, ``commit_message`` and
        ``token`` beside it are deprecated (they go in the `HubTarget`).
        """
        hub = dict(private=private, revision=revision, commit_message=commit_message, token=token)
        target = as_hub_target(
            push_to_hub, where="LearnedSoup.save", default_message="Upload learned soup (pmakit)", **hub
        )
        with atomic_directory(path, overwrite=overwrite) as tmp:
            model.save_pretrained(tmp, state_dict=dict(self.state_dict))  # save_pretrained may consume the dict
            if processing_class is not None and hasattr(processing_class, "save_pretrained"):
                processing_class.save_pretrained(tmp)
            (tmp / "README.md").write_text(self.model_card(), encoding="utf-8")
        if target is not None:
            from ..io.hub import push_folder_to_hub

            push_folder_to_hub(path, target)
        return Path(path)


def fit_learned_soup(
    model: nn.Module,
    candidates: Sequence,
    data: Iterable,
    *,
    epochs: int = 1,
    max_steps: int | None = None,
    lr: float = 0.05,
    fit_temperature: bool = True,
    loss_fn: Callable | None = None,
    labels: Sequence[str] | None = None,
    device: torch.device | str | None = None,
) -> LearnedSoup:
    """Fit the mixing coefficients (and temperature) of a soup of ``candidates`` on held-out ``data``.

    ``model`` is a template with the candidates' architecture (its weights are not used);
    ``candidates`` are modules, state dicts or model folders (all held in memory, see the module
    docstring); ``data`` yields batches (dicts of model inputs with ``labels``, or
    ``(inputs, labels)`` pairs) and is iterated ``epochs`` times (at most ``max_steps`` steps).
    ``loss_fn(outputs, batch, temperature)`` defaults to `soup_loss`. The defaults (Adam,
    lr 0.05) follow the paper's code. The merged weights are computed in fp64 from the candidates.

    Args:
        model: A template model with the candidates' architecture.
        candidates: Modules, state dicts or model folders.
        data: Held-out batches.
        epochs: Passes over ``data``.
        max_steps: At most this many optimisation steps.
        lr: Adam learning rate.
        fit_temperature: Also fit the output temperature.
        loss_fn: ``loss_fn(outputs, batch, temperature)``.
        labels: Names of the candidates for the card.
        device: Where to fit (default: the template's device).

    Returns:
        The fitted soup; ``LearnedSoup.save`` writes it as a model folder.

    Raises:
        FileNotFoundError: a candidate folder is missing.
        TypeError: a candidate of an unsupported type.
        ValueError: fewer than two candidates, a candidate lacking parameters of the template,
            ``labels`` of the wrong length, ``epochs``/``max_steps`` below 1, or no batch in ``data``.
        FloatingPointError: the loss became non-finite during the fit.
    """
    if len(candidates) < 2:
        raise InputError(f"A soup needs at least 2 candidates; got {len(candidates)}.")
    if epochs < 1 or (max_steps is not None and max_steps < 1):
        raise InputError("`epochs` and `max_steps` must be positive.")
    labels = _labels(candidates, labels)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    states = [_candidate_state(c) for c in candidates]
    names = _check_parameters(model, states, labels)
    fit = _SoupFit(model, states, names, device, fit_temperature, lr)
    fit.run(data, epochs, max_steps, loss_fn or soup_loss)
    coefficients = torch.softmax(fit.mix_logits.detach().double(), dim=0).tolist()
    return LearnedSoup(
        coefficients=coefficients,
        temperature=float(fit.log_temperature.detach().exp()),
        state_dict=_merged_state(model, states, coefficients, labels),
        labels=labels,
        losses=fit.losses,
        settings={
            "optimizer": "adam",
            "lr": lr,
            "epochs": epochs,
            "steps": fit.steps,
            "fit_temperature": fit_temperature,
        },
    )


def _labels(candidates: Sequence, labels: Sequence[str] | None) -> list[str]:
    """The names the card gives the candidates: as given, else folder paths or ``candidate-i``."""
    if labels is None:
        return [
            os.fspath(c) if isinstance(c, (str, os.PathLike)) else f"candidate-{i}" for i, c in enumerate(candidates)
        ]
    if len(labels) != len(candidates):
        raise InputError(f"`labels` has {len(labels)} entries for {len(candidates)} candidates.")
    return list(labels)


def _check_parameters(model: nn.Module, states: Sequence[dict], labels: Sequence[str]) -> list[str]:
    """The template's parameter names (tied ones once), after checking that every candidate has them."""
    names = [n for n, _ in model.named_parameters()]
    for label, state in zip(labels, states, strict=True):
        missing = [n for n in names if n not in state]
        if missing:
            raise InputError(f"Candidate {label} lacks parameter(s) {missing[:5]} of the template model.")
    return names


class _SoupFit:
    """Adam on the mixing logits (and log-temperature) over held-out batches; the k fp32 stacks live here."""

    def __init__(self, model, states, names, device, fit_temperature: bool, lr: float) -> None:
        self.model, self.names, self.device = model, names, device
        self.stacks = {n: torch.stack([s[n].to(device=device, dtype=torch.float32) for s in states]) for n in names}
        self.mix_logits = torch.zeros(len(states), device=device, requires_grad=True)
        self.log_temperature = torch.zeros((), device=device, requires_grad=fit_temperature)
        fitted = [self.mix_logits, self.log_temperature] if fit_temperature else [self.mix_logits]
        self.optimizer = torch.optim.Adam(fitted, lr=lr)
        self.losses: list[float] = []
        self.steps = 0

    def run(self, data: Iterable, epochs: int, max_steps: int | None, loss_fn: Callable) -> None:
        """Fit in eval mode (no dropout: the loss is a deterministic function of the coefficients)."""
        was_training = self.model.training
        self.model.eval()
        try:
            for _ in range(epochs):
                for batch in data:
                    if max_steps is not None and self.steps >= max_steps:
                        break
                    self.step(batch, loss_fn)
        finally:
            self.model.train(was_training)
            self.stacks = {}  # k copies of the model: free them as soon as the fit ends
        if self.steps == 0:
            raise InputError("fit_learned_soup got no batch from `data`.")

    def step(self, batch, loss_fn: Callable) -> None:
        weights = torch.softmax(self.mix_logits, dim=0)
        # Differentiable in the coefficients, unlike the tools' weighted sum used for the final merge.
        params = {n: torch.tensordot(weights, self.stacks[n], dims=1) for n in self.names}
        loss = loss_fn(_forward(self.model, params, batch, self.device), batch, self.log_temperature.exp())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"The soup's held-out loss is not finite at step {self.steps}.")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.losses.append(float(loss.detach()))
        self.steps += 1


def _merged_state(
    model: nn.Module, states: Sequence[dict], coefficients: Sequence[float], labels: Sequence[str]
) -> dict[str, torch.Tensor]:
    """The soup's state dict: floating tensors mixed in fp64 on the CPU, the rest from the template."""
    template = model.state_dict()
    merged: dict[str, torch.Tensor] = {}
    for name, ref in template.items():
        if not ref.is_floating_point() or not all(name in state for state in states):
            continue  # buffers the candidates lack, and integer buffers, come from the template
        tensors = [state[name] for state in states]
        merged[name] = weighted_sum(
            tensors, coefficients, name=name, sources=labels, out_dtype=ref.dtype, device="cpu"
        )
    canonical: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):  # a tied name gets the same merged tensor
        first = canonical.setdefault(id(p), name)
        if first in merged:
            merged[name] = merged[first]
    for name, ref in template.items():
        merged.setdefault(name, ref.detach().cpu().clone())
    return merged
