"""What a sweep tries: rule specs, the alpha grid, the inputs of a run, and each candidate planned from the headers.

Torch-free, like the merger it plans with: the command line checks rules and alphas here before torch loads.
"""

from __future__ import annotations

import numbers
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ... import averaging
from ...averaging.registry import users_of
from ...errors import InputError, brief


__all__ = ["Candidate", "expand_alphas", "parse_rule", "sweep_inputs"]

_STEP = re.compile(r"^(?:checkpoint|step)-(\d+)$")


def _parsed(spec: str) -> tuple[str, dict[str, Any]]:
    """``(rule name, spec parameters)`` of a sweep spec, refused in the sweep's words."""
    valid = ", ".join(averaging.spec_forms())
    try:
        return averaging.parse_spec(spec)
    except averaging.UnknownRuleError:
        raise InputError(f"Unknown sweep rule {brief(spec)}; valid rules: {valid}.") from None
    except averaging.RuleError as e:
        raise InputError(f"Rule {brief(spec)}: {str(e).rstrip('.')}; valid rules: {valid}.") from None


def parse_rule(spec: str) -> dict:
    """The `pmakit.merge` keywords of a rule spec: ``ema``, ``ema:0.1``, ``decay:SHAPE``.

    The spec is parsed by `pmakit.averaging.parse_spec` and its parameters checked by the rule. Parameters
    that are merge settings (``alpha``, ``decay_shape``) become keywords; a spec with others
    (``ema_halflife:0.25``, ``bema:lag=20``) is passed whole as ``algo``, which the merge parses again.

    Raises:
        InputError: the rule is unknown or cannot be swept (``weights``), or a parameter is refused (the
            message lists the valid rules).
    """
    algo, params = _parsed(spec)
    from ...merging.options import option_fields

    if set(params) - {f.name for f in option_fields()}:
        return {"algo": spec}
    return {"algo": algo, **params}


def _checked_alphas(alphas: Iterable[float]) -> list[float]:
    """The grid's alphas as floats, each once, in the order given (a list, a tuple, a numpy array...)."""
    values = None if isinstance(alphas, (str, bytes)) or not isinstance(alphas, Iterable) else list(alphas)
    if not values:
        raise InputError(f"`alphas` must be a non-empty list of numbers, got {brief(alphas)}.")
    for alpha in values:
        if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool):
            raise InputError(f"`alphas` must hold numbers in (0, 1), got {brief(alpha)}.")
    return list(dict.fromkeys(float(a) for a in values))


def _with_alpha(spec: str, name: str, alpha: float) -> str:
    """``ema`` -> ``ema:0.1`` (alpha is the rule's first spec value), else ``...,alpha=0.1``."""
    first = next((p.name for p in averaging.rule_class(name).params if p.parse is not None), None)
    if ":" not in spec and first == "alpha":
        return f"{spec}:{alpha!r}"
    return f"{spec}{',' if ':' in spec else ':'}alpha={alpha!r}"


def expand_alphas(rules: Sequence[str], alphas: Iterable[float] | None) -> list[str]:
    """The rule specs of a grid: a spec of a rule with an ``alpha`` it does not give, once per alpha.

    ``["sma", "ema"]`` with alphas ``[0.1, 0.2]`` gives ``sma``, ``ema:0.1``, ``ema:0.2``; specs that
    give their alpha (``ema:0.3``) and rules without one stay as written. ``alphas=None``: the rules as given.

    Raises:
        InputError: a bad spec or alpha, or no rule that takes an alpha (``ema``, ``ema_corrected``).
    """
    if alphas is None:
        return list(rules)
    grid = _checked_alphas(alphas)
    specs, expanded = [], False
    for spec in rules:
        name, params = _parsed(spec)
        if "alpha" in params or "alpha" not in averaging.rule_class(name).param_names():
            specs.append(spec)
            continue
        expanded = True
        for alpha in grid:
            specs.append(_with_alpha(spec, name, alpha))
            _parsed(specs[-1])  # the rule checks each alpha: (0, 1)
    if not expanded:
        users = ", ".join(users_of("alpha"))
        raise InputError(f"`alphas` sweeps the rules that take an alpha ({users}) without one; no rule here does.")
    return specs


@dataclass(frozen=True)
class Candidate:
    """One merge to try: a rule spec (see `parse_rule`) over the newest ``window`` inputs."""

    rule: str
    window: int


def step_of(folder: Path) -> int | None:
    """The training step a ``checkpoint-N`` / ``step-N`` folder name gives (None for other names)."""
    match = _STEP.match(folder.name)
    return int(match.group(1)) if match else None


def _numbered(folder: Path, pattern: str) -> list[Path]:
    found = [p for p in folder.glob(pattern) if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of)


def sweep_inputs(inputs: Sequence[str | os.PathLike] | str | os.PathLike, source: str = "auto") -> list[Path]:
    """The model folders a sweep chooses from, oldest first.

    Args:
        inputs: A run folder, or model folders oldest first.
        source: For a run folder: ``samples`` (``pma-samples/step-N``), ``checkpoints`` (``checkpoint-N``)
            or ``auto`` (samples when the run stored any, else checkpoints).

    Raises:
        InputError: nothing to sweep, a missing folder or an unknown ``source``.
    """
    if source not in ("auto", "samples", "checkpoints"):
        raise InputError(f"`source` must be auto, samples or checkpoints, got {brief(source)}.")
    paths = [Path(inputs)] if isinstance(inputs, (str, os.PathLike)) else [Path(p) for p in inputs]
    for path in paths:
        if not path.is_dir():
            raise InputError(f"Sweep input {path} is not a folder.")
    if len(paths) > 1:
        return paths
    run = paths[0]
    samples = _numbered(run / "pma-samples", "step-*")
    checkpoints = _numbered(run, "checkpoint-*")
    chosen = {"samples": samples, "checkpoints": checkpoints, "auto": samples or checkpoints}[source]
    if not chosen:
        raise InputError(
            f"Run folder {run} holds no {'pma-samples/step-N' if source == 'samples' else 'checkpoint-N'} folders."
        )
    return chosen


def candidates(
    rules: Sequence[str], windows: Sequence[int], n_inputs: int, alphas: Iterable[float] | None = None
) -> list[Candidate]:
    """Every (rule spec, window) pair, rules first, each spec and window once; checked before any merge."""
    if not rules or not windows:
        raise InputError("A sweep needs at least one rule and one window.")
    specs = expand_alphas(rules, alphas)
    for rule in specs:
        parse_rule(rule)
    for window in windows:
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise InputError(f"Window {brief(window)} must be a positive number of inputs.")
        if window > n_inputs:
            raise InputError(f"Window {window} is longer than the {n_inputs} inputs available.")
    return [Candidate(r, w) for r in dict.fromkeys(specs) for w in sorted(set(windows))]


def candidate_settings(candidate: Candidate, alpha: float | None, options: dict) -> dict:
    """The `pmakit.merge` settings of one candidate: the sweep's options, its alpha unless the spec gives one."""
    rule = parse_rule(candidate.rule)
    name = averaging.parse_spec(candidate.rule)[0]
    uses_alpha = alpha is not None and "alpha" in averaging.rule_class(name).param_names()
    return {**options, **({"alpha": alpha} if uses_alpha else {}), **rule}


def plan_candidates(inputs: list[Path], chosen: list[Candidate], alpha: float | None, options: dict) -> list:
    """Plan every candidate from the headers: a bad setting or input fails before the first merge.

    Each plan's ``rule`` is the rule the merge will use, with every parameter resolved (defaults included).
    """
    from ...merging import plan_merge

    return [plan_merge(inputs[-c.window :], **candidate_settings(c, alpha, options)) for c in chosen]
