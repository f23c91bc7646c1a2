"""Whether the inputs of a merge fit together, from their headers and configs alone.

One architecture (a config that only lacks ``architectures`` passes when its tensors match), no
adapters mixed with full models, the same shape and kind of every tensor, and weights the rule can
serve (with the training steps a step-aware rule needs). Legal but rarely meant weights warn.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from ..averaging import AveragingRule
from ..errors import MergeError, brief
from ..io.safetensors import TensorInfo
from .heads import LM_HEAD
from .sources import ModelSource


__all__ = ["EXTRAPOLATION_WARNING", "check_alike", "check_architectures", "rule_weights"]

# Above this sum of |weights| a merge amplifies the inputs' differences more than any average would (1).
EXTRAPOLATION_WARNING = 10.0


def rule_weights(rule: AveragingRule, sources: Sequence[ModelSource]) -> list[float]:
    """The rule's closed-form weights; a count the rule cannot serve is a `MergeError` like every bad input."""
    try:
        weights = rule.weights_for(len(sources), _input_steps(rule, sources))
    except ValueError as e:
        raise MergeError(str(e)) from e
    _warn_on_weights(rule, weights)
    return weights


def _input_steps(rule: AveragingRule, sources: Sequence[ModelSource]) -> list[int] | None:
    """The inputs' training steps, for a rule that weighs by them: each must be known (named ``step-N``,
    ``checkpoint-N``, ``pma-N``, or from a run folder), and they must rise."""
    if not rule.rule.step_aware:
        return None
    unknown = [s.label for s in sources if s.step is None]
    if unknown:
        raise MergeError(
            f"The `{rule.algo}` rule weighs inputs by their training steps, but the step of {', '.join(unknown)} "
            "is unknown: name the folders `step-N`, `checkpoint-N` or `pma-N`, or merge a run folder."
        )
    steps = [s.step for s in sources]
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise MergeError(f"The `{rule.algo}` rule needs inputs in rising step order, oldest first; got steps {steps}.")
    return steps


def _warn_on_weights(rule: AveragingRule, weights: list[float]) -> None:
    """Weights that are legal but rarely meant: all zero (an all-zero model) or a far extrapolation."""
    given = f"weights {list(rule.weights)}" if rule.weights is not None else rule.algo
    if all(w == 0 for w in weights):
        warnings.warn(f"Every weight is zero ({given}): the merged floats are all zero.", stacklevel=3)
    elif sum(abs(w) for w in weights) > EXTRAPOLATION_WARNING:
        applied = ", ".join(f"{w:.6g}" for w in weights)
        warnings.warn(
            f"The {given} extrapolate far beyond the inputs: applied weights {applied} (sum of |w| "
            f"{sum(abs(w) for w in weights):.6g} > {EXTRAPOLATION_WARNING:g}); differences between inputs are "
            "amplified by that much.",
            stacklevel=3,
        )


def _arch(source: ModelSource) -> tuple[str | None, tuple[str, ...]]:
    """``(model_type, architectures)`` from the config: what must agree for weights to mean the same thing."""
    config = source.config
    return config.get("model_type"), tuple(config.get("architectures") or ())


def check_architectures(sources: list[ModelSource], base: ModelSource | None, donor: ModelSource) -> None:
    """Every input (and the base) has the donor's architecture; adapters are not mixed with full models.

    A config without ``architectures`` (some exporters drop it) is accepted, with a warning naming
    its file, when its ``model_type`` matches and its tensors have the same names and shapes.
    """
    if donor.config:
        listed = [donor, *sources, *([base] if base is not None else [])]
        everyone = [s for i, s in enumerate(listed) if s.config and all(s is not t for t in listed[:i])]
        reference = next((s for s in everyone if _arch(s)[1]), donor)  # one that names its architectures
        for s in everyone:
            if _arch(s) != _arch(reference):
                _check_unnamed_architecture(s, reference)
    if len({s.is_adapter for s in sources}) > 1:
        raise MergeError("Cannot merge PEFT adapter folders with full model folders.")


def _check_unnamed_architecture(source: ModelSource, reference: ModelSource) -> None:
    """Accept ``source`` (warn) when only its ``architectures`` is missing and its tensors match, else refuse."""
    arch, ref = _arch(source), _arch(reference)
    differ = f"Inputs have different architectures: {source.label} is {arch[0]} {list(arch[1])}, "
    differ += f"{reference.label} is {ref[0]} {list(ref[1])}"
    if arch[1] or arch[0] != ref[0]:
        raise MergeError(differ + ".")
    config = source.path / ("adapter_config.json" if source.is_adapter else "config.json")
    mismatch = _tensor_mismatch(source, reference)
    if mismatch:
        raise MergeError(f"{differ}: {config} has no `architectures` and {mismatch}.")
    warnings.warn(
        f"{config} has no `architectures`; merging it as {list(ref[1])} like {reference.label}, "
        f"since its model_type ({arch[0]}) and its tensor names and shapes match.",
        stacklevel=4,
    )


def _tensor_mismatch(source: ModelSource, reference: ModelSource) -> str | None:
    """The first tensor (name or shape) in which ``source`` differs from ``reference``; the LM head's tying aside."""
    mine = {n: i.shape for n, i in source.tensors.items() if n != LM_HEAD}
    theirs = {n: i.shape for n, i in reference.tensors.items() if n != LM_HEAD}
    for name in sorted(mine.keys() ^ theirs.keys()):
        where = source.label if name in mine else reference.label
        return f"tensor {name!r} is only in {where}"
    for name in sorted(mine):
        if tuple(mine[name]) != tuple(theirs[name]):
            return f"tensor {name!r} is {list(mine[name])} there but {list(theirs[name])} in {reference.label}"
    return None


def check_alike(name: str, infos: list[TensorInfo]) -> None:
    """Every input holds ``name`` with the same shape and kind (and the same dtype for non-floats)."""
    ref = infos[-1]
    for info in infos:
        if info.shape != ref.shape:
            raise MergeError(
                f"Shape mismatch for tensor {brief(name)}: {list(info.shape)} in {info.file} "
                f"but {list(ref.shape)} in {ref.file}."
            )
        if info.is_float != ref.is_float or (not ref.is_float and info.dtype != ref.dtype):
            raise MergeError(f"Tensor {brief(name)} is {info.dtype} in {info.file} but {ref.dtype} in {ref.file}.")
