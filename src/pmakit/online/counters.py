"""The engine's counters and the settings they were taken under, kept in the optimizer's first param group.

The counters (optimizer steps seen, samples in the current cycle, the steps they were taken at, cycles
completed, the steps of the last merge) sit in ``optimizer.param_groups[0]["pma"]``, which
``load_state_dict`` restores verbatim, so they resume with the optimizer on every backend. They are
scalars only (step lists as ``"2,4,6"``): sharded loaders (DCP under FSDP2) flatten param_groups
against the live optimizer's and cannot grow a list.

Resuming with other settings. The counters also record the settings that shape a cycle
(``fused_algo``, ``fused_num``, ``interleave_step``, ``start_step``, and ``ema_alpha`` /
``fused_weights`` where the rule uses them). When a checkpoint is resumed under different ones, the
cycle in progress was taken under rules that no longer hold: its samples are dropped with a warning
that names the old and new values, completed merges (``pma-<step>`` folders) are kept, and fresh
cycles start under the new settings at the next sample step. Other settings (``write_back``,
``eval``, ``offload``, saving) may change freely.

Resuming a checkpoint written without PMA. Its optimizer state has no counters; the step count then
starts from the optimizer's own (Adam's per-parameter ``step``) when it has one, and `PmaCallback`
seeds it from the Trainer's ``global_step`` otherwise, so sample steps and ``pma-<step>`` names
follow the real optimizer step, not the steps since PMA was switched on.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import fields

import torch

from .config import PmaConfig


__all__ = ["COUNTERS_KEY", "Counters", "cycle_settings"]

logger = logging.getLogger(__name__)

COUNTERS_KEY = "pma"
SETTINGS_KEY = "settings"
_RULES_WITHOUT_ALPHA = ("sma", "wma", "weights")


class Counters:
    """The counters of the engine on ``optimizer``, read from (and written to) its first param group.

    The group's dict is looked up on every access: ``load_state_dict`` replaces the param groups.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: PmaConfig) -> None:
        self.optimizer = optimizer
        self.config = config

    @property
    def stored(self) -> bool:
        """Whether the optimizer carries counters (written by an engine, or restored from a checkpoint)."""
        return COUNTERS_KEY in self.optimizer.param_groups[0]

    def raw(self) -> dict:
        """The counters as stored, created (all zero) on first use."""
        group = self.optimizer.param_groups[0]
        raw = group.get(COUNTERS_KEY)
        if raw is None:
            raw = group[COUNTERS_KEY] = {
                "step": 0, "count": 0, "sample_steps": "", "cycles": 0, "merged_steps": "",
                SETTINGS_KEY: cycle_settings(self.config),
            }  # fmt: skip
        return raw

    def decoded(self) -> dict:
        """A copy with the step lists as lists of ints and without the settings string."""
        raw = self.raw()
        return {
            **{key: value for key, value in raw.items() if key != SETTINGS_KEY},
            "sample_steps": split_steps(raw["sample_steps"]),
            "merged_steps": split_steps(raw["merged_steps"]),
        }

    def sample_steps(self) -> list[int]:
        """The optimizer steps of the current cycle's samples."""
        return split_steps(self.raw()["sample_steps"])

    def has_average(self) -> bool:
        """Whether the average holds anything (a sample this cycle, or the merge of the last cycle)."""
        raw = self.raw()
        return raw["count"] > 0 or bool(raw["merged_steps"])

    def count_step(self) -> int:
        """One more real optimizer step; returns its number."""
        raw = self.raw()
        raw["step"] += 1
        return raw["step"]

    def add_sample(self, step: int) -> None:
        """A sample taken at optimizer ``step`` is folded in."""
        raw = self.raw()
        raw["count"] += 1
        raw["sample_steps"] = join_steps([*split_steps(raw["sample_steps"]), step])

    def mark_merged(self) -> None:
        """The cycle's samples now make the merge (read by `has_average` after the cycle restarts)."""
        raw = self.raw()
        raw["merged_steps"] = join_steps(split_steps(raw["sample_steps"]))

    def restart_cycle(self) -> None:
        """A cycle ended: count it and start the next one empty."""
        raw = self.raw()
        raw.update(cycles=raw["cycles"] + 1, count=0, sample_steps="")

    def start_at(self, step: int) -> None:
        """Count from ``step`` when nothing was counted yet (a resume from a checkpoint written without PMA).

        Counters restored from a PMA checkpoint are left as they are.
        """
        raw = self.raw()
        if raw["step"] == 0 and raw["count"] == 0 and raw["cycles"] == 0 and step > 0:
            raw["step"] = int(step)

    def start_at_optimizer_steps(self) -> None:
        """After loading a checkpoint without counters: count from the optimizer's own steps (module docstring)."""
        self.start_at(optimizer_steps(self.optimizer))

    def reconcile(self) -> None:
        """After a checkpoint's counters are restored: end a cycle taken under other settings (module docstring)."""
        raw = self.optimizer.param_groups[0][COUNTERS_KEY]
        current, stored = cycle_settings(self.config), raw.get(SETTINGS_KEY)
        if stored == current:
            return
        raw[SETTINGS_KEY] = current
        unknown = stored is None  # a checkpoint written before the settings were recorded
        if raw["count"] == 0 or (unknown and raw["count"] < self.config.fused_num):
            if not unknown:
                logger.info("PMA: resumed between cycles; new cycles use %s (was %s).", current, stored)
            return
        dropped = split_steps(raw["sample_steps"])
        changed = describe_change(stored, current) if not unknown else f"settings unknown, now {current}"
        warnings.warn(
            f"PMA: the checkpoint's unfinished cycle was taken under other settings ({changed}). Its "
            f"{len(dropped)} sample(s) at optimizer steps {', '.join(map(str, dropped))} are dropped; completed "
            "merges are kept, and new cycles start under the new settings at the next sample step.",
            UserWarning,
            stacklevel=3,
        )
        raw.update(count=0, sample_steps="", merged_steps="")  # the average holds no merge until the next sample


def optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    """The steps a restored optimizer has taken by its own count (Adam's per-parameter ``step``), else 0."""
    steps = [entry["step"] for entry in optimizer.state.values() if isinstance(entry, dict) and "step" in entry]
    return max((int(step.item() if torch.is_tensor(step) else step) for step in steps), default=0)


def cycle_settings(config: PmaConfig) -> str:
    """The settings that shape a cycle, as stored with the counters: ``"fused_algo=ema; fused_num=4; ..."``.

    Rule parameters come from the averaging rule itself, so a rule parameter added later is covered
    too (when it differs from its default); ``ema_alpha`` is left out for the rules that do not use it.
    """
    rule = config.rule
    items = {
        "fused_algo": config.fused_algo,
        "fused_num": config.fused_num,
        "interleave_step": config.interleave_step,
        "start_step": config.start_step,
    }
    for f in fields(rule):
        value = getattr(rule, f.name)
        if f.name == "alpha":
            if rule.algo in _RULES_WITHOUT_ALPHA:
                continue
        elif f.name == "algo" or value is None or value == f.default:
            continue
        name = {"alpha": "ema_alpha", "weights": "fused_weights"}.get(f.name, f.name)
        items[name] = list(value) if isinstance(value, tuple) else value
    return "; ".join(f"{key}={value}" for key, value in items.items())


def describe_change(old: str, new: str) -> str:
    """``"fused_num=4 -> 2, fused_algo=sma -> ema"``: only the settings that differ."""
    before = dict(part.split("=", 1) for part in old.split("; ") if "=" in part)
    after = dict(part.split("=", 1) for part in new.split("; ") if "=" in part)
    keys = [*after, *(k for k in before if k not in after)]
    changed = [k for k in keys if before.get(k) != after.get(k)]
    return ", ".join(f"{k}={before.get(k, '(unset)')} -> {after.get(k, '(unset)')}" for k in changed)


def join_steps(steps: list[int]) -> str:
    return ",".join(str(int(t)) for t in steps)


def split_steps(stored: str | list) -> list[int]:
    if isinstance(stored, (list, tuple)):  # a checkpoint written before steps were stored as text
        return [int(t) for t in stored]
    return [int(t) for t in stored.split(",") if t]
