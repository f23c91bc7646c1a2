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

from ..io.cards import build_model_card
from ..io.folders import atomic_directory
from ..io.weight_files import find_weight_files


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
    """A fitted learned soup: coefficients (summing to 1), temperature, merged weights and the fit's history."""

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
        push_to_hub: str | None = None,
        private: bool = False,
        revision: str | None = None,
        commit_message: str | None = None,
        token: str | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Write the soup as a model folder (``model`` is the template: config and save format), optionally push it.

        The folder is built aside and renamed into place; the card (README.md) lists the coefficients.
        """
        with atomic_directory(path, overwrite=overwrite) as tmp:
            model.save_pretrained(tmp, state_dict=dict(self.state_dict))  # save_pretrained may consume the dict
            if processing_class is not None and hasattr(processing_class, "save_pretrained"):
                processing_class.save_pretrained(tmp)
            (tmp / "README.md").write_text(self.model_card(), encoding="utf-8")
        if push_to_hub:
            from ..io.hub import push_folder_to_hub

            push_folder_to_hub(
                path,
                push_to_hub,
                private=private,
                revision=revision,
                commit_message=commit_message or "Upload learned soup (pmakit)",
                token=token,
            )
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
    """
    k = len(candidates)
    if k < 2:
        raise ValueError(f"A soup needs at least 2 candidates; got {k}.")
    if epochs < 1 or (max_steps is not None and max_steps < 1):
        raise ValueError("`epochs` and `max_steps` must be positive.")
    labels = (
        list(labels)
        if labels is not None
        else [
            os.fspath(c) if isinstance(c, (str, os.PathLike)) else f"candidate-{i}" for i, c in enumerate(candidates)
        ]
    )
    if len(labels) != k:
        raise ValueError(f"`labels` has {len(labels)} entries for {k} candidates.")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    loss_fn = loss_fn or soup_loss
    states = [_candidate_state(c) for c in candidates]
    names = [n for n, _ in model.named_parameters()]  # tied parameters appear once
    for i, state in enumerate(states):
        missing = [n for n in names if n not in state]
        if missing:
            raise ValueError(f"Candidate {labels[i]} lacks parameter(s) {missing[:5]} of the template model.")
    stacks = {n: torch.stack([s[n].to(device=device, dtype=torch.float32) for s in states]) for n in names}

    mix_logits = torch.zeros(k, device=device, requires_grad=True)
    log_temperature = torch.zeros((), device=device, requires_grad=fit_temperature)
    optimizer = torch.optim.Adam([mix_logits, log_temperature] if fit_temperature else [mix_logits], lr=lr)
    was_training = model.training
    model.eval()  # no dropout: the held-out loss is a deterministic function of the coefficients
    losses: list[float] = []
    step = 0
    try:
        for _ in range(epochs):
            for batch in data:
                if max_steps is not None and step >= max_steps:
                    break
                weights = torch.softmax(mix_logits, dim=0)
                params = {n: torch.tensordot(weights, stacks[n], dims=1) for n in names}
                loss = loss_fn(_forward(model, params, batch, device), batch, log_temperature.exp())
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"The soup's held-out loss is not finite at step {step}.")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                step += 1
    finally:
        model.train(was_training)
    if step == 0:
        raise ValueError("fit_learned_soup got no batch from `data`.")
    del stacks
    coefficients = torch.softmax(mix_logits.detach().double(), dim=0)
    template = model.state_dict()
    merged: dict[str, torch.Tensor] = {}
    for name, ref in template.items():
        if not ref.is_floating_point() or not all(name in state for state in states):
            continue  # buffers the candidates lack, and integer buffers, come from the template
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for c, state in zip(coefficients.tolist(), states, strict=True):
            acc.add_(state[name].detach().to("cpu", torch.float64), alpha=c)
        merged[name] = acc.to(ref.dtype)
    canonical: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):  # a tied name gets the same merged tensor
        first = canonical.setdefault(id(p), name)
        if first in merged:
            merged[name] = merged[first]
    for name, ref in template.items():
        merged.setdefault(name, ref.detach().cpu().clone())
    return LearnedSoup(
        coefficients=coefficients.tolist(),
        temperature=float(log_temperature.detach().exp()),
        state_dict=merged,
        labels=labels,
        losses=losses,
        settings={"optimizer": "adam", "lr": lr, "epochs": epochs, "steps": step, "fit_temperature": fit_temperature},
    )
