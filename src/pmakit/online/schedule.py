"""The open windows of a merge schedule: one fp32 accumulator each, folded after every engine sample.

`MergeWindows` is an engine fold handler (`PmaEngine.add_fold_handler`): after each sample it folds
the live weights into every window that takes that sample, with the configured rule's running
form over the window (``avg <- avg + c_k (x_k - avg)``, ``k`` the sample's place in the window),
and when a window's last sample is in it hands the merge over (`take_ready`) and frees it. A rule
with anchors (`Rule.anchors`, ``bema``'s ``theta0``) gets one more fp32 copy per anchor in each
window, set to the window's first sample, and its `Rule.finish` correction is applied when the last
sample is folded (`fold_sample`, as the engine does for a cycle), so a merge is the rule's closed form.

Where the state lives. The accumulators (and anchors) are kept beside the optimizer, and saved *with*
it: the optimizer's state dict carries them in ``param_groups[0]["pma_windows"]`` (keyed by the parameter's
position in the optimizer's order, like the engine's pending averages), which ``load_state_dict``
restores verbatim and uncast; `MergeWindows` takes them back when attached (or on a later load). A
Trainer checkpoint therefore resumes a window exactly. This holds for one process and for DDP
(every rank holds the same replicated copy; rank 0's is saved); sharded optimizers (FSDP, DeepSpeed)
are refused by the training glue.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .config import PmaConfig
from .counters import cycle_settings
from .slots import fold_sample
from .windows import MergePlan


__all__ = ["STATE_KEY", "Merge", "MergeWindows"]

STATE_KEY = "pma_windows"


@dataclass
class _Window:
    """One open window: its fp32 accumulators and anchors, grouped by (device, dtype) as the fold kernel wants them.

    ``anchors[g][i]`` holds group ``g``'s copies of the rule's ``i``-th anchor.
    """

    count: int
    params: list[list[torch.Tensor]]
    accs: list[list[torch.Tensor]]
    anchors: list[list[list[torch.Tensor]]]
    caches: list[dict] = field(default_factory=list)

    def pairs(self, which: int | None = None) -> dict[torch.Tensor, torch.Tensor]:
        """``{param: accumulator}`` (``which``: ``{param: copy of the anchor which}``)."""
        tensors = self.accs if which is None else [anchors[which] for anchors in self.anchors]
        return {p: a for ps, ts in zip(self.params, tensors, strict=True) for p, a in zip(ps, ts, strict=True)}


@dataclass
class Merge:
    """A finished window: ``averages`` maps each averaged parameter to its fp32 merge."""

    step: int
    sample_steps: list[int]
    averages: dict[torch.Tensor, torch.Tensor]


class MergeWindows:
    """The windows of ``plan`` on ``optimizer``'s trainable parameters, merged with ``config``'s rule.

    Memory: ``1 + len(rule.anchors)`` fp32 copies of the trainable weights per open window, at most
    ``len(plan.most_open())`` windows.

    Args:
        optimizer: The (unwrapped) optimizer whose parameters are averaged and whose state dict carries the windows.
        plan: Which samples each merge averages.
        config: The PMA settings; their rule's running form is applied over each window of ``plan.size`` samples.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, plan: MergePlan, config: PmaConfig) -> None:
        self.optimizer, self.plan, self.rule = optimizer, plan, config.rule
        self.settings = f"{plan.describe()}; {cycle_settings(config)}"  # what the saved windows were taken under
        self.open: dict[int, _Window] = {}
        self.ready: list[Merge] = []
        self.skipped: set[int] = set()  # merges whose window missed samples
        self._hooks = [
            optimizer.register_state_dict_post_hook(self._after_save),
            optimizer.register_load_state_dict_post_hook(self._after_load),
        ]
        self._after_load(optimizer)  # a checkpoint loaded before the windows were attached

    def detach(self) -> None:
        """Stop saving and loading with the optimizer (the windows are dropped)."""
        for hook in self._hooks:
            hook.remove()
        self.open.clear()

    # ------------------------------------------------------------------ folding
    def __call__(self, engine, step: int) -> None:
        """The engine's fold handler: fold the live weights into each window that takes the sample at ``step``."""
        for end in self.plan.open_at(step):
            self._fold(end, step)

    @torch.no_grad()
    def _fold(self, end: int, step: int) -> None:
        k, window = self.plan.position(end, step), self.open.get(end)
        if end in self.skipped:
            return
        if k == 1:
            window = self.open[end] = self._new_window()
        elif window is None or window.count != k - 1:
            self._drop(end, step, 0 if window is None else window.count, k)
            return
        steps = self.plan.sample_steps(end)
        c = self.rule.coefficient(k, self.plan.size, steps[:k])
        factors = self.rule.finish_factors(k, steps[:k]) if step == end else []
        for params, accs, anchors, cache in zip(
            window.params, window.accs, window.anchors, window.caches, strict=True
        ):
            fold_sample(accs, params, c, cache, anchors, start=k == 1, finish=factors)
        window.count = k
        if step == end:
            del self.open[end]
            self.ready.append(Merge(end, self.plan.sample_steps(end), window.pairs()))

    def _drop(self, end: int, step: int, count: int, k: int) -> None:
        """A window that missed samples (resumed from a checkpoint without it) would be a wrong merge: skip it."""
        self.open.pop(end, None)
        self.skipped.add(end)
        warnings.warn(
            f"PMA: the window of the merge at step {end} holds {count} sample(s) where the sample at step {step} "
            f"should be number {k} (a checkpoint without its window was resumed?); that merge is skipped.",
            UserWarning,
            stacklevel=4,
        )

    def _new_window(self) -> _Window:
        groups: dict[tuple, list[torch.Tensor]] = {}
        for p in self._averaged():
            groups.setdefault((p.device, p.dtype), []).append(p)
        params = list(groups.values())
        accs = [[torch.empty_like(p, dtype=torch.float32) for p in ps] for ps in params]
        anchors = [
            [[torch.empty_like(p, dtype=torch.float32) for p in ps] for _ in self.rule.anchors] for ps in params
        ]
        return _Window(0, params, accs, anchors, [{} for _ in params])

    def _averaged(self) -> list[torch.Tensor]:
        """The trainable parameters in the optimizer's order (what the engine averages)."""
        return [p for p in self._flat() if p.requires_grad]

    def _flat(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def take_ready(self) -> list[Merge]:
        """The merges finished since the last call, oldest first (their accumulators are the caller's now)."""
        ready, self.ready = self.ready, []
        return ready

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The open windows: ``{"settings": ..., "open": {end: {"count": k, "tensors": {position: acc}}}}``; a rule
        with anchors adds ``"anchors": {anchor: {position: copy}}`` to each window."""
        position = {id(p): i for i, p in enumerate(self._flat())}

        def by_position(pairs: dict[torch.Tensor, torch.Tensor]) -> dict[int, torch.Tensor]:
            return {position[id(p)]: t for p, t in pairs.items()}

        open_windows = {}
        for end, w in self.open.items():
            entry = open_windows[str(end)] = {"count": w.count, "tensors": by_position(w.pairs())}
            if self.rule.anchors:
                entry["anchors"] = {a: by_position(w.pairs(i)) for i, a in enumerate(self.rule.anchors)}
        return {"settings": self.settings, "open": open_windows}

    def load_state_dict(self, state: dict) -> None:
        """Restore open windows saved by `state_dict`; those taken under other settings are dropped with a warning."""
        self.open.clear()
        saved = state.get("open", {})
        if saved and state.get("settings") != self.settings:
            warnings.warn(
                f"PMA: the checkpoint's open merge windows (ending at steps {', '.join(saved)}) were taken under "
                f"other settings ({state.get('settings')}), not {self.settings}: they are dropped, and those merges "
                "skipped.",
                UserWarning,
                stacklevel=3,
            )
            return
        flat = self._flat()

        def restore(pairs: dict[torch.Tensor, torch.Tensor], saved_tensors: dict) -> None:
            tensors = {id(flat[int(i)]): t for i, t in saved_tensors.items()}
            for p, target in pairs.items():
                target.copy_(tensors[id(p)])

        for end, entry in saved.items():
            window = self._new_window()
            restore(window.pairs(), entry["tensors"])
            for i, anchor in enumerate(self.rule.anchors):
                restore(window.pairs(i), entry["anchors"][anchor])
            window.count = int(entry["count"])
            self.open[int(end)] = window

    def _after_save(self, optimizer, state_dict: dict) -> dict:
        if self.open:
            first = state_dict["param_groups"][0]
            state_dict["param_groups"][0] = {**first, STATE_KEY: self.state_dict()}
        return state_dict

    def _after_load(self, optimizer) -> None:
        """``load_state_dict`` put the saved windows in ``param_groups[0]`` verbatim: take them from there."""
        state = optimizer.param_groups[0].pop(STATE_KEY, None)
        if state is not None:
            self.load_state_dict(state)

    # ------------------------------------------------------------------ reading a merge
    @contextmanager
    def swapped(self, merge: Merge) -> Iterator[None]:
        """Put ``merge``'s weights into the live parameters, then restore them bit for bit (for evaluation)."""
        params = list(merge.averages)
        backups = [p.detach().clone() for p in params]
        with torch.no_grad():
            torch._foreach_copy_(params, list(merge.averages.values()))
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, backups)
