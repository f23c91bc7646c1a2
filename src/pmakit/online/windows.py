"""Merge schedules: which samples each scheduled merge averages, and the checks of their settings.

A schedule merges at chosen optimizer steps ``s`` (``merge_steps``), each over the samples taken in
``(s - merge_window, s]``; samples are still taken every ``interleave_step`` steps, so every window
holds ``merge_window / interleave_step`` samples, known before training. ``"wsd"`` stands for one
merge right before a warmup-stable-decay schedule's decay, resolved when training starts (the
Trainer's arguments say where the decay begins). Windows may overlap; each open window costs one
fp32 accumulator, plus one fp32 copy per anchor of the rule (`Rule.anchors`: ``bema`` keeps
``theta0``, so two copies), and the copies open at once are bounded (``merge_max_open``).

Pure Python: `PmaConfig` checks the settings with these functions, the engine's windows
(`pmakit.online.schedule`) and the training glue read the plan.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..averaging import RuleError, parse_spec, rule_class
from ..errors import InputError, brief


__all__ = ["WSD", "MergePlan", "checked_plan"]

WSD = "wsd"
"""The ``merge_steps`` value that merges the stable phase right before a WSD schedule's decay."""

Name = Callable[[str], str]


@dataclass(frozen=True)
class MergePlan:
    """Merges at optimizer steps ``ends``, each averaging the samples in ``(end - window, end]``."""

    ends: tuple[int, ...]
    window: int
    every: int

    @property
    def size(self) -> int:
        """Samples per window."""
        return self.window // self.every

    def sample_steps(self, end: int) -> list[int]:
        """The optimizer steps of the samples the merge at ``end`` averages, oldest first."""
        return list(range(end - self.window + self.every, end + 1, self.every))

    def position(self, end: int, step: int) -> int:
        """Which sample of the window ending at ``end`` the one at ``step`` is (from 1)."""
        return (step - end + self.window) // self.every

    def open_at(self, step: int) -> tuple[int, ...]:
        """The ends of the windows that take the sample at ``step`` (``end - window < step <= end``)."""
        if step % self.every:
            return ()
        return self.ends[bisect_left(self.ends, step) : bisect_left(self.ends, step + self.window)]

    def most_open(self) -> tuple[int, ...]:
        """The largest group of windows open at once: at a merge, those that end within ``window`` after it."""
        return max((self.open_at(end) for end in self.ends), key=len, default=())

    def describe(self) -> str:
        """The plan as stored with the accumulators: a resumed run with another plan drops them."""
        return f"merge_steps={list(self.ends)}; merge_window={self.window}; interleave_step={self.every}"


def checked_plan(
    ends: list[int], window: int, every: int, start_step: int, max_open: int, name: Name, anchors: Sequence[str] = ()
) -> MergePlan:
    """The plan, refused (`InputError` naming the settings ``name`` gives) where a window cannot be filled or
    its open windows would keep more fp32 copies than ``max_open``.

    Args:
        ends: The merge steps, sorted and unique.
        window: Optimizer steps each merge averages over.
        every: ``interleave_step``, the steps between samples.
        start_step: No sample is taken at or before this step.
        max_open: The most fp32 copies of the trainable weights the open windows may keep at once.
        name: How a message calls a setting (``name("merge_window")`` -> ```pma_merge_window```).
        anchors: The rule's anchors (`Rule.anchors`): each open window keeps one more fp32 copy per anchor.
    """
    _check_ends(ends, every, name)
    first = ends[0]
    if first - window < start_step:
        raise InputError(
            f"The window of the merge at step {first} would start at step {first - window} "
            f"({name('merge_window')}={window}), before {name('start_step')}={start_step}: every window must lie "
            "after it, so that all its samples are taken."
        )
    plan = MergePlan(tuple(ends), window, every)
    group = plan.most_open()
    each = 1 + len(anchors)
    if len(group) * each > max_open:
        windows = f"{len(group)} window{'s' * (len(group) > 1)}"
        raise InputError(
            f"{name('merge_steps')} with {name('merge_window')}={window} keeps {windows} open at once (the merges "
            f"at steps {', '.join(map(str, group))}), each {_copies(anchors)}: {len(group) * each} fp32 copies in "
            f"all; {name('merge_max_open')}={max_open} allows {max_open}: space the merges {window} steps apart, "
            f"shorten the window, or raise {name('merge_max_open')}."
        )
    return plan


def _copies(anchors: Sequence[str]) -> str:
    if not anchors:
        return "an fp32 copy of the trainable weights"
    kept = ", ".join(anchors)
    return f"{1 + len(anchors)} fp32 copies of the trainable weights (its average and the rule's anchors: {kept})"


def _check_ends(ends: list[int], every: int, name: Name) -> None:
    key = name("merge_steps")
    if not isinstance(ends, list) or not ends:
        raise InputError(f"{key} must be a list of optimizer steps or {brief(WSD)}; got {brief(ends)}.")
    for step in ends:
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise InputError(f"{key} must hold positive integers (optimizer steps); got {brief(step)}.")
    off = [step for step in ends if step % every]
    if off:
        raise InputError(
            f"{key} must be multiples of {name('interleave_step')}={every} (a sample is taken every {every} steps, "
            f"and a merge ends on one); got {brief(off)}."
        )
    for before, after in zip(ends, ends[1:], strict=False):
        if after <= before:
            raise InputError(f"{key} must be sorted and unique; got step {after} after step {before}.")


# ------------------------------------------------------------------ settings (see `PmaConfig`)
def merge_steps_value(value: Any) -> Any:
    """``"wsd"``, ``["wsd"]`` -> ``"wsd"``; ``"100,200"``, ``["100", "200"]``, ``100`` -> a list of ints."""
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    elif isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return value
    if len(value) == 1 and isinstance(value[0], str) and value[0].strip().lower() == WSD:
        return WSD
    return [int(v) if isinstance(v, str) and v.strip().isdigit() else v for v in value]


def check_merge_steps(key: str, values: Mapping[str, Any], name: Name) -> None:
    steps = values[key]
    if steps is not None and steps != WSD:
        _check_ends(steps, values["interleave_step"], name)


def check_merge_window(key: str, values: Mapping[str, Any], name: Name) -> None:
    window, every = values[key], values["interleave_step"]
    if values["merge_steps"] is None:
        if window is not None:
            raise InputError(f"{name(key)} is only used with {name('merge_steps')}; got {brief(window)}.")
        return
    if window is None:
        raise InputError(
            f"{name('merge_steps')} needs {name(key)}: the optimizer steps each merge averages over, a multiple of "
            f"{name('interleave_step')}={every}."
        )
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise InputError(f"{name(key)} must be a positive integer (optimizer steps); got {brief(window)}.")
    if window % every:
        raise InputError(
            f"{name(key)} must be a multiple of {name('interleave_step')}={every}, so that every window holds the "
            f"same number of samples; got {window}."
        )


def check_merge_max_open(key: str, values: Mapping[str, Any], name: Name) -> None:
    """The bound on open windows, the plan of a list of steps, and the settings a schedule cannot go with."""
    limit = values[key]
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise InputError(f"{name(key)} must be a positive integer; got {brief(limit)}.")
    steps = values["merge_steps"]
    if steps is None:
        return
    _check_companions(values, name)
    start = values["start_step"]
    if steps != WSD and isinstance(start, int):
        anchors = _anchors_of(values["fused_algo"]) if isinstance(values.get("fused_algo"), str) else ()
        checked_plan(steps, values["merge_window"], values["interleave_step"], start, limit, name, anchors)


_REFUSED = (
    ("write_back", lambda v: v is True, "continues training from each cycle's merge, and a schedule has no cycles"),
    ("offload", lambda v: v == "cpu", "is not supported with a schedule: the windows are kept beside the weights"),
    ("export", lambda v: v == "async", "is not supported with a schedule: scheduled merges are written synchronously"),
    (
        "eval_lm_eval_tasks",
        bool,
        "is not supported with a schedule: scheduled merges are scored by the Trainer's evaluation only",
    ),
)


def _anchors_of(spec: str) -> tuple[str, ...]:
    try:
        return rule_class(parse_spec(spec)[0]).anchors
    except RuleError:  # a bad spec is named by its own check
        return ()


def _check_companions(values: Mapping[str, Any], name: Name) -> None:
    for key, refused, why in _REFUSED:
        if refused(values.get(key)):
            raise InputError(
                f"{name(key)}={brief(values[key])} {why}: unset it or {name('merge_steps')} "
                f"(got {name('merge_steps')}={brief(values['merge_steps'])})."
            )


def window_cycle(values: Mapping[str, Any]) -> Mapping[str, Any]:
    """Under a schedule, the settings a rule is checked with: a cycle is one window (its first, for a list)."""
    steps, window = values.get("merge_steps"), values.get("merge_window")
    if steps is None or not isinstance(window, int) or window < 1:
        return values
    every = values["interleave_step"]
    first = {"start_step": steps[0] - window} if steps != WSD else {}
    return {**values, "fused_num": max(1, window // every), **first}
