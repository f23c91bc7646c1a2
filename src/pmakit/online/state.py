"""Where each parameter's average lives, and how it is saved and loaded with the optimizer's state.

Per parameter ``p`` the average is ``optimizer.state[p]["pma_avg"]`` (fp32, allocated at the first
optimizer step, like the optimizer's own state); a rule that keeps anchors (``bema``: ``theta_0``)
keeps one more fp32 tensor per anchor exactly like the average (`pmakit.online.slots`). Every backend
the Trainer supports saves and restores optimizer state, and shards it like the parameters, so the
average survives checkpoint/resume for free.

Parameters the optimizer has not stepped yet (no gradient so far: an MoE expert not routed to, an
adapter switched on late, a head used by some losses only) are averaged like every other weight, but
their tensors are kept *beside* the optimizer state until the optimizer creates that state: Adam,
Adafactor and most others initialise a parameter's state only while it is empty, and Adam's
``__setstate__`` expects its ``step`` in any non-empty state. The saved state dict carries those in
``param_groups[0]["pma_avg_pending"]`` (``<key>_pending`` for anchors; keyed by the parameter's
position in the optimizer's order), which a plain ``load_state_dict`` restores verbatim without
showing them to the optimizer; the store takes them back on load, or when the engine is attached
after the load (as `PmaCallback` is).

``Optimizer.load_state_dict`` casts floating state to the parameter's dtype: the load hooks take the
engine's tensors out of the state dict before it does and put them back in fp32 (bf16/fp16 models).
"""

from __future__ import annotations

import torch

from ..errors import TrainingError
from .offload import moved_average, placement
from .slots import AVG_KEY, is_slot_key, pending_key, pop_pending


__all__ = ["SlotStore", "has_optimizer_state"]


def has_optimizer_state(state: dict | None) -> bool:
    """Whether the optimizer has created ``state`` (anything there besides the average and anchors)."""
    return bool(state) and any(not is_slot_key(key) for key in state)


class SlotStore:
    """The engine's tensors (``keys``: the average, then the rule's anchors) per parameter of ``optimizer``.

    Args:
        optimizer: The optimizer whose state holds the tensors.
        keys: The state keys kept per parameter (`slots.slot_keys`).
        offload: Whether the tensors live in CPU memory (``offload="cpu"``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, keys: tuple[str, ...], offload: bool) -> None:
        self.optimizer, self.keys, self.offload = optimizer, keys, offload
        # Always in the optimizer state: ZeRO's fp32 partitions are stepped before the engine allocates.
        self.in_state = False
        # Tensors of parameters whose optimizer state is still empty: {param: {key: tensor}}.
        self.unstepped: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        self._stashed: dict = {}

    def stored(self, p: torch.Tensor, key: str = AVG_KEY) -> torch.Tensor | None:
        """``p``'s tensor ``key``, in its optimizer state or beside it (None before it is allocated)."""
        state = self.optimizer.state.get(p)
        avg = state.get(key) if state else None
        return self.unstepped.get(p, {}).get(key) if avg is None else avg

    def keep(self, p: torch.Tensor, key: str, avg: torch.Tensor) -> None:
        """Store ``p``'s tensor in its optimizer state if the optimizer has created it, else beside it.

        An optimizer that finds a non-empty state takes it for its own (Adam would skip initialising it).
        """
        if self.in_state or has_optimizer_state(self.optimizer.state.get(p)):
            self.optimizer.state[p][key] = avg
            kept = self.unstepped.pop(p, {})
            kept.pop(key, None)
            if kept:
                self.unstepped[p] = kept
        else:
            self.unstepped.setdefault(p, {})[key] = avg

    def adopt_stepped(self) -> None:
        """Move the tensors of parameters the optimizer has stepped since into their optimizer state.

        A loop over those parameters only (none in most models); the tensors stay the same objects, so
        the engine's kernel groups stay valid.
        """
        for p in [p for p in self.unstepped if has_optimizer_state(self.optimizer.state.get(p))]:
            self.optimizer.state[p].update(self.unstepped.pop(p))

    def flat_params(self) -> list[torch.Tensor]:
        """The optimizer's parameters in its order: the positions used by its state dict."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    # ------------------------------------------------------------------ save
    def add_pending(self, state_dict: dict) -> dict:
        """Save the tensors of parameters without optimizer state in ``param_groups[0]``, never as their state."""
        if not self.unstepped:
            return state_dict
        position = {id(p): i for i, p in enumerate(self.flat_params())}
        missing = [p for p in self.unstepped if id(p) not in position]
        if missing:
            raise TrainingError(f"PMA: {len(missing)} averaged tensor(s) are not parameters of the optimizer.")
        first = state_dict["param_groups"][0] = dict(state_dict["param_groups"][0])
        for key in self.keys:
            first[pending_key(key)] = {position[id(p)]: kept[key] for p, kept in self.unstepped.items() if key in kept}
        return state_dict

    # ------------------------------------------------------------------ load
    def take_loaded_pending(self) -> bool:
        """Take the pending tensors that a load without the engine's hooks left in ``param_groups[0]``."""
        pending = pop_pending(self.optimizer.param_groups[0])
        if not pending:
            return False
        params = self.flat_params()
        self.restore([(params[int(i)], key, t) for key, kept in pending.items() for i, t in kept.items()])
        return True

    def restore(self, loaded: list[tuple[torch.Tensor, str, torch.Tensor]]) -> None:
        """Put loaded tensors in place, in fp32 where the average lives (a load casts and moves state).

        Anchors of another rule are dropped: a cycle resumed under another rule restarts (`pmakit.online.counters`).
        """
        for p, key, avg in loaded:
            if key in self.keys:
                device, pinned = placement(p, self.offload)
                self.keep(p, key, moved_average(avg, p, device, pinned, copy=True))

    def stash(self, state_dict: dict) -> dict:
        """The state dict to load, without the engine's tensors, which are kept aside until `unstash`.

        Taken out before `load_state_dict` casts them to the parameter dtype, or shows the optimizer a
        state it did not create (Adam's ``__setstate__`` wants a ``step``).
        """
        self._stashed = {}
        groups = state_dict.get("param_groups") or [{}]
        # Map saved ids to live parameters the way `load_state_dict` does: in group order (the ids of a
        # state dict rebuilt by torch.distributed.checkpoint need not be 0..n-1 in that order).
        saved_ids = [i for group in state_dict.get("param_groups", []) for i in group.get("params", [])]
        params = self.flat_params()
        id_map = dict(zip(saved_ids, params, strict=True))
        state = {}
        for index, entry in state_dict.get("state", {}).items():
            if isinstance(entry, dict) and any(is_slot_key(key) for key in entry):
                if index in id_map:
                    slots = {key: value for key, value in entry.items() if is_slot_key(key)}
                    self._stashed.update({(index, key): (id_map[index], key, t) for key, t in slots.items()})
                entry = {key: value for key, value in entry.items() if not is_slot_key(key)}
                if not entry:  # a checkpoint of an older pmakit: the average alone, no optimizer state
                    continue
            state[index] = entry
        first = dict(groups[0])
        for key, pending in pop_pending(first).items():
            for position, avg in pending.items():
                self._stashed[("pending", key, int(position))] = (params[int(position)], key, avg)
        loaded = {**state_dict, "state": state}
        if len(first) != len(groups[0]):
            loaded["param_groups"] = [first, *state_dict["param_groups"][1:]]
        return loaded

    def unstash(self) -> None:
        """After the load: the stashed tensors back, into the optimizer state where it has one, else beside it."""
        self.unstepped = {}  # the load replaced the whole state
        self.restore(list(self._stashed.values()))
        self._stashed = {}
